//! PostgreSQL server restarts mid-stream, clean and crash: the reader
//! reconnects with backoff and resumes from its durable position; every
//! change arrives exactly once, and a clean shutdown is not held up. Its own test binary: cargo runs test binaries one at a
//! time, so the restart disturbs no other test.

#[path = "it/support/mod.rs"]
mod support;

use loyalty_cdc::source::postgres::PostgresSource;
use support::reader::{count, options, source_settings, start, wait_count};
use support::sink::PgSink;
use support::PgDatabase;

/// Restarts the local cluster. Async on purpose: a blocking call here would
/// stall the test's runtime — and with it the reader, which must confirm
/// what the walsender sent before a clean shutdown can finish.
async fn restart_postgres(mode: &str) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql: a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .expect("a cluster version");
    let status = tokio::process::Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            mode,
        ])
        .status()
        .await
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart -m {mode} failed");
}

#[tokio::test]
async fn clean_and_crash_restarts_mid_stream_lose_and_double_nothing() {
    let src = PgDatabase::create("srvrestart").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 3).await,
    );
    running.streaming().await;
    src.client()
        .await
        .batch_execute("INSERT INTO t SELECT generate_series(1, 1000)")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 1000).await;

    // A clean restart: the walsender waits for the reader to confirm
    // everything it sent, which the reader does, so the restart is quick.
    let started = std::time::Instant::now();
    restart_postgres("fast").await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "a clean shutdown waited {:?} for the reader",
        started.elapsed()
    );
    // Written after the restart, while the reader is still reconnecting.
    for id in 1001..=1100 {
        src.client()
            .await
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    wait_count(&sink_db, "AND kind = 'stream'", 1100).await;

    // A crash: the server recovers from WAL and slots fall back to their
    // last checkpointed position, so the reader is sent transactions it
    // already applied and must skip.
    restart_postgres("immediate").await;
    for id in 1101..=1200 {
        src.client()
            .await
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    // The sink's connection died with the server too: it reconnects, and
    // its open batch was rolled back, so the reader resumes from what the
    // sink had committed.
    wait_count(&sink_db, "AND kind = 'stream'", 1200).await;
    let progress = running.progress.snapshot();
    assert!(progress.reconnects >= 1, "{progress:?}");
    running.stop().await.0.unwrap();
    let distinct: i64 = sink_db
        .client()
        .await
        .query_one(
            "SELECT count(DISTINCT id) FROM captured WHERE kind = 'stream'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(distinct, 1200);
    assert_eq!(
        count(&sink_db, "AND kind = 'stream'").await,
        1200,
        "no change twice"
    );
}
