//! `loyalty-cdc run`: every configured source read by its reader into the
//! ledger (sources → normalize → identity → ledger), until shutdown.
//!
//! Each source runs on its own task with its own ledger connection, so a
//! source that is down or parked does not stop the others. The readers
//! reconnect by themselves after transient errors; a definite or
//! configuration error stops that source and is reported.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::{ConfigProblem, Settings, SourceSettings};
use crate::identity::Identity;
use crate::ledger::apply::{ApplyCounts, LedgerConsumer, WriterLock};
use crate::normalize::Normalizer;
use crate::source::mysql::reader::MysqlSource;
use crate::source::postgres::{catalog::TableSpec, PostgresSource, ReaderOptions};
use crate::source::progress::SourceProgress;
use crate::source::SourceKind;

/// Why the pipeline could not start or a source stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{0}")]
    Config(String),
    #[error("ledger: {0}")]
    Ledger(String),
    #[error("source `{source_name}` stopped: {message}")]
    Source {
        source_name: String,
        message: String,
    },
}

/// A running source, for status.
#[derive(Clone)]
pub struct RunningSource {
    pub name: String,
    pub kind: SourceKind,
    pub progress: SourceProgress,
    pub counts: Arc<ApplyCounts>,
    /// The ledger writers' turn, shared by every source of the process:
    /// other writers of member state (the API's redemptions) take it too.
    pub writer: WriterLock,
}

fn no_mapping(index: usize, source: &SourceSettings) -> PipelineError {
    PipelineError::Config(
        ConfigProblem {
            origin: "configuration".into(),
            key: format!("sources[{index}].mapping"),
            message: format!(
                "source `{}` has no mapping; set mapping = \"connectors/sources/<system>.toml\"",
                source.name
            ),
        }
        .to_string(),
    )
}

/// A source's ledger consumer as the service runs it: its mapping, the
/// shared writer turn and triggers, and features kept or not.
async fn ledger_consumer(
    settings: &Settings,
    source: &SourceSettings,
    mapping: Arc<crate::normalize::mapping::Mapping>,
    identity: &Identity,
    program: &Arc<crate::config::ProgramSettings>,
    writer: &WriterLock,
    triggers: &Arc<crate::triggers::Triggers>,
) -> Result<LedgerConsumer, PipelineError> {
    let consumer = LedgerConsumer::new(
        &settings.ledger.url,
        settings.ledger.password.as_ref(),
        &source.name,
        source.kind,
        Normalizer::new(mapping),
        identity.clone(),
        Arc::clone(program),
    )
    .await
    .map_err(|e| PipelineError::Ledger(format!("{e}; fix: {}", e.fix())))?
    .with_writer_lock(writer.clone())
    .with_triggers(Arc::clone(triggers));
    Ok(if settings.personalization.enabled {
        consumer
    } else {
        consumer.without_features()
    })
}

