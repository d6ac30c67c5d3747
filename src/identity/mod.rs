//! Who a member is: identifiers normalized, placeholders blocked, and the
//! rules by which identifiers seen together link members. The linking
//! itself runs inside the ledger transaction (`ledger::members`), with the
//! rules from here.
//!
//! - email: trimmed, lower-cased; must look like `local@domain.tld`.
//! - phone: E.164 (`phonenumber`, with the configured default region for
//!   numbers written without a country code); unparsable → not used.
//! - card: the digits and letters of the card number, upper-cased.
//! - customer: the source's own customer id, as `<source>:<id>`.
//!
//! Blocked placeholders (empty, `0000…`, one digit repeated, configured
//! patterns) are dropped: an order that has no other identifier is
//! anonymous — counted, never quarantined, earning nothing.

use std::collections::BTreeMap;
use std::fmt;

use regex::RegexSet;
use serde::Deserialize;

use crate::normalize::RawIdentifiers;

/// Kinds of identifier, strongest first: when several members are seen
/// together, a shared value is looked for among the weakest kinds first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentifierKind {
    Customer,
    Email,
    Phone,
    Card,
}

impl IdentifierKind {
    pub const ALL: [Self; 4] = [Self::Customer, Self::Email, Self::Phone, Self::Card];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Email => "email",
            Self::Phone => "phone",
            Self::Card => "card",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// A normalized identifier.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identifier {
    pub kind: IdentifierKind,
    pub value: String,
}

impl Identifier {
    /// For people and logs: the kind and a masked value (`e***@example.com`,
    /// `+49******89`), never the whole value.
    pub fn masked(&self) -> String {
        mask(self.kind, &self.value)
    }
}

impl fmt::Display for Identifier {
    /// Masked: identifiers are PII.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.masked())
    }
}

/// Masks all but a little of a value.
pub fn mask(kind: IdentifierKind, value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    match kind {
        IdentifierKind::Email => match value.split_once('@') {
            Some((local, domain)) => {
                let first: String = local.chars().take(1).collect();
                format!("{first}***@{domain}")
            }
            None => "***".into(),
        },
        IdentifierKind::Customer => value.to_string(),
        _ if chars.len() <= 4 => "*".repeat(chars.len()),
        _ => {
            let head: String = chars[..3.min(chars.len() - 2)].iter().collect();
            let tail: String = chars[chars.len() - 2..].iter().collect();
            format!("{head}{}{tail}", "*".repeat(chars.len() - head.len() - 2))
        }
    }
}

/// Why these defaults: the placeholders tills and shops really write when a
/// field is required but unknown.
pub const DEFAULT_BLOCKED: &[&str] = &[
    r"^email:(no-?reply|none|null|nobody|unknown|test|n/?a)@",
    r"^email:.*@(example\.(com|org|net)|test\.com|localhost)$",
    r"^customer:[^:]*:0*$",
];

/// Identifiers of one kind a member may gather before a value that keeps
/// linking strangers is treated as shared (a cashier's default card, a
/// store's phone number). A family sharing a card stays within these.
const DEFAULT_LIMIT_EMAIL: usize = 3;
const DEFAULT_LIMIT_PHONE: usize = 3;
const DEFAULT_LIMIT_CARD: usize = 3;
const DEFAULT_LIMIT_CUSTOMER: usize = 5;

/// `[identity]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentitySettings {
    /// ISO 3166 region for phone numbers written without a country code
    /// (`DE`, `US`). Without it such numbers are not used.
    #[serde(default)]
    pub default_region: Option<String>,
    /// Extra blocked patterns (regular expressions) over `kind:value` of the
    /// normalized identifier, e.g. `^card:999999` or `^email:.*@mystore\.com$`.
    /// Added to the built-in ones (see README).
    #[serde(default)]
    pub blocked: Vec<String>,
    /// Most identifiers of each kind one member may have, e.g.
    /// `{ email = 3, phone = 3, card = 3, customer = 5 }`.
    #[serde(default)]
    pub limits: BTreeMap<IdentifierKind, usize>,
}

impl IdentitySettings {
    /// Problems with the settings, as `(key, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(region) = &self.default_region {
            if region.parse::<phonenumber::country::Id>().is_err() {
                problems.push((
                    "identity.default_region".into(),
                    format!("`{region}` is not an ISO 3166 region code; use e.g. `DE` or `US`"),
                ));
            }
        }
        for (i, pattern) in self.blocked.iter().enumerate() {
            if let Err(e) = regex::Regex::new(pattern) {
                problems.push((
                    format!("identity.blocked[{i}]"),
                    format!("not a valid regular expression: {e}"),
                ));
            }
        }
        for (kind, limit) in &self.limits {
            if *limit == 0 {
                problems.push((
                    format!("identity.limits.{}", kind.as_str()),
                    "must be at least 1".into(),
                ));
            }
        }
        problems
    }
}

