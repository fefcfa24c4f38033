//! The store's values: what goes in (`NewEvent`), what operators and the
//! relay read back (rows), and the filters and outcomes of its calls.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use super::codec::{OptTs, Ts};
use crate::domain::{EventKind, MessageSid, Phone};

/// An event to record (from a webhook or, later, from staff).
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub message_sid: MessageSid,
    pub account_sid: Option<String>,
    pub messaging_service_sid: Option<String>,
    pub scope: String,
    pub phone: Phone,
    pub from_raw: String,
    pub to: Option<String>,
    pub kind: EventKind,
    pub body: String,
    pub params: Value,
    pub received_at: DateTime<Utc>,
    /// `twilio` for webhooks; `staff:<who>` for revocations recorded by hand.
    pub source: String,
}

/// What recording one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Newly recorded with this id (and its deliveries queued).
    Recorded(i64),
    /// Its MessageSid was already recorded: nothing changed.
    Duplicate,
}

/// A delivery claimed by a worker under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub event_id: i64,
    pub phone: Phone,
    pub kind: EventKind,
    /// Attempts including this one.
    pub attempts: i32,
    pub received_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// When the delivery last entered the queue (created, or re-queued by an
    /// operator): the clock `relay.max_age` runs on.
    pub queued_at: DateTime<Utc>,
    /// A newer delivery for the same (sink, phone) is already done: applying
    /// this one would undo it (a STOP replayed after a later START).
    pub superseded: bool,
}

/// How a claimed delivery ends this attempt.
#[derive(Debug, Clone)]
pub enum Settle {
    Done(Value),
    Retry { at: DateTime<Utc>, error: String },
    Dead(String),
}

/// A delivery as an operator sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: i64,
    pub event_id: i64,
    pub sink: String,
    pub phone: String,
    pub kind: String,
    pub status: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    /// What the sink changed (e.g. REDCap record ids), once done.
    #[schema(value_type = Option<Object>)]
    #[sqlx(json(nullable))]
    pub result: Option<Value>,
    #[sqlx(try_from = "Ts")]
    pub created_at: DateTime<Utc>,
    #[sqlx(try_from = "Ts")]
    pub next_attempt_at: DateTime<Utc>,
    #[sqlx(try_from = "OptTs")]
    pub completed_at: Option<DateTime<Utc>>,
}

/// An event as an operator sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub message_sid: String,
    pub scope: String,
    pub phone: String,
    pub kind: String,
    pub body: String,
    pub source: String,
    #[sqlx(try_from = "Ts")]
    pub received_at: DateTime<Utc>,
}

/// The current opt-out state of a phone in one scope.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct StateRow {
    pub scope: String,
    pub phone: String,
    pub opted_out: bool,
    /// When the event that set this state arrived.
    #[sqlx(rename = "changed_at", try_from = "Ts")]
    pub since: DateTime<Utc>,
    pub event_id: i64,
}

/// Filters for listing events; `after_id` pages (ids ascending).
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub phone: Option<String>,
    pub kind: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub after_id: Option<i64>,
    pub limit: i64,
}

/// Filters for listing deliveries; `after_id` pages (ids ascending).
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub event_id: Option<i64>,
    pub status: Option<String>,
    pub sink: Option<String>,
    pub phone: Option<String>,
    pub after_id: Option<i64>,
    pub limit: i64,
}

/// What asking to retry one delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Requeued,
    NotFound,
    /// Done deliveries are not re-sent; a leased one is in a worker's hands.
    NotRetryable,
}

/// The queue of one sink, for metrics.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStats {
    pub sink: String,
    pub pending: i64,
    pub oldest_pending: Option<DateTime<Utc>>,
    pub dead: i64,
}

/// Readiness of the store, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub database: bool,
    pub migrations: bool,
}
