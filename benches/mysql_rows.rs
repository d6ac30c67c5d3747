//! Our row-image decoder against mysql_common's, on the same binlog events
//! held in memory (no network): how fast each turns row events into
//! values, one core.
//!
//!     cargo bench --bench mysql_rows            # 500,000 rows
//!     LCDC_BENCH_ROWS=100000 cargo bench --bench mysql_rows
//!
//! Writes the rows into an 8-column MariaDB table (in transactions of 1,000
//! rows), reads that stretch of the binlog once as a replica, then decodes
//! every rows event with each decoder, 3 runs each, alternating, and prints
//! JSON lines and the ratio of medians (ours / mysql_common; above 1 is
//! faster). Needs the local MariaDB made ready by
//! docker/setup-local-databases.sh.

use std::collections::HashMap;
use std::time::Instant;

use futures_util::StreamExt;
use loyalty_cdc::source::mysql::rows::{RowsKind, TableLayout};
use mysql_async::binlog::events::{Event, EventData, TableMapEvent};
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;

const RUNS: usize = 3;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let url = std::env::var("LCDC_BENCH_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into());
    let rows: u64 = std::env::var("LCDC_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
    let database = format!("lcdc_bench_rows_{}", std::process::id());
    let mut conn = mysql_async::Conn::from_url(&url)
        .await
        .expect("MariaDB; run docker/setup-local-databases.sh");
    conn.query_drop(format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    // MariaDB's seq_1_to_N tables live in the current database.
    conn.query_drop(format!("USE {database}")).await.unwrap();
    conn.query_drop(format!(
        "CREATE TABLE {database}.bench_line (id BIGINT PRIMARY KEY, order_id BIGINT, product_id INT,
             qty DECIMAL(12,3), price DECIMAL(12,2), name VARCHAR(100), paid TINYINT(1),
             created_at DATETIME(6)) DEFAULT CHARSET = utf8mb4"
    ))
    .await
    .unwrap();
    let (file, position): (String, u64) = conn
        .query_first("SHOW BINLOG STATUS")
        .await
        .unwrap()
        .map(|(file, position, _, _): (String, u64, String, String)| (file, position))
        .unwrap();
    let batch = 1_000u64;
    for start in (0..rows).step_by(batch as usize) {
        conn.query_drop(format!(
            "INSERT INTO {database}.bench_line SELECT seq, seq DIV 4, seq MOD 5000, 1.5, 19.99,
                 'Organic whole milk 1 L', 1, '2026-11-25 10:00:00.123456'
               FROM seq_{}_to_{}",
            start + 1,
            (start + batch).min(rows)
        ))
        .await
        .unwrap();
    }

    // The binlog stretch, read once into memory.
    let mut reader = mysql_async::Conn::from_url(&url).await.unwrap();
    reader
        .query_drop("SET @mariadb_slave_capability = 4")
        .await
        .unwrap();
    let mut stream = reader
        .get_binlog_stream(
            BinlogStreamRequest::new(3_200_000_000 + std::process::id() % 1_000_000)
                .with_filename(file.as_bytes())
                .with_pos(position)
                .with_non_blocking(),
        )
        .await
        .unwrap();
    let mut events: Vec<Event> = Vec::new();
    while let Some(event) = stream.next().await {
        events.push(event.unwrap());
    }
    eprintln!(
        "mysql_rows: {rows} rows, {} binlog events in memory",
        events.len()
    );

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..RUNS {
        let started = Instant::now();
        let decoded = decode_ours(&events);
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(decoded, rows, "our decoder saw every row");
        ours.push(rows as f64 / seconds);
        println!(
            r#"{{"bench":"mysql_rows","decoder":"loyalty-cdc","run":{run},"rows":{rows},"seconds":{seconds:.3},"rows_per_second":{:.0}}}"#,
            rows as f64 / seconds
        );

        let started = Instant::now();
        let decoded = decode_mysql_common(&events);
        let seconds = started.elapsed().as_secs_f64();
        assert_eq!(decoded, rows, "mysql_common saw every row");
        theirs.push(rows as f64 / seconds);
        println!(
            r#"{{"bench":"mysql_rows","decoder":"mysql_common","run":{run},"rows":{rows},"seconds":{seconds:.3},"rows_per_second":{:.0}}}"#,
            rows as f64 / seconds
        );
    }
    let (ours, theirs) = (median(ours), median(theirs));
    println!(
        r#"{{"bench":"mysql_rows","summary":true,"rows":{rows},"median_rows_per_second":{{"loyalty-cdc":{ours:.0},"mysql_common":{theirs:.0}}},"ratio":{:.2}}}"#,
        ours / theirs
    );
    conn.query_drop(format!("DROP DATABASE {database}"))
        .await
        .unwrap();
}

fn decode_ours(events: &[Event]) -> u64 {
    let mut layouts: HashMap<u64, TableLayout> = HashMap::new();
    let mut count = 0u64;
    for event in events {
        match event.read_data() {
            Ok(Some(EventData::TableMapEvent(tme))) => {
                layouts
                    .entry(tme.table_id())
                    .or_insert_with(|| TableLayout::from_table_map(&tme, event.data()).unwrap());
            }
            Ok(Some(EventData::RowsEvent(data))) => {
                let Some(layout) = layouts.get(&data.table_id()) else {
                    continue;
                };
                let after: Option<Vec<bool>> = data
                    .columns_after_image()
                    .map(|b| b.iter().map(|x| *x).collect());
                layout
                    .decode_rows(
                        RowsKind::Write,
                        None,
                        after.as_deref(),
                        data.rows_data(),
                        |_, after| {
                            std::hint::black_box(after);
                            count += 1;
                        },
                    )
                    .unwrap();
            }
            _ => {}
        }
    }
    count
}

fn decode_mysql_common(events: &[Event]) -> u64 {
    let mut maps: HashMap<u64, TableMapEvent<'static>> = HashMap::new();
    let mut count = 0u64;
    for event in events {
        match event.read_data() {
            Ok(Some(EventData::TableMapEvent(tme))) => {
                maps.entry(tme.table_id())
                    .or_insert_with(|| tme.into_owned());
            }
            Ok(Some(EventData::RowsEvent(data))) => {
                let Some(tme) = maps.get(&data.table_id()) else {
                    continue;
                };
                for row in data.rows(tme) {
                    let (_, after) = row.unwrap();
                    let after = after.expect("a write has an after image");
                    // Touch every value, as our decoder does.
                    for index in 0..after.len() {
                        std::hint::black_box(after.as_ref(index));
                    }
                    count += 1;
                }
            }
            _ => {}
        }
    }
    count
}
