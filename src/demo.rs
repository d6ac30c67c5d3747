//! `loyalty-cdc demo`: the whole pipeline on the local databases. A point
//! of sale database with the Odoo POS schema and a web shop database with
//! the Magento 2 schema are created fresh, a local provider receiver
//! checks every webhook's signature, the pipeline and the HTTP listener
//! run in this process, and generated customers shop in store and online
//! (some are refunded, some stop coming) while a live view shows orders/s,
//! lag per source, members per tier and triggers delivered by kind.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use tokio_util::sync::CancellationToken;

use crate::config::{DatabaseUrl, Settings};
use crate::delivery::sign::SigningKey;
use crate::pipeline::RunningSource;
use crate::source::progress::ReaderState;

const POS_DB: &str = "loyalty_demo_pos";
const LEDGER_DB: &str = "loyalty_demo_ledger";
const SHOP_DB: &str = "loyalty_demo_shop";

/// What `demo` is told.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub duration: Duration,
    /// The HTTP listener (metrics, health, the member API).
    pub listen: SocketAddr,
    /// PostgreSQL as a user that may create databases.
    pub postgres: String,
    /// MariaDB/MySQL as a user that may create databases.
    pub mysql: String,
    /// Where the configuration goes.
    pub dir: PathBuf,
    /// The shared schema files (`odoo-pos.postgres.sql`,
    /// `magento2.mysql.sql`): the real Odoo POS and Magento 2 layouts the
    /// mappings and tests use.
    pub schemas: PathBuf,
    pub customers: u32,
    /// Orders per second generated.
    pub rate: f64,
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{what}: {detail}\n  fix: {fix}")]
    Setup {
        what: String,
        detail: String,
        fix: String,
    },
    #[error("the pipeline stopped: {0}")]
    Pipeline(String),
}

fn setup(what: &str, detail: impl std::fmt::Display, fix: &str) -> DemoError {
    DemoError::Setup {
        what: what.into(),
        detail: detail.to_string(),
        fix: fix.into(),
    }
}

const FIX_DATABASES: &str = "bash docker/setup-local-databases.sh (configures and starts the local PostgreSQL and MariaDB), or give --postgres / --mysql URLs of servers where this user may create databases";

/// What the demo reports while it runs; the command line shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// A step begins (one line).
    Step(String),
    /// The live view, twice a second while traffic runs (several lines).
    View(String),
    /// The last view, once everything caught up.
    Final(String),
}

/// What the demo did, printed at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub orders_written: u64,
    pub refunds_written: u64,
    pub orders_in_ledger: i64,
    pub ledger_entries: i64,
    pub members: i64,
    pub delivered: BTreeMap<String, u64>,
    pub unsigned: u64,
    /// The demo's configuration, for the commands to try afterwards.
    pub config: PathBuf,
}

impl Summary {
    pub fn delivered_total(&self) -> u64 {
        self.delivered.values().sum()
    }
}

/// Webhooks the local receiver accepted, by type; bad signatures apart.
#[derive(Default)]
struct Received {
    by_type: BTreeMap<String, u64>,
    unsigned: u64,
}

