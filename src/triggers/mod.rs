//! Event triggers, detected inside the ledger transaction that caused
//! them and written to the outbox in that same transaction: welcome on
//! enrollment, tier upgrade, milestones (nth purchase, lifetime points),
//! redemption confirmed, points earned. (The tier downgrade notice comes
//! from the review at a period's end: see `schedule`.)
//!
//! Welcome, tiers and milestones are judged from state, not from the code
//! path that booked the points: at each commit, for every member the batch
//! touched, what the member has reached now (tier, purchases, lifetime
//! points) is compared with the marks it has (`trigger_marks`, owned here).
//! A new mark is written once (the primary key says so), and only a mark
//! reached by a live change fires a trigger: the history a snapshot copies
//! in reaches its marks silently, and no replay, restart or re-snapshot
//! fires twice. Redemptions and earned points are events of their own,
//! keyed by their source reference.
//!
//! Each trigger becomes one outbox row per route configured for it, keyed
//! `<occasion>:<route>` (unique), so the same occasion is delivered once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::json;

pub mod schedule;

use crate::config::{
    ExpirySettings, LapseSettings, MilestoneSettings, OfferSettings, Settings, TierSettings,
    TriggerKind,
};
use crate::delivery::outbox::{self, NewMessage};
use crate::delivery::template::Channel;
use crate::ledger::db::Db;
use crate::ledger::offers::{self, Grant};

/// A configured route, as the trigger detector needs it.
#[derive(Debug, Clone)]
struct Route {
    name: String,
    provider: String,
    channel: Channel,
}

/// What fires and where to: built once from the settings.
#[derive(Debug, Default)]
pub struct Triggers {
    routes: HashMap<TriggerKind, Vec<Route>>,
    milestones: MilestoneSettings,
    tiers: Vec<TierSettings>,
    lapse: LapseSettings,
    price_drop: crate::config::PriceDropSettings,
    expiry: Option<ExpirySettings>,
    offers: Vec<OfferSettings>,
    program: crate::config::ProgramSettings,
    personalization: crate::personalize::PersonalizationSettings,
    segments: crate::personalize::Segments,
}

impl Triggers {
    pub fn from_settings(settings: &Settings) -> Arc<Self> {
        let mut routes: HashMap<TriggerKind, Vec<Route>> = HashMap::new();
        for route in &settings.triggers.routes {
            let channel = settings
                .providers
                .iter()
                .find(|p| p.name == route.provider)
                .and_then(|p| p.compiled.as_ref())
                .map_or(Channel::Webhook, |t| t.channel);
            routes.entry(route.trigger).or_default().push(Route {
                name: route.route_name(),
                provider: route.provider.clone(),
                channel,
            });
        }
        Arc::new(Self {
            routes,
            milestones: settings.triggers.milestones.clone(),
            tiers: settings.program.tiers.clone(),
            lapse: settings.triggers.lapse.clone(),
            price_drop: settings.triggers.price_drop.clone(),
            expiry: settings.program.expiry.clone(),
            offers: settings.offers.clone(),
            program: settings.program.clone(),
            personalization: settings.personalization.clone(),
            segments: crate::personalize::Segments::new(&settings.segments),
        })
    }

    fn routed(&self, kind: TriggerKind) -> bool {
        self.routes.contains_key(&kind)
    }

