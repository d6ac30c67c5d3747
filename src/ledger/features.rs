//! `member_features`, `member_products`, `member_segments`: what a member's
//! purchases add up to, per member and per product, and the segments the
//! member is in. `member_features` is kept by statement triggers on
//! `orders` (migration V7); the rest is written here, in the ledger
//! transaction, by `triggers::record` at commit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::db::Db;
use crate::normalize::Line;
use crate::personalize::Counts;

/// Purchase times kept per member and product (the rhythm of the last 9
/// intervals).
pub const RECENT_PURCHASES: usize = 10;

/// The counted lines of an order a member placed, booked for the first
/// time.
#[derive(Debug, Clone)]
pub struct Purchase {
    pub member: i64,
    pub at: DateTime<Utc>,
    pub lines: Vec<Line>,
}

/// One product's part of a batch's purchases.
#[derive(Debug, Default)]
struct ProductDelta {
    category: Option<String>,
    purchases: i32,
    spend: Decimal,
    discounted_spend: Decimal,
    first_at: Option<DateTime<Utc>>,
    last_at: Option<DateTime<Utc>>,
    times: Vec<DateTime<Utc>>,
}

/// Adds the batch's purchases per member and product (an order buying a
/// product on several lines is one purchase of it): one statement per
/// batch. (The member's line spend is kept with the orders.)
/// Makes sure [`record_purchases`]' first statement is prepared: a call
/// after this sends it at once, so reads pipelined after it run after it.
pub async fn prepare_record_purchases(db: &Db) -> Result<(), tokio_postgres::Error> {
    db.prepare(RECORD_PURCHASES).await
}

const RECORD_PURCHASES: &str = "WITH upserted AS (
         INSERT INTO member_products AS p (member_id, product, category, purchases, spend, discounted_spend,
                                           first_at, last_at, recent)
         SELECT u.m, u.pr, u.c, u.n, u.s, u.d, u.f, u.l, u.t::timestamptz[]
           FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[], $5::numeric[], $6::numeric[],
                       $7::timestamptz[], $8::timestamptz[], $9::text[]) AS u(m, pr, c, n, s, d, f, l, t)
         ON CONFLICT (member_id, product) DO UPDATE SET
           category = coalesce(EXCLUDED.category, p.category),
           purchases = p.purchases + EXCLUDED.purchases,
           spend = p.spend + EXCLUDED.spend,
           discounted_spend = p.discounted_spend + EXCLUDED.discounted_spend,
           first_at = least(p.first_at, EXCLUDED.first_at),
           last_at = greatest(p.last_at, EXCLUDED.last_at),
           recent = (p.recent || EXCLUDED.recent)[cardinality(p.recent) + cardinality(EXCLUDED.recent) - $10 + 1:]
         RETURNING member_id, product, xmax = 0 AS first)
         SELECT member_id, product FROM upserted WHERE first";

