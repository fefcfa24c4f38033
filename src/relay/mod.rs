//! The delivery engine: workers that claim due deliveries under a lease and
//! apply them to a sink, with no transaction open during the sink call.
//!
//! Order per (sink, phone) is kept by the claim itself: only a phone's oldest
//! pending delivery can be claimed, so a START waits for the STOP before it.
//! A delivery whose phone already has a newer *done* delivery (a STOP
//! replayed from the dead letters after a START landed) is settled as
//! superseded without touching the sink.

pub mod retry;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::RelayConfig;
use crate::metrics;
use crate::sinks::{DeliveryItem, Sink, SinkError};
use crate::store::{ClaimedDelivery, Settle, Store};
use crate::supervise::{self, Tasks};

/// Starts `policy.workers` supervised workers per sink (`relay-SINK-N` in
/// `tasks`; one that panics is restarted, see `crate::supervise`). They stop
/// after the batch in hand once `shutdown` is cancelled (a lease they cannot
/// settle expires and the work is retried elsewhere).
pub fn spawn(
    store: Store,
    sinks: Vec<Arc<Sink>>,
    policy: RelayConfig,
    wake: Arc<Notify>,
    tasks: &Tasks,
    shutdown: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let instance = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
    let mut handles = Vec::new();
    for sink in sinks {
        for n in 0..policy.workers {
            let worker = Arc::new(Worker {
                store: store.clone(),
                sink: sink.clone(),
                policy: policy.clone(),
                owner: format!("{instance}-{}-{n}", sink.name()),
            });
            let (wake, stop) = (wake.clone(), shutdown.clone());
            let name = format!("relay-{}-{n}", sink.name());
            handles.push(supervise::spawn(name, tasks, shutdown.clone(), move || {
                worker.clone().run(wake.clone(), stop.clone())
            }));
        }
    }
    handles
}

struct Worker {
    store: Store,
    sink: Arc<Sink>,
    policy: RelayConfig,
    owner: String,
}

impl Worker {
    async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        tracing::debug!(owner = %self.owner, "relay worker started");
        let mut store_backoff = self.policy.poll_interval;
        while !shutdown.is_cancelled() {
            let idle = match self
                .store
                .claim(
                    self.sink.name(),
                    &self.owner,
                    self.sink.batch_size(self.policy.batch_size),
                    self.policy.lease,
                    self.sink.reports_on_others(),
                )
                .await
            {
                Ok(batch) if batch.is_empty() => self.policy.poll_interval,
                Ok(batch) => {
                    store_backoff = self.policy.poll_interval;
                    self.deliver(batch).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, sink = self.sink.name(), "cannot claim deliveries");
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(30));
                    store_backoff
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified() => {},
                () = tokio::time::sleep(idle) => {},
            }
        }
        tracing::debug!(owner = %self.owner, "relay worker stopped");
    }

    async fn deliver(&self, batch: Vec<ClaimedDelivery>) {
        // Superseding protects state (a field stamped then cleared); a report
        // of what happened is still worth sending, so report sinks ignore it.
        let reports = self.sink.reports_on_others();
        let (superseded, due): (Vec<_>, Vec<_>) = batch.into_iter().partition(|d| d.superseded && !reports);
        let sink = self.sink.name();
        metrics::attempts(sink, (superseded.len() + due.len()) as u64);
        metrics::delivery(sink, "superseded", superseded.len() as u64);
        let mut settles: Vec<(i64, Settle)> = superseded
            .iter()
            .map(|d| {
                (
                    d.id,
                    Settle::Done(
                        json!({ "superseded": true, "note": "a newer change for this phone was already delivered" }),
                    ),
                )
            })
            .collect();

        if !due.is_empty() {
            let items: Vec<DeliveryItem> = due
                .iter()
                .map(|d| DeliveryItem {
                    id: d.id,
                    event_id: d.event_id,
                    phone: d.phone.clone(),
                    kind: d.kind,
                    received_at: d.received_at,
                })
                .collect();
            let started = std::time::Instant::now();
            let outcomes = self.sink.apply(&items).await;
            let ms = started.elapsed().as_millis() as u64;
            let now = Utc::now();
            let mut done = 0u64;
            let mut logged_error = false;
            for (d, outcome) in due.iter().zip(outcomes) {
                let how = match outcome {
                    Ok(result) => {
                        done += 1;
                        Settle::Done(result)
                    }
                    Err(error) => {
                        // One line per failing batch, not per delivery.
                        if !logged_error {
                            logged_error = true;
                            log_failure(sink, items.len(), &error);
                        }
                        let how = retry::after_failure(
                            &self.policy,
                            d.attempts,
                            d.queued_at,
                            now,
                            &error,
                            rand::random::<f64>(),
                        );
                        metrics::delivery(sink, if matches!(how, Settle::Dead(_)) { "dead" } else { "retry" }, 1);
                        if let Settle::Dead(reason) = &how {
                            tracing::error!(delivery = d.id, sink, %reason, "delivery dead-lettered; replay with `optout-relay replay --dead`");
                        }
                        how
                    }
                };
                settles.push((d.id, how));
            }
            if done > 0 {
                metrics::delivery(sink, "done", done);
                tracing::info!(sink, deliveries = done, ms, "delivered");
            }
        }

        // One transaction for the whole batch: a commit per delivery would
        // cost a disk flush each and hold SQLite's write lock in turns.
        match self.store.settle_many(&self.owner, &settles).await {
            Ok(held) if held < settles.len() as u64 => tracing::warn!(
                lost = settles.len() as u64 - held,
                "lease lost before settling; another worker owns those deliveries now"
            ),
            Ok(_) => {}
            // The leases will expire and the deliveries be retried: nothing is lost.
            Err(e) => {
                tracing::error!(error = %e, deliveries = settles.len(), "cannot record the outcomes; they will be retried")
            }
        }
    }
}

fn log_failure(sink: &str, deliveries: usize, error: &SinkError) {
    match error {
        SinkError::Misconfigured(_) => tracing::error!(
            sink,
            deliveries,
            %error,
            "sink refuses our requests: fix the configuration; deliveries are kept and retried slowly"
        ),
        SinkError::Transient { .. } | SinkError::Uncertain(_) => {
            tracing::warn!(sink, deliveries, %error, "delivery failed; will retry")
        }
    }
}
