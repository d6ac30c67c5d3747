//! Scheduled triggers: `lapse_risk` (no purchase for k × the member's
//! usual interval, or N days) and `points_expiring` (D days before the
//! balance expires for inactivity), plus the expiry itself.
//!
//! Each member has at most one row per kind in `scheduled_triggers`, with
//! the time it comes due. The ledger transaction keeps the rows of the
//! members it touches current ([`maintain`]); the [`Scheduler`] reads only
//! due rows (an index on `due_at`, never a scan of members), fires each in
//! one transaction that also writes the outbox rows and deletes it, so an
//! occasion fires once, also across restarts. A new purchase or activity
//! replaces the row: a new occasion.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, Months, Utc};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{messages, Fired, Triggers};
use crate::config::{DatabaseUrl, Secret, Settings, TriggerKind};
use crate::connect;
use crate::delivery::{outbox, Clock};
use crate::ledger::db::Db;
use crate::ledger::orders;

/// Purchases looked at for the usual interval (the last 10 intervals).
const RHYTHM_PURCHASES: i64 = 11;
/// A usual interval needs this many purchases.
const RHYTHM_MIN_PURCHASES: i64 = 3;
/// Rows fired per scheduler transaction.
const SCHEDULER_BATCH: i64 = 500;

/// Keeps the scheduled rows of `members` (touched by the batch) current,
/// in the ledger transaction. An occasion already due at the business time
/// of the change that touched the member is left alone: it passed before
/// the program knew (a snapshot's history, a profile update of a member
/// inactive for years), so it is neither scheduled nor does it remove a
/// row still waiting to fire. Business time only: replays decide the same.
pub async fn maintain(
    db: &Db,
    triggers: &Triggers,
    members: &HashMap<i64, super::Touch>,
) -> Result<(), tokio_postgres::Error> {
    // Nothing to schedule (no lapse route, no expiry): no work per batch.
    let lapse = triggers.routed(TriggerKind::LapseRisk);
    if members.is_empty() || (!lapse && triggers.expiry.is_none()) {
        return Ok(());
    }
    let ids: Vec<i64> = members.keys().copied().collect();
    let rows = db
        .query(
            "SELECT m.member_id, s.last_purchase, s.purchases, s.median_gap, a.last_activity,
                    coalesce(b.available, 0)
               FROM members m
               LEFT JOIN balances b ON b.member_id = m.member_id
               LEFT JOIN LATERAL (
                    SELECT max(placed_at) AS last_purchase, count(*) AS purchases,
                           percentile_cont(0.5) WITHIN GROUP (ORDER BY gap) AS median_gap
                      FROM (SELECT placed_at,
                                   extract(epoch FROM placed_at - lag(placed_at) OVER (ORDER BY placed_at))::float8 AS gap
                              FROM (SELECT placed_at FROM orders o
                                     WHERE o.member_id = m.member_id AND o.stage <> 'cancelled'
                                     ORDER BY placed_at DESC LIMIT $2) recent) gaps
               ) s ON true
               LEFT JOIN LATERAL (
                    SELECT max(occurred_at) AS last_activity FROM ledger_entries e
                     WHERE e.member_id = m.member_id
                       AND e.kind IN ('earn_pending', 'earn_available', 'redeem')
               ) a ON true
              WHERE m.member_id = ANY($1) AND m.merged_into IS NULL",
            &[&ids, &RHYTHM_PURCHASES],
        )
        .await?;
    let (mut up_members, mut up_kinds, mut up_dues, mut up_occasions, mut up_data) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut gone_members, mut gone_kinds) = (Vec::new(), Vec::new());
    for row in rows {
        let member: i64 = row.get(0);
        let last_purchase: Option<DateTime<Utc>> = row.get(1);
        let purchases: i64 = row.get::<_, Option<i64>>(2).unwrap_or(0);
        let median_gap: Option<f64> = row.get(3);
        let last_activity: Option<DateTime<Utc>> = row.get(4);
        let available: i64 = row.get(5);
        let Some(touched_at) = members.get(&member).map(|m| m.last) else {
            continue;
        };
        let mut plan =
            |kind: &'static str, due: Option<(DateTime<Utc>, String, serde_json::Value)>| match due
            {
                Some((due, occasion, data)) if due > touched_at => {
                    up_members.push(member);
                    up_kinds.push(kind);
                    up_dues.push(due);
                    up_occasions.push(occasion);
                    up_data.push(data);
                }
                // Already due when this change happened: left alone.
                Some(_) => {}
                None => {
                    gone_members.push(member);
                    gone_kinds.push(kind);
                }
            };

        if lapse {
            plan(
            "lapse_risk",
            last_purchase.map(|last| {
                let usual = median_gap
                    .filter(|gap| purchases >= RHYTHM_MIN_PURCHASES && *gap > 0.0)
                    .map(|gap| Duration::seconds(gap.round() as i64));
                let wait = match usual {
                    Some(gap) => Duration::seconds(
                        (gap.num_seconds() as f64 * triggers.lapse.after_intervals).round() as i64,
                    ),
                    None => Duration::days(triggers.lapse.after_days),
                };
                (
                    last + wait,
                    format!("lapse_risk:member:{member}:{}", last.timestamp()),
                    json!({
                        "last_purchase": last,
                        "usual_interval_days": usual.map(|g| (g.num_seconds() as f64 / 86_400.0 * 10.0).round() / 10.0),
                        "days_without_purchase": wait.num_days(),
                    }),
                )
            }),
        );
        }
        let expiry = triggers.expiry.as_ref().filter(|_| available > 0);
        let expires = expiry.zip(last_activity).and_then(|(rule, last)| {
            last.checked_add_months(Months::new(rule.inactivity_months))
                .map(|at| (rule, last, at))
        });
        plan(
            "points_expiring",
            expires.map(|(rule, _, at)| {
                (
                    at - Duration::days(rule.warn_days),
                    format!("points_expiring:member:{member}:{}", at.timestamp()),
                    json!({ "points": available, "expires_at": at }),
                )
            }),
        );
        plan(
            "points_expiry",
            expires.map(|(_, last, at)| {
                (
                    at,
                    format!("points_expiry:member:{member}:{}", last.timestamp()),
                    json!({ "points": available }),
                )
            }),
        );
    }
    if !up_members.is_empty() {
        db.execute(
            "INSERT INTO scheduled_triggers (member_id, kind, due_at, occasion, data)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::jsonb[])
             ON CONFLICT (member_id, kind) DO UPDATE
                SET due_at = EXCLUDED.due_at, occasion = EXCLUDED.occasion, data = EXCLUDED.data",
            &[&up_members, &up_kinds, &up_dues, &up_occasions, &up_data],
        )
        .await?;
    }
    remove(db, &gone_members, &gone_kinds).await
}

