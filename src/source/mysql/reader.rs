//! The binlog reader: connects as a replica, turns events into whole
//! transactions for the consumer, and resumes from the consumer's durable
//! position.
//!
//! **State of this module.** Snapshot (MariaDB, `snapshot.rs`), streaming
//! and resume (MariaDB GTID or file:pos) work. Not yet: the MySQL 8
//! snapshot, DDL parking. See the MySQL source issue. Progress figures
//! come from [`MysqlSource::progress`], bytes behind from [`lag_bytes`].
//!
//! # Why nothing is lost or doubled on restart
//!
//! Every transaction is handed over with the position *after* its commit
//! event (the XID event's `log_pos`) and, on MariaDB, the GTID state that
//! includes it. The consumer stores that position with the transaction's
//! effects. On start we ask the server for everything after it: by GTID
//! state (`@slave_connect_state`), which the server resolves to the first
//! transaction not in it, or by file:pos. Transactions the server sends
//! anyway at or below the stored state (a GTID the state includes, or a
//! commit at or before the stored file:pos) are skipped. A transaction cut
//! off by a disconnect was never handed over and is sent again whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use mysql_async::binlog::events::{Event, EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;
use tokio_util::sync::CancellationToken;

use super::gtid::{parse_gtid_list, Gtid, GtidEvent, GtidList};
use super::rows::{RowDecodeError, RowsKind, TableLayout};
use crate::config::{DatabaseUrl, Secret, SourceSettings};
use crate::connect::{self, ConnectError};
use crate::source::change::{Change, Op};
use crate::source::progress::{ReaderState, SourceProgress};
use crate::source::txn::{
    BinlogOffset, Changes, ChangesBuilder, Offset, Phase, Position, SourceTxn, TxnKind,
    DEFAULT_TXN_MEMORY_BUDGET,
};
use crate::source::{ConsumerError, TxnConsumer};
use crate::ErrorClass;

/// Binlog event type codes this reader acts on or knowingly passes over.
mod event {
    pub const QUERY: u8 = 2;
    /// Written when the server stops: the file ends here.
    pub const STOP: u8 = 3;
    pub const ROTATE: u8 = 4;
    /// Context of statement-based events (auto-increment, RAND(), user
    /// variables): nothing to read from them with row-based logging.
    pub const INTVAR: u8 = 5;
    pub const RAND: u8 = 13;
    pub const USER_VAR: u8 = 14;
    pub const FORMAT_DESCRIPTION: u8 = 15;
    pub const XID: u8 = 16;
    pub const TABLE_MAP: u8 = 19;
    pub const WRITE_ROWS_V1: u8 = 23;
    pub const UPDATE_ROWS_V1: u8 = 24;
    pub const DELETE_ROWS_V1: u8 = 25;
    pub const HEARTBEAT: u8 = 27;
    pub const WRITE_ROWS: u8 = 30;
    pub const UPDATE_ROWS: u8 = 31;
    pub const DELETE_ROWS: u8 = 32;
    pub const MYSQL_GTID: u8 = 33;
    pub const MYSQL_ANONYMOUS_GTID: u8 = 34;
    pub const MYSQL_PREVIOUS_GTIDS: u8 = 35;
    pub const MARIADB_ANNOTATE_ROWS: u8 = 0xa0;
    pub const MARIADB_BINLOG_CHECKPOINT: u8 = 0xa1;
    pub const MARIADB_GTID: u8 = 0xa2;
    pub const MARIADB_GTID_LIST: u8 = 0xa3;
}

/// How often the server sends a heartbeat on an idle binlog stream.
pub const HEARTBEAT_PERIOD: Duration = Duration::from_secs(2);

