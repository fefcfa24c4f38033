//! The store on its own, against both real databases: the two migrations
//! describe the same schema, the schema refuses rows that break the queue's
//! invariants, and what is read back is what was written — or an error that
//! names the row, never a guess.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::both_backends;
use crate::common::*;
use chrono::Utc;
use optout_relay::config::DatabaseConfig;
use optout_relay::domain::{EventKind, MessageSid, Phone};
use optout_relay::store::{NewEvent, Settle, Store, StoreError};
use secrecy::SecretString;
use serde_json::json;
use sqlx::{Connection, Row};

struct Db {
    store: Store,
    url: String,
    _dir: tempfile::TempDir,
}

async fn fresh_store(b: Backend) -> Db {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = fresh_database(b, &dir).await;
    let cfg = DatabaseConfig { url: SecretString::from(url.clone()), max_connections: 3, ..DatabaseConfig::default() };
    let store = Store::connect_lazy(&cfg).expect("store");
    store.migrate().await.expect("migrate");
    Db { store, url, _dir: dir }
}

impl Db {
    async fn stop(self) {
        self.store.close().await;
        drop_database(&self.url).await;
    }

    /// Runs SQL on the database directly: setting up a state the service
    /// itself never writes (old rows, corrupt values) or breaking a rule.
    async fn exec(&self, sql: &str) -> Result<u64, sqlx::Error> {
        if self.url.starts_with("sqlite:") {
            let mut c = sqlx::SqliteConnection::connect(&self.url).await?;
            Ok(sqlx::query(sql).execute(&mut c).await?.rows_affected())
        } else {
            let mut c = sqlx::PgConnection::connect(&self.url).await?;
            Ok(sqlx::query(sql).execute(&mut c).await?.rows_affected())
        }
    }
}

fn phone(s: &str) -> Phone {
    Phone::parse(s, phonenumber::country::Id::US).expect("phone")
}

fn event(sid: &str, p: &str, kind: EventKind) -> NewEvent {
    NewEvent {
        message_sid: MessageSid::parse(sid).expect("sid"),
        account_sid: None,
        messaging_service_sid: Some(SERVICE.to_owned()),
        scope: SERVICE.to_owned(),
        phone: phone(p),
        from_raw: p.to_owned(),
        to: None,
        kind,
        body: "STOP".to_owned(),
        params: json!({ "Body": "STOP" }),
        received_at: Utc::now(),
        source: "twilio".to_owned(),
    }
}

// ---------------------------------------------------------------- schema parity

#[derive(Debug, Default, PartialEq, Eq)]
struct Table {
    /// (column, NOT NULL)
    columns: BTreeSet<(String, bool)>,
    primary_key: Vec<String>,
    /// Each unique constraint's columns.
    uniques: BTreeSet<Vec<String>>,
    /// (column, referenced table)
    foreign_keys: BTreeSet<(String, String)>,
    /// Each CHECK, as the set of columns it mentions.
    checks: BTreeSet<BTreeSet<String>>,
    /// Named indexes (not those behind a key), with their columns and whether partial.
    indexes: BTreeMap<String, (Vec<String>, bool)>,
}

async fn pg_schema(url: &str) -> BTreeMap<String, Table> {
    let mut c = sqlx::PgConnection::connect(url).await.expect("connect");
    let mut out: BTreeMap<String, Table> = BTreeMap::new();
    let cols = sqlx::query(
        "SELECT table_name::text, column_name::text, is_nullable = 'NO' FROM information_schema.columns
          WHERE table_schema = 'public' AND table_name NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut c)
    .await
    .expect("columns");
    for r in cols {
        out.entry(r.get(0)).or_default().columns.insert((r.get(1), r.get(2)));
    }
    let cons = sqlx::query(
        "SELECT t.relname::text, con.contype::text,
                ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
                COALESCE(f.relname::text, '')
           FROM pg_constraint con JOIN pg_class t ON t.oid = con.conrelid
           JOIN pg_namespace ns ON ns.oid = t.relnamespace AND ns.nspname = 'public'
           LEFT JOIN pg_class f ON f.oid = con.confrelid
          WHERE t.relname NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut c)
    .await
    .expect("constraints");
    for r in cons {
        let table: String = r.get(0);
        let kind: String = r.get(1);
        let cols: Vec<String> = r.get(2);
        let t = out.entry(table).or_default();
        match kind.as_str() {
            "p" => t.primary_key = cols,
            "u" => {
                t.uniques.insert(cols);
            }
            "f" => {
                t.foreign_keys.insert((cols[0].clone(), r.get(3)));
            }
            "c" => {
                t.checks.insert(cols.into_iter().collect());
            }
            other => panic!("unexpected constraint type {other}"),
        }
    }
    let idx = sqlx::query(
        "SELECT t.relname::text, i.relname::text,
                ARRAY(SELECT a.attname::text FROM unnest(x.indkey) WITH ORDINALITY k(n, o)
                        JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.n ORDER BY k.o),
                x.indpred IS NOT NULL
           FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
           JOIN pg_namespace ns ON ns.oid = t.relnamespace AND ns.nspname = 'public'
          WHERE NOT EXISTS (SELECT 1 FROM pg_constraint con WHERE con.conindid = x.indexrelid)
            AND t.relname NOT LIKE '\\_sqlx%'",
    )
    .fetch_all(&mut c)
    .await
    .expect("indexes");
    for r in idx {
        out.entry(r.get(0)).or_default().indexes.insert(r.get(1), (r.get(2), r.get(3)));
    }
    out
}

