//! Scheduled triggers: `lapse_risk` (no purchase for k × the member's
//! usual interval, or N days) and `points_expiring` (D days before the
//! balance expires for inactivity), plus the expiry itself; with tier
//! qualification periods, `tier_downgrade_warning` before a period's end
//! and the period's review after its grace days, which may take the member
//! down one tier and send `tier_downgrade`. A review schedules the next
//! period's review and warning, so a member who never comes back is
//! reviewed every period until the entry tier.
//!
//! Each member has at most one row per kind in `scheduled_triggers` (per
//! kind and product for `replenishment_due`, which comes a few days before
//! the member's next purchase of a product is expected), with the time it
//! comes due. The ledger transaction keeps the rows of the
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
use crate::ledger::tiers::{self, Period};

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
    // Nothing to schedule (no lapse route, no expiry, no tier periods): no
    // work per batch.
    let lapse = triggers.routed(TriggerKind::LapseRisk);
    let tier_rule = triggers.program.tier_period.as_ref();
    let warn = triggers.routed(TriggerKind::TierDowngradeWarning);
    if members.is_empty() || (!lapse && triggers.expiry.is_none() && tier_rule.is_none()) {
        return Ok(());
    }
    let ids: Vec<i64> = members.keys().copied().collect();
    let rows = db
        .query(
            "SELECT m.member_id, s.last_purchase, s.purchases, s.median_gap, a.last_activity,
                    coalesce(b.available, 0), m.tier,
                    f.first_purchase_at, f.last_purchase_at, coalesce(f.purchases, 0)::bigint,
                    coalesce(p.profiling_opt_out, false)
               FROM members m
               LEFT JOIN balances b ON b.member_id = m.member_id
               LEFT JOIN member_features f ON f.member_id = m.member_id
               LEFT JOIN member_profiles p ON p.member_id = m.member_id
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
    let mut reviews = Vec::new();
    for row in rows {
        let member: i64 = row.get(0);
        let last_purchase: Option<DateTime<Utc>> = row.get(1);
        let purchases: i64 = row.get::<_, Option<i64>>(2).unwrap_or(0);
        let median_gap: Option<f64> = row.get(3);
        let last_activity: Option<DateTime<Utc>> = row.get(4);
        let available: i64 = row.get(5);
        let tier: Option<String> = row.get(6);
        let first_purchase: Option<DateTime<Utc>> = row.get(7);
        let last_counted: Option<DateTime<Utc>> = row.get(8);
        let all_purchases: i64 = row.get(9);
        let opted_out: bool = row.get(10);
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

        let by_probability =
            triggers.lapse.by == crate::config::LapseRule::Probability && !opted_out;
        if lapse && by_probability {
            // When the member's probability alive falls below the at-risk
            // line, from their own history.
            let model = &triggers.personalization;
            plan(
                "lapse_risk",
                first_purchase
                    .zip(last_counted)
                    .filter(|_| all_purchases > 0)
                    .map(|(first, last)| {
                        let repeat = (all_purchases - 1) as f64;
                        let last_at = ((last - first).num_seconds() as f64 / 86_400.0).max(0.0);
                        let age = model.model.age_at(model.at_risk_below, repeat, last_at);
                        let due = first + Duration::seconds((age * 86_400.0).round() as i64);
                        (
                            due,
                            format!("lapse_risk:member:{member}:{}", last.timestamp()),
                            json!({
                                "last_purchase": last,
                                "purchases": all_purchases,
                                "p_alive": model.at_risk_below,
                                "days_without_purchase": (due - last).num_days(),
                            }),
                        )
                    }),
            );
        } else if lapse {
            let median_gap = median_gap
                .filter(|_| !opted_out || triggers.lapse.by == crate::config::LapseRule::Rhythm);
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
        let above_entry = tier
            .as_deref()
            .and_then(|t| tiers::rank(&triggers.tiers, t))
            .is_some_and(|rank| rank > 0);
        if let Some(rule) = tier_rule.filter(|_| above_entry) {
            let current = Period::of(rule, touched_at);
            // Within the grace days of the previous period, its review is
            // the next one.
            let previous = Period::of(rule, current.start - Duration::microseconds(1));
            let reviewed = if previous.review_at(rule) > touched_at {
                previous
            } else {
                current
            };
            reviews.push(TierRow::review(member, rule, reviewed));
            if warn {
                let warning = TierRow::warning(member, rule, current);
                plan(
                    "tier_warning",
                    Some((warning.due, warning.occasion, warning.data)),
                );
            }
        }
    }
    // A review already waiting (an earlier period's, if the scheduler is
    // behind) stays: each review schedules the next.
    insert_tier_rows(db, &reviews).await?;
    if !up_members.is_empty() {
        db.execute(
            "INSERT INTO scheduled_triggers (member_id, kind, due_at, occasion, data)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::jsonb[])
             ON CONFLICT (member_id, kind, subject) DO UPDATE
                SET due_at = EXCLUDED.due_at, occasion = EXCLUDED.occasion, data = EXCLUDED.data",
            &[&up_members, &up_kinds, &up_dues, &up_occasions, &up_data],
        )
        .await?;
    }
    remove(db, &gone_members, &gone_kinds).await
}

/// A `tier_review` or `tier_warning` row: the period it is about is in
/// its data.
struct TierRow {
    member: i64,
    kind: &'static str,
    due: DateTime<Utc>,
    occasion: String,
    data: serde_json::Value,
}

impl TierRow {
    fn review(member: i64, rule: &crate::config::TierPeriodSettings, period: Period) -> Self {
        Self::about(member, "tier_review", period.review_at(rule), period)
    }

    fn warning(member: i64, rule: &crate::config::TierPeriodSettings, period: Period) -> Self {
        Self::about(member, "tier_warning", period.warning_at(rule), period)
    }

    fn about(member: i64, kind: &'static str, due: DateTime<Utc>, period: Period) -> Self {
        Self {
            member,
            kind,
            due,
            occasion: format!("{kind}:member:{member}:{}", period.start.format("%Y-%m-%d")),
            data: json!({ "period_start": period.start, "period_end": period.end }),
        }
    }
}

/// The period a tier row is about.
fn period_of_row(data: &serde_json::Value) -> Option<Period> {
    let field = |name: &str| {
        data.get(name)
            .and_then(|v| serde_json::from_value::<DateTime<Utc>>(v.clone()).ok())
    };
    Some(Period {
        start: field("period_start")?,
        end: field("period_end")?,
    })
}

/// Inserts tier rows where the member has none of that kind.
async fn insert_tier_rows(db: &Db, rows: &[TierRow]) -> Result<(), tokio_postgres::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let members: Vec<i64> = rows.iter().map(|r| r.member).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind).collect();
    let dues: Vec<DateTime<Utc>> = rows.iter().map(|r| r.due).collect();
    let occasions: Vec<&str> = rows.iter().map(|r| r.occasion.as_str()).collect();
    let data: Vec<&serde_json::Value> = rows.iter().map(|r| &r.data).collect();
    db.execute(
        "INSERT INTO scheduled_triggers (member_id, kind, due_at, occasion, data)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::jsonb[])
         ON CONFLICT (member_id, kind, subject) DO NOTHING",
        &[&members, &kinds, &dues, &occasions, &data],
    )
    .await?;
    Ok(())
}

