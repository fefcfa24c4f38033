//! Supervision of the long-running background tasks (batch writers, relay
//! workers, the migration loop).
//!
//! Without it, a panic inside one of those loops ends its tokio task quietly:
//! a dead batch writer turns every webhook into a 503 and a dead relay worker
//! stops a sink, while `/readyz` stays green. [`spawn`] runs a task's loop,
//! catches a panic, logs it with the task's name, counts it
//! (`optout_task_panics_total{task}`), waits a growing backoff and starts the
//! loop again from its factory. Whatever the loop shares with the rest of the
//! service (the batch writers' channel, the relay's wake-up) lives in the
//! factory's captures, so it survives the panic.
//!
//! A loop that *returns* is finished and is not restarted: that is how a loop
//! says it is done (the migrations are applied, every sender of the writers'
//! channel is gone). Once `shutdown` is cancelled nothing is restarted.
//!
//! Readiness ([`Tasks::failing`]): a task is *failing* when it has panicked
//! [`FAILING_AFTER`] times in a row, "in a row" meaning no run between those
//! panics lasted [`STABLE_AFTER`]. It is healthy again once a restarted run
//! has lasted `STABLE_AFTER` without panicking. A count of panics per minute
//! would not do: with the backoff capped at 30 s, a loop that panics at every
//! start would fall under any per-minute threshold and look healthy.

use std::any::Any;
use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Panics in a row after which a task makes `/readyz` fail.
pub const FAILING_AFTER: u32 = 3;
/// A run this long without a panic resets the backoff and the failing state.
pub const STABLE_AFTER: Duration = Duration::from_secs(60);
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The delay before restarting a task after its `panics_in_a_row`-th panic in
/// a row (1 for the first): 100 ms, doubling, capped at 30 s.
pub fn backoff(panics_in_a_row: u32) -> Duration {
    let doublings = panics_in_a_row.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

/// The state of every supervised task of one application, for `/readyz`.
/// Cheap to clone; clones share the state.
#[derive(Clone, Default)]
pub struct Tasks(Arc<Mutex<BTreeMap<String, TaskState>>>);

#[derive(Debug, Default)]
struct TaskState {
    panics_in_a_row: u32,
    /// When the current run started; `None` while in backoff or finished.
    running_since: Option<Instant>,
}

impl TaskState {
    fn failing(&self, now: Instant) -> bool {
        let recovered = self.running_since.is_some_and(|since| now.duration_since(since) >= STABLE_AFTER);
        self.panics_in_a_row >= FAILING_AFTER && !recovered
    }
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Names of the tasks that keep panicking, sorted.
    pub fn failing(&self) -> Vec<String> {
        let now = Instant::now();
        self.with(|tasks| tasks.iter().filter(|(_, s)| s.failing(now)).map(|(name, _)| name.clone()).collect())
    }

    // A panic elsewhere while this short, non-panicking section held the lock
    // cannot leave the map half-updated, so a poisoned lock is still usable.
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, TaskState>) -> T) -> T {
        let mut tasks = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut tasks)
    }

    fn started(&self, name: &str, at: Instant) {
        self.with(|tasks| tasks.entry(name.to_owned()).or_default().running_since = Some(at));
    }

    /// Records a panic of a run that started at `started`; returns the panics in a row.
    fn panicked(&self, name: &str, started: Instant, now: Instant) -> u32 {
        self.with(|tasks| {
            let state = tasks.entry(name.to_owned()).or_default();
            if now.duration_since(started) >= STABLE_AFTER {
                state.panics_in_a_row = 0;
            }
            state.panics_in_a_row = state.panics_in_a_row.saturating_add(1);
            state.running_since = None;
            state.panics_in_a_row
        })
    }

    fn finished(&self, name: &str) {
        self.with(|tasks| tasks.remove(name));
    }
}

