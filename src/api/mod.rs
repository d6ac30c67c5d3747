//! The HTTP listener of `run` (`[api] listen`): `/metrics` (Prometheus
//! text), `/healthz` (the process answers), `/readyz` (every source
//! connected and moving or confirmed idle recently, the ledger reachable),
//! and the member API behind a bearer token: `GET /v1/members/{identifier}`,
//! the app wallet, and `DELETE` of it, GDPR erasure.
//!
//! Metrics are read when scraped from what the readers, the ledger writers
//! and the delivery worker already keep (their progress and counters) and
//! from the ledger's indexes of what waits; no label carries PII (sources,
//! providers, outcomes and event kinds only).

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::Query;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::{ProgramSettings, Settings};
use crate::identity::Identity;
use crate::ledger::db::Db;
use crate::pipeline::RunningSource;
use crate::source::progress::ReaderState;

/// A source that has neither applied nor confirmed anything for this long
/// is not ready (PostgreSQL sends keepalives every `wal_sender_timeout`/2,
/// 30 s by default; MariaDB heartbeats come more often).
pub const STALL_BOUND: Duration = Duration::from_secs(90);

/// The process's Prometheus recorder: installed once, shared by every
/// listener of the process (tests start several).
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            // Constant, valid buckets: building cannot fail.
            .expect("histogram buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder already installed (an embedding program's):
        // its handle is not ours to render; ours then renders what the
        // scrape sets below (the gauges), which is still truthful.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Makes sure the recorder exists before anything records (call at start).
pub fn install_recorder() {
    let _ = recorder();
}

/// What the handlers read.
pub struct ApiState {
    sources: Vec<RunningSource>,
    settings: Arc<Settings>,
    identity: Identity,
    token: Option<String>,
    /// One ledger connection for scrapes and the wallet (reconnected when
    /// lost).
    db: tokio::sync::Mutex<Option<Db>>,
    /// Redemptions fire the `redemption` trigger like a source's.
    triggers: Arc<crate::triggers::Triggers>,
    /// The ledger writers' turn (see `WriterLock`).
    writer: crate::ledger::apply::WriterLock,
}

impl ApiState {
    pub fn new(settings: Arc<Settings>, sources: Vec<RunningSource>) -> Result<Self, String> {
        let identity = Identity::new(&settings.identity)?;
        let token = settings
            .api
            .token
            .as_ref()
            .and_then(|t| t.expose())
            .map(str::to_string);
        let writer = sources
            .first()
            .map(|s| s.writer.clone())
            .unwrap_or_default();
        let triggers = crate::triggers::Triggers::from_settings(&settings);
        Ok(Self {
            sources,
            settings,
            identity,
            token,
            db: tokio::sync::Mutex::new(None),
            triggers,
            writer,
        })
    }

    /// Runs `f` on the ledger connection, connecting first if needed.
    async fn with_db<T>(
        &self,
        f: impl AsyncFnOnce(&Db) -> Result<T, tokio_postgres::Error>,
    ) -> Result<T, String> {
        let mut guard = self.db.lock().await;
        if guard.as_ref().is_none_or(Db::is_closed) {
            let client = crate::ledger::connect(&self.settings.ledger)
                .await
                .map_err(|e| e.to_string())?;
            *guard = Some(Db::new(client));
        }
        let Some(db) = guard.as_ref() else {
            return Err("no ledger connection".into());
        };
        f(db).await.map_err(|e| crate::ledger::db::describe(&e))
    }
}

const MEMBER: &str = "/v1/members/{identifier}";
const REDEMPTIONS: &str = "/v1/members/{identifier}/redemptions";
const CONSENT: &str = "/v1/members/{identifier}/consent";
const DEAD_LETTERS: &str = "/v1/dead-letters";
const REPLAY: &str = "/v1/dead-letters/{id}/replay";
const QUARANTINE: &str = "/v1/quarantine";

/// Every operation served, as `docs/openapi.json` documents them (a test
/// holds the two equal; [`router`] serves exactly these).
pub const OPERATIONS: [(&str, &str); 10] = [
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", MEMBER),
    ("delete", MEMBER),
    ("post", REDEMPTIONS),
    ("post", CONSENT),
    ("get", DEAD_LETTERS),
    ("post", REPLAY),
    ("get", QUARANTINE),
];

/// The routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .route(MEMBER, get(wallet).delete(erase_member))
        .route(REDEMPTIONS, post(redeem))
        .route(CONSENT, post(consent))
        .route(DEAD_LETTERS, get(dead_letters))
        .route(REPLAY, post(replay_dead_letter))
        .route(QUARANTINE, get(quarantined))
        .with_state(state)
}

