//! One worker of one sink: claims pending (sink, phone) rows under a lease,
//! computes each phone's target from the opt-out list, hands the sink only
//! what differs from what it was last given (or must be re-read), and
//! records the outcome. No transaction is open during a sink call.
//!
//! Health gates every pass: while the sink is failing, one worker of all
//! replicas takes the next probe (one row) when it is due; its success
//! releases everything waiting at once, in full batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::converging::Converging;
use super::target::{self, held, target};
use super::{backoff, Relay};
use crate::domain::Phone;
use crate::metrics;
use crate::sinks::{Cause, Notification, ReportOutcome, Sink, SinkError, SinkKind, SinkReport, Target};
use crate::store::{ClaimedPhone, DeliveryRow, Settle, Settled, StateRow, StoreError};

/// How long before its lease ends a worker stops starting sink calls.
const LEASE_MARGIN: Duration = Duration::from_secs(2);
/// How often a notification waiting for other sinks looks again.
const REPORT_POLL: Duration = Duration::from_secs(2);

pub(super) struct Worker {
    pub relay: Arc<Relay>,
    pub sink: Arc<Sink>,
    pub owner: String,
}

/// What a pass found.
enum Pass {
    /// Did work: look again at once.
    Busy,
    /// Nothing to do (or not allowed to) for this long, unless woken.
    Idle(Duration),
}

