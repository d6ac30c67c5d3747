//! The PostgreSQL reader against the real server, one scenario each. A
//! durable sink (`support::sink`) records what the reader hands over.

use std::time::Duration;

use loyalty_cdc::source::postgres::{PgSourceError, PostgresSource, ReaderState};
use loyalty_cdc::source::Position;

use crate::support::reader::{captured, count, options, source_settings, start, wait_count};
use crate::support::sink::PgSink;
use crate::support::{pg_admin_url, pg_connect, PgDatabase};

async fn confirmed_flush(slot: &str) -> Option<String> {
    pg_connect(&pg_admin_url())
        .await
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
}

#[tokio::test]
async fn every_supported_type_arrives_typed_through_insert_update_and_delete() {
    let src = PgDatabase::create("types").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute(
            "CREATE TYPE mood AS ENUM ('happy', 'sad');
             CREATE TABLE every_type (id int PRIMARY KEY, i2 int2, i8 int8, n numeric(12,2), t text,
                 v varchar(20), b bool, ts timestamp, tstz timestamptz, d date, j jsonb, u uuid,
                 e mood, f8 float8, by bytea, nothing text)",
        )
        .await
        .unwrap();
    let source = PostgresSource::new(&source_settings(&src, "pos"), options(&["every_type"]));
    let running = start(source, PgSink::new(&sink_db, "pos", 1).await);
    running.streaming().await;
    src.client()
        .await
        .batch_execute(
            "INSERT INTO every_type VALUES (1, -32768, 9223372036854775807, 1234.50, 'café', 'v', true,
                 '2026-11-25 10:00:00.25', '2026-11-25 10:00:00+05:30', '2026-02-28', '{\"k\": [1, 2]}',
                 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'sad', 0.1, '\\x00ff', NULL);
             UPDATE every_type SET n = -0.01, t = 'tab\there' WHERE id = 1;
             DELETE FROM every_type WHERE id = 1;",
        )
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 3).await;
    let rows = captured(&sink_db, "AND kind = 'stream'").await;
    let ops: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(ops, ["insert", "update", "delete"]);
    let inserted = rows[0].4.as_ref().unwrap();
    let expected = serde_json::json!({
        "id": {"Int": 1}, "i2": {"Int": -32768}, "i8": {"Int": 9223372036854775807i64},
        "n": {"Numeric": "1234.50"}, "t": {"Text": "café"}, "v": {"Text": "v"}, "b": {"Bool": true},
        "ts": {"Timestamp": "2026-11-25T10:00:00.250"}, "tstz": {"TimestampTz": "2026-11-25T04:30:00Z"},
        "d": {"Date": "2026-02-28"}, "j": {"Json": "{\"k\":[1,2]}"},
        "u": {"Uuid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}, "e": {"Text": "sad"},
        "f8": {"Float": 0.1}, "by": {"Bytes": [0, 255]}, "nothing": "Null"
    });
    assert_eq!(inserted, &expected);
    let updated = rows[1].4.as_ref().unwrap();
    assert_eq!(updated["n"], serde_json::json!({"Numeric": "-0.01"}));
    assert_eq!(updated["t"], serde_json::json!({"Text": "tab\there"}));
    // Default replica identity: the delete carries the key, the rest absent.
    let deleted = rows[2].3.as_ref().unwrap();
    assert_eq!(deleted["id"], serde_json::json!({"Int": 1}));
    assert_eq!(deleted["t"], serde_json::json!("Absent"));
    let (outcome, _) = running.stop().await;
    outcome.unwrap();
}

