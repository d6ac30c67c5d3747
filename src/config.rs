//! Typed configuration: one TOML file plus `LOYALTY__SECTION__KEY`
//! environment overrides, checked before anything connects.
//!
//! Loading has two stages, and both report the file and the key:
//! 1. the `config` crate merges the file and the environment and serde
//!    deserializes the result into [`Settings`]; every struct denies unknown
//!    fields, so a typo is an error, never a silently ignored key;
//! 2. [`Settings::validate`] checks what types cannot say (URLs match their
//!    source kind, names are unique and usable as slot names, routes point at
//!    configured providers, secrets resolve) and reports *every* problem with
//!    its fix, not only the first.
//!
//! The doc comments on the fields below are the user documentation of the
//! configuration (README.md copies them); keep them true.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use url::Url;

use crate::source::SourceKind;

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "loyalty-cdc.toml";

/// Prefix of environment overrides: `LOYALTY__LEDGER__POOL_SIZE=16` sets
/// `ledger.pool_size`. Double underscores separate the levels because single
/// ones occur inside key names.
pub const ENV_PREFIX: &str = "LOYALTY";
const ENV_SEPARATOR: &str = "__";

/// Ledger connections. Each batch holds one connection for one transaction;
/// 8 lets several sources, the scheduler, delivery and the API work at once
/// while staying far below PostgreSQL's default `max_connections` (100).
pub const DEFAULT_LEDGER_POOL_SIZE: u32 = 8;
/// More than this many ledger connections only adds lock contention on the
/// balances of busy members; PostgreSQL gains nothing past its core count.
pub const MAX_LEDGER_POOL_SIZE: u32 = 64;

/// Points earned per currency unit of net amount when the program does not
/// say: the most common retail rule ("1 point per euro/dollar").
pub const DEFAULT_POINTS_PER_CURRENCY_UNIT: Decimal = Decimal::ONE;

/// The admin API listens on loopback unless told otherwise: exposing it is
/// a deliberate act (and then it needs a token, see [`ApiSettings`]).
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:8787";

/// PostgreSQL identifiers longer than 63 bytes are truncated silently by the
/// server, so two long slot names could collide: refuse them instead.
const MAX_PG_IDENTIFIER_LEN: usize = 63;
/// Source names become part of slot and publication names (`loyalty_<name>`).
const MAX_SOURCE_NAME_LEN: usize = MAX_PG_IDENTIFIER_LEN - "loyalty_".len();
/// MySQL/MariaDB `server_id` is an unsigned 32-bit value; 0 means "not a
/// replica" and is refused by the binlog dump command.
const MYSQL_SERVER_ID_RANGE: std::ops::RangeInclusive<u64> = 1..=u32::MAX as u64;
/// Default `server_id`s are derived from the source name into this range, far
/// from the small ids people give their real servers and replicas.
const DERIVED_SERVER_ID_BASE: u32 = 1_000_000_000;
const DERIVED_SERVER_ID_SPAN: u32 = 1_000_000_000;

/// The whole configuration. Sections: `ledger`, `sources`, `program`,
/// `providers`, `triggers`, `api`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The loyalty ledger database (PostgreSQL).
    pub ledger: LedgerSettings,
    /// The databases whose changes feed the program, as `[[sources]]` tables.
    #[serde(default)]
    pub sources: Vec<SourceSettings>,
    /// Earn rule and tiers.
    #[serde(default)]
    pub program: ProgramSettings,
    /// Identifier normalization and linking rules.
    #[serde(default)]
    pub identity: crate::identity::IdentitySettings,
    /// Message providers (email, SMS, push, messaging apps), as `[[providers]]`.
    #[serde(default)]
    pub providers: Vec<ProviderSettings>,
    /// Which trigger goes to which provider.
    #[serde(default)]
    pub triggers: TriggerSettings,
    /// Delivery: retries, timeouts, consent and contact policy.
    #[serde(default)]
    pub delivery: crate::delivery::DeliverySettings,
    /// The offer catalog, as `[[offers]]`: what a trigger offers whom.
    #[serde(default)]
    pub offers: Vec<OfferSettings>,
    /// Scores and lifecycle stages from purchase behaviour.
    #[serde(default)]
    pub personalization: crate::personalize::PersonalizationSettings,
    /// Segments over the features, as `[[segments]]`.
    #[serde(default)]
    pub segments: Vec<crate::personalize::SegmentSettings>,
    /// The HTTP listener: metrics, health and the admin API.
    #[serde(default)]
    pub api: ApiSettings,
}

/// `[ledger]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// PostgreSQL URL of the ledger database, e.g.
    /// `postgres://loyalty@db.internal:5432/loyalty`. Required.
    pub url: DatabaseUrl,
    /// Password, if not in the URL: `{ env = "VAR" }` or `{ file = "path" }`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Connections in the ledger pool (default 8, at most 64).
    #[serde(default = "default_pool_size")]
    pub pool_size: u32,
}

fn default_pool_size() -> u32 {
    DEFAULT_LEDGER_POOL_SIZE
}

