//! Systems of record that learn about opt-outs. The relay hands a sink what
//! it should hold for each phone (`Convergence`) or what to report
//! (`Notification`, `Alert`); a sink knows nothing of the store. Each call
//! succeeds or fails with an error the relay classifies for the sink's
//! backoff and for re-reads (`SinkError`).

pub mod email;
pub mod everyaction;
mod http;
pub mod redcap;
pub mod webhook;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;

use serde::Serialize;

use crate::domain::Phone;

#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Timeouts, connection errors, 5xx, 429: retry with backoff.
    #[error("{message}")]
    Transient { message: String, retry_after: Option<Duration> },
    /// The sink refuses what we send (bad token, unknown field): retry slowly,
    /// log loudly — an operator has to fix something.
    #[error("{0}")]
    Misconfigured(String),
    /// A write whose outcome is unknown (timed out or cut off after it was
    /// sent, a 5xx or a short count on an import): it may land later. The
    /// relay re-reads and re-writes soon, and again after a late request
    /// could have finished.
    #[error("{0}")]
    Uncertain(String),
    /// Nothing was sent: the caller's deadline (the end of its lease) would
    /// come before the call could finish. Says nothing about the sink's
    /// health; the rows go back for the next pass.
    #[error("the lease would run out before the call could finish; nothing was sent")]
    OutOfTime,
}

/// A configured sink: its name (in the queue, metrics, logs, the admin API
/// and the CLI), the scopes it follows and what it is.
pub struct Sink {
    pub name: String,
    /// `None`: every scope.
    pub scopes: Option<Vec<String>>,
    pub kind: SinkKind,
}

pub enum SinkKind {
    Redcap {
        sink: redcap::RedcapSink,
        /// How often every opted-out phone is checked against the project; zero: never.
        resync_interval: Duration,
    },
    Email {
        sink: email::EmailSink,
        /// A sink failing longer than this is reported by mail.
        alert_after: Duration,
        /// How long a notification waits for the other sinks' outcome.
        report_wait: Duration,
    },
    /// EveryAction / NGP VAN, one committee.
    EveryAction {
        sink: everyaction::EveryActionSink,
        /// Only mapping rows of this committee; `None`: every row.
        committee_id: Option<u64>,
    },
    Webhook {
        sink: webhook::WebhookSink,
    },
}

impl SinkKind {
    pub async fn probe(&self) -> Result<(), SinkError> {
        match self {
            SinkKind::Redcap { sink, .. } => sink.probe().await,
            SinkKind::Email { sink, .. } => sink.probe().await,
            SinkKind::EveryAction { sink, .. } => sink.probe().await,
            SinkKind::Webhook { sink } => sink.probe().await,
        }
    }
}

/// What a converging sink did with a batch: `done` holds the sink's
/// account of each item it brought to its target, in order, from the
/// first; the items after them are not done, and `error` says why
/// (`OutOfTime`: not started, the caller's deadline was near).
#[derive(Debug)]
pub struct Converged {
    pub done: Vec<Value>,
    pub error: Option<SinkError>,
}

impl From<Result<Vec<Value>, SinkError>> for Converged {
    /// A sink that does a batch all or nothing.
    fn from(r: Result<Vec<Value>, SinkError>) -> Converged {
        match r {
            Ok(done) => Converged { done, error: None },
            Err(error) => Converged { done: Vec::new(), error: Some(error) },
        }
    }
}

impl Sink {
    /// How many phones to claim at once. Email sends one message per phone,
    /// so its batches stay small enough to finish well inside a lease.
    pub fn batch_size(&self, configured: u32) -> u32 {
        match self.kind {
            SinkKind::Redcap { .. } => configured,
            SinkKind::Email { .. } => configured.min(20),
            // One call (or more) per phone, spaced by the sink's limiter:
            // small batches finish well inside a lease and settle often.
            SinkKind::EveryAction { .. } | SinkKind::Webhook { .. } => configured.min(20),
        }
    }

    /// Asks the sink whether it works, reading, never writing: how a
    /// failing sink with nothing waiting finds out it works again.
    pub async fn probe(&self) -> Result<(), SinkError> {
        self.kind.probe().await
    }

    pub fn type_name(&self) -> &'static str {
        match self.kind {
            SinkKind::Redcap { .. } => "redcap",
            SinkKind::Email { .. } => "email",
            SinkKind::EveryAction { .. } => "everyaction",
            SinkKind::Webhook { .. } => "webhook",
        }
    }
}

// ---------------------------------------------------------------------------
// Converge model (issue #8). The relay computes what each sink should hold
// for a phone and hands it to the sink; sinks know nothing of the store.
// ---------------------------------------------------------------------------

/// What a sink should hold for one phone: the opt-out list's current state
/// as the sink's scopes see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Target {
    /// Opted out since `since` (when that opt-out began): REDCap stamps it.
    OptedOut { since: DateTime<Utc> },
    /// Opted in: REDCap clears what we stamped.
    OptedIn,
}

impl Target {
    pub fn is_opted_out(&self) -> bool {
        matches!(self, Target::OptedOut { .. })
    }
}

/// One phone to bring to its target.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub phone: Phone,
    pub target: Target,
}

/// The message that caused a change, for the notification email.
#[derive(Debug, Clone)]
pub struct Cause {
    pub body: String,
    /// MessagingServiceSid, To number, or `organisation` for staff/imports.
    pub scope: String,
    /// `twilio`, `staff:NAME`, …
    pub source: String,
    /// When the person said it.
    pub said_at: DateTime<Utc>,
}

/// What another sink did with a change, as the email reports it.
#[derive(Debug, Clone)]
pub struct SinkReport {
    pub sink: String,
    pub outcome: ReportOutcome,
}

#[derive(Debug, Clone)]
pub enum ReportOutcome {
    /// The sink holds the target; `detail` is the sink's own account (records written…).
    Applied { at: DateTime<Utc>, detail: Option<Value> },
    /// Still trying; `error` is the last failure, if any.
    Waiting { since: DateTime<Utc>, error: Option<String> },
    /// Dead-lettered after `relay.max_age`: an operator must act.
    GaveUp { error: String },
}

/// A change of one phone's target, reported by email with what every other
/// sink did for it.
#[derive(Debug, Clone)]
pub struct Notification {
    pub phone: Phone,
    pub target: Target,
    pub cause: Option<Cause>,
    pub others: Vec<SinkReport>,
}

/// A sink that has been failing longer than the configured alert time
/// (`recovered: false`), or that works again after such an alert (`true`).
#[derive(Debug, Clone)]
pub struct Alert {
    pub sink: String,
    pub failing_since: DateTime<Utc>,
    pub error: String,
    /// Phones waiting for this sink.
    pub waiting: u64,
    pub recovered: bool,
}

/// A message held for staff review (a possible revocation in free text),
/// as the email sink reports it.
#[derive(Debug, Clone)]
pub struct ReviewItem {
    pub id: i64,
    pub phone: Phone,
    pub body: String,
    /// When the person said it.
    pub said_at: DateTime<Utc>,
    pub scope: String,
    /// The review word or phrase it matched.
    pub matched: String,
}
