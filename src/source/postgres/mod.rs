//! PostgreSQL sources, read through logical replication (`pgoutput`).
//!
//! - `preflight.rs`: what the server and role must provide (`check`).
//! - `catalog.rs`: slot, publication, table shapes and lag, over an
//!   ordinary connection.
//! - `snapshot.rs`: the initial copy inside the slot's exported snapshot.
//! - `stream.rs`: replication events → whole transactions → the consumer,
//!   and the consumer's durable position → the server.
//! - `pgoutput.rs`: the wire decoder; `value.rs`: text → typed values.
//!
//! Transport: `pgwire-replication` (pinned), because tokio-postgres has no
//! replication mode. It answers keepalives from its own task even while we
//! are slow, reports to the server exactly the LSN we give it
//! (`update_applied_lsn`, monotonic), refuses a missing slot instead of
//! creating one, and runs commands on the replication session before
//! streaming (which we need to create the slot with an exported snapshot).
//! It decodes only Begin/Commit/Message; everything else is ours.
//!
//! # Why no change is lost or doubled
//!
//! Positions are commit **end** LSNs. PostgreSQL decodes and sends a
//! transaction iff its commit record lies at or after the start position,
//! in commit order, and never sends anything below the slot's
//! `confirmed_flush_lsn`. The consumer stores the position of every
//! transaction in the same database transaction as its effects, and we
//! confirm to the server only positions the consumer reported durable.
//!
//! **First start (nothing durable).** We create the slot on a replication
//! session with `SNAPSHOT 'export'`. The server returns its consistent point
//! `C` and a snapshot that sees exactly the transactions committed before
//! `C`. We import that snapshot (`SET TRANSACTION SNAPSHOT`) before the
//! session runs any other command, copy every table in it, and hand the rows
//! over at `snapshot@C`; then `SnapshotDone` at `C`. Streaming starts at `C`
//! and yields exactly the transactions committed after `C`. Every
//! transaction is therefore either in the snapshot or in the stream, never
//! both and never neither. Writes made during the copy commit after `C` and
//! arrive through the stream.
//!
//! **Snapshot interrupted.** If we stop before `SnapshotDone` is durable, the
//! stored phase is still `Snapshot` (or nothing). The next start drops the
//! slot it had created — nothing of it was confirmed or relied on — and runs
//! the whole snapshot again under a new consistent point. Rows the consumer
//! already took are delivered again; the contract
//! ([`crate::source::TxnConsumer`]) says snapshot rows must be taken
//! idempotently (orders are idempotent by source and order reference).
//!
//! **Restart or reconnect while streaming at durable position `P`.** We
//! start replication at `P`. The server resends from its confirmed flush
//! position, which is at most `P` (we never confirmed beyond durability,
//! except the idle rule below): transactions at or below `P` may come again
//! and we skip them (`position <= applied`); the first one above `P` is the
//! first not yet applied, because commit order is position order.
//!
//! **Idle confirmation.** A keepalive (or our own non-transactional
//! heartbeat message) at WAL position `K` means every transaction committed
//! below `K` has been sent before it. When no transaction is open and
//! everything applied is durable, nothing below `K` is owed to the consumer,
//! so confirming `K` loses nothing. Without it an idle slot, or one whose
//! tables are quiet while others write, would pin WAL forever.
//!
//! **What we never do.** Recreate a missing slot while a streaming position
//! is stored (the changes between `P` and a new slot's consistent point
//! would be skipped silently): that is [`PgSourceError::SlotMissing`], and
//! an operator decides to resnapshot.
//!
//! # Memory
//!
//! One source holds at most: the transport's event buffer
//! ([`ReaderOptions::buffer_events`] messages, each one row or one
//! transaction boundary), one open transaction's changes up to
//! [`ReaderOptions::txn_memory_budget`] (the rest is spilled to an unlinked
//! temporary file), and during the snapshot one chunk
//! ([`snapshot::CHUNK_ROWS`] rows or [`snapshot::CHUNK_BYTES`]).

pub mod catalog;
pub mod pgoutput;
pub mod preflight;
pub mod snapshot;
pub mod stream;
pub mod value;

use std::sync::Arc;
use std::time::Duration;