impl Worker {
    pub async fn run(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        tracing::debug!(owner = %self.owner, "relay worker started");
        let poll = self.relay.policy.poll_interval;
        let mut store_backoff = poll;
        let mut last_pass: Option<tokio::time::Instant> = None;
        while !shutdown.is_cancelled() {
            if let Some(last) = last_pass {
                self.relay.yield_to_ingest(last, &shutdown).await;
            }
            // Registered before the pass: a wake-up rung while the pass runs
            // (rows fanned out after its claim) is not lost.
            let woken = wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            last_pass = Some(tokio::time::Instant::now());
            let idle = match self.pass().await {
                Ok(Pass::Busy) => {
                    store_backoff = poll;
                    continue;
                }
                Ok(Pass::Idle(d)) => {
                    store_backoff = poll;
                    d
                }
                Err(e) => {
                    tracing::warn!(error = %e, sink = %self.sink.name, "cannot read or claim work");
                    store_backoff = (store_backoff * 2).min(Duration::from_secs(30));
                    store_backoff
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = woken => {},
                () = tokio::time::sleep(idle) => {},
            }
        }
        tracing::debug!(owner = %self.owner, "relay worker stopped");
    }

    async fn pass(&self) -> Result<Pass, StoreError> {
        let policy = &self.relay.policy;
        let store = &self.relay.store;
        let name = self.sink.name.as_str();
        let health = store.sink(name).await?;
        let failing = health.as_ref().filter(|h| h.health != "ok");
        let now = Utc::now();
        let limit = match failing {
            Some(h) => {
                if let Some(at) = h.next_probe_at.filter(|at| *at > now) {
                    // Sleep until the probe is due (a retry or a wake-up cuts it short).
                    return Ok(Pass::Idle((at - now).to_std().unwrap_or_default().min(policy.poll_interval * 4)));
                }
                // The probe's guard: nobody else probes while this one may be running.
                let guard = now + chrono::Duration::from_std(policy.lease).unwrap_or(chrono::Duration::minutes(2));
                if !store.take_probe(name, guard).await? {
                    return Ok(Pass::Idle(policy.poll_interval));
                }
                1
            }
            None => self.sink.batch_size(policy.batch_size),
        };
        let claimed_at = tokio::time::Instant::now();
        let read_at = Utc::now();
        let late = self.recheck_times().1;
        let batch = store.claim_with_recheck(name, &self.owner, limit, policy.lease, late).await?;
        if batch.is_empty() {
            if failing.is_some() {
                // Only a call that succeeds ends a failure, not an empty queue.
                if store.has_pending(name).await? {
                    // What waits is not due yet (a re-read after an uncertain
                    // write): that write is the probe, taken when it is due.
                    let next = Utc::now()
                        + chrono::Duration::from_std(policy.poll_interval).unwrap_or(chrono::Duration::seconds(1));
                    store.probe_at(name, next).await?;
                    return Ok(Pass::Idle(policy.poll_interval));
                }
                // Nothing waits (its rows may all be dead): the sink is asked
                // directly whether it works, reading, never writing.
                let probed = self.sink.kind.probe().await;
                return match probed {
                    Ok(()) => {
                        tracing::info!(sink = name, "sink works again");
                        store.sink_ok(name).await?;
                        self.relay.due.notify_waiters();
                        Ok(Pass::Busy)
                    }
                    Err(error) => {
                        self.failed(health.as_ref().map_or(0, |h| h.backoff_step) + 1, &error).await?;
                        Ok(Pass::Idle(Duration::ZERO))
                    }
                };
            }
            return Ok(Pass::Idle(policy.poll_interval));
        }
        let deadline = (claimed_at + policy.lease).checked_sub(LEASE_MARGIN).unwrap_or(claimed_at);
        let (outcome, settles) = match (&self.sink.kind, Converging::of(&self.sink.kind)) {
            (_, Some(sink)) => self.converge(batch, sink, deadline).await?,
            (SinkKind::Email { sink, report_wait, .. }, None) => {
                self.notify(batch, sink, *report_wait, deadline).await?
            }
            // `Converging::of` is None for email only.
            (_, None) => return Ok(Pass::Idle(policy.poll_interval)),
        };
        if !matches!(outcome, Called::Failed(_)) {
            // Rows first, then health: whoever sees the sink healthy sees its rows settled.
            self.settle(&settles, read_at).await;
        }
        match outcome {
            // Not a probe's answer either way: a probing sink is probed again.
            Called::Deferred => return Ok(Pass::Idle(policy.poll_interval)),
            Called::Nothing => {
                if failing.is_some() {
                    // The probe's row needed no call, so the sink was not tested:
                    // the next row probes at once.
                    store.release_sink(name).await?;
                }
            }
            Called::Ok => {
                if let Some(h) = failing {
                    tracing::info!(sink = name, since = %h.failing_since.map(|t| t.to_rfc3339()).unwrap_or_default(), "sink works again");
                    store.sink_ok(name).await?;
                    // Everything waiting goes now, in full batches, by every worker.
                    self.relay.due.notify_waiters();
                }
            }
            Called::Failed(error) => {
                // The sink's backoff first, then the rows back: another worker
                // must not take them to a sink this one found failing.
                self.failed(health.as_ref().map_or(0, |h| h.backoff_step) + 1, &error).await?;
                self.settle(&settles, read_at).await;
                let expired = store.expire(name, self.dead_before(), &error.to_string()).await?;
                if expired > 0 {
                    metrics::delivery(name, "dead", expired);
                    tracing::error!(
                        sink = name,
                        phones = expired,
                        "gave up on phones waiting longer than relay.max_age; replay with `optout-relay replay --dead`"
                    );
                }
                return Ok(Pass::Idle(Duration::ZERO));
            }
        }
        Ok(Pass::Busy)
    }

    /// Puts the sink into backoff after a failure at `step`.
    async fn failed(&self, step: i32, error: &SinkError) -> Result<(), StoreError> {
        let name = self.sink.name.as_str();
        let delay = backoff::probe_delay(&self.relay.policy, step, error, rand::random::<f64>());
        let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::minutes(15));
        log_failure(name, error, delay, next);
        self.relay.store.sink_failed(name, backoff::failing(error), step, next, &error.to_string()).await
    }

    fn dead_before(&self) -> DateTime<Utc> {
        Utc::now() - chrono::Duration::from_std(self.relay.policy.max_age).unwrap_or(chrono::Duration::days(3))
    }

