//! What the reader asks the source's catalog, over an ordinary connection:
//! the slot, the publication, the captured tables' columns and replica
//! identity, and the WAL lag.

use std::fmt;
use std::sync::Arc;

use tokio_postgres::{Client, GenericClient};

use super::preflight::quote_identifier;
use super::PgSourceError;
use crate::source::change::{Column, ReplicaIdentity, Table};
use crate::source::txn::Lsn;

/// A table the reader captures, and what the mapping needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableSpec {
    pub schema: String,
    pub name: String,
    /// The mapping reads old values of non-key columns on update/delete (a
    /// state transition): the table needs REPLICA IDENTITY FULL.
    pub needs_before_image: bool,
}

impl TableSpec {
    /// `schema.table` or `table` (schema `public`).
    pub fn parse(qualified: &str) -> Self {
        let (schema, name) = qualified.split_once('.').unwrap_or(("public", qualified));
        Self {
            schema: schema.to_string(),
            name: name.to_string(),
            needs_before_image: false,
        }
    }

    pub fn with_before_image(mut self) -> Self {
        self.needs_before_image = true;
        self
    }

    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(&self.name)
        )
    }
}

impl fmt::Display for TableSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// A replication slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub wal_status: Option<String>,
    pub confirmed_flush: Option<Lsn>,
    pub active_pid: Option<i32>,
}

fn lsn_of(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, PgSourceError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, wal_status, confirmed_flush_lsn::text, active_pid
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.map(|row| SlotState {
        plugin: row.get(0),
        database: row.get(1),
        wal_status: row.get(2),
        confirmed_flush: lsn_of(row.get(3)),
        active_pid: row.get(4),
    }))
}

/// Checks that an existing slot can serve this source.
pub fn verify_slot(slot: &str, state: &SlotState, database: &str) -> Result<(), PgSourceError> {
    if state.wal_status.as_deref() == Some("lost") {
        return Err(PgSourceError::SlotInvalidated { slot: slot.into() });
    }
    if state.plugin.as_deref() != Some("pgoutput") || state.database.as_deref() != Some(database) {
        return Err(PgSourceError::SlotUnusable {
            slot: slot.into(),
            detail: format!(
                "plugin {:?} on database {:?}; loyalty-cdc needs a pgoutput slot on `{database}`",
                state.plugin, state.database
            ),
        });
    }
    Ok(())
}

pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), PgSourceError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    Ok(())
}

/// Creates the publication for `tables` if it does not exist; verifies an
/// existing one publishes every table.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableSpec],
) -> Result<(), PgSourceError> {
    let exists = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await?;
    match exists {
        None => {
            let list: Vec<String> = tables.iter().map(TableSpec::quoted).collect();
            let sql = format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_identifier(publication),
                list.join(", ")
            );
            client.batch_execute(&sql).await.map_err(|error| {
                PgSourceError::Setup(format!(
                    "cannot create publication `{publication}`: {}; create it as the tables' owner: {sql}",
                    db_message(&error)
                ))
            })?;
            tracing::info!(publication, tables = tables.len(), "created publication");
            Ok(())
        }
        Some(row) if row.get::<_, bool>(0) => Ok(()),
        Some(_) => verify_publication(client, publication, tables).await,
    }
}

