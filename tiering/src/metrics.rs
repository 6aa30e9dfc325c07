//! Object-store request metrics: the cost meter. Every request the broker makes goes
//! through [`crate::store::Store`], which records each attempt's operation, outcome,
//! bytes and latency here, plus retries and requests in flight against their limits;
//! `register` adds them to the broker's registry.

use std::sync::OnceLock;
use std::time::Instant;

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

use crate::store::Class;

pub(crate) struct StoreMetrics {
    requests: IntCounterVec,
    bytes: IntCounterVec,
    seconds: HistogramVec,
    retries: IntCounterVec,
    recognised: IntCounter,
    inflight: IntGaugeVec,
    limit: IntGaugeVec,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    Ok,
    /// The object does not exist (an answer, not a failure of the store).
    NotFound,
    /// A conditional write lost (the key exists, or the version moved).
    Conflict,
    /// The store failed: transport error, 5xx, throttling.
    Error,
    /// The attempt ran past the request timeout and was abandoned.
    Timeout,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Conflict => "conflict",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
        }
    }
}

pub(crate) fn store_metrics() -> &'static StoreMetrics {
    static M: OnceLock<StoreMetrics> = OnceLock::new();
    M.get_or_init(|| StoreMetrics {
        requests: IntCounterVec::new(
            Opts::new(
                "strata_object_store_requests_total",
                "object-store request attempts by operation and outcome (ok, not_found, conflict, error, timeout)",
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
                "object-store request latency, per attempt",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["op"],
        )
        .expect("valid metric"),
        retries: IntCounterVec::new(
            Opts::new(
                "strata_object_store_retries_total",
                "object-store requests retried after a retriable failure or timeout",
            ),
            &["op"],
        )
        .expect("valid metric"),
        recognised: IntCounter::new(
            "strata_object_store_writes_recognised_total",
            "create-only writes that found their own bytes already at the key (an earlier attempt had landed), recognised by reading the object back",
        )
        .expect("valid metric"),
        inflight: IntGaugeVec::new(
            Opts::new(
                "strata_object_store_inflight_requests",
                "object-store requests in flight by class (write, read, replay, compact)",
            ),
            &["class"],
        )
        .expect("valid metric"),
        limit: IntGaugeVec::new(
            Opts::new(
                "strata_object_store_concurrency_limit",
                "object-store requests allowed in flight by class",
            ),
            &["class"],
        )
        .expect("valid metric"),
    })
}

/// Every operation label the store records.
const OPS: [&str; 5] = ["put", "get", "head", "delete", "list"];

/// Adds the object-store metrics to a registry (once per process).
pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
    let m = store_metrics();
    // Series of every operation exist from the start (at zero), so dashboards and
    // alerts have data on a fresh broker.
    for op in OPS {
        m.retries.with_label_values(&[op]);
        m.bytes.with_label_values(&[op]);
    }
    registry.register(Box::new(m.requests.clone()))?;
    registry.register(Box::new(m.bytes.clone()))?;
    registry.register(Box::new(m.seconds.clone()))?;
    registry.register(Box::new(m.retries.clone()))?;
    registry.register(Box::new(m.recognised.clone()))?;
    registry.register(Box::new(m.inflight.clone()))?;
    registry.register(Box::new(m.limit.clone()))?;
    Ok(())
}

/// Records one attempt: `op` is put, get, delete or list.
pub(crate) fn record(op: &str, started: Instant, outcome: Outcome, bytes: u64) {
    let m = store_metrics();
    m.requests.with_label_values(&[op, outcome.label()]).inc();
    if bytes > 0 {
        m.bytes.with_label_values(&[op]).inc_by(bytes);
    }
    m.seconds
        .with_label_values(&[op])
        .observe(started.elapsed().as_secs_f64());
}

pub(crate) fn retried(op: &str) {
    store_metrics().retries.with_label_values(&[op]).inc();
}

pub(crate) fn recognised() {
    store_metrics().recognised.inc();
}

pub(crate) fn set_limit(class: Class, limit: usize) {
    store_metrics()
        .limit
        .with_label_values(&[class.label()])
        .set(limit as i64);
}

/// Counts one request in flight for as long as it lives.
pub(crate) struct InFlight(Class);

impl InFlight {
    pub(crate) fn new(class: Class) -> Self {
        store_metrics()
            .inflight
            .with_label_values(&[class.label()])
            .inc();
        InFlight(class)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        store_metrics()
            .inflight
            .with_label_values(&[self.0.label()])
            .dec();
    }
}
