//! The whole path — sources → normalize → identity → ledger — on the real
//! Odoo POS (PostgreSQL) and Magento 2 (MariaDB) schemas, with the mapping
//! files shipped in `connectors/sources/`, orders written the way each
//! application writes them, and the exact ledger asserted.

use std::path::PathBuf;
use std::time::Duration;

use loyalty_cdc::config::Settings;
use loyalty_cdc::pipeline;
use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;

use crate::support::reader::wait_for;
use crate::support::{MyDatabase, PgDatabase};

fn connectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/sources")
}

/// A configuration file for the ledger and the given sources.
fn write_config(ledger: &PgDatabase, sources: &str) -> (PathBuf, Settings) {
    let dir = std::env::temp_dir().join(format!("lcdc_cfg_{}", ledger.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("loyalty-cdc.toml");
    let text = format!(
        r#"
[ledger]
url = "{ledger}"

[program]
points_per_currency_unit = 1
tiers = [{{ name = "base", threshold = 0 }}, {{ name = "silver", threshold = 100 }}, {{ name = "gold", threshold = 1000 }}]

[identity]
default_region = "DE"

{sources}
"#,
        ledger = ledger.url()
    );
    std::fs::write(&path, text).unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    (path, settings)
}

struct Ledger {
    client: tokio_postgres::Client,
}

impl Ledger {
    async fn new(db: &PgDatabase) -> Self {
        Self {
            client: db.client().await,
        }
    }

    /// (available, pending, lifetime, tier) of the member owning an email.
    async fn member_by_email(&self, email: &str) -> Option<(i64, i64, i64, Option<String>)> {
        let row = self
            .client
            .query_opt(
                "SELECT coalesce(b.available, 0), coalesce(b.pending, 0), coalesce(b.lifetime, 0), m.tier
                   FROM member_identifiers i JOIN members m USING (member_id)
                   LEFT JOIN balances b USING (member_id)
                  WHERE i.kind = 'email' AND i.value = $1",
                &[&email],
            )
            .await
            .ok()??;
        Some((row.get(0), row.get(1), row.get(2), row.get(3)))
    }

    async fn scalar(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(-1)
    }

    async fn quarantine_reasons(&self) -> Vec<String> {
        self.client
            .query("SELECT reason FROM quarantine ORDER BY quarantine_id", &[])
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default()
    }
}

async fn start(settings: Settings) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let handle = tokio::spawn(async move {
        let result = pipeline::run(&settings, token, move |sources| {
            let _ = started_tx.send(sources);
        })
        .await;
        result.expect("pipeline ends cleanly");
    });
    let sources = started_rx.await.expect("pipeline starts");
    // Streaming (the snapshot, if any, is done) before the test writes.
    for source in sources {
        wait_for("the source to stream", || {
            let progress = source.progress.clone();
            async move {
                matches!(
                    progress.snapshot().state,
                    loyalty_cdc::source::progress::ReaderState::Streaming
                )
            }
        })
        .await;
    }
    (shutdown, handle)
}

pub(crate) async fn magento_shop(db: &MyDatabase) -> mysql_async::Conn {
    db.load_magento().await;
    let mut conn = db.conn().await;
    conn.query_drop(
        "INSERT INTO store_website (website_id, code, name) VALUES (1, 'base', 'Main Website');
         INSERT INTO store (store_id, code, website_id, name) VALUES (1, 'default', 1, 'Default Store View');
         INSERT INTO customer_entity (entity_id, website_id, store_id, email) VALUES (7, 1, 1, 'Anna.Schmidt@Example.DE')",
    )
    .await
    .unwrap();
    conn
}

/// A Magento order as checkout writes it: header and items in one
/// transaction. `items`: (sku, parent index, row total).
#[allow(clippy::too_many_arguments)]
async fn magento_order(
    conn: &mut mysql_async::Conn,
    id: u32,
    customer: Option<u32>,
    email: &str,
    state: &str,
    subtotal: Option<&str>,
    discount: &str,
    items: &[(&str, Option<usize>, &str)],
) {
    let mut tx = conn.start_transaction(Default::default()).await.unwrap();
    tx.exec_drop(
        "INSERT INTO sales_order (entity_id, state, status, store_id, customer_id, customer_is_guest,
             customer_email, base_subtotal, base_discount_amount, base_tax_amount, base_shipping_amount,
             base_grand_total, subtotal, base_currency_code, increment_id)
         VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, 19.0, 5.0, 0, 0, 'EUR', ?)",
        (
            id,
            state,
            state,
            customer,
            u8::from(customer.is_none()),
            email,
            subtotal,
            discount,
            format!("0000000{id}"),
        ),
    )
    .await
    .unwrap();
    let mut item_ids = Vec::new();
    for (n, (sku, parent, total)) in items.iter().enumerate() {
        let item_id = id * 100 + n as u32;
        let parent_id = parent.map(|p| item_ids[p]);
        tx.exec_drop(
            "INSERT INTO sales_order_item (item_id, order_id, parent_item_id, product_type, sku, qty_ordered,
                 base_row_total, row_total)
             VALUES (?, ?, ?, ?, ?, 1, ?, ?)",
            (item_id, id, parent_id, if parent.is_some() { "simple" } else { "configurable" }, sku, total, total),
        )
        .await
        .unwrap();
        item_ids.push(item_id);
    }
    tx.commit().await.unwrap();
}

/// Sleeps to just past the next whole second of the wall clock: the
/// binlog's commit times have whole seconds, so a few statements written
/// right after this one share one.
async fn at_the_start_of_a_second() {
    let into_the_second = chrono::Utc::now().timestamp_subsec_millis().min(999);
    tokio::time::sleep(Duration::from_millis(u64::from(1000 - into_the_second) + 5)).await;
}

