//! Loading and validating configuration: every mistake names the file (or
//! the environment variable) and the key, and says how to fix it.

use std::path::PathBuf;

use loyalty_cdc::config::{ConfigError, ConfigProblem, Settings};

use crate::support::{run_cli, PgDatabase};

const LEDGER: &str = "[ledger]\nurl = \"postgres://postgres@127.0.0.1:5432/loyalty\"\n";

struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn write_config(text: &str) -> ConfigFile {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(&path, text).expect("write config");
    ConfigFile { _dir: dir, path }
}

fn problems(text: &str) -> (String, Vec<ConfigProblem>) {
    let file = write_config(text);
    let origin = file.path.display().to_string();
    match Settings::load(&file.path) {
        Ok(settings) => panic!("expected an error, loaded {settings:?}"),
        Err(ConfigError { problems }) => (origin, problems),
    }
}

fn only_problem(text: &str) -> ConfigProblem {
    let (origin, mut problems) = problems(text);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    let problem = problems.remove(0);
    assert_eq!(problem.origin, origin, "the problem must name the file");
    problem
}

#[test]
fn a_complete_config_loads_with_defaults_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("connectors/providers")).unwrap();
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/providers/webhook.toml"),
        dir.path().join("connectors/providers/webhook.toml"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("webhook-secret"),
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n",
    )
    .unwrap();
    let path = dir.path().join("loyalty-cdc.toml");
    std::fs::write(
        &path,
        format!(
            r#"{LEDGER}
[[sources]]
name = "pos"
kind = "postgres"
url = "postgres://loyalty:s3cret@pos.internal/odoo"

[[sources]]
name = "shop"
kind = "mysql"
url = "mariadb://loyalty@shop.internal/magento"
server_id = 4242

[program]
points_per_currency_unit = "1.5"
tiers = [{{ name = "member", threshold = 0 }}, {{ name = "gold", threshold = 1000 }}]

[[providers]]
name = "crm_webhook"
template = "connectors/providers/webhook.toml"
base_url = "http://127.0.0.1:9000"
secrets.signing_secret = {{ file = "webhook-secret" }}

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "crm_webhook"
"#
        ),
    )
    .unwrap();
    let settings = Settings::load(&path).expect("valid config");
    assert_eq!(
        settings.ledger.pool_size,
        loyalty_cdc::config::DEFAULT_LEDGER_POOL_SIZE
    );
    assert_eq!(settings.sources[0].slot_name(), "loyalty_pos");
    assert_eq!(settings.sources[0].publication_name(), "loyalty_pos");
    assert_eq!(settings.sources[1].mysql_server_id(), 4242);
    assert_eq!(settings.program.points_per_currency_unit.to_string(), "1.5");
    assert_eq!(settings.program.tiers[1].name, "gold");
    assert_eq!(
        settings.providers[0].secrets["signing_secret"].expose(),
        Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    );
    assert_eq!(settings.api.listen.to_string(), "127.0.0.1:8787");
    // Neither the URL password nor the file secret shows in debug output.
    let debug = format!("{settings:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(
        !debug.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
        "{debug}"
    );
}

#[test]
fn provider_templates_and_routes_say_what_they_lack() {
    let providers = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/providers");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "name = \"B\"\nchannel = \"sms\"\nbase_url = \"https://x.test\"\npath = \"/{{ oops \"\nencoding = \"form\"\n[form]\nTo = \"x\"\n",
    )
    .unwrap();
    let (origin, problems) = problems(&format!(
        r#"{LEDGER}
[[providers]]
name = "twilio"
template = "{twilio}"
secrets.account_sid = "AC1"
settings.from = "+15005550006"

[[providers]]
name = "broken"
template = "{broken}"

[[triggers.routes]]
trigger = "tier_upgrade"
provider = "twilio"
params.txt = "typo"

[delivery]
quiet_hours = {{ start = "9pm" }}
"#,
        twilio = providers.join("twilio.toml").display(),
        broken = broken.display()
    ));
    let found: Vec<(String, String, String)> = problems
        .iter()
        .map(|p| (p.origin.clone(), p.key.clone(), p.message.clone()))
        .collect();
    let has = |file: &str, key: &str, words: &str| {
        assert!(
            found
                .iter()
                .any(|(o, k, m)| o.ends_with(file) && k == key && m.contains(words)),
            "no problem {file} {key} `{words}` in {found:#?}"
        )
    };
    has(
        &origin,
        "providers[0].secrets.auth_token",
        "needs the secret `auth_token`",
    );
    has(
        &origin,
        "triggers.routes[0].params.text",
        "needs the route parameter `text`",
    );
    has(
        &origin,
        "triggers.routes[0].params.txt",
        "takes no parameter `txt` (it takes: text)",
    );
    has(&origin, "delivery.quiet_hours.start", "use HH:MM");
    has("broken.toml", "path", "does not compile");
}

