//! The MariaDB-only binlog events our own parsers read, taken from a real
//! server's binlog.

use std::collections::HashMap;

use futures_util::StreamExt;
use loyalty_cdc::source::mysql::gtid::{parse_gtid_list, GtidEvent};
use loyalty_cdc::source::mysql::rows::{RowsKind, TableLayout};
use loyalty_cdc::source::{Row, Value};
use mysql_async::binlog::events::{EventData, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::BinlogStreamRequest;

use crate::support::{mysql_admin_url, mysql_connect, MyDatabase};

/// Event type codes of MariaDB's own events.
const MARIADB_GTID_EVENT: u8 = 0xa2;
const MARIADB_GTID_LIST_EVENT: u8 = 0xa3;

#[tokio::test]
async fn mariadb_gtid_and_gtid_list_events_parse_from_a_real_binlog() {
    let db = MyDatabase::create("gtid").await;
    let mut conn = db.conn().await;
    conn.query_drop("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let (file, position): (String, u64) = conn
        .query_first("SHOW BINLOG STATUS")
        .await
        .unwrap()
        .map(|(file, position, _, _): (String, u64, String, String)| (file, position))
        .expect("binlog enabled");
    conn.query_drop("INSERT INTO t VALUES (1)").await.unwrap();
    let expected: String = conn
        .query_first("SELECT @@last_gtid")
        .await
        .unwrap()
        .unwrap();

    // Read from the start of the file (its GTID_LIST) to its end, as a
    // MariaDB-aware replica (capability 4: GTID events arrive as such).
    let mut reader = mysql_connect(&mysql_admin_url()).await;
    reader
        .query_drop("SET @mariadb_slave_capability = 4")
        .await
        .unwrap();
    let server_id = 3_000_000_000 + std::process::id() % 1_000_000;
    let mut stream = reader
        .get_binlog_stream(
            BinlogStreamRequest::new(server_id)
                .with_filename(file.as_bytes())
                .with_pos(4)
                .with_non_blocking(),
        )
        .await
        .unwrap();
    let (mut gtid_lists, mut found, mut fake_rotates) = (0, false, 0);
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        let header = event.header();
        match header.event_type_raw() {
            // The stream's first, fake ROTATE: mysql_async leaves the 4
            // checksum bytes on its name (the reader strips them).
            4 if header.log_pos() == 0 => {
                if let Ok(Some(EventData::RotateEvent(rotate))) = event.read_data() {
                    let raw = rotate.name_raw();
                    assert_eq!(
                        raw.len(),
                        file.len() + 4,
                        "{:?}",
                        String::from_utf8_lossy(raw)
                    );
                    assert_eq!(&raw[..file.len()], file.as_bytes());
                    fake_rotates += 1;
                }
            }
            MARIADB_GTID_LIST_EVENT => {
                parse_gtid_list(event.data()).expect("GTID_LIST parses");
                gtid_lists += 1;
            }
            MARIADB_GTID_EVENT if u64::from(header.log_pos()) > position => {
                let gtid = GtidEvent::parse(event.data(), header.server_id()).expect("GTID parses");
                if gtid.gtid.to_string() == expected {
                    found = true;
                    assert!(!gtid.is_standalone(), "an InnoDB insert is a transaction");
                }
            }
            _ => {}
        }
    }
    assert_eq!(gtid_lists, 1, "every binlog file starts with a GTID_LIST");
    assert_eq!(fake_rotates, 1);
    assert!(
        found,
        "the insert's GTID {expected} was read from the binlog"
    );
}

/// Decodes every row event of `table` written after `position` in `file`.
async fn decoded_rows(
    file: &str,
    position: u64,
    table: &str,
) -> Vec<(RowsKind, Option<Row>, Option<Row>, TableLayout)> {
    let mut reader = mysql_connect(&mysql_admin_url()).await;
    reader
        .query_drop("SET @mariadb_slave_capability = 4")
        .await
        .unwrap();
    let server_id = 3_100_000_000 + std::process::id() % 1_000_000;
    let mut stream = reader
        .get_binlog_stream(
            BinlogStreamRequest::new(server_id)
                .with_filename(file.as_bytes())
                .with_pos(position)
                .with_non_blocking(),
        )
        .await
        .unwrap();
    let mut layouts: HashMap<u64, TableLayout> = HashMap::new();
    let mut rows = Vec::new();
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        match event.read_data() {
            Ok(Some(EventData::TableMapEvent(tme))) => {
                let layout =
                    TableLayout::from_table_map(&tme, event.data()).expect("table map decodes");
                layouts.insert(tme.table_id(), layout);
            }
            Ok(Some(EventData::RowsEvent(data))) => {
                let layout = layouts
                    .get(&data.table_id())
                    .expect("a TABLE_MAP came first");
                if layout.table.name != table {
                    continue;
                }
                let kind = match &data {
                    RowsEventData::WriteRowsEventV1(_) | RowsEventData::WriteRowsEvent(_) => {
                        RowsKind::Write
                    }
                    RowsEventData::UpdateRowsEventV1(_) | RowsEventData::UpdateRowsEvent(_) => {
                        RowsKind::Update
                    }
                    _ => RowsKind::Delete,
                };
                let before: Option<Vec<bool>> = data
                    .columns_before_image()
                    .map(|b| b.iter().map(|x| *x).collect());
                let after: Option<Vec<bool>> = data
                    .columns_after_image()
                    .map(|b| b.iter().map(|x| *x).collect());
                layout
                    .decode_rows(
                        kind,
                        before.as_deref(),
                        after.as_deref(),
                        data.rows_data(),
                        |b, a| rows.push((kind, b, a, layout.clone())),
                    )
                    .expect("rows decode");
            }
            _ => {}
        }
    }
    rows
}

