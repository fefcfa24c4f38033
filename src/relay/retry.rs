//! The retry schedule: pure functions of the policy, the attempt count and
//! the error, so they can be tested with tables.
//!
//! Transient failures back off exponentially (`retry_base · 2^(n-1)`, capped
//! at `retry_cap`) with ±20 % jitter so replicas do not retry in lockstep; a
//! `Retry-After` only ever lengthens the delay. Misconfiguration (bad token,
//! unknown field) retries on a slow fixed beat: hammering will not fix it.
//! After `max_attempts`, or once the delivery is older than `max_age`, it is
//! dead-lettered: kept, visible, and re-queueable by an operator.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::RelayConfig;
use crate::sinks::SinkError;
use crate::store::Settle;

/// The delay before the next attempt, before jitter.
pub fn base_delay(policy: &RelayConfig, attempts: i32, error: &SinkError) -> Duration {
    match error {
        SinkError::Misconfigured(_) => policy.misconfigured_retry,
        SinkError::Uncertain(_) => policy.retry_base,
        SinkError::Transient { retry_after, .. } => {
            let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0).min(30);
            let backoff = policy.retry_base.saturating_mul(1u32 << exp).min(policy.retry_cap);
            match retry_after {
                Some(ra) => backoff.max((*ra).min(policy.retry_cap)),
                None => backoff,
            }
        }
    }
}

/// Applies ±20 % jitter; `unit` is a uniform sample in [0, 1).
pub fn jitter(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

/// What to do with a delivery whose attempt number `attempts` just failed.
/// `queued_at` is when it last entered the queue: `max_age` counts from there.
pub fn after_failure(
    policy: &RelayConfig,
    attempts: i32,
    queued_at: DateTime<Utc>,
    now: DateTime<Utc>,
    error: &SinkError,
    unit: f64,
) -> Settle {
    let message = error.to_string();
    let age = (now - queued_at).to_std().unwrap_or_default();
    if u32::try_from(attempts).unwrap_or(0) >= policy.max_attempts {
        return Settle::Dead(format!("gave up after {attempts} attempts: {message}"));
    }
    // By age only after a second try: a delivery that waited long before its
    // first attempt (an email waiting on REDCap) still gets a real retry.
    if age >= policy.max_age && attempts > 1 {
        return Settle::Dead(format!("gave up after {}: {message}", humantime::format_duration(policy.max_age)));
    }
    let delay = jitter(base_delay(policy, attempts, error), unit);
    let at = now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::minutes(30));
    Settle::Retry { at, error: message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RelayConfig {
        RelayConfig {
            retry_base: Duration::from_secs(5),
            retry_cap: Duration::from_secs(600),
            misconfigured_retry: Duration::from_secs(900),
            max_attempts: 10,
            max_age: Duration::from_secs(3600),
            ..RelayConfig::default()
        }
    }

    fn transient(ra: Option<u64>) -> SinkError {
        SinkError::Transient { message: "boom".into(), retry_after: ra.map(Duration::from_secs) }
    }

    #[test]
    fn transient_failures_back_off_exponentially_up_to_the_cap() {
        let p = policy();
        let secs = |n| base_delay(&p, n, &transient(None)).as_secs();
        assert_eq!([secs(1), secs(2), secs(3), secs(4), secs(8), secs(9), secs(1000)], [5, 10, 20, 40, 600, 600, 600]);
    }

    #[test]
    fn retry_after_only_lengthens_and_is_capped() {
        let p = policy();
        assert_eq!(base_delay(&p, 1, &transient(Some(60))).as_secs(), 60);
        assert_eq!(base_delay(&p, 4, &transient(Some(1))).as_secs(), 40);
        assert_eq!(base_delay(&p, 1, &transient(Some(86_400))).as_secs(), 600);
    }

    #[test]
    fn misconfiguration_retries_slowly() {
        assert_eq!(base_delay(&policy(), 1, &SinkError::Misconfigured("403".into())).as_secs(), 900);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let d = Duration::from_secs(100);
        assert_eq!(jitter(d, 0.0).as_secs(), 80);
        assert_eq!(jitter(d, 0.5).as_secs(), 100);
        assert!(jitter(d, 0.999_999).as_secs_f64() < 120.0 + 1e-6);
    }

    #[test]
    fn dead_letters_after_max_attempts_or_max_age() {
        let p = policy();
        let now = Utc::now();
        assert!(matches!(after_failure(&p, 9, now, now, &transient(None), 0.5), Settle::Retry { .. }));
        assert!(matches!(after_failure(&p, 10, now, now, &transient(None), 0.5), Settle::Dead(_)));
        let old = now - chrono::Duration::hours(2);
        assert!(matches!(after_failure(&p, 2, old, now, &transient(None), 0.5), Settle::Dead(_)));
        assert!(
            matches!(after_failure(&p, 1, old, now, &transient(None), 0.5), Settle::Retry { .. }),
            "first failure always retried"
        );
        match after_failure(&p, 2, now, now, &transient(None), 0.5) {
            Settle::Retry { at, error } => {
                assert_eq!((at - now).num_seconds(), 10);
                assert_eq!(error, "boom");
            }
            other => panic!("{other:?}"),
        }
    }
}
