//! The MySQL/MariaDB binlog reader against the real MariaDB, on the real
//! Magento 2 layout. A durable sink (`support::sink`) records what the
//! reader hands over.

use std::time::Duration;

use loyalty_cdc::config::{DatabaseUrl, SourceSettings};
use loyalty_cdc::source::mysql::reader::{MysqlSource, MysqlSourceError};
use loyalty_cdc::source::{Offset, Position, SourceKind};
use mysql_async::prelude::Queryable;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::reader::{captured, count, wait_count, wait_for};
use crate::support::sink::PgSink;
use crate::support::{MyDatabase, PgDatabase};

fn settings(db: &MyDatabase) -> SourceSettings {
    SourceSettings {
        name: "shop".into(),
        kind: SourceKind::Mysql,
        url: DatabaseUrl::try_from(db.url()).unwrap(),
        password: None,
        mapping: None,
        slot: None,
        publication: None,
        // Unique per test process and test: two readers with one id kick
        // each other off.
        server_id: Some(u64::from(
            3_300_000_000 + std::process::id() % 100_000 * 10 + rand_suffix(),
        )),
        snapshot: true,
        heartbeat_seconds: None,
        compiled_mapping: None,
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed) % 10
}

struct Running {
    shutdown: CancellationToken,
    progress: loyalty_cdc::source::progress::SourceProgress,
    handle: JoinHandle<(Result<(), MysqlSourceError>, PgSink)>,
}

async fn start(source: MysqlSource, sink_db: &PgDatabase) -> Running {
    let mut sink = PgSink::new(sink_db, "shop", 1).await;
    sink.kind = SourceKind::Mysql;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let progress = source.progress();
    let handle = tokio::spawn(async move {
        let outcome = source.run(&mut sink, &token).await;
        (outcome, sink)
    });
    // Started once its starting position is durable.
    wait_for("the reader to start", || async {
        loyalty_cdc::ledger::positions::load(&sink_db.client().await, "shop")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    Running {
        shutdown,
        progress,
        handle,
    }
}

impl Running {
    async fn stop(self) -> Result<(), MysqlSourceError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("reader stops within 30 s")
            .expect("reader task")
            .0
    }
}

const ORDER: &str = "INSERT INTO sales_order (entity_id, state, status, customer_email, grand_total, base_grand_total, order_currency_code)
                     VALUES (?, 'new', 'pending', 'ann@example.com', 42.50, 42.50, 'EUR')";
const ITEM: &str = "INSERT INTO sales_order_item (order_id, sku, qty_ordered, price, row_total) VALUES (?, ?, 1, 14.1667, 14.17)";

async fn place_order(conn: &mut mysql_async::Conn, order: u32) {
    let mut txn = conn
        .start_transaction(mysql_async::TxOpts::default())
        .await
        .unwrap();
    txn.exec_drop(ORDER, (order,)).await.unwrap();
    for sku in ["MILK-1L", "BREAD-500", "EGGS-12"] {
        txn.exec_drop(ITEM, (order, sku)).await.unwrap();
    }
    txn.commit().await.unwrap();
}

#[tokio::test]
async fn a_magento_order_with_three_items_arrives_as_one_transaction() {
    let shop = MyDatabase::create("magento").await;
    shop.load_schema("magento2.mysql.sql").await;
    let sink_db = PgDatabase::create("sink").await;
    let source = MysqlSource::new(&settings(&shop), &["sales_order", "sales_order_item"]);
    let running = start(source, &sink_db).await;
    let mut conn = shop.conn().await;
    place_order(&mut conn, 1001).await;
    conn.exec_drop(
        "UPDATE sales_order SET state = 'complete' WHERE entity_id = ?",
        (1001,),
    )
    .await
    .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 5).await;
    // Progress and lag figures, for status and metrics.
    let progress = running.progress.snapshot();
    assert_eq!(
        progress.state,
        loyalty_cdc::source::progress::ReaderState::Streaming
    );
    assert_eq!(
        (progress.transactions_applied, progress.changes_applied),
        (2, 5)
    );
    let Some(Position {
        offset: Offset::Binlog(applied),
        ..
    }) = progress.applied.clone()
    else {
        panic!("no binlog position applied: {progress:?}");
    };
    let lag = loyalty_cdc::source::mysql::reader::lag_bytes(&mut shop.conn().await, &applied)
        .await
        .unwrap()
        .expect("the applied file is listed");
    assert!(lag < 1 << 30, "bytes behind: {lag}");

    // Writes to a table the source does not watch: nothing is applied, but
    // the reader is caught up past them (lag is measured from there).
    conn.query_drop(
        "INSERT INTO store_website (website_id, code, name) VALUES (9, 'other', 'Other')",
    )
    .await
    .unwrap();
    wait_for("the reader to pass the unwatched write", || async {
        let progress = running.progress.snapshot();
        matches!(
            (&progress.read_to, &progress.applied),
            (Some(read), Some(applied)) if read > applied
        )
    })
    .await;
    assert_eq!(
        running.progress.snapshot().transactions_applied,
        2,
        "nothing applied for it"
    );
    running.stop().await.unwrap();

    let rows = captured(&sink_db, "AND kind = 'stream'").await;
    let ops: Vec<(&str, &str)> = rows.iter().map(|r| (r.1.as_str(), r.0.as_str())).collect();
    assert_eq!(
        ops,
        [
            ("insert", "stream"),
            ("insert", "stream"),
            ("insert", "stream"),
            ("insert", "stream"),
            ("update", "stream")
        ]
    );
    let positions: Vec<String> = sink_db
        .client()
        .await
        .query(
            "SELECT position FROM captured WHERE kind = 'stream' ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        positions[0], positions[3],
        "order and items share one transaction"
    );
    assert_ne!(
        positions[3], positions[4],
        "the update is the next transaction"
    );
    let order = rows[0].4.as_ref().unwrap();
    assert_eq!(
        order["grand_total"],
        serde_json::json!({"Numeric": "42.5000"})
    );
    assert_eq!(
        order["customer_email"],
        serde_json::json!({"Text": "ann@example.com"})
    );
    let skus: Vec<&str> = rows[1..4]
        .iter()
        .map(|r| r.4.as_ref().unwrap()["sku"]["Text"].as_str().unwrap())
        .collect();
    assert_eq!(skus, ["MILK-1L", "BREAD-500", "EGGS-12"]);
    // binlog_row_image = FULL: the update carries the whole old row.
    let (before, after) = (rows[4].3.as_ref().unwrap(), rows[4].4.as_ref().unwrap());
    assert_eq!(
        (before["state"].clone(), after["state"].clone()),
        (
            serde_json::json!({"Text": "new"}),
            serde_json::json!({"Text": "complete"})
        )
    );
    let stored: Position = positions[4].parse().unwrap();
    match stored.offset {
        Offset::Binlog(offset) => assert!(
            offset.gtids.is_some(),
            "MariaDB positions carry the GTID state"
        ),
        other => panic!("not a binlog position: {other:?}"),
    }
}