pub(crate) async fn odoo_pos(db: &PgDatabase) -> tokio_postgres::Client {
    db.load_schema("odoo-pos.postgres.sql").await;
    let client = db.client().await;
    client
        .batch_execute(
            "INSERT INTO res_currency (id, name, symbol) VALUES (1, 'EUR', '€');
             INSERT INTO res_partner (id, name, type, is_company) VALUES (1, 'My Company', 'contact', true);
             INSERT INTO res_company (id, name, partner_id, currency_id) VALUES (1, 'My Company', 1, 1);
             INSERT INTO product_template (id, name) VALUES (1, '{\"en_US\": \"Coffee beans\"}');
             INSERT INTO product_product (id, default_code, product_tmpl_id) VALUES (1, 'COF-1KG', 1);
             INSERT INTO pos_config (id, name, currency_id, company_id) VALUES (1, 'Berlin Mitte', 1, 1);",
        )
        .await
        .unwrap();
    client
}

#[tokio::test]
async fn orders_from_the_till_and_the_shop_book_exact_points_to_one_member() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let shop_db = MyDatabase::create("shop").await;
    let pos = odoo_pos(&pos_db).await;
    let mut shop = magento_shop(&shop_db).await;
    let server_id = 3_500_000_000u64 + u64::from(std::process::id() % 100_000);
    let sources = format!(
        r#"
[[sources]]
name = "pos"
kind = "postgres"
url = "{pos}"
slot = "{slot}"
publication = "{slot}"
mapping = "{connectors}/odoo-pos.toml"

[[sources]]
name = "shop"
kind = "mysql"
url = "{shop}"
mapping = "{connectors}/magento2.toml"
server_id = {server_id}
"#,
        pos = pos_db.url(),
        slot = pos_db.name,
        shop = shop_db.url(),
        connectors = connectors().display()
    );
    let (path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;

    // POS: a customer with an email and a card buys at the till (paid, 119
    // incl. 19 tax = 100 of goods); the session closes (done: same sale);
    // then half of it is refunded as a refund order.
    pos.batch_execute(
        "BEGIN;
         INSERT INTO res_partner (id, name, type, email, phone, barcode, lang)
           VALUES (5, 'Anna Schmidt', 'contact', 'anna.schmidt@example.de', '030 1234567', '{\"1\": \"CARD-4711\"}', 'de_DE');
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES (1, 'Shop/0001', 19, 119, 119, 0, 1, 5, 1, false, 'paid');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
           VALUES (11, 'L1', 1, 2, 50, 59.5, 1), (12, 'L2', 1, 2, 50, 59.5, 1);
         COMMIT;
         UPDATE pos_order SET state = 'done' WHERE id = 1;
         BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES (2, 'Shop/0001 REFUND', -9.5, -59.5, -59.5, 0, 1, 5, 1, true, 'paid');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id,
                                     refunded_orderline_id)
           VALUES (21, 'L1', 1, -2, -50, -59.5, 2, 11);
         COMMIT;",
    )
    .await
    .unwrap();
    wait_for("the POS refund to be booked", || async {
        ledger.scalar("SELECT count(*) FROM order_refunds").await == 1
    })
    .await;
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((50, 0, 50, Some("silver".into()))),
        "100 earned at the till (silver reached at once), 50 clawed back by the half refund (no \
         downgrade before the period ends); `done` booked nothing"
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM member_profiles WHERE locale = 'de_DE'")
            .await,
        1,
        "the contact enrolled her with her language"
    );

    // She spends 30 points with her Odoo loyalty card; a second attempt to
    // spend more than she has is refused (quarantined), never negative.
    pos.batch_execute(
        "INSERT INTO loyalty_card (id, partner_id, code, points) VALUES (1, 5, 'LC-0042', 0);
         INSERT INTO loyalty_history (id, card_id, description, used, order_model, order_id)
           VALUES (1, 1, 'Reward: 5 EUR off', 30, 'pos.order', 1);
         INSERT INTO loyalty_history (id, card_id, description, used, order_model, order_id)
           VALUES (2, 1, 'Reward: 100 EUR off', 500, 'pos.order', 1);
         INSERT INTO loyalty_card (id, partner_id, code, points) VALUES (2, NULL, '0000', 0);
         INSERT INTO loyalty_history (id, card_id, description, used, order_model, order_id)
           VALUES (3, 2, 'Reward on a placeholder card', 5, 'pos.order', 1);",
    )
    .await
    .unwrap();
    wait_for("the redemptions", || async {
        ledger.scalar("SELECT count(*) FROM quarantine").await == 2
    })
    .await;
    assert_eq!(
        ledger.quarantine_reasons().await,
        [
            "redemption `2` of 500 points exceeds the 20 available; the balance never goes below zero",
            "redemption `3` names no usable identifier, so no member can pay for it"
        ]
    );
    // The operator's view of them.
    let listed = crate::support::run_cli(
        &std::fs::read_to_string(&path).unwrap(),
        &["quarantine", "list", "--json"],
        &[],
    )
    .await;
    assert_eq!(listed.code, 0, "{}", listed.output());
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["source"], "pos");
    assert_eq!(listed[0]["table"], "loyalty_history");
    assert!(listed[1]["reason"]
        .as_str()
        .unwrap()
        .starts_with("redemption `3`"));
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((20, 0, 50, Some("silver".into()))),
        "30 redeemed"
    );

    // Shop: the same person's account (same email, other case) orders: new
    // (pending), invoiced (processing: still pending), shipped (complete:
    // available), then a partial credit memo. A configurable product's
    // child row does not count twice.
    magento_order(
        &mut shop,
        1,
        Some(7),
        "Anna.Schmidt@Example.DE",
        "new",
        Some("100.0000"),
        "-10.0000",
        &[
            ("TSHIRT-RED", None, "60.0000"),
            ("TSHIRT-RED-M", Some(0), "0.0000"),
            ("MUG", None, "40.0000"),
        ],
    )
    .await;
    wait_for("the shop order to be pending", || async {
        ledger.member_by_email("anna.schmidt@example.de").await
            == Some((20, 90, 50, Some("silver".into())))
    })
    .await;
    shop.query_drop(
        "UPDATE sales_order SET state = 'processing', status = 'processing' WHERE entity_id = 1",
    )
    .await
    .unwrap();
    shop.query_drop(
        "UPDATE sales_order SET state = 'complete', status = 'complete' WHERE entity_id = 1",
    )
    .await
    .unwrap();
    shop.query_drop(
        "INSERT INTO sales_creditmemo (entity_id, order_id, store_id, state, base_subtotal, base_discount_amount,
             base_grand_total, increment_id)
         VALUES (1, 1, 1, 2, 30.0000, -3.0000, 27.0000, 'CM1')",
    )
    .await
    .unwrap();
    wait_for("the credit memo to be booked", || async {
        ledger.scalar("SELECT count(*) FROM order_refunds").await == 2
    })
    .await;
    assert_eq!(
        ledger
            .scalar("SELECT lines::bigint FROM orders WHERE source = 'shop' AND order_ref = '1'")
            .await,
        2,
        "the configurable product counts once (its parent row), the mug once"
    );
    // 50 (POS) − 30 (redeemed) + 90 (shop, complete) − 27 (credit memo: 27
    // of 90 refunded); lifetime counts earning, not spending.
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((83, 0, 113, Some("silver".into()))),
        "one member, one balance across both sources"
    );

    // Bad input: each is quarantined or anonymous, and the stream goes on.
    magento_order(
        &mut shop,
        2,
        None,
        "guest@shop.de",
        "weird_state",
        Some("10"),
        "0",
        &[("MUG", None, "10")],
    )
    .await;
    magento_order(
        &mut shop,
        3,
        None,
        "guest@shop.de",
        "complete",
        None,
        "0",
        &[("MUG", None, "10")],
    )
    .await;
    magento_order(
        &mut shop,
        4,
        None,
        "guest@shop.de",
        "complete",
        Some("10"),
        "0",
        &[],
    )
    .await;
    magento_order(
        &mut shop,
        5,
        None,
        "noreply@shop.de",
        "complete",
        Some("10"),
        "0",
        &[("MUG", None, "10")],
    )
    .await;
    // A guest order with Anna's email earns to her.
    magento_order(
        &mut shop,
        6,
        None,
        " anna.schmidt@EXAMPLE.de",
        "complete",
        Some("15"),
        "0",
        &[("MUG", None, "15")],
    )
    .await;
    wait_for("the last guest order", || async {
        ledger
            .scalar("SELECT count(*) FROM orders WHERE source = 'shop'")
            .await
            == 3
    })
    .await;
    assert_eq!(
        ledger.quarantine_reasons().await,
        [
            "redemption `2` of 500 points exceeds the 20 available; the balance never goes below zero".to_string(),
            "redemption `3` names no usable identifier, so no member can pay for it".into(),
            "unknown status `weird_state`; list it under placed, completed, cancelled, refunded or ignored in "
                .to_string()
                + &connectors().join("magento2.toml").display().to_string(),
            "NULL amount in column `base_subtotal`".into(),
            "an order with no lines".into(),
        ]
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM orders WHERE source = 'shop' AND member_id IS NULL")
            .await,
        1,
        "the placeholder-email order is anonymous: counted, no points"
    );
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((98, 0, 128, Some("silver".into())))
    );
    assert_eq!(ledger.scalar("SELECT count(*) FROM members").await, 1);
    assert_eq!(
        ledger
            .scalar(
                "SELECT count(*) FROM member_identifiers
                  WHERE kind IN ('card', 'phone') AND value IN ('CARD4711', '+49301234567')"
            )
            .await,
        2,
        "the POS card and phone belong to the member"
    );
    // Replay: balances recomputed from entries alone match.
    assert_eq!(
        ledger
            .scalar(
                "SELECT count(*) FROM balances b LEFT JOIN (
                   SELECT member_id,
                          sum(points) FILTER (WHERE kind NOT IN ('earn_pending','pending_release','pending_void'))::bigint AS available,
                          sum(points) FILTER (WHERE kind IN ('earn_pending','pending_release','pending_void'))::bigint AS pending,
                          sum(points) FILTER (WHERE kind IN ('earn_available','clawback'))::bigint AS lifetime
                     FROM ledger_entries GROUP BY member_id) e USING (member_id)
                  WHERE (b.available, b.pending, b.lifetime)
                        IS DISTINCT FROM (coalesce(e.available, 0), coalesce(e.pending, 0), coalesce(e.lifetime, 0))"
            )
            .await,
        0
    );

    // Replay. The redemption of 500 still exceeds what she has: nothing is
    // booked and the row stays open.
    let quarantine_id = |reason_start: &'static str| {
        let ledger = &ledger;
        async move {
            ledger
                .client
                .query_one(
                    "SELECT quarantine_id FROM quarantine WHERE starts_with(reason, $1)",
                    &[&reason_start],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let redemption = quarantine_id("redemption `2`").await;
    let config = std::fs::read_to_string(&path).unwrap();
    let still = crate::support::run_cli(
        &config,
        &["quarantine", "replay", &redemption.to_string()],
        &[],
    )
    .await;
    assert_eq!(still.code, 1, "{}", still.output());
    assert_eq!(
        still.stderr,
        format!(
            "{redemption} fails again, nothing booked, left open:\n  \
             redemption `2` of 500 points exceeds the 98 available; the balance never goes below zero\n  \
             fix: correct the mapping or the ledger as the reason says, then replay again\n"
        )
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM quarantine WHERE replayed_at IS NULL")
            .await,
        5
    );

    // A till sale in a state the Odoo mapping does not know either.
    pos.batch_execute(
        "BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return,
                                company_id, partner_id, config_id, is_refund, state)
           VALUES (9, 'Shop/0009', 1.9, 11.9, 11.9, 0, 1, 5, 1, false, 'weird');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
           VALUES (91, 'L1', 1, 1, 10, 11.9, 9);
         COMMIT;",
    )
    .await
    .unwrap();
    wait_for("the till sale to be quarantined", || async {
        ledger.scalar("SELECT count(*) FROM quarantine").await == 6
    })
    .await;

    // The operator lists both unknown states in the mappings and replays
    // the two orders in one command (two sources: two ledger
    // transactions). Each earns once, with its lines, at the time the
    // source committed it.
    let weird_shop = quarantine_id("unknown status `weird_state`").await;
    let weird_pos = quarantine_id("unknown status `weird`").await;
    let mut fixed_config = config.clone();
    for (file, from, to) in [
        (
            "magento2.toml",
            "completed = [\"complete\"]",
            "completed = [\"complete\", \"weird_state\"]",
        ),
        (
            "odoo-pos.toml",
            "completed = [\"paid\",",
            "completed = [\"weird\", \"paid\",",
        ),
    ] {
        let fixed = std::env::temp_dir().join(format!("lcdc_fixed_{}_{file}", ledger_db.name));
        let text = std::fs::read_to_string(connectors().join(file)).unwrap();
        assert!(text.contains(from), "{file}");
        std::fs::write(&fixed, text.replace(from, to)).unwrap();
        fixed_config = fixed_config.replace(
            &connectors().join(file).display().to_string(),
            &fixed.display().to_string(),
        );
    }
    let booked = crate::support::run_cli(
        &fixed_config,
        &[
            "quarantine",
            "replay",
            &weird_pos.to_string(),
            &weird_shop.to_string(),
            "--json",
        ],
        &[],
    )
    .await;
    assert_eq!(booked.code, 0, "{}", booked.output());
    let booked: serde_json::Value = serde_json::from_str(&booked.stdout).unwrap();
    assert_eq!(
        booked,
        serde_json::json!([
            {"ids": [weird_shop], "outcome": "booked", "events": 1},
            {"ids": [weird_pos], "outcome": "booked", "events": 1},
        ])
    );
    assert_eq!(
        ledger.member_by_email("guest@shop.de").await,
        Some((10, 0, 10, Some("base".into()))),
        "order 2 (10, now complete) earned its guest 10"
    );
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((108, 0, 138, Some("silver".into()))),
        "the till sale (10 of goods) earned Anna 10"
    );
    assert_eq!(
        ledger
            .scalar("SELECT lines::bigint FROM orders WHERE source = 'pos' AND order_ref = '9'")
            .await,
        1
    );
    assert_eq!(
        ledger
            .scalar(&format!(
                "SELECT count(*) FROM ledger_entries e, quarantine q
                  WHERE q.quarantine_id = {weird_pos} AND e.source = 'pos' AND e.order_ref = '9'
                    AND e.occurred_at = q.occurred_at AND q.occurred_at < q.replayed_at"
            ))
            .await,
        1,
        "booked at the source's commit time, not the replay's"
    );

    // A large order later, the redemption goes through on replay: 500 of
    // the 608 she then has.
    magento_order(
        &mut shop,
        7,
        Some(7),
        "anna.schmidt@example.de",
        "complete",
        Some("500"),
        "0",
        &[("TENT", None, "500")],
    )
    .await;
    wait_for("the large order", || async {
        ledger.member_by_email("anna.schmidt@example.de").await
            == Some((608, 0, 638, Some("silver".into())))
    })
    .await;
    let redeemed = crate::support::run_cli(
        &config,
        &["quarantine", "replay", &redemption.to_string()],
        &[],
    )
    .await;
    assert_eq!(redeemed.code, 0, "{}", redeemed.output());
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((108, 0, 638, Some("silver".into()))),
        "500 redeemed"
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM quarantine WHERE replayed_at IS NULL")
            .await,
        3,
        "the identifier-less redemption, the NULL amount and the order without lines stay"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("pipeline stops")
        .unwrap();
}

