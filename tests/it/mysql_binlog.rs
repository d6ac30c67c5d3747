//! The MariaDB-only binlog events our own parsers read, taken from a real
//! server's binlog.

use futures_util::StreamExt;
use loyalty_cdc::source::mysql::gtid::{parse_gtid_list, GtidEvent};
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
    let (mut gtid_lists, mut found) = (0, false);
    while let Some(event) = stream.next().await {
        let event = event.unwrap();
        let header = event.header();
        match header.event_type_raw() {
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
    assert!(
        found,
        "the insert's GTID {expected} was read from the binlog"
    );
}
