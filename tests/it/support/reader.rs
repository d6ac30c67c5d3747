//! Running a PostgreSQL reader in a test: start it on a task, wait for it
//! to stream, stop it, and read what the sink captured.

use std::time::Duration;

use loyalty_cdc::config::{DatabaseUrl, SourceSettings};
use loyalty_cdc::source::postgres::{
    PgSourceError, PostgresSource, ReaderOptions, ReaderState, TableSpec,
};
use loyalty_cdc::source::SourceKind;
use serde_json::Value as Json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::sink::PgSink;
use super::{unique_name, PgDatabase};

pub fn source_settings(db: &PgDatabase, name: &str) -> SourceSettings {
    SourceSettings {
        name: name.into(),
        kind: SourceKind::Postgres,
        url: DatabaseUrl::try_from(db.url()).unwrap(),
        password: None,
        mapping: None,
        slot: Some(unique_name("slot")),
        publication: Some(unique_name("pub")),
        server_id: None,
        snapshot: true,
        heartbeat_seconds: None,
        compiled_mapping: None,
    }
}

pub struct Running {
    pub shutdown: CancellationToken,
    pub progress: loyalty_cdc::source::postgres::SourceProgress,
    handle: JoinHandle<(Result<(), PgSourceError>, PgSink)>,
}

pub fn start(source: PostgresSource, mut sink: PgSink) -> Running {
    let shutdown = CancellationToken::new();
    let progress = source.progress();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move {
        let outcome = source.run(&mut sink, &token).await;
        (outcome, sink)
    });
    Running {
        shutdown,
        progress,
        handle,
    }
}

impl Running {
    pub async fn stop(self) -> (Result<(), PgSourceError>, PgSink) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("reader stops within 30 s")
            .expect("reader task")
    }

    /// Waits until the reader streams (the snapshot, if any, is done).
    pub async fn streaming(&self) {
        for _ in 0..1200 {
            match self.progress.snapshot().state {
                ReaderState::Streaming => return,
                ReaderState::Failed(error) => panic!("reader failed: {error}"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!(
            "the reader did not start streaming within 60 s: {:?}",
            self.progress.snapshot()
        );
    }

    /// The reader's result once it stopped by itself (an error).
    pub async fn finished(self) -> (Result<(), PgSourceError>, PgSink) {
        tokio::time::timeout(Duration::from_secs(60), self.handle)
            .await
            .expect("reader stops by itself within 60 s")
            .expect("reader task")
    }
}

/// Polls `condition` every 50 ms for up to 60 s (a bound, not a timing
/// assertion: a healthy run takes milliseconds).
pub async fn wait_for<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1200 {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Rows the sink captured, as (kind, op, id, before, after), in order.
pub async fn captured(
    sink_db: &PgDatabase,
    filter: &str,
) -> Vec<(String, String, Option<String>, Option<Json>, Option<Json>)> {
    sink_db
        .client()
        .await
        .query(
            &format!("SELECT kind, op, id, before, after FROM captured WHERE op <> 'none' {filter} ORDER BY seq"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

pub async fn count(sink_db: &PgDatabase, filter: &str) -> i64 {
    sink_db
        .client()
        .await
        .query_one(
            &format!("SELECT count(*) FROM captured WHERE op <> 'none' {filter}"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

pub async fn wait_count(sink_db: &PgDatabase, filter: &str, expected: i64) {
    let what = format!("{expected} captured changes ({filter})");
    wait_for(&what, || async { count(sink_db, filter).await >= expected }).await;
    assert_eq!(
        count(sink_db, filter).await,
        expected,
        "more changes than expected ({filter})"
    );
}

pub fn options(tables: &[&str]) -> ReaderOptions {
    let mut options = ReaderOptions::new(tables.iter().map(|t| TableSpec::parse(t)).collect());
    options.status_interval = Duration::from_millis(100);
    options
}
