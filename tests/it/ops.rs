//! Operations on a running pipeline: `/healthz`, `/readyz` (unready while
//! the source is cut off, ready again after), `/metrics` after a known
//! workload, `status --json`, and the member wallet behind its token — over
//! real HTTP on 127.0.0.1, the Odoo POS schema as the source.

use std::sync::Arc;
use std::time::Duration;

use loyalty_cdc::api::{self, ApiState};
use loyalty_cdc::config::Settings;
use loyalty_cdc::pipeline;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::reader::wait_for;
use crate::support::PgDatabase;

const TOKEN: &str = "test-token-5f1c2d";

/// A TCP relay to PostgreSQL that the test can cut and restore: the
/// source's database going away and coming back, as the reader sees it.
struct Relay {
    port: u16,
    stop: Option<CancellationToken>,
}

impl Relay {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut relay = Self { port, stop: None };
        relay.serve(listener);
        relay
    }

    fn serve(&mut self, listener: TcpListener) {
        let stop = CancellationToken::new();
        self.stop = Some(stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stop.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
    }

    /// Drops every connection and refuses new ones.
    fn cut(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop.cancel();
        }
    }

    async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.serve(listener);
    }
}

/// Waits until the source streams (its snapshot, if any, done).
async fn streaming(progress: &loyalty_cdc::source::progress::SourceProgress) {
    wait_for("the source to stream", || async {
        matches!(
            progress.snapshot().state,
            loyalty_cdc::source::progress::ReaderState::Streaming
        )
    })
    .await;
}

