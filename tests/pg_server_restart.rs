//! A PostgreSQL server crash and restart mid-stream: the reader reconnects
//! with backoff and resumes from its durable position; every change arrives
//! exactly once. Its own test binary: cargo runs test binaries one at a
//! time, so the restart disturbs no other test.

#[path = "it/support/mod.rs"]
mod support;

use loyalty_cdc::source::postgres::PostgresSource;
use support::reader::{count, options, source_settings, start, wait_count};
use support::sink::PgSink;
use support::PgDatabase;

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql: a Debian PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .expect("a cluster version");
    let status = std::process::Command::new("pg_ctlcluster")
        // Immediate: a crash as far as the server knows. It recovers from
        // WAL, and slots fall back to their last checkpointed position, so
        // the reader is sent transactions it already applied and must skip.
        .args([
            "--skip-systemctl-redirect",
            &version,
            "main",
            "restart",
            "-m",
            "immediate",
        ])
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster restart failed");
}

#[tokio::test]
async fn a_server_restart_mid_stream_loses_and_doubles_nothing() {
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

    restart_postgres();
    // Written after the restart, while the reader is still reconnecting.
    for id in 1001..=1100 {
        src.client()
            .await
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    // The sink's connection died with the server too: it reconnects, and
    // its open batch was rolled back, so the reader resumes from what the
    // sink had committed.
    wait_count(&sink_db, "AND kind = 'stream'", 1100).await;
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
    assert_eq!(distinct, 1100);
    assert_eq!(
        count(&sink_db, "AND kind = 'stream'").await,
        1100,
        "no change twice"
    );
}
