//! Personalization: what a member's purchases say about them (features),
//! the scores derived from them (RFM, probability alive, lifecycle stage)
//! and the segments declared over them in configuration.
//!
//! - `model.rs`: the probability that a member is still active, from their
//!   own purchase history (MBG/NBD).
//! - this file: [`PersonalizationSettings`], [`Features`] and the
//!   segments ([`Segments`]).
//!
//! The raw counts are kept in the ledger transaction (`ledger::features`);
//! everything here is computed from them, as of a business time, so a
//! replay decides the same. A member who opted out of profiling is not
//! scored and in no segment.

pub mod model;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::normalize::expr::{Expr, Scope};

/// `[personalization]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonalizationSettings {
    /// Keep features and judge segments (default true). Off, the ledger
    /// keeps no features at all (a points-only program pays nothing for
    /// them) and forgets those it had; turned on again, the order part is
    /// counted again from the orders at start.
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// The population parameters of the probability-alive model.
    #[serde(default)]
    pub model: model::ModelParameters,
    /// A member whose first purchase is more recent than this is `new`
    /// (default 60 days).
    #[serde(default = "default_new_days")]
    pub new_days: i64,
    /// Probability alive below this: `at_risk` (default 0.5).
    #[serde(default = "default_at_risk_below")]
    pub at_risk_below: f64,
    /// Probability alive below this: `lapsed` (default 0.2).
    #[serde(default = "default_lapsed_below")]
    pub lapsed_below: f64,
    /// RFM score breakpoints.
    #[serde(default)]
    pub rfm: RfmSettings,
    /// When `replenishment_due` comes.
    #[serde(default)]
    pub replenishment: ReplenishmentSettings,
    /// What an offer recommends.
    #[serde(default)]
    pub cross_sell: CrossSellSettings,
}

/// `[personalization.cross_sell]`: the products an offer recommends
/// (`offer.recommendations`), by lift over what the member buys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossSellSettings {
    /// At most this many (default 3; 0: none).
    #[serde(default = "default_top")]
    pub top: i64,
    /// Pairs bought by fewer members than this are not trusted (default 2).
    #[serde(default = "default_min_support")]
    pub min_support: i64,
}

impl Default for CrossSellSettings {
    fn default() -> Self {
        Self {
            top: default_top(),
            min_support: default_min_support(),
        }
    }
}

fn default_top() -> i64 {
    3
}

fn default_min_support() -> i64 {
    2
}

/// `[personalization.replenishment]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplenishmentSettings {
    /// Purchases of a product before its rhythm counts (default 3: two
    /// intervals).
    #[serde(default = "default_min_purchases")]
    pub min_purchases: i64,
    /// Days before the next purchase is expected that the reminder comes
    /// (default 2: buys every 30 days → reminded on day 28).
    #[serde(default = "default_days_before")]
    pub days_before: i64,
}

impl Default for ReplenishmentSettings {
    fn default() -> Self {
        Self {
            min_purchases: default_min_purchases(),
            days_before: default_days_before(),
        }
    }
}

fn default_min_purchases() -> i64 {
    3
}

fn default_days_before() -> i64 {
    2
}

impl Default for PersonalizationSettings {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            model: model::ModelParameters::default(),
            new_days: default_new_days(),
            at_risk_below: default_at_risk_below(),
            lapsed_below: default_lapsed_below(),
            rfm: RfmSettings::default(),
            replenishment: ReplenishmentSettings::default(),
            cross_sell: CrossSellSettings::default(),
        }
    }
}

fn default_enabled() -> bool {
    true
}

fn default_new_days() -> i64 {
    60
}

fn default_at_risk_below() -> f64 {
    0.5
}

fn default_lapsed_below() -> f64 {
    0.2
}

/// `[personalization.rfm]`: four ascending breakpoints per dimension give
/// scores 1 to 5.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RfmSettings {
    /// Days since the last purchase: at most the first → 5, … beyond the
    /// last → 1 (default 30, 90, 180, 365).
    #[serde(default = "default_recency_days")]
    pub recency_days: [f64; 4],
    /// Purchases: at least the last → 5, … below the first → 1 (default
    /// 2, 4, 8, 16).
    #[serde(default = "default_frequency")]
    pub frequency: [f64; 4],
    /// Spend (earn basis, after refunds), likewise (default 100, 250, 500,
    /// 1000).
    #[serde(default = "default_monetary")]
    pub monetary: [f64; 4],
}