/// The value of the first sample of `name` whose labels include every
/// `label="value"` given.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_readiness_status_and_wallet_after_a_known_workload() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let pos = crate::ledger_pipeline::odoo_pos(&pos_db).await;
    let mut relay = Relay::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("api-token");
    std::fs::write(&token_file, TOKEN).unwrap();
    let mut pos_url = url::Url::parse(&pos_db.url()).unwrap();
    pos_url.set_port(Some(relay.port)).unwrap();
    let config = format!(
        r#"[ledger]
url = "{ledger}"

[program]
points_per_currency_unit = 1
tiers = [{{ name = "base", threshold = 0 }}, {{ name = "silver", threshold = 100 }}, {{ name = "gold", threshold = 1000 }}]

[api]
listen = "127.0.0.1:0"
token = {{ file = "{token}" }}

[[sources]]
name = "pos"
kind = "postgres"
url = "{pos}"
slot = "{slot}"
publication = "{slot}"
mapping = "{connectors}/odoo-pos.toml"
"#,
        ledger = ledger_db.url(),
        token = token_file.display(),
        pos = pos_url,
        slot = pos_db.name,
        connectors = concat!(env!("CARGO_MANIFEST_DIR"), "/connectors/sources"),
    );
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(&path, &config).unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let api_settings = Arc::new(Settings::load(&path).unwrap());

    api::install_recorder();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let service = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            pipeline::run(&settings, shutdown.clone(), move |sources| {
                let progress = sources[0].progress.clone();
                let state = ApiState::new(api_settings, sources).unwrap();
                tokio::spawn(api::serve(listener, Arc::new(state), shutdown));
                let _ = started_tx.send(progress);
            })
            .await
        })
    };
    let progress = started_rx.await.expect("pipeline starts");
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();

    assert_eq!(
        get("/healthz").await.unwrap().status(),
        200,
        "alive from the start"
    );
    streaming(&progress).await;

    // The workload: two sales at the till to one customer (100 and 50
    // points of goods, tax excluded).
    pos.batch_execute(
        "INSERT INTO res_partner (id, name, type, email, lang)
           VALUES (5, 'Anna Schmidt', 'contact', 'anna.schmidt@example.de', 'de_DE');
         BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES (1, 'Shop/0001', 19, 119, 119, 0, 1, 5, 1, false, 'paid');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
           VALUES (11, 'L1', 1, 2, 100, 119, 1);
         COMMIT;
         BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES (2, 'Shop/0002', 9.5, 59.5, 59.5, 0, 1, 5, 1, false, 'paid');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
           VALUES (21, 'L1', 1, 1, 50, 59.5, 2);
         COMMIT;",
    )
    .await
    .unwrap();
    let ledger = ledger_db.client().await;
    wait_for("both sales to be booked", || async {
        ledger
            .query_one(
                "SELECT coalesce(sum(lifetime), 0)::bigint FROM balances",
                &[],
            )
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            == 150
    })
    .await;

    let ready = get("/readyz").await.unwrap();
    assert_eq!(ready.status(), 200, "{:?}", ready.text().await);

    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    let value = |name: &str, labels: &[&str]| {
        sample(&metrics, name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{metrics}"))
    };
    assert_eq!(
        value(
            "loyalty_ledger_events_total",
            &["source=\"pos\"", "kind=\"order\""]
        ),
        2.0
    );
    assert_eq!(
        value(
            "loyalty_ledger_events_total",
            &["source=\"pos\"", "kind=\"refund\""]
        ),
        0.0
    );
    assert_eq!(
        value(
            "loyalty_source_state",
            &["source=\"pos\"", "state=\"streaming\""]
        ),
        1.0
    );
    assert_eq!(
        value(
            "loyalty_source_state",
            &["source=\"pos\"", "state=\"reconnecting\""]
        ),
        0.0
    );
    assert!(value("loyalty_source_transactions_total", &["source=\"pos\""]) >= 2.0);
    assert!(value("loyalty_source_row_changes_total", &["source=\"pos\""]) >= 4.0);
    assert_eq!(
        value("loyalty_source_reconnects_total", &["source=\"pos\""]),
        0.0
    );
    assert!(value("loyalty_source_lag_bytes", &["source=\"pos\""]) >= 0.0);
    let lag_seconds = value("loyalty_source_lag_seconds", &["source=\"pos\""]);
    assert!((0.0..60.0).contains(&lag_seconds), "lag {lag_seconds}");
    assert!(
        value(
            "loyalty_ledger_batch_commit_seconds_count",
            &["source=\"pos\""]
        ) >= 1.0
    );
    let tables = value(
        "loyalty_source_snapshot_tables",
        &["source=\"pos\"", "state=\"total\""],
    );
    assert!(tables >= 3.0, "the mapped tables: {tables}");
    assert_eq!(
        value(
            "loyalty_source_snapshot_tables",
            &["source=\"pos\"", "state=\"done\""]
        ),
        tables,
        "the snapshot is complete"
    );
    assert!(
        value("loyalty_source_snapshot_rows_total", &["source=\"pos\""]) >= 3.0,
        "the till's setup rows (currency, company partner, till)"
    );
    assert_eq!(value("loyalty_outbox_pending", &[]), 0.0);
    assert_eq!(value("loyalty_dead_letters_open", &[]), 0.0);
    assert_eq!(value("loyalty_quarantine_open", &[]), 0.0);
    assert_eq!(value("loyalty_ledger_up", &[]), 1.0);
    assert!(value("process_resident_memory_bytes", &[]) > 1_000_000.0);
    assert!(
        !metrics.contains("anna") && !metrics.contains('@'),
        "no PII in metrics"
    );

    // The wallet: a bearer token or nothing.
    let wallet = "/v1/members/Anna.Schmidt@example.de";
    assert_eq!(get(wallet).await.unwrap().status(), 401);
    let wrong = http
        .get(format!("{base}{wallet}"))
        .bearer_auth("test-token-5f1c2e")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let answer = http
        .get(format!("{base}{wallet}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    assert_eq!(
        body["points"],
        serde_json::json!({ "available": 150, "pending": 0, "lifetime": 150 })
    );
    assert_eq!(body["tier"], "silver");
    assert_eq!(body["tier_progress"]["next_tier"], "gold");
    assert_eq!(body["tier_progress"]["points_to_next"], 850);
    assert_eq!(body["offers"], serde_json::json!([]));
    let unknown = http
        .get(format!("{base}/v1/members/nobody@example.de"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // `status --json`, from the ledger and the source.
    let status = crate::support::run_cli(&config, &["status", "--json"], &[]).await;
    assert_eq!(status.code, 0, "{}", status.output());
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let source = &status["sources"][0];
    assert_eq!(source["name"], "pos");
    assert_eq!(source["kind"], "postgres");
    assert_eq!(source["state"], "streaming");
    assert!(
        source["position"].as_str().unwrap().contains('/'),
        "an LSN: {source}"
    );
    assert!(source["lag_bytes"].as_u64().is_some(), "{source}");
    assert!(source["lag_seconds"].as_f64().is_some(), "{source}");
    assert_eq!(status["outbox_pending"], 0);
    assert_eq!(status["dead_letters"], 0);
    assert_eq!(status["quarantined"], 0);

    // Redemptions: an idempotency key, never below zero.
    let redeem = |key: Option<&str>, points: i64| {
        let mut request = http
            .post(format!("{base}{wallet}/redemptions"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(format!("{{\"points\": {points}}}"));
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key.to_string());
        }
        request.send()
    };
    let answer = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        (status, body)
    };
    assert_eq!(
        redeem(None, 30).await.unwrap().status(),
        400,
        "no key, no redemption"
    );
    let (status, body) = answer(redeem(Some("r-1"), 30).await.unwrap()).await;
    assert_eq!((status, &body["available"]), (201, &serde_json::json!(120)));
    let (status, body) = answer(redeem(Some("r-1"), 30).await.unwrap()).await;
    assert_eq!(
        (status, &body["available"]),
        (200, &serde_json::json!(120)),
        "the same request again spends nothing"
    );
    assert_eq!(
        redeem(Some("r-1"), 40).await.unwrap().status(),
        422,
        "a key names one redemption"
    );
    let (status, body) = answer(redeem(Some("r-2"), 500).await.unwrap()).await;
    assert_eq!(
        (status, &body["available"]),
        (409, &serde_json::json!(120)),
        "{body}"
    );
    let entries: i64 = ledger
        .query_one(
            "SELECT count(*) FROM ledger_entries WHERE kind = 'redeem'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries, 1);

    // Consent, dead letters, quarantine.
    let (status, body) = answer(
        http.post(format!("{base}{wallet}/consent"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(r#"{"email": false, "sms": true}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        body["consent"],
        serde_json::json!({ "email": false, "sms": true, "push": null, "profiling": null })
    );
    let (status, body) = answer(
        http.get(format!("{base}/v1/dead-letters"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({ "dead_letters": [] }))
    );
    let replay = http
        .post(format!("{base}/v1/dead-letters/999/replay"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(replay.status(), 404);
    let (status, body) = answer(
        http.get(format!("{base}/v1/quarantine?limit=5"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, body),
        (200, serde_json::json!({ "quarantine": [] }))
    );
    assert_eq!(get("/v1/dead-letters").await.unwrap().status(), 401);
    assert_eq!(get("/v1/quarantine").await.unwrap().status(), 401);

    // A redemption at the till beyond her balance is quarantined; replayed
    // through the API it fails again (nothing booked), and once a sale has
    // brought the points, it is booked, once.
    let available = || async {
        ledger
            .query_one(
                "SELECT available FROM balances b JOIN member_identifiers i USING (member_id)
                  WHERE i.kind = 'email' AND i.value = 'anna.schmidt@example.de'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = available().await;
    pos.execute(
        "INSERT INTO loyalty_card (id, partner_id, code, points) VALUES (1, 5, 'LC-0042', 0)",
        &[],
    )
    .await
    .unwrap();
    pos.execute(
        "INSERT INTO loyalty_history (id, card_id, description, used, order_model, order_id)
           VALUES (1, 1, 'Reward: voucher', $1, 'pos.order', 1)",
        &[&((before + 10) as f64)],
    )
    .await
    .unwrap();
    wait_for("the redemption to be quarantined", || async {
        ledger
            .query_one("SELECT count(*) FROM quarantine", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
            == 1
    })
    .await;
    let (_, listed) = answer(
        http.get(format!("{base}/v1/quarantine"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = listed["quarantine"][0]["id"].as_i64().unwrap();
    assert_eq!(listed["quarantine"][0]["replayable"], true);
    let replay_quarantined = |token: Option<&'static str>| {
        let request = http
            .post(format!("{base}/v1/quarantine/replay"))
            .header("content-type", "application/json")
            .body(format!("{{\"ids\": [{id}]}}"));
        match token {
            Some(token) => request.bearer_auth(token).send(),
            None => request.send(),
        }
    };
    assert_eq!(replay_quarantined(None).await.unwrap().status(), 401);
    let (status, body) = answer(replay_quarantined(Some(TOKEN)).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (
            422,
            serde_json::json!({ "replays": [{
                "ids": [id],
                "outcome": "still_fails",
                "reasons": [format!(
                    "redemption `1` of {} points exceeds the {before} available; the balance never goes below zero",
                    before + 10
                )]
            }] })
        )
    );
    assert_eq!(available().await, before, "nothing booked");
    pos.batch_execute(
        "BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES (3, 'Shop/0003', 3.8, 23.8, 23.8, 0, 1, 5, 1, false, 'paid');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
           VALUES (31, 'L1', 1, 1, 20, 23.8, 3);
         COMMIT;",
    )
    .await
    .unwrap();
    wait_for("the third sale", || async {
        available().await == before + 20
    })
    .await;
    let (status, body) = answer(replay_quarantined(Some(TOKEN)).await.unwrap()).await;
    assert_eq!(
        (status, body),
        (
            200,
            serde_json::json!({ "replays": [{ "ids": [id], "outcome": "booked", "events": 1 }] })
        )
    );
    assert_eq!(available().await, 10, "the redemption took its points");
    let (status, body) = answer(replay_quarantined(Some(TOKEN)).await.unwrap()).await;
    assert_eq!(status, 422, "replayed before: {body}");
    assert_eq!(body["replays"][0]["outcome"], "refused");
    assert_eq!(available().await, 10, "booked once");

    // The source's database goes away: not ready, and says why; back:
    // ready again, with the reconnect counted.
    relay.cut();
    wait_for("/readyz to go unready", || async {
        get("/readyz")
            .await
            .map(|r| r.status() == 503)
            .unwrap_or(false)
    })
    .await;
    let why: serde_json::Value =
        serde_json::from_str(&get("/readyz").await.unwrap().text().await.unwrap()).unwrap();
    assert!(
        why["problems"]["pos"]
            .as_str()
            .unwrap()
            .starts_with("reconnecting"),
        "{why}"
    );
    assert_eq!(
        get("/healthz").await.unwrap().status(),
        200,
        "alive all along"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.restore().await;
    wait_for("/readyz to be ready again", || async {
        get("/readyz")
            .await
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    })
    .await;
    let metrics = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        sample(
            &metrics,
            "loyalty_source_reconnects_total",
            &["source=\"pos\""]
        )
        .unwrap()
            >= 1.0
    );

    // Erasure through the API: the token, then the wallet is gone.
    let delete = |token: Option<&str>| {
        let request = http.delete(format!("{base}{wallet}"));
        match token {
            Some(token) => request.bearer_auth(token.to_string()).send(),
            None => request.send(),
        }
    };
    assert_eq!(delete(None).await.unwrap().status(), 401);
    let erased = delete(Some(TOKEN)).await.unwrap();
    assert_eq!(erased.status(), 200);
    let erased: serde_json::Value = serde_json::from_str(&erased.text().await.unwrap()).unwrap();
    assert_eq!(erased["result"], "erased", "{erased}");
    let gone = http
        .get(format!("{base}{wallet}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert_eq!(
        delete(Some(TOKEN)).await.unwrap().status(),
        404,
        "nothing left to erase"
    );

    // Every operation of the OpenAPI document is served: no 405, and no
    // router 404 (ours carry a JSON body; the router's is empty).
    let unrouted = http
        .get(format!("{base}/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(unrouted.status(), 404);
    assert!(
        unrouted.text().await.unwrap().is_empty(),
        "the router's own 404 is empty"
    );
    for (method, path) in api::OPERATIONS {
        let url = format!(
            "{base}{}",
            path.replace("{identifier}", "member:1")
                .replace("{id}", "7")
        );
        let response = http
            .request(method.to_uppercase().parse().unwrap(), &url)
            .bearer_auth(TOKEN)
            .header("Idempotency-Key", "doc-check")
            .header("content-type", "application/json")
            .body("{\"points\": 1}")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.text().await.unwrap();
        assert!(
            status != 405 && !(status == 404 && body.is_empty()),
            "{method} {path}: {status} {body}"
        );
    }

    shutdown.cancel();
    service.await.unwrap().expect("pipeline ends cleanly");
}

/// Rows of every text, JSON and binary column of the ledger database that
/// hold `text` (case-insensitively) or, among their digits, `digits`.
async fn traces(ledger: &tokio_postgres::Client, text: &str, digits: &str) -> Vec<String> {
    let columns = ledger
        .query(
            "SELECT table_name, column_name FROM information_schema.columns
              WHERE table_schema = 'public'
                AND data_type IN ('text', 'character varying', 'jsonb', 'json', 'bytea')
              ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    assert!(columns.len() > 30, "every text column of the ledger");
    let mut found = Vec::new();
    for column in columns {
        let (table, name): (String, String) = (column.get(0), column.get(1));
        // Binary columns (quarantine's typed copies) are read as their
        // printable text: strings are stored there as UTF-8.
        let value = match ledger
            .query_one(
                "SELECT data_type FROM information_schema.columns
                  WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
                &[&table, &name],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
            .as_str()
        {
            "bytea" => format!("encode({name}, 'escape')"),
            _ => format!("{name}::text"),
        };
        let count: i64 = ledger
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table} WHERE {value} ILIKE $1
                        OR regexp_replace({value}, '[^0-9]', '', 'g') LIKE $2"
                ),
                &[&format!("%{text}%"), &format!("%{digits}%")],
            )
            .await
            .unwrap()
            .get(0);
        if count > 0 {
            found.push(format!("{table}.{name}"));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_leaves_no_trace_of_the_person_and_tells_the_providers() {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let pos_db = PgDatabase::create("pos").await;
    let pos = crate::ledger_pipeline::odoo_pos(&pos_db).await;
    let receiver =
        crate::support::receiver::Receiver::start(crate::support::receiver::Reply::status(202))
            .await;
    let providers = concat!(env!("CARGO_MANIFEST_DIR"), "/connectors/providers");
    let config = format!(
        r#"[ledger]
url = "{ledger}"

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

[[providers]]
name = "klaviyo"
template = "{providers}/klaviyo.toml"
base_url = "{url}/klaviyo"
secrets.api_key = "pk_test_klaviyo"

[[providers]]
name = "hooks"
template = "{providers}/webhook.toml"
base_url = "{url}/hooks"
secrets.signing_secret = "{secret}"

[[triggers.routes]]
trigger = "welcome"
provider = "hooks"
"#,
        ledger = ledger_db.url(),
        pos = pos_db.url(),
        slot = pos_db.name,
        connectors = concat!(env!("CARGO_MANIFEST_DIR"), "/connectors/sources"),
        url = receiver.url,
        secret = crate::support::WEBHOOK_SECRET,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(&path, &config).unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));

    // Anna buys at the till: her email, phone and card reach the ledger
    // (identifiers, and the partner row kept as reference data); her
    // welcome waits in the outbox (delivery is off).
    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let service = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            pipeline::run(&settings, shutdown, move |sources| {
                let _ = started_tx.send(sources[0].progress.clone());
            })
            .await
        })
    };
    let progress = started_rx.await.unwrap();
    streaming(&progress).await;
    pos.batch_execute(
        "INSERT INTO res_partner (id, name, type, email, phone, barcode, lang)
           VALUES (5, 'Anna Schmidt', 'contact', 'Anna.Schmidt@Example.DE', '030 1234567', '{\"1\": \"CARD-4711\"}', 'de_DE');
         BEGIN;
         INSERT INTO pos_order (id, name, amount_tax, amount_total, amount_paid, amount_return, company_id,
                                partner_id, config_id, is_refund, state)
           VALUES (1, 'Shop/0001', 19, 119, 119, 0, 1, 5, 1, false, 'paid');
         INSERT INTO pos_order_line (id, name, product_id, qty, price_subtotal, price_subtotal_incl, order_id)
           VALUES (11, 'L1', 1, 2, 100, 119, 1);
         COMMIT;
         INSERT INTO loyalty_card (id, partner_id, code, points) VALUES (1, 5, 'CARD-4711', 0);
         INSERT INTO loyalty_history (id, card_id, description, used, order_model, order_id)
           VALUES (1, 1, 'Reward: everything', 5000, 'pos.order', 1);",
    )
    .await
    .unwrap();
    let ledger = ledger_db.client().await;
    wait_for(
        "the sale to be booked, the redemption quarantined",
        || async {
            let count = |sql: &'static str| {
                let ledger = &ledger;
                async move {
                    ledger
                        .query_one(sql, &[])
                        .await
                        .map(|r| r.get::<_, i64>(0))
                        .unwrap_or(0)
                }
            };
            count("SELECT count(*) FROM outbox WHERE trigger = 'welcome'").await == 1
                && count("SELECT count(*) FROM quarantine").await == 1
        },
    )
    .await;
    shutdown.cancel();
    service.await.unwrap().expect("pipeline ends cleanly");
    let member: i64 = ledger
        .query_one(
            "SELECT member_id FROM member_identifiers WHERE value = 'anna.schmidt@example.de'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let before = traces(&ledger, "anna.schmidt", "301234567").await;
    assert!(
        before.contains(&"member_identifiers.value".to_string())
            && before.contains(&"reference_rows.row_data".to_string()),
        "the scan finds her before: {before:?}"
    );
    assert!(traces(&ledger, "CARD-4711", "301234567")
        .await
        .contains(&"quarantine.replay".to_string()));

    let erase = crate::support::run_cli(
        &config,
        &["member", "erase", "Anna.Schmidt@example.de", "--json"],
        &[],
    )
    .await;
    assert_eq!(erase.code, 0, "{}", erase.output());
    let report: serde_json::Value = serde_json::from_str(&erase.stdout).unwrap();
    assert_eq!(report["result"], "erased");
    assert_eq!(report["member_id"], member);
    assert_eq!(
        report["identifiers"], 4,
        "email, phone, card and the POS customer id"
    );
    assert_eq!(
        report["source_rows"], 3,
        "the partner row, her loyalty card's row and the quarantined redemption (her card)"
    );
    assert_eq!(report["messages_cancelled"], 1, "the unsent welcome");

    // The providers were asked: Klaviyo's profile deletion by email, the
    // webhook's signed erasure event.
    let requests = receiver.wait_for(2).await;
    let klaviyo = requests
        .iter()
        .find(|r| r.path.starts_with("/klaviyo"))
        .unwrap();
    assert_eq!(
        (klaviyo.method.as_str(), klaviyo.path.as_str()),
        ("POST", "/klaviyo/api/data-privacy-deletion-jobs")
    );
    assert_eq!(
        klaviyo.header("authorization"),
        Some("Klaviyo-API-Key pk_test_klaviyo")
    );
    assert_eq!(
        klaviyo.json()["data"]["attributes"]["profile"]["data"]["attributes"],
        serde_json::json!({ "email": "anna.schmidt@example.de" })
    );
    let hook = requests
        .iter()
        .find(|r| r.path.starts_with("/hooks"))
        .unwrap();
    assert_eq!(hook.json()["type"], "loyalty.member_erased");
    assert_eq!(hook.json()["data"]["member"]["id"], member);
    assert_eq!(
        hook.header("webhook-id"),
        Some(format!("erase-{member}").as_str())
    );
    standardwebhooks::Webhook::new(crate::support::WEBHOOK_SECRET)
        .unwrap()
        .verify(&hook.body, &hook.headers)
        .expect("the erasure event is signed");

    // Nothing of her is left in any text or JSON column; her points are.
    assert_eq!(
        traces(&ledger, "anna.schmidt", "301234567").await,
        Vec::<String>::new()
    );
    assert_eq!(
        traces(&ledger, "CARD-4711", "301234567").await,
        Vec::<String>::new()
    );
    assert_eq!(
        traces(&ledger, "CARD4711", "301234567").await,
        Vec::<String>::new()
    );
    // Her quarantined redemption stays listed, but replaying it would
    // bring her card back: refused.
    let replay = crate::support::run_cli(&config, &["quarantine", "replay", "1"], &[]).await;
    assert_eq!(replay.code, 1, "{}", replay.output());
    assert!(
        replay
            .stderr
            .starts_with("1 not replayed: row 1 has no stored copy to replay"),
        "{}",
        replay.stderr
    );
    let kept = ledger
        .query_one(
            "SELECT b.lifetime, m.erased_at IS NOT NULL, (SELECT status FROM outbox WHERE member_id = $1)
               FROM balances b JOIN members m USING (member_id) WHERE member_id = $1",
            &[&member],
        )
        .await
        .unwrap();
    assert_eq!(
        kept.get::<_, i64>(0),
        100,
        "points kept under the member id"
    );
    assert!(kept.get::<_, bool>(1));
    assert_eq!(kept.get::<_, String>(2), "cancelled");
    let partner: serde_json::Value = ledger
        .query_one(
            "SELECT row_data FROM reference_rows WHERE reference = 'partner' AND key = '5'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(partner["email"], serde_json::Value::Null, "{partner}");

    // Again: nothing to do, by either name.
    let again = crate::support::run_cli(
        &config,
        &["member", "erase", "anna.schmidt@example.de"],
        &[],
    )
    .await;
    assert_eq!(again.code, 0, "{}", again.output());
    assert!(
        again.stdout.contains("nothing to erase"),
        "{}",
        again.stdout
    );
    let by_id = crate::support::run_cli(
        &config,
        &["member", "erase", &format!("member:{member}")],
        &[],
    )
    .await;
    assert_eq!(by_id.code, 0, "{}", by_id.output());
    assert!(by_id.stdout.contains("erased before"), "{}", by_id.stdout);
    assert_eq!(receiver.requests().len(), 2, "providers asked once");
    let show =
        crate::support::run_cli(&config, &["member", "show", "anna.schmidt@example.de"], &[]).await;
    assert_eq!(show.code, 1, "no member has her email any more");
}

/// `loyalty_…` and `process_…` metric names in a text.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let pattern = regex::Regex::new(r"\b(?:loyalty|process)_[a-z_]+\b").unwrap();
    pattern
        .find_iter(text)
        .map(|m| {
            let name = m.as_str();
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name)
                .to_string()
        })
        .collect()
}

#[test]
fn the_dashboard_and_the_alerts_use_only_metrics_the_service_exports() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    // What the code records (the macros name each metric once).
    let mut exported = std::collections::BTreeSet::new();
    let pattern =
        regex::Regex::new(r#"metrics::(?:gauge|counter|histogram)!\(\s*"([a-z_]+)""#).unwrap();
    for file in [
        "src/api/metrics.rs",
        "src/ledger/apply.rs",
        "src/delivery/worker.rs",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        exported.extend(pattern.captures_iter(&text).map(|c| c[1].to_string()));
    }
    assert!(exported.len() >= 20, "{exported:?}");
    let dashboard = std::fs::read_to_string(root.join("docker/grafana-dashboard.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let alerts = std::fs::read_to_string(root.join("docker/prometheus-alerts.yml")).unwrap();
    for (file, text) in [("dashboard", &dashboard), ("alerts", &alerts)] {
        let used = metric_names(text);
        assert!(used.len() >= 5, "{file}: {used:?}");
        let unknown: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics nobody exports: {unknown:?}"
        );
    }
    // The alerts the issue asks for: lag bytes, a stalled source, dead
    // letters growing, outbox age.
    for name in [
        "loyalty_source_lag_bytes",
        "loyalty_source_seconds_since_progress",
        "loyalty_dead_letters_open",
        "loyalty_outbox_oldest_pending_seconds",
    ] {
        assert!(alerts.contains(name), "no alert on {name}");
    }
}
