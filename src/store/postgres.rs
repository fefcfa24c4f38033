//! PostgreSQL backend: the production store.
//!
//! A batch of events is written with one `INSERT … SELECT FROM UNNEST(…)` per
//! table, so a commit covers many webhooks for the price of one WAL flush.
//! Claims use `FOR UPDATE SKIP LOCKED` so replicas never take the same row.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::{
    dedupe, spread, ClaimedDelivery, DeliveryFilter, DeliveryRow, EventFilter, EventRow, NewEvent, QueueStats,
    Readiness, RecordOutcome, RetryOutcome, Settle, StateRow, StoreError,
};
use crate::domain::{EventKind, Phone};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub fn connect_lazy(url: &str, max: u32, acquire_timeout: Duration) -> Result<PgStore, StoreError> {
        let opts = PgConnectOptions::from_str(url).map_err(|e| StoreError::Query(format!("bad database url: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire_timeout)
            // A ping before every acquire is a round trip on the webhook's hot
            // path; a broken connection fails its query instead, and the
            // batch writer answers 503 so Twilio retries.
            .test_before_acquire(false)
            .connect_lazy_with(opts);
        Ok(PgStore { pool })
    }

    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| StoreError::Migrate(e.to_string()))
    }

    pub async fn readiness(&self) -> Readiness {
        let database = sqlx::query("SELECT 1").execute(&self.pool).await.is_ok();
        let latest = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        let migrations = database
            && sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success")
                .fetch_one(&self.pool)
                .await
                .is_ok_and(|v| v >= latest);
        Readiness { database, migrations }
    }

    /// One statement, so one round trip and one commit per batch: data-modifying
    /// CTEs insert the events (in arrival order, duplicates skipped), upsert the
    /// newest state per (scope, phone) from what was actually inserted, and queue
    /// one delivery per sink. A single statement is atomic on its own.
    pub async fn record_events(&self, events: &[NewEvent], sinks: &[&str]) -> Result<Vec<RecordOutcome>, StoreError> {
        let (unique, rep) = dedupe(events);
        let pick = |f: &dyn Fn(&NewEvent) -> Option<String>| unique.iter().map(|&i| f(&events[i])).collect::<Vec<_>>();
        let rows = sqlx::query(
            "WITH input AS (
                 SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                      $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[])
                        WITH ORDINALITY AS t(sid, acc, svc, scope, phone, raw, to_number, kind, body, params, at, source, ord)
             ), ins AS (
                 INSERT INTO events (message_sid, account_sid, messaging_service_sid, scope, phone, from_raw,
                                     to_number, kind, body, params, received_at, source)
                 SELECT sid, acc, svc, scope, phone, raw, to_number, kind, body, params::jsonb, at, source
                   FROM input
                  -- Ids follow arrival order: a phone's newest event gets the highest id.
                  ORDER BY ord
                 ON CONFLICT (message_sid) DO NOTHING
                 RETURNING id, message_sid, scope, phone, kind, received_at
             ), newest AS (
                 SELECT DISTINCT ON (scope, phone) scope, phone, kind, id, received_at
                   FROM ins WHERE kind <> 'help'
                  ORDER BY scope, phone, id DESC
             ), state AS (
                 INSERT INTO opt_out_state (scope, phone, opted_out, event_id, changed_at)
                 SELECT scope, phone, kind = 'opt_out', id, received_at FROM newest
                  -- A fixed lock order, so concurrent batches cannot deadlock.
                  ORDER BY scope, phone
                 ON CONFLICT (scope, phone) DO UPDATE
                    SET opted_out = EXCLUDED.opted_out, event_id = EXCLUDED.event_id, changed_at = EXCLUDED.changed_at
                  WHERE opt_out_state.event_id < EXCLUDED.event_id
             ), queued AS (
                 INSERT INTO deliveries (event_id, sink, phone, kind, next_attempt_at, created_at, updated_at)
                 SELECT ins.id, s.sink, ins.phone, ins.kind, $14, $14, $14
                   FROM ins CROSS JOIN UNNEST($13::text[]) AS s(sink)
                  WHERE ins.kind <> 'help'
                  ORDER BY ins.id, s.sink
             )
             SELECT id, message_sid FROM ins",
        )
        .bind(pick(&|e| Some(e.message_sid.as_str().to_owned())))
        .bind(pick(&|e| e.account_sid.clone()))
        .bind(pick(&|e| e.messaging_service_sid.clone()))
        .bind(pick(&|e| Some(e.scope.clone())))
        .bind(pick(&|e| Some(e.phone.as_str().to_owned())))
        .bind(pick(&|e| Some(e.from_raw.clone())))
        .bind(pick(&|e| e.to.clone()))
        .bind(pick(&|e| Some(e.kind.as_str().to_owned())))
        .bind(pick(&|e| Some(e.body.clone())))
        .bind(pick(&|e| Some(e.params.to_string())))
        .bind(unique.iter().map(|&i| events[i].received_at).collect::<Vec<_>>())
        .bind(pick(&|e| Some(e.source.clone())))
        .bind(sinks.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        .bind(Utc::now())
        .fetch_all(&self.pool)
        .await?;

        let index_of: HashMap<&str, usize> = unique.iter().map(|&i| (events[i].message_sid.as_str(), i)).collect();
        let mut inserted: HashMap<usize, i64> = HashMap::new();
        for row in rows {
            let id: i64 = row.try_get(0)?;
            let sid: String = row.try_get(1)?;
            if let Some(&i) = index_of.get(sid.as_str()) {
                inserted.insert(i, id);
            }
        }
        Ok(spread(events.len(), &rep, &inserted))
    }

    pub async fn claim(
        &self,
        sink: &str,
        owner: &str,
        limit: u32,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
        wait_for_other_sinks: bool,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let rows = sqlx::query(
            // The CTE picks and locks at most `limit` rows; the update then
            // touches only those (a join on the primary key, not a table scan).
            "WITH picked AS (
                 SELECT c.id FROM deliveries c
                  WHERE c.sink = $1 AND c.status = 'pending' AND c.next_attempt_at <= $5
                    AND (c.locked_until IS NULL OR c.locked_until < $5)
                    -- Only a phone's oldest pending delivery. A scalar subquery rather than
                    -- NOT EXISTS: on a table without statistics yet the planner turned the
                    -- anti-join into a quadratic scan (1 s per claim at 10,000 pending).
                    AND c.id = (SELECT min(o.id) FROM deliveries o
                                 WHERE o.sink = c.sink AND o.phone = c.phone AND o.status = 'pending')
                    AND NOT ($6 AND EXISTS (SELECT 1 FROM deliveries w
                                             WHERE w.event_id = c.event_id AND w.sink <> c.sink
                                               AND w.status = 'pending'))
                  ORDER BY c.id
                  LIMIT $2
                  FOR UPDATE SKIP LOCKED)
             UPDATE deliveries d
                SET locked_until = $4, locked_by = $3, attempts = d.attempts + 1, updated_at = $5
               FROM picked
              WHERE d.id = picked.id
              RETURNING d.id, d.event_id, d.phone, d.kind, d.attempts, d.created_at,
                        (SELECT e.received_at FROM events e WHERE e.id = d.event_id) AS received_at,
                        EXISTS (SELECT 1 FROM deliveries n
                                 WHERE n.sink = d.sink AND n.phone = d.phone
                                   AND n.status = 'done' AND n.id > d.id) AS superseded",
        )
        .bind(sink)
        .bind(i64::from(limit))
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(wait_for_other_sinks)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let kind: String = r.try_get("kind")?;
            out.push(ClaimedDelivery {
                id: r.try_get("id")?,
                event_id: r.try_get("event_id")?,
                phone: Phone::from_stored(r.try_get("phone")?),
                kind: EventKind::parse(&kind).ok_or_else(|| StoreError::Query(format!("bad kind {kind}")))?,
                attempts: r.try_get("attempts")?,
                received_at: r.try_get("received_at")?,
                created_at: r.try_get("created_at")?,
                superseded: r.try_get("superseded")?,
            });
        }
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    /// Ends attempts in one transaction (one commit for a whole batch).
    /// Returns how many rows this owner still held.
    pub async fn settle_many(
        &self,
        owner: &str,
        settles: &[(i64, Settle)],
        now: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut held = 0;
        for (id, how) in settles {
            let id = *id;
            let q = match how {
                Settle::Done(result) => sqlx::query(
                    "UPDATE deliveries SET status = 'done', result = $3::jsonb, completed_at = $4, updated_at = $4,
                        locked_until = NULL, locked_by = NULL, last_error = NULL
                  WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                )
                .bind(id)
                .bind(owner)
                .bind(result.to_string())
                .bind(now),
                Settle::Retry { at, error } => sqlx::query(
                    "UPDATE deliveries SET next_attempt_at = $3, last_error = $4, updated_at = $5,
                        locked_until = NULL, locked_by = NULL
                  WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                )
                .bind(id)
                .bind(owner)
                .bind(*at)
                .bind(error.as_str())
                .bind(now),
                Settle::Dead(error) => sqlx::query(
                    "UPDATE deliveries SET status = 'dead', last_error = $3, completed_at = $4, updated_at = $4,
                        locked_until = NULL, locked_by = NULL
                  WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                )
                .bind(id)
                .bind(owner)
                .bind(error.as_str())
                .bind(now),
            };
            held += q.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(held)
    }

    pub async fn replay_dead(&self, sink: Option<&str>, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, completed_at = NULL,
                    updated_at = $2, locked_until = NULL, locked_by = NULL
              WHERE status = 'dead' AND ($1::text IS NULL OR sink = $1)",
        )
        .bind(sink)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_id, sink, phone, kind, status, attempts, last_error, result,
                    created_at, next_attempt_at, completed_at
               FROM deliveries
              WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR sink = $2)
                AND ($3::text IS NULL OR phone = $3) AND id > $4 AND ($6::int8 IS NULL OR event_id = $6)
              ORDER BY id LIMIT $5",
        )
        .bind(f.status.as_deref())
        .bind(f.sink.as_deref())
        .bind(f.phone.as_deref())
        .bind(f.after_id.unwrap_or(0))
        .bind(f.limit)
        .bind(f.event_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    sink: r.try_get("sink")?,
                    phone: r.try_get("phone")?,
                    kind: r.try_get("kind")?,
                    status: r.try_get("status")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    result: r.try_get("result")?,
                    created_at: r.try_get("created_at")?,
                    next_attempt_at: r.try_get("next_attempt_at")?,
                    completed_at: r.try_get("completed_at")?,
                })
            })
            .collect()
    }

    pub async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, message_sid, scope, phone, kind, body, source, received_at FROM events
              WHERE ($1::text IS NULL OR phone = $1) AND ($2::text IS NULL OR kind = $2)
                AND ($3::timestamptz IS NULL OR received_at >= $3) AND id > $4
              ORDER BY id LIMIT $5",
        )
        .bind(f.phone.as_deref())
        .bind(f.kind.as_deref())
        .bind(f.since)
        .bind(f.after_id.unwrap_or(0))
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    id: r.try_get("id")?,
                    message_sid: r.try_get("message_sid")?,
                    scope: r.try_get("scope")?,
                    phone: r.try_get("phone")?,
                    kind: r.try_get("kind")?,
                    body: r.try_get("body")?,
                    source: r.try_get("source")?,
                    received_at: r.try_get("received_at")?,
                })
            })
            .collect()
    }

    pub async fn states(&self, phone: &Phone) -> Result<Vec<StateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT scope, phone, opted_out, event_id, changed_at FROM opt_out_state WHERE phone = $1 ORDER BY scope",
        )
        .bind(phone.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StateRow {
                    scope: r.try_get("scope")?,
                    phone: r.try_get("phone")?,
                    opted_out: r.try_get("opted_out")?,
                    event_id: r.try_get("event_id")?,
                    since: r.try_get("changed_at")?,
                })
            })
            .collect()
    }

    pub async fn retry_delivery(&self, id: i64, now: DateTime<Utc>) -> Result<RetryOutcome, StoreError> {
        let done = sqlx::query(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2, completed_at = NULL,
                    updated_at = $2, locked_until = NULL, locked_by = NULL
              WHERE id = $1 AND (status = 'dead' OR (status = 'pending' AND (locked_until IS NULL OR locked_until < $2)))",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(RetryOutcome::Requeued);
        }
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT id FROM deliveries WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(if exists.is_some() { RetryOutcome::NotRetryable } else { RetryOutcome::NotFound })
    }

    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT sink,
                    COUNT(*) FILTER (WHERE status = 'pending') AS pending,
                    MIN(created_at) FILTER (WHERE status = 'pending') AS oldest,
                    COUNT(*) FILTER (WHERE status = 'dead') AS dead
               FROM deliveries WHERE status IN ('pending', 'dead') GROUP BY sink",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QueueStats {
                    sink: r.try_get("sink")?,
                    pending: r.try_get("pending")?,
                    oldest_pending: r.try_get("oldest")?,
                    dead: r.try_get("dead")?,
                })
            })
            .collect()
    }

    pub async fn event_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_one(&self.pool).await?)
    }

    pub async fn opted_out(&self, scope: &str, phone: &Phone) -> Result<Option<bool>, StoreError> {
        Ok(sqlx::query_scalar("SELECT opted_out FROM opt_out_state WHERE scope = $1 AND phone = $2")
            .bind(scope)
            .bind(phone.as_str())
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