/// One `[[sources]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// Short unique name (`[a-z0-9_]`, at most 55 characters), e.g. `pos`.
    /// It keys the source's stored position and names its slot and
    /// publication: renaming a source makes it a new source.
    pub name: String,
    /// `postgres` (logical replication) or `mysql` (MySQL or MariaDB binlog).
    pub kind: SourceKind,
    /// Database URL: `postgres://user@host:5432/db` or
    /// `mysql://user@host:3306/db`. Required.
    pub url: DatabaseUrl,
    /// Password, if not in the URL: `{ env = "VAR" }` or `{ file = "path" }`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// Mapping file (relative to this configuration file), e.g.
    /// `connectors/sources/odoo-pos.toml`.
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    /// PostgreSQL only: replication slot name (default `loyalty_<name>`).
    #[serde(default)]
    pub slot: Option<String>,
    /// PostgreSQL only: publication name (default `loyalty_<name>`).
    #[serde(default)]
    pub publication: Option<String>,
    /// Copy the existing rows of the mapped tables on the source's first
    /// start (default true). Without it the program starts with the changes
    /// made after loyalty-cdc first connected.
    #[serde(default = "default_snapshot")]
    pub snapshot: bool,
    /// PostgreSQL only: emit a heartbeat message this often (seconds) so a
    /// server that is quiet for long stretches still lets the slot advance.
    /// Default: none (the server's keepalives suffice while anything writes).
    #[serde(default)]
    pub heartbeat_seconds: Option<u64>,
    /// MySQL/MariaDB only: the replica `server_id` this reader announces.
    /// It must differ from the server's own and from every other replica of
    /// that server (a duplicate kicks the other reader off). Default: derived
    /// from the source name, in 1000000000..1999999999.
    #[serde(default)]
    pub server_id: Option<u64>,
    /// The mapping file, compiled by `validate` (not a configuration key).
    #[serde(skip)]
    pub compiled_mapping: Option<std::sync::Arc<crate::normalize::mapping::Mapping>>,
}

fn default_snapshot() -> bool {
    true
}

impl SourceSettings {
    /// The replication slot this PostgreSQL source uses.
    pub fn slot_name(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("loyalty_{}", self.name))
    }

    /// The publication this PostgreSQL source reads.
    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| format!("loyalty_{}", self.name))
    }

    /// The `server_id` this MySQL/MariaDB source announces.
    pub fn mysql_server_id(&self) -> u32 {
        match self.server_id {
            // validate() refused ids outside u32.
            Some(id) => u32::try_from(id).unwrap_or(u32::MAX),
            None => derived_server_id(&self.name),
        }
    }
}

/// A stable id per source name (FNV-1a), so restarts announce the same id.
fn derived_server_id(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in name.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    DERIVED_SERVER_ID_BASE + hash % DERIVED_SERVER_ID_SPAN
}

/// `[program]`: the loyalty program. The ledger issue extends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgramSettings {
    /// Points per currency unit of net amount (decimal, default 1).
    /// Earn = floor(net × rate × multipliers).
    #[serde(default = "default_points_per_currency_unit")]
    pub points_per_currency_unit: Decimal,
    /// Tiers in ascending order of `threshold` (qualifying points); the first
    /// must start at 0. Empty: no tiers.
    #[serde(default)]
    pub tiers: Vec<TierSettings>,
    /// `[program.expiry]`: when points expire. Absent: never.
    #[serde(default)]
    pub expiry: Option<ExpirySettings>,
    /// `[program.tier_period]`: tiers qualify on the points earned in a
    /// calendar period and are reviewed at its end. Absent: tiers follow
    /// lifetime points and never go down.
    #[serde(default)]
    pub tier_period: Option<TierPeriodSettings>,
}

/// `[program.tier_period]`: the qualification period of tiers. Periods are
/// calendar periods in UTC of `months` months, the first of each year
/// starting on the 1st of `first_month` (12 and 1: the calendar year; 12 and
/// 4: a fiscal year from April; 3 and 1: quarters).
///
/// A tier is reached at once when the points earned in the current period
/// cross its threshold. At `grace_days` after a period's end, a member whose
/// points earned in that period (orders placed in it, so late completions
/// and refunds within the grace period count) no longer reach their tier
/// goes down one tier (`tier_downgrade`); `warning_days` before the end, a
/// member not yet on track is warned (`tier_downgrade_warning`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierPeriodSettings {
    /// Length of a period in months: 1, 2, 3, 4, 6 or 12 (default 12).
    #[serde(default = "default_tier_period_months")]
    pub months: u32,
    /// Month (1–12) a period of the year starts in (default 1).
    #[serde(default = "default_tier_first_month")]
    pub first_month: u32,
    /// Days after a period's end before its review (default 30).
    #[serde(default = "default_tier_grace_days")]
    pub grace_days: i64,
    /// Days before a period's end the warning fires (default 30).
    #[serde(default = "default_tier_warning_days")]
    pub warning_days: i64,
}

fn default_tier_period_months() -> u32 {
    12
}

fn default_tier_first_month() -> u32 {
    1
}

fn default_tier_grace_days() -> i64 {
    30
}

fn default_tier_warning_days() -> i64 {
    30
}

/// `[program.expiry]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpirySettings {
    /// The whole available balance expires after this many months without
    /// activity (an earning or a redemption).
    pub inactivity_months: u32,
    /// `points_expiring` fires this many days before (default 30).
    #[serde(default = "default_warn_days")]
    pub warn_days: i64,
}

fn default_warn_days() -> i64 {
    30
}

impl Default for ProgramSettings {
    fn default() -> Self {
        Self {
            points_per_currency_unit: DEFAULT_POINTS_PER_CURRENCY_UNIT,
            tiers: Vec::new(),
            expiry: None,
            tier_period: None,
        }
    }
}

fn default_points_per_currency_unit() -> Decimal {
    DEFAULT_POINTS_PER_CURRENCY_UNIT
}

/// One `[[program.tiers]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSettings {
    /// Tier name shown to members, e.g. `gold`.
    pub name: String,
    /// Qualifying points needed to reach it.
    pub threshold: i64,
}

