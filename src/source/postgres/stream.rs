//! The streaming half of the reader: replication events → whole
//! transactions → the consumer, and the consumer's durable position → the
//! server's `confirmed_flush_lsn`.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use pgwire_replication::{ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use super::pgoutput::{self, LogicalMessage, OldImage, RelationMessage, TupleData, TupleValue};
use super::{value, PgSourceError, ReaderOptions};
use crate::source::change::{Change, Column, Op, ReplicaIdentity, Row, Table, Value};
use crate::source::progress::SourceProgress;
use crate::source::txn::{ChangesBuilder, Lsn, Phase, Position, SourceTxn, TxnKind};
use crate::source::TxnConsumer;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

fn pg_time(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros.saturating_add(PG_EPOCH_OFFSET_MICROS))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Tables as the stream last described them, by relation id. A new
/// Relation message (after DDL) replaces the entry; changes decoded before
/// keep the `Arc` of the shape they were written with.
#[derive(Default)]
pub struct RelationCache {
    tables: HashMap<u32, Arc<Table>>,
}

impl RelationCache {
    pub fn update(&mut self, relation: RelationMessage) {
        let replica_identity = match relation.replica_identity {
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            _ => ReplicaIdentity::Default,
        };
        let table = Table {
            schema: relation.namespace,
            name: relation.name,
            columns: relation
                .columns
                .into_iter()
                .map(|c| Column {
                    name: c.name,
                    type_oid: c.type_oid,
                    is_key: c.is_key,
                })
                .collect(),
            replica_identity,
        };
        self.tables.insert(relation.relation_id, Arc::new(table));
    }

    fn table(&self, relation_id: u32) -> Result<&Arc<Table>, PgSourceError> {
        self.tables
            .get(&relation_id)
            .ok_or(PgSourceError::UnknownRelation { relation_id })
    }

    /// The changes one decoded message stands for (none for messages that
    /// describe rather than change).
    pub fn changes(
        &mut self,
        message: LogicalMessage,
        mut emit: impl FnMut(Change) -> Result<(), PgSourceError>,
    ) -> Result<(), PgSourceError> {
        match message {
            LogicalMessage::Relation(relation) => self.update(relation),
            LogicalMessage::Insert { relation_id, new } => {
                let table = self.table(relation_id)?;
                emit(Change {
                    after: Some(row(table, new, None)?),
                    table: Arc::clone(table),
                    op: Op::Insert,
                    before: None,
                })?;
            }
            LogicalMessage::Update {
                relation_id,
                old,
                new,
            } => {
                let table = self.table(relation_id)?;
                let before = match old {
                    Some((image, tuple)) => Some(row(table, tuple, Some(image))?),
                    None => None,
                };
                emit(Change {
                    after: Some(row(table, new, None)?),
                    before,
                    table: Arc::clone(table),
                    op: Op::Update,
                })?;
            }
            LogicalMessage::Delete {
                relation_id,
                old: (image, tuple),
            } => {
                let table = self.table(relation_id)?;
                emit(Change {
                    before: Some(row(table, tuple, Some(image))?),
                    table: Arc::clone(table),
                    op: Op::Delete,
                    after: None,
                })?;
            }
            LogicalMessage::Truncate { relation_ids, .. } => {
                for relation_id in relation_ids {
                    emit(Change {
                        table: Arc::clone(self.table(relation_id)?),
                        op: Op::Truncate,
                        before: None,
                        after: None,
                    })?;
                }
            }
            // Types are read from their text output; origins are not used
            // (changes replicated in from elsewhere still count as sales).
            LogicalMessage::Type { .. } | LogicalMessage::Origin { .. } => {}
            LogicalMessage::Begin { .. }
            | LogicalMessage::Commit { .. }
            | LogicalMessage::Message { .. } => {}
        }
        Ok(())
    }
}

/// Converts a tuple to a row of `table`. In a key-only old image the
/// server sends non-key columns as null: they become [`Value::Absent`], not
/// [`Value::Null`].
fn row(table: &Table, tuple: TupleData, image: Option<OldImage>) -> Result<Row, PgSourceError> {
    if tuple.0.len() != table.columns.len() {
        return Err(PgSourceError::Protocol(format!(
            "a change of `{table}` has {} columns, its relation {}",
            tuple.0.len(),
            table.columns.len()
        )));
    }
    let key_only = image == Some(OldImage::Key);
    let values = tuple
        .0
        .into_iter()
        .zip(&table.columns)
        .map(|(value, column)| match value {
            TupleValue::Null if key_only && !column.is_key => Value::Absent,
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::UnchangedToast,
            TupleValue::Text(text) => value::from_text(column.type_oid, &text),
            TupleValue::Binary(bytes) => Value::Bytes(bytes.to_vec()),
        })
        .collect();
    Ok(Row(values))
}

