//! loyalty-cdc: a loyalty program fed by database change streams.
//!
//! The data flow and the promises each stage keeps are in DESIGN.md; each
//! module below owns one stage (and the tables of that stage):
//!
//! - [`config`]: typed configuration, file + `LOYALTY__…` environment, validated.
//! - [`connect`]: connecting to PostgreSQL and MySQL/MariaDB, and explaining
//!   why a connection failed.
//! - [`source`]: the source databases; per kind, the prerequisites for
//!   change capture.
//! - [`normalize`]: source transactions → member events, by mapping files.
//! - [`identity`]: identifiers normalized, placeholders blocked, linking rules.
//! - [`ledger`]: the ledger database: members, orders, points, positions.
//! - [`triggers`]: event triggers detected in the ledger transaction.
//! - [`personalize`]: features, scores (RFM, probability alive, lifecycle)
//!   and segments.
//! - [`delivery`]: the outbox worker: policy, provider templates, signing,
//!   retries, dead letters.
//! - [`pipeline`]: `loyalty-cdc run`: every source into the ledger, and
//!   delivery.
//! - [`preflight`]: `loyalty-cdc check`, every prerequisite with its fix.
//! - [`demo`]: `loyalty-cdc demo`, the whole pipeline on the local databases.
//! - [`erasure`]: GDPR erasure of a member, at the providers and here.
//! - [`status`]: `loyalty-cdc status`: positions, lag and what waits.
//! - [`api`]: the HTTP listener: metrics, health, readiness, the member API.

pub mod api;
pub mod config;
pub mod connect;
pub mod delivery;
pub mod demo;
pub mod erasure;
pub mod identity;
pub mod ledger;
pub mod normalize;
pub mod personalize;
pub mod pipeline;
pub mod preflight;
pub mod source;
pub mod status;
pub mod triggers;

/// How the caller should react to an error. Every module's error type maps
/// each of its variants to one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// May go away by itself (server restarting, network blip): retry with
    /// backoff.
    Transient,
    /// Stays until an operator acts, but only for this source or table: park
    /// it and keep the rest running.
    Definite,
    /// The configuration or the environment is wrong: stop at start and say
    /// what to change.
    Config,
}
