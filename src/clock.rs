//! The one seam through which the broker reads time, waits and draws random ids, so
//! tests (tokio's paused clock) and the simulation control them. Nothing else calls
//! `SystemTime::now`, `Instant::now`, `tokio::time::sleep`, `tokio::time::interval` or
//! `Uuid::new_v4`: clippy's `disallowed-methods` (clippy.toml) refuses them outside
//! this module.
//!
//! Monotonic time comes from tokio's clock (which a paused test runtime advances by
//! itself) as a `std::time::Instant`, so the engine's state machines take plain
//! instants and never touch a runtime.

#![allow(clippy::disallowed_methods)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The monotonic now.
pub(crate) fn instant() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Waits for `d`.
pub(crate) async fn sleep(d: Duration) {
    tokio::time::sleep(d).await
}

/// Waits until `at`; forever when `None`.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// A ticker every `period` whose missed ticks are delayed, not bunched.
pub(crate) fn interval(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// A fresh random id (topic ids, group member ids).
pub(crate) fn unique_id() -> uuid::Uuid {
    uuid::Uuid::new_v4()
}
