//! Object-store request metrics: the cost meter. Every request the broker makes goes
//! through `store`, which records its operation, outcome, bytes and latency here;
//! `register` adds them to the broker's registry.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

pub(crate) struct StoreMetrics {
    requests: IntCounterVec,
    bytes: IntCounterVec,
    seconds: HistogramVec,
}

pub(crate) fn store_metrics() -> &'static StoreMetrics {
    static M: OnceLock<StoreMetrics> = OnceLock::new();
    M.get_or_init(|| StoreMetrics {
        requests: IntCounterVec::new(
            Opts::new(
                "strata_object_store_requests_total",
                "object-store requests by operation and outcome",
            ),
            &["op", "outcome"],
        )
        .expect("valid metric"),
        bytes: IntCounterVec::new(
            Opts::new(
                "strata_object_store_bytes_total",
                "bytes written (put) and read (get) from the object store",
            ),
            &["op"],
        )
        .expect("valid metric"),
        seconds: HistogramVec::new(
            HistogramOpts::new(
                "strata_object_store_request_duration_seconds",
                "object-store request latency",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["op"],
        )
        .expect("valid metric"),
    })
}

/// Adds the object-store metrics to a registry (once per process).
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let m = store_metrics();
    registry.register(Box::new(m.requests.clone()))?;
    registry.register(Box::new(m.bytes.clone()))?;
    registry.register(Box::new(m.seconds.clone()))?;
    Ok(())
}

/// Records one request: `op` is put, get or delete.
pub(crate) fn record(op: &str, started: Instant, ok: bool, bytes: u64) {
    let m = store_metrics();
    m.requests
        .with_label_values(&[op, if ok { "ok" } else { "error" }])
        .inc();
    if bytes > 0 {
        m.bytes.with_label_values(&[op]).inc_by(bytes);
    }
    m.seconds
        .with_label_values(&[op])
        .observe(started.elapsed().as_secs_f64());
}