    /// The offer a trigger carries for a member (next best action): of the
    /// catalog entries for this trigger, the member's tier and segments
    /// (`segments` is `None` for a member who objected to profiling: only
    /// entries without segments are for them), valid at `at`, the one of
    /// highest priority; among equals a segment's entry before a general
    /// one, then the one worth most to this member (its bonus plus the
    /// extra points of the multiplier on their average order), then the
    /// first listed. Returns it with the explanation the outbox row
    /// records.
    pub fn choose_offer(
        &self,
        kind: TriggerKind,
        tier: Option<&str>,
        profile: Option<&Profiled>,
        at: DateTime<Utc>,
    ) -> Option<(&OfferSettings, serde_json::Value)> {
        let day = at.date_naive();
        let segments = profile.and_then(|p| p.segments.as_deref());
        let features = profile.and_then(|p| p.features.as_ref());
        let aov = features.map_or(0.0, |f| f.aov);
        let rate = self
            .program
            .points_per_currency_unit
            .to_string()
            .parse::<f64>()
            .unwrap_or(0.0);
        let worth = |o: &OfferSettings| {
            let multiplier = o.multiplier.to_string().parse::<f64>().unwrap_or(1.0);
            o.bonus_points as f64 + (multiplier - 1.0) * aov * rate
        };
        let (index, offer, segment) = self
            .offers
            .iter()
            .enumerate()
            .filter(|(_, o)| o.triggers.is_empty() || o.triggers.contains(&kind))
            .filter(|(_, o)| {
                o.tiers.is_empty() || tier.is_some_and(|t| o.tiers.iter().any(|x| x == t))
            })
            .filter(|(_, o)| o.available_from.is_none_or(|from| day >= from))
            .filter(|(_, o)| o.available_until.is_none_or(|until| day <= until))
            .filter_map(|(i, o)| {
                if o.segments.is_empty() {
                    return Some((i, o, None));
                }
                let held = segments?;
                o.segments
                    .iter()
                    .find(|s| held.contains(s))
                    .map(|s| (i, o, Some(s.as_str())))
            })
            .max_by(|(ia, a, sa), (ib, b, sb)| {
                (a.priority, sa.is_some())
                    .cmp(&(b.priority, sb.is_some()))
                    .then(worth(a).total_cmp(&worth(b)))
                    .then(ib.cmp(ia))
            })?;
        let mut rule = format!(
            "offers[{index}] `{}`: priority {}",
            offer.code, offer.priority
        );
        if let Some(segment) = segment {
            rule.push_str(&format!(", segment `{segment}`"));
        }
        if profile.is_some_and(|p| p.segments.is_none()) {
            rule.push_str(", not personalised (the member objected to profiling)");
        }
        let mut why = crate::personalize::explanation(rule, segment, features);
        why["worth_points"] = json!((worth(offer) * 100.0).round() / 100.0);
        Some((offer, why))
    }

    /// Attaches the chosen offer to each trigger and grants it: the
    /// member's next purchase within its validity earns with it.
    /// `counts`: the members' counts if the caller has them.
    async fn offer(
        &self,
        db: &Db,
        fired: &mut [Fired],
        tiers: &HashMap<i64, Option<String>>,
        counts: Option<&HashMap<i64, crate::ledger::features::MemberCounts>>,
    ) -> Result<(), tokio_postgres::Error> {
        if self.offers.is_empty() || fired.is_empty() {
            return Ok(());
        }
        // The members' features and segments, as of each trigger: only
        // when segments are declared (offers can then depend on them).
        let loaded;
        let counts = match counts {
            _ if self.segments.is_empty() => {
                loaded = HashMap::new();
                &loaded
            }
            Some(counts) => counts,
            None => {
                let members: Vec<i64> = fired.iter().map(|f| f.member).collect();
                loaded = crate::ledger::features::counts(db, &members).await?;
                &loaded
            }
        };
        let cross_sell = &self.personalization.cross_sell;
        let recommending = self.personalization.enabled && cross_sell.top > 0;
        let opted_out = if recommending {
            let members: Vec<i64> = fired.iter().map(|f| f.member).collect();
            crate::ledger::features::opted_out(db, &members).await?
        } else {
            HashSet::new()
        };
        let mut grants = Vec::new();
        for trigger in fired.iter_mut() {
            let tier = tiers.get(&trigger.member).and_then(|t| t.as_deref());
            let profile = counts
                .get(&trigger.member)
                .map(|c| self.profile(c, trigger.occurred_at));
            let Some((offer, why)) =
                self.choose_offer(trigger.kind, tier, profile.as_ref(), trigger.occurred_at)
            else {
                continue;
            };
            let valid_until = trigger.occurred_at + chrono::Duration::days(offer.valid_days);
            // What members who buy what this member buys also buy (not
            // for a member who objected to profiling).
            let recommendations = if recommending && !opted_out.contains(&trigger.member) {
                crate::ledger::features::recommendations(
                    db,
                    trigger.member,
                    cross_sell.min_support,
                    cross_sell.top,
                )
                .await?
            } else {
                Vec::new()
            };
            trigger.offer = Some(json!({
                "code": offer.code,
                "title": offer.title,
                "description": offer.description,
                "multiplier": offer.multiplier.to_string(),
                "bonus_points": offer.bonus_points,
                "valid_until": valid_until,
                "why": why,
                "recommendations": recommendations,
            }));
            grants.push(Grant {
                member: trigger.member,
                occasion: trigger.occasion.clone(),
                code: offer.code.clone(),
                multiplier: offer.multiplier,
                bonus_points: offer.bonus_points,
                granted_at: trigger.occurred_at,
                valid_until,
            });
        }
        offers::grant(db, &self.program, &grants).await
    }

