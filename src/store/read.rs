//! What operators and the relay read: events, (sink, phone) rows, states.
//!
//! Filters are added to the statement only when given, never as
//! `($n IS NULL OR col = $n)`: a catch-all cannot use an index, and these
//! lookups must stay milliseconds as the history grows. Each filter has an
//! index: events by (phone, id); (sink, phone) rows by phone, by sink and
//! phone, and by status through the due and dead indexes; states by phone.

use sqlx::QueryBuilder;

use super::{decode_rows, on_pool, DeliveryFilter, DeliveryRow, EventFilter, EventRow, StateRow, Store, StoreError};
use crate::domain::Phone;

const EVENT_COLUMNS: &str = "SELECT id, message_sid, scope, phone, kind, body, source, received_at FROM events";
const DELIVERY_COLUMNS: &str = "SELECT id, sink, phone, status, event_id, attempts, written_opted_out, \
                                written_since, written_at, uncertain, last_error, result, next_attempt_at, \
                                recheck_at, queued_at, updated_at FROM sink_phones";
const STATE_COLUMNS: &str = "SELECT scope, phone, opted_out, event_id, changed_at, since FROM opt_out_state";

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
                q.push(" AND phone = ").push_bind(phone.as_str());
            }
            q.push(" ORDER BY id LIMIT ").push_bind(f.limit);
            let rows = q.build().fetch_all(pool).await?;
            decode_rows!(rows, DeliveryRow, "sink_phones")
        })
    }

    /// A phone's row in every sink, by sink.
    pub async fn deliveries_of_phone(&self, phone: &Phone) -> Result<Vec<DeliveryRow>, StoreError> {
        on_pool!(self, pool => {
            let sql = format!("{DELIVERY_COLUMNS} WHERE phone = $1 ORDER BY sink");
            let rows = sqlx::query(&sql).bind(phone.as_str()).fetch_all(pool).await?;
            decode_rows!(rows, DeliveryRow, "sink_phones")
        })
    }

    /// One event, if it exists.
    pub async fn event(&self, id: i64) -> Result<Option<EventRow>, StoreError> {
        let rows = on_pool!(self, pool => {
            let sql = format!("{EVENT_COLUMNS} WHERE id = $1");
            let rows = sqlx::query(&sql).bind(id).fetch_all(pool).await?;
            decode_rows!(rows, EventRow, "events")?
        });
        Ok(rows.into_iter().next())
    }

    /// Every scope's current state for a phone.
    pub async fn states(&self, phone: &Phone) -> Result<Vec<StateRow>, StoreError> {
        self.states_of(std::slice::from_ref(phone)).await
    }

    /// Every scope's current state for each of these phones, by phone and scope.
    pub async fn states_of(&self, phones: &[Phone]) -> Result<Vec<StateRow>, StoreError> {
        if phones.is_empty() {
            return Ok(Vec::new());
        }
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(STATE_COLUMNS);
            q.push(" WHERE phone IN (");
            let mut list = q.separated(", ");
            for p in phones {
                list.push_bind(p.as_str());
            }
            q.push(") ORDER BY phone, scope");
            let rows = q.build().fetch_all(pool).await?;
            decode_rows!(rows, StateRow, "opt_out_state")
        })
    }

    /// Every state of every phone opted out in at least one scope, by phone
    /// and scope: what a resync computes its targets from.
    pub async fn states_of_opted_out(&self) -> Result<Vec<StateRow>, StoreError> {
        on_pool!(self, pool => {
            let sql = format!(
                "{STATE_COLUMNS} WHERE phone IN (SELECT phone FROM opt_out_state WHERE opted_out) ORDER BY phone, scope"
            );
            let rows = sqlx::query(&sql).fetch_all(pool).await?;
            decode_rows!(rows, StateRow, "opt_out_state")
        })
    }
}
