//! Delivery throughput: signed generic webhooks from the outbox to a local
//! receiver, against `wrk` posting a body of the same size to the same
//! receiver in the same run.
//!
//!     cargo bench --bench delivery                      # 20,000 messages, 3 runs
//!     LCDC_BENCH_MESSAGES=5000 cargo bench --bench delivery
//!
//! The receiver is this bench binary started again as a child process
//! (`LCDC_BENCH_RECEIVER=1`): an axum server answering 204 to every POST
//! and counting them, so neither side shares a runtime with it.
//! 1. `wrk -t2 -c32 -d10s` POSTs a 700-byte JSON body: requests/s.
//! 2. Per run, a fresh ledger gets N pending messages for N/2 members
//!    (route `tier_upgrade` → generic webhook, Standard Webhooks signed);
//!    the worker (`Worker::run`, default settings: 32 in flight) is timed
//!    from start until it has sent every message (its own count, polled
//!    every 5 ms; the outbox is checked once at the end).
//!    Deliveries/s, median of the runs, and the ratio to wrk.
//! 3. The budget the target leaves (both cores are shared by the worker,
//!    PostgreSQL and the receiver): the receiver's own CPU per request
//!    during the wrk run (from /proc), and the recording floor — what
//!    PostgreSQL spends on delivery's writes alone (`outbox::claim` and
//!    `outbox::finish_all` of every message as sent, batches of 1,000, in
//!    one backend, no HTTP, nothing else running). At half of wrk's rate,
//!    the worker gets what is left of 2 cores / (wrk/2) after the receiver
//!    and the backend's own CPU for recording (a lower bound: the client's
//!    encoding, the WAL writer and the commits' flushes come on top).
//! 4. The client floor, the ceiling of the issue's own stack: the
//!    worker's client path with no database at all — the generic template
//!    rendered with minijinja, signed, sent by reqwest, 32 in flight, to
//!    the same receiver (100,000 messages, twice; and again with the body
//!    rendered once, only signed and sent). Its ratio to wrk bounds what
//!    any outbox design can reach on the machine.
//!
//! Prints JSON lines. Needs wrk (`apt-get install wrk`) and the local
//! PostgreSQL made ready by docker/setup-local-databases.sh.

#[path = "support/proc_cpu.rs"]
mod proc_cpu;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loyalty_cdc::config::Settings;
use loyalty_cdc::delivery::worker::Worker;
use loyalty_cdc::delivery::SystemClock;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// The service binary's allocator (src/main.rs), so the worker is timed
/// as it runs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const RUNS: usize = 3;
const PG: &str = "postgres://postgres@127.0.0.1:5432";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

async fn connect(database: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&format!("{PG}/{database}"), NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("connect {database}: {e}; run bash docker/setup-local-databases.sh")
        });
    tokio::spawn(connection);
    client
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// The receiver process: prints its port, answers 204, counts.
async fn receiver() {
    let count = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&count);
    let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let counter = Arc::clone(&counter);
        async move {
            let _ = body.len();
            counter.fetch_add(1, Ordering::Relaxed);
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap().port());
    axum::serve(listener, app).await.unwrap();
}

/// CPU seconds (user + system) a process has used so far. A budget from a
/// process that could not be read would be wrong, not smaller: it panics.
fn cpu_seconds(pid: u32) -> f64 {
    proc_cpu::seconds(&pid.to_string())
        .unwrap_or_else(|| panic!("/proc/{pid}/stat: not readable, or no CPU times in it"))
}