/// The local provider: a Standard Webhooks receiver on 127.0.0.1 that
/// checks each signature (webhook-id, webhook-timestamp, body) with the
/// demo's secret and counts events by type.
async fn start_receiver(
    key: SigningKey,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, Arc<Mutex<Received>>), DemoError> {
    let received = Arc::new(Mutex::new(Received::default()));
    let counts = Arc::clone(&received);
    let key = Arc::new(key);
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let counts = Arc::clone(&counts);
            let key = Arc::clone(&key);
            async move {
                let header = |name: &str| {
                    headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let id = header("webhook-id");
                let timestamp: i64 = header("webhook-timestamp").parse().unwrap_or(0);
                let expected = key.sign(&id, timestamp, &body);
                let signed = header("webhook-signature")
                    .split(' ')
                    .any(|s| !s.is_empty() && s == expected);
                let kind = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["type"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "?".into());
                let mut counts = counts.lock().unwrap_or_else(|p| p.into_inner());
                if signed {
                    *counts.by_type.entry(kind).or_default() += 1;
                    axum::http::StatusCode::NO_CONTENT
                } else {
                    counts.unsigned += 1;
                    axum::http::StatusCode::UNAUTHORIZED
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| setup("local receiver", e, "free a local port"))?;
    let address = listener
        .local_addr()
        .map_err(|e| setup("local receiver", e, "free a local port"))?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok((address, received))
}

/// A URL with another database name.
fn with_database(url: &str, database: &str) -> Result<String, DemoError> {
    let mut parsed = url::Url::parse(url).map_err(|e| {
        setup(
            "database URL",
            e,
            "give e.g. postgres://postgres@127.0.0.1:5432",
        )
    })?;
    parsed.set_path(database);
    Ok(parsed.to_string())
}

async fn pg(url: &str) -> Result<tokio_postgres::Client, DemoError> {
    let url = DatabaseUrl::try_from(url.to_string()).map_err(|e| {
        setup(
            "PostgreSQL URL",
            e,
            "give e.g. postgres://postgres@127.0.0.1:5432",
        )
    })?;
    crate::connect::postgres(&url, None)
        .await
        .map_err(|e| setup("PostgreSQL", e, FIX_DATABASES))
}

async fn my(url: &str) -> Result<mysql_async::Conn, DemoError> {
    let url = DatabaseUrl::try_from(url.to_string())
        .map_err(|e| setup("MariaDB URL", e, "give e.g. mysql://root@127.0.0.1:3306"))?;
    crate::connect::mysql(&url, None)
        .await
        .map_err(|e| setup("MariaDB", e, FIX_DATABASES))
}

/// Fresh demo databases with the real schemas and the shops' own setup
/// rows (currency, company, till, product; website and store).
/// One of the shared schema files.
fn schema(options: &DemoOptions, file: &str) -> Result<String, DemoError> {
    let path = options.schemas.join(file);
    std::fs::read_to_string(&path).map_err(|e| {
        setup(
            &format!("schema file {}", path.display()),
            e,
            "give --schemas the directory of the shared schemas (../shared/schemas beside the clone), or set LOYALTY_SHARED_SCHEMAS",
        )
    })
}

async fn create_databases(options: &DemoOptions) -> Result<(), DemoError> {
    let odoo_schema = schema(options, "odoo-pos.postgres.sql")?;
    let magento_schema = schema(options, "magento2.mysql.sql")?;
    let admin = pg(&with_database(&options.postgres, "postgres")?).await?;
    let fail = |e: tokio_postgres::Error| {
        setup("PostgreSQL", crate::ledger::db::describe(&e), FIX_DATABASES)
    };
    // One statement at a time: DROP and CREATE DATABASE refuse to run
    // inside the implicit transaction of a multi-statement string.
    for statement in [
        format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{POS_DB}'"),
        format!("DROP DATABASE IF EXISTS {POS_DB} WITH (FORCE)"),
        format!("DROP DATABASE IF EXISTS {LEDGER_DB} WITH (FORCE)"),
        format!("CREATE DATABASE {POS_DB}"),
        format!("CREATE DATABASE {LEDGER_DB}"),
    ] {
        admin.batch_execute(&statement).await.map_err(fail)?;
    }
    let pos = pg(&with_database(&options.postgres, POS_DB)?).await?;
    pos.batch_execute(&odoo_schema).await.map_err(fail)?;
    pos.batch_execute(
        "INSERT INTO res_currency (id, name, symbol) VALUES (1, 'EUR', '€');
         INSERT INTO res_partner (id, name, type, is_company) VALUES (1, 'Demo Store GmbH', 'contact', true);
         INSERT INTO res_company (id, name, partner_id, currency_id) VALUES (1, 'Demo Store GmbH', 1, 1);
         INSERT INTO product_template (id, name) VALUES (1, '{\"en_US\": \"Coffee beans 1 kg\"}');
         INSERT INTO product_product (id, default_code, product_tmpl_id) VALUES (1, 'COF-1KG', 1);
         INSERT INTO pos_config (id, name, currency_id, company_id) VALUES (1, 'Berlin Mitte', 1, 1);",
    )
    .await
    .map_err(fail)?;
    let mut admin = my(&with_database(&options.mysql, "")?).await?;
    let fail = |e: mysql_async::Error| setup("MariaDB", e, FIX_DATABASES);
    admin
        .query_drop(format!(
            "DROP DATABASE IF EXISTS {SHOP_DB}; CREATE DATABASE {SHOP_DB}"
        ))
        .await
        .map_err(fail)?;
    let _ = admin.disconnect().await;
    let mut shop = my(&with_database(&options.mysql, SHOP_DB)?).await?;
    shop.query_drop(magento_schema).await.map_err(fail)?;
    // Wishlists and catalog prices (the shared subset has none).
    shop.query_drop(include_str!(
        "../connectors/schemas/magento2-catalog.mysql.sql"
    ))
    .await
    .map_err(fail)?;
    shop.query_drop(
        "INSERT INTO store_website (website_id, code, name) VALUES (1, 'base', 'Main Website');
         INSERT INTO store (store_id, code, website_id, name) VALUES (1, 'default', 1, 'Default Store View')",
    )
    .await
    .map_err(fail)?;
    let _ = shop.disconnect().await;
    Ok(())
}

/// The demo's configuration: both sources with the shipped mappings, a
/// three-tier program, triggers to the local receiver, a welcome offer.
fn configuration(options: &DemoOptions, receiver: SocketAddr, secret: &str) -> String {
    let root = env!("CARGO_MANIFEST_DIR");
    format!(
        r#"# Written by `loyalty-cdc demo`.
[ledger]
url = "{ledger}"

[api]
listen = "{listen}"

[[sources]]
name = "pos"
kind = "postgres"
url = "{pos}"
mapping = "{root}/connectors/sources/odoo-pos.toml"

[[sources]]
name = "shop"
kind = "mysql"
url = "{shop}"
mapping = "{root}/connectors/sources/magento2.toml"
server_id = {server_id}

[program]
points_per_currency_unit = 1
tiers = [
  {{ name = "member", threshold = 0 }},
  {{ name = "silver", threshold = 500 }},
  {{ name = "gold", threshold = 1500 }},
]

[identity]
default_region = "DE"

[[providers]]
name = "crm"
template = "{root}/connectors/providers/webhook.toml"
base_url = "http://{receiver}/loyalty-events"
secrets.signing_secret = "{secret}"
rate_per_second = 1000

[triggers]
scheduler_interval_seconds = 5

[triggers.milestones]
purchases = [1, 5, 10]

[[triggers.routes]]
trigger = "welcome"
provider = "crm"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "crm"

[[triggers.routes]]
trigger = "milestone"
provider = "crm"

[[triggers.routes]]
trigger = "points_earned"
provider = "crm"

[[triggers.routes]]
trigger = "segment_entered"
provider = "crm"

[[triggers.routes]]
trigger = "price_drop"
provider = "crm"

[[segments]]
name = "new"
when = "features.lifecycle == 'new'"

[[segments]]
name = "high_value"
when = "features.monetary >= 300.0"

[[offers]]
code = "WELCOME-50"
title = "50 bonus points on your next purchase"
triggers = ["welcome"]
bonus_points = 50
valid_days = 30

[[offers]]
code = "WISHLIST-3X"
title = "Triple points on what you wished for"
triggers = ["price_drop"]
multiplier = "3"
valid_days = 7

[[offers]]
code = "VIP-2X"
title = "Double points, for our best customers"
segments = ["high_value"]
multiplier = "2"
valid_days = 14
priority = 5
"#,
        ledger = with_database(&options.postgres, LEDGER_DB).unwrap_or_default(),
        pos = with_database(&options.postgres, POS_DB).unwrap_or_default(),
        shop = with_database(&options.mysql, SHOP_DB).unwrap_or_default(),
        listen = options.listen,
        // A replica id of its own per process: two readers with one id
        // would throw each other off the server.
        server_id = 3_900_000_000u64 + u64::from(std::process::id() % 100_000),
    )
}

/// A small deterministic generator (xorshift): the traffic is the same
/// on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Writes the shops' traffic the way the applications do.
struct Traffic {
    pos: tokio_postgres::Client,
    shop: mysql_async::Conn,
    rng: Rng,
    customers: u32,
    next_pos_order: i64,
    next_shop_order: u32,
    /// POS orders per customer (order id, line id, goods amount), for
    /// refunds.
    pos_orders: Vec<(i64, i64, u32, u32)>,
    orders: u64,
    refunds: u64,
    /// Whether the wishlisted tent's price was cut.
    price_cut: bool,
}

/// The shop cuts the wishlisted tent's price once, after this many orders:
/// the customers waiting for it are told. (Once: a second cut within a
/// day would meet the `price_drop` cooldown of the delivery policy.)
const ORDERS_BEFORE_PRICE_CUT: u64 = 60;

impl Traffic {
    async fn new(options: &DemoOptions) -> Result<Self, DemoError> {
        let pos = pg(&with_database(&options.postgres, POS_DB)?).await?;
        let mut shop = my(&with_database(&options.mysql, SHOP_DB)?).await?;
        // The customers: in the POS (with phone and loyalty card) and,
        // every other one, an account in the shop with the same email.
        let mut partners = String::new();
        for c in 1..=options.customers {
            partners.push_str(&format!(
                "INSERT INTO res_partner (id, name, type, email, phone, barcode) VALUES ({id}, 'Customer {c}', 'contact', 'customer{c}@demo.example', '+49 30 555{c:04}', '{{\"1\": \"DEMO-{c:05}\"}}');\n",
                id = 100 + c
            ));
        }
        pos.batch_execute(&partners).await.map_err(|e| {
            setup(
                "demo customers",
                crate::ledger::db::describe(&e),
                FIX_DATABASES,
            )
        })?;
        for c in (1..=options.customers).step_by(2) {
            shop.exec_drop(
                "INSERT INTO customer_entity (entity_id, website_id, store_id, email) VALUES (?, 1, 1, ?)",
                (c, format!("Customer{c}@Demo.Example")),
            )
            .await
            .map_err(|e| setup("demo customers", e, FIX_DATABASES))?;
        }
        // A tent in the catalog at 199.00 (the `price` attribute at the
        // admin scope, store 0), on the wishlist of every fifth account
        // holder.
        shop.query_drop(
            "SET SESSION sql_mode = CONCAT(@@sql_mode, ',NO_AUTO_VALUE_ON_ZERO');
             INSERT INTO store_website (website_id, code, name) VALUES (0, 'admin', 'Admin');
             INSERT INTO store (store_id, code, website_id, name) VALUES (0, 'admin', 0, 'Admin');
             INSERT INTO catalog_product_entity (entity_id, sku) VALUES (1, 'TENT-2P');
             INSERT INTO catalog_product_entity_decimal (attribute_id, store_id, entity_id, value)
               VALUES (77, 0, 1, 199.00);",
        )
        .await
        .map_err(|e| setup("demo catalog", e, FIX_DATABASES))?;
        for c in (1..=options.customers).step_by(10) {
            shop.exec_drop(
                "INSERT INTO wishlist (wishlist_id, customer_id) VALUES (?, ?)",
                (c, c),
            )
            .await
            .map_err(|e| setup("demo wishlists", e, FIX_DATABASES))?;
            shop.exec_drop(
                "INSERT INTO wishlist_item (wishlist_item_id, wishlist_id, product_id, store_id, added_at, qty)
                 VALUES (?, ?, 1, 1, NOW(), 1)",
                (c, c),
            )
            .await
            .map_err(|e| setup("demo wishlists", e, FIX_DATABASES))?;
        }
        Ok(Self {
            price_cut: false,
            pos,
            shop,
            rng: Rng(0x5eed_1234_abcd_9876),
            customers: options.customers,
            next_pos_order: 1,
            next_shop_order: 1,
            pos_orders: Vec::new(),
            orders: 0,
            refunds: 0,
        })
    }

    /// One customer action. Customers in the last fifth stop coming after
    /// the first third of the demo (`lapsing`).
    async fn step(&mut self, lapsing: bool) -> Result<(), String> {
        let active = if lapsing {
            self.customers - self.customers / 5
        } else {
            self.customers
        };
        let customer = 1 + self.rng.below(u64::from(active.max(1))) as u32;
        let goods = 10 + self.rng.below(190) as u32;
        let roll = self.rng.below(100);
        if roll < 8 && !self.pos_orders.is_empty() {
            // A return at the till: half of an earlier sale.
            let index = self.rng.below(self.pos_orders.len() as u64) as usize;
            let (order, line, partner, amount) = self.pos_orders.swap_remove(index);
            let id = self.next_pos_order;
            self.next_pos_order += 1;
            let half = f64::from(amount) / 2.0;
            self.pos
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                            partner_id, config_id, is_refund, state)
                       VALUES ({id}, 'Berlin/{order:05} REFUND', {tax}, {total}, {total}, 0, 1, {partner}, 1, true, 'paid');
                     INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id,
                                                 refunded_orderline_id)
                       VALUES ({line_id}, 'Return', 1, -1, {neg}, {total}, {id}, {line});
                     COMMIT;",
                    tax = -half * 0.19,
                    total = -half * 1.19,
                    neg = -half,
                    line_id = id * 10,
                ))
                .await
                .map_err(|e| crate::ledger::db::describe(&e))?;
            self.refunds += 1;
        } else if roll < 60 {
            let id = self.next_pos_order;
            self.next_pos_order += 1;
            let partner = 100 + customer;
            let total = f64::from(goods) * 1.19;
            self.pos
                .batch_execute(&format!(
                    "BEGIN;
                     INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                            partner_id, config_id, is_refund, state)
                       VALUES ({id}, 'Berlin/{id:05}', {tax}, {total}, {total}, 0, 1, {partner}, 1, false, 'paid');
                     INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
                       VALUES ({line}, 'Coffee', 1, 1, {goods}, {total}, {id});
                     COMMIT;",
                    tax = f64::from(goods) * 0.19,
                    line = id * 10,
                ))
                .await
                .map_err(|e| crate::ledger::db::describe(&e))?;
            self.pos_orders.push((id, id * 10, partner, goods));
            self.orders += 1;
        } else {
            // Online: an account holder (odd) or a guest with the POS
            // email of an even customer; the order ships.
            let id = self.next_shop_order;
            self.next_shop_order += 1;
            let account = (customer % 2 == 1).then_some(customer);
            let email = format!("customer{customer}@demo.example");
            let mut tx = self
                .shop
                .start_transaction(Default::default())
                .await
                .map_err(|e| e.to_string())?;
            tx.exec_drop(
                "INSERT INTO sales_order (entity_id, state, status, store_id, customer_id, customer_is_guest,
                     customer_email, base_subtotal, base_discount_amount, base_tax_amount, base_shipping_amount,
                     base_grand_total, subtotal, base_currency_code, increment_id)
                 VALUES (?, 'new', 'pending', 1, ?, ?, ?, ?, 0, ?, 4.9, ?, ?, 'EUR', ?)",
                (
                    id,
                    account,
                    u8::from(account.is_none()),
                    &email,
                    goods,
                    f64::from(goods) * 0.19,
                    f64::from(goods) * 1.19 + 4.9,
                    goods,
                    format!("1{id:08}"),
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
            tx.exec_drop(
                "INSERT INTO sales_order_item (item_id, order_id, product_type, sku, qty_ordered, base_row_total, row_total)
                 VALUES (?, ?, 'simple', 'MUG-BLUE', 1, ?, ?)",
                (id, id, goods, goods),
            )
            .await
            .map_err(|e| e.to_string())?;
            tx.commit().await.map_err(|e| e.to_string())?;
            self.shop
                .exec_drop(
                    "UPDATE sales_order SET state = 'complete', status = 'complete' WHERE entity_id = ?",
                    (id,),
                )
                .await
                .map_err(|e| e.to_string())?;
            self.orders += 1;
        }
        if !self.price_cut && self.orders >= ORDERS_BEFORE_PRICE_CUT {
            // 20 % off, as the catalog admin saves it.
            self.shop
                .query_drop(
                    "UPDATE catalog_product_entity_decimal SET value = 159.20
                      WHERE entity_id = 1 AND attribute_id = 77 AND store_id = 0",
                )
                .await
                .map_err(|e| e.to_string())?;
            self.price_cut = true;
        }
        Ok(())
    }
}

