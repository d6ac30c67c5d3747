//! `members`, `member_identifiers`, `member_merges`, `shared_identifiers`:
//! which member a set of identifiers belongs to, linking and merging by the
//! rules of [`crate::identity`]. Runs inside the ledger transaction that
//! books the event, so a crash never leaves half a merge.
//!
//! Resolution of the identifiers seen together on one event:
//! 1. values known to be shared are set aside;
//! 2. their owners are looked up; none → a new member owns them all;
//! 3. one or more owners → the oldest survives; the others are merged into
//!    it (identifiers, balances, entries and orders move; the merged
//!    member keeps a `merged_into` pointer and the merge is recorded);
//! 4. unless that would give the survivor more identifiers of one kind
//!    than the limit allows: then the weakest-kind identifier of the event
//!    that an owner already had is the value linking strangers — it is
//!    marked shared and resolution starts again without it.

use std::collections::BTreeMap;

use super::db::Db;
use chrono::{DateTime, Utc};

use crate::identity::{Identifier, IdentifierKind, Identity};

/// A member as `member show` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberView {
    pub member_id: String,
    pub identifiers: Vec<String>,
    pub points: PointsView,
    pub tier: Option<String>,
    pub segments: Vec<String>,
    pub orders: i64,
    pub last_entries: Vec<EntryView>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PointsView {
    pub available: i64,
    pub pending: i64,
    pub lifetime: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EntryView {
    pub kind: String,
    pub points: i64,
    pub source: String,
    pub order_ref: Option<String>,
    pub occurred_at: DateTime<Utc>,
}

/// Finds or creates the member these identifiers belong to, linking and
/// merging as the rules say. `None` when no identifier is usable
/// (anonymous).
pub async fn resolve(
    client: &Db,
    identity: &Identity,
    source: &str,
    identifiers: &[Identifier],
    at: DateTime<Utc>,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let (mut usable, owners_now) = lookup(client, identifiers).await?;
    // The common case, in one query: a returning customer whose
    // identifiers all belong to one member already.
    let mut first_owner = owners_now.values().map(|(_, m)| *m);
    if let Some(member) = first_owner.next() {
        if first_owner.all(|m| m == member) && usable.iter().all(|i| owners_now.contains_key(i)) {
            return Ok(Some(member));
        }
    }
    // Each pass either resolves or sets one identifier aside: bounded.
    for _ in 0..=identifiers.len() {
        if usable.is_empty() {
            return Ok(None);
        }
        let owners = owners(client, &usable).await?;
        let mut members: Vec<(DateTime<Utc>, i64)> = owners.values().copied().collect();
        members.sort();
        members.dedup();
        let Some(&(_, survivor)) = members.first() else {
            let member: i64 = client
                .query_one(
                    "INSERT INTO members (created_at) VALUES ($1) RETURNING member_id",
                    &[&at],
                )
                .await?
                .get(0);
            // Every member has a balance row from the start: booking then
            // only updates it (see `orders::book`).
            client
                .execute(
                    "INSERT INTO balances (member_id, updated_at) VALUES ($1, $2)",
                    &[&member, &at],
                )
                .await?;
            attach(client, member, source, &usable, at).await?;
            return Ok(Some(member));
        };
        let others: Vec<i64> = members.iter().skip(1).map(|(_, m)| *m).collect();
        if let Some(shared) =
            over_limit(client, identity, survivor, &others, &usable, &owners).await?
        {
            client
                .execute(
                    "INSERT INTO shared_identifiers (kind, value, detected_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&shared.kind.as_str(), &shared.value, &at],
                )
                .await?;
            tracing::info!(identifier = %shared, member_id = survivor, "identifier links more members than the limit allows; treated as shared from now on");
            usable.retain(|i| *i != shared);
            continue;
        }
        for other in others {
            // `others` are owners of `usable` identifiers: the identifier
            // that shows it is the same person is among them.
            if let Some(via) = usable
                .iter()
                .find(|i| owners.get(*i).map(|(_, m)| *m) == Some(other))
            {
                merge(client, other, survivor, via, at).await?;
            }
        }
        let new: Vec<Identifier> = usable
            .iter()
            .filter(|i| !owners.contains_key(*i))
            .cloned()
            .collect();
        attach(client, survivor, source, &new, at).await?;
        return Ok(Some(survivor));
    }
    Ok(None)
}

/// In one round trip: the identifiers not known to be shared, and the
/// current owner of each known one.
pub(crate) async fn lookup(
    client: &Db,
    identifiers: &[Identifier],
) -> Result<(Vec<Identifier>, BTreeMap<Identifier, (DateTime<Utc>, i64)>), tokio_postgres::Error> {
    let (kinds, values) = columns(identifiers);
    let rows = client
        .query(
            "SELECT t.kind, t.value, s.kind IS NOT NULL, m.created_at, m.member_id
               FROM unnest($1::text[], $2::text[]) AS t(kind, value)
               LEFT JOIN shared_identifiers s ON s.kind = t.kind AND s.value = t.value
               LEFT JOIN member_identifiers i ON i.kind = t.kind AND i.value = t.value
               LEFT JOIN members m ON m.member_id = i.member_id",
            &[&kinds, &values],
        )
        .await?;
    let mut usable = Vec::new();
    let mut owners = BTreeMap::new();
    for row in rows {
        let Some(kind) = IdentifierKind::parse(row.get(0)) else {
            continue;
        };
        let identifier = Identifier {
            kind,
            value: row.get(1),
        };
        if row.get::<_, bool>(2) {
            continue;
        }
        let member: Option<i64> = row.get(4);
        if let Some(member) = member {
            owners.insert(identifier.clone(), (row.get(3), member));
        }
        usable.push(identifier);
    }
    Ok((usable, owners))
}

fn columns(identifiers: &[Identifier]) -> (Vec<&str>, Vec<&str>) {
    identifiers
        .iter()
        .map(|i| (i.kind.as_str(), i.value.as_str()))
        .unzip()
}

/// The current owner of each known identifier, with its creation time.
async fn owners(
    client: &Db,
    identifiers: &[Identifier],
) -> Result<BTreeMap<Identifier, (DateTime<Utc>, i64)>, tokio_postgres::Error> {
    let (kinds, values) = columns(identifiers);
    let rows = client
        .query(
            "SELECT i.kind, i.value, m.created_at, m.member_id
               FROM member_identifiers i JOIN members m USING (member_id)
              WHERE (i.kind, i.value) IN (SELECT * FROM unnest($1::text[], $2::text[]))
              ORDER BY m.member_id
              FOR UPDATE OF m",
            &[&kinds, &values],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let kind = IdentifierKind::parse(r.get(0))?;
            Some((
                Identifier {
                    kind,
                    value: r.get(1),
                },
                (r.get(2), r.get(3)),
            ))
        })
        .collect())
}

