//! The fan-out task: turns recorded changes into pending rows for the sinks
//! that follow them (`Store::fan_out`), then wakes the workers.
//!
//! One task per process, woken by ingest's commits; replicas' fan-outs take
//! disjoint changes. During a burst of webhooks it steps aside
//! (`Relay::yield_to_ingest`), and takes everything waiting once it passed.
//! It runs whatever the sinks' health: a sink backing off still has its rows
//! pending, so `/v1/sinks` counts what waits for it and its probe finds work. A store error is retried with a doubling pause; the
//! changes stay in the store meanwhile (nothing is lost, only later).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{follows, Relay};

/// Changes per statement: large enough that a burst of webhooks costs a few
/// statements, small enough that one statement (a row per change and sink)
/// holds its locks briefly.
const BATCH: u32 = 1_000;

pub(super) async fn run(relay: Arc<Relay>, shutdown: CancellationToken) {
    let follows = follows(&relay.sinks);
    let poll = relay.policy.poll_interval;
    let mut pause = poll;
    let mut last_pass: Option<tokio::time::Instant> = None;
    while !shutdown.is_cancelled() {
        // During a burst, one batch per `yield_max`: the workers take no more
        // meanwhile, and what waits costs a row per change here rather than a
        // row per change and sink in their queues. Otherwise no wait at all.
        if let Some(last) = last_pass {
            relay.yield_to_ingest(last, &shutdown).await;
        }
        // Registered before the pass: a commit rung while it runs is not lost.
        let woken = relay.wake.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        last_pass = Some(tokio::time::Instant::now());
        match relay.store.fan_out(&follows, BATCH).await {
            Ok(taken) => {
                pause = poll;
                if taken > 0 {
                    relay.due.notify_waiters();
                }
                if taken == u64::from(BATCH) {
                    continue; // more waiting
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fan out recorded changes; retrying");
                pause = (pause * 2).min(Duration::from_secs(30));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = woken => {},
            () = tokio::time::sleep(pause) => {},
        }
    }
}