    /// What personalization knows of a member as of `at`: nothing for a
    /// member who objected to profiling.
    fn profile(
        &self,
        counts: &crate::ledger::features::MemberCounts,
        at: DateTime<Utc>,
    ) -> Profiled {
        if counts.profiling_opt_out {
            return Profiled::default();
        }
        let features = crate::personalize::Features::of(&counts.counts, &self.personalization, at);
        let (segments, problems) = self.segments.of(&features);
        for problem in problems {
            tracing::warn!(problem = %problem, "a segment rule could not be evaluated");
        }
        Profiled {
            features: Some(features),
            segments: Some(segments),
        }
    }

    /// Judges the segments of the members the batch touched (`counts`), as
    /// of their last change, records who entered and left, plans their
    /// next review (`reviewing`: the scheduler's, replacing the row it
    /// fired), and returns the `segment_entered` triggers of entries caused
    /// by live changes.
    async fn judge_segments(
        &self,
        db: &Db,
        members: &HashMap<i64, Touch>,
        counts: &HashMap<i64, crate::ledger::features::MemberCounts>,
        reviewing: bool,
    ) -> Result<Vec<Fired>, tokio_postgres::Error> {
        if self.segments.is_empty() || members.is_empty() {
            return Ok(Vec::new());
        }
        let mut entries = Vec::new();
        let mut departures = Vec::new();
        let mut reviews = Vec::new();
        for (member, counts) in counts {
            let Some(&touch) = members.get(member) else {
                continue;
            };
            let profile = self.profile(counts, touch.last);
            // Judged again when the stage changes with no purchase; at a
            // commit, only a review sooner by more than the slack is news
            // (see `plan_segment_reviews`), so a member with one is left
            // alone.
            let next = profile.features.as_ref().and_then(|_| {
                crate::personalize::Features::next_change(
                    &counts.counts,
                    &self.personalization,
                    touch.last,
                )
            });
            let news = match (next, counts.review_at) {
                _ if reviewing => true,
                (Some(next), Some(planned)) => next < planned - schedule::REVIEW_SLACK,
                (None, None) => false,
                _ => true,
            };
            if news {
                reviews.push((*member, next));
            }
            let now: HashSet<String> = profile
                .segments
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
            let before = &counts.segments;
            for segment in before.difference(&now) {
                departures.push((*member, segment.clone()));
            }
            for segment in now.difference(before) {
                entries.push(crate::ledger::features::Entry {
                    member: *member,
                    segment: segment.clone(),
                    at: touch.last,
                    features: profile
                        .features
                        .as_ref()
                        .map_or(serde_json::Value::Null, |f| f.to_json()),
                });
            }
        }
        let entered = crate::ledger::features::move_segments(db, entries, &departures).await?;
        schedule::plan_segment_reviews(db, &reviews, reviewing).await?;
        Ok(entered
            .into_iter()
            .filter(|e| members[&e.member].live && self.routed(TriggerKind::SegmentEntered))
            .map(|e| Fired {
                kind: TriggerKind::SegmentEntered,
                member: e.member,
                occasion: format!(
                    "segment:{}:member:{}:{}",
                    e.segment,
                    e.member,
                    e.at.timestamp()
                ),
                occurred_at: e.at,
                data: json!({ "segment": e.segment, "features": e.features }),
                offer: None,
            })
            .collect())
    }
}

/// What personalization knows of a member: nothing (`None`s) for a member
/// who objected to profiling.
#[derive(Debug, Clone, Default)]
pub struct Profiled {
    pub features: Option<crate::personalize::Features>,
    pub segments: Option<Vec<String>>,
}