/// One `[[providers]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    /// Unique name that trigger routes refer to, e.g. `klaviyo`.
    pub name: String,
    /// Template file (relative to this configuration file), e.g.
    /// `connectors/providers/klaviyo.toml`.
    pub template: PathBuf,
    /// Override of the provider's base URL (staging, tests).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Credentials the template refers to by name, each `{ env = "VAR" }` or
    /// `{ file = "path" }`, e.g. `secrets.api_key = { env = "KLAVIYO_KEY" }`.
    #[serde(default)]
    pub secrets: BTreeMap<String, Secret>,
    /// Non-secret values the template asks for (its `settings` list), e.g.
    /// `settings.from_email = "club@shop.example"`.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// Requests per second at most (token bucket; default 50).
    #[serde(default = "default_rate_per_second")]
    pub rate_per_second: u32,
    /// Requests in flight at most (default 8).
    #[serde(default = "default_provider_concurrency")]
    pub concurrency: u32,
    /// The template file, compiled by `validate` (not a configuration key).
    #[serde(skip)]
    pub compiled: Option<std::sync::Arc<crate::delivery::template::ProviderTemplate>>,
}

fn default_rate_per_second() -> u32 {
    50
}

fn default_provider_concurrency() -> u32 {
    8
}

/// `[triggers]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerSettings {
    /// `[[triggers.routes]]`: send `trigger` through `provider`. A trigger
    /// with no route fires nothing (`points_earned` is the usual one left
    /// out).
    #[serde(default)]
    pub routes: Vec<TriggerRoute>,
    /// `[triggers.milestones]`: thresholds that fire `milestone` once each.
    #[serde(default)]
    pub milestones: MilestoneSettings,
    /// `[triggers.lapse]`: when a member counts as at risk of lapsing.
    #[serde(default)]
    pub lapse: LapseSettings,
    /// `[triggers.price_drop]`: how far a wishlisted product's price must
    /// fall to be news.
    #[serde(default)]
    pub price_drop: PriceDropSettings,
    /// How often the scheduler looks for due triggers, in seconds
    /// (default 60).
    #[serde(default = "default_scheduler_interval")]
    pub scheduler_interval_seconds: u64,
}

fn default_scheduler_interval() -> u64 {
    60
}

impl Default for TriggerSettings {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            milestones: MilestoneSettings::default(),
            lapse: LapseSettings::default(),
            price_drop: PriceDropSettings::default(),
            scheduler_interval_seconds: default_scheduler_interval(),
        }
    }
}

/// One `[[offers]]` entry. A trigger carries the eligible offer of highest
/// `priority` (the first listed among equals); the member's next purchase
/// within `valid_days` earns with its multiplier and bonus.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfferSettings {
    /// Unique code, shown to members and providers, e.g. `GOLD-2X`.
    pub code: String,
    /// Short text for messages.
    pub title: String,
    #[serde(default)]
    pub description: Option<String>,
    /// Triggers that may carry it (empty: every trigger).
    #[serde(default)]
    pub triggers: Vec<TriggerKind>,
    /// Tiers of members it is for (empty: every tier).
    #[serde(default)]
    pub tiers: Vec<String>,
    /// Segments of members it is for (empty: everyone). A member who
    /// opted out of profiling is in no segment: only offers without
    /// segments are for them.
    #[serde(default)]
    pub segments: Vec<String>,
    /// Points of the next purchase are multiplied by this (decimal ≥ 1,
    /// default 1).
    #[serde(default = "default_multiplier")]
    pub multiplier: Decimal,
    /// Points added to the next purchase (default 0).
    #[serde(default)]
    pub bonus_points: i64,
    /// Days the offer is valid from its trigger (default 30).
    #[serde(default = "default_valid_days")]
    pub valid_days: i64,
    /// The catalog entry is offered from this date on (`YYYY-MM-DD`, UTC).
    #[serde(default)]
    pub available_from: Option<chrono::NaiveDate>,
    /// … and up to this date, inclusive.
    #[serde(default)]
    pub available_until: Option<chrono::NaiveDate>,
    /// Higher wins (default 0).
    #[serde(default)]
    pub priority: i64,
}

fn default_multiplier() -> Decimal {
    Decimal::ONE
}

fn default_valid_days() -> i64 {
    30
}

/// `[triggers.price_drop]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceDropSettings {
    /// `price_drop` fires when a wishlisted product's price falls at least
    /// this many percent below the price the member last saw (when they
    /// added it, or the last drop announced to them). Default 5.
    #[serde(default = "default_min_drop_percent")]
    pub min_drop_percent: Decimal,
}

impl Default for PriceDropSettings {
    fn default() -> Self {
        Self {
            min_drop_percent: default_min_drop_percent(),
        }
    }
}

fn default_min_drop_percent() -> Decimal {
    Decimal::from(5)
}

/// `[triggers.lapse]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LapseSettings {
    /// `lapse_risk` fires after this many of the member's usual intervals
    /// between purchases without one (the median of their last 10
    /// intervals; needs 3 purchases). Default 3.
    #[serde(default = "default_after_intervals")]
    pub after_intervals: f64,
    /// For members with fewer than 3 purchases: after this many days
    /// without one (default 90).
    #[serde(default = "default_after_days")]
    pub after_days: i64,
    /// `rhythm` (default: the intervals above) or `probability`: when the
    /// member's probability alive (see `[personalization]`) falls below
    /// `at_risk_below` — members who objected to profiling then get the
    /// `after_days` rule.
    #[serde(default)]
    pub by: LapseRule,
}

/// How `lapse_risk` is judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LapseRule {
    #[default]
    Rhythm,
    Probability,
}

impl Default for LapseSettings {
    fn default() -> Self {
        Self {
            after_intervals: default_after_intervals(),
            after_days: default_after_days(),
            by: LapseRule::default(),
        }
    }
}

fn default_after_intervals() -> f64 {
    3.0
}

fn default_after_days() -> i64 {
    90
}

/// `[triggers.milestones]`
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MilestoneSettings {
    /// The member's nth purchase, e.g. `[1, 10, 50]`.
    #[serde(default)]
    pub purchases: Vec<i64>,
    /// Lifetime points reached, e.g. `[1000, 5000]`.
    #[serde(default)]
    pub lifetime_points: Vec<i64>,
}

