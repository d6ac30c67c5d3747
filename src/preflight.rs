//! `loyalty-cdc check`: everything that must hold before the service can
//! run, each failure with its fix. Connects to the ledger and to every
//! source; the per-kind prerequisites live with their source module.

use std::fmt;

use crate::config::Settings;
use crate::connect::ConnectError;
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
        let (summary, problems) = match source.kind {
            SourceKind::Postgres => postgres::preflight::check(source).await,
            SourceKind::Mysql => mysql::preflight::check(source).await,
        };
        findings.push(Finding {
            subject,
            summary,
            problems,
        });
    }
    findings
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
