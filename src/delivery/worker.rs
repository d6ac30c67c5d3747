//! The delivery worker: claims due outbox rows, judges them by the
//! policy, renders and signs their requests, sends them, and records what
//! happened. Retries (408, 429, 5xx, timeouts, connection errors) back off
//! exponentially with jitter (the `backoff` crate) or as `Retry-After`
//! says; other 4xx are terminal and dead-lettered with the response; a 410
//! disables the provider's endpoint. Nothing is lost on restart: a batch is
//! claimed, sent and recorded in one ledger transaction, so the rows of a
//! worker that died are unlocked by the rollback and due again at once,
//! with the same message id (receivers dedupe on it).

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};

use backoff::backoff::Backoff as _;
use chrono::{DateTime, Duration, SecondsFormat, Utc};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::outbox::{self, Attempt, Claimed, Outcome};
use super::policy::{self, Decision};
use super::sign::SigningKey;
use super::template::{self, Channel, ProviderTemplate, Signing};
use super::{Clock, DeliverySettings};
use crate::config::{DatabaseUrl, Secret, Settings, TriggerRoute};
use crate::connect;
use crate::ledger::db::Db;
use crate::ledger::members;

/// Response bytes read at most (the dead letter keeps 8 KiB): a provider
/// answering with megabytes cannot fill memory.
const RESPONSE_READ_LIMIT: usize = 16 * 1024;
/// Response bytes kept in an attempt's detail.
const DETAIL_BYTES: usize = 300;
/// Concurrent batch loops of `run`, each over its own partition of
/// members (member id modulo this) and its own connection: while one waits
/// on slow answers, the others send and record (measured: 2 loops of 256
/// delivered 13,205 messages/s, 4 of 1,000 17,855; `benches/delivery.rs`).
const BATCH_LOOPS: i64 = 4;
/// Messages per batch at most: one claim, three reads and one write each.
/// The memory bound of delivery: this many rendered requests per loop.
const MAX_BATCH: i64 = 1000;
/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: StdDuration = StdDuration::from_secs(24 * 3600);

/// What the worker did, for metrics and tests.
#[derive(Debug, Default)]
pub struct DeliveryCounts {
    pub sent: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub held: AtomicU64,
    pub suppressed: AtomicU64,
}

/// A configured provider, ready to send.
struct Provider {
    name: String,
    template: Arc<ProviderTemplate>,
    base_url: Option<String>,
    signing_key: Option<SigningKey>,
    /// The last URL a request went to, parsed: most templates render the
    /// same URL for every message, and parsing it was a twentieth of the
    /// worker's time per message.
    last_url: std::sync::Mutex<Option<(String, reqwest::Url)>>,
    /// `settings` and `secrets` as the templates see them, made once.
    settings_value: minijinja::Value,
    secrets_value: minijinja::Value,
    limiter: governor::DefaultDirectRateLimiter,
    in_flight: Arc<Semaphore>,
    /// Messages of this provider one batch sends at most: what its rate
    /// allows in 5 s, so a batch (one open ledger transaction) stays
    /// short; the rest wait for the next batch, still pending. (A slow or
    /// hanging provider is bounded by the batch's deadline: no request
    /// starts after twice the timeout.)
    batch_budget: usize,
}

impl Provider {
    /// The channel a message goes out on: its own, else the template's.
    fn channel_of(&self, message: &Claimed) -> Channel {
        message.channel.unwrap_or(self.template.channel)
    }

