//! The HTTP listener of `run` (`[api] listen`): `/metrics` (Prometheus
//! text), `/healthz` (the process answers), `/readyz` (every source
//! connected and moving or confirmed idle recently, the ledger reachable),
//! and the member API behind a bearer token: `GET /v1/members/{identifier}`,
//! the app wallet, and `DELETE` of it, GDPR erasure.
//!
//! Everything under `/v1/` (the member API, the operators' dead letters and
//! quarantine) needs the bearer token.
//!
//! - `health.rs`: `/healthz`, `/readyz`.
//! - `metrics.rs`: the Prometheus recorder and `/metrics`.
//! - `members.rs`: wallet, redemptions, consent, erasure.
//! - `admin.rs`: dead letters and quarantine.
//! - here: the state, the routes (as `docs/openapi.json` documents them),
//!   authorization and the identifier in a path.

use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::identity::Identity;
use crate::ledger::db::Db;
use crate::pipeline::RunningSource;

mod admin;
mod health;
mod members;
mod metrics;

use admin::{dead_letters, quarantined, replay_dead_letter, replay_quarantined};
use health::ready;
use members::{consent, erase_member, redeem, wallet};
pub use metrics::install_recorder;
use metrics::metrics_text;

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
const QUARANTINE_REPLAY: &str = "/v1/quarantine/replay";

/// Every operation served, as `docs/openapi.json` documents them (a test
/// holds the two equal; [`router`] serves exactly these).
pub const OPERATIONS: [(&str, &str); 11] = [
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
    ("post", QUARANTINE_REPLAY),
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
        .route(QUARANTINE_REPLAY, post(replay_quarantined))
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

/// The ledger could not be read or written: logged (the error names no
/// personal data) and answered 503.
fn ledger_failed(what: &str, error: &str) -> Response {
    tracing::warn!(error = %error, what, "API: the ledger could not be used");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "the ledger could not be used; retry",
    )
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
        Ok(Err(error)) => Err(ledger_failed("member lookup", &error.to_string())),
        Err(error) => Err(ledger_failed("member lookup", &error)),
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
