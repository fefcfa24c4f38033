//! Backoff per sink, not per row: pure functions of the policy, the step and
//! the error, tested with tables.
//!
//! A failing sink is probed with one row at each step (`retry_base ·
//! 2^(step-1)`, capped low at `retry_cap` so the first probe after an outage
//! ends comes within seconds), ±20 % jitter so replicas do not probe in
//! lockstep; a `Retry-After` only lengthens a step. Misconfiguration (bad
//! token, unknown field) waits `misconfigured_retry`: hammering will not fix
//! it, but a restart or an operator's retry makes the sink due at once.

use std::time::Duration;

use crate::config::RelayConfig;
use crate::sinks::SinkError;
use crate::store::Failing;

/// The longest `Retry-After` honoured: a server asking for more is probed anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How a failure is recorded on the sink.
pub fn failing(error: &SinkError) -> Failing {
    match error {
        SinkError::Misconfigured(_) => Failing::Misconfigured,
        // OutOfTime never marks a sink (the worker puts its rows back); the
        // arm only keeps the match total.
        SinkError::Transient { .. } | SinkError::Uncertain(_) | SinkError::OutOfTime => Failing::BackingOff,
    }
}

/// The delay before the next probe after a failure at `step` (1 = first).
/// `unit` is a uniform sample in [0, 1).
pub fn probe_delay(policy: &RelayConfig, step: i32, error: &SinkError, unit: f64) -> Duration {
    match error {
        SinkError::Misconfigured(_) => policy.misconfigured_retry,
        SinkError::Transient { retry_after, .. } => {
            stepped(policy, step, unit).max(retry_after.unwrap_or_default().min(MAX_RETRY_AFTER))
        }
        SinkError::Uncertain(_) | SinkError::OutOfTime => stepped(policy, step, unit),
    }
}

fn stepped(policy: &RelayConfig, step: i32, unit: f64) -> Duration {
    let exp = u32::try_from(step.saturating_sub(1)).unwrap_or(0).min(30);
    let delay = policy.retry_base.saturating_mul(1u32 << exp).min(policy.retry_cap);
    jitter(delay, unit)
}

/// Applies ±20 % jitter; `unit` is a uniform sample in [0, 1).
pub fn jitter(delay: Duration, unit: f64) -> Duration {
    delay.mul_f64(0.8 + 0.4 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RelayConfig {
        RelayConfig {
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(15),
            misconfigured_retry: Duration::from_secs(900),
            ..RelayConfig::default()
        }
    }

    fn transient(ra: Option<u64>) -> SinkError {
        SinkError::Transient { message: "boom".into(), retry_after: ra.map(Duration::from_secs) }
    }

    #[test]
    fn steps_double_up_to_a_low_cap() {
        let p = policy();
        let secs = |n| probe_delay(&p, n, &transient(None), 0.5).as_secs();
        assert_eq!([secs(1), secs(2), secs(3), secs(4), secs(5), secs(6), secs(1000)], [1, 2, 4, 8, 15, 15, 15]);
    }

    #[test]
    fn a_ninety_second_outage_costs_few_probes() {
        // Worst case for the call count: every step jittered short.
        let p = policy();
        let (mut t, mut probes, mut step) = (Duration::ZERO, 0, 1);
        while t < Duration::from_secs(90) {
            t += probe_delay(&p, step, &transient(None), 0.0);
            probes += 1;
            step += 1;
        }
        assert!(probes <= 15, "{probes} probes in 90 s");
        // And the longest wait for the first probe after it ends: the cap, jittered long.
        assert!(probe_delay(&p, 50, &transient(None), 0.999).as_secs_f64() < 18.0);
    }

    #[test]
    fn retry_after_only_lengthens_and_is_bounded() {
        let p = policy();
        assert_eq!(probe_delay(&p, 1, &transient(Some(60)), 0.5).as_secs(), 60);
        assert_eq!(probe_delay(&p, 4, &transient(Some(1)), 0.5).as_secs(), 8);
        assert_eq!(probe_delay(&p, 1, &transient(Some(86_400)), 0.5), MAX_RETRY_AFTER);
    }

    #[test]
    fn misconfiguration_waits_long_and_is_recorded_as_such() {
        let e = SinkError::Misconfigured("403".into());
        assert_eq!(probe_delay(&policy(), 1, &e, 0.5).as_secs(), 900);
        assert_eq!(failing(&e), Failing::Misconfigured);
        assert_eq!(failing(&SinkError::Uncertain("timeout".into())), Failing::BackingOff);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let d = Duration::from_secs(100);
        assert_eq!(jitter(d, 0.0).as_secs(), 80);
        assert_eq!(jitter(d, 0.5).as_secs(), 100);
        assert!(jitter(d, 0.999_999).as_secs_f64() < 120.0 + 1e-6);
    }
}
