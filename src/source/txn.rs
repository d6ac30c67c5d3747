//! Whole source transactions and where they stand in their source.
//!
//! A transaction's changes are kept in memory up to a byte budget; past it
//! they are spilled to an unlinked temporary file and read back in order, so
//! a transaction of millions of rows costs the budget in memory, not its
//! size. Spilled changes are length-prefixed postcard records: compact and
//! quick to write and read, which matters when a bulk update streams past
//! at the walsender's full speed.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::change::{Change, Op, Row, Table};
use super::mysql::gtid::GtidList;

/// Default in-memory budget of one transaction's changes. 64 MiB holds about
/// 200k typical order rows, far beyond any ordinary sale, while a bulk
/// UPDATE of millions of rows goes to disk.
pub const DEFAULT_TXN_MEMORY_BUDGET: usize = 64 * 1024 * 1024;

/// A PostgreSQL WAL position (log sequence number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (high, low) = text
            .split_once('/')
            .ok_or_else(|| format!("`{text}` is not an LSN (expected e.g. 0/16B3748)"))?;
        let parse = |part: &str| {
            u32::from_str_radix(part, 16)
                .map_err(|_| format!("`{text}` is not an LSN (expected e.g. 0/16B3748)"))
        };
        Ok(Lsn((u64::from(parse(high)?) << 32) | u64::from(parse(low)?)))
    }
}

/// Whether a source is still being copied or is streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// The initial snapshot is being copied; it is consistent as of the
    /// position's offset. An interrupted snapshot is started again.
    Snapshot,
    /// Everything up to and including the offset has been applied.
    Stream,
}

/// A place in a MySQL/MariaDB binlog: the coordinates on the server read
/// from, and (MariaDB) the GTID state there, which stays valid across a
/// failover to another server where the coordinates do not.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BinlogOffset {
    /// Binlog file name, e.g. `mariadb-bin.000012`.
    pub file: String,
    /// Byte offset of the next event in that file.
    pub pos: u64,
    /// MariaDB GTID state at this point, if GTIDs are in use.
    pub gtids: Option<GtidList>,
}

impl BinlogOffset {
    /// Binlog files are numbered in order (`name.000012`): compare the
    /// number, then the offset within the file.
    /// `None` for a name without that number: such positions do not
    /// compare (so nothing is ever skipped on a guess).
    fn key(&self) -> Option<(u64, u64)> {
        let sequence = self.file.rsplit_once('.')?.1.parse().ok()?;
        Some((sequence, self.pos))
    }
}

/// The offset part of a position, in the source kind's own terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Offset {
    /// PostgreSQL: the end LSN of the last applied commit (or the slot's
    /// consistent point while and right after snapshotting).
    Lsn(Lsn),
    /// MySQL/MariaDB: where the next transaction starts.
    Binlog(BinlogOffset),
}

/// Where a source stands. Ordered within one source: by offset, and at one
/// offset the snapshot comes before the stream. Positions of different
/// source kinds are not comparable.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Position {
    pub offset: Offset,
    pub phase: Phase,
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        let by_offset = match (&self.offset, &other.offset) {
            (Offset::Lsn(a), Offset::Lsn(b)) => a.cmp(b),
            (Offset::Binlog(a), Offset::Binlog(b)) => a.key()?.cmp(&b.key()?),
            _ => return None,
        };
        Some(by_offset.then(self.phase.cmp(&other.phase)))
    }
}

impl Position {
    /// A PostgreSQL streaming position.
    pub fn stream(lsn: Lsn) -> Self {
        Self {
            offset: Offset::Lsn(lsn),
            phase: Phase::Stream,
        }
    }

    /// A PostgreSQL snapshot position.
    pub fn snapshot(lsn: Lsn) -> Self {
        Self {
            offset: Offset::Lsn(lsn),
            phase: Phase::Snapshot,
        }
    }

    /// The LSN of a PostgreSQL position.
    pub fn lsn(&self) -> Option<Lsn> {
        match self.offset {
            Offset::Lsn(lsn) => Some(lsn),
            Offset::Binlog(_) => None,
        }
    }
}