/// Serves until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Why a source is not ready, if it is not.
fn unready(source: &RunningSource) -> Option<String> {
    let progress = source.progress.snapshot();
    match &progress.state {
        ReaderState::Streaming | ReaderState::Snapshotting
            if progress.since_progress <= STALL_BOUND =>
        {
            None
        }
        ReaderState::Streaming | ReaderState::Snapshotting => Some(format!(
            "no progress and no idle confirmation for {} s",
            progress.since_progress.as_secs()
        )),
        ReaderState::Starting => Some("starting".into()),
        ReaderState::Reconnecting(error) => Some(format!("reconnecting: {error}")),
        ReaderState::Stopped => Some("stopped".into()),
        ReaderState::Failed(error) => Some(format!("failed: {error}")),
    }
}

async fn ready(State(state): State<Arc<ApiState>>) -> Response {
    let mut problems = serde_json::Map::new();
    for source in &state.sources {
        if let Some(why) = unready(source) {
            problems.insert(source.name.clone(), json!(why));
        }
    }
    let ledger = state
        .with_db(async |db| db.query_one("SELECT 1", &[]).await.map(|_| ()))
        .await;
    if let Err(error) = ledger {
        problems.insert("ledger".into(), json!(error));
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "problems": problems })),
        )
            .into_response()
    }
}

fn state_label(state: &ReaderState) -> &'static str {
    match state {
        ReaderState::Starting => "starting",
        ReaderState::Snapshotting => "snapshotting",
        ReaderState::Streaming => "streaming",
        ReaderState::Reconnecting(_) => "reconnecting",
        ReaderState::Stopped => "stopped",
        ReaderState::Failed(_) => "failed",
    }
}

const STATES: [&str; 6] = [
    "starting",
    "snapshotting",
    "streaming",
    "reconnecting",
    "stopped",
    "failed",
];

