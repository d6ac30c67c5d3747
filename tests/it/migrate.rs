//! Ledger migrations on a real PostgreSQL database.

use loyalty_cdc::config::DatabaseUrl;
use loyalty_cdc::ledger;

use crate::support::{run_cli, PgDatabase};

const LEDGER_TABLES: [&str; 27] = [
    "balances",
    "co_purchases",
    "dead_letters",
    "delivery_attempts",
    "ledger_entries",
    "member_features",
    "member_identifiers",
    "member_merges",
    "member_offers",
    "member_products",
    "member_profiles",
    "member_segments",
    "members",
    "order_refunds",
    "orders",
    "outbox",
    "product_buyers",
    "product_prices",
    "provider_endpoints",
    "quarantine",
    "reference_rows",
    "refinery_schema_history",
    "scheduled_triggers",
    "shared_identifiers",
    "source_positions",
    "trigger_marks",
    "wishlist_items",
];

async fn tables(db: &PgDatabase) -> Vec<String> {
    db.client()
        .await
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn migrate_creates_the_ledger_tables_and_a_second_run_applies_nothing() {
    let db = PgDatabase::create("ledger").await;
    let config = format!("[ledger]\nurl = \"{}\"\n", db.url());

    let first = run_cli(&config, &["migrate"], &[]).await;
    assert_eq!(first.code, 0, "{}", first.output());
    assert_eq!(
        first.stdout,
        "applied ledger migration V1__ledger_foundation\n\
         applied ledger migration V2__orders_references_identity\n\
         applied ledger migration V3__member_profiles\n\
         applied ledger migration V4__triggers_delivery\n\
         applied ledger migration V5__tier_periods\n\
         applied ledger migration V6__quarantine_replay\n\
         applied ledger migration V7__member_features\n\
         applied ledger migration V8__replenishment\n\
         applied ledger migration V9__lifecycle_review\n\
         applied ledger migration V10__cross_sell\n\
         applied ledger migration V11__price_drop\n\
         applied ledger migration V12__byte_order_keys\n\
         applied ledger migration V13__segment_entry_features_json\n\
         applied ledger migration V14__features_fillfactor\n\
         ledger schema is current\n"
    );
    assert_eq!(tables(&db).await, LEDGER_TABLES);
    // V14: the counters a purchase updates keep room for HOT updates.
    let with_room: Vec<(String, Vec<String>)> = db
        .client()
        .await
        .query(
            "SELECT relname::text, reloptions::text[] FROM pg_class
              WHERE relname IN ('member_features', 'member_products') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        with_room,
        [
            (
                "member_features".to_string(),
                vec!["fillfactor=70".to_string()]
            ),
            (
                "member_products".to_string(),
                vec!["fillfactor=70".to_string()]
            ),
        ]
    );

    let second = run_cli(&config, &["migrate"], &[]).await;
    assert_eq!(second.code, 0, "{}", second.output());
    assert_eq!(
        second.stdout,
        "ledger schema is current; nothing to apply\n"
    );
    assert_eq!(tables(&db).await, LEDGER_TABLES);
}

#[tokio::test]
async fn concurrent_migrations_apply_each_version_once() {
    let db = PgDatabase::create("ledger").await;
    let url = DatabaseUrl::try_from(db.url()).unwrap();
    let migrate_once = || async {
        let mut client = loyalty_cdc::connect::postgres(&url, None).await.unwrap();
        ledger::migrate(&mut client).await.unwrap()
    };
    let (a, b) = tokio::join!(migrate_once(), migrate_once());
    let applied: Vec<i32> = a.iter().chain(b.iter()).map(|m| m.version).collect();
    assert_eq!(
        applied,
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
        "one of the two applied every version, the other nothing"
    );
    let status = ledger::schema_status(&db.client().await).await.unwrap();
    assert!(status.is_current(), "{status:?}");
}

#[tokio::test]
async fn the_ledger_refuses_a_second_booking_of_the_same_effect() {
    let db = PgDatabase::create("ledger").await;
    let url = DatabaseUrl::try_from(db.url()).unwrap();
    let mut client = loyalty_cdc::connect::postgres(&url, None).await.unwrap();
    ledger::migrate(&mut client).await.unwrap();
    let member: i64 = client
        .query_one(
            "INSERT INTO members (created_at) VALUES (now()) RETURNING member_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let book = "INSERT INTO ledger_entries (member_id, kind, points, source, order_ref, effect_key, occurred_at)
                VALUES ($1, 'earn_pending', 120, 'pos', '42', 'pos:order:42:earn', now())";
    client.execute(book, &[&member]).await.unwrap();
    let again = client.execute(book, &[&member]).await.unwrap_err();
    assert_eq!(
        again.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    let total: i64 = client
        .query_one(
            "SELECT sum(points)::bigint FROM ledger_entries WHERE member_id = $1",
            &[&member],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 120);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_never_carry_bound_values() {
    let db = PgDatabase::create("ledger").await;
    let config = format!("[ledger]\nurl = \"{}\"\n", db.url());
    let run = run_cli(
        &config,
        &["--log-format", "json", "migrate"],
        &[("RUST_LOG", "debug")],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.output());
    let lines: Vec<serde_json::Value> = run
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "applying migration: V1__ledger_foundation"),
        "{}",
        run.stderr
    );
    // tokio-postgres logs statement parameters at debug; they carry PII.
    assert!(!run.stderr.contains("with parameters"), "{}", run.stderr);
}

/// `ledger verify` recomputes every balance from the entries alone: it
/// agrees on what the booking functions wrote, and names each member whose
/// balance was changed without an entry, whose entry was written without
/// its balance change, or whose balance row is gone — exit 1, figures in
/// text and JSON.
#[tokio::test]
async fn ledger_verify_proves_balances_agree_with_entries_and_names_each_that_does_not() {
    let (ledger_db, db, _settings, triggers) = crate::support::migrated_ledger("").await;
    let config = format!("[ledger]\nurl = \"{}\"\n", ledger_db.url());
    let at = chrono::Utc::now() - chrono::Duration::days(1);
    let mut members = Vec::new();
    for _ in 0..3 {
        let member: i64 = db
            .query_one(
                "INSERT INTO members (created_at) VALUES ($1) RETURNING member_id",
                &[&at],
            )
            .await
            .unwrap()
            .get(0);
        members.push(member);
    }
    // 20 + 10 points for the first, 30 for the second, 10 for the third.
    crate::support::book_purchase(&db, &triggers, members[0], "a-1", &["A", "B"], at).await;
    crate::support::book_purchase(&db, &triggers, members[0], "a-2", &["A"], at).await;
    crate::support::book_purchase(&db, &triggers, members[1], "b-1", &["A", "B", "C"], at).await;
    crate::support::book_purchase(&db, &triggers, members[2], "c-1", &["C"], at).await;
    let entries: i64 = db
        .query_one("SELECT count(*) FROM ledger_entries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries, 4);

    let agreed = run_cli(&config, &["ledger", "verify"], &[]).await;
    assert_eq!(agreed.code, 0, "{}", agreed.output());
    assert_eq!(
        agreed.stdout,
        "ok    the balances of 3 member(s) agree with their 4 entries\n"
    );

    // A balance changed without an entry; an entry without its balance
    // change; a balance row gone.
    db.execute(
        "UPDATE balances SET available = available + 7, lifetime = lifetime + 7, qualifying = qualifying + 7
          WHERE member_id = $1",
        &[&members[0]],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO ledger_entries (member_id, kind, points, source, effect_key, occurred_at)
         VALUES ($1, 'earn_pending', 5, 'test', 'test:stray', now())",
        &[&members[1]],
    )
    .await
    .unwrap();
    db.execute("DELETE FROM balances WHERE member_id = $1", &[&members[2]])
        .await
        .unwrap();
    let failed = run_cli(&config, &["ledger", "verify"], &[]).await;
    assert_eq!(failed.code, 1, "{}", failed.output());
    assert_eq!(
        failed.stdout,
        format!(
            "FAIL  member {}: balance available 37 pending 0 lifetime 37 qualifying 37; from its entries available 30 pending 0 lifetime 30\n\
             FAIL  member {}: balance available 30 pending 0 lifetime 30 qualifying 30; from its entries available 30 pending 5 lifetime 30\n\
             FAIL  member {}: balance no balance row; from its entries available 10 pending 0 lifetime 10\n\
             3 of 3 member(s) disagree with their entries\n",
            members[0], members[1], members[2]
        )
    );

    let json = run_cli(
        &config,
        &["ledger", "verify", "--json", "--limit", "1"],
        &[],
    )
    .await;
    assert_eq!(json.code, 1, "{}", json.output());
    let verdict: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        verdict,
        serde_json::json!({
            "members": 3,
            "entries": 5,
            "disagreeing": 3,
            "shown": [{
                "member_id": members[0],
                "stored": {
                    "available": 37, "pending": 0, "lifetime": 37, "qualifying": 37,
                    "qualifying_is_lifetime": true
                },
                "from_entries": {"available": 30, "pending": 0, "lifetime": 30},
                "member_missing": false
            }]
        })
    );

    // Qualifying apart from lifetime, where tiers follow lifetime points.
    db.execute(
        "UPDATE balances SET available = available - 7, lifetime = lifetime - 7 WHERE member_id = $1",
        &[&members[0]],
    )
    .await
    .unwrap();
    let qualifying = run_cli(&config, &["ledger", "verify", "--json"], &[]).await;
    let verdict: serde_json::Value = serde_json::from_str(&qualifying.stdout).unwrap();
    assert_eq!(verdict["disagreeing"], 3, "{}", qualifying.output());
    assert_eq!(verdict["shown"][0]["stored"]["qualifying"], 37);
    assert_eq!(verdict["shown"][0]["stored"]["lifetime"], 30);
}

/// Migration V12 gives every text column of the ledger's tables byte
/// order, and leaves a table of something else in the same schema as it
/// was.
#[tokio::test]
async fn ledger_text_compares_by_bytes_and_other_tables_are_left_alone() {
    let db = PgDatabase::create("ledger").await;
    let mut client = db.client().await;
    client
        .batch_execute("CREATE TABLE someone_elses (note text)")
        .await
        .unwrap();
    ledger::migrate(&mut client).await.unwrap();
    let collations: Vec<(String, Option<String>)> = client
        .query(
            "SELECT table_name::text, collation_name::text FROM information_schema.columns
              WHERE table_schema = current_schema() AND data_type = 'text'
                AND table_name <> 'refinery_schema_history'
              GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let not_c: Vec<&(String, Option<String>)> = collations
        .iter()
        .filter(|(_, collation)| collation.as_deref() != Some("C"))
        .collect();
    assert_eq!(
        not_c,
        [&("someone_elses".to_string(), None)],
        "every ledger text column is C: {collations:?}"
    );
}
