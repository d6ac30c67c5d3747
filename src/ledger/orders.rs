//! `orders`, `order_refunds`, `ledger_entries`, `balances`: the loyalty
//! semantics of DESIGN.md applied to order and refund events.
//!
//! Every entry changes one bucket: `earn_pending` (+pending),
//! `pending_release` and `pending_void` (−pending), `earn_available`
//! (+available, +lifetime), `clawback` (−available, −lifetime), `redeem`,
//! `expire`, `adjust` (available). Each names the source fact that caused it
//! in `effect_key`, unique: a fact is booked once, whatever replays or
//! re-snapshots happen.
//!
//! An order moves only forward: none → placed → completed, and to
//! cancelled or refunded from either. The same stage again (Odoo `paid` →
//! `done`) books nothing.

use super::db::Db;
use chrono::{DateTime, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use crate::config::ProgramSettings;
use crate::normalize::{OrderEvent, OrderStage, RefundEvent};

/// What booking an event did, for counts and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booked {
    /// Points moved.
    Points,
    /// An order seen for the first time earned these points.
    Earned(i64),
    /// Recorded, no points moved (same stage again, anonymous, terminal).
    Nothing,
    /// A refund of an order the ledger never saw.
    UnknownOrder,
    /// A redemption of more points than are available (the number).
    Insufficient(i64),
}

/// Points an order of `basis` earns: floor(basis × rate), never negative.
pub fn points_for(program: &ProgramSettings, basis: Decimal) -> i64 {
    let points = (basis * program.points_per_currency_unit).floor();
    points.to_i64().unwrap_or(i64::MAX).max(0)
}

#[derive(Clone, Copy)]
enum Bucket {
    Pending,
    Available,
}

/// The entry kinds that change pending points; every other kind changes
/// available points.
pub const PENDING_KINDS: [&str; 3] = ["earn_pending", "pending_release", "pending_void"];

/// The entry kinds that also change lifetime points (earned and clawed
/// back; redeemed and expired points stay earned).
pub const LIFETIME_KINDS: [&str; 2] = ["earn_available", "clawback"];

fn bucket(kind: &str) -> Bucket {
    if PENDING_KINDS.contains(&kind) {
        Bucket::Pending
    } else {
        Bucket::Available
    }
}

/// The `SET` items that keep `balances.qualifying` (points earned in the
/// current tier period, `qualifying_since` its start) next to `lifetime`,
/// for a lifetime change `$lifetime` booked in the period starting
/// `$period` (NULL: tiers follow lifetime points, so qualifying is the
/// lifetime). A change in a later period starts the count afresh; one in
/// an earlier period (a late refund) leaves the current count alone: the
/// review of that period counts it from the entries.
fn qualifying_set(lifetime: &str, period: &str) -> String {
    format!(
        "qualifying = CASE WHEN {lifetime} = 0 THEN qualifying
                           WHEN {period} IS NULL THEN lifetime + {lifetime}
                           WHEN {period} > qualifying_since THEN {lifetime}
                           WHEN {period} = qualifying_since THEN qualifying + {lifetime}
                           ELSE qualifying END,
         qualifying_since = CASE WHEN {lifetime} = 0 THEN qualifying_since
                                 WHEN {period} IS NULL THEN '-infinity'::timestamptz
                                 ELSE greatest(qualifying_since, {period}) END"
    )
}

