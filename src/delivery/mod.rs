//! Delivery: the outbox worker. Rows written by `triggers` in the ledger
//! transaction that caused them are claimed (`FOR UPDATE SKIP LOCKED`),
//! judged by the contact policy (consent, quiet hours, caps, cooldowns),
//! rendered through their provider's template, signed where the template
//! says so, and sent; every attempt and every policy decision is recorded.
//!
//! - `template.rs`: provider templates (`connectors/providers/*.toml`).
//! - `sign.rs`: Standard Webhooks v1 signatures.
//! - `outbox.rs`: the outbox and the tables of delivery state.
//! - `policy.rs`: consent, quiet hours, frequency caps, cooldowns.
//! - `worker.rs`: claims, sends, retries, dead letters.

pub mod erase;
pub mod outbox;
pub mod policy;
pub mod sign;
pub mod template;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{DateTime, NaiveTime, Utc};
use serde::Deserialize;

/// `[delivery]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    /// Run the delivery worker in `run` (default true). Off: triggers
    /// still fill the outbox, for another process to deliver.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Attempts per message before it goes to the dead letters (default 12:
    /// with the default backoff, about a day).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// First retry delay in milliseconds (default 1000); doubles per
    /// attempt, ±50 % jitter.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Longest retry delay in seconds (default 3600). A `Retry-After` is
    /// honoured up to a day.
    #[serde(default = "default_max_backoff_seconds")]
    pub max_backoff_seconds: u64,
    /// Request timeout in seconds (default 10): a timeout is retried.
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
    /// Messages in flight at most, over all providers (default 32).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// How often an idle worker looks for due messages, in milliseconds
    /// (default 100).
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Time zone of members whose profile states none (IANA name, default
    /// `UTC`), for quiet hours.
    #[serde(default = "default_timezone")]
    pub default_timezone: String,
    /// `[delivery.quiet_hours]`: no messages on these channels between
    /// `start` and `end` in the member's time zone; held until `end`.
    #[serde(default)]
    pub quiet_hours: QuietHours,
    /// Messages per member per channel in any 24 hours, e.g.
    /// `{ email = 2, sms = 1 }` (default: email 3, sms 2, push 4,
    /// messaging 2; webhook unlimited). Beyond: suppressed.
    #[serde(default = "default_caps")]
    pub caps_per_day: BTreeMap<String, i64>,
    /// Hours before the same trigger kind goes to the same member again,
    /// e.g. `{ lapse_risk = 168 }` (default: lapse_risk 168,
    /// points_expiring 72, replenishment_due 72, price_drop 24). Within:
    /// suppressed.
    #[serde(default = "default_cooldowns")]
    pub cooldown_hours: BTreeMap<String, i64>,
}

/// `[delivery.quiet_hours]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuietHours {
    /// Local time the quiet hours begin (default `21:00`).
    #[serde(default = "default_quiet_start")]
    pub start: String,
    /// Local time they end and held messages go (default `08:00`).
    #[serde(default = "default_quiet_end")]
    pub end: String,
    /// Channels they apply to (default `["sms"]`).
    #[serde(default = "default_quiet_channels")]
    pub channels: Vec<String>,
}

impl Default for QuietHours {
    fn default() -> Self {
        Self {
            start: default_quiet_start(),
            end: default_quiet_end(),
            channels: default_quiet_channels(),
        }
    }
}

impl QuietHours {
    /// `(start, end)`; validated at start.
    pub fn times(&self) -> (NaiveTime, NaiveTime) {
        let parse = |t: &str, fallback: u32| {
            NaiveTime::parse_from_str(t, "%H:%M")
                .unwrap_or_else(|_| NaiveTime::from_hms_opt(fallback, 0, 0).unwrap_or_default())
        };
        (parse(&self.start, 21), parse(&self.end, 8))
    }
}