    /// `url` parsed, from the last request's when it is the same.
    fn parsed_url(&self, url: &str) -> Option<reqwest::Url> {
        let mut last = self.last_url.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((text, parsed)) = last.as_ref() {
            if text == url {
                return Some(parsed.clone());
            }
        }
        let parsed = reqwest::Url::parse(url).ok()?;
        *last = Some((url.to_string(), parsed.clone()));
        Some(parsed)
    }
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("provider `{0}`: {1}")]
    Provider(String, String),
    #[error("{0}")]
    Connect(#[from] connect::ConnectError),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

pub struct Worker {
    url: DatabaseUrl,
    password: Option<Secret>,
    /// The connection of `run_once` (`run`'s loops have their own).
    db: tokio::sync::Mutex<Db>,
    settings: DeliverySettings,
    providers: HashMap<String, Provider>,
    routes: HashMap<String, TriggerRoute>,
    http: reqwest::Client,
    clock: Arc<dyn Clock>,
    in_flight: Arc<Semaphore>,
    pub counts: Arc<DeliveryCounts>,
}

impl Worker {
    pub async fn new(settings: &Settings, clock: Arc<dyn Clock>) -> Result<Arc<Self>, WorkerError> {
        let mut providers = HashMap::new();
        for provider in &settings.providers {
            let template = provider.compiled.clone().ok_or_else(|| {
                WorkerError::Provider(provider.name.clone(), "template not compiled".into())
            })?;
            let signing_key = match template.signing {
                Signing::None => None,
                Signing::StandardWebhooks => Some(
                    provider
                        .secrets
                        .get("signing_secret")
                        .and_then(|s| s.expose())
                        .map(SigningKey::parse)
                        .transpose()
                        .map_err(|m| WorkerError::Provider(provider.name.clone(), m))?
                        .ok_or_else(|| {
                            WorkerError::Provider(provider.name.clone(), "no signing_secret".into())
                        })?,
                ),
            };
            let rate = NonZeroU32::new(provider.rate_per_second).unwrap_or(NonZeroU32::MIN);
            let secrets: BTreeMap<&str, &str> = provider
                .secrets
                .iter()
                .filter_map(|(k, v)| v.expose().map(|v| (k.as_str(), v)))
                .collect();
            providers.insert(
                provider.name.clone(),
                Provider {
                    name: provider.name.clone(),
                    template,
                    base_url: provider.base_url.clone(),
                    signing_key,
                    last_url: std::sync::Mutex::new(None),
                    settings_value: minijinja::Value::from_serialize(&provider.settings),
                    secrets_value: minijinja::Value::from_serialize(&secrets),
                    limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate)),
                    in_flight: Arc::new(Semaphore::new(provider.concurrency.max(1) as usize)),
                    batch_budget: (provider.rate_per_second as usize).saturating_mul(5).max(1),
                },
            );
        }
        let routes = settings
            .triggers
            .routes
            .iter()
            .map(|r| (r.route_name(), r.clone()))
            .collect();
        let http = reqwest::Client::builder()
            .timeout(StdDuration::from_secs(settings.delivery.timeout_seconds))
            .connect_timeout(StdDuration::from_secs(
                settings.delivery.timeout_seconds.min(5),
            ))
            .user_agent(concat!("loyalty-cdc/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let db = Db::new(
            connect::postgres(&settings.ledger.url, settings.ledger.password.as_ref()).await?,
        );
        Ok(Arc::new(Self {
            url: settings.ledger.url.clone(),
            password: settings.ledger.password.clone(),
            db: tokio::sync::Mutex::new(db),
            settings: settings.delivery.clone(),
            providers,
            routes,
            http,
            clock,
            in_flight: Arc::new(Semaphore::new(settings.delivery.concurrency.max(1) as usize)),
            counts: Arc::default(),
        }))
    }

    /// A ledger connection of its own (a batch holds a transaction on
    /// it). A worker that hangs mid-batch loses its locks after a while:
    /// the server ends a transaction idle for long.
    async fn connect(&self) -> Result<Db, connect::ConnectError> {
        let client = connect::postgres(&self.url, self.password.as_ref()).await?;
        let idle = (self.settings.timeout_seconds * 6).max(60);
        if let Err(error) = client
            .batch_execute(&format!(
                "SET idle_in_transaction_session_timeout = '{idle}s'"
            ))
            .await
        {
            tracing::warn!(error = %crate::ledger::db::describe(&error), "delivery: cannot bound idle transactions");
        }
        Ok(Db::new(client))
    }

    /// Claims the messages due now (one batch) and delivers them, waiting
    /// for all (tests and one-shot runs). Returns how many were claimed.
    pub async fn run_once(self: &Arc<Self>) -> Result<usize, tokio_postgres::Error> {
        let mut db = self.db.lock().await;
        if db.is_closed() {
            match self.connect().await {
                Ok(fresh) => *db = fresh,
                Err(error) => {
                    tracing::warn!(error = %error, "delivery: no ledger connection");
                    return Ok(0);
                }
            }
        }
        self.claim_and_deliver(&db, (0, 1)).await
    }

    /// Delivers until `shutdown`: [`BATCH_LOOPS`] loops, each over its own
    /// partition of members and on its own connection, claim a batch,
    /// deliver it and record it in one transaction. Batches in flight
    /// finish (within the timeout) before it returns.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let loops: Vec<_> = (0..BATCH_LOOPS)
            .map(|k| {
                let worker = Arc::clone(&self);
                let shutdown = shutdown.clone();
                tokio::spawn(async move { worker.batch_loop((k, BATCH_LOOPS), shutdown).await })
            })
            .collect();
        for task in loops {
            let _ = task.await;
        }
    }

    async fn batch_loop(&self, partition: (i64, i64), shutdown: CancellationToken) {
        let poll = StdDuration::from_millis(self.settings.poll_interval_ms.max(1));
        let mut db: Option<Db> = None;
        while !shutdown.is_cancelled() {
            if db.as_ref().is_none_or(Db::is_closed) {
                match self.connect().await {
                    Ok(fresh) => db = Some(fresh),
                    Err(error) => {
                        tracing::warn!(error = %error, "delivery: no ledger connection; retrying");
                        db = None;
                    }
                }
            }
            let delivered = match &db {
                Some(db) => self.claim_and_deliver(db, partition).await.unwrap_or_else(|error| {
                    tracing::warn!(error = %crate::ledger::db::describe(&error), "delivery: a batch failed and was rolled back; its messages are due again");
                    0
                }),
                None => 0,
            };
            if delivered == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
    }

    /// One batch in one transaction: claim, deliver, record, commit.
    async fn claim_and_deliver(
        &self,
        db: &Db,
        partition: (i64, i64),
    ) -> Result<usize, tokio_postgres::Error> {
        db.batch_execute("BEGIN").await?;
        let result = async {
            let claimed = outbox::claim(db, self.clock.now(), MAX_BATCH, partition).await?;
            let count = claimed.len();
            self.deliver_batch(db, claimed).await?;
            Ok::<_, tokio_postgres::Error>(count)
        }
        .await;
        match result {
            Ok(count) => {
                db.batch_execute("COMMIT").await?;
                Ok(count)
            }
            Err(error) => {
                let _ = db.batch_execute("ROLLBACK").await;
                Err(error)
            }
        }
    }

    /// One batch: what the policy needs is read for all its members at
    /// once, each message judged, rendered and sent (concurrently, within
    /// the bounds), and every outcome recorded in one statement.
    async fn deliver_batch(
        &self,
        db: &Db,
        batch: Vec<Claimed>,
    ) -> Result<(), tokio_postgres::Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let now = self.clock.now();
        let mut asked: Vec<i64> = batch.iter().filter_map(|m| m.member).collect();
        asked.sort_unstable();
        asked.dedup();
        let contacts = members::contacts(db, &asked).await?;
        // A member's recent sends are read only where a cap or a cooldown
        // judges one of its messages (a webhook to the company's own
        // systems usually has neither): the read is a fifth of a batch's
        // database time otherwise.
        let mut judged_by_history: Vec<i64> = batch
            .iter()
            .filter(|m| {
                self.providers.get(&m.provider).is_some_and(|p| {
                    policy::looks_back(&self.settings, p.channel_of(m), &m.trigger)
                })
            })
            .filter_map(|m| m.member.and_then(|id| contacts.get(&id)))
            .map(|c| c.member_id)
            .collect();
        judged_by_history.sort_unstable();
        judged_by_history.dedup();
        let recent = if judged_by_history.is_empty() {
            HashMap::new()
        } else {
            outbox::recent_sends(
                db,
                &judged_by_history,
                now - policy::lookback(&self.settings),
            )
            .await?
        };
        let disabled = outbox::disabled_providers(db).await?;

        let mut finished = Vec::with_capacity(batch.len());
        let mut sends = Vec::new();
        let mut per_provider: HashMap<&str, usize> = HashMap::new();
        let mut tentative: HashMap<i64, Vec<outbox::Sent>> = HashMap::new();
        for message in batch {
            // Over the provider's budget for one batch: left untouched,
            // pending and due again once this batch commits.
            if let Some(provider) = self.providers.get(&message.provider) {
                let count = per_provider.entry(provider.name.as_str()).or_default();
                if *count >= provider.batch_budget {
                    continue;
                }
                *count += 1;
            }
            let decided = |outcome: Outcome, detail: String| {
                outbox::Finished::of(
                    &message,
                    &message.provider,
                    now,
                    outcome,
                    Attempt::decision(detail),
                )
            };
            let dead = |reason: String| {
                decided(
                    Outcome::Dead {
                        reason: reason.clone(),
                        body: None,
                    },
                    reason,
                )
            };
            let Some(provider) = self.providers.get(&message.provider) else {
                finished.push(dead(format!("provider `{}` is no longer configured; add it back and `dlq replay` the message", message.provider)));
                continue;
            };
            let Some(route) = self.routes.get(&message.route) else {
                finished.push(dead(format!(
                    "route `{}` is no longer configured; add it back and `dlq replay` the message",
                    message.route
                )));
                continue;
            };
            if let Some(why) = disabled.get(&provider.name) {
                finished.push(dead(format!("the provider's endpoint is disabled ({why}); fix it, then `dlq replay` re-enables it")));
                continue;
            }
            let Some(contact) = message.member.and_then(|m| contacts.get(&m)) else {
                self.counts.suppressed.fetch_add(1, Ordering::Relaxed);
                finished.push(decided(
                    Outcome::Suppressed,
                    "the message names no known member".into(),
                ));
                continue;
            };
            let channel = provider.channel_of(&message);
            let sent = recent
                .get(&contact.member_id)
                .map_or(&[][..], Vec::as_slice);
            match policy::judge(
                &self.settings,
                channel,
                &provider.template.requires,
                (&message.trigger, &message.route),
                contact,
                sent,
                now,
            ) {
                Decision::Send => {}
                Decision::Hold { until, reason } => {
                    self.counts.held.fetch_add(1, Ordering::Relaxed);
                    finished.push(decided(Outcome::Held(until), reason));
                    continue;
                }
                Decision::Suppress(reason) => {
                    self.counts.suppressed.fetch_add(1, Ordering::Relaxed);
                    finished.push(decided(Outcome::Suppressed, reason));
                    continue;
                }
            }
            // Sends of this batch not yet answered count too; a message
            // they would cap or cool down waits for the next batch (still
            // pending), when their outcome is known: a send that then
            // fails does not suppress it for good.
            let in_batch = tentative.entry(contact.member_id).or_default();
            if !in_batch.is_empty() {
                let mut with_batch: Vec<outbox::Sent> = sent.to_vec();
                with_batch.extend(in_batch.iter().cloned());
                if matches!(
                    policy::judge(
                        &self.settings,
                        channel,
                        &provider.template.requires,
                        (&message.trigger, &message.route),
                        contact,
                        &with_batch,
                        now,
                    ),
                    Decision::Suppress(_)
                ) {
                    continue;
                }
            }
            match render(provider, route, &message, contact) {
                Ok(request) => {
                    in_batch.push((
                        channel.as_str().to_string(),
                        message.trigger.clone(),
                        message.route.clone(),
                        now,
                    ));
                    sends.push((message, provider, request));
                }
                Err(error) => finished.push(dead(error.to_string())),
            }
        }
        // Requests not started by then are left for the next batch: the
        // batch's transaction stays open for a bounded time.
        let deadline =
            Instant::now() + StdDuration::from_secs(self.settings.timeout_seconds.max(1) * 2);
        let results =
            futures_util::future::join_all(sends.into_iter().map(
                |(message, provider, request)| self.send(message, provider, request, deadline),
            ))
            .await;
        finished.extend(results.into_iter().flatten());
        for f in &finished {
            metrics::counter!("loyalty_delivery_total", "provider" => f.provider.clone(), "outcome" => f.outcome.label())
                .increment(1);
            match &f.outcome {
                Outcome::Dead { reason, .. } => {
                    tracing::warn!(message_id = %f.message_id, provider = %f.provider, reason = %reason, "dead-lettered")
                }
                Outcome::Disabled { .. } => {
                    tracing::error!(provider = %f.provider, "provider answered 410 Gone: its endpoint is disabled until `dlq replay`")
                }
                _ => {}
            }
        }
        outbox::finish_all(db, &finished).await
    }

    /// Sends one rendered request within the global and the provider's
    /// bounds, and classifies the answer.
    async fn send(
        &self,
        message: Claimed,
        provider: &Provider,
        request: template::RenderedRequest,
        deadline: Instant,
    ) -> Option<outbox::Finished> {
        let _global = self.in_flight.acquire().await;
        provider.limiter.until_ready().await;
        let _slot = provider.in_flight.acquire().await;
        if Instant::now() > deadline {
            return None;
        }
        let started = Instant::now();
        let sent_at = self.clock.now();
        let signature = provider.signing_key.as_ref().map(|key| {
            let id = message.message_id.to_string();
            let timestamp = sent_at.timestamp();
            let signature = key.sign(&id, timestamp, &request.body);
            (id, timestamp, signature)
        });
        let mut builder = match provider.parsed_url(&request.url) {
            Some(url) => self.http.request(request.method.clone(), url),
            // Not a URL: reqwest reports it as a builder error (dead letter).
            None => self.http.request(request.method.clone(), &request.url),
        }
        .body(request.body);
        if !request
            .headers
            .iter()
            .any(|(h, _)| h.eq_ignore_ascii_case("content-type"))
        {
            builder = builder.header(reqwest::header::CONTENT_TYPE, request.content_type);
        }
        for (name, value) in &request.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        if let Some((id, timestamp, signature)) = signature {
            builder = builder
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature);
        }
        let attempt_number = message.attempts + 1;
        let (outcome, attempt) = match builder.send().await {
            Ok(mut response) => {
                let status = response.status();
                let retry_after = retry_after(response.headers(), sent_at);
                let mut body = Vec::new();
                while let Ok(Some(chunk)) = response.chunk().await {
                    let room = RESPONSE_READ_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= RESPONSE_READ_LIMIT {
                        break;
                    }
                }
                metrics::histogram!("loyalty_provider_latency_seconds", "provider" => provider.name.clone())
                    .record(started.elapsed().as_secs_f64());
                let latency = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
                let body = String::from_utf8_lossy(&body).into_owned();
                let code = status.as_u16();
                let detail = Some(
                    format!("{code} {}", scrub(outbox::truncate(&body, DETAIL_BYTES)))
                        .trim_end()
                        .to_string(),
                );
                let attempt = Attempt {
                    requested: true,
                    status_code: Some(code),
                    latency_ms: Some(latency),
                    detail,
                };
                let outcome = if status.is_success()
                    || provider.template.duplicate_statuses.contains(&code)
                {
                    Outcome::Sent
                } else if code == 410 {
                    Outcome::Disabled { body: Some(body) }
                } else if code == 408 || code == 429 || status.is_server_error() {
                    self.retry(
                        attempt_number,
                        sent_at,
                        retry_after,
                        &provider.name,
                        code.to_string(),
                        Some(body),
                    )
                } else {
                    Outcome::Dead {
                        reason: format!(
                            "provider `{}` refused the message with {code}",
                            provider.name
                        ),
                        body: Some(body),
                    }
                };
                (outcome, attempt)
            }
            Err(error) => {
                let latency = started.elapsed().as_millis().min(i32::MAX as u128) as i32;
                if error.is_builder() {
                    // The rendered request itself is invalid (a header
                    // value with a line break): the same every time.
                    let reason = format!(
                        "provider `{}`: the rendered request is invalid: {}",
                        provider.name,
                        error.without_url()
                    );
                    (
                        Outcome::Dead {
                            reason: reason.clone(),
                            body: None,
                        },
                        Attempt::decision(reason),
                    )
                } else {
                    let what = if error.is_timeout() {
                        format!("no answer within {} s", self.settings.timeout_seconds)
                    } else if error.is_connect() {
                        "connection failed".to_string()
                    } else {
                        format!("request failed: {}", error.without_url())
                    };
                    let attempt = Attempt {
                        requested: true,
                        status_code: None,
                        latency_ms: Some(latency),
                        detail: Some(what.clone()),
                    };
                    (
                        self.retry(attempt_number, sent_at, None, &provider.name, what, None),
                        attempt,
                    )
                }
            }
        };
        match &outcome {
            Outcome::Sent => self.counts.sent.fetch_add(1, Ordering::Relaxed),
            Outcome::Retry(_) => self.counts.retried.fetch_add(1, Ordering::Relaxed),
            _ => self.counts.dead.fetch_add(1, Ordering::Relaxed),
        };
        tracing::debug!(message_id = %message.message_id, provider = %provider.name, attempt = attempt_number, status = ?attempt.status_code, "delivery attempt");
        Some(outbox::Finished::of(
            &message,
            &provider.name,
            self.clock.now(),
            outcome,
            attempt,
        ))
    }

    /// The next try after failed attempt `attempt`, or the dead letters
    /// once the attempts are used up.
    fn retry(
        &self,
        attempt: i32,
        now: DateTime<Utc>,
        retry_after: Option<StdDuration>,
        provider: &str,
        last: String,
        body: Option<String>,
    ) -> Outcome {
        if attempt >= self.settings.max_attempts {
            return Outcome::Dead {
                reason: format!(
                    "provider `{provider}`: gave up after {attempt} attempts (last: {last})"
                ),
                body,
            };
        }
        let delay = retry_after.unwrap_or_else(|| backoff_delay(&self.settings, attempt));
        Outcome::Retry(now + Duration::from_std(delay).unwrap_or(Duration::hours(1)))
    }
}