/// To a tenth, for printing.
fn tenths(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

/// µs per message of recording deliveries alone, every message claimed and
/// recorded as sent by the worker's own statements, with no HTTP and no
/// other load: the wall time (client and server one after the other, and
/// the commits' flushes) and the server backend's own CPU time.
async fn recording_floor(admin: &tokio_postgres::Client, messages: i64) -> (f64, f64) {
    use loyalty_cdc::delivery::outbox::{self, Attempt, Finished, Outcome};
    let database = "lcdc_bench_delivery_floor";
    let ledger = fresh_ledger(admin, database, messages).await;
    // Vacuumed and on disk before the timing (the runs' rows are not): the
    // floor errs low, as a floor should.
    for statement in ["VACUUM ANALYZE outbox", "CHECKPOINT"] {
        ledger.batch_execute(statement).await.unwrap();
    }
    let backend: i32 = ledger
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let db = loyalty_cdc::ledger::db::Db::new(ledger);
    let backend_cpu_before = cpu_seconds(backend as u32);
    let started = Instant::now();
    let mut recorded = 0;
    loop {
        db.batch_execute("BEGIN").await.unwrap();
        let claimed = outbox::claim(&db, chrono::Utc::now(), 1000, (0, 1))
            .await
            .unwrap();
        if claimed.is_empty() {
            db.batch_execute("COMMIT").await.unwrap();
            break;
        }
        let now = chrono::Utc::now();
        let finished: Vec<Finished> = claimed
            .iter()
            .map(|m| {
                Finished::of(
                    m,
                    &m.provider,
                    now,
                    Outcome::Sent,
                    Attempt {
                        requested: true,
                        status_code: Some(204),
                        latency_ms: Some(1),
                        detail: Some("204".into()),
                    },
                )
            })
            .collect();
        outbox::finish_all(&db, &finished).await.unwrap();
        db.batch_execute("COMMIT").await.unwrap();
        recorded += claimed.len();
    }
    let per_message = |seconds: f64| seconds * 1e6 / recorded.max(1) as f64;
    let wall = per_message(started.elapsed().as_secs_f64());
    let backend_cpu = per_message(cpu_seconds(backend as u32) - backend_cpu_before);
    drop(db);
    drop_database(admin, database).await;
    (wall, backend_cpu)
}

/// A new ledger database `database`, migrated, with members, balances and
/// `messages` pending tier upgrades to the webhook.
async fn fresh_ledger(
    admin: &tokio_postgres::Client,
    database: &str,
    messages: i64,
) -> tokio_postgres::Client {
    drop_database(admin, database).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let mut ledger = connect(database).await;
    loyalty_cdc::ledger::migrate(&mut ledger).await.unwrap();
    ledger.batch_execute(&fill_sql(messages)).await.unwrap();
    ledger
}

async fn drop_database(admin: &tokio_postgres::Client, database: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
        .await
        .unwrap();
}

fn fill_sql(messages: i64) -> String {
    format!(
        "INSERT INTO members (created_at, tier) SELECT now(), 'gold' FROM generate_series(1, {members});
         INSERT INTO balances (member_id, available, pending, lifetime, updated_at)
           SELECT member_id, 1200, 0, 1500, now() FROM members;
         INSERT INTO outbox (dedupe_key, member_id, trigger, route, provider, channel, occurred_at, payload)
           SELECT 'bench:' || n, 1 + n % {members}, 'tier_upgrade', 'tier_upgrade_webhook', 'webhook', 'webhook', now(),
                  jsonb_build_object('trigger', jsonb_build_object('kind', 'tier_upgrade',
                      'occurred_at', now(), 'data', jsonb_build_object('tier', 'gold', 'previous_tier', 'silver')))
             FROM generate_series(1, {messages}) n;",
        members = (messages / 2).max(1)
    )
}

/// wrk's requests/s and the receiver's CPU µs per request meanwhile.
fn wrk(port: u16, receiver: u32, dir: &std::path::Path) -> (f64, f64) {
    let body = format!(
        "{{\"type\":\"loyalty.tier_upgrade\",\"pad\":\"{}\"}}",
        "x".repeat(650)
    );
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{body}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .unwrap();
    let cpu_before = cpu_seconds(receiver);
    let output = Command::new("wrk")
        .args(["-t2", "-c32", "-d10s", "-s"])
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}/hook"))
        .output()
        .unwrap_or_else(|e| panic!("wrk: {e}; install it with apt-get install wrk"));
    let receiver_cpu = cpu_seconds(receiver) - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout);
    let requests_per_s: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in wrk output: {text}"));
    let requests: f64 = text
        .lines()
        .find_map(|l| l.split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no request count in wrk output: {text}"));
    (requests_per_s, receiver_cpu * 1e6 / requests)
}

