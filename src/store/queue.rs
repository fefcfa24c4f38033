//! The delivery queue: claims under a lease, settling, re-queueing, and the
//! statistics `/metrics` reads.
//!
//! A claim reads a sink's due pending rows through one range of
//! `deliveries_due_idx` (pending rows by sink and due time), so it never
//! walks rows still waiting out a backoff, however long an outage's backlog.
//! Rows leased to a worker stay in that range until settled and are skipped
//! by their lease: there are at most workers × batch of them. The claim
//! itself writes no indexed column, so PostgreSQL updates the rows in place
//! (HOT) instead of adding an entry to every index per row claimed.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::QueryBuilder;

use super::codec::Ts;
use super::dialect::Dialect;
use super::{decode_rows, on_pool, ClaimedDelivery, QueueStats, RetryOutcome, Settle, Store, StoreError};
use crate::domain::{EventKind, Phone};

/// The claim, with `lock` (the dialect's row-lock clause) after the pick.
pub(super) fn claim_sql(lock: &str) -> String {
    format!(
        // The pick is a materialised CTE so it runs (and locks) exactly once.
        "WITH picked AS MATERIALIZED (
             SELECT c.id FROM deliveries c
              WHERE c.sink = $1 AND c.status = 'pending' AND c.next_attempt_at <= $5
                AND (c.locked_until IS NULL OR c.locked_until <= $5)
                -- Only a phone's oldest pending delivery, so changes apply in order.
                -- A scalar subquery rather than NOT EXISTS: on a table without
                -- statistics yet the planner turned the anti-join into a quadratic scan.
                AND c.id = (SELECT min(o.id) FROM deliveries o
                             WHERE o.sink = c.sink AND o.phone = c.phone AND o.status = 'pending')
                -- Nor while another of the phone's deliveries is in a worker's hands: a
                -- replayed older change must not land beside (or after) a newer one in flight.
                AND NOT EXISTS (SELECT 1 FROM deliveries l
                                 WHERE l.sink = c.sink AND l.phone = c.phone AND l.status = 'pending'
                                   AND l.locked_until > $5)
                AND NOT ($6 AND EXISTS (SELECT 1 FROM deliveries w
                                         WHERE w.event_id = c.event_id AND w.sink <> c.sink
                                           AND w.status = 'pending'))
              ORDER BY c.next_attempt_at, c.id
              LIMIT $2
              {lock})
         UPDATE deliveries
            SET locked_until = $4, locked_by = $3, attempts = attempts + 1, updated_at = $5
          WHERE id IN (SELECT id FROM picked)
          RETURNING id, event_id, phone, kind, attempts, created_at, queued_at,
                    (SELECT e.received_at FROM events e WHERE e.id = deliveries.event_id) AS received_at,
                    EXISTS (SELECT 1 FROM deliveries n
                             WHERE n.sink = deliveries.sink AND n.phone = deliveries.phone
                               AND n.status = 'done' AND n.id > deliveries.id) AS superseded"
    )
}

/// A claimed row as stored, before its text is parsed.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: i64,
    event_id: i64,
    phone: String,
    kind: String,
    attempts: i32,
    #[sqlx(try_from = "Ts")]
    received_at: DateTime<Utc>,
    #[sqlx(try_from = "Ts")]
    created_at: DateTime<Utc>,
    #[sqlx(try_from = "Ts")]
    queued_at: DateTime<Utc>,
    superseded: bool,
}

impl ClaimRow {
    fn parse(self) -> Result<ClaimedDelivery, StoreError> {
        let kind = EventKind::parse(&self.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("deliveries row {}: unknown kind {:?}", self.id, self.kind)))?;
        Ok(ClaimedDelivery {
            id: self.id,
            event_id: self.event_id,
            phone: Phone::from_stored(self.phone),
            kind,
            attempts: self.attempts,
            received_at: self.received_at,
            created_at: self.created_at,
            queued_at: self.queued_at,
            superseded: self.superseded,
        })
    }
}

