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

impl NewEvent {
    /// The event as the store can hold it: every U+0000 (which PostgreSQL's
    /// text and jsonb refuse, so the event could never commit) replaced by
    /// U+FFFD, in the text fields and anywhere in `params`. The HTTP edge
    /// does this already; this covers every other way in (CLI, imports).
    pub(super) fn storable(&self) -> Option<NewEvent> {
        let texts = [&self.scope, &self.from_raw, &self.body, &self.source];
        let optional = [&self.account_sid, &self.messaging_service_sid, &self.to];
        let nul = texts.iter().any(|t| t.contains('\0'))
            || optional.iter().any(|t| t.as_deref().is_some_and(|t| t.contains('\0')))
            || has_nul(&self.params);
        if !nul {
            return None;
        }
        let clean = |s: &String| crate::domain::storable(s.clone());
        Some(NewEvent {
            account_sid: self.account_sid.as_ref().map(clean),
            messaging_service_sid: self.messaging_service_sid.as_ref().map(clean),
            scope: clean(&self.scope),
            from_raw: clean(&self.from_raw),
            to: self.to.as_ref().map(clean),
            body: clean(&self.body),
            params: storable_json(&self.params),
            source: clean(&self.source),
            ..self.clone()
        })
    }
}

fn has_nul(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn storable_json(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(crate::domain::storable(s.clone())),
        Value::Array(items) => Value::Array(items.iter().map(storable_json).collect()),
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (crate::domain::storable(k.clone()), storable_json(v))).collect())
        }
        other => other.clone(),
    }
}

/// What recording one event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Newly recorded with this id (and its deliveries queued).
    Recorded(i64),
    /// Its MessageSid was already recorded: nothing changed.
    Duplicate,
}

/// A sink and the scopes it follows (`None`: every scope): which sinks an
/// event concerns. Organisation-wide events concern every sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkFollow {
    pub sink: String,
    pub scopes: Option<Vec<String>>,
    /// Gets only the changes recorded since the sink was registered: a
    /// notification sink, for which the past is not news. Otherwise every
    /// change is fanned out to it, also one recorded while it was being
    /// registered and backfilled, so none can slip between the two.
    pub since_registered: bool,
}

/// What a sink holds, or should hold, for one phone, as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Held {
    pub opted_out: bool,
    /// When the opt-out began (only when opted out).
    pub since: Option<DateTime<Utc>>,
}

/// A (sink, phone) row claimed by a worker under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedPhone {
    pub id: i64,
    pub phone: Phone,
    /// Settling as done needs this to be unchanged: a newer event bumps it.
    pub generation: i64,
    /// The newest event that made the row pending.
    pub event_id: Option<i64>,
    /// Failed passes since the row became pending.
    pub attempts: i32,
    /// When the row became pending: the clock `relay.max_age` runs on.
    pub queued_at: DateTime<Utc>,
    /// What was last written (`None`: nothing ever).
    pub written: Option<Held>,
    /// The last write's outcome is unknown.
    pub uncertain: bool,
}

/// How a claimed row ends this pass.
#[derive(Debug, Clone)]
pub enum Settle {
    /// The sink holds `held` now; `result` is what the sink said it did
    /// (`None` when no call was needed: the previous result stays).
    Written { held: Held, result: Option<Value> },
    /// A write of `held` may or may not have landed: re-read at both times.
    Uncertain { held: Held, error: String, soon: DateTime<Utc>, late: DateTime<Utc> },
    /// Nothing was written; stays pending (the sink's backoff paces it), or
    /// dead once older than `relay.max_age`.
    Failed { error: String },
    /// Not now (a notification waiting for the other sinks); no attempt used.
    Wait { until: DateTime<Utc> },
}

/// A (sink, phone) row as an operator sees it: what was last written there
/// and whether the relay still has work for it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: i64,
    pub sink: String,
    pub phone: String,
    /// `pending` (work to do), `done` (holds the target), `dead` (given up).
    pub status: String,
    pub event_id: Option<i64>,
    pub attempts: i32,
    pub written_opted_out: Option<bool>,
    #[sqlx(try_from = "OptTs")]
    pub written_since: Option<DateTime<Utc>>,
    #[sqlx(try_from = "OptTs")]
    pub written_at: Option<DateTime<Utc>>,
    /// The last write's outcome is unknown; a re-read is scheduled.
    pub uncertain: bool,
    pub last_error: Option<String>,
    /// What the sink said it changed (e.g. REDCap record ids).
    #[schema(value_type = Option<Object>)]
    #[sqlx(json(nullable))]
    pub result: Option<Value>,
    #[sqlx(try_from = "Ts")]
    pub next_attempt_at: DateTime<Utc>,
    #[sqlx(try_from = "OptTs")]
    pub recheck_at: Option<DateTime<Utc>>,
    #[sqlx(try_from = "Ts")]
    pub queued_at: DateTime<Utc>,
    #[sqlx(try_from = "Ts")]
    pub updated_at: DateTime<Utc>,
}

impl DeliveryRow {
    pub fn written(&self) -> Option<Held> {
        self.written_opted_out.map(|opted_out| Held { opted_out, since: self.written_since })
    }
}

/// A sink's health and queue, for `/v1/sinks`, `status` and metrics.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct SinkRow {
    pub name: String,
    /// `ok`, `backing_off` or `misconfigured`.
    pub health: String,
    /// When the current run of failures began.
    #[sqlx(try_from = "OptTs")]
    pub failing_since: Option<DateTime<Utc>>,
    pub backoff_step: i32,
    #[sqlx(try_from = "OptTs")]
    pub next_probe_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    #[sqlx(try_from = "OptTs")]
    pub alerted_at: Option<DateTime<Utc>>,
    #[sqlx(try_from = "OptTs")]
    pub resynced_at: Option<DateTime<Utc>>,
    #[sqlx(try_from = "Ts")]
    pub created_at: DateTime<Utc>,
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
    /// When the person said what set this state (its newest event).
    #[sqlx(rename = "changed_at", try_from = "Ts")]
    pub said_at: DateTime<Utc>,
    /// When the current value began (a second STOP does not move it).
    #[sqlx(try_from = "Ts")]
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

/// Filters for listing (sink, phone) rows; `after_id` pages (ids ascending).
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub status: Option<String>,
    pub sink: Option<String>,
    pub phone: Option<String>,
    pub after_id: Option<i64>,
    pub limit: i64,
}

/// What asking to retry one row did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    Requeued,
    NotFound,
    /// A leased row is in a worker's hands.
    NotRetryable,
}

/// The queue of one sink, for metrics and `/v1/sinks`.
#[derive(Debug, Clone, Serialize, Default)]
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
