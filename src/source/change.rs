//! Row changes as every source kind hands them over: a table, an operation,
//! and before/after images whose column values are typed.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// A column value.
///
/// `Null`, `UnchangedToast` and `Absent` are three different things and are
/// never merged: a consumer that read an unchanged TOAST column as NULL
/// would erase data it was never sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// PostgreSQL: a large (TOASTed) value that the UPDATE did not change, so
    /// the server did not send it. The consumer keeps what it had.
    UnchangedToast,
    /// Not part of this image: a key-only before-image carries only the
    /// replica identity columns.
    Absent,
    Bool(bool),
    /// int2, int4, int8, oid.
    Int(i64),
    /// float4, float8.
    Float(f64),
    /// numeric that fits a decimal (28 significant digits); others stay text.
    Numeric(#[serde(with = "decimal_text")] Decimal),
    /// text, varchar, char, name, enum labels, and any type without a typed
    /// form here (its text output, unchanged).
    Text(String),
    /// timestamp without time zone.
    Timestamp(NaiveDateTime),
    /// timestamp with time zone, in UTC.
    TimestampTz(DateTime<Utc>),
    Date(NaiveDate),
    /// json, jsonb.
    Json(#[serde(with = "json_text")] serde_json::Value),
    Uuid(uuid::Uuid),
    /// bytea.
    Bytes(Vec<u8>),
}

// Decimals and JSON documents are (de)serialized as their text, so that
// formats without self-description (the spill file's postcard) can read
// them back: their own serde impls ask for "any" type on the way in.
pub(crate) mod decimal_text {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Decimal, D::Error> {
        let text = String::deserialize(deserializer)?;
        Decimal::from_str_exact(&text).map_err(serde::de::Error::custom)
    }
}

mod json_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        value: &serde_json::Value,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<serde_json::Value, D::Error> {
        let text = String::deserialize(deserializer)?;
        serde_json::from_str(&text).map_err(serde::de::Error::custom)
    }
}

impl Value {
    /// Approximate heap plus inline size, for memory budgets.
    pub fn approx_size(&self) -> usize {
        let inline = std::mem::size_of::<Value>();
        inline
            + match self {
                Value::Text(text) => text.len(),
                Value::Bytes(bytes) => bytes.len(),
                // serde_json trees are not measured exactly; their text length
                // is a fair proxy and cheap to bound from above.
                Value::Json(json) => json_size(json),
                _ => 0,
            }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

fn json_size(json: &serde_json::Value) -> usize {
    match json {
        serde_json::Value::String(s) => s.len() + 24,
        serde_json::Value::Array(items) => 24 + items.iter().map(json_size).sum::<usize>(),
        serde_json::Value::Object(map) => {
            24 + map
                .iter()
                .map(|(k, v)| k.len() + 24 + json_size(v))
                .sum::<usize>()
        }
        _ => 16,
    }
}

/// How the server identifies an updated or deleted row in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaIdentity {
    /// Primary key columns (the default).
    Default,
    /// No old values: UPDATE and DELETE carry no before-image.
    Nothing,
    /// The whole old row.
    Full,
    /// The columns of a chosen unique index.
    Index,
}

/// A column of a captured table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// PostgreSQL type OID (the source's own type code for other kinds).
    pub type_oid: u32,
    /// Part of the replica identity (the key that before-images carry).
    pub is_key: bool,
}

/// A captured table's shape at the time of a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub replica_identity: ReplicaIdentity,
}

impl Table {
    /// Position of `column` in this table's rows.
    pub fn column_index(&self, column: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == column)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// One row image: one value per column of its [`Table`], in column order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row(pub Vec<Value>);

impl Row {
    pub fn approx_size(&self) -> usize {
        24 + self.0.iter().map(Value::approx_size).sum::<usize>()
    }
}

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A new row; also every row copied by a snapshot.
    Insert,
    Update,
    Delete,
    /// The whole table was emptied (no rows are listed).
    Truncate,
}

/// One row change of a source transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub table: Arc<Table>,
    pub op: Op,
    /// Update and delete: the old row as the replica identity allows (key
    /// columns only, with the rest [`Value::Absent`], unless the identity is
    /// FULL); `None` when the server sent none (an update that did not touch
    /// the key under the default identity).
    pub before: Option<Row>,
    /// Insert and update: the new row.
    pub after: Option<Row>,
}

impl Change {
    /// The new value of `column` (insert, update).
    pub fn after_value(&self, column: &str) -> Option<&Value> {
        let index = self.table.column_index(column)?;
        self.after.as_ref()?.0.get(index)
    }

    /// The old value of `column` (update, delete), if the before-image has it.
    pub fn before_value(&self, column: &str) -> Option<&Value> {
        let index = self.table.column_index(column)?;
        self.before.as_ref()?.0.get(index)
    }

    pub fn approx_size(&self) -> usize {
        64 + self.before.as_ref().map_or(0, Row::approx_size)
            + self.after.as_ref().map_or(0, Row::approx_size)
    }
}