pub async fn record_purchases(
    db: &Db,
    purchases: &[Purchase],
) -> Result<(), tokio_postgres::Error> {
    let mut products: HashMap<(i64, &str), ProductDelta> = HashMap::new();
    for purchase in purchases {
        let mut in_this_order: HashSet<&str> = HashSet::new();
        for line in &purchase.lines {
            let Some(sku) = line.sku.as_deref() else {
                continue;
            };
            let delta = products.entry((purchase.member, sku)).or_default();
            if in_this_order.insert(sku) {
                delta.purchases += 1;
                delta.times.push(purchase.at);
                delta.first_at = Some(delta.first_at.map_or(purchase.at, |t| t.min(purchase.at)));
                delta.last_at = Some(delta.last_at.map_or(purchase.at, |t| t.max(purchase.at)));
            }
            delta.spend += line.amount;
            if line.discounted {
                delta.discounted_spend += line.amount;
            }
            if line.category.is_some() {
                delta.category.clone_from(&line.category);
            }
        }
    }
    if products.is_empty() {
        return Ok(());
    }
    let mut members = Vec::with_capacity(products.len());
    let mut skus = Vec::with_capacity(products.len());
    let mut categories = Vec::with_capacity(products.len());
    let mut counts = Vec::with_capacity(products.len());
    let mut spend = Vec::with_capacity(products.len());
    let mut discounted = Vec::with_capacity(products.len());
    let mut firsts = Vec::with_capacity(products.len());
    let mut lasts = Vec::with_capacity(products.len());
    // The batch's purchase times of each row, as an array literal: one
    // row may have several (unnest cannot carry arrays of arrays).
    let mut times = Vec::with_capacity(products.len());
    for ((member, sku), mut delta) in products {
        let (Some(first), Some(last)) = (delta.first_at, delta.last_at) else {
            continue;
        };
        delta.times.sort();
        members.push(member);
        skus.push(sku);
        categories.push(delta.category);
        counts.push(delta.purchases);
        spend.push(delta.spend);
        discounted.push(delta.discounted_spend);
        firsts.push(first);
        lasts.push(last);
        times.push(format!(
            "{{{}}}",
            delta
                .times
                .iter()
                .map(|t| format!("\"{}\"", t.to_rfc3339()))
                .collect::<Vec<_>>()
                .join(",")
        ));
    }
    // The times are kept in the order booked; the last RECENT_PURCHASES.
    // `xmax = 0`: the row was inserted, not updated — a member's first
    // purchase of the product, which the cross-sell counts need (only
    // those rows come back).
    let rows = db
        .query(
            RECORD_PURCHASES,
            &[
                &members,
                &skus,
                &categories,
                &counts,
                &spend,
                &discounted,
                &firsts,
                &lasts,
                &times,
                &(RECENT_PURCHASES as i32),
            ],
        )
        .await?;
    let (firsts_m, firsts_p): (Vec<i64>, Vec<String>) = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
        .unzip();
    count_co_purchases(db, &firsts_m, &firsts_p).await
}

/// Other products of a member a first purchase is paired with: the
/// bound on the work of one purchase (a member with a vast history pairs
/// with what they bought most recently).
pub const CO_PURCHASE_PARTNERS: i64 = 200;

/// Counts members' first purchases of products (`(members[i],
/// products[i])`, already in `member_products`) into the cross-sell
/// statistics: one more buyer of each product, one more of everything for
/// a member new to all of them, and one more member who bought both for
/// each pair with the member's other products (a pair of two new ones
/// once).
async fn count_co_purchases(
    db: &Db,
    members: &[i64],
    products: &[String],
) -> Result<(), tokio_postgres::Error> {
    if members.is_empty() {
        return Ok(());
    }
    db.execute(
        "WITH new (m, p) AS (SELECT * FROM unnest($1::bigint[], $2::text[]))
         INSERT INTO product_buyers AS b (product, members)
         SELECT p, count(*) FROM new GROUP BY p
         UNION ALL
         SELECT '*', count(*) FROM (SELECT DISTINCT m FROM new) nm
          WHERE NOT EXISTS (SELECT 1 FROM member_products o
                             WHERE o.member_id = nm.m
                               AND NOT EXISTS (SELECT 1 FROM new n WHERE n.m = o.member_id AND n.p = o.product))
         ON CONFLICT (product) DO UPDATE SET members = b.members + EXCLUDED.members",
        &[&members, &products],
    )
    .await?;
    db.execute(
        "WITH new (m, p) AS (SELECT * FROM unnest($1::bigint[], $2::text[])),
         pairs AS (
             SELECT n.p AS a, o.product AS b
               FROM new n
              CROSS JOIN LATERAL (SELECT product FROM member_products o
                                   WHERE o.member_id = n.m AND o.product <> n.p
                                   ORDER BY o.last_at DESC LIMIT $3) o
              WHERE NOT (o.product < n.p
                         AND EXISTS (SELECT 1 FROM new n2 WHERE n2.m = n.m AND n2.p = o.product))
         )
         INSERT INTO co_purchases AS c (product_a, product_b, members)
         SELECT a, b, count(*) FROM (SELECT a, b FROM pairs UNION ALL SELECT b, a FROM pairs) x
          GROUP BY a, b
         ON CONFLICT (product_a, product_b) DO UPDATE SET members = c.members + EXCLUDED.members",
        &[&members, &products, &CO_PURCHASE_PARTNERS],
    )
    .await?;
    Ok(())
}