/// Why a MySQL/MariaDB source stopped or must reconnect.
#[derive(Debug, thiserror::Error)]
pub enum MysqlSourceError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("binlog stream: {0}")]
    Server(#[from] mysql_async::Error),
    #[error("the stored position `{0}` of this source is not a binlog position; was the source's kind changed? Give the source a new name to start it afresh")]
    PositionKind(Position),
    #[error(transparent)]
    Rows(#[from] RowDecodeError),
    #[error("binlog event: {0}")]
    Event(String),
    /// The server closed the stream (a shutdown or restart): reconnect.
    #[error("the server ended the binlog stream")]
    StreamEnded,
    #[error("spilling a large transaction to disk: {0}")]
    Spill(std::io::Error),
    #[error("consumer: {0}")]
    Consumer(#[from] ConsumerError),
    #[error("the binlog at the stored position {position} is gone from the server ({detail}); the changes since cannot be read. Fix: delete the stored position (DELETE FROM source_positions WHERE source = '<name>') and restart to resnapshot (orders already booked are not booked twice), and keep binlogs longer (binlog_expire_logs_seconds) than loyalty-cdc may be stopped")]
    BinlogPurged { position: String, detail: String },
}

/// ER_MASTER_FATAL_ERROR_READING_BINLOG: the requested position is gone
/// (purged) or was never there.
const ER_BINLOG_GONE: u16 = 1236;

impl MysqlSourceError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Connect(error) => error.class(),
            Self::Server(mysql_async::Error::Server(server)) if server.code == ER_BINLOG_GONE => {
                ErrorClass::Definite
            }
            Self::Server(_) | Self::Spill(_) | Self::StreamEnded => ErrorClass::Transient,
            Self::PositionKind(_) | Self::Rows(_) | Self::Event(_) | Self::BinlogPurged { .. } => {
                ErrorClass::Definite
            }
            Self::Consumer(error) => error.class,
        }
    }
}

/// One MySQL/MariaDB source.
pub struct MysqlSource {
    name: Arc<str>,
    url: DatabaseUrl,
    password: Option<Secret>,
    server_id: u32,
    /// `(database, table)` pairs to capture.
    tables: Vec<(String, String)>,
    txn_memory_budget: usize,
    /// Copy existing rows on first start.
    snapshot: bool,
    progress: SourceProgress,
}

/// A transaction being collected.
struct OpenTxn {
    gtid: Option<Gtid>,
    changes: ChangesBuilder,
    /// When the transaction's first event was written (a fallback for the
    /// commit time).
    started_at: DateTime<Utc>,
}

impl MysqlSource {
    /// `tables` as `database.table`; a bare name means the URL's database.
    pub fn new(settings: &SourceSettings, tables: &[&str]) -> Self {
        let default_db = settings.url.database().unwrap_or_default().to_string();
        Self {
            name: Arc::from(settings.name.as_str()),
            url: settings.url.clone(),
            password: settings.password.clone(),
            server_id: settings.mysql_server_id(),
            tables: tables
                .iter()
                .map(|t| match t.split_once('.') {
                    Some((db, table)) => (db.to_string(), table.to_string()),
                    None => (default_db.clone(), t.to_string()),
                })
                .collect(),
            txn_memory_budget: DEFAULT_TXN_MEMORY_BUDGET,
            snapshot: settings.snapshot,
            progress: SourceProgress::default(),
        }
    }

    /// In-memory budget of one transaction's changes before spilling
    /// (default 64 MiB).
    pub fn with_txn_memory_budget(mut self, bytes: usize) -> Self {
        self.txn_memory_budget = bytes;
        self
    }

    /// What the reader has done (state, last applied position and commit
    /// time, counts, monotonic clocks); clone it to watch from elsewhere.
    pub fn progress(&self) -> SourceProgress {
        self.progress.clone()
    }

    fn captures(&self, database: &str, table: &str) -> bool {
        self.tables.iter().any(|(d, t)| d == database && t == table)
    }

