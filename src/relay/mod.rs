//! The relay: brings every sink to the opt-out list's current state.
//!
//! It does not replay events. The fan-out (`fan_out`) makes a (sink, phone)
//! row pending for each recorded change the sink follows; for each such row
//! a worker computes the phone's target from the list (`target`),
//! hands the sink only what differs from what it last wrote, and records the
//! outcome (`worker`). Faults end in the right state anyway:
//! - a newer change supersedes a pending one (one row per sink and phone);
//! - a write whose outcome is unknown, or made under a lease since lost, is
//!   re-read and re-written soon and again after a late request could land;
//! - a failing sink backs off as a whole, one probe per step (`backoff`);
//! - records enrolled after the STOP, and lost writes, are caught by the
//!   periodic resync (`resync`); a sink configured later is filled at start;
//! - a sink failing too long is reported by mail (`alerts`).

pub mod alerts;
pub mod backoff;
mod converging;
mod fan_out;
pub mod resync;
pub mod reviews;
pub mod target;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::sinks::{Sink, SinkKind};
use crate::store::{IngestLoad, SinkFollow, Store};
use crate::supervise::{self, Tasks};

/// What every task of the relay shares.
pub struct Relay {
    pub store: Store,
    pub sinks: Vec<Arc<Sink>>,
    pub policy: RelayConfig,
    /// Rung by ingest when a change was recorded: wakes the fan-out.
    pub wake: Arc<Notify>,
    /// Rung when rows became due (fanned out, retried by an operator, a
    /// sink that works again): wakes the workers.
    pub due: Arc<Notify>,
    /// Events committed per second by ingest (see [`Relay::yield_to_ingest`]).
    pub load: Arc<IngestLoad>,
}

/// How often a relay task stepping aside looks at ingest again.
const YIELD_POLL: Duration = Duration::from_millis(100);

/// Waits while `load` is above `above` events a second (0: never), until
/// `until` at the latest; returns how long it waited.
async fn step_aside(
    load: &IngestLoad,
    above: u32,
    until: tokio::time::Instant,
    shutdown: &CancellationToken,
) -> Duration {
    let started = tokio::time::Instant::now();
    if above == 0 {
        return Duration::ZERO;
    }
    while load.per_second() > f64::from(above) {
        let now = tokio::time::Instant::now();
        if now >= until {
            break;
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep((until - now).min(YIELD_POLL)) => {},
        }
    }
    started.elapsed()
}

/// Which sinks an event concerns, as ingest needs it.
pub fn follows(sinks: &[Arc<Sink>]) -> Vec<SinkFollow> {
    sinks
        .iter()
        .map(|s| SinkFollow {
            sink: s.name.clone(),
            scopes: s.scopes.clone(),
            // Startup backfills every sink but a notification one.
            since_registered: matches!(s.kind, SinkKind::Email { .. }),
        })
        .collect()
}

impl Relay {
    /// `wake` is what ingest rings after recording a change; `load`, what
    /// it counts.
    pub fn new(
        store: Store,
        sinks: Vec<Arc<Sink>>,
        policy: RelayConfig,
        wake: Arc<Notify>,
        load: Arc<IngestLoad>,
    ) -> Relay {
        Relay { store, sinks, policy, wake, due: Arc::new(Notify::new()), load }
    }

    /// Waits while ingest records more than `relay.yield_above` events a
    /// second, but never past `last + relay.yield_max`, `last` being when the
    /// caller last did its work. During a burst of webhooks the workers and
    /// the fan-out step aside, so ingest keeps the CPUs and the database
    /// (a webhook is answered while Twilio waits; a sink write can follow
    /// seconds later), and each still runs at least once per `yield_max`,
    /// so a sustained load delays the relay but cannot starve it.
    pub(crate) async fn yield_to_ingest(&self, last: tokio::time::Instant, shutdown: &CancellationToken) {
        let waited = step_aside(&self.load, self.policy.yield_above, last + self.policy.yield_max, shutdown).await;
        if !waited.is_zero() {
            crate::metrics::relay_yield(waited.as_secs_f64());
        }
    }

    /// Rings everything that may have work now.
    pub fn wake_all(&self) {
        self.wake.notify_waiters();
        self.due.notify_waiters();
    }

