//! Prerequisites of a MySQL/MariaDB source, checked by `loyalty-cdc check`.
//!
//! Facts are gathered with plain queries ([`gather`]) and judged by a pure
//! function ([`evaluate`]): `log_bin` cannot change without a restart and
//! `binlog_format` is global, so those are tested on reported values.

use mysql_async::prelude::Queryable;

use crate::config::SourceSettings;
use crate::connect;
use crate::preflight::Problem;

/// What the server reports about itself and the connected user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub version: String,
    pub is_mariadb: bool,
    pub log_bin: bool,
    pub binlog_format: String,
    pub binlog_row_image: String,
    /// `None` on servers without the variable (before MariaDB 10.5 / MySQL 8.0.1).
    pub binlog_row_metadata: Option<String>,
    pub server_id: u64,
    /// `user@host` as the server matched it (`CURRENT_USER()`).
    pub user: String,
    /// Global privileges of that user, upper case (`REPLICATION SLAVE`, …).
    pub global_privileges: Vec<String>,
    /// Privileges of that user on the source database.
    pub database_privileges: Vec<String>,
}

impl ServerFacts {
    fn has(&self, privilege: &str) -> bool {
        self.global_privileges.iter().any(|p| p == privilege)
    }

    fn can_select(&self) -> bool {
        self.has("SELECT") || self.database_privileges.iter().any(|p| p == "SELECT")
    }

    /// `'user'@'host'` as GRANT wants it.
    fn grantee(&self) -> String {
        let (user, host) = self.user.rsplit_once('@').unwrap_or((&self.user, "%"));
        format!(
            "'{}'@'{}'",
            user.replace('\'', "''"),
            host.replace('\'', "''")
        )
    }
}

/// Reads the facts [`evaluate`] judges.
pub async fn gather(
    conn: &mut mysql_async::Conn,
    database: &str,
) -> Result<ServerFacts, mysql_async::Error> {
    let (version, log_bin, binlog_format, binlog_row_image, server_id, user): (
        String,
        i64,
        String,
        String,
        u64,
        String,
    ) = conn
        .query_first(
            "SELECT @@version, IF(@@global.log_bin, 1, 0), @@global.binlog_format,
                    @@global.binlog_row_image, @@global.server_id, CURRENT_USER()",
        )
        .await?
        .ok_or_else(|| mysql_async::Error::Other("SELECT @@version returned no row".into()))?;
    // Unknown system variables are an error, not NULL: ask separately.
    let binlog_row_metadata = conn
        .query_first::<String, _>("SELECT @@global.binlog_row_metadata")
        .await
        .ok()
        .flatten();
    let grantee = "CONCAT('''', SUBSTRING_INDEX(CURRENT_USER(), '@', 1), '''@''', SUBSTRING_INDEX(CURRENT_USER(), '@', -1), '''')";
    let global_privileges: Vec<String> = conn
        .query(format!(
            "SELECT UPPER(PRIVILEGE_TYPE) FROM information_schema.USER_PRIVILEGES WHERE GRANTEE = {grantee}"
        ))
        .await?;
    let database_privileges: Vec<String> = conn
        .exec(
            format!(
                "SELECT UPPER(PRIVILEGE_TYPE) FROM information_schema.SCHEMA_PRIVILEGES
                  WHERE GRANTEE = {grantee} AND TABLE_SCHEMA = ?"
            ),
            (database,),
        )
        .await?;
    Ok(ServerFacts {
        is_mariadb: version.contains("MariaDB"),
        version,
        log_bin: log_bin == 1,
        binlog_format,
        binlog_row_image,
        binlog_row_metadata,
        server_id,
        user,
        global_privileges,
        database_privileges,
    })
}

/// Every unmet prerequisite, each with its fix. `our_server_id` is the
/// replica id this source announces.
pub fn evaluate(facts: &ServerFacts, database: &str, our_server_id: u32) -> Vec<Problem> {
    let mut problems = Vec::new();
    let persist =
        "and put the same line under [mysqld] in the server's my.cnf so a restart keeps it";
    if !facts.log_bin {
        problems.push(Problem::new(
            "the binary log is off (log_bin); there are no changes to read",
            "add `log_bin` and `server_id = 1` under [mysqld] in my.cnf and restart the server (development machines: bash docker/setup-local-databases.sh)",
        ));
    }
    if !facts.binlog_format.eq_ignore_ascii_case("ROW") {
        problems.push(Problem::new(
            format!(
                "binlog_format is `{}`; only ROW events carry the changed rows",
                facts.binlog_format
            ),
            format!("SET GLOBAL binlog_format = 'ROW'; {persist} (sessions already open keep the old format until they reconnect)"),
        ));
    }
    if !facts.binlog_row_image.eq_ignore_ascii_case("FULL") {
        problems.push(Problem::new(
            format!(
                "binlog_row_image is `{}`; updates must carry whole rows (before and after)",
                facts.binlog_row_image
            ),
            format!("SET GLOBAL binlog_row_image = 'FULL'; {persist}"),
        ));
    }
    match &facts.binlog_row_metadata {
        Some(value) if value.eq_ignore_ascii_case("FULL") => {}
        Some(value) => problems.push(Problem::new(
            format!("binlog_row_metadata is `{value}`; without FULL the binlog has no column names, and unsigned columns decode wrongly"),
            format!("SET GLOBAL binlog_row_metadata = 'FULL'; {persist}"),
        )),
        None => problems.push(Problem::new(
            format!("server {} has no binlog_row_metadata setting", facts.version),
            "upgrade to MariaDB 10.5+ or MySQL 8.0.1+ (column names must come from the binlog itself)",
        )),
    }
    if facts.server_id == u64::from(our_server_id) {
        problems.push(Problem::new(
            format!("the server's own server_id is {our_server_id}, the same id this source announces as a replica"),
            "set another `server_id` for this source in the configuration",
        ));
    }
    let grantee = facts.grantee();
    if !facts.has("REPLICATION SLAVE") {
        problems.push(Problem::new(
            format!("user {grantee} lacks REPLICATION SLAVE; it cannot read the binlog"),
            format!("GRANT REPLICATION SLAVE ON *.* TO {grantee};"),
        ));
    }
    // MariaDB 10.5 split BINLOG MONITOR (SHOW BINLOG STATUS, SHOW BINARY
    // LOGS) out of REPLICATION CLIENT; MySQL still calls it REPLICATION CLIENT.
    let monitor = if facts.is_mariadb {
        "BINLOG MONITOR"
    } else {
        "REPLICATION CLIENT"
    };
    if !facts.has(monitor) {
        problems.push(Problem::new(
            format!("user {grantee} lacks {monitor}; it cannot read the binlog position"),
            format!("GRANT {monitor} ON *.* TO {grantee};"),
        ));
    }
    if !facts.can_select() {
        problems.push(Problem::new(
            format!("user {grantee} lacks SELECT on `{database}`; the snapshot cannot read the tables (and information_schema silently shows none)"),
            format!("GRANT SELECT ON `{}`.* TO {grantee};", database.replace('`', "``")),
        ));
    }
    problems
}