    /// Runs until `shutdown`, reconnecting with backoff after transient
    /// errors; returns the first error of any other class.
    pub async fn run<C: TxnConsumer>(
        &self,
        consumer: &mut C,
        shutdown: &CancellationToken,
    ) -> Result<(), MysqlSourceError> {
        let mut backoff = crate::source::reconnect_backoff();
        loop {
            match self.run_once(consumer, shutdown).await {
                Ok(()) => {
                    self.progress.set_state(ReaderState::Stopped);
                    return Ok(());
                }
                Err(_) if shutdown.is_cancelled() => {
                    self.progress.set_state(ReaderState::Stopped);
                    return Ok(());
                }
                Err(error) if error.class() == ErrorClass::Transient => {
                    self.progress.reconnecting(error.to_string());
                    let delay = backoff
                        .next_backoff()
                        .unwrap_or(crate::source::RECONNECT_MAX);
                    tracing::warn!(source = %self.name, %error, delay_ms = delay.as_millis() as u64, "binlog connection lost; reconnecting");
                    if !matches!(error, MysqlSourceError::Consumer(_)) {
                        if let Err(error) = consumer.flush().await {
                            tracing::warn!(source = %self.name, %error, "flush before reconnect failed");
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
                Err(error) => {
                    tracing::error!(source = %self.name, %error, "source stopped");
                    self.progress
                        .set_state(ReaderState::Failed(error.to_string()));
                    return Err(error);
                }
            }
        }
    }

    async fn run_once<C: TxnConsumer>(
        &self,
        consumer: &mut C,
        shutdown: &CancellationToken,
    ) -> Result<(), MysqlSourceError> {
        let durable = match consumer.durable_position().await? {
            Some(position) if position.phase == Phase::Stream => match position.offset {
                Offset::Binlog(offset) => offset,
                Offset::Lsn(_) => return Err(MysqlSourceError::PositionKind(position)),
            },
            // First start, or a snapshot that did not finish: copy the
            // tables in a consistent read view (or, without a snapshot, start
            // at the server's current position), then stream from there.
            _ => {
                self.progress.set_state(ReaderState::Snapshotting);
                let start = if self.snapshot {
                    let mut conn = connect::mysql(&self.url, self.password.as_ref()).await?;
                    let start = super::snapshot::copy_tables(
                        &mut conn,
                        &self.name,
                        &self.tables,
                        consumer,
                        &self.progress,
                    )
                    .await?;
                    let _ = conn.disconnect().await;
                    start
                } else {
                    self.current_position().await?
                };
                tracing::info!(source = %self.name, position = %Offset::Binlog(start.clone()), "streaming starts");
                consumer
                    .apply(SourceTxn {
                        source: Arc::clone(&self.name),
                        kind: TxnKind::SnapshotDone,
                        position: Position {
                            offset: Offset::Binlog(start.clone()),
                            phase: Phase::Stream,
                        },
                        commit_ts: Utc::now(),
                        changes: Changes::default(),
                    })
                    .await?;
                consumer.flush().await?;
                start
            }
        };
        self.stream(consumer, durable, shutdown).await
    }

    async fn current_position(&self) -> Result<BinlogOffset, MysqlSourceError> {
        let mut conn = connect::mysql(&self.url, self.password.as_ref()).await?;
        let (file, pos): (String, u64) = conn
            .query_first("SHOW MASTER STATUS")
            .await?
            .map(|(file, pos, _, _): (String, u64, String, String)| (file, pos))
            .ok_or_else(|| {
                MysqlSourceError::Event(
                    "SHOW MASTER STATUS returned nothing: is log_bin on?".into(),
                )
            })?;
        // MariaDB only; MySQL has no such variable (the query fails).
        let gtids = conn
            .query_first::<String, _>("SELECT @@global.gtid_binlog_pos")
            .await
            .ok()
            .flatten()
            .and_then(|text| text.parse::<GtidList>().ok());
        let _ = conn.disconnect().await;
        Ok(BinlogOffset { file, pos, gtids })
    }

    async fn stream<C: TxnConsumer>(
        &self,
        consumer: &mut C,
        durable: BinlogOffset,
        shutdown: &CancellationToken,
    ) -> Result<(), MysqlSourceError> {
        let mut conn = connect::mysql(&self.url, self.password.as_ref()).await?;
        // MariaDB: GTID events as such (not disguised as BEGIN), and resume
        // by GTID state when we have one.
        let _ = conn.query_drop("SET @mariadb_slave_capability = 4").await;
        // Heartbeats while the binlog is idle: a quiet stream is told from a
        // stalled one, and the server's dump thread notices a reader that
        // went away within one period (until it does, it holds its binlog
        // file against PURGE).
        conn.query_drop(format!(
            "SET @master_heartbeat_period = {}",
            HEARTBEAT_PERIOD.as_nanos()
        ))
        .await?;
        let resume_by_gtid = match &durable.gtids {
            Some(gtids) if !gtids.is_empty() => conn
                .exec_drop("SET @slave_connect_state = ?", (gtids.to_string(),))
                .await
                .is_ok(),
            _ => false,
        };
        let stored = Offset::Binlog(durable.clone()).to_string();
        self.check_not_purged(&mut conn, &durable, &stored).await?;
        let request = BinlogStreamRequest::new(self.server_id);
        let request = if resume_by_gtid {
            request
        } else {
            request
                .with_filename(durable.file.as_bytes())
                .with_pos(durable.pos)
        };
        let gone = |error: mysql_async::Error| match error {
            mysql_async::Error::Server(server) if server.code == ER_BINLOG_GONE => {
                MysqlSourceError::BinlogPurged {
                    position: stored.clone(),
                    detail: server.message,
                }
            }
            other => MysqlSourceError::Server(other),
        };
        let checksums = conn
            .query_first::<String, _>("SELECT @@global.binlog_checksum")
            .await?
            .is_some_and(|alg| !alg.eq_ignore_ascii_case("NONE"));
        let mut stream = conn.get_binlog_stream(request).await.map_err(gone)?;
        self.progress.set_streaming(Position {
            offset: Offset::Binlog(durable.clone()),
            phase: Phase::Stream,
        });

        let mut file = durable.file.clone();
        let mut gtids = durable.gtids.clone().unwrap_or_default();
        // By table id: the TABLE_MAP body and, for a captured table, the
        // layout built from it.
        let mut layouts: HashMap<u64, (Vec<u8>, Option<TableLayout>)> = HashMap::new();
        let mut open: Option<OpenTxn> = None;
        // A transaction was handed over since the last flush. At the start
        // a snapshot that just finished may be in the consumer's batch.
        let mut unflushed = true;
        // The consumer is flushed once no transaction has been handed over
        // for QUIET_FLUSH. One timer, moved on only when it fires: arming a
        // fresh timer per event cost a fifth of the reader's time.
        let mut last_handover = tokio::time::Instant::now();
        let quiet = tokio::time::sleep(crate::source::QUIET_FLUSH);
        tokio::pin!(quiet);
        let cancelled = shutdown.cancelled();
        tokio::pin!(cancelled);
        loop {
            let event = tokio::select! {
                biased;
                _ = &mut cancelled => {
                    consumer.flush().await?;
                    let _ = stream.close().await;
                    return Ok(());
                }
                _ = &mut quiet, if unflushed => {
                    let due = last_handover + crate::source::QUIET_FLUSH;
                    if due > tokio::time::Instant::now() {
                        quiet.as_mut().reset(due);
                    } else {
                        consumer.flush().await?;
                        unflushed = false;
                    }
                    continue;
                }
                event = stream.next() => event,
            };
            let Some(event) = event else {
                return Err(MysqlSourceError::StreamEnded);
            };
            let event = event.map_err(gone)?;
            let header = event.header();
            match header.event_type_raw() {
                event::ROTATE => {
                    if let Ok(Some(EventData::RotateEvent(rotate))) = event.read_data() {
                        // The first ROTATE of a stream is a fake one, sent
                        // before the format description: mysql_async cannot
                        // know yet that it carries a checksum, and leaves the
                        // 4 checksum bytes on the name (mysql_async #189).
                        let fake = rotate.is_fake() || header.log_pos() == 0;
                        file = rotate_file_name(rotate.name_raw(), fake && checksums)?;
                        // Table ids are only good within a file's run of
                        // transactions; the next file maps its tables anew.
                        // This keeps the map to the tables of one file.
                        if !fake {
                            layouts.clear();
                        }
                    }
                }
                event::MARIADB_GTID_LIST => {
                    let list = parse_gtid_list(event.data()).map_err(|e| MysqlSourceError::Event(e.to_string()))?;
                    if gtids.is_empty() {
                        gtids = list;
                    }
                }
                event::MARIADB_GTID => {
                    let gtid = GtidEvent::parse(event.data(), header.server_id())
                        .map_err(|e| MysqlSourceError::Event(e.to_string()))?;
                    open = Some(self.open_txn(Some(gtid.gtid), header.timestamp()));
                }
                event::MYSQL_GTID | event::MYSQL_ANONYMOUS_GTID => {
                    open = Some(self.open_txn(None, header.timestamp()));
                }
                event::QUERY => {
                    let query = match event.read_data() {
                        Ok(Some(EventData::QueryEvent(query))) => query.query().trim().to_ascii_uppercase(),
                        _ => String::new(),
                    };
                    match query.as_str() {
                        "BEGIN" => {
                            if open.is_none() {
                                open = Some(self.open_txn(None, header.timestamp()));
                            }
                        }
                        // A non-transactional engine's commit.
                        "COMMIT" => {
                            if let Some(txn) = open.take() {
                                self.commit(consumer, txn, (&file, u64::from(header.log_pos()), header.timestamp()), &mut gtids, &durable).await?;
                                handed_over(&mut unflushed, &mut last_handover, quiet.as_mut());
                            }
                        }
                        // DDL: a transaction of its own. Table maps after it
                        // describe the new layout (binlog_row_metadata =
                        // FULL names every column), so rows decode with it.
                        _ => {
                            if let Some(txn) = open.take() {
                                if let Some(gtid) = txn.gtid {
                                    gtids.advance(gtid);
                                }
                            }
                            layouts.clear();
                        }
                    }
                }
                event::TABLE_MAP => {
                    // Every transaction maps its tables again, mostly with
                    // the very same bytes: the layout built from them then
                    // stands (a changed table gets a new map, and is read
                    // afresh).
                    let known = event.data().get(..6).and_then(|id| layouts.get(&table_id(id)));
                    if known.is_some_and(|(body, _)| body.as_slice() == event.data()) {
                        continue;
                    }
                    if let Ok(Some(EventData::TableMapEvent(tme))) = event.read_data() {
                        let layout = if self.captures(&tme.database_name(), &tme.table_name()) {
                            Some(TableLayout::from_table_map(&tme, event.data())?)
                        } else {
                            None
                        };
                        layouts.insert(tme.table_id(), (event.data().to_vec(), layout));
                    }
                }
                event::WRITE_ROWS_V1 | event::UPDATE_ROWS_V1 | event::DELETE_ROWS_V1 | event::WRITE_ROWS
                | event::UPDATE_ROWS | event::DELETE_ROWS => {
                    self.rows(&event, &layouts, open.as_mut())?;
                }
                event::XID => {
                    if let Some(txn) = open.take() {
                        self.commit(consumer, txn, (&file, u64::from(header.log_pos()), header.timestamp()), &mut gtids, &durable).await?;
                        handed_over(&mut unflushed, &mut last_handover, quiet.as_mut());
                    }
                }
                // The stream is alive and caught up: progress, not silence.
                event::HEARTBEAT => self.progress.touch(),
                event::FORMAT_DESCRIPTION
                | event::STOP
                | event::INTVAR
                | event::RAND
                | event::USER_VAR
                | event::MYSQL_PREVIOUS_GTIDS
                | event::MARIADB_ANNOTATE_ROWS
                | event::MARIADB_BINLOG_CHECKPOINT => {}
                // Rows we cannot read must never be skipped silently
                // (compressed or encrypted binlogs, new event types).
                other => {
                    return Err(MysqlSourceError::Event(format!(
                        "event type {other:#04x} at {file}:{} is not understood; if the server compresses (log_bin_compress) or encrypts its binlog, turn that off for this source",
                        header.log_pos()
                    )))
                }
            }
        }
    }

    /// Refuses to stream when the changes right after `durable` are no
    /// longer on the server. MariaDB does not refuse by itself: asked for a
    /// GTID state older than its oldest binlog, it streams from that binlog
    /// and the purged transactions are skipped without a word.
    async fn check_not_purged(
        &self,
        conn: &mut mysql_async::Conn,
        durable: &BinlogOffset,
        stored: &str,
    ) -> Result<(), MysqlSourceError> {
        let files: Vec<String> = conn
            .query::<mysql_async::Row, _>("SHOW BINARY LOGS")
            .await?
            .into_iter()
            .filter_map(|mut row| row.take::<String, _>(0))
            .collect();
        let purged = |detail: String| MysqlSourceError::BinlogPurged {
            position: stored.to_string(),
            detail,
        };
        let Some(oldest) = files.first() else {
            return Err(purged("the server lists no binary logs".into()));
        };
        match &durable.gtids {
            Some(read) if !read.is_empty() => {
                // The GTID state at the start of the oldest binlog: every
                // domain's transactions up to it are gone.
                let start: Option<String> = conn
                    .exec_first::<Option<String>, _, _>("SELECT BINLOG_GTID_POS(?, 4)", (oldest,))
                    .await?
                    .flatten();
                let start: GtidList = start.and_then(|t| t.parse().ok()).unwrap_or_default();
                let gap = start.gtids().find(|gtid| !read.includes(gtid)).copied();
                if let Some(gap) = gap {
                    return Err(purged(format!(
                        "the oldest binlog, {oldest}, starts after {gap}, beyond what this source has read in domain {}",
                        gap.domain
                    )));
                }
            }
            _ => {
                if !files.contains(&durable.file) {
                    return Err(purged(format!(
                        "file {} is not among the server's binary logs (oldest: {oldest})",
                        durable.file
                    )));
                }
            }
        }
        Ok(())
    }

    fn open_txn(&self, gtid: Option<Gtid>, timestamp: u32) -> OpenTxn {
        OpenTxn {
            gtid,
            changes: ChangesBuilder::new(self.txn_memory_budget),
            started_at: DateTime::from_timestamp(i64::from(timestamp), 0).unwrap_or_default(),
        }
    }

    fn rows(
        &self,
        event: &Event,
        layouts: &HashMap<u64, (Vec<u8>, Option<TableLayout>)>,
        open: Option<&mut OpenTxn>,
    ) -> Result<(), MysqlSourceError> {
        let Ok(Some(EventData::RowsEvent(data))) = event.read_data() else {
            return Err(MysqlSourceError::Event(
                "a rows event that does not parse".into(),
            ));
        };
        let Some(entry) = layouts.get(&data.table_id()) else {
            return Err(MysqlSourceError::Event(format!(
                "a rows event for table id {} without its TABLE_MAP",
                data.table_id()
            )));
        };
        // Not a captured table.
        let (_, Some(layout)) = entry else {
            return Ok(());
        };
        let Some(txn) = open else {
            return Err(MysqlSourceError::Event(
                "a rows event outside a transaction".into(),
            ));
        };
        let (kind, op) = match &data {
            RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => (RowsKind::Write, Op::Insert),
            RowsEventData::UpdateRowsEventV1(_) | RowsEventData::UpdateRowsEvent(_) => (RowsKind::Update, Op::Update),
            RowsEventData::DeleteRowsEventV1(_) | RowsEventData::DeleteRowsEvent(_) => (RowsKind::Delete, Op::Delete),
            RowsEventData::PartialUpdateRowsEvent(_) => {
                return Err(MysqlSourceError::Event(
                    "partial JSON updates (binlog_row_value_options = PARTIAL_JSON) are not supported; turn the option off".into(),
                ))
            }
        };
        let before: Option<Vec<bool>> = data
            .columns_before_image()
            .map(|b| b.iter().map(|x| *x).collect());
        let after: Option<Vec<bool>> = data
            .columns_after_image()
            .map(|b| b.iter().map(|x| *x).collect());
        let mut spill_error = None;
        layout.decode_rows(
            kind,
            before.as_deref(),
            after.as_deref(),
            data.rows_data(),
            |before, after| {
                if spill_error.is_some() {
                    return;
                }
                if let Err(error) = txn.changes.push(Change {
                    table: Arc::clone(&layout.table),
                    op,
                    before,
                    after,
                }) {
                    spill_error = Some(error);
                }
            },
        )?;
        match spill_error {
            Some(error) => Err(MysqlSourceError::Spill(error)),
            None => Ok(()),
        }
    }

    /// Hands a committed transaction over, unless it is at or below the
    /// durable position.
    /// `at` is the commit event's file, end position and timestamp.
    async fn commit<C: TxnConsumer>(
        &self,
        consumer: &mut C,
        txn: OpenTxn,
        at: (&str, u64, u32),
        gtids: &mut GtidList,
        durable: &BinlogOffset,
    ) -> Result<(), MysqlSourceError> {
        let (file, pos, timestamp) = at;
        let already = match (&txn.gtid, &durable.gtids) {
            (Some(gtid), Some(stored)) => stored.includes(gtid),
            _ => {
                let here = Position {
                    offset: Offset::Binlog(BinlogOffset {
                        file: file.to_string(),
                        pos,
                        gtids: None,
                    }),
                    phase: Phase::Stream,
                };
                let stored = Position {
                    offset: Offset::Binlog(BinlogOffset {
                        gtids: None,
                        ..durable.clone()
                    }),
                    phase: Phase::Stream,
                };
                here <= stored
            }
        };
        if let Some(gtid) = txn.gtid {
            gtids.advance(gtid);
        }
        if already {
            return Ok(());
        }
        let changes = txn.changes.finish().map_err(MysqlSourceError::Spill)?;
        let position = Position {
            offset: Offset::Binlog(BinlogOffset {
                file: file.to_string(),
                pos,
                gtids: (!gtids.is_empty()).then(|| gtids.clone()),
            }),
            phase: Phase::Stream,
        };
        if changes.is_empty() {
            // Nothing captured in it: no need to bother the consumer; the
            // reader is caught up to here all the same (lag, readiness).
            self.progress.passed(position);
            return Ok(());
        }
        let commit_ts = DateTime::from_timestamp(i64::from(timestamp), 0).unwrap_or(txn.started_at);
        let rows = changes.len();
        consumer
            .apply(SourceTxn {
                source: Arc::clone(&self.name),
                kind: TxnKind::Stream { xid: 0 },
                position: position.clone(),
                commit_ts,
                changes,
            })
            .await?;
        self.progress.applied(position, commit_ts, rows);
        Ok(())
    }
}

/// The 6-byte little-endian table id a TABLE_MAP or rows event starts with.
fn table_id(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |id, byte| (id << 8) | u64::from(*byte))
}

/// Notes a transaction handed to the consumer: the quiet-flush timer counts
/// from now. A timer that was idle (nothing unflushed) is armed; a running
/// one is left alone and moves itself on when it fires.
fn handed_over(
    unflushed: &mut bool,
    last_handover: &mut tokio::time::Instant,
    quiet: std::pin::Pin<&mut tokio::time::Sleep>,
) {
    *last_handover = tokio::time::Instant::now();
    if !*unflushed {
        quiet.reset(*last_handover + crate::source::QUIET_FLUSH);
        *unflushed = true;
    }
}

/// Bytes of binlog the server has written past `at`: the rest of its file
/// plus every later file (`SHOW BINARY LOGS` sizes). `None` if `at`'s file
/// is no longer listed.
pub async fn lag_bytes(
    conn: &mut mysql_async::Conn,
    at: &BinlogOffset,
) -> Result<Option<u64>, MysqlSourceError> {
    let files: Vec<(String, u64)> = conn
        .query::<mysql_async::Row, _>("SHOW BINARY LOGS")
        .await?
        .into_iter()
        .filter_map(|mut row| Some((row.take::<String, _>(0)?, row.take::<u64, _>(1)?)))
        .collect();
    let Some(index) = files.iter().position(|(file, _)| *file == at.file) else {
        return Ok(None);
    };
    let rest_of_file = files[index].1.saturating_sub(at.pos);
    Ok(Some(
        rest_of_file + files[index + 1..].iter().map(|(_, size)| size).sum::<u64>(),
    ))
}

/// The file name of a ROTATE event, without the 4 checksum bytes a fake
/// ROTATE carries when checksums are on. A binlog file name ends in `.`
/// and digits; anything else is refused rather than used, since positions
/// compare by that number.
fn rotate_file_name(raw: &[u8], strip_checksum: bool) -> Result<String, MysqlSourceError> {
    let name = match (strip_checksum, raw.len().checked_sub(4)) {
        (true, Some(cut)) => &raw[..cut],
        _ => raw,
    };
    let name = String::from_utf8_lossy(name).into_owned();
    let numbered = name
        .rsplit_once('.')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if !numbered {
        return Err(MysqlSourceError::Event(format!(
            "a ROTATE event names binlog file `{}`, which does not end in .NNNNNN",
            name.escape_debug()
        )));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotate_name_loses_trailing_checksum_bytes() {
        assert_eq!(
            rotate_file_name(b"mariadb-bin.000012", false).unwrap(),
            "mariadb-bin.000012"
        );
        // Checksum bytes that happen to be printable, even digits and dots.
        assert_eq!(
            rotate_file_name(b"mariadb-bin.0000127.1a", true).unwrap(),
            "mariadb-bin.000012"
        );
        assert!(rotate_file_name(b"mariadb-bin.000012\x01\x9a\x00\xff", false).is_err());
    }
}