#[tokio::test]
async fn a_column_dropped_by_ddl_parks_its_table_and_the_rest_keeps_streaming() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let shop_db = MyDatabase::create("shop").await;
    let mut shop = magento_shop(&shop_db).await;
    let sources = format!(
        r#"
[[sources]]
name = "shop"
kind = "mysql"
url = "{shop}"
mapping = "{connectors}/magento2.toml"
server_id = {server_id}
"#,
        shop = shop_db.url(),
        connectors = connectors().display(),
        server_id = 3_510_000_000u64 + u64::from(std::process::id() % 100_000),
    );
    let (path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;

    magento_order(
        &mut shop,
        1,
        Some(7),
        "anna.schmidt@example.de",
        "processing",
        Some("100"),
        "-10",
        &[("MUG", None, "100")],
    )
    .await;
    wait_for("the first order", || async {
        ledger.member_by_email("anna.schmidt@example.de").await
            == Some((0, 90, 0, Some("base".into())))
    })
    .await;

    shop.query_drop("ALTER TABLE sales_order DROP COLUMN customer_email")
        .await
        .unwrap();
    // Checkout writes the order and its item in one transaction.
    shop.query_drop(
        "START TRANSACTION;
         INSERT INTO sales_order (entity_id, state, status, store_id, customer_id, base_subtotal,
             base_discount_amount, base_grand_total, base_currency_code, increment_id)
         VALUES (2, 'complete', 'complete', 1, 7, 50, 0, 50, 'EUR', '2');
         INSERT INTO sales_order_item (item_id, order_id, product_type, sku, qty_ordered, base_row_total, row_total)
         VALUES (200, 2, 'simple', 'MUG', 1, 50, 50);
         COMMIT",
    )
    .await
    .unwrap();
    // Another table of the mapping still books: a credit memo for order 1
    // (27 of its 90 still pending).
    shop.query_drop(
        "INSERT INTO sales_creditmemo (entity_id, order_id, store_id, state, base_subtotal, base_discount_amount,
             base_grand_total, increment_id)
         VALUES (1, 1, 1, 2, 30, -3, 27, 'CM1')",
    )
    .await
    .unwrap();
    wait_for("the credit memo", || async {
        ledger.scalar("SELECT count(*) FROM order_refunds").await == 1
    })
    .await;
    assert_eq!(
        ledger.quarantine_reasons().await,
        [format!(
            "table `sales_order` lost column `customer_email` (read by orders[0].email); update the mapping {} \
             (or restore the column), then replay the quarantined rows",
            connectors().join("magento2.toml").display()
        )]
    );
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((0, 63, 0, Some("base".into()))),
        "the refund took 27 of the pending 90; the parked order booked nothing"
    );

    // The operator fixes the mapping (the email is no longer read) and
    // replays the parked order: booked as the stream would have booked it,
    // with its item from the same transaction, while the service runs.
    let fixed_mapping =
        std::env::temp_dir().join(format!("lcdc_magento_fixed_{}.toml", ledger_db.name));
    let mapping_text = std::fs::read_to_string(connectors().join("magento2.toml")).unwrap();
    assert!(mapping_text.contains("email = \"row.customer_email\"\n"));
    std::fs::write(
        &fixed_mapping,
        mapping_text.replace("email = \"row.customer_email\"\n", ""),
    )
    .unwrap();
    let fixed_config = std::fs::read_to_string(&path).unwrap().replace(
        &connectors().join("magento2.toml").display().to_string(),
        &fixed_mapping.display().to_string(),
    );
    let parked = ledger.scalar("SELECT quarantine_id FROM quarantine").await;
    let listed =
        crate::support::run_cli(&fixed_config, &["quarantine", "list", "--json"], &[]).await;
    let listed: serde_json::Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed[0]["replayable"], true);
    let replayed = crate::support::run_cli(
        &fixed_config,
        &["quarantine", "replay", &parked.to_string()],
        &[],
    )
    .await;
    assert_eq!(replayed.code, 0, "{}", replayed.output());
    assert_eq!(
        replayed.stdout,
        format!("replayed {parked}: 1 event(s) booked\n")
    );
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((50, 63, 50, Some("base".into()))),
        "order 2 (complete, 50) earned 50 available"
    );
    assert_eq!(
        ledger
            .scalar("SELECT lines::bigint FROM orders WHERE source = 'shop' AND order_ref = '2'")
            .await,
        1,
        "the item written with the order came with it"
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM quarantine WHERE replayed_at IS NULL")
            .await,
        0
    );
    // Asked twice, booked once.
    let again = crate::support::run_cli(
        &fixed_config,
        &["quarantine", "replay", &parked.to_string()],
        &[],
    )
    .await;
    assert_eq!(again.code, 1, "{}", again.output());
    assert_eq!(
        again.stderr,
        format!("{parked} not replayed: no open quarantined row {parked} (unknown, or replayed before)\n")
    );
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((50, 63, 50, Some("base".into())))
    );
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("pipeline stops")
        .unwrap();
}

