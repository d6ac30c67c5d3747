//! The loyalty ledger database (PostgreSQL).
//!
//! - `schema.rs`: the versioned schema (`migrations/`, applied with refinery)
//!   and its status.
//! - `positions.rs`: where each source stands (`source_positions`).
//! - `apply.rs`: the consumer of a source: normalize, resolve, book, store
//!   the position, in one transaction per batch.
//! - `members.rs`: members, identifiers, merges (`members`,
//!   `member_identifiers`, `member_merges`, `shared_identifiers`).
//! - `orders.rs`: orders, refunds, entries, balances, tier upgrades.
//! - `quarantine.rs`: source rows that could not be mapped, for operators.
//! - `features.rs`: what members' purchases add up to, per member and
//!   product, and the segments they are in.
//! - `tiers.rs`: tier qualification periods and their review (downgrades).
//! - `wishlists.rs`: wishlisted products and product prices (price drops).
//! - `verify.rs`: balances recomputed from the entries (`ledger verify`).
//!
//! Only this module writes ledger tables; other modules pass it types.

pub mod apply;
pub mod db;
pub mod features;
pub mod members;
pub mod offers;
pub mod orders;
pub mod positions;
pub mod quarantine;
mod schema;
pub mod tiers;
pub mod verify;
pub mod wishlists;

pub use schema::{migrate, schema_status, MigrateError, MigrationApplied, SchemaStatus};

use crate::config::LedgerSettings;
use crate::connect::{self, ConnectError};

/// One connection to the ledger database.
pub async fn connect(settings: &LedgerSettings) -> Result<tokio_postgres::Client, ConnectError> {
    connect::postgres(&settings.url, settings.password.as_ref()).await
}
