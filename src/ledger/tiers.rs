//! Tier qualification periods (`[program.tier_period]`): which period a
//! business time falls in, the points that qualified in a period, and the
//! review at a period's end that keeps a tier or takes the member down one.
//!
//! Upgrades happen at once as points are booked (`orders.rs` keeps
//! `balances.qualifying`, the points earned in the current period, next to
//! the balance). Downgrades happen only here, when the scheduler reviews a
//! period after its grace days, and only one tier at a time.

use chrono::{DateTime, Datelike, Months, TimeZone, Utc};

use super::db::Db;
use crate::config::{ProgramSettings, TierPeriodSettings, TierSettings};

/// One qualification period: `[start, end)`, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl Period {
    /// The period `at` falls in.
    pub fn of(rule: &TierPeriodSettings, at: DateTime<Utc>) -> Self {
        let months = i64::from(rule.months.max(1));
        let first = i64::from(rule.first_month.clamp(1, 12)) - 1;
        // Months counted from year 0, shifted so periods start at 0.
        let index = i64::from(at.year()) * 12 + i64::from(at.month0()) - first;
        let start_index = index.div_euclid(months) * months + first;
        let start = i32::try_from(start_index.div_euclid(12))
            .ok()
            .and_then(|year| {
                Utc.with_ymd_and_hms(year, start_index.rem_euclid(12) as u32 + 1, 1, 0, 0, 0)
                    .single()
            })
            // Only a year beyond chrono's range gets here.
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let end = start
            .checked_add_months(Months::new(rule.months.max(1)))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Self { start, end }
    }

    /// The period after this one.
    pub fn next(&self, rule: &TierPeriodSettings) -> Self {
        Self::of(rule, self.end)
    }

    /// When the period is reviewed: `grace_days` after its end.
    pub fn review_at(&self, rule: &TierPeriodSettings) -> DateTime<Utc> {
        self.end + chrono::Duration::days(rule.grace_days)
    }

    /// When a member not on track for the period is warned.
    pub fn warning_at(&self, rule: &TierPeriodSettings) -> DateTime<Utc> {
        self.end - chrono::Duration::days(rule.warning_days)
    }
}

/// The start of the qualification period of a booking at `at`, or None
/// when tiers follow lifetime points.
pub fn qualifying_period(program: &ProgramSettings, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
    program
        .tier_period
        .as_ref()
        .map(|rule| Period::of(rule, at).start)
}

/// A tier's position: 0 for the entry tier; None for a tier no longer
/// configured.
pub fn rank(tiers: &[TierSettings], tier: &str) -> Option<usize> {
    tiers.iter().position(|t| t.name == tier)
}

/// Points that qualified in `period`: earned (available) less clawed back,
/// counted in the period the order was placed in, so an order of the
/// period completed or refunded during the grace days counts for it.
/// Entries without an order count at their own time.
pub async fn qualifying_points(
    db: &Db,
    member: i64,
    period: Period,
) -> Result<i64, tokio_postgres::Error> {
    Ok(db
        .query_one(
            "SELECT coalesce(sum(e.points), 0)::bigint
               FROM ledger_entries e
               LEFT JOIN orders o ON o.source = e.source AND o.order_ref = e.order_ref
              WHERE e.member_id = $1 AND e.kind IN ('earn_available', 'clawback')
                AND coalesce(o.placed_at, e.occurred_at) >= $2
                AND coalesce(o.placed_at, e.occurred_at) < $3",
            &[&member, &period.start, &period.end],
        )
        .await?
        .get(0))
}

/// A member whose points in a period fall short of their tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shortfall {
    pub tier: String,
    /// The tier one below, where a review would take the member.
    pub falls_to: String,
    pub qualifying: i64,
    /// The current tier's threshold.
    pub threshold: i64,
}

/// Where the member stands in `period` against their current tier: None
/// when they have no tier above the entry tier or their points reach it.
pub async fn shortfall(
    db: &Db,
    tiers: &[TierSettings],
    member: i64,
    period: Period,
    lock: bool,
) -> Result<Option<Shortfall>, tokio_postgres::Error> {
    let sql = if lock {
        "SELECT tier FROM members WHERE member_id = $1 AND merged_into IS NULL FOR UPDATE"
    } else {
        "SELECT tier FROM members WHERE member_id = $1 AND merged_into IS NULL"
    };
    let Some(row) = db.query_opt(sql, &[&member]).await? else {
        return Ok(None);
    };
    let tier: Option<String> = row.get(0);
    // An unknown tier (renamed or removed from the configuration) is left
    // alone: there is no "one below" to take the member to.
    let Some(position) = tier.as_deref().and_then(|t| rank(tiers, t)) else {
        return Ok(None);
    };
    if position == 0 {
        return Ok(None);
    }
    let qualifying = qualifying_points(db, member, period).await?;
    let threshold = tiers[position].threshold;
    Ok((qualifying < threshold).then(|| Shortfall {
        tier: tiers[position].name.clone(),
        falls_to: tiers[position - 1].name.clone(),
        qualifying,
        threshold,
    }))
}

/// Reviews `period` for the member: one tier down when its points fall
/// short of the current tier, unless the points of the period after it
/// (so far) reach the tier already. Returns the downgrade made, if any.
pub async fn review(
    db: &Db,
    tiers: &[TierSettings],
    member: i64,
    period: Period,
    rule: &TierPeriodSettings,
) -> Result<Option<Shortfall>, tokio_postgres::Error> {
    let Some(short) = shortfall(db, tiers, member, period, true).await? else {
        return Ok(None);
    };
    if qualifying_points(db, member, period.next(rule)).await? >= short.threshold {
        return Ok(None);
    }
    db.execute(
        "UPDATE members SET tier = $2 WHERE member_id = $1",
        &[&member, &short.falls_to],
    )
    .await?;
    Ok(Some(short))
}