#[tokio::test]
async fn a_multi_row_transaction_arrives_whole_and_in_order() {
    let src = PgDatabase::create("multi").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE pos_order (id int PRIMARY KEY, amount numeric); CREATE TABLE pos_order_line (id int PRIMARY KEY, order_id int, qty int)")
        .await
        .unwrap();
    let source = PostgresSource::new(
        &source_settings(&src, "pos"),
        options(&["pos_order", "pos_order_line"]),
    );
    let running = start(source, PgSink::new(&sink_db, "pos", 1).await);
    running.streaming().await;
    src.client()
        .await
        .batch_execute(
            "BEGIN; INSERT INTO pos_order VALUES (1, 30);
             INSERT INTO pos_order_line SELECT g, 1, g FROM generate_series(1, 50) g;
             UPDATE pos_order SET amount = 31 WHERE id = 1; COMMIT;
             INSERT INTO pos_order VALUES (2, 5);",
        )
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 53).await;
    let positions: Vec<(String, i64)> = sink_db
        .client()
        .await
        .query("SELECT position, count(*) FROM captured WHERE kind = 'stream' GROUP BY position ORDER BY min(seq)", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(positions.len(), 2, "two source transactions: {positions:?}");
    assert_eq!(positions[0].1, 52, "the first transaction is one unit");
    let rows = captured(&sink_db, "AND kind = 'stream'").await;
    assert_eq!(
        (rows[0].1.as_str(), rows[0].2.as_deref()),
        ("insert", Some("1"))
    );
    assert_eq!(rows[51].1, "update");
    let first: loyalty_cdc::source::Lsn = positions[0].0.parse().unwrap();
    let second: loyalty_cdc::source::Lsn = positions[1].0.parse().unwrap();
    assert!(first < second, "positions increase in commit order");
    running.stop().await.0.unwrap();
}

#[tokio::test]
async fn unchanged_toast_stays_unchanged_and_full_identity_gives_before_images() {
    let src = PgDatabase::create("toast").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute(
            "CREATE TABLE res_partner (id int PRIMARY KEY, name text, notes text);
             ALTER TABLE res_partner ALTER COLUMN notes SET STORAGE EXTERNAL;
             CREATE TABLE pos_order (id int PRIMARY KEY, state text);
             ALTER TABLE pos_order REPLICA IDENTITY FULL;
             INSERT INTO res_partner VALUES (1, 'Ann', repeat('x', 100000));
             INSERT INTO pos_order VALUES (7, 'draft');",
        )
        .await
        .unwrap();
    let mut opts = options(&["res_partner", "pos_order"]);
    opts.tables[1] = opts.tables[1].clone().with_before_image();
    let source = PostgresSource::new(&source_settings(&src, "pos"), opts);
    let running = start(source, PgSink::new(&sink_db, "pos", 1).await);
    running.streaming().await;
    src.client()
        .await
        .batch_execute("UPDATE res_partner SET name = 'Anna' WHERE id = 1; UPDATE pos_order SET state = 'paid' WHERE id = 7;")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 2).await;
    let rows = captured(&sink_db, "AND kind = 'stream'").await;
    let partner = rows[0].4.as_ref().unwrap();
    assert_eq!(partner["name"], serde_json::json!({"Text": "Anna"}));
    assert_eq!(
        partner["notes"],
        serde_json::json!("UnchangedToast"),
        "never NULL"
    );
    let order_before = rows[1].3.as_ref().expect("FULL identity sends the old row");
    assert_eq!(order_before["state"], serde_json::json!({"Text": "draft"}));
    assert_eq!(
        rows[1].4.as_ref().unwrap()["state"],
        serde_json::json!({"Text": "paid"})
    );
    // The snapshot copied the full TOASTed value.
    let snap = captured(&sink_db, "AND kind = 'snapshot' AND tbl = 'res_partner'").await;
    assert_eq!(
        snap[0].4.as_ref().unwrap()["notes"]["Text"]
            .as_str()
            .unwrap()
            .len(),
        100_000
    );
    running.stop().await.0.unwrap();
}

#[tokio::test]
async fn truncate_and_a_column_added_mid_stream_arrive_as_such() {
    let src = PgDatabase::create("ddl").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, a text)")
        .await
        .unwrap();
    let source = PostgresSource::new(&source_settings(&src, "pos"), options(&["t"]));
    let running = start(source, PgSink::new(&sink_db, "pos", 1).await);
    running.streaming().await;
    src.client()
        .await
        .batch_execute(
            "INSERT INTO t VALUES (1, 'one');
             ALTER TABLE t ADD COLUMN loyalty_card text;
             INSERT INTO t VALUES (2, 'two', 'CARD-2');
             TRUNCATE t;",
        )
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 3).await;
    let rows = captured(&sink_db, "AND kind = 'stream'").await;
    assert_eq!(rows[0].4.as_ref().unwrap().as_object().unwrap().len(), 2);
    assert_eq!(
        rows[1].4.as_ref().unwrap()["loyalty_card"],
        serde_json::json!({"Text": "CARD-2"})
    );
    assert_eq!((rows[2].1.as_str(), rows[2].4.as_ref()), ("truncate", None));
    running.stop().await.0.unwrap();
}

