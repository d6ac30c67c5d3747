//! `source_positions`: where each source stands. Written in the same
//! transaction as the effects of the changes up to that position (that is
//! what makes the ledger exactly-once), read at start to resume.

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

use super::db::Db;

use crate::source::{Phase, Position, SourceKind};

/// A stored position could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum PositionError {
    #[error("reading the position of source `{source_name}`: {error}")]
    Database {
        source_name: String,
        error: tokio_postgres::Error,
    },
    #[error("source `{source_name}` has a stored position `{text}` that is not valid: {problem}")]
    Corrupt {
        source_name: String,
        text: String,
        problem: String,
    },
}

/// The stored position of `source`, if any.
pub async fn load(
    client: &impl GenericClient,
    source: &str,
) -> Result<Option<Position>, PositionError> {
    let row = client
        .query_opt(
            "SELECT position FROM source_positions WHERE source = $1",
            &[&source],
        )
        .await
        .map_err(|error| PositionError::Database {
            source_name: source.into(),
            error,
        })?;
    let Some(row) = row else { return Ok(None) };
    let text: String = row.get(0);
    text.parse()
        .map(Some)
        .map_err(|problem| PositionError::Corrupt {
            source_name: source.into(),
            text,
            problem,
        })
}

/// Records `position` for `source`; call inside the transaction that writes
/// the effects of the changes up to it.
pub async fn store(
    client: &impl GenericClient,
    source: &str,
    kind: SourceKind,
    position: &Position,
    commit_ts: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let row = StoredRow::of(kind, position);
    client
        .execute(STORE, &row.params(&source, &commit_ts))
        .await?;
    Ok(())
}

/// [`store`] with the ledger writer's prepared statement (see
/// [`prepare_store`]).
pub async fn store_prepared(
    db: &Db,
    source: &str,
    kind: SourceKind,
    position: &Position,
    commit_ts: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let row = StoredRow::of(kind, position);
    db.execute(STORE, &row.params(&source, &commit_ts)).await?;
    Ok(())
}

/// The columns [`STORE`] writes besides the source and commit time.
struct StoredRow {
    kind: String,
    state: &'static str,
    position: String,
}

impl StoredRow {
    fn of(kind: SourceKind, position: &Position) -> Self {
        Self {
            kind: kind.to_string(),
            state: match position.phase {
                Phase::Snapshot => "snapshotting",
                Phase::Stream => "streaming",
            },
            position: position.to_string(),
        }
    }

    fn params<'a>(
        &'a self,
        source: &'a &str,
        commit_ts: &'a DateTime<Utc>,
    ) -> [&'a (dyn ToSql + Sync); 5] {
        [source, &self.kind, &self.state, &self.position, commit_ts]
    }
}

/// Makes sure [`store`]'s statement is prepared on `db`: a call after
/// this sends its execution at once (no round trip to prepare first), so
/// it may be pipelined with the COMMIT that follows it and still run
/// before it.
pub async fn prepare_store(db: &Db) -> Result<(), tokio_postgres::Error> {
    db.prepare(STORE).await
}

const STORE: &str =
    "INSERT INTO source_positions (source, kind, state, position, commit_ts, updated_at)
             VALUES ($1, $2, $3, $4, $5, now())
             ON CONFLICT (source) DO UPDATE
               SET kind = EXCLUDED.kind, state = EXCLUDED.state, position = EXCLUDED.position,
                   commit_ts = EXCLUDED.commit_ts, updated_at = now()";