/// An erased member is due nothing any more.
pub async fn forget_members(db: &Db, members: &[i64]) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "DELETE FROM scheduled_triggers WHERE member_id = ANY($1)",
        &[&members],
    )
    .await?;
    Ok(())
}

/// Deletes the member-wide rows of `(members[i], kinds[i])`.
async fn remove<K: AsRef<str> + Sync + tokio_postgres::types::ToSql>(
    db: &Db,
    members: &[i64],
    kinds: &[K],
) -> Result<(), tokio_postgres::Error> {
    let subjects = vec![""; members.len()];
    remove_about(db, members, kinds, &subjects).await
}

/// Deletes the rows of `(members[i], kinds[i], subjects[i])`.
async fn remove_about<K, S>(
    db: &Db,
    members: &[i64],
    kinds: &[K],
    subjects: &[S],
) -> Result<(), tokio_postgres::Error>
where
    K: AsRef<str> + Sync + tokio_postgres::types::ToSql,
    S: AsRef<str> + Sync + tokio_postgres::types::ToSql,
{
    if !members.is_empty() {
        db.execute(
            "DELETE FROM scheduled_triggers
              WHERE (member_id, kind, subject) IN
                    (SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]))",
            &[&members, &kinds, &subjects],
        )
        .await?;
    }
    Ok(())
}

