//! Test harness shared by every integration test: a uniquely named
//! PostgreSQL and MariaDB database per test, roles and users with passwords,
//! the real retail schemas from `../shared/schemas/`, and teardown that drops
//! replication slots, publications, databases and roles even when the test
//! fails (guards are dropped while a panic unwinds).
//!
//! Server settings the tests rely on are made by
//! `docker/setup-local-databases.sh` (run by the test command first):
//! logical `wal_level`, ≥ 20 slots and WAL senders, a replication line and a
//! scram-sha-256 line for members of `lcdc_password_auth` in pg_hba.conf,
//! and a ROW binlog with FULL image and metadata in MariaDB.
//!
//! Admin connections: `LCDC_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`) and `LCDC_TEST_MYSQL_URL`
//! (default `mysql://root@127.0.0.1:3306`). If a server is not there the
//! test fails with the fix; it is never skipped.

#![allow(dead_code)] // each test module uses a different part

pub mod heap;
pub mod reader;
pub mod receiver;
pub mod sink;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

use mysql_async::prelude::Queryable;
use tokio_postgres::NoTls;

/// Where the tests' logs go: the code under test's own (in this process)
/// and the binary's (`run_cli`, spawned services). `scripts/test.sh` scans
/// them afterwards for email addresses and phone numbers: PII never goes
/// to logs.
pub fn log_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("test-logs")
}

/// A log file of this process in [`log_dir`], appended to.
pub fn log_file(name: &str) -> std::fs::File {
    let dir = log_dir();
    std::fs::create_dir_all(&dir).expect("test log directory");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}-{}.log", std::process::id())))
        .expect("test log file")
}

/// Logs of the code under test: at debug level for our crate into
/// [`log_dir`] (scanned for PII after the run), and shown for failing
/// tests when `LCDC_TEST_LOG` is set (e.g. `LCDC_TEST_LOG=loyalty_cdc=debug`).
pub fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        // As the binary does: the driver's bound values never reach a log.
        let file_filter = tracing_subscriber::EnvFilter::new(
            "info,loyalty_cdc=debug,tokio_postgres=warn,tokio_postgres::query=info",
        );
        let file = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(log_file("it")))
            .with_filter(file_filter);
        let shown = std::env::var("LCDC_TEST_LOG").ok().map(|filter| {
            tracing_subscriber::fmt::layer()
                .with_test_writer()
                .with_filter(tracing_subscriber::EnvFilter::new(filter))
        });
        let _ = tracing_subscriber::registry()
            .with(file)
            .with(shown)
            .try_init();
    });
}

/// Prefix of everything the tests create; leftovers of killed runs are
/// recognised by it (and by the pid after it).
pub const TEST_PREFIX: &str = "lcdc_t";

pub fn pg_admin_url() -> String {
    std::env::var("LCDC_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn mysql_admin_url() -> String {
    std::env::var("LCDC_TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
}

/// `lcdc_t_<pid>_<n>_<label>`: unique across parallel tests in this process
/// and across processes, and short enough for a slot name.
pub fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = format!("{TEST_PREFIX}_{}_{n}_{label}", std::process::id());
    assert!(name.len() <= 63, "test object name too long: {name}");
    name
}

/// Path of a schema file in `../shared/schemas/`.
pub fn shared_schema(file: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/schemas")
        .join(file);
    assert!(
        path.is_file(),
        "{} not found: the tests need the shared/ directory beside the project",
        path.display()
    );
    path
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loyalty-cdc"))
}

/// Runs `fut` to completion on a runtime of its own in another thread:
/// teardown runs from `Drop`, possibly inside a test's runtime, which
/// cannot be blocked on from within.
fn run_detached<F>(make: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()>,
{
    let handle = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("teardown runtime");
        runtime.block_on(make());
    });
    if handle.join().is_err() {
        eprintln!("test teardown panicked; leftovers are swept on the next run");
    }
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.unwrap_or_else(|error| {
        panic!("cannot connect to PostgreSQL at {url}: {error}; run bash docker/setup-local-databases.sh")
    });
    tokio::spawn(connection);
    client
}

pub async fn mysql_connect(url: &str) -> mysql_async::Conn {
    mysql_async::Conn::from_url(url).await.unwrap_or_else(|error| {
        panic!("cannot connect to MariaDB at {url}: {error}; run bash docker/setup-local-databases.sh")
    })
}

