//! `/metrics`: Prometheus text, read at each scrape from what the readers,
//! the ledger writers and the delivery worker keep, and from the ledger's
//! indexes of what waits. No label carries PII.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use super::ApiState;
use crate::source::progress::ReaderState;

/// The process's Prometheus recorder: installed once, shared by every
/// listener of the process (tests start several).
fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ])
            // Constant, valid buckets: building cannot fail.
            .expect("histogram buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder already installed (an embedding program's):
        // its handle is not ours to render; ours then renders what the
        // scrape sets below (the gauges), which is still truthful.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Makes sure the recorder exists before anything records (call at start).
pub fn install_recorder() {
    let _ = recorder();
}

fn state_label(state: &ReaderState) -> &'static str {
    match state {
        ReaderState::Starting => "starting",
        ReaderState::Snapshotting => "snapshotting",
        ReaderState::Streaming => "streaming",
        ReaderState::Reconnecting(_) => "reconnecting",
        ReaderState::Stopped => "stopped",
        ReaderState::Failed(_) => "failed",
    }
}

const STATES: [&str; 6] = [
    "starting",
    "snapshotting",
    "streaming",
    "reconnecting",
    "stopped",
    "failed",
];

/// Sets the scrape-time figures, then renders every metric.
pub(super) async fn metrics_text(State(state): State<Arc<ApiState>>) -> Response {
    let now = Utc::now();
    // Every source asked for its head at once (each within 5 s), so a
    // scrape takes as long as the slowest, not the sum.
    let mut probes = futures_util::future::join_all(state.sources.iter().map(|source| {
        let settings = state
            .settings
            .sources
            .iter()
            .find(|s| s.name == source.name);
        // Where the reader has read to (past transactions of other
        // tables too): what is behind is what it has not read.
        let progress = source.progress.snapshot();
        let applied = progress.read_to.or(progress.applied);
        async move {
            match settings {
                Some(settings) => crate::status::probe(settings, applied.as_ref()).await,
                None => Err("not configured".to_string()),
            }
        }
    }))
    .await
    .into_iter();
    for source in &state.sources {
        let name = source.name.clone();
        let progress = source.progress.snapshot();
        let current = state_label(&progress.state);
        for label in STATES {
            metrics::gauge!("loyalty_source_state", "source" => name.clone(), "state" => label)
                .set(if label == current { 1.0 } else { 0.0 });
        }
        metrics::gauge!("loyalty_source_seconds_since_progress", "source" => name.clone())
            .set(progress.since_progress.as_secs_f64());
        metrics::counter!("loyalty_source_row_changes_total", "source" => name.clone())
            .absolute(progress.changes_applied);
        metrics::counter!("loyalty_source_transactions_total", "source" => name.clone())
            .absolute(progress.transactions_applied);
        metrics::counter!("loyalty_source_reconnects_total", "source" => name.clone())
            .absolute(progress.reconnects);
        metrics::counter!("loyalty_source_snapshot_rows_total", "source" => name.clone())
            .absolute(progress.snapshot_rows);
        metrics::gauge!("loyalty_source_snapshot_tables", "source" => name.clone(), "state" => "done")
            .set(progress.snapshot_tables_done as f64);
        metrics::gauge!("loyalty_source_snapshot_tables", "source" => name.clone(), "state" => "total")
            .set(progress.snapshot_tables as f64);
        // Bytes behind, asked of the source itself (below, all at once);
        // unknown (the source cannot be asked) is NaN, never the last value.
        let probe = probes.next().unwrap_or(Err(String::new()));
        metrics::gauge!("loyalty_source_probe_up", "source" => name.clone())
            .set(if probe.is_ok() { 1.0 } else { 0.0 });
        let lag_bytes = probe.ok().flatten();
        metrics::gauge!("loyalty_source_lag_bytes", "source" => name.clone())
            .set(lag_bytes.map_or(f64::NAN, |bytes| bytes as f64));
        if let Some(seconds) = crate::status::lag_seconds(lag_bytes, progress.last_commit_ts, now) {
            metrics::gauge!("loyalty_source_lag_seconds", "source" => name.clone()).set(seconds);
        }
        let counts = &source.counts;
        for (kind, count) in [
            ("order", &counts.orders),
            ("refund", &counts.refunds),
            ("customer", &counts.customers),
            ("redemption", &counts.redemptions),
            ("wishlist", &counts.wishlist_changes),
            ("price", &counts.prices),
        ] {
            metrics::counter!("loyalty_ledger_events_total", "source" => name.clone(), "kind" => kind)
                .absolute(count.load(Ordering::Relaxed));
        }
        metrics::counter!("loyalty_ledger_anonymous_orders_total", "source" => name.clone())
            .absolute(counts.anonymous.load(Ordering::Relaxed));
        metrics::counter!("loyalty_ledger_quarantined_total", "source" => name.clone())
            .absolute(counts.quarantined.load(Ordering::Relaxed));
        metrics::counter!("loyalty_ledger_commits_total", "source" => name.clone())
            .absolute(counts.commits.load(Ordering::Relaxed));
    }
    match state
        .with_db(async |db| crate::status::backlog(db, now).await)
        .await
    {
        Ok(backlog) => {
            metrics::gauge!("loyalty_outbox_pending").set(backlog.outbox_pending as f64);
            metrics::gauge!("loyalty_outbox_oldest_pending_seconds")
                .set(backlog.outbox_oldest_pending_seconds.unwrap_or(0.0));
            metrics::gauge!("loyalty_dead_letters_open").set(backlog.dead_letters as f64);
            metrics::gauge!("loyalty_quarantine_open").set(backlog.quarantined as f64);
            metrics::gauge!("loyalty_ledger_up").set(1.0);
        }
        Err(error) => {
            tracing::warn!(error = %error, "metrics: the ledger could not be read");
            metrics::gauge!("loyalty_ledger_up").set(0.0);
        }
    }
    if let Some(bytes) = resident_bytes() {
        metrics::gauge!("process_resident_memory_bytes").set(bytes as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        recorder().render(),
    )
        .into_response()
}

/// Resident memory of this process (Linux `/proc/self/statm`).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Pages of 4 KiB: the size on every Linux this runs on (x86-64,
    // aarch64 with 4 KiB pages); no libc call needed for it.
    Some(pages * 4096)
}
