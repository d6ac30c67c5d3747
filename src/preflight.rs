//! `loyalty-cdc check`: everything that must hold before the service can
//! run, each failure with its fix. Connects to the ledger and to every
//! source; the per-kind prerequisites live with their source module.

use std::fmt;

use std::collections::HashMap;

use crate::config::{Settings, SourceSettings};
use crate::connect::ConnectError;
use crate::normalize::mapping::Mapping;
use crate::source::{mysql, postgres, SourceKind};

/// One unmet prerequisite and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

impl Problem {
    pub fn new(what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            fix: fix.into(),
        }
    }
}

impl From<ConnectError> for Problem {
    fn from(error: ConnectError) -> Self {
        Self {
            fix: error.fix(),
            what: error.to_string(),
        }
    }
}

/// The outcome for one thing checked (the ledger, a source).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. ``source `pos` (postgres)``.
    pub subject: String,
    /// What was found in order, e.g. "PostgreSQL 15.4, wal_level=logical".
    pub summary: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.problems.is_empty() {
            return write!(f, "ok    {}: {}", self.subject, self.summary);
        }
        write!(f, "FAIL  {}", self.subject)?;
        if !self.summary.is_empty() {
            write!(f, ": {}", self.summary)?;
        }
        for problem in &self.problems {
            write!(
                f,
                "\n      problem: {}\n      fix:     {}",
                problem.what, problem.fix
            )?;
        }
        Ok(())
    }
}

/// Checks the ledger and every source, in configuration order.
pub async fn check(settings: &Settings) -> Vec<Finding> {
    let mut findings = vec![check_ledger(settings).await];
    for source in &settings.sources {
        let subject = format!("source `{}` ({})", source.name, source.kind);
        let (mut summary, mut problems) = match source.kind {
            SourceKind::Postgres => postgres::preflight::check(source).await,
            SourceKind::Mysql => mysql::preflight::check(source).await,
        };
        if let Some(mapping) = &source.compiled_mapping {
            // A connection problem is already reported above.
            if let Ok(live) = live_columns(source).await {
                let missing = mapping_problems(mapping, &live);
                if missing.is_empty() {
                    summary.push_str(&format!(
                        ", mapping {} fits ({} tables)",
                        mapping.system,
                        mapping.tables().len()
                    ));
                }
                problems.extend(missing);
            }
        }
        findings.push(Finding {
            subject,
            summary,
            problems,
        });
    }
    for provider in &settings.providers {
        findings.push(check_provider(settings, provider).await);
    }
    findings
}

