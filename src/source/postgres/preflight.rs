//! Prerequisites of a PostgreSQL source, checked by `loyalty-cdc check`.
//!
//! Facts are gathered with plain queries ([`gather`]) and judged by a pure
//! function ([`evaluate`]), so settings that need a server restart to change
//! (`wal_level`) are tested on the values a server reports.

use tokio_postgres::Client;

use crate::config::SourceSettings;
use crate::connect;
use crate::preflight::Problem;

/// The output plugin loyalty-cdc decodes.
pub const OUTPUT_PLUGIN: &str = "pgoutput";

/// What the server reports about itself, the role and our slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub server_version: String,
    pub database: String,
    pub wal_level: String,
    pub max_replication_slots: i32,
    pub replication_slots_used: i64,
    pub max_wal_senders: i32,
    pub wal_senders_used: i64,
    pub role: String,
    /// `rolreplication` or superuser.
    pub role_can_replicate: bool,
    /// Our slot, if it exists already.
    pub slot: Option<SlotFacts>,
}

/// An existing replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotFacts {
    pub name: String,
    pub plugin: Option<String>,
    pub database: Option<String>,
    /// `reserved`, `extended`, `unreserved` or `lost` (PostgreSQL 13+).
    pub wal_status: Option<String>,
}

/// Reads the facts [`evaluate`] judges.
pub async fn gather(
    client: &Client,
    slot_name: &str,
) -> Result<ServerFacts, tokio_postgres::Error> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version'),
                    current_database()::text,
                    current_setting('wal_level'),
                    current_setting('max_replication_slots')::int,
                    (SELECT count(*) FROM pg_replication_slots),
                    current_setting('max_wal_senders')::int,
                    (SELECT count(*) FROM pg_stat_replication),
                    r.rolname::text,
                    r.rolreplication OR r.rolsuper
               FROM pg_roles r
              WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let slot = client
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, wal_status
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot_name],
        )
        .await?
        .map(|slot| SlotFacts {
            name: slot.get(0),
            plugin: slot.get(1),
            database: slot.get(2),
            wal_status: slot.get(3),
        });
    Ok(ServerFacts {
        server_version: row.get(0),
        database: row.get(1),
        wal_level: row.get(2),
        max_replication_slots: row.get(3),
        replication_slots_used: row.get(4),
        max_wal_senders: row.get(5),
        wal_senders_used: row.get(6),
        role: row.get(7),
        role_can_replicate: row.get(8),
        slot,
    })
}

/// Every unmet prerequisite, each with its fix.
pub fn evaluate(facts: &ServerFacts, slot_name: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    if facts.wal_level != "logical" {
        problems.push(Problem::new(
            format!(
                "wal_level is `{}`; logical replication needs `logical`",
                facts.wal_level
            ),
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL (development machines: bash docker/setup-local-databases.sh)",
        ));
    }
    if !facts.role_can_replicate {
        problems.push(Problem::new(
            format!(
                "role `{}` has no REPLICATION attribute, so it cannot stream changes",
                facts.role
            ),
            format!(
                "as a superuser: ALTER ROLE {} WITH REPLICATION;",
                quote_identifier(&facts.role)
            ),
        ));
    }
    match &facts.slot {
        None if facts.replication_slots_used >= i64::from(facts.max_replication_slots) => {
            problems.push(Problem::new(
                format!(
                    "all {} replication slots are in use; none is free for slot `{slot_name}`",
                    facts.max_replication_slots
                ),
                "raise max_replication_slots (restart needed) or drop slots nobody reads: SELECT slot_name, active FROM pg_replication_slots; SELECT pg_drop_replication_slot('<name>');",
            ));
        }
        None => {}
        Some(slot) => problems.extend(evaluate_slot(slot, &facts.database)),
    }
    if facts.wal_senders_used >= i64::from(facts.max_wal_senders) {
        problems.push(Problem::new(
            format!(
                "all {} WAL senders are busy; a new replication connection would be refused",
                facts.max_wal_senders
            ),
            "raise max_wal_senders (restart needed) or stop an idle replication client (SELECT * FROM pg_stat_replication)",
        ));
    }
    problems
}