/// PostgreSQL `0/16B3748`; MySQL/MariaDB `mariadb-bin.000012:4567`, with
/// the GTID state after a `;` (`…:4567;0-1-100,1-2-57`).
impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Offset::Lsn(lsn) => write!(f, "{lsn}"),
            Offset::Binlog(binlog) => {
                write!(f, "{}:{}", binlog.file, binlog.pos)?;
                match &binlog.gtids {
                    Some(gtids) => write!(f, ";{gtids}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl FromStr for Offset {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if !text.contains(':') {
            return Ok(Offset::Lsn(text.parse()?));
        }
        let (coordinates, gtids) = match text.split_once(';') {
            Some((coordinates, gtids)) => (coordinates, Some(gtids.parse()?)),
            None => (text, None),
        };
        let (file, pos) = coordinates
            .rsplit_once(':')
            .ok_or_else(|| format!("`{text}` is not a binlog position (expected file:pos)"))?;
        Ok(Offset::Binlog(BinlogOffset {
            file: file.to_string(),
            pos: pos
                .parse()
                .map_err(|_| format!("`{text}` is not a binlog position (expected file:pos)"))?,
            gtids,
        }))
    }
}

/// Stored as the offset (streaming) or `snapshot@` and the offset.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.phase {
            Phase::Snapshot => write!(f, "snapshot@{}", self.offset),
            Phase::Stream => write!(f, "{}", self.offset),
        }
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (phase, offset) = match text.strip_prefix("snapshot@") {
            Some(offset) => (Phase::Snapshot, offset),
            None => (Phase::Stream, text),
        };
        Ok(Position {
            offset: offset.parse()?,
            phase,
        })
    }
}

/// What kind of transaction this is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnKind {
    /// Rows copied by the initial snapshot (all `Op::Insert`), one chunk of
    /// one table.
    Snapshot,
    /// The snapshot is complete (no changes): from here on the source
    /// streams. Its position is the first streaming position.
    SnapshotDone,
    /// A committed source transaction.
    Stream {
        /// PostgreSQL transaction id.
        xid: u32,
    },
}

/// One whole source transaction.
#[derive(Debug)]
pub struct SourceTxn {
    /// The configured source name.
    pub source: Arc<str>,
    pub kind: TxnKind,
    pub position: Position,
    /// Commit time at the source (snapshot: the snapshot's time). Business
    /// time: ledger effects use it, never the wall clock.
    pub commit_ts: DateTime<Utc>,
    pub changes: Changes,
}

impl SourceTxn {
    /// One chunk of snapshot rows (all inserts) at `position`.
    pub fn snapshot_chunk(
        source: &Arc<str>,
        position: &Position,
        commit_ts: DateTime<Utc>,
        chunk: Vec<Change>,
    ) -> Self {
        Self {
            source: Arc::clone(source),
            kind: TxnKind::Snapshot,
            position: position.clone(),
            commit_ts,
            changes: Changes::from_vec(chunk),
        }
    }
}

/// The changes of one transaction, in source order: in memory, or partly
/// spilled to disk past the budget.
#[derive(Debug, Default)]
pub struct Changes {
    spilled: Option<Spill>,
    memory: Vec<Change>,
    len: usize,
}

#[derive(Debug)]
struct Spill {
    file: std::fs::File,
    tables: Vec<Arc<Table>>,
    changes: usize,
}

/// One spilled change: the table by index into the spill's table list.
#[derive(Serialize, Deserialize)]
struct SpilledChange {
    table: usize,
    op: Op,
    #[serde(with = "spill_form")]
    before: Option<Row>,
    #[serde(with = "spill_form")]
    after: Option<Row>,
}

/// How row images are written to a spill file. A value's own serde form
/// is text for decimals and times (what JSON readers and the quarantine's
/// stored copies expect); here they are binary — a decimal's 16 bytes,
/// times as seconds and nanoseconds — because formatting and parsing them
/// took half the time of a spilled bulk transaction.
mod spill_form {
    use chrono::{DateTime, Datelike, NaiveDate, Utc};
    use rust_decimal::Decimal;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::source::change::{Row, Value};

    /// A value as the spill file holds it: written borrowed
    /// ([`ValueOut`]), read back owned ([`ValueIn`]) — one layout, so the
    /// two cannot drift apart.
    #[derive(Serialize, Deserialize)]
    enum Spilled<T, B> {
        Null,
        UnchangedToast,
        Absent,
        Bool(bool),
        Int(i64),
        Float(f64),
        Numeric([u8; 16]),
        Text(T),
        Timestamp(i64, u32),
        TimestampTz(i64, u32),
        Date(i32),
        Json(String),
        Uuid(uuid::Uuid),
        Bytes(B),
    }

    type ValueOut<'a> = Spilled<&'a str, &'a [u8]>;
    type ValueIn = Spilled<String, Vec<u8>>;

