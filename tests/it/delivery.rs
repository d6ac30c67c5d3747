//! Delivery against real HTTP servers on 127.0.0.1: every provider
//! template's exact request, Standard Webhooks signatures verified by an
//! independent implementation, retries, dead letters, disabled endpoints,
//! the contact policy on a controlled clock, and a crash mid-send.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use loyalty_cdc::config::Settings;
use loyalty_cdc::delivery::outbox::{self, NewMessage};
use loyalty_cdc::delivery::worker::Worker;
use loyalty_cdc::delivery::ManualClock;
use loyalty_cdc::ledger::db::Db;
use serde_json::json;

use crate::support::receiver::{Receiver, Reply};
use crate::support::{run_cli, PgDatabase};

use crate::support::WEBHOOK_SECRET as SIGNING_SECRET;

fn providers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/providers")
}

struct Fixture {
    _ledger_db: PgDatabase,
    db: Db,
    settings: Settings,
    path: PathBuf,
}

/// A migrated ledger and a configuration with `body` after `[ledger]`.
async fn fixture(body: &str) -> Fixture {
    crate::support::init_logging();
    let ledger_db = PgDatabase::create("dlv").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let dir = std::env::temp_dir().join(format!("lcdc_cfg_{}", ledger_db.name));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("loyalty-cdc.toml");
    let text = format!(
        "[ledger]\nurl = \"{}\"\n{}\n[api]\nlisten = \"127.0.0.1:0\"\n",
        ledger_db.url(),
        body.replace("PROVIDERS", &providers_dir().display().to_string())
    );
    std::fs::write(&path, text).unwrap();
    let settings = Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    Fixture {
        db: Db::new(client),
        _ledger_db: ledger_db,
        settings,
        path,
    }
}