    /// Starts the fan-out (`relay-fan-out`), `policy.workers` supervised
    /// workers per sink (`relay-SINK-N`), a resync task per REDCap sink that
    /// has one (`resync-SINK`) and, with an email sink, the alert monitor
    /// (`alerts`). They stop after the work
    /// in hand once `shutdown` is cancelled (a lease they cannot settle
    /// expires and the work is taken up again).
    pub fn spawn(self: Arc<Self>, tasks: &Tasks, shutdown: CancellationToken) -> Vec<JoinHandle<()>> {
        let instance = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        let mut handles = Vec::new();
        let (relay, stop) = (self.clone(), shutdown.clone());
        handles.push(supervise::spawn("relay-fan-out".to_owned(), tasks, shutdown.clone(), move || {
            fan_out::run(relay.clone(), stop.clone())
        }));
        for sink in &self.sinks {
            for n in 0..self.policy.workers {
                let w = Arc::new(worker::Worker {
                    relay: self.clone(),
                    sink: sink.clone(),
                    owner: format!("{instance}-{}-{n}", sink.name),
                });
                let (wake, stop) = (self.due.clone(), shutdown.clone());
                let name = format!("relay-{}-{n}", sink.name);
                handles.push(supervise::spawn(name, tasks, shutdown.clone(), move || {
                    w.clone().run(wake.clone(), stop.clone())
                }));
            }
            if let SinkKind::Redcap { resync_interval, .. } = &sink.kind {
                if !resync_interval.is_zero() {
                    let (relay, sink, stop) = (self.clone(), sink.clone(), shutdown.clone());
                    let name = format!("resync-{}", sink.name);
                    handles.push(supervise::spawn(name, tasks, shutdown.clone(), move || {
                        resync::every(relay.clone(), sink.clone(), stop.clone())
                    }));
                }
            }
        }
        if self.sinks.iter().any(|s| matches!(s.kind, SinkKind::Email { .. })) {
            let (relay, stop) = (self.clone(), shutdown.clone());
            handles.push(supervise::spawn("alerts".to_owned(), tasks, shutdown.clone(), move || {
                alerts::watch(relay.clone(), stop.clone())
            }));
            let (relay, stop) = (self.clone(), shutdown.clone());
            handles.push(supervise::spawn("review-mail".to_owned(), tasks, shutdown.clone(), move || {
                reviews::report(relay.clone(), stop.clone())
            }));
        }
        handles
    }

    pub fn sink(&self, name: &str) -> Option<&Arc<Sink>> {
        self.sinks.iter().find(|s| s.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` events every 100 ms until `stop`.
    fn burst(load: Arc<IngestLoad>, n: u64, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                load.add(n);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    }

    fn at(secs: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(secs)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_or_light_load_is_not_waited_for() {
        let load = Arc::new(IngestLoad::default());
        let never = CancellationToken::new();
        assert_eq!(step_aside(&load, 200, at(5), &never).await, Duration::ZERO);
        let stop = CancellationToken::new();
        let light = burst(load.clone(), 10, stop.clone()); // 100 a second
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(step_aside(&load, 200, at(5), &never).await, Duration::ZERO);
        stop.cancel();
        light.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_sustained_burst_is_waited_for_no_longer_than_the_limit() {
        let load = Arc::new(IngestLoad::default());
        let (stop, never) = (CancellationToken::new(), CancellationToken::new());
        let heavy = burst(load.clone(), 100, stop.clone()); // 1,000 a second
        tokio::time::sleep(Duration::from_secs(1)).await;
        let waited = step_aside(&load, 200, at(5), &never).await;
        assert!(waited >= Duration::from_secs(5) && waited < Duration::from_millis(5_200), "{waited:?}");
        // Switched off: no wait, whatever the load.
        assert_eq!(step_aside(&load, 0, at(5), &never).await, Duration::ZERO);
        stop.cancel();
        heavy.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_ends_about_a_second_after_the_burst() {
        let load = Arc::new(IngestLoad::default());
        let (stop, never) = (CancellationToken::new(), CancellationToken::new());
        let heavy = burst(load.clone(), 100, stop.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.cancel();
        });
        let waited = step_aside(&load, 200, at(30), &never).await;
        assert!(waited > Duration::from_secs(2) && waited <= Duration::from_millis(3_200), "{waited:?}");
        ender.await.unwrap();
        heavy.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutting_down_ends_the_wait() {
        let load = Arc::new(IngestLoad::default());
        let stop = CancellationToken::new();
        let heavy = burst(load.clone(), 100, stop.clone());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let shutdown = CancellationToken::new();
        let canceller = {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                shutdown.cancel();
            })
        };
        let waited = step_aside(&load, 200, at(30), &shutdown).await;
        assert!(waited <= Duration::from_millis(400), "{waited:?}");
        stop.cancel();
        canceller.await.unwrap();
        heavy.await.unwrap();
    }
}
