//! Exactly-once under crashes: the real binary runs `loyalty-cdc run` on an
//! Odoo POS (PostgreSQL) and a Magento 2 shop (MariaDB) while both take
//! orders; it is killed with SIGKILL at random moments and restarted, over
//! and over. Afterwards the ledger must equal what the test computes
//! independently from the orders it wrote: no point lost, none doubled.

#[path = "it/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use support::reader::wait_for;
use support::{binary, MyDatabase, PgDatabase};

const MEMBERS: u32 = 20;
const POS_ORDERS: u32 = 600;
const SHOP_ORDERS: u32 = 600;
const KILLS: usize = 6;

fn email(k: u32) -> String {
    format!("member{}@mail.de", k % MEMBERS)
}

/// POS order k: net (amount_total − amount_tax) = 10.5 + k % 50.
fn pos_points(k: u32) -> i64 {
    i64::from(10 + k % 50)
}

/// Shop order k: base_subtotal 20.99 + k % 30, discount −1.00.
fn shop_points(k: u32) -> i64 {
    i64::from(19 + k % 30)
}

/// A small deterministic generator: the seed is printed, so a failing run
/// can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn spawn_run(config: &std::path::Path) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ledger_crash.log"))
        .unwrap();
    tokio::process::Command::new(binary())
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start loyalty-cdc run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_service_at_random_moments_loses_and_doubles_nothing() {
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let shop_db = MyDatabase::create("shop").await;
    pos_db.load_schema("odoo-pos.postgres.sql").await;
    shop_db.load_magento().await;
    let pos = pos_db.client().await;
    pos.batch_execute(
        "INSERT INTO res_currency (id, name, symbol) VALUES (1, 'EUR', '€');
         INSERT INTO res_partner (id, name, type, is_company) VALUES (1, 'Store', 'contact', true);
         INSERT INTO res_company (id, name, partner_id, currency_id) VALUES (1, 'Store', 1, 1);
         INSERT INTO product_template (id, name) VALUES (1, '{\"en_US\": \"Coffee\"}');
         INSERT INTO product_product (id, default_code, product_tmpl_id) VALUES (1, 'COF', 1);
         INSERT INTO pos_config (id, name, currency_id, company_id) VALUES (1, 'Till 1', 1, 1);",
    )
    .await
    .unwrap();
    let mut shop = shop_db.conn().await;
    shop.query_drop(
        "INSERT INTO store_website (website_id, code, name) VALUES (1, 'base', 'Main');
         INSERT INTO store (store_id, code, website_id, name) VALUES (1, 'default', 1, 'Default')",
    )
    .await
    .unwrap();

    let connectors =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/sources");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loyalty-cdc.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[ledger]
url = "{ledger}"

[api]
listen = "127.0.0.1:0"

[program]
points_per_currency_unit = 1

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
            ledger = ledger_db.url(),
            pos = pos_db.url(),
            slot = pos_db.name,
            shop = shop_db.url(),
            connectors = connectors.display(),
            server_id = 3_600_000_000u64 + u64::from(std::process::id() % 100_000),
        ),
    )
    .unwrap();

    let seed = std::env::var("LCDC_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(std::process::id()) * 0x9E37_79B9 + 1);
    eprintln!("crash test seed: {seed} (LCDC_CRASH_SEED={seed} repeats the kill timing)");
    let mut rng = Rng(seed);

    let _ = std::fs::remove_file(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("ledger_crash.log"),
    );
    eprintln!(
        "service log: {}/ledger_crash.log",
        env!("CARGO_TARGET_TMPDIR")
    );
    let mut service = spawn_run(&config);
    let ledger = ledger_db.client().await;
    wait_for("both sources to stream", || async {
        ledger
            .query_one(
                "SELECT count(*) FROM source_positions WHERE state = 'streaming'",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == 2)
            .unwrap_or(false)
    })
    .await;

    // The writers: the till and the shop take orders while the service is
    // killed and restarted.
    let pos_writer = tokio::spawn(async move {
        for k in 0..POS_ORDERS {
            let id = (k + 1) as i32;
            let partner = (k % MEMBERS + 100) as i32;
            let net = rust_decimal::Decimal::new(105, 1) + rust_decimal::Decimal::from(k % 50);
            let total = net + rust_decimal::Decimal::ONE;
            let tx_sql = format!(
                "BEGIN;
                 INSERT INTO res_partner (id, name, type, email) VALUES ({partner}, 'M', 'contact', '{email}')
                   ON CONFLICT (id) DO NOTHING;
                 INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                        partner_id, config_id, is_refund, state)
                   VALUES ({id}, 'T/{id}', 1, {total}, {total}, 0, 1, {partner}, 1, false, 'paid');
                 INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
                   VALUES ({id}, 'L', 1, 1, {net}, {total}, {id});
                 COMMIT;",
                email = email(k),
            );
            pos.batch_execute(&tx_sql).await.unwrap();
            if k % 3 == 0 {
                // The session closes: `done` is the same sale.
                pos.execute("UPDATE pos_order SET state = 'done' WHERE id = $1", &[&id])
                    .await
                    .unwrap();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let shop_writer = tokio::spawn(async move {
        for k in 0..SHOP_ORDERS {
            let id = k + 1;
            let subtotal = format!("{}.99", 20 + k % 30);
            let mut tx = shop.start_transaction(Default::default()).await.unwrap();
            tx.exec_drop(
                "INSERT INTO sales_order (entity_id, state, status, store_id, customer_email, customer_is_guest,
                     base_subtotal, base_discount_amount, base_grand_total, base_currency_code, increment_id)
                 VALUES (?, 'new', 'pending', 1, ?, 1, ?, -1.00, 0, 'EUR', ?)",
                (id, email(k), &subtotal, format!("S{id}")),
            )
            .await
            .unwrap();
            tx.exec_drop(
                "INSERT INTO sales_order_item (order_id, product_type, sku, qty_ordered, base_row_total, row_total)
                 VALUES (?, 'simple', 'MUG', 1, ?, ?)",
                (id, &subtotal, &subtotal),
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            shop.exec_drop(
                "UPDATE sales_order SET state = 'complete', status = 'complete' WHERE entity_id = ?",
                (id,),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });

    for kill in 0..KILLS {
        let pause = 300 + rng.next() % 900;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        service.kill().await.expect("SIGKILL loyalty-cdc");
        eprintln!("kill {} after {pause} ms", kill + 1);
        service = spawn_run(&config);
    }
    pos_writer.await.unwrap();
    shop_writer.await.unwrap();

    // Expected, from the orders written.
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    for k in 0..POS_ORDERS {
        *expected.entry(email(k)).or_default() += pos_points(k);
    }
    for k in 0..SHOP_ORDERS {
        *expected.entry(email(k)).or_default() += shop_points(k);
    }
    let total: i64 = expected.values().sum();

    wait_for("every order to be booked", || async {
        ledger
            .query_one(
                "SELECT count(*) FILTER (WHERE stage = 'completed') FROM orders",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0) == i64::from(POS_ORDERS + SHOP_ORDERS))
            .unwrap_or(false)
    })
    .await;
    service.kill().await.unwrap();

    let booked: BTreeMap<String, i64> = ledger
        .query(
            "SELECT i.value, b.available FROM member_identifiers i JOIN balances b USING (member_id)
              WHERE i.kind = 'email'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(booked, expected, "every member's points, exactly");
    let (available, pending, lifetime, entries): (i64, i64, i64, i64) = ledger
        .query_one(
            "SELECT (SELECT sum(available)::bigint FROM balances), (SELECT sum(pending)::bigint FROM balances),
                    (SELECT sum(lifetime)::bigint FROM balances), (SELECT count(*) FROM ledger_entries)",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .unwrap();
    assert_eq!((available, pending, lifetime), (total, 0, total));
    assert_eq!(
        entries,
        i64::from(POS_ORDERS + 3 * SHOP_ORDERS),
        "one entry per POS sale, three per shop order (pending, release, available)"
    );
    let members: i64 = ledger
        .query_one(
            "SELECT count(*) FROM members WHERE merged_into IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(members, i64::from(MEMBERS));

    // And the operator's own check: every balance recomputed from the
    // entries alone agrees (members merged away keep their rows too).
    let with_balances: i64 = ledger
        .query_one(
            "SELECT count(*) FROM (SELECT member_id FROM balances UNION SELECT member_id FROM ledger_entries) m",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let verify = tokio::process::Command::new(binary())
        .arg("--config")
        .arg(&config)
        .args(["ledger", "verify"])
        .output()
        .await
        .expect("run loyalty-cdc ledger verify");
    assert_eq!(
        (
            verify.status.code(),
            String::from_utf8_lossy(&verify.stdout).into_owned()
        ),
        (
            Some(0),
            format!(
                "ok    the balances of {with_balances} member(s) agree with their {entries} entries\n"
            )
        ),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
