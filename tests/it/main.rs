//! Integration tests against the real local PostgreSQL and MariaDB (made
//! ready by `docker/setup-local-databases.sh`). One binary, one module per
//! area, so the suite links once.

mod support;

mod check;
mod config;
mod delivery;
mod demo;
mod ledger_pipeline;
mod migrate;
mod mysql_binlog;
mod mysql_source;
mod ops;
mod personalize;
mod pg_source;
mod scheduler;
mod schemas;
mod setup_script;
