//! The loyalty ledger database (PostgreSQL).
//!
//! - `schema.rs`: the versioned schema (`migrations/`, applied with refinery)
//!   and its status.
//! - `positions.rs`: where each source stands (`source_positions`).
//!
//! Only this module writes ledger tables; other modules pass it types.

pub mod positions;
mod schema;

pub use schema::{migrate, schema_status, MigrateError, MigrationApplied, SchemaStatus};

use crate::config::LedgerSettings;
use crate::connect::{self, ConnectError};

/// One connection to the ledger database.
pub async fn connect(settings: &LedgerSettings) -> Result<tokio_postgres::Client, ConnectError> {
    connect::postgres(&settings.url, settings.password.as_ref()).await
}
