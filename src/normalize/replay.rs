//! What a quarantined row keeps so that `quarantine replay` can book it
//! once the mapping (or the ledger) is fixed: the typed source changes it
//! came from, or the mapped event the ledger could not book.
//!
//! The copy is postcard, as the spill files are: every column keeps its
//! type (a JSON image would turn a `numeric` into a float and a timestamp
//! into text, and the replay would not book what the stream would have).
//! It is versioned: a copy kept by a version whose types differ is
//! refused by name, never misread.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use super::MemberEvent;
use crate::source::{Change, Op, Row, Table};

/// The first byte of every stored copy: the layout of what follows.
const FORMAT: u8 = 2;

/// What a quarantined row came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Replay {
    /// The document's source changes (an order header with the lines of
    /// the same source transaction), normalized again with the mapping of
    /// the day.
    Changes(StoredChanges),
    /// A mapped event the ledger could not book (a refund of an order it
    /// has not seen, a redemption beyond the balance), booked again as is.
    Event(MemberEvent),
}

impl Replay {
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        let mut bytes = vec![FORMAT];
        postcard::to_io(self, &mut bytes).map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        match bytes.split_first() {
            Some((&FORMAT, rest)) => postcard::from_bytes(rest).map_err(|e| {
                format!("the stored copy cannot be read ({e}); the row must be fixed at the source")
            }),
            Some((format, _)) => Err(format!(
                "the stored copy has format {format}, which this version does not read; replay it with the version that quarantined it"
            )),
            None => Err("the stored copy is empty".into()),
        }
    }
}

/// Source changes with their table layouts (each layout kept once).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredChanges {
    tables: Vec<Table>,
    changes: Vec<StoredChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StoredChange {
    /// Index into `tables`.
    table: usize,
    op: Op,
    before: Option<Row>,
    after: Option<Row>,
}

impl StoredChanges {
    pub fn of<'a>(changes: impl IntoIterator<Item = &'a Change>) -> Self {
        let mut stored = Self::default();
        for change in changes {
            stored.push(&change.table, change.op, &change.before, &change.after);
        }
        stored
    }

    fn push(&mut self, table: &Table, op: Op, before: &Option<Row>, after: &Option<Row>) {
        let table = match self.tables.iter().position(|t| t == table) {
            Some(index) => index,
            None => {
                self.tables.push(table.clone());
                self.tables.len() - 1
            }
        };
        let change = StoredChange {
            table,
            op,
            before: before.clone(),
            after: after.clone(),
        };
        // Rows replayed together may each hold the same line (a header's
        // copy and the line's own, quarantined when its table was parked):
        // a line counted twice would double its amount.
        if !self.changes.contains(&change) {
            self.changes.push(change);
        }
    }

    /// Adds `other`'s changes after these (rows of one source transaction
    /// replayed together).
    pub fn extend(&mut self, other: StoredChanges) {
        for change in other.changes {
            let table = &other.tables[change.table];
            self.push(table, change.op, &change.before, &change.after);
        }
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The changes, in their order, as a source hands them over.
    pub fn into_changes(self) -> Vec<Change> {
        let tables: Vec<Arc<Table>> = self.tables.into_iter().map(Arc::new).collect();
        self.changes
            .into_iter()
            .map(|c| Change {
                table: Arc::clone(&tables[c.table]),
                op: c.op,
                before: c.before,
                after: c.after,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{Column, ReplicaIdentity, Value};
    use chrono::TimeZone;
    use rust_decimal::Decimal;

    fn table(name: &str) -> Arc<Table> {
        Arc::new(Table {
            schema: "public".into(),
            name: name.into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    is_key: true,
                },
                Column {
                    name: "amount".into(),
                    type_oid: 1700,
                    is_key: false,
                },
                Column {
                    name: "at".into(),
                    type_oid: 1184,
                    is_key: false,
                },
            ],
            replica_identity: ReplicaIdentity::Default,
        })
    }

    fn change(table: &Arc<Table>, id: i64, amount: &str) -> Change {
        Change {
            table: Arc::clone(table),
            op: Op::Insert,
            before: None,
            after: Some(Row(vec![
                Value::Int(id),
                Value::Numeric(amount.parse::<Decimal>().unwrap()),
                Value::TimestampTz(chrono::Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap()),
            ])),
        }
    }

    #[test]
    fn changes_come_back_typed_and_in_order() {
        let orders = table("pos_order");
        let lines = table("pos_order_line");
        let original = vec![
            change(&orders, 1, "120.50"),
            change(&lines, 10, "100.00"),
            change(&lines, 11, "20.50"),
        ];
        let replay = Replay::Changes(StoredChanges::of(&original));
        let bytes = replay.encode().unwrap();
        let Replay::Changes(back) = Replay::decode(&bytes).unwrap() else {
            panic!("not changes");
        };
        assert_eq!(back.tables.len(), 2, "each layout is kept once");
        assert_eq!(back.into_changes(), original);
    }

    #[test]
    fn rows_replayed_together_keep_one_copy_of_a_shared_line() {
        let orders = table("pos_order");
        let lines = table("pos_order_line");
        let mut header =
            StoredChanges::of(&[change(&orders, 1, "120.50"), change(&lines, 10, "100.00")]);
        header.extend(StoredChanges::of(&[change(&lines, 10, "100.00")]));
        header.extend(StoredChanges::of(&[change(&lines, 11, "20.50")]));
        assert_eq!(header.len(), 3);
    }

    #[test]
    fn another_format_is_refused_by_name() {
        let error = Replay::decode(&[9, 1, 2]).unwrap_err();
        assert!(error.contains("format 9"), "{error}");
    }
}