/// The statement of [`book`]: the entry, its balance change and the
/// tier it reaches.
static BOOK_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH entry AS (
             INSERT INTO ledger_entries (member_id, kind, points, source, order_ref, effect_key, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (effect_key) DO NOTHING
             RETURNING member_id
         ), changed AS (
             UPDATE balances SET available = available + $8, pending = pending + $9,
                                 lifetime = lifetime + $10, updated_at = $7,
                                 {qualifying}
              WHERE member_id = (SELECT member_id FROM entry)
             RETURNING qualifying, qualifying_since
         ), tiered AS (
             -- A count of an earlier period than this booking's qualifies
             -- for nothing now (a member reviewed down must earn again).
             UPDATE members m SET tier = reached.name
               FROM changed,
                    LATERAL (SELECT x.name, x.rank
                               FROM unnest($11::text[], $12::bigint[]) WITH ORDINALITY AS x(name, threshold, rank)
                              WHERE x.threshold <= CASE WHEN $13::timestamptz IS NULL
                                                             OR changed.qualifying_since >= $13::timestamptz
                                                        THEN changed.qualifying ELSE 0 END
                              ORDER BY x.rank DESC LIMIT 1) reached
              WHERE m.member_id = $1
                AND coalesce(array_position($11::text[], m.tier), 0) < reached.rank
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM entry), (SELECT count(*) FROM changed), (SELECT count(*) FROM tiered)",
                qualifying = qualifying_set("$10::bigint", "$13::timestamptz")
    )
});

/// The balance change of [`book`] for a member that had no balance row.
static BALANCE_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "UPDATE balances SET available = available + $2, pending = pending + $3,
                                         lifetime = lifetime + $4, updated_at = $5,
                                         {qualifying}
                      WHERE member_id = $1",
        qualifying = qualifying_set("$4::bigint", "$6::timestamptz")
    )
});

/// Books one entry and its balance change; nothing if `effect_key` was
/// booked before. Returns whether it was booked now.
///
/// `program` comes with the time the entry's order was placed: its points
/// qualify for tiers in that order's period (None: the entry moves no
/// lifetime points, as redemptions and expiry).
#[allow(clippy::too_many_arguments)]
async fn book(
    client: &Db,
    program: Option<(&ProgramSettings, DateTime<Utc>)>,
    member: i64,
    kind: &str,
    points: i64,
    source: &str,
    order_ref: &str,
    effect_key: &str,
    at: DateTime<Utc>,
) -> Result<bool, tokio_postgres::Error> {
    if points == 0 {
        return Ok(false);
    }
    let (pending, available, lifetime) = match (bucket(kind), kind) {
        (Bucket::Pending, _) => (points, 0, 0),
        (Bucket::Available, kind) if LIFETIME_KINDS.contains(&kind) => (0, points, points),
        (Bucket::Available, _) => (0, points, 0),
    };
    // The entry, its balance change and the tier it reaches in one round
    // trip. The tier only goes up here (downgrades happen at a period's
    // end, which the scheduler owns). Only bookings with a program move
    // lifetime points; the others (redemptions, expiry) leave the
    // qualifying count alone.
    let names: Vec<&str> = program
        .map(|(p, _)| p.tiers.iter().map(|t| t.name.as_str()).collect())
        .unwrap_or_default();
    let thresholds: Vec<i64> = program
        .map(|(p, _)| p.tiers.iter().map(|t| t.threshold).collect())
        .unwrap_or_default();
    let period = program.and_then(|(p, placed_at)| super::tiers::qualifying_period(p, placed_at));
    let row = client
        .query_one(
            &BOOK_SQL,
            &[
                &member,
                &kind,
                &points,
                &source,
                &order_ref,
                &effect_key,
                &at,
                &available,
                &pending,
                &lifetime,
                &names,
                &thresholds,
                &period,
            ],
        )
        .await?;
    let (inserted, changed): (i64, i64) = (row.get(0), row.get(1));
    if inserted == 0 {
        return Ok(false);
    }
    if changed == 0 {
        // A member without a balance row (created before rows were made
        // with members): make it, then apply the change.
        client
            .execute(
                "INSERT INTO balances (member_id, updated_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[&member, &at],
            )
            .await?;
        client
            .execute(
                &BALANCE_SQL,
                &[&member, &available, &pending, &lifetime, &at, &period],
            )
            .await?;
        if let Some((program, _)) = program {
            update_tier(client, program, member, period).await?;
        }
    }
    Ok(true)
}

