//! Durable storage: events, the current opt-out state, and the delivery queue.
//!
//! One small interface over two backends: PostgreSQL for production and an
//! embedded SQLite file as the zero-setup default. A plain enum rather than
//! a trait object: two variants, no `async_trait`, and the compiler checks
//! that every method exists for both.

pub mod batch;
mod postgres;
mod sqlite;

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::Value;

use crate::config::DatabaseConfig;
use crate::domain::{EventKind, MessageSid, Phone};

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

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

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or gave no connection in time: retryable.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store query failed: {0}")]
    Query(String),
    #[error("migration failed: {0}")]
    Migrate(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                StoreError::Unavailable(e.to_string())
            }
            other => StoreError::Query(other.to_string()),
        }
    }
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
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
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
    pub result: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// An event as an operator sees it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EventRow {
    pub id: i64,
    pub message_sid: String,
    pub scope: String,
    pub phone: String,
    pub kind: String,
    pub body: String,
    pub source: String,
    pub received_at: DateTime<Utc>,
}

/// The current opt-out state of a phone in one scope.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StateRow {
    pub scope: String,
    pub phone: String,
    pub opted_out: bool,
    /// When the event that set this state arrived.
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

#[derive(Clone)]
pub enum Store {
    Postgres(PgStore),
    Sqlite(SqliteStore),
}

