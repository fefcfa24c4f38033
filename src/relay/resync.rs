//! Periodic resync of a REDCap sink: every opted-out phone it follows is
//! checked against the whole project and stamped where the field is blank
//! or differs. It catches what no event announces: a participant enrolled
//! (or a number typed in) after the STOP, a write lost or undone by hand. It
//! never clears a field: a stamp typed by staff stays.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::target::{by_phone, target};
use super::Relay;
use crate::domain::Phone;
use crate::sinks::redcap::ResyncReport;
use crate::sinks::{Sink, SinkError, SinkKind, Target};
use crate::store::{StateRow, Store, StoreError};

/// How often a resync task looks whether its sink is due (the interval
/// itself is kept in the store, shared by replicas and restarts).
const LOOK_EVERY: Duration = Duration::from_secs(30);

/// How soon a failed resync is tried again.
const RETRY_FAILED: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("sink {0} is not a configured REDCap sink")]
    NotRedcap(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// Every opted-out phone `sink` follows, with when its opt-out began.
pub async fn opted_out(store: &Store, sink: &Sink) -> Result<Vec<(Phone, DateTime<Utc>)>, StoreError> {
    // Sorted by phone: the resync's import and its log read the same each run.
    let by_phone: BTreeMap<String, Vec<StateRow>> = by_phone(store.states_of_opted_out().await?).into_iter().collect();
    Ok(by_phone
        .into_iter()
        .filter_map(|(phone, states)| match target(&states, sink.scopes.as_deref()) {
            Target::OptedOut { since } => Some((Phone::from_stored(phone), since)),
            Target::OptedIn => None,
        })
        .collect())
}

/// Runs one resync of `sink` now (the periodic task and `optout-relay resync`).
/// `late`: when a phone re-read after the resync is read once more, after a
/// late-landing import (`relay.recheck_late` from now).
pub async fn run(store: &Store, sink: &Sink, late: DateTime<Utc>) -> Result<ResyncReport, ResyncError> {
    let SinkKind::Redcap { sink: redcap, .. } = &sink.kind else {
        return Err(ResyncError::NotRedcap(sink.name.clone()));
    };
    let phones = opted_out(store, sink).await?;
    let result = redcap.resync(&phones).await;
    // The resync stamped without a lease: record that the sink holds these
    // opt-outs, and have a worker re-read every phone whose target moved
    // while it ran (a START meanwhile) — all of them if the import's outcome
    // is unknown — so a stamp it put on a phone just opted in is cleared.
    let uncertain = matches!(result, Err(SinkError::Uncertain(_)));
    if result.is_ok() || uncertain {
        record(store, sink, &phones, uncertain, late).await?;
    }
    let report = result?;
    store.set_resynced_at(&sink.name, Utc::now()).await?;
    tracing::info!(
        sink = %sink.name,
        phones = report.phones,
        records_matched = report.records_matched,
        records_stamped = report.records_stamped,
        "resync done"
    );
    Ok(report)
}

/// What the resync left, recorded per phone (see [`run`]).
async fn record(
    store: &Store,
    sink: &Sink,
    phones: &[(Phone, DateTime<Utc>)],
    uncertain: bool,
    late: DateTime<Utc>,
) -> Result<(), StoreError> {
    // Chunks keep each statement's bound values well under SQLite's limit.
    for chunk in phones.chunks(500) {
        let list: Vec<Phone> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let by_phone = by_phone(store.states_of(&list).await?);
        let entries: Vec<(Phone, DateTime<Utc>, bool)> = chunk
            .iter()
            .map(|(phone, since)| {
                let now = by_phone.get(phone.as_str()).map_or(&[][..], Vec::as_slice);
                let moved = target(now, sink.scopes.as_deref()) != (Target::OptedOut { since: *since });
                (phone.clone(), *since, uncertain || moved)
            })
            .collect();
        store.record_resync(&sink.name, &entries, late).await?;
    }
    Ok(())
}

/// The periodic task: one resync per `resync_interval` across replicas,
/// skipped while the sink is failing (its workers' probes find out when it
/// works again; the next round catches up).
pub async fn every(relay: Arc<Relay>, sink: Arc<Sink>, shutdown: CancellationToken) {
    let SinkKind::Redcap { resync_interval, .. } = &sink.kind else { return };
    let interval = *resync_interval;
    loop {
        match due(&relay.store, &sink.name, interval).await {
            Ok(true) => {
                let late = Utc::now()
                    + chrono::Duration::from_std(relay.policy.recheck_late).unwrap_or(chrono::Duration::minutes(10));
                if let Err(e) = run(&relay.store, &sink, late).await {
                    // Tried again after RETRY_FAILED (or the interval, if
                    // shorter), not a whole interval later.
                    let retry = RETRY_FAILED.min(interval);
                    tracing::warn!(sink = %sink.name, error = %e, retry_in = ?retry, "resync failed");
                    let back = chrono::Duration::from_std(interval.saturating_sub(retry)).unwrap_or_default();
                    if let Err(e) = relay.store.set_resynced_at(&sink.name, Utc::now() - back).await {
                        tracing::warn!(sink = %sink.name, error = %e, "cannot reschedule the resync");
                    }
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(sink = %sink.name, error = %e, "cannot read the resync schedule"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(LOOK_EVERY.min(interval)) => {},
        }
    }
}

async fn due(store: &Store, name: &str, interval: Duration) -> Result<bool, StoreError> {
    if store.sink(name).await?.is_some_and(|h| h.health != "ok") {
        return Ok(false);
    }
    store.take_resync(name, interval).await
}