/// The order as the ledger last knew it.
struct Known {
    member: Option<i64>,
    stage: OrderStage,
    points: i64,
    clawed_back: i64,
    placed_at: DateTime<Utc>,
}

fn stage(text: &str) -> OrderStage {
    match text {
        "placed" => OrderStage::Placed,
        "completed" => OrderStage::Completed,
        "cancelled" => OrderStage::Cancelled,
        _ => OrderStage::Refunded,
    }
}

async fn known(
    client: &Db,
    source: &str,
    order_ref: &str,
) -> Result<Option<Known>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT member_id, stage, points, clawed_back, placed_at FROM orders
              WHERE source = $1 AND order_ref = $2 FOR UPDATE",
            &[&source, &order_ref],
        )
        .await?;
    Ok(row.map(|r| Known {
        member: r.get(0),
        stage: stage(r.get(1)),
        points: r.get(2),
        clawed_back: r.get(3),
        placed_at: r.get(4),
    }))
}

/// Applies an order event for `member` (None: anonymous).
pub async fn apply_order(
    client: &Db,
    program: &ProgramSettings,
    source: &str,
    order: &OrderEvent,
    member: Option<i64>,
    at: DateTime<Utc>,
) -> Result<Booked, tokio_postgres::Error> {
    let key = |what: &str| format!("{source}:order:{}:{what}", order.order_ref);
    // First sight is the common case: try to record the order, and look at
    // what the ledger knew only if it was there already.
    let points = match (member, order.stage) {
        (Some(_), OrderStage::Placed | OrderStage::Completed) => {
            points_for(program, order.earn_basis)
        }
        _ => 0,
    };
    let first_sight = client
        .execute(
            "INSERT INTO orders (source, order_ref, member_id, stage, earn_basis, grand_total, currency,
                                 channel, points, lines, placed_at, updated_at, line_spend, discounted_spend)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, $13)
             ON CONFLICT (source, order_ref) DO NOTHING",
            &[
                &source,
                &order.order_ref,
                &member,
                &order.stage.as_str(),
                &order.earn_basis,
                &order.grand_total,
                &order.currency,
                &order.channel,
                &points,
                &(order.lines.len() as i32),
                &at,
                &order.line_spend(),
                &order.discounted_spend(),
            ],
        )
        .await?
        == 1;
    let was = if first_sight {
        None
    } else {
        known(client, source, &order.order_ref).await?
    };
    let Some(was) = was else {
        // First sight of the order.
        let Some(member) = member else {
            return Ok(Booked::Nothing);
        };
        let booked = match order.stage {
            OrderStage::Placed => {
                book(
                    client,
                    Some((program, at)),
                    member,
                    "earn_pending",
                    points,
                    source,
                    &order.order_ref,
                    &key("pending"),
                    at,
                )
                .await?
            }
            OrderStage::Completed => {
                book(
                    client,
                    Some((program, at)),
                    member,
                    "earn_available",
                    points,
                    source,
                    &order.order_ref,
                    &key("available"),
                    at,
                )
                .await?
            }
            OrderStage::Cancelled | OrderStage::Refunded => false,
        };
        // An offer the member holds is redeemed by this purchase.
        let mut earned = points;
        if booked {
            if let Some(terms) = super::offers::take_for_purchase(client, member, at).await? {
                earned +=
                    add_offer_bonus(client, program, source, &order.order_ref, member, &terms)
                        .await?;
            }
        }
        return Ok(if booked {
            Booked::Earned(earned)
        } else {
            Booked::Nothing
        });
    };

    let remaining = was.points - was.clawed_back;
    let next = match (was.stage, order.stage) {
        (OrderStage::Placed, OrderStage::Completed) => Some(OrderStage::Completed),
        (
            OrderStage::Placed | OrderStage::Completed,
            OrderStage::Cancelled | OrderStage::Refunded,
        ) => Some(order.stage),
        _ => None,
    };
    let Some(next) = next else {
        return Ok(Booked::Nothing);
    };
    let clawed_now = match next {
        OrderStage::Cancelled | OrderStage::Refunded => remaining,
        _ => 0,
    };
    client
        .execute(
            "UPDATE orders SET stage = $3, clawed_back = clawed_back + $4, updated_at = $5
              WHERE source = $1 AND order_ref = $2",
            &[&source, &order.order_ref, &next.as_str(), &clawed_now, &at],
        )
        .await?;
    let Some(member) = was.member else {
        return Ok(Booked::Nothing);
    };
    let booked = match (was.stage, next) {
        (OrderStage::Placed, OrderStage::Completed) => {
            book(
                client,
                Some((program, was.placed_at)),
                member,
                "pending_release",
                -remaining,
                source,
                &order.order_ref,
                &key("release"),
                at,
            )
            .await?;
            book(
                client,
                Some((program, was.placed_at)),
                member,
                "earn_available",
                remaining,
                source,
                &order.order_ref,
                &key("available"),
                at,
            )
            .await?
        }
        (OrderStage::Placed, _) => {
            book(
                client,
                Some((program, was.placed_at)),
                member,
                "pending_void",
                -remaining,
                source,
                &order.order_ref,
                &key("void"),
                at,
            )
            .await?
        }
        (_, _) => {
            book(
                client,
                Some((program, was.placed_at)),
                member,
                "clawback",
                -remaining,
                source,
                &order.order_ref,
                &key("clawback"),
                at,
            )
            .await?
        }
    };
    Ok(if booked {
        Booked::Points
    } else {
        Booked::Nothing
    })
}

