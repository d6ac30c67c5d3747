//! Personalization on the real Odoo POS schema: features kept in the ledger
//! transaction, segments entered and left, the next best offer with its
//! explanation, and a member who objected to profiling.

use std::sync::Arc;
use std::time::Duration;

use loyalty_cdc::api::{self, ApiState};
use loyalty_cdc::config::Settings;
use loyalty_cdc::pipeline;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::reader::wait_for;
use crate::support::PgDatabase;

/// One sale at the till: `(line amount, discount percent)` per line, tax
/// left out so the earn basis is the lines' sum.
fn sale(id: i64, partner: i64, lines: &[(i64, i64)]) -> String {
    let total: i64 = lines.iter().map(|l| l.0).sum();
    let mut sql = format!(
        "BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES ({id}, 'Shop/{id:04}', 0, {total}, {total}, 0, 1, {partner}, 1, false, 'paid');"
    );
    for (n, (amount, discount)) in lines.iter().enumerate() {
        sql.push_str(&format!(
            "INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, discount, order_id)
               VALUES ({}, 'L{n}', 1, 1, {amount}, {amount}, {discount}, {id});",
            id * 100 + n as i64
        ));
    }
    sql.push_str("COMMIT;");
    sql
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn features_segments_and_the_next_best_offer_follow_real_purchases() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let pos = crate::ledger_pipeline::odoo_pos(&pos_db).await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"[ledger]
url = "{ledger}"

[program]
points_per_currency_unit = 1
tiers = [{{ name = "base", threshold = 0 }}, {{ name = "gold", threshold = 5000 }}]

[identity]
default_region = "DE"

[delivery]
enabled = false

[api]
listen = "127.0.0.1:0"

[[sources]]
name = "pos"
kind = "postgres"
url = "{pos}"
slot = "{slot}"
publication = "{slot}"
mapping = "{connectors}/odoo-pos.toml"
{hooks}
[[triggers.routes]]
trigger = "segment_entered"
provider = "hooks"

[[triggers.routes]]
trigger = "milestone"
provider = "hooks"

[triggers.milestones]
purchases = [3]

[[segments]]
name = "price_sensitive"
when = "features.discount_share >= 0.5 && features.purchases >= 3"

[[segments]]
name = "high_value"
when = "features.monetary >= 1000.0"

[[offers]]
code = "DOUBLE-ON-DEALS"
title = "Double points on your next purchase"
segments = ["price_sensitive"]
multiplier = 2
priority = 5

[[offers]]
code = "THANKS-50"
title = "50 bonus points"
bonus_points = 50
priority = 5
"#,
        ledger = ledger_db.url(),
        pos = pos_db.url(),
        slot = pos_db.name,
        connectors = concat!(env!("CARGO_MANIFEST_DIR"), "/connectors/sources"),
        hooks = crate::support::webhook_provider("hooks", "http://127.0.0.1:9"),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let service = start(&config, dir.path(), Some(listener)).await;
    let ledger = ledger_db.client().await;
    let scalar = |sql: String| {
        let ledger = &ledger;
        async move {
            ledger
                .query_one(&sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };

    // Two customers; Bob objects to profiling through the API before he
    // buys.
    pos.batch_execute(
        "INSERT INTO res_partner (id, name, type, email) VALUES (5, 'Anna Schmidt', 'contact', 'anna@example.de');
         INSERT INTO res_partner (id, name, type, email) VALUES (6, 'Bob Meyer', 'contact', 'bob@example.de');",
    )
    .await
    .unwrap();
    wait_for("both enrolled", || async {
        scalar("SELECT count(*) FROM members".into()).await == 2
    })
    .await;
    let http = reqwest::Client::new();
    let consent = http
        .post(format!("{base}/v1/members/bob@example.de/consent"))
        .header("content-type", "application/json")
        .body(r#"{"profiling": false}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(consent.status(), 200);
    let consent: serde_json::Value = serde_json::from_str(&consent.text().await.unwrap()).unwrap();
    assert_eq!(consent["consent"]["profiling"], false);

    // Each buys three times the same way: 100 at 10 % off, 50 at full
    // price, then 30 at 5 % off with 20 at full price. 130 of 200 was
    // discounted: a share of 0.65.
    for (partner, first) in [(5, 1), (6, 11)] {
        for (n, lines) in [vec![(100, 10)], vec![(50, 0)], vec![(30, 5), (20, 0)]]
            .iter()
            .enumerate()
        {
            pos.batch_execute(&sale(first + n as i64, partner, lines))
                .await
                .unwrap();
        }
    }
    wait_for("six sales booked", || async {
        scalar("SELECT count(*) FROM orders".into()).await == 6
    })
    .await;
    let member = |email: &'static str| member_by_email(&ledger, email);
    let (anna, bob) = (
        member("anna@example.de").await,
        member("bob@example.de").await,
    );
    wait_for("the milestones", || async {
        scalar("SELECT count(*) FROM outbox WHERE trigger = 'milestone'".into()).await == 2
    })
    .await;

    // The counts, kept in the ledger transaction: exact.
    let features = |member: i64| {
        let ledger = &ledger;
        async move {
            let row = ledger
                .query_one(
                    "SELECT purchases, monetary::text, line_spend::text, discounted_spend::text, pos_purchases,
                            last_purchase_at = (SELECT max(placed_at) FROM orders
                                              WHERE member_id = $1 AND stage <> 'cancelled')
                       FROM member_features WHERE member_id = $1",
                    &[&member],
                )
                .await
                .unwrap();
            (
                row.get::<_, i32>(0),
                row.get::<_, String>(1),
                row.get::<_, String>(2),
                row.get::<_, String>(3),
                row.get::<_, i32>(4),
                row.get::<_, bool>(5),
            )
        }
    };
    let expected = (
        3,
        "200".to_string(),
        "200".to_string(),
        "130".to_string(),
        3,
        true,
    );
    assert_eq!(features(anna).await, expected);
    assert_eq!(
        features(bob).await,
        expected,
        "counts are bookkeeping: kept for Bob too"
    );
    let product = ledger
        .query_one(
            "SELECT product, purchases, spend::text, discounted_spend::text, cardinality(recent)
               FROM member_products WHERE member_id = $1",
            &[&anna],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            product.get::<_, String>(0),
            product.get::<_, i32>(1),
            product.get::<_, String>(2),
            product.get::<_, String>(3),
            product.get::<_, i32>(4)
        ),
        (
            "product:1".to_string(),
            3,
            "200".to_string(),
            "130".to_string(),
            3
        ),
        "one product bought in three orders (the third on two lines: one purchase)"
    );

    // Anna entered the price-sensitive segment, with the features that
    // put her there; Bob is in none.
    let segments = ledger
        .query(
            "SELECT member_id, segment, features FROM member_segments ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(segments.len(), 1);
    assert_eq!(segments[0].get::<_, i64>(0), anna);
    assert_eq!(segments[0].get::<_, String>(1), "price_sensitive");
    let why: serde_json::Value = segments[0].get(2);
    assert_eq!(why["discount_share"], 0.65);
    assert_eq!(why["purchases"], 3);
    assert_eq!(why["aov"], 66.6667);
    assert_eq!(why["pos_share"], 1.0);
    assert_eq!(why["lifecycle"], "new");
    assert_eq!(
        (
            &why["recency_score"],
            &why["frequency_score"],
            &why["monetary_score"]
        ),
        (
            &serde_json::json!(5),
            &serde_json::json!(2),
            &serde_json::json!(2)
        )
    );

    // Her triggers carry the segment's offer, and say why; Bob's the
    // offer for everyone, not personalised.
    let outbox = ledger
        .query(
            "SELECT member_id, trigger, payload FROM outbox ORDER BY member_id, trigger",
            &[],
        )
        .await
        .unwrap();
    let rows: Vec<(i64, String, serde_json::Value)> = outbox
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let kinds: Vec<(i64, &str)> = rows.iter().map(|r| (r.0, r.1.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (anna, "milestone"),
            (anna, "segment_entered"),
            (bob, "milestone")
        ]
    );
    for (who, trigger, payload) in &rows {
        let offer = &payload["offer"];
        if *who == anna {
            assert_eq!(offer["code"], "DOUBLE-ON-DEALS", "{trigger}");
            assert_eq!(
                offer["why"]["rule"],
                "offers[0] `DOUBLE-ON-DEALS`: priority 5, segment `price_sensitive`"
            );
            assert_eq!(offer["why"]["segment"], "price_sensitive");
            assert_eq!(offer["why"]["features"]["discount_share"], 0.65);
            // Worth to her: (2 − 1) × her average order of 66.67 points.
            assert_eq!(offer["why"]["worth_points"], 66.67);
        } else {
            assert_eq!(offer["code"], "THANKS-50");
            assert_eq!(
                offer["why"]["rule"],
                "offers[1] `THANKS-50`: priority 5, not personalised (the member objected to profiling)"
            );
            assert_eq!(offer["why"]["features"], serde_json::Value::Null);
        }
    }
    assert_eq!(
        rows[1].2["trigger"]["data"]["segment"], "price_sensitive",
        "the segment_entered trigger names the segment"
    );

    // Her last sale is cancelled: three purchases become two (her last one
    // is the second again), and she leaves the segment (fewer than three).
    pos.batch_execute("UPDATE pos_order SET state = 'cancel' WHERE id = 3")
        .await
        .unwrap();
    wait_for("the cancellation", || async {
        scalar(format!(
            "SELECT purchases::bigint FROM member_features WHERE member_id = {anna}"
        ))
        .await
            == 2
    })
    .await;
    assert_eq!(
        features(anna).await,
        (
            2,
            "150".to_string(),
            "150".to_string(),
            "100".to_string(),
            2,
            true
        ),
        "the cancelled sale's spend and discounted lines are taken back"
    );
    assert_eq!(
        scalar("SELECT count(*) FROM member_segments".into()).await,
        0,
        "she left the segment"
    );
    let wallet: serde_json::Value = serde_json::from_str(
        &http
            .get(format!("{base}/v1/members/anna@example.de"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(wallet["segments"], serde_json::json!([]));
    stop(service).await;
}

/// The member an email address belongs to.
async fn member_by_email(ledger: &tokio_postgres::Client, email: &str) -> i64 {
    ledger
        .query_one(
            "SELECT member_id FROM member_identifiers WHERE kind = 'email' AND value = $1",
            &[&email],
        )
        .await
        .unwrap()
        .get(0)
}

/// Starts the pipeline on `config` (and the HTTP API on `api`, if given)
/// and waits until it streams; `stop` ends it.
async fn start(
    config: &str,
    dir: &std::path::Path,
    api: Option<TcpListener>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Result<(), pipeline::PipelineError>>,
) {
    let path = dir.join("loyalty-cdc.toml");
    std::fs::write(&path, config).unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let api_settings = Arc::new(Settings::load(&path).unwrap());
    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let service = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            pipeline::run(&settings, shutdown.clone(), move |sources| {
                let progress = sources[0].progress.clone();
                if let Some(listener) = api {
                    let state = ApiState::new(api_settings, sources).unwrap();
                    tokio::spawn(api::serve(listener, Arc::new(state), shutdown));
                }
                let _ = started_tx.send(progress);
            })
            .await
        })
    };
    let progress = started_rx.await.expect("pipeline starts");
    wait_for("the source to stream", || {
        let progress = progress.clone();
        async move {
            matches!(
                progress.snapshot().state,
                loyalty_cdc::source::progress::ReaderState::Streaming
            )
        }
    })
    .await;
    (shutdown, service)
}

async fn stop(
    (shutdown, service): (
        CancellationToken,
        tokio::task::JoinHandle<Result<(), pipeline::PipelineError>>,
    ),
) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), service)
        .await
        .expect("the service stops")
        .unwrap()
        .expect("pipeline ends cleanly");
}

