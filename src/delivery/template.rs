//! Provider templates: one file per provider in `connectors/providers/`,
//! the provider's real request (method, path, headers, auth, body shape,
//! idempotency field) written as minijinja templates over the message,
//! the member, the trigger and its offer. Marketing ops point a route at a
//! provider by editing files; no code knows any provider.
//!
//! A template compiles at start (`Settings::validate`), so a syntax error or
//! a missing secret, setting or route parameter fails there, naming the
//! file and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::config::{ConfigProblem, ProviderSettings, TriggerRoute};

/// Whose consent a message needs; also the unit of frequency caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    Email,
    Sms,
    Push,
    /// WhatsApp, LINE and the like.
    Messaging,
    /// The company's own systems (CRM, data warehouse): no consent needed.
    Webhook,
}

impl Channel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Sms => "sms",
            Self::Push => "push",
            Self::Messaging => "messaging",
            Self::Webhook => "webhook",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "email" => Self::Email,
            "sms" => Self::Sms,
            "push" => Self::Push,
            "messaging" => Self::Messaging,
            "webhook" => Self::Webhook,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Json,
    Form,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Signing {
    #[default]
    None,
    /// Standard Webhooks v1 (`webhook-id`, `webhook-timestamp`,
    /// `webhook-signature`), keyed by the `signing_secret` secret.
    StandardWebhooks,
}

/// A member field a provider cannot send without.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContactField {
    Email,
    Phone,
    PushToken,
    LineUserId,
}

impl ContactField {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::PushToken => "push_token",
            Self::LineUserId => "line_user_id",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    name: String,
    channel: Channel,
    base_url: String,
    #[serde(default = "default_method")]
    method: String,
    path: String,
    encoding: Encoding,
    #[serde(default)]
    requires: Vec<ContactField>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    settings: Vec<String>,
    #[serde(default)]
    params: Vec<String>,
    #[serde(default)]
    signing: Signing,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    form: Option<BTreeMap<String, String>>,
    #[serde(default)]
    duplicate_statuses: Vec<u16>,
    /// The provider's own request to erase a person (GDPR), if it has one.
    #[serde(default)]
    erase: Option<RawErase>,
}

/// `[erase]`: the request that asks the provider to delete everything it
/// holds about a member. Sent with the template's headers (auth); `body`,
/// when given, is a JSON template.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawErase {
    #[serde(default = "default_method")]
    method: String,
    path: String,
    #[serde(default)]
    body: Option<String>,
}

fn default_method() -> String {
    "POST".into()
}

/// A compiled provider template.
#[derive(Debug)]
pub struct ProviderTemplate {
    pub file: PathBuf,
    pub name: String,
    pub channel: Channel,
    pub base_url: String,
    pub method: reqwest::Method,
    pub encoding: Encoding,
    pub requires: Vec<ContactField>,
    pub secrets: Vec<String>,
    pub settings: Vec<String>,
    pub params: Vec<String>,
    pub signing: Signing,
    /// Statuses that mean "this idempotency key was accepted before"
    /// (LINE answers a repeated `X-Line-Retry-Key` with 409): delivered.
    pub duplicate_statuses: Vec<u16>,
    headers: Vec<String>,
    form: Vec<String>,
    /// The erasure request's method and whether it has a body.
    erase: Option<(reqwest::Method, bool)>,
    env: minijinja::Environment<'static>,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct RenderedRequest {
    pub method: reqwest::Method,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// A template that cannot render for this message: terminal (the same
/// template fails the same way on every attempt), so the message goes to
/// the dead letters with this reason.
#[derive(Debug, thiserror::Error)]
#[error("provider template `{file}`, {part}: {message}")]
pub struct RenderError {
    pub file: String,
    pub part: String,
    pub message: String,
}

/// The environment every template renders in: minijinja's builtins and
/// `tojson`, plus `b64encode` (HTTP basic auth is base64 of `user:pass`).
fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    // A misspelt `{{ secrets.api_kye }}` fails instead of sending "".
    env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
    env.add_filter("b64encode", |value: String| {
        base64::engine::general_purpose::STANDARD.encode(value.as_bytes())
    });
    env
}