/// Drops what killed test processes left behind (their pid is gone), once
/// per test process.
async fn sweep_leftovers() {
    init_logging();
    static SWEEP: Once = Once::new();
    let mut first = false;
    SWEEP.call_once(|| first = true);
    if !first {
        return;
    }
    let dead = |name: &str| -> bool {
        let pid = name
            .strip_prefix(&format!("{TEST_PREFIX}_"))
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        pid.is_some_and(|pid| !PathBuf::from(format!("/proc/{pid}")).exists())
    };
    let admin = pg_connect(&pg_admin_url()).await;
    let pattern = format!("{TEST_PREFIX}\\_%");
    for row in admin
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap_or_default()
    {
        let slot: String = row.get(0);
        if dead(&slot) {
            let _ = drop_pg_slot(&admin, &slot).await;
        }
    }
    for row in admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap_or_default()
    {
        let database: String = row.get(0);
        if dead(&database) {
            drop_pg_database(&admin, &database).await;
        }
    }
    for row in admin
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE $1",
            &[&pattern],
        )
        .await
        .unwrap_or_default()
    {
        let role: String = row.get(0);
        if dead(&role) {
            let _ = admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", pg_ident(&role)))
                .await;
        }
    }
    let mut my = mysql_connect(&mysql_admin_url()).await;
    let databases: Vec<String> = my
        .exec(
            "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA WHERE SCHEMA_NAME LIKE ?",
            (&pattern,),
        )
        .await
        .unwrap_or_default();
    for database in databases.iter().filter(|d| dead(d)) {
        let _ = my
            .query_drop(format!("DROP DATABASE IF EXISTS {}", my_ident(database)))
            .await;
    }
    let users: Vec<(String, String)> = my
        .exec(
            "SELECT User, Host FROM mysql.user WHERE User LIKE ?",
            (&pattern,),
        )
        .await
        .unwrap_or_default();
    for (user, host) in users.iter().filter(|(u, _)| dead(u)) {
        let _ = my
            .query_drop(format!(
                "DROP USER IF EXISTS {}@{}",
                my_string(user),
                my_string(host)
            ))
            .await;
    }
    let _ = my.disconnect().await;
}

/// A MariaDB string literal.
pub fn my_string(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

pub fn pg_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub fn my_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

async fn drop_pg_slot(
    admin: &tokio_postgres::Client,
    slot: &str,
) -> Result<(), tokio_postgres::Error> {
    // An active slot cannot be dropped: end its walsender first.
    admin
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await?;
    for _ in 0..50 {
        match admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            // Still active for a moment after the terminate.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    Ok(())
}

async fn drop_pg_database(admin: &tokio_postgres::Client, database: &str) {
    // Slots pin a database (DROP DATABASE refuses while one exists);
    // publications live inside it and go with it.
    let slots = admin
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE database = $1",
            &[&database],
        )
        .await
        .unwrap_or_default();
    for row in slots {
        let slot: String = row.get(0);
        let _ = drop_pg_slot(admin, &slot).await;
    }
    if let Err(error) = admin
        .batch_execute(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            pg_ident(database)
        ))
        .await
    {
        eprintln!("teardown: cannot drop database {database}: {error}");
    }
}

/// A PostgreSQL database for one test; dropped (with its slots and
/// publications) when the guard is dropped.
pub struct PgDatabase {
    pub name: String,
}

impl PgDatabase {
    pub async fn create(label: &str) -> Self {
        init_logging();
        sweep_leftovers().await;
        let name = unique_name(label);
        let admin = pg_connect(&pg_admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", pg_ident(&name)))
            .await
            .unwrap_or_else(|error| panic!("CREATE DATABASE {name}: {error}"));
        Self { name }
    }

    /// URL of this database as the admin user.
    pub fn url(&self) -> String {
        self.url_as("postgres", None)
    }

    pub fn url_as(&self, user: &str, password: Option<&str>) -> String {
        let mut url = url::Url::parse(&pg_admin_url()).expect("LCDC_TEST_PG_URL is a URL");
        url.set_path(&self.name);
        url.set_username(user).expect("URL takes a user");
        url.set_password(password).expect("URL takes a password");
        url.to_string()
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&self.url()).await
    }

    /// Loads a schema file from `../shared/schemas/`.
    pub async fn load_schema(&self, file: &str) {
        let sql = std::fs::read_to_string(shared_schema(file)).expect("schema file readable");
        self.client()
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|error| panic!("loading {file} into {}: {error}", self.name));
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        run_detached(move || async move {
            let admin = pg_connect(&pg_admin_url()).await;
            drop_pg_database(&admin, &name).await;
        });
    }
}

/// A PostgreSQL login role for one test, dropped with the guard.
pub struct PgRole {
    pub name: String,
}

