//! The ledger schema: versioned SQL files in `migrations/`, embedded in the
//! binary and applied in order by refinery, which records each applied
//! version (and its checksum) in `refinery_schema_history`.
//!
//! Several processes may start at once (a rolling deploy); a PostgreSQL
//! advisory lock makes them apply migrations one after the other, so the
//! second finds nothing left to do.

use crate::ErrorClass;

refinery::embed_migrations!("migrations");

/// Advisory lock key held while migrating ("lcdc-mig" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x6c63_6463_2d6d_6967;

/// The history table refinery keeps.
const HISTORY_TABLE: &str = "refinery_schema_history";

/// A migration this run applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationApplied {
    pub version: i32,
    pub name: String,
}

/// Where the ledger schema stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    /// Highest applied version; `None` for an empty database.
    pub applied: Option<i32>,
    /// Highest version this binary ships.
    pub latest: i32,
}

impl SchemaStatus {
    pub fn is_current(&self) -> bool {
        self.applied == Some(self.latest)
    }

    /// The database was migrated by a newer loyalty-cdc than this one.
    pub fn is_ahead(&self) -> bool {
        self.applied.is_some_and(|applied| applied > self.latest)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("ledger migration failed: {0}; the failed migration was rolled back, fix the cause and run `loyalty-cdc migrate` again")]
    Migration(#[from] refinery::Error),
    #[error("ledger database query failed: {0}")]
    Database(#[from] tokio_postgres::Error),
}

impl MigrateError {
    pub fn class(&self) -> ErrorClass {
        match self {
            // A failing migration fails the same way next time.
            Self::Migration(_) => ErrorClass::Config,
            Self::Database(_) => ErrorClass::Transient,
        }
    }
}

/// Applies every migration not yet applied. Returns those it applied (none
/// when the schema is current).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
) -> Result<Vec<MigrationApplied>, MigrateError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    let outcome = migrations::runner()
        .set_grouped(false)
        .run_async(client)
        .await;
    // Release even after a failure; the session ending would release it too.
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = outcome?;
    unlock?;
    let applied = report
        .applied_migrations()
        .iter()
        .map(|migration| MigrationApplied {
            version: migration.version(),
            name: migration.name().to_string(),
        })
        .collect();
    Ok(applied)
}

/// Reads the applied version without changing anything.
pub async fn schema_status(
    client: &tokio_postgres::Client,
) -> Result<SchemaStatus, tokio_postgres::Error> {
    let latest = migrations::runner()
        .get_migrations()
        .iter()
        .map(|migration| migration.version())
        .max()
        .unwrap_or(0);
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&HISTORY_TABLE])
        .await?;
    let has_history: bool = row.get(0);
    let applied = if has_history {
        // Identifier is a constant; refinery does not let us bind it either.
        let row = client
            .query_one(&format!("SELECT max(version) FROM {HISTORY_TABLE}"), &[])
            .await?;
        row.get::<_, Option<i32>>(0)
    } else {
        None
    };
    Ok(SchemaStatus { applied, latest })
}