    /// Brings a batch to its targets (one sink call for the rows that need
    /// it) and says how every row ends. The sink starts no write past `deadline`.
    async fn converge(
        &self,
        batch: Vec<ClaimedPhone>,
        sink: Converging<'_>,
        deadline: tokio::time::Instant,
    ) -> Result<(Called, Vec<Settled>), StoreError> {
        let states = self.states(&batch).await?;
        let name = self.sink.name.as_str();
        let mut settles = Vec::with_capacity(batch.len());
        let mut send: Vec<(&ClaimedPhone, Target)> = Vec::new();
        for row in &batch {
            let t = target(states.get(row.phone.as_str()).map_or(&[][..], Vec::as_slice), self.sink.scopes.as_deref());
            if needs_write(row, t) {
                send.push((row, t));
            } else {
                // Holds it already (or there is nothing of ours to clear).
                settles.push(Settled { id: row.id, generation: row.generation, how: written(t, None) });
            }
        }
        metrics::delivery(name, "unchanged", settles.len() as u64);
        if send.is_empty() {
            return Ok((Called::Nothing, settles));
        }
        let started = std::time::Instant::now();
        let call = sink.call(&self.relay, self.sink.scopes.as_deref(), &send, &states, deadline).await?;
        let ms = started.elapsed().as_millis() as u64;
        // Rows the sink could not take (a phone with no vanId): done, with why.
        for (i, detail) in call.skipped {
            let (row, t) = send[i];
            tracing::info!(
                sink = name,
                delivery_id = row.id,
                event_id = row.event_id,
                phone = %row.phone.masked(),
                reason = %detail.get("skipped").and_then(serde_json::Value::as_str).unwrap_or_default(),
                "nothing to send for this phone"
            );
            settles.push(Settled { id: row.id, generation: row.generation, how: written(t, Some(detail)) });
        }
        metrics::delivery(name, "skipped", (send.len() - call.sent.len()) as u64);
        if call.sent.is_empty() {
            return Ok((Called::Nothing, settles));
        }
        metrics::attempts(name, call.sent.len() as u64);
        let done = call.converged.done.len().min(call.sent.len());
        let (ok, rest) = call.sent.split_at(done);
        for (&i, value) in ok.iter().zip(call.converged.done) {
            let (row, t) = send[i];
            settles.push(Settled { id: row.id, generation: row.generation, how: written(t, Some(value)) });
            // One line per row: an operator follows a phone by its delivery or event id.
            tracing::info!(
                sink = name,
                delivery_id = row.id,
                event_id = row.event_id,
                attempt = row.attempts + 1,
                opted_out = t.is_opted_out(),
                batch = call.sent.len(),
                ms,
                "sink brought to target"
            );
        }
        metrics::delivery(name, "written", ok.len() as u64);
        let called = match call.converged.error {
            None => Called::Ok,
            Some(SinkError::OutOfTime) => {
                // Nothing sent for the rest, nothing learnt about the sink: those
                // rows go back as they were, due now, and the sink's health stays.
                let now = Utc::now();
                for &i in rest {
                    let (row, _) = send[i];
                    settles.push(Settled { id: row.id, generation: row.generation, how: Settle::Wait { until: now } });
                }
                tracing::info!(sink = name, phones = rest.len(), "lease too short for the call; rows put back");
                if ok.is_empty() {
                    Called::Deferred
                } else {
                    Called::Ok
                }
            }
            Some(error) => {
                let (soon, late) = self.recheck_times();
                for &i in rest {
                    let (row, t) = send[i];
                    let how = match &error {
                        SinkError::Uncertain(e) => Settle::Uncertain { held: held(t), error: e.clone(), soon, late },
                        other => Settle::Failed { error: other.to_string() },
                    };
                    settles.push(Settled { id: row.id, generation: row.generation, how });
                }
                let outcome = if matches!(error, SinkError::Uncertain(_)) { "uncertain" } else { "failed" };
                metrics::delivery(name, outcome, rest.len() as u64);
                for &i in rest {
                    let (row, _) = send[i];
                    match &error {
                        SinkError::Uncertain(_) => tracing::warn!(
                            sink = name,
                            delivery_id = row.id,
                            event_id = row.event_id,
                            attempt = row.attempts + 1,
                            %error,
                            next_attempt_at = %soon.to_rfc3339(),
                            recheck_late_at = %late.to_rfc3339(),
                            "write of unknown outcome; it will be re-read"
                        ),
                        _ => tracing::warn!(
                            sink = name,
                            delivery_id = row.id,
                            event_id = row.event_id,
                            attempt = row.attempts + 1,
                            %error,
                            "not written; retried when the sink's backoff ends (next_attempt_at on the sink's line)"
                        ),
                    }
                }
                Called::Failed(error)
            }
        };
        Ok((called, settles))
    }