use backoff::backoff::Backoff;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, SslMode, TlsConfig};
use tokio_util::sync::CancellationToken;

pub use crate::source::progress::{ProgressSnapshot, ReaderState, SourceProgress};
pub use catalog::TableSpec;

use crate::config::{DatabaseUrl, Secret, SourceSettings};
use crate::connect::{self, ConnectError, APPLICATION_NAME};
use crate::source::txn::{
    Changes, Lsn, Phase, Position, SourceTxn, TxnKind, DEFAULT_TXN_MEMORY_BUDGET,
};
use crate::source::{ConsumerError, TxnConsumer};
use crate::ErrorClass;

/// Events buffered between the transport and the decoder. Each is one row
/// change or boundary; 1024 keeps the pipe full without holding much.
pub const DEFAULT_BUFFER_EVENTS: usize = 1024;
/// How often the flushed position reaches the server once it moved. One
/// small message a second: cheap, and WAL is released promptly.
pub const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// How one reader runs.
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// The tables to capture (from the mapping).
    pub tables: Vec<TableSpec>,
    /// Copy existing rows on first start (default). Without it the source
    /// starts with the changes after the slot's creation.
    pub snapshot: bool,
    /// In-memory budget of one transaction's changes before spilling.
    pub txn_memory_budget: usize,
    /// Emit a heartbeat message this often (for databases that are quiet
    /// for long stretches); `None` relies on the server's keepalives.
    pub heartbeat_interval: Option<Duration>,
    pub status_interval: Duration,
    pub buffer_events: usize,
    /// Stop (cleanly) once a transaction committing at or beyond this LSN
    /// has been applied and confirmed (benchmarks, bounded replays).
    pub stop_at: Option<Lsn>,
}

impl ReaderOptions {
    /// Options for a configured source capturing `tables`.
    pub fn for_source(settings: &SourceSettings, tables: Vec<TableSpec>) -> Self {
        Self {
            snapshot: settings.snapshot,
            heartbeat_interval: settings.heartbeat_seconds.map(Duration::from_secs),
            ..Self::new(tables)
        }
    }

    pub fn new(tables: Vec<TableSpec>) -> Self {
        Self {
            tables,
            snapshot: true,
            txn_memory_budget: DEFAULT_TXN_MEMORY_BUDGET,
            heartbeat_interval: None,
            status_interval: DEFAULT_STATUS_INTERVAL,
            buffer_events: DEFAULT_BUFFER_EVENTS,
            stop_at: None,
        }
    }
}

/// Why a PostgreSQL source stopped or must reconnect.
#[derive(Debug, thiserror::Error)]
pub enum PgSourceError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("query on the source failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("replication stream: {message}")]
    Replication { message: String, class: ErrorClass },
    #[error("the replication stream ended unexpectedly")]
    StreamEnded,
    #[error("replication slot `{slot}` does not exist, but position {position} is stored for this source; recreating it would skip every change since. Fix: if those changes can be given up, delete the stored position (DELETE FROM source_positions WHERE source = '<name>') and restart to resnapshot; orders already booked are not booked twice")]
    SlotMissing { slot: String, position: Position },
    #[error("replication slot `{slot}` was invalidated by the server (max_slot_wal_keep_size): the WAL it needed is gone. Fix: SELECT pg_drop_replication_slot('{slot}'); delete the stored position (DELETE FROM source_positions WHERE source = '<name>') and restart to resnapshot")]
    SlotInvalidated { slot: String },
    #[error("replication slot `{slot}` cannot be used: {detail}. Fix: configure another slot name, or drop it (SELECT pg_drop_replication_slot('{slot}')) and resnapshot")]
    SlotUnusable { slot: String, detail: String },
    #[error("replication slot `{slot}` is in use by process {pid}; is another loyalty-cdc reading this source?")]
    SlotBusy { slot: String, pid: i32 },
    #[error("publication `{publication}` does not exist. Fix: {create}; or delete the stored position to let loyalty-cdc create it and resnapshot")]
    PublicationMissing { publication: String, create: String },
    #[error("publication `{publication}` does not publish {}. Fix: {fix}", missing.join(", "))]
    PublicationIncomplete {
        publication: String,
        missing: Vec<String>,
        fix: String,
    },
    #[error(
        "table `{table}` does not exist in the source database; correct the mapping's table list"
    )]
    TableMissing { table: String },
    #[error("replica identity: {}", problems.join("; "))]
    ReplicaIdentity { problems: Vec<String> },
    #[error("{0}")]
    Setup(String),
    #[error("importing the slot's exported snapshot `{name}` failed: {error}; the next attempt creates the slot afresh")]
    SnapshotImport {
        name: String,
        error: tokio_postgres::Error,
    },
    #[error("a change names relation {relation_id}, which the stream never described")]
    UnknownRelation { relation_id: u32 },
    #[error("replication protocol: {0}")]
    Protocol(String),
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    #[error("spilling a large transaction to disk: {0}")]
    Spill(std::io::Error),
    #[error("consumer: {0}")]
    Consumer(#[from] ConsumerError),
}

