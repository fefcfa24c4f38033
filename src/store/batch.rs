//! Group commit for webhooks.
//!
//! Each request hands its event to a writer task and waits for the commit.
//! The writer takes whatever has queued up (up to `MAX_BATCH`) and records it
//! in one transaction, so under load one WAL flush covers many webhooks; with
//! a single request in flight it commits at once, adding no delay. A request
//! is answered only after its own transaction committed, so "200" still
//! means "on disk".
//!
//! The writers run supervised (`crate::supervise`): a writer that panics is
//! restarted on the same channel, which its supervisor holds, so webhooks
//! keep flowing. The jobs it held when it panicked are dropped with their
//! reply senders; their requests see [`StoreError::Unavailable`] and answer
//! 503, so Twilio retries them — never a 200 for an event not committed.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::{IngestLoad, NewEvent, RecordOutcome, Store, StoreError};
use crate::supervise::{self, Tasks};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 4096;

struct Job {
    event: NewEvent,
    reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
}

/// Where the writers commit: the store. A trait so that the writer loop can
/// be run over a recorder that really panics, to test the supervision.
trait Recorder: Clone + Send + Sync + 'static {
    fn record(&self, events: &[NewEvent]) -> impl Future<Output = Result<Vec<RecordOutcome>, StoreError>> + Send;
}

impl Recorder for Store {
    fn record(&self, events: &[NewEvent]) -> impl Future<Output = Result<Vec<RecordOutcome>, StoreError>> + Send {
        self.record_events(events)
    }
}

#[derive(Clone)]
pub struct BatchWriter {
    tx: mpsc::Sender<Job>,
}

impl BatchWriter {
    /// Starts `writers` supervised writer tasks (`batch-writer-N` in `tasks`).
    /// `recorded` is notified after each commit that recorded a change, so
    /// the relay's fan-out can start without polling; `load` counts the
    /// events committed, so the relay can tell a burst. A writer stops once every
    /// `BatchWriter` is dropped (the requests in flight are answered first);
    /// `shutdown` only stops restarting writers that panic.
    pub fn spawn(
        store: Store,
        writers: usize,
        recorded: Arc<Notify>,
        load: Arc<IngestLoad>,
        tasks: &Tasks,
        shutdown: CancellationToken,
    ) -> BatchWriter {
        spawn_with(store, writers, recorded, load, tasks, shutdown)
    }

    /// Records one event; returns once its transaction committed (or failed).
    pub async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { event, reply }).await.map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        // A dropped reply means the writer panicked with this job in hand:
        // whether it committed is unknown, and a retry is idempotent per MessageSid.
        rx.await.map_err(|_| StoreError::Unavailable("writer failed before answering".into()))?
    }
}

fn spawn_with<R: Recorder>(
    recorder: R,
    writers: usize,
    recorded: Arc<Notify>,
    load: Arc<IngestLoad>,
    tasks: &Tasks,
    shutdown: CancellationToken,
) -> BatchWriter {
    let (tx, rx) = mpsc::channel::<Job>(QUEUE);
    // Shared by the writers, and held here by each supervisor rather than by a
    // writer's run, so the channel outlives a writer that panics.
    let rx = Arc::new(Mutex::new(rx));
    for n in 0..writers.max(1) {
        let (recorder, rx, recorded, load) = (recorder.clone(), rx.clone(), recorded.clone(), load.clone());
        supervise::spawn(format!("batch-writer-{n}"), tasks, shutdown.clone(), move || {
            write_batches(recorder.clone(), rx.clone(), recorded.clone(), load.clone())
        });
    }
    BatchWriter { tx }
}

/// One writer: gathers a batch, commits it, answers each request; returns
/// when every sender is gone.
async fn write_batches<R: Recorder>(
    recorder: R,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    recorded: Arc<Notify>,
    load: Arc<IngestLoad>,
) {
    let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            // One writer gathers a batch at a time; the others commit meanwhile.
            let mut rx = rx.lock().await;
            if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
                return; // every sender dropped: shutting down
            }
        }
        let (events, replies): (Vec<NewEvent>, Vec<_>) = jobs.drain(..).map(|j| (j.event, j.reply)).unzip();
        // Every webhook counts, duplicates too: each cost a commit.
        load.add(events.len() as u64);
        match recorder.record(&events).await {
            Ok(outcomes) => {
                if outcomes.iter().any(|o| matches!(o, RecordOutcome::Recorded(_))) {
                    recorded.notify_waiters();
                }
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            // One event the database refuses (or a deadlock between the
            // two writers) must not fail its neighbours: record each alone.
            Err(StoreError::Query(e)) if events.len() > 1 => {
                tracing::warn!(error = %e, batch = events.len(), "batch refused; recording its events one by one");
                for (event, reply) in events.iter().zip(replies) {
                    let one = recorder.record(std::slice::from_ref(event)).await;
                    let one = one.and_then(|mut o| o.pop().ok_or_else(|| StoreError::Query("no outcome".into())));
                    let _ = reply.send(one);
                }
                recorded.notify_waiters();
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Duration;

    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::domain::{EventKind, MessageSid, Phone};

    /// Panics on its first call (with the batch in hand), then records.
    #[derive(Clone, Default)]
    struct PanicsOnce {
        calls: Arc<AtomicI64>,
    }

    impl Recorder for PanicsOnce {
        async fn record(&self, events: &[NewEvent]) -> Result<Vec<RecordOutcome>, StoreError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call == 1 {
                panic!("the store call blew up");
            }
            Ok(events.iter().map(|_| RecordOutcome::Recorded(call)).collect())
        }
    }

    fn event(sid: &str) -> NewEvent {
        let region = crate::domain::parse_region("US").expect("region");
        NewEvent {
            message_sid: MessageSid::parse(sid).expect("sid"),
            account_sid: None,
            messaging_service_sid: None,
            scope: "default".into(),
            phone: Phone::parse("+14155550100", region).expect("phone"),
            from_raw: "+14155550100".into(),
            to: None,
            kind: EventKind::OptOut,
            body: "STOP".into(),
            params: json!({}),
            received_at: Utc::now(),
            source: "twilio".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_panics_fails_its_jobs_and_is_restarted_on_the_same_channel() {
        let (tasks, shutdown, recorder) = (Tasks::new(), CancellationToken::new(), PanicsOnce::default());
        let writer = spawn_with(recorder.clone(), 1, Arc::default(), Arc::default(), &tasks, shutdown.clone());

        let lost = writer.record(event("SMpanic1")).await;
        assert!(
            matches!(lost, Err(StoreError::Unavailable(_))),
            "the job in hand when the writer panicked is answered as unavailable (503), got {lost:?}"
        );
        // The restarted writer serves the same channel: the same handle works again.
        let again = tokio::time::timeout(Duration::from_secs(5), writer.record(event("SMpanic2")))
            .await
            .expect("the writer was restarted");
        assert!(matches!(again, Ok(RecordOutcome::Recorded(2))), "got {again:?}");
        assert_eq!(recorder.calls.load(Ordering::SeqCst), 2);
        assert!(tasks.failing().is_empty(), "one panic is not a failing task");
        shutdown.cancel();
    }
}