/// Sets the scrape-time figures, then renders every metric.
async fn metrics_text(State(state): State<Arc<ApiState>>) -> Response {
    let now = Utc::now();
    // Every source asked for its head at once (each within 5 s), so a
    // scrape takes as long as the slowest, not the sum.
    let mut probes = futures_util::future::join_all(state.sources.iter().map(|source| {
        let settings = state
            .settings
            .sources
            .iter()
            .find(|s| s.name == source.name);
        let applied = source.progress.snapshot().applied;
        async move {
            match settings {
                Some(settings) => crate::status::probe(settings, applied.as_ref()).await,
                None => Err("not configured".to_string()),
            }
        }
    }))
    .await
    .into_iter();
    for source in &state.sources {
        let name = source.name.clone();
        let progress = source.progress.snapshot();
        let current = state_label(&progress.state);
        for label in STATES {
            metrics::gauge!("loyalty_source_state", "source" => name.clone(), "state" => label)
                .set(if label == current { 1.0 } else { 0.0 });
        }
        metrics::gauge!("loyalty_source_seconds_since_progress", "source" => name.clone())
            .set(progress.since_progress.as_secs_f64());
        metrics::counter!("loyalty_source_row_changes_total", "source" => name.clone())
            .absolute(progress.changes_applied);
        metrics::counter!("loyalty_source_transactions_total", "source" => name.clone())
            .absolute(progress.transactions_applied);
        metrics::counter!("loyalty_source_reconnects_total", "source" => name.clone())
            .absolute(progress.reconnects);
        metrics::counter!("loyalty_source_snapshot_rows_total", "source" => name.clone())
            .absolute(progress.snapshot_rows);
        metrics::gauge!("loyalty_source_snapshot_tables", "source" => name.clone(), "state" => "done")
            .set(progress.snapshot_tables_done as f64);
        metrics::gauge!("loyalty_source_snapshot_tables", "source" => name.clone(), "state" => "total")
            .set(progress.snapshot_tables as f64);
        // Bytes behind, asked of the source itself (below, all at once);
        // unknown (the source cannot be asked) is NaN, never the last value.
        let probe = probes.next().unwrap_or(Err(String::new()));
        metrics::gauge!("loyalty_source_probe_up", "source" => name.clone())
            .set(if probe.is_ok() { 1.0 } else { 0.0 });
        let lag_bytes = probe.ok().flatten();
        metrics::gauge!("loyalty_source_lag_bytes", "source" => name.clone())
            .set(lag_bytes.map_or(f64::NAN, |bytes| bytes as f64));
        if let Some(seconds) = crate::status::lag_seconds(lag_bytes, progress.last_commit_ts, now) {
            metrics::gauge!("loyalty_source_lag_seconds", "source" => name.clone()).set(seconds);
        }
        let counts = &source.counts;
        for (kind, count) in [
            ("order", &counts.orders),
            ("refund", &counts.refunds),
            ("customer", &counts.customers),
            ("redemption", &counts.redemptions),
        ] {
            metrics::counter!("loyalty_ledger_events_total", "source" => name.clone(), "kind" => kind)
                .absolute(count.load(Ordering::Relaxed));
        }
        metrics::counter!("loyalty_ledger_anonymous_orders_total", "source" => name.clone())
            .absolute(counts.anonymous.load(Ordering::Relaxed));
        metrics::counter!("loyalty_ledger_quarantined_total", "source" => name.clone())
            .absolute(counts.quarantined.load(Ordering::Relaxed));
        metrics::counter!("loyalty_ledger_commits_total", "source" => name.clone())
            .absolute(counts.commits.load(Ordering::Relaxed));
    }
    match state
        .with_db(async |db| crate::status::backlog(db, now).await)
        .await
    {
        Ok(backlog) => {
            metrics::gauge!("loyalty_outbox_pending").set(backlog.outbox_pending as f64);
            metrics::gauge!("loyalty_outbox_oldest_pending_seconds")
                .set(backlog.outbox_oldest_pending_seconds.unwrap_or(0.0));
            metrics::gauge!("loyalty_dead_letters_open").set(backlog.dead_letters as f64);
            metrics::gauge!("loyalty_quarantine_open").set(backlog.quarantined as f64);
            metrics::gauge!("loyalty_ledger_up").set(1.0);
        }
        Err(error) => {
            tracing::warn!(error = %error, "metrics: the ledger could not be read");
            metrics::gauge!("loyalty_ledger_up").set(0.0);
        }
    }
    if let Some(bytes) = resident_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(bytes as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        recorder().render(),
    )
        .into_response()
}

/// Resident memory of this process (Linux `/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Pages of 4 KiB: the size on every Linux this runs on (x86-64,
    // aarch64 with 4 KiB pages); no libc call needed for it.
    Some(pages * 4096)
}

/// Whether the request carries the configured bearer token (compared in
/// constant time). Without a configured token the API answers loopback
/// only (the configuration refuses anything else), and every request is
/// let in.
fn authorized(state: &ApiState, headers: &HeaderMap) -> bool {
    let Some(expected) = &state.token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.as_bytes(), expected.as_bytes())
}

/// Equality that takes the same time wherever the first difference is
/// (hmac's `verify_slice` does this for MACs; a token is no MAC, and these
/// five lines need no crate).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": "a bearer token is required (Authorization: Bearer <api.token>)" })),
    )
        .into_response()
}