/// How long `check` waits for a provider host to accept a connection.
const PROVIDER_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A provider: its host accepts TCP connections (nothing is sent: a probe
/// request could reach real members), and its endpoint is not disabled by
/// a 410.
async fn check_provider(
    settings: &Settings,
    provider: &crate::config::ProviderSettings,
) -> Finding {
    let subject = format!("provider `{}`", provider.name);
    let Some(template) = &provider.compiled else {
        return Finding {
            subject,
            summary: String::new(),
            problems: vec![Problem::new(
                "its template did not compile",
                "see the configuration errors above",
            )],
        };
    };
    let base = provider
        .base_url
        .clone()
        .unwrap_or_else(|| template.base_url.clone());
    let mut problems = Vec::new();
    let mut summary = format!(
        "{} ({}) at {base}",
        template.name,
        template.channel.as_str()
    );
    match url::Url::parse(&base) {
        Ok(url) => {
            let host = url.host_str().unwrap_or_default().to_string();
            let port = url.port_or_known_default().unwrap_or(443);
            match tokio::time::timeout(
                PROVIDER_CONNECT_TIMEOUT,
                tokio::net::TcpStream::connect((host.as_str(), port)),
            )
            .await
            {
                Ok(Ok(_)) => summary.push_str(", host reachable"),
                Ok(Err(error)) => problems.push(Problem::new(
                    format!("cannot connect to {host}:{port}: {error}"),
                    "check base_url, DNS and the firewall path from this host to the provider",
                )),
                Err(_) => problems.push(Problem::new(
                    format!(
                        "{host}:{port} did not accept a connection within {} s",
                        PROVIDER_CONNECT_TIMEOUT.as_secs()
                    ),
                    "check base_url and the firewall path from this host to the provider",
                )),
            }
        }
        Err(error) => problems.push(Problem::new(
            format!("base URL `{base}` is not a URL: {error}"),
            "set base_url = \"https://…\" in the [[providers]] entry",
        )),
    }
    if let Ok(client) = crate::ledger::connect(&settings.ledger).await {
        let db = crate::ledger::db::Db::new(client);
        if let Ok(disabled) = crate::delivery::outbox::disabled_providers(&db).await {
            if let Some(reason) = disabled.get(&provider.name) {
                problems.push(Problem::new(
                    format!("the endpoint is disabled: {reason}"),
                    "fix the endpoint at the provider, then `loyalty-cdc dlq replay` its dead letters (that re-enables it)",
                ));
            }
        }
    }
    Finding {
        subject,
        summary,
        problems,
    }
}

/// Columns of the source's tables, keyed `schema.table` (PostgreSQL; also
/// the bare name for `public`) or `table` (MySQL: the URL's database).
async fn live_columns(
    source: &SourceSettings,
) -> Result<HashMap<String, Vec<String>>, ConnectError> {
    let mut live: HashMap<String, Vec<String>> = HashMap::new();
    match source.kind {
        SourceKind::Postgres => {
            let client = crate::connect::postgres(&source.url, source.password.as_ref()).await?;
            let rows = client
                .query(
                    "SELECT table_schema::text, table_name::text, column_name::text FROM information_schema.columns
                      WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
                    &[],
                )
                .await
                .unwrap_or_default();
            for row in rows {
                let (schema, table, column): (String, String, String) =
                    (row.get(0), row.get(1), row.get(2));
                if schema == "public" {
                    live.entry(table.clone()).or_default().push(column.clone());
                }
                live.entry(format!("{schema}.{table}"))
                    .or_default()
                    .push(column);
            }
        }
        SourceKind::Mysql => {
            use mysql_async::prelude::Queryable;
            let mut conn = crate::connect::mysql(&source.url, source.password.as_ref()).await?;
            let rows: Vec<(String, String)> = conn
                .query(
                    "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = DATABASE()",
                )
                .await
                .unwrap_or_default();
            for (table, column) in rows {
                live.entry(table).or_default().push(column);
            }
            let _ = conn.disconnect().await;
        }
    }
    Ok(live)
}

/// Every table or column the mapping reads that the live schema lacks.
fn mapping_problems(mapping: &Mapping, live: &HashMap<String, Vec<String>>) -> Vec<Problem> {
    let file = mapping.path.display();
    let mut problems = Vec::new();
    let mut missing_tables = Vec::new();
    for (table, column, key) in mapping.required_columns() {
        match live.get(&table) {
            None if !missing_tables.contains(&table) => {
                problems.push(Problem::new(
                    format!("mapping {file}: table `{table}` does not exist in the source (or the user cannot see it)"),
                    format!("create the table, correct `table` in {file}, or GRANT SELECT on it to the source user (MySQL lists only tables the user may read)"),
                ));
                missing_tables.push(table);
            }
            None => {}
            Some(columns) if !columns.contains(&column) => problems.push(Problem::new(
                format!("mapping {file}: table `{table}` has no column `{column}` (read by {key})"),
                format!("correct {key} in {file} to a column `{table}` has, or add the column"),
            )),
            Some(_) => {}
        }
    }
    problems
}

async fn check_ledger(settings: &Settings) -> Finding {
    let subject = format!("ledger {}", settings.ledger.url);
    let client = match crate::ledger::connect(&settings.ledger).await {
        Ok(client) => client,
        Err(error) => {
            return Finding {
                subject,
                summary: String::new(),
                problems: vec![error.into()],
            }
        }
    };
    let (summary, problems) = match crate::ledger::schema_status(&client).await {
        Ok(status) if status.is_ahead() => (
            String::new(),
            vec![Problem::new(
                format!(
                    "the ledger schema is at version {}, newer than this binary knows ({})",
                    status.applied.unwrap_or_default(),
                    status.latest
                ),
                "run the newer loyalty-cdc release that migrated it",
            )],
        ),
        Ok(status) if status.is_current() => (
            format!("reachable, schema at version {}", status.latest),
            vec![],
        ),
        Ok(status) => (
            format!(
                "reachable, schema at version {} of {}: `migrate` or `run` applies the rest",
                status.applied.unwrap_or(0),
                status.latest
            ),
            vec![],
        ),
        Err(error) => (
            String::new(),
            vec![Problem::new(
                format!("cannot read the ledger schema version: {error}"),
                "grant the ledger user access to the ledger database (it needs to own its tables)",
            )],
        ),
    };
    Finding {
        subject,
        summary,
        problems,
    }
}