fn by_name(layout: &TableLayout, row: &Row) -> HashMap<String, Value> {
    layout
        .table
        .columns
        .iter()
        .map(|c| c.name.clone())
        .zip(row.0.iter().cloned())
        .collect()
}

#[tokio::test]
async fn every_supported_mariadb_type_decodes_exactly_from_the_binlog() {
    let db = MyDatabase::create("types").await;
    let mut conn = db.conn().await;
    conn.query_drop(
        "CREATE TABLE every_type (
            id INT PRIMARY KEY, ti TINYINT, tu TINYINT UNSIGNED, mi MEDIUMINT, mu MEDIUMINT UNSIGNED,
            bi BIGINT, bu BIGINT UNSIGNED, d DECIMAL(20,4), dn DECIMAL(5,2), f FLOAT, db DOUBLE,
            dt DATETIME(6), dt0 DATETIME, ts TIMESTAMP(3) NULL, da DATE, tm TIME(2), y YEAR,
            v VARCHAR(300), c CHAR(10), tx TEXT, bl BLOB, j JSON,
            e ENUM('draft', 'paid', 'done'), st SET('email', 'sms', 'push'), bt BIT(10),
            vb VARBINARY(20), nn VARCHAR(10)
         ) DEFAULT CHARSET = utf8mb4",
    )
    .await
    .unwrap();
    let (file, position): (String, u64) = conn
        .query_first("SHOW BINLOG STATUS")
        .await
        .unwrap()
        .map(|(file, position, _, _): (String, u64, String, String)| (file, position))
        .unwrap();
    conn.query_drop("SET time_zone = '+00:00'").await.unwrap();
    conn.query_drop(
        "INSERT INTO every_type VALUES (1, -128, 255, -1, 16777215, -9223372036854775808,
            18446744073709551615, 12345.6789, -0.05, 1.5, 0.1, '2026-11-25 10:00:00.123456',
            '2026-11-25 23:59:59', '2026-11-25 10:00:00.5', '2026-02-28', '-12:34:56.78', 2026,
            'café 🎉', 'abc', 'long text', x'00ff', '{\"k\": [1, 2]}', 'paid', 'email,push',
            b'1010101010', x'0102', NULL)",
    )
    .await
    .unwrap();
    conn.query_drop("UPDATE every_type SET d = -12345.6789, e = 'done' WHERE id = 1")
        .await
        .unwrap();
    conn.query_drop("DELETE FROM every_type WHERE id = 1")
        .await
        .unwrap();

    let rows = decoded_rows(&file, position, "every_type").await;
    let kinds: Vec<RowsKind> = rows.iter().map(|r| r.0).collect();
    assert_eq!(kinds, [RowsKind::Write, RowsKind::Update, RowsKind::Delete]);
    let layout = &rows[0].3;
    assert!(
        layout.table.columns[0].is_key && !layout.table.columns[1].is_key,
        "key from metadata"
    );
    let inserted = by_name(layout, rows[0].2.as_ref().unwrap());
    let expect = |name: &str, value: Value| assert_eq!(inserted[name], value, "column {name}");
    expect("id", Value::Int(1));
    expect("ti", Value::Int(-128));
    expect("tu", Value::Int(255));
    expect("mi", Value::Int(-1));
    expect("mu", Value::Int(16_777_215));
    expect("bi", Value::Int(i64::MIN));
    expect("bu", Value::Numeric(u64::MAX.into()));
    expect("d", Value::Numeric("12345.6789".parse().unwrap()));
    expect("dn", Value::Numeric("-0.05".parse().unwrap()));
    expect("f", Value::Float(1.5));
    expect("db", Value::Float(0.1));
    expect(
        "dt",
        Value::Timestamp("2026-11-25T10:00:00.123456".parse().unwrap()),
    );
    expect(
        "dt0",
        Value::Timestamp("2026-11-25T23:59:59".parse().unwrap()),
    );
    expect(
        "ts",
        Value::TimestampTz("2026-11-25T10:00:00.5Z".parse().unwrap()),
    );
    expect("da", Value::Date("2026-02-28".parse().unwrap()));
    expect("tm", Value::Text("-12:34:56.78".into()));
    expect("y", Value::Int(2026));
    expect("v", Value::Text("café 🎉".into()));
    expect("c", Value::Text("abc".into()));
    expect("tx", Value::Text("long text".into()));
    expect("bl", Value::Bytes(vec![0x00, 0xff]));
    expect("j", Value::Text("{\"k\": [1, 2]}".into()));
    expect("e", Value::Text("paid".into()));
    expect("st", Value::Text("email,push".into()));
    expect("bt", Value::Bytes(vec![0x02, 0xaa]));
    expect("vb", Value::Bytes(vec![0x01, 0x02]));
    expect("nn", Value::Null);

    // binlog_row_image = FULL: the update carries the whole old and new row.
    let before = by_name(layout, rows[1].1.as_ref().unwrap());
    let after = by_name(layout, rows[1].2.as_ref().unwrap());
    assert_eq!(before["d"], Value::Numeric("12345.6789".parse().unwrap()));
    assert_eq!(after["d"], Value::Numeric("-12345.6789".parse().unwrap()));
    assert_eq!(
        (before["e"].clone(), after["e"].clone()),
        (Value::Text("paid".into()), Value::Text("done".into()))
    );
    assert_eq!(after["v"], Value::Text("café 🎉".into()));
    let deleted = by_name(layout, rows[2].1.as_ref().unwrap());
    assert_eq!(deleted["e"], Value::Text("done".into()));
}