/// The member an identifier in a path names, or the error response.
async fn resolve(state: &ApiState, identifier: &str) -> Result<Option<i64>, Response> {
    let found = state
        .with_db(async |db| {
            Ok(crate::ledger::members::find_typed(db, &state.identity, identifier).await)
        })
        .await;
    match found {
        Ok(Ok(member)) => Ok(member),
        Ok(Err(crate::ledger::members::LookupError::Invalid(message))) => {
            Err(problem(StatusCode::BAD_REQUEST, message))
        }
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "member API: the ledger could not be read");
            Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be read",
            ))
        }
        Err(error) => {
            tracing::warn!(error = %error, "member API: the ledger could not be read");
            Err(problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be read",
            ))
        }
    }
}

/// `DELETE /v1/members/{identifier}`: GDPR erasure (see `erasure`). 200
/// with what was done; 502 when a provider did not accept it (nothing
/// erased here, repeat later); 404 for an identifier no member has.
async fn erase_member(
    State(state): State<Arc<ApiState>>,
    Path(identifier): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let member = match resolve(&state, &identifier).await {
        Ok(Some(member)) => member,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                "no member has this identifier (erased before, or never known)",
            )
        }
        Err(response) => return response,
    };
    // On a task of its own: a client that hangs up cannot leave the
    // ledger connection inside an open transaction. The providers are
    // asked with no lock held.
    let task = {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            use crate::erasure::{self, Target};
            let contact = match state
                .with_db(async |db| erasure::target(db, member).await)
                .await?
            {
                Target::Member(contact) => contact,
                Target::Nothing(answer) => return Ok(answer),
            };
            let providers = erasure::ask_providers(&state.settings, &contact, false).await;
            state
                .with_db(async |db| {
                    erasure::erase_here(db, &state.identity, &contact, providers).await
                })
                .await
        })
    };
    let result = task
        .await
        .unwrap_or_else(|e| Err(format!("the erasure task ended: {e}")));
    match result {
        Ok(erasure @ crate::erasure::Erasure::ProvidersFailed { .. }) => {
            (StatusCode::BAD_GATEWAY, Json(erasure)).into_response()
        }
        Ok(erasure) => Json(erasure).into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "erasure failed and was rolled back");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be written; nothing was erased",
            )
        }
    }
}

/// `GET /v1/members/{identifier}`: the app wallet — balance (available,
/// pending), tier and progress to the next, current offers.
async fn wallet(
    State(state): State<Arc<ApiState>>,
    Path(identifier): Path<String>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let member = match resolve(&state, &identifier).await {
        Ok(Some(member)) => member,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no member has this identifier"),
        Err(response) => return response,
    };
    let program: &ProgramSettings = &state.settings.program;
    let wallet = state
        .with_db(async |db| {
            let Some(view) = crate::ledger::members::view(db, member).await? else {
                return Ok(None);
            };
            let progress = crate::ledger::tiers::progress(db, program, member, Utc::now()).await?;
            let offers = crate::ledger::offers::open(db, member, Utc::now()).await?;
            Ok(Some(json!({
                "member_id": view.member_id,
                "points": { "available": view.points.available, "pending": view.points.pending, "lifetime": view.points.lifetime },
                "tier": progress.tier,
                "tier_progress": {
                    "qualifying_points": progress.qualifying_points,
                    "next_tier": progress.next_tier,
                    "next_threshold": progress.next_threshold,
                    "points_to_next": progress.points_to_next,
                    "period_end": progress.period_end,
                },
                "offers": offers,
                "segments": view.segments,
            })))
        })
        .await;
    match wallet {
        Ok(Some(body)) => Json(body).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no member has this identifier"),
        Err(error) => {
            tracing::warn!(error = %error, "wallet: the ledger could not be read");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be read",
            )
        }
    }
}

/// `POST /v1/members/{identifier}/redemptions` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RedemptionRequest {
    points: i64,
}

/// The longest idempotency key taken (it becomes part of a ledger key).
const MAX_IDEMPOTENCY_KEY: usize = 200;

/// What a redemption request did.
enum Redeemed {
    Now,
    Before,
    KeyReused,
    Insufficient(i64),
}