/// What a batch did that may fire triggers, gathered while it books.
#[derive(Debug, Default)]
pub struct BatchFacts {
    /// Members the batch touched: whether a live change (not a snapshot)
    /// touched it, and the business time of the last one.
    members: HashMap<i64, Touch>,
    events: Vec<EventFact>,
    /// Lines of orders booked for the first time (features).
    purchases: Vec<crate::ledger::features::Purchase>,
}

#[derive(Debug)]
struct EventFact {
    kind: TriggerKind,
    member: i64,
    occasion: String,
    at: DateTime<Utc>,
    data: serde_json::Value,
}

/// How a batch touched a member: whether a live change did, and the
/// business times of its first and last change.
#[derive(Debug, Clone, Copy)]
pub struct Touch {
    pub live: bool,
    pub first: DateTime<Utc>,
    pub last: DateTime<Utc>,
}

impl BatchFacts {
    pub fn touched(&mut self, member: i64, live: bool, at: DateTime<Utc>) {
        let entry = self.members.entry(member).or_insert(Touch {
            live,
            first: at,
            last: at,
        });
        entry.live |= live;
        entry.first = entry.first.min(at);
        entry.last = entry.last.max(at);
    }

    /// A redemption booked by a live change.
    pub fn redeemed(
        &mut self,
        source: &str,
        member: i64,
        reference: &str,
        points: i64,
        at: DateTime<Utc>,
    ) {
        self.events.push(EventFact {
            kind: TriggerKind::Redemption,
            member,
            occasion: format!("redemption:{source}:{reference}"),
            at,
            data: json!({ "points": points, "redemption_ref": reference }),
        });
    }

    /// Points earned by an order booked by a live change.
    pub fn earned(
        &mut self,
        source: &str,
        member: i64,
        order_ref: &str,
        points: i64,
        at: DateTime<Utc>,
    ) {
        self.events.push(EventFact {
            kind: TriggerKind::PointsEarned,
            member,
            occasion: format!("points_earned:{source}:{order_ref}"),
            at,
            data: json!({ "points": points, "order_ref": order_ref }),
        });
    }

    /// A wishlisted product's price fell, announced by a live change. The
    /// occasion is the member, the product and the new price: the same
    /// drop is one message however many items or replays carry it.
    pub fn price_dropped(
        &mut self,
        source: &str,
        drop: crate::ledger::wishlists::PriceDrop,
        at: DateTime<Utc>,
    ) {
        let percent = drop.percent();
        self.events.push(EventFact {
            kind: TriggerKind::PriceDrop,
            member: drop.member,
            occasion: format!(
                "price_drop:{source}:{}:{}:member:{}",
                drop.product,
                drop.price.normalize(),
                drop.member
            ),
            at,
            data: json!({
                "product": drop.product,
                "sku": drop.sku,
                "price": drop.price.normalize().to_string(),
                "previous_price": drop.previous.normalize().to_string(),
                "drop_percent": percent.to_string().parse::<f64>().unwrap_or(0.0),
                "currency": drop.currency,
            }),
        });
    }