    /// Sends one notification per changed phone, with what every other sink
    /// did for it; waits (up to `report_wait`) while another sink is still
    /// working on it, so the message can say how it ended.
    async fn notify(
        &self,
        batch: Vec<ClaimedPhone>,
        email: &crate::sinks::email::EmailSink,
        report_wait: Duration,
        deadline: tokio::time::Instant,
    ) -> Result<(Called, Vec<Settled>), StoreError> {
        let states = self.states(&batch).await?;
        let name = self.sink.name.as_str();
        let now = Utc::now();
        let mut settles = Vec::with_capacity(batch.len());
        let mut called = Called::Nothing;
        for (i, row) in batch.iter().enumerate() {
            // The first message always goes (a lease shorter than a message
            // would otherwise send nothing, ever); the next only if it fits.
            if i > 0 && deadline.saturating_duration_since(tokio::time::Instant::now()) < email.timeout() {
                // The lease could run out mid-message: the rest goes in the next batch.
                for r in &batch[i..] {
                    settles.push(Settled { id: r.id, generation: r.generation, how: Settle::Wait { until: now } });
                }
                break;
            }
            let phone_states = states.get(row.phone.as_str()).map_or(&[][..], Vec::as_slice);
            let t = target(phone_states, self.sink.scopes.as_deref());
            // A notification says "opted out" or "opted back in": a change of
            // `since` alone, or a write to re-read, is nothing to tell.
            let told = row.written.map(|w| w.opted_out);
            if told == Some(t.is_opted_out()) || (told.is_none() && !t.is_opted_out()) {
                settles.push(Settled { id: row.id, generation: row.generation, how: written(t, None) });
                continue;
            }
            let rows = self.relay.store.deliveries_of_phone(&row.phone).await?;
            let others = self.reports(phone_states, &rows);
            let waiting = others.iter().any(|r| matches!(r.outcome, ReportOutcome::Waiting { .. }));
            let patience = chrono::Duration::from_std(report_wait).unwrap_or(chrono::Duration::minutes(10));
            if waiting && now - row.queued_at < patience {
                let until = now + chrono::Duration::from_std(REPORT_POLL).unwrap_or(chrono::Duration::seconds(2));
                settles.push(Settled { id: row.id, generation: row.generation, how: Settle::Wait { until } });
                continue;
            }
            let cause = match row.event_id {
                Some(id) => self.relay.store.event(id).await?.map(|e| Cause {
                    body: e.body,
                    scope: e.scope,
                    source: e.source,
                    said_at: e.received_at,
                }),
                None => None,
            };
            let notification = Notification { phone: row.phone.clone(), target: t, cause, others };
            metrics::attempts(name, 1);
            match email.notify(&notification).await {
                Ok(value) => {
                    metrics::delivery(name, "written", 1);
                    tracing::info!(
                        sink = name,
                        delivery_id = row.id,
                        event_id = row.event_id,
                        attempt = row.attempts + 1,
                        opted_out = t.is_opted_out(),
                        "notification sent"
                    );
                    settles.push(Settled { id: row.id, generation: row.generation, how: written(t, Some(value)) });
                    called = Called::Ok;
                }
                Err(error) => {
                    metrics::delivery(name, "failed", 1);
                    tracing::warn!(
                        sink = name,
                        delivery_id = row.id,
                        event_id = row.event_id,
                        attempt = row.attempts + 1,
                        %error,
                        "notification not sent; retried when the sink's backoff ends (next_attempt_at on the sink's line)"
                    );
                    settles.push(Settled {
                        id: row.id,
                        generation: row.generation,
                        how: Settle::Failed { error: error.to_string() },
                    });
                    // The rest of the batch would meet the same server: leave it for after the backoff.
                    for r in &batch[i + 1..] {
                        settles.push(Settled { id: r.id, generation: r.generation, how: Settle::Wait { until: now } });
                    }
                    called = Called::Failed(error);
                    break;
                }
            }
        }
        Ok((called, settles))
    }

