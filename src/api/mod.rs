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

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
        Ok(Self {
            sources,
            settings,
            identity,
            token,
            db: tokio::sync::Mutex::new(None),
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

/// The routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/v1/members/{identifier}", get(wallet).delete(erase_member))
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
        // Bytes behind, asked of the source itself (the slot's confirmed
        // position, or the binlog after the applied one).
        let settings = state.settings.sources.iter().find(|s| s.name == name);
        let lag_bytes = match settings {
            Some(settings) => crate::status::probe(settings, progress.applied.as_ref())
                .await
                .ok()
                .flatten(),
            None => None,
        };
        if let Some(bytes) = lag_bytes {
            metrics::gauge!("loyalty_source_lag_bytes", "source" => name.clone()).set(bytes as f64);
        }
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
    let result = state
        .with_db(async |db| {
            crate::erasure::erase(&state.settings, db, &state.identity, member, false).await
        })
        .await;
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