    impl<'a> From<&'a Value> for ValueOut<'a> {
        fn from(value: &'a Value) -> Self {
            match value {
                Value::Null => Self::Null,
                Value::UnchangedToast => Self::UnchangedToast,
                Value::Absent => Self::Absent,
                Value::Bool(b) => Self::Bool(*b),
                Value::Int(i) => Self::Int(*i),
                Value::Float(f) => Self::Float(*f),
                Value::Numeric(d) => Self::Numeric(d.serialize()),
                Value::Text(t) => Self::Text(t),
                Value::Timestamp(t) => {
                    let t = t.and_utc();
                    Self::Timestamp(t.timestamp(), t.timestamp_subsec_nanos())
                }
                Value::TimestampTz(t) => {
                    Self::TimestampTz(t.timestamp(), t.timestamp_subsec_nanos())
                }
                Value::Date(d) => Self::Date(d.num_days_from_ce()),
                Value::Json(j) => Self::Json(j.to_string()),
                Value::Uuid(u) => Self::Uuid(*u),
                Value::Bytes(b) => Self::Bytes(b),
            }
        }
    }

    impl TryFrom<ValueIn> for Value {
        type Error = &'static str;

        fn try_from(value: ValueIn) -> Result<Self, Self::Error> {
            let time = |seconds, nanos| {
                DateTime::<Utc>::from_timestamp(seconds, nanos).ok_or("a time out of range")
            };
            Ok(match value {
                ValueIn::Null => Value::Null,
                ValueIn::UnchangedToast => Value::UnchangedToast,
                ValueIn::Absent => Value::Absent,
                ValueIn::Bool(b) => Value::Bool(b),
                ValueIn::Int(i) => Value::Int(i),
                ValueIn::Float(f) => Value::Float(f),
                ValueIn::Numeric(bytes) => Value::Numeric(Decimal::deserialize(bytes)),
                ValueIn::Text(t) => Value::Text(t),
                ValueIn::Timestamp(s, n) => Value::Timestamp(time(s, n)?.naive_utc()),
                ValueIn::TimestampTz(s, n) => Value::TimestampTz(time(s, n)?),
                ValueIn::Date(days) => Value::Date(
                    NaiveDate::from_num_days_from_ce_opt(days).ok_or("a date out of range")?,
                ),
                ValueIn::Json(text) => Value::Json(
                    serde_json::from_str(&text).map_err(|_| "JSON that does not parse")?,
                ),
                ValueIn::Uuid(u) => Value::Uuid(u),
                ValueIn::Bytes(b) => Value::Bytes(b),
            })
        }
    }

    struct RowOut<'a>(&'a [Value]);

    impl Serialize for RowOut<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(ValueOut::from))
        }
    }

    pub fn serialize<S: Serializer>(row: &Option<Row>, serializer: S) -> Result<S::Ok, S::Error> {
        row.as_ref().map(|row| RowOut(&row.0)).serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Row>, D::Error> {
        let Some(values) = Option::<Vec<ValueIn>>::deserialize(deserializer)? else {
            return Ok(None);
        };
        values
            .into_iter()
            .map(Value::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map(|values| Some(Row(values)))
            .map_err(D::Error::custom)
    }
}

/// Reading spilled changes back failed (disk error, or a corrupted file).
#[derive(Debug, thiserror::Error)]
#[error("reading spilled transaction changes: {0}")]
pub struct SpillError(String);

impl Changes {
    pub fn from_vec(changes: Vec<Change>) -> Self {
        Self {
            len: changes.len(),
            spilled: None,
            memory: changes,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether part of the transaction went to disk.
    pub fn is_spilled(&self) -> bool {
        self.spilled.is_some()
    }

    /// Visits every change in order. Spilled changes are read back one at a
    /// time, so this never holds more than the budget.
    pub fn for_each(&mut self, mut visit: impl FnMut(&Change)) -> Result<(), SpillError> {
        if let Some(spill) = &mut self.spilled {
            spill
                .file
                .seek(SeekFrom::Start(0))
                .map_err(|e| SpillError(e.to_string()))?;
            let mut reader = BufReader::with_capacity(1 << 20, &spill.file);
            let mut record = Vec::new();
            for _ in 0..spill.changes {
                let mut len = [0u8; 4];
                reader
                    .read_exact(&mut len)
                    .map_err(|e| SpillError(e.to_string()))?;
                record.resize(u32::from_le_bytes(len) as usize, 0);
                reader
                    .read_exact(&mut record)
                    .map_err(|e| SpillError(e.to_string()))?;
                let spilled: SpilledChange =
                    postcard::from_bytes(&record).map_err(|e| SpillError(e.to_string()))?;
                let table =
                    spill.tables.get(spilled.table).cloned().ok_or_else(|| {
                        SpillError(format!("unknown table index {}", spilled.table))
                    })?;
                visit(&Change {
                    table,
                    op: spilled.op,
                    before: spilled.before,
                    after: spilled.after,
                });
            }
        }
        // By reference: a consumer reading a big transaction should not pay
        // for a copy of every row.
        for change in &self.memory {
            visit(change);
        }
        Ok(())
    }

    /// Visits every change in order, handing each over (spilled ones are
    /// read back one at a time, as in [`Changes::for_each`]).
    pub fn into_each(mut self, mut visit: impl FnMut(Change)) -> Result<(), SpillError> {
        let memory = std::mem::take(&mut self.memory);
        if self.spilled.is_some() {
            self.for_each(|change| visit(change.clone()))?;
        }
        for change in memory {
            visit(change);
        }
        Ok(())
    }

    /// All changes in memory. Only for transactions known to be small
    /// (tests, snapshot chunks); large ones use [`Changes::for_each`].
    pub fn to_vec(&mut self) -> Result<Vec<Change>, SpillError> {
        let mut all = Vec::with_capacity(self.len);
        self.for_each(|change| all.push(change.clone()))?;
        Ok(all)
    }
}

/// The spill file being written, and the tables seen so far: each change
/// names its table by index, the index found by the `Arc`'s address (every
/// change of one table shares one `Arc`).
#[derive(Debug)]
struct SpillWriter {
    writer: BufWriter<std::fs::File>,
    indexes: HashMap<usize, usize>,
    tables: Vec<Arc<Table>>,
    /// Reused buffer of one encoded record.
    scratch: Vec<u8>,
}

/// Collects one transaction's changes within a memory budget.
#[derive(Debug)]
pub struct ChangesBuilder {
    budget: usize,
    used: usize,
    memory: Vec<Change>,
    spill: Option<SpillWriter>,
    spilled: usize,
}

impl ChangesBuilder {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            used: 0,
            memory: Vec::new(),
            spill: None,
            spilled: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.spilled + self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held in memory now (approximate).
    pub fn memory_used(&self) -> usize {
        self.used
    }

    pub fn push(&mut self, change: Change) -> std::io::Result<()> {
        self.used += change.approx_size();
        self.memory.push(change);
        if self.used > self.budget {
            self.spill_memory()?;
        }
        Ok(())
    }

    fn spill_memory(&mut self) -> std::io::Result<()> {
        if self.spill.is_none() {
            // Unlinked at creation: nothing is left behind after a crash.
            let file = tempfile::tempfile()?;
            self.spill = Some(SpillWriter {
                writer: BufWriter::with_capacity(1 << 20, file),
                indexes: HashMap::new(),
                tables: Vec::new(),
                scratch: Vec::new(),
            });
        }
        let Some(SpillWriter {
            writer,
            indexes,
            tables,
            scratch,
        }) = &mut self.spill
        else {
            unreachable!("spill file created above");
        };
        for change in self.memory.drain(..) {
            let key = Arc::as_ptr(&change.table) as usize;
            let table = *indexes.entry(key).or_insert_with(|| {
                tables.push(Arc::clone(&change.table));
                tables.len() - 1
            });
            let record = postcard::to_extend(
                &SpilledChange {
                    table,
                    op: change.op,
                    before: change.before,
                    after: change.after,
                },
                std::mem::take(scratch),
            )
            .map_err(std::io::Error::other)?;
            let len = u32::try_from(record.len()).map_err(std::io::Error::other)?;
            writer.write_all(&len.to_le_bytes())?;
            writer.write_all(&record)?;
            *scratch = record;
            scratch.clear();
            self.spilled += 1;
        }
        self.used = 0;
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<Changes> {
        let len = self.len();
        let spilled = match self.spill {
            None => None,
            Some(SpillWriter { writer, tables, .. }) => Some(Spill {
                file: writer.into_inner().map_err(|e| e.into_error())?,
                tables,
                changes: self.spilled,
            }),
        };
        Ok(Changes {
            spilled,
            memory: self.memory,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::change::{Column, ReplicaIdentity, Value};

    #[test]
    fn lsn_round_trips_through_its_text_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
    }

    #[test]
    fn binlog_positions_round_trip_and_order_by_file_number_then_offset() {
        let a: Position = "mariadb-bin.000009:900;0-1-100,1-2-57".parse().unwrap();
        let b: Position = "mariadb-bin.000010:4".parse().unwrap();
        assert_eq!(a.to_string(), "mariadb-bin.000009:900;0-1-100,1-2-57");
        assert!(a < b);
        let snapshot: Position = "snapshot@mariadb-bin.000010:4".parse().unwrap();
        assert!(snapshot < b && snapshot.phase == Phase::Snapshot);
        assert_eq!(
            a.partial_cmp(&Position::stream(Lsn(1))),
            None,
            "kinds do not compare"
        );
        assert!("mariadb-bin.000010:x".parse::<Position>().is_err());
        let unnumbered: Position = "mariadb-bin:4".parse().unwrap();
        assert_eq!(
            unnumbered.partial_cmp(&b),
            None,
            "never compared on a guess"
        );
    }

    #[test]
    fn positions_order_snapshot_before_stream_at_one_lsn() {
        let at = Lsn(100);
        assert!(Position::snapshot(at) < Position::stream(at));
        assert!(Position::stream(at) < Position::snapshot(Lsn(101)));
        assert_eq!(
            "snapshot@0/64".parse::<Position>().unwrap(),
            Position::snapshot(at)
        );
        assert_eq!(Position::stream(at).to_string(), "0/64");
    }

    #[test]
    fn a_transaction_over_budget_spills_and_reads_back_in_order() {
        let table = Arc::new(Table {
            schema: "public".into(),
            name: "t".into(),
            columns: vec![Column {
                name: "v".into(),
                type_oid: 25,
                is_key: true,
            }],
            replica_identity: ReplicaIdentity::Default,
        });
        let mut builder = ChangesBuilder::new(10_000);
        for i in 0..1000 {
            builder
                .push(Change {
                    table: Arc::clone(&table),
                    op: Op::Insert,
                    before: None,
                    after: Some(Row(vec![Value::Text(format!("row {i}"))])),
                })
                .unwrap();
            assert!(builder.memory_used() <= 10_000 + 1000);
        }
        let mut changes = builder.finish().unwrap();
        assert!(changes.is_spilled());
        assert_eq!(changes.len(), 1000);
        let all = changes.to_vec().unwrap();
        let texts: Vec<String> = all
            .iter()
            .map(|c| match c.after_value("v") {
                Some(Value::Text(t)) => t.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            texts,
            (0..1000).map(|i| format!("row {i}")).collect::<Vec<_>>()
        );
        // Readable twice.
        assert_eq!(changes.to_vec().unwrap().len(), 1000);
    }

    #[test]
    fn every_value_kind_survives_the_spill_file() {
        let values = vec![
            Value::Null,
            Value::UnchangedToast,
            Value::Absent,
            Value::Bool(true),
            Value::Int(-7),
            Value::Float(0.1),
            Value::Numeric("1234.50".parse().unwrap()),
            Value::Numeric("-0.000000000000000000000000001".parse().unwrap()),
            Value::Text("café\n".into()),
            Value::Timestamp("2026-11-25T10:00:00.25".parse().unwrap()),
            Value::Timestamp("1969-07-20T20:17:40.123456".parse().unwrap()),
            Value::TimestampTz("2026-11-25T04:30:00Z".parse().unwrap()),
            Value::Date("2026-02-28".parse().unwrap()),
            Value::Json(serde_json::json!({"k": [1, "two", null]})),
            Value::Uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".parse().unwrap()),
            Value::Bytes(vec![0, 255]),
        ];
        let table = Arc::new(Table {
            schema: "public".into(),
            name: "every".into(),
            columns: (0..values.len())
                .map(|i| Column {
                    name: format!("c{i}"),
                    type_oid: 0,
                    is_key: i == 0,
                })
                .collect(),
            replica_identity: ReplicaIdentity::Full,
        });
        let change = Change {
            table: Arc::clone(&table),
            op: Op::Update,
            before: Some(Row(values.clone())),
            after: Some(Row(values)),
        };
        // A budget of one byte spills every change.
        let mut builder = ChangesBuilder::new(1);
        builder.push(change.clone()).unwrap();
        let mut changes = builder.finish().unwrap();
        assert!(changes.is_spilled());
        let read_back = changes.to_vec().unwrap();
        assert_eq!(read_back, vec![change]);
        // Equal decimals may differ in scale; the spill keeps it.
        let Some(Row(values)) = &read_back[0].after else {
            panic!("an after image")
        };
        assert!(matches!(&values[6], Value::Numeric(d) if d.to_string() == "1234.50"));
    }
}