/// Spawns `task()` under supervision as `name`, registered in `tasks`: a
/// panic is logged, counted and followed by a restart after [`backoff`];
/// a normal return ends the supervision, and so does `shutdown` (no restart
/// after it; a run in progress is not interrupted, the loop itself watches
/// the token or its channel).
pub fn spawn<F, Fut>(name: String, tasks: &Tasks, shutdown: CancellationToken, task: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    crate::metrics::task_started(&name);
    tokio::spawn(supervise(name, tasks.clone(), shutdown, task))
}

async fn supervise<F, Fut>(name: String, tasks: Tasks, shutdown: CancellationToken, task: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    loop {
        let started = Instant::now();
        tasks.started(&name, started);
        // The loops hold no state that a panic could leave broken for the
        // next run: each run starts from the factory's captures (a store
        // handle, a channel receiver behind a mutex that does not poison).
        let Err(payload) = AssertUnwindSafe(task()).catch_unwind().await else {
            tracing::debug!(task = %name, "task finished");
            tasks.finished(&name);
            return;
        };
        let in_a_row = tasks.panicked(&name, started, Instant::now());
        crate::metrics::task_panic(&name);
        let delay = backoff(in_a_row);
        match panic_message(payload.as_ref()) {
            Some(message) => {
                tracing::error!(task = %name, panic = message, in_a_row, ?delay, "task panicked; restarting")
            }
            None => tracing::error!(task = %name, in_a_row, ?delay, "task panicked; restarting"),
        }
        tokio::select! {
            () = shutdown.cancelled() => {
                tracing::info!(task = %name, "not restarting the task: shutting down");
                tasks.finished(&name);
                return;
            }
            () = tokio::time::sleep(delay) => {}
        }
        if shutdown.is_cancelled() {
            tasks.finished(&name);
            return;
        }
    }
}

