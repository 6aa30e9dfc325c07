//! The broker-wide bound on compaction I/O (`log.cleaner.io.max.bytes.per.second`),
//! shared by every pass: each read or write of `n` bytes takes its turn on one timeline
//! that advances `n / rate` seconds, and waits until its turn starts. Bursts therefore
//! never exceed one request, and an idle timeline gives no credit for later.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct Throttle {
    /// Bytes per second; `None`: no bound.
    rate: Option<u64>,
    /// When the timeline is free again.
    free_at: Mutex<Option<Instant>>,
}

impl Throttle {
    pub(crate) fn new(rate: Option<u64>) -> Throttle {
        Throttle {
            rate: rate.filter(|r| *r > 0),
            free_at: Mutex::new(None),
        }
    }

    /// How long a take of `bytes` starting `now` waits, booking its share of time.
    fn book(&self, bytes: u64, now: Instant) -> Duration {
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let mut free_at = self.free_at.lock().expect("throttle lock poisoned");
        let start = free_at.map_or(now, |at| at.max(now));
        *free_at = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
        start - now
    }

    /// Waits for the turn of `bytes` of compaction I/O.
    pub(crate) async fn take(&self, bytes: u64) {
        let wait = self.book(bytes, crate::clock::instant());
        if !wait.is_zero() {
            crate::clock::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes queue on one timeline at the rate; an idle one gives no credit, and no
    /// rate means no waiting.
    #[test]
    fn takes_follow_the_rate() {
        let t = Throttle::new(Some(1000));
        let now = crate::clock::instant();
        assert_eq!(t.book(500, now), Duration::ZERO);
        assert_eq!(t.book(500, now), Duration::from_millis(500));
        assert_eq!(t.book(1000, now), Duration::from_millis(1000));
        let later = now + Duration::from_secs(10);
        assert_eq!(
            t.book(1000, later),
            Duration::ZERO,
            "no credit for idle time"
        );
        let free = Throttle::new(None);
        assert_eq!(free.book(u64::MAX, now), Duration::ZERO);
    }
}
