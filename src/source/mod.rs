//! Source databases. One sub-module per database kind; each owns how that
//! kind is read and what it needs to be readable (its `preflight`).
//!
//! The common transaction and position types arrive with the first reader
//! (see the PostgreSQL source issue).

pub mod mysql;
pub mod postgres;

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which kind of database a source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum SourceKind {
    /// PostgreSQL, read through logical replication (`pgoutput`).
    Postgres,
    /// MySQL or MariaDB, read through the row-based binlog.
    Mysql,
}

impl TryFrom<String> for SourceKind {
    type Error = String;

    fn try_from(kind: String) -> Result<Self, Self::Error> {
        // Spelled out (rather than serde's enum error) so the message lists
        // the kinds and says MariaDB is `mysql`.
        match kind.as_str() {
            "postgres" => Ok(Self::Postgres),
            "mysql" => Ok(Self::Mysql),
            other => Err(format!(
                "unknown source kind `{other}`; use `postgres` (PostgreSQL) or `mysql` (MySQL or MariaDB)"
            )),
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
        })
    }
}