#[tokio::test]
async fn with_personalization_off_nothing_is_kept_and_turned_on_the_orders_are_counted_again() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let pos = crate::ledger_pipeline::odoo_pos(&pos_db).await;
    let dir = tempfile::tempdir().unwrap();
    let config = |enabled: bool| {
        format!(
            r#"[ledger]
url = "{ledger}"

[identity]
default_region = "DE"

[delivery]
enabled = false

[personalization]
enabled = {enabled}

[[sources]]
name = "pos"
kind = "postgres"
url = "{pos}"
slot = "{slot}"
publication = "{slot}"
mapping = "{connectors}/odoo-pos.toml"
{hooks}
[[triggers.routes]]
trigger = "milestone"
provider = "hooks"

[triggers.milestones]
purchases = [2]
"#,
            ledger = ledger_db.url(),
            pos = pos_db.url(),
            slot = pos_db.name,
            connectors = concat!(env!("CARGO_MANIFEST_DIR"), "/connectors/sources"),
            hooks = crate::support::webhook_provider("hooks", "http://127.0.0.1:9"),
        )
    };
    let ledger = ledger_db.client().await;
    let count = |sql: &'static str| {
        let ledger = &ledger;
        async move {
            ledger
                .query_one(sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    // Off: the second purchase still reaches its milestone (counted from
    // the orders), and nothing of her behaviour is kept.
    let service = start(&config(false), dir.path(), None).await;
    pos.batch_execute(
        "INSERT INTO res_partner (id, name, type, email) VALUES (5, 'Anna Schmidt', 'contact', 'anna@example.de');",
    )
    .await
    .unwrap();
    for n in 1..=2 {
        pos.batch_execute(&sale(n, 5, &[(40, 10), (20, 0)]))
            .await
            .unwrap();
    }
    wait_for("the milestone", || async {
        count("SELECT count(*) FROM outbox WHERE trigger = 'milestone'").await == 1
    })
    .await;
    stop(service).await;
    assert_eq!(count("SELECT count(*) FROM member_features").await, 0);
    assert_eq!(count("SELECT count(*) FROM member_products").await, 0);

    // On: counted again from the orders at start, exactly.
    let service = start(&config(true), dir.path(), None).await;
    stop(service).await;
    let row = ledger
        .query_one(
            "SELECT purchases, monetary::text, line_spend::text, discounted_spend::text, kept_orders
               FROM member_features",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2),
            row.get::<_, String>(3),
            row.get::<_, i32>(4)
        ),
        (2, "120".to_string(), "120".to_string(), "80".to_string(), 2),
        "each order keeps its line spend, so the recount has it too"
    );
}