#[tokio::test]
async fn a_restart_resumes_from_the_stored_gtid_state_with_exactly_the_new_changes() {
    let shop = MyDatabase::create("resume").await;
    shop.load_schema("magento2.mysql.sql").await;
    let sink_db = PgDatabase::create("sink").await;
    let settings = settings(&shop);
    let tables = ["sales_order", "sales_order_item"];
    let running = start(MysqlSource::new(&settings, &tables), &sink_db).await;
    let mut conn = shop.conn().await;
    place_order(&mut conn, 1).await;
    wait_count(&sink_db, "AND kind = 'stream'", 4).await;
    running.stop().await.unwrap();

    // Written while the reader is away, plus changes to a table it does not
    // capture and a DDL on one it does.
    place_order(&mut conn, 2).await;
    conn.query_drop("UPDATE store SET name = 'Main' WHERE store_id = 1")
        .await
        .unwrap();
    conn.query_drop("ALTER TABLE sales_order ADD COLUMN loyalty_card VARCHAR(32) NULL")
        .await
        .unwrap();
    conn.exec_drop(
        "UPDATE sales_order SET loyalty_card = 'CARD-7' WHERE entity_id = ?",
        (2,),
    )
    .await
    .unwrap();

    let running = start(MysqlSource::new(&settings, &tables), &sink_db).await;
    wait_count(&sink_db, "AND kind = 'stream'", 9).await;
    place_order(&mut conn, 3).await;
    wait_count(&sink_db, "AND kind = 'stream'", 13).await;
    running.stop().await.unwrap();
    assert_eq!(
        count(
            &sink_db,
            "AND kind = 'stream' AND tbl = 'sales_order' AND op = 'insert'"
        )
        .await,
        3,
        "each order once"
    );
    let after_ddl = captured(
        &sink_db,
        "AND kind = 'stream' AND tbl = 'sales_order' AND op = 'update'",
    )
    .await;
    assert_eq!(after_ddl.len(), 1);
    assert_eq!(
        after_ddl[0].4.as_ref().unwrap()["loyalty_card"],
        serde_json::json!({"Text": "CARD-7"}),
        "rows after the DDL decode with the new layout"
    );
}