/// Applies a refund: the order's points are clawed back in proportion,
/// `floor(points × refunded / earn_basis)` (or `/ grand_total` for refunds
/// of gross money) over all its refunds so far, never more than it earned.
pub async fn apply_refund(
    client: &Db,
    program: &ProgramSettings,
    source: &str,
    refund: &RefundEvent,
    at: DateTime<Utc>,
) -> Result<Booked, tokio_postgres::Error> {
    let Some(order) = client
        .query_opt(
            "SELECT member_id, stage, points, clawed_back, refunded, earn_basis, grand_total, placed_at FROM orders
              WHERE source = $1 AND order_ref = $2 FOR UPDATE",
            &[&source, &refund.order_ref],
        )
        .await?
    else {
        return Ok(Booked::UnknownOrder);
    };
    let member: Option<i64> = order.get(0);
    let was = stage(order.get(1));
    let points: i64 = order.get(2);
    let clawed_back: i64 = order.get(3);
    let refunded: Decimal = order.get(4);
    let placed_at: DateTime<Utc> = order.get(7);
    // The refund is a part of this: the earn basis, or the grand total for
    // refunds of gross money.
    let basis: Decimal = if refund.of_grand_total {
        order.get(6)
    } else {
        order.get(5)
    };
    let total_refunded = refunded + refund.amount;
    let target = if basis > Decimal::ZERO {
        (Decimal::from(points) * total_refunded.min(basis) / basis)
            .floor()
            .to_i64()
            .unwrap_or(points)
    } else {
        points
    };
    let delta = match was {
        OrderStage::Placed | OrderStage::Completed => {
            (target - clawed_back).clamp(0, points - clawed_back)
        }
        // Cancelled or fully refunded: everything is already taken back.
        _ => 0,
    };
    let inserted = client
        .execute(
            "INSERT INTO order_refunds (source, refund_ref, order_ref, amount, points, occurred_at)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                &source,
                &refund.refund_ref,
                &refund.order_ref,
                &refund.amount,
                &delta,
                &at,
            ],
        )
        .await?;
    if inserted == 0 {
        return Ok(Booked::Nothing);
    }
    client
        .execute(
            "UPDATE orders SET refunded = refunded + $3, clawed_back = clawed_back + $4, updated_at = $5
              WHERE source = $1 AND order_ref = $2",
            &[&source, &refund.order_ref, &refund.amount, &delta, &at],
        )
        .await?;
    let Some(member) = member else {
        return Ok(Booked::Nothing);
    };
    let kind = if was == OrderStage::Placed {
        "pending_void"
    } else {
        "clawback"
    };
    let key = format!("{source}:refund:{}", refund.refund_ref);
    let booked = book(
        client,
        Some((program, placed_at)),
        member,
        kind,
        -delta,
        source,
        &refund.order_ref,
        &key,
        at,
    )
    .await?;
    Ok(if booked {
        Booked::Points
    } else {
        Booked::Nothing
    })
}