/// The identifier to treat as shared if linking would exceed a per-kind
/// limit: the weakest-kind one of the event that an owner already had.
async fn over_limit(
    client: &Db,
    identity: &Identity,
    survivor: i64,
    others: &[i64],
    usable: &[Identifier],
    owners: &BTreeMap<Identifier, (DateTime<Utc>, i64)>,
) -> Result<Option<Identifier>, tokio_postgres::Error> {
    let mut members = vec![survivor];
    members.extend_from_slice(others);
    let rows = client
        .query(
            "SELECT kind, value FROM member_identifiers WHERE member_id = ANY($1)",
            &[&members],
        )
        .await?;
    let mut all: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for identifier in usable {
        let pair = (
            identifier.kind.as_str().to_string(),
            identifier.value.clone(),
        );
        if !all.contains(&pair) {
            all.push(pair);
        }
    }
    let exceeded = IdentifierKind::ALL
        .into_iter()
        .any(|kind| all.iter().filter(|(k, _)| k == kind.as_str()).count() > identity.limit(kind));
    if !exceeded {
        return Ok(None);
    }
    let mut linking: Vec<&Identifier> = usable.iter().filter(|i| owners.contains_key(*i)).collect();
    linking.sort_by_key(|i| std::cmp::Reverse(i.kind));
    Ok(linking.first().map(|i| (*i).clone()))
}