/// A product recommended to a member: bought by members who bought what
/// this member buys, more often than by members at large.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Recommendation {
    pub product: String,
    /// P(product | one of the member's products) / P(product), the best
    /// over the member's products.
    pub lift: f64,
    /// Members who bought both (for the best pair).
    pub support: i64,
}

/// The `top` products with the highest lift (above 1) for `member`,
/// among pairs bought by at least `min_support` members, leaving out what
/// the member already buys.
pub async fn recommendations(
    db: &Db,
    member: i64,
    min_support: i64,
    top: i64,
) -> Result<Vec<Recommendation>, tokio_postgres::Error> {
    Ok(db
        .query(
            "WITH everyone AS (SELECT members::float8 AS n FROM product_buyers WHERE product = '*'),
             scored AS (
                 SELECT c.product_b AS product,
                        c.members::float8 * (SELECT n FROM everyone) / (ba.members * bb.members) AS lift,
                        c.members AS support
                   FROM member_products mp
                   JOIN co_purchases c ON c.product_a = mp.product
                   JOIN product_buyers ba ON ba.product = c.product_a
                   JOIN product_buyers bb ON bb.product = c.product_b
                  WHERE mp.member_id = $1 AND c.members >= $2
                    AND NOT EXISTS (SELECT 1 FROM member_products x
                                     WHERE x.member_id = $1 AND x.product = c.product_b)
             )
             SELECT DISTINCT ON (product) product, lift, support
               FROM scored WHERE lift > 1
              ORDER BY product, lift DESC, support DESC",
            &[&member, &min_support],
        )
        .await?
        .iter()
        .map(|r| Recommendation {
            product: r.get(0),
            lift: r.get(1),
            support: r.get(2),
        })
        .collect::<Vec<_>>())
    .map(|mut found: Vec<Recommendation>| {
        found.sort_by(|a, b| {
            b.lift
                .total_cmp(&a.lift)
                .then(b.support.cmp(&a.support))
                .then(a.product.cmp(&b.product))
        });
        found.truncate(top.max(0) as usize);
        found
    })
}

/// A member's counts, whether it opted out of profiling, and the segments
/// it is in now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberCounts {
    pub counts: Counts,
    pub profiling_opt_out: bool,
    pub segments: HashSet<String>,
    /// When its segments are next reviewed by the scheduler.
    pub review_at: Option<DateTime<Utc>>,
    /// Lifetime points, and the orders not cancelled (what milestones
    /// count): a commit that judges segments reads its standings here.
    pub lifetime: i64,
    pub kept_orders: i64,
}