/// One source with the given mapping, for the single-system scenarios.
fn one_source(name: &str, kind: &str, url: &str, mapping: &str, extra: &str) -> String {
    format!(
        "\n[[sources]]\nname = \"{name}\"\nkind = \"{kind}\"\nurl = \"{url}\"\nmapping = \"{}\"\n{extra}\n",
        connectors().join(mapping).display()
    )
}

#[tokio::test]
async fn woocommerce_orders_with_meta_and_refund_orders_book_exact_points() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let shop_db = MyDatabase::create("woo").await;
    shop_db.load_schema("woocommerce-hpos.mysql.sql").await;
    let sources = one_source(
        "woo",
        "mysql",
        &shop_db.url(),
        "woocommerce-hpos.toml",
        &format!(
            "server_id = {}",
            3_520_000_000u64 + u64::from(std::process::id() % 100_000)
        ),
    );
    let (_path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;
    let mut woo = shop_db.conn().await;

    // WordPress writes without transactions: each statement commits alone,
    // in the order WooCommerce's checkout runs them.
    for statement in [
        "INSERT INTO wp_users (ID, user_login, user_email) VALUES (3, 'jonas', 'jonas@shop-kunden.de')",
        "INSERT INTO wp_usermeta (user_id, meta_key, meta_value) VALUES (3, 'billing_phone', '+49 30 555123')",
        "INSERT INTO wp_usermeta (user_id, meta_key, meta_value) VALUES (3, 'nickname', 'jonas')",
        "INSERT INTO wp_wc_orders (id, status, currency, type, tax_amount, total_amount, customer_id, billing_email)
           VALUES (100, 'wc-pending', 'EUR', 'shop_order', 19.00, 130.00, 3, 'Jonas@Shop-Kunden.de')",
        "INSERT INTO wp_wc_order_operational_data (order_id, created_via, shipping_total_amount)
           VALUES (100, 'checkout', 11.00)",
        "INSERT INTO wp_wc_orders_meta (order_id, meta_key, meta_value) VALUES (100, '_billing_address_index', 'x')",
        "UPDATE wp_wc_orders SET status = 'wc-processing' WHERE id = 100",
    ] {
        woo.query_drop(statement).await.unwrap();
    }
    wait_for("the paid order to be pending", || async {
        ledger
            .member_by_email("jonas@shop-kunden.de")
            .await
            .map(|m| m.1)
            == Some(100)
    })
    .await;
    woo.query_drop("UPDATE wp_wc_orders SET status = 'wc-completed' WHERE id = 100")
        .await
        .unwrap();
    // A partial refund: a refund order of a quarter of the gross total.
    woo.query_drop(
        "INSERT INTO wp_wc_orders (id, status, currency, type, tax_amount, total_amount, customer_id, parent_order_id)
         VALUES (101, 'wc-completed', 'EUR', 'shop_order_refund', -4.75, -32.50, 3, 100)",
    )
    .await
    .unwrap();
    // A guest order with the same email, paid then cancelled.
    for statement in [
        "INSERT INTO wp_wc_orders (id, status, currency, type, tax_amount, total_amount, customer_id, billing_email)
           VALUES (102, 'wc-pending', 'EUR', 'shop_order', 1.90, 11.90, 0, 'jonas@shop-kunden.de')",
        "INSERT INTO wp_wc_order_operational_data (order_id, created_via, shipping_total_amount) VALUES (102, 'checkout', 0)",
        "UPDATE wp_wc_orders SET status = 'wc-processing' WHERE id = 102",
        "UPDATE wp_wc_orders SET status = 'wc-cancelled' WHERE id = 102",
    ] {
        woo.query_drop(statement).await.unwrap();
    }
    wait_for("the cancelled guest order", || async {
        ledger
            .scalar("SELECT count(*) FROM orders WHERE stage = 'cancelled'")
            .await
            == 1
    })
    .await;
    assert_eq!(
        ledger.member_by_email("jonas@shop-kunden.de").await,
        Some((75, 0, 75, Some("silver".into()))),
        "100 = 130 − 19 tax − 11 shipping (silver reached, kept until the period ends); the refund of 32.50 of \
         130 takes a quarter; the guest order's 10 were voided"
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM member_identifiers WHERE kind = 'phone' AND value = '+4930555123'")
            .await,
        1,
        "the phone from the customer's profile meta"
    );
    assert_eq!(ledger.scalar("SELECT count(*) FROM members").await, 1);
    assert!(ledger.quarantine_reasons().await.is_empty());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("pipeline stops")
        .unwrap();
}