/// Counts of the current period for balances that have none yet (rows
/// from before tier periods were configured carry `-infinity`: their count
/// is the lifetime). Run once at start, before any booking, so the first
/// booking adds to the period's points instead of starting from zero.
/// Returns the balances counted.
pub async fn count_current_period(
    client: &tokio_postgres::Client,
    program: &ProgramSettings,
    now: DateTime<Utc>,
) -> Result<u64, tokio_postgres::Error> {
    let Some(rule) = program.tier_period.as_ref() else {
        return Ok(0);
    };
    let period = Period::of(rule, now);
    client
        .execute(
            "UPDATE balances b
                SET qualifying = coalesce((
                        SELECT sum(e.points)
                          FROM ledger_entries e
                          LEFT JOIN orders o ON o.source = e.source AND o.order_ref = e.order_ref
                         WHERE e.member_id = b.member_id AND e.kind IN ('earn_available', 'clawback')
                           AND coalesce(o.placed_at, e.occurred_at) >= $1
                           AND coalesce(o.placed_at, e.occurred_at) < $2), 0),
                    qualifying_since = $1
              WHERE b.qualifying_since = '-infinity'",
            &[&period.start, &period.end],
        )
        .await
}

/// The member's tier now (None: no tier, or merged away).
pub async fn current_tier(db: &Db, member: i64) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            "SELECT tier FROM members WHERE member_id = $1 AND merged_into IS NULL",
            &[&member],
        )
        .await?
        .and_then(|r| r.get(0)))
}

/// Where a member stands on the way to the next tier, for the wallet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TierProgress {
    pub tier: Option<String>,
    /// Points that count for tiers now: earned in the current period (or
    /// lifetime points without periods).
    pub qualifying_points: i64,
    pub next_tier: Option<String>,
    pub next_threshold: Option<i64>,
    pub points_to_next: Option<i64>,
    /// End of the current qualification period (None without periods).
    pub period_end: Option<DateTime<Utc>>,
}

/// The member's tier, qualifying points and what the next tier needs.
pub async fn progress(
    db: &Db,
    program: &ProgramSettings,
    member: i64,
    now: DateTime<Utc>,
) -> Result<TierProgress, tokio_postgres::Error> {
    let row = db
        .query_opt(
            "SELECT m.tier, coalesce(b.qualifying, 0),
                    CASE WHEN isfinite(b.qualifying_since) THEN b.qualifying_since END
               FROM members m LEFT JOIN balances b ON b.member_id = m.member_id
              WHERE m.member_id = $1",
            &[&member],
        )
        .await?;
    let (tier, counted, since): (Option<String>, i64, Option<DateTime<Utc>>) = match &row {
        // -infinity (no periods) reads as None.
        Some(r) => (r.get(0), r.get(1), r.get(2)),
        None => (None, 0, None),
    };
    let period = program
        .tier_period
        .as_ref()
        .map(|rule| Period::of(rule, now));
    // A count from an earlier period is no longer current: nothing earned
    // in this one yet.
    let qualifying = match (period, since) {
        (Some(period), Some(since)) if since < period.start => 0,
        _ => counted,
    };
    let position = tier.as_deref().and_then(|t| rank(&program.tiers, t));
    let next = match position {
        Some(position) => program.tiers.get(position + 1),
        None => program.tiers.iter().find(|t| t.threshold > qualifying),
    };
    Ok(TierProgress {
        tier,
        qualifying_points: qualifying,
        next_tier: next.map(|t| t.name.clone()),
        next_threshold: next.map(|t| t.threshold),
        points_to_next: next.map(|t| (t.threshold - qualifying).max(0)),
        period_end: period.map(|p| p.end),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(months: u32, first_month: u32) -> TierPeriodSettings {
        TierPeriodSettings {
            months,
            first_month,
            grace_days: 30,
            warning_days: 30,
        }
    }

    fn day(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
    }

    fn first(y: i32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn calendar_year_fiscal_year_and_quarters() {
        let year = Period::of(&rule(12, 1), day(2026, 11, 25));
        assert_eq!((year.start, year.end), (first(2026, 1), first(2027, 1)));
        let fiscal = Period::of(&rule(12, 4), day(2026, 2, 10));
        assert_eq!((fiscal.start, fiscal.end), (first(2025, 4), first(2026, 4)));
        let fiscal = Period::of(&rule(12, 4), day(2026, 4, 1));
        assert_eq!(fiscal.start, first(2026, 4));
        let quarter = Period::of(&rule(3, 1), day(2026, 8, 31));
        assert_eq!(
            (quarter.start, quarter.end),
            (first(2026, 7), first(2026, 10))
        );
        // Quarters starting in February: Nov–Jan spans the year's end.
        let quarter = Period::of(&rule(3, 2), day(2027, 1, 15));
        assert_eq!(
            (quarter.start, quarter.end),
            (first(2026, 11), first(2027, 2))
        );
        assert_eq!(quarter.next(&rule(3, 2)).start, first(2027, 2));
        assert_eq!(
            year.review_at(&rule(12, 1)),
            first(2027, 1) + chrono::Duration::days(30)
        );
        assert_eq!(
            year.warning_at(&rule(12, 1)),
            first(2027, 1) - chrono::Duration::days(30)
        );
    }

    #[test]
    fn the_last_instant_of_a_period_is_in_it() {
        let rule = rule(12, 1);
        let last = first(2027, 1) - chrono::Duration::microseconds(1);
        assert_eq!(Period::of(&rule, last).start, first(2026, 1));
        assert_eq!(Period::of(&rule, first(2027, 1)).start, first(2027, 1));
    }
}
