//! `/healthz` and `/readyz`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::time::Duration;

use super::ApiState;
use crate::pipeline::RunningSource;
use crate::source::progress::ReaderState;

/// A source that has neither applied nor confirmed anything for this long
/// is not ready (PostgreSQL sends keepalives every `wal_sender_timeout`/2,
/// 30 s by default; MariaDB heartbeats come more often).
pub(super) const STALL_BOUND: Duration = Duration::from_secs(90);

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

pub(super) async fn ready(State(state): State<Arc<ApiState>>) -> Response {
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