impl Default for RfmSettings {
    fn default() -> Self {
        Self {
            recency_days: default_recency_days(),
            frequency: default_frequency(),
            monetary: default_monetary(),
        }
    }
}

fn default_recency_days() -> [f64; 4] {
    [30.0, 90.0, 180.0, 365.0]
}

fn default_frequency() -> [f64; 4] {
    [2.0, 4.0, 8.0, 16.0]
}

fn default_monetary() -> [f64; 4] {
    [100.0, 250.0, 500.0, 1000.0]
}

impl PersonalizationSettings {
    /// `(key, message)` for each value that cannot work.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.new_days < 0 {
            problems.push((
                "personalization.new_days".into(),
                "use 0 or more days (default 60)".into(),
            ));
        }
        if !(0.0 < self.lapsed_below
            && self.lapsed_below < self.at_risk_below
            && self.at_risk_below < 1.0)
        {
            problems.push((
                "personalization.at_risk_below".into(),
                format!(
                    "need 0 < lapsed_below ({}) < at_risk_below ({}) < 1 (defaults 0.2 and 0.5)",
                    self.lapsed_below, self.at_risk_below
                ),
            ));
        }
        for (name, points) in [
            ("recency_days", self.rfm.recency_days),
            ("frequency", self.rfm.frequency),
            ("monetary", self.rfm.monetary),
        ] {
            if points.windows(2).any(|w| w[0] >= w[1]) || points[0] < 0.0 {
                problems.push((
                    format!("personalization.rfm.{name}"),
                    format!("{points:?} must be four ascending numbers, 0 or more"),
                ));
            }
        }
        if self.cross_sell.top < 0 || self.cross_sell.min_support < 1 {
            problems.push((
                "personalization.cross_sell".into(),
                "top must be 0 or more and min_support 1 or more (defaults 3 and 2)".into(),
            ));
        }
        if self.replenishment.min_purchases < 2 {
            problems.push((
                "personalization.replenishment.min_purchases".into(),
                "use 2 or more: a rhythm needs at least one interval (default 3)".into(),
            ));
        }
        if self.replenishment.days_before < 0 {
            problems.push((
                "personalization.replenishment.days_before".into(),
                "use 0 or more days (default 2)".into(),
            ));
        }
        problems.extend(
            self.model
                .problems()
                .into_iter()
                .map(|(key, message)| (format!("personalization.model.{key}"), message)),
        );
        problems
    }
}

/// One `[[segments]]` entry: members for whom `when` holds are in it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSettings {
    /// `a-z`, `0-9` and `_`, e.g. `price_sensitive`.
    pub name: String,
    /// CEL over `features` (see the README's feature list), e.g.
    /// `features.discount_share >= 0.5 && features.purchases >= 3`.
    pub when: String,
    /// Compiled by validation.
    #[serde(skip)]
    pub compiled: Option<std::sync::Arc<Expr>>,
}

impl Clone for SegmentSettings {
    fn clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            when: self.when.clone(),
            compiled: self.compiled.clone(),
        }
    }
}

/// The raw counts the ledger keeps for a member (`member_features`,
/// `member_products`), as of the last booked change.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub purchases: i64,
    pub monetary: Decimal,
    pub first_purchase_at: Option<DateTime<Utc>>,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub pos_purchases: i64,
    pub web_purchases: i64,
    pub app_purchases: i64,
    pub line_spend: Decimal,
    pub discounted_spend: Decimal,
    /// The category (or product, where the mapping gives none) the member
    /// spent most on, and that spend.
    pub top_category: Option<(String, Decimal)>,
    pub tier: Option<String>,
}

/// Where a member is in their life with the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    New,
    Active,
    AtRisk,
    Lapsed,
}

impl Lifecycle {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Active => "active",
            Self::AtRisk => "at_risk",
            Self::Lapsed => "lapsed",
        }
    }
}

/// A member's features as of a time: what segments and offers are judged
/// by, and what an outbox row records as the reason for its offer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Features {
    pub purchases: i64,
    /// Spend (earn basis after refunds), in the orders' currency.
    pub monetary: f64,
    /// Average order value.
    pub aov: f64,
    /// Days since the last purchase (none: never bought).
    pub recency_days: Option<f64>,
    /// Days since the first purchase.
    pub tenure_days: Option<f64>,
    /// Share of line spend on discounted lines (0 to 1): price sensitivity.
    pub discount_share: f64,
    /// The category (or product) the member spends most on, and its share
    /// of line spend (0 to 1): brand or category enthusiasm.
    pub top_category: Option<String>,
    pub top_category_share: f64,
    /// Shares of purchases by channel (0 to 1).
    pub pos_share: f64,
    pub web_share: f64,
    pub app_share: f64,
    /// RFM scores, 1 to 5 each.
    pub recency_score: i64,
    pub frequency_score: i64,
    pub monetary_score: i64,
    /// Probability that the member is still active (MBG/NBD).
    pub p_alive: f64,
    pub lifecycle: Lifecycle,
    pub tier: Option<String>,
}

fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (part / whole).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn decimal(value: Decimal) -> f64 {
    value.to_f64().unwrap_or(0.0)
}

/// Score 1 to 5: how many of the ascending `points` `value` reaches, plus 1.
fn score_up(value: f64, points: &[f64; 4]) -> i64 {
    1 + points.iter().filter(|p| value >= **p).count() as i64
}

impl Features {
    /// The features of a member with these counts, as of `at`.
    pub fn of(counts: &Counts, settings: &PersonalizationSettings, at: DateTime<Utc>) -> Self {
        let days = |t: DateTime<Utc>| ((at - t).num_seconds() as f64 / 86_400.0).max(0.0);
        let recency_days = counts.last_purchase_at.map(days);
        let tenure_days = counts.first_purchase_at.map(days);
        let purchases = counts.purchases.max(0);
        let monetary = decimal(counts.monetary);
        let line_spend = decimal(counts.line_spend);
        let p_alive = match (counts.first_purchase_at, counts.last_purchase_at) {
            (Some(first), Some(last)) if purchases > 0 => settings.model.p_alive(
                (purchases - 1) as f64,
                ((last - first).num_seconds() as f64 / 86_400.0).max(0.0),
                days(first),
            ),
            _ => 1.0,
        };
        let lifecycle = match tenure_days {
            None => Lifecycle::New,
            Some(tenure) if tenure < settings.new_days as f64 => Lifecycle::New,
            _ if p_alive >= settings.at_risk_below => Lifecycle::Active,
            _ if p_alive >= settings.lapsed_below => Lifecycle::AtRisk,
            _ => Lifecycle::Lapsed,
        };
        let rfm = &settings.rfm;
        Self {
            purchases,
            monetary,
            aov: if purchases > 0 {
                monetary / purchases as f64
            } else {
                0.0
            },
            recency_days,
            tenure_days,
            discount_share: share(decimal(counts.discounted_spend), line_spend),
            top_category: counts.top_category.as_ref().map(|(c, _)| c.clone()),
            top_category_share: counts
                .top_category
                .as_ref()
                .map_or(0.0, |(_, spend)| share(decimal(*spend), line_spend)),
            pos_share: share(counts.pos_purchases as f64, purchases as f64),
            web_share: share(counts.web_purchases as f64, purchases as f64),
            app_share: share(counts.app_purchases as f64, purchases as f64),
            // Recency scores down: the more days, the lower (never bought: 1).
            recency_score: recency_days.map_or(1, |d| {
                5 - rfm.recency_days.iter().filter(|p| d > **p).count() as i64
            }),
            frequency_score: score_up(purchases as f64, &rfm.frequency),
            monetary_score: score_up(monetary, &rfm.monetary),
            p_alive,
            lifecycle,
            tier: counts.tier.clone(),
        }
    }

    /// The first time after `after` that the lifecycle stage of a member
    /// with these counts changes without a purchase: the end of `new`, and
    /// the days probability alive falls below `at_risk_below` and
    /// `lapsed_below`. None for a member who never bought (new until then)
    /// or already lapsed.
    pub fn next_change(
        counts: &Counts,
        settings: &PersonalizationSettings,
        after: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let (Some(first), Some(last)) = (counts.first_purchase_at, counts.last_purchase_at) else {
            return None;
        };
        if counts.purchases < 1 {
            return None;
        }
        let repeat = (counts.purchases - 1) as f64;
        let last_at = ((last - first).num_seconds() as f64 / 86_400.0).max(0.0);
        let at_age =
            |days: f64| first + chrono::Duration::seconds((days * 86_400.0).round() as i64);
        [
            first + chrono::Duration::days(settings.new_days),
            at_age(
                settings
                    .model
                    .age_at(settings.at_risk_below, repeat, last_at),
            ),
            at_age(
                settings
                    .model
                    .age_at(settings.lapsed_below, repeat, last_at),
            ),
        ]
        .into_iter()
        .filter(|t| *t > after)
        .min()
    }

