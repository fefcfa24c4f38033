//! Fan-out: each recorded consent change becomes a pending row for every
//! sink that follows its scope.
//!
//! Ingest appends one `changes` row per consent change and answers; this
//! moves them into `sink_phones` in batches, so a webhook costs the same with
//! one sink or ten, and the per-sink rows are written many to a statement.
//! The changes taken are deleted in the transaction that makes their rows
//! pending: a crash leaves them to the next pass, never half done.
//!
//! Rows are upserted in (sink, phone) order, the order settles lock them in,
//! so a fan-out and a settle cannot deadlock on PostgreSQL. Concurrent
//! fan-outs (replicas) take disjoint changes (`SKIP LOCKED`); both bump a
//! row's generation, which is all the relay needs: the row is due and its
//! worker computes the target from the current state, not from the change.

use chrono::Utc;
use sqlx::{PgPool, SqlitePool};

use super::codec::Ts;
use super::dialect::Dialect;
use super::{Pool, SinkFollow, Store, StoreError};
use crate::domain::ORGANISATION_SCOPE;

/// Makes a (sink, phone) row pending for a change, or inserts it. A row that
/// was done starts a fresh queue time and attempt count.
const UPSERT: &str = "ON CONFLICT (phone, sink) DO UPDATE
    SET status = 'pending', generation = sink_phones.generation + 1,
        event_id = CASE WHEN sink_phones.event_id > EXCLUDED.event_id
                        THEN sink_phones.event_id ELSE EXCLUDED.event_id END,
        next_attempt_at = EXCLUDED.next_attempt_at, updated_at = EXCLUDED.updated_at,
        queued_at = CASE WHEN sink_phones.status = 'pending'
                         THEN sink_phones.queued_at ELSE EXCLUDED.queued_at END,
        attempts = CASE WHEN sink_phones.status = 'pending' THEN sink_phones.attempts ELSE 0 END";

impl Store {
    /// Fans out up to `limit` of the oldest changes to `sinks`; returns how
    /// many changes were taken (fewer than `limit`: none are left for now).
    /// Changes of a scope no sink follows are taken and dropped (a sink
    /// configured later is filled from the state, `Store::backfill`); a
    /// sink marked `since_registered` gets only what was recorded after it
    /// was registered.
    pub async fn fan_out(&self, sinks: &[SinkFollow], limit: u32) -> Result<u64, StoreError> {
        match &self.pool {
            Pool::Postgres(pool) => fan_out_pg(pool, sinks, limit).await,
            Pool::Sqlite(pool) => fan_out_sqlite(pool, sinks, limit).await,
        }
    }

    /// Changes recorded and not yet fanned out (normally a moment's worth).
    pub async fn changes_waiting(&self) -> Result<i64, StoreError> {
        Ok(super::on_pool!(self, pool => {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM changes").fetch_one(pool).await?
        }))
    }
}

