//! `loyalty-cdc status`: where every source stands and what waits, from
//! the ledger database (positions, outbox, dead letters, quarantine) and a
//! look at each source's own head (how much WAL or binlog lies beyond the
//! position). Also what `/metrics` and `/readyz` read from the ledger.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{Settings, SourceSettings};
use crate::connect;
use crate::ledger::db::Db;
use crate::source::{Offset, Position, SourceKind};

/// How long a look at one source may take before it is given up.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// One source, as `status --json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SourceStatus {
    pub name: String,
    pub kind: String,
    /// The position stored with the ledger's effects (`snapshot@…` while
    /// the initial copy runs); empty before the first batch.
    pub position: String,
    /// PostgreSQL: WAL the slot holds back (`pg_current_wal_lsn()` − the
    /// slot's confirmed position, which an idle stream keeps current).
    /// MySQL/MariaDB: binlog written after the stored position. None when
    /// the source could not be asked (see `error`).
    pub lag_bytes: Option<u64>,
    /// Seconds between the last applied source commit and now; 0 when
    /// nothing is behind (an idle source shows no growing lag).
    pub lag_seconds: Option<f64>,
    /// `streaming`, `snapshotting`, `parked`, or `not started`.
    pub state: String,
    /// Source commit time of the last applied transaction.
    pub last_event_at: Option<DateTime<Utc>>,
    /// Why the source could not be asked, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `status --json` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub sources: Vec<SourceStatus>,
    /// Messages waiting to be sent (due now or later: held, retrying).
    pub outbox_pending: i64,
    /// Age of the oldest of them, seconds.
    pub outbox_oldest_pending_seconds: Option<f64>,
    /// Dead letters not replayed.
    pub dead_letters: i64,
    /// Quarantined source rows not replayed.
    pub quarantined: i64,
}

/// The ledger's side of the status: counts of what waits.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub outbox_pending: i64,
    pub outbox_oldest_pending_seconds: Option<f64>,
    pub dead_letters: i64,
    pub quarantined: i64,
}

/// Counts what waits in the ledger: the outbox through its index of
/// pending rows, dead letters and quarantine through their open indexes.
pub async fn backlog(db: &Db, now: DateTime<Utc>) -> Result<Backlog, tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM outbox WHERE status = 'pending'),
                    (SELECT min(created_at) FROM outbox WHERE status = 'pending'),
                    (SELECT count(*) FROM dead_letters WHERE replayed_at IS NULL),
                    (SELECT count(*) FROM quarantine WHERE replayed_at IS NULL)",
            &[],
        )
        .await?;
    let oldest: Option<DateTime<Utc>> = row.get(1);
    Ok(Backlog {
        outbox_pending: row.get(0),
        outbox_oldest_pending_seconds: oldest
            .map(|at| ((now - at).num_milliseconds() as f64 / 1000.0).max(0.0)),
        dead_letters: row.get(2),
        quarantined: row.get(3),
    })
}

/// A stored source position, as the ledger has it.
struct Stored {
    state: String,
    position: String,
    commit_ts: Option<DateTime<Utc>>,
}

/// Everything `status` shows: the ledger, then each source asked for its
/// head (a source that cannot be asked is shown with the reason; the rest
/// still are).
pub async fn gather(settings: &Settings, db: &Db) -> Result<Status, tokio_postgres::Error> {
    let now = Utc::now();
    let stored: std::collections::HashMap<String, Stored> = db
        .query(
            "SELECT source, state, position, commit_ts FROM source_positions",
            &[],
        )
        .await?
        .into_iter()
        .map(|r| {
            (
                r.get(0),
                Stored {
                    state: r.get(1),
                    position: r.get(2),
                    commit_ts: r.get(3),
                },
            )
        })
        .collect();
    let mut sources = Vec::new();
    for source in &settings.sources {
        let stored = stored.get(&source.name);
        let position = stored.and_then(|s| s.position.parse::<Position>().ok());
        let (lag_bytes, error) = match probe(source, position.as_ref()).await {
            Ok(bytes) => (bytes, None),
            Err(message) => (None, Some(message)),
        };
        let commit = stored.and_then(|s| s.commit_ts);
        sources.push(SourceStatus {
            name: source.name.clone(),
            kind: source.kind.to_string(),
            position: stored.map(|s| s.position.clone()).unwrap_or_default(),
            lag_bytes,
            lag_seconds: lag_seconds(lag_bytes, commit, now),
            state: stored.map_or("not started".to_string(), |s| s.state.clone()),
            last_event_at: commit,
            error,
        });
    }
    let backlog = backlog(db, now).await?;
    Ok(Status {
        sources,
        outbox_pending: backlog.outbox_pending,
        outbox_oldest_pending_seconds: backlog.outbox_oldest_pending_seconds,
        dead_letters: backlog.dead_letters,
        quarantined: backlog.quarantined,
    })
}

/// Seconds behind: none when nothing is behind, else since the last
/// applied commit (never negative when clocks differ a little).
pub fn lag_seconds(
    lag_bytes: Option<u64>,
    last_commit: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<f64> {
    match (lag_bytes, last_commit) {
        (Some(0), _) => Some(0.0),
        (_, Some(commit)) => Some(((now - commit).num_milliseconds() as f64 / 1000.0).max(0.0)),
        _ => None,
    }
}

/// Bytes of WAL or binlog beyond where the source stands. PostgreSQL: by
/// the slot (what the server keeps for us). MySQL/MariaDB: after `at`
/// (None before the first position).
pub async fn probe(source: &SourceSettings, at: Option<&Position>) -> Result<Option<u64>, String> {
    let asked = async {
        match source.kind {
            SourceKind::Postgres => {
                let client = connect::postgres(&source.url, source.password.as_ref())
                    .await
                    .map_err(|e| e.to_string())?;
                crate::source::postgres::catalog::lag_bytes(&client, &source.slot_name())
                    .await
                    .map_err(|e| e.to_string())?
                    .map(|bytes| Some(bytes.max(0) as u64))
                    .ok_or_else(|| {
                        format!(
                            "replication slot `{}` does not exist (not started yet, or dropped)",
                            source.slot_name()
                        )
                    })
            }
            SourceKind::Mysql => {
                let Some(Offset::Binlog(offset)) = at.map(|p| &p.offset) else {
                    return Ok(None);
                };
                let mut conn = connect::mysql(&source.url, source.password.as_ref())
                    .await
                    .map_err(|e| e.to_string())?;
                let bytes = crate::source::mysql::reader::lag_bytes(&mut conn, offset)
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = conn.disconnect().await;
                bytes.map(Some).ok_or_else(|| {
                    format!(
                        "binlog file `{}` is no longer on the server (purged): the source must be snapshotted again",
                        offset.file
                    )
                })
            }
        }
    };
    tokio::time::timeout(PROBE_TIMEOUT, asked)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_seconds_is_zero_when_nothing_is_behind_and_never_negative() {
        let now = Utc::now();
        let old = now - chrono::Duration::seconds(90);
        assert_eq!(lag_seconds(Some(0), Some(old), now), Some(0.0));
        assert_eq!(lag_seconds(Some(10), Some(old), now), Some(90.0));
        assert_eq!(lag_seconds(None, Some(old), now), Some(90.0));
        let ahead = now + chrono::Duration::seconds(3);
        assert_eq!(lag_seconds(Some(10), Some(ahead), now), Some(0.0));
        assert_eq!(lag_seconds(Some(10), None, now), None);
    }
}
