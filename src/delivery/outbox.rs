//! `outbox`, `delivery_attempts`, `dead_letters`, `provider_endpoints`:
//! the state of every message, owned here. `triggers` adds rows through
//! [`enqueue`] inside the ledger transaction; everything else is the
//! worker's and the operators' (`dlq list` / `dlq replay`).

use std::collections::HashMap;

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

/// Claims up to `limit` due messages, locking them (`FOR UPDATE SKIP
/// LOCKED`) in the caller's open transaction: no other worker takes them
/// until it ends, and if this worker dies the transaction is rolled back
/// and they are due again at once, still pending, with the same message
/// id. The batch's outcomes are written and committed in that transaction.
///
/// `partition = (k, n)`: only messages of members whose id is `k` modulo
/// `n`, so that concurrent batches of one worker never hold messages of
/// the same member (caps and cooldowns are judged per batch).
pub async fn claim(
    db: &Db,
    now: DateTime<Utc>,
    limit: i64,
    partition: (i64, i64),
) -> Result<Vec<Claimed>, tokio_postgres::Error> {
    // The oldest due rows are found by walking the partial index on the
    // due time in order and stopping at `limit`. The planner's row
    // estimate of a queue is always stale (rows arrive and leave faster
    // than statistics are gathered): believing few rows are due, it
    // collects every due row (bitmap scan) and sorts them, 5–10× the work
    // when a backlog is due. The walk is the one plan without a sort, so
    // sorting and bitmap scans are turned off for this statement only.
    db.batch_execute("SET LOCAL enable_sort = off; SET LOCAL enable_bitmapscan = off")
        .await?;
    let rows = db
        .query(
            "SELECT message_id, member_id, trigger, route, provider, channel, payload, attempts, created_at
               FROM outbox
              WHERE status = 'pending' AND next_attempt_at <= $1
                AND coalesce(member_id, 0) % $4 = $3
              ORDER BY next_attempt_at
              LIMIT $2
                FOR UPDATE SKIP LOCKED",
            &[&now, &limit, &partition.0, &partition.1],
        )
        .await?;
    db.batch_execute("RESET enable_sort; RESET enable_bitmapscan")
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

impl Outcome {
    /// The outcome's name in `delivery_attempts` and in metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Sent => "sent",
            Outcome::Retry(_) => "retry",
            Outcome::Dead { .. } => "dead",
            Outcome::Held(_) => "held",
            Outcome::Suppressed => "suppressed",
            Outcome::Disabled { .. } => "disabled",
        }
    }
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

/// What became of one claimed message.
#[derive(Debug, Clone)]
pub struct Finished {
    pub message_id: Uuid,
    /// Attempts made before this one.
    pub attempts_before: i32,
    pub provider: String,
    pub at: DateTime<Utc>,
    pub outcome: Outcome,
    pub attempt: Attempt,
}

impl Finished {
    pub fn of(
        message: &Claimed,
        provider: &str,
        at: DateTime<Utc>,
        outcome: Outcome,
        attempt: Attempt,
    ) -> Self {
        Self {
            message_id: message.message_id,
            attempts_before: message.attempts,
            provider: provider.to_string(),
            at,
            outcome,
            attempt,
        }
    }
}

impl Attempt {
    /// A policy decision or a refusal before any request: no attempt.
    pub fn decision(detail: String) -> Self {
        Self {
            requested: false,
            status_code: None,
            latency_ms: None,
            detail: Some(detail),
        }
    }
}

/// Response bodies are kept up to this many bytes.
const DEAD_LETTER_BODY_BYTES: usize = 8 * 1024;

