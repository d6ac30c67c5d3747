//! `member_offers`: offers granted by triggers and redeemed by the
//! member's next purchase within their validity (the earn rule's
//! multipliers and bonuses from offers).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::db::Db;
use crate::config::ProgramSettings;

/// An offer granted to a member.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub member: i64,
    /// The trigger occasion that granted it (one grant per occasion).
    pub occasion: String,
    pub code: String,
    pub multiplier: Decimal,
    pub bonus_points: i64,
    pub granted_at: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

/// Records grants; an occasion granted before adds nothing. Then a
/// purchase already booked after a new grant's trigger (in the same batch:
/// the trigger is judged at commit) redeems it now, so the outcome does
/// not depend on where batches end.
pub async fn grant(
    db: &Db,
    program: &ProgramSettings,
    grants: &[Grant],
) -> Result<(), tokio_postgres::Error> {
    if grants.is_empty() {
        return Ok(());
    }
    let members: Vec<i64> = grants.iter().map(|g| g.member).collect();
    let occasions: Vec<&str> = grants.iter().map(|g| g.occasion.as_str()).collect();
    let codes: Vec<&str> = grants.iter().map(|g| g.code.as_str()).collect();
    let multipliers: Vec<Decimal> = grants.iter().map(|g| g.multiplier).collect();
    let bonuses: Vec<i64> = grants.iter().map(|g| g.bonus_points).collect();
    let granted: Vec<DateTime<Utc>> = grants.iter().map(|g| g.granted_at).collect();
    let until: Vec<DateTime<Utc>> = grants.iter().map(|g| g.valid_until).collect();
    let new: std::collections::HashSet<(i64, String)> = db
        .query(
            "INSERT INTO member_offers (member_id, occasion, code, multiplier, bonus_points, granted_at, valid_until)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::numeric[], $5::bigint[],
                                  $6::timestamptz[], $7::timestamptz[])
             ON CONFLICT DO NOTHING
             RETURNING member_id, occasion",
            &[&members, &occasions, &codes, &multipliers, &bonuses, &granted, &until],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // The most generous first, as a purchase booked later would choose
    // (`take_for_purchase`).
    let mut by_value: Vec<&Grant> = grants.iter().collect();
    by_value.sort_by(|a, b| {
        b.multiplier
            .cmp(&a.multiplier)
            .then(b.bonus_points.cmp(&a.bonus_points))
    });
    for grant in by_value {
        if !new.contains(&(grant.member, grant.occasion.clone())) {
            continue;
        }
        if let Some((source, order_ref)) = super::orders::first_purchase_between(
            db,
            grant.member,
            grant.granted_at,
            grant.valid_until,
        )
        .await?
        {
            let terms = Terms {
                occasion: grant.occasion.clone(),
                code: grant.code.clone(),
                multiplier: grant.multiplier,
                bonus_points: grant.bonus_points,
            };
            super::orders::add_offer_bonus(db, program, &source, &order_ref, grant.member, &terms)
                .await?;
        }
    }
    Ok(())
}

/// Of `members`, those holding an offer a purchase at or after `since`
/// could redeem (their orders are booked one by one, not set-wise).
pub async fn holders(
    db: &Db,
    members: &[i64],
    since: DateTime<Utc>,
) -> Result<std::collections::HashSet<i64>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT DISTINCT member_id FROM member_offers
              WHERE member_id = ANY($1) AND redeemed_at IS NULL AND valid_until > $2",
            &[&members, &since],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// What an offer gives, and the occasion that granted it.
#[derive(Debug, Clone, PartialEq)]
pub struct Terms {
    pub occasion: String,
    pub code: String,
    pub multiplier: Decimal,
    pub bonus_points: i64,
}

/// The offer a purchase at `at` redeems: granted before it (strictly: the
/// purchase that fired the trigger does not redeem its own offer), not
/// expired, not redeemed; the most generous first. Locked until the
/// transaction ends.
pub async fn take_for_purchase(
    db: &Db,
    member: i64,
    at: DateTime<Utc>,
) -> Result<Option<Terms>, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            "SELECT occasion, code, multiplier, bonus_points FROM member_offers
              WHERE member_id = $1 AND redeemed_at IS NULL AND granted_at < $2 AND valid_until > $2
              ORDER BY multiplier DESC, bonus_points DESC, granted_at
              LIMIT 1
                FOR UPDATE",
            &[&member, &at],
        )
        .await?
        .map(|row| Terms {
            occasion: row.get(0),
            code: row.get(1),
            multiplier: row.get(2),
            bonus_points: row.get(3),
        }))
}

/// Marks an offer redeemed by a purchase; false if it was redeemed before.
pub async fn redeemed(
    db: &Db,
    member: i64,
    occasion: &str,
    by: &str,
    at: DateTime<Utc>,
) -> Result<bool, tokio_postgres::Error> {
    Ok(db
        .execute(
            "UPDATE member_offers SET redeemed_at = $3, redeemed_by = $4
              WHERE member_id = $1 AND occasion = $2 AND redeemed_at IS NULL",
            &[&member, &occasion, &at, &by],
        )
        .await?
        == 1)
}

/// An offer a member holds and can still use, for the wallet.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct OpenOffer {
    pub code: String,
    pub multiplier: String,
    pub bonus_points: i64,
    pub granted_at: DateTime<Utc>,
    pub valid_until: DateTime<Utc>,
}

/// The member's offers not yet redeemed and still valid at `now`, the
/// one a purchase would take first at the top.
pub async fn open(
    db: &Db,
    member: i64,
    now: DateTime<Utc>,
) -> Result<Vec<OpenOffer>, tokio_postgres::Error> {
    Ok(db
        .query(
            "SELECT code, multiplier, bonus_points, granted_at, valid_until FROM member_offers
              WHERE member_id = $1 AND redeemed_at IS NULL AND valid_until >= $2
              ORDER BY multiplier DESC, bonus_points DESC, granted_at",
            &[&member, &now],
        )
        .await?
        .iter()
        .map(|r| OpenOffer {
            code: r.get(0),
            multiplier: r.get::<_, Decimal>(1).normalize().to_string(),
            bonus_points: r.get(2),
            granted_at: r.get(3),
            valid_until: r.get(4),
        })
        .collect())
}