async fn attach(
    client: &Db,
    member: i64,
    source: &str,
    identifiers: &[Identifier],
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    let (kinds, values) = columns(identifiers);
    client
        .execute(
            "INSERT INTO member_identifiers (kind, value, member_id, first_source, first_seen_at)
             SELECT k, v, $3, $4, $5 FROM unnest($1::text[], $2::text[]) AS t(k, v)
             ON CONFLICT DO NOTHING",
            &[&kinds, &values, &member, &source, &at],
        )
        .await?;
    Ok(())
}

/// Merges `from` into `into`: identifiers, entries, orders and balances
/// move; `from` keeps a pointer and the merge is recorded.
async fn merge(
    client: &Db,
    from: i64,
    into: i64,
    via: &Identifier,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "UPDATE member_identifiers SET member_id = $2 WHERE member_id = $1",
            &[&from, &into],
        )
        .await?;
    client
        .execute(
            "UPDATE ledger_entries SET member_id = $2 WHERE member_id = $1",
            &[&from, &into],
        )
        .await?;
    client
        .execute(
            "UPDATE orders SET member_id = $2 WHERE member_id = $1",
            &[&from, &into],
        )
        .await?;
    client
        .execute(
            "INSERT INTO balances (member_id, available, pending, lifetime, qualifying, qualifying_since, updated_at)
             SELECT $2, available, pending, lifetime, qualifying, qualifying_since, $3
               FROM balances WHERE member_id = $1
             ON CONFLICT (member_id) DO UPDATE SET
               available = balances.available + EXCLUDED.available,
               pending = balances.pending + EXCLUDED.pending,
               lifetime = balances.lifetime + EXCLUDED.lifetime,
               -- Counts of the same tier period add up; otherwise the
               -- later period's count is the current one.
               qualifying = CASE
                   WHEN balances.qualifying_since = EXCLUDED.qualifying_since
                       THEN balances.qualifying + EXCLUDED.qualifying
                   WHEN balances.qualifying_since > EXCLUDED.qualifying_since THEN balances.qualifying
                   ELSE EXCLUDED.qualifying END,
               qualifying_since = greatest(balances.qualifying_since, EXCLUDED.qualifying_since),
               updated_at = EXCLUDED.updated_at",
            &[&from, &into, &at],
        )
        .await?;
    client
        .execute("DELETE FROM balances WHERE member_id = $1", &[&from])
        .await?;
    // The survivor's own profile wins; what it never stated comes from the
    // merged member.
    client
        .execute(
            "INSERT INTO member_profiles (member_id, email_opt_in, sms_opt_in, push_opt_in, timezone, locale,
                                          push_token, line_user_id, profiling_opt_out, updated_at)
             SELECT $2, email_opt_in, sms_opt_in, push_opt_in, timezone, locale, push_token, line_user_id,
                    profiling_opt_out, $3
               FROM member_profiles WHERE member_id = $1
             ON CONFLICT (member_id) DO UPDATE SET
               email_opt_in = coalesce(member_profiles.email_opt_in, EXCLUDED.email_opt_in),
               sms_opt_in = coalesce(member_profiles.sms_opt_in, EXCLUDED.sms_opt_in),
               push_opt_in = coalesce(member_profiles.push_opt_in, EXCLUDED.push_opt_in),
               timezone = coalesce(member_profiles.timezone, EXCLUDED.timezone),
               locale = coalesce(member_profiles.locale, EXCLUDED.locale),
               push_token = coalesce(member_profiles.push_token, EXCLUDED.push_token),
               line_user_id = coalesce(member_profiles.line_user_id, EXCLUDED.line_user_id),
               -- Either one's opt-out of profiling holds for both.
               profiling_opt_out = CASE
                   WHEN member_profiles.profiling_opt_out OR EXCLUDED.profiling_opt_out THEN true
                   ELSE coalesce(member_profiles.profiling_opt_out, EXCLUDED.profiling_opt_out) END,
               updated_at = EXCLUDED.updated_at",
            &[&from, &into, &at],
        )
        .await?;
    client
        .execute("DELETE FROM member_profiles WHERE member_id = $1", &[&from])
        .await?;
    // What the merged member reached and was told (welcome, tiers,
    // milestones) counts for the survivor: merged history fires nothing.
    client
        .execute(
            "INSERT INTO trigger_marks (member_id, mark, reached_at, announced)
             SELECT $2, mark, reached_at, announced FROM trigger_marks WHERE member_id = $1
             ON CONFLICT DO NOTHING",
            &[&from, &into],
        )
        .await?;
    client
        .execute("DELETE FROM trigger_marks WHERE member_id = $1", &[&from])
        .await?;
    // Its lapse and expiry dates are the survivor's now (recomputed as the
    // survivor is booked in this batch).
    client
        .execute(
            "DELETE FROM scheduled_triggers WHERE member_id = $1",
            &[&from],
        )
        .await?;
    // Its offers too.
    client
        .execute(
            "INSERT INTO member_offers (member_id, occasion, code, multiplier, bonus_points, granted_at,
                                        valid_until, redeemed_at, redeemed_by)
             SELECT $2, occasion, code, multiplier, bonus_points, granted_at, valid_until, redeemed_at, redeemed_by
               FROM member_offers WHERE member_id = $1
             ON CONFLICT DO NOTHING",
            &[&from, &into],
        )
        .await?;
    client
        .execute("DELETE FROM member_offers WHERE member_id = $1", &[&from])
        .await?;
    super::features::merge(client, from, into).await?;
    super::wishlists::merge(client, from, into).await?;
    client
        .execute(
            "UPDATE members SET merged_into = $2, merged_at = $3 WHERE member_id = $1",
            &[&from, &into, &at],
        )
        .await?;
    client
        .execute(
            "INSERT INTO member_merges (merged_member, into_member, via_kind, via_value, merged_at)
             VALUES ($1, $2, $3, $4, $5)",
            &[&from, &into, &via.kind.as_str(), &via.value, &at],
        )
        .await?;
    tracing::info!(
        merged_member = from,
        into_member = into,
        via = via.kind.as_str(),
        "members merged"
    );
    Ok(())
}

