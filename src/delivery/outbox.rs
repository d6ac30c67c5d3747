//! `outbox`, `delivery_attempts`, `dead_letters`, `provider_endpoints`:
//! the state of every message, owned here. `triggers` adds rows through
//! [`enqueue`] inside the ledger transaction; everything else is the
//! worker's and the operators' (`dlq list` / `dlq replay`).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::template::Channel;
use crate::ledger::db::Db;

/// A message to deliver, as a trigger creates it.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// `<occasion>:<route>`: the same occasion is delivered once.
    pub dedupe_key: String,
    pub member: i64,
    pub trigger: &'static str,
    pub route: String,
    pub provider: String,
    pub channel: Channel,
    pub occurred_at: DateTime<Utc>,
    pub payload: serde_json::Value,
}

/// Adds messages; a dedupe key seen before adds nothing. Returns how many
/// were new.
pub async fn enqueue(db: &Db, messages: &[NewMessage]) -> Result<u64, tokio_postgres::Error> {
    if messages.is_empty() {
        return Ok(0);
    }
    let keys: Vec<&str> = messages.iter().map(|m| m.dedupe_key.as_str()).collect();
    let members: Vec<i64> = messages.iter().map(|m| m.member).collect();
    let triggers: Vec<&str> = messages.iter().map(|m| m.trigger).collect();
    let routes: Vec<&str> = messages.iter().map(|m| m.route.as_str()).collect();
    let providers: Vec<&str> = messages.iter().map(|m| m.provider.as_str()).collect();
    let channels: Vec<&str> = messages.iter().map(|m| m.channel.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = messages.iter().map(|m| m.occurred_at).collect();
    let payloads: Vec<&serde_json::Value> = messages.iter().map(|m| &m.payload).collect();
    db.execute(
        "INSERT INTO outbox (dedupe_key, member_id, trigger, route, provider, channel, occurred_at, payload)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],
                              $7::timestamptz[], $8::jsonb[])
         ON CONFLICT (dedupe_key) DO NOTHING",
        &[&keys, &members, &triggers, &routes, &providers, &channels, &ats, &payloads],
    )
    .await
}

/// A message claimed for delivery.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub message_id: Uuid,
    pub member: Option<i64>,
    pub trigger: String,
    pub route: String,
    pub provider: String,
    pub channel: Option<Channel>,
    pub payload: serde_json::Value,
    /// Attempts made before this one.
    pub attempts: i32,
    pub created_at: DateTime<Utc>,
}

/// Claims up to `limit` due messages: each is reserved for `lease`
/// (its `next_attempt_at` pushed ahead), so a worker that dies leaves it
/// due again after the lease, and no other worker takes it meanwhile.
pub async fn claim(
    db: &Db,
    now: DateTime<Utc>,
    lease: chrono::Duration,
    limit: i64,
) -> Result<Vec<Claimed>, tokio_postgres::Error> {
    let rows = db
        .query(
            "UPDATE outbox o SET next_attempt_at = $2
              WHERE o.message_id IN (
                    SELECT message_id FROM outbox
                     WHERE status = 'pending' AND next_attempt_at <= $1
                     ORDER BY next_attempt_at
                     LIMIT $3
                     FOR UPDATE SKIP LOCKED)
             RETURNING o.message_id, o.member_id, o.trigger, o.route, o.provider, o.channel, o.payload,
                       o.attempts, o.created_at",
            &[&now, &(now + lease), &limit],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Claimed {
            message_id: r.get(0),
            member: r.get(1),
            trigger: r.get(2),
            route: r.get(3),
            provider: r.get(4),
            channel: Channel::parse(r.get(5)),
            payload: r.get(6),
            attempts: r.get(7),
            created_at: r.get(8),
        })
        .collect())
}

/// What became of one attempt or policy decision.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent,
    /// Due again at the time given.
    Retry(DateTime<Utc>),
    /// Refused for good: to the dead letters, with the response body.
    Dead {
        reason: String,
        body: Option<String>,
    },
    /// Held by policy (quiet hours) until the time given.
    Held(DateTime<Utc>),
    /// Not sent by policy (consent, caps, cooldown, no address).
    Suppressed,
    /// The provider answered 410 Gone: the endpoint is disabled and the
    /// message dead-lettered.
    Disabled {
        body: Option<String>,
    },
}

/// One attempt's record.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// A request went out (a policy decision or a template error sends
    /// none).
    pub requested: bool,
    pub status_code: Option<u16>,
    pub latency_ms: Option<i32>,
    /// The reason, or the start of the response with addresses masked.
    pub detail: Option<String>,
}

