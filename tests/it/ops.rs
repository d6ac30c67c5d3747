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

    shutdown.cancel();
    service.await.unwrap().expect("pipeline ends cleanly");
}
