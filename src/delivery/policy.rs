//! The contact policy, judged before every send (and again when a held
//! message comes due): consent per channel, an address the provider needs,
//! cooldowns per trigger kind, frequency caps per channel, quiet hours.
//! A pure function of the member, the member's recent sends and the
//! clock, so every rule is tested without a network.

use chrono::{DateTime, Duration, NaiveTime, TimeZone, Utc};

use super::template::{Channel, ContactField};
use super::DeliverySettings;
use crate::ledger::members::Contact;

/// What to do with a message now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Send,
    /// Not now: due again at `until`.
    Hold {
        until: DateTime<Utc>,
        reason: String,
    },
    /// Not at all, for this reason.
    Suppress(String),
}

/// How far back [`judge`] needs the member's sends.
pub fn lookback(settings: &DeliverySettings) -> Duration {
    let longest = settings
        .cooldown_hours
        .values()
        .copied()
        .max()
        .unwrap_or(0)
        .max(24);
    Duration::hours(longest)
}

/// Whether [`judge`] looks at the member's recent sends for a message of
/// `trigger` on `channel`: only a cooldown of the trigger or a cap of the
/// channel does.
pub fn looks_back(settings: &DeliverySettings, channel: Channel, trigger: &str) -> bool {
    settings.cooldown_hours.contains_key(trigger)
        || settings.caps_per_day.contains_key(channel.as_str())
}

/// Judges one message of `(trigger, route)`. `recent` is what the member
/// was sent within [`lookback`]: `(channel, trigger, route, sent_at)`.
/// A cooldown counts sends of the same trigger through the same route: the
/// same occasion routed to e-mail and to a CRM webhook is not held back.
pub fn judge(
    settings: &DeliverySettings,
    channel: Channel,
    requires: &[ContactField],
    (trigger, route): (&str, &str),
    contact: &Contact,
    recent: &[crate::delivery::outbox::Sent],
    now: DateTime<Utc>,
) -> Decision {
    if contact.erased {
        return Decision::Suppress("the member was erased".into());
    }
    let consent = match channel {
        Channel::Email => (contact.email_opt_in == Some(true))
            .then_some(())
            .ok_or("no email consent"),
        Channel::Sms | Channel::Messaging => (contact.sms_opt_in == Some(true))
            .then_some(())
            .ok_or(match channel {
                Channel::Sms => "no SMS consent",
                _ => "no messaging consent (the SMS opt-in)",
            }),
        Channel::Push => {
            if contact.push_opt_in == Some(false) {
                Err("push opted out")
            } else if contact.push_token.as_deref().unwrap_or("").is_empty() {
                Err("no push token")
            } else {
                Ok(())
            }
        }
        Channel::Webhook => Ok(()),
    };
    if let Err(reason) = consent {
        return Decision::Suppress(reason.into());
    }
    if let Some(field) = missing(requires, contact) {
        return Decision::Suppress(format!("no {} for this member", field.as_str()));
    }
    if let Some(hours) = settings.cooldown_hours.get(trigger) {
        let since = now - Duration::hours(*hours);
        if recent
            .iter()
            .any(|(_, t, r, at)| t == trigger && r == route && *at > since)
        {
            return Decision::Suppress(format!(
                "cooldown: a {trigger} message went to this member within {hours} h"
            ));
        }
    }
    if let Some(cap) = settings.caps_per_day.get(channel.as_str()) {
        let since = now - Duration::hours(24);
        let sent = recent
            .iter()
            .filter(|(c, _, _, at)| c == channel.as_str() && *at > since)
            .count() as i64;
        if sent >= *cap {
            return Decision::Suppress(format!(
                "frequency cap: {sent} {} messages in 24 h (cap {cap})",
                channel.as_str()
            ));
        }
    }
    if settings
        .quiet_hours
        .channels
        .iter()
        .any(|c| c == channel.as_str())
    {
        let zone: chrono_tz::Tz = contact
            .timezone
            .as_deref()
            .and_then(|z| z.parse().ok())
            .or_else(|| settings.default_timezone.parse().ok())
            .unwrap_or(chrono_tz::UTC);
        let (start, end) = settings.quiet_hours.times();
        if let Some(until) = quiet_until(now, zone, start, end) {
            return Decision::Hold {
                until,
                reason: format!(
                    "quiet hours {}–{} in {zone}: held until {}",
                    settings.quiet_hours.start,
                    settings.quiet_hours.end,
                    until.with_timezone(&zone).format("%Y-%m-%d %H:%M %Z")
                ),
            };
        }
    }
    Decision::Send
}

/// When the quiet hours `start`–`end` (local, may wrap midnight) that
/// `now` falls in end; `None` outside them.
fn quiet_until(
    now: DateTime<Utc>,
    zone: chrono_tz::Tz,
    start: NaiveTime,
    end: NaiveTime,
) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&zone);
    let time = local.time();
    let date = local.date_naive();
    let end_date = if start > end {
        // Overnight (21:00–08:00): quiet in the evening until tomorrow's
        // end, or in the early morning until today's.
        if time >= start {
            date.succ_opt()?
        } else if time < end {
            date
        } else {
            return None;
        }
    } else if time >= start && time < end {
        date
    } else {
        return None;
    };
    let naive = end_date.and_time(end);
    // A clock change inside the hour of `end`: take the first valid
    // instant, or an hour later when the local time does not exist.
    let until = zone.from_local_datetime(&naive).earliest().or_else(|| {
        zone.from_local_datetime(&(naive + Duration::hours(1)))
            .earliest()
    })?;
    Some(until.with_timezone(&Utc))
}

