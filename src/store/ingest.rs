//! Recording events: the event, the newest-wins state of (scope, phone) and
//! one pending delivery per sink, in one transaction, idempotent per
//! MessageSid. The one place the backends take different paths on purpose:
//! PostgreSQL records a whole batch in one statement (one round trip, one
//! WAL flush for many webhooks); SQLite, in-process, loops inside one
//! transaction, where a statement costs microseconds.

use std::collections::HashMap;

use chrono::Utc;
use sqlx::types::Json;
use sqlx::{PgPool, Row, SqlitePool};

use super::codec::Ts;
use super::dialect::Dialect;
use super::{NewEvent, Pool, RecordOutcome, Store, StoreError};
use crate::domain::EventKind;

impl Store {
    /// Records events, their state change and one pending delivery per sink,
    /// all in one transaction. Idempotent per MessageSid.
    pub async fn record_events(&self, events: &[NewEvent], sinks: &[&str]) -> Result<Vec<RecordOutcome>, StoreError> {
        let (unique, rep) = dedupe(events);
        let inserted = match &self.pool {
            Pool::Postgres(pool) => record_in_one_statement(pool, events, &unique, sinks).await?,
            Pool::Sqlite(pool) => record_one_by_one(pool, events, &unique, sinks).await?,
        };
        Ok(spread(events.len(), &rep, &inserted))
    }
}

/// Data-modifying CTEs insert the events (in arrival order, duplicates
/// skipped), upsert the newest state per (scope, phone) from what was
/// actually inserted, and queue one delivery per sink. A single statement is
/// atomic on its own.
async fn record_in_one_statement(
    pool: &PgPool,
    events: &[NewEvent],
    unique: &[usize],
    sinks: &[&str],
) -> Result<HashMap<usize, i64>, StoreError> {
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
             INSERT INTO deliveries (event_id, sink, phone, kind, next_attempt_at, created_at, updated_at, queued_at)
             SELECT ins.id, s.sink, ins.phone, ins.kind, $14, $14, $14, $14
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
    .bind(Ts(Utc::now()))
    .fetch_all(pool)
    .await?;

    let index_of: HashMap<&str, usize> = unique.iter().map(|&i| (events[i].message_sid.as_str(), i)).collect();
    let mut inserted = HashMap::new();
    for row in rows {
        let id: i64 = row.try_get(0)?;
        let sid: String = row.try_get(1)?;
        if let Some(&i) = index_of.get(sid.as_str()) {
            inserted.insert(i, id);
        }
    }
    Ok(inserted)
}

async fn record_one_by_one(
    pool: &SqlitePool,
    events: &[NewEvent],
    unique: &[usize],
    sinks: &[&str],
) -> Result<HashMap<usize, i64>, StoreError> {
    let now = Ts(Utc::now());
    let mut tx = pool.begin_write().await?;
    let mut inserted = HashMap::new();
    for &i in unique {
        let e = &events[i];
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO events (message_sid, account_sid, messaging_service_sid, scope, phone, from_raw,
                                 to_number, kind, body, params, received_at, source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
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
        .bind(Json(&e.params))
        .bind(Ts(e.received_at))
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
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (scope, phone) DO UPDATE
               SET opted_out = excluded.opted_out, event_id = excluded.event_id, changed_at = excluded.changed_at
               WHERE opt_out_state.event_id < excluded.event_id",
        )
        .bind(&e.scope)
        .bind(e.phone.as_str())
        .bind(e.kind == EventKind::OptOut)
        .bind(id)
        .bind(Ts(e.received_at))
        .execute(&mut *tx)
        .await?;
        for sink in sinks {
            sqlx::query(
                "INSERT INTO deliveries (event_id, sink, phone, kind, next_attempt_at, created_at, updated_at, queued_at)
                 VALUES ($1, $2, $3, $4, $5, $5, $5, $5)",
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
    Ok(inserted)
}

/// Deduplicates a batch by MessageSid (first wins) and returns the indexes
/// of the unique events and, for each input, the index that represents it.
fn dedupe(events: &[NewEvent]) -> (Vec<usize>, Vec<usize>) {
    let mut first: HashMap<&str, usize> = HashMap::new();
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
fn spread(events_len: usize, rep: &[usize], inserted: &HashMap<usize, i64>) -> Vec<RecordOutcome> {
    (0..events_len)
        .map(|i| match inserted.get(&i) {
            Some(id) if rep[i] == i => RecordOutcome::Recorded(*id),
            _ => RecordOutcome::Duplicate,
        })
        .collect()
}