/// The CHECK expressions of a CREATE TABLE statement, string literals blanked.
fn check_expressions(sql: &str) -> Vec<String> {
    let mut clean = String::with_capacity(sql.len());
    let mut in_string = false;
    for ch in sql.chars() {
        if ch == '\'' {
            in_string = !in_string;
            clean.push(' ');
        } else if !in_string {
            clean.push(ch.to_ascii_lowercase());
        }
    }
    let mut out = Vec::new();
    let mut rest = clean.as_str();
    while let Some(i) = rest.find("check") {
        let after = &rest[i + 5..];
        let Some(open) = after.find('(') else { break };
        let mut depth = 0;
        let mut end = open;
        for (j, ch) in after[open..].char_indices() {
            match ch {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + j;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push(after[open + 1..end].to_owned());
        rest = &after[end..];
    }
    out
}

async fn sqlite_schema(url: &str) -> BTreeMap<String, Table> {
    let mut c = sqlx::SqliteConnection::connect(url).await.expect("connect");
    let mut out: BTreeMap<String, Table> = BTreeMap::new();
    let tables = sqlx::query(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table'
          AND name NOT LIKE '\\_sqlx%' ESCAPE '\\' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )
    .fetch_all(&mut c)
    .await
    .expect("tables");
    for r in tables {
        let name: String = r.get(0);
        let sql: String = r.get(1);
        let mut t = Table::default();
        let info = sqlx::query(&format!("PRAGMA table_info({name})")).fetch_all(&mut c).await.expect("info");
        let mut pk: Vec<(i64, String)> = Vec::new();
        for col in &info {
            let col_name: String = col.get("name");
            let is_pk: i64 = col.get("pk");
            let notnull: i64 = col.get("notnull");
            if is_pk > 0 {
                pk.push((is_pk, col_name.clone()));
            }
            t.columns.insert((col_name, notnull == 1 || is_pk > 0));
        }
        pk.sort();
        t.primary_key = pk.into_iter().map(|(_, n)| n).collect();
        let names: Vec<String> = t.columns.iter().map(|(n, _)| n.clone()).collect();
        for expr in check_expressions(&sql) {
            let words: BTreeSet<String> =
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map(str::to_owned).collect();
            t.checks.insert(names.iter().filter(|n| words.contains(*n)).cloned().collect());
        }
        for fk in sqlx::query(&format!("PRAGMA foreign_key_list({name})")).fetch_all(&mut c).await.expect("fks") {
            t.foreign_keys.insert((fk.get("from"), fk.get("table")));
        }
        for ix in sqlx::query(&format!("PRAGMA index_list({name})")).fetch_all(&mut c).await.expect("indexes") {
            let ix_name: String = ix.get("name");
            let origin: String = ix.get("origin");
            let partial: i64 = ix.get("partial");
            let cols: Vec<String> = sqlx::query(&format!("PRAGMA index_info({ix_name})"))
                .fetch_all(&mut c)
                .await
                .expect("index info")
                .iter()
                .map(|r| r.get("name"))
                .collect();
            match origin.as_str() {
                "u" => {
                    t.uniques.insert(cols);
                }
                "c" => {
                    t.indexes.insert(ix_name, (cols, partial == 1));
                }
                _ => {}
            }
        }
        out.insert(name, t);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_and_sqlite_migrations_describe_the_same_schema() {
    let pg = fresh_store(Backend::Postgres).await;
    let lite = fresh_store(Backend::Sqlite).await;
    let a = pg_schema(&pg.url).await;
    let b = sqlite_schema(&lite.url).await;
    assert_eq!(a.keys().collect::<Vec<_>>(), ["deliveries", "events", "opt_out_state"]);
    for (table, shape) in &a {
        assert_eq!(Some(shape), b.get(table), "table {table}: PostgreSQL (left) and SQLite (right) differ");
    }
    assert_eq!(a.len(), b.len());
    // The parity check itself sees what matters: the queue's invariants are there.
    let checks = &a["deliveries"].checks;
    let set = |cols: &[&str]| cols.iter().map(|c| (*c).to_owned()).collect::<BTreeSet<_>>();
    for want in [set(&["locked_until", "locked_by"]), set(&["status", "locked_until"]), set(&["attempts"])] {
        assert!(checks.contains(&want), "missing CHECK on {want:?}: {checks:?}");
    }
    pg.stop().await;
    lite.stop().await;
}

#[test]
fn check_expressions_are_read_with_nested_parentheses_and_strings_ignored() {
    let sql =
        "CREATE TABLE t (a TEXT CHECK (a IN ('x)', 'check')), b INT, CONSTRAINT c CHECK ((a IS NULL) = (b IS NULL)))";
    let got = check_expressions(sql);
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got[1].contains("(a is null) = (b is null)"), "{got:?}");
}

// ---------------------------------------------------------------- invariants

async fn schema_refuses_rows_that_break_the_queue_invariants(b: Backend) {
    let db = fresh_store(b).await;
    db.store.record_events(&[event("SMinv1", "+14155550101", EventKind::OptOut)], &["redcap"]).await.unwrap();
    let now = Utc::now().timestamp_millis();
    let ts = if b == Backend::Sqlite { now.to_string() } else { "now()".to_owned() };
    for (rule, sql) in [
        ("lease fields both set or both null", "UPDATE deliveries SET locked_by = 'w'".to_owned()),
        ("lease fields both set or both null", format!("UPDATE deliveries SET locked_until = {ts}")),
        (
            "no lease on a finished row",
            format!("UPDATE deliveries SET status = 'done', completed_at = {ts}, locked_until = {ts}, locked_by = 'w'"),
        ),
        ("attempts >= 0", "UPDATE deliveries SET attempts = -1".to_owned()),
        ("a result only when done", "UPDATE deliveries SET result = '{}'".to_owned()),
    ] {
        let e = db.exec(&sql).await.expect_err(rule);
        assert!(e.to_string().to_lowercase().contains("check"), "{rule}: {e}");
    }
    // And the rows the service writes pass them.
    let claimed = db.store.claim("redcap", "w1", 10, Duration::from_secs(60), false).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(settle_one(&db.store, claimed[0].id, "w1", &Settle::Done(json!({"records": []}))).await);
    db.stop().await;
}

// ---------------------------------------------------------------- reads

async fn phone_status_shows_the_newest_events_newest_first(b: Backend) {
    let db = fresh_store(b).await;
    let events: Vec<NewEvent> = (0..520)
        .map(|i| {
            let kind = if i % 2 == 0 { EventKind::OptOut } else { EventKind::OptIn };
            event(&format!("SMhist{i:04}"), "+14155550102", kind)
        })
        .collect();
    for chunk in events.chunks(100) {
        db.store.record_events(chunk, &["redcap"]).await.unwrap();
    }
    let status = optout_relay::ops::phone_status(&db.store, &phone("+14155550102")).await.unwrap();
    assert_eq!(status.events.len(), 500);
    let sids: Vec<&str> = status.events.iter().map(|e| e.event.message_sid.as_str()).collect();
    assert_eq!(sids[0], "SMhist0519", "the newest event first");
    assert_eq!(sids[499], "SMhist0020", "the oldest shown is the 500th newest");
    assert!(status.events.windows(2).all(|w| w[0].event.id > w[1].event.id), "strictly newest first");
    assert!(status.events.iter().all(|e| e.deliveries.len() == 1 && e.deliveries[0].event_id == e.event.id));
    // The last event is a START (odd index): the phone is not opted out.
    assert!(!status.opted_out);
    db.stop().await;
}

async fn a_replayed_delivery_restarts_its_age_clock(b: Backend) {
    let db = fresh_store(b).await;
    db.store.record_events(&[event("SMage1", "+14155550103", EventKind::OptOut)], &["redcap"]).await.unwrap();
    let claimed = db.store.claim("redcap", "w1", 10, Duration::from_secs(60), false).await.unwrap();
    assert!(settle_one(&db.store, claimed[0].id, "w1", &Settle::Dead("gave up".into())).await);
    // It was created (and dead-lettered) four days ago.
    let old = Utc::now() - chrono::Duration::days(4);
    let old_sql = if b == Backend::Sqlite {
        old.timestamp_millis().to_string()
    } else {
        format!("'{}'::timestamptz", old.to_rfc3339())
    };
    db.exec(&format!("UPDATE deliveries SET created_at = {old_sql}, queued_at = {old_sql}")).await.unwrap();

    assert_eq!(db.store.replay_dead(Some("redcap")).await.unwrap(), 1);
    let again = db.store.claim("redcap", "w2", 10, Duration::from_secs(60), false).await.unwrap();
    assert_eq!(again.len(), 1);
    let d = &again[0];
    assert_eq!(d.attempts, 1, "attempts start again");
    assert!((Utc::now() - d.queued_at).num_seconds() < 60, "max_age counts from the replay: {}", d.queued_at);
    assert!((d.created_at - old).num_seconds().abs() < 2, "creation time is kept for operators");

    // With the relay's policy, its next failure is retried, not dead-lettered for age.
    let policy = optout_relay::config::RelayConfig::default();
    let error = optout_relay::sinks::SinkError::Transient { message: "down".into(), retry_after: None };
    let how = optout_relay::relay::retry::after_failure(&policy, 2, d.queued_at, Utc::now(), &error, 0.5);
    assert!(matches!(how, Settle::Retry { .. }), "{how:?}");
    db.stop().await;
}

async fn a_claim_skips_rows_not_yet_due_and_a_lost_lease_comes_due(b: Backend) {
    let db = fresh_store(b).await;
    let events: Vec<NewEvent> =
        (0..3).map(|i| event(&format!("SMdue{i}"), &format!("+1415555020{i}"), EventKind::OptOut)).collect();
    db.store.record_events(&events, &["redcap"]).await.unwrap();
    // Two are waiting out a backoff far in the future.
    let first = db.store.claim("redcap", "w1", 10, Duration::from_secs(60), false).await.unwrap();
    assert_eq!(first.len(), 3);
    let later = Utc::now() + chrono::Duration::hours(1);
    let settles: Vec<(i64, Settle)> =
        first[..2].iter().map(|d| (d.id, Settle::Retry { at: later, error: "503".into() })).collect();
    assert_eq!(db.store.settle_many("w1", &settles).await.unwrap(), 2);
    // The third is held by w1's lease: nobody else may take it.
    assert!(db.store.claim("redcap", "w2", 10, Duration::from_secs(60), false).await.unwrap().is_empty());
    // Its lease lapses (the worker froze): it is due again, and only it.
    let past = if b == Backend::Sqlite {
        (Utc::now().timestamp_millis() - 1000).to_string()
    } else {
        "now() - interval '1 second'".to_owned()
    };
    db.exec(&format!(
        "UPDATE deliveries SET next_attempt_at = {past}, locked_until = {past} WHERE id = {}",
        first[2].id
    ))
    .await
    .unwrap();
    let taken = db.store.claim("redcap", "w2", 10, Duration::from_secs(60), false).await.unwrap();
    assert_eq!(taken.iter().map(|d| d.id).collect::<Vec<_>>(), [first[2].id]);
    assert_eq!(taken[0].attempts, 2);
    // The frozen worker's settle no longer counts.
    assert!(!settle_one(&db.store, first[2].id, "w1", &Settle::Done(json!({}))).await);
    db.stop().await;
}

// ---------------------------------------------------------------- corrupt rows

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stored_time_or_json_is_an_error_naming_the_row_not_1970() {
    let db = fresh_store(Backend::Sqlite).await;
    db.store.record_events(&[event("SMbad1", "+14155550104", EventKind::OptOut)], &["redcap"]).await.unwrap();
    let p = phone("+14155550104");
    assert_eq!(db.store.recent_events(&p, 10).await.unwrap().len(), 1);

    for bad in ["'yesterday'", "9223372036854775807"] {
        db.exec(&format!("UPDATE events SET received_at = {bad}")).await.unwrap();
        match db.store.recent_events(&p, 10).await {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("events row 1"), "{m}"),
            other => panic!("{bad}: expected a corrupt-row error, got {other:?}"),
        }
    }

    // A claim reading that event says so too, rather than stamping REDCap with 1970.
    match db.store.claim("redcap", "w", 1, Duration::from_secs(60), false).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("received_at"), "{m}"),
        other => panic!("expected a corrupt-row error, got {other:?}"),
    }
    db.exec(&format!("UPDATE events SET received_at = {}", Utc::now().timestamp_millis())).await.unwrap();
    db.exec("UPDATE deliveries SET next_attempt_at = 0, locked_until = NULL, locked_by = NULL").await.unwrap();
    let claimed = db.store.claim("redcap", "w", 1, Duration::from_secs(60), false).await.unwrap();
    assert!(settle_one(&db.store, claimed[0].id, "w", &Settle::Done(json!({"records": ["1"]}))).await);
    db.exec("UPDATE deliveries SET result = '{not json'").await.unwrap();
    match db.store.deliveries_of_events(&[1]).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains(&format!("deliveries row {}", claimed[0].id)), "{m}"),
        other => panic!("expected a corrupt-row error, got {other:?}"),
    }
    db.stop().await;
}

both_backends!(
    schema_refuses_rows_that_break_the_queue_invariants,
    phone_status_shows_the_newest_events_newest_first,
    a_replayed_delivery_restarts_its_age_clock,
    a_claim_skips_rows_not_yet_due_and_a_lost_lease_comes_due,
);
