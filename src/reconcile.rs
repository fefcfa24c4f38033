//! Reconciliation: Twilio's message log as one more source of events.
//!
//! Whatever reached no endpoint — the service was down, a 503 Twilio did not
//! retry, the months before the service existed — is still in the account's
//! message log. This reads the inbound messages of a window of days,
//! classifies each body with our keywords (the log carries no `OptOutType`)
//! and records them through the same path as the webhook
//! (`Store::record_events`, idempotent by MessageSid), with `date_sent` as
//! the time the person said it and source `reconcile`. A message an endpoint
//! already delivered is a duplicate and changes nothing; one that no
//! endpoint delivered is counted (`optout_reconcile_missed_total{kind}`) and
//! logged: the figure that shows what the other channels lost. A message
//! that only reads like a revocation ("please stop texting me") becomes a
//! review item, as it would by the webhook (`Keywords::classify_message`).
//!
//! It runs periodically under `serve` (`[reconcile] interval`, a supervised
//! task named `reconcile`) over the last `lookback`, and once on demand as
//! `optout-relay backfill --since … [--until …]`.
//!
//! It records events, so it is a source like the HTTP endpoints: it sits
//! beside `http`, above `twilio` (the REST client, the keywords) and `store`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use phonenumber::country;
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::ReconcileConfig;
use crate::domain::{EventKind, MessageSid, Phone};
use crate::store::{NewEvent, NewReview, RecordOutcome, Store, StoreError};
use crate::twilio::keywords::{Classified, Keywords};
use crate::twilio::messages::{Listing, Message, MessagesClient, MessagesError, MAX_PAGE_SIZE};

/// `source` of the events reconciliation records.
pub const SOURCE: &str = "reconcile";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Twilio(#[from] MessagesError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one run found, for the log line of a periodic run and `backfill`'s output.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Pages read from Twilio.
    pub pages: usize,
    /// Inbound messages listed (outbound ones are skipped unseen).
    pub inbound: usize,
    /// Recorded now: no endpoint had delivered them. By kind.
    pub missed_opt_outs: usize,
    pub missed_opt_ins: usize,
    pub missed_help: usize,
    /// Keyword messages an endpoint (or an earlier run) had already recorded.
    pub already_recorded: usize,
    /// Inbound messages that are no opt-out, opt-in or help keyword.
    pub not_keywords: usize,
    /// Keyword messages whose sender is not a phone number (or that lack a sid).
    pub unreadable: usize,
    /// Review items created now (possible revocations for staff).
    pub new_reviews: usize,
}

impl Summary {
    pub fn missed(&self) -> usize {
        self.missed_opt_outs + self.missed_opt_ins + self.missed_help
    }
}

/// What a message of the log amounts to.
#[derive(Debug)]
pub enum Reading {
    Event(Box<NewEvent>),
    /// A possible revocation for staff (`[keywords] review`).
    Review(Box<NewReview>),
    NotAKeyword,
    Unreadable(String),
}

/// The event an inbound message of the log stands for, built as the
/// webhook builds its own: the same keywords (with no `OptOutType`), the
/// same scope (the Messaging Service, else the number texted). Pure.
pub fn read_message(m: &Message, keywords: &Keywords, region: country::Id, now: DateTime<Utc>) -> Reading {
    let body = m.body.clone().unwrap_or_default();
    let (kind, review) = match keywords.classify_message(None, &body) {
        Classified::Nothing => return Reading::NotAKeyword,
        Classified::Event(kind) => (kind, None),
        Classified::Review { matched } => (EventKind::OptOut, Some(matched)),
    };
    let Some(message_sid) = MessageSid::parse(m.sid.trim()) else {
        return Reading::Unreadable("a message without a sid".to_owned());
    };
    let from_raw = m.from.clone().unwrap_or_default();
    let Ok(phone) = Phone::parse(&from_raw, region) else {
        return Reading::Unreadable(format!("message {}: the sender is not a phone number", message_sid.as_str()));
    };
    let non_empty = |v: &Option<String>| v.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    let messaging_service_sid = non_empty(&m.messaging_service_sid);
    let to = non_empty(&m.to);
    let scope = messaging_service_sid.clone().or_else(|| to.clone()).unwrap_or_else(|| "default".to_owned());
    // A clock ahead of ours must not let one message outrank every later one.
    let said_at = m.sent_at().filter(|t| *t <= now).unwrap_or(now);
    let event = NewEvent {
        message_sid,
        account_sid: non_empty(&m.account_sid),
        messaging_service_sid,
        scope,
        phone,
        from_raw,
        to,
        kind,
        body,
        params: serde_json::to_value(m).unwrap_or_default(),
        received_at: said_at,
        source: SOURCE.to_owned(),
    };
    match review {
        Some(matched) => Reading::Review(Box::new(NewReview { event, matched })),
        None => Reading::Event(Box::new(event)),
    }
}