impl PgRole {
    /// `attributes` e.g. `LOGIN PASSWORD 'x' IN ROLE lcdc_password_auth`.
    pub async fn create(label: &str, attributes: &str) -> Self {
        sweep_leftovers().await;
        let name = unique_name(label);
        let admin = pg_connect(&pg_admin_url()).await;
        admin
            .batch_execute(&format!("CREATE ROLE {} {attributes}", pg_ident(&name)))
            .await
            .unwrap_or_else(|error| panic!("CREATE ROLE {name}: {error}"));
        Self { name }
    }
}

impl Drop for PgRole {
    fn drop(&mut self) {
        let name = self.name.clone();
        run_detached(move || async move {
            let admin = pg_connect(&pg_admin_url()).await;
            // Sessions of the role would block the drop.
            let _ = admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
                    &[&name],
                )
                .await;
            if let Err(error) = admin
                .batch_execute(&format!("DROP ROLE IF EXISTS {}", pg_ident(&name)))
                .await
            {
                eprintln!("teardown: cannot drop role {name}: {error}");
            }
        });
    }
}

/// A MariaDB/MySQL database for one test, dropped with the guard.
pub struct MyDatabase {
    pub name: String,
}

impl MyDatabase {
    pub async fn create(label: &str) -> Self {
        sweep_leftovers().await;
        let name = unique_name(label);
        let mut admin = mysql_connect(&mysql_admin_url()).await;
        admin
            .query_drop(format!("CREATE DATABASE {}", my_ident(&name)))
            .await
            .unwrap_or_else(|error| panic!("CREATE DATABASE {name}: {error}"));
        let _ = admin.disconnect().await;
        Self { name }
    }

    pub fn url(&self) -> String {
        self.url_as("root", None)
    }

    pub fn url_as(&self, user: &str, password: Option<&str>) -> String {
        let mut url = url::Url::parse(&mysql_admin_url()).expect("LCDC_TEST_MYSQL_URL is a URL");
        url.set_path(&self.name);
        url.set_username(user).expect("URL takes a user");
        url.set_password(password).expect("URL takes a password");
        url.to_string()
    }

    pub async fn conn(&self) -> mysql_async::Conn {
        mysql_connect(&self.url()).await
    }

    /// Loads a schema file from `../shared/schemas/` (several statements,
    /// session settings included, on one connection).
    pub async fn load_schema(&self, file: &str) {
        let sql = std::fs::read_to_string(shared_schema(file)).expect("schema file readable");
        let mut conn = self.conn().await;
        conn.query_drop(sql)
            .await
            .unwrap_or_else(|error| panic!("loading {file} into {}: {error}", self.name));
        let _ = conn.disconnect().await;
    }

    /// A Magento shop as the shipped mapping reads it: the shared subset
    /// and the wishlist and catalog tables it lacks
    /// (`connectors/schemas/magento2-catalog.mysql.sql`).
    pub async fn load_magento(&self) {
        self.load_schema("magento2.mysql.sql").await;
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("connectors/schemas/magento2-catalog.mysql.sql");
        let sql = std::fs::read_to_string(&path).expect("catalog schema readable");
        let mut conn = self.conn().await;
        conn.query_drop(sql).await.unwrap_or_else(|error| {
            panic!("loading {} into {}: {error}", path.display(), self.name)
        });
        let _ = conn.disconnect().await;
    }
}

impl Drop for MyDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        run_detached(move || async move {
            let mut admin = mysql_connect(&mysql_admin_url()).await;
            if let Err(error) = admin
                .query_drop(format!("DROP DATABASE IF EXISTS {}", my_ident(&name)))
                .await
            {
                eprintln!("teardown: cannot drop database {name}: {error}");
            }
            let _ = admin.disconnect().await;
        });
    }
}

/// A MariaDB/MySQL user (`'name'@'%'`) for one test, dropped with the guard.
pub struct MyUser {
    pub name: String,
}

impl MyUser {
    /// Creates the user with `password`, then runs each `GRANT … TO {user}`
    /// template (`{user}` is replaced by the quoted user).
    pub async fn create(label: &str, password: &str, grants: &[&str]) -> Self {
        sweep_leftovers().await;
        let name = unique_name(label);
        let mut admin = mysql_connect(&mysql_admin_url()).await;
        admin
            // Account management statements take no placeholders.
            .query_drop(format!(
                "CREATE USER {}@'%' IDENTIFIED BY {}",
                my_string(&name),
                my_string(password)
            ))
            .await
            .unwrap_or_else(|error| panic!("CREATE USER {name}: {error}"));
        let quoted = format!("'{name}'@'%'");
        for grant in grants {
            admin
                .query_drop(grant.replace("{user}", &quoted))
                .await
                .unwrap_or_else(|error| panic!("{grant} for {name}: {error}"));
        }
        let _ = admin.disconnect().await;
        Self { name }
    }
}