#[tokio::test]
async fn saleor_orders_and_granted_refunds_book_exact_points() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let saleor_db = PgDatabase::create("saleor").await;
    saleor_db.load_schema("saleor.postgres.sql").await;
    let saleor = saleor_db.client().await;
    saleor
        .batch_execute(
            "INSERT INTO channel_channel (id, name, is_active, slug, currency_code, default_country)
               VALUES (1, 'Germany', true, 'de', 'EUR', 'DE');",
        )
        .await
        .unwrap();
    let sources = one_source(
        "saleor",
        "postgres",
        &saleor_db.url(),
        "saleor.toml",
        &format!("slot = \"{0}\"\npublication = \"{0}\"", saleor_db.name),
    );
    let (_path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;

    let order = "8f0c2d4e-1111-4a5b-9c3d-000000000001";
    // Checkout completes: order and line in one transaction, not paid yet.
    saleor
        .batch_execute(&format!(
            "BEGIN;
             INSERT INTO account_address (id, first_name, last_name, company_name, street_address_1, street_address_2,
                 city, city_area, postal_code, country, country_area, phone, validation_skipped)
               VALUES (5, 'Mia', 'Koch', '', 'Hauptstr. 1', '', 'Berlin', '', '10115', 'DE', '', '+4915112345678', false);
             INSERT INTO order_order (id, number, use_old_id, created_at, updated_at, status, authorize_status,
                 charge_status, language_code, billing_address_id, user_email, origin, currency, channel_id,
                 shipping_price_net_amount, shipping_price_gross_amount, checkout_token, lines_count,
                 total_net_amount, undiscounted_total_net_amount, total_gross_amount, undiscounted_total_gross_amount,
                 total_charged_amount, total_authorized_amount, subtotal_net_amount, subtotal_gross_amount, customer_note)
               VALUES ('{order}', 1, false, now(), now(), 'unfulfilled', 'none', 'none', 'de', 5, 'Mia.Koch@Posteo.de',
                 'checkout', 'EUR', 1, 10, 11.90, '', 1, 90, 90, 107.10, 107.10, 0, 0, 80, 95.20, '');
             INSERT INTO order_orderline (id, created_at, order_id, product_name, variant_name, is_shipping_required, is_gift_card,
                 quantity, quantity_fulfilled, is_gift, currency, unit_discount_amount, unit_price_net_amount,
                 unit_discount_value, unit_price_gross_amount, total_price_net_amount, total_price_gross_amount,
                 undiscounted_unit_price_gross_amount, undiscounted_unit_price_net_amount,
                 undiscounted_total_price_gross_amount, undiscounted_total_price_net_amount,
                 base_unit_price_amount, undiscounted_base_unit_price_amount, product_sku)
               VALUES ('8f0c2d4e-2222-4a5b-9c3d-000000000001', now(), '{order}', 'Tea', '500 g', true, false, 2, 0, false, 'EUR',
                 0, 40, 0, 47.60, 80, 95.20, 47.60, 40, 95.20, 80, 40, 40, 'TEA-500');
             COMMIT;
             UPDATE order_order SET charge_status = 'full', total_charged_amount = 107.10 WHERE id = '{order}';"
        ))
        .await
        .unwrap();
    wait_for("the paid order to be pending", || async {
        ledger
            .member_by_email("mia.koch@posteo.de")
            .await
            .map(|m| m.1)
            == Some(80)
    })
    .await;
    saleor
        .batch_execute(&format!(
            "UPDATE order_order SET status = 'fulfilled' WHERE id = '{order}';
             INSERT INTO order_ordergrantedrefund (id, created_at, updated_at, amount_value, currency, reason, order_id,
                 shipping_costs_included, status)
               VALUES (1, now(), now(), 26.775, 'EUR', 'damaged', '{order}', false, 'pending');
             UPDATE order_ordergrantedrefund SET status = 'success' WHERE id = 1;"
        ))
        .await
        .unwrap();
    wait_for("the granted refund", || async {
        ledger.scalar("SELECT count(*) FROM order_refunds").await == 1
    })
    .await;
    assert_eq!(
        ledger.member_by_email("mia.koch@posteo.de").await,
        Some((60, 0, 60, Some("base".into()))),
        "80 = 90 net − 10 shipping; 26.775 of 107.10 gross refunded takes a quarter"
    );
    // Lines travel with the order's own transaction: here the checkout,
    // while the order was not paid yet (ignored), so the booked order has
    // none itemized (its amounts come from the header).
    assert_eq!(
        ledger
            .scalar("SELECT lines::bigint FROM orders WHERE source = 'saleor'")
            .await,
        0
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM member_identifiers WHERE kind = 'phone' AND value = '+4915112345678'")
            .await,
        1
    );
    assert!(ledger.quarantine_reasons().await.is_empty());
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), handle)
        .await
        .expect("pipeline stops")
        .unwrap();
}