/// Connects, gathers and evaluates. Returns a one-line summary and the
/// problems found.
pub async fn check(source: &SourceSettings) -> (String, Vec<Problem>) {
    let mut conn = match connect::mysql(&source.url, source.password.as_ref()).await {
        Ok(conn) => conn,
        Err(error) => return (String::new(), vec![error.into()]),
    };
    let database = source.url.database().unwrap_or_default();
    let outcome = gather(&mut conn, database).await;
    // Best effort: the server drops the session itself when we go.
    let _ = conn.disconnect().await;
    match outcome {
        Ok(facts) => {
            let summary = format!(
                "{}, database `{database}`, log_bin={}, binlog_format={}, binlog_row_image={}, binlog_row_metadata={}, replica server_id {}",
                facts.version,
                if facts.log_bin { "ON" } else { "OFF" },
                facts.binlog_format,
                facts.binlog_row_image,
                facts.binlog_row_metadata.as_deref().unwrap_or("n/a"),
                source.mysql_server_id(),
            );
            (
                summary,
                evaluate(&facts, database, source.mysql_server_id()),
            )
        }
        Err(error) => (
            String::new(),
            vec![Problem::new(
                format!("cannot read server settings: {error}"),
                "check the user may run SELECT @@version and read information_schema",
            )],
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_mariadb() -> ServerFacts {
        ServerFacts {
            version: "10.11.19-MariaDB".into(),
            is_mariadb: true,
            log_bin: true,
            binlog_format: "ROW".into(),
            binlog_row_image: "FULL".into(),
            binlog_row_metadata: Some("FULL".into()),
            server_id: 1,
            user: "loyalty@%".into(),
            global_privileges: vec!["REPLICATION SLAVE".into(), "BINLOG MONITOR".into()],
            database_privileges: vec!["SELECT".into()],
        }
    }

    #[test]
    fn a_ready_server_has_no_problems() {
        assert_eq!(evaluate(&ready_mariadb(), "shop", 4242), vec![]);
    }

    #[test]
    fn statement_format_is_reported_with_the_fix() {
        let facts = ServerFacts {
            binlog_format: "STATEMENT".into(),
            ..ready_mariadb()
        };
        let problems = evaluate(&facts, "shop", 4242);
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].what,
            "binlog_format is `STATEMENT`; only ROW events carry the changed rows"
        );
        assert!(problems[0]
            .fix
            .starts_with("SET GLOBAL binlog_format = 'ROW';"));
    }

    #[test]
    fn binlog_off_minimal_image_and_no_metadata_are_each_reported() {
        let facts = ServerFacts {
            log_bin: false,
            binlog_row_image: "MINIMAL".into(),
            binlog_row_metadata: Some("NO_LOG".into()),
            ..ready_mariadb()
        };
        let whats: Vec<String> = evaluate(&facts, "shop", 4242)
            .into_iter()
            .map(|p| p.what)
            .collect();
        assert_eq!(whats.len(), 3, "{whats:?}");
        assert!(whats[0].starts_with("the binary log is off"));
        assert!(whats[1].starts_with("binlog_row_image is `MINIMAL`"));
        assert!(whats[2].starts_with("binlog_row_metadata is `NO_LOG`"));
    }

    #[test]
    fn mysql_needs_replication_client_where_mariadb_needs_binlog_monitor() {
        let facts = ServerFacts {
            version: "8.0.36".into(),
            is_mariadb: false,
            ..ready_mariadb()
        };
        let problems = evaluate(&facts, "shop", 4242);
        assert_eq!(
            problems,
            vec![Problem::new(
                "user 'loyalty'@'%' lacks REPLICATION CLIENT; it cannot read the binlog position",
                "GRANT REPLICATION CLIENT ON *.* TO 'loyalty'@'%';"
            )]
        );
    }

    #[test]
    fn a_server_id_equal_to_ours_is_a_conflict() {
        let problems = evaluate(&ready_mariadb(), "shop", 1);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].what.contains("same id"));
    }
}