/// Records an attempt (or decision) and moves the message on, in one
/// transaction-less statement each: the message's row is the truth, the
/// attempt row its history.
pub async fn finish(
    db: &Db,
    message: &Claimed,
    provider: &str,
    now: DateTime<Utc>,
    outcome: &Outcome,
    attempt: &Attempt,
) -> Result<(), tokio_postgres::Error> {
    // Attempts count requests made; policy decisions are not attempts.
    let attempt_number = message.attempts + i32::from(attempt.requested);
    let (label, status, next, reason): (&str, &str, Option<DateTime<Utc>>, Option<String>) =
        match outcome {
            Outcome::Sent => ("sent", "sent", None, None),
            Outcome::Retry(at) => ("retry", "pending", Some(*at), attempt.detail.clone()),
            Outcome::Dead { reason, .. } => ("dead", "dead", None, Some(reason.clone())),
            Outcome::Held(until) => ("held", "pending", Some(*until), attempt.detail.clone()),
            Outcome::Suppressed => ("suppressed", "suppressed", None, attempt.detail.clone()),
            Outcome::Disabled { .. } => (
                "disabled",
                "dead",
                None,
                Some(format!(
                    "provider `{provider}` answered 410 Gone: endpoint disabled"
                )),
            ),
        };
    let status_code = attempt.status_code.map(i32::from);
    db.execute(
        "INSERT INTO delivery_attempts (message_id, attempt, outcome, status_code, latency_ms, detail, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &message.message_id,
            &attempt_number,
            &label,
            &status_code,
            &attempt.latency_ms,
            &attempt.detail.as_deref().or(reason.as_deref()),
            &now,
        ],
    )
    .await?;
    db.execute(
        "UPDATE outbox SET status = $2, attempts = $3, next_attempt_at = coalesce($4, next_attempt_at),
                           status_reason = $5, sent_at = CASE WHEN $2 = 'sent' THEN $6 ELSE sent_at END
          WHERE message_id = $1",
        &[&message.message_id, &status, &attempt_number, &next, &reason, &now],
    )
    .await?;
    match outcome {
        Outcome::Dead { reason, body } => {
            dead_letter(
                db,
                message,
                provider,
                reason,
                status_code,
                body.as_deref(),
                now,
            )
            .await?
        }
        Outcome::Disabled { body } => {
            let reason = reason.unwrap_or_default();
            db.execute(
                "INSERT INTO provider_endpoints (provider, disabled_at, disabled_reason) VALUES ($1, $2, $3)
                 ON CONFLICT (provider) DO UPDATE SET disabled_at = EXCLUDED.disabled_at,
                                                      disabled_reason = EXCLUDED.disabled_reason",
                &[&provider, &now, &reason],
            )
            .await?;
            dead_letter(
                db,
                message,
                provider,
                &reason,
                status_code,
                body.as_deref(),
                now,
            )
            .await?
        }
        _ => {}
    }
    Ok(())
}

/// Response bodies are kept up to this many bytes.
const DEAD_LETTER_BODY_BYTES: usize = 8 * 1024;

async fn dead_letter(
    db: &Db,
    message: &Claimed,
    provider: &str,
    reason: &str,
    status_code: Option<i32>,
    body: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let body = body.map(|b| truncate(b, DEAD_LETTER_BODY_BYTES));
    db.execute(
        "INSERT INTO dead_letters (message_id, provider, reason, status_code, response_body, dead_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&message.message_id, &provider, &reason, &status_code, &body, &now],
    )
    .await?;
    Ok(())
}

/// At most `max` bytes, cut at a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Whether a provider's endpoint was disabled by a 410, and why.
pub async fn disabled(db: &Db, provider: &str) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            "SELECT disabled_reason FROM provider_endpoints WHERE provider = $1 AND disabled_at IS NOT NULL",
            &[&provider],
        )
        .await?
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default()))
}

/// What a member was sent lately: `(channel, trigger, sent_at)`.
pub async fn recent_sends(
    db: &Db,
    member: i64,
    since: DateTime<Utc>,
) -> Result<Vec<(String, String, DateTime<Utc>)>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT channel, trigger, sent_at FROM outbox
              WHERE member_id = $1 AND status = 'sent' AND sent_at >= $2",
            &[&member, &since],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// A dead letter, as `dlq list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub message_id: Uuid,
    pub provider: String,
    pub trigger: String,
    pub member_id: Option<i64>,
    pub reason: String,
    pub status_code: Option<i32>,
    pub response_body: Option<String>,
    pub dead_at: DateTime<Utc>,
}

/// Open dead letters (not replayed), oldest first.
pub async fn dead_letters(db: &Db, limit: i64) -> Result<Vec<DeadLetter>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT d.dead_letter_id, d.message_id, d.provider, o.trigger, o.member_id, d.reason,
                    d.status_code, d.response_body, d.dead_at
               FROM dead_letters d JOIN outbox o USING (message_id)
              WHERE d.replayed_at IS NULL
              ORDER BY d.dead_letter_id LIMIT $1",
            &[&limit],
        )
        .await?
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            message_id: r.get(1),
            provider: r.get(2),
            trigger: r.get(3),
            member_id: r.get(4),
            reason: r.get(5),
            status_code: r.get(6),
            response_body: r.get(7),
            dead_at: r.get(8),
        })
        .collect())
}

/// Makes dead-lettered messages due again with a fresh set of attempts
/// (same message id: receivers still dedupe), and re-enables their
/// providers' endpoints. Returns the ids replayed; unknown or already
/// replayed ids are left out.
pub async fn replay(
    db: &Db,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = db
        .query(
            "WITH replayed AS (
                 UPDATE dead_letters SET replayed_at = $2
                  WHERE dead_letter_id = ANY($1) AND replayed_at IS NULL
                 RETURNING dead_letter_id, message_id, provider
             ), requeued AS (
                 UPDATE outbox SET status = 'pending', attempts = 0, next_attempt_at = $2, status_reason = NULL
                  WHERE message_id IN (SELECT message_id FROM replayed)
                 RETURNING 1
             ), enabled AS (
                 UPDATE provider_endpoints SET disabled_at = NULL, disabled_reason = NULL
                  WHERE provider IN (SELECT provider FROM replayed)
                 RETURNING 1
             )
             SELECT dead_letter_id FROM replayed
              WHERE (SELECT count(*) FROM requeued) >= 0 AND (SELECT count(*) FROM enabled) >= 0",
            &[&ids, &now],
        )
        .await?;
    let mut replayed: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    replayed.sort_unstable();
    Ok(replayed)
}

/// Counts by status, for `status` and tests.
pub async fn counts(db: &Db) -> Result<Vec<(String, i64)>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT status, count(*) FROM outbox GROUP BY status ORDER BY status",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}