impl ProviderTemplate {
    /// Reads and compiles a template file; every problem names the file
    /// and the key.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigProblem>> {
        let origin = path.display().to_string();
        let problem = |key: &str, message: String| ConfigProblem {
            origin: origin.clone(),
            key: key.to_string(),
            message,
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| vec![problem("", format!("cannot read the template: {e}"))])?;
        let raw: RawTemplate = toml::from_str(&text).map_err(|e| {
            vec![problem(
                "",
                format!(
                    "not a provider template: {}",
                    e.to_string().replace('\n', " ")
                ),
            )]
        })?;
        Self::compile(path, raw).map_err(|problems| {
            problems
                .into_iter()
                .map(|(key, message)| problem(&key, message))
                .collect()
        })
    }

    /// Compiles a template given as TOML text (tests, `check`).
    pub fn from_toml(file: &str, text: &str) -> Result<Self, Vec<(String, String)>> {
        let raw: RawTemplate =
            toml::from_str(text).map_err(|e| vec![(String::new(), e.to_string())])?;
        Self::compile(Path::new(file), raw)
    }

    fn compile(path: &Path, raw: RawTemplate) -> Result<Self, Vec<(String, String)>> {
        let mut problems = Vec::new();
        let method = match raw.method.parse::<reqwest::Method>() {
            Ok(method) => method,
            Err(_) => {
                problems.push((
                    "method".into(),
                    format!("`{}` is not an HTTP method; use POST", raw.method),
                ));
                reqwest::Method::POST
            }
        };
        if let Err(e) = url::Url::parse(&raw.base_url) {
            problems.push((
                "base_url".into(),
                format!("not a URL ({e}); expected e.g. https://api.example.com"),
            ));
        }
        let mut env = environment();
        let mut add = |name: String, source: String, key: String| {
            if let Err(e) = env.add_template_owned(name, source) {
                problems.push((key, format!("template does not compile: {e}")));
            }
        };
        add("path".into(), raw.path.clone(), "path".into());
        for (header, value) in &raw.headers {
            add(
                format!("header:{header}"),
                value.clone(),
                format!("headers.{header}"),
            );
        }
        let mut erase_method_problem = None;
        let erase = raw.erase.as_ref().map(|erase| {
            add("erase:path".into(), erase.path.clone(), "erase.path".into());
            if let Some(body) = &erase.body {
                add("erase:body".into(), body.clone(), "erase.body".into());
            }
            let method = erase.method.parse::<reqwest::Method>().unwrap_or_else(|_| {
                erase_method_problem = Some((
                    "erase.method".to_string(),
                    format!(
                        "`{}` is not an HTTP method; use POST or DELETE",
                        erase.method
                    ),
                ));
                reqwest::Method::POST
            });
            (method, erase.body.is_some())
        });
        let mut form = Vec::new();
        match (raw.encoding, &raw.body, &raw.form) {
            (Encoding::Json, Some(body), None) => add("body".into(), body.clone(), "body".into()),
            (Encoding::Form, None, Some(fields)) => {
                for (field, value) in fields {
                    add(
                        format!("form:{field}"),
                        value.clone(),
                        format!("form.{field}"),
                    );
                    form.push(field.clone());
                }
            }
            (Encoding::Json, _, _) => problems.push((
                "body".into(),
                "encoding = \"json\" needs a `body` template and no [form] table".into(),
            )),
            (Encoding::Form, _, _) => problems.push((
                "form".into(),
                "encoding = \"form\" needs a [form] table and no `body`".into(),
            )),
        }
        problems.extend(erase_method_problem);
        if raw.signing == Signing::StandardWebhooks
            && !raw.secrets.iter().any(|s| s == "signing_secret")
        {
            problems.push((
                "secrets".into(),
                "signing = \"standard_webhooks\" needs \"signing_secret\" in `secrets`".into(),
            ));
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Self {
            file: path.to_path_buf(),
            name: raw.name,
            channel: raw.channel,
            base_url: raw.base_url,
            method,
            encoding: raw.encoding,
            requires: raw.requires,
            secrets: raw.secrets,
            settings: raw.settings,
            params: raw.params,
            signing: raw.signing,
            duplicate_statuses: raw.duplicate_statuses,
            headers: raw.headers.into_keys().collect(),
            form,
            erase,
            env,
        })
    }

    /// What a `[[providers]]` entry lacks for this template: key and fix.
    pub fn problems_with(&self, provider: &ProviderSettings) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for secret in &self.secrets {
            if !provider.secrets.contains_key(secret) {
                problems.push((
                    format!("secrets.{secret}"),
                    format!(
                        "template `{}` needs the secret `{secret}`; add secrets.{secret} = {{ env = \"VAR\" }} (or {{ file = \"path\" }})",
                        self.file.display()
                    ),
                ));
            }
        }
        for setting in &self.settings {
            if !provider.settings.contains_key(setting) {
                problems.push((
                    format!("settings.{setting}"),
                    format!(
                        "template `{}` needs the setting `{setting}`; add settings.{setting} = \"…\"",
                        self.file.display()
                    ),
                ));
            }
        }
        if self.signing == Signing::StandardWebhooks {
            if let Some(secret) = provider
                .secrets
                .get("signing_secret")
                .and_then(|s| s.expose())
            {
                if let Err(message) = super::sign::SigningKey::parse(secret) {
                    problems.push(("secrets.signing_secret".into(), message));
                }
            }
        }
        problems
    }

    /// What a route lacks for this template.
    pub fn problems_with_route(&self, route: &TriggerRoute) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        for param in &self.params {
            if !route.params.contains_key(param) {
                problems.push((
                    format!("params.{param}"),
                    format!(
                        "provider template `{}` needs the route parameter `{param}`; add params.{param} = \"…\"",
                        self.file.display()
                    ),
                ));
            }
        }
        for param in route.params.keys() {
            if !self.params.contains(param) {
                problems.push((
                    format!("params.{param}"),
                    format!(
                        "provider template `{}` takes no parameter `{param}` (it takes: {}); remove it or correct the spelling",
                        self.file.display(),
                        if self.params.is_empty() { "none".to_string() } else { self.params.join(", ") }
                    ),
                ));
            }
        }
        let env = environment();
        for (param, source) in &route.params {
            if let Err(e) = env.template_from_str(source) {
                problems.push((
                    format!("params.{param}"),
                    format!("template does not compile: {e}"),
                ));
            }
        }
        problems
    }

    fn render_part(&self, part: &str, context: &minijinja::Value) -> Result<String, RenderError> {
        self.env
            .get_template(part)
            .and_then(|t| t.render(context))
            .map_err(|e| RenderError {
                file: self.file.display().to_string(),
                part: part.to_string(),
                message: e.to_string(),
            })
    }

    /// A rendered JSON body, checked and written compactly: the body must
    /// be JSON, and the bytes signed are the compact bytes sent. Streamed
    /// from the text to the output (`serde_transcode`), in template order,
    /// without building a tree of values per message.
    fn compact_json(&self, text: &str, part: &str) -> Result<Vec<u8>, RenderError> {
        let invalid = |e: serde_json::Error| RenderError {
            file: self.file.display().to_string(),
            part: part.to_string(),
            message: format!("did not render to JSON ({e}); insert values with `| tojson`"),
        };
        let mut out = Vec::with_capacity(text.len());
        let mut reader = serde_json::Deserializer::from_str(text);
        serde_transcode::transcode(&mut reader, &mut serde_json::Serializer::new(&mut out))
            .map_err(invalid)?;
        reader.end().map_err(invalid)?;
        Ok(out)
    }

    /// The request for one message. `base_url` overrides the template's.
    pub fn render(
        &self,
        base_url: Option<&str>,
        context: &minijinja::Value,
    ) -> Result<RenderedRequest, RenderError> {
        let base = base_url.unwrap_or(&self.base_url).trim_end_matches('/');
        let path = self.render_part("path", context)?;
        let url = if path.is_empty() || path == "/" {
            base.to_string()
        } else if path.starts_with('/') {
            format!("{base}{path}")
        } else {
            format!("{base}/{path}")
        };
        let mut headers = Vec::with_capacity(self.headers.len());
        for header in &self.headers {
            let value = self.render_part(&format!("header:{header}"), context)?;
            headers.push((header.clone(), value.trim().to_string()));
        }
        let (content_type, body) = match self.encoding {
            Encoding::Json => {
                let text = self.render_part("body", context)?;
                ("application/json", self.compact_json(&text, "body")?)
            }
            Encoding::Form => {
                let mut pairs = Vec::with_capacity(self.form.len());
                for field in &self.form {
                    pairs.push((
                        field.as_str(),
                        self.render_part(&format!("form:{field}"), context)?,
                    ));
                }
                let mut serializer = url::form_urlencoded::Serializer::new(String::new());
                for (field, value) in &pairs {
                    serializer.append_pair(field, value);
                }
                (
                    "application/x-www-form-urlencoded",
                    serializer.finish().into_bytes(),
                )
            }
        };
        Ok(RenderedRequest {
            method: self.method.clone(),
            url,
            headers,
            content_type,
            body,
        })
    }
}