/// One `[[triggers.routes]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerRoute {
    /// Names the route in the outbox (default `<trigger>_<provider>`);
    /// unique. Renaming a route makes its queued messages undeliverable.
    #[serde(default)]
    pub name: Option<String>,
    /// Which trigger.
    pub trigger: TriggerKind,
    /// Name of a configured provider.
    pub provider: String,
    /// Values the provider template asks for (its `params` list): message
    /// text, subject, template or campaign ids. Each is a template itself,
    /// e.g. `text = "You are {{ trigger.data.tier }} now!"`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

impl TriggerRoute {
    /// The route's name in the outbox.
    pub fn route_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("{}_{}", self.trigger.as_str(), self.provider))
    }
}

/// The triggers the program can fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    Welcome,
    PointsEarned,
    TierUpgrade,
    TierDowngrade,
    TierDowngradeWarning,
    Milestone,
    Redemption,
    LapseRisk,
    ReplenishmentDue,
    PointsExpiring,
    PriceDrop,
    SegmentEntered,
}

impl TriggerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Welcome => "welcome",
            Self::PointsEarned => "points_earned",
            Self::TierUpgrade => "tier_upgrade",
            Self::TierDowngrade => "tier_downgrade",
            Self::TierDowngradeWarning => "tier_downgrade_warning",
            Self::Milestone => "milestone",
            Self::Redemption => "redemption",
            Self::LapseRisk => "lapse_risk",
            Self::ReplenishmentDue => "replenishment_due",
            Self::PointsExpiring => "points_expiring",
            Self::PriceDrop => "price_drop",
            Self::SegmentEntered => "segment_entered",
        }
    }
}

/// `[api]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// Address of the HTTP listener (default `127.0.0.1:8787`).
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    /// Bearer token of the admin API: `{ env = "VAR" }` or `{ file = "path" }`.
    /// Required when `listen` is not a loopback address.
    #[serde(default)]
    pub token: Option<Secret>,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            token: None,
        }
    }
}

fn default_api_listen() -> SocketAddr {
    // A constant literal that always parses.
    DEFAULT_API_LISTEN
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8787)))
}

/// A database URL. Its `Debug` and `Display` hide the password.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DatabaseUrl(Url);

impl DatabaseUrl {
    /// The parsed URL, password included: for connecting, never for printing.
    pub fn expose(&self) -> &Url {
        &self.0
    }

    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// The database name (the path without its leading `/`), if any.
    pub fn database(&self) -> Option<&str> {
        let name = self.0.path().trim_start_matches('/');
        (!name.is_empty()).then_some(name)
    }

    pub fn username(&self) -> &str {
        self.0.username()
    }
}

impl TryFrom<String> for DatabaseUrl {
    type Error = String;

    fn try_from(raw: String) -> Result<Self, Self::Error> {
        let url = Url::parse(&raw).map_err(|error| {
            // Do not echo the value: it may carry a password.
            format!("not a URL ({error}); expected e.g. postgres://user@host:5432/db")
        })?;
        if url.host_str().is_none_or(str::is_empty) {
            return Err("URL has no host; expected e.g. postgres://user@host:5432/db".into());
        }
        Ok(Self(url))
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut shown = self.0.clone();
        if shown.password().is_some() {
            // Only fails for URLs that cannot have a password, which this
            // one evidently can.
            let _ = shown.set_password(Some("***"));
        }
        f.write_str(shown.as_str())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// A secret (password, API key, token) and where it comes from. Written as
/// `{ env = "VAR" }`, `{ file = "/run/secrets/x" }`, or a plain string (meant
/// for `LOYALTY__…` environment overrides, not for files under version
/// control). Never printed: `Debug` shows only its origin.
#[derive(Clone)]
pub struct Secret {
    origin: SecretOrigin,
    value: Option<SecretString>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum SecretOrigin {
    Env(String),
    File(PathBuf),
    Inline,
}

impl Secret {
    /// The value, once [`Settings::validate`] has resolved it.
    pub fn expose(&self) -> Option<&str> {
        self.value.as_ref().map(|value| value.expose_secret())
    }

    /// Reads the value from its origin. Trailing newlines of files are
    /// dropped (`echo secret > file` adds one).
    fn resolve(&mut self, base_dir: &Path) -> Result<(), String> {
        let value = match &self.origin {
            SecretOrigin::Inline => return Ok(()),
            SecretOrigin::Env(var) => std::env::var(var).map_err(|_| {
                format!("environment variable `{var}` is not set (or not UTF-8); set it, or point the secret at a file with {{ file = \"path\" }}")
            })?,
            SecretOrigin::File(path) => {
                let path = base_dir.join(path);
                let mut text = std::fs::read_to_string(&path).map_err(|error| {
                    format!("cannot read secret file `{}`: {error}; fix the path or its permissions", path.display())
                })?;
                text.truncate(text.trim_end_matches(['\n', '\r']).len());
                text
            }
        };
        if value.is_empty() {
            return Err(format!("the secret from {} is empty", self.origin));
        }
        self.value = Some(value.into());
        Ok(())
    }
}

impl fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(var) => write!(f, "environment variable `{var}`"),
            Self::File(path) => write!(f, "file `{}`", path.display()),
            Self::Inline => f.write_str("an inline value"),
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(from {}, value hidden)", self.origin)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Hand-written rather than an untagged enum: serde's untagged errors
        // say only "did not match any variant", which tells a user nothing.
        struct SecretVisitor;

        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = Secret;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"{ env = "VAR" }, { file = "path" } or a string"#)
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Secret, E> {
                Ok(Secret {
                    origin: SecretOrigin::Inline,
                    value: Some(value.into()),
                })
            }

            // `LOYALTY__…` overrides are parsed for numbers: a numeric token
            // arrives as a number.
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Secret, E> {
                self.visit_str(&value.to_string())
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Secret, E> {
                self.visit_str(&value.to_string())
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Secret, A::Error> {
                let mut origin = None;
                while let Some(key) = map.next_key::<String>()? {
                    let next = match key.as_str() {
                        "env" => SecretOrigin::Env(map.next_value()?),
                        "file" => SecretOrigin::File(map.next_value()?),
                        other => return Err(de::Error::unknown_field(other, &["env", "file"])),
                    };
                    if origin.replace(next).is_some() {
                        return Err(de::Error::custom(
                            "a secret takes exactly one of `env` or `file`",
                        ));
                    }
                }
                let origin = origin.ok_or_else(|| de::Error::missing_field("env` or `file"))?;
                Ok(Secret {
                    origin,
                    value: None,
                })
            }
        }

        deserializer.deserialize_any(SecretVisitor)
    }
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Where: the file, or `environment` for `LOYALTY__…` overrides.
    pub origin: String,
    /// The key, e.g. `sources[1].url`; empty for the file as a whole.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{}: key `{}`: {}", self.origin, self.key, self.message)
        }
    }
}