#[test]
fn a_typo_in_a_key_names_the_key_and_the_section() {
    let problem = only_problem(&format!("{LEDGER}pool_sise = 4\n"));
    assert_eq!(problem.key, "ledger");
    assert!(
        problem.message.starts_with(
            "unknown field `pool_sise`, expected one of `url`, `password`, `pool_size`"
        ),
        "{}",
        problem.message
    );
    assert!(
        problem
            .message
            .ends_with("remove it or correct the spelling"),
        "{}",
        problem.message
    );
}

#[test]
fn a_typo_in_a_section_name_is_refused() {
    let problem = only_problem(&format!("{LEDGER}[triggerz]\n"));
    assert!(
        problem.message.starts_with("unknown field `triggerz`"),
        "{}",
        problem.message
    );
}

#[test]
fn a_typo_inside_a_source_names_its_index() {
    let problem = only_problem(&format!(
        "{LEDGER}[[sources]]\nname = \"pos\"\nkind = \"postgres\"\nurl = \"postgres://h/db\"\nslott = \"x\"\n"
    ));
    assert_eq!(problem.key, "sources[0]");
    assert!(
        problem.message.starts_with("unknown field `slott`"),
        "{}",
        problem.message
    );
}

#[test]
fn a_missing_required_field_names_it() {
    let problem = only_problem("[ledger]\npool_size = 4\n");
    assert_eq!(problem.key, "ledger.url");
    assert!(
        problem.message.starts_with("required key is missing"),
        "{}",
        problem.message
    );
}

#[test]
fn an_invalid_url_names_the_key_without_echoing_the_value() {
    let problem = only_problem(&format!(
        "{LEDGER}[[sources]]\nname = \"pos\"\nkind = \"postgres\"\nurl = \"pos.internal/odoo secret\"\n"
    ));
    assert_eq!(problem.key, "sources[0].url");
    assert!(
        problem.message.starts_with("not a URL"),
        "{}",
        problem.message
    );
    assert!(!problem.message.contains("secret"), "{}", problem.message);
}

#[test]
fn an_unknown_source_kind_lists_the_kinds() {
    let problem = only_problem(&format!(
        "{LEDGER}[[sources]]\nname = \"pos\"\nkind = \"oracle\"\nurl = \"postgres://h/db\"\n"
    ));
    assert_eq!(problem.key, "sources[0].kind");
    assert_eq!(
        problem.message,
        "unknown source kind `oracle`; use `postgres` (PostgreSQL) or `mysql` (MySQL or MariaDB)"
    );
}

#[test]
fn validation_reports_every_problem_at_once() {
    let (_, problems) = problems(
        r#"[ledger]
url = "mysql://root@127.0.0.1/loyalty"
pool_size = 0

[[sources]]
name = "POS"
kind = "postgres"
url = "mysql://h/db"
server_id = 7

[[sources]]
name = "shop"
kind = "mysql"
url = "mysql://h/"
slot = "s"
heartbeat_seconds = 5
password = { env = "LCDC_TEST_SURELY_UNSET_VARIABLE" }

[program]
tiers = [{ name = "silver", threshold = 10 }, { name = "gold", threshold = 5 }]

[[triggers.routes]]
trigger = "milestone"
provider = "nobody"

[api]
listen = "0.0.0.0:8787"
"#,
    );
    let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "ledger.url",
            "ledger.pool_size",
            "sources[0].name",
            "sources[0].url",
            "sources[0].server_id",
            "sources[1].url",
            "sources[1].password",
            "sources[1].heartbeat_seconds",
            "sources[1].slot",
            "program.tiers[0].threshold",
            "program.tiers[1].threshold",
            "triggers.routes[0].provider",
            "api.token",
        ],
        "{problems:#?}"
    );
    let by_key = |key: &str| {
        problems
            .iter()
            .find(|p| p.key == key)
            .unwrap()
            .message
            .clone()
    };
    assert!(by_key("ledger.url").contains("scheme `mysql` does not fit a postgres database"));
    assert!(by_key("sources[1].url").contains("names no database"));
    assert!(by_key("sources[1].password").contains("`LCDC_TEST_SURELY_UNSET_VARIABLE` is not set"));
    assert!(by_key("triggers.routes[0].provider").contains("no provider is named `nobody`"));
}

#[test]
fn a_missing_config_file_says_how_to_give_one() {
    let error = Settings::load(std::path::Path::new("/nonexistent/loyalty-cdc.toml")).unwrap_err();
    assert_eq!(error.problems[0].origin, "/nonexistent/loyalty-cdc.toml");
    assert!(error.problems[0].message.contains("pass --config PATH"));
}