async fn one_run(
    admin: &tokio_postgres::Client,
    run: usize,
    port: u16,
    messages: i64,
    dir: &std::path::Path,
) -> f64 {
    let database = format!("lcdc_bench_delivery_{run}");
    let ledger = fresh_ledger(admin, &database, messages).await;
    let path = dir.join(format!("delivery-{run}.toml"));
    let providers = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/providers");
    std::fs::write(
        &path,
        format!(
            "[ledger]\nurl = \"{PG}/{database}\"\n\n[[providers]]\nname = \"webhook\"\ntemplate = \"{}/webhook.toml\"\nbase_url = \"http://127.0.0.1:{port}/hook\"\nsecrets.signing_secret = \"{SECRET}\"\nrate_per_second = 1000000\nconcurrency = 64\n\n[[triggers.routes]]\ntrigger = \"tier_upgrade\"\nprovider = \"webhook\"\n",
            providers.display()
        ),
    )
    .unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let worker = Worker::new(&settings, Arc::new(SystemClock)).await.unwrap();
    let shutdown = CancellationToken::new();
    let counts = Arc::clone(&worker.counts);
    let started = Instant::now();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    // The worker's own count (polling the outbox with SQL every few
    // milliseconds would load the database the worker is measured on);
    // checked against the table once at the end.
    while (counts.sent.load(Ordering::Relaxed) as i64) < messages {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await.unwrap();
    let sent: i64 = ledger
        .query_one("SELECT count(*) FROM outbox WHERE status = 'sent'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(sent, messages, "every message recorded as sent");
    drop(ledger);
    drop_database(admin, &database).await;
    messages as f64 / elapsed
}

#[tokio::main]
async fn main() {
    if std::env::var_os("LCDC_BENCH_RECEIVER").is_some() {
        receiver().await;
        return;
    }
    let messages: i64 = std::env::var("LCDC_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
        }
    }
    let mut child = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .env("LCDC_BENCH_RECEIVER", "1")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line.trim().parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin = connect("postgres").await;

    let (wrk_rps, receiver_us) = wrk(port, child.0.id(), dir.path());
    println!(
        "{}",
        serde_json::json!({
            "reference": "wrk -t2 -c32",
            "requests_per_s": wrk_rps.round(),
            "receiver_cpu_us_per_request": tenths(receiver_us),
        })
    );
    let mut rates = Vec::new();
    for run in 0..RUNS {
        let rate = one_run(&admin, run, port, messages, dir.path()).await;
        println!(
            "{}",
            serde_json::json!({ "run": run, "messages": messages, "deliveries_per_s": rate.round() })
        );
        rates.push(rate);
    }
    let ours = median(rates);
    println!(
        "{}",
        serde_json::json!({
            "deliveries_per_s_median": ours.round(),
            "wrk_requests_per_s": wrk_rps.round(),
            "ratio": (ours / wrk_rps * 1000.0).round() / 1000.0,
        })
    );
    let (floor_us, floor_backend_us) = recording_floor(&admin, messages).await;
    // Both cores at half of wrk's rate: CPU µs per message for everything.
    let budget_us = 2.0 * 1e6 / (wrk_rps / 2.0);
    println!(
        "{}",
        serde_json::json!({
            "budget_at_half_wrk_us_per_message": tenths(budget_us),
            "receiver_cpu_us_per_request": tenths(receiver_us),
            "recording_floor_us_per_message": tenths(floor_us),
            "recording_backend_cpu_us_per_message": tenths(floor_backend_us),
            "left_for_worker_us_per_message": tenths(budget_us - receiver_us - floor_backend_us),
            "used_now_us_per_message": tenths(2.0 * 1e6 / ours),
        })
    );
    // The ceiling of the issue's own stack: the worker's client path with
    // no database at all, twice each, alternating.
    let mut floors: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for render in [false, true, false, true] {
        floors[usize::from(render)].push(client_floor(port, CLIENT_FLOOR_MESSAGES, render).await);
    }
    for (render, runs) in floors.iter().enumerate() {
        let rate = median(runs.iter().map(|r| r.0).collect());
        println!(
            "{}",
            serde_json::json!({
                "client_floor": if render == 1 { "render+sign+send" } else { "sign+send" },
                "messages_per_s_median": rate.round(),
                "ratio_to_wrk": (rate / wrk_rps * 1000.0).round() / 1000.0,
                "client_cpu_us_per_message": runs.iter().map(|r| tenths(r.1)).collect::<Vec<_>>(),
            })
        );
    }
    drop(child);
}

/// Messages per client-floor run: about 2–3 s each at its rate.
const CLIENT_FLOOR_MESSAGES: usize = 100_000;

/// The worker's client path with no database: `messages` webhooks from
/// the generic template (`connectors/providers/webhook.toml`), rendered
/// with minijinja from a context of the worker's shape, signed (Standard
/// Webhooks) and sent by reqwest with the worker's client settings, 32 in
/// flight as in the wrk run, to the same receiver. With `render` false the
/// body is rendered once and only signed and sent per message. No claim,
/// no policy, no recording: what the issue's own stack (reqwest, minijinja,
/// HMAC) can deliver on this machine with the database free. Returns
/// messages/s and this process's CPU µs per message.
async fn client_floor(port: u16, messages: usize, render: bool) -> (f64, f64) {
    use loyalty_cdc::delivery::sign::SigningKey;
    use loyalty_cdc::delivery::template::ProviderTemplate;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/providers/webhook.toml");
    let template = Arc::new(
        ProviderTemplate::load(&path)
            .unwrap_or_else(|problems| panic!("{}: {problems:?}", path.display())),
    );
    let key = Arc::new(SigningKey::parse(SECRET).unwrap());
    // As `Worker::new` builds its client (the default 10 s timeout).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("loyalty-cdc/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}/hook");
    let url = reqwest::Url::parse(&base).unwrap();
    let trigger = serde_json::json!({
        "kind": "tier_upgrade",
        "occurred_at": "2026-12-03T11:00:00Z",
        "data": { "tier": "gold", "previous_tier": "silver" },
    });
    // As the worker builds it per message (src/delivery/worker.rs
    // `context`, private to it, over a message, a provider and a contact
    // this floor does not have): a change to that shape belongs here too.
    let context = move |n: usize| {
        use minijinja::{context, Value};
        context! {
            message => context! {
                id => uuid::Uuid::from_u128(n as u128 + 1).to_string(),
                created_at => "2026-12-03T11:00:00Z",
            },
            trigger => Value::from_serialize(&trigger),
            offer => Value::from(()),
            member => context! {
                id => n as i64, external_id => n.to_string(), tier => "gold",
                points => context! { available => 1200, pending => 0, lifetime => 1500 },
            },
            settings => context! {}, secrets => context! {}, params => context! {},
        }
    };
    let fixed = template.render(Some(&base), &context(0)).unwrap();
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let template = Arc::clone(&template);
            let key = Arc::clone(&key);
            let (http, url, base, fixed) = (http.clone(), url.clone(), base.clone(), fixed.clone());
            let next = Arc::clone(&next);
            let context = context.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if n >= messages {
                        break;
                    }
                    let request = if render {
                        template.render(Some(&base), &context(n)).unwrap()
                    } else {
                        fixed.clone()
                    };
                    let id = uuid::Uuid::from_u128(n as u128 + 1).to_string();
                    let timestamp = chrono::Utc::now().timestamp();
                    let signature = key.sign(&id, timestamp, &request.body);
                    let response = http
                        .post(url.clone())
                        .header(reqwest::header::CONTENT_TYPE, request.content_type)
                        .header("webhook-id", id)
                        .header("webhook-timestamp", timestamp.to_string())
                        .header("webhook-signature", signature)
                        .body(request.body)
                        .send()
                        .await
                        .unwrap();
                    assert!(response.status().is_success(), "{}", response.status());
                    let _ = response.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(std::process::id()) - cpu_before;
    (messages as f64 / elapsed, cpu * 1e6 / messages as f64)
}