/// `POST /v1/members/{identifier}/redemptions` with an `Idempotency-Key`
/// header: spends available points, never below zero (409 with what is
/// available). The same key again answers what the first request did (200
/// instead of 201) and books nothing; the same key for another redemption
/// is refused (422).
async fn redeem(
    State(state): State<Arc<ApiState>>,
    Path(identifier): Path<String>,
    headers: HeaderMap,
    body: Option<Json<RedemptionRequest>>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
        .map(str::to_string)
    else {
        return problem(
            StatusCode::BAD_REQUEST,
            format!("an Idempotency-Key header (1 to {MAX_IDEMPOTENCY_KEY} characters) is required: a retried request must not spend twice"),
        );
    };
    let Some(Json(request)) = body.filter(|b| b.points > 0) else {
        return problem(
            StatusCode::BAD_REQUEST,
            "the body must be JSON {\"points\": N} with N > 0",
        );
    };
    let member = match resolve(&state, &identifier).await {
        Ok(Some(member)) => member,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no member has this identifier"),
        Err(response) => return response,
    };
    let points = request.points;
    let now = Utc::now();
    // On a task of its own: a client that hangs up cannot leave the
    // ledger connection inside an open transaction.
    let task = {
        let state = Arc::clone(&state);
        let key = key.clone();
        tokio::spawn(async move {
            let _turn = state.writer.hold().await;
            state
                .with_db(async |db| {
                    db.batch_execute("BEGIN").await?;
                    let booked = redeem_in(db, &state.triggers, member, &key, points, now).await;
                    match booked {
                        Ok(redeemed) => {
                            db.batch_execute("COMMIT").await?;
                            let available: i64 = db
                                .query_opt(
                                    "SELECT available FROM balances WHERE member_id = $1",
                                    &[&member],
                                )
                                .await?
                                .map_or(0, |r| r.get(0));
                            Ok((redeemed, available))
                        }
                        Err(error) => {
                            let _ = db.batch_execute("ROLLBACK").await;
                            Err(error)
                        }
                    }
                })
                .await
        })
    };
    let result = task
        .await
        .unwrap_or_else(|e| Err(format!("the redemption task ended: {e}")));
    let body =
        |available: i64| json!({ "redemption_ref": key, "points": points, "available": available });
    match result {
        Ok((Redeemed::Now, available)) => {
            (StatusCode::CREATED, Json(body(available))).into_response()
        }
        Ok((Redeemed::Before, available)) => (StatusCode::OK, Json(body(available))).into_response(),
        Ok((Redeemed::KeyReused, _)) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "this Idempotency-Key was used for another redemption; use a new key for a new redemption",
        ),
        Ok((Redeemed::Insufficient(available), _)) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("{points} points exceed the {available} available; the balance never goes below zero"),
                "available": available,
            })),
        )
            .into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "redemption failed and was rolled back");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be written; nothing was redeemed; retry with the same key",
            )
        }
    }
}

/// A redemption in the open transaction, with its trigger.
async fn redeem_in(
    db: &Db,
    triggers: &crate::triggers::Triggers,
    member: i64,
    key: &str,
    points: i64,
    now: chrono::DateTime<Utc>,
) -> Result<Redeemed, tokio_postgres::Error> {
    let effect = format!("api:redemption:{key}");
    // The key used before: for this redemption, or for another?
    if let Some(row) = db
        .query_opt(
            "SELECT member_id, -points FROM ledger_entries WHERE effect_key = $1",
            &[&effect],
        )
        .await?
    {
        let same = row.get::<_, i64>(0) == member && row.get::<_, i64>(1) == points;
        return Ok(if same {
            Redeemed::Before
        } else {
            Redeemed::KeyReused
        });
    }
    let event = crate::normalize::RedemptionEvent {
        redemption_ref: key.to_string(),
        points,
        identifiers: Default::default(),
    };
    match crate::ledger::orders::apply_redemption(db, "api", &event, member, now).await? {
        crate::ledger::orders::Booked::Insufficient(available) => {
            Ok(Redeemed::Insufficient(available))
        }
        _ => {
            let mut facts = crate::triggers::BatchFacts::default();
            facts.touched(member, true, now);
            facts.redeemed("api", member, key, points, now);
            crate::triggers::record(db, triggers, facts).await?;
            Ok(Redeemed::Now)
        }
    }
}