    /// An order with a member booked for the first time: its lines count
    /// for the member's features.
    pub fn purchased(&mut self, member: i64, at: DateTime<Utc>, lines: &[crate::normalize::Line]) {
        self.purchases.push(crate::ledger::features::Purchase {
            member,
            at,
            lines: lines.to_vec(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty() && self.events.is_empty() && self.purchases.is_empty()
    }
}

/// A trigger that fired.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub kind: TriggerKind,
    pub member: i64,
    pub occasion: String,
    pub occurred_at: DateTime<Utc>,
    pub data: serde_json::Value,
    /// The offer it carries, as the message shows it.
    pub offer: Option<serde_json::Value>,
}

/// Where a member stands now.
struct Standing {
    tier: Option<String>,
    lifetime: i64,
    purchases: i64,
}

/// Records the batch's marks and writes its triggers to the outbox, in
/// the open ledger transaction. Returns the triggers that fired.
pub async fn record(
    db: &Db,
    triggers: &Triggers,
    mut facts: BatchFacts,
) -> Result<Vec<Fired>, tokio_postgres::Error> {
    if facts.is_empty() {
        return Ok(Vec::new());
    }
    let member_ids: Vec<i64> = facts.members.keys().copied().collect();
    // The batch's products first: the members' features read them. Sent
    // together with the reads below, ahead of them (its statement is
    // prepared, so it goes out at once): the server runs them in order.
    let personalized = triggers.personalization.enabled;
    if personalized {
        crate::ledger::features::prepare_record_purchases(db).await?;
    }
    let purchases = async {
        if personalized {
            crate::ledger::features::record_purchases(db, &facts.purchases).await
        } else {
            Ok(())
        }
    };
    let judging = !triggers.segments.is_empty();
    // Three reads sent together (one round trip). Members merged into
    // another during the batch are left out: the survivor was touched too
    // (identity resolves to survivors).
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&member_ids];
    // Judging segments, the counts carry the standings too.
    let standings_in_counts = judging && triggers.personalization.enabled;
    let standings = async {
        if standings_in_counts {
            Ok(Vec::new())
        } else if triggers.personalization.enabled {
            // The orders not cancelled, as the features keep them.
            db.query(
                "SELECT m.member_id, m.tier, coalesce(b.lifetime, 0), coalesce(f.kept_orders, 0)::bigint
                   FROM members m LEFT JOIN balances b ON b.member_id = m.member_id
                   LEFT JOIN member_features f ON f.member_id = m.member_id
                  WHERE m.member_id = ANY($1) AND m.merged_into IS NULL",
                &params,
            )
            .await
        } else {
            db.query(
                "SELECT m.member_id, m.tier, coalesce(b.lifetime, 0),
                        (SELECT count(*) FROM orders o
                          WHERE o.member_id = m.member_id AND o.stage <> 'cancelled')
                   FROM members m LEFT JOIN balances b ON b.member_id = m.member_id
                  WHERE m.member_id = ANY($1) AND m.merged_into IS NULL",
                &params,
            )
            .await
        }
    };
    let ((), rows, marks, counts) = futures_util::try_join!(
        purchases,
        standings,
        db.query(
            "SELECT member_id, mark FROM trigger_marks WHERE member_id = ANY($1)",
            &params,
        ),
        async {
            if judging {
                crate::ledger::features::counts(db, &member_ids).await
            } else {
                Ok(HashMap::new())
            }
        },
    )?;
    let standings: HashMap<i64, Standing> = if standings_in_counts {
        counts
            .iter()
            .map(|(member, c)| {
                (
                    *member,
                    Standing {
                        tier: c.counts.tier.clone(),
                        lifetime: c.lifetime,
                        purchases: c.kept_orders,
                    },
                )
            })
            .collect()
    } else {
        rows.iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0),
                    Standing {
                        tier: r.get(1),
                        lifetime: r.get(2),
                        purchases: r.get(3),
                    },
                )
            })
            .collect()
    };
    let mut marks_held: HashMap<i64, HashSet<String>> = HashMap::new();
    for row in marks {
        marks_held.entry(row.get(0)).or_default().insert(row.get(1));
    }

    // New marks and the triggers they would fire.
    let mut new_marks: Vec<(i64, String, DateTime<Utc>, bool)> = Vec::new();
    let mut legacy_members: Vec<i64> = Vec::new();
    let mut candidates: BTreeMap<(i64, String), Fired> = BTreeMap::new();
    let rank = |tier: &str| self_rank(&triggers.tiers, tier);
    for (&member, standing) in &standings {
        let touch = facts.members[&member];
        let at = touch.last;
        let held = marks_held.remove(&member).unwrap_or_default();
        // A member from before triggers existed (marked `legacy` by the
        // migration): what it has reached is history, marked silently.
        let legacy = held.contains("legacy");
        if legacy {
            legacy_members.push(member);
        }
        let live = touch.live && !legacy;
        // `fires`: whether reaching this mark is news worth a message.
        let mut reach = |mark: String, kind: TriggerKind, data: serde_json::Value, fires: bool| {
            if held.contains(&mark) {
                return;
            }
            let live = live && fires;
            if live {
                candidates.insert(
                    (member, mark.clone()),
                    Fired {
                        kind,
                        member,
                        occasion: format!("{mark}:member:{member}"),
                        occurred_at: at,
                        data,
                        offer: None,
                    },
                );
            }
            new_marks.push((member, mark, at, live));
        };
        reach("welcome".into(), TriggerKind::Welcome, json!({}), true);
        if let Some(tier) = &standing.tier {
            let previous = held
                .iter()
                .filter_map(|m| m.strip_prefix("tier:"))
                .max_by_key(|t| rank(t))
                .map(str::to_string);
            // The entry tier (threshold 0) is where members start, not an
            // upgrade: marked silently, so a later upgrade knows where it
            // came from.
            reach(
                format!("tier:{tier}"),
                TriggerKind::TierUpgrade,
                json!({ "tier": tier, "previous_tier": previous }),
                rank(tier) > 0,
            );
        }
        for &n in &triggers.milestones.purchases {
            if standing.purchases >= n {
                reach(
                    format!("milestone:purchases:{n}"),
                    TriggerKind::Milestone,
                    json!({ "milestone": "purchases", "value": n }),
                    true,
                );
            }
        }
        for &n in &triggers.milestones.lifetime_points {
            if standing.lifetime >= n {
                reach(
                    format!("milestone:lifetime_points:{n}"),
                    TriggerKind::Milestone,
                    json!({ "milestone": "lifetime_points", "value": n }),
                    true,
                );
            }
        }
    }

    // Marks are written once: only the ones this statement inserted fire
    // (another writer that got there first fired them).
    let mut fired: Vec<Fired> = Vec::new();
    if !new_marks.is_empty() {
        let members: Vec<i64> = new_marks.iter().map(|m| m.0).collect();
        let marks: Vec<&str> = new_marks.iter().map(|m| m.1.as_str()).collect();
        let ats: Vec<DateTime<Utc>> = new_marks.iter().map(|m| m.2).collect();
        let announced: Vec<bool> = new_marks.iter().map(|m| m.3).collect();
        let inserted = db
            .query(
                "INSERT INTO trigger_marks (member_id, mark, reached_at, announced)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::bool[])
                 ON CONFLICT DO NOTHING
                 RETURNING member_id, mark",
                &[&members, &marks, &ats, &announced],
            )
            .await?;
        for row in inserted {
            let mark: String = row.get(1);
            if let Some(mut trigger) = candidates.remove(&(row.get(0), mark.clone())) {
                // When, in business time, the member reached it: the batch
                // may hold several of the member's changes, and what the
                // trigger grants (an offer for the next purchase) must not
                // depend on where batches end.
                // Never before the member's first change in this batch: a
                // mark reached long ago (merged histories, a threshold
                // added to the configuration) is news now, and an offer it
                // grants looks forward.
                if let Some(at) = reached_at(db, triggers, trigger.member, &mark).await? {
                    let first = facts.members[&trigger.member].first;
                    trigger.occurred_at = at.max(first);
                }
                fired.push(trigger);
            }
        }
    }
    if !legacy_members.is_empty() {
        db.execute(
            "DELETE FROM trigger_marks WHERE mark = 'legacy' AND member_id = ANY($1)",
            &[&legacy_members],
        )
        .await?;
    }
    fired.extend(
        triggers
            .judge_segments(db, &facts.members, &counts, false)
            .await?,
    );
    schedule::plan_replenishment(db, triggers, &facts.purchases).await?;
    fired.extend(facts.events.drain(..).map(|e| Fired {
        kind: e.kind,
        member: e.member,
        occasion: e.occasion,
        occurred_at: e.at,
        data: e.data,
        offer: None,
    }));
    let tiers: HashMap<i64, Option<String>> = standings
        .iter()
        .map(|(member, standing)| (*member, standing.tier.clone()))
        .collect();
    triggers
        .offer(db, &mut fired, &tiers, Some(&counts))
        .await?;

    outbox::enqueue(db, &messages(triggers, &fired)).await?;
    schedule::maintain(db, triggers, &facts.members).await?;
    Ok(fired)
}

