//! PostgreSQL sources, read through logical replication (`pgoutput`).
//!
//! - `preflight.rs`: what the server and role must provide (wal_level,
//!   REPLICATION, free slots and WAL senders, a usable slot).
//!
//! The replication client, decoder and snapshot arrive with the PostgreSQL
//! source issue.

pub mod preflight;
