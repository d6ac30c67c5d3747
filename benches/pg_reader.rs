//! Throughput of the PostgreSQL reader against `pg_recvlogical`, on the same
//! changes, in the same run.
//!
//!     cargo bench --bench pg_reader            # 1,000,000 rows, 3 runs each
//!     LCDC_BENCH_ROWS=200000 cargo bench --bench pg_reader
//!     LCDC_BENCH_TXN_BUDGET=2000000000 …   # no spilling of the big transaction
//!
//! For each shape — (a) transactions of 4 rows, (b) one transaction — it
//! creates one pgoutput slot per run *before* writing the rows, writes
//! them once into an 8-column table, then drains every slot up to the same
//! end: `pg_recvlogical` (pgoutput, protocol 1, to /dev/null, `--endpos`)
//! and our reader (every value decoded to a typed value, handed to a
//! consumer that visits every change and keeps nothing), alternating, and
//! prints one JSON line per run and a summary line with the medians and
//! the ratio (ours / pg_recvlogical, rows per second; above 1 is faster).
//! Both times include the final confirmation reaching the server.
//! Needs the local PostgreSQL made ready by docker/setup-local-databases.sh.

use std::process::Command;
use std::time::{Duration, Instant};

use loyalty_cdc::config::{DatabaseUrl, SourceSettings};
use loyalty_cdc::source::postgres::{PostgresSource, ReaderOptions, TableSpec};
use loyalty_cdc::source::{ConsumerError, Lsn, Position, SourceKind, SourceTxn, TxnConsumer};
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

const RUNS: usize = 3;
const PUBLICATION: &str = "bench_pub";

/// Visits every change and keeps nothing.
struct NullConsumer {
    changes: u64,
    last: Option<Position>,
}

impl TxnConsumer for NullConsumer {
    async fn durable_position(&mut self) -> Result<Option<Position>, ConsumerError> {
        // Stream from the slot's own start (its confirmed_flush_lsn).
        Ok(Some(self.last.clone().unwrap_or(Position::stream(Lsn(0)))))
    }

    async fn apply(&mut self, mut txn: SourceTxn) -> Result<Option<Position>, ConsumerError> {
        let mut seen = 0u64;
        txn.changes
            .for_each(|change| {
                std::hint::black_box(change);
                seen += 1;
            })
            .map_err(|e| ConsumerError::definite(e.to_string()))?;
        self.changes += seen;
        self.last = Some(txn.position);
        Ok(self.last.clone())
    }

    async fn flush(&mut self) -> Result<Option<Position>, ConsumerError> {
        Ok(self.last.clone())
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}; run bash docker/setup-local-databases.sh"));
    tokio::spawn(connection);
    client
}

struct Shape {
    name: &'static str,
    rows: i64,
    per_txn: i64,
}