impl Drop for MyUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        run_detached(move || async move {
            let mut admin = mysql_connect(&mysql_admin_url()).await;
            if let Err(error) = admin
                .query_drop(format!("DROP USER IF EXISTS {}@'%'", my_string(&name)))
                .await
            {
                eprintln!("teardown: cannot drop user {name}: {error}");
            }
            let _ = admin.disconnect().await;
        });
    }
}

/// Output of one run of the `loyalty-cdc` binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Everything printed, for assertions that do not care which stream.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Writes `config` to a temporary file and runs `loyalty-cdc --config FILE
/// args…` with extra environment variables.
pub async fn run_cli(config: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(&path, config).expect("write config");
    let mut command = tokio::process::Command::new(binary());
    command.arg("--config").arg(&path).args(args);
    // The tests' own LOYALTY__ overrides would leak into every run.
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("LOYALTY__")) {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = command.output().await.expect("run loyalty-cdc");
    {
        use std::io::Write as _;
        let _ = log_file("cli").write_all(&output.stderr);
    }
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The Standard Webhooks secret of the tests' webhook providers (the
/// specification's example).
pub const WEBHOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A `[[providers]]` entry for the shipped generic webhook template,
/// posting to `url`.
pub fn webhook_provider(name: &str, url: &str) -> String {
    let template =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/providers/webhook.toml");
    format!(
        "\n[[providers]]\nname = \"{name}\"\ntemplate = \"{}\"\nbase_url = \"{url}\"\nsecrets.signing_secret = \"{WEBHOOK_SECRET}\"\n",
        template.display()
    )
}

/// A migrated ledger and the configuration `[ledger]` + a webhook
/// provider `crm` (never called) + `extra`, for tests that book through
/// the ledger's own functions and record triggers on a controlled clock.
pub async fn migrated_ledger(
    extra: &str,
) -> (
    PgDatabase,
    loyalty_cdc::ledger::db::Db,
    loyalty_cdc::config::Settings,
    std::sync::Arc<loyalty_cdc::triggers::Triggers>,
) {
    init_logging();
    let ledger_db = PgDatabase::create("ledger").await;
    let mut client = ledger_db.client().await;
    loyalty_cdc::ledger::migrate(&mut client).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(
        &path,
        format!(
            "[ledger]\nurl = \"{}\"\n{}\n{extra}",
            ledger_db.url(),
            webhook_provider("crm", "http://127.0.0.1:9/hook")
        ),
    )
    .unwrap();
    let settings = loyalty_cdc::config::Settings::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let triggers = loyalty_cdc::triggers::Triggers::from_settings(&settings);
    (
        ledger_db,
        loyalty_cdc::ledger::db::Db::new(client),
        settings,
        triggers,
    )
}

/// One completed purchase of `skus` (10 each) booked through the ledger's
/// own functions at `when`, with the batch's triggers recorded.
pub async fn book_purchase(
    db: &loyalty_cdc::ledger::db::Db,
    triggers: &loyalty_cdc::triggers::Triggers,
    member: i64,
    reference: &str,
    skus: &[&str],
    when: chrono::DateTime<chrono::Utc>,
) {
    use loyalty_cdc::normalize::{Line, OrderEvent, OrderStage};
    let lines: Vec<Line> = skus
        .iter()
        .map(|sku| Line {
            sku: Some(sku.to_string()),
            quantity: 1.into(),
            amount: 10.into(),
            discounted: false,
            category: None,
        })
        .collect();
    let total: rust_decimal::Decimal = (10 * skus.len() as i64).into();
    let event = OrderEvent {
        order_ref: reference.into(),
        stage: OrderStage::Completed,
        earn_basis: total,
        grand_total: total,
        currency: None,
        channel: None,
        identifiers: Default::default(),
        lines,
    };
    let program = loyalty_cdc::config::ProgramSettings::default();
    db.batch_execute("BEGIN").await.unwrap();
    loyalty_cdc::ledger::orders::apply_order(db, &program, "shop", &event, Some(member), when)
        .await
        .unwrap();
    let mut facts = loyalty_cdc::triggers::BatchFacts::default();
    facts.touched(member, true, when);
    facts.purchased(member, when, &event.lines);
    loyalty_cdc::triggers::record(db, triggers, facts)
        .await
        .unwrap();
    db.batch_execute("COMMIT").await.unwrap();
}