#[tokio::test]
async fn offers_recommend_what_buyers_of_the_same_things_buy_as_computed_by_hand() {
    let (_ledger_db, db, _settings, triggers) = crate::support::migrated_ledger(
        r#"
[personalization.cross_sell]
top = 3
min_support = 2

[[triggers.routes]]
trigger = "milestone"
provider = "crm"

[triggers.milestones]
purchases = [2]

[[offers]]
code = "NEXT-50"
title = "50 bonus points"
bonus_points = 50
"#,
    )
    .await;
    let at = |day: i64| {
        chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 3, 1, 10, 0, 0).unwrap()
            + chrono::Duration::days(day)
    };
    let member = || async {
        db.client()
            .query_one(
                "INSERT INTO members (created_at) VALUES ($1) RETURNING member_id",
                &[&at(0)],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Baskets: M1 and M2 buy A then B, M3 buys A then C (in one order
    // with D: a pair of two new products counts once), M4 and M5 buy D.
    let baskets: [&[&[&str]]; 5] = [
        &[&["A"], &["B"]],
        &[&["A"], &["B"]],
        &[&["A"], &["C", "D"]],
        &[&["D"]],
        &[&["D"]],
    ];
    for (n, orders) in baskets.iter().enumerate() {
        let m = member().await;
        for (k, skus) in orders.iter().enumerate() {
            crate::support::book_purchase(
                &db,
                &triggers,
                m,
                &format!("m{n}-{k}"),
                skus,
                at(k as i64),
            )
            .await;
        }
    }
    let count = |sql: &'static str| {
        let db = &db;
        async move {
            db.client()
                .query_one(sql, &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        count("SELECT members FROM product_buyers WHERE product = '*'").await,
        5
    );
    assert_eq!(
        count("SELECT members FROM co_purchases WHERE product_a = 'A' AND product_b = 'B'").await,
        2
    );
    assert_eq!(
        count("SELECT members FROM co_purchases WHERE product_a = 'C' AND product_b = 'D'").await,
        1
    );
    assert_eq!(
        count("SELECT members FROM co_purchases WHERE product_a = 'D' AND product_b = 'C'").await,
        1
    );

    // T buys A, then E: her second purchase is a milestone whose offer
    // recommends. By hand, with N = 6 buyers (T included), buyers A 4
    // (M1, M2, M3, T), B 2, C 1, D 3, E 1:
    //   lift(A → B) = 2 × 6 / (4 × 2) = 1.5, support 2: recommended;
    //   lift(A → C) = 1 × 6 / (4 × 1) = 1.5, support 1: below min_support;
    //   lift(A → D) = 1 × 6 / (4 × 3) = 0.5: no lift, and support 1.
    let t = member().await;
    crate::support::book_purchase(&db, &triggers, t, "t-0", &["A"], at(10)).await;
    crate::support::book_purchase(&db, &triggers, t, "t-1", &["E"], at(11)).await;
    let offer: serde_json::Value = db
        .client()
        .query_one(
            "SELECT payload->'offer' FROM outbox WHERE member_id = $1 AND trigger = 'milestone'",
            &[&t],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        offer["recommendations"],
        serde_json::json!([{ "product": "B", "lift": 1.5, "support": 2 }])
    );
    // M1's milestone came first, when no one else had bought anything:
    // nothing to recommend yet.
    let m1_offer: serde_json::Value = db
        .client()
        .query_one(
            "SELECT payload->'offer' FROM outbox o JOIN members m USING (member_id)
              WHERE o.trigger = 'milestone' ORDER BY m.member_id LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(m1_offer["recommendations"], serde_json::json!([]));
}

/// Sets a product's price as the Magento admin does: the `price`
/// attribute's row at the default scope.
async fn set_price(shop: &mut mysql_async::Conn, product: u32, price: &str) {
    use mysql_async::prelude::Queryable;
    shop.exec_drop(
        "INSERT INTO catalog_product_entity_decimal (attribute_id, store_id, entity_id, value)
         VALUES (77, 0, ?, ?) ON DUPLICATE KEY UPDATE value = VALUES(value)",
        (product, price),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_price_drop_on_a_wishlisted_magento_product_fires_once_per_new_low() {
    use mysql_async::prelude::Queryable;
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let shop_db = crate::support::MyDatabase::create("shop").await;
    let mut shop = crate::ledger_pipeline::magento_shop(&shop_db).await;
    // The admin scope (store 0) every default price belongs to; a second
    // customer; two products with prices, a special price and a store
    // view price (neither is the default `price`); wishlists as the shop
    // has them before the service starts (copied by the snapshot).
    shop.query_drop(
        "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO');
         INSERT INTO store_website (website_id, code, name) VALUES (0, 'admin', 'Admin');
         INSERT INTO store (store_id, code, website_id, name) VALUES (0, 'admin', 0, 'Admin');
         INSERT INTO customer_entity (entity_id, website_id, store_id, email) VALUES (8, 1, 1, 'ben.weber@example.de');
         INSERT INTO catalog_product_entity (entity_id, sku) VALUES (501, 'TENT-2P'), (502, 'LAMP-LED');
         INSERT INTO catalog_product_entity_decimal (attribute_id, store_id, entity_id, value)
           VALUES (77, 0, 501, 200), (78, 0, 501, 150), (77, 1, 501, 210), (77, 0, 502, 30);
         INSERT INTO wishlist (wishlist_id, customer_id) VALUES (1, 7), (2, 8);
         INSERT INTO wishlist_item (wishlist_item_id, wishlist_id, product_id, store_id, added_at, qty)
           VALUES (11, 1, 501, 1, NOW(), 1), (21, 2, 501, 1, NOW(), 1), (22, 2, 502, 1, NOW(), 1);",
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server_id = 3_600_000_000u64 + u64::from(std::process::id() % 100_000);
    let config = format!(
        r#"[ledger]
url = "{ledger}"

[program]
points_per_currency_unit = 1

[identity]
default_region = "DE"

[delivery]
enabled = false

[[sources]]
name = "shop"
kind = "mysql"
url = "{shop}"
mapping = "{connectors}/magento2.toml"
server_id = {server_id}
{hooks}
[[triggers.routes]]
trigger = "price_drop"
provider = "hooks"

[[offers]]
code = "WISHLIST-3X"
title = "Triple points on what you wished for"
triggers = ["price_drop"]
multiplier = 3
valid_days = 7
"#,
        ledger = ledger_db.url(),
        shop = shop_db.url(),
        connectors = concat!(env!("CARGO_MANIFEST_DIR"), "/connectors/sources"),
        hooks = crate::support::webhook_provider("hooks", "http://127.0.0.1:9"),
    );
    let service = start(&config, dir.path(), None).await;
    let ledger = ledger_db.client().await;
    let member = |email: &'static str| member_by_email(&ledger, email);
    let anna = member("anna.schmidt@example.de").await;
    let ben = member("ben.weber@example.de").await;
    // (member, product, sku, price, previous price, offer) of every
    // price_drop message, in order.
    let drops = || {
        let ledger = &ledger;
        async move {
            ledger
                .query(
                    "SELECT member_id, payload #>> '{trigger,data,product}', payload #>> '{trigger,data,sku}',
                            payload #>> '{trigger,data,price}', payload #>> '{trigger,data,previous_price}',
                            payload #>> '{offer,code}'
                       FROM outbox WHERE trigger = 'price_drop' ORDER BY created_at, member_id",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| {
                    let text = |i: usize| r.get::<_, Option<String>>(i).unwrap_or_default();
                    (r.get::<_, i64>(0), text(1), text(2), text(3), text(4), text(5))
                })
                .collect::<Vec<_>>()
        }
    };
    let known_price = |product: &'static str| {
        let ledger = &ledger;
        async move {
            ledger
                .query_opt(
                    "SELECT price::text FROM product_prices WHERE source = 'shop' AND product = $1",
                    &[&product],
                )
                .await
                .unwrap()
                .map(|r| r.get::<_, String>(0))
        }
    };
    let settled = |product: &'static str, price: &'static str| {
        let known_price = &known_price;
        async move {
            wait_for(&format!("product {product} at {price}"), || async {
                known_price(product)
                    .await
                    .is_some_and(|p| p.parse::<f64>().ok() == price.parse::<f64>().ok())
            })
            .await
        }
    };
    settled("501", "200").await;
    settled("502", "30").await;
    // The snapshot set what each member saw; it announced nothing.
    assert_eq!(drops().await, vec![]);

    // 2.5 % is below the 5 % that counts (default); a store view's price
    // and a special price are not the `price` followed.
    set_price(&mut shop, 501, "195").await;
    shop.exec_drop(
        "UPDATE catalog_product_entity_decimal SET value = 99 WHERE entity_id = 501 AND store_id = 1",
        (),
    )
    .await
    .unwrap();
    shop.exec_drop(
        "UPDATE catalog_product_entity_decimal SET value = 90 WHERE entity_id = 501 AND attribute_id = 78",
        (),
    )
    .await
    .unwrap();
    settled("501", "195").await;
    // 10 % below the 200 both members saw: one message each.
    set_price(&mut shop, 501, "180").await;
    settled("501", "180").await;
    let first = vec![
        (
            anna,
            "501".into(),
            "TENT-2P".into(),
            "180".into(),
            "200".into(),
            "WISHLIST-3X".into(),
        ),
        (
            ben,
            "501".into(),
            "TENT-2P".into(),
            "180".into(),
            "200".into(),
            "WISHLIST-3X".into(),
        ),
    ];
    assert_eq!(drops().await, first);
    // Back up and down to the same low: not news.
    set_price(&mut shop, 501, "200").await;
    set_price(&mut shop, 501, "180").await;
    settled("501", "180").await;
    assert_eq!(drops().await, first);

    // Anna moves the tent to her cart (the item is deleted) and, in the
    // same transaction, the price falls: the low is Ben's alone, against
    // the 180 he was told of.
    shop.query_drop(
        "BEGIN;
         DELETE FROM wishlist_item WHERE wishlist_item_id = 11;
         UPDATE catalog_product_entity_decimal SET value = 150
          WHERE entity_id = 501 AND attribute_id = 77 AND store_id = 0;
         COMMIT;",
    )
    .await
    .unwrap();
    settled("501", "150").await;
    // Anna wishes for the lamp too (live), at the 30 it costs.
    shop.exec_drop(
        "INSERT INTO wishlist_item (wishlist_item_id, wishlist_id, product_id, store_id, added_at, qty)
         VALUES (12, 1, 502, 1, NOW(), 1)",
        (),
    )
    .await
    .unwrap();
    set_price(&mut shop, 502, "27.90").await;
    settled("502", "27.9").await;
    let mut expected = first.clone();
    expected.push((
        ben,
        "501".into(),
        "TENT-2P".into(),
        "150".into(),
        "180".into(),
        "WISHLIST-3X".into(),
    ));
    expected.push((
        anna,
        "502".into(),
        "LAMP-LED".into(),
        "27.9".into(),
        "30".into(),
        "WISHLIST-3X".into(),
    ));
    expected.push((
        ben,
        "502".into(),
        "LAMP-LED".into(),
        "27.9".into(),
        "30".into(),
        "WISHLIST-3X".into(),
    ));
    let mut got = drops().await;
    // The lamp's two messages share a commit: ordered by member.
    got[3..].sort();
    expected[3..].sort();
    assert_eq!(got, expected);
    // Each message granted its offer: the member's next purchase earns 3×.
    let granted: i64 = ledger
        .query_one(
            "SELECT count(*) FROM member_offers WHERE code = 'WISHLIST-3X' AND multiplier = 3",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(granted, 5);
    // What the ledger holds: Ben's two items, Anna's lamp, each at the
    // price last announced.
    let items: Vec<(i64, String, String)> = ledger
        .query(
            "SELECT member_id, product, noticed_price::text FROM wishlist_items ORDER BY member_id, product",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut expected_items = vec![
        (anna, "502".to_string(), "27.900000".to_string()),
        (ben, "501".to_string(), "150.000000".to_string()),
        (ben, "502".to_string(), "27.900000".to_string()),
    ];
    expected_items.sort();
    assert_eq!(items, expected_items);
    stop(service).await;
}

#[tokio::test]
async fn a_merged_members_wishlist_is_the_survivors_and_erasure_forgets_it() {
    use loyalty_cdc::identity::{Identifier, IdentifierKind, Identity};
    use loyalty_cdc::ledger::{members, wishlists};
    use rust_decimal::Decimal;
    let (_ledger_db, db, settings, _triggers) = crate::support::migrated_ledger("").await;
    let identity = Identity::new(&settings.identity).unwrap();
    let at = |h: i64| {
        chrono::DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc)
            + chrono::Duration::hours(h)
    };
    let email = Identifier {
        kind: IdentifierKind::Email,
        value: "anna.schmidt@example.de".into(),
    };
    let card = Identifier {
        kind: IdentifierKind::Card,
        value: "CARD4711".into(),
    };
    let resolve = |ids: Vec<Identifier>, h: i64| {
        let (db, identity) = (&db, &identity);
        async move {
            members::resolve(db, identity, "shop", &ids, at(h))
                .await
                .unwrap()
                .unwrap()
        }
    };
    let price = |value: i64, h: i64| {
        let db = &db;
        async move {
            wishlists::state_price(
                db,
                "shop",
                wishlists::StatedPrice {
                    product: "501",
                    price: Decimal::from(value),
                    sku: Some("TENT-2P"),
                    currency: None,
                    at: at(h),
                },
                Decimal::from(5),
            )
            .await
            .unwrap()
        }
    };
    db.batch_execute("BEGIN").await.unwrap();
    // The same person twice: online (email) and at the till (card), each
    // wishing for the tent at 200.
    assert_eq!(price(200, 0).await, vec![]);
    let online = resolve(vec![email.clone()], 1).await;
    let till = resolve(vec![card.clone()], 2).await;
    assert_ne!(online, till);
    wishlists::save_item(&db, "shop", "11", online, "501", at(3))
        .await
        .unwrap();
    wishlists::save_item(&db, "shop", "12", till, "501", at(3))
        .await
        .unwrap();
    // Seen together: the older member survives with both items, and a
    // drop is one message to it, against the 200 both items saw.
    let survivor = resolve(vec![email, card], 4).await;
    assert_eq!(survivor, online);
    let items: Vec<(String, i64)> = db
        .client()
        .query(
            "SELECT item_ref, member_id FROM wishlist_items ORDER BY item_ref",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(items, vec![("11".into(), online), ("12".into(), online)]);
    let drops = price(180, 5).await;
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(drops[0].member, online);
    assert_eq!(drops[0].previous, Decimal::from(200));
    assert_eq!(drops[0].percent(), Decimal::from(10));
    // Erased: the wishlist goes, and no drop reaches anyone.
    members::erase_personal_data(&db, &identity, online, at(6))
        .await
        .unwrap();
    let left: i64 = db
        .client()
        .query_one("SELECT count(*) FROM wishlist_items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    assert_eq!(price(100, 7).await, vec![]);
    db.batch_execute("COMMIT").await.unwrap();
}