/// Deletes the rows of `(members[i], kinds[i])`.
async fn remove<K: AsRef<str> + Sync + tokio_postgres::types::ToSql>(
    db: &Db,
    members: &[i64],
    kinds: &[K],
) -> Result<(), tokio_postgres::Error> {
    if !members.is_empty() {
        db.execute(
            "DELETE FROM scheduled_triggers
              WHERE (member_id, kind) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))",
            &[&members, &kinds],
        )
        .await?;
    }
    Ok(())
}

/// Fires due scheduled triggers.
pub struct Scheduler {
    url: DatabaseUrl,
    password: Option<Secret>,
    db: tokio::sync::Mutex<Option<Db>>,
    triggers: Arc<Triggers>,
    interval: StdDuration,
    clock: Arc<dyn Clock>,
    writer: crate::ledger::apply::WriterLock,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub fired: usize,
    /// Members whose balance expired, and the points.
    pub expired: Vec<(i64, i64)>,
}

impl Scheduler {
    pub fn new(settings: &Settings, triggers: Arc<Triggers>, clock: Arc<dyn Clock>) -> Self {
        Self {
            url: settings.ledger.url.clone(),
            password: settings.ledger.password.clone(),
            db: tokio::sync::Mutex::new(None),
            triggers,
            interval: StdDuration::from_secs(settings.triggers.scheduler_interval_seconds.max(1)),
            clock,
            writer: crate::ledger::apply::WriterLock::default(),
        }
    }