impl ProviderTemplate {
    /// Whether the provider has an erasure request (`[erase]`).
    pub fn erases(&self) -> bool {
        self.erase.is_some()
    }

    /// The erasure request for the member in `context`, if the provider
    /// has one. `base_url` overrides the template's.
    pub fn render_erase(
        &self,
        base_url: Option<&str>,
        context: &minijinja::Value,
    ) -> Option<Result<RenderedRequest, RenderError>> {
        let (method, has_body) = self.erase.clone()?;
        Some((|| {
            let base = base_url.unwrap_or(&self.base_url).trim_end_matches('/');
            let path = self.render_part("erase:path", context)?;
            let url = if path.is_empty() || path == "/" {
                base.to_string()
            } else if path.starts_with('/') {
                format!("{base}{path}")
            } else {
                format!("{base}/{path}")
            };
            let mut headers = Vec::with_capacity(self.headers.len());
            for header in &self.headers {
                let value = self.render_part(&format!("header:{header}"), context)?;
                headers.push((header.clone(), value.trim().to_string()));
            }
            let body = if has_body {
                let text = self.render_part("erase:body", context)?;
                self.compact_json(&text, "erase.body")?
            } else {
                Vec::new()
            };
            Ok(RenderedRequest {
                method,
                url,
                headers,
                content_type: "application/json",
                body,
            })
        })())
    }
}

