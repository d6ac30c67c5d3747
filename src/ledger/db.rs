//! A ledger connection that prepares each statement once.
//!
//! tokio-postgres prepares a statement given as text on every call — a
//! round trip of its own before the one that runs it. Booking one order
//! takes a handful of statements, so preparing them once per connection
//! halves the round trips (measured: `cargo bench --bench pipeline`).
//! Written here because tokio-postgres has no statement cache and its
//! `GenericClient` cannot be implemented outside it; deadpool-postgres has
//! one, but brings a pool the ledger writer does not use.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Error, Row, Statement};

pub struct Db {
    client: Client,
    statements: Mutex<HashMap<&'static str, Statement>>,
}

impl Db {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            statements: Mutex::default(),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn statement(&self, sql: &'static str) -> Result<Statement, Error> {
        let cached = self
            .statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sql)
            .cloned();
        if let Some(statement) = cached {
            return Ok(statement);
        }
        let statement = self.client.prepare(sql).await?;
        self.statements
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(sql, statement.clone());
        Ok(statement)
    }

    /// Prepares `sql` now if it is not yet (see [`Db`]).
    pub async fn prepare(&self, sql: &'static str) -> Result<(), Error> {
        self.statement(sql).await.map(drop)
    }

    pub async fn execute(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, Error> {
        let statement = self.statement(sql).await?;
        self.client.execute(&statement, params).await
    }

    pub async fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.statement(sql).await?;
        self.client.query(&statement, params).await
    }

    pub async fn query_one(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let statement = self.statement(sql).await?;
        self.client.query_one(&statement, params).await
    }

    pub async fn query_opt(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, Error> {
        let statement = self.statement(sql).await?;
        self.client.query_opt(&statement, params).await
    }

    pub async fn batch_execute(&self, sql: &str) -> Result<(), Error> {
        self.client.batch_execute(sql).await
    }
}

/// An error as logs may show it: the server's code and message, never its
/// DETAIL (which can quote a failing row, and rows hold PII).
pub fn describe(error: &Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}