/// The member an identifier (already normalized) belongs to, following
/// merges.
pub async fn find(
    client: &Db,
    identifier: &Identifier,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT member_id FROM member_identifiers WHERE kind = $1 AND value = $2",
            &[&identifier.kind.as_str(), &identifier.value],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Everything `member show` prints.
pub async fn view(client: &Db, member: i64) -> Result<Option<MemberView>, tokio_postgres::Error> {
    let Some(row) = client
        .query_opt(
            "SELECT m.tier, coalesce(b.available, 0), coalesce(b.pending, 0), coalesce(b.lifetime, 0),
                    (SELECT count(*) FROM orders o WHERE o.member_id = m.member_id)
               FROM members m LEFT JOIN balances b USING (member_id)
              WHERE m.member_id = $1",
            &[&member],
        )
        .await?
    else {
        return Ok(None);
    };
    let identifiers = client
        .query(
            "SELECT kind, value FROM member_identifiers WHERE member_id = $1 ORDER BY kind, value",
            &[&member],
        )
        .await?
        .iter()
        .filter_map(|r| {
            let kind = IdentifierKind::parse(r.get(0))?;
            Some(
                Identifier {
                    kind,
                    value: r.get(1),
                }
                .to_string(),
            )
        })
        .collect();
    let last_entries = client
        .query(
            "SELECT kind, points, source, order_ref, occurred_at FROM ledger_entries
              WHERE member_id = $1 ORDER BY entry_id DESC LIMIT 10",
            &[&member],
        )
        .await?
        .iter()
        .map(|r| EntryView {
            kind: r.get(0),
            points: r.get(1),
            source: r.get(2),
            order_ref: r.get(3),
            occurred_at: r.get(4),
        })
        .collect();
    Ok(Some(MemberView {
        member_id: member.to_string(),
        identifiers,
        points: PointsView {
            available: row.get(1),
            pending: row.get(2),
            lifetime: row.get(3),
        },
        tier: row.get(0),
        segments: {
            let mut held: Vec<String> = super::features::segments(client, &[member])
                .await?
                .remove(&member)
                .unwrap_or_default()
                .into_iter()
                .collect();
            held.sort();
            held
        },
        orders: row.get(4),
        last_entries,
    }))
}

/// Records what a source states about a member's profile and consent;
/// fields it does not state keep their value.
pub async fn update_profile(
    client: &Db,
    member: i64,
    profile: &crate::normalize::Profile,
    at: DateTime<Utc>,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "INSERT INTO member_profiles (member_id, email_opt_in, sms_opt_in, push_opt_in, timezone, locale,
                                          push_token, line_user_id, profiling_opt_out, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $10, $9)
             ON CONFLICT (member_id) DO UPDATE SET
               email_opt_in = coalesce(EXCLUDED.email_opt_in, member_profiles.email_opt_in),
               sms_opt_in = coalesce(EXCLUDED.sms_opt_in, member_profiles.sms_opt_in),
               push_opt_in = coalesce(EXCLUDED.push_opt_in, member_profiles.push_opt_in),
               timezone = coalesce(EXCLUDED.timezone, member_profiles.timezone),
               locale = coalesce(EXCLUDED.locale, member_profiles.locale),
               push_token = coalesce(EXCLUDED.push_token, member_profiles.push_token),
               line_user_id = coalesce(EXCLUDED.line_user_id, member_profiles.line_user_id),
               profiling_opt_out = coalesce(EXCLUDED.profiling_opt_out, member_profiles.profiling_opt_out),
               updated_at = EXCLUDED.updated_at",
            &[
                &member,
                &profile.email_opt_in,
                &profile.sms_opt_in,
                &profile.push_opt_in,
                &profile.timezone,
                &profile.locale,
                &profile.push_token,
                &profile.line_user_id,
                &at,
                &profile.profiling_opt_out,
            ],
        )
        .await?;
    // No profiling: the segments it was in are forgotten at once.
    if profile.profiling_opt_out == Some(true) {
        super::features::forget_segments(client, member).await?;
    }
    Ok(())
}

