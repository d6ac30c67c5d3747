//! The initial copy of the captured tables, consistent with a binlog
//! position and taken without a global lock (MariaDB).
//!
//! # Why snapshot and stream meet without gap or overlap
//!
//! `START TRANSACTION WITH CONSISTENT SNAPSHOT` opens a read view and, in
//! the same step, MariaDB records the binlog position of exactly that view
//! in the session's `binlog_snapshot_file` / `binlog_snapshot_position`
//! status: every transaction committed before it is visible to the view
//! and lies before that position in the binlog; every later one is
//! invisible and lies after it. `BINLOG_GTID_POS(file, pos)` gives the GTID
//! state at the same point. We copy the tables inside the view and then
//! stream from that position, so each transaction reaches the consumer
//! once: in the copy or in the stream. (MySQL 8 has no such status; its
//! path — a short `FLUSH TABLES WITH READ LOCK` around reading
//! `gtid_executed` — is still to come, and this module refuses MySQL.)
//!
//! Rows are read with the text protocol and streamed: memory holds one
//! chunk ([`CHUNK_ROWS`] rows) whatever the table's size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{NaiveDate, NaiveDateTime, Utc};
use futures_util::StreamExt;
use mysql_async::consts::{ColumnFlags, ColumnType};
use mysql_async::prelude::Queryable;
use rust_decimal::Decimal;

use super::gtid::GtidList;
use super::reader::MysqlSourceError;
use crate::source::change::{Change, Column, Op, ReplicaIdentity, Row, Table, Value};
use crate::source::txn::{BinlogOffset, Offset, Phase, Position, SourceTxn};
use crate::source::TxnConsumer;

/// Rows per snapshot transaction (see the PostgreSQL snapshot's reasons).
pub const CHUNK_ROWS: usize = 10_000;
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
const BINARY_CHARSET: u16 = 63;

/// Copies `tables` (database, table) in one consistent read view and
/// returns the binlog position streaming must start from.
pub async fn copy_tables<C: TxnConsumer>(
    conn: &mut mysql_async::Conn,
    source: &Arc<str>,
    tables: &[(String, String)],
    consumer: &mut C,
    watch: &crate::source::progress::SourceProgress,
) -> Result<BinlogOffset, MysqlSourceError> {
    watch.snapshot_started(tables.len());
    let version: String = conn
        .query_first("SELECT @@version")
        .await?
        .unwrap_or_default();
    if !version.contains("MariaDB") {
        return Err(MysqlSourceError::Event(format!(
            "the lock-free snapshot needs MariaDB (server {version}); set snapshot = false for this source until MySQL 8 snapshots are supported"
        )));
    }
    conn.query_drop("SET SESSION time_zone = '+00:00'").await?;
    conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        .await?;
    conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
        .await?;
    let status: Vec<(String, String)> = conn
        .query("SHOW SESSION STATUS LIKE 'binlog_snapshot_%'")
        .await?;
    let value = |name: &str| {
        status
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let file = value("Binlog_snapshot_file")
        .filter(|f| !f.is_empty())
        .ok_or_else(|| {
            MysqlSourceError::Event(
                "the server reports no binlog_snapshot_file: is log_bin on?".into(),
            )
        })?;
    let pos: u64 = value("Binlog_snapshot_position")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| {
            MysqlSourceError::Event("the server reports no binlog_snapshot_position".into())
        })?;
    let gtids: Option<GtidList> = conn
        .exec_first::<Option<String>, _, _>("SELECT BINLOG_GTID_POS(?, ?)", (&file, pos))
        .await?
        .flatten()
        .and_then(|text| text.parse().ok());
    let start = BinlogOffset { file, pos, gtids };
    let position = Position {
        offset: Offset::Binlog(start.clone()),
        phase: Phase::Snapshot,
    };
    let snapshot_ts = Utc::now();

    let started = Instant::now();
    let mut last_log = started;
    let mut total = 0u64;
    for (database, name) in tables {
        let query = format!(
            "SELECT * FROM `{}`.`{}`",
            database.replace('`', "``"),
            name.replace('`', "``")
        );
        let mut result = conn.query_iter(query).await?;
        let columns = result.columns().ok_or_else(|| {
            MysqlSourceError::Event(format!("`{database}`.`{name}` returned no columns"))
        })?;
        let table = Arc::new(Table {
            schema: database.clone(),
            name: name.clone(),
            columns: columns
                .iter()
                .map(|c| Column {
                    name: c.name_str().into_owned(),
                    type_oid: u32::from(c.column_type() as u8),
                    is_key: c.flags().contains(ColumnFlags::PRI_KEY_FLAG),
                })
                .collect(),
            replica_identity: ReplicaIdentity::Full,
        });
        let Some(mut rows) = result.stream::<mysql_async::Row>().await? else {
            continue;
        };
        let mut chunk = Vec::with_capacity(CHUNK_ROWS);
        let mut table_rows = 0u64;
        while let Some(row) = rows.next().await {
            let row = row?;
            let values = row
                .unwrap_raw()
                .into_iter()
                .zip(columns.iter())
                .map(|(value, column)| from_text(value, column))
                .collect();
            chunk.push(Change {
                table: Arc::clone(&table),
                op: Op::Insert,
                before: None,
                after: Some(Row(values)),
            });
            table_rows += 1;
            if chunk.len() >= CHUNK_ROWS {
                let copied = chunk.len();
                consumer
                    .apply(SourceTxn::snapshot_chunk(
                        source,
                        &position,
                        snapshot_ts,
                        std::mem::take(&mut chunk),
                    ))
                    .await?;
                watch.snapshot_copied(copied);
            }
            if last_log.elapsed() >= PROGRESS_EVERY {
                last_log = Instant::now();
                let rate = (total + table_rows) as f64 / started.elapsed().as_secs_f64().max(0.001);
                tracing::info!(source = %source, table = %format!("{database}.{name}"), rows = total + table_rows, rows_per_second = rate.round(), "snapshot in progress");
            }
        }
        drop(rows);
        if !chunk.is_empty() {
            let copied = chunk.len();
            consumer
                .apply(SourceTxn::snapshot_chunk(
                    source,
                    &position,
                    snapshot_ts,
                    chunk,
                ))
                .await?;
            watch.snapshot_copied(copied);
        }
        watch.snapshot_table_done();
        tracing::info!(source = %source, table = %format!("{database}.{name}"), rows = table_rows, "snapshot: table copied");
        total += table_rows;
    }
    conn.query_drop("COMMIT").await?;
    tracing::info!(source = %source, rows = total, seconds = started.elapsed().as_secs_f64(), position = %Offset::Binlog(start.clone()), "snapshot copied");
    Ok(start)
}

