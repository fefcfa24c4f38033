//! Review items: messages that read like a revocation without being a
//! keyword ("please stop texting me"), held for staff to decide.
//!
//! An item is recorded in one statement, idempotent per MessageSid (a
//! retried webhook, or the same message by Event Streams or reconciliation,
//! makes no second item). Nothing is relayed for it until staff decide: an
//! `opt_out` decision records a staff event (through the same path as any
//! other) and links it here; the decision itself is one conditional update,
//! so deciding twice is refused, never applied twice.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::types::Json;

use super::codec::{OptTs, Ts};
use super::{decode_rows, on_pool, NewEvent, RecordOutcome, Store, StoreError};

/// A review item to record: the event it would be if staff decide it is an
/// opt-out (kind `opt_out`), and the review phrase it matched.
#[derive(Debug, Clone)]
pub struct NewReview {
    pub event: NewEvent,
    pub matched: String,
}

/// A review item as staff see it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct ReviewRow {
    pub id: i64,
    /// E.164.
    pub phone: String,
    /// The message as the person wrote it.
    pub body: String,
    /// When the person said it: the FCC's 10-business-day clock runs from here.
    #[sqlx(rename = "said_at", try_from = "Ts")]
    pub time: DateTime<Utc>,
    /// Where an opt-out would apply (a Messaging Service, a number, `organisation`).
    pub scope: String,
    /// The review word or phrase the body matched.
    pub matched: String,
    pub message_sid: String,
    /// The endpoint it came by: `twilio`, `event_streams`, `reconcile`.
    pub source: String,
    /// `pending`, `opted_out` or `dismissed`.
    pub status: String,
    #[sqlx(try_from = "OptTs")]
    pub decided_at: Option<DateTime<Utc>>,
    pub note: Option<String>,
    /// The staff opt-out an `opt_out` decision recorded.
    pub event_id: Option<i64>,
}

const REVIEW_COLUMNS: &str = "SELECT id, phone, body, said_at, scope, matched, message_sid, source, status, \
                              decided_at, note, event_id FROM reviews";

/// A staff decision on a review item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Recorded as an opt-out: the staff event's id.
    OptedOut(i64),
    Dismissed,
}

/// What deciding did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decided {
    Decided,
    NotFound,
    /// Decided before (the stored status).
    AlreadyDecided(String),
}

/// Pending items and the age of the oldest, for the metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReviewStats {
    pub pending: i64,
    pub oldest: Option<DateTime<Utc>>,
}

impl Store {
    /// Records a review item; `Duplicate` when its MessageSid already has one.
    pub async fn record_review(&self, review: &NewReview) -> Result<RecordOutcome, StoreError> {
        let e = review.event.storable().unwrap_or_else(|| review.event.clone());
        let matched = crate::domain::storable(review.matched.clone());
        let id: Option<i64> = on_pool!(self, pool => sqlx::query_scalar(
            "INSERT INTO reviews (message_sid, account_sid, messaging_service_sid, scope, phone, from_raw,
                                  to_number, body, matched, params, source, said_at, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (message_sid) DO NOTHING
             RETURNING id",
        )
        .bind(e.message_sid.as_str())
        .bind(e.account_sid.as_deref())
        .bind(e.messaging_service_sid.as_deref())
        .bind(&e.scope)
        .bind(e.phone.as_str())
        .bind(&e.from_raw)
        .bind(e.to.as_deref())
        .bind(&e.body)
        .bind(&matched)
        .bind(Json(&e.params))
        .bind(&e.source)
        .bind(Ts(e.received_at))
        .bind(Ts(Utc::now()))
        .fetch_optional(pool)
        .await)?;
        Ok(id.map_or(RecordOutcome::Duplicate, RecordOutcome::Recorded))
    }

    /// Pending items, the longest waiting first.
    pub async fn pending_reviews(&self, limit: i64) -> Result<Vec<ReviewRow>, StoreError> {
        on_pool!(self, pool => {
            let sql = format!("{REVIEW_COLUMNS} WHERE status = 'pending' ORDER BY said_at, id LIMIT $1");
            let rows = sqlx::query(&sql).bind(limit).fetch_all(pool).await?;
            decode_rows!(rows, ReviewRow, "reviews")
        })
    }

    pub async fn review(&self, id: i64) -> Result<Option<ReviewRow>, StoreError> {
        on_pool!(self, pool => {
            let sql = format!("{REVIEW_COLUMNS} WHERE id = $1");
            let rows = sqlx::query(&sql).bind(id).fetch_all(pool).await?;
            decode_rows!(rows, ReviewRow, "reviews")
        })
        .map(|mut rows| rows.pop())
    }

    /// Decides a pending item, once: a second decision finds it decided.
    pub async fn decide_review(&self, id: i64, decision: Decision, note: Option<&str>) -> Result<Decided, StoreError> {
        let (status, event_id) = match decision {
            Decision::OptedOut(event) => ("opted_out", Some(event)),
            Decision::Dismissed => ("dismissed", None),
        };
        let note = note.map(|n| crate::domain::storable(n.to_owned()));
        let updated = on_pool!(self, pool => sqlx::query(
            "UPDATE reviews SET status = $2, decided_at = $3, note = $4, event_id = $5
              WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .bind(status)
        .bind(Ts(Utc::now()))
        .bind(note.as_deref())
        .bind(event_id)
        .execute(pool)
        .await
        .map(|r| r.rows_affected()))?;
        if updated == 1 {
            return Ok(Decided::Decided);
        }
        Ok(match self.review(id).await? {
            None => Decided::NotFound,
            Some(r) => Decided::AlreadyDecided(r.status),
        })
    }

    /// The id of the event recorded under `message_sid`, if any.
    pub async fn event_id_of(&self, message_sid: &str) -> Result<Option<i64>, StoreError> {
        Ok(on_pool!(self, pool => sqlx::query_scalar("SELECT id FROM events WHERE message_sid = $1")
            .bind(message_sid)
            .fetch_optional(pool)
            .await)?)
    }

    pub async fn review_stats(&self) -> Result<ReviewStats, StoreError> {
        let (pending, oldest): (i64, OptTs) = on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*), MIN(said_at) FROM reviews WHERE status = 'pending'",
        )
        .fetch_one(pool)
        .await)?;
        Ok(ReviewStats { pending, oldest: oldest.0 })
    }

    /// Takes up to `limit` items no email sink was handed yet, oldest
    /// first, stamping them so another replica does not take them too.
    pub async fn claim_review_notices(&self, limit: i64) -> Result<Vec<ReviewRow>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "UPDATE reviews SET notified_at = $2
                  WHERE notified_at IS NULL
                    AND id IN (SELECT id FROM reviews WHERE notified_at IS NULL ORDER BY id LIMIT $1)
                 RETURNING id, phone, body, said_at, scope, matched, message_sid, source, status,
                           decided_at, note, event_id",
            )
            .bind(limit)
            .bind(Ts(Utc::now()))
            .fetch_all(pool)
            .await?;
            decode_rows!(rows, ReviewRow, "reviews")
        })
        .map(|mut rows| {
            rows.sort_by_key(|r| r.id);
            rows
        })
    }

    /// Gives claimed items back (the mail could not be sent): the next pass takes them again.
    pub async fn release_review_notices(&self, ids: &[i64]) -> Result<(), StoreError> {
        for id in ids {
            on_pool!(self, pool => sqlx::query("UPDATE reviews SET notified_at = NULL WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .map(|_| ()))?;
        }
        Ok(())
    }
}