impl Store {
    /// Claims up to `limit` due deliveries of `sink`: at most one per phone,
    /// and only a phone's oldest pending one, so changes apply in order. With
    /// `wait_for_other_sinks`, a delivery also waits until its event's
    /// deliveries to other sinks are no longer pending (a report of them).
    pub async fn claim(
        &self,
        sink: &str,
        owner: &str,
        limit: u32,
        lease: std::time::Duration,
        wait_for_other_sinks: bool,
    ) -> Result<Vec<ClaimedDelivery>, StoreError> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
        let rows = on_pool!(self, pool => {
            let rows = sqlx::query(claim_sql_of(pool))
                .bind(sink)
                .bind(i64::from(limit))
                .bind(owner)
                .bind(Ts(until))
                .bind(Ts(now))
                .bind(wait_for_other_sinks)
                .fetch_all(pool)
                .await?;
            decode_rows!(rows, ClaimRow, "deliveries")?
        });
        let mut out = rows.into_iter().map(ClaimRow::parse).collect::<Result<Vec<_>, _>>()?;
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    /// Ends a batch of attempts in one transaction (one commit for a whole
    /// batch); returns how many were still held by `owner` (the others were
    /// re-claimed after a lost lease).
    pub async fn settle_many(&self, owner: &str, settles: &[(i64, Settle)]) -> Result<u64, StoreError> {
        if settles.is_empty() {
            return Ok(0);
        }
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            let mut held = 0;
            for (id, how) in settles {
                let q = match how {
                    Settle::Done(result) => sqlx::query(
                        "UPDATE deliveries SET status = 'done', result = $3, completed_at = $4, updated_at = $4,
                                locked_until = NULL, locked_by = NULL, last_error = NULL
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(*id)
                    .bind(owner)
                    .bind(Json(result))
                    .bind(now),
                    Settle::Retry { at, error } => sqlx::query(
                        "UPDATE deliveries SET next_attempt_at = $3, last_error = $4, updated_at = $5,
                                locked_until = NULL, locked_by = NULL
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(*id)
                    .bind(owner)
                    .bind(Ts(*at))
                    .bind(error.as_str())
                    .bind(now),
                    Settle::Dead(error) => sqlx::query(
                        "UPDATE deliveries SET status = 'dead', last_error = $3, completed_at = $4, updated_at = $4,
                                locked_until = NULL, locked_by = NULL
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(*id)
                    .bind(owner)
                    .bind(error.as_str())
                    .bind(now),
                };
                held += q.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(held)
        })
    }

    /// Puts dead deliveries back in the queue, due now, with a fresh attempt
    /// count and a fresh `max_age` clock (else an old delivery replayed after
    /// a fix would be dead again at its first failure). Returns how many.
    pub async fn replay_dead(&self, sink: Option<&str>) -> Result<u64, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(REQUEUE);
            q.push_bind(now).push(", queued_at = ").push_bind(now).push(", updated_at = ").push_bind(now);
            q.push(" WHERE status = 'dead'");
            if let Some(sink) = sink {
                q.push(" AND sink = ").push_bind(sink);
            }
            Ok(q.build().execute(pool).await?.rows_affected())
        })
    }

    /// Re-queues one dead (or waiting, unleased) delivery, due now, as
    /// [`Store::replay_dead`] does.
    pub async fn retry_delivery(&self, id: i64) -> Result<RetryOutcome, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(REQUEUE);
            q.push_bind(now).push(", queued_at = ").push_bind(now).push(", updated_at = ").push_bind(now);
            q.push(" WHERE id = ").push_bind(id);
            q.push(" AND (status = 'dead' OR (status = 'pending' AND (locked_until IS NULL OR locked_until < ")
                .push_bind(now)
                .push(")))");
            if q.build().execute(pool).await?.rows_affected() == 1 {
                return Ok(RetryOutcome::Requeued);
            }
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT id FROM deliveries WHERE id = $1").bind(id).fetch_optional(pool).await?;
            Ok(if exists.is_some() { RetryOutcome::NotRetryable } else { RetryOutcome::NotFound })
        })
    }

    /// Per sink: pending deliveries, creation time of the oldest pending one,
    /// dead ones. Reads only unfinished rows (`deliveries_due_idx`,
    /// `deliveries_dead_idx`), so its cost follows the backlog, not the history.
    pub async fn queue_stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            sink: String,
            status: String,
            n: i64,
            #[sqlx(try_from = "Ts")]
            oldest: DateTime<Utc>,
        }
        let rows = on_pool!(self, pool => {
            // Each half spelled with its partial index's predicate (`status = '…'`
            // as a literal), so both backends see the index applies.
            let rows = sqlx::query(
                "SELECT sink, 'pending' AS status, COUNT(*) AS n, MIN(created_at) AS oldest
                   FROM deliveries WHERE status = 'pending' GROUP BY sink
                 UNION ALL
                 SELECT sink, 'dead' AS status, COUNT(*) AS n, MIN(created_at) AS oldest
                   FROM deliveries WHERE status = 'dead' GROUP BY sink
                 ORDER BY sink",
            )
            .fetch_all(pool)
            .await?;
            decode_rows!(rows, Row, "deliveries")?
        });
        let mut out: Vec<QueueStats> = Vec::new();
        for r in rows {
            if out.last().is_none_or(|s| s.sink != r.sink) {
                out.push(QueueStats { sink: r.sink.clone(), pending: 0, oldest_pending: None, dead: 0 });
            }
            let Some(s) = out.last_mut() else { continue };
            match r.status.as_str() {
                "pending" => {
                    s.pending = r.n;
                    s.oldest_pending = Some(r.oldest);
                }
                _ => s.dead = r.n,
            }
        }
        Ok(out)
    }
}

/// The start of a re-queue: fields reset, then the times and `WHERE …`.
const REQUEUE: &str = "UPDATE deliveries SET status = 'pending', attempts = 0, completed_at = NULL, result = NULL, \
                       locked_until = NULL, locked_by = NULL, next_attempt_at = ";

fn claim_sql_of<P: Dialect>(_: &P) -> &'static str {
    P::claim_sql()
}
