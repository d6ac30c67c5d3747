//! The operators' API: dead letters and quarantine.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde_json::json;

use super::{authorized, ledger_failed, problem, unauthorized, ApiState};

/// `?limit=N` of the list endpoints (default 100, at most 1,000).
#[derive(Debug, serde::Deserialize)]
pub(super) struct ListQuery {
    limit: Option<i64>,
}

impl ListQuery {
    fn limit(&self) -> i64 {
        self.limit.unwrap_or(100).clamp(1, 1000)
    }
}

/// A list answer: `{"<key>": [...]}`, or the ledger's failure.
fn listed<T: serde::Serialize>(key: &str, rows: Result<Vec<T>, String>) -> Response {
    match rows {
        Ok(rows) => Json(json!({ key: rows })).into_response(),
        Err(error) => ledger_failed(key, &error),
    }
}

/// `GET /v1/dead-letters`: open dead letters, oldest first, with the
/// provider's answer.
pub(super) async fn dead_letters(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let rows = state
        .with_db(async |db| crate::delivery::outbox::dead_letters(db, query.limit()).await)
        .await;
    listed("dead_letters", rows)
}

/// `POST /v1/dead-letters/{id}/replay`: due again (same message id) and
/// the provider's endpoint re-enabled; 404 for an unknown or replayed id.
pub(super) async fn replay_dead_letter(
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
        Err(error) => ledger_failed("replay", &error),
    }
}

/// `GET /v1/quarantine`: open quarantined source rows, oldest first.
pub(super) async fn quarantined(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    let rows = state
        .with_db(async |db| crate::ledger::quarantine::open(db, query.limit()).await)
        .await;
    listed("quarantine", rows)
}

/// The body of `POST /v1/quarantine/replay`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplayBody {
    ids: Vec<i64>,
}

/// `POST /v1/quarantine/replay` with `{"ids": [...]}`: books the rows
/// again as `quarantine replay` does (rows of one source transaction
/// together); 200 when every group was booked, 422 when some failed again
/// or were refused (they stay open), with a report per group either way.
pub(super) async fn replay_quarantined(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Json(body): Json<ReplayBody>,
) -> Response {
    if !authorized(&state, &headers) {
        return unauthorized();
    }
    if body.ids.is_empty() {
        return problem(StatusCode::BAD_REQUEST, "`ids` names no row");
    }
    match crate::pipeline::replay_quarantined(&state.settings, state.writer.clone(), &body.ids)
        .await
    {
        Ok(reports) => {
            for report in &reports {
                // Reasons name columns, statuses and references, never values.
                tracing::info!(rows = ?report.ids, outcome = ?report.replayed, "API: quarantine replay");
            }
            let all_booked = reports.iter().all(|r| {
                matches!(
                    r.replayed,
                    crate::ledger::quarantine::Replayed::Booked { .. }
                )
            });
            let status = if all_booked {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            (status, Json(json!({ "replays": reports }))).into_response()
        }
        Err(error) => ledger_failed("quarantine replay", &error.to_string()),
    }
}