/// The first of `requires` the member has no value for.
pub fn missing(requires: &[ContactField], contact: &Contact) -> Option<ContactField> {
    requires.iter().copied().find(|field| {
        let value = match field {
            ContactField::Email => &contact.email,
            ContactField::Phone => &contact.phone,
            ContactField::PushToken => &contact.push_token,
            ContactField::LineUserId => &contact.line_user_id,
        };
        value.as_deref().unwrap_or("").is_empty()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `judge` for a template that requires nothing, through route `r`.
    fn judged(
        settings: &DeliverySettings,
        channel: Channel,
        trigger: &str,
        contact: &Contact,
        recent: &[crate::delivery::outbox::Sent],
        now: DateTime<Utc>,
    ) -> Decision {
        judge(settings, channel, &[], (trigger, "r"), contact, recent, now)
    }

    fn contact() -> Contact {
        Contact {
            member_id: 1,
            email: Some("a@shop.test".into()),
            phone: Some("+4915112345678".into()),
            email_opt_in: Some(true),
            sms_opt_in: Some(true),
            timezone: Some("Europe/Berlin".into()),
            ..Contact::default()
        }
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn sms_at_23_member_time_is_held_until_8() {
        let settings = DeliverySettings::default();
        // 23:00 in Berlin (CET, UTC+1) on 2026-11-25.
        let decision = judged(
            &settings,
            Channel::Sms,
            "tier_upgrade",
            &contact(),
            &[],
            at("2026-11-25T22:00:00Z"),
        );
        match decision {
            Decision::Hold { until, .. } => assert_eq!(until, at("2026-11-26T07:00:00Z")),
            other => panic!("{other:?}"),
        }
        // 06:30 the next morning: held until 08:00 that day.
        let decision = judged(
            &settings,
            Channel::Sms,
            "tier_upgrade",
            &contact(),
            &[],
            at("2026-11-26T05:30:00Z"),
        );
        assert!(
            matches!(decision, Decision::Hold { until, .. } if until == at("2026-11-26T07:00:00Z"))
        );
        // 08:00 sharp: sent. E-mail is not held at night.
        assert_eq!(
            judged(
                &settings,
                Channel::Sms,
                "tier_upgrade",
                &contact(),
                &[],
                at("2026-11-26T07:00:00Z")
            ),
            Decision::Send
        );
        assert_eq!(
            judged(
                &settings,
                Channel::Email,
                "tier_upgrade",
                &contact(),
                &[],
                at("2026-11-25T22:00:00Z")
            ),
            Decision::Send
        );
    }

    #[test]
    fn no_consent_no_address_cap_and_cooldown_suppress_with_a_reason() {
        let settings = DeliverySettings::default();
        let now = at("2026-11-25T12:00:00Z");
        let mut no_email = contact();
        no_email.email_opt_in = None;
        assert_eq!(
            judged(&settings, Channel::Email, "welcome", &no_email, &[], now),
            Decision::Suppress("no email consent".into())
        );
        let mut no_phone = contact();
        no_phone.phone = None;
        assert_eq!(
            judge(
                &settings,
                Channel::Sms,
                &[ContactField::Phone],
                ("welcome", "r"),
                &no_phone,
                &[],
                now
            ),
            Decision::Suppress("no phone for this member".into())
        );
        assert_eq!(
            judged(&settings, Channel::Push, "welcome", &contact(), &[], now),
            Decision::Suppress("no push token".into())
        );
        let sent = |c: &str, t: &str, hours_ago: i64| {
            (
                c.to_string(),
                t.to_string(),
                "r".to_string(),
                now - Duration::hours(hours_ago),
            )
        };
        let recent = [
            sent("email", "welcome", 1),
            sent("email", "milestone", 2),
            sent("email", "redemption", 30),
        ];
        assert_eq!(
            judged(
                &settings,
                Channel::Email,
                "tier_upgrade",
                &contact(),
                &recent[..2],
                now
            ),
            Decision::Send
        );
        let recent3 = [
            sent("email", "welcome", 1),
            sent("email", "milestone", 2),
            sent("email", "redemption", 3),
        ];
        assert_eq!(
            judged(
                &settings,
                Channel::Email,
                "tier_upgrade",
                &contact(),
                &recent3,
                now
            ),
            Decision::Suppress("frequency cap: 3 email messages in 24 h (cap 3)".into())
        );
        let lapse = [sent("push", "lapse_risk", 100)];
        assert!(matches!(
            judged(&settings, Channel::Email, "lapse_risk", &contact(), &lapse, now),
            Decision::Suppress(reason) if reason.starts_with("cooldown")
        ));
        // The same occasion through another route is not held back.
        assert_eq!(
            judge(
                &settings,
                Channel::Email,
                &[],
                ("lapse_risk", "crm"),
                &contact(),
                &lapse,
                now
            ),
            Decision::Send
        );
        let _ = recent;
    }
}
