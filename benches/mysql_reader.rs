//! Throughput of the binlog reader against `mariadb-binlog`, on the same
//! binlog range, in the same run.
//!
//!     cargo bench --bench mysql_reader           # 1,000,000 rows
//!     LCDC_BENCH_ROWS=200000 cargo bench --bench mysql_reader
//!     LCDC_BENCH_SHAPES=small cargo bench --bench mysql_reader   # one shape
//!
//! Writes the rows into an 8-column table twice — (a) in transactions of 4
//! rows, (b) in one transaction — then reads exactly that binlog range with
//! `mariadb-binlog --read-from-remote-server --raw` (no decoding, files to a
//! temp dir: the client-bound reference), with `mariadb-binlog` decoding to
//! SQL text on /dev/null, and with our reader (every value decoded, a
//! consumer that visits every change), 3 runs each, alternating, medians,
//! ratios of rows per second. While writing (a) it sets
//! `innodb_flush_log_at_trx_commit = 2` and `sync_binlog = 0` so 250,000
//! commits take seconds, and restores them. Needs the local MariaDB made
//! ready by docker/setup-local-databases.sh.

#[path = "support/proc_cpu.rs"]
mod proc_cpu;

use std::process::Command;
use std::time::{Duration, Instant};

use loyalty_cdc::config::{DatabaseUrl, SourceSettings};
use loyalty_cdc::source::mysql::reader::MysqlSource;
use loyalty_cdc::source::{ConsumerError, Offset, Position, SourceKind, SourceTxn, TxnConsumer};
use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;

const RUNS: usize = 3;

/// Visits every change; stops the reader once it passes `end`.
struct NullConsumer {
    start: Position,
    last: Option<Position>,
    end: (String, u64),
    changes: u64,
    stop: CancellationToken,
}

impl TxnConsumer for NullConsumer {
    async fn durable_position(&mut self) -> Result<Option<Position>, ConsumerError> {
        Ok(Some(self.last.clone().unwrap_or(self.start.clone())))
    }