    /// As segment rules see them (built directly: a rule is judged for
    /// every member a batch touches).
    pub fn to_cel(&self) -> cel::Value {
        self.to_cel_only(None)
    }

    /// As a rule that reads only `names` sees them (all with `None`): CEL
    /// converts a map variable entry by entry at every evaluation, so a
    /// rule is handed what it reads.
    pub fn to_cel_only(&self, names: Option<&[String]>) -> cel::Value {
        crate::normalize::expr::named_map(self.cel_entries(names))
    }

    /// The features (only `names`' when given) as CEL values.
    fn cel_entries(&self, names: Option<&[String]>) -> Vec<(&'static str, cel::Value)> {
        use cel::Value as Cel;
        use std::sync::Arc;
        let text = |t: &Option<String>| {
            t.as_ref()
                .map_or(Cel::Null, |t| Cel::String(Arc::new(t.clone())))
        };
        let days = |d: Option<f64>| d.map_or(Cel::Null, Cel::Float);
        let mut entries = vec![
            ("purchases", Cel::Int(self.purchases)),
            ("monetary", Cel::Float(self.monetary)),
            ("aov", Cel::Float(self.aov)),
            ("recency_days", days(self.recency_days)),
            ("tenure_days", days(self.tenure_days)),
            ("discount_share", Cel::Float(self.discount_share)),
            ("top_category", text(&self.top_category)),
            ("top_category_share", Cel::Float(self.top_category_share)),
            ("pos_share", Cel::Float(self.pos_share)),
            ("web_share", Cel::Float(self.web_share)),
            ("app_share", Cel::Float(self.app_share)),
            ("recency_score", Cel::Int(self.recency_score)),
            ("frequency_score", Cel::Int(self.frequency_score)),
            ("monetary_score", Cel::Int(self.monetary_score)),
            ("p_alive", Cel::Float(self.p_alive)),
            (
                "lifecycle",
                Cel::String(Arc::new(self.lifecycle.as_str().to_string())),
            ),
            ("tier", text(&self.tier)),
        ];
        if let Some(names) = names {
            entries.retain(|(name, _)| names.iter().any(|n| n == name));
        }
        entries
    }

    /// As JSON records them: numbers rounded to 4 decimals (what an
    /// outbox row records stays readable), the lifecycle as text.
    pub fn to_json(&self) -> serde_json::Value {
        let round = |x: f64| (x * 10_000.0).round() / 10_000.0;
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            for (_, v) in map.iter_mut() {
                if let Some(x) = v.as_f64().filter(|_| v.is_f64()) {
                    *v = serde_json::json!(round(x));
                }
            }
        }
        value
    }
}

/// The configured segments, compiled.
#[derive(Debug, Clone, Default)]
pub struct Segments {
    segments: Vec<SegmentSettings>,
    /// Per segment, the features its rule reads (`None`: the whole map).
    reads: Vec<Option<Vec<String>>>,
    /// Verdicts of rules that read only whole numbers, text and flags
    /// (`features.lifecycle == 'at_risk'`, `features.purchases >= 3`), by
    /// rule and the values read: a rule is a pure function of what it
    /// reads, such values repeat across members, and evaluating CEL is
    /// most of the time spent judging a member.
    verdicts: std::sync::Arc<std::sync::Mutex<Verdicts>>,
}

/// A rule's verdict (or why it could not be evaluated), by rule index and
/// the values it read.
type Verdicts = HashMap<(usize, String), Result<bool, String>>;

/// Verdicts kept (the bound on the memo's memory: it starts over).
const VERDICTS_KEPT: usize = 4_096;