/// The listings of a window: one for the account, or one per `to` number.
pub fn listings(to: &[String], since: NaiveDate, until: Option<NaiveDate>) -> Vec<Listing> {
    let listing = |to: Option<String>| Listing { since, until, to, page_size: MAX_PAGE_SIZE };
    if to.is_empty() {
        vec![listing(None)]
    } else {
        to.iter().map(|t| listing(Some(t.clone()))).collect()
    }
}

/// The GMT day the lookback window starts on (`DateSent>` takes a day).
pub fn window_start(now: DateTime<Utc>, lookback: Duration) -> NaiveDate {
    let back = chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::days(2));
    (now - back).date_naive()
}

/// Reads the log and records what is missing.
#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

struct Inner {
    client: MessagesClient,
    store: Store,
    keywords: Keywords,
    region: country::Id,
    mask_phones: bool,
    /// Rung after a run recorded a change, so the relay's fan-out starts at
    /// once (absent for `backfill`: a running `serve` finds the changes itself).
    recorded: Option<Arc<Notify>>,
}

impl Reconciler {
    pub fn new(
        client: MessagesClient,
        store: Store,
        keywords: Keywords,
        region: country::Id,
        mask_phones: bool,
        recorded: Option<Arc<Notify>>,
    ) -> Reconciler {
        Reconciler { inner: Arc::new(Inner { client, store, keywords, region, mask_phones, recorded }) }
    }

    /// Lists every listing and records what is missing, page by page.
    pub async fn run(&self, listings: &[Listing]) -> Result<Summary, ReconcileError> {
        let mut summary = Summary::default();
        for listing in listings {
            let mut pages = self.inner.client.pages(listing);
            while let Some(messages) = pages.next().await? {
                summary.pages += 1;
                self.record_page(messages, &mut summary).await?;
            }
        }
        Ok(summary)
    }

    fn show(&self, phone: &Phone) -> String {
        if self.inner.mask_phones {
            phone.masked()
        } else {
            phone.as_str().to_owned()
        }
    }

    async fn record_page(&self, messages: Vec<Message>, summary: &mut Summary) -> Result<(), ReconcileError> {
        let now = Utc::now();
        let mut events = Vec::new();
        for m in messages.iter().filter(|m| m.is_inbound()) {
            summary.inbound += 1;
            match read_message(m, &self.inner.keywords, self.inner.region, now) {
                Reading::Event(e) => events.push(*e),
                Reading::Review(r) => {
                    if let RecordOutcome::Recorded(id) = self.inner.store.record_review(&r).await? {
                        summary.new_reviews += 1;
                        crate::metrics::review_created();
                        tracing::info!(
                            review = id,
                            message_sid = r.event.message_sid.as_str(),
                            phone = %self.show(&r.event.phone),
                            "reconcile: possible revocation held for review"
                        );
                    }
                }
                Reading::NotAKeyword => summary.not_keywords += 1,
                Reading::Unreadable(why) => {
                    summary.unreadable += 1;
                    tracing::warn!(reason = %crate::domain::mask_phones_in(&why), "reconcile: message skipped");
                }
            }
        }
        if events.is_empty() {
            return Ok(());
        }
        let outcomes = self.inner.store.record_events(&events).await?;
        let mut changed = false;
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome {
                RecordOutcome::Duplicate => summary.already_recorded += 1,
                RecordOutcome::Recorded(id) => {
                    changed |= event.kind.changes_consent();
                    match event.kind {
                        EventKind::OptOut => summary.missed_opt_outs += 1,
                        EventKind::OptIn => summary.missed_opt_ins += 1,
                        EventKind::Help => summary.missed_help += 1,
                    }
                    crate::metrics::event(event.kind.as_str());
                    crate::metrics::reconcile_missed(event.kind.as_str());
                    let phone = self.show(&event.phone);
                    tracing::warn!(
                        event_id = id,
                        message_sid = event.message_sid.as_str(),
                        phone = %phone,
                        kind = event.kind.as_str(),
                        said_at = %event.received_at.to_rfc3339(),
                        scope = %event.scope,
                        "reconcile: found in Twilio's message log, delivered by no endpoint; recorded now"
                    );
                }
            }
        }
        if changed {
            if let Some(recorded) = &self.inner.recorded {
                recorded.notify_waiters();
            }
        }
        Ok(())
    }
}

