//! What a running reader has done, for `status`, metrics and readiness:
//! its state, the positions applied and confirmed, and the clocks lag is
//! computed from. Cheap to update on every transaction.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::source::txn::{Lsn, Position};

/// What the reader is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderState {
    Starting,
    Snapshotting,
    Streaming,
    /// A transient error; the reader retries. Carries the error text.
    Reconnecting(String),
    Stopped,
    /// A definite or configuration error stopped the reader.
    Failed(String),
}

/// A consistent copy of the progress figures.
#[derive(Debug, Clone)]
pub struct ProgressSnapshot {
    pub state: ReaderState,
    /// Last position handed to the consumer.
    pub applied: Option<Position>,
    /// Last position read, past transactions with nothing to capture
    /// (other tables, other databases of the server): the reader is
    /// caught up to here even when nothing was applied. Lag is measured
    /// from it.
    pub read_to: Option<Position>,
    /// PostgreSQL: last LSN reported to the server as flushed.
    pub confirmed: Option<Lsn>,
    /// Source commit time of the last applied transaction.
    pub last_commit_ts: Option<DateTime<Utc>>,
    /// Row changes and transactions applied since the reader started.
    pub changes_applied: u64,
    pub transactions_applied: u64,
    pub reconnects: u64,
    /// The initial snapshot: rows copied, tables copied and to copy (all
    /// 0 for a source that resumed without one).
    pub snapshot_rows: u64,
    pub snapshot_tables_done: u64,
    pub snapshot_tables: u64,
    /// Monotonic time since anything moved (a transaction applied or the
    /// server's position confirmed on a quiet stream).
    pub since_progress: Duration,
    /// Monotonic time since the last transaction was applied.
    pub since_last_apply: Option<Duration>,
}

impl ProgressSnapshot {
    /// Seconds between the last applied commit and now (wall clocks of
    /// source and reader); 0 once the stream is idle and caught up, so an
    /// idle source does not show a growing false lag.
    pub fn lag_seconds(&self, now: DateTime<Utc>, caught_up: bool) -> Option<f64> {
        if caught_up {
            return Some(0.0);
        }
        let commit = self.last_commit_ts?;
        Some(((now - commit).num_milliseconds() as f64 / 1000.0).max(0.0))
    }
}

struct Inner {
    state: ReaderState,
    applied: Option<Position>,
    read_to: Option<Position>,
    confirmed: Option<Lsn>,
    last_commit_ts: Option<DateTime<Utc>>,
    changes_applied: u64,
    transactions_applied: u64,
    reconnects: u64,
    snapshot_rows: u64,
    snapshot_tables_done: u64,
    snapshot_tables: u64,
    last_progress: Instant,
    last_apply: Option<Instant>,
}

/// Shared progress of one reader; clone it to watch from elsewhere.
#[derive(Clone)]
pub struct SourceProgress(Arc<Mutex<Inner>>);

impl Default for SourceProgress {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Inner {
            state: ReaderState::Starting,
            applied: None,
            read_to: None,
            confirmed: None,
            last_commit_ts: None,
            changes_applied: 0,
            transactions_applied: 0,
            reconnects: 0,
            snapshot_rows: 0,
            snapshot_tables_done: 0,
            snapshot_tables: 0,
            last_progress: Instant::now(),
            last_apply: None,
        })))
    }
}

impl SourceProgress {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding this lock leaves only counters behind:
        // keep using them.
        let mut inner = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut inner)
    }

    pub fn snapshot(&self) -> ProgressSnapshot {
        self.with(|i| ProgressSnapshot {
            state: i.state.clone(),
            applied: i.applied.clone(),
            read_to: i.read_to.clone(),
            confirmed: i.confirmed,
            last_commit_ts: i.last_commit_ts,
            changes_applied: i.changes_applied,
            transactions_applied: i.transactions_applied,
            reconnects: i.reconnects,
            snapshot_rows: i.snapshot_rows,
            snapshot_tables_done: i.snapshot_tables_done,
            snapshot_tables: i.snapshot_tables,
            since_progress: i.last_progress.elapsed(),
            since_last_apply: i.last_apply.map(|t| t.elapsed()),
        })
    }

    pub(crate) fn set_state(&self, state: ReaderState) {
        self.with(|i| i.state = state);
    }

    pub(crate) fn set_streaming(&self, at: Position) {
        self.with(|i| {
            i.state = ReaderState::Streaming;
            i.applied = Some(at);
            i.last_progress = Instant::now();
        });
    }

    pub(crate) fn reconnecting(&self, error: String) {
        self.with(|i| {
            i.state = ReaderState::Reconnecting(error);
            i.reconnects += 1;
        });
    }

    pub(crate) fn applied(&self, position: Position, commit_ts: DateTime<Utc>, changes: usize) {
        self.with(|i| {
            let now = Instant::now();
            i.read_to = Some(position.clone());
            i.applied = Some(position);
            i.last_commit_ts = Some(commit_ts);
            i.changes_applied += changes as u64;
            i.transactions_applied += 1;
            i.last_progress = now;
            i.last_apply = Some(now);
        });
    }

    pub(crate) fn confirmed(&self, lsn: Lsn) {
        self.with(|i| {
            i.confirmed = Some(i.confirmed.map_or(lsn, |c| c.max(lsn)));
            i.last_progress = Instant::now();
        });
    }

    /// A snapshot of `tables` tables starts (a restarted one from zero).
    pub(crate) fn snapshot_started(&self, tables: usize) {
        self.with(|i| {
            i.snapshot_rows = 0;
            i.snapshot_tables_done = 0;
            i.snapshot_tables = tables as u64;
            i.last_progress = Instant::now();
        });
    }

    /// Rows of the snapshot handed to the consumer.
    pub(crate) fn snapshot_copied(&self, rows: usize) {
        self.with(|i| {
            i.snapshot_rows += rows as u64;
            i.last_progress = Instant::now();
        });
    }

    pub(crate) fn snapshot_table_done(&self) {
        self.with(|i| i.snapshot_tables_done += 1);
    }

    /// Read past a transaction with nothing to capture.
    pub(crate) fn passed(&self, position: Position) {
        self.with(|i| {
            i.read_to = Some(position);
            i.last_progress = Instant::now();
        });
    }

    pub(crate) fn touch(&self) {
        self.with(|i| i.last_progress = Instant::now());
    }
}
