//! Recording events: the event, the newest-wins state of (scope, phone) and
//! one `changes` row per consent change, in one transaction, idempotent per
//! MessageSid. "Newest" is by when the person said it, then by arrival.
//!
//! What a webhook costs does not grow with the number of sinks: the relay's
//! fan-out (`fan_out.rs`) turns each change into a pending row per sink that
//! follows its scope, in batches, after the webhook has been answered.
//!
//! The one place the backends take different paths on purpose:
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
    /// Records events, their state change and a change for the relay to fan
    /// out, all in one transaction. Idempotent per MessageSid.
    pub async fn record_events(&self, events: &[NewEvent]) -> Result<Vec<RecordOutcome>, StoreError> {
        // A NUL in any text would fail the commit on every retry (PostgreSQL).
        let cleaned: Vec<NewEvent>;
        let events = if events.iter().any(|e| e.storable().is_some()) {
            cleaned = events.iter().map(|e| e.storable().unwrap_or_else(|| e.clone())).collect();
            &cleaned[..]
        } else {
            events
        };
        let (unique, rep) = dedupe(events);
        let inserted = match &self.pool {
            Pool::Postgres(pool) => record_in_one_statement(pool, events, &unique).await?,
            Pool::Sqlite(pool) => record_one_by_one(pool, events, &unique).await?,
        };
        Ok(spread(events.len(), &rep, &inserted))
    }
}

/// Data-modifying CTEs insert the events (in arrival order, duplicates
/// skipped), upsert the newest state per (scope, phone) from what was
/// actually inserted, and append the changes. A single statement is atomic
/// on its own.
async fn record_in_one_statement(
    pool: &PgPool,
    events: &[NewEvent],
    unique: &[usize],
) -> Result<HashMap<usize, i64>, StoreError> {
    let runs = runs(events, unique);
    let pick = |f: &dyn Fn(&NewEvent) -> Option<String>| unique.iter().map(|&i| f(&events[i])).collect::<Vec<_>>();
    let rows = sqlx::query(
        "WITH input AS (
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                                  $7::text[], $8::text[], $9::text[], $10::text[], $11::timestamptz[], $12::text[],
                                  $14::timestamptz[], $15::bool[])
                    WITH ORDINALITY AS t(sid, acc, svc, scope, phone, raw, to_number, kind, body, params, at, source,
                                         run_since, whole, ord)
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
             -- The batch's newest change per (scope, phone), with when its run
             -- began in the batch and whether the batch holds nothing else.
             SELECT DISTINCT ON (ins.scope, ins.phone) ins.scope, ins.phone, ins.kind, ins.id, ins.received_at,
                    input.run_since, input.whole
               FROM ins JOIN input ON input.sid = ins.message_sid
              WHERE ins.kind <> 'help'
              ORDER BY ins.scope, ins.phone, ins.received_at DESC, ins.id DESC
         ), state AS (
             INSERT INTO opt_out_state (scope, phone, opted_out, event_id, changed_at, since)
             SELECT scope, phone, kind = 'opt_out', id, received_at, run_since FROM newest
              -- A fixed lock order, so concurrent batches cannot deadlock.
              ORDER BY scope, phone
             ON CONFLICT (scope, phone) DO UPDATE
                SET opted_out = EXCLUDED.opted_out, event_id = EXCLUDED.event_id, changed_at = EXCLUDED.changed_at,
                    -- A stored value of the same kind continues the run only if the
                    -- batch did not change it in between.
                    since = CASE WHEN opt_out_state.opted_out = EXCLUDED.opted_out
                                      AND (SELECT n.whole FROM newest n
                                            WHERE n.scope = EXCLUDED.scope AND n.phone = EXCLUDED.phone)
                                 THEN opt_out_state.since ELSE EXCLUDED.since END
              WHERE (opt_out_state.changed_at, opt_out_state.event_id) < (EXCLUDED.changed_at, EXCLUDED.event_id)
         ), changed AS (
             -- One row per consent change, however many sinks follow it: the
             -- relay's fan-out makes their rows pending, off this path.
             INSERT INTO changes (scope, phone, event_id, recorded_at)
             SELECT scope, phone, id, $13 FROM ins WHERE kind <> 'help' ORDER BY id
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
    .bind(Ts(Utc::now()))
    .bind(runs.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(runs.iter().map(|r| r.1).collect::<Vec<_>>())
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
            "INSERT INTO opt_out_state (scope, phone, opted_out, event_id, changed_at, since)
             VALUES ($1, $2, $3, $4, $5, $5)
             ON CONFLICT (scope, phone) DO UPDATE
               SET opted_out = excluded.opted_out, event_id = excluded.event_id, changed_at = excluded.changed_at,
                   since = CASE WHEN opt_out_state.opted_out = excluded.opted_out
                                THEN opt_out_state.since ELSE excluded.since END
               WHERE (opt_out_state.changed_at, opt_out_state.event_id) < (excluded.changed_at, excluded.event_id)",
        )
        .bind(&e.scope)
        .bind(e.phone.as_str())
        .bind(e.kind == EventKind::OptOut)
        .bind(id)
        .bind(Ts(e.received_at))
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO changes (scope, phone, event_id, recorded_at) VALUES ($1, $2, $3, $4)")
            .bind(&e.scope)
            .bind(e.phone.as_str())
            .bind(id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(inserted)
}

/// Per unique event: when the run of its kind that it ends began within the
/// batch (its own time if the one before it changed the other way), and
/// whether that run is all the batch holds for its (scope, phone) — only then
/// may a stored state of the same kind carry its older start on. SQLite,
/// recording one event at a time, needs none of this.
fn runs(events: &[NewEvent], unique: &[usize]) -> Vec<(chrono::DateTime<Utc>, bool)> {
    let mut out: Vec<(chrono::DateTime<Utc>, bool)> = unique.iter().map(|&i| (events[i].received_at, true)).collect();
    let mut groups: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
    for (pos, &i) in unique.iter().enumerate() {
        let e = &events[i];
        if e.kind.changes_consent() {
            groups.entry((e.scope.as_str(), e.phone.as_str())).or_default().push(pos);
        }
    }
    for list in groups.values_mut() {
        // The order the state follows: when said, then arrival.
        list.sort_by_key(|&pos| (events[unique[pos]].received_at, pos));
        let mut start = 0;
        for n in 0..list.len() {
            let kind = |k: usize| events[unique[list[k]]].kind;
            if n > 0 && kind(n - 1) != kind(n) {
                start = n;
            }
            out[list[n]] = (events[unique[list[start]]].received_at, start == 0);
        }
    }
    out
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