/// How much later than the stage change a segment review may come when
/// the member bought again in between: a commit moves a planned review
/// only when the new one is sooner by more than this. Purchases in quick
/// succession each bring the change a little closer (more purchases in the
/// same span read as a faster rhythm); without the slack every batch
/// rewrote the review of every member in it. Stages are judged in days.
pub const REVIEW_SLACK: chrono::Duration = chrono::Duration::hours(24);

/// Schedules each member's next segment review (`None`: none). At a
/// commit, an existing review is moved only if the new one is sooner (by
/// more than [`REVIEW_SLACK`]): a review that comes too early (the member
/// bought since) only judges the member again, finds nothing changed and
/// plans the next — while moving it at every purchase would rewrite a row
/// per member per batch. The scheduler, reviewing (`replace`), always
/// replaces the row it fired.
pub(super) async fn plan_segment_reviews(
    db: &Db,
    reviews: &[(i64, Option<DateTime<Utc>>)],
    replace: bool,
) -> Result<(), tokio_postgres::Error> {
    let due: Vec<(i64, DateTime<Utc>)> = reviews
        .iter()
        .filter_map(|(member, at)| at.map(|at| (*member, at)))
        .collect();
    let gone: Vec<i64> = reviews
        .iter()
        .filter(|(_, at)| at.is_none())
        .map(|(member, _)| *member)
        .collect();
    if !due.is_empty() {
        let members: Vec<i64> = due.iter().map(|r| r.0).collect();
        let kinds = vec!["segments"; members.len()];
        let subjects = vec![""; members.len()];
        let dues: Vec<DateTime<Utc>> = due.iter().map(|r| r.1).collect();
        let occasions: Vec<String> = due
            .iter()
            .map(|(member, at)| format!("segments:member:{member}:{}", at.timestamp()))
            .collect();
        let data = vec![json!({}); members.len()];
        db.execute(
            "INSERT INTO scheduled_triggers AS s (member_id, kind, subject, due_at, occasion, data)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::jsonb[])
             ON CONFLICT (member_id, kind, subject) DO UPDATE
                SET due_at = EXCLUDED.due_at, occasion = EXCLUDED.occasion, data = EXCLUDED.data
              WHERE $7 OR EXCLUDED.due_at < s.due_at",
            &[&members, &kinds, &subjects, &dues, &occasions, &data, &replace],
        )
        .await?;
    }
    let kinds = vec!["segments"; gone.len()];
    remove(db, &gone, &kinds).await
}

