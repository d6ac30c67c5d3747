//! The `loyalty-cdc` command line. Command output goes to stdout, logs to
//! stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use loyalty_cdc::config::{Settings, DEFAULT_CONFIG_PATH};
use loyalty_cdc::{ledger, preflight};

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
        .add_directive(NO_BOUND_VALUES_IN_LOGS.parse().expect("constant directive"));
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