/// The delay after failed attempt `attempt` (1-based): exponential from
/// `initial_backoff_ms`, doubled each time up to `max_backoff_seconds`,
/// ±50 % jitter so that a provider's outage does not end in a stampede.
pub fn backoff_delay(settings: &DeliverySettings, attempt: i32) -> StdDuration {
    let mut backoff = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(StdDuration::from_millis(settings.initial_backoff_ms))
        .with_multiplier(2.0)
        .with_randomization_factor(0.5)
        .with_max_interval(StdDuration::from_secs(settings.max_backoff_seconds))
        .with_max_elapsed_time(None)
        .build();
    let mut delay = StdDuration::from_millis(settings.initial_backoff_ms);
    for _ in 0..attempt.max(1) {
        if let Some(next) = backoff.next_backoff() {
            delay = next;
        }
    }
    delay
}

/// `Retry-After` as seconds or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap, now: DateTime<Utc>) -> Option<StdDuration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => StdDuration::from_secs(seconds),
        Err(_) => {
            let at = DateTime::parse_from_rfc2822(value)
                .ok()?
                .with_timezone(&Utc);
            (at - now).to_std().unwrap_or(StdDuration::ZERO)
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// Masks e-mail addresses and phone numbers in a response excerpt: the
/// attempt log is read by operators, and providers echo recipients.
pub fn scrub(text: &str) -> String {
    type Patterns = Option<(regex::Regex, regex::Regex)>;
    static PATTERNS: std::sync::OnceLock<Patterns> = std::sync::OnceLock::new();
    let patterns = PATTERNS.get_or_init(|| {
        Some((
            regex::Regex::new(r"[^\s@\x22',;:<>()\[\]{}]+@[^\s@\x22',;:<>()\[\]{}]+").ok()?,
            regex::Regex::new(r"\+?\d[\d\s().-]{6,}\d").ok()?,
        ))
    });
    // Constant patterns (a unit test compiles them); were they ever to
    // fail, nothing of the response is kept rather than something unmasked.
    let Some((email, phone)) = patterns else {
        return "(response not kept)".to_string();
    };
    let masked = email.replace_all(text, "***@***");
    phone.replace_all(&masked, "***").into_owned()
}

/// The template context of a message (names in connectors/providers/README.md),
/// built as template values directly: through a JSON tree first, the
/// context was a fifth of the worker's time per message.
fn context(
    provider: &Provider,
    message: &Claimed,
    contact: &members::Contact,
    params: minijinja::Value,
) -> minijinja::Value {
    use minijinja::{context, Value};
    let text = |v: &Option<String>| Value::from(v.as_deref().unwrap_or_default());
    let trigger = match message.payload.get("trigger") {
        Some(trigger) => Value::from_serialize(trigger),
        None => context! { kind => &message.trigger, data => context! {} },
    };
    let offer = message
        .payload
        .get("offer")
        .map_or(Value::from(()), Value::from_serialize);
    context! {
        message => context! {
            id => message.message_id.to_string(),
            created_at => message.created_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        },
        trigger => trigger,
        offer => offer,
        member => context! {
            id => contact.member_id,
            external_id => contact.member_id.to_string(),
            email => text(&contact.email),
            phone => text(&contact.phone),
            push_token => text(&contact.push_token),
            line_user_id => text(&contact.line_user_id),
            tier => text(&contact.tier),
            locale => text(&contact.locale),
            timezone => text(&contact.timezone),
            points => context! {
                available => contact.available,
                pending => contact.pending,
                lifetime => contact.lifetime,
            },
        },
        settings => provider.settings_value.clone(),
        secrets => provider.secrets_value.clone(),
        params => params,
    }
}

fn render(
    provider: &Provider,
    route: &TriggerRoute,
    message: &Claimed,
    contact: &members::Contact,
) -> Result<template::RenderedRequest, template::RenderError> {
    // Parameters are templates over the same context: rendered first, when
    // the route has any (most webhook routes have none).
    let params = if route.params.is_empty() {
        minijinja::context! {}
    } else {
        let without = context(provider, message, contact, minijinja::context! {});
        minijinja::Value::from_serialize(template::render_params(&route.params, &without)?)
    };
    provider.template.render(
        provider.base_url.as_deref(),
        &context(provider, message, contact, params),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_stays_bounded() {
        let settings = DeliverySettings::default();
        for attempt in 1..=20 {
            let delay = backoff_delay(&settings, attempt);
            let base = (1000u64 << (attempt - 1).min(20) as u64).min(3_600_000) as f64;
            let ms = delay.as_millis() as f64;
            assert!(
                ms >= base * 0.5 - 1.0 && ms <= (base * 1.5).min(3_600_000.0 * 1.5) + 1.0,
                "attempt {attempt}: {ms} ms vs {base}"
            );
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2026-11-25T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&headers, now), Some(StdDuration::from_secs(7)));
        headers.insert(
            "retry-after",
            "Wed, 25 Nov 2026 12:00:30 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers, now), Some(StdDuration::from_secs(30)));
    }

    #[test]
    fn scrub_masks_addresses_and_numbers() {
        assert_eq!(
            scrub(
                r#"{"error":"invalid recipient jane.doe@mail.test","to":"+49 151 1234 5678","code":21211}"#
            ),
            r#"{"error":"invalid recipient ***@***","to":"***","code":21211}"#
        );
    }
}
