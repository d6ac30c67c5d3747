//! `quarantine`: source rows that could not be mapped, kept with the
//! reason, the position and a typed copy (written by `apply.rs`, which
//! also replays them), listed and replayed for operators.

use chrono::{DateTime, Utc};

use super::db::Db;

/// An open quarantined row, as `quarantine list` and the API show it. The
/// row may hold personal data: it is shown to the operator who asked,
/// never logged.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Quarantined {
    pub id: i64,
    pub source: String,
    pub position: String,
    pub table: String,
    pub operation: String,
    pub reason: String,
    pub row: Option<serde_json::Value>,
    /// A typed copy is kept, so `quarantine replay` can book it.
    pub replayable: bool,
    pub quarantined_at: DateTime<Utc>,
}

/// Open (not replayed) quarantined rows, oldest first.
pub async fn open(db: &Db, limit: i64) -> Result<Vec<Quarantined>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT quarantine_id, source, position, table_name, operation, reason, row_data, quarantined_at,
                    replay IS NOT NULL
               FROM quarantine WHERE replayed_at IS NULL
              ORDER BY quarantine_id LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| Quarantined {
            id: r.get(0),
            source: r.get(1),
            position: r.get(2),
            table: r.get(3),
            operation: r.get(4),
            reason: r.get(5),
            row: r.get(6),
            replayable: r.get(8),
            quarantined_at: r.get(7),
        })
        .collect())
}

/// What replaying quarantined rows did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Replayed {
    /// Booked, and the rows marked replayed: the events they gave (none
    /// when the mapping now skips them).
    Booked { events: usize },
    /// They fail again, for these reasons: nothing was booked and the
    /// rows stay open.
    StillFails { reasons: Vec<String> },
    /// They cannot be replayed, for this reason (unknown or replayed
    /// before, no stored copy).
    Refused { reason: String },
}

/// The source transactions of open quarantined rows: the groups `ids`
/// fall into, each `(source, ids in order)`, in the order of their first
/// id. Rows of one source transaction are replayed together, so an
/// order header finds its parked lines. Unknown or replayed ids form
/// groups of their own (the replay says why they were refused).
pub async fn groups(
    db: &Db,
    ids: &[i64],
) -> Result<Vec<(Option<String>, Vec<i64>)>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT quarantine_id, source, position FROM quarantine
              WHERE quarantine_id = ANY($1) AND replayed_at IS NULL",
            &[&ids],
        )
        .await?;
    let known: std::collections::HashMap<i64, (String, String)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut groups: Vec<((String, String), Vec<i64>)> = Vec::new();
    let mut unknown = Vec::new();
    for id in sorted {
        match known.get(&id) {
            Some(key) => match groups.iter_mut().find(|(k, _)| k == key) {
                Some((_, members)) => members.push(id),
                None => groups.push((key.clone(), vec![id])),
            },
            None => unknown.push((None, vec![id])),
        }
    }
    Ok(groups
        .into_iter()
        .map(|((source, _), ids)| (Some(source), ids))
        .chain(unknown)
        .collect())
}