/// The counts of `members` (survivors only; members without any are
/// there with zeros): the counts, each member's top category (or product)
/// by spend, its segments, its next review, its lifetime points and orders
/// kept. Two statements, pipelined on the connection.
///
/// The top category is chosen here from the spend per category, not by
/// the server: as a sort per member (a lateral `ORDER BY … LIMIT 1`) it
/// was three quarters of this read with 5,000 members, and the sums
/// alone read in a tenth of the time (measured on 5,000 members × 10
/// products: 101 ms against 12–30). What comes back is one row per member
/// and category (or uncategorised product) of the members asked: the rows
/// the sort read.
///
/// The next review is a subquery, one probe of its primary key per member:
/// as a join, a stale row estimate of the members asked (a table that grew
/// since it was last analyzed, as after a snapshot) had the planner read
/// every member's review row once per member asked — 60–230 ms a batch
/// with 5,000 members.
pub async fn counts(
    db: &Db,
    members: &[i64],
) -> Result<HashMap<i64, MemberCounts>, tokio_postgres::Error> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&members];
    let (rows, spend_rows) = tokio::try_join!(
        db.query(
            "SELECT m.member_id, m.tier, coalesce(f.purchases, 0)::bigint, coalesce(f.monetary, 0),
                    f.first_purchase_at, f.last_purchase_at,
                    coalesce(f.pos_purchases, 0)::bigint, coalesce(f.web_purchases, 0)::bigint,
                    coalesce(f.app_purchases, 0)::bigint,
                    coalesce(f.line_spend, 0), coalesce(f.discounted_spend, 0),
                    coalesce(p.profiling_opt_out, false),
                    (SELECT s.due_at FROM scheduled_triggers s
                      WHERE s.member_id = m.member_id AND s.kind = 'segments' AND s.subject = ''),
                    ARRAY(SELECT segment FROM member_segments g WHERE g.member_id = m.member_id),
                    coalesce(b.lifetime, 0), coalesce(f.kept_orders, 0)::bigint
               FROM members m
               LEFT JOIN member_features f ON f.member_id = m.member_id
               LEFT JOIN balances b ON b.member_id = m.member_id
               LEFT JOIN member_profiles p ON p.member_id = m.member_id
              WHERE m.member_id = ANY($1) AND m.merged_into IS NULL",
            &params,
        ),
        db.query(
            "SELECT member_id, coalesce(category, product), sum(spend)
               FROM member_products WHERE member_id = ANY($1)
              GROUP BY 1, 2",
            &params,
        ),
    )?;
    let mut tops = top_categories(
        spend_rows
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1), r.get(2))),
    );
    Ok(rows
        .iter()
        .map(|r| {
            let member: i64 = r.get(0);
            let segments: Vec<String> = r.get(13);
            (
                member,
                MemberCounts {
                    counts: Counts {
                        tier: r.get(1),
                        purchases: r.get(2),
                        monetary: r.get(3),
                        first_purchase_at: r.get(4),
                        last_purchase_at: r.get(5),
                        pos_purchases: r.get(6),
                        web_purchases: r.get(7),
                        app_purchases: r.get(8),
                        line_spend: r.get(9),
                        discounted_spend: r.get(10),
                        top_category: tops.remove(&member),
                    },
                    profiling_opt_out: r.get(11),
                    review_at: r.get(12),
                    segments: segments.into_iter().collect(),
                    lifetime: r.get(14),
                    kept_orders: r.get(15),
                },
            )
        })
        .collect())
}

/// Each member's category (or product) with the most spend, from its
/// spend per category: on a tie, the first by name (as an
/// `ORDER BY spend DESC, category` would).
fn top_categories(
    spend: impl Iterator<Item = (i64, String, Decimal)>,
) -> HashMap<i64, (String, Decimal)> {
    let mut tops: HashMap<i64, (String, Decimal)> = HashMap::new();
    for (member, category, spent) in spend {
        match tops.get_mut(&member) {
            Some(top) if spent < top.1 || (spent == top.1 && category >= top.0) => {}
            Some(top) => *top = (category, spent),
            None => {
                tops.insert(member, (category, spent));
            }
        }
    }
    tops
}

/// The segments `members` are in now.
pub async fn segments(
    db: &Db,
    members: &[i64],
) -> Result<HashMap<i64, HashSet<String>>, tokio_postgres::Error> {
    let mut held: HashMap<i64, HashSet<String>> = HashMap::new();
    for row in db
        .query(
            "SELECT member_id, segment FROM member_segments WHERE member_id = ANY($1)",
            &[&members],
        )
        .await?
    {
        held.entry(row.get(0)).or_default().insert(row.get(1));
    }
    Ok(held)
}

/// A member entering a segment, with the features that put it there.
#[derive(Debug, Clone)]
pub struct Entry {
    pub member: i64,
    pub segment: String,
    pub at: DateTime<Utc>,
    pub features: serde_json::Value,
}

