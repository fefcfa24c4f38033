//! What lists need from the store beyond recording (which is
//! `record_events`, the same path as webhooks): which import rows are known
//! already (a dry run), and the opted-out states streamed for an export.

use std::collections::HashSet;

use futures_util::StreamExt;
use sqlx::QueryBuilder;
use tokio::sync::mpsc;

use super::{decode_rows, on_pool, Pool, Store, StoreError};
use crate::domain::{Phone, ORGANISATION_SCOPE};
use crate::store::StateRow;

/// A state with the source of the event that set it: a row of an export.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SourcedState {
    #[sqlx(flatten)]
    pub state: StateRow,
    pub source: String,
}

const SOURCED: &str = "SELECT s.scope, s.phone, s.opted_out, s.event_id, s.changed_at, s.since, e.source \
                       FROM opt_out_state s JOIN events e ON e.id = s.event_id";

impl Store {
    /// Which of these MessageSids are recorded already (one query).
    pub async fn known_message_sids(&self, sids: &[&str]) -> Result<HashSet<String>, StoreError> {
        if sids.is_empty() {
            return Ok(HashSet::new());
        }
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new("SELECT message_sid FROM events WHERE message_sid IN (");
            let mut list = q.separated(", ");
            for s in sids {
                list.push_bind(*s);
            }
            q.push(")");
            let known: Vec<String> = q.build_query_scalar().fetch_all(pool).await?;
            Ok(known.into_iter().collect())
        })
    }

    /// Every scope's state of each of these phones, by phone and scope, in
    /// one query whose text does not grow with the batch: the phones go in
    /// as one array (PostgreSQL `= ANY($1)`, SQLite `json_each($1)`), where
    /// an `IN` list of 10,000 placeholders would cost PostgreSQL more to plan
    /// than to run.
    pub async fn states_of_many(&self, phones: &[Phone]) -> Result<Vec<StateRow>, StoreError> {
        if phones.is_empty() {
            return Ok(Vec::new());
        }
        let list: Vec<&str> = phones.iter().map(Phone::as_str).collect();
        match &self.pool {
            Pool::Postgres(pool) => {
                let rows = sqlx::query(
                    "SELECT scope, phone, opted_out, event_id, changed_at, since FROM opt_out_state \
                     WHERE phone = ANY($1) ORDER BY phone, scope",
                )
                .bind(&list)
                .fetch_all(pool)
                .await?;
                decode_rows!(rows, StateRow, "opt_out_state")
            }
            Pool::Sqlite(pool) => {
                let json = serde_json::to_string(&list).map_err(|e| StoreError::Query(e.to_string()))?;
                let rows = sqlx::query(
                    "SELECT scope, phone, opted_out, event_id, changed_at, since FROM opt_out_state \
                     WHERE phone IN (SELECT value FROM json_each($1)) ORDER BY phone, scope",
                )
                .bind(json)
                .fetch_all(pool)
                .await?;
                decode_rows!(rows, StateRow, "opt_out_state")
            }
        }
    }

    /// Sends every state of every phone that may be opted out (in `scope`
    /// and organisation-wide, or anywhere without one), by phone then scope,
    /// with the source of its event, as the database streams them: a
    /// million rows never sit in memory. Stops early when `tx` is closed
    /// (the client went away).
    pub async fn send_states_for_export(
        &self,
        scope: Option<&str>,
        tx: &mpsc::Sender<Result<SourcedState, StoreError>>,
    ) {
        let filter = match scope {
            None => " WHERE s.phone IN (SELECT phone FROM opt_out_state WHERE opted_out) ORDER BY s.phone, s.scope",
            Some(_) => {
                " WHERE s.scope IN ($1, $2) AND s.phone IN \
                 (SELECT phone FROM opt_out_state WHERE opted_out AND scope IN ($1, $2)) \
                 ORDER BY s.phone, s.scope"
            }
        };
        let sql = format!("{SOURCED}{filter}");
        on_pool!(self, pool => {
            let mut query = sqlx::query(&sql);
            if let Some(scope) = scope {
                query = query.bind(scope).bind(ORGANISATION_SCOPE);
            }
            let mut rows = query.fetch(pool);
            while let Some(row) = rows.next().await {
                let decoded = row.map_err(StoreError::from).and_then(|r| {
                    <SourcedState as sqlx::FromRow<'_, _>>::from_row(&r)
                        .map_err(|e| StoreError::Corrupt(format!("opt_out_state row: {e}")))
                });
                let stop = decoded.is_err();
                if tx.send(decoded).await.is_err() || stop {
                    return;
                }
            }
        });
    }
}
