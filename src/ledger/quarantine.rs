//! `quarantine`: source rows that could not be mapped, kept with the
//! reason and the position (written by `apply.rs`), listed for operators.

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
    pub quarantined_at: DateTime<Utc>,
}

/// Open (not replayed) quarantined rows, oldest first.
pub async fn open(db: &Db, limit: i64) -> Result<Vec<Quarantined>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT quarantine_id, source, position, table_name, operation, reason, row_data, quarantined_at
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
            quarantined_at: r.get(7),
        })
        .collect())
}