/// The periodic run under `serve`: waits for the schema, then runs over the
/// last `lookback` every `interval` until `shutdown`. A failed run (Twilio
/// down, bad credentials, the store unavailable) is logged and counted; the
/// next one covers the same window, so nothing is lost by waiting.
pub async fn every(
    reconciler: Reconciler,
    cfg: ReconcileConfig,
    interval: Duration,
    mut schema_ready: tokio::sync::watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        () = shutdown.cancelled() => return,
        ready = schema_ready.wait_for(|r| *r) => if ready.is_err() { return },
    }
    loop {
        let since = window_start(Utc::now(), cfg.lookback);
        let window = listings(&cfg.to, since, None);
        let run = tokio::select! {
            () = shutdown.cancelled() => return,
            run = reconciler.run(&window) => run,
        };
        match run {
            Ok(s) => {
                crate::metrics::reconcile_run("ok");
                tracing::info!(
                    since = %since,
                    pages = s.pages,
                    inbound = s.inbound,
                    missed_opt_outs = s.missed_opt_outs,
                    missed = s.missed(),
                    already_recorded = s.already_recorded,
                    "reconcile: Twilio's message log read"
                );
            }
            Err(e) => {
                crate::metrics::reconcile_run("failed");
                tracing::error!(error = %e, "reconcile: run failed; the next run covers the same window");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::KeywordsConfig;

    fn message(sid: &str, from: &str, body: &str, date_sent: &str) -> Message {
        Message {
            sid: sid.into(),
            account_sid: Some("AC1".into()),
            messaging_service_sid: Some("MG1".into()),
            from: Some(from.into()),
            to: Some("+15005550006".into()),
            body: Some(body.into()),
            direction: Some("inbound".into()),
            date_sent: Some(date_sent.into()),
        }
    }

    #[test]
    fn a_logged_stop_becomes_the_event_the_webhook_would_record_said_when_sent() {
        let k = Keywords::new(&KeywordsConfig::default());
        let now = Utc::now();
        let m = message("SM1", "+14155550101", "Stop.", "Mon, 23 Nov 2026 17:45:04 +0000");
        let Reading::Event(e) = read_message(&m, &k, country::Id::US, now) else { panic!("an event") };
        assert_eq!(e.kind, EventKind::OptOut);
        assert_eq!(e.scope, "MG1");
        assert_eq!(e.phone.as_str(), "+14155550101");
        assert_eq!(e.source, "reconcile");
        assert_eq!(e.received_at.to_rfc3339(), "2026-11-23T17:45:04+00:00");
        assert_eq!(e.params["sid"], "SM1");
    }

    #[test]
    fn other_messages_are_not_events() {
        let k = Keywords::new(&KeywordsConfig::default());
        let now = Utc::now();
        let cases = [
            (message("SM1", "+14155550101", "thanks!", "Mon, 23 Nov 2026 17:45:04 +0000"), "not"),
            (message("SM2", "client:alice", "STOP", "Mon, 23 Nov 2026 17:45:04 +0000"), "unreadable"),
            (message("SM5", "+14155550101", "please stop texting me", "Mon, 23 Nov 2026 17:45:04 +0000"), "review"),
            (message("", "+14155550101", "STOP", "Mon, 23 Nov 2026 17:45:04 +0000"), "unreadable"),
        ];
        for (m, want) in cases {
            let got = match read_message(&m, &k, country::Id::US, now) {
                Reading::Event(_) => "event",
                Reading::Review(_) => "review",
                Reading::NotAKeyword => "not",
                Reading::Unreadable(_) => "unreadable",
            };
            assert_eq!(got, want, "{m:?}");
        }
    }

    #[test]
    fn a_date_sent_in_the_future_or_missing_counts_as_now() {
        let k = Keywords::new(&KeywordsConfig::default());
        let now = DateTime::parse_from_rfc3339("2026-11-24T00:00:00Z").expect("t").with_timezone(&Utc);
        for date in ["Mon, 23 Nov 2099 17:45:04 +0000", "not a date"] {
            let m = message("SM1", "+14155550101", "STOP", date);
            let Reading::Event(e) = read_message(&m, &k, country::Id::US, now) else { panic!("an event") };
            assert_eq!(e.received_at, now, "{date}");
        }
    }

    #[test]
    fn the_window_starts_on_the_gmt_day_lookback_reaches() {
        let now = DateTime::parse_from_rfc3339("2026-11-24T03:00:00Z").expect("t").with_timezone(&Utc);
        let day = |s: &str| NaiveDate::parse_from_str(s, "%Y-%m-%d").expect("day");
        assert_eq!(window_start(now, Duration::from_secs(2 * 86_400)), day("2026-11-22"));
        assert_eq!(window_start(now, Duration::from_secs(4 * 3600)), day("2026-11-23"));
        let per_number = listings(&["+15005550006".into(), "+15005550007".into()], day("2026-11-22"), None);
        assert_eq!(per_number.len(), 2);
        assert_eq!(per_number[1].to.as_deref(), Some("+15005550007"));
        assert_eq!(listings(&[], day("2026-11-22"), None)[0].to, None);
    }
}