/// Keeps the replenishment reminders of the products the batch's members
/// bought current, in the ledger transaction: per member and product with
/// at least `min_purchases` purchases, the usual interval is the median of
/// the intervals between its last purchases (`member_products.recent`;
/// the median is robust to the odd early or late one; intervals under a
/// day — a second basket the same day — are not cycles), the next purchase
/// is expected that long after the last, and `replenishment_due` comes
/// `days_before` earlier. A new purchase replaces the row: buying early
/// moves the reminder to the next cycle. Members who objected to profiling
/// get none (a prediction).
pub async fn plan_replenishment(
    db: &Db,
    triggers: &Triggers,
    purchases: &[crate::ledger::features::Purchase],
) -> Result<(), tokio_postgres::Error> {
    if purchases.is_empty()
        || !triggers.personalization.enabled
        || !triggers.routed(TriggerKind::ReplenishmentDue)
    {
        return Ok(());
    }
    let rule = &triggers.personalization.replenishment;
    let mut bought: HashMap<(i64, &str), DateTime<Utc>> = HashMap::new();
    for purchase in purchases {
        for sku in purchase.lines.iter().filter_map(|l| l.sku.as_deref()) {
            let at = bought.entry((purchase.member, sku)).or_insert(purchase.at);
            *at = (*at).max(purchase.at);
        }
    }
    let members: Vec<i64> = bought.keys().map(|k| k.0).collect();
    let products: Vec<&str> = bought.keys().map(|k| k.1).collect();
    let rows = crate::ledger::features::rhythms(db, &members, &products).await?;
    let (mut up_members, mut up_products, mut up_dues, mut up_occasions, mut up_data) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut gone_members, mut gone_products) = (Vec::new(), Vec::new());
    for rhythm in rows {
        let Some(&bought_at) = bought.get(&(rhythm.member, rhythm.product.as_str())) else {
            continue;
        };
        let usual = rhythm.usual_interval(rule.min_purchases);
        let plan = usual
            .filter(|_| !rhythm.profiling_opt_out)
            .and_then(|usual| {
                let last = rhythm.last_at;
                let expected = last + usual;
                let due = expected - Duration::days(rule.days_before);
                (due > bought_at).then_some((last, expected, due, usual))
            });
        match plan {
            Some((last, expected, due, usual)) => {
                up_members.push(rhythm.member);
                up_dues.push(due);
                up_occasions.push(format!(
                    "replenishment:member:{}:{}:{}",
                    rhythm.member,
                    rhythm.product,
                    last.timestamp()
                ));
                up_data.push(json!({
                    "product": rhythm.product,
                    "category": rhythm.category,
                    "purchases": rhythm.purchases,
                    "usual_interval_days": (usual.num_seconds() as f64 / 86_400.0 * 10.0).round() / 10.0,
                    "last_purchase": last,
                    "expected_at": expected,
                }));
                up_products.push(rhythm.product);
            }
            None => {
                gone_members.push(rhythm.member);
                gone_products.push(rhythm.product);
            }
        }
    }
    if !up_members.is_empty() {
        let kinds = vec!["replenishment"; up_members.len()];
        db.execute(
            "INSERT INTO scheduled_triggers (member_id, kind, subject, due_at, occasion, data)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::jsonb[])
             ON CONFLICT (member_id, kind, subject) DO UPDATE
                SET due_at = EXCLUDED.due_at, occasion = EXCLUDED.occasion, data = EXCLUDED.data",
            &[&up_members, &kinds, &up_products, &up_dues, &up_occasions, &up_data],
        )
        .await?;
    }
    let kinds = vec!["replenishment"; gone_members.len()];
    remove_about(db, &gone_members, &kinds, &gone_products).await
}