#[tokio::main]
async fn main() {
    let admin_url = std::env::var("LCDC_BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let rows: i64 = std::env::var("LCDC_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let database = format!("lcdc_bench_{}", std::process::id());
    let admin = connect(&admin_url).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let mut db_url = url::Url::parse(&admin_url).unwrap();
    db_url.set_path(&database);
    let db_url = db_url.to_string();

    let shapes = [
        Shape {
            name: "small_transactions_4_rows",
            rows,
            per_txn: 4,
        },
        Shape {
            name: "one_transaction",
            rows,
            per_txn: rows,
        },
    ];
    for shape in &shapes {
        bench_shape(&db_url, &database, shape).await;
    }

    admin
        .batch_execute(&format!("DROP DATABASE {database} WITH (FORCE)"))
        .await
        .unwrap();
}

async fn bench_shape(db_url: &str, database: &str, shape: &Shape) {
    let db = connect(db_url).await;
    db.batch_execute(&format!(
        "DROP PUBLICATION IF EXISTS {PUBLICATION};
         DROP TABLE IF EXISTS bench_line;
         CREATE TABLE bench_line (id bigint PRIMARY KEY, order_id bigint, product_id int,
             qty numeric(12,3), price_unit numeric(12,2), name text, paid boolean,
             created_at timestamptz);
         CREATE PUBLICATION {PUBLICATION} FOR TABLE bench_line;"
    ))
    .await
    .unwrap();
    let slot = |tool: &str, run: usize| format!("bench_{}_{tool}_{run}", std::process::id());
    for run in 0..RUNS {
        for tool in ["ours", "recv"] {
            db.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot(tool, run)],
            )
            .await
            .unwrap();
        }
    }

    let started = Instant::now();
    let insert = "INSERT INTO bench_line SELECT g, g / 4, (g % 5000)::int, 1.5, 19.99, 'Organic whole milk 1 L', true, '2026-11-25 10:00+00'";
    if shape.per_txn >= shape.rows {
        db.batch_execute(&format!(
            "{insert} FROM generate_series(1, {}) g",
            shape.rows
        ))
        .await
        .unwrap();
    } else {
        // A DO block commits only when it is the whole statement, outside
        // any transaction block.
        db.batch_execute("SET synchronous_commit = off")
            .await
            .unwrap();
        db.batch_execute(&format!(
            "DO $$ BEGIN
               FOR i IN 0..{} LOOP
                 {insert} FROM generate_series(i * {per} + 1, i * {per} + {per}) g;
                 COMMIT;
               END LOOP;
             END $$;",
            shape.rows / shape.per_txn - 1,
            per = shape.per_txn
        ))
        .await
        .unwrap();
    }
    // Both tools stop at the first commit past `end`: one marker row in a
    // transaction of its own.
    let end: String = db
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    db.batch_execute(&format!(
        "{insert} FROM generate_series({0}, {0}) g",
        shape.rows + 1
    ))
    .await
    .unwrap();
    // The transport stops at the marker's Begin: every data row, not the marker.
    let expected_changes = shape.rows as u64;
    eprintln!(
        "{}: wrote {} rows in {:.1} s; draining up to {end}",
        shape.name,
        shape.rows,
        started.elapsed().as_secs_f64()
    );

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let seconds = run_ours(db_url, &slot("ours", run), &end, expected_changes).await;
        ours.push(shape.rows as f64 / seconds);
        println!(
            r#"{{"bench":"pg_reader","shape":"{}","tool":"loyalty-cdc","run":{run},"rows":{},"seconds":{seconds:.3},"rows_per_second":{:.0}}}"#,
            shape.name,
            shape.rows,
            shape.rows as f64 / seconds
        );
        let seconds = run_pg_recvlogical(database, &slot("recv", run), &end);
        theirs.push(shape.rows as f64 / seconds);
        println!(
            r#"{{"bench":"pg_reader","shape":"{}","tool":"pg_recvlogical","run":{run},"rows":{},"seconds":{seconds:.3},"rows_per_second":{:.0}}}"#,
            shape.name,
            shape.rows,
            shape.rows as f64 / seconds
        );
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        r#"{{"bench":"pg_reader","shape":"{}","summary":true,"rows":{},"median_rows_per_second":{{"loyalty-cdc":{ours:.0},"pg_recvlogical":{theirs:.0}}},"ratio":{:.3}}}"#,
        shape.name,
        shape.rows,
        ours / theirs
    );
    for run in 0..RUNS {
        for tool in ["ours", "recv"] {
            let _ = db
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot(tool, run)])
                .await;
        }
    }
}

async fn run_ours(db_url: &str, slot: &str, end: &str, expected_changes: u64) -> f64 {
    let settings = SourceSettings {
        name: "bench".into(),
        kind: SourceKind::Postgres,
        url: DatabaseUrl::try_from(db_url.to_string()).unwrap(),
        password: None,
        mapping: None,
        slot: Some(slot.into()),
        publication: Some(PUBLICATION.into()),
        server_id: None,
        snapshot: true,
        heartbeat_seconds: None,
        compiled_mapping: None,
    };
    let mut options = ReaderOptions::new(vec![TableSpec::parse("bench_line")]);
    options.stop_at = Some(end.parse().unwrap());
    // pg_recvlogical sends its last confirmation the moment it reaches
    // --endpos; the transport sends ours on its status tick, so a short tick
    // keeps the comparison about throughput rather than a final wait.
    options.status_interval = Duration::from_millis(100);
    if let Some(budget) = std::env::var("LCDC_BENCH_TXN_BUDGET")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        options.txn_memory_budget = budget;
    }
    let source = PostgresSource::new(&settings, options);
    let mut consumer = NullConsumer {
        changes: 0,
        last: None,
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(1800),
        source.run(&mut consumer, &shutdown),
    )
    .await
    .expect("drained within 30 minutes")
    .expect("reader ran");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        consumer.changes >= expected_changes,
        "our reader saw {} of {expected_changes} changes",
        consumer.changes
    );
    seconds
}

fn run_pg_recvlogical(database: &str, slot: &str, end: &str) -> f64 {
    let started = Instant::now();
    let status = Command::new("pg_recvlogical")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            database,
            "--slot",
            slot,
            "--start",
        ])
        .args([
            "-o",
            "proto_version=1",
            "-o",
            &format!("publication_names={PUBLICATION}"),
        ])
        .args(["--endpos", end, "--no-loop", "-f", "/dev/null"])
        .status()
        .expect("pg_recvlogical (postgresql-client) on PATH");
    assert!(status.success(), "pg_recvlogical failed");
    started.elapsed().as_secs_f64()
}
