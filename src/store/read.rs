//! What operators (and the email report) read: events, deliveries, states.
//!
//! Filters are added to the statement only when given, never as
//! `($n IS NULL OR col = $n)`: a catch-all cannot use an index, and these
//! lookups must stay milliseconds as the history grows. Each filter has an
//! index: events by (phone, id); deliveries by (event_id, sink), by phone
//! through the events index, and by status through the due and dead indexes;
//! states by phone.

use sqlx::QueryBuilder;

use super::{decode_rows, on_pool, DeliveryFilter, DeliveryRow, EventFilter, EventRow, StateRow, Store, StoreError};
use crate::domain::Phone;

const EVENT_COLUMNS: &str = "SELECT id, message_sid, scope, phone, kind, body, source, received_at FROM events";
const DELIVERY_COLUMNS: &str = "SELECT id, event_id, sink, phone, kind, status, attempts, last_error, result, \
                                created_at, next_attempt_at, completed_at FROM deliveries";

impl Store {
    /// Events matching the filter, oldest first, after `after_id`.
    pub async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(EVENT_COLUMNS);
            q.push(" WHERE id > ").push_bind(f.after_id.unwrap_or(0));
            if let Some(phone) = &f.phone {
                q.push(" AND phone = ").push_bind(phone.as_str());
            }
            if let Some(kind) = &f.kind {
                q.push(" AND kind = ").push_bind(kind.as_str());
            }
            if let Some(since) = f.since {
                q.push(" AND received_at >= ").push_bind(super::codec::Ts(since));
            }
            q.push(" ORDER BY id LIMIT ").push_bind(f.limit);
            let rows = q.build().fetch_all(pool).await?;
            decode_rows!(rows, EventRow, "events")
        })
    }

    /// A phone's newest `limit` events, newest first.
    pub async fn recent_events(&self, phone: &Phone, limit: i64) -> Result<Vec<EventRow>, StoreError> {
        on_pool!(self, pool => {
            let sql = format!("{EVENT_COLUMNS} WHERE phone = $1 ORDER BY id DESC LIMIT $2");
            let rows = sqlx::query(&sql).bind(phone.as_str()).bind(limit).fetch_all(pool).await?;
            decode_rows!(rows, EventRow, "events")
        })
    }

    /// Deliveries matching the filter, oldest first, after `after_id`.
    pub async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(DELIVERY_COLUMNS);
            q.push(" WHERE id > ").push_bind(f.after_id.unwrap_or(0));
            if let Some(event_id) = f.event_id {
                q.push(" AND event_id = ").push_bind(event_id);
            }
            match f.status.as_deref() {
                // Known statuses as literals: SQLite uses a partial index only when the
                // query spells its predicate (`status = 'dead'`), never for a parameter.
                Some(status @ ("pending" | "dead" | "done")) => {
                    q.push(" AND status = '").push(status).push("'");
                }
                Some(other) => {
                    q.push(" AND status = ").push_bind(other);
                }
                None => {}
            }
            if let Some(sink) = &f.sink {
                q.push(" AND sink = ").push_bind(sink.as_str());
            }
            if let Some(phone) = &f.phone {
                // Through the events' phone index: the deliveries' own phone
                // index leads with the sink.
                q.push(" AND event_id IN (SELECT e.id FROM events e WHERE e.phone = ").push_bind(phone.as_str());
                q.push(")");
            }
            q.push(" ORDER BY id LIMIT ").push_bind(f.limit);
            let rows = q.build().fetch_all(pool).await?;
            decode_rows!(rows, DeliveryRow, "deliveries")
        })
    }

    /// Every delivery of these events, oldest first.
    pub async fn deliveries_of_events(&self, event_ids: &[i64]) -> Result<Vec<DeliveryRow>, StoreError> {
        if event_ids.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(DELIVERY_COLUMNS);
            q.push(" WHERE event_id IN (");
            let mut ids = q.separated(", ");
            for id in event_ids {
                ids.push_bind(*id);
            }
            q.push(") ORDER BY id");
            let rows = q.build().fetch_all(pool).await?;
            decode_rows!(rows, DeliveryRow, "deliveries")
        })
    }

    /// Every scope's current state for a phone.
    pub async fn states(&self, phone: &Phone) -> Result<Vec<StateRow>, StoreError> {
        on_pool!(self, pool => {
            let rows = sqlx::query(
                "SELECT scope, phone, opted_out, event_id, changed_at FROM opt_out_state WHERE phone = $1 ORDER BY scope",
            )
            .bind(phone.as_str())
            .fetch_all(pool)
            .await?;
            decode_rows!(rows, StateRow, "opt_out_state")
        })
    }
}