/// The configuration could not be used; every problem found is listed.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    pub problems: Vec<ConfigProblem>,
}

impl ConfigError {
    fn one(origin: impl Into<String>, key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![ConfigProblem {
                origin: origin.into(),
                key: key.into(),
                message: message.into(),
            }],
        }
    }
}

impl Settings {
    /// Reads `path` and the `LOYALTY__…` environment, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        if !path.is_file() {
            return Err(ConfigError::one(
                origin,
                "",
                format!(
                    "configuration file not found; pass --config PATH or create `{DEFAULT_CONFIG_PATH}` (README.md has a complete example)"
                ),
            ));
        }
        let merged = config::Config::builder()
            .add_source(config::File::new(&origin, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator(ENV_SEPARATOR)
                    .separator(ENV_SEPARATOR)
                    .try_parsing(true),
            )
            .build()
            .map_err(|error| describe_config_error(error, &origin))?;
        let mut settings: Settings = merged
            .try_deserialize()
            .map_err(|error| describe_config_error(error, &origin))?;
        let base_dir = path.parent().unwrap_or(Path::new("."));
        settings.validate(&origin, base_dir)?;
        Ok(settings)
    }

    /// Checks what the types cannot, resolves secrets, and resolves relative
    /// file paths against `base_dir` (the configuration file's directory).
    pub fn validate(&mut self, origin: &str, base_dir: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut mapping_problems_found = Vec::new();
        let mut problems_later: Vec<ConfigProblem> = Vec::new();
        let mut problem = |key: String, message: String| {
            problems.push(ConfigProblem {
                origin: origin.to_string(),
                key,
                message,
            })
        };

        check_url_scheme(
            &self.ledger.url,
            SourceKind::Postgres,
            "ledger.url",
            &mut problem,
        );
        if !(1..=MAX_LEDGER_POOL_SIZE).contains(&self.ledger.pool_size) {
            problem(
                "ledger.pool_size".into(),
                format!(
                    "{} is out of range; use 1..={MAX_LEDGER_POOL_SIZE} (default {DEFAULT_LEDGER_POOL_SIZE})",
                    self.ledger.pool_size
                ),
            );
        }
        if let Some(secret) = &mut self.ledger.password {
            if let Err(message) = secret.resolve(base_dir) {
                problem("ledger.password".into(), message);
            }
        }

        let mut source_names = HashSet::new();
        let mut slots = HashSet::new();
        for (index, source) in self.sources.iter_mut().enumerate() {
            let key = |field: &str| format!("sources[{index}].{field}");
            if !is_simple_name(&source.name, MAX_SOURCE_NAME_LEN) {
                problem(
                    key("name"),
                    format!("`{}` is not a usable source name; use 1 to {MAX_SOURCE_NAME_LEN} characters of a-z, 0-9 and _ (it names the slot and the stored position)", source.name),
                );
            } else if !source_names.insert(source.name.clone()) {
                problem(
                    key("name"),
                    format!(
                        "source `{}` is defined twice; give each source its own name",
                        source.name
                    ),
                );
            }
            check_url_scheme(&source.url, source.kind, &key("url"), &mut problem);
            if let Some(secret) = &mut source.password {
                if let Err(message) = secret.resolve(base_dir) {
                    problem(key("password"), message);
                }
            }
            if let Some(mapping) = &mut source.mapping {
                *mapping = base_dir.join(&*mapping);
                if !mapping.is_file() {
                    problem(
                        key("mapping"),
                        format!("mapping file `{}` does not exist; the mappings shipped with loyalty-cdc are in connectors/sources/", mapping.display()),
                    );
                }
            }
            match source.kind {
                SourceKind::Postgres => {
                    if source.heartbeat_seconds == Some(0) {
                        problem(
                            key("heartbeat_seconds"),
                            "0 is not an interval; use 1 or more, or leave it out".into(),
                        );
                    }
                    if source.server_id.is_some() {
                        problem(
                            key("server_id"),
                            "only MySQL/MariaDB sources take a server_id; remove it".into(),
                        );
                    }
                    for (field, value) in
                        [("slot", &source.slot), ("publication", &source.publication)]
                    {
                        if let Some(value) = value {
                            if !is_simple_name(value, MAX_PG_IDENTIFIER_LEN) {
                                problem(key(field), format!("`{value}` is not a usable {field} name; use 1 to {MAX_PG_IDENTIFIER_LEN} characters of a-z, 0-9 and _"));
                            }
                        }
                    }
                    let slot = (
                        source.url.expose().host_str().unwrap_or("").to_string(),
                        source.url.expose().port(),
                        source.slot_name(),
                    );
                    if !slots.insert(slot.clone()) {
                        problem(key("slot"), format!("slot `{}` is already used by another source on the same server; each source needs its own slot", slot.2));
                    }
                }
                SourceKind::Mysql => {
                    if source.heartbeat_seconds.is_some() {
                        problem(
                            key("heartbeat_seconds"),
                            "only PostgreSQL sources take heartbeat_seconds (MySQL/MariaDB heartbeats are part of the binlog protocol); remove it".into(),
                        );
                    }
                    for (field, value) in
                        [("slot", &source.slot), ("publication", &source.publication)]
                    {
                        if value.is_some() {
                            problem(
                                key(field),
                                format!("only PostgreSQL sources take a {field}; remove it"),
                            );
                        }
                    }
                    if let Some(id) = source.server_id {
                        if !MYSQL_SERVER_ID_RANGE.contains(&id) {
                            problem(key("server_id"), format!("{id} is out of range; use 1..=4294967295, different from the server's own server_id"));
                        }
                    }
                }
            }
        }

        if self.program.points_per_currency_unit.is_sign_negative() {
            problem(
                "program.points_per_currency_unit".into(),
                format!(
                    "{} is negative; use 0 or more (default {DEFAULT_POINTS_PER_CURRENCY_UNIT})",
                    self.program.points_per_currency_unit
                ),
            );
        }
        let mut tier_names = HashSet::new();
        for (index, tier) in self.program.tiers.iter().enumerate() {
            let key = |field: &str| format!("program.tiers[{index}].{field}");
            if tier.name.trim().is_empty() || !tier_names.insert(tier.name.as_str()) {
                problem(
                    key("name"),
                    format!(
                        "tier name `{}` is empty or used twice; give each tier its own name",
                        tier.name
                    ),
                );
            }
            match index {
                0 if tier.threshold != 0 => problem(key("threshold"), format!("the first tier must start at 0, not {}: every member is in some tier", tier.threshold)),
                0 => {}
                _ if tier.threshold <= self.program.tiers[index - 1].threshold => problem(
                    key("threshold"),
                    format!("{} is not above the previous tier's {}; list tiers in ascending order of threshold", tier.threshold, self.program.tiers[index - 1].threshold),
                ),
                _ => {}
            }
        }

        let mut provider_names = HashSet::new();
        for (index, provider) in self.providers.iter_mut().enumerate() {
            let key = |field: &str| format!("providers[{index}].{field}");
            if !is_simple_name(&provider.name, MAX_PG_IDENTIFIER_LEN)
                || !provider_names.insert(provider.name.clone())
            {
                problem(key("name"), format!("`{}` is not a usable provider name or is used twice; use a unique name of a-z, 0-9 and _", provider.name));
            }
            provider.template = base_dir.join(&provider.template);
            if !provider.template.is_file() {
                problem(key("template"), format!("template file `{}` does not exist; the templates shipped with loyalty-cdc are in connectors/providers/", provider.template.display()));
            }
            if let Some(base_url) = &provider.base_url {
                match Url::parse(base_url) {
                    Ok(url) if matches!(url.scheme(), "http" | "https") => {}
                    Ok(url) => problem(
                        key("base_url"),
                        format!("scheme `{}` is not http or https", url.scheme()),
                    ),
                    Err(error) => problem(
                        key("base_url"),
                        format!("not a URL ({error}); expected e.g. https://a.klaviyo.com"),
                    ),
                }
            }
            for (name, secret) in provider.secrets.iter_mut() {
                if let Err(message) = secret.resolve(base_dir) {
                    problem(format!("providers[{index}].secrets.{name}"), message);
                }
            }
        }

        // Provider templates: compiled here, so a bad template fails at
        // start naming its file and key; then what each provider entry
        // must supply for its template.
        for (index, provider) in self.providers.iter_mut().enumerate() {
            if !provider.template.is_file() {
                continue;
            }
            match crate::delivery::template::ProviderTemplate::load(&provider.template) {
                Ok(template) => {
                    for (key, message) in template.problems_with(provider) {
                        problem(format!("providers[{index}].{key}"), message);
                    }
                    provider.compiled = Some(std::sync::Arc::new(template));
                }
                Err(template_problems) => problems_later.extend(template_problems),
            }
            if provider.rate_per_second == 0 || provider.concurrency == 0 {
                problem(
                    format!("providers[{index}].rate_per_second"),
                    "rate_per_second and concurrency must be 1 or more (defaults 50 and 8)".into(),
                );
            }
        }

        let mut route_names = HashSet::new();
        for (index, route) in self.triggers.routes.iter().enumerate() {
            let provider = self.providers.iter().find(|p| p.name == route.provider);
            match provider {
                None => problem(
                    format!("triggers.routes[{index}].provider"),
                    format!("no provider is named `{}`; add a [[providers]] entry with that name or fix the route", route.provider),
                ),
                Some(provider) => {
                    if let Some(template) = &provider.compiled {
                        for (key, message) in template.problems_with_route(route) {
                            problem(format!("triggers.routes[{index}].{key}"), message);
                        }
                    }
                }
            }
            if matches!(
                route.trigger,
                TriggerKind::TierDowngrade | TriggerKind::TierDowngradeWarning
            ) && self.program.tier_period.is_none()
            {
                problem(
                    format!("triggers.routes[{index}].trigger"),
                    format!("`{}` never fires without a tier qualification period: tiers follow lifetime points and never go down; add [program.tier_period] or remove the route", route.trigger.as_str()),
                );
            }
            if !route_names.insert(route.route_name()) {
                problem(
                    format!("triggers.routes[{index}].name"),
                    format!(
                        "route `{}` is defined twice; give one of them another `name`",
                        route.route_name()
                    ),
                );
            }
        }
        for (key, values) in [
            ("purchases", &self.triggers.milestones.purchases),
            ("lifetime_points", &self.triggers.milestones.lifetime_points),
        ] {
            if values.iter().any(|v| *v <= 0) {
                problem(
                    format!("triggers.milestones.{key}"),
                    "milestones are counts above 0, e.g. [1, 10, 50]".into(),
                );
            }
        }
        if self.triggers.lapse.after_intervals.is_nan()
            || self.triggers.lapse.after_intervals <= 0.0
            || self.triggers.lapse.after_days < 1
        {
            problem(
                "triggers.lapse".into(),
                "after_intervals must be above 0 and after_days 1 or more (defaults 3 and 90)"
                    .into(),
            );
        }
        let drop = self.triggers.price_drop.min_drop_percent;
        if drop <= Decimal::ZERO || drop >= Decimal::from(100) {
            problem(
                "triggers.price_drop.min_drop_percent".into(),
                format!("{drop} is not a share of a price: write a percent above 0 and below 100 (default 5)"),
            );
        }
        if self.triggers.lapse.by == LapseRule::Probability && !self.personalization.enabled {
            problem(
                "triggers.lapse.by".into(),
                "\"probability\" needs [personalization] enabled (the features it is computed from)".into(),
            );
        }
        if self.triggers.scheduler_interval_seconds == 0 {
            problem(
                "triggers.scheduler_interval_seconds".into(),
                "use 1 or more (default 60)".into(),
            );
        }
        if let Some(expiry) = &self.program.expiry {
            if expiry.inactivity_months == 0 || expiry.warn_days < 0 {
                problem(
                    "program.expiry".into(),
                    "inactivity_months must be 1 or more and warn_days 0 or more; leave [program.expiry] out for points that never expire".into(),
                );
            }
        }
        if let Some(period) = &self.program.tier_period {
            let key = |field: &str| format!("program.tier_period.{field}");
            if self.program.tiers.len() < 2 {
                problem(
                    "program.tier_period".into(),
                    "a qualification period needs tiers to review: add [[program.tiers]] above the entry tier, or remove [program.tier_period]".into(),
                );
            }
            if ![1, 2, 3, 4, 6, 12].contains(&period.months) {
                problem(key("months"), format!("{} does not divide the year; use 1, 2, 3, 4, 6 or 12 (default 12: the calendar year)", period.months));
            }
            if !(1..=12).contains(&period.first_month) {
                problem(
                    key("first_month"),
                    format!(
                        "{} is not a month; use 1 (January) to 12 (default 1)",
                        period.first_month
                    ),
                );
            }
            // A period has at least 28 days a month: the review of one
            // period comes before the next period's warning.
            let shortest_days = 28 * i64::from(period.months);
            if !(0..shortest_days).contains(&period.grace_days) {
                problem(key("grace_days"), format!("{} is outside 0..{shortest_days}: the review must come before the next period ends (default 30)", period.grace_days));
            }
            let latest_warning = shortest_days - period.grace_days.max(0);
            if !(1..latest_warning).contains(&period.warning_days) {
                problem(key("warning_days"), format!("{} is outside 1..{latest_warning}: the warning comes after the previous period's review (grace_days {} after its end) and within the period it is about (default 30)", period.warning_days, period.grace_days));
            }
        }
        let mut offer_codes = HashSet::new();
        for (index, offer) in self.offers.iter().enumerate() {
            let key = |field: &str| format!("offers[{index}].{field}");
            if offer.code.trim().is_empty() || !offer_codes.insert(offer.code.clone()) {
                problem(
                    key("code"),
                    format!(
                        "offer code `{}` is empty or used twice; give each offer its own code",
                        offer.code
                    ),
                );
            }
            if offer.multiplier < Decimal::ONE || offer.bonus_points < 0 {
                problem(
                    key("multiplier"),
                    "multiplier must be 1 or more and bonus_points 0 or more".into(),
                );
            }
            if offer.multiplier == Decimal::ONE && offer.bonus_points == 0 {
                problem(
                    key("multiplier"),
                    "the offer gives nothing; set multiplier above 1 or bonus_points above 0"
                        .into(),
                );
            }
            if offer.valid_days < 1 {
                problem(key("valid_days"), "use 1 or more (default 30)".into());
            }
            for tier in &offer.tiers {
                if !self.program.tiers.iter().any(|t| &t.name == tier) {
                    problem(
                        key("tiers"),
                        format!("no tier is named `{tier}`; the tiers are in [program] tiers"),
                    );
                }
            }
            for segment in &offer.segments {
                if !self.segments.iter().any(|s| &s.name == segment) {
                    problem(
                        key("segments"),
                        format!("no segment is named `{segment}`; declare it as [[segments]] name = \"{segment}\""),
                    );
                }
            }
            if let (Some(from), Some(until)) = (offer.available_from, offer.available_until) {
                if from > until {
                    problem(
                        key("available_until"),
                        format!("{until} is before available_from {from}"),
                    );
                }
            }
        }
        for (key, message) in self.delivery.problems() {
            problem(key, message);
        }
        for (key, message) in self.personalization.problems() {
            problem(key, message);
        }
        if !self.personalization.enabled && !self.segments.is_empty() {
            problem(
                "personalization.enabled".into(),
                format!("personalization is off, but {} segment(s) are declared; turn it on or remove the [[segments]]", self.segments.len()),
            );
        }
        let mut segment_names = HashSet::new();
        for (index, segment) in self.segments.iter_mut().enumerate() {
            let key = |field: &str| format!("segments[{index}].{field}");
            if !is_simple_name(&segment.name, 64) {
                problem(key("name"), format!("`{}` is not a usable segment name; use 1 to 64 characters of a-z, 0-9 and _", segment.name));
            } else if !segment_names.insert(segment.name.clone()) {
                problem(
                    key("name"),
                    format!(
                        "segment `{}` is declared twice; give each its own name",
                        segment.name
                    ),
                );
            }
            match crate::normalize::expr::Expr::compile(&segment.when) {
                Ok(expr) => segment.compiled = Some(std::sync::Arc::new(expr)),
                Err(message) => problem(
                    key("when"),
                    format!("{message}; write a CEL condition over `features`, e.g. features.purchases >= 3"),
                ),
            }
        }

        if let Some(secret) = &mut self.api.token {
            if let Err(message) = secret.resolve(base_dir) {
                problem("api.token".into(), message);
            }
        } else if !self.api.listen.ip().is_loopback() {
            problem(
                "api.token".into(),
                format!("the admin API listens on {} (not loopback) without a token; set api.token = {{ env = \"LOYALTY_API_TOKEN\" }} or listen on 127.0.0.1", self.api.listen),
            );
        }

        for (key, message) in self.identity.problems() {
            problem(key, message);
        }

        // Mapping files: compiled here, so a bad mapping fails at start
        // naming its own file and key.
        for (index, source) in self.sources.iter_mut().enumerate() {
            let Some(path) = source.mapping.as_ref().filter(|p| p.is_file()) else {
                continue;
            };
            match crate::normalize::mapping::Mapping::load(path) {
                Ok(mapping) if mapping.kind != source.kind => problem(
                    format!("sources[{index}].mapping"),
                    format!(
                        "`{}` maps a {} schema but this source is {}; pick the mapping written for it",
                        path.display(),
                        mapping.kind,
                        source.kind
                    ),
                ),
                Ok(mapping) => source.compiled_mapping = Some(std::sync::Arc::new(mapping)),
                Err(mapping_problems) => mapping_problems_found.extend(mapping_problems),
            }
        }

        problems.extend(mapping_problems_found);
        problems.extend(problems_later);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems })
        }
    }
}