/// The member's tier from qualifying points: upgrades at once when a
/// threshold is crossed. (Downgrades happen only at a period's end, which
/// the scheduler owns.)
async fn update_tier(
    client: &Db,
    program: &ProgramSettings,
    member: i64,
    period: Option<DateTime<Utc>>,
) -> Result<(), tokio_postgres::Error> {
    if program.tiers.is_empty() {
        return Ok(());
    }
    // The highest tier the qualifying points reach, set only if it is
    // above the current one: one round trip.
    let names: Vec<&str> = program.tiers.iter().map(|t| t.name.as_str()).collect();
    let thresholds: Vec<i64> = program.tiers.iter().map(|t| t.threshold).collect();
    client
        .execute(
            "UPDATE members m SET tier = reached.name
               FROM balances b,
                    LATERAL (SELECT x.name, x.rank
                               FROM unnest($2::text[], $3::bigint[]) WITH ORDINALITY AS x(name, threshold, rank)
                              WHERE x.threshold <= CASE WHEN $4::timestamptz IS NULL
                                                             OR b.qualifying_since >= $4::timestamptz
                                                        THEN b.qualifying ELSE 0 END
                              ORDER BY x.rank DESC LIMIT 1) reached
              WHERE m.member_id = $1 AND b.member_id = $1
                AND coalesce(array_position($2::text[], m.tier), 0) < reached.rank",
            &[&member, &names, &thresholds, &period],
        )
        .await?;
    Ok(())
}

/// Spends `redemption.points` of the member's available points, never
/// below zero; booked once per redemption reference.
pub async fn apply_redemption(
    client: &Db,
    source: &str,
    redemption: &crate::normalize::RedemptionEvent,
    member: i64,
    at: DateTime<Utc>,
) -> Result<Booked, tokio_postgres::Error> {
    let key = format!("{source}:redemption:{}", redemption.redemption_ref);
    let already = client
        .query_opt(
            "SELECT 1 FROM ledger_entries WHERE effect_key = $1",
            &[&key],
        )
        .await?;
    if already.is_some() || redemption.points == 0 {
        return Ok(Booked::Nothing);
    }
    let available: i64 = client
        .query_opt(
            "SELECT available FROM balances WHERE member_id = $1 FOR UPDATE",
            &[&member],
        )
        .await?
        .map_or(0, |r| r.get(0));
    if available < redemption.points {
        return Ok(Booked::Insufficient(available));
    }
    book(
        client,
        None,
        member,
        "redeem",
        -redemption.points,
        source,
        &redemption.redemption_ref,
        &key,
        at,
    )
    .await?;
    Ok(Booked::Points)
}

/// An order of a known member, booked with many others (see
/// [`apply_new_orders`]).
pub struct NewOrder<'a> {
    pub order: &'a OrderEvent,
    pub member: i64,
    pub at: DateTime<Utc>,
}

