//! Arbitrary bytes through our MariaDB/MySQL binlog decoders: the TABLE_MAP
//! body (parsed by mysql_common, turned into a decoding plan by us), row
//! images decoded with that plan, and MariaDB's GTID and GTID_LIST events.
//! Errors are fine, panics are bugs.
//!
//!     cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run binlog_decode -- -max_total_time=60
//!
//! The input is split at 0xFF 0xFF: table map body, then row images, then
//! a GTID event body, then a GTID_LIST body.

#![no_main]

use libfuzzer_sys::fuzz_target;
use loyalty_cdc::source::mysql::gtid::{parse_gtid_list, GtidEvent};
use loyalty_cdc::source::mysql::rows::{RowsKind, TableLayout};
use mysql_common::binlog::events::{FormatDescriptionEvent, TableMapEvent};
use mysql_common::binlog::consts::BinlogVersion;
use mysql_common::binlog::BinlogCtx;
use mysql_common::io::ParseBuf;
use mysql_common::proto::MyDeserialize;

const TABLE_MAP_EVENT: u8 = 19;

fuzz_target!(|data: &[u8]| {
    let mut parts: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + 1 < data.len() {
        if data[i] == 0xFF && data[i + 1] == 0xFF {
            parts.push(&data[start..i]);
            start = i + 2;
            i += 2;
        } else {
            i += 1;
        }
    }
    parts.push(&data[start.min(data.len())..]);
    let part = |n: usize| parts.get(n).copied().unwrap_or(&[]);

    let fde = FormatDescriptionEvent::new(BinlogVersion::Version4);
    let ctx = BinlogCtx::new(part(0).len(), &fde, TABLE_MAP_EVENT);
    if let Ok(table_map) = TableMapEvent::deserialize(ctx, &mut ParseBuf(part(0))) {
        if let Ok(layout) = TableLayout::from_table_map(&table_map, part(0)) {
            for kind in [RowsKind::Write, RowsKind::Update, RowsKind::Delete] {
                let _ = layout.decode_rows(kind, None, None, part(1), |before, after| {
                    std::hint::black_box((before, after));
                });
            }
        }
    }
    let _ = std::hint::black_box(GtidEvent::parse(part(2), 1));
    let _ = std::hint::black_box(parse_gtid_list(part(3)));
});
