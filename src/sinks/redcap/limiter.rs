//! The spacing limiter every REDCap call waits at, retries and
//! `check-config` included.
//!
//! Past its per-IP limit REDCap bans the IP for good (an administrator has to
//! lift the ban). We cannot see where REDCap's minute starts, so calls are
//! spaced evenly rather than counted per window: evenly spaced, any 60
//! seconds, wherever they fall, hold at most the budget.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// Spaces calls at least `60 s / per_minute` apart, so no 60-second window
/// holds more than `per_minute` of them. Shared by every clone of the sink,
/// but per process: replicas behind one IP must split REDCap's limit.
#[derive(Clone)]
pub(crate) struct Limiter {
    interval: Duration,
    next: Arc<tokio::sync::Mutex<Instant>>,
}

impl Limiter {
    pub(crate) fn per_minute(per_minute: u32) -> Limiter {
        Limiter {
            interval: Duration::from_secs(60) / per_minute.max(1),
            next: Arc::new(tokio::sync::Mutex::new(Instant::now())),
        }
    }

    /// The spacing between two calls: the longest a lone caller waits.
    pub(crate) fn interval(&self) -> Duration {
        self.interval
    }

    /// Reserves the next slot, then sleeps until it (the lock is not held while sleeping).
    pub(crate) async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the clock moves only when every task sleeps, and then
    // straight to the next deadline, so the spacing is exact, not a range.

    #[tokio::test(start_paused = true)]
    async fn limiter_spaces_calls_and_clones_share_it() {
        let limiter = Limiter::per_minute(600);
        let start = Instant::now();
        let mut started = Vec::new();
        for _ in 0..3 {
            limiter.wait().await;
            started.push(start.elapsed());
        }
        assert_eq!(started, [Duration::ZERO, Duration::from_millis(100), Duration::from_millis(200)]);
        // A clone takes the next slot of the same schedule, not a fresh one.
        limiter.clone().wait().await;
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_get_distinct_slots() {
        let limiter = Limiter::per_minute(60);
        let start = Instant::now();
        let tasks: Vec<_> = (0..3)
            .map(|_| {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    limiter.wait().await;
                    start.elapsed()
                })
            })
            .collect();
        let mut started = Vec::new();
        for task in tasks {
            started.push(task.await.unwrap());
        }
        started.sort();
        assert_eq!(started, [Duration::ZERO, Duration::from_secs(1), Duration::from_secs(2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_earns_no_burst() {
        let limiter = Limiter::per_minute(600);
        limiter.wait().await;
        tokio::time::advance(Duration::from_secs(5)).await;
        // After the pause the first call goes at once, the next one still waits a full interval.
        let start = Instant::now();
        limiter.wait().await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        limiter.wait().await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }
}