/// Books orders seen for the first time, many at once: the orders, their
/// entries, the balances and tiers of their members, in four statements
/// (three round trips) whatever their number. Returns, per order, whether it was new; an order
/// the ledger already knew is left for [`apply_order`] (a transition).
///
/// The caller guarantees what makes booking them together the same as
/// booking them one after the other: each order appears once, and every
/// member already exists.
pub async fn apply_new_orders(
    client: &Db,
    program: &ProgramSettings,
    source: &str,
    orders: &[NewOrder<'_>],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let points: Vec<i64> = orders
        .iter()
        .map(|o| match o.order.stage {
            OrderStage::Placed | OrderStage::Completed => points_for(program, o.order.earn_basis),
            _ => 0,
        })
        .collect();
    let refs: Vec<&str> = orders.iter().map(|o| o.order.order_ref.as_str()).collect();
    let members: Vec<i64> = orders.iter().map(|o| o.member).collect();
    let stages: Vec<&str> = orders.iter().map(|o| o.order.stage.as_str()).collect();
    let bases: Vec<Decimal> = orders.iter().map(|o| o.order.earn_basis).collect();
    let totals: Vec<Decimal> = orders.iter().map(|o| o.order.grand_total).collect();
    let currencies: Vec<Option<&str>> =
        orders.iter().map(|o| o.order.currency.as_deref()).collect();
    let channels: Vec<Option<&str>> = orders.iter().map(|o| o.order.channel.as_deref()).collect();
    let lines: Vec<i32> = orders.iter().map(|o| o.order.lines.len() as i32).collect();
    let ats: Vec<DateTime<Utc>> = orders.iter().map(|o| o.at).collect();
    let line_spend: Vec<Decimal> = orders.iter().map(|o| o.order.line_spend()).collect();
    let discounted: Vec<Decimal> = orders.iter().map(|o| o.order.discounted_spend()).collect();
    let inserted: std::collections::HashSet<String> = client
        .query(
            "INSERT INTO orders (source, order_ref, member_id, stage, earn_basis, grand_total, currency, channel,
                                 points, lines, placed_at, updated_at, line_spend, discounted_spend)
             SELECT $1, r, m, s, b, t, c, ch, p, l, a, a, ls, ds
               FROM unnest($2::text[], $3::bigint[], $4::text[], $5::numeric[], $6::numeric[], $7::text[],
                           $8::text[], $9::bigint[], $10::int[], $11::timestamptz[], $12::numeric[], $13::numeric[])
                    AS x(r, m, s, b, t, c, ch, p, l, a, ls, ds)
             ON CONFLICT (source, order_ref) DO NOTHING
             RETURNING order_ref",
            &[
                &source, &refs, &members, &stages, &bases, &totals, &currencies, &channels, &points, &lines, &ats,
                &line_spend, &discounted,
            ],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let new: Vec<bool> = refs.iter().map(|r| inserted.contains(*r)).collect();

    // Entries of the new orders that earn something.
    let (mut e_members, mut e_kinds, mut e_points, mut e_refs, mut e_keys, mut e_ats) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (i, o) in orders.iter().enumerate() {
        if !new[i] || points[i] == 0 {
            continue;
        }
        let (kind, what) = match o.order.stage {
            OrderStage::Placed => ("earn_pending", "pending"),
            OrderStage::Completed => ("earn_available", "available"),
            _ => continue,
        };
        e_members.push(o.member);
        e_kinds.push(kind);
        e_points.push(points[i]);
        e_refs.push(o.order.order_ref.as_str());
        e_keys.push(format!("{source}:order:{}:{what}", o.order.order_ref));
        e_ats.push(o.at);
    }
    if e_members.is_empty() {
        return Ok(new);
    }
    // Every member has a balance row from its creation; made sure of here
    // for members from before that rule, as the update below needs it.
    // Sent together with the booking statement, ahead of it (prepared
    // first, so it goes out at once): the server runs them in order.
    client.prepare(ENSURE_BALANCES).await?;
    let ensure_balances = async { client.execute(ENSURE_BALANCES, &[&e_members]).await };
    // Entries, balances (summed per member) and tiers in one statement.
    // A member's qualifying count takes the entries of the latest tier
    // period among its own in the batch (see `qualifying_set`).
    let names: Vec<&str> = program.tiers.iter().map(|t| t.name.as_str()).collect();
    let thresholds: Vec<i64> = program.tiers.iter().map(|t| t.threshold).collect();
    let periods: Vec<Option<DateTime<Utc>>> = e_ats
        .iter()
        .map(|at| super::tiers::qualifying_period(program, *at))
        .collect();
    let booking = async {
        client.query_one(
            "WITH input AS (
                 SELECT * FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                                      $7::timestamptz[], $10::timestamptz[])
                        AS x(m, k, p, r, e, a, q)
             ), entry AS (
                 INSERT INTO ledger_entries (member_id, kind, points, source, order_ref, effect_key, occurred_at)
                 SELECT m, k, p, $1, r, e, a FROM input
                 ON CONFLICT (effect_key) DO NOTHING
                 RETURNING member_id, kind, points, occurred_at, effect_key
             ), dated AS (
                 -- `latest`: the newest period among the member's points
                 -- that count (available ones); `newest`: among all its
                 -- bookings in the batch.
                 SELECT entry.*, input.q,
                        max(input.q) FILTER (WHERE entry.kind = 'earn_available')
                            OVER (PARTITION BY entry.member_id) AS latest,
                        max(input.q) OVER (PARTITION BY entry.member_id) AS newest
                   FROM entry JOIN input ON input.e = entry.effect_key
             ), per_member AS (
                 SELECT member_id,
                        sum(points) FILTER (WHERE kind = 'earn_pending') AS pending,
                        sum(points) FILTER (WHERE kind = 'earn_available') AS available,
                        coalesce(sum(points) FILTER (WHERE kind = 'earn_available'
                                                       AND q IS NOT DISTINCT FROM latest), 0) AS in_latest,
                        max(latest) AS latest,
                        max(newest) AS newest,
                        max(occurred_at) AS at
                   FROM dated GROUP BY member_id
             ), changed AS (
                 UPDATE balances b
                    SET pending = b.pending + coalesce(d.pending, 0),
                        available = b.available + coalesce(d.available, 0),
                        lifetime = b.lifetime + coalesce(d.available, 0),
                        qualifying = CASE WHEN coalesce(d.available, 0) = 0 THEN b.qualifying
                                          WHEN d.latest IS NULL THEN b.lifetime + d.available
                                          WHEN d.latest > b.qualifying_since THEN d.in_latest
                                          WHEN d.latest = b.qualifying_since THEN b.qualifying + d.in_latest
                                          ELSE b.qualifying END,
                        qualifying_since = CASE WHEN coalesce(d.available, 0) = 0 THEN b.qualifying_since
                                                WHEN d.latest IS NULL THEN '-infinity'::timestamptz
                                                ELSE greatest(b.qualifying_since, d.latest) END,
                        updated_at = d.at
                   FROM per_member d
                  WHERE b.member_id = d.member_id
                 RETURNING b.member_id, b.qualifying, b.qualifying_since, d.newest
             ), tiered AS (
                 UPDATE members m SET tier = reached.name
                   FROM changed,
                        LATERAL (SELECT x.name, x.rank
                                   FROM unnest($8::text[], $9::bigint[]) WITH ORDINALITY AS x(name, threshold, rank)
                                  WHERE x.threshold <= CASE WHEN changed.newest IS NULL
                                                                 OR changed.qualifying_since >= changed.newest
                                                            THEN changed.qualifying ELSE 0 END
                                  ORDER BY x.rank DESC LIMIT 1) reached
                  WHERE m.member_id = changed.member_id
                    AND coalesce(array_position($8::text[], m.tier), 0) < reached.rank
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM changed) + (SELECT count(*) FROM tiered) * 0",
            &[
                &source, &e_members, &e_kinds, &e_points, &e_refs, &e_keys, &e_ats, &names, &thresholds, &periods,
            ],
        ).await
    };
    futures_util::try_join!(ensure_balances, booking)?;
    Ok(new)
}

