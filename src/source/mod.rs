//! Source databases. One sub-module per database kind; each owns how that
//! kind is read and what it needs to be readable (its `preflight`).
//!
//! - `change.rs`: typed column values, tables, row changes (common to all kinds).
//! - `txn.rs`: whole transactions, positions, the spill-to-disk memory bound.
//! - `progress.rs`: what a running reader has done, for status and lag.
//! - this file: the [`TxnConsumer`] contract between a reader and whatever
//!   applies its transactions (the ledger).

pub mod change;
pub mod mysql;
pub mod postgres;
pub mod progress;
pub mod txn;

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use change::{Change, Column, Op, ReplicaIdentity, Row, Table, Value};
pub use txn::{BinlogOffset, Changes, Lsn, Offset, Phase, Position, SourceTxn, TxnKind};

use crate::ErrorClass;

/// Longest wait between reconnection attempts after a transient error: a
/// source that is down for long is retried twice a minute, no more.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(30);

/// When no event follows an applied transaction for this long, the reader
/// asks the consumer to flush: a consumer that batches never holds a lone
/// transaction back for longer, while under load batches still fill up.
pub(crate) const QUIET_FLUSH: Duration = Duration::from_millis(20);

/// The backoff every reader reconnects with: from 250 ms (a blip costs
/// almost nothing) doubling with jitter up to [`RECONNECT_MAX`], forever
/// (a source is never given up on for being down).
pub(crate) fn reconnect_backoff() -> backoff::ExponentialBackoff {
    backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(Duration::from_millis(250))
        .with_max_interval(RECONNECT_MAX)
        .with_max_elapsed_time(None)
        .build()
}

/// Receives one source's transactions from its reader.
///
/// The contract, which every reader keeps and every consumer may rely on:
///
/// - **Whole transactions, in commit order.** All changes of one source
///   transaction arrive in one [`SourceTxn`], in source order; transactions
///   arrive in the order the source committed them.
/// - **Snapshot first.** A new source delivers its snapshot as
///   [`TxnKind::Snapshot`] chunks (phase [`Phase::Snapshot`]), then one
///   [`TxnKind::SnapshotDone`] whose position is where streaming starts.
///   If the reader stops before `SnapshotDone` is durable, the next start
///   copies the snapshot again from the beginning (under a new position):
///   the consumer must treat snapshot rows idempotently (orders are
///   idempotent by source and order reference).
/// - **Duplicates only at or below the durable position.** Positions strictly
///   increase within a run. After a restart or reconnect the reader resumes
///   from [`TxnConsumer::durable_position`] and itself skips what is at or
///   below it; a consumer that re-checks positions is still right to do so.
/// - **Quiet means flush.** When the stream has nothing more for a moment
///   after a transaction, the reader calls [`flush`](TxnConsumer::flush).
/// - **Confirmation follows durability.** The reader confirms a position to
///   the source server (and so lets it discard the log) only up to what the
///   consumer has reported durable: the return value of
///   [`apply`](TxnConsumer::apply) and [`flush`](TxnConsumer::flush).
///   A consumer that batches returns a lower position than the one it was
///   just given; that is allowed.
pub trait TxnConsumer: Send {
    /// The position up to which this source's effects are durable, stored
    /// in the same transaction as those effects; `None` if nothing is.
    ///
    /// The reader calls it at the start of every session (first start,
    /// reconnect after any error): the consumer must drop whatever it took
    /// but did not make durable, because the session re-sends it.
    fn durable_position(
        &mut self,
    ) -> impl Future<Output = Result<Option<Position>, ConsumerError>> + Send;

    /// Takes one whole transaction. Returns the durable position afterwards.
    fn apply(
        &mut self,
        txn: SourceTxn,
    ) -> impl Future<Output = Result<Option<Position>, ConsumerError>> + Send;

    /// Makes everything taken so far durable and returns that position. The
    /// reader calls it when the stream goes quiet and before reconnecting.
    fn flush(&mut self) -> impl Future<Output = Result<Option<Position>, ConsumerError>> + Send;
}

/// The consumer could not take or store a transaction.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConsumerError {
    pub class: ErrorClass,
    pub message: String,
}

impl ConsumerError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
        }
    }

    pub fn definite(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Definite,
            message: message.into(),
        }
    }
}

/// Which kind of database a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum SourceKind {
    /// PostgreSQL, read through logical replication (`pgoutput`).
    Postgres,
    /// MySQL or MariaDB, read through the row-based binlog.
    Mysql,
}

impl TryFrom<String> for SourceKind {
    type Error = String;

    fn try_from(kind: String) -> Result<Self, Self::Error> {
        // Spelled out (rather than serde's enum error) so the message lists
        // the kinds and says MariaDB is `mysql`.
        match kind.as_str() {
            "postgres" => Ok(Self::Postgres),
            "mysql" => Ok(Self::Mysql),
            other => Err(format!(
                "unknown source kind `{other}`; use `postgres` (PostgreSQL) or `mysql` (MySQL or MariaDB)"
            )),
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        })
    }
}