struct OpenTxn {
    xid: u32,
    changes: ChangesBuilder,
}

/// How a stream session ended without error.
pub enum StreamEnd {
    /// Shutdown was requested; everything applied was flushed.
    Shutdown,
    /// The configured stop LSN was reached (benchmarks, bounded replays).
    StopLsnReached,
}

/// What a stream session works with besides the replication client.
pub struct StreamContext<'a> {
    /// An ordinary connection to the source (heartbeats).
    pub query: &'a tokio_postgres::Client,
    /// The slot being read, for errors about it.
    pub slot: &'a str,
    pub source: &'a Arc<str>,
    pub options: &'a ReaderOptions,
    pub progress: &'a SourceProgress,
    pub shutdown: &'a CancellationToken,
}

/// Streams from an already started replication client until shutdown, the
/// stop LSN, or an error.
pub async fn stream<C: TxnConsumer>(
    client: &mut ReplicationClient,
    context: StreamContext<'_>,
    start: Position,
    consumer: &mut C,
) -> Result<StreamEnd, PgSourceError> {
    let StreamContext {
        query,
        slot,
        source,
        options,
        progress,
        shutdown,
    } = context;
    let mut relations = RelationCache::default();
    let mut open: Option<OpenTxn> = None;
    // Highest position handed to the consumer, and highest it made durable.
    progress.set_streaming(start.clone());
    let mut applied = start.clone();
    let mut durable = start;
    let mut heartbeat = options.heartbeat_interval.map(tokio::time::interval);
    // A snapshot that just finished is in the consumer's open batch: make
    // it durable now, not when the first change or keepalive comes.
    if let Some(flushed) = consumer.flush().await? {
        confirm(client, progress, &mut durable, flushed);
    }

    // The consumer is flushed once nothing has been handed over for
    // QUIET_FLUSH. One timer, moved on only when it fires early: a fresh
    // timer per message is a timer-wheel insert and a driver wake-up each.
    let mut last_handover = tokio::time::Instant::now();
    let quiet = tokio::time::sleep(crate::source::QUIET_FLUSH);
    tokio::pin!(quiet);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);

    loop {
        let event = tokio::select! {
            biased;
            _ = &mut cancelled => {
                if let Some(flushed) = consumer.flush().await? {
                    confirm(client, progress, &mut durable, flushed);
                }
                return Ok(StreamEnd::Shutdown);
            }
            _ = async {
                match heartbeat.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                // A non-transactional message gives a quiet database a WAL
                // position of its own to confirm.
                query
                    .execute("SELECT pg_logical_emit_message(false, 'loyalty-cdc.heartbeat', '')", &[])
                    .await?;
                continue;
            }
            _ = &mut quiet, if applied > durable => {
                let now = tokio::time::Instant::now();
                let due = last_handover + crate::source::QUIET_FLUSH;
                if due > now {
                    quiet.as_mut().reset(due);
                    continue;
                }
                // If the flush leaves something undurable (the consumer
                // commits later), ask again after another quiet period.
                quiet.as_mut().reset(now + crate::source::QUIET_FLUSH);
                if let Some(flushed) = consumer.flush().await? {
                    confirm(client, progress, &mut durable, flushed);
                }
                continue;
            }
            event = client.recv() => event.map_err(|e| super::classify_wire(e, slot))?,
        };
        let Some(event) = event else {
            return Err(PgSourceError::StreamEnded);
        };
        match event {
            ReplicationEvent::Begin { xid, .. } => {
                if open.is_some() {
                    return Err(PgSourceError::Protocol("Begin inside a transaction".into()));
                }
                open = Some(OpenTxn {
                    xid,
                    changes: ChangesBuilder::new(options.txn_memory_budget),
                });
            }
            ReplicationEvent::XLogData { data, .. } => {
                let message = pgoutput::decode(data)?;
                match (&mut open, message) {
                    (_, LogicalMessage::Relation(relation)) => relations.update(relation),
                    (Some(txn), message) => relations.changes(message, |change| {
                        txn.changes.push(change).map_err(PgSourceError::Spill)
                    })?,
                    (None, LogicalMessage::Type { .. } | LogicalMessage::Origin { .. }) => {}
                    (None, other) => {
                        return Err(PgSourceError::Protocol(format!(
                            "change outside a transaction: {other:?}"
                        )))
                    }
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let Some(txn) = open.take() else {
                    return Err(PgSourceError::Protocol("Commit without Begin".into()));
                };
                let position = Position::stream(Lsn(end_lsn.as_u64()));
                if position <= applied {
                    // Already applied before a restart: the server may resend
                    // from an older confirmed position.
                    continue;
                }
                let commit_ts = pg_time(commit_time_micros);
                let changes = txn.changes.finish().map_err(PgSourceError::Spill)?;
                let rows = changes.len();
                let returned = consumer
                    .apply(SourceTxn {
                        source: Arc::clone(source),
                        kind: TxnKind::Stream { xid: txn.xid },
                        position: position.clone(),
                        commit_ts,
                        changes,
                    })
                    .await?;
                progress.applied(position.clone(), commit_ts, rows);
                last_handover = tokio::time::Instant::now();
                applied = position;
                if let Some(returned) = returned {
                    confirm(client, progress, &mut durable, returned);
                }
                if options
                    .stop_at
                    .is_some_and(|stop| end_lsn.as_u64() >= stop.0)
                {
                    if let Some(flushed) = consumer.flush().await? {
                        confirm(client, progress, &mut durable, flushed);
                    }
                    return Ok(StreamEnd::StopLsnReached);
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                idle_point(
                    client,
                    progress,
                    &open,
                    &applied,
                    &mut durable,
                    Lsn(wal_end.as_u64()),
                )?;
            }
            ReplicationEvent::Message {
                transactional: false,
                lsn,
                ..
            } => {
                idle_point(
                    client,
                    progress,
                    &open,
                    &applied,
                    &mut durable,
                    Lsn(lsn.as_u64()),
                )?;
            }
            // Transactional messages belong to their transaction; nothing
            // maps them today.
            ReplicationEvent::Message { .. } => {}
            // We never give the transport a stop LSN (it would stop before
            // the transaction that reaches it, and without sending the last
            // confirmation); stopping is ours, after a commit, above.
            ReplicationEvent::StoppedAt { .. } => return Ok(StreamEnd::StopLsnReached),
        }
    }
}

/// Reports `position` to the server as flushed if it is a streaming
/// position beyond what was confirmed.
fn confirm(
    client: &ReplicationClient,
    progress: &SourceProgress,
    durable: &mut Position,
    position: Position,
) {
    // A position that is not an LSN cannot come from this reader's
    // transactions; there is nothing to confirm with it.
    let Some(lsn) = position.lsn() else { return };
    if position.phase == Phase::Stream && position > *durable {
        *durable = position;
        client.update_applied_lsn(pgwire_replication::Lsn(lsn.0));
        progress.confirmed(lsn);
    }
}

/// The server says its WAL has reached `wal_end` and everything committed
/// before that has been sent. With no transaction open and everything
/// applied made durable, nothing below `wal_end` is still owed to the
/// consumer, so confirming it is safe — and necessary: on a slot whose
/// tables are quiet (or whose changes are all filtered out) it is the only
/// way `confirmed_flush_lsn` moves and the server can recycle WAL.
fn idle_point(
    client: &ReplicationClient,
    progress: &SourceProgress,
    open: &Option<OpenTxn>,
    applied: &Position,
    durable: &mut Position,
    wal_end: Lsn,
) -> Result<(), PgSourceError> {
    tracing::trace!(%wal_end, open = open.is_some(), %applied, durable = %durable, "idle point");
    if open.is_some() {
        return Ok(());
    }
    // What was applied but is not durable yet is left to the quiet-flush
    // timer: the server sends keepalives between transactions while it
    // keeps up, and flushing on each one made every transaction a ledger
    // commit of its own (measured: 570 instead of 4,400 orders/s).
    progress.touch();
    if &*durable >= applied && durable.lsn().is_some_and(|confirmed| wal_end > confirmed) {
        client.update_applied_lsn(pgwire_replication::Lsn(wal_end.0));
        progress.confirmed(wal_end);
    }
    Ok(())
}