/// The identity rules, ready to use.
#[derive(Debug, Clone)]
pub struct Identity {
    region: Option<phonenumber::country::Id>,
    blocked: RegexSet,
    limits: BTreeMap<IdentifierKind, usize>,
}

impl Identity {
    /// From validated settings (see [`IdentitySettings::problems`]).
    pub fn new(settings: &IdentitySettings) -> Result<Self, String> {
        let patterns = DEFAULT_BLOCKED
            .iter()
            .map(|p| p.to_string())
            .chain(settings.blocked.iter().cloned());
        let blocked = RegexSet::new(patterns).map_err(|e| e.to_string())?;
        let region = settings
            .default_region
            .as_deref()
            .map(|r| r.parse().map_err(|_| format!("unknown region `{r}`")))
            .transpose()?;
        let mut limits = BTreeMap::from([
            (IdentifierKind::Email, DEFAULT_LIMIT_EMAIL),
            (IdentifierKind::Phone, DEFAULT_LIMIT_PHONE),
            (IdentifierKind::Card, DEFAULT_LIMIT_CARD),
            (IdentifierKind::Customer, DEFAULT_LIMIT_CUSTOMER),
        ]);
        limits.extend(settings.limits.iter().map(|(k, v)| (*k, *v)));
        Ok(Self {
            region,
            blocked,
            limits,
        })
    }

    /// Most identifiers of `kind` one member may have.
    pub fn limit(&self, kind: IdentifierKind) -> usize {
        self.limits[&kind]
    }

    /// The usable identifiers among what a source wrote, normalized, with
    /// placeholders dropped.
    pub fn identifiers(&self, source: &str, raw: &RawIdentifiers) -> Vec<Identifier> {
        let mut found = Vec::new();
        let mut add = |kind: IdentifierKind, value: Option<String>| {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                let identifier = Identifier { kind, value };
                if !self.is_blocked(&identifier) && !found.contains(&identifier) {
                    found.push(identifier);
                }
            }
        };
        add(
            IdentifierKind::Customer,
            raw.customer
                .as_deref()
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(|c| format!("{source}:{c}")),
        );
        add(
            IdentifierKind::Email,
            raw.email.as_deref().and_then(normalize_email),
        );
        add(
            IdentifierKind::Phone,
            raw.phone.as_deref().and_then(|p| self.normalize_phone(p)),
        );
        add(
            IdentifierKind::Card,
            raw.card.as_deref().and_then(normalize_card),
        );
        found
    }

    fn is_blocked(&self, identifier: &Identifier) -> bool {
        self.blocked.is_match(&format!(
            "{}:{}",
            identifier.kind.as_str(),
            identifier.value
        ))
    }

    /// An identifier as a person types it (`member show`, the API),
    /// normalized the way the ledger stores it: an email, a phone number
    /// with `+`, or `card:`, `customer:`, `email:`, `phone:` and the value.
    pub fn parse_typed(&self, text: &str) -> Result<Identifier, String> {
        let (kind, value) = match text.split_once(':') {
            Some(("card", v)) => (IdentifierKind::Card, normalize_card(v)),
            Some(("customer", v)) => (IdentifierKind::Customer, Some(v.to_string())),
            Some(("email", v)) => (IdentifierKind::Email, normalize_email(v)),
            Some(("phone", v)) => (IdentifierKind::Phone, self.normalize_phone(v)),
            _ if text.contains('@') => (IdentifierKind::Email, normalize_email(text)),
            _ if text.starts_with('+') => (IdentifierKind::Phone, self.normalize_phone(text)),
            _ => {
                return Err(format!(
                    "`{text}` is not an identifier; write an email, a phone number with +country code, card:NUMBER, customer:SOURCE:ID or member:ID"
                ))
            }
        };
        let value = value.ok_or_else(|| format!("`{text}` is not a valid {}", kind.as_str()))?;
        Ok(Identifier { kind, value })
    }

    /// Whether a value as a source wrote it is one of `identifiers` once
    /// normalized (an erased member's email, phone or card in a stored
    /// source row).
    pub fn is_one_of(&self, raw: &str, identifiers: &[Identifier]) -> bool {
        identifiers.iter().any(|identifier| {
            let normalized = match identifier.kind {
                IdentifierKind::Email => normalize_email(raw),
                IdentifierKind::Phone => self.normalize_phone(raw),
                IdentifierKind::Card => normalize_card(raw),
                // A source's own customer id is a key, not a contact.
                IdentifierKind::Customer => None,
            };
            normalized.as_deref() == Some(identifier.value.as_str())
        })
    }

    /// E.164, or `None` for what is not a valid number.
    pub fn normalize_phone(&self, raw: &str) -> Option<String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return None;
        }
        // `00` is the international call prefix in most of the world.
        let international = raw.strip_prefix("00").map(|rest| format!("+{rest}"));
        let raw = international.as_deref().unwrap_or(raw);
        let region = if raw.starts_with('+') {
            None
        } else {
            Some(self.region?)
        };
        let number = phonenumber::parse(region, raw).ok()?;
        if !phonenumber::is_valid(&number) {
            return None;
        }
        Some(number.format().mode(phonenumber::Mode::E164).to_string())
    }
}