    /// What every other configured sink did for this phone.
    fn reports(&self, states: &[StateRow], rows: &[DeliveryRow]) -> Vec<SinkReport> {
        let mut out = Vec::new();
        for other in self.relay.sinks.iter().filter(|s| s.name != self.sink.name) {
            let t = held(target(states, other.scopes.as_deref()));
            let row = rows.iter().find(|r| r.sink == other.name);
            let outcome = match row {
                // Never concerned, or nothing of ours to clear there.
                None => continue,
                Some(r) if r.written() == Some(t) && !r.uncertain => {
                    ReportOutcome::Applied { at: r.written_at.unwrap_or(r.updated_at), detail: r.result.clone() }
                }
                Some(r) if r.written().is_none() && !t.opted_out && r.status != "pending" => continue,
                Some(r) if r.status == "dead" => {
                    ReportOutcome::GaveUp { error: r.last_error.clone().unwrap_or_else(|| "gave up".to_owned()) }
                }
                Some(r) => ReportOutcome::Waiting { since: r.queued_at, error: r.last_error.clone() },
            };
            out.push(SinkReport { sink: other.name.clone(), outcome });
        }
        out
    }

    /// The states of the batch's phones, by phone.
    async fn states(&self, batch: &[ClaimedPhone]) -> Result<HashMap<String, Vec<StateRow>>, StoreError> {
        let phones: Vec<Phone> = batch.iter().map(|r| r.phone.clone()).collect();
        Ok(target::by_phone(self.relay.store.states_of(&phones).await?))
    }

    fn recheck_times(&self) -> (DateTime<Utc>, DateTime<Utc>) {
        let now = Utc::now();
        let after = |d: Duration| now + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::minutes(10));
        (after(self.relay.policy.recheck_soon), after(self.relay.policy.recheck_late))
    }

    /// Records a batch's outcomes in one transaction. A lease lost meanwhile
    /// turns a write into one to re-read (the store does that).
    async fn settle(&self, settles: &[Settled], read_at: DateTime<Utc>) {
        let (soon, late) = self.recheck_times();
        match self.relay.store.settle_many(&self.owner, settles, self.dead_before(), (soon, late), read_at).await {
            Ok(held) if held < settles.len() as u64 => tracing::warn!(
                sink = %self.sink.name,
                lost = settles.len() as u64 - held,
                "lease lost before settling; what was written will be re-read"
            ),
            Ok(_) => {}
            // The leases will expire and the rows be claimed again: a re-write
            // of the same target changes nothing.
            Err(e) => {
                tracing::error!(error = %e, rows = settles.len(), "cannot record the outcomes; they will be retried")
            }
        }
    }
}

/// What the sink call of a pass did.
enum Called {
    /// No call was needed.
    Nothing,
    Ok,
    /// A call was not started (`SinkError::OutOfTime`): the rows are back.
    Deferred,
    Failed(SinkError),
}

/// Whether the sink must be called for this row: its target differs from
/// what was last written, or that write's outcome is unknown. An opt-in for
/// a phone we never wrote anything for clears nothing.
fn needs_write(row: &ClaimedPhone, t: Target) -> bool {
    let want = held(t);
    match row.written {
        None => want.opted_out,
        Some(w) => w != want || row.uncertain,
    }
}

fn written(t: Target, result: Option<Value>) -> Settle {
    Settle::Written { held: held(t), result }
}

/// The sink's line: its next probe, as a delay and as a time, so a row's
/// line (delivery id, attempt) and this one say when it is tried again.
fn log_failure(sink: &str, error: &SinkError, next: Duration, at: DateTime<Utc>) {
    let next = humantime::format_duration(Duration::from_secs(next.as_secs())).to_string();
    let at = at.to_rfc3339();
    match error {
        SinkError::Misconfigured(_) => tracing::error!(
            sink,
            %error,
            next_try = %next,
            next_attempt_at = %at,
            "sink refuses our requests: fix the configuration, then restart or run `optout-relay retry {sink}`"
        ),
        SinkError::Uncertain(_) => tracing::warn!(
            sink,
            %error,
            next_try = %next,
            next_attempt_at = %at,
            "sink write may or may not have landed; it will be re-read"
        ),
        SinkError::Transient { .. } | SinkError::OutOfTime => {
            tracing::warn!(sink, %error, next_try = %next, next_attempt_at = %at, "sink failing; backing off")
        }
    }
}