const ENSURE_BALANCES: &str = "INSERT INTO balances (member_id, updated_at)
     SELECT DISTINCT m, now() FROM unnest($1::bigint[]) AS x(m)
     ON CONFLICT DO NOTHING";

/// Expires the member's whole available balance (the program's
/// inactivity rule), once per `effect_key`. Returns the points expired (0
/// when there were none or it was booked before).
pub async fn expire_available(
    client: &Db,
    member: i64,
    effect_key: &str,
    at: DateTime<Utc>,
) -> Result<i64, tokio_postgres::Error> {
    let available: i64 = client
        .query_opt(
            "SELECT available FROM balances WHERE member_id = $1 FOR UPDATE",
            &[&member],
        )
        .await?
        .map_or(0, |r| r.get(0));
    if available <= 0 {
        return Ok(0);
    }
    let booked = book(
        client, None, member, "expire", -available, "program", "", effect_key, at,
    )
    .await?;
    Ok(if booked { available } else { 0 })
}

/// Adds an offer's bonus to a purchase: the order then earns
/// `floor(basis × rate × multiplier) + bonus_points` in all, booked as an
/// entry of its own (`offer:<member>:<occasion>`) in the order's bucket, and
/// the order's points grow by it (a later refund claws it back in
/// proportion). An order takes one offer at most. Returns the bonus.
pub async fn add_offer_bonus(
    client: &Db,
    program: &ProgramSettings,
    source: &str,
    order_ref: &str,
    member: i64,
    terms: &super::offers::Terms,
) -> Result<i64, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT stage, earn_basis, points, placed_at FROM orders
              WHERE source = $1 AND order_ref = $2 AND offer_occasion IS NULL FOR UPDATE",
            &[&source, &order_ref],
        )
        .await?
    else {
        return Ok(0);
    };
    let kind = match stage(row.get(0)) {
        OrderStage::Placed => "earn_pending",
        OrderStage::Completed => "earn_available",
        _ => return Ok(0),
    };
    let basis: Decimal = row.get(1);
    let points: i64 = row.get(2);
    let at: DateTime<Utc> = row.get(3);
    let with_offer = (basis * program.points_per_currency_unit * terms.multiplier)
        .floor()
        .to_i64()
        .unwrap_or(i64::MAX)
        .max(0)
        .saturating_add(terms.bonus_points);
    let bonus = (with_offer - points).max(0);
    // Claimed first: two purchases booked together on this connection see
    // the same open offer; only the one whose claim changes the row gets it.
    let by = format!("{source}:{order_ref}");
    if !super::offers::redeemed(client, member, &terms.occasion, &by, at).await? {
        return Ok(0);
    }
    client
        .execute(
            "UPDATE orders SET points = points + $3, offer_occasion = $4 WHERE source = $1 AND order_ref = $2",
            &[&source, &order_ref, &bonus, &terms.occasion],
        )
        .await?;
    book(
        client,
        Some((program, at)),
        member,
        kind,
        bonus,
        source,
        order_ref,
        &format!("offer:{member}:{}", terms.occasion),
        at,
    )
    .await?;
    Ok(bonus)
}

/// The member's first purchase after `after` and before `until` that took
/// no offer: `(source, order_ref)`.
pub async fn first_purchase_between(
    client: &Db,
    member: i64,
    after: DateTime<Utc>,
    until: DateTime<Utc>,
) -> Result<Option<(String, String)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            "SELECT source, order_ref FROM orders
              WHERE member_id = $1 AND placed_at > $2 AND placed_at < $3
                AND stage IN ('placed', 'completed') AND offer_occasion IS NULL
              ORDER BY placed_at, source, order_ref
              LIMIT 1",
            &[&member, &after, &until],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}