/// Trimmed and lower-cased; `None` unless it looks like `local@domain.tld`.
/// Odoo's free-text email field may hold several addresses: the first one
/// counts.
pub fn normalize_email(raw: &str) -> Option<String> {
    let first = raw.split([',', ';']).next()?.trim();
    let first = first
        .rsplit_once('<')
        .and_then(|(_, rest)| rest.strip_suffix('>'))
        .unwrap_or(first)
        .trim()
        .to_lowercase();
    let (local, domain) = first.split_once('@')?;
    let valid = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !first.chars().any(char::is_whitespace)
        && !domain.contains('@');
    valid.then_some(first)
}

/// Digits and letters, upper-cased; a run of one repeated character
/// (`0000`, `1111`) or fewer than 4 characters is a placeholder.
pub fn normalize_card(raw: &str) -> Option<String> {
    let card: String = raw
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    let first = card.chars().next()?;
    if card.len() < 4 || card.chars().all(|c| c == first) {
        return None;
    }
    Some(card)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity::new(&IdentitySettings {
            default_region: Some("DE".into()),
            blocked: vec![r"^card:99".into()],
            limits: BTreeMap::new(),
        })
        .unwrap()
    }

    #[test]
    fn identifiers_are_normalized_and_placeholders_dropped() {
        let found = identity().identifiers(
            "shop",
            &RawIdentifiers {
                customer: Some("42".into()),
                email: Some("  Anna.Schmidt@Example.DE ".into()),
                phone: Some("030 1234567".into()),
                card: Some("4000-1234-5678".into()),
            },
        );
        let values: Vec<String> = found
            .iter()
            .map(|i| format!("{}={}", i.kind.as_str(), i.value))
            .collect();
        assert_eq!(
            values,
            [
                "customer=shop:42",
                "email=anna.schmidt@example.de",
                "phone=+49301234567",
                "card=400012345678"
            ]
        );
        let none = identity().identifiers(
            "shop",
            &RawIdentifiers {
                customer: Some("0".into()),
                email: Some("noreply@shop.de".into()),
                phone: Some("000".into()),
                card: Some("0000 0000".into()),
            },
        );
        assert!(none.is_empty(), "{none:?}");
        let configured = identity().identifiers(
            "pos",
            &RawIdentifiers {
                card: Some("9912345".into()),
                email: Some("someone@example.com".into()),
                ..Default::default()
            },
        );
        assert!(
            configured.is_empty(),
            "configured and built-in patterns block: {configured:?}"
        );
    }

    #[test]
    fn phones_need_a_country_code_or_a_default_region() {
        let without = Identity::new(&IdentitySettings::default()).unwrap();
        assert_eq!(without.normalize_phone("030 1234567"), None);
        assert_eq!(
            without.normalize_phone("+1 415 555 2671").as_deref(),
            Some("+14155552671")
        );
        assert_eq!(
            identity().normalize_phone("0049 30 1234567").as_deref(),
            Some("+49301234567")
        );
    }

    #[test]
    fn masks_keep_little_of_a_value() {
        assert_eq!(
            mask(IdentifierKind::Email, "anna@example.de"),
            "a***@example.de"
        );
        assert_eq!(mask(IdentifierKind::Phone, "+49301234567"), "+49*******67");
        assert_eq!(mask(IdentifierKind::Card, "1234"), "****");
    }

    #[test]
    fn odoo_style_multi_address_fields_use_the_first_address() {
        assert_eq!(
            normalize_email("Anna <ANNA@x.de>, bob@y.de").as_deref(),
            Some("anna@x.de")
        );
        assert_eq!(normalize_email("not an email"), None);
        assert_eq!(normalize_email("a@b"), None);
    }
}
