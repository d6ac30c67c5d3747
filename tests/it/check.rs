//! `loyalty-cdc check` run as a process against real servers: each
//! misconfiguration is printed with its fix and exits 1; a good setup exits 0.

use crate::support::{run_cli, MyDatabase, MyUser, PgDatabase, PgRole};

fn config(ledger: &str, sources: &str) -> String {
    format!("[ledger]\nurl = \"{ledger}\"\n{sources}")
}

fn pg_source(name: &str, url: &str) -> String {
    format!("\n[[sources]]\nname = \"{name}\"\nkind = \"postgres\"\nurl = \"{url}\"\n")
}

/// A PostgreSQL source with a slot of its own: the default slot name
/// (`loyalty_<source>`) is shared with the demo, which may be running in
/// the same suite, and slots are per database.
fn pg_source_with_own_slot(name: &str, url: &str) -> String {
    pg_source(name, url) + &format!("slot = \"{}\"\n", crate::support::unique_name("slot"))
}

fn mysql_source(name: &str, url: &str) -> String {
    format!("\n[[sources]]\nname = \"{name}\"\nkind = \"mysql\"\nurl = \"{url}\"\n")
}

#[tokio::test]
async fn check_passes_against_databases_ready_for_change_capture() {
    let ledger = PgDatabase::create("ledger").await;
    let pos = PgDatabase::create("pos").await;
    let shop = MyDatabase::create("shop").await;
    let sources = pg_source_with_own_slot("pos", &pos.url()) + &mysql_source("shop", &shop.url());
    let run = run_cli(&config(&ledger.url(), &sources), &["check"], &[]).await;
    assert_eq!(run.code, 0, "{}", run.output());
    assert!(
        run.stdout
            .contains("ok    source `pos` (postgres): PostgreSQL 15"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("wal_level=logical"), "{}", run.stdout);
    assert!(
        run.stdout.contains("ok    source `shop` (mysql): "),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("binlog_format=ROW"), "{}", run.stdout);
    assert!(
        run.stdout.ends_with("all checks passed\n"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn check_reports_a_wrong_postgres_password_with_its_fix() {
    let ledger = PgDatabase::create("ledger").await;
    let role = PgRole::create(
        "pwuser",
        "LOGIN REPLICATION PASSWORD 'right-one' IN ROLE lcdc_password_auth",
    )
    .await;
    let pos = PgDatabase::create("pos").await;
    let wrong = pos.url_as(&role.name, Some("wrong-one"));
    let run = run_cli(
        &config(&ledger.url(), &pg_source("pos", &wrong)),
        &["check"],
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout.contains(&format!(
            "problem: authentication failed for user `{}`",
            role.name
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("fix:     correct the password"),
        "{}",
        run.stdout
    );
    assert!(
        !run.output().contains("wrong-one"),
        "the password was printed: {}",
        run.output()
    );
    assert!(
        run.stdout.ends_with("1 problem(s) found\n"),
        "{}",
        run.stdout
    );

    // The same role with the right password, from a secret in the
    // environment, passes.
    let right = pos.url_as(&role.name, None);
    let sources = pg_source_with_own_slot("pos", &right)
        + "password = { env = \"LCDC_TEST_POS_PASSWORD\" }\n";
    let run = run_cli(
        &config(&ledger.url(), &sources),
        &["check"],
        &[("LCDC_TEST_POS_PASSWORD", "right-one")],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.output());
}

#[tokio::test]
async fn check_reports_a_wrong_mariadb_password_with_its_fix() {
    let ledger = PgDatabase::create("ledger").await;
    let shop = MyDatabase::create("shop").await;
    let user = MyUser::create("pwuser", "right-one", &[]).await;
    let wrong = shop.url_as(&user.name, Some("wrong-one"));
    let run = run_cli(
        &config(&ledger.url(), &mysql_source("shop", &wrong)),
        &["check"],
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout.contains(&format!(
            "problem: authentication failed for user `{}`",
            user.name
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("fix:     correct the password"),
        "{}",
        run.stdout
    );
    assert!(
        !run.output().contains("wrong-one"),
        "the password was printed: {}",
        run.output()
    );
}

#[tokio::test]
async fn check_reports_missing_databases_on_both_kinds() {
    let ledger = PgDatabase::create("ledger").await;
    let pos = PgDatabase::create("pos").await;
    let shop = MyDatabase::create("shop").await;
    let missing_pg = pos.url().replace(&pos.name, "lcdc_no_such_db");
    let missing_my = shop.url().replace(&shop.name, "lcdc_no_such_db");
    let sources = pg_source("pos", &missing_pg) + &mysql_source("shop", &missing_my);
    let run = run_cli(&config(&ledger.url(), &sources), &["check"], &[]).await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert_eq!(
        run.stdout
            .matches("problem: database `lcdc_no_such_db` does not exist")
            .count(),
        2,
        "{}",
        run.stdout
    );
    assert_eq!(
        run.stdout.matches("fix:     create database `lcdc_no_such_db` or correct the database name in the URL").count(),
        2,
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("2 problem(s) found\n"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn check_reports_a_postgres_role_without_replication() {
    let ledger = PgDatabase::create("ledger").await;
    let role = PgRole::create("norepl", "LOGIN").await;
    let pos = PgDatabase::create("pos").await;
    let run = run_cli(
        &config(
            &ledger.url(),
            &pg_source("pos", &pos.url_as(&role.name, None)),
        ),
        &["check"],
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout.contains(&format!(
            "problem: role `{0}` has no REPLICATION attribute, so it cannot stream changes\n      fix:     as a superuser: ALTER ROLE \"{0}\" WITH REPLICATION;",
            role.name
        )),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn check_reports_mariadb_user_without_replication_privileges() {
    let ledger = PgDatabase::create("ledger").await;
    let shop = MyDatabase::create("shop").await;
    let grant_select = format!("GRANT SELECT ON `{}`.* TO {{user}}", shop.name);
    let user = MyUser::create("norepl", "pw", &[grant_select.as_str()]).await;
    let url = shop.url_as(&user.name, Some("pw"));
    let run = run_cli(
        &config(&ledger.url(), &mysql_source("shop", &url)),
        &["check"],
        &[],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.output());
    let grantee = format!("'{}'@'%'", user.name);
    assert!(
        run.stdout.contains(&format!(
            "problem: user {grantee} lacks REPLICATION SLAVE; it cannot read the binlog"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "fix:     GRANT REPLICATION SLAVE ON *.* TO {grantee};"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("problem: user {grantee} lacks BINLOG MONITOR")),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("lacks SELECT"),
        "SELECT was granted: {}",
        run.stdout
    );
    assert!(
        run.stdout.ends_with("2 problem(s) found\n"),
        "{}",
        run.stdout
    );

    // With every privilege the reader needs, the same user passes.
    let full = MyUser::create(
        "repl",
        "pw",
        &[
            grant_select.as_str(),
            "GRANT REPLICATION SLAVE, BINLOG MONITOR ON *.* TO {user}",
        ],
    )
    .await;
    let url = shop.url_as(&full.name, Some("pw"));
    let run = run_cli(
        &config(&ledger.url(), &mysql_source("shop", &url)),
        &["check"],
        &[],
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.output());
}

#[tokio::test]
async fn check_reports_an_existing_slot_with_the_wrong_output_plugin() {
    let ledger = PgDatabase::create("ledger").await;
    let pos = PgDatabase::create("pos").await;
    let slot = crate::support::unique_name("slot");
    pos.client()
        .await
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
            &[&slot],
        )
        .await
        .expect("create slot");
    let sources = pg_source("pos", &pos.url()) + &format!("slot = \"{slot}\"\n");
    let run = run_cli(&config(&ledger.url(), &sources), &["check"], &[]).await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout.contains(&format!(
            "problem: slot `{slot}` uses output plugin `test_decoding`, not `pgoutput`"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "fix:     SELECT pg_drop_replication_slot('{slot}');"
        )),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn check_reports_an_unreachable_server() {
    let ledger = PgDatabase::create("ledger").await;
    // Port 1 on loopback: nothing listens there.
    let sources = pg_source("pos", "postgres://postgres@127.0.0.1:1/pos");
    let run = run_cli(&config(&ledger.url(), &sources), &["check"], &[]).await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout
            .contains("problem: cannot reach 127.0.0.1:1/pos: "),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("fix:     start the server, or correct host and port"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn check_stops_at_an_unknown_config_key_before_connecting() {
    let config = "[ledger]\nurl = \"postgres://postgres@127.0.0.1:1/x\"\npool_sise = 4\n";
    let run = run_cli(config, &["check"], &[]).await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stderr
            .contains("loyalty-cdc.toml: key `ledger`: unknown field `pool_sise`"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("remove it or correct the spelling"),
        "{}",
        run.stderr
    );
    // Nothing was checked: the bad config stopped it first.
    assert!(!run.stdout.contains("cannot reach"), "{}", run.stdout);
}

#[tokio::test]
async fn check_validates_each_mapping_against_the_live_schema() {
    let ledger = PgDatabase::create("ledger").await;
    let pos = PgDatabase::create("pos").await;
    pos.load_schema("odoo-pos.postgres.sql").await;
    let shop = MyDatabase::create("shop").await;
    shop.load_magento().await;
    {
        use mysql_async::prelude::Queryable;
        let mut conn = shop.conn().await;
        conn.query_drop("ALTER TABLE sales_order DROP COLUMN customer_email; DROP TABLE sales_creditmemo_item, sales_creditmemo")
            .await
            .unwrap();
    }
    let connectors =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("connectors/sources");
    let sources = format!(
        "{}mapping = \"{}\"\nslot = \"{}\"\n{}mapping = \"{}\"\n",
        pg_source("pos", &pos.url()),
        connectors.join("odoo-pos.toml").display(),
        pos.name,
        mysql_source("shop", &shop.url()),
        connectors.join("magento2.toml").display(),
    );
    let run = run_cli(&config(&ledger.url(), &sources), &["check"], &[]).await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout.contains("mapping Odoo POS fits (7 tables)"),
        "{}",
        run.stdout
    );
    let magento = connectors.join("magento2.toml").display().to_string();
    for expected in [
        format!("problem: mapping {magento}: table `sales_order` has no column `customer_email` (read by orders[0].email)"),
        format!("fix:     correct orders[0].email in {magento} to a column `sales_order` has, or add the column"),
        format!("problem: mapping {magento}: table `sales_creditmemo` does not exist in the source (or the user cannot see it)"),
    ] {
        assert!(run.stdout.contains(&expected), "missing `{expected}` in:\n{}", run.stdout);
    }
    assert!(
        run.stdout.ends_with("2 problem(s) found\n"),
        "{}",
        run.stdout
    );
}

#[tokio::test]
async fn check_reports_an_unreachable_provider_host_and_passes_a_reachable_one() {
    let ledger = PgDatabase::create("ledger").await;
    let receiver =
        crate::support::receiver::Receiver::start(crate::support::receiver::Reply::status(200))
            .await;
    // A port nothing listens on: bound, then released.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let providers = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("connectors/providers");
    let text = format!(
        r#"{crm}
[[providers]]
name = "sms"
template = "{dir}/twilio.toml"
base_url = "http://127.0.0.1:{closed}"
secrets.account_sid = "AC1"
secrets.auth_token = "t"
settings.from = "+15005550006"
"#,
        dir = providers.display(),
        crm = crate::support::webhook_provider("crm", &format!("{}/hook", receiver.url)),
    );
    let run = run_cli(&config(&ledger.url(), &text), &["check"], &[]).await;
    assert_eq!(run.code, 1, "{}", run.output());
    assert!(
        run.stdout.contains(&format!(
            "ok    provider `crm`: Webhook (webhook) at {}/hook, host reachable",
            receiver.url
        )),
        "{}",
        run.output()
    );
    assert!(
        run.stdout.contains(&format!("FAIL  provider `sms`: Twilio (sms) at http://127.0.0.1:{closed}\n      problem: cannot connect to 127.0.0.1:{closed}: ")),
        "{}",
        run.output()
    );
    assert!(
        run.stdout.contains("      fix:     check base_url, DNS and the firewall path from this host to the provider"),
        "{}",
        run.output()
    );
    assert_eq!(
        receiver.requests().len(),
        0,
        "check sends no request to a provider"
    );
}
