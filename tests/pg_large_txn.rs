//! One source transaction of 1,000,000 rows passes through the reader
//! within a fixed memory bound: past the in-memory budget its changes are
//! spilled to disk and read back in order. Peak heap is measured exactly
//! with a counting allocator, in a test binary of its own so nothing else
//! allocates meanwhile.

#[path = "it/support/mod.rs"]
mod support;

use loyalty_cdc::source::postgres::PostgresSource;
use loyalty_cdc::source::{ConsumerError, Position, SourceTxn, TxnConsumer, TxnKind, Value};
use support::reader::{options, source_settings};
use support::PgDatabase;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: support::heap::Counting = support::heap::Counting;

const ROWS: i64 = 1_000_000;
/// The reader's in-memory budget for one transaction in this test.
const BUDGET: usize = 8 * 1024 * 1024;
/// What the whole process may add on top of its baseline while the
/// transaction passes: the budget, the transport's event buffer, the spill
/// writer's buffer, and the consumer reading back one change at a time.
/// Held whole, the transaction would take well over 300 MiB.
const BOUND: usize = 48 * 1024 * 1024;

/// Counts and checks the big transaction, reading it change by change.
struct Checker {
    durable: Option<Position>,
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
    let src = PgDatabase::create("bigtxn").await;
    src.client()
        .await
        .batch_execute(
            "CREATE TABLE pos_order_line (id bigint PRIMARY KEY, order_id int, product_id int,
                 qty numeric(12,3), price_unit numeric(12,2), discount numeric(5,2),
                 full_product_name text, create_date timestamp)",
        )
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let mut opts = options(&["pos_order_line"]);
    opts.txn_memory_budget = BUDGET;
    let source = PostgresSource::new(&settings, opts);
    let progress = source.progress();
    let shutdown = CancellationToken::new();
    let mut checker = Checker {
        durable: None,
        big_txn_rows: 0,
        id_sum: 0,
        spilled: false,
    };
    let writer = src.client().await;
    let run = source.run(&mut checker, &shutdown);
    let drive = async {
        while !matches!(
            progress.snapshot().state,
            loyalty_cdc::source::postgres::ReaderState::Streaming
        ) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let baseline = support::heap::start_measuring();
        writer
            .batch_execute(&format!(
                "INSERT INTO pos_order_line SELECT g, g / 4, g % 5000, 1.5, 19.99, 0, 'Organic whole milk 1 L', '2026-11-25 10:00'
                   FROM generate_series(1, {ROWS}) g"
            ))
            .await
            .unwrap();
        while progress.snapshot().transactions_applied == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