/// Records entries and departures. Returns the entries recorded (an entry
/// another writer recorded first is not repeated).
pub async fn move_segments(
    db: &Db,
    entries: Vec<Entry>,
    departures: &[(i64, String)],
) -> Result<Vec<Entry>, tokio_postgres::Error> {
    if !departures.is_empty() {
        let members: Vec<i64> = departures.iter().map(|d| d.0).collect();
        let segments: Vec<&str> = departures.iter().map(|d| d.1.as_str()).collect();
        db.execute(
            "DELETE FROM member_segments
              WHERE (member_id, segment) IN (SELECT * FROM unnest($1::bigint[], $2::text[]))",
            &[&members, &segments],
        )
        .await?;
    }
    if entries.is_empty() {
        return Ok(entries);
    }
    let members: Vec<i64> = entries.iter().map(|e| e.member).collect();
    let segments: Vec<&str> = entries.iter().map(|e| e.segment.as_str()).collect();
    let ats: Vec<DateTime<Utc>> = entries.iter().map(|e| e.at).collect();
    let features: Vec<&serde_json::Value> = entries.iter().map(|e| &e.features).collect();
    let inserted: HashSet<(i64, String)> = db
        .query(
            "INSERT INTO member_segments (member_id, segment, entered_at, features)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::json[])
             ON CONFLICT DO NOTHING
             RETURNING member_id, segment",
            &[&members, &segments, &ats, &features],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Ok(entries
        .into_iter()
        .filter(|e| inserted.contains(&(e.member, e.segment.clone())))
        .collect())
}

/// A merge: the merged member's products are the survivor's (its orders
/// moved with their features already); its segments are judged again as
/// the survivor's.
pub async fn merge(db: &Db, from: i64, into: i64) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "INSERT INTO member_products AS p (member_id, product, category, purchases, spend, discounted_spend,
                                           first_at, last_at, recent)
         SELECT $2, product, category, purchases, spend, discounted_spend, first_at, last_at, recent
           FROM member_products WHERE member_id = $1
         ON CONFLICT (member_id, product) DO UPDATE SET
           category = coalesce(p.category, EXCLUDED.category),
           purchases = p.purchases + EXCLUDED.purchases,
           spend = p.spend + EXCLUDED.spend,
           discounted_spend = p.discounted_spend + EXCLUDED.discounted_spend,
           first_at = least(p.first_at, EXCLUDED.first_at),
           last_at = greatest(p.last_at, EXCLUDED.last_at),
           recent = (SELECT array_agg(t ORDER BY t) FROM (
                         SELECT t FROM unnest(p.recent || EXCLUDED.recent) t ORDER BY t DESC LIMIT $3) r)",
        &[&from, &into, &(RECENT_PURCHASES as i64)],
    )
    .await?;
    db.execute("DELETE FROM member_products WHERE member_id = $1", &[&from])
        .await?;
    // Its orders moved with their features (the `orders` triggers): what is
    // left is an empty row.
    db.execute("DELETE FROM member_features WHERE member_id = $1", &[&from])
        .await?;
    db.execute("DELETE FROM member_segments WHERE member_id = $1", &[&from])
        .await?;
    Ok(())
}

/// The member is in no segment any more (it objected to profiling).
pub async fn forget_segments(db: &Db, member: i64) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "DELETE FROM member_segments WHERE member_id = $1",
        &[&member],
    )
    .await?;
    Ok(())
}

/// At start: with personalization off, what the ledger knew of members'
/// behaviour is forgotten (it would go stale); on, an empty
/// `member_features` beside orders with members (personalization was off)
/// is counted again from the orders. The products start again from the
/// purchases booked from now on: lines are not stored.
pub async fn switch(
    client: &tokio_postgres::Client,
    enabled: bool,
) -> Result<(), tokio_postgres::Error> {
    if !enabled {
        client
            .batch_execute(
                "DELETE FROM member_segments; DELETE FROM member_products; DELETE FROM member_features;",
            )
            .await?;
        return Ok(());
    }
    let recount: bool = client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM member_features)
                AND EXISTS (SELECT 1 FROM orders WHERE member_id IS NOT NULL)",
            &[],
        )
        .await?
        .get(0);
    if recount {
        let counted: i64 = client
            .query_one("SELECT member_features_count_all()", &[])
            .await?
            .get(0);
        tracing::info!(
            members = counted,
            "personalization on: members' purchases counted again from the orders"
        );
    }
    Ok(())
}

/// A member's purchases of one product: what its replenishment rhythm is
/// learnt from.
#[derive(Debug, Clone, PartialEq)]
pub struct Rhythm {
    pub member: i64,
    pub product: String,
    pub category: Option<String>,
    pub purchases: i64,
    pub last_at: DateTime<Utc>,
    /// The last purchase times, oldest first.
    pub recent: Vec<DateTime<Utc>>,
    pub profiling_opt_out: bool,
}

