//! The member API: the wallet, redemptions, consent, erasure.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use serde_json::json;

use super::{authorized, ledger_failed, problem, resolve, unauthorized, ApiState};
use crate::config::ProgramSettings;
use crate::ledger::db::Db;

/// `DELETE /v1/members/{identifier}`: GDPR erasure (see `erasure`). 200
/// with what was done; 502 when a provider did not accept it (nothing
/// erased here, repeat later); 404 for an identifier no member has.
pub(super) async fn erase_member(
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
pub(super) async fn wallet(
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
        Err(error) => ledger_failed("wallet", &error),
    }
}

/// `POST /v1/members/{identifier}/redemptions` body.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RedemptionRequest {
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
pub(super) async fn redeem(
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
pub(super) struct ConsentRequest {
    email: Option<bool>,
    sms: Option<bool>,
    push: Option<bool>,
    /// Profiling allowed: `false` objects to it (no scores, no segments,
    /// only offers for everyone).
    profiling: Option<bool>,
}

/// `POST /v1/members/{identifier}/consent`: records email, SMS and push
/// consent (as a source's profile change would); answers the consent now.
pub(super) async fn consent(
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
            "the body must be JSON with any of \"email\", \"sms\", \"push\", \"profiling\": true or false",
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
        profiling_opt_out: request.profiling.map(|allowed| !allowed),
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
            "consent": {
                "email": contact.email_opt_in,
                "sms": contact.sms_opt_in,
                "push": contact.push_opt_in,
                "profiling": contact.profiling_opt_out.map(|opted_out| !opted_out),
            },
        }))
        .into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, "no member has this identifier"),
        Err(error) => ledger_failed("consent", &error),
    }
}