/// The values a rule reads as a memo key, when none is a float (floats
/// rarely repeat: keying on them would only fill the memo).
fn verdict_key(entries: &[(&'static str, cel::Value)]) -> Option<String> {
    use std::fmt::Write;
    let mut key = String::new();
    for (_, value) in entries {
        match value {
            cel::Value::Int(i) => write!(key, "i{i};"),
            cel::Value::UInt(u) => write!(key, "u{u};"),
            cel::Value::Bool(b) => write!(key, "b{b};"),
            cel::Value::Null => write!(key, "n;"),
            cel::Value::String(text) => write!(key, "s{}:{text};", text.len()),
            _ => return None,
        }
        .ok()?;
    }
    Some(key)
}

impl Segments {
    pub fn new(segments: &[SegmentSettings]) -> Self {
        let segments: Vec<SegmentSettings> = segments
            .iter()
            .filter(|s| s.compiled.is_some())
            .cloned()
            .collect();
        let reads = segments
            .iter()
            .map(|s| {
                let rule = s.compiled.as_ref()?;
                (!rule.uses_whole("features")).then(|| rule.columns_of("features"))
            })
            .collect();
        Self {
            segments,
            reads,
            verdicts: Default::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// The segments a member with these features is in, in configuration
    /// order. A rule that cannot be evaluated for this member (a null
    /// feature compared with a number) leaves it out of that segment, with
    /// the reason, which names the rule, never a value.
    pub fn of(&self, features: &Features) -> (Vec<String>, Vec<String>) {
        let mut member_of = Vec::new();
        let mut problems = Vec::new();
        // Every feature once per member; each rule takes what it reads
        // (the values are cheap to clone: text is shared).
        let all = features.cel_entries(None);
        for (index, (segment, reads)) in self.segments.iter().zip(&self.reads).enumerate() {
            let Some(rule) = &segment.compiled else {
                continue;
            };
            let entries: Vec<(&'static str, cel::Value)> = match reads {
                Some(names) => all
                    .iter()
                    .filter(|(name, _)| names.iter().any(|n| n == name))
                    .cloned()
                    .collect(),
                None => all.clone(),
            };
            let key = reads
                .as_ref()
                .and_then(|_| verdict_key(&entries))
                .map(|values| (index, values));
            let known = key.as_ref().and_then(|key| {
                self.verdicts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(key)
                    .cloned()
            });
            let verdict = known.unwrap_or_else(|| {
                let mut scope = Scope::default();
                scope.set("features", crate::normalize::expr::named_map(entries));
                let verdict = rule.test(&scope).map_err(|error| error.to_string());
                if let Some(key) = key {
                    let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
                    if verdicts.len() >= VERDICTS_KEPT {
                        verdicts.clear();
                    }
                    verdicts.insert(key, verdict.clone());
                }
                verdict
            });
            match verdict {
                Ok(true) => member_of.push(segment.name.clone()),
                Ok(false) => {}
                Err(error) => problems.push(format!("segment `{}`: {error}", segment.name)),
            }
        }
        (member_of, problems)
    }
}

/// The explanation an outbox row records for its offer: the rule and the
/// features that chose it.
pub fn explanation(
    rule: String,
    segment: Option<&str>,
    features: Option<&Features>,
) -> serde_json::Value {
    let mut why = BTreeMap::new();
    why.insert("rule", serde_json::json!(rule));
    if let Some(segment) = segment {
        why.insert("segment", serde_json::json!(segment));
    }
    match features {
        Some(features) => why.insert("features", features.to_json()),
        None => why.insert("features", serde_json::Value::Null),
    };
    serde_json::json!(why)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::days(day as i64)
    }

    #[test]
    fn features_of_a_small_history_match_the_hand_computation() {
        // Four purchases on days 0, 30, 60, 90, 400 spent in all, 100 of the
        // 400 on discounted lines, 300 in coffee; three at the till.
        let counts = Counts {
            purchases: 4,
            monetary: Decimal::new(400, 0),
            first_purchase_at: Some(at(0)),
            last_purchase_at: Some(at(90)),
            pos_purchases: 3,
            web_purchases: 1,
            app_purchases: 0,
            line_spend: Decimal::new(400, 0),
            discounted_spend: Decimal::new(100, 0),
            top_category: Some(("coffee".into(), Decimal::new(300, 0))),
            tier: Some("silver".into()),
        };
        let f = Features::of(&counts, &PersonalizationSettings::default(), at(100));
        assert_eq!(f.aov, 100.0);
        assert_eq!(f.recency_days, Some(10.0));
        assert_eq!(f.tenure_days, Some(100.0));
        assert_eq!(f.discount_share, 0.25);
        assert_eq!(f.top_category_share, 0.75);
        assert_eq!((f.pos_share, f.web_share, f.app_share), (0.75, 0.25, 0.0));
        // Recency 10 days ≤ 30 → 5; 4 purchases reach 2 and 4 → 3; 400
        // reaches 100 and 250 → 3.
        assert_eq!(
            (f.recency_score, f.frequency_score, f.monetary_score),
            (5, 3, 3)
        );
        assert_eq!(f.lifecycle, Lifecycle::Active);
        let expected = PersonalizationSettings::default()
            .model
            .p_alive(3.0, 90.0, 100.0);
        assert_eq!(f.p_alive, expected);
    }

    #[test]
    fn lifecycle_follows_the_members_own_rhythm() {
        let settings = PersonalizationSettings::default();
        // Every 30 days for 150 days.
        let counts = Counts {
            purchases: 6,
            monetary: Decimal::new(600, 0),
            first_purchase_at: Some(at(0)),
            last_purchase_at: Some(at(150)),
            ..Counts::default()
        };
        let stage = |day| Features::of(&counts, &settings, at(day)).lifecycle;
        assert_eq!(stage(160), Lifecycle::Active);
        assert_eq!(stage(260), Lifecycle::AtRisk);
        assert_eq!(stage(400), Lifecycle::Lapsed);
        // A first purchase 10 days ago: new.
        let newcomer = Counts {
            purchases: 1,
            first_purchase_at: Some(at(90)),
            last_purchase_at: Some(at(90)),
            ..Counts::default()
        };
        assert_eq!(
            Features::of(&newcomer, &settings, at(100)).lifecycle,
            Lifecycle::New
        );
    }

    #[test]
    fn a_rule_may_compare_a_decimal_feature_with_a_whole_number() {
        let rule = Expr::compile("features.monetary >= 1000 && features.purchases >= 2.0").unwrap();
        let mut scope = Scope::default();
        let counts = Counts {
            purchases: 2,
            monetary: Decimal::new(1500, 0),
            first_purchase_at: Some(at(0)),
            last_purchase_at: Some(at(20)),
            ..Counts::default()
        };
        let features = Features::of(&counts, &PersonalizationSettings::default(), at(30));
        scope.set("features", features.to_cel());
        assert!(rule.test(&scope).unwrap());
    }

    #[test]
    fn segments_are_judged_by_their_rules() {
        let settings = vec![
            SegmentSettings {
                name: "price_sensitive".into(),
                when: "features.discount_share >= 0.5 && features.purchases >= 3".into(),
                compiled: None,
            },
            SegmentSettings {
                name: "enthusiast".into(),
                when: "features.top_category_share >= 0.6".into(),
                compiled: None,
            },
        ]
        .into_iter()
        .map(|mut s| {
            s.compiled = Some(std::sync::Arc::new(Expr::compile(&s.when).unwrap()));
            s
        })
        .collect::<Vec<_>>();
        let segments = Segments::new(&settings);
        let counts = Counts {
            purchases: 3,
            monetary: Decimal::new(90, 0),
            first_purchase_at: Some(at(0)),
            last_purchase_at: Some(at(20)),
            line_spend: Decimal::new(90, 0),
            discounted_spend: Decimal::new(60, 0),
            top_category: Some(("tea".into(), Decimal::new(30, 0))),
            ..Counts::default()
        };
        let features = Features::of(&counts, &PersonalizationSettings::default(), at(30));
        assert_eq!(
            segments.of(&features),
            (vec!["price_sensitive".to_string()], Vec::<String>::new())
        );
    }

    #[test]
    fn remembered_verdicts_are_the_rules_own() {
        let settings = [
            (
                "regular",
                "features.purchases >= 3 && features.lifecycle != 'lapsed'",
            ),
            ("silver", "features.tier == 'silver'"),
            ("mid_tier", "features.tier > 3"),
        ]
        .into_iter()
        .map(|(name, when)| SegmentSettings {
            name: name.into(),
            when: when.into(),
            compiled: Some(std::sync::Arc::new(Expr::compile(when).unwrap())),
        })
        .collect::<Vec<_>>();
        let segments = Segments::new(&settings);
        let member = |purchases: i64, tier: Option<&str>| {
            let counts = Counts {
                purchases,
                first_purchase_at: Some(at(0)),
                last_purchase_at: Some(at(20)),
                tier: tier.map(str::to_string),
                ..Counts::default()
            };
            Features::of(&counts, &PersonalizationSettings::default(), at(30))
        };
        // Each member twice: the second time from the memo, the same.
        for _ in 0..2 {
            let (regular, problems) = segments.of(&member(3, Some("silver")));
            assert_eq!(regular, ["regular", "silver"]);
            assert_eq!(
                problems.len(),
                1,
                "text compared with a number: {problems:?}"
            );
            assert!(
                problems[0].starts_with("segment `mid_tier`: "),
                "{problems:?}"
            );
            assert_eq!(segments.of(&member(2, Some("silver"))).0, ["silver"]);
            assert_eq!(segments.of(&member(5, None)).0, ["regular"]);
        }
        // Kept by rule and the values it reads: the two silver members
        // share their tier rules' verdicts.
        assert_eq!(segments.verdicts.lock().unwrap().len(), 3 + 1 + 3);
    }
}