#[tokio::test]
async fn a_restart_after_confirmed_position_replays_nothing_at_or_below_it() {
    let src = PgDatabase::create("restart").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    running.streaming().await;
    for id in 1..=5 {
        src.client()
            .await
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    wait_count(&sink_db, "AND kind = 'stream'", 5).await;
    running.stop().await.0.unwrap();
    let stored: Position = loyalty_cdc::ledger::positions::load(&sink_db.client().await, "pos")
        .await
        .unwrap()
        .unwrap();
    // What the server was told matches what is durable.
    let slot = settings.slot_name();
    let confirmed: loyalty_cdc::source::Lsn =
        confirmed_flush(&slot).await.unwrap().parse().unwrap();
    assert!(
        confirmed >= stored.lsn().unwrap(),
        "confirmed {confirmed} < durable {}",
        stored.lsn().unwrap()
    );

    for id in 6..=7 {
        src.client()
            .await
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    wait_count(&sink_db, "AND kind = 'stream'", 7).await;
    running.stop().await.0.unwrap();
    let ids: Vec<Option<String>> = captured(&sink_db, "AND kind = 'stream'")
        .await
        .into_iter()
        .map(|r| r.2)
        .collect();
    let expected: Vec<Option<String>> = (1..=7).map(|i| Some(i.to_string())).collect();
    assert_eq!(ids, expected, "each change exactly once, in order");
    assert_eq!(
        count(&sink_db, "AND kind = 'snapshot'").await,
        0,
        "no second snapshot"
    );
}

#[tokio::test]
async fn a_killed_connection_mid_transaction_resumes_without_loss_or_doubles() {
    let src = PgDatabase::create("kill").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    // Batches of 5: the kill lands while some applied transactions are not
    // yet durable.
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 5).await,
    );
    running.streaming().await;
    let writer = src.client().await;
    for batch in 0..20 {
        writer
            .execute(
                "INSERT INTO t SELECT g, repeat('p', 200) FROM generate_series($1::int * 500 + 1, $1::int * 500 + 500) g",
                &[&batch],
            )
            .await
            .unwrap();
        if batch == 10 {
            // End the walsender mid-stream, as a network cut would.
            pg_connect(&pg_admin_url())
                .await
                .execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1", &[&settings.slot_name()])
                .await
                .unwrap();
        }
    }
    wait_count(&sink_db, "AND kind = 'stream'", 10_000).await;
    assert!(
        running.progress.snapshot().reconnects >= 1,
        "the reader reconnected"
    );
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
    assert_eq!(distinct, 10_000);
}