/// Issue 7's end to end: a tier upgrade caused by a Magento order arrives
/// at a local receiver as a signed webhook; the history a snapshot copies
/// in fires nothing; each occasion fires once.
#[tokio::test]
async fn a_magento_order_that_crosses_a_tier_arrives_as_a_signed_webhook() {
    crate::support::init_logging();
    let receiver =
        crate::support::receiver::Receiver::start(crate::support::receiver::Reply::status(204))
            .await;
    let ledger_db = PgDatabase::create("ledger").await;
    let shop_db = MyDatabase::create("shop").await;
    let mut shop = magento_shop(&shop_db).await;
    // History before loyalty-cdc starts: Anna (customer 7) bought for 150
    // (silver, her first purchase).
    magento_order(
        &mut shop,
        1,
        Some(7),
        "Anna.Schmidt@Example.DE",
        "complete",
        Some("150.0000"),
        "0",
        &[("MUG", None, "150.0000")],
    )
    .await;
    let secret = crate::support::WEBHOOK_SECRET;
    let server_id = 3_600_000_000u64 + u64::from(std::process::id() % 100_000);
    let sources = format!(
        r#"
[[sources]]
name = "shop"
kind = "mysql"
url = "{shop}"
mapping = "{connectors}/magento2.toml"
server_id = {server_id}

[triggers.milestones]
purchases = [1, 2]
{provider}
[[triggers.routes]]
trigger = "tier_upgrade"
provider = "crm"

[[triggers.routes]]
trigger = "milestone"
provider = "crm"

[[triggers.routes]]
trigger = "welcome"
provider = "crm"
"#,
        shop = shop_db.url(),
        connectors = connectors().display(),
        provider =
            crate::support::webhook_provider("crm", &format!("{}/loyalty-events", receiver.url)),
    );
    let (_path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((150, 0, 150, Some("silver".into())))
    );
    assert_eq!(
        ledger
            .scalar("SELECT count(*) FROM trigger_marks WHERE announced")
            .await,
        0,
        "the snapshot's history reached its marks silently"
    );

    // Live: Anna orders for 1000 (gold at 1000 lifetime points: 1150), and
    // Ben opens an account.
    magento_order(
        &mut shop,
        2,
        Some(7),
        "Anna.Schmidt@Example.DE",
        "complete",
        Some("1000.0000"),
        "0",
        &[("TV", None, "1000.0000")],
    )
    .await;
    shop.query_drop(
        "INSERT INTO customer_entity (entity_id, website_id, store_id, email) VALUES (8, 1, 1, 'ben@shop.de')",
    )
    .await
    .unwrap();

    let requests = receiver.wait_for(3).await;
    let verifier = standardwebhooks::Webhook::new(secret).unwrap();
    let mut events: Vec<(String, serde_json::Value)> = Vec::new();
    for request in &requests {
        assert_eq!(request.path, "/loyalty-events");
        verifier
            .verify(&request.body, &request.headers)
            .expect("signed per Standard Webhooks");
        let body = request.json();
        assert_eq!(
            request.header("webhook-id"),
            body["data"]["message_id"].as_str(),
            "the webhook-id is the message id"
        );
        events.push((
            body["type"].as_str().unwrap().to_string(),
            body["data"]["trigger_data"].clone(),
        ));
    }
    events.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        events,
        [
            (
                "loyalty.milestone".to_string(),
                serde_json::json!({ "milestone": "purchases", "value": 2 })
            ),
            (
                "loyalty.tier_upgrade".to_string(),
                serde_json::json!({ "tier": "gold", "previous_tier": "silver" })
            ),
            ("loyalty.welcome".to_string(), serde_json::json!({})),
        ]
    );
    let gold = requests
        .iter()
        .map(|r| r.json())
        .find(|b| b["type"] == "loyalty.tier_upgrade")
        .unwrap();
    assert_eq!(gold["data"]["member"]["tier"], "gold");
    assert_eq!(gold["data"]["member"]["points"]["lifetime"], 1150);
    wait_for("the deliveries to be recorded", || async {
        ledger
            .scalar("SELECT count(*) FROM outbox WHERE status = 'sent'")
            .await
            == 3
    })
    .await;

    // The same order written again (an update that changes nothing the
    // ledger counts) fires nothing more.
    shop.query_drop("UPDATE sales_order SET status = 'complete' WHERE entity_id = 2")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ledger.scalar("SELECT count(*) FROM outbox").await, 3);
    assert_eq!(receiver.requests().len(), 3);

    shutdown.cancel();
    handle.await.unwrap();
}