#[tokio::test]
async fn a_restart_resumes_by_file_and_position_without_gtids() {
    let shop = MyDatabase::create("filepos").await;
    shop.load_schema("magento2.mysql.sql").await;
    let sink_db = PgDatabase::create("sink").await;
    let settings = settings(&shop);
    let tables = ["sales_order", "sales_order_item"];
    let running = start(MysqlSource::new(&settings, &tables), &sink_db).await;
    let mut conn = shop.conn().await;
    place_order(&mut conn, 1).await;
    wait_count(&sink_db, "AND kind = 'stream'", 4).await;
    running.stop().await.unwrap();
    // As a MySQL server without GTIDs would leave it: file:pos only.
    let sink = sink_db.client().await;
    let stored: String = sink
        .query_one(
            "SELECT position FROM source_positions WHERE source = 'shop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let without_gtids = stored.split(';').next().unwrap().to_string();
    sink.execute(
        "UPDATE source_positions SET position = $1 WHERE source = 'shop'",
        &[&without_gtids],
    )
    .await
    .unwrap();

    place_order(&mut conn, 2).await;
    let running = start(MysqlSource::new(&settings, &tables), &sink_db).await;
    wait_count(&sink_db, "AND kind = 'stream'", 8).await;
    running.stop().await.unwrap();
    assert_eq!(
        count(
            &sink_db,
            "AND kind = 'stream' AND tbl = 'sales_order' AND op = 'insert'"
        )
        .await,
        2,
        "each order once"
    );
}

#[tokio::test]
async fn a_snapshot_with_concurrent_writes_yields_every_row_exactly_once() {
    let shop = MyDatabase::create("snap").await;
    let sink_db = PgDatabase::create("sink").await;
    let mut conn = shop.conn().await;
    conn.query_drop("CREATE TABLE t (id INT PRIMARY KEY, state VARCHAR(20) NOT NULL)")
        .await
        .unwrap();
    conn.query_drop("INSERT INTO t SELECT seq, 'paid' FROM seq_1_to_30000")
        .await
        .unwrap();
    let settings = settings(&shop);
    let source = MysqlSource::new(&settings, &["t"]);
    let mut sink = PgSink::new(&sink_db, "shop", 1).await;
    sink.kind = SourceKind::Mysql;
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let handle = tokio::spawn(async move { (source.run(&mut sink, &token).await, sink) });
    // Write before, during and after the copy, until the reader streams.
    let sink_client = sink_db.client().await;
    let mut i = 0;
    loop {
        let streaming = loyalty_cdc::ledger::positions::load(&sink_client, "shop")
            .await
            .unwrap()
            .is_some_and(|p| p.phase == loyalty_cdc::source::Phase::Stream);
        if streaming && i >= 200 {
            break;
        }
        conn.query_drop(format!(
            "BEGIN; INSERT INTO t VALUES ({}, 'draft'); UPDATE t SET state = 'done' WHERE id = {}; DELETE FROM t WHERE id = {}; COMMIT;",
            30_001 + i,
            i + 1,
            15_000 + i
        ))
        .await
        .unwrap();
        i += 1;
        assert!(i < 100_000, "the reader never finished its snapshot");
    }
    conn.query_drop("INSERT INTO t VALUES (0, 'marker')")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream' AND id = '0'", 1).await;
    shutdown.cancel();
    let (outcome, _) = handle.await.unwrap();
    outcome.unwrap();

    sink_client
        .batch_execute(
            "CREATE TABLE mirror (id int PRIMARY KEY, state text);
             DO $$ DECLARE r record; BEGIN
               FOR r IN SELECT * FROM captured WHERE op <> 'none' ORDER BY seq LOOP
                 IF r.op = 'delete' THEN DELETE FROM mirror WHERE id = r.id::int;
                 ELSE INSERT INTO mirror VALUES (r.id::int, r.after->'state'->>'Text')
                      ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state; END IF;
               END LOOP; END $$;",
        )
        .await
        .unwrap();
    let mirror: Vec<(i32, String)> = sink_client
        .query("SELECT id, state FROM mirror ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let truth: Vec<(i32, String)> = conn
        .query("SELECT id, state FROM t ORDER BY id")
        .await
        .unwrap();
    assert_eq!(mirror.len(), truth.len());
    assert!(mirror == truth, "mirror differs from the source table");
    let doubled: i64 = sink_client
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM captured WHERE op = 'insert' GROUP BY id HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(doubled, 0, "no row both copied and streamed as inserted");
    assert!(count(&sink_db, "AND kind = 'snapshot'").await >= 30_000 - 200);
}
