//! The initial copy of the captured tables, inside the snapshot the slot
//! exported when it was created (see the module doc of `source::postgres`
//! for why that makes snapshot and stream meet without gap or overlap).
//!
//! Rows are read with `COPY … TO STDOUT` (text format, the same text the
//! stream carries, so values convert identically), parsed as the bytes
//! arrive, and handed over in chunks of at most [`CHUNK_ROWS`] rows or
//! [`CHUNK_BYTES`]: memory holds one chunk and one network buffer, whatever
//! the table's size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::catalog::{self, TableSpec};
use super::preflight::quote_identifier;
use super::{value, PgSourceError};
use crate::source::change::{Change, Op, Row, Table, Value};
use crate::source::txn::{Position, SourceTxn};
use crate::source::TxnConsumer;

/// Rows per snapshot transaction: large enough that per-transaction costs
/// vanish, small enough that a consumer batch stays quick to commit.
pub const CHUNK_ROWS: usize = 10_000;
/// Bytes per snapshot transaction (approximate), for tables of wide rows.
pub const CHUNK_BYTES: usize = 16 * 1024 * 1024;
/// How often progress is logged during a long copy.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Totals of a finished snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    pub tables: usize,
    pub rows: u64,
    /// When the snapshot was taken (the server's clock).
    pub taken_at: DateTime<Utc>,
}

/// Copies every table inside the exported snapshot `snapshot_name` and
/// hands the rows to `consumer` as snapshot transactions at `position`;
/// `watch` shows how far it got.
#[allow(clippy::too_many_arguments)]
pub async fn copy_tables<C: TxnConsumer>(
    client: &mut Client,
    source: &Arc<str>,
    snapshot_name: &str,
    tables: &[TableSpec],
    position: Position,
    consumer: &mut C,
    shutdown: &CancellationToken,
    watch: &crate::source::progress::SourceProgress,
) -> Result<SnapshotReport, PgSourceError> {
    watch.snapshot_started(tables.len());
    let txn = client.transaction().await?;
    txn.batch_execute(&format!(
        "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        snapshot_name.replace('\'', "''")
    ))
    .await
    .map_err(|error| PgSourceError::SnapshotImport {
        name: snapshot_name.to_string(),
        error,
    })?;
    // Business time of snapshot rows: when the snapshot was taken.
    let snapshot_ts: DateTime<Utc> = txn.query_one("SELECT now()", &[]).await?.get(0);
    let estimated: i64 = {
        let mut total = 0i64;
        for table in tables {
            let row = txn
                .query_one(
                    "SELECT GREATEST(c.reltuples, 0)::bigint FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                      WHERE n.nspname = $1 AND c.relname = $2",
                    &[&table.schema, &table.name],
                )
                .await?;
            total += row.get::<_, i64>(0);
        }
        total
    };
    let mut progress = Progress::new(estimated);
    let mut report = SnapshotReport {
        tables: 0,
        rows: 0,
        taken_at: snapshot_ts,
    };
    for spec in tables {
        let table = catalog::describe_table(&txn, spec).await?;
        let columns: Vec<String> = table
            .columns
            .iter()
            .map(|c| quote_identifier(&c.name))
            .collect();
        let copy = format!("COPY {} ({}) TO STDOUT", spec.quoted(), columns.join(", "));
        let stream = txn.copy_out(copy.as_str()).await?;
        futures_util::pin_mut!(stream);
        let mut buffer = BytesMut::new();
        // Bytes of `buffer` already searched for a newline: a row wider
        // than one network chunk is scanned once, not once per chunk.
        let mut scanned = 0usize;
        let mut chunk: Vec<Change> = Vec::new();
        let mut chunk_bytes = 0usize;
        let mut table_rows = 0u64;
        loop {
            let more = stream.next().await.transpose()?;
            if let Some(bytes) = &more {
                buffer.extend_from_slice(bytes);
            }
            while let Some(found) = buffer[scanned..].iter().position(|b| *b == b'\n') {
                let line = buffer.split_to(scanned + found);
                buffer.advance(1);
                scanned = 0;
                let row = parse_copy_line(&line, &table).map_err(|problem| {
                    PgSourceError::Setup(format!("snapshot of `{spec}`: {problem}"))
                })?;
                let change = Change {
                    table: Arc::clone(&table),
                    op: Op::Insert,
                    before: None,
                    after: Some(row),
                };
                chunk_bytes += change.approx_size();
                chunk.push(change);
                table_rows += 1;
                if chunk.len() >= CHUNK_ROWS || chunk_bytes >= CHUNK_BYTES {
                    if shutdown.is_cancelled() {
                        return Err(PgSourceError::Setup(
                            "stopped during the snapshot; the next start copies again".into(),
                        ));
                    }
                    let rows = chunk.len();
                    consumer
                        .apply(SourceTxn::snapshot_chunk(
                            source,
                            &position,
                            snapshot_ts,
                            std::mem::take(&mut chunk),
                        ))
                        .await?;
                    watch.snapshot_copied(rows);
                    chunk_bytes = 0;
                }
            }
            scanned = buffer.len();
            progress.rows(report.rows + table_rows, spec);
            if more.is_none() {
                break;
            }
        }
        if !buffer.is_empty() {
            return Err(PgSourceError::Setup(format!(
                "snapshot of `{spec}`: COPY output ended inside a row"
            )));
        }
        if !chunk.is_empty() {
            let rows = chunk.len();
            consumer
                .apply(SourceTxn::snapshot_chunk(
                    source,
                    &position,
                    snapshot_ts,
                    chunk,
                ))
                .await?;
            watch.snapshot_copied(rows);
        }
        watch.snapshot_table_done();
        tracing::info!(source = %source, table = %spec, rows = table_rows, "snapshot: table copied");
        report.rows += table_rows;
        report.tables += 1;
    }
    txn.commit().await?;
    progress.done(report.rows);
    Ok(report)
}