    /// Shares the ledger writers' turn (see `WriterLock`): the scheduler
    /// locks scheduled rows, then balances and orders; a batch locks them
    /// the other way round.
    pub fn with_writer_lock(mut self, writer: crate::ledger::apply::WriterLock) -> Self {
        self.writer = writer;
        self
    }

    /// Fires everything due now, in transactions of up to 500 rows.
    pub async fn run_once(&self) -> Result<Pass, tokio_postgres::Error> {
        let mut guard = self.db.lock().await;
        if guard.as_ref().is_none_or(Db::is_closed) {
            match connect::postgres(&self.url, self.password.as_ref()).await {
                Ok(client) => *guard = Some(Db::new(client)),
                Err(error) => {
                    tracing::warn!(error = %error, "scheduler: no ledger connection; retrying");
                    return Ok(Pass::default());
                }
            }
        }
        let Some(db) = guard.as_ref() else {
            return Ok(Pass::default());
        };
        let mut pass = Pass::default();
        loop {
            let _turn = self.writer.hold().await;
            db.batch_execute("BEGIN").await?;
            match self.fire_batch(db, &mut pass).await {
                Ok(0) => {
                    db.batch_execute("COMMIT").await?;
                    return Ok(pass);
                }
                Ok(_) => db.batch_execute("COMMIT").await?,
                Err(error) => {
                    let _ = db.batch_execute("ROLLBACK").await;
                    return Err(error);
                }
            }
        }
    }

    async fn fire_batch(&self, db: &Db, pass: &mut Pass) -> Result<usize, tokio_postgres::Error> {
        let now = self.clock.now();
        let rows = db
            .query(
                "SELECT member_id, kind, due_at, occasion, data FROM scheduled_triggers
                  WHERE due_at <= $1
                  ORDER BY due_at
                  LIMIT $2
                    FOR UPDATE SKIP LOCKED",
                &[&now, &SCHEDULER_BATCH],
            )
            .await?;
        let mut fired = Vec::new();
        let (mut members, mut kinds) = (Vec::new(), Vec::new());
        for row in &rows {
            let member: i64 = row.get(0);
            let kind: String = row.get(1);
            let due: DateTime<Utc> = row.get(2);
            let occasion: String = row.get(3);
            let data: serde_json::Value = row.get(4);
            match kind.as_str() {
                "lapse_risk" | "points_expiring" => fired.push(Fired {
                    kind: if kind == "lapse_risk" {
                        TriggerKind::LapseRisk
                    } else {
                        TriggerKind::PointsExpiring
                    },
                    member,
                    occasion,
                    occurred_at: due,
                    data,
                    offer: None,
                }),
                _ => {
                    // Business time of the expiry is its due time, so a
                    // late scheduler books the same entry.
                    let points = orders::expire_available(db, member, &occasion, due).await?;
                    if points > 0 {
                        pass.expired.push((member, points));
                        tracing::info!(member_id = member, points, "points expired for inactivity");
                    }
                }
            }
            members.push(member);
            kinds.push(kind);
        }
        if !fired.is_empty() {
            let ids: Vec<i64> = fired.iter().map(|f| f.member).collect();
            let tiers: HashMap<i64, Option<String>> = db
                .query(
                    "SELECT member_id, tier FROM members WHERE member_id = ANY($1)",
                    &[&ids],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            self.triggers.offer(db, &mut fired, &tiers).await?;
        }
        outbox::enqueue(db, &messages(&self.triggers, &fired)).await?;
        remove(db, &members, &kinds).await?;
        pass.fired += fired.len();
        Ok(rows.len())
    }

    /// Passes every `triggers.scheduler_interval_seconds` until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            if let Err(error) = self.run_once().await {
                tracing::warn!(error = %crate::ledger::db::describe(&error), "scheduler: a pass failed and was rolled back; retrying");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.cancelled() => {}
            }
        }
    }
}