/// The text of a panic raised with `panic!("…")` (a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> Option<&str> {
    payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn backoff_grows_from_100_ms_and_stops_at_30_s() {
        let cases = [
            (0, 100),
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (9, 25_600),
            (10, 30_000),
            (11, 30_000),
            (40, 30_000),
            (u32::MAX, 30_000),
        ];
        for (n, ms) in cases {
            assert_eq!(backoff(n), Duration::from_millis(ms), "after panic {n} in a row");
        }
    }

    #[test]
    fn the_panic_message_is_read_from_str_and_string_payloads() {
        let from_str: Box<dyn Any + Send> = Box::new("boom");
        let from_string: Box<dyn Any + Send> = Box::new(format!("boom {}", 2));
        let other: Box<dyn Any + Send> = Box::new(42_u8);
        assert_eq!(panic_message(from_str.as_ref()), Some("boom"));
        assert_eq!(panic_message(from_string.as_ref()), Some("boom 2"));
        assert_eq!(panic_message(other.as_ref()), None);
    }

    /// A task that panics on its first `panics` runs, then runs until cancelled.
    fn flaky(
        runs: Arc<AtomicU32>,
        panics: u32,
        stop: CancellationToken,
    ) -> impl Fn() -> futures_util::future::BoxFuture<'static, ()> {
        move || {
            let (runs, stop) = (runs.clone(), stop.clone());
            Box::pin(async move {
                let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::task::yield_now().await;
                if run <= panics {
                    panic!("run {run} fails");
                }
                stop.cancelled().await;
            })
        }
    }

    fn panics_counted(task: &str) -> u64 {
        let handle = crate::metrics::handle().expect("recorder installed");
        let needle = format!("optout_task_panics_total{{task=\"{task}\"}} ");
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&needle).map(|v| v.trim().parse::<u64>().expect("a count")))
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_after_a_growing_backoff_and_counted() {
        let (tasks, shutdown, runs) = (Tasks::new(), CancellationToken::new(), Arc::new(AtomicU32::new(0)));
        let name = "unit-restarts";
        // Installed before the panics, or they go to the no-op recorder.
        crate::metrics::handle().expect("recorder installed");
        let start = Instant::now();
        let handle = spawn(name.into(), &tasks, shutdown.clone(), flaky(runs.clone(), 2, shutdown.clone()));

        // The first run panics at once; the restart waits 100 ms.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "no restart before the first backoff is over");
        // Second run at 100 ms panics; the third waits 200 ms more (300 ms) and then holds.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "the second backoff is longer than the first");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3, "restarted after 100 ms + 200 ms");
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert_eq!(panics_counted(name), 2, "each panic is counted under the task's name");
        assert!(tasks.failing().is_empty(), "two panics in a row are not yet failing");
        assert!(!handle.is_finished(), "the third run goes on");

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), handle)
            .await
            .expect("stops on shutdown")
            .expect("no panic escapes");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_keeps_panicking_is_failing_until_a_run_lasts() {
        let (tasks, shutdown, runs) = (Tasks::new(), CancellationToken::new(), Arc::new(AtomicU32::new(0)));
        let handle = spawn("unit-failing".into(), &tasks, shutdown.clone(), flaky(runs.clone(), 3, shutdown.clone()));
        let healthy =
            spawn("unit-healthy".into(), &tasks, shutdown.clone(), flaky(Arc::default(), 0, shutdown.clone()));

        // Panics at 0, 100 ms and 300 ms: three in a row, in backoff until 700 ms.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(tasks.failing(), vec!["unit-failing".to_owned()], "only the panicking task is named");
        // Restarted at 700 ms and running fine, but not for long enough yet.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4);
        assert_eq!(tasks.failing(), vec!["unit-failing".to_owned()], "a fresh run is not yet proof of health");
        tokio::time::sleep(STABLE_AFTER).await;
        assert!(tasks.failing().is_empty(), "a run that lasted {STABLE_AFTER:?} clears the failing state");

        shutdown.cancel();
        for h in [handle, healthy] {
            tokio::time::timeout(Duration::from_secs(1), h).await.expect("stops").expect("no panic escapes");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_lasted_resets_the_backoff_and_the_count() {
        let tasks = Tasks::new();
        let t0 = Instant::now();
        assert_eq!(tasks.panicked("t", t0, t0), 1);
        assert_eq!(tasks.panicked("t", t0, t0 + Duration::from_secs(1)), 2);
        assert_eq!(tasks.panicked("t", t0, t0 + Duration::from_secs(2)), 3);
        assert_eq!(tasks.failing(), vec!["t".to_owned()]);
        let restarted = t0 + Duration::from_secs(3);
        assert_eq!(tasks.panicked("t", restarted, restarted + STABLE_AFTER), 1, "a long run starts the count again");
        assert!(tasks.failing().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_restarted_after_shutdown() {
        let (tasks, shutdown, runs) = (Tasks::new(), CancellationToken::new(), Arc::new(AtomicU32::new(0)));
        let handle =
            spawn("unit-shutdown".into(), &tasks, shutdown.clone(), flaky(runs.clone(), u32::MAX, shutdown.clone()));
        // Let it panic a few times, then cancel while it waits to restart.
        tokio::time::sleep(Duration::from_millis(350)).await;
        let before = runs.load(Ordering::SeqCst);
        assert_eq!(before, 3);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), handle).await.expect("returns at once").expect("no panic escapes");
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(runs.load(Ordering::SeqCst), before, "no restart after cancellation");
        assert!(tasks.failing().is_empty(), "a stopped task is not reported");
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_returns_is_not_restarted() {
        let (tasks, runs) = (Tasks::new(), Arc::new(AtomicU32::new(0)));
        let counted = runs.clone();
        let handle = spawn("unit-once".into(), &tasks, CancellationToken::new(), move || {
            let runs = counted.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::timeout(Duration::from_secs(1), handle).await.expect("supervision ends").expect("no panic");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