    async fn apply(&mut self, mut txn: SourceTxn) -> Result<Option<Position>, ConsumerError> {
        let mut seen = 0;
        txn.changes
            .for_each(|change| {
                std::hint::black_box(change);
                seen += 1;
            })
            .map_err(|e| ConsumerError::definite(e.to_string()))?;
        self.changes += seen;
        if let Offset::Binlog(offset) = &txn.position.offset {
            if (offset.file.as_str(), offset.pos) >= (self.end.0.as_str(), self.end.1) {
                self.stop.cancel();
            }
        }
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

async fn binlog_position(conn: &mut mysql_async::Conn) -> (String, u64) {
    conn.query_first("SHOW BINLOG STATUS")
        .await
        .unwrap()
        .map(|(file, pos, _, _): (String, u64, String, String)| (file, pos))
        .unwrap()
}

#[tokio::main]
async fn main() {
    let url = std::env::var("LCDC_BENCH_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let rows: u64 = std::env::var("LCDC_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // e.g. `small` or `one`: only the shapes whose names start so.
    let shapes = std::env::var("LCDC_BENCH_SHAPES").unwrap_or_default();
    let database = format!("lcdc_bench_reader_{}", std::process::id());
    let mut conn = mysql_async::Conn::from_url(&url)
        .await
        .expect("MariaDB; run docker/setup-local-databases.sh");
    conn.query_drop(format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    conn.query_drop(format!("USE {database}")).await.unwrap();
    conn.query_drop(
        "CREATE TABLE bench_line (id BIGINT PRIMARY KEY, order_id BIGINT, product_id INT,
             qty DECIMAL(12,3), price DECIMAL(12,2), name VARCHAR(100), paid TINYINT(1),
             created_at DATETIME(6)) DEFAULT CHARSET = utf8mb4",
    )
    .await
    .unwrap();
    let mut db_url = url::Url::parse(&url).unwrap();
    db_url.set_path(&database);

    for (shape, per_txn) in [
        ("small_transactions_4_rows", 4u64),
        ("one_transaction", rows),
    ] {
        if !shapes.is_empty() && !shapes.split(',').any(|s| shape.starts_with(s)) {
            continue;
        }
        conn.query_drop("TRUNCATE TABLE bench_line").await.unwrap();
        conn.query_drop("FLUSH BINARY LOGS").await.unwrap();
        let start = binlog_position(&mut conn).await;
        let written = Instant::now();
        let insert = "INSERT INTO bench_line SELECT seq, seq DIV 4, seq MOD 5000, 1.5, 19.99, 'Organic whole milk 1 L', 1, '2026-11-25 10:00:00.123456'";
        if per_txn >= rows {
            conn.query_drop(format!("{insert} FROM seq_1_to_{rows}"))
                .await
                .unwrap();
        } else {
            let (flush, sync): (u64, u64) = conn
                .query_first("SELECT @@global.innodb_flush_log_at_trx_commit, @@global.sync_binlog")
                .await
                .unwrap()
                .unwrap();
            conn.query_drop(
                "SET GLOBAL innodb_flush_log_at_trx_commit = 2, GLOBAL sync_binlog = 0",
            )
            .await
            .unwrap();
            for first in (1..=rows).step_by(per_txn as usize) {
                conn.query_drop(format!(
                    "{insert} FROM seq_{first}_to_{}",
                    first + per_txn - 1
                ))
                .await
                .unwrap();
            }
            conn.query_drop(format!(
                "SET GLOBAL innodb_flush_log_at_trx_commit = {flush}, GLOBAL sync_binlog = {sync}"
            ))
            .await
            .unwrap();
        }
        let end = binlog_position(&mut conn).await;
        assert_eq!(
            start.0, end.0,
            "the range stays in one binlog file (raise max_binlog_size)"
        );
        eprintln!(
            "{shape}: wrote {rows} rows in {:.1} s; binlog {}:{}..{}",
            written.elapsed().as_secs_f64(),
            start.0,
            start.1,
            end.1
        );

        let (mut ours, mut raw, mut text) = (Vec::new(), Vec::new(), Vec::new());
        let (mut received, mut ours_cpu) = (Vec::new(), Vec::new());
        for run in 0..RUNS {
            let cpu_before = process_cpu_seconds();
            let seconds = run_ours(db_url.as_str(), &start, &end, rows).await;
            ours_cpu.push((process_cpu_seconds() - cpu_before) / seconds);
            ours.push(rows as f64 / seconds);
            let seconds = run_receive_only(&url, &start, &end).await;
            received.push(rows as f64 / seconds);
            let seconds = run_mariadb_binlog(&start, &end, true);
            raw.push(rows as f64 / seconds);
            let seconds = run_mariadb_binlog(&start, &end, false);
            text.push(rows as f64 / seconds);
            println!(
                r#"{{"bench":"mysql_reader","shape":"{shape}","run":{run},"rows_per_second":{{"loyalty-cdc":{:.0},"receive only":{:.0},"mariadb-binlog --raw":{:.0},"mariadb-binlog":{:.0}}},"loyalty-cdc_cores_busy":{:.2}}}"#,
                ours[run], received[run], raw[run], text[run], ours_cpu[run]
            );
        }
        let (ours, received, raw, text) =
            (median(ours), median(received), median(raw), median(text));
        println!(
            r#"{{"bench":"mysql_reader","shape":"{shape}","summary":true,"rows":{rows},"median_rows_per_second":{{"loyalty-cdc":{ours:.0},"receive only":{received:.0},"mariadb-binlog --raw":{raw:.0},"mariadb-binlog":{text:.0}}},"loyalty-cdc_cores_busy":{:.2},"ratio_vs_raw":{:.2},"ratio_vs_decoding":{:.2},"ratio_vs_receive_only":{:.2}}}"#,
            median(ours_cpu),
            ours / raw,
            ours / text,
            ours / received
        );
    }
    conn.query_drop(format!("DROP DATABASE {database}"))
        .await
        .unwrap();
}

async fn run_ours(db_url: &str, start: &(String, u64), end: &(String, u64), rows: u64) -> f64 {
    let settings = SourceSettings {
        name: "bench".into(),
        kind: SourceKind::Mysql,
        url: DatabaseUrl::try_from(db_url.to_string()).unwrap(),
        password: None,
        mapping: None,
        slot: None,
        publication: None,
        server_id: Some(u64::from(3_600_000_000 + std::process::id() % 100_000)),
        snapshot: false,
        heartbeat_seconds: None,
        compiled_mapping: None,
    };
    let source = MysqlSource::new(&settings, &["bench_line"]);
    let stop = CancellationToken::new();
    let mut consumer = NullConsumer {
        start: format!("{}:{}", start.0, start.1).parse().unwrap(),
        last: None,
        end: end.clone(),
        changes: 0,
        stop: stop.clone(),
    };
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(1800), source.run(&mut consumer, &stop))
        .await
        .expect("drained within 30 minutes")
        .expect("reader ran");
    let seconds = started.elapsed().as_secs_f64();
    assert_eq!(consumer.changes, rows, "our reader saw every row");
    seconds
}

/// The ceiling for any reader built on mysql_async: the same binlog range
/// received and framed into events (checksums checked), nothing decoded.
async fn run_receive_only(url: &str, start: &(String, u64), end: &(String, u64)) -> f64 {
    use futures_util::StreamExt;
    let conn = mysql_async::Conn::from_url(url).await.unwrap();
    let request =
        mysql_async::BinlogStreamRequest::new(3_500_000_000 + std::process::id() % 100_000)
            .with_filename(start.0.as_bytes())
            .with_pos(start.1);
    let started = Instant::now();
    let mut stream = conn.get_binlog_stream(request).await.unwrap();
    let mut events = 0u64;
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        events += 1;
        if u64::from(event.header().log_pos()) >= end.1 {
            break;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    std::hint::black_box(events);
    let _ = stream.close().await;
    seconds
}

/// CPU seconds this process has used (user + system), from /proc.
fn process_cpu_seconds() -> f64 {
    proc_cpu::seconds("self").expect("/proc/self/stat holds this process's CPU times")
}

fn run_mariadb_binlog(start: &(String, u64), end: &(String, u64), raw: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new("mariadb-binlog");
    command
        .args([
            "--read-from-remote-server",
            "--host=127.0.0.1",
            "--port=3306",
            "--user=root",
        ])
        .arg(format!("--start-position={}", start.1))
        .arg(format!("--stop-position={}", end.1));
    if raw {
        command
            .arg("--raw")
            .arg(format!("--result-file={}/", dir.path().display()));
    } else {
        command.stdout(std::process::Stdio::null());
    }
    command.arg(&start.0);
    let started = Instant::now();
    let status = command
        .status()
        .expect("mariadb-binlog (mariadb-client) on PATH");
    assert!(status.success(), "mariadb-binlog failed");
    started.elapsed().as_secs_f64()
}
