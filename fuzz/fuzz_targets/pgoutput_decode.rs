//! Arbitrary bytes through the pgoutput decoder and on into row changes:
//! errors are fine, panics are bugs.
//!
//!     cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run pgoutput_decode -- -max_total_time=60
//!
//! The input is split at 0xFF 0xFF into several messages, so a Relation can
//! be followed by changes that disagree with it.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use loyalty_cdc::source::postgres::pgoutput;
use loyalty_cdc::source::postgres::stream::RelationCache;

fuzz_target!(|data: &[u8]| {
    let mut relations = RelationCache::default();
    let mut start = 0;
    let mut parts = Vec::new();
    for i in 0..data.len().saturating_sub(1) {
        if data[i] == 0xFF && data[i + 1] == 0xFF && i >= start {
            parts.push(&data[start..i]);
            start = i + 2;
        }
    }
    parts.push(&data[start.min(data.len())..]);
    for part in parts {
        if let Ok(message) = pgoutput::decode(Bytes::copy_from_slice(part)) {
            let _ = relations.changes(message, |change| {
                std::hint::black_box(change);
                Ok(())
            });
        }
    }
});
