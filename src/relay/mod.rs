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

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::sinks::{Sink, SinkKind};
use crate::store::{SinkFollow, Store};
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
    /// `wake` is what ingest rings after recording a change.
    pub fn new(store: Store, sinks: Vec<Arc<Sink>>, policy: RelayConfig, wake: Arc<Notify>) -> Relay {
        Relay { store, sinks, policy, wake, due: Arc::new(Notify::new()) }
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