/// Errors unless the publication exists and publishes every table.
pub async fn verify_publication(
    client: &Client,
    publication: &str,
    tables: &[TableSpec],
) -> Result<(), PgSourceError> {
    let rows = client
        .query(
            "SELECT p.puballtables, pt.schemaname::text, pt.tablename::text
               FROM pg_publication p
               LEFT JOIN pg_publication_tables pt ON pt.pubname = p.pubname
              WHERE p.pubname = $1",
            &[&publication],
        )
        .await?;
    if rows.is_empty() {
        return Err(PgSourceError::PublicationMissing {
            publication: publication.into(),
            create: format!(
                "CREATE PUBLICATION {} FOR TABLE {}",
                quote_identifier(publication),
                tables
                    .iter()
                    .map(TableSpec::quoted)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
    }
    if rows[0].get::<_, bool>(0) {
        return Ok(());
    }
    let published: Vec<(String, String)> = rows
        .iter()
        .filter_map(|row| {
            Some((
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
            ))
        })
        .collect();
    let missing: Vec<&TableSpec> = tables
        .iter()
        .filter(|t| {
            !published
                .iter()
                .any(|(s, n)| *s == t.schema && *n == t.name)
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(PgSourceError::PublicationIncomplete {
        publication: publication.into(),
        missing: missing.iter().map(|t| t.to_string()).collect(),
        fix: format!(
            "ALTER PUBLICATION {} ADD TABLE {}; the added tables' existing rows are not streamed, so resnapshot the source",
            quote_identifier(publication),
            missing.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ")
        ),
    })
}

/// Columns, key flags and replica identity of one table, as the snapshot
/// reads them (the stream gets the same from Relation messages).
pub async fn describe_table(
    client: &impl GenericClient,
    table: &TableSpec,
) -> Result<Arc<Table>, PgSourceError> {
    let identity = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&table.schema, &table.name],
        )
        .await?
        .ok_or_else(|| PgSourceError::TableMissing { table: table.to_string() })?;
    let oid: u32 = identity.get(0);
    if identity.get::<_, String>(2) == "p" {
        // COPY cannot read a partitioned parent and the stream would name
        // its partitions: not supported yet, said plainly.
        return Err(PgSourceError::Setup(format!(
            "table `{table}` is partitioned; loyalty-cdc does not capture partitioned tables yet: map its partitions instead"
        )));
    }
    let replica_identity = match identity.get::<_, String>(1).as_str() {
        "n" => ReplicaIdentity::Nothing,
        "f" => ReplicaIdentity::Full,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    // Key columns: those of the replica identity index, or of the primary
    // key under the default identity; all of them under FULL.
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid,
                    c.relreplident = 'f' OR EXISTS (
                        SELECT 1 FROM pg_index i
                         WHERE i.indrelid = a.attrelid
                           AND a.attnum = ANY (i.indkey::int2[])
                           AND CASE c.relreplident WHEN 'i' THEN i.indisreplident
                                                   WHEN 'd' THEN i.indisprimary
                                                   ELSE false END)
              FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
              WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
              ORDER BY a.attnum",
            &[&oid],
        )
        .await?;
    let columns = rows
        .iter()
        .map(|row| Column {
            name: row.get(0),
            type_oid: row.get(1),
            is_key: row.get(2),
        })
        .collect();
    Ok(Arc::new(Table {
        schema: table.schema.clone(),
        name: table.name.clone(),
        columns,
        replica_identity,
    }))
}

/// Tables whose replica identity cannot give what the mapping needs, each
/// with the statement that fixes it.
pub fn replica_identity_problems(spec: &TableSpec, table: &Table) -> Option<String> {
    let has_key = table.columns.iter().any(|c| c.is_key);
    let fix_full = format!("ALTER TABLE {} REPLICA IDENTITY FULL;", spec.quoted());
    match table.replica_identity {
        ReplicaIdentity::Full => None,
        _ if spec.needs_before_image => Some(format!(
            "table `{spec}` has REPLICA IDENTITY {:?}, but its mapping reads old values of updated rows; fix: {fix_full}",
            table.replica_identity
        )),
        ReplicaIdentity::Nothing => Some(format!(
            "table `{spec}` has REPLICA IDENTITY NOTHING: its updates and deletes carry no key; fix: {fix_full}"
        )),
        ReplicaIdentity::Default if !has_key => Some(format!(
            "table `{spec}` has no primary key: once published, UPDATE and DELETE on it fail on the server; fix: add a primary key, or {fix_full}"
        )),
        _ => None,
    }
}

/// Bytes of WAL the slot holds back: `pg_current_wal_lsn() -
/// confirmed_flush_lsn`. `None` if the slot does not exist.
pub async fn lag_bytes(client: &Client, slot: &str) -> Result<Option<i64>, PgSourceError> {
    let row = client
        .query_opt(
            "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint
               FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row.and_then(|row| row.get(0)))
}

/// The server's own message, without the driver's prefix.
pub fn db_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| db.message().to_string())
        .unwrap_or_else(|| error.to_string())
}
