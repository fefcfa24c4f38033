//! The relay's work queue: one row per (sink, phone), pending while the sink
//! may not hold the phone's current target. Claims under a lease, settling,
//! re-queueing, and the statistics `/metrics` and `/v1/sinks` read.
//!
//! One row per (sink, phone) is what makes "converge" cheap: a START, a STOP
//! and a START during an outage leave one pending row, and the worker writes
//! the latest target once. Order between a phone's changes needs no
//! bookkeeping: there is nothing older to apply.
//!
//! A claim reads a sink's due rows through one range of `sink_phones_due_idx`
//! and writes no indexed column (PostgreSQL updates in place).

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::QueryBuilder;

use super::codec::{OptTs, Ts};
use super::dialect::Dialect;
use super::{decode_rows, on_pool, ClaimedPhone, Held, Pool, QueueStats, RetryOutcome, Settle, Store, StoreError};
use crate::domain::Phone;

/// The claim, with `lock` (the dialect's row-lock clause) after the pick.
pub(super) fn claim_sql(lock: &str) -> String {
    format!(
        // The pick is a materialised CTE so it runs (and locks) exactly once.
        "WITH picked AS MATERIALIZED (
             SELECT c.id FROM sink_phones c
              WHERE c.sink = $1 AND c.status = 'pending' AND c.next_attempt_at <= $5
                AND (c.locked_until IS NULL OR c.locked_until <= $5)
              ORDER BY c.next_attempt_at, c.id
              LIMIT $2
              {lock})
         UPDATE sink_phones
            SET locked_until = $4, locked_by = $3, updated_at = $5,
                -- A lease that ran out unsettled: its worker may have sent a write
                -- that still lands, so this pass calls the sink and a late re-read follows.
                uncertain = CASE WHEN locked_until IS NOT NULL THEN TRUE ELSE uncertain END,
                recheck_at = CASE WHEN locked_until IS NOT NULL THEN $6 ELSE recheck_at END
          WHERE id IN (SELECT id FROM picked)
          RETURNING id, phone, generation, event_id, attempts, queued_at,
                    written_opted_out, written_since, uncertain"
    )
}

/// A claimed row as stored.
#[derive(sqlx::FromRow)]
struct ClaimRow {
    id: i64,
    phone: String,
    generation: i64,
    event_id: Option<i64>,
    attempts: i32,
    #[sqlx(try_from = "Ts")]
    queued_at: DateTime<Utc>,
    written_opted_out: Option<bool>,
    #[sqlx(try_from = "OptTs")]
    written_since: Option<DateTime<Utc>>,
    uncertain: bool,
}

impl From<ClaimRow> for ClaimedPhone {
    fn from(r: ClaimRow) -> ClaimedPhone {
        ClaimedPhone {
            id: r.id,
            phone: Phone::from_stored(r.phone),
            generation: r.generation,
            event_id: r.event_id,
            attempts: r.attempts,
            queued_at: r.queued_at,
            written: r.written_opted_out.map(|opted_out| Held { opted_out, since: r.written_since }),
            uncertain: r.uncertain,
        }
    }
}

/// A claimed row and how its pass ended.
#[derive(Debug, Clone)]
pub struct Settled {
    pub id: i64,
    pub generation: i64,
    pub how: Settle,
}

