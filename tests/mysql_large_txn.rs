//! One MariaDB transaction of 1,000,000 rows passes through the binlog
//! reader within a fixed memory bound: past the in-memory budget its
//! changes are spilled to disk and read back in order. Peak heap is
//! measured with a counting allocator, in a test binary of its own.

#[path = "it/support/mod.rs"]
mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use loyalty_cdc::config::{DatabaseUrl, SourceSettings};
use loyalty_cdc::source::mysql::reader::MysqlSource;
use loyalty_cdc::source::{
    ConsumerError, Phase, Position, SourceKind, SourceTxn, TxnConsumer, TxnKind, Value,
};
use mysql_async::prelude::Queryable;
use support::MyDatabase;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: support::heap::Counting = support::heap::Counting;

const ROWS: i64 = 1_000_000;
const BUDGET: usize = 8 * 1024 * 1024;
/// The budget, one binlog event (≈ 8 KiB of rows), the spill writer's
/// buffer and one change read back at a time, with room to spare. Held
/// whole, the transaction would take well over 300 MiB.
const BOUND: usize = 48 * 1024 * 1024;

struct Checker {
    durable: Option<Position>,
    /// Set when the reader's starting position came in, and when the big
    /// transaction was read through.
    started: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    big_txn_rows: usize,
    id_sum: i64,
    spilled: bool,
}

impl TxnConsumer for Checker {
    async fn durable_position(&mut self) -> Result<Option<Position>, ConsumerError> {
        Ok(self.durable.clone())
    }

    async fn apply(&mut self, mut txn: SourceTxn) -> Result<Option<Position>, ConsumerError> {
        if let TxnKind::Stream { .. } = txn.kind {
            self.spilled = txn.changes.is_spilled();
            self.big_txn_rows = txn.changes.len();
            let mut sum = 0i64;
            txn.changes
                .for_each(|change| {
                    if let Some(Value::Int(id)) = change.after_value("id") {
                        sum += id;
                    }
                })
                .map_err(|e| ConsumerError::definite(e.to_string()))?;
            self.id_sum = sum;
            self.done.store(true, Ordering::SeqCst);
        }
        if txn.position.phase == Phase::Stream {
            self.started.store(true, Ordering::SeqCst);
        }
        self.durable = Some(txn.position);
        Ok(self.durable.clone())
    }

    async fn flush(&mut self) -> Result<Option<Position>, ConsumerError> {
        Ok(self.durable.clone())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_million_row_transaction_stays_under_a_fixed_memory_bound() {
    let shop = MyDatabase::create("bigtxn").await;
    let mut conn = shop.conn().await;
    conn.query_drop(
        "CREATE TABLE sales_order_item (id BIGINT PRIMARY KEY, order_id BIGINT, product_id INT,
             qty DECIMAL(12,3), price DECIMAL(12,2), discount DECIMAL(5,2), name VARCHAR(100),
             created_at DATETIME)",
    )
    .await
    .unwrap();
    let settings = SourceSettings {
        name: "shop".into(),
        kind: SourceKind::Mysql,
        url: DatabaseUrl::try_from(shop.url()).unwrap(),
        password: None,
        mapping: None,
        slot: None,
        publication: None,
        server_id: Some(u64::from(3_500_000_000 + std::process::id() % 100_000)),
        snapshot: false,
        heartbeat_seconds: None,
        compiled_mapping: None,
    };
    let source = MysqlSource::new(&settings, &["sales_order_item"]).with_txn_memory_budget(BUDGET);
    let shutdown = CancellationToken::new();
    let (started, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let mut checker = Checker {
        durable: None,
        started: Arc::clone(&started),
        done: Arc::clone(&done),
        big_txn_rows: 0,
        id_sum: 0,
        spilled: false,
    };
    let run = source.run(&mut checker, &shutdown);
    let drive = async {
        while !started.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let baseline = support::heap::start_measuring();
        conn.query_drop(format!(
            "INSERT INTO sales_order_item SELECT seq, seq DIV 4, seq MOD 5000, 1.5, 19.99, 0,
                 'Organic whole milk 1 L', '2026-11-25 10:00:00' FROM seq_1_to_{ROWS}"
        ))
        .await
        .unwrap();
        while !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let peak = support::heap::peak_above(baseline);
        shutdown.cancel();
        peak
    };
    let (outcome, peak) = tokio::join!(run, drive);
    outcome.unwrap();
    assert_eq!(checker.big_txn_rows, ROWS as usize);
    assert_eq!(
        checker.id_sum,
        ROWS * (ROWS + 1) / 2,
        "every row once, none altered"
    );
    assert!(checker.spilled, "a transaction past the budget is spilled");
    println!(
        "peak heap above baseline: {:.1} MiB (bound {} MiB)",
        peak as f64 / 1048576.0,
        BOUND / 1048576
    );
    assert!(
        peak < BOUND,
        "peak heap {peak} bytes exceeds the bound {BOUND}"
    );
}
