//! The `loyalty-cdc` command line. Command output goes to stdout, logs to
//! stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use loyalty_cdc::config::{Settings, DEFAULT_CONFIG_PATH};
use loyalty_cdc::delivery::outbox;
use loyalty_cdc::identity::Identity;
use loyalty_cdc::{ledger, pipeline, preflight};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc's malloc: normalizing a stream allocates and
/// frees many small rows and CEL values, and glibc's allocator took about
/// a third of the service's CPU in a drain (`perf`, 2026-12-02).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "loyalty-cdc",
    version,
    about = "Real-time loyalty program from database change streams"
)]
struct Cli {
    /// Configuration file (TOML). `LOYALTY__SECTION__KEY` environment
    /// variables override its keys.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,

    /// Log line format on stderr. `RUST_LOG` sets the level (default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Readable lines for a terminal.
    Human,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, connect to the ledger and every source,
    /// and verify change-capture prerequisites; print each problem with its
    /// fix and exit 1 if there is any.
    Check,
    /// Apply pending ledger schema migrations.
    Migrate,
    /// Migrate the ledger, snapshot new sources, then stream every source
    /// into the ledger until SIGINT/SIGTERM.
    Run,
    /// Where every source stands (position, lag in bytes and seconds, last
    /// event, state) and what waits (outbox, dead letters, quarantine).
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The whole pipeline on the local databases: fresh Odoo POS and
    /// Magento 2 databases, a local provider receiver, generated customers
    /// shopping in store and online, and a live view.
    Demo {
        /// How long the traffic runs: 90, 90s, 2m (default 60s).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        duration: std::time::Duration,
        /// The HTTP listener (metrics, health, the member API).
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: std::net::SocketAddr,
        /// PostgreSQL, as a user that may create databases.
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
        postgres: String,
        /// MariaDB/MySQL, as a user that may create databases.
        #[arg(long, default_value = "mysql://root@127.0.0.1:3306")]
        mysql: String,
        /// Where the demo's configuration goes.
        #[arg(long, default_value = "target/demo")]
        dir: PathBuf,
        /// The shared schema files (Odoo POS, Magento 2).
        #[arg(long, env = "LOYALTY_SHARED_SCHEMAS", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/schemas"))]
        schemas: PathBuf,
        /// Customers (default 60).
        #[arg(long, default_value_t = 60)]
        customers: u32,
        /// Orders per second (default 20).
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
    /// Members of the program.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Source rows that could not be mapped, kept with the reason.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Messages providers refused for good, or that ran out of attempts.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// The points ledger itself.
    #[command(subcommand)]
    Ledger(LedgerCommand),
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Recompute every member's balance (available, pending, lifetime;
    /// qualifying where tiers follow lifetime points) from the entries
    /// alone and compare it with the balance the ledger keeps; exit 1 if
    /// any member disagrees. Read-only: safe while `run` books.
    Verify {
        /// Show at most this many disagreeing members (default 100).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum QuarantineCommand {
    /// Open quarantined rows, oldest first: id, source, table, operation,
    /// reason, position and the row.
    List {
        /// At most this many (default 100).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Books quarantined rows again, with the mapping and program of the
    /// configuration as it is now, at their original business time: after
    /// the mapping (or the ledger) is fixed. Rows of one source
    /// transaction are replayed together; a row that fails again stays
    /// open and nothing of it is booked.
    Replay {
        /// Quarantined row ids, as `quarantine list` shows them.
        #[arg(required = true)]
        ids: Vec<i64>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Open dead letters, oldest first: id, provider, trigger, member,
    /// reason and the provider's answer.
    List {
        /// At most this many (default 100).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make dead letters due again (same message id, fresh attempts) and
    /// re-enable their providers' endpoints.
    Replay {
        /// Dead letter ids, as `dlq list` shows them.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// GDPR erasure: each provider that can erase a person is asked to,
    /// then identifiers, profile and the member's values in stored source
    /// rows are removed, unsent messages cancelled; points and entries
    /// stay under the bare member id. Erasing again does nothing.
    Erase {
        identifier: String,
        /// Do not ask the providers (erased there by hand).
        #[arg(long)]
        local_only: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A member's id, masked identifiers, points, tier and last entries.
    /// IDENTIFIER: an email, a phone number (E.164), `card:NUMBER`,
    /// `customer:SOURCE:ID` or `member:ID`.
    Show {
        identifier: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Check => check(&cli.config).await,
            Command::Migrate => migrate(&cli.config).await,
            Command::Run => run(&cli.config).await,
            Command::Status { json } => status(&cli.config, json).await,
            Command::Demo {
                duration,
                listen,
                postgres,
                mysql,
                dir,
                schemas,
                customers,
                rate,
            } => {
                demo(loyalty_cdc::demo::DemoOptions {
                    duration,
                    listen,
                    postgres,
                    mysql,
                    dir,
                    schemas,
                    customers: customers.max(2),
                    rate,
                })
                .await
            }
            Command::Member(MemberCommand::Show { identifier, json }) => {
                member_show(&cli.config, &identifier, json).await
            }
            Command::Member(MemberCommand::Erase {
                identifier,
                local_only,
                json,
            }) => member_erase(&cli.config, &identifier, local_only, json).await,
            Command::Dlq(DlqCommand::List { limit, json }) => {
                dlq_list(&cli.config, limit, json).await
            }
            Command::Dlq(DlqCommand::Replay { ids }) => dlq_replay(&cli.config, &ids).await,
            Command::Ledger(LedgerCommand::Verify { limit, json }) => {
                ledger_verify(&cli.config, limit, json).await
            }
            Command::Quarantine(QuarantineCommand::List { limit, json }) => {
                quarantine_list(&cli.config, limit, json).await
            }
            Command::Quarantine(QuarantineCommand::Replay { ids, json }) => {
                quarantine_replay(&cli.config, &ids, json).await
            }
        }
    })
}

/// `info` for our own lines; the PostgreSQL driver's server notices ("relation
/// already exists, skipping") are noise at that level.
const DEFAULT_LOG_FILTER: &str = "info,tokio_postgres=warn";

/// Whatever `RUST_LOG` says: at debug level tokio-postgres logs the values
/// bound to every statement, and those carry emails and phone numbers. PII
/// never goes to logs, so that target stays at info.
const NO_BOUND_VALUES_IN_LOGS: &str = "tokio_postgres::query=info";

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER))
        .add_directive(
            // A constant that parses (every start of the binary, and the
            // CLI tests, run this line).
            NO_BOUND_VALUES_IN_LOGS.parse().expect("constant directive"),
        );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Loads the configuration, or prints every problem in it.
fn load(path: &Path) -> Option<Settings> {
    match Settings::load(path) {
        Ok(settings) => Some(settings),
        Err(error) => {
            eprintln!("error: {error}");
            None
        }
    }
}

async fn check(path: &Path) -> ExitCode {
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    println!(
        "ok    config {}: {} source(s), {} provider(s), {} trigger route(s)",
        path.display(),
        settings.sources.len(),
        settings.providers.len(),
        settings.triggers.routes.len()
    );
    let findings = preflight::check(&settings).await;
    for finding in &findings {
        println!("{finding}");
    }
    let problems: usize = findings.iter().map(|f| f.problems.len()).sum();
    if problems == 0 {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{problems} problem(s) found");
        ExitCode::FAILURE
    }
}

async fn migrate(path: &Path) -> ExitCode {
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    let mut client = match ledger::connect(&settings.ledger).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: ledger: {error}\n  fix: {}", error.fix());
            return ExitCode::FAILURE;
        }
    };
    match ledger::migrate(&mut client).await {
        Ok(applied) if applied.is_empty() => {
            println!("ledger schema is current; nothing to apply");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            for migration in &applied {
                println!(
                    "applied ledger migration V{}__{}",
                    migration.version, migration.name
                );
            }
            println!("ledger schema is current");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(path: &Path) -> ExitCode {
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        if let Err(error) = &terminate {
            tracing::warn!(%error, "cannot listen for SIGTERM; stop with SIGINT (Ctrl-C)");
        }
        let sigterm = async {
            match terminate {
                Ok(mut terminate) => {
                    terminate.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm => {}
        }
        tracing::info!("shutting down: finishing the open batch");
        on_signal.cancel();
    });
    // The HTTP listener (metrics, health, the member API) is bound before
    // anything starts: a taken port fails the start, naming the key.
    loyalty_cdc::api::install_recorder();
    let listener = match tokio::net::TcpListener::bind(settings.api.listen).await {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!(
                "error: api.listen: cannot listen on {}: {error}\n  fix: set [api] listen to a free address, e.g. listen = \"127.0.0.1:8788\"",
                settings.api.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let settings = std::sync::Arc::new(settings);
    let api_settings = std::sync::Arc::clone(&settings);
    let api_shutdown = shutdown.clone();
    let result = pipeline::run(&settings, shutdown, move |sources| {
        for source in &sources {
            tracing::info!(source = %source.name, kind = %source.kind, "source started");
        }
        match loyalty_cdc::api::ApiState::new(api_settings, sources) {
            Ok(state) => {
                tracing::info!(listen = %listener.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), "HTTP listener: /metrics, /healthz, /readyz, /v1/members/{{identifier}}");
                tokio::spawn(async move {
                    if let Err(error) =
                        loyalty_cdc::api::serve(listener, std::sync::Arc::new(state), api_shutdown).await
                    {
                        tracing::error!(%error, "HTTP listener stopped");
                    }
                });
            }
            Err(error) => tracing::error!(%error, "HTTP listener not started"),
        }
    })
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn member_show(path: &Path, identifier: &str, json: bool) -> ExitCode {
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    let client = match ledger::connect(&settings.ledger).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("error: ledger: {error}\n  fix: {}", error.fix());
            return ExitCode::FAILURE;
        }
    };
    let client = ledger::db::Db::new(client);
    let identity = match Identity::new(&settings.identity) {
        Ok(identity) => identity,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let member = ledger::members::find_typed(&client, &identity, identifier)
        .await
        .map_err(|e| e.to_string());
    let view = match member {
        Ok(Some(member)) => ledger::members::view(&client, member)
            .await
            .map_err(|e| format!("ledger: {e}")),
        Ok(None) => Ok(None),
        Err(message) => Err(message),
    };
    match view {
        Ok(Some(view)) if json => print_json(&view),
        Ok(Some(view)) => {
            println!("member {}", view.member_id);
            println!("  identifiers  {}", view.identifiers.join(", "));
            println!(
                "  points       {} available, {} pending, {} lifetime",
                view.points.available, view.points.pending, view.points.lifetime
            );
            println!("  tier         {}", view.tier.as_deref().unwrap_or("-"));
            println!("  orders       {}", view.orders);
            for entry in &view.last_entries {
                println!(
                    "  {}  {:>16} {:>8}  {}:{}",
                    entry.occurred_at.format("%Y-%m-%d %H:%M:%S"),
                    entry.kind,
                    entry.points,
                    entry.source,
                    entry.order_ref.as_deref().unwrap_or("-")
                );
            }
            ExitCode::SUCCESS
        }
        Ok(None) => {
            // Masked: stderr is where logs are collected, and identifiers
            // are personal data.
            eprintln!(
                "no member has the identifier {}",
                masked_input(&identity, identifier)
            );
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn status(path: &Path, json: bool) -> ExitCode {
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    let db = match ledger::connect(&settings.ledger).await {
        Ok(client) => ledger::db::Db::new(client),
        Err(error) => {
            eprintln!("error: ledger: {error}\n  fix: {}", error.fix());
            return ExitCode::FAILURE;
        }
    };
    let status = match loyalty_cdc::status::gather(&settings, &db).await {
        Ok(status) => status,
        Err(error) => {
            eprintln!(
                "error: ledger: {}\n  fix: run `loyalty-cdc migrate` (or `run`) against this ledger first",
                ledger::db::describe(&error)
            );
            return ExitCode::FAILURE;
        }
    };
    if json {
        return print_json(&status);
    }
    println!(
        "{:<16} {:<9} {:<13} {:>14} {:>10}  {:<20} position",
        "source", "kind", "state", "lag bytes", "lag s", "last event"
    );
    for source in &status.sources {
        println!(
            "{:<16} {:<9} {:<13} {:>14} {:>10}  {:<20} {}",
            source.name,
            source.kind,
            source.state,
            source.lag_bytes.map_or("?".into(), |b| b.to_string()),
            source.lag_seconds.map_or("?".into(), |s| format!("{s:.1}")),
            source
                .last_event_at
                .map_or("-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            if source.position.is_empty() {
                "-"
            } else {
                &source.position
            },
        );
        if let Some(error) = &source.error {
            println!("{:<16} cannot ask the source: {error}", "");
        }
    }
    println!(
        "outbox: {} pending{}; {} dead letter(s); {} quarantined",
        status.outbox_pending,
        status
            .outbox_oldest_pending_seconds
            .map_or(String::new(), |s| format!(" (oldest {s:.0} s)")),
        status.dead_letters,
        status.quarantined
    );
    ExitCode::SUCCESS
}

async fn member_erase(path: &Path, identifier: &str, local_only: bool, json: bool) -> ExitCode {
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    let identity = match Identity::new(&settings.identity) {
        Ok(identity) => identity,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let db = match ledger::connect(&settings.ledger).await {
        Ok(client) => ledger::db::Db::new(client),
        Err(error) => {
            eprintln!("error: ledger: {error}\n  fix: {}", error.fix());
            return ExitCode::FAILURE;
        }
    };
    let member = match ledger::members::find_typed(&db, &identity, identifier).await {
        Ok(Some(member)) => member,
        Ok(None) => {
            // Erased before (its identifiers are gone) or never known:
            // either way nothing here holds it.
            println!(
                "nothing to erase: no member has the identifier {}",
                masked_input(&identity, identifier)
            );
            return ExitCode::SUCCESS;
        }
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let erasure =
        match loyalty_cdc::erasure::erase(&settings, &db, &identity, member, local_only).await {
            Ok(erasure) => erasure,
            Err(error) => {
                eprintln!("error: ledger: {}", ledger::db::describe(&error));
                return ExitCode::FAILURE;
            }
        };
    let failed = matches!(
        erasure,
        loyalty_cdc::erasure::Erasure::ProvidersFailed { .. }
    );
    if json {
        if print_json(&erasure) == ExitCode::FAILURE {
            return ExitCode::FAILURE;
        }
    } else {
        use loyalty_cdc::erasure::Erasure;
        match &erasure {
            Erasure::Erased {
                member_id,
                erased,
                messages_cancelled,
                providers,
            } => {
                println!(
                    "member {member_id} erased: {} identifier(s), {} stored source row(s) cleaned, {messages_cancelled} unsent message(s) cancelled; points and entries kept under the member id",
                    erased.identifiers, erased.source_rows
                );
                for provider in providers {
                    println!(
                        "  provider {}: erasure accepted ({})",
                        provider.provider,
                        provider.status.map_or("-".into(), |s| s.to_string())
                    );
                }
            }
            Erasure::AlreadyErased { member_id } => {
                println!("member {member_id} was erased before; nothing to do")
            }
            Erasure::ProvidersFailed {
                member_id,
                providers,
            } => {
                eprintln!("error: member {member_id}: not every provider accepted the erasure, so nothing was erased here (the address is still needed to ask again):");
                for provider in providers {
                    eprintln!(
                        "  provider {}: {}",
                        provider.provider,
                        if provider.done {
                            "accepted".to_string()
                        } else {
                            provider.error.clone().unwrap_or_default()
                        }
                    );
                }
                eprintln!("  fix: run `member erase` again once the provider answers, or erase there by hand and run it with --local-only");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The ledger database, or the error printed.
async fn ledger_db(path: &Path) -> Option<ledger::db::Db> {
    let settings = load(path)?;
    match ledger::connect(&settings.ledger).await {
        Ok(client) => Some(ledger::db::Db::new(client)),
        Err(error) => {
            eprintln!("error: ledger: {error}\n  fix: {}", error.fix());
            None
        }
    }
}

async fn ledger_verify(path: &Path, limit: i64, json: bool) -> ExitCode {
    let Some(db) = ledger_db(path).await else {
        return ExitCode::FAILURE;
    };
    let verdict = match ledger::verify::verify(db.client(), limit).await {
        Ok(verdict) => verdict,
        Err(error) => {
            eprintln!("error: ledger: {}", ledger::db::describe(&error));
            if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) {
                eprintln!("  fix: run `loyalty-cdc migrate` (the ledger has no schema yet)");
            }
            return ExitCode::FAILURE;
        }
    };
    if json {
        let printed = print_json(&verdict);
        return if verdict.agrees() {
            printed
        } else {
            ExitCode::FAILURE
        };
    }
    for d in &verdict.shown {
        let stored = match &d.stored {
            Some(s) => format!(
                "available {} pending {} lifetime {} qualifying {}",
                s.available, s.pending, s.lifetime, s.qualifying
            ),
            None => "no balance row".to_string(),
        };
        println!(
            "FAIL  member {}{}: balance {stored}; from its entries available {} pending {} lifetime {}",
            d.member_id,
            if d.member_missing {
                " (no such member)"
            } else {
                ""
            },
            d.from_entries.available,
            d.from_entries.pending,
            d.from_entries.lifetime
        );
    }
    if verdict.agrees() {
        println!(
            "ok    the balances of {} member(s) agree with their {} entries",
            verdict.members, verdict.entries
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "{} of {} member(s) disagree with their entries{}",
            verdict.disagreeing,
            verdict.members,
            if (verdict.shown.len() as i64) < verdict.disagreeing {
                format!(" (the first {} shown: --limit)", verdict.shown.len())
            } else {
                String::new()
            }
        );
        ExitCode::FAILURE
    }
}

async fn dlq_list(path: &Path, limit: i64, json: bool) -> ExitCode {
    let Some(db) = ledger_db(path).await else {
        return ExitCode::FAILURE;
    };
    let letters = match outbox::dead_letters(&db, limit.max(1)).await {
        Ok(letters) => letters,
        Err(error) => {
            eprintln!("error: ledger: {error}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        return print_json(&letters);
    }
    if letters.is_empty() {
        println!("no dead letters");
    }
    for letter in &letters {
        println!(
            "{:>6}  {}  {:<12} {:<14} member {:<8} {}",
            letter.id,
            letter.dead_at.format("%Y-%m-%d %H:%M:%S"),
            letter.provider,
            letter.trigger,
            letter.member_id.map_or("-".to_string(), |m| m.to_string()),
            letter.reason
        );
        if let Some(body) = &letter.response_body {
            // The provider's answer may name the recipient: it is shown to
            // the operator who asked, never logged.
            println!(
                "        answer: {}",
                outbox::truncate(body, 500).replace('\n', " ")
            );
        }
    }
    ExitCode::SUCCESS
}

async fn dlq_replay(path: &Path, ids: &[i64]) -> ExitCode {
    let Some(db) = ledger_db(path).await else {
        return ExitCode::FAILURE;
    };
    match outbox::replay(&db, ids, chrono::Utc::now()).await {
        Ok(replayed) => {
            let missing: Vec<String> = ids
                .iter()
                .filter(|id| !replayed.contains(id))
                .map(|id| id.to_string())
                .collect();
            println!("{} dead letter(s) due again", replayed.len());
            if missing.is_empty() {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "not replayed (unknown or replayed before): {}",
                    missing.join(", ")
                );
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("error: ledger: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn quarantine_list(path: &Path, limit: i64, json: bool) -> ExitCode {
    let Some(db) = ledger_db(path).await else {
        return ExitCode::FAILURE;
    };
    let rows = match ledger::quarantine::open(&db, limit.max(1)).await {
        Ok(rows) => rows,
        Err(error) => {
            eprintln!("error: ledger: {}", ledger::db::describe(&error));
            return ExitCode::FAILURE;
        }
    };
    if json {
        return print_json(&rows);
    }
    if rows.is_empty() {
        println!("nothing quarantined");
    }
    for row in &rows {
        println!(
            "{:>6}  {}  {:<10} {:<24} {:<8} at {}  {}",
            row.id,
            row.quarantined_at.format("%Y-%m-%d %H:%M:%S"),
            row.source,
            row.table,
            row.operation,
            row.position,
            row.reason
        );
        if let Some(data) = &row.row {
            // The row may hold personal data: shown to the operator who
            // asked, never logged.
            println!("        row: {data}");
        }
        if !row.replayable {
            println!("        (no replayable copy: quarantined before replay existed, or erased)");
        }
    }
    ExitCode::SUCCESS
}

async fn quarantine_replay(path: &Path, ids: &[i64], json: bool) -> ExitCode {
    use loyalty_cdc::ledger::quarantine::Replayed;
    let Some(settings) = load(path) else {
        return ExitCode::FAILURE;
    };
    let reports = match loyalty_cdc::pipeline::replay_quarantined(
        &settings,
        ledger::apply::WriterLock::default(),
        ids,
    )
    .await
    {
        Ok(reports) => reports,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let all_booked = reports
        .iter()
        .all(|r| matches!(r.replayed, Replayed::Booked { .. }));
    if json {
        let printed = print_json(&reports);
        return if all_booked {
            printed
        } else {
            ExitCode::FAILURE
        };
    }
    for report in &reports {
        let ids: Vec<String> = report.ids.iter().map(i64::to_string).collect();
        let ids = ids.join(", ");
        match &report.replayed {
            Replayed::Booked { events } => {
                println!("replayed {ids}: {events} event(s) booked")
            }
            Replayed::StillFails { reasons } => {
                eprintln!("{ids} fails again, nothing booked, left open:");
                for reason in reasons {
                    eprintln!("  {reason}");
                }
                eprintln!("  fix: correct the mapping or the ledger as the reason says, then replay again");
            }
            Replayed::Refused { reason } => eprintln!("{ids} not replayed: {reason}"),
        }
    }
    if all_booked {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `90`, `90s`, `2m`, `1h`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; write e.g. 20s, 2m or 90"))?;
    let seconds = match unit {
        "s" => value,
        "m" => value * 60,
        "h" => value * 3600,
        _ => return Err(format!("`{text}`: the unit is s, m or h")),
    };
    Ok(std::time::Duration::from_secs(seconds))
}

async fn demo(options: loyalty_cdc::demo::DemoOptions) -> ExitCode {
    use loyalty_cdc::demo::Report;
    use std::io::{IsTerminal, Write};
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_signal.cancel();
        }
    });
    // On a terminal the live view redraws in place; piped, it is written
    // every 5 s.
    let terminal = std::io::stdout().is_terminal();
    let mut drawn = 0usize;
    let mut last_written: Option<std::time::Instant> = None;
    let mut show = |report: Report| {
        match report {
            Report::Step(line) => println!("{line}"),
            Report::View(view) if terminal => {
                if drawn > 0 {
                    // Back to the top of the last view.
                    print!("\x1b[{drawn}A\x1b[J");
                }
                print!("{view}");
                drawn = view.lines().count();
            }
            Report::View(view) => {
                if last_written.is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(5)) {
                    print!("{view}");
                    last_written = Some(std::time::Instant::now());
                }
            }
            Report::Final(view) => print!("{view}"),
        }
        let _ = std::io::stdout().flush();
    };
    let summary = match loyalty_cdc::demo::run(options, shutdown, &mut show).await {
        Ok(summary) => summary,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "\n== done: {} orders and {} refunds written; the ledger holds {} orders, {} entries, {} members; {} webhooks delivered and verified ({} refused for a bad signature)",
        summary.orders_written,
        summary.refunds_written,
        summary.orders_in_ledger,
        summary.ledger_entries,
        summary.members,
        summary.delivered_total(),
        summary.unsigned
    );
    let config = summary.config.display();
    println!("   where to look (the ledger stays until the next demo):");
    println!("     loyalty-cdc --config {config} member show customer1@demo.example");
    println!("     loyalty-cdc --config {config} status");
    println!("     loyalty-cdc --config {config} run    # the service again: /metrics, /readyz, the wallet on api.listen");
    if summary.orders_written > 0
        && summary.ledger_entries > 0
        && summary.delivered_total() > 0
        && summary.unsigned == 0
    {
        ExitCode::SUCCESS
    } else {
        eprintln!("error: the demo ran but did not go end to end: {summary:?}");
        ExitCode::FAILURE
    }
}

/// An identifier a person typed, masked for output (`e***@example.com`);
/// `member:ID` as is (an id is no personal data).
fn masked_input(identity: &Identity, text: &str) -> String {
    if text.starts_with("member:") {
        return text.to_string();
    }
    identity
        .parse_typed(text)
        .map_or_else(|_| "(not an identifier)".to_string(), |i| i.to_string())
}

/// Prints `value` as indented JSON on stdout (the `--json` of every
/// command).
fn print_json(value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: cannot print JSON: {error}");
            ExitCode::FAILURE
        }
    }
}
