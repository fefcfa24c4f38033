//! The sinks a worker brings to targets (every kind but the notification
//! email), and what each needs from the relay besides the target: REDCap
//! nothing, EveryAction the vanIds of each phone (from the mapping the
//! relay reads), a webhook the change's id, scopes and source. One
//! converge path in `worker` calls them all through [`Converging::call`].

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::target::effective;
use super::Relay;
use crate::sinks::everyaction::{self, EveryActionSink, VanItem};
use crate::sinks::redcap::RedcapSink;
use crate::sinks::webhook::{WebhookItem, WebhookSink};
use crate::sinks::{Converged, Convergence, SinkKind, Target};
use crate::store::{ClaimedPhone, StateRow, StoreError};

pub(super) enum Converging<'a> {
    Redcap(&'a RedcapSink),
    EveryAction { sink: &'a EveryActionSink, committee_id: Option<u64> },
    Webhook(&'a WebhookSink),
}

/// What one call of a batch came to.
pub(super) struct Call {
    /// Rows (indexes into the rows to send) settled without a call, with the
    /// sink's account of why (a phone with no vanId, say).
    pub skipped: Vec<(usize, Value)>,
    /// Rows handed to the sink, in the order of `converged.done`.
    pub sent: Vec<usize>,
    pub converged: Converged,
}

impl<'a> Converging<'a> {
    /// `None` for the notification email, which reports rather than converges.
    pub fn of(kind: &'a SinkKind) -> Option<Converging<'a>> {
        match kind {
            SinkKind::Redcap { sink, .. } => Some(Converging::Redcap(sink)),
            SinkKind::EveryAction { sink, committee_id } => {
                Some(Converging::EveryAction { sink, committee_id: *committee_id })
            }
            SinkKind::Webhook { sink } => Some(Converging::Webhook(sink)),
            SinkKind::Email { .. } => None,
        }
    }

    /// Brings `send` (rows and their targets) to their targets. `states`:
    /// the batch's phones' states; `scopes`: what the sink follows.
    pub async fn call(
        &self,
        relay: &Relay,
        scopes: Option<&[String]>,
        send: &[(&ClaimedPhone, Target)],
        states: &HashMap<String, Vec<StateRow>>,
        deadline: tokio::time::Instant,
    ) -> Result<Call, StoreError> {
        let all: Vec<usize> = (0..send.len()).collect();
        match self {
            Converging::Redcap(sink) => {
                let items: Vec<Convergence> =
                    send.iter().map(|(row, t)| Convergence { phone: row.phone.clone(), target: *t }).collect();
                let converged = sink.converge(&items, Some(deadline)).await.into();
                Ok(Call { skipped: Vec::new(), sent: all, converged })
            }
            Converging::EveryAction { sink, committee_id } => {
                let phones: Vec<_> = send.iter().map(|(row, _)| row.phone.clone()).collect();
                let mut known = relay.store.van_ids_of(&phones, *committee_id).await?;
                let (mut skipped, mut sent, mut items) = (Vec::new(), Vec::new(), Vec::new());
                for (i, (row, t)) in send.iter().enumerate() {
                    let van_ids = known.remove(row.phone.as_str()).unwrap_or_default();
                    match everyaction::skip_reason(&row.phone, &van_ids) {
                        Some(why) => skipped.push((i, json!({"van_ids": van_ids, "written": [], "skipped": why}))),
                        None => {
                            sent.push(i);
                            items.push(VanItem { phone: row.phone.clone(), target: *t, van_ids });
                        }
                    }
                }
                let converged = if items.is_empty() {
                    Converged { done: Vec::new(), error: None }
                } else {
                    sink.converge(&items, Some(deadline)).await
                };
                Ok(Call { skipped, sent, converged })
            }
            Converging::Webhook(sink) => {
                let mut items = Vec::with_capacity(send.len());
                for (row, t) in send {
                    let phone_states = states.get(row.phone.as_str()).map_or(&[][..], Vec::as_slice);
                    let source = match row.event_id {
                        Some(id) => relay.store.event(id).await?.map(|e| e.source),
                        None => None,
                    };
                    items.push(webhook_item(row, *t, phone_states, scopes, source));
                }
                let converged = sink.converge(&items, Some(deadline)).await;
                Ok(Call { skipped: Vec::new(), sent: all, converged })
            }
        }
    }
}

/// The webhook of one row: the scopes deciding its target, when that
/// target began, and an id that every retry of this change repeats (the
/// row, and the target with its start: a new change has a new start).
fn webhook_item(
    row: &ClaimedPhone,
    target: Target,
    states: &[StateRow],
    scopes: Option<&[String]>,
    source: Option<String>,
) -> WebhookItem {
    let effective = effective(states, scopes);
    let deciding = effective.iter().filter(|e| e.opted_out == target.is_opted_out());
    let decided_scopes: Vec<String> = deciding.clone().map(|e| e.scope.clone()).collect();
    let changed_at: DateTime<Utc> = match target {
        Target::OptedOut { since } => since,
        // An opt-in began when the last scope to opt back in did.
        Target::OptedIn => deciding.map(|e| e.since).max().unwrap_or(row.queued_at),
    };
    let kind = if target.is_opted_out() { 'o' } else { 'i' };
    WebhookItem {
        phone: row.phone.clone(),
        target,
        message_id: format!("msg_{}_{kind}{}", row.id, changed_at.timestamp_millis()),
        changed_at,
        scopes: decided_scopes,
        source,
        event_id: row.event_id,
    }
}