/// Migrates the ledger, then runs every source until `shutdown`; returns
/// when all have stopped. `started` receives each source's handles once
/// they run.
pub async fn run(
    settings: &Settings,
    shutdown: CancellationToken,
    started: impl FnOnce(Vec<RunningSource>),
) -> Result<(), PipelineError> {
    let identity = Identity::new(&settings.identity).map_err(PipelineError::Config)?;
    let mut client = crate::ledger::connect(&settings.ledger)
        .await
        .map_err(|e| PipelineError::Ledger(format!("{e}; fix: {}", e.fix())))?;
    crate::ledger::migrate(&mut client)
        .await
        .map_err(|e| PipelineError::Ledger(e.to_string()))?;
    crate::ledger::features::switch(&client, settings.personalization.enabled)
        .await
        .map_err(|e| PipelineError::Ledger(crate::ledger::db::describe(&e)))?;
    let counted =
        crate::ledger::tiers::count_current_period(&client, &settings.program, chrono::Utc::now())
            .await
            .map_err(|e| PipelineError::Ledger(crate::ledger::db::describe(&e)))?;
    if counted > 0 {
        tracing::info!(
            balances = counted,
            "tier periods: the current period's qualifying points counted from the entries"
        );
    }
    drop(client);
    let program = Arc::new(settings.program.clone());

    let triggers = crate::triggers::Triggers::from_settings(settings);
    let writer = WriterLock::default();
    let mut tasks = tokio::task::JoinSet::new();
    let mut running = Vec::new();
    for (index, source) in settings.sources.iter().enumerate() {
        let mapping = source
            .compiled_mapping
            .clone()
            .ok_or_else(|| no_mapping(index, source))?;
        let tables = mapping.tables();
        let consumer = ledger_consumer(
            settings, source, mapping, &identity, &program, &writer, &triggers,
        )
        .await?;
        let counts = Arc::clone(&consumer.counts);
        let name = source.name.clone();
        let shutdown = shutdown.clone();
        match source.kind {
            SourceKind::Postgres => {
                let specs = tables.iter().map(|t| TableSpec::parse(t)).collect();
                let reader = PostgresSource::new(source, ReaderOptions::for_source(source, specs));
                running.push(RunningSource {
                    name: name.clone(),
                    kind: source.kind,
                    progress: reader.progress(),
                    counts,
                    writer: writer.clone(),
                });
                tasks.spawn(async move {
                    let mut consumer = consumer;
                    let result = reader.run(&mut consumer, &shutdown).await;
                    (name, result.map_err(|e| e.to_string()))
                });
            }
            SourceKind::Mysql => {
                let table_refs: Vec<&str> = tables.iter().map(String::as_str).collect();
                let reader = MysqlSource::new(source, &table_refs);
                running.push(RunningSource {
                    name: name.clone(),
                    kind: source.kind,
                    progress: reader.progress(),
                    counts,
                    writer: writer.clone(),
                });
                tasks.spawn(async move {
                    let mut consumer = consumer;
                    let result = reader.run(&mut consumer, &shutdown).await;
                    (name, result.map_err(|e| e.to_string()))
                });
            }
        }
    }
    started(running);

    // Scheduled triggers (lapse, expiry), stopped with the sources.
    {
        let scheduler = crate::triggers::schedule::Scheduler::new(
            settings,
            Arc::clone(&triggers),
            Arc::new(crate::delivery::SystemClock),
        )
        .with_writer_lock(writer.clone());
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            scheduler.run(shutdown).await;
            ("scheduler".to_string(), Ok(()))
        });
    }

    // Delivery: one worker for every provider, stopped with the sources.
    if settings.delivery.enabled && !settings.providers.is_empty() {
        let worker =
            crate::delivery::worker::Worker::new(settings, Arc::new(crate::delivery::SystemClock))
                .await
                .map_err(|e| PipelineError::Ledger(format!("delivery: {e}")))?;
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            worker.run(shutdown).await;
            ("delivery".to_string(), Ok(()))
        });
    }

    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((_, Ok(()))) => {}
            Ok((name, Err(message))) => {
                tracing::error!(source = %name, error = %message, "source stopped");
                first_error.get_or_insert(PipelineError::Source {
                    source_name: name,
                    message,
                });
            }
            Err(join_error) => {
                first_error.get_or_insert(PipelineError::Source {
                    source_name: "?".into(),
                    message: join_error.to_string(),
                });
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// What `quarantine replay` did with one source transaction's rows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplayReport {
    pub ids: Vec<i64>,
    #[serde(flatten)]
    pub replayed: crate::ledger::quarantine::Replayed,
}

/// Replays quarantined rows (`quarantine replay`, the API's replay):
/// rows of one source transaction together, each group in its own ledger
/// transaction through the source's consumer, with the mapping and
/// program of `settings`. `writer` is the running service's writer lock
/// (the CLI, a process of its own, has none to share: a deadlock with the
/// service is then resolved by PostgreSQL, and either side retries).
pub async fn replay_quarantined(
    settings: &Settings,
    writer: WriterLock,
    ids: &[i64],
) -> Result<Vec<ReplayReport>, PipelineError> {
    use crate::ledger::quarantine::{self, Replayed};
    let identity = Identity::new(&settings.identity).map_err(PipelineError::Config)?;
    let client = crate::ledger::connect(&settings.ledger)
        .await
        .map_err(|e| PipelineError::Ledger(format!("{e}; fix: {}", e.fix())))?;
    let db = crate::ledger::db::Db::new(client);
    let groups = quarantine::groups(&db, ids)
        .await
        .map_err(|e| PipelineError::Ledger(crate::ledger::db::describe(&e)))?;
    let program = Arc::new(settings.program.clone());
    let triggers = crate::triggers::Triggers::from_settings(settings);
    let mut consumers: Vec<(String, LedgerConsumer)> = Vec::new();
    let mut reports = Vec::new();
    for (source_name, ids) in groups {
        let Some(source_name) = source_name else {
            reports.push(ReplayReport {
                replayed: Replayed::Refused {
                    reason: format!(
                        "no open quarantined row {} (unknown, or replayed before)",
                        ids[0]
                    ),
                },
                ids,
            });
            continue;
        };
        let Some((index, source)) = settings
            .sources
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == source_name)
        else {
            reports.push(ReplayReport {
                replayed: Replayed::Refused { reason: format!(
                    "source `{source_name}` is not in the configuration; add it back to replay its rows"
                ) },
                ids,
            });
            continue;
        };
        let at = match consumers.iter().position(|(name, _)| *name == source_name) {
            Some(at) => at,
            None => {
                let mapping = source
                    .compiled_mapping
                    .clone()
                    .ok_or_else(|| no_mapping(index, source))?;
                let consumer = ledger_consumer(
                    settings, source, mapping, &identity, &program, &writer, &triggers,
                )
                .await?;
                consumers.push((source_name.clone(), consumer));
                consumers.len() - 1
            }
        };
        let consumer = &mut consumers[at].1;
        let replayed = consumer
            .replay(&ids)
            .await
            .map_err(|e| PipelineError::Ledger(e.to_string()))?;
        reports.push(ReplayReport { ids, replayed });
    }
    Ok(reports)
}