/// A member with every address and consent; returns its id.
async fn member(db: &Db, timezone: &str, sms_opt_in: bool) -> i64 {
    let client = db.client();
    let id: i64 = client
        .query_one(
            "INSERT INTO members (created_at, tier) VALUES (now(), 'gold') RETURNING member_id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    client
        .execute(
            "INSERT INTO member_identifiers (kind, value, member_id, first_source, first_seen_at)
             VALUES ('email', 'mara.' || $1::bigint || '@shop.test', $1, 'shop', now()),
                    ('phone', '+4915112345' || lpad($1::text, 3, '0'), $1, 'pos', now())",
            &[&id],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO balances (member_id, available, pending, lifetime, updated_at) VALUES ($1, 1200, 30, 1500, now())",
            &[&id],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO member_profiles (member_id, email_opt_in, sms_opt_in, push_opt_in, timezone, locale,
                                          push_token, line_user_id, updated_at)
             VALUES ($1, true, $2, true, $3, 'de_DE', 'fcm-token-' || $1::bigint, 'U' || $1::bigint, now())",
            &[&id, &sms_opt_in, &timezone],
        )
        .await
        .unwrap();
    id
}

/// A tier-upgrade message for `member` through `route`; returns its id.
async fn enqueue(fx: &Fixture, member: i64, route: &str, occasion: &str) -> uuid::Uuid {
    let config = fx
        .settings
        .triggers
        .routes
        .iter()
        .find(|r| r.route_name() == route)
        .unwrap_or_else(|| panic!("no route {route}"));
    let provider = fx
        .settings
        .providers
        .iter()
        .find(|p| p.name == config.provider)
        .unwrap();
    let channel = provider.compiled.as_ref().unwrap().channel;
    let key = format!("{occasion}:{route}");
    outbox::enqueue(
        &fx.db,
        &[NewMessage {
            dedupe_key: key.clone(),
            member,
            trigger: config.trigger.as_str(),
            route: route.to_string(),
            provider: provider.name.clone(),
            channel,
            occurred_at: Utc.with_ymd_and_hms(2026, 11, 25, 11, 0, 0).unwrap(),
            payload: json!({ "trigger": {
                "kind": config.trigger.as_str(),
                "occurred_at": "2026-11-25T11:00:00Z",
                "data": { "tier": "gold", "previous_tier": "silver" },
            }}),
        }],
    )
    .await
    .unwrap();
    // Due since long ago, whatever the wall clock says: the tests run the
    // worker on a clock of their own.
    fx.db
        .client()
        .query_one(
            "UPDATE outbox SET next_attempt_at = '2000-01-01T00:00:00Z'
              WHERE dedupe_key = $1 AND status = 'pending' RETURNING message_id",
            &[&key],
        )
        .await
        .map(|row| row.get(0))
        .unwrap_or(uuid::Uuid::nil())
}

/// (status, attempts, status_reason) of a message.
async fn state(db: &Db, id: uuid::Uuid) -> (String, i32, Option<String>) {
    let row = db
        .client()
        .query_one(
            "SELECT status, attempts, status_reason FROM outbox WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn next_attempt(db: &Db, id: uuid::Uuid) -> DateTime<Utc> {
    db.client()
        .query_one(
            "SELECT next_attempt_at FROM outbox WHERE message_id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

fn all_providers_config(url: &str) -> String {
    format!(
        r#"
[delivery]
quiet_hours = {{ channels = [] }}

[[providers]]
name = "klaviyo"
template = "PROVIDERS/klaviyo.toml"
base_url = "{url}/klaviyo"
secrets.api_key = "pk_test_klaviyo"

[[providers]]
name = "sendgrid"
template = "PROVIDERS/sendgrid.toml"
base_url = "{url}/sendgrid"
secrets.api_key = "SG.test"
settings.from_email = "club@shop.test"

[[providers]]
name = "braze"
template = "PROVIDERS/braze.toml"
base_url = "{url}/braze"
secrets.api_key = "braze-key"

[[providers]]
name = "twilio"
template = "PROVIDERS/twilio.toml"
base_url = "{url}/twilio"
secrets.account_sid = "AC123"
secrets.auth_token = "tok"
settings.from = "+15005550006"

[[providers]]
name = "fcm"
template = "PROVIDERS/fcm.toml"
base_url = "{url}/fcm"
secrets.access_token = "ya29.test"
settings.project_id = "shop-app"

[[providers]]
name = "onesignal"
template = "PROVIDERS/onesignal.toml"
base_url = "{url}/onesignal"
secrets.api_key = "os_v2_app_test"
settings.app_id = "8f3c0b6e-0000-4000-8000-000000000001"

[[providers]]
name = "whatsapp"
template = "PROVIDERS/whatsapp.toml"
base_url = "{url}/whatsapp"
secrets.access_token = "EAAG-test"
settings.phone_number_id = "106540352242922"

[[providers]]
name = "line"
template = "PROVIDERS/line.toml"
base_url = "{url}/line"
secrets.channel_access_token = "line-token"

[[providers]]
name = "webhook"
template = "PROVIDERS/webhook.toml"
base_url = "{url}/hooks/loyalty"
secrets.signing_secret = "{SIGNING_SECRET}"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "klaviyo"
params.metric_name = "Tier Upgrade"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "sendgrid"
params.template_id = "d-1234567890abcdef"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "braze"
params.campaign_id = "camp-42"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "twilio"
params.text = "You are {{{{ trigger.data.tier }}}} now: {{{{ member.points.available }}}} points & more!"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "fcm"
params.title = "Welcome to {{{{ trigger.data.tier }}}}"
params.text = "{{{{ member.points.available }}}} points"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "onesignal"
params.title = "Gold!"
params.text = "You reached {{{{ trigger.data.tier }}}}"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "whatsapp"
params.template_name = "tier_upgrade"
params.language = "de"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "line"
params.text = "{{{{ trigger.data.tier }}}}!"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "webhook"
"#
    )
}

#[tokio::test]
async fn every_provider_receives_its_real_request_shape() {
    let receiver = Receiver::start(Reply::status(202).body(r#"{"ok":true}"#)).await;
    let fx = fixture(&all_providers_config(&receiver.url)).await;
    let member = member(&fx.db, "Europe/Berlin", true).await;
    let routes = [
        "tier_upgrade_klaviyo",
        "tier_upgrade_sendgrid",
        "tier_upgrade_braze",
        "tier_upgrade_twilio",
        "tier_upgrade_fcm",
        "tier_upgrade_onesignal",
        "tier_upgrade_whatsapp",
        "tier_upgrade_line",
        "tier_upgrade_webhook",
    ];
    let mut ids = std::collections::HashMap::new();
    for route in routes {
        ids.insert(
            route,
            enqueue(&fx, member, route, &format!("tier:gold:member:{member}")).await,
        );
    }
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let worker = Worker::new(&fx.settings, clock).await.unwrap();
    assert_eq!(worker.run_once().await.unwrap(), 9);
    for route in routes {
        assert_eq!(
            state(&fx.db, ids[route]).await,
            ("sent".into(), 1, None),
            "{route}"
        );
    }
    let requests = receiver.requests();
    let by_prefix = |prefix: &str| {
        let found: Vec<_> = requests
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .collect();
        assert_eq!(found.len(), 1, "one request to {prefix}");
        found[0].clone()
    };
    let id = |route: &str| ids[route].to_string();
    let email = format!("mara.{member}@shop.test");
    let phone = format!("+4915112345{member:03}");

    // Klaviyo: Create Event, JSON:API, unique_id is the message id.
    let r = by_prefix("/klaviyo");
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", "/klaviyo/api/events")
    );
    assert_eq!(
        r.header("authorization"),
        Some("Klaviyo-API-Key pk_test_klaviyo")
    );
    assert_eq!(r.header("revision"), Some("2026-10-15"));
    assert_eq!(r.header("content-type"), Some("application/vnd.api+json"));
    let body = r.json();
    let attributes = &body["data"]["attributes"];
    assert_eq!(body["data"]["type"], "event");
    assert_eq!(attributes["unique_id"], id("tier_upgrade_klaviyo"));
    assert_eq!(
        attributes["metric"]["data"]["attributes"]["name"],
        "Tier Upgrade"
    );
    assert_eq!(
        attributes["profile"]["data"]["attributes"]["email"],
        email.as_str()
    );
    assert_eq!(
        attributes["profile"]["data"]["attributes"]["external_id"],
        member.to_string()
    );
    assert_eq!(attributes["properties"]["trigger_data"]["tier"], "gold");
    assert_eq!(attributes["properties"]["points_available"], 1200);
    assert_eq!(attributes["time"], "2026-11-25T11:00:00Z");

    // SendGrid: v3 mail/send with a dynamic template.
    let r = by_prefix("/sendgrid");
    assert_eq!(r.path, "/sendgrid/v3/mail/send");
    assert_eq!(r.header("authorization"), Some("Bearer SG.test"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.json();
    assert_eq!(body["template_id"], "d-1234567890abcdef");
    assert_eq!(body["from"]["email"], "club@shop.test");
    assert_eq!(
        body["personalizations"][0]["to"][0]["email"],
        email.as_str()
    );
    assert_eq!(
        body["personalizations"][0]["dynamic_template_data"]["points"]["lifetime"],
        1500
    );
    assert_eq!(
        body["personalizations"][0]["custom_args"]["message_id"],
        id("tier_upgrade_sendgrid")
    );

    // Braze: campaigns/trigger/send to the external user id.
    let r = by_prefix("/braze");
    assert_eq!(r.path, "/braze/campaigns/trigger/send");
    assert_eq!(r.header("authorization"), Some("Bearer braze-key"));
    let body = r.json();
    assert_eq!(body["campaign_id"], "camp-42");
    assert_eq!(
        body["recipients"][0]["external_user_id"],
        member.to_string()
    );
    assert_eq!(
        body["recipients"][0]["trigger_properties"]["message_id"],
        id("tier_upgrade_braze")
    );

    // Twilio: Messages, form-encoded, basic auth.
    let r = by_prefix("/twilio");
    assert_eq!(r.path, "/twilio/2010-04-01/Accounts/AC123/Messages.json");
    assert_eq!(r.header("authorization"), Some("Basic QUMxMjM6dG9r"));
    assert_eq!(
        r.header("content-type"),
        Some("application/x-www-form-urlencoded")
    );
    let mut form = r.form();
    form.sort();
    assert_eq!(
        form,
        [
            (
                "Body".to_string(),
                "You are gold now: 1200 points & more!".to_string()
            ),
            ("From".to_string(), "+15005550006".to_string()),
            ("To".to_string(), phone.clone()),
        ]
    );

    // FCM HTTP v1: messages:send to the device token, data values strings.
    let r = by_prefix("/fcm");
    assert_eq!(r.path, "/fcm/v1/projects/shop-app/messages:send");
    assert_eq!(r.header("authorization"), Some("Bearer ya29.test"));
    let body = r.json();
    assert_eq!(body["message"]["token"], format!("fcm-token-{member}"));
    assert_eq!(body["message"]["notification"]["title"], "Welcome to gold");
    assert_eq!(body["message"]["notification"]["body"], "1200 points");
    assert_eq!(
        body["message"]["data"]["message_id"],
        id("tier_upgrade_fcm")
    );
    assert!(body["message"]["data"]
        .as_object()
        .unwrap()
        .values()
        .all(|v| v.is_string()));

    // OneSignal: notifications with idempotency_key.
    let r = by_prefix("/onesignal");
    assert_eq!(r.path, "/onesignal/notifications");
    assert_eq!(r.header("authorization"), Some("Key os_v2_app_test"));
    let body = r.json();
    assert_eq!(body["idempotency_key"], id("tier_upgrade_onesignal"));
    assert_eq!(body["app_id"], "8f3c0b6e-0000-4000-8000-000000000001");
    assert_eq!(
        body["include_aliases"]["external_id"][0],
        member.to_string()
    );
    assert_eq!(body["contents"]["en"], "You reached gold");

    // WhatsApp Cloud API: a template message to the number without '+'.
    let r = by_prefix("/whatsapp");
    assert_eq!(r.path, "/whatsapp/v25.0/106540352242922/messages");
    assert_eq!(r.header("authorization"), Some("Bearer EAAG-test"));
    let body = r.json();
    assert_eq!(body["messaging_product"], "whatsapp");
    assert_eq!(body["to"], phone.trim_start_matches('+'));
    assert_eq!(body["type"], "template");
    assert_eq!(body["template"]["name"], "tier_upgrade");
    assert_eq!(body["template"]["language"]["code"], "de");
    assert_eq!(
        body["template"]["components"][0]["parameters"][1]["text"],
        "1200"
    );

    // LINE: push with X-Line-Retry-Key.
    let r = by_prefix("/line");
    assert_eq!(r.path, "/line/v2/bot/message/push");
    assert_eq!(r.header("authorization"), Some("Bearer line-token"));
    assert_eq!(
        r.header("x-line-retry-key"),
        Some(id("tier_upgrade_line").as_str())
    );
    let body = r.json();
    assert_eq!(body["to"], format!("U{member}"));
    assert_eq!(
        body["messages"][0],
        json!({ "type": "text", "text": "gold!" })
    );

    // The generic webhook: Standard Webhooks, verified by the
    // `standardwebhooks` crate; no e-mail or phone in its body.
    let r = by_prefix("/hooks");
    assert_eq!(r.path, "/hooks/loyalty");
    assert_eq!(
        r.header("webhook-id"),
        Some(id("tier_upgrade_webhook").as_str())
    );
    standardwebhooks::Webhook::new(SIGNING_SECRET)
        .unwrap()
        .verify(&r.body, &r.headers)
        .expect("the signature verifies");
    let mut tampered = r.body.clone();
    tampered[5] ^= 1;
    assert!(standardwebhooks::Webhook::new(SIGNING_SECRET)
        .unwrap()
        .verify(&tampered, &r.headers)
        .is_err());
    let body = r.json();
    assert_eq!(body["type"], "loyalty.tier_upgrade");
    assert_eq!(body["data"]["trigger_data"]["tier"], "gold");
    assert_eq!(body["data"]["member"]["points"]["available"], 1200);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        !text.contains(&email) && !text.contains(&phone[1..]),
        "no PII in the generic body: {text}"
    );
}

fn webhook_config(url: &str, extra: &str) -> String {
    format!(
        r#"
[delivery]
initial_backoff_ms = 1000
timeout_seconds = 1
{extra}

[[providers]]
name = "webhook"
template = "PROVIDERS/webhook.toml"
base_url = "{url}/hook"
secrets.signing_secret = "{SIGNING_SECRET}"

[[providers]]
name = "sms"
template = "PROVIDERS/twilio.toml"
base_url = "{url}/twilio"
secrets.account_sid = "AC1"
secrets.auth_token = "t"
settings.from = "+15005550006"

[[providers]]
name = "mail"
template = "PROVIDERS/sendgrid.toml"
base_url = "{url}/sendgrid"
secrets.api_key = "SG.x"
settings.from_email = "club@shop.test"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "webhook"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "sms"
params.text = "Gold!"

[[triggers.routes]]
trigger = "milestone"
provider = "mail"
params.template_id = "d-1"
"#
    )
}

/// 12:00 UTC on 2026-11-25 plus `seconds`.
fn noon(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
}

#[tokio::test]
async fn retries_back_off_honour_retry_after_and_end_in_dead_letters() {
    let receiver = Receiver::start(Reply::status(200)).await;
    let fx = fixture(&webhook_config(&receiver.url, "")).await;
    let clock = Arc::new(ManualClock::new(noon(0)));
    let worker = Worker::new(&fx.settings, clock.clone()).await.unwrap();

    // 500 then 200: two attempts, the same webhook-id, sent once.
    let a = member(&fx.db, "UTC", true).await;
    let first = enqueue(&fx, a, "tier_upgrade_webhook", "one").await;
    receiver.script([Reply::status(500).body("upstream down")]);
    assert_eq!(worker.run_once().await.unwrap(), 1);
    let (status, attempts, reason) = state(&fx.db, first).await;
    assert_eq!((status.as_str(), attempts), ("pending", 1));
    assert_eq!(reason.as_deref(), Some("500 upstream down"));
    let retry_at = next_attempt(&fx.db, first).await;
    let delay = (retry_at - noon(0)).num_milliseconds();
    assert!(
        (500..=1500).contains(&delay),
        "first backoff 1 s ± 50 %: {delay} ms"
    );
    assert_eq!(worker.run_once().await.unwrap(), 0, "not due yet");
    clock.set(retry_at);
    assert_eq!(worker.run_once().await.unwrap(), 1);
    assert_eq!(state(&fx.db, first).await, ("sent".into(), 2, None));
    let requests = receiver.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(
        requests[0].header("webhook-id"),
        requests[1].header("webhook-id")
    );
    assert_eq!(
        requests[0].header("webhook-id"),
        Some(first.to_string().as_str())
    );

    // 429 with Retry-After: due again exactly that much later.
    let second = enqueue(&fx, a, "tier_upgrade_webhook", "two").await;
    clock.set(noon(100));
    receiver.script([Reply::status(429).header("retry-after", "7")]);
    worker.run_once().await.unwrap();
    assert_eq!(next_attempt(&fx.db, second).await, noon(107));
    clock.set(noon(107));
    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, second).await.0, "sent");

    // A timeout is retried.
    let third = enqueue(&fx, a, "tier_upgrade_webhook", "three").await;
    clock.set(noon(200));
    receiver.script([Reply::status(200).delay(Duration::from_secs(3))]);
    worker.run_once().await.unwrap();
    let (status, attempts, reason) = state(&fx.db, third).await;
    assert_eq!(
        (status.as_str(), attempts, reason.as_deref()),
        ("pending", 1, Some("no answer within 1 s"))
    );
    clock.set(next_attempt(&fx.db, third).await);
    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, third).await.0, "sent");

    // 400: terminal, dead letter with the provider's body.
    let fourth = enqueue(&fx, a, "tier_upgrade_webhook", "four").await;
    receiver.script([Reply::status(400).body(r#"{"error":"unknown event type"}"#)]);
    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, fourth).await.0, "dead");
    let letters = outbox::dead_letters(&fx.db, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].message_id, fourth);
    assert_eq!(letters[0].status_code, Some(400));
    assert_eq!(
        letters[0].response_body.as_deref(),
        Some(r#"{"error":"unknown event type"}"#)
    );
    assert_eq!(
        letters[0].reason,
        "provider `webhook` refused the message with 400"
    );

    // `dlq list` shows it with the provider's answer; `dlq replay` makes it
    // due again with fresh attempts, and it is delivered.
    let config = std::fs::read_to_string(&fx.path).unwrap();
    let list = run_cli(&config, &["dlq", "list"], &[]).await;
    assert_eq!(list.code, 0, "{}", list.output());
    let id = letters[0].id.to_string();
    assert!(
        list.stdout.starts_with(&format!("{id:>6}  ")),
        "{}",
        list.stdout
    );
    assert!(
        list.stdout.contains("webhook      tier_upgrade   member")
            && list
                .stdout
                .contains("provider `webhook` refused the message with 400")
            && list
                .stdout
                .contains(r#"        answer: {"error":"unknown event type"}"#),
        "{}",
        list.stdout
    );
    let json = run_cli(&config, &["dlq", "list", "--json"], &[]).await;
    let parsed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(parsed[0]["message_id"], fourth.to_string());
    assert_eq!(parsed[0]["status_code"], 400);
    let replay = run_cli(&config, &["dlq", "replay", &id, "999999"], &[]).await;
    assert_eq!(replay.code, 1, "one id was unknown: {}", replay.output());
    assert_eq!(replay.stdout, "1 dead letter(s) due again\n");
    assert!(replay
        .stderr
        .contains("not replayed (unknown or replayed before): 999999"));
    // `dlq replay` makes it due at the wall clock's now.
    clock.set(chrono::Utc::now() + chrono::Duration::seconds(1));

    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, fourth).await, ("sent".into(), 1, None));
    assert!(outbox::dead_letters(&fx.db, 10).await.unwrap().is_empty());

    // 410: the endpoint is disabled, the next message for it dead-lettered
    // without a request.
    let fifth = enqueue(&fx, a, "tier_upgrade_webhook", "five").await;
    receiver.script([Reply::status(410).body("gone")]);
    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, fifth).await.0, "dead");
    let sixth = enqueue(&fx, a, "tier_upgrade_webhook", "six").await;
    let before = receiver.requests().len();
    worker.run_once().await.unwrap();
    assert_eq!(
        receiver.requests().len(),
        before,
        "no request to a disabled endpoint"
    );
    let (status, _, reason) = state(&fx.db, sixth).await;
    assert_eq!(status, "dead");
    assert!(
        reason.unwrap().contains("disabled"),
        "the reason says the endpoint is disabled"
    );
    let disabled: i64 = fx
        .db
        .client()
        .query_one("SELECT count(*) FROM provider_endpoints WHERE provider = 'webhook' AND disabled_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(disabled, 1);
}

#[tokio::test]
async fn policy_holds_sms_at_night_and_suppresses_without_consent_or_over_the_cap() {
    let receiver = Receiver::start(Reply::status(201)).await;
    let fx = fixture(&webhook_config(
        &receiver.url,
        "caps_per_day = { email = 1 }",
    ))
    .await;
    // 23:00 in Berlin (UTC+1).
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 11, 25, 22, 0, 0).unwrap(),
    ));
    let worker = Worker::new(&fx.settings, clock.clone()).await.unwrap();

    let night = member(&fx.db, "Europe/Berlin", true).await;
    let sms = enqueue(&fx, night, "tier_upgrade_sms", "night").await;
    worker.run_once().await.unwrap();
    let (status, attempts, reason) = state(&fx.db, sms).await;
    assert_eq!((status.as_str(), attempts), ("pending", 0));
    assert_eq!(
        reason.as_deref(),
        Some("quiet hours 21:00–08:00 in Europe/Berlin: held until 2026-11-26 08:00 CET")
    );
    assert_eq!(
        next_attempt(&fx.db, sms).await,
        Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap()
    );
    clock.set(Utc.with_ymd_and_hms(2026, 11, 26, 6, 59, 0).unwrap());
    assert_eq!(worker.run_once().await.unwrap(), 0, "still held at 07:59");
    clock.set(Utc.with_ymd_and_hms(2026, 11, 26, 7, 0, 0).unwrap());
    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, sms).await.0, "sent");
    assert_eq!(receiver.requests().len(), 1);

    // No SMS consent: suppressed with the reason, no request.
    let no_consent = member(&fx.db, "Europe/Berlin", false).await;
    let refused = enqueue(&fx, no_consent, "tier_upgrade_sms", "noconsent").await;
    worker.run_once().await.unwrap();
    assert_eq!(
        state(&fx.db, refused).await,
        ("suppressed".into(), 0, Some("no SMS consent".into()))
    );

    // The e-mail cap is 1 a day: the second milestone e-mail is suppressed.
    let capped = member(&fx.db, "Europe/Berlin", true).await;
    let mail1 = enqueue(&fx, capped, "milestone_mail", "m1").await;
    worker.run_once().await.unwrap();
    assert_eq!(state(&fx.db, mail1).await.0, "sent");
    let mail2 = enqueue(&fx, capped, "milestone_mail", "m2").await;
    worker.run_once().await.unwrap();
    assert_eq!(
        state(&fx.db, mail2).await,
        (
            "suppressed".into(),
            0,
            Some("frequency cap: 1 email messages in 24 h (cap 1)".into())
        )
    );
    assert_eq!(
        receiver.requests().len(),
        2,
        "nothing sent for the suppressed messages"
    );
    // Every decision is recorded.
    let decisions: Vec<String> = fx
        .db
        .client()
        .query(
            "SELECT outcome FROM delivery_attempts ORDER BY attempt_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        decisions,
        ["held", "sent", "suppressed", "sent", "suppressed"]
    );

    // Two e-mails for one member in one batch, cap 1: the first is sent
    // and fails (500); the second waits for the next batch instead of
    // being suppressed by a send that did not happen, and then goes.
    let pair = member(&fx.db, "Europe/Berlin", true).await;
    let p1 = enqueue(&fx, pair, "milestone_mail", "p1").await;
    let p2 = enqueue(&fx, pair, "milestone_mail", "p2").await;
    receiver.script([Reply::status(500)]);
    worker.run_once().await.unwrap();
    let states = [state(&fx.db, p1).await, state(&fx.db, p2).await];
    assert_eq!(
        states
            .iter()
            .filter(|s| s.0 == "pending" && s.1 == 1)
            .count(),
        1,
        "one tried and failed: {states:?}"
    );
    assert_eq!(
        states
            .iter()
            .filter(|s| s.0 == "pending" && s.1 == 0 && s.2.is_none())
            .count(),
        1,
        "the other untouched, not suppressed: {states:?}"
    );
    worker.run_once().await.unwrap();
    let states = [state(&fx.db, p1).await, state(&fx.db, p2).await];
    assert_eq!(
        states.iter().filter(|s| s.0 == "sent").count(),
        1,
        "sent in the next batch: {states:?}"
    );

    // The same occasion again adds nothing (dedupe).
    enqueue(&fx, capped, "milestone_mail", "m1").await;
    let copies: i64 = fx
        .db
        .client()
        .query_one(
            "SELECT count(*) FROM outbox WHERE dedupe_key = 'm1:milestone_mail'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(copies, 1);
    assert_eq!(state(&fx.db, mail1).await.0, "sent");
}