impl Rhythm {
    /// The usual time between two purchases: the median of the intervals
    /// between the recent purchases, once there are `min_purchases`.
    /// Intervals under a day (a second basket the same day) are no cycle.
    pub fn usual_interval(&self, min_purchases: i64) -> Option<chrono::Duration> {
        if self.purchases < min_purchases {
            return None;
        }
        let mut times = self.recent.clone();
        times.sort();
        let mut gaps: Vec<i64> = times
            .windows(2)
            .map(|w| (w[1] - w[0]).num_seconds())
            .filter(|gap| *gap >= 86_400)
            .collect();
        if gaps.is_empty() {
            return None;
        }
        gaps.sort_unstable();
        let middle = gaps.len() / 2;
        let median = if gaps.len() % 2 == 1 {
            gaps[middle]
        } else {
            (gaps[middle - 1] + gaps[middle]) / 2
        };
        Some(chrono::Duration::seconds(median))
    }
}

/// The rhythms of `(members[i], products[i])`.
pub async fn rhythms(
    db: &Db,
    members: &[i64],
    products: &[&str],
) -> Result<Vec<Rhythm>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT p.member_id, p.product, p.category, p.purchases::bigint, p.last_at, p.recent,
                    coalesce(mp.profiling_opt_out, false)
               FROM unnest($1::bigint[], $2::text[]) AS k(member_id, product)
               JOIN member_products p ON p.member_id = k.member_id AND p.product = k.product
               LEFT JOIN member_profiles mp ON mp.member_id = p.member_id",
            &[&members, &products],
        )
        .await?
        .iter()
        .map(|r| Rhythm {
            member: r.get(0),
            product: r.get(1),
            category: r.get(2),
            purchases: r.get(3),
            last_at: r.get(4),
            recent: r.get(5),
            profiling_opt_out: r.get(6),
        })
        .collect())
}

/// Of `members`, those who objected to profiling.
pub async fn opted_out(db: &Db, members: &[i64]) -> Result<HashSet<i64>, tokio_postgres::Error> {
    if members.is_empty() {
        return Ok(HashSet::new());
    }
    Ok(db
        .query(
            "SELECT member_id FROM member_profiles WHERE member_id = ANY($1) AND profiling_opt_out",
            &[&members],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn rhythm(days: &[i64]) -> Rhythm {
        let day =
            |d: i64| Utc.with_ymd_and_hms(2026, 1, 1, 9, 0, 0).unwrap() + chrono::Duration::days(d);
        Rhythm {
            member: 1,
            product: "COF".into(),
            category: None,
            purchases: days.len() as i64,
            last_at: day(*days.last().unwrap()),
            recent: days.iter().map(|d| day(*d)).collect(),
            profiling_opt_out: false,
        }
    }

    #[test]
    fn the_top_category_has_the_most_spend_and_ties_go_to_the_first_name() {
        let d = |v: i64| Decimal::new(v, 2);
        let tops = top_categories(
            [
                (1, "Tea".to_string(), d(900)),
                (1, "Coffee".to_string(), d(1500)),
                (1, "SKU-9".to_string(), d(1499)),
                (2, "Tea".to_string(), d(500)),
                (2, "Coffee".to_string(), d(500)),
                (2, "Mugs".to_string(), d(500)),
            ]
            .into_iter(),
        );
        assert_eq!(tops.len(), 2);
        assert_eq!(tops[&1], ("Coffee".to_string(), d(1500)));
        assert_eq!(tops[&2], ("Coffee".to_string(), d(500)));
    }

    #[test]
    fn the_usual_interval_is_the_median_and_needs_enough_purchases() {
        let days = |d: i64| Some(chrono::Duration::days(d));
        assert_eq!(rhythm(&[0, 30, 60]).usual_interval(3), days(30));
        assert_eq!(
            rhythm(&[0, 30]).usual_interval(3),
            None,
            "two purchases are no rhythm"
        );
        // One long gap (a holiday) does not move it: 28, 30, 90, 31 → 30.5.
        assert_eq!(
            rhythm(&[0, 28, 58, 148, 179]).usual_interval(3),
            Some(chrono::Duration::hours(30 * 24 + 12))
        );
        // A second basket the same day is no cycle.
        assert_eq!(rhythm(&[0, 0, 30, 60]).usual_interval(3), days(30));
    }
}