/// The source time at which a member reached `mark`: the purchase that
/// made the nth, the entry that took qualifying points to a tier's or
/// lifetime points to a milestone's threshold, or the member's creation
/// (welcome).
async fn reached_at(
    db: &Db,
    triggers: &Triggers,
    member: i64,
    mark: &str,
) -> Result<Option<DateTime<Utc>>, tokio_postgres::Error> {
    if mark == "welcome" {
        // Enrollment: when the member was created (source time).
        return Ok(db
            .query_opt(
                "SELECT created_at FROM members WHERE member_id = $1",
                &[&member],
            )
            .await?
            .map(|r| r.get(0)));
    }
    let threshold = if let Some(tier) = mark.strip_prefix("tier:") {
        triggers
            .tiers
            .iter()
            .find(|t| t.name == tier)
            .map(|t| t.threshold)
    } else if let Some(points) = mark.strip_prefix("milestone:lifetime_points:") {
        points.parse::<i64>().ok()
    } else if let Some(n) = mark.strip_prefix("milestone:purchases:") {
        let Ok(n) = n.parse::<i64>() else {
            return Ok(None);
        };
        return Ok(db
            .query_opt(
                "SELECT placed_at FROM orders
                  WHERE member_id = $1 AND stage <> 'cancelled'
                  ORDER BY placed_at, source, order_ref
                 OFFSET $2 LIMIT 1",
                &[&member, &(n - 1).max(0)],
            )
            .await?
            .map(|r| r.get(0)));
    } else {
        None
    };
    let Some(threshold) = threshold else {
        return Ok(None);
    };
    // A tier counts the points of the current qualification period (all
    // of them when tiers follow lifetime points); a milestone, lifetime.
    let in_period = mark.starts_with("tier:");
    Ok(db
        .query_opt(
            "SELECT occurred_at FROM (
                 SELECT occurred_at, entry_id,
                        sum(points) OVER (ORDER BY occurred_at, entry_id) AS running
                   FROM ledger_entries
                  WHERE member_id = $1 AND kind IN ('earn_available', 'clawback')
                    AND (NOT $3 OR occurred_at >= coalesce(
                            (SELECT qualifying_since FROM balances WHERE member_id = $1), '-infinity'))
             ) running
             WHERE running >= $2::bigint
             ORDER BY occurred_at, entry_id
             LIMIT 1",
            &[&member, &threshold, &in_period],
        )
        .await?
        .map(|r| r.get(0)))
}