/// `POST /v1/members/{identifier}/consent` body: what the member said;
/// an absent field stays as it was.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentRequest {
    email: Option<bool>,
    sms: Option<bool>,
    push: Option<bool>,
}

/// `POST /v1/members/{identifier}/consent`: records email, SMS and push
/// consent (as a source's profile change would); answers the consent now.
async fn consent(
    State(state): State<Arc<ApiState>>,
    Path(identifier): Path<String>,
    headers: HeaderMap,
    body: Option<Json<ConsentRequest>>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let Some(Json(request)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "the body must be JSON with any of \"email\", \"sms\", \"push\": true or false",
        );
    };
    let member = match resolve(&state, &identifier).await {
        Ok(Some(member)) => member,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no member has this identifier"),
        Err(response) => return response,
    };
    let profile = crate::normalize::Profile {
        email_opt_in: request.email,
        sms_opt_in: request.sms,
        push_opt_in: request.push,
        ..Default::default()
    };
    let result = state
        .with_db(async |db| {
            crate::ledger::members::update_profile(db, member, &profile, Utc::now()).await?;
            Ok(crate::ledger::members::contacts(db, &[member])
                .await?
                .remove(&member))
        })
        .await;
    match result {
        Ok(Some(contact)) => Json(json!({
            "member_id": contact.member_id.to_string(),
            "consent": { "email": contact.email_opt_in, "sms": contact.sms_opt_in, "push": contact.push_opt_in },
        }))
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no member has this identifier"),
        Err(error) => {
            tracing::warn!(error = %error, "consent: the ledger could not be written");
            problem(StatusCode::SERVICE_UNAVAILABLE, "the ledger could not be written")
        }
    }
}

/// `?limit=N` of the list endpoints (default 100, at most 1,000).
#[derive(Debug, serde::Deserialize)]
struct ListQuery {
    limit: Option<i64>,
}

impl ListQuery {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }
}

/// `GET /v1/dead-letters`: open dead letters, oldest first, with the
/// provider's answer.
async fn dead_letters(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state
        .with_db(async |db| crate::delivery::outbox::dead_letters(db, query.limit()).await)
        .await
    {
        Ok(letters) => Json(json!({ "dead_letters": letters })).into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "dead letters: the ledger could not be read");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be read",
            )
        }
    }
}

/// `POST /v1/dead-letters/{id}/replay`: due again (same message id) and
/// the provider's endpoint re-enabled; 404 for an unknown or replayed id.
async fn replay_dead_letter(
    State(state): State<Arc<ApiState>>,
    Path(id): Path<i64>,
    headers: HeaderMap,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state
        .with_db(async |db| crate::delivery::outbox::replay(db, &[id], Utc::now()).await)
        .await
    {
        Ok(replayed) if replayed.contains(&id) => Json(json!({ "replayed": id })).into_response(),
        Ok(_) => problem(
            StatusCode::NOT_FOUND,
            "no open dead letter has this id (unknown, or replayed before)",
        ),
        Err(error) => {
            tracing::warn!(error = %error, "replay: the ledger could not be written");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be written",
            )
        }
    }
}

/// `GET /v1/quarantine`: open quarantined source rows, oldest first.
async fn quarantined(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    match state
        .with_db(async |db| crate::ledger::quarantine::open(db, query.limit()).await)
        .await
    {
        Ok(rows) => Json(json!({ "quarantine": rows })).into_response(),
        Err(error) => {
            tracing::warn!(error = %error, "quarantine: the ledger could not be read");
            problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the ledger could not be read",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_exactly_the_operations_served() {
        let document: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/openapi.json")).expect("valid JSON");
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, item) in document["paths"].as_object().expect("paths") {
            for method in ["get", "post", "put", "patch", "delete"] {
                if item.get(method).is_some() {
                    documented.push((method.to_string(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut served: Vec<(String, String)> = OPERATIONS
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        served.sort();
        assert_eq!(documented, served);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