/// What delivery needs to know of a member: where to reach it, what it
/// consented to, and what the message may say (tier, points).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contact {
    /// The surviving member (a merged member's messages go to its survivor).
    pub member_id: i64,
    pub erased: bool,
    pub email: Option<String>,
    pub phone: Option<String>,
    pub tier: Option<String>,
    pub available: i64,
    pub pending: i64,
    pub lifetime: i64,
    pub email_opt_in: Option<bool>,
    pub sms_opt_in: Option<bool>,
    pub push_opt_in: Option<bool>,
    pub timezone: Option<String>,
    pub locale: Option<String>,
    pub push_token: Option<String>,
    pub line_user_id: Option<String>,
    /// Objected to profiling (`None`: not stated).
    pub profiling_opt_out: Option<bool>,
}

/// The contacts of `members`, keyed by the id asked for; each follows
/// merges to its survivor. Unknown members are left out. The address of a
/// kind is the one first seen.
pub async fn contacts(
    client: &Db,
    members: &[i64],
) -> Result<std::collections::HashMap<i64, Contact>, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH RECURSIVE chain (asked, member_id, merged_into, depth) AS (
                 SELECT member_id, member_id, merged_into, 0 FROM members WHERE member_id = ANY($1)
                 UNION ALL
                 SELECT c.asked, m.member_id, m.merged_into, c.depth + 1
                   FROM members m JOIN chain c ON m.member_id = c.merged_into
                  WHERE c.depth < 32
             )
             SELECT c.asked, m.member_id, m.erased_at IS NOT NULL, m.tier,
                    (SELECT value FROM member_identifiers i
                      WHERE i.member_id = m.member_id AND i.kind = 'email'
                      ORDER BY i.first_seen_at, i.value LIMIT 1),
                    (SELECT value FROM member_identifiers i
                      WHERE i.member_id = m.member_id AND i.kind = 'phone'
                      ORDER BY i.first_seen_at, i.value LIMIT 1),
                    coalesce(b.available, 0), coalesce(b.pending, 0), coalesce(b.lifetime, 0),
                    p.email_opt_in, p.sms_opt_in, p.push_opt_in, p.timezone, p.locale,
                    p.push_token, p.line_user_id, p.profiling_opt_out
               FROM chain c
               JOIN members m ON m.member_id = c.member_id
               LEFT JOIN balances b ON b.member_id = m.member_id
               LEFT JOIN member_profiles p ON p.member_id = m.member_id
              WHERE c.merged_into IS NULL",
            &[&members],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, i64>(0),
                Contact {
                    member_id: r.get(1),
                    erased: r.get(2),
                    tier: r.get(3),
                    email: r.get(4),
                    phone: r.get(5),
                    available: r.get(6),
                    pending: r.get(7),
                    lifetime: r.get(8),
                    email_opt_in: r.get(9),
                    sms_opt_in: r.get(10),
                    push_opt_in: r.get(11),
                    timezone: r.get(12),
                    locale: r.get(13),
                    push_token: r.get(14),
                    line_user_id: r.get(15),
                    profiling_opt_out: r.get(16),
                },
            )
        })
        .collect())
}