/// One outbox row per route configured for each trigger.
fn messages(triggers: &Triggers, fired: &[Fired]) -> Vec<NewMessage> {
    fired
        .iter()
        .flat_map(|trigger| {
            triggers
                .routes
                .get(&trigger.kind)
                .into_iter()
                .flatten()
                .map(move |route| NewMessage {
                    dedupe_key: format!("{}:{}", trigger.occasion, route.name),
                    member: trigger.member,
                    trigger: trigger.kind.as_str(),
                    route: route.name.clone(),
                    provider: route.provider.clone(),
                    channel: route.channel,
                    occurred_at: trigger.occurred_at,
                    payload: json!({
                        "trigger": {
                            "kind": trigger.kind.as_str(),
                            "occurred_at": trigger.occurred_at,
                            "data": trigger.data,
                        },
                        "offer": trigger.offer,
                    }),
                })
        })
        .collect()
}

/// A tier's rank: 0 for the entry tier, −1 for a tier no longer
/// configured.
fn self_rank(tiers: &[TierSettings], tier: &str) -> i64 {
    tiers
        .iter()
        .position(|t| t.name == tier)
        .map_or(-1, |i| i as i64)
}

impl Triggers {
    /// Whether the ledger keeps features (`[personalization] enabled`):
    /// the lines of purchases are gathered only then.
    pub fn keeps_features(&self) -> bool {
        self.personalization.enabled
    }

    /// How far a wishlisted product's price must fall to be news, in
    /// percent.
    pub fn min_drop_percent(&self) -> rust_decimal::Decimal {
        self.price_drop.min_drop_percent
    }

    /// Whether earned points are routed anywhere (they are gathered only
    /// then: most programs leave them out).
    pub fn wants_points_earned(&self) -> bool {
        self.routed(TriggerKind::PointsEarned)
    }
}