/// Fires due scheduled triggers.
pub struct Scheduler {
    url: DatabaseUrl,
    password: Option<Secret>,
    db: tokio::sync::Mutex<Option<Db>>,
    /// Whether members without a tier review were given one (first pass).
    reviews_started: std::sync::atomic::AtomicBool,
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
            reviews_started: std::sync::atomic::AtomicBool::new(false),
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
        if !self
            .reviews_started
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            let _turn = self.writer.hold().await;
            self.start_reviews(db).await?;
            self.reviews_started
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
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
                "SELECT member_id, kind, due_at, occasion, data, subject FROM scheduled_triggers
                  WHERE due_at <= $1
                  ORDER BY due_at
                  LIMIT $2
                    FOR UPDATE SKIP LOCKED",
                &[&now, &SCHEDULER_BATCH],
            )
            .await?;
        let mut fired = Vec::new();
        let (mut members, mut kinds, mut subjects) = (Vec::new(), Vec::new(), Vec::new());
        let mut reviews: HashMap<i64, super::Touch> = HashMap::new();
        // A member who has objected to profiling since the reminder was
        // planned gets none.
        let opted_out = {
            let replenishing: Vec<i64> = rows
                .iter()
                .filter(|r| r.get::<_, String>(1) == "replenishment")
                .map(|r| r.get(0))
                .collect();
            crate::ledger::features::opted_out(db, &replenishing).await?
        };
        let mut follow_ups = Vec::new();
        for row in &rows {
            let member: i64 = row.get(0);
            let kind: String = row.get(1);
            let due: DateTime<Utc> = row.get(2);
            let occasion: String = row.get(3);
            let data: serde_json::Value = row.get(4);
            match kind.as_str() {
                "tier_review" | "tier_warning" => {
                    if let Some(fire) = self
                        .tier_row(db, member, &kind, due, occasion, &data, &mut follow_ups)
                        .await?
                    {
                        fired.push(fire);
                    }
                }
                "segments" => {
                    // Judged below, all together; the review plans (or
                    // removes) the member's next one itself.
                    reviews.insert(
                        member,
                        super::Touch {
                            live: true,
                            first: due,
                            last: due,
                        },
                    );
                    continue;
                }
                "replenishment" => {
                    if !opted_out.contains(&member) {
                        fired.push(Fired {
                            kind: TriggerKind::ReplenishmentDue,
                            member,
                            occasion,
                            occurred_at: due,
                            data,
                            offer: None,
                        });
                    }
                }
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
            subjects.push(row.get::<_, String>(5));
        }
        if !reviews.is_empty() {
            let ids: Vec<i64> = reviews.keys().copied().collect();
            let counts = crate::ledger::features::counts(db, &ids).await?;
            // Members gone since (merged, erased) have no counts: their
            // rows go.
            let gone: Vec<i64> = ids
                .iter()
                .filter(|m| !counts.contains_key(m))
                .copied()
                .collect();
            let kinds = vec!["segments"; gone.len()];
            remove(db, &gone, &kinds).await?;
            fired.extend(
                self.triggers
                    .judge_segments(db, &reviews, &counts, true)
                    .await?,
            );
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
            self.triggers.offer(db, &mut fired, &tiers, None).await?;
        }
        outbox::enqueue(db, &messages(&self.triggers, &fired)).await?;
        remove_about(db, &members, &kinds, &subjects).await?;
        insert_tier_rows(db, &follow_ups).await?;
        pass.fired += fired.len();
        Ok(rows.len())
    }

    /// Gives members above the entry tier that have no review one for the
    /// current period (tier periods just turned on, or members from before
    /// them): they keep their tier until that review. Once per process; the
    /// reviews then schedule each other.
    async fn start_reviews(&self, db: &Db) -> Result<(), tokio_postgres::Error> {
        let Some(rule) = self.triggers.program.tier_period.as_ref() else {
            return Ok(());
        };
        let upper: Vec<&str> = self
            .triggers
            .tiers
            .iter()
            .skip(1)
            .map(|t| t.name.as_str())
            .collect();
        let now = self.clock.now();
        let period = Period::of(rule, now);
        let mut rows = vec![TierRow::review(0, rule, period)];
        if self.triggers.routed(TriggerKind::TierDowngradeWarning) && period.warning_at(rule) > now
        {
            rows.push(TierRow::warning(0, rule, period));
        }
        for row in rows {
            // The row's occasion with the member's id in it.
            let (prefix, suffix) = (
                format!("{}:member:", row.kind),
                format!(":{}", period.start.format("%Y-%m-%d")),
            );
            let started = db
                .execute(
                    "INSERT INTO scheduled_triggers (member_id, kind, due_at, occasion, data)
                     SELECT m.member_id, $2::text, $3::timestamptz, $4::text || m.member_id || $5::text, $6::jsonb
                       FROM members m
                      WHERE m.tier = ANY($1) AND m.merged_into IS NULL
                        AND NOT EXISTS (SELECT 1 FROM scheduled_triggers s
                                         WHERE s.member_id = m.member_id AND s.kind = $2::text)
                     ON CONFLICT (member_id, kind, subject) DO NOTHING",
                    &[&upper, &row.kind, &row.due, &prefix, &suffix, &row.data],
                )
                .await?;
            if started > 0 {
                tracing::info!(
                    members = started,
                    kind = row.kind,
                    due_at = %row.due,
                    "tier periods: members above the entry tier scheduled for the current period"
                );
            }
        }
        Ok(())
    }

    /// A period's review or warning. A review takes a member whose points
    /// fall short down one tier (and says so), forgets the tiers above it
    /// (so reaching them again is an upgrade again), and schedules the
    /// next period's review and warning while the member is above the
    /// entry tier. A warning fires only for a member not on track.
    #[allow(clippy::too_many_arguments)]
    async fn tier_row(
        &self,
        db: &Db,
        member: i64,
        kind: &str,
        due: DateTime<Utc>,
        occasion: String,
        data: &serde_json::Value,
        follow_ups: &mut Vec<TierRow>,
    ) -> Result<Option<Fired>, tokio_postgres::Error> {
        // Periods turned off since the row was scheduled: nothing to do.
        let (Some(rule), Some(period)) = (
            self.triggers.program.tier_period.as_ref(),
            period_of_row(data),
        ) else {
            return Ok(None);
        };
        let tiers_list = &self.triggers.tiers;
        let points = |short: &tiers::Shortfall| {
            json!({
                "tier": short.falls_to,
                "previous_tier": short.tier,
                "qualifying_points": short.qualifying,
                "threshold": short.threshold,
                "period_start": period.start,
                "period_end": period.end,
            })
        };
        let now = self.clock.now();
        if kind == "tier_warning" {
            // A warning about a period that has ended (the scheduler was
            // down) would only confuse: its review decides now.
            if now >= period.end {
                return Ok(None);
            }
            let Some(short) = tiers::shortfall(db, tiers_list, member, period, false).await? else {
                return Ok(None);
            };
            return Ok(Some(Fired {
                kind: TriggerKind::TierDowngradeWarning,
                member,
                occasion,
                occurred_at: due,
                data: json!({
                    "tier": short.tier,
                    "falls_to": short.falls_to,
                    "qualifying_points": short.qualifying,
                    "points_needed": short.threshold - short.qualifying,
                    "period_end": period.end,
                    "review_at": period.review_at(rule),
                }),
                offer: None,
            }));
        }
        let downgrade = tiers::review(db, tiers_list, member, period, rule).await?;
        let now_tier = match &downgrade {
            Some(short) => Some(short.falls_to.clone()),
            None => tiers::current_tier(db, member).await?,
        };
        let rank = now_tier.as_deref().and_then(|t| tiers::rank(tiers_list, t));
        if rank.is_some_and(|rank| rank > 0) {
            let next = period.next(rule);
            follow_ups.push(TierRow::review(member, rule, next));
            if self.triggers.routed(TriggerKind::TierDowngradeWarning) {
                follow_ups.push(TierRow::warning(member, rule, next));
            }
        }
        let Some(short) = downgrade else {
            return Ok(None);
        };
        let above: Vec<String> = rank
            .map(|rank| {
                tiers_list[rank + 1..]
                    .iter()
                    .map(|t| format!("tier:{}", t.name))
                    .collect()
            })
            .unwrap_or_default();
        db.execute(
            "DELETE FROM trigger_marks WHERE member_id = $1 AND mark = ANY($2)",
            &[&member, &above],
        )
        .await?;
        // Where the member is now, marked silently: a later upgrade says
        // where it came from.
        db.execute(
            "INSERT INTO trigger_marks (member_id, mark, reached_at, announced)
             VALUES ($1, $2, $3, false) ON CONFLICT DO NOTHING",
            &[&member, &format!("tier:{}", short.falls_to), &due],
        )
        .await?;
        tracing::info!(member_id = member, "tier review: down one tier");
        // A review caught up late (after the next period ended, the
        // scheduler down meanwhile) takes the member down without a
        // notice about a long-past period.
        if now >= period.next(rule).end {
            return Ok(None);
        }
        Ok(Some(Fired {
            kind: TriggerKind::TierDowngrade,
            member,
            occasion: occasion.replacen("tier_review", "tier_downgrade", 1),
            occurred_at: due,
            data: points(&short),
            offer: None,
        }))
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