/// A text-protocol value typed like the binlog decoder types it, so a row
/// reads the same from the snapshot and from the stream.
fn from_text(value: Option<mysql_async::Value>, column: &mysql_async::Column) -> Value {
    let bytes = match value {
        None | Some(mysql_async::Value::NULL) => return Value::Null,
        Some(mysql_async::Value::Bytes(bytes)) => bytes,
        // The text protocol sends text; anything else is kept as text.
        Some(other) => return Value::Text(other.as_sql(true)),
    };
    let text = || String::from_utf8_lossy(&bytes).into_owned();
    let flags = column.flags();
    match column.column_type() {
        ColumnType::MYSQL_TYPE_TINY
        | ColumnType::MYSQL_TYPE_SHORT
        | ColumnType::MYSQL_TYPE_INT24
        | ColumnType::MYSQL_TYPE_LONG
        | ColumnType::MYSQL_TYPE_LONGLONG
        | ColumnType::MYSQL_TYPE_YEAR => match text().parse::<i64>() {
            Ok(int) => Value::Int(int),
            Err(_) => Decimal::from_str_exact(&text())
                .map(Value::Numeric)
                .unwrap_or_else(|_| Value::Text(text())),
        },
        ColumnType::MYSQL_TYPE_FLOAT | ColumnType::MYSQL_TYPE_DOUBLE => text()
            .parse()
            .map(Value::Float)
            .unwrap_or_else(|_| Value::Text(text())),
        ColumnType::MYSQL_TYPE_NEWDECIMAL | ColumnType::MYSQL_TYPE_DECIMAL => {
            Decimal::from_str_exact(&text())
                .map(Value::Numeric)
                .unwrap_or_else(|_| Value::Text(text()))
        }
        ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE => {
            NaiveDate::parse_from_str(&text(), "%Y-%m-%d")
                .map(Value::Date)
                .unwrap_or_else(|_| Value::Text(text()))
        }
        ColumnType::MYSQL_TYPE_DATETIME | ColumnType::MYSQL_TYPE_DATETIME2 => {
            NaiveDateTime::parse_from_str(&text(), "%Y-%m-%d %H:%M:%S%.f")
                .map(Value::Timestamp)
                .unwrap_or_else(|_| Value::Text(text()))
        }
        // Rendered in the session time zone, which we set to UTC.
        ColumnType::MYSQL_TYPE_TIMESTAMP | ColumnType::MYSQL_TYPE_TIMESTAMP2 => {
            match NaiveDateTime::parse_from_str(&text(), "%Y-%m-%d %H:%M:%S%.f") {
                Ok(time) if time.and_utc().timestamp() != 0 => Value::TimestampTz(time.and_utc()),
                _ => Value::Text(text()),
            }
        }
        ColumnType::MYSQL_TYPE_BIT => Value::Bytes(bytes),
        ColumnType::MYSQL_TYPE_TIME | ColumnType::MYSQL_TYPE_TIME2 => Value::Text(text()),
        _ if flags.contains(ColumnFlags::ENUM_FLAG) || flags.contains(ColumnFlags::SET_FLAG) => {
            Value::Text(text())
        }
        _ if column.character_set() == BINARY_CHARSET => Value::Bytes(bytes),
        _ => match String::from_utf8(bytes) {
            Ok(text) => Value::Text(text),
            Err(error) => Value::Bytes(error.into_bytes()),
        },
    }
}
