//! GDPR erasure at the providers: every configured provider whose
//! template has an `[erase]` request (Klaviyo's profile deletion, Braze's
//! user deletion, OneSignal's user deletion, the generic webhook's signed
//! `loyalty.member_erased` event) is asked to erase the member, before the
//! ledger forgets who the member was (the request needs the address).

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::json;

use super::sign::SigningKey;
use super::template::Signing;
use crate::config::Settings;
use crate::ledger::members::Contact;

/// Attempts per provider (transient failures: connection, timeout, 408,
/// 429, 5xx), one second apart, doubling.
const ATTEMPTS: u32 = 3;

/// One provider's answer to the erasure request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProviderErasure {
    pub provider: String,
    /// The HTTP status of the last attempt (None: no answer).
    pub status: Option<u16>,
    /// Whether the provider accepted it (2xx; 404 for a person it does not
    /// know, which is what erasure wants).
    pub done: bool,
    /// Why not, without the response body (it may name the person).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Asks every provider that can erase a person to erase this member.
pub async fn request(settings: &Settings, contact: &Contact) -> Vec<ProviderErasure> {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(
            settings.delivery.timeout_seconds.max(1),
        ))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("loyalty-cdc/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            return vec![ProviderErasure {
                provider: "*".into(),
                status: None,
                done: false,
                error: Some(format!("HTTP client: {error}")),
            }]
        }
    };
    let mut results = Vec::new();
    for provider in &settings.providers {
        let Some(template) = provider.compiled.as_ref().filter(|t| t.erases()) else {
            continue;
        };
        // Without what the provider is addressed by (Klaviyo: the email),
        // nothing of this member ever went there: nothing to erase.
        if let Some(field) = super::policy::missing(&template.requires, contact) {
            results.push(ProviderErasure {
                provider: provider.name.clone(),
                status: None,
                done: true,
                error: Some(format!(
                    "not asked: the member has no {}, so nothing was ever sent there",
                    field.as_str()
                )),
            });
            continue;
        }
        // A stable id per member: a receiver dedupes a repeated erasure.
        let id = format!("erase-{}", contact.member_id);
        let secrets: std::collections::BTreeMap<&str, &str> = provider
            .secrets
            .iter()
            .filter_map(|(k, v)| v.expose().map(|v| (k.as_str(), v)))
            .collect();
        let text = |v: &Option<String>| v.clone().unwrap_or_default();
        let context = minijinja::Value::from_serialize(json!({
            "message": { "id": id, "created_at": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true) },
            "member": {
                "id": contact.member_id,
                "external_id": contact.member_id.to_string(),
                "email": text(&contact.email),
                "phone": text(&contact.phone),
                "push_token": text(&contact.push_token),
                "line_user_id": text(&contact.line_user_id),
            },
            "settings": provider.settings,
            "secrets": secrets,
        }));
        let request = match template.render_erase(provider.base_url.as_deref(), &context) {
            Some(Ok(request)) => request,
            Some(Err(error)) => {
                results.push(ProviderErasure {
                    provider: provider.name.clone(),
                    status: None,
                    done: false,
                    error: Some(error.to_string()),
                });
                continue;
            }
            None => continue,
        };
        let signing_key = match template.signing {
            Signing::StandardWebhooks => provider
                .secrets
                .get("signing_secret")
                .and_then(|s| s.expose())
                .and_then(|s| SigningKey::parse(s).ok()),
            Signing::None => None,
        };
        let mut outcome = ProviderErasure {
            provider: provider.name.clone(),
            status: None,
            done: false,
            error: None,
        };
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << (attempt - 1))).await;
            }
            let mut builder = client
                .request(request.method.clone(), &request.url)
                .body(request.body.clone());
            if !request.body.is_empty()
                && !request
                    .headers
                    .iter()
                    .any(|(h, _)| h.eq_ignore_ascii_case("content-type"))
            {
                builder = builder.header(reqwest::header::CONTENT_TYPE, request.content_type);
            }
            for (name, value) in &request.headers {
                builder = builder.header(name.as_str(), value.as_str());
            }
            if let Some(key) = &signing_key {
                let timestamp = Utc::now().timestamp();
                builder = builder
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", timestamp.to_string())
                    .header("webhook-signature", key.sign(&id, timestamp, &request.body));
            }
            match builder.send().await {
                Ok(response) => {
                    let code = response.status().as_u16();
                    outcome.status = Some(code);
                    if response.status().is_success() || code == 404 {
                        outcome.done = true;
                        outcome.error = None;
                        break;
                    }
                    outcome.error = Some(format!("answered {code}"));
                    if !(code == 408 || code == 429 || response.status().is_server_error()) {
                        break;
                    }
                }
                Err(error) => {
                    outcome.error = Some(if error.is_timeout() {
                        "no answer in time".to_string()
                    } else {
                        "cannot connect".to_string()
                    });
                }
            }
        }
        results.push(outcome);
    }
    results
}