/// Renders a route's parameters (themselves templates) in `context`.
pub fn render_params(
    params: &BTreeMap<String, String>,
    context: &minijinja::Value,
) -> Result<BTreeMap<String, String>, RenderError> {
    let env = environment();
    params
        .iter()
        .map(|(name, source)| {
            env.render_str(source, context)
                .map(|text| (name.clone(), text))
                .map_err(|e| RenderError {
                    file: "route".into(),
                    part: format!("params.{name}"),
                    message: e.to_string(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = r#"
name = "Test SMS"
channel = "sms"
base_url = "https://api.example.com"
path = "/Accounts/{{ secrets.sid }}/Messages.json"
encoding = "form"
requires = ["phone"]
secrets = ["sid", "token"]
params = ["text"]

[headers]
Authorization = "Basic {{ (secrets.sid ~ ':' ~ secrets.token) | b64encode }}"

[form]
To = "{{ member.phone }}"
Body = "{{ params.text }}"
"#;

    #[test]
    fn form_templates_render_encoded_fields_and_basic_auth() {
        let template = ProviderTemplate::from_toml("t.toml", FORM).unwrap();
        let context = minijinja::context! {
            secrets => minijinja::context! { sid => "AC1", token => "tok" },
            member => minijinja::context! { phone => "+33612345678" },
            params => minijinja::context! { text => "Gold & more" },
        };
        let request = template
            .render(Some("http://127.0.0.1:9/"), &context)
            .unwrap();
        assert_eq!(request.url, "http://127.0.0.1:9/Accounts/AC1/Messages.json");
        assert_eq!(
            request.headers,
            vec![(
                "Authorization".to_string(),
                "Basic QUMxOnRvaw==".to_string()
            )]
        );
        assert_eq!(
            String::from_utf8(request.body).unwrap(),
            "Body=Gold+%26+more&To=%2B33612345678"
        );
    }

    #[test]
    fn a_misspelt_variable_fails_instead_of_sending_nothing() {
        let template = ProviderTemplate::from_toml(
            "t.toml",
            &FORM.replace("secrets.sid }}/", "secrets.sdi }}/"),
        )
        .unwrap();
        let context =
            minijinja::context! { secrets => minijinja::context! { sid => "AC1", token => "t" } };
        let error = template.render(None, &context).unwrap_err();
        assert_eq!(error.part, "path");
    }

    #[test]
    fn json_bodies_must_render_to_json() {
        let text = r#"
name = "J"
channel = "webhook"
base_url = "https://x.example"
path = "/"
encoding = "json"
body = '{"a": {{ value }}}'
"#;
        let template = ProviderTemplate::from_toml("j.toml", text).unwrap();
        let ok = template
            .render(None, &minijinja::context! { value => 5 })
            .unwrap();
        assert_eq!(ok.body, br#"{"a":5}"#);
        let error = template
            .render(None, &minijinja::context! { value => "not quoted" })
            .unwrap_err();
        assert!(error.message.contains("tojson"), "{error}");
        // Written compactly in the template's order; text after the JSON
        // value is refused, not cut off.
        let ordered = ProviderTemplate::from_toml(
            "j.toml",
            &text.replace(
                r#"'{"a": {{ value }}}'"#,
                r#"'{"z": [1, 2],  "a": {{ value }}} {{ tail }}'"#,
            ),
        )
        .unwrap();
        let ok = ordered
            .render(None, &minijinja::context! { value => 5, tail => " " })
            .unwrap();
        assert_eq!(ok.body, br#"{"z":[1,2],"a":5}"#);
        let error = ordered
            .render(None, &minijinja::context! { value => 5, tail => "x" })
            .unwrap_err();
        assert_eq!(error.part, "body");
        assert!(error.message.contains("did not render to JSON"), "{error}");
    }

    #[test]
    fn compile_errors_name_the_key() {
        let problems = ProviderTemplate::from_toml(
            "t.toml",
            &FORM.replace("{{ params.text }}", "{{ params.text "),
        )
        .unwrap_err();
        assert_eq!(problems[0].0, "form.Body");
    }
}