struct Progress {
    estimated: i64,
    started: Instant,
    last_log: Instant,
}

impl Progress {
    fn new(estimated: i64) -> Self {
        let now = Instant::now();
        Self {
            estimated,
            started: now,
            last_log: now,
        }
    }

    fn rows(&mut self, rows: u64, table: &TableSpec) {
        if self.last_log.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last_log = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = rows as f64 / elapsed;
        let remaining = (self.estimated as f64 - rows as f64).max(0.0);
        let eta_seconds = if rate > 0.0 {
            remaining / rate
        } else {
            f64::NAN
        };
        tracing::info!(
            table = %table,
            rows,
            estimated_rows = self.estimated,
            rows_per_second = rate.round(),
            eta_seconds = eta_seconds.round(),
            "snapshot in progress"
        );
    }

    fn done(&self, rows: u64) {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        tracing::info!(
            rows,
            seconds = (elapsed * 10.0).round() / 10.0,
            rows_per_second = (rows as f64 / elapsed).round(),
            "snapshot copied"
        );
    }
}

/// One line of `COPY … TO STDOUT` text format: tab-separated columns, `\N`
/// for NULL, backslash escapes (PostgreSQL docs, COPY, "Text Format").
/// Written by hand: it is the inverse of a dozen lines of the server's
/// `CopyAttributeOutText`, and no crate parses it apart from a full client.
pub fn parse_copy_line(line: &[u8], table: &Table) -> Result<Row, String> {
    let mut values = Vec::with_capacity(table.columns.len());
    for (index, field) in line.split(|b| *b == b'\t').enumerate() {
        let Some(column) = table.columns.get(index) else {
            return Err(format!(
                "COPY row has more than the {} expected columns",
                table.columns.len()
            ));
        };
        if field == b"\\N" {
            values.push(Value::Null);
            continue;
        }
        let text = if field.contains(&b'\\') {
            unescape(field)
        } else {
            field.to_vec()
        };
        values.push(value::from_text(column.type_oid, &text));
    }
    if values.len() != table.columns.len() {
        return Err(format!(
            "COPY row has {} columns, expected {}",
            values.len(),
            table.columns.len()
        ));
    }
    Ok(Row(values))
}

fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let byte = field[i];
        i += 1;
        if byte != b'\\' || i >= field.len() {
            out.push(byte);
            continue;
        }
        let escaped = field[i];
        i += 1;
        match escaped {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut code = u32::from(escaped - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            code = code * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(code as u8);
            }
            b'x' => {
                let mut code = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match field.get(i).and_then(|d| (*d as char).to_digit(16)) {
                        Some(d) => {
                            code = code * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(code as u8);
                }
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::change::{Column, ReplicaIdentity};

    fn table(types: &[u32]) -> Table {
        Table {
            schema: "public".into(),
            name: "t".into(),
            columns: types
                .iter()
                .enumerate()
                .map(|(i, t)| Column {
                    name: format!("c{i}"),
                    type_oid: *t,
                    is_key: i == 0,
                })
                .collect(),
            replica_identity: ReplicaIdentity::Default,
        }
    }

    #[test]
    fn copy_text_rows_unescape_and_keep_nulls_apart_from_the_text_backslash_n() {
        let t = table(&[
            value::oid::INT4,
            value::oid::TEXT,
            value::oid::TEXT,
            value::oid::TEXT,
        ]);
        let row = parse_copy_line(b"7\ta\\tb\\nc\\\\d\t\\N\t\\\\N", &t).unwrap();
        assert_eq!(
            row.0,
            vec![
                Value::Int(7),
                Value::Text("a\tb\nc\\d".into()),
                Value::Null,
                Value::Text("\\N".into()),
            ]
        );
    }

    #[test]
    fn a_copy_row_with_the_wrong_column_count_is_an_error() {
        let t = table(&[value::oid::INT4, value::oid::TEXT]);
        assert!(parse_copy_line(b"1", &t).is_err());
        assert!(parse_copy_line(b"1\ta\tb", &t).is_err());
    }
}