impl PgSourceError {
    /// Transient errors are retried with backoff; the others stop this
    /// source with their message.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Connect(error) => error.class(),
            Self::Query(error) => match error.code() {
                // The server's own errors at setup (a permission, a missing
                // object) do not fix themselves; lost connections do.
                Some(code) if code.code().starts_with("42") || code.code().starts_with("28") => {
                    ErrorClass::Config
                }
                _ => ErrorClass::Transient,
            },
            Self::Replication { class, .. } => *class,
            Self::SnapshotImport { error, .. } => match error.code() {
                Some(code) if code.code().starts_with("42") || code.code().starts_with("28") => {
                    ErrorClass::Config
                }
                _ => ErrorClass::Transient,
            },
            Self::StreamEnded | Self::SlotBusy { .. } | Self::Spill(_) => ErrorClass::Transient,
            Self::SlotMissing { .. }
            | Self::SlotInvalidated { .. }
            | Self::SlotUnusable { .. }
            | Self::PublicationMissing { .. }
            | Self::PublicationIncomplete { .. }
            | Self::TableMissing { .. }
            | Self::ReplicaIdentity { .. }
            | Self::Setup(_)
            | Self::UnknownRelation { .. }
            | Self::Protocol(_)
            | Self::Decode(_) => ErrorClass::Definite,
            Self::Consumer(error) => error.class,
        }
    }
}

/// The SQLSTATE the transport appends to server errors ("… (SQLSTATE 42601)").
fn sqlstate(message: &str) -> Option<&str> {
    let code = message.rsplit_once("(SQLSTATE ")?.1.strip_suffix(')')?;
    (code.len() == 5).then_some(code)
}

/// Classifies a transport error; `slot` names the slot, so errors about it
/// can say which.
fn classify_wire(error: PgWireError, slot: &str) -> PgSourceError {
    let message = error.to_string();
    let about_slot = message.contains("replication slot");
    if about_slot && message.contains("does not exist") {
        return PgSourceError::SlotUnusable {
            slot: slot.into(),
            detail: message,
        };
    }
    if about_slot
        && (message.contains("can no longer get changes") || message.contains("invalidated"))
    {
        return PgSourceError::SlotInvalidated { slot: slot.into() };
    }
    let class = if error.is_auth() || error.is_tls() {
        ErrorClass::Config
    } else if error.is_io() || error.is_transient() {
        ErrorClass::Transient
    } else if error.is_message_too_large() {
        ErrorClass::Definite
    } else {
        match sqlstate(&message) {
            // Authorization (no pg_hba line for replication, no REPLICATION
            // attribute), syntax or access rule, missing database, wrong
            // wal_level, unsupported feature: retrying cannot help.
            Some(code)
                if code.starts_with("28")
                    || code.starts_with("42")
                    || code.starts_with("3D")
                    || code == "55000"
                    || code == "0A000" =>
            {
                ErrorClass::Config
            }
            // The rest of what a server says mid-stream is mostly shutdowns
            // and restarts (57P01 …), too many connections (53300) or a slot
            // still held by a dying session (55006): worth retrying.
            Some(_) => ErrorClass::Transient,
            // The transport's own protocol and internal errors.
            None => ErrorClass::Definite,
        }
    };
    PgSourceError::Replication { message, class }
}

/// Reads one PostgreSQL source.
pub struct PostgresSource {
    name: Arc<str>,
    url: DatabaseUrl,
    password: Option<Secret>,
    slot: String,
    publication: String,
    options: ReaderOptions,
    progress: SourceProgress,
}