/// Records a batch of attempts and decisions and moves each message on,
/// in one statement: one commit for the whole batch (a commit per message
/// held delivery to ~1,500 messages/s). The outbox rows are named by
/// `= ANY($1)` besides the join: joined with the unnest alone, a young
/// outbox (tens of thousands of rows) was hashed whole for every batch.
pub async fn finish_all(db: &Db, finished: &[Finished]) -> Result<(), tokio_postgres::Error> {
    if finished.is_empty() {
        return Ok(());
    }
    let n = finished.len();
    let mut ids = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut statuses = Vec::with_capacity(n);
    let mut codes = Vec::with_capacity(n);
    let mut latencies = Vec::with_capacity(n);
    let mut details = Vec::with_capacity(n);
    let mut nexts = Vec::with_capacity(n);
    let mut reasons = Vec::with_capacity(n);
    let mut providers = Vec::with_capacity(n);
    let mut dead_reasons = Vec::with_capacity(n);
    let mut bodies = Vec::with_capacity(n);
    let mut disables = Vec::with_capacity(n);
    let mut ats = Vec::with_capacity(n);
    for f in finished {
        let (label, status, next, reason): (&str, &str, Option<DateTime<Utc>>, Option<String>) =
            match &f.outcome {
                Outcome::Sent => ("sent", "sent", None, None),
                Outcome::Retry(at) => ("retry", "pending", Some(*at), f.attempt.detail.clone()),
                Outcome::Dead { reason, .. } => ("dead", "dead", None, Some(reason.clone())),
                Outcome::Held(until) => ("held", "pending", Some(*until), f.attempt.detail.clone()),
                Outcome::Suppressed => ("suppressed", "suppressed", None, f.attempt.detail.clone()),
                Outcome::Disabled { .. } => (
                    "disabled",
                    "dead",
                    None,
                    Some(format!(
                        "provider `{}` answered 410 Gone: endpoint disabled",
                        f.provider
                    )),
                ),
            };
        let (dead_reason, body) = match &f.outcome {
            Outcome::Dead { body, .. } | Outcome::Disabled { body } => (
                reason.clone(),
                body.as_deref()
                    .map(|b| truncate(b, DEAD_LETTER_BODY_BYTES).to_string()),
            ),
            _ => (None, None),
        };
        ids.push(f.message_id);
        // Attempts count requests made; policy decisions are not attempts.
        attempts.push(f.attempts_before + i32::from(f.attempt.requested));
        labels.push(label);
        statuses.push(status);
        codes.push(f.attempt.status_code.map(i32::from));
        latencies.push(f.attempt.latency_ms);
        details.push(f.attempt.detail.clone().or_else(|| reason.clone()));
        nexts.push(next);
        reasons.push(reason);
        providers.push(f.provider.as_str());
        dead_reasons.push(dead_reason);
        bodies.push(body);
        disables.push(matches!(f.outcome, Outcome::Disabled { .. }));
        ats.push(f.at);
    }
    db.query_one(
        "WITH input AS (
             SELECT * FROM unnest($1::uuid[], $2::int[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[],
                                  $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::text[], $13::bool[],
                                  $14::timestamptz[])
                 AS x(id, attempt, label, status, code, latency, detail, next, reason, provider, dead_reason,
                      body, disable, at)
         ), attempts AS (
             INSERT INTO delivery_attempts (message_id, attempt, outcome, status_code, latency_ms, detail, at)
             SELECT id, attempt, label, code, latency, detail, at FROM input
             RETURNING 1
         ), moved AS (
             UPDATE outbox o
                SET status = i.status, attempts = i.attempt,
                    next_attempt_at = coalesce(i.next, o.next_attempt_at), status_reason = i.reason,
                    sent_at = CASE WHEN i.status = 'sent' THEN i.at ELSE o.sent_at END
               FROM input i
              WHERE o.message_id = i.id AND o.message_id = ANY($1)
             RETURNING 1
         ), dead AS (
             INSERT INTO dead_letters (message_id, provider, reason, status_code, response_body, dead_at)
             SELECT id, provider, dead_reason, code, body, at FROM input WHERE dead_reason IS NOT NULL
             RETURNING 1
         ), disabled AS (
             INSERT INTO provider_endpoints (provider, disabled_at, disabled_reason)
             SELECT DISTINCT ON (provider) provider, at, dead_reason FROM input WHERE disable
             ON CONFLICT (provider) DO UPDATE SET disabled_at = EXCLUDED.disabled_at,
                                                  disabled_reason = EXCLUDED.disabled_reason
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM attempts) + (SELECT count(*) FROM moved)
              + (SELECT count(*) FROM dead) + (SELECT count(*) FROM disabled)",
        &[
            &ids, &attempts, &labels, &statuses, &codes, &latencies, &details, &nexts, &reasons,
            &providers, &dead_reasons, &bodies, &disables, &ats,
        ],
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

/// Providers whose endpoint a 410 disabled, and why.
pub async fn disabled_providers(db: &Db) -> Result<HashMap<String, String>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT provider, coalesce(disabled_reason, '') FROM provider_endpoints
              WHERE disabled_at IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

/// A send recorded in the outbox: `(channel, trigger, route, sent_at)`.
pub type Sent = (String, String, String, DateTime<Utc>);

/// What `members` were sent since `since`, per member.
pub async fn recent_sends(
    db: &Db,
    members: &[i64],
    since: DateTime<Utc>,
) -> Result<HashMap<i64, Vec<Sent>>, tokio_postgres::Error> {
    let mut sends: HashMap<i64, Vec<Sent>> = HashMap::new();
    for row in db
        .query(
            "SELECT member_id, channel, trigger, route, sent_at FROM outbox
              WHERE member_id = ANY($1) AND status = 'sent' AND sent_at >= $2",
            &[&members, &since],
        )
        .await?
    {
        sends
            .entry(row.get(0))
            .or_default()
            .push((row.get(1), row.get(2), row.get(3), row.get(4)));
    }
    Ok(sends)
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

/// For an erased member: messages not yet sent are cancelled (with the
/// reason), and what providers answered about its messages (dead letters'
/// bodies, attempts' details) is removed. Returns the messages cancelled.
pub async fn forget_members(db: &Db, members: &[i64]) -> Result<u64, tokio_postgres::Error> {
    let cancelled = db
        .execute(
            "UPDATE outbox SET status = 'cancelled', status_reason = 'member erased'
              WHERE member_id = ANY($1) AND status = 'pending'",
            &[&members],
        )
        .await?;
    db.execute(
        "UPDATE dead_letters SET response_body = NULL
          WHERE message_id IN (SELECT message_id FROM outbox WHERE member_id = ANY($1))",
        &[&members],
    )
    .await?;
    db.execute(
        "UPDATE delivery_attempts SET detail = NULL
          WHERE message_id IN (SELECT message_id FROM outbox WHERE member_id = ANY($1))",
        &[&members],
    )
    .await?;
    Ok(cancelled)
}
