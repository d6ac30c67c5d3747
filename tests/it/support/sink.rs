//! A durable consumer for reader tests: every change goes into a
//! `captured` table of a real PostgreSQL database, and the source position
//! into the ledger's `source_positions`, in the same transaction — the
//! pattern the ledger follows. Transactions can be batched (several source
//! transactions per database commit), so tests see the reader confirm only
//! what was committed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use loyalty_cdc::ledger;
use loyalty_cdc::source::{
    Change, ConsumerError, Position, SourceKind, SourceTxn, TxnConsumer, TxnKind, Value,
};

use super::PgDatabase;

pub struct PgSink {
    url: String,
    /// Which kind of source feeds it (stored with the position).
    pub kind: SourceKind,
    client: tokio_postgres::Client,
    source: String,
    /// Source transactions per database commit.
    batch: usize,
    in_batch: usize,
    last: Option<(Position, DateTime<Utc>)>,
    durable: Option<Position>,
    /// Fail (as a crash would) when this many transactions were applied.
    pub fail_after: Option<usize>,
    pub applied: Arc<AtomicUsize>,
}

impl PgSink {
    /// Prepares `db` (ledger schema + `captured`) and connects.
    pub async fn new(db: &PgDatabase, source: &str, batch: usize) -> Self {
        let mut client = db.client().await;
        ledger::migrate(&mut client).await.expect("migrate sink");
        client
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS captured (
                    seq bigserial PRIMARY KEY, kind text, position text, tbl text, op text,
                    id text, before jsonb, after jsonb, commit_ts timestamptz)",
            )
            .await
            .expect("create captured");
        Self {
            url: db.url(),
            kind: SourceKind::Postgres,
            client,
            source: source.into(),
            batch,
            in_batch: 0,
            last: None,
            durable: None,
            fail_after: None,
            applied: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A new connection if the server closed ours (a restart): whatever the
    /// open batch held was rolled back with it.
    async fn reconnect_if_closed(&mut self) -> Result<(), ConsumerError> {
        if self.client.is_closed() {
            let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
                .await
                .map_err(|e| ConsumerError::transient(e.to_string()))?;
            tokio::spawn(connection);
            self.client = client;
            self.in_batch = 0;
        }
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), ConsumerError> {
        if self.in_batch == 0 {
            return Ok(());
        }
        let (position, commit_ts) = self.last.clone().expect("a transaction was applied");
        ledger::positions::store(&self.client, &self.source, self.kind, &position, commit_ts)
            .await
            .map_err(|e| ConsumerError::transient(e.to_string()))?;
        self.client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| ConsumerError::transient(e.to_string()))?;
        self.in_batch = 0;
        self.durable = Some(position);
        Ok(())
    }
}

fn id_of(change: &Change) -> Option<String> {
    let value = change
        .after_value("id")
        .or_else(|| change.before_value("id"))?;
    Some(match value {
        Value::Int(i) => i.to_string(),
        Value::Text(t) => t.clone(),
        other => format!("{other:?}"),
    })
}

fn image(row: &Option<loyalty_cdc::source::Row>, change: &Change) -> Option<String> {
    let row = row.as_ref()?;
    let map: serde_json::Map<String, serde_json::Value> = change
        .table
        .columns
        .iter()
        .zip(&row.0)
        .map(|(column, value)| {
            (
                column.name.clone(),
                serde_json::to_value(value).expect("value to JSON"),
            )
        })
        .collect();
    Some(serde_json::Value::Object(map).to_string())
}

impl TxnConsumer for PgSink {
    async fn durable_position(&mut self) -> Result<Option<Position>, ConsumerError> {
        self.reconnect_if_closed().await?;
        // A new session re-sends what was not durable: drop it.
        if self.in_batch > 0 {
            self.client
                .batch_execute("ROLLBACK")
                .await
                .map_err(|e| ConsumerError::transient(e.to_string()))?;
            self.in_batch = 0;
        }
        ledger::positions::load(&self.client, &self.source)
            .await
            .map_err(|e| ConsumerError::transient(e.to_string()))
    }

    async fn apply(&mut self, mut txn: SourceTxn) -> Result<Option<Position>, ConsumerError> {
        if let Some(limit) = self.fail_after {
            if self.applied.load(Ordering::SeqCst) >= limit {
                // Whatever this batch held is rolled back, as in a crash.
                let _ = self.client.batch_execute("ROLLBACK").await;
                self.in_batch = 0;
                return Err(ConsumerError::definite("sink told to fail"));
            }
        }
        self.reconnect_if_closed().await?;
        if self.in_batch == 0 {
            self.client
                .batch_execute("BEGIN")
                .await
                .map_err(|e| ConsumerError::transient(e.to_string()))?;
        }
        let kind = match txn.kind {
            TxnKind::Snapshot => "snapshot",
            TxnKind::SnapshotDone => "snapshot_done",
            TxnKind::Stream { .. } => "stream",
        };
        let (mut tbls, mut ops, mut ids, mut befores, mut afters) =
            (vec![], vec![], vec![], vec![], vec![]);
        txn.changes
            .for_each(|change| {
                tbls.push(change.table.name.clone());
                ops.push(format!("{:?}", change.op).to_lowercase());
                ids.push(id_of(change));
                befores.push(image(&change.before, change));
                afters.push(image(&change.after, change));
            })
            .map_err(|e| ConsumerError::definite(e.to_string()))?;
        let position = txn.position.to_string();
        if tbls.is_empty() {
            tbls.push(String::new());
            ops.push("none".into());
            ids.push(None);
            befores.push(None);
            afters.push(None);
        }
        self.client
            .execute(
                "INSERT INTO captured (kind, position, tbl, op, id, before, after, commit_ts)
                 SELECT $1, $2, t, o, i, b::jsonb, a::jsonb, $8
                   FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[]) AS u(t, o, i, b, a)",
                &[&kind, &position, &tbls, &ops, &ids, &befores, &afters, &txn.commit_ts],
            )
            .await
            .map_err(|e| ConsumerError::transient(e.to_string()))?;
        self.last = Some((txn.position.clone(), txn.commit_ts));
        self.in_batch += 1;
        self.applied.fetch_add(1, Ordering::SeqCst);
        if self.in_batch >= self.batch {
            self.commit().await?;
        }
        Ok(self.durable.clone())
    }

    async fn flush(&mut self) -> Result<Option<Position>, ConsumerError> {
        self.commit().await?;
        Ok(self.durable.clone())
    }
}
