//! `ledger verify`: the balances, recomputed from the immutable entries
//! alone, against the balances the booking statements keep.
//!
//! Every entry changes one bucket (see `orders.rs`), so a member's
//! available, pending and lifetime points are sums of their entries; where
//! tiers follow lifetime points (no tier period), the qualifying count is
//! the lifetime. A disagreement means a booking path changed a balance
//! without its entry or the other way round: the check that proves the
//! ledger exact after crashes, restarts and replays.

use serde::Serialize;

use super::orders::{LIFETIME_KINDS, PENDING_KINDS};

/// What a member's balance row holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stored {
    pub available: i64,
    pub pending: i64,
    pub lifetime: i64,
    pub qualifying: i64,
    /// Tiers follow lifetime points (no period): qualifying must equal
    /// lifetime.
    pub qualifying_is_lifetime: bool,
}

/// What a member's entries add up to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FromEntries {
    pub available: i64,
    pub pending: i64,
    pub lifetime: i64,
}

/// A member whose balance does not agree with their entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    pub member_id: i64,
    /// `None`: entries without a balance row.
    pub stored: Option<Stored>,
    pub from_entries: FromEntries,
    /// The member row is missing (entries or a balance of nobody).
    pub member_missing: bool,
}

/// The verdict of one verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Members with a balance row or entries.
    pub members: i64,
    pub entries: i64,
    /// How many disagree (all of them, whatever `shown` holds).
    pub disagreeing: i64,
    /// The first of them by member id (at most `limit`).
    pub shown: Vec<Disagreement>,
}

impl Verdict {
    pub fn agrees(&self) -> bool {
        self.disagreeing == 0
    }
}

/// Recomputes every member's balance from the entries, in one statement
/// (an aggregate over `ledger_entries`, memory on the server side), and
/// returns the disagreements, the first `limit` of them in full. Runs in
/// a read-only snapshot of its own: the entries and balances a running
/// service books meanwhile are seen as of one moment.
pub async fn verify(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<Verdict, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let verdict = compare(client, limit.max(0)).await;
    // Read-only: ending it either way keeps nothing.
    client.batch_execute("COMMIT").await?;
    verdict
}

async fn compare(
    client: &tokio_postgres::Client,
    limit: i64,
) -> Result<Verdict, tokio_postgres::Error> {
    let rows = client
        .query(
            "WITH from_entries AS (
                 SELECT member_id, count(*) AS entries,
                        coalesce(sum(points) FILTER (WHERE kind <> ALL($1::text[])), 0)::bigint AS available,
                        coalesce(sum(points) FILTER (WHERE kind = ANY($1::text[])), 0)::bigint AS pending,
                        coalesce(sum(points) FILTER (WHERE kind = ANY($2::text[])), 0)::bigint AS lifetime
                   FROM ledger_entries GROUP BY member_id
             ), compared AS (
                 SELECT coalesce(b.member_id, e.member_id) AS member_id,
                        coalesce(e.entries, 0) AS entries,
                        b.member_id IS NOT NULL AS has_balance,
                        b.available, b.pending, b.lifetime, b.qualifying,
                        b.qualifying_since = '-infinity' AS qualifying_is_lifetime,
                        coalesce(e.available, 0) AS e_available,
                        coalesce(e.pending, 0) AS e_pending,
                        coalesce(e.lifetime, 0) AS e_lifetime,
                        NOT EXISTS (SELECT 1 FROM members m
                                     WHERE m.member_id = coalesce(b.member_id, e.member_id)) AS member_missing
                   FROM balances b FULL JOIN from_entries e ON e.member_id = b.member_id
             ), judged AS (
                 SELECT *,
                        member_missing
                        OR NOT has_balance
                        OR (available, pending, lifetime) IS DISTINCT FROM (e_available, e_pending, e_lifetime)
                        OR (qualifying_is_lifetime AND qualifying IS DISTINCT FROM lifetime) AS disagrees
                   FROM compared
             )
             SELECT member_id, has_balance, available, pending, lifetime, qualifying,
                    qualifying_is_lifetime, e_available, e_pending, e_lifetime, member_missing,
                    count(*) OVER () AS members,
                    (sum(entries) OVER ())::bigint AS all_entries,
                    count(*) FILTER (WHERE disagrees) OVER () AS disagreeing,
                    disagrees
               FROM judged
              ORDER BY disagrees DESC, member_id
              LIMIT greatest($3::bigint, 1)",
            &[&PENDING_KINDS.as_slice(), &LIFETIME_KINDS.as_slice(), &limit],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(Verdict {
            members: 0,
            entries: 0,
            disagreeing: 0,
            shown: Vec::new(),
        });
    };
    let (members, entries, disagreeing): (i64, i64, i64) = (
        first.get("members"),
        first.get("all_entries"),
        first.get("disagreeing"),
    );
    let shown = rows
        .iter()
        .filter(|row| row.get::<_, bool>("disagrees"))
        .take(usize::try_from(limit).unwrap_or(0))
        .map(|row| Disagreement {
            member_id: row.get("member_id"),
            stored: row.get::<_, bool>("has_balance").then(|| Stored {
                available: row.get("available"),
                pending: row.get("pending"),
                lifetime: row.get("lifetime"),
                qualifying: row.get("qualifying"),
                qualifying_is_lifetime: row.get("qualifying_is_lifetime"),
            }),
            from_entries: FromEntries {
                available: row.get("e_available"),
                pending: row.get("e_pending"),
                lifetime: row.get("e_lifetime"),
            },
            member_missing: row.get("member_missing"),
        })
        .collect();
    Ok(Verdict {
        members,
        entries,
        disagreeing,
        shown,
    })
}
