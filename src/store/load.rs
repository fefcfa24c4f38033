//! How busy ingest is: events the batch writers committed per second, over
//! about the last second.
//!
//! The relay reads it to step aside during a burst of webhooks (issue #8's
//! ingest figure): a webhook must be committed and answered while Twilio
//! waits, a sink write can follow a few seconds later, and on a small machine
//! both compete for the same CPUs and database. Two half-second buckets,
//! so the rate falls to zero within a second of the burst ending.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const BUCKET: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct IngestLoad {
    window: Mutex<Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    /// Start of the current bucket.
    start: Instant,
    current: u64,
    previous: u64,
}

impl Window {
    /// Moves the buckets on to `now`.
    fn at(mut self, now: Instant) -> Window {
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= BUCKET * 2 {
            Window { start: now, current: 0, previous: 0 }
        } else if elapsed >= BUCKET {
            self.previous = self.current;
            self.current = 0;
            self.start += BUCKET;
            self
        } else {
            self
        }
    }
}

impl Default for IngestLoad {
    fn default() -> Self {
        IngestLoad { window: Mutex::new(Window { start: Instant::now(), current: 0, previous: 0 }) }
    }
}

impl IngestLoad {
    /// Counts `n` events just committed.
    pub fn add(&self, n: u64) {
        self.update(|w| w.current += n);
    }

    /// Events per second over the previous bucket and the current one so far.
    pub fn per_second(&self) -> f64 {
        let now = Instant::now();
        let w = self.update(|_| {});
        let span = BUCKET + now.saturating_duration_since(w.start);
        (w.previous + w.current) as f64 / span.as_secs_f64()
    }

    fn update(&self, f: impl FnOnce(&mut Window)) -> Window {
        // A poisoned lock only means a panic between two integer updates:
        // the counts are still usable.
        let mut guard = self.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut w = guard.at(Instant::now());
        f(&mut w);
        *guard = w;
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_rate_covers_about_the_last_second_and_falls_to_zero_after_it() {
        let load = IngestLoad::default();
        assert_eq!(load.per_second(), 0.0);
        // 100 events every 100 ms: 1,000 per second.
        for _ in 0..20 {
            load.add(100);
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        let rate = load.per_second();
        assert!((800.0..=1_200.0).contains(&rate), "{rate}");
        tokio::time::advance(Duration::from_millis(300)).await;
        let rate = load.per_second();
        assert!(rate > 500.0 && rate < 800.0, "a quiet 300 ms dilutes the last half second: {rate}");
        tokio::time::advance(Duration::from_millis(700)).await;
        assert_eq!(load.per_second(), 0.0, "a second after the last event nothing is left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_pause_empties_both_buckets() {
        let load = IngestLoad::default();
        load.add(5_000);
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(load.per_second(), 0.0);
        load.add(10);
        assert!(load.per_second() > 0.0);
    }
}