/// What the ledger holds now.
struct Figures {
    orders: i64,
    refunds: i64,
    entries: i64,
    members: i64,
    tiers: Vec<(String, i64)>,
    pending: i64,
}

async fn ledger_figures(ledger: &tokio_postgres::Client) -> Figures {
    let row = ledger
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_refunds),
                    (SELECT count(*) FROM ledger_entries),
                    (SELECT count(*) FROM members WHERE merged_into IS NULL),
                    (SELECT count(*) FROM outbox WHERE status = 'pending')",
            &[],
        )
        .await;
    let tiers = ledger
        .query(
            "SELECT coalesce(tier, 'no purchase yet'), count(*) FROM members
              WHERE merged_into IS NULL GROUP BY 1 ORDER BY 2 DESC",
            &[],
        )
        .await
        .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        .unwrap_or_default();
    match row {
        Ok(r) => Figures {
            orders: r.get(0),
            refunds: r.get(1),
            entries: r.get(2),
            members: r.get(3),
            tiers,
            pending: r.get(4),
        },
        Err(_) => Figures {
            orders: 0,
            refunds: 0,
            entries: 0,
            members: 0,
            tiers,
            pending: 0,
        },
    }
}

fn state_text(state: &ReaderState) -> &'static str {
    match state {
        ReaderState::Starting => "starting",
        ReaderState::Snapshotting => "snapshotting",
        ReaderState::Streaming => "streaming",
        ReaderState::Reconnecting(_) => "reconnecting",
        ReaderState::Stopped => "stopped",
        ReaderState::Failed(_) => "failed",
    }
}