fn evaluate_slot(slot: &SlotFacts, database: &str) -> Vec<Problem> {
    let mut problems = Vec::new();
    let drop_it = format!(
        "SELECT pg_drop_replication_slot('{}'); loyalty-cdc then creates it afresh and snapshots the source again (orders already booked are not booked twice); or configure another `slot`",
        slot.name
    );
    match slot.plugin.as_deref() {
        Some(OUTPUT_PLUGIN) => {}
        Some(other) => problems.push(Problem::new(
            format!(
                "slot `{}` uses output plugin `{other}`, not `{OUTPUT_PLUGIN}`",
                slot.name
            ),
            drop_it.clone(),
        )),
        None => problems.push(Problem::new(
            format!("slot `{}` is a physical slot, not a logical one", slot.name),
            drop_it.clone(),
        )),
    }
    if let Some(slot_database) = &slot.database {
        if slot_database != database {
            problems.push(Problem::new(
                format!(
                    "slot `{}` belongs to database `{slot_database}`, not `{database}`",
                    slot.name
                ),
                "configure another `slot` name for this source (slots are per database)",
            ));
        }
    }
    if slot.wal_status.as_deref() == Some("lost") {
        problems.push(Problem::new(
            format!(
                "slot `{}` was invalidated: the server removed WAL it still needed (max_slot_wal_keep_size)",
                slot.name
            ),
            drop_it,
        ));
    }
    problems
}

/// Connects, gathers and evaluates. Returns a one-line summary and the
/// problems found.
pub async fn check(source: &SourceSettings) -> (String, Vec<Problem>) {
    let client = match connect::postgres(&source.url, source.password.as_ref()).await {
        Ok(client) => client,
        Err(error) => return (String::new(), vec![error.into()]),
    };
    let slot_name = source.slot_name();
    match gather(&client, &slot_name).await {
        Ok(facts) => {
            let summary = format!(
                "PostgreSQL {}, database `{}`, wal_level={}, slots {}/{}, slot `{slot_name}` {}",
                facts.server_version,
                facts.database,
                facts.wal_level,
                facts.replication_slots_used,
                facts.max_replication_slots,
                if facts.slot.is_some() { "exists" } else { "will be created" },
            );
            (summary, evaluate(&facts, &slot_name))
        }
        Err(error) => (
            String::new(),
            vec![Problem::new(
                format!("cannot read server settings: {error}"),
                "check the role may read pg_settings, pg_roles and pg_replication_slots (any role can by default)",
            )],
        ),
    }
}

/// Quotes a PostgreSQL identifier for SQL shown to (or run by) an operator.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_server() -> ServerFacts {
        ServerFacts {
            server_version: "15.20".into(),
            database: "pos".into(),
            wal_level: "logical".into(),
            max_replication_slots: 20,
            replication_slots_used: 3,
            max_wal_senders: 20,
            wal_senders_used: 1,
            role: "loyalty".into(),
            role_can_replicate: true,
            slot: None,
        }
    }

    #[test]
    fn a_ready_server_has_no_problems() {
        assert_eq!(evaluate(&ready_server(), "loyalty_pos"), vec![]);
    }

    #[test]
    fn wal_level_replica_is_reported_with_the_restart_fix() {
        let facts = ServerFacts {
            wal_level: "replica".into(),
            ..ready_server()
        };
        let problems = evaluate(&facts, "loyalty_pos");
        assert_eq!(problems.len(), 1);
        assert_eq!(
            problems[0].what,
            "wal_level is `replica`; logical replication needs `logical`"
        );
        assert!(problems[0]
            .fix
            .starts_with("ALTER SYSTEM SET wal_level = logical;"));
    }

    #[test]
    fn no_free_slot_is_a_problem_only_when_ours_does_not_exist_yet() {
        let full = ServerFacts {
            replication_slots_used: 20,
            ..ready_server()
        };
        assert_eq!(evaluate(&full, "loyalty_pos").len(), 1);
        let ours_exists = ServerFacts {
            slot: Some(SlotFacts {
                name: "loyalty_pos".into(),
                plugin: Some("pgoutput".into()),
                database: Some("pos".into()),
                wal_status: Some("reserved".into()),
            }),
            ..full
        };
        assert_eq!(evaluate(&ours_exists, "loyalty_pos"), vec![]);
    }

    #[test]
    fn an_invalidated_slot_of_the_wrong_plugin_gets_both_problems() {
        let facts = ServerFacts {
            slot: Some(SlotFacts {
                name: "loyalty_pos".into(),
                plugin: Some("test_decoding".into()),
                database: Some("pos".into()),
                wal_status: Some("lost".into()),
            }),
            ..ready_server()
        };
        let problems = evaluate(&facts, "loyalty_pos");
        let whats: Vec<&str> = problems.iter().map(|p| p.what.as_str()).collect();
        assert_eq!(
            whats,
            [
                "slot `loyalty_pos` uses output plugin `test_decoding`, not `pgoutput`",
                "slot `loyalty_pos` was invalidated: the server removed WAL it still needed (max_slot_wal_keep_size)",
            ]
        );
    }

    #[test]
    fn identifiers_in_fixes_are_quoted() {
        assert_eq!(quote_identifier("odd\"name"), "\"odd\"\"name\"");
    }
}