impl PostgresSource {
    pub fn new(settings: &SourceSettings, options: ReaderOptions) -> Self {
        Self {
            name: Arc::from(settings.name.as_str()),
            url: settings.url.clone(),
            password: settings.password.clone(),
            slot: settings.slot_name(),
            publication: settings.publication_name(),
            options,
            progress: SourceProgress::default(),
        }
    }

    pub fn progress(&self) -> SourceProgress {
        self.progress.clone()
    }

    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// Runs until `shutdown` (or the stop LSN): snapshots a new source,
    /// streams, reconnects with backoff after transient errors, and returns
    /// the first error of any other class.
    pub async fn run<C: TxnConsumer>(
        &self,
        consumer: &mut C,
        shutdown: &CancellationToken,
    ) -> Result<(), PgSourceError> {
        let mut backoff = crate::source::reconnect_backoff();
        loop {
            let applied_before = self.progress.snapshot().transactions_applied;
            let outcome = self.run_once(consumer, shutdown).await;
            match outcome {
                Ok(()) => {
                    self.progress.set_state(ReaderState::Stopped);
                    return Ok(());
                }
                Err(_) if shutdown.is_cancelled() => {
                    // Stopped mid-snapshot or mid-reconnect: nothing
                    // half-done was confirmed; the next start resumes.
                    self.progress.set_state(ReaderState::Stopped);
                    return Ok(());
                }
                Err(error) if error.class() == ErrorClass::Transient => {
                    if self.progress.snapshot().transactions_applied > applied_before {
                        backoff.reset();
                    }
                    let delay = backoff
                        .next_backoff()
                        .unwrap_or(crate::source::RECONNECT_MAX);
                    tracing::warn!(source = %self.name, %error, delay_ms = delay.as_millis() as u64, "source connection lost; reconnecting");
                    self.progress.reconnecting(error.to_string());
                    // What was applied becomes durable, so the next session
                    // resumes after it instead of replaying it — unless the
                    // consumer itself failed: then the next session starts
                    // from what it had made durable (see the contract).
                    if !matches!(error, PgSourceError::Consumer(_)) {
                        if let Err(error) = consumer.flush().await {
                            tracing::warn!(source = %self.name, %error, "flush before reconnect failed");
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => {
                            self.progress.set_state(ReaderState::Stopped);
                            return Ok(());
                        }
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
    ) -> Result<(), PgSourceError> {
        let mut query = connect::postgres(&self.url, self.password.as_ref()).await?;
        query
            .batch_execute("SET DateStyle = 'ISO, MDY'; SET TimeZone = 'UTC'; SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 3")
            .await?;
        let database = self.url.database().unwrap_or_default().to_string();
        let durable = consumer.durable_position().await?;
        let (mut client, start) = match durable {
            Some(position) if position.phase == Phase::Stream => {
                let state = catalog::slot_state(&query, &self.slot)
                    .await?
                    .ok_or_else(|| PgSourceError::SlotMissing {
                        slot: self.slot.clone(),
                        position: position.clone(),
                    })?;
                catalog::verify_slot(&self.slot, &state, &database)?;
                catalog::verify_publication(&query, &self.publication, &self.options.tables)
                    .await?;
                self.check_replica_identity(&query).await?;
                let lsn = position.lsn().ok_or_else(|| {
                    PgSourceError::Setup(format!(
                        "the stored position `{position}` of this source is not a PostgreSQL position; was the source's kind changed? Give the source a new name to start it afresh"
                    ))
                })?;
                let mut client = ReplicationClient::connect(self.replication_config(lsn)?)
                    .await
                    .map_err(|e| classify_wire(e, &self.slot))?;
                client
                    .wait_started()
                    .await
                    .map_err(|e| classify_wire(e, &self.slot))?;
                tracing::info!(source = %self.name, slot = %self.slot, %position, "resuming stream");
                (client, position)
            }
            _ => {
                self.create_slot_and_snapshot(&mut query, &database, consumer, shutdown)
                    .await?
            }
        };
        let context = stream::StreamContext {
            query: &query,
            slot: &self.slot,
            source: &self.name,
            options: &self.options,
            progress: &self.progress,
            shutdown,
        };
        let ended = stream::stream(&mut client, context, start, consumer).await;
        if ended.is_ok() {
            // The transport closes without a last status update: wait until
            // the final confirmed position has reached the server, so a clean
            // stop leaves the slot exactly at what is durable.
            let deadline = tokio::time::Instant::now()
                + self.options.status_interval * 2
                + Duration::from_secs(1);
            while client.is_running()
                && client.feedback_pending_since().is_some()
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let _ = client.shutdown().await;
        ended.map(|_| ())
    }

    /// First start, or a snapshot that did not finish: (re)create the slot
    /// with an exported snapshot, copy, and start streaming at its
    /// consistent point.
    async fn create_slot_and_snapshot<C: TxnConsumer>(
        &self,
        query: &mut tokio_postgres::Client,
        database: &str,
        consumer: &mut C,
        shutdown: &CancellationToken,
    ) -> Result<(ReplicationClient, Position), PgSourceError> {
        self.progress.set_state(ReaderState::Snapshotting);
        if let Some(state) = catalog::slot_state(query, &self.slot).await? {
            if let Some(pid) = state.active_pid {
                return Err(PgSourceError::SlotBusy {
                    slot: self.slot.clone(),
                    pid,
                });
            }
            catalog::verify_slot(&self.slot, &state, database)?;
            tracing::warn!(source = %self.name, slot = %self.slot, "nothing of this source is durable but its slot exists: an earlier snapshot was interrupted; dropping the slot and starting the snapshot again");
            catalog::drop_slot(query, &self.slot).await?;
        }
        catalog::ensure_publication(query, &self.publication, &self.options.tables).await?;
        self.check_replica_identity(query).await?;

        let mut client = ReplicationClient::connect_gated(self.replication_config(Lsn(0))?)
            .await
            .map_err(|e| classify_wire(e, &self.slot))?;
        // The pre-15 spelling, which every server from 10 on accepts.
        let mode = if self.options.snapshot {
            "EXPORT_SNAPSHOT"
        } else {
            "NOEXPORT_SNAPSHOT"
        };
        let rows = client
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {mode}",
                self.slot
            ))
            .await
            .map_err(|e| classify_wire(e, &self.slot))?;
        let column = |index: usize| -> Option<String> {
            rows.first()?
                .get(index)?
                .as_ref()
                .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
        };
        let consistent_point: Lsn =
            column(1)
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| {
                    PgSourceError::Protocol(
                        "CREATE_REPLICATION_SLOT returned no consistent point".into(),
                    )
                })?;
        tracing::info!(source = %self.name, slot = %self.slot, %consistent_point, snapshot = self.options.snapshot, "created replication slot");

        let snapshot_ts = if self.options.snapshot {
            let snapshot_name = column(2).ok_or_else(|| {
                PgSourceError::Protocol("CREATE_REPLICATION_SLOT exported no snapshot".into())
            })?;
            let report = snapshot::copy_tables(
                query,
                &self.name,
                &snapshot_name,
                &self.options.tables,
                Position::snapshot(consistent_point),
                consumer,
                shutdown,
                &self.progress,
            )
            .await?;
            tracing::info!(source = %self.name, tables = report.tables, rows = report.rows, "snapshot complete");
            report.taken_at
        } else {
            chrono::Utc::now()
        };
        let start = Position::stream(consistent_point);
        consumer
            .apply(SourceTxn {
                source: Arc::clone(&self.name),
                kind: TxnKind::SnapshotDone,
                position: start.clone(),
                commit_ts: snapshot_ts,
                changes: Changes::default(),
            })
            .await?;
        consumer.flush().await?;
        client
            .start()
            .await
            .map_err(|e| classify_wire(e, &self.slot))?;
        client
            .wait_started()
            .await
            .map_err(|e| classify_wire(e, &self.slot))?;
        Ok((client, start))
    }

    async fn check_replica_identity(
        &self,
        query: &tokio_postgres::Client,
    ) -> Result<(), PgSourceError> {
        let mut problems = Vec::new();
        for spec in &self.options.tables {
            let table = catalog::describe_table(query, spec).await?;
            problems.extend(catalog::replica_identity_problems(spec, &table));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PgSourceError::ReplicaIdentity { problems })
        }
    }

    fn replication_config(&self, start: Lsn) -> Result<ReplicationConfig, PgSourceError> {
        let url = self.url.expose();
        let decode = |text: &str| {
            percent_encoding::percent_decode_str(text)
                .decode_utf8_lossy()
                .into_owned()
        };
        let password = match self.password.as_ref().and_then(Secret::expose) {
            Some(secret) => secret.to_string(),
            None => url.password().map(decode).unwrap_or_default(),
        };
        let param = |name: &str| {
            url.query_pairs()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let root_cert = param("sslrootcert").map(std::path::PathBuf::from);
        let tls = match param("sslmode").as_deref() {
            None | Some("prefer") | Some("allow") => TlsConfig {
                mode: SslMode::Prefer,
                ..TlsConfig::default()
            },
            Some("disable") => TlsConfig::disabled(),
            Some("require") => TlsConfig::require(),
            Some("verify-ca") => TlsConfig::verify_ca(root_cert),
            Some("verify-full") => TlsConfig::verify_full(root_cert),
            Some(other) => {
                return Err(PgSourceError::Setup(format!(
                    "sslmode `{other}` in the source URL is not one of disable, allow, prefer, require, verify-ca, verify-full"
                )))
            }
        };
        // `host_str` keeps an IPv6 address's brackets, which a socket
        // address does not take.
        let host = match url.host() {
            Some(url::Host::Ipv6(address)) => address.to_string(),
            Some(host) => host.to_string(),
            None => "localhost".into(),
        };
        let config = ReplicationConfig::new(
            host,
            decode(url.username()),
            password,
            self.url.database().unwrap_or_default(),
            self.slot.clone(),
            self.publication.clone(),
        )
        .with_port(url.port().unwrap_or(5432))
        .with_tls(tls)
        .with_start_lsn(pgwire_replication::Lsn(start.0))
        .with_options(value::SESSION_OPTIONS)
        .with_application_name(APPLICATION_NAME)
        .with_status_interval(self.options.status_interval)
        .with_buffer_size(self.options.buffer_events)
        // Observing feedback makes `feedback_pending_since` tell whether the
        // last confirmed position has reached the server (see `run_once`).
        .with_feedback_observer(pgwire_replication::FeedbackObserver::new(|_| {}));
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of(error: PgWireError) -> (ErrorClass, String) {
        let error = classify_wire(error, "loyalty_pos");
        (error.class(), error.to_string())
    }

    #[test]
    fn server_errors_are_classified_by_their_sqlstate() {
        let server = |m: &str| PgWireError::Server(m.to_string());
        let (class, _) = class_of(server(
            "must be superuser or replication role to start walsender (SQLSTATE 42501)",
        ));
        assert_eq!(class, ErrorClass::Config);
        let (class, _) = class_of(server(
            "no pg_hba.conf entry for replication connection (SQLSTATE 28000)",
        ));
        assert_eq!(class, ErrorClass::Config);
        let (class, _) = class_of(server(
            "terminating connection due to administrator command (SQLSTATE 57P01)",
        ));
        assert_eq!(class, ErrorClass::Transient);
        let (class, _) = class_of(server(
            "replication slot \"loyalty_pos\" is active for PID 42 (SQLSTATE 55006)",
        ));
        assert_eq!(class, ErrorClass::Transient);
        let (class, _) = class_of(PgWireError::Protocol("unexpected message".into()));
        assert_eq!(class, ErrorClass::Definite);
    }

    #[test]
    fn a_missing_publication_is_not_mistaken_for_a_missing_slot() {
        let (class, text) = class_of(PgWireError::Server(
            "publication \"loyalty_pos\" does not exist (SQLSTATE 42704)".into(),
        ));
        assert_eq!(class, ErrorClass::Config);
        assert!(
            text.starts_with("replication stream: server error: publication"),
            "{text}"
        );
        let (class, text) = class_of(PgWireError::Server(
            "replication slot \"loyalty_pos\" does not exist (SQLSTATE 42704)".into(),
        ));
        assert_eq!(class, ErrorClass::Definite);
        assert!(
            text.starts_with("replication slot `loyalty_pos` cannot be used"),
            "{text}"
        );
    }
}