impl Store {
    /// Opens a pool without connecting yet, so the service can start (and
    /// report not-ready) while the database is still coming up.
    pub fn connect_lazy(cfg: &DatabaseConfig) -> Result<Store, StoreError> {
        let url = cfg.url.expose_secret();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            PgStore::connect_lazy(url, cfg.max_connections, cfg.acquire_timeout).map(Store::Postgres)
        } else if url.starts_with("sqlite:") {
            SqliteStore::connect_lazy(url, cfg.max_connections, cfg.acquire_timeout).map(Store::Sqlite)
        } else {
            Err(StoreError::Query("database.url must be postgres://… or sqlite:…".into()))
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(s) => s.migrate().await,
            Store::Sqlite(s) => s.migrate().await,
        }
    }

    pub async fn readiness(&self) -> Readiness {
        match self {
            Store::Postgres(s) => s.readiness().await,
            Store::Sqlite(s) => s.readiness().await,
        }
    }

    /// Records events, their state change and one pending delivery per sink,
    /// all in one transaction. Idempotent per MessageSid.
    pub async fn record_events(&self, events: &[NewEvent], sinks: &[&str]) -> Result<Vec<RecordOutcome>, StoreError> {
        match self {
            Store::Postgres(s) => s.record_events(events, sinks).await,
            Store::Sqlite(s) => s.record_events(events, sinks).await,
        }
    }

    /// Claims up to `limit` due deliveries of `sink`: at most one per phone,
    /// and only a phone's oldest pending one, so changes apply in order. With
    /// `wait_for_other_sinks`, a delivery also waits until its event's
    /// deliveries to other sinks are no longer pending (a report of them).
    pub async fn claim(
        &self,
        sink: &str,
        owner: &str,
        limit: u32,
        lease: Duration,
        wait_for_other_sinks: bool,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
        match self {
            Store::Postgres(s) => s.claim(sink, owner, limit, now, until, wait_for_other_sinks).await,
            Store::Sqlite(s) => s.claim(sink, owner, limit, now, until, wait_for_other_sinks).await,
        }
    }

    /// Ends an attempt. Returns false when the lease was lost meanwhile (the
    /// row was re-claimed by another worker), in which case nothing changes.
    pub async fn settle(&self, id: i64, owner: &str, how: &Settle) -> Result<bool, StoreError> {
        Ok(self.settle_many(owner, &[(id, how.clone())]).await? == 1)
    }

    /// Ends a batch of attempts in one transaction; returns how many were
    /// still held by `owner` (the others were re-claimed after a lost lease).
    pub async fn settle_many(&self, owner: &str, settles: &[(i64, Settle)]) -> Result<u64, StoreError> {
        if settles.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Postgres(s) => s.settle_many(owner, settles, Utc::now()).await,
            Store::Sqlite(s) => s.settle_many(owner, settles, Utc::now()).await,
        }
    }

    /// Puts dead deliveries back in the queue, due now. Returns how many.
    pub async fn replay_dead(&self, sink: Option<&str>) -> Result<u64, StoreError> {
        match self {
            Store::Postgres(s) => s.replay_dead(sink, Utc::now()).await,
            Store::Sqlite(s) => s.replay_dead(sink, Utc::now()).await,
        }
    }

    /// Deliveries in a status, oldest first (operators, tests).
    pub async fn deliveries(&self, status: Option<&str>, limit: i64) -> Result<Vec<DeliveryRow>, StoreError> {
        let filter = DeliveryFilter { status: status.map(str::to_owned), limit, ..DeliveryFilter::default() };
        self.list_deliveries(&filter).await
    }

    pub async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        match self {
            Store::Postgres(s) => s.list_deliveries(f).await,
            Store::Sqlite(s) => s.list_deliveries(f).await,
        }
    }

    pub async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        match self {
            Store::Postgres(s) => s.list_events(f).await,
            Store::Sqlite(s) => s.list_events(f).await,
        }
    }

    /// Every scope's current state for a phone.
    pub async fn states(&self, phone: &Phone) -> Result<Vec<StateRow>, StoreError> {
        match self {
            Store::Postgres(s) => s.states(phone).await,
            Store::Sqlite(s) => s.states(phone).await,
        }
    }

    /// Re-queues one dead (or waiting, unleased) delivery, due now.
    pub async fn retry_delivery(&self, id: i64) -> Result<RetryOutcome, StoreError> {
        match self {
            Store::Postgres(s) => s.retry_delivery(id, Utc::now()).await,
            Store::Sqlite(s) => s.retry_delivery(id, Utc::now()).await,
        }
    }

    /// Per sink: pending deliveries, creation time of the oldest pending one, dead ones.
    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        match self {
            Store::Postgres(s) => s.queue_stats().await,
            Store::Sqlite(s) => s.queue_stats().await,
        }
    }

    /// Number of recorded events (operators' checks, tests).
    pub async fn event_count(&self) -> Result<i64, StoreError> {
        match self {
            Store::Postgres(s) => s.event_count().await,
            Store::Sqlite(s) => s.event_count().await,
        }
    }

    /// Current opt-out state of (scope, phone), if any event set it.
    pub async fn opted_out(&self, scope: &str, phone: &Phone) -> Result<Option<bool>, StoreError> {
        match self {
            Store::Postgres(s) => s.opted_out(scope, phone).await,
            Store::Sqlite(s) => s.opted_out(scope, phone).await,
        }
    }

    pub async fn close(&self) {
        match self {
            Store::Postgres(s) => s.close().await,
            Store::Sqlite(s) => s.close().await,
        }
    }
}

/// Deduplicates a batch by MessageSid (first wins) and returns, for each
/// input, the index of the event that represents it.
pub(crate) fn dedupe(events: &[NewEvent]) -> (Vec<usize>, Vec<usize>) {
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut unique = Vec::new();
    let mut rep = Vec::with_capacity(events.len());
    for (i, e) in events.iter().enumerate() {
        let idx = *first.entry(e.message_sid.as_str()).or_insert_with(|| {
            unique.push(i);
            i
        });
        rep.push(idx);
    }
    (unique, rep)
}

/// Maps per-unique outcomes back to every input: the first occurrence of a
/// MessageSid gets its outcome, later copies in the same batch are duplicates.
pub(crate) fn spread(
    events_len: usize,
    rep: &[usize],
    inserted: &std::collections::HashMap<usize, i64>,
) -> Vec<RecordOutcome> {
    (0..events_len)
        .map(|i| match inserted.get(&i) {
            Some(id) if rep[i] == i => RecordOutcome::Recorded(*id),
            _ => RecordOutcome::Duplicate,
        })
        .collect()
}
