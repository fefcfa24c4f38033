//! SQLite backend: the zero-setup default, one file beside the binary.
//!
//! WAL with `synchronous = FULL`, so an answered webhook survives a power cut.
//! SQLite has one writer at a time; the ingest batcher already funnels writes
//! into few transactions, and claims are a single `UPDATE … RETURNING`, so no
//! row locks are needed. One process per file (replicas need PostgreSQL).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Row;

use super::{
    dedupe, spread, ClaimedDelivery, DeliveryFilter, DeliveryRow, EventFilter, EventRow, NewEvent, QueueStats,
    Readiness, RecordOutcome, RetryOutcome, Settle, StateRow, StoreError,
};
use crate::domain::{EventKind, Phone};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(v).single().unwrap_or_default()
}

impl SqliteStore {
    pub fn connect_lazy(url: &str, max: u32, acquire_timeout: Duration) -> Result<SqliteStore, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Query(format!("bad database url: {e}")))?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(max.max(1))
            .acquire_timeout(acquire_timeout)
            .connect_lazy_with(opts);
        Ok(SqliteStore { pool })
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

    pub async fn record_events(&self, events: &[NewEvent], sinks: &[&str]) -> Result<Vec<RecordOutcome>, StoreError> {
        let (unique, rep) = dedupe(events);
        let now = ms(Utc::now());
        // BEGIN IMMEDIATE takes the write lock up front instead of upgrading a
        // read lock mid-transaction, which SQLite may refuse with SQLITE_BUSY.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut inserted: HashMap<usize, i64> = HashMap::new();
        for &i in &unique {
            let e = &events[i];
            let id: Option<i64> = sqlx::query_scalar(
                "INSERT INTO events (message_sid, account_sid, messaging_service_sid, scope, phone, from_raw,
                                     to_number, kind, body, params, received_at, source)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
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
            .bind(e.kind.as_str())
            .bind(&e.body)
            .bind(e.params.to_string())
            .bind(ms(e.received_at))
            .bind(&e.source)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(id) = id else { continue };
            inserted.insert(i, id);
            if !e.kind.changes_consent() {
                continue;
            }
            sqlx::query(
                "INSERT INTO opt_out_state (scope, phone, opted_out, event_id, changed_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (scope, phone) DO UPDATE
                   SET opted_out = excluded.opted_out, event_id = excluded.event_id, changed_at = excluded.changed_at
                   WHERE opt_out_state.event_id < excluded.event_id",
            )
            .bind(&e.scope)
            .bind(e.phone.as_str())
            .bind(e.kind == EventKind::OptOut)
            .bind(id)
            .bind(ms(e.received_at))
            .execute(&mut *tx)
            .await?;
            for sink in sinks {
                sqlx::query(
                    "INSERT INTO deliveries (event_id, sink, phone, kind, next_attempt_at, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?5)",
                )
                .bind(id)
                .bind(*sink)
                .bind(e.phone.as_str())
                .bind(e.kind.as_str())
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
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
            "UPDATE deliveries
                SET locked_until = ?4, locked_by = ?3, attempts = attempts + 1, updated_at = ?5
              WHERE id IN (
                    SELECT c.id FROM deliveries c
                     WHERE c.sink = ?1 AND c.status = 'pending' AND c.next_attempt_at <= ?5
                       AND (c.locked_until IS NULL OR c.locked_until < ?5)
                       -- Only a phone's oldest pending delivery. A scalar subquery rather than
                       -- NOT EXISTS: on a table without statistics yet the planner turned the
                       -- anti-join into a quadratic scan (1 s per claim at 10,000 pending).
                       AND c.id = (SELECT min(o.id) FROM deliveries o
                                    WHERE o.sink = c.sink AND o.phone = c.phone AND o.status = 'pending')
                       AND NOT (?6 AND EXISTS (SELECT 1 FROM deliveries w
                                                 WHERE w.event_id = c.event_id AND w.sink <> c.sink
                                                   AND w.status = 'pending'))
                     ORDER BY c.id
                     LIMIT ?2)
              RETURNING id, event_id, phone, kind, attempts, created_at,
                        (SELECT e.received_at FROM events e WHERE e.id = deliveries.event_id) AS received_at,
                        EXISTS (SELECT 1 FROM deliveries n
                                 WHERE n.sink = deliveries.sink AND n.phone = deliveries.phone
                                   AND n.status = 'done' AND n.id > deliveries.id) AS superseded",
        )
        .bind(sink)
        .bind(i64::from(limit))
        .bind(owner)
        .bind(ms(until))
        .bind(ms(now))
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
                received_at: from_ms(r.try_get("received_at")?),
                created_at: from_ms(r.try_get("created_at")?),
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut held = 0;
        for (id, how) in settles {
            let id = *id;
            let now = ms(now);
            let q = match how {
                Settle::Done(result) => sqlx::query(
                    "UPDATE deliveries SET status = 'done', result = ?3, completed_at = ?4, updated_at = ?4,
                        locked_until = NULL, locked_by = NULL, last_error = NULL
                  WHERE id = ?1 AND locked_by = ?2 AND status = 'pending'",
                )
                .bind(id)
                .bind(owner)
                .bind(result.to_string())
                .bind(now),
                Settle::Retry { at, error } => sqlx::query(
                    "UPDATE deliveries SET next_attempt_at = ?3, last_error = ?4, updated_at = ?5,
                        locked_until = NULL, locked_by = NULL
                  WHERE id = ?1 AND locked_by = ?2 AND status = 'pending'",
                )
                .bind(id)
                .bind(owner)
                .bind(ms(*at))
                .bind(error.as_str())
                .bind(now),
                Settle::Dead(error) => sqlx::query(
                    "UPDATE deliveries SET status = 'dead', last_error = ?3, completed_at = ?4, updated_at = ?4,
                        locked_until = NULL, locked_by = NULL
                  WHERE id = ?1 AND locked_by = ?2 AND status = 'pending'",
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
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?2, completed_at = NULL,
                    updated_at = ?2, locked_until = NULL, locked_by = NULL
              WHERE status = 'dead' AND (?1 IS NULL OR sink = ?1)",
        )
        .bind(sink)
        .bind(ms(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    pub async fn list_deliveries(&self, f: &DeliveryFilter) -> Result<Vec<DeliveryRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, event_id, sink, phone, kind, status, attempts, last_error, result,
                    created_at, next_attempt_at, completed_at
               FROM deliveries
              WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR sink = ?2)
                AND (?3 IS NULL OR phone = ?3) AND id > ?4 AND (?6 IS NULL OR event_id = ?6)
              ORDER BY id LIMIT ?5",
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
                let result: Option<String> = r.try_get("result")?;
                let completed: Option<i64> = r.try_get("completed_at")?;
                Ok(DeliveryRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    sink: r.try_get("sink")?,
                    phone: r.try_get("phone")?,
                    kind: r.try_get("kind")?,
                    status: r.try_get("status")?,
                    attempts: r.try_get("attempts")?,
                    last_error: r.try_get("last_error")?,
                    result: result.and_then(|s| serde_json::from_str(&s).ok()),
                    created_at: from_ms(r.try_get("created_at")?),
                    next_attempt_at: from_ms(r.try_get("next_attempt_at")?),
                    completed_at: completed.map(from_ms),
                })
            })
            .collect()
    }

    pub async fn list_events(&self, f: &EventFilter) -> Result<Vec<EventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, message_sid, scope, phone, kind, body, source, received_at FROM events
              WHERE (?1 IS NULL OR phone = ?1) AND (?2 IS NULL OR kind = ?2)
                AND (?3 IS NULL OR received_at >= ?3) AND id > ?4
              ORDER BY id LIMIT ?5",
        )
        .bind(f.phone.as_deref())
        .bind(f.kind.as_deref())
        .bind(f.since.map(ms))
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
                    received_at: from_ms(r.try_get("received_at")?),
                })
            })
            .collect()
    }

    pub async fn states(&self, phone: &Phone) -> Result<Vec<StateRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT scope, phone, opted_out, event_id, changed_at FROM opt_out_state WHERE phone = ?1 ORDER BY scope",
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
                    since: from_ms(r.try_get("changed_at")?),
                })
            })
            .collect()
    }

    pub async fn retry_delivery(&self, id: i64, now: DateTime<Utc>) -> Result<RetryOutcome, StoreError> {
        let now = ms(now);
        let done = sqlx::query(
            "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?2, completed_at = NULL,
                    updated_at = ?2, locked_until = NULL, locked_by = NULL
              WHERE id = ?1 AND (status = 'dead' OR (status = 'pending' AND (locked_until IS NULL OR locked_until < ?2)))",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(RetryOutcome::Requeued);
        }
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT id FROM deliveries WHERE id = ?1").bind(id).fetch_optional(&self.pool).await?;
        Ok(if exists.is_some() { RetryOutcome::NotRetryable } else { RetryOutcome::NotFound })
    }

    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        let rows = sqlx::query(
            "SELECT sink,
                    SUM(status = 'pending') AS pending,
                    MIN(CASE WHEN status = 'pending' THEN created_at END) AS oldest,
                    SUM(status = 'dead') AS dead
               FROM deliveries WHERE status IN ('pending', 'dead') GROUP BY sink",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let oldest: Option<i64> = r.try_get("oldest")?;
                Ok(QueueStats {
                    sink: r.try_get("sink")?,
                    pending: r.try_get("pending")?,
                    oldest_pending: oldest.map(from_ms),
                    dead: r.try_get("dead")?,
                })
            })
            .collect()
    }

    pub async fn event_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM events").fetch_one(&self.pool).await?)
    }

    pub async fn opted_out(&self, scope: &str, phone: &Phone) -> Result<Option<bool>, StoreError> {
        Ok(sqlx::query_scalar("SELECT opted_out FROM opt_out_state WHERE scope = ?1 AND phone = ?2")
            .bind(scope)
            .bind(phone.as_str())
            .fetch_optional(&self.pool)
            .await?)
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