impl Store {
    /// Claims up to `limit` due rows of `sink` (at most one per phone, by
    /// construction) under a lease of `lease`.
    pub async fn claim(
        &self,
        sink: &str,
        owner: &str,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<ClaimedPhone>, StoreError> {
        self.claim_with_recheck(sink, owner, limit, lease, Utc::now()).await
    }

    /// [`Store::claim`], where a row whose previous lease ran out unsettled
    /// is owed a re-read at `late`.
    pub async fn claim_with_recheck(
        &self,
        sink: &str,
        owner: &str,
        limit: u32,
        lease: std::time::Duration,
        late: DateTime<Utc>,
    ) -> Result<Vec<ClaimedPhone>, StoreError> {
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::seconds(60));
        let rows = on_pool!(self, pool => {
            let rows = sqlx::query(claim_sql_of(pool))
                .bind(sink)
                .bind(i64::from(limit))
                .bind(owner)
                .bind(Ts(until))
                .bind(Ts(now))
                .bind(Ts(late))
                .fetch_all(pool)
                .await?;
            decode_rows!(rows, ClaimRow, "sink_phones")?
        });
        let mut out: Vec<ClaimedPhone> = rows.into_iter().map(ClaimedPhone::from).collect();
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    /// Ends a batch of passes in one transaction; returns how many rows were
    /// still held by `owner`. A write (certain or not) whose lease was lost
    /// meanwhile may have landed after another worker's newer one: the row is
    /// made pending for a re-read at `recheck` (soon, late) whoever holds it.
    /// `dead_before`: a failed row queued before this is dead-lettered.
    /// `read_at`: when the passes read the sink (their claim). A re-read owed
    /// at `recheck_at` is done only by a pass that read at or after it; an
    /// earlier pass (a newer change made the row due sooner) leaves it owed,
    /// so a late-landing request is still caught.
    pub async fn settle_many(
        &self,
        owner: &str,
        settles: &[Settled],
        dead_before: DateTime<Utc>,
        recheck: (DateTime<Utc>, DateTime<Utc>),
        read_at: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        if settles.is_empty() {
            return Ok(0);
        }
        let now = Ts(Utc::now());
        // PostgreSQL: the common outcome in one statement (a round trip per row
        // cost more than the rest of a pass); the rare ones row by row below.
        // SQLite is in-process: a statement costs microseconds, one loop does.
        let (mut held, looped) = match &self.pool {
            Pool::Postgres(pool) => {
                let (written, rest): (Vec<&Settled>, Vec<&Settled>) =
                    settles.iter().partition(|s| matches!(s.how, Settle::Written { .. }));
                (settle_written_pg(pool, owner, &written, now, recheck, read_at).await?, rest)
            }
            Pool::Sqlite(_) => (0, settles.iter().collect()),
        };
        if looped.is_empty() {
            return Ok(held);
        }
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for s in looped {
                let q = match &s.how {
                    // Done only if no event bumped the generation meanwhile and no late
                    // re-read is owed (then it becomes due at that time instead).
                    Settle::Written { held, result } => sqlx::query(
                        "UPDATE sink_phones
                            SET written_opted_out = $4, written_since = $5, written_at = $6,
                                uncertain = (recheck_at IS NOT NULL AND recheck_at > $8),
                                result = COALESCE($7, result), last_error = NULL, attempts = 0, updated_at = $6,
                                locked_until = NULL, locked_by = NULL,
                                status = CASE WHEN generation = $3 AND (recheck_at IS NULL OR recheck_at <= $8)
                                              THEN 'done' ELSE 'pending' END,
                                next_attempt_at = CASE WHEN generation <> $3 THEN $6
                                                       WHEN recheck_at > $8 THEN recheck_at
                                                       ELSE next_attempt_at END,
                                recheck_at = CASE WHEN recheck_at <= $8 THEN NULL ELSE recheck_at END
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(s.id)
                    .bind(owner)
                    .bind(s.generation)
                    .bind(held.opted_out)
                    .bind(held.since.map(Ts))
                    .bind(now)
                    .bind(result.as_ref().map(Json))
                    .bind(Ts(read_at)),
                    Settle::Uncertain { held, error, soon, late } => sqlx::query(
                        "UPDATE sink_phones
                            SET written_opted_out = $3, written_since = $4, written_at = $5, uncertain = TRUE,
                                last_error = $6, attempts = attempts + 1, updated_at = $5,
                                locked_until = NULL, locked_by = NULL,
                                next_attempt_at = $7, recheck_at = $8
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(s.id)
                    .bind(owner)
                    .bind(held.opted_out)
                    .bind(held.since.map(Ts))
                    .bind(now)
                    .bind(error.as_str())
                    .bind(Ts(*soon))
                    .bind(Ts(*late)),
                    // Attempts count from 1 here: max_age kills a row only after
                    // a real try (one that waited out an outage still gets one).
                    Settle::Failed { error } => sqlx::query(
                        "UPDATE sink_phones
                            SET last_error = $3, attempts = attempts + 1, updated_at = $4,
                                locked_until = NULL, locked_by = NULL,
                                -- To the back of the sink's queue: a row the sink refuses
                                -- must not be every probe after it.
                                next_attempt_at = $4,
                                status = CASE WHEN queued_at <= $5 AND attempts >= 1 THEN 'dead' ELSE 'pending' END
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(s.id)
                    .bind(owner)
                    .bind(error.as_str())
                    .bind(now)
                    .bind(Ts(dead_before)),
                    Settle::Wait { until } => sqlx::query(
                        "UPDATE sink_phones
                            SET next_attempt_at = $3, updated_at = $4, locked_until = NULL, locked_by = NULL
                          WHERE id = $1 AND locked_by = $2 AND status = 'pending'",
                    )
                    .bind(s.id)
                    .bind(owner)
                    .bind(Ts(*until))
                    .bind(now),
                };
                let n = q.execute(&mut *tx).await?.rows_affected();
                held += n;
                if n == 0 && matches!(s.how, Settle::Written { .. } | Settle::Uncertain { .. }) {
                    sqlx::query(RECHECK).bind(s.id).bind(Ts(recheck.0)).bind(Ts(recheck.1)).bind(now)
                        .execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok(held)
        })
    }

    /// Owes `ids` a re-read at `soon` and again at `late`, whoever holds them
    /// (see [`Store::settle_many`]).
    pub async fn recheck(&self, ids: &[i64], soon: DateTime<Utc>, late: DateTime<Utc>) -> Result<(), StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for id in ids {
                sqlx::query(RECHECK).bind(*id).bind(Ts(soon)).bind(Ts(late)).bind(now).execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Records what a resync left in `sink`: each phone holds its opt-out
    /// (`since`) there. With `recheck` set (the resync's import may land
    /// late, or the phone's target moved while it ran) the row is made
    /// pending and owed a re-read now and at `late`, so a worker clears a
    /// stamp the resync put on a phone that has just opted in.
    pub async fn record_resync(
        &self,
        sink: &str,
        entries: &[(Phone, DateTime<Utc>, bool)],
        late: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut tx = pool.begin_write().await?;
            for (phone, since, recheck) in entries {
                sqlx::query(
                    "INSERT INTO sink_phones (sink, phone, status, next_attempt_at, queued_at, created_at, updated_at,
                                              written_opted_out, written_since, written_at, uncertain, recheck_at)
                     VALUES ($1, $2, CASE WHEN $5 THEN 'pending' ELSE 'done' END, $4, $4, $4, $4,
                             TRUE, $3, $4, $5, CASE WHEN $5 THEN $6 END)
                     ON CONFLICT (phone, sink) DO UPDATE
                        SET written_opted_out = TRUE, written_since = excluded.written_since,
                            written_at = excluded.written_at, updated_at = excluded.updated_at,
                            uncertain = (sink_phones.uncertain OR excluded.uncertain),
                            status = CASE WHEN excluded.uncertain THEN 'pending' ELSE sink_phones.status END,
                            generation = CASE WHEN excluded.uncertain
                                              THEN sink_phones.generation + 1 ELSE sink_phones.generation END,
                            next_attempt_at = CASE WHEN excluded.uncertain
                                                   THEN excluded.next_attempt_at ELSE sink_phones.next_attempt_at END,
                            recheck_at = CASE WHEN excluded.uncertain
                                              THEN excluded.recheck_at ELSE sink_phones.recheck_at END,
                            queued_at = CASE WHEN excluded.uncertain AND sink_phones.status <> 'pending'
                                             THEN excluded.queued_at ELSE sink_phones.queued_at END",
                )
                .bind(sink)
                .bind(phone.as_str())
                .bind(Ts(*since))
                .bind(now)
                .bind(*recheck)
                .bind(Ts(late))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Dead-letters `sink`'s unleased pending rows queued before
    /// `dead_before` that have been tried at least once. Returns how many.
    pub async fn expire(&self, sink: &str, dead_before: DateTime<Utc>, error: &str) -> Result<u64, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let done = sqlx::query(
                "UPDATE sink_phones SET status = 'dead', updated_at = $3,
                        last_error = COALESCE(last_error, $4)
                  WHERE sink = $1 AND status = 'pending' AND queued_at <= $2 AND attempts >= 1
                    AND locked_until IS NULL",
            )
            .bind(sink)
            .bind(Ts(dead_before))
            .bind(now)
            .bind(error)
            .execute(pool)
            .await?;
            Ok(done.rows_affected())
        })
    }

    /// Puts dead rows back in the queue, due now, with a fresh `max_age`
    /// clock (else a row replayed after a fix would be dead again at its
    /// first failure). Returns how many.
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

    /// Re-queues one row (dead, done or waiting, but not leased), due now: a
    /// done row is checked once more against the sink.
    pub async fn retry_delivery(&self, id: i64) -> Result<RetryOutcome, StoreError> {
        let now = Ts(Utc::now());
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(REQUEUE);
            q.push_bind(now).push(", queued_at = ").push_bind(now).push(", updated_at = ").push_bind(now);
            q.push(" WHERE id = ").push_bind(id);
            q.push(" AND (locked_until IS NULL OR locked_until < ").push_bind(now).push(")");
            if q.build().execute(pool).await?.rows_affected() == 1 {
                return Ok(RetryOutcome::Requeued);
            }
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT id FROM sink_phones WHERE id = $1").bind(id).fetch_optional(pool).await?;
            Ok(if exists.is_some() { RetryOutcome::NotRetryable } else { RetryOutcome::NotFound })
        })
    }

    /// Per sink: pending rows, when the oldest became pending, dead rows.
    /// Reads only unfinished rows (`sink_phones_due_idx`,
    /// `sink_phones_dead_idx`), so its cost follows the backlog, not the history.
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
                "SELECT sink, 'pending' AS status, COUNT(*) AS n, MIN(queued_at) AS oldest
                   FROM sink_phones WHERE status = 'pending' GROUP BY sink
                 UNION ALL
                 SELECT sink, 'dead' AS status, COUNT(*) AS n, MIN(queued_at) AS oldest
                   FROM sink_phones WHERE status = 'dead' GROUP BY sink
                 ORDER BY sink",
            )
            .fetch_all(pool)
            .await?;
            decode_rows!(rows, Row, "sink_phones")?
        });
        let mut out: Vec<QueueStats> = Vec::new();
        for r in rows {
            if out.last().is_none_or(|s| s.sink != r.sink) {
                out.push(QueueStats { sink: r.sink.clone(), ..QueueStats::default() });
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

/// [`Store::settle_many`]'s `Written` outcomes on PostgreSQL, as one
/// statement: the rows are locked first in the order ingest locks them
/// (sink, phone), so a settle and a batch of webhooks cannot deadlock; rows
/// no longer held by `owner` are owed their re-read in one more statement.
async fn settle_written_pg(
    pool: &sqlx::PgPool,
    owner: &str,
    written: &[&Settled],
    now: Ts,
    recheck: (DateTime<Utc>, DateTime<Utc>),
    read_at: DateTime<Utc>,
) -> Result<u64, StoreError> {
    if written.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(written.len());
    let mut generations = Vec::with_capacity(written.len());
    let mut opted_out = Vec::with_capacity(written.len());
    let mut since = Vec::with_capacity(written.len());
    let mut results = Vec::with_capacity(written.len());
    for s in written {
        if let Settle::Written { held, result } = &s.how {
            ids.push(s.id);
            generations.push(s.generation);
            opted_out.push(held.opted_out);
            since.push(held.since);
            results.push(result.as_ref().map(Json));
        }
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT 1 FROM sink_phones WHERE id = ANY($1) ORDER BY sink, phone FOR UPDATE")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    // Same rules as the row-by-row form in `settle_many`.
    let settled: Vec<i64> = sqlx::query_scalar(
        "UPDATE sink_phones s
            SET written_opted_out = v.opted_out, written_since = v.since, written_at = $7,
                uncertain = (s.recheck_at IS NOT NULL AND s.recheck_at > $8),
                result = COALESCE(v.result, s.result), last_error = NULL,
                attempts = 0, updated_at = $7, locked_until = NULL, locked_by = NULL,
                status = CASE WHEN s.generation = v.generation AND (s.recheck_at IS NULL OR s.recheck_at <= $8)
                              THEN 'done' ELSE 'pending' END,
                next_attempt_at = CASE WHEN s.generation <> v.generation THEN $7
                                       WHEN s.recheck_at > $8 THEN s.recheck_at
                                       ELSE s.next_attempt_at END,
                recheck_at = CASE WHEN s.recheck_at <= $8 THEN NULL ELSE s.recheck_at END
           FROM UNNEST($1::bigint[], $2::bigint[], $3::bool[], $4::timestamptz[], $5::jsonb[])
                AS v(id, generation, opted_out, since, result)
          WHERE s.id = v.id AND s.locked_by = $6 AND s.status = 'pending'
          RETURNING s.id",
    )
    .bind(&ids)
    .bind(&generations)
    .bind(&opted_out)
    .bind(&since)
    .bind(&results)
    .bind(owner)
    .bind(now)
    .bind(Ts(read_at))
    .fetch_all(&mut *tx)
    .await?;
    if settled.len() < ids.len() {
        let settled: std::collections::HashSet<i64> = settled.iter().copied().collect();
        let lost: Vec<i64> = ids.iter().copied().filter(|id| !settled.contains(id)).collect();
        sqlx::query(&RECHECK.replace("WHERE id = $1", "WHERE id = ANY($1)"))
            .bind(&lost)
            .bind(Ts(recheck.0))
            .bind(Ts(recheck.1))
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(settled.len() as u64)
}

/// A re-read owed after a write that may have landed late: pending, due at
/// `$2` (or earlier if already due), and again at `$3`. A row that was not
/// pending starts a fresh `max_age` clock. The generation moves on, so a
/// worker holding the row (whose read may predate the stray write) does not
/// settle it as done: it stays due at once.
const RECHECK: &str = "UPDATE sink_phones
    SET generation = generation + 1,
        next_attempt_at = CASE WHEN status = 'pending' AND next_attempt_at < $2 THEN next_attempt_at ELSE $2 END,
        queued_at = CASE WHEN status = 'pending' THEN queued_at ELSE $4 END,
        status = 'pending', recheck_at = $3, uncertain = TRUE, updated_at = $4
  WHERE id = $1";

/// The start of a re-queue: fields reset, then the times and `WHERE …`.
/// `uncertain` makes the worker call the sink even when the row says it
/// holds the target: an operator's retry checks the sink itself.
const REQUEUE: &str = "UPDATE sink_phones SET status = 'pending', attempts = 0, uncertain = TRUE, \
                       locked_until = NULL, locked_by = NULL, next_attempt_at = ";

fn claim_sql_of<P: Dialect>(_: &P) -> &'static str {
    P::claim_sql()
}