/// The offer catalog: a tier upgrade carries the eligible offer of highest
/// priority, and the member's next purchase earns with it — once, whether
/// that purchase arrives in the same ledger batch as the trigger or later.
#[tokio::test]
async fn a_tier_upgrade_offer_doubles_the_next_purchase_once() {
    crate::support::init_logging();
    let receiver =
        crate::support::receiver::Receiver::start(crate::support::receiver::Reply::status(202))
            .await;
    let ledger_db = PgDatabase::create("ledger").await;
    let shop_db = MyDatabase::create("shop").await;
    let mut shop = magento_shop(&shop_db).await;
    let server_id = 3_700_000_000u64 + u64::from(std::process::id() % 100_000);
    let sources = format!(
        r#"
[[sources]]
name = "shop"
kind = "mysql"
url = "{shop}"
mapping = "{connectors}/magento2.toml"
server_id = {server_id}

[[offers]]
code = "ANY-50"
title = "50 bonus points"
bonus_points = 50
priority = 1

[[offers]]
code = "GOLD-2X"
title = "Double points on your next order"
triggers = ["tier_upgrade"]
tiers = ["gold"]
multiplier = "2"
valid_days = 14
priority = 10

[[offers]]
code = "EXPIRED"
title = "Gone"
multiplier = "5"
available_until = "2020-01-01"
priority = 99
{provider}
[[triggers.routes]]
trigger = "tier_upgrade"
provider = "crm"
"#,
        shop = shop_db.url(),
        connectors = connectors().display(),
        provider = crate::support::webhook_provider("crm", &format!("{}/events", receiver.url)),
    );
    let (_path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;

    // 1,000: gold (the upgrade carries GOLD-2X); the next order, right
    // behind it (often in the same batch), earns 2 × 100; the one after
    // that 100 (an offer is redeemed once).
    magento_order(
        &mut shop,
        1,
        Some(7),
        "Anna.Schmidt@Example.DE",
        "complete",
        Some("1000.0000"),
        "0",
        &[("TV", None, "1000.0000")],
    )
    .await;
    // The binlog's commit times have whole seconds: the next purchase is
    // the first one in a later second than the trigger's.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    magento_order(
        &mut shop,
        2,
        Some(7),
        "Anna.Schmidt@Example.DE",
        "complete",
        Some("100.0000"),
        "0",
        &[("MUG", None, "100.0000")],
    )
    .await;
    magento_order(
        &mut shop,
        3,
        Some(7),
        "Anna.Schmidt@Example.DE",
        "complete",
        Some("100.0000"),
        "0",
        &[("CUP", None, "100.0000")],
    )
    .await;
    wait_for("the three orders", || async {
        ledger.scalar("SELECT count(*) FROM orders").await == 3
    })
    .await;
    let requests = receiver.wait_for(1).await;
    let body = requests[0].json();
    assert_eq!(body["type"], "loyalty.tier_upgrade");
    assert_eq!(body["data"]["offer"]["code"], "GOLD-2X");
    assert_eq!(body["data"]["offer"]["multiplier"], "2");
    wait_for("the offer to be redeemed", || async {
        ledger
            .scalar("SELECT count(*) FROM member_offers WHERE redeemed_at IS NOT NULL")
            .await
            == 1
    })
    .await;
    assert_eq!(
        ledger.member_by_email("anna.schmidt@example.de").await,
        Some((1300, 0, 1300, Some("gold".into()))),
        "1,000 + 2 × 100 + 100"
    );
    assert_eq!(
        ledger
            .scalar("SELECT points FROM orders WHERE order_ref = '2'")
            .await,
        200,
        "the bonus is part of the order's points (a refund claws it back in proportion)"
    );
    shutdown.cancel();
    handle.await.unwrap();

    // While the service is down, Ben reaches gold and orders again a
    // second later: on restart both land in one ledger batch, and the
    // trigger (judged at the batch's commit) still gives his second order
    // the offer. His account and first order share one binlog second: a
    // first order in a later second than the account would redeem the
    // welcome's ANY-50 itself (granted strictly before it).
    at_the_start_of_a_second().await;
    shop.query_drop(
        "INSERT INTO customer_entity (entity_id, website_id, store_id, email) VALUES (8, 1, 1, 'ben@shop.de')",
    )
    .await
    .unwrap();
    magento_order(
        &mut shop,
        4,
        Some(8),
        "ben@shop.de",
        "complete",
        Some("1000.0000"),
        "0",
        &[("TV", None, "1000.0000")],
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    magento_order(
        &mut shop,
        5,
        Some(8),
        "ben@shop.de",
        "complete",
        Some("100.0000"),
        "0",
        &[("MUG", None, "100.0000")],
    )
    .await;
    let (_path, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    wait_for("Ben's orders", || async {
        ledger.scalar("SELECT count(*) FROM orders").await == 5
    })
    .await;
    assert_eq!(
        ledger.member_by_email("ben@shop.de").await,
        Some((1200, 0, 1200, Some("gold".into()))),
        "1,000 + 2 × 100, booked in one batch"
    );
    assert_eq!(
        ledger
            .scalar(
                "SELECT count(*) FROM member_offers WHERE code = 'ANY-50' AND redeemed_at IS NULL"
            )
            .await,
        1,
        "his welcome carried ANY-50 too; the more generous GOLD-2X took his next purchase"
    );
    shutdown.cancel();
    handle.await.unwrap();
}

/// The ledger's connections are killed again and again while orders
/// stream: the batch being booked is lost with its connection while the
/// next one is being read, and the reader re-sends both from the durable
/// position. Every order is booked once, to the point.
#[tokio::test]
async fn ledger_connections_killed_mid_stream_lose_and_double_nothing() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let pos = odoo_pos(&pos_db).await;
    pos.batch_execute(
        "INSERT INTO res_partner (id, name, type, email)
           SELECT 100 + n, 'Member ' || n, 'contact', 'member' || n || '@example.de'
             FROM generate_series(0, 9) n;",
    )
    .await
    .unwrap();
    let sources = one_source(
        "pos",
        "postgres",
        &pos_db.url(),
        "odoo-pos.toml",
        &format!("slot = \"{0}\"\npublication = \"{0}\"", pos_db.name),
    );
    let (_, settings) = write_config(&ledger_db, &sources);
    let (shutdown, handle) = start(settings).await;
    let ledger = Ledger::new(&ledger_db).await;
    let admin = crate::support::pg_connect(&crate::support::pg_admin_url()).await;

    // 600 sales of 10.00 goods (+ 1.00 tax), ten members in turn; every
    // 50 the ledger's sessions are terminated, twice while the stream is
    // busy.
    let mut killed = 0;
    for id in 1..=600i64 {
        pos.batch_execute(&format!(
            "BEGIN;
             INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                    partner_id, config_id, is_refund, state)
               VALUES ({id}, 'T/{id}', 1, 11, 11, 0, 1, {partner}, 1, false, 'paid');
             INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
               VALUES ({id}, 'L', 1, 1, 10, 11, {id});
             COMMIT;",
            partner = 100 + id % 10
        ))
        .await
        .unwrap();
        if id % 50 == 25 {
            killed += admin
                .query_one(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                      WHERE datname = $1 AND application_name = 'loyalty-cdc'
                        AND query ~ '(reference_rows|orders|BEGIN|COMMIT|source_positions)'",
                    &[&ledger_db.name],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
        }
    }
    wait_for("every sale to be booked", || async {
        ledger.scalar("SELECT count(*) FROM orders").await == 600
    })
    .await;
    assert!(
        killed >= 2,
        "the ledger's sessions were terminated {killed} times"
    );
    let earnings = ledger
        .client
        .query(
            "SELECT kind, count(*) FROM ledger_entries GROUP BY kind ORDER BY kind",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect::<Vec<_>>();
    assert_eq!(
        earnings,
        [("earn_available".to_string(), 600)],
        "one earning per sale, none twice"
    );
    for n in 0..10 {
        assert_eq!(
            ledger
                .member_by_email(&format!("member{n}@example.de"))
                .await,
            Some((600, 0, 600, Some("silver".into()))),
            "member {n}: 60 sales of 10 points"
        );
    }
    shutdown.cancel();
    handle.await.unwrap();
}
