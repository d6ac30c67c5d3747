//! MariaDB server events that need the server to themselves (cargo runs
//! test binaries one at a time): a restart mid-stream, then binlogs purged
//! past the stored position.

#[path = "it/support/mod.rs"]
mod support;

use std::time::Duration;

use loyalty_cdc::config::{DatabaseUrl, SourceSettings};
use loyalty_cdc::source::mysql::reader::{MysqlSource, MysqlSourceError};
use loyalty_cdc::source::SourceKind;
use mysql_async::prelude::Queryable;
use support::reader::{count, wait_count};
use support::sink::PgSink;
use support::{MyDatabase, PgDatabase};
use tokio_util::sync::CancellationToken;

fn settings(db: &MyDatabase) -> SourceSettings {
    SourceSettings {
        name: "shop".into(),
        kind: SourceKind::Mysql,
        url: DatabaseUrl::try_from(db.url()).unwrap(),
        password: None,
        mapping: None,
        slot: None,
        publication: None,
        server_id: Some(u64::from(3_400_000_000 + std::process::id() % 100_000)),
        snapshot: true,
        heartbeat_seconds: None,
        compiled_mapping: None,
    }
}

/// Runs a command without blocking the runtime the reader runs on.
async fn run(program: &str, args: &[&str]) {
    let status = tokio::process::Command::new(program)
        .args(args)
        .status()
        .await
        .expect(program);
    assert!(status.success(), "{program} {args:?} failed");
}

#[tokio::test]
async fn a_restart_mid_stream_loses_nothing_and_purged_binlogs_are_a_clear_error() {
    let shop = MyDatabase::create("server").await;
    let sink_db = PgDatabase::create("sink").await;
    let mut conn = shop.conn().await;
    conn.query_drop("CREATE TABLE t (id INT PRIMARY KEY)")
        .await
        .unwrap();
    let settings = settings(&shop);
    let start = |sink: PgSink, shutdown: CancellationToken| {
        let source = MysqlSource::new(&settings, &["t"]);
        tokio::spawn(async move {
            let mut sink = sink;
            (source.run(&mut sink, &shutdown).await, sink)
        })
    };
    let new_sink = || async {
        let mut sink = PgSink::new(&sink_db, "shop", 1).await;
        sink.kind = SourceKind::Mysql;
        sink
    };
    let shutdown = CancellationToken::new();
    let handle = start(new_sink().await, shutdown.clone());
    support::reader::wait_for("the reader to stream", || async {
        loyalty_cdc::ledger::positions::load(&sink_db.client().await, "shop")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    for id in 1..=100 {
        conn.exec_drop("INSERT INTO t VALUES (?)", (id,))
            .await
            .unwrap();
    }
    // DDL on a table nobody maps is passed over.
    conn.query_drop("CREATE TABLE scratch (a INT); DROP TABLE scratch")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 100).await;

    run(
        "mariadb-admin",
        &["-uroot", "-h127.0.0.1", "--protocol=tcp", "shutdown"],
    )
    .await;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docker/setup-local-databases.sh"
    );
    run("bash", &[script]).await;
    let mut conn = shop.conn().await;
    for id in 101..=200 {
        conn.exec_drop("INSERT INTO t VALUES (?)", (id,))
            .await
            .unwrap();
    }
    wait_count(&sink_db, "AND kind = 'stream'", 200).await;
    shutdown.cancel();
    let (outcome, _) = tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .unwrap()
        .unwrap();
    outcome.unwrap();
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
    assert_eq!(distinct, 200, "every row once across the restart");

    // Binlogs purged past the stored position: a clear error, not a skip.
    // The server keeps a binlog file while a dump thread reads it; the
    // stopped reader's goes at its next heartbeat.
    support::reader::wait_for("the stopped reader's dump thread to end", || async {
        let mut admin = support::mysql_connect(&support::mysql_admin_url()).await;
        let dumps: Option<i64> = admin
            .query_first("SELECT count(*) FROM information_schema.PROCESSLIST WHERE COMMAND LIKE 'Binlog Dump%'")
            .await
            .unwrap();
        dumps == Some(0)
    })
    .await;
    conn.query_drop("INSERT INTO t VALUES (201)").await.unwrap();
    conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
    let (current, _, _, _): (String, u64, String, String) = conn
        .query_first("SHOW BINLOG STATUS")
        .await
        .unwrap()
        .unwrap();
    // The old file goes once its binlog checkpoint is written, which
    // MariaDB does shortly after the rotation: purge until it is gone.
    let mut purged = false;
    for _ in 0..50 {
        conn.query_drop(format!("PURGE BINARY LOGS TO '{current}'"))
            .await
            .unwrap();
        let logs: Vec<(String, u64)> = conn.query("SHOW BINARY LOGS").await.unwrap();
        if logs[0].0 == current {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(purged, "the stored position's binlog was not purged");
    let shutdown = CancellationToken::new();
    let handle = start(new_sink().await, shutdown.clone());
    let (outcome, _) = tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .unwrap()
        .unwrap();
    let error = outcome.unwrap_err();
    assert!(
        matches!(error, MysqlSourceError::BinlogPurged { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.contains("is gone from the server") && message.contains("Fix: "),
        "{message}"
    );
    assert_eq!(
        count(&sink_db, "AND kind = 'stream'").await,
        200,
        "nothing skipped silently"
    );
}