fn spawn_service(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(crate::support::binary())
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info,loyalty_cdc=debug")
        .stdout(std::process::Stdio::null())
        .stderr(crate::support::log_file("service"))
        .kill_on_drop(true)
        .spawn()
        .expect("start loyalty-cdc")
}

#[tokio::test]
async fn a_service_killed_mid_send_delivers_after_restart_with_the_same_webhook_id() {
    let receiver = Receiver::start(Reply::status(200)).await;
    let fx = fixture(&format!(
        r#"
[delivery]
timeout_seconds = 5
poll_interval_ms = 50

[[providers]]
name = "webhook"
template = "PROVIDERS/webhook.toml"
base_url = "{url}/hook"
secrets.signing_secret = "{SIGNING_SECRET}"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "webhook"
"#,
        url = receiver.url
    ))
    .await;
    let member = member(&fx.db, "UTC", true).await;
    let id = enqueue(&fx, member, "tier_upgrade_webhook", "crash").await;
    // The first request hangs: the service is killed while it waits.
    receiver.script([Reply::status(200).delay(Duration::from_secs(60))]);
    let mut service = spawn_service(&fx.path);
    receiver.wait_for(1).await;
    service.kill().await.expect("SIGKILL loyalty-cdc");
    let (status, attempts, _) = state(&fx.db, id).await;
    assert_eq!(
        (status.as_str(), attempts),
        ("pending", 0),
        "claimed, never finished"
    );

    // Restarted: the dead worker's transaction was rolled back, so the
    // message is due at once and delivered.
    let mut service = spawn_service(&fx.path);
    let requests = receiver.wait_for(2).await;
    assert_eq!(
        requests[0].header("webhook-id"),
        Some(id.to_string().as_str())
    );
    assert_eq!(
        requests[1].header("webhook-id"),
        requests[0].header("webhook-id")
    );
    assert_eq!(
        requests[1].body, requests[0].body,
        "the same message, byte for byte"
    );
    for _ in 0..500 {
        if state(&fx.db, id).await.0 == "sent" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&fx.db, id).await, ("sent".into(), 1, None));
    service.kill().await.unwrap();
}