fn yes() -> bool {
    true
}
fn default_max_attempts() -> i32 {
    12
}
fn default_initial_backoff_ms() -> u64 {
    1000
}
fn default_max_backoff_seconds() -> u64 {
    3600
}
fn default_timeout_seconds() -> u64 {
    10
}
fn default_concurrency() -> u32 {
    32
}
fn default_poll_interval_ms() -> u64 {
    100
}
fn default_timezone() -> String {
    "UTC".into()
}
fn default_quiet_start() -> String {
    "21:00".into()
}
fn default_quiet_end() -> String {
    "08:00".into()
}
fn default_quiet_channels() -> Vec<String> {
    vec!["sms".into()]
}
fn default_caps() -> BTreeMap<String, i64> {
    [("email", 3), ("sms", 2), ("push", 4), ("messaging", 2)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}
fn default_cooldowns() -> BTreeMap<String, i64> {
    [
        ("lapse_risk", 168),
        ("points_expiring", 72),
        ("replenishment_due", 72),
        ("price_drop", 24),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            max_attempts: default_max_attempts(),
            initial_backoff_ms: default_initial_backoff_ms(),
            max_backoff_seconds: default_max_backoff_seconds(),
            timeout_seconds: default_timeout_seconds(),
            concurrency: default_concurrency(),
            poll_interval_ms: default_poll_interval_ms(),
            default_timezone: default_timezone(),
            quiet_hours: QuietHours::default(),
            caps_per_day: default_caps(),
            cooldown_hours: default_cooldowns(),
        }
    }
}

const TRIGGER_NAMES: [&str; 11] = [
    "welcome",
    "points_earned",
    "tier_upgrade",
    "tier_downgrade",
    "milestone",
    "redemption",
    "lapse_risk",
    "replenishment_due",
    "points_expiring",
    "price_drop",
    "segment_entered",
];

impl DeliverySettings {
    /// What the types cannot check: key and fix.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut problem =
            |key: &str, message: String| problems.push((format!("delivery.{key}"), message));
        if self.max_attempts < 1 {
            problem("max_attempts", "use 1 or more (default 12)".into());
        }
        if self.timeout_seconds == 0 {
            problem("timeout_seconds", "use 1 or more (default 10)".into());
        }
        if self.concurrency == 0 {
            problem("concurrency", "use 1 or more (default 32)".into());
        }
        if self.default_timezone.parse::<chrono_tz::Tz>().is_err() {
            problem(
                "default_timezone",
                format!(
                    "`{}` is not an IANA time zone; use e.g. Europe/Berlin or UTC",
                    self.default_timezone
                ),
            );
        }
        for (key, value) in [
            ("start", &self.quiet_hours.start),
            ("end", &self.quiet_hours.end),
        ] {
            if NaiveTime::parse_from_str(value, "%H:%M").is_err() {
                problem(
                    &format!("quiet_hours.{key}"),
                    format!("`{value}` is not a time of day; use HH:MM, e.g. 21:00"),
                );
            }
        }
        for channel in self
            .quiet_hours
            .channels
            .iter()
            .chain(self.caps_per_day.keys())
        {
            if template::Channel::parse(channel).is_none() {
                problem(
                    "caps_per_day",
                    format!(
                        "`{channel}` is not a channel; use email, sms, push, messaging or webhook"
                    ),
                );
            }
        }
        for (trigger, hours) in &self.cooldown_hours {
            if !TRIGGER_NAMES.contains(&trigger.as_str()) || *hours < 0 {
                problem(
                    &format!("cooldown_hours.{trigger}"),
                    format!(
                        "`{trigger} = {hours}` is not a trigger with hours ≥ 0; triggers are {}",
                        TRIGGER_NAMES.join(", ")
                    ),
                );
            }
        }
        problems
    }
}

/// Delivery's wall clock (business time is source time; only delivery and
/// the scheduler read the clock). Tests set it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that stands still until moved (tests: quiet hours, caps,
/// backoff).
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