/// What erasing a member removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Erased {
    /// The member and the members merged into it.
    pub members: Vec<i64>,
    pub identifiers: u64,
    /// Stored source rows (reference data, quarantine) whose values were
    /// the member's.
    pub source_rows: u64,
}

/// The member and every member merged into it (directly or not).
pub async fn with_merged(db: &Db, member: i64) -> Result<Vec<i64>, tokio_postgres::Error> {
    Ok(db
        .query(
            "WITH RECURSIVE family (member_id) AS (
                 SELECT $1::bigint
                 UNION
                 SELECT m.member_id FROM members m JOIN family f ON m.merged_into = f.member_id
             )
             SELECT member_id FROM family ORDER BY member_id",
            &[&member],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// Whether the member was erased before.
pub async fn is_erased(db: &Db, member: i64) -> Result<bool, tokio_postgres::Error> {
    Ok(db
        .query_opt(
            "SELECT erased_at IS NOT NULL FROM members WHERE member_id = $1",
            &[&member],
        )
        .await?
        .is_some_and(|r| r.get(0)))
}

/// Rows read per round when looking for an erased member's values in
/// stored source rows: the memory bound of an erasure.
const ERASE_SCAN_ROWS: i64 = 1000;

/// GDPR erasure of the member's personal data, in the caller's
/// transaction: identifiers, profile (consents, time zone, push token,
/// LINE id), merge records' identifier values, and any value equal to one
/// of its identifiers in stored source rows (reference data such as Odoo
/// partners, quarantined rows, whose replayable copies are dropped) are
/// removed; the member is marked erased.
/// Ledger entries, orders and balances stay, under the bare member id.
pub async fn erase_personal_data(
    db: &Db,
    identity: &crate::identity::Identity,
    member: i64,
    at: DateTime<Utc>,
) -> Result<Erased, tokio_postgres::Error> {
    let members = with_merged(db, member).await?;
    let identifiers: Vec<Identifier> = db
        .query(
            "SELECT kind, value FROM member_identifiers WHERE member_id = ANY($1)",
            &[&members],
        )
        .await?
        .iter()
        .filter_map(|r| {
            let kind: String = r.get(0);
            Some(Identifier {
                kind: IdentifierKind::parse(&kind)?,
                value: r.get(1),
            })
        })
        .collect();
    let mut erased = Erased {
        members: members.clone(),
        ..Erased::default()
    };
    // Stored source rows first (found by the identifiers' values).
    erased.source_rows = scrub_source_rows(db, identity, &identifiers).await?;
    erased.identifiers = db
        .execute(
            "DELETE FROM member_identifiers WHERE member_id = ANY($1)",
            &[&members],
        )
        .await?;
    // `shared_identifiers` stays: it marks values that link no one (a
    // till's default card); forgetting one would let it merge strangers
    // again.
    db.execute(
        "DELETE FROM member_profiles WHERE member_id = ANY($1)",
        &[&members],
    )
    .await?;
    // What they waited for is theirs: no message will tell them anyway.
    super::wishlists::forget(db, &members).await?;
    db.execute(
        "UPDATE member_merges SET via_value = '(erased)'
          WHERE merged_member = ANY($1) OR into_member = ANY($1)",
        &[&members],
    )
    .await?;
    db.execute(
        "UPDATE members SET erased_at = $2 WHERE member_id = ANY($1) AND erased_at IS NULL",
        &[&members, &at],
    )
    .await?;
    Ok(erased)
}

/// Removes the values equal to one of `identifiers` (once normalized)
/// from stored source rows: reference data and quarantine. Candidates are
/// found in SQL by the value's text (emails, cards) or digits (phones),
/// then each value is compared normalized, so a row is only changed where
/// a value really is the member's.
async fn scrub_source_rows(
    db: &Db,
    identity: &crate::identity::Identity,
    identifiers: &[Identifier],
) -> Result<u64, tokio_postgres::Error> {
    // What the text of a row holding the value must contain: the email or
    // card as is (case-insensitively), or the phone's last 7 digits among
    // the row's digits (sources write numbers with spaces and prefixes).
    let mut texts = Vec::new();
    let mut digits = Vec::new();
    let mut cards = Vec::new();
    for identifier in identifiers {
        match identifier.kind {
            IdentifierKind::Email => texts.push(format!("%{}%", like_escape(&identifier.value))),
            // Stored as written (`DEMO-00001`, `1234 5678`): compared by
            // letters and digits only, as cards are normalized.
            IdentifierKind::Card => cards.push(format!("%{}%", like_escape(&identifier.value))),
            IdentifierKind::Phone => {
                let d: String = identifier
                    .value
                    .chars()
                    .filter(char::is_ascii_digit)
                    .collect();
                if d.len() >= 7 {
                    digits.push(format!("%{}%", &d[d.len() - 7..]));
                }
            }
            IdentifierKind::Customer => {}
        }
    }
    if texts.is_empty() && digits.is_empty() && cards.is_empty() {
        return Ok(0);
    }
    let mut changed = 0;
    // Two fixed table names (no input reaches the statement text).
    for table in ["reference_rows", "quarantine"] {
        let select = format!(
            "SELECT ctid::text, row_data FROM {table}
              WHERE row_data IS NOT NULL
                AND ($3::text IS NULL OR ctid > $3::text::tid)
                AND (row_data::text ILIKE ANY($1)
                     OR regexp_replace(row_data::text, '[^0-9]', '', 'g') LIKE ANY($2)
                     OR regexp_replace(upper(row_data::text), '[^A-Z0-9]', '', 'g') LIKE ANY($4))
              ORDER BY ctid LIMIT {ERASE_SCAN_ROWS}"
        );
        // A quarantined row's typed copy goes too: replaying it would book
        // the erased values again (the row stays listed, not replayable).
        let also = if table == "quarantine" {
            ", replay = NULL"
        } else {
            ""
        };
        let update = format!("UPDATE {table} SET row_data = $2{also} WHERE ctid = $1::text::tid");
        let mut after: Option<String> = None;
        loop {
            // Pages through candidates by physical row id: bounded memory
            // whatever the table's size. (An updated row moves and may be
            // met again: it no longer holds the values, so nothing changes.)
            let rows = db
                .client()
                .query(&select, &[&texts, &digits, &after, &cards])
                .await?;
            for row in &rows {
                let id: String = row.get(0);
                let mut data: serde_json::Value = row.get(1);
                if forget_values(&mut data, identity, identifiers) {
                    db.client().execute(&update, &[&id, &data]).await?;
                    changed += 1;
                }
            }
            if (rows.len() as i64) < ERASE_SCAN_ROWS {
                break;
            }
            after = rows.last().map(|r| r.get(0));
        }
    }
    Ok(changed)
}

/// `%` and `_` taken literally in a LIKE pattern.
fn like_escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_")
}

/// Sets every string in `data` that is one of `identifiers` to null
/// (nested objects and arrays too, and strings holding JSON, as Odoo's
/// translated fields); returns whether anything changed.
fn forget_values(
    data: &mut serde_json::Value,
    identity: &crate::identity::Identity,
    identifiers: &[Identifier],
) -> bool {
    match data {
        serde_json::Value::String(text) => {
            if identity.is_one_of(text, identifiers) {
                *data = serde_json::Value::Null;
                return true;
            }
            if let Ok(mut inner @ (serde_json::Value::Object(_) | serde_json::Value::Array(_))) =
                serde_json::from_str::<serde_json::Value>(text)
            {
                if forget_values(&mut inner, identity, identifiers) {
                    *data = serde_json::Value::String(inner.to_string());
                    return true;
                }
            }
            false
        }
        serde_json::Value::Array(items) => items.iter_mut().fold(false, |changed, item| {
            forget_values(item, identity, identifiers) | changed
        }),
        serde_json::Value::Object(fields) => fields.values_mut().fold(false, |changed, item| {
            forget_values(item, identity, identifiers) | changed
        }),
        _ => false,
    }
}

/// Why an identifier typed by a person found no member.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Not an identifier (the message says what is expected).
    #[error("{0}")]
    Invalid(String),
    #[error("ledger: {}", super::db::describe(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// The member an identifier as a person types it names: `member:ID`, an
/// email, a phone number with `+`, `card:…`, `customer:SOURCE:ID`.
pub async fn find_typed(
    db: &Db,
    identity: &Identity,
    text: &str,
) -> Result<Option<i64>, LookupError> {
    match text.strip_prefix("member:").map(str::parse::<i64>) {
        // The member as it is now: merged ones lead to their survivor;
        // an unknown id to none.
        Some(Ok(id)) => Ok(db
            .query_opt(
                "WITH RECURSIVE chain (member_id, merged_into, depth) AS (
                     SELECT member_id, merged_into, 0 FROM members WHERE member_id = $1
                     UNION ALL
                     SELECT m.member_id, m.merged_into, c.depth + 1
                       FROM members m JOIN chain c ON m.member_id = c.merged_into
                      WHERE c.depth < 32
                 )
                 SELECT member_id FROM chain WHERE merged_into IS NULL",
                &[&id],
            )
            .await?
            .map(|r| r.get(0))),
        Some(Err(_)) => Err(LookupError::Invalid("member:ID needs a number".into())),
        None => {
            let identifier = identity.parse_typed(text).map_err(LookupError::Invalid)?;
            Ok(find(db, &identifier).await?)
        }
    }
}