/// One statement: take the changes, upsert their sinks' rows.
async fn fan_out_pg(pool: &PgPool, sinks: &[SinkFollow], limit: u32) -> Result<u64, StoreError> {
    // (sink, scope) pairs; a NULL scope: the sink follows every scope.
    let mut follow_sinks: Vec<&str> = Vec::new();
    let mut follow_scopes: Vec<Option<&str>> = Vec::new();
    let mut follow_recent: Vec<bool> = Vec::new();
    for f in sinks {
        let scopes: Vec<Option<&str>> = match &f.scopes {
            None => vec![None],
            Some(scopes) => scopes.iter().map(|s| Some(s.as_str())).collect(),
        };
        for scope in scopes {
            follow_sinks.push(&f.sink);
            follow_scopes.push(scope);
            follow_recent.push(f.since_registered);
        }
    }
    let taken: i64 = sqlx::query_scalar(&format!(
        "WITH taken AS (
             DELETE FROM changes
              WHERE id IN (SELECT id FROM changes ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
             RETURNING scope, phone, event_id, recorded_at
         ), touched AS (
             -- One row per (sink, phone): ON CONFLICT may not touch a row twice.
             SELECT f.sink, t.phone, MAX(t.event_id) AS event_id
               FROM taken t
               JOIN UNNEST($2::text[], $3::text[], $6::bool[]) AS f(sink, scope, since_registered)
                 ON f.scope IS NULL OR f.scope = t.scope OR t.scope = $4
               LEFT JOIN sinks s ON s.name = f.sink
              WHERE NOT f.since_registered OR s.created_at IS NULL OR t.recorded_at >= s.created_at
              GROUP BY f.sink, t.phone
         ), queued AS (
             INSERT INTO sink_phones (sink, phone, status, event_id, next_attempt_at, queued_at, created_at, updated_at)
             SELECT sink, phone, 'pending', event_id, $5, $5, $5, $5 FROM touched
              ORDER BY sink, phone
             {UPSERT}
         )
         SELECT COUNT(*) FROM taken"
    ))
    .bind(i64::from(limit))
    .bind(follow_sinks)
    .bind(follow_scopes)
    .bind(ORGANISATION_SCOPE)
    .bind(Ts(Utc::now()))
    .bind(follow_recent)
    .fetch_one(pool)
    .await?;
    Ok(u64::try_from(taken).unwrap_or(0))
}

/// SQLite has one writer: the oldest changes fanned out and deleted in one
/// write transaction (nobody can append in between), set-based as on
/// PostgreSQL: a statement per (sink, phone) cost a round trip to sqlx's
/// connection thread each and held the write lock that ingest waits for.
async fn fan_out_sqlite(pool: &SqlitePool, sinks: &[SinkFollow], limit: u32) -> Result<u64, StoreError> {
    let now = Ts(Utc::now());
    // [[sink, scope or null, since_registered], …]; a null scope: every scope.
    let follow: Vec<(&str, Option<&str>, bool)> = sinks
        .iter()
        .flat_map(|f| {
            let scopes: Vec<Option<&str>> = match &f.scopes {
                None => vec![None],
                Some(scopes) => scopes.iter().map(|s| Some(s.as_str())).collect(),
            };
            scopes.into_iter().map(move |scope| (f.sink.as_str(), scope, f.since_registered))
        })
        .collect();
    let follow = serde_json::to_string(&follow).map_err(|e| StoreError::Query(e.to_string()))?;
    let mut tx = pool.begin_write().await?;
    let (taken, last): (i64, Option<i64>) =
        sqlx::query_as("SELECT COUNT(*), MAX(id) FROM (SELECT id FROM changes ORDER BY id LIMIT $1)")
            .bind(i64::from(limit))
            .fetch_one(&mut *tx)
            .await?;
    let Some(last) = last else {
        return Ok(0);
    };
    sqlx::query(&format!(
        "INSERT INTO sink_phones (sink, phone, status, event_id, next_attempt_at, queued_at, created_at, updated_at)
         SELECT f.sink, t.phone, 'pending', MAX(t.event_id), $3, $3, $3, $3
           FROM changes t
           JOIN (SELECT json_extract(value, '$[0]') AS sink, json_extract(value, '$[1]') AS scope,
                        json_extract(value, '$[2]') AS since_registered
                   FROM json_each($1)) f
             ON f.scope IS NULL OR f.scope = t.scope OR t.scope = $2
           LEFT JOIN sinks s ON s.name = f.sink
          WHERE t.id <= $4
            AND (NOT f.since_registered OR s.created_at IS NULL OR t.recorded_at >= s.created_at)
          GROUP BY f.sink, t.phone
          ORDER BY f.sink, t.phone
         {UPSERT}"
    ))
    .bind(follow)
    .bind(ORGANISATION_SCOPE)
    .bind(now)
    .bind(last)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM changes WHERE id <= $1").bind(last).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(u64::try_from(taken).unwrap_or(0))
}