#[tokio::test]
async fn environment_overrides_replace_file_values() {
    let ledger = PgDatabase::create("ledger").await;
    // The file points at a port where nothing listens; the override fixes it.
    let config = "[ledger]\nurl = \"postgres://postgres@127.0.0.1:1/nowhere\"\n";
    let run = run_cli(
        config,
        &["check"],
        &[("LOYALTY__LEDGER__URL", &ledger.url())],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.output());
    assert!(
        run.stdout
            .contains(&format!("ok    ledger {}", ledger.url())),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn a_bad_environment_override_names_the_variable() {
    let run = run_cli(
        LEDGER,
        &["check"],
        &[("LOYALTY__LEDGER__POOL_SIZE", "lots")],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stderr.contains(
            "environment (LOYALTY__LEDGER__POOL_SIZE): key `ledger.pool_size`: expected an integer"
        ),
        "{}",
        run.stderr
    );
}

#[test]
fn the_compose_configuration_is_valid() {
    // docker/ cannot be exercised without a Docker engine; its loyalty-cdc
    // configuration at least must load, with the secrets compose provides.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/loyalty-cdc.compose.toml");
    let output = std::process::Command::new(crate::support::binary())
        .args(["--config", path.to_str().unwrap(), "check"])
        .env("LEDGER_DB_PASSWORD", "x")
        .env("POS_DB_PASSWORD", "x")
        .env("SHOP_DB_PASSWORD", "x")
        .env("LOYALTY_API_TOKEN", "x")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The config loads; the hosts `postgres` and `mariadb` exist only inside
    // compose, so the connections themselves fail here.
    assert!(
        stdout.starts_with("ok    config ") && stdout.contains("2 source(s)"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn tier_periods_that_cannot_work_are_named() {
    let (_, problems) = problems(
        r#"[ledger]
url = "postgres://postgres@127.0.0.1/loyalty"

[program]
tiers = [{ name = "base", threshold = 0 }, { name = "gold", threshold = 500 }]

[program.tier_period]
months = 5
first_month = 13
grace_days = 200
warning_days = 0
"#,
    );
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.key.as_str(), p.message.as_str()))
        .collect();
    let keys: Vec<&str> = found.iter().map(|(key, _)| *key).collect();
    assert_eq!(
        keys,
        [
            "program.tier_period.months",
            "program.tier_period.first_month",
            "program.tier_period.grace_days",
            "program.tier_period.warning_days",
        ],
        "{problems:#?}"
    );
    assert!(found[0].1.contains("use 1, 2, 3, 4, 6 or 12"));

    // A downgrade route without periods would never fire.
    let problem = only_problem(&format!(
        "[ledger]\nurl = \"postgres://postgres@127.0.0.1/loyalty\"\n{crm}\n[[triggers.routes]]\ntrigger = \"tier_downgrade\"\nprovider = \"crm\"\n",
        crm = crate::support::webhook_provider("crm", "http://127.0.0.1:9/hook")
    ));
    assert_eq!(problem.key, "triggers.routes[0].trigger");
    assert!(
        problem.message.contains("add [program.tier_period]"),
        "{}",
        problem.message
    );
}

#[test]
fn segments_and_personalization_that_cannot_work_are_named() {
    let (_, problems) = problems(
        r#"[ledger]
url = "postgres://postgres@127.0.0.1/loyalty"

[personalization]
at_risk_below = 0.1
lapsed_below = 0.3
rfm = { recency_days = [30.0, 20.0, 180.0, 365.0] }
model = { r = 0.0 }

[[segments]]
name = "Price Sensitive"
when = "features.discount_share >="

[[segments]]
name = "vip"
when = "features.monetary >= 1000.0"

[[segments]]
name = "vip"
when = "true"

[[offers]]
code = "WINBACK"
title = "Come back"
bonus_points = 100
segments = ["at_risk"]
"#,
    );
    let found: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.key.as_str(), p.message.as_str()))
        .collect();
    let keys: Vec<&str> = found.iter().map(|(key, _)| *key).collect();
    assert_eq!(
        keys,
        [
            "offers[0].segments",
            "personalization.at_risk_below",
            "personalization.rfm.recency_days",
            "personalization.model.r",
            "segments[0].name",
            "segments[0].when",
            "segments[2].name",
        ],
        "{problems:#?}"
    );
    assert!(found[0]
        .1
        .contains("no segment is named `at_risk`; declare it as [[segments]]"));
    assert!(
        found[5].1.contains("not a valid CEL expression"),
        "{}",
        found[5].1
    );
    assert!(found[6].1.contains("declared twice"));
}

#[test]
fn a_price_drop_threshold_that_is_not_a_percent_is_named() {
    for value in ["0", "100", "-5"] {
        let problem = only_problem(&format!(
            "[ledger]\nurl = \"postgres://postgres@127.0.0.1/loyalty\"\n\n[triggers.price_drop]\nmin_drop_percent = {value}\n"
        ));
        assert_eq!(problem.key, "triggers.price_drop.min_drop_percent");
        assert!(
            problem
                .message
                .contains("above 0 and below 100 (default 5)"),
            "{}",
            problem.message
        );
    }
}