fn check_url_scheme(
    url: &DatabaseUrl,
    kind: SourceKind,
    key: &str,
    problem: &mut impl FnMut(String, String),
) {
    let accepted: &[&str] = match kind {
        SourceKind::Postgres => &["postgres", "postgresql"],
        SourceKind::Mysql => &["mysql", "mariadb"],
    };
    if !accepted.contains(&url.scheme()) {
        problem(
            key.to_string(),
            format!(
                "scheme `{}` does not fit a {kind} database; use {}://user@host/db",
                url.scheme(),
                accepted[0]
            ),
        );
    }
    if url.database().is_none() {
        problem(
            key.to_string(),
            format!(
                "the URL names no database; add it as the path: {}://user@host/DBNAME",
                url.scheme()
            ),
        );
    }
}

fn is_simple_name(name: &str, max_len: usize) -> bool {
    !name.is_empty()
        && name.len() <= max_len
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Turns a `config` crate error into a problem naming the origin and the key.
fn describe_config_error(error: config::ConfigError, file: &str) -> ConfigError {
    use config::ConfigError as E;
    let (origin, key, message) = match error {
        E::NotFound(key) => (
            None,
            key,
            "required key is missing; add it (README.md lists every key)".to_string(),
        ),
        E::Type {
            origin,
            unexpected,
            expected,
            key,
        } => (
            origin,
            key.unwrap_or_default(),
            format!("expected {expected}, found {unexpected}"),
        ),
        E::At { error, origin, key } => (origin, key.unwrap_or_default(), inner_message(*error)),
        E::FileParse { cause, .. } => (
            Some(file.to_string()),
            String::new(),
            format!("not valid TOML: {cause}"),
        ),
        other => (None, String::new(), inner_message(other)),
    };
    let message = if message.contains("unknown field") {
        format!("{message}; remove it or correct the spelling")
    } else {
        message
    };
    ConfigError::one(attribute_origin(origin, file), normalize_key(&key), message)
}

fn inner_message(error: config::ConfigError) -> String {
    match error {
        config::ConfigError::Message(message) => message,
        other => other.to_string(),
    }
}

/// The `config` crate names an environment origin "the environment" and a
/// file by a path relative to the working directory; say which override or
/// which file the user wrote.
fn attribute_origin(origin: Option<String>, file: &str) -> String {
    match origin {
        Some(origin) if origin.contains("environment") => {
            let overrides: Vec<String> = std::env::vars()
                .map(|(name, _)| name)
                .filter(|name| name.starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}")))
                .collect();
            format!("environment ({})", overrides.join(", "))
        }
        _ => file.to_string(),
    }
}

/// `sources[0]url` (as the `config` crate joins an index and a field) →
/// `sources[0].url`.
fn normalize_key(key: &str) -> String {
    let mut normalized = String::with_capacity(key.len() + 2);
    let mut chars = key.chars().peekable();
    while let Some(c) = chars.next() {
        normalized.push(c);
        if c == ']'
            && chars
                .peek()
                .is_some_and(|next| *next != '[' && *next != '.')
        {
            normalized.push('.');
        }
    }
    normalized
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_crate_keys_get_their_missing_dot() {
        assert_eq!(normalize_key("sources[0]url"), "sources[0].url");
        assert_eq!(
            normalize_key("program.tiers[1][2]x"),
            "program.tiers[1][2].x"
        );
        assert_eq!(normalize_key("ledger.url"), "ledger.url");
    }

    #[test]
    fn database_url_never_shows_its_password() {
        let url = DatabaseUrl::try_from("postgres://app:hunter2@db:5432/pos".to_string()).unwrap();
        assert_eq!(url.to_string(), "postgres://app:***@db:5432/pos");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert_eq!(url.expose().password(), Some("hunter2"));
    }

    #[test]
    fn derived_server_ids_are_stable_and_in_range() {
        let id = derived_server_id("shop");
        assert_eq!(id, derived_server_id("shop"));
        assert_ne!(id, derived_server_id("shop2"));
        assert!(
            (DERIVED_SERVER_ID_BASE..DERIVED_SERVER_ID_BASE + DERIVED_SERVER_ID_SPAN).contains(&id)
        );
    }
}