/// Runs the demo until `options.duration` passes or `shutdown`; returns
/// what happened.
pub async fn run(
    options: DemoOptions,
    shutdown: CancellationToken,
    report: &mut (dyn FnMut(Report) + Send),
) -> Result<Summary, DemoError> {
    report(Report::Step("== fresh demo databases: loyalty_demo_pos and loyalty_demo_ledger (PostgreSQL), loyalty_demo_shop (MariaDB), with the Odoo POS and Magento 2 schemas".into()));
    create_databases(&options).await?;

    let secret = {
        // 32 random bytes from the kernel (a demo secret: a clock-seeded
        // fallback is good enough where /dev/urandom is missing).
        let mut bytes = [0u8; 32];
        let read = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        if read.is_err() {
            let mut rng = Rng(chrono::Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 | 1);
            bytes.iter_mut().for_each(|b| *b = rng.next() as u8);
        }
        use base64::Engine as _;
        format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    };
    let key = SigningKey::parse(&secret).map_err(|e| setup("signing secret", e, "report this"))?;
    let receiver_stop = CancellationToken::new();
    let (receiver, received) = start_receiver(key, receiver_stop.clone()).await?;
    report(Report::Step(format!(
        "== a local provider receiver on {receiver}: Standard Webhooks, every signature checked"
    )));

    std::fs::create_dir_all(&options.dir)
        .map_err(|e| setup("demo directory", e, "give --dir a writable directory"))?;
    let path = options.dir.join("loyalty-cdc.toml");
    std::fs::write(&path, configuration(&options, receiver, &secret))
        .map_err(|e| setup("demo configuration", e, "give --dir a writable directory"))?;
    let settings =
        Settings::load(&path).map_err(|e| setup("demo configuration", e, "report this"))?;
    report(Report::Step(format!(
        "== configuration: {}",
        path.display()
    )));

    let findings = crate::preflight::check(&settings).await;
    let problems: Vec<String> = findings
        .iter()
        .filter(|f| !f.problems.is_empty())
        .map(ToString::to_string)
        .collect();
    if !problems.is_empty() {
        return Err(setup(
            "the local databases are not ready for change capture",
            problems.join("\n"),
            "bash docker/setup-local-databases.sh",
        ));
    }

    // The pipeline and the HTTP listener, in this process.
    crate::api::install_recorder();
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|e| {
            setup(
                "the HTTP listener",
                e,
                "give --listen a free address, e.g. 127.0.0.1:8788",
            )
        })?;
    let listen = listener
        .local_addr()
        .map_err(|e| setup("the HTTP listener", e, "report this"))?;
    let api_settings =
        Arc::new(Settings::load(&path).map_err(|e| setup("demo configuration", e, "report this"))?);
    let stop = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<Vec<RunningSource>>();
    let pipeline = {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::pipeline::run(&settings, stop.clone(), move |sources| {
                let handles = sources.clone();
                if let Ok(state) = crate::api::ApiState::new(api_settings, sources) {
                    tokio::spawn(crate::api::serve(listener, Arc::new(state), stop));
                }
                let _ = started_tx.send(handles);
            })
            .await
        })
    };
    let sources = match started_rx.await {
        Ok(sources) => sources,
        Err(_) => {
            return Err(DemoError::Pipeline(match pipeline.await {
                Ok(Err(error)) => error.to_string(),
                _ => "it did not start".into(),
            }))
        }
    };
    // Everything from here runs inside a block whose every exit stops the
    // pipeline and drops the demo's slot (a slot left behind keeps
    // PostgreSQL's WAL forever).
    let driven = async {
        let ready_by = Instant::now() + Duration::from_secs(60);
        while !sources
            .iter()
            .all(|s| s.progress.snapshot().state == ReaderState::Streaming)
        {
            if Instant::now() > ready_by || pipeline.is_finished() {
                return Err(DemoError::Pipeline(
                    "the sources did not start streaming within 60 s; `loyalty-cdc check` with the demo configuration says why".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report(Report::Step(format!(
            "== running: metrics http://{listen}/metrics, health http://{listen}/readyz, wallet http://{listen}/v1/members/customer1@demo.example"
        )));

        let ledger = pg(&with_database(&options.postgres, LEDGER_DB)?).await?;
        let mut traffic = Traffic::new(&options).await?;
        let started = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / options.rate.max(0.1));
        let mut next_order = Instant::now();
        let mut next_view = Instant::now();
        let mut traffic_error = None;
        while started.elapsed() < options.duration
            && !shutdown.is_cancelled()
            && !pipeline.is_finished()
        {
            if Instant::now() >= next_order {
                let lapsing = started.elapsed() > options.duration / 3;
                if let Err(error) = traffic.step(lapsing).await {
                    traffic_error = Some(error);
                    break;
                }
                next_order += interval;
            }
            if Instant::now() >= next_view {
                let view = live_view(
                    &options,
                    started.elapsed(),
                    &traffic,
                    &sources,
                    &ledger,
                    &received,
                )
                .await;
                report(Report::View(view));
                next_view += Duration::from_millis(500);
            }
            let wait = next_order
                .min(next_view)
                .saturating_duration_since(Instant::now());
            tokio::select! {
                _ = tokio::time::sleep(wait.min(Duration::from_millis(200))) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        if let Some(error) = traffic_error {
            return Err(setup("generating traffic", error, FIX_DATABASES));
        }

        // Let the ledger and delivery catch up (at most 30 s).
        report(Report::Step(
            "== traffic stopped; waiting for the ledger and delivery to catch up".into(),
        ));
        let ran = started.elapsed();
        let catch_up = Instant::now() + Duration::from_secs(30);
        loop {
            let now = ledger_figures(&ledger).await;
            if (now.orders as u64 >= traffic.orders
                && now.refunds as u64 >= traffic.refunds
                && now.pending == 0)
                || Instant::now() > catch_up
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        report(Report::Final(
            live_view(&options, ran, &traffic, &sources, &ledger, &received).await,
        ));
        Ok::<_, DemoError>((traffic, ledger))
    }
    .await;
    stop.cancel();
    let stopped = pipeline.await;
    receiver_stop.cancel();
    // The next run starts from fresh databases anyway.
    if let Ok(admin) = pg(&with_database(&options.postgres, "postgres")?).await {
        let _ = admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{POS_DB}' AND NOT active"
            ))
            .await;
    }
    let (traffic, ledger) = driven?;
    if let Ok(Err(error)) = stopped {
        return Err(DemoError::Pipeline(error.to_string()));
    }
    let figures = ledger_figures(&ledger).await;
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    let summary = Summary {
        orders_written: traffic.orders,
        refunds_written: traffic.refunds,
        orders_in_ledger: figures.orders,
        ledger_entries: figures.entries,
        members: figures.members,
        delivered: received.by_type.clone(),
        unsigned: received.unsigned,
        config: path.clone(),
    };
    Ok(summary)
}

/// The live view: orders/s, lag per source, members per tier, triggers
/// delivered by kind.
async fn live_view(
    options: &DemoOptions,
    elapsed: Duration,
    traffic: &Traffic,
    sources: &[RunningSource],
    ledger: &tokio_postgres::Client,
    received: &Arc<Mutex<Received>>,
) -> String {
    let elapsed = elapsed.as_secs_f64().max(0.001);
    let Figures {
        orders,
        refunds,
        entries,
        members,
        tiers,
        pending,
    } = ledger_figures(ledger).await;
    let mut view = format!(
        "loyalty-cdc demo  {:>5.1} s of {} s  (Ctrl-C stops)\n  written   {} orders, {} refunds  ({:.1} orders/s)\n",
        elapsed,
        options.duration.as_secs(),
        traffic.orders,
        traffic.refunds,
        traffic.orders as f64 / elapsed
    );
    let now = chrono::Utc::now();
    for source in sources {
        let progress = source.progress.snapshot();
        let lag = progress
            .lag_seconds(
                now,
                progress
                    .since_last_apply
                    .is_none_or(|d| d > Duration::from_secs(2)),
            )
            .map_or("-".to_string(), |s| format!("{s:.1} s"));
        view.push_str(&format!(
            "  source    {:<5} {:<12} lag {:<8} {} changes, {} transactions\n",
            source.name,
            state_text(&progress.state),
            lag,
            progress.changes_applied,
            progress.transactions_applied
        ));
    }
    let tiers: Vec<String> = tiers.iter().map(|(t, n)| format!("{t} {n}")).collect();
    view.push_str(&format!(
        "  ledger    {orders} orders, {refunds} refunds, {entries} entries, {members} members ({}), {pending} messages waiting\n",
        tiers.join(", ")
    ));
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    let delivered: Vec<String> = received
        .by_type
        .iter()
        .map(|(kind, n)| format!("{} {n}", kind.trim_start_matches("loyalty.")))
        .collect();
    view.push_str(&format!(
        "  delivered {}\n",
        if delivered.is_empty() {
            "-".to_string()
        } else {
            delivered.join(", ")
        }
    ));
    view
}