#[tokio::test]
async fn a_snapshot_with_concurrent_writes_yields_every_row_exactly_once() {
    let src = PgDatabase::create("snap").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute(
            "CREATE TABLE pos_order (id int PRIMARY KEY, amount numeric(12,2), state text);
             INSERT INTO pos_order SELECT g, g / 100.0, 'paid' FROM generate_series(1, 100000) g;",
        )
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let running = start(
        PostgresSource::new(&settings, options(&["pos_order"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    // Write before the slot exists, while the snapshot is being copied, and
    // after streaming started: new rows, updates, deletes. Writes that
    // committed before the slot's consistent point are in the snapshot, the
    // rest come through the stream.
    let writer = src.client().await;
    let admin = pg_connect(&pg_admin_url()).await;
    let slot = settings.slot_name();
    let (mut i, mut during_snapshot) = (0, 0);
    loop {
        let streaming = matches!(running.progress.snapshot().state, ReaderState::Streaming);
        if streaming && i >= 200 {
            break;
        }
        let slot_exists = admin
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some();
        writer
            .batch_execute(&format!(
                "INSERT INTO pos_order VALUES ({}, 1, 'draft'); UPDATE pos_order SET state = 'done' WHERE id = {}; DELETE FROM pos_order WHERE id = {};",
                100_001 + i,
                i + 1,
                50_000 + i
            ))
            .await
            .unwrap();
        if slot_exists && !streaming {
            during_snapshot += 1;
        }
        i += 1;
        assert!(i < 100_000, "the reader never finished its snapshot");
    }
    assert!(
        during_snapshot > 0,
        "no write landed while the snapshot was copied"
    );
    // A marker written last shows the stream has caught up.
    writer
        .batch_execute("INSERT INTO pos_order VALUES (0, 0, 'marker')")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream' AND id = '0'", 1).await;
    running.stop().await.0.unwrap();

    // Replaying snapshot + stream over an empty table gives exactly the
    // source table.
    let sink = sink_db.client().await;
    sink.batch_execute(
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
    let mirror: Vec<(i32, String)> = sink
        .query("SELECT id, state FROM mirror ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let truth: Vec<(i32, String)> = src
        .client()
        .await
        .query("SELECT id, state FROM pos_order ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Each round inserts one row and deletes one; plus the marker.
    assert_eq!(mirror.len(), 100_001);
    assert!(mirror == truth, "mirror differs from the source table");
    // No row was both in the snapshot and inserted by the stream.
    let doubled: i64 = sink
        .query_one(
            "SELECT count(*) FROM (SELECT id FROM captured WHERE op = 'insert' GROUP BY id HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(doubled, 0);
}

#[tokio::test]
async fn an_interrupted_snapshot_starts_again_cleanly() {
    let src = PgDatabase::create("snapint").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 25000);",
        )
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    // Batches of 2: the first snapshot chunk is durable, the crash comes at
    // the third, before the snapshot is done.
    let mut sink = PgSink::new(&sink_db, "pos", 2).await;
    sink.fail_after = Some(2);
    let running = start(PostgresSource::new(&settings, options(&["t"])), sink);
    let (outcome, _) = running.finished().await;
    assert!(outcome.is_err(), "the sink failure stops the reader");
    let stored = loyalty_cdc::ledger::positions::load(&sink_db.client().await, "pos")
        .await
        .unwrap();
    assert_eq!(
        stored.map(|p| p.phase),
        Some(loyalty_cdc::source::Phase::Snapshot)
    );
    src.client()
        .await
        .batch_execute("INSERT INTO t VALUES (25001)")
        .await
        .unwrap();

    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    running.streaming().await;
    src.client()
        .await
        .batch_execute("INSERT INTO t VALUES (25002)")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 1).await;
    running.stop().await.0.unwrap();
    let distinct: i64 = sink_db
        .client()
        .await
        .query_one(
            "SELECT count(DISTINCT id) FROM captured WHERE op = 'insert'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        distinct, 25_002,
        "every row, from one of the two snapshots or the stream"
    );
    let slots: i64 = pg_connect(&pg_admin_url())
        .await
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&settings.slot_name()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 1,
        "the interrupted attempt's slot was replaced, not leaked"
    );
}

#[tokio::test]
async fn an_idle_slot_keeps_confirming_while_other_databases_write() {
    let src = PgDatabase::create("idle").await;
    let other = PgDatabase::create("busy").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE unpublished (id int)")
        .await
        .unwrap();
    other
        .client()
        .await
        .batch_execute("CREATE TABLE noise (id int)")
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    running.streaming().await;
    let slot = settings.slot_name();
    let before: loyalty_cdc::source::Lsn = confirmed_flush(&slot).await.unwrap().parse().unwrap();
    let noise = other.client().await;
    let quiet_table = src.client().await;
    let mut advanced = false;
    for round in 0..200 {
        noise
            .batch_execute("INSERT INTO noise SELECT generate_series(1, 1000)")
            .await
            .unwrap();
        quiet_table
            .execute("INSERT INTO unpublished VALUES ($1)", &[&round])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now: loyalty_cdc::source::Lsn = confirmed_flush(&slot).await.unwrap().parse().unwrap();
        if now > before {
            advanced = true;
            break;
        }
    }
    assert!(
        advanced,
        "confirmed_flush_lsn stayed at {before}: the slot pins WAL"
    );
    assert_eq!(
        count(&sink_db, "AND kind = 'stream'").await,
        0,
        "nothing of interest happened"
    );
    running.stop().await.0.unwrap();
}

#[tokio::test]
async fn a_dropped_slot_is_a_clear_error_and_never_recreated() {
    let src = PgDatabase::create("dropped").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    running.streaming().await;
    running.stop().await.0.unwrap();
    let slot = settings.slot_name();
    pg_connect(&pg_admin_url())
        .await
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .unwrap();
    let running = start(
        PostgresSource::new(&settings, options(&["t"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    let (outcome, _) = running.finished().await;
    let error = outcome.unwrap_err();
    assert!(
        matches!(error, PgSourceError::SlotMissing { .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "replication slot `{slot}` does not exist, but position "
        )),
        "{message}"
    );
    assert!(message.contains("Fix: "), "{message}");
    assert_eq!(
        confirmed_flush(&slot).await,
        None,
        "the slot was not recreated"
    );
}

#[tokio::test]
async fn a_table_without_a_key_and_a_missing_publication_are_reported() {
    let src = PgDatabase::create("ident").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute("CREATE TABLE nokey (a int)")
        .await
        .unwrap();
    let settings = source_settings(&src, "pos");
    let running = start(
        PostgresSource::new(&settings, options(&["nokey"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    let error = running.finished().await.0.unwrap_err();
    assert!(
        error
            .to_string()
            .contains("table `public.nokey` has no primary key")
            && error.to_string().contains("REPLICA IDENTITY FULL"),
        "{error}"
    );

    src.client()
        .await
        .batch_execute("ALTER TABLE nokey ADD PRIMARY KEY (a)")
        .await
        .unwrap();
    let running = start(
        PostgresSource::new(&settings, options(&["nokey"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    running.streaming().await;
    running.stop().await.0.unwrap();
    src.client()
        .await
        .batch_execute(&format!("DROP PUBLICATION {}", settings.publication_name()))
        .await
        .unwrap();
    let running = start(
        PostgresSource::new(&settings, options(&["nokey"])),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    let error = running.finished().await.0.unwrap_err();
    assert!(
        matches!(error, PgSourceError::PublicationMissing { .. }),
        "{error:?}"
    );
}

#[tokio::test]
async fn without_a_snapshot_only_later_changes_arrive_and_a_heartbeat_moves_a_quiet_slot() {
    let src = PgDatabase::create("nosnap").await;
    let sink_db = PgDatabase::create("sink").await;
    src.client()
        .await
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 10);",
        )
        .await
        .unwrap();
    let mut settings = source_settings(&src, "pos");
    settings.snapshot = false;
    settings.heartbeat_seconds = Some(1);
    let options = loyalty_cdc::source::postgres::ReaderOptions {
        status_interval: Duration::from_millis(100),
        ..loyalty_cdc::source::postgres::ReaderOptions::for_source(
            &settings,
            vec![loyalty_cdc::source::postgres::TableSpec::parse("t")],
        )
    };
    let running = start(
        PostgresSource::new(&settings, options),
        PgSink::new(&sink_db, "pos", 1).await,
    );
    running.streaming().await;
    src.client()
        .await
        .batch_execute("INSERT INTO t VALUES (11)")
        .await
        .unwrap();
    wait_count(&sink_db, "AND kind = 'stream'", 1).await;
    assert_eq!(
        count(&sink_db, "AND kind = 'snapshot'").await,
        0,
        "no rows copied"
    );
    let stored = loyalty_cdc::ledger::positions::load(&sink_db.client().await, "pos")
        .await
        .unwrap()
        .unwrap();

    // Nothing writes now but the reader's own heartbeat: the slot still moves.
    let slot = settings.slot_name();
    let mut advanced = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let confirmed: loyalty_cdc::source::Lsn =
            confirmed_flush(&slot).await.unwrap().parse().unwrap();
        if confirmed > stored.lsn().unwrap() {
            advanced = true;
            break;
        }
    }
    assert!(
        advanced,
        "the heartbeat did not move the slot past {}",
        stored.lsn().unwrap()
    );
    let lag = loyalty_cdc::source::postgres::catalog::lag_bytes(&src.client().await, &slot)
        .await
        .unwrap()
        .expect("the slot exists");
    assert!(lag >= 0, "lag {lag}");
    running.stop().await.0.unwrap();
}
