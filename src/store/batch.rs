//! Group commit for webhooks.
//!
//! Each request hands its event to a writer task and waits for the commit.
//! The writer takes whatever has queued up (up to `MAX_BATCH`) and records it
//! in one transaction, so under load one WAL flush covers many webhooks; with
//! a single request in flight it commits at once, adding no delay. A request
//! is answered only after its own transaction committed, so "200" still
//! means "on disk".

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Notify};

use super::{NewEvent, RecordOutcome, Store, StoreError};

const MAX_BATCH: usize = 256;
const QUEUE: usize = 4096;

struct Job {
    event: NewEvent,
    reply: oneshot::Sender<Result<RecordOutcome, StoreError>>,
}

#[derive(Clone)]
pub struct BatchWriter {
    tx: mpsc::Sender<Job>,
}

impl BatchWriter {
    /// Starts `writers` writer tasks. `recorded` is notified after each commit
    /// that queued deliveries, so the relay can start without polling.
    pub fn spawn(store: Store, sinks: Vec<&'static str>, writers: usize, recorded: Arc<Notify>) -> BatchWriter {
        let (tx, rx) = mpsc::channel::<Job>(QUEUE);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers.max(1) {
            let (store, sinks, rx, recorded) = (store.clone(), sinks.clone(), rx.clone(), recorded.clone());
            tokio::spawn(async move {
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
                    match store.record_events(&events, &sinks).await {
                        Ok(outcomes) => {
                            if outcomes.iter().any(|o| matches!(o, RecordOutcome::Recorded(_))) && !sinks.is_empty() {
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
                                let one = store.record_events(std::slice::from_ref(event), &sinks).await;
                                let one =
                                    one.and_then(|mut o| o.pop().ok_or_else(|| StoreError::Query("no outcome".into())));
                                let _ = reply.send(one);
                            }
                            if !sinks.is_empty() {
                                recorded.notify_waiters();
                            }
                        }
                        Err(e) => {
                            for reply in replies {
                                let _ = reply.send(Err(e.clone()));
                            }
                        }
                    }
                }
            });
        }
        BatchWriter { tx }
    }

    /// Records one event; returns once its transaction committed (or failed).
    pub async fn record(&self, event: NewEvent) -> Result<RecordOutcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Job { event, reply }).await.map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        rx.await.map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }
}
