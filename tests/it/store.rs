//! The store on its own, against both real databases: the two migrations
//! describe the same schema, the schema refuses rows that break the queue's
//! invariants, the (sink, phone) queue claims, supersedes and settles as the
//! converge model needs, the state of (scope, phone) is the newest by when
//! the person said it, and what is read back is what was written — or an
//! error that names the row, never a guess.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::both_backends;
use crate::common::*;
use chrono::{DateTime, SubsecRound, Utc};
use optout_relay::config::DatabaseConfig;
use optout_relay::domain::{EventKind, MessageSid, Phone, ORGANISATION_SCOPE};
use optout_relay::store::{
    ClaimedPhone, DeliveryRow, Failing, Held, NewEvent, Settle, Settled, SinkFollow, Store, StoreError,
};
use secrecy::SecretString;
use serde_json::json;
use sqlx::{Connection, Row};

const LEASE: Duration = Duration::from_secs(60);
const SERVICE_A: &str = "MGaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const SERVICE_B: &str = "MGbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

struct Db {
    store: Store,
    url: String,
    backend: Backend,
    _dir: tempfile::TempDir,
}

async fn fresh_store(b: Backend) -> Db {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = fresh_database(b, &dir).await;
    let cfg = DatabaseConfig { url: SecretString::from(url.clone()), max_connections: 3, ..DatabaseConfig::default() };
    let store = Store::connect_lazy(&cfg).expect("store");
    store.migrate().await.expect("migrate");
    Db { store, url, backend: b, _dir: dir }
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

    /// An instant as a SQL literal of this backend's time columns.
    fn at(&self, t: DateTime<Utc>) -> String {
        match self.backend {
            Backend::Sqlite => t.timestamp_millis().to_string(),
            Backend::Postgres => format!("'{}'::timestamptz", t.to_rfc3339()),
        }
    }

    /// A row's `generation`, which no store method shows.
    async fn generation(&self, id: i64) -> i64 {
        let sql = format!("SELECT CAST(generation AS TEXT) FROM sink_phones WHERE id = {id}");
        query_texts(&self.url, &sql).await[0].parse().expect("a number")
    }

    /// `phone`'s row of `sink`, if it has one.
    async fn row(&self, sink: &str, p: &str) -> Option<DeliveryRow> {
        self.store.deliveries_of_phone(&phone(p)).await.expect("rows").into_iter().find(|r| r.sink == sink)
    }

    /// The sinks that have a row for `p`, by name.
    async fn sinks_of(&self, p: &str) -> Vec<String> {
        self.store.deliveries_of_phone(&phone(p)).await.expect("rows").into_iter().map(|r| r.sink).collect()
    }

    async fn record(&self, events: &[NewEvent], sinks: &[SinkFollow]) {
        self.store.record_events(events).await.expect("record");
        self.store.fan_out(sinks, u32::MAX).await.expect("fan out");
    }

    async fn claim(&self, owner: &str) -> Vec<ClaimedPhone> {
        self.store.claim("redcap", owner, 10, LEASE).await.expect("claim")
    }

    /// Ends passes as `owner`, dead-lettering nothing and owing re-reads at
    /// (`soon`, `late`); returns how many rows `owner` still held.
    async fn settle(
        &self,
        owner: &str,
        rows: &[(&ClaimedPhone, Settle)],
        recheck: (DateTime<Utc>, DateTime<Utc>),
    ) -> u64 {
        let settles: Vec<Settled> =
            rows.iter().map(|(c, how)| Settled { id: c.id, generation: c.generation, how: how.clone() }).collect();
        let never = Utc::now() - chrono::Duration::days(365);
        self.store.settle_many(owner, &settles, never, recheck, Utc::now()).await.expect("settle")
    }
}

fn phone(s: &str) -> Phone {
    Phone::parse(s, phonenumber::country::Id::US).expect("phone")
}

/// The one sink most tests use, following every scope.
fn redcap() -> Vec<SinkFollow> {
    vec![follow("redcap", None)]
}

fn follow(sink: &str, scopes: Option<&[&str]>) -> SinkFollow {
    SinkFollow {
        sink: sink.to_owned(),
        scopes: scopes.map(|s| s.iter().map(|x| (*x).to_owned()).collect()),
        since_registered: false,
    }
}

fn event(sid: &str, p: &str, kind: EventKind) -> NewEvent {
    event_in(sid, p, kind, SERVICE, Utc::now())
}

/// An event of `scope` said at `at` (`organisation`: recorded by staff).
fn event_in(sid: &str, p: &str, kind: EventKind, scope: &str, at: DateTime<Utc>) -> NewEvent {
    let by_staff = scope == ORGANISATION_SCOPE;
    NewEvent {
        message_sid: MessageSid::parse(sid).expect("sid"),
        account_sid: None,
        messaging_service_sid: (!by_staff).then(|| scope.to_owned()),
        scope: scope.to_owned(),
        phone: phone(p),
        from_raw: p.to_owned(),
        to: None,
        kind,
        body: "STOP".to_owned(),
        params: json!({ "Body": "STOP" }),
        received_at: at,
        source: if by_staff { "staff:test" } else { "twilio" }.to_owned(),
    }
}

fn written(opted_out: bool, since: Option<DateTime<Utc>>) -> Settle {
    Settle::Written { held: Held { opted_out, since }, result: Some(json!({ "records": ["1"] })) }
}

/// A time both backends store exactly (SQLite keeps milliseconds).
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(0)
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
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        ["changes", "events", "opt_out_state", "reviews", "sink_phones", "sinks", "van_ids"]
    );
    for (table, shape) in &a {
        assert_eq!(Some(shape), b.get(table), "table {table}: PostgreSQL (left) and SQLite (right) differ");
    }
    assert_eq!(a.len(), b.len());
    // The parity check itself sees what matters: the queue's invariants are there.
    let set = |cols: &[&str]| cols.iter().map(|c| (*c).to_owned()).collect::<BTreeSet<_>>();
    let checks = &a["sink_phones"].checks;
    for want in [
        set(&["locked_until", "locked_by"]),
        set(&["status", "locked_until"]),
        set(&["attempts"]),
        set(&["written_opted_out", "written_at"]),
        set(&["status"]),
    ] {
        assert!(checks.contains(&want), "sink_phones: missing CHECK on {want:?}: {checks:?}");
    }
    let checks = &a["sinks"].checks;
    for want in [set(&["health"]), set(&["health", "failing_since"]), set(&["backoff_step"])] {
        assert!(checks.contains(&want), "sinks: missing CHECK on {want:?}: {checks:?}");
    }
    assert!(
        a["sink_phones"].uniques.contains(&vec!["phone".to_owned(), "sink".to_owned()]),
        "one row per sink and phone"
    );
    assert!(a["opt_out_state"].columns.contains(&("since".to_owned(), true)));
    assert!(
        a["van_ids"].uniques.contains(&vec!["phone".to_owned(), "van_id".to_owned(), "committee_id".to_owned()]),
        "a mapping row once per (phone, vanId, committee): imports are idempotent"
    );
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
    db.record(&[event("SMinv1", "+14155550101", EventKind::OptOut)], &redcap()).await;
    db.store.register_sinks(&redcap()).await.expect("register");
    let now = db.at(Utc::now());
    for (rule, sql) in [
        ("lease fields both set or both null", "UPDATE sink_phones SET locked_by = 'w'".to_owned()),
        ("lease fields both set or both null", format!("UPDATE sink_phones SET locked_until = {now}")),
        (
            "no lease on a done row",
            format!("UPDATE sink_phones SET status = 'done', locked_until = {now}, locked_by = 'w'"),
        ),
        (
            "no lease on a dead row",
            format!("UPDATE sink_phones SET status = 'dead', locked_until = {now}, locked_by = 'w'"),
        ),
        ("attempts >= 0", "UPDATE sink_phones SET attempts = -1".to_owned()),
        ("what was written and when, together", "UPDATE sink_phones SET written_opted_out = TRUE".to_owned()),
        ("what was written and when, together", format!("UPDATE sink_phones SET written_at = {now}")),
        ("a known status", "UPDATE sink_phones SET status = 'sent'".to_owned()),
        ("a known health", "UPDATE sinks SET health = 'fine'".to_owned()),
        ("failing exactly while not ok", "UPDATE sinks SET health = 'backing_off'".to_owned()),
        ("failing exactly while not ok", format!("UPDATE sinks SET failing_since = {now}")),
        ("backoff_step >= 0", "UPDATE sinks SET backoff_step = -1".to_owned()),
    ] {
        let e = db.exec(&sql).await.expect_err(rule);
        assert!(e.to_string().to_lowercase().contains("check"), "{rule}: {e}");
    }
    // And the rows the service writes pass them.
    let claimed = db.claim("w1").await;
    assert_eq!(claimed.len(), 1);
    let since = Some(whole_seconds(Utc::now()));
    assert_eq!(db.settle("w1", &[(&claimed[0], written(true, since))], (Utc::now(), Utc::now())).await, 1);
    let row = db.row("redcap", "+14155550101").await.expect("row");
    assert_eq!((row.status.as_str(), row.written()), ("done", Some(Held { opted_out: true, since })));
    db.store.sink_failed("redcap", Failing::Misconfigured, 1, Utc::now(), "403").await.expect("failed");
    db.store.sink_ok("redcap").await.expect("ok");
    db.stop().await;
}

// ---------------------------------------------------------------- the queue

async fn a_claim_skips_rows_not_yet_due_and_a_lost_lease_comes_due(b: Backend) {
    let db = fresh_store(b).await;
    let events: Vec<NewEvent> =
        (0..3).map(|i| event(&format!("SMdue{i}"), &format!("+1415555020{i}"), EventKind::OptOut)).collect();
    db.record(&events, &redcap()).await;
    let first = db.claim("w1").await;
    assert_eq!(first.len(), 3);
    // Two are told to wait an hour (a notification waiting for the other sinks).
    let later = Utc::now() + chrono::Duration::hours(1);
    let wait = Settle::Wait { until: later };
    assert_eq!(db.settle("w1", &[(&first[0], wait.clone()), (&first[1], wait)], (later, later)).await, 2);
    // The third is held by w1's lease: nobody else may take it.
    assert!(db.claim("w2").await.is_empty(), "nothing due and unleased");
    // Its lease lapses (the worker froze): it is due again, and only it.
    let past = db.at(Utc::now() - chrono::Duration::seconds(1));
    db.exec(&format!("UPDATE sink_phones SET locked_until = {past} WHERE id = {}", first[2].id)).await.unwrap();
    let taken = db.claim("w2").await;
    assert_eq!(taken.iter().map(|d| d.id).collect::<Vec<_>>(), [first[2].id]);
    // A waiting row comes due at its time, and waiting used up no attempt.
    db.exec(&format!("UPDATE sink_phones SET next_attempt_at = {past} WHERE id = {}", first[0].id)).await.unwrap();
    let taken = db.claim("w3").await;
    assert_eq!(taken.iter().map(|d| d.id).collect::<Vec<_>>(), [first[0].id]);
    assert_eq!(taken[0].attempts, 0);
    db.stop().await;
}

async fn each_event_marks_only_the_sinks_that_follow_its_scope(b: Backend) {
    let db = fresh_store(b).await;
    let sinks = [
        follow("study_a", Some(&[SERVICE_A])),
        follow("study_b", Some(&[SERVICE_B, "+15005550006"])),
        follow("everything", None),
    ];
    let now = Utc::now();
    db.record(&[event_in("SMsc1", "+14155550301", EventKind::OptOut, SERVICE_A, now)], &sinks).await;
    assert_eq!(db.sinks_of("+14155550301").await, ["everything", "study_a"]);
    db.record(&[event_in("SMsc2", "+14155550302", EventKind::OptOut, "+15005550006", now)], &sinks).await;
    assert_eq!(db.sinks_of("+14155550302").await, ["everything", "study_b"]);
    // A scope nobody but the catch-all follows.
    db.record(
        &[event_in("SMsc3", "+14155550303", EventKind::OptOut, "MGcccccccccccccccccccccccccccccccc", now)],
        &sinks,
    )
    .await;
    assert_eq!(db.sinks_of("+14155550303").await, ["everything"]);
    // Organisation-wide (staff): every sink.
    db.record(&[event_in("SMsc4", "+14155550304", EventKind::OptOut, ORGANISATION_SCOPE, now)], &sinks).await;
    assert_eq!(db.sinks_of("+14155550304").await, ["everything", "study_a", "study_b"]);
    // HELP changes nothing anywhere.
    db.record(&[event_in("SMsc5", "+14155550305", EventKind::Help, SERVICE_A, now)], &sinks).await;
    assert!(db.sinks_of("+14155550305").await.is_empty());
    // Two scopes in one batch (PostgreSQL records a batch in one statement):
    // one row per sink and phone, pointing at the phone's newest event.
    let batch = [
        event_in("SMsc6", "+14155550306", EventKind::OptOut, SERVICE_B, now),
        event_in("SMsc7", "+14155550306", EventKind::OptIn, SERVICE_A, now),
    ];
    let ids: Vec<i64> = db
        .store
        .record_events(&batch)
        .await
        .expect("record")
        .into_iter()
        .map(|o| match o {
            optout_relay::store::RecordOutcome::Recorded(id) => id,
            other => panic!("{other:?}"),
        })
        .collect();
    db.store.fan_out(&sinks, u32::MAX).await.expect("fan out");
    let rows = db.store.deliveries_of_phone(&phone("+14155550306")).await.expect("rows");
    let got: Vec<(&str, Option<i64>)> = rows.iter().map(|r| (r.sink.as_str(), r.event_id)).collect();
    assert_eq!(got, [("everything", Some(ids[1])), ("study_a", Some(ids[1])), ("study_b", Some(ids[0]))]);
    db.stop().await;
}

async fn a_newer_event_bumps_the_generation_and_a_write_of_the_older_target_stays_pending(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550401";
    db.record(&[event("SMgen1", p, EventKind::OptOut)], &redcap()).await;
    let claimed = db.claim("w1").await;
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!(db.generation(c.id).await, c.generation);
    // While w1 writes the STOP, a START arrives.
    db.record(&[event("SMgen2", p, EventKind::OptIn)], &redcap()).await;
    assert_eq!(db.generation(c.id).await, c.generation + 1, "a second event bumps the generation");
    let since = Some(whole_seconds(Utc::now()));
    let now = Utc::now();
    assert_eq!(db.settle("w1", &[(c, written(true, since))], (now, now)).await, 1, "w1 still held its lease");
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!(row.status, "pending", "written for an older generation: not done");
    assert_eq!(row.written(), Some(Held { opted_out: true, since }), "what was written is kept");
    assert!(row.next_attempt_at <= Utc::now(), "due at once for the newer target");
    // The next pass sees the newer generation and can finish it.
    let again = db.claim("w2").await;
    assert_eq!(again.iter().map(|r| (r.id, r.generation)).collect::<Vec<_>>(), [(c.id, c.generation + 1)]);
    assert_eq!(again[0].written, Some(Held { opted_out: true, since }));
    assert_eq!(db.settle("w2", &[(&again[0], written(false, None))], (now, now)).await, 1);
    assert_eq!(db.row("redcap", p).await.expect("row").status, "done");
    db.stop().await;
}

/// The late re-read after an uncertain write is owed until a pass reads the
/// sink after its time: a newer change that makes the row due sooner (and
/// the pass it causes) must not cancel it, or a request REDCap was still
/// running could land unseen.
async fn a_newer_change_between_the_re_reads_does_not_cancel_the_late_one(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550409";
    db.record(&[event("SMow1", p, EventKind::OptIn)], &redcap()).await;
    let c = db.claim("w1").await.remove(0);
    let (now, late) = (Utc::now(), Utc::now() + chrono::Duration::hours(1));
    let uncertain =
        Settle::Uncertain { held: Held { opted_out: false, since: None }, error: "timeout".into(), soon: now, late };
    assert_eq!(db.settle("w1", &[(&c, uncertain)], (now, late)).await, 1);
    // A STOP comes in before the late re-read; its pass writes and reads now.
    db.record(&[event("SMow2", p, EventKind::OptOut)], &redcap()).await;
    let c = db.claim("w2").await.remove(0);
    let since = Some(whole_seconds(Utc::now()));
    let settled = Settled { id: c.id, generation: c.generation, how: written(true, since) };
    let dead_before = now - chrono::Duration::days(3);
    let held = db.store.settle_many("w2", &[settled], dead_before, (now, late), Utc::now()).await.expect("settle");
    assert_eq!(held, 1);
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain), ("pending", true), "the late re-read is still owed");
    assert_eq!(row.recheck_at.map(|t| t.timestamp()), Some(late.timestamp()));
    assert_eq!(row.next_attempt_at.timestamp(), late.timestamp(), "due at the late re-read, not before");
    // Another change makes it due at once; that pass, too, reads before `late`.
    db.record(&[event("SMow3", p, EventKind::OptOut)], &redcap()).await;
    let c = db.claim("w3").await.remove(0);
    let settled = Settled { id: c.id, generation: c.generation, how: written(true, since) };
    db.store
        .settle_many("w3", &[settled], now - chrono::Duration::days(3), (now, late), Utc::now())
        .await
        .expect("settle");
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain), ("pending", true), "still owed");
    // A pass that read after `late` finishes it.
    db.exec(&format!("UPDATE sink_phones SET next_attempt_at = {} WHERE id = {}", db.at(now), c.id))
        .await
        .expect("due");
    let c = db.claim("w4").await.remove(0);
    assert!(c.uncertain, "the pass knows it must read the sink");
    let settled = Settled { id: c.id, generation: c.generation, how: written(true, since) };
    let after = late + chrono::Duration::seconds(1);
    db.store.settle_many("w4", &[settled], now - chrono::Duration::days(3), (now, late), after).await.expect("settle");
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain, row.recheck_at), ("done", false, None));
    db.stop().await;
}

async fn a_write_settled_after_its_lease_was_lost_is_re_read_soon_and_late(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550402";
    db.record(&[event("SMlost1", p, EventKind::OptOut)], &redcap()).await;
    let frozen = db.claim("w1").await;
    assert_eq!(frozen.len(), 1);
    // w1 freezes; its lease lapses and w2 takes the row over, writes, settles.
    let past = db.at(Utc::now() - chrono::Duration::seconds(1));
    db.exec(&format!("UPDATE sink_phones SET locked_until = {past}")).await.unwrap();
    let owed = Utc::now() + chrono::Duration::minutes(10);
    let taken = db.store.claim_with_recheck("redcap", "w2", 10, LEASE, owed).await.expect("claim");
    assert_eq!(taken.len(), 1);
    let since = Some(whole_seconds(Utc::now()));
    let now = Utc::now();
    assert_eq!(db.settle("w2", &[(&taken[0], written(true, since))], (now, now)).await, 1);
    // w1's lease ran out unsettled: w2's claim owed the row a late re-read.
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain), ("pending", true), "a late re-read owed");
    assert_eq!(row.next_attempt_at.timestamp(), owed.timestamp(), "due when a late write would have landed");
    db.exec(&format!("UPDATE sink_phones SET next_attempt_at = {}", db.at(now))).await.unwrap();
    let reread = db.claim("w2").await;
    assert_eq!(reread.len(), 1);
    let settled = Settled { id: reread[0].id, generation: reread[0].generation, how: written(true, since) };
    let read_after = owed + chrono::Duration::seconds(1);
    let never = now - chrono::Duration::days(365);
    assert_eq!(db.store.settle_many("w2", &[settled], never, (now, now), read_after).await.expect("settle"), 1);
    assert_eq!(db.row("redcap", p).await.expect("row").status, "done");

    // w1 resumes and settles what it sent: its write may have landed after w2's.
    let soon = whole_seconds(Utc::now()) + chrono::Duration::seconds(30);
    let late = soon + chrono::Duration::minutes(10);
    assert_eq!(db.settle("w1", &[(&frozen[0], written(false, None))], (soon, late)).await, 0, "w1 lost its lease");
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!(row.status, "pending", "owed a re-read");
    assert!(row.uncertain);
    assert_eq!((row.next_attempt_at, row.recheck_at), (soon, Some(late)));
    assert_eq!(row.written(), Some(Held { opted_out: true, since }), "the stale settle recorded nothing as written");
    assert!(db.claim("w3").await.is_empty(), "not before `soon`");

    // The soon re-read: written again, still owed the late one.
    db.exec(&format!("UPDATE sink_phones SET next_attempt_at = {past}")).await.unwrap();
    let reread = db.claim("w3").await;
    assert_eq!(reread.len(), 1);
    assert!(reread[0].uncertain, "the worker knows to write whatever it last wrote");
    assert_eq!(db.settle("w3", &[(&reread[0], written(true, since))], (now, now)).await, 1);
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.next_attempt_at), ("pending", late), "the late re-read is still owed");
    // The late re-read (a pass that reads after `late`) ends it.
    db.exec(&format!("UPDATE sink_phones SET next_attempt_at = {past}")).await.unwrap();
    let last = db.claim("w4").await;
    assert_eq!(last.len(), 1);
    let settled = Settled { id: last[0].id, generation: last[0].generation, how: written(true, since) };
    let read_after = late + chrono::Duration::seconds(1);
    assert_eq!(db.store.settle_many("w4", &[settled], never, (now, now), read_after).await.expect("settle"), 1);
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain, row.recheck_at), ("done", false, None));
    db.stop().await;
}

async fn a_write_settled_late_while_another_worker_holds_the_row_is_re_read_too(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550403";
    db.record(&[event("SMlost2", p, EventKind::OptOut)], &redcap()).await;
    let frozen = db.claim("w1").await;
    let past = db.at(Utc::now() - chrono::Duration::seconds(1));
    db.exec(&format!("UPDATE sink_phones SET locked_until = {past}")).await.unwrap();
    let taken = db.claim("w2").await;
    assert_eq!(taken.len(), 1);
    let soon = whole_seconds(Utc::now()) + chrono::Duration::seconds(30);
    let late = soon + chrono::Duration::minutes(10);
    let since = Some(whole_seconds(Utc::now()));
    assert_eq!(db.settle("w1", &[(&frozen[0], written(true, since))], (soon, late)).await, 0);
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain, row.recheck_at), ("pending", true, Some(late)));
    // w2 finishes its own write, which may have come before w1's landed:
    // the row is still owed the soon re-read, and the late one after it.
    assert_eq!(db.settle("w2", &[(&taken[0], written(true, since))], (soon, late)).await, 1);
    let row = db.row("redcap", p).await.expect("row");
    assert_eq!((row.status.as_str(), row.uncertain), ("pending", true));
    assert!(row.next_attempt_at <= soon, "the soon re-read is kept: due {} > soon {soon}", row.next_attempt_at);
    assert_eq!(row.recheck_at, Some(late), "and the late one");
    db.stop().await;
}

// ---------------------------------------------------------------- sinks

async fn a_new_sink_gets_the_opt_outs_it_follows_and_a_known_one_is_made_due(b: Backend) {
    let db = fresh_store(b).await;
    let t = Utc::now() - chrono::Duration::hours(1);
    let s = |n: i64| t + chrono::Duration::seconds(n);
    // Recorded before any sink existed.
    db.record(
        &[
            event_in("SMreg1", "+14155550501", EventKind::OptOut, SERVICE_A, s(1)),
            event_in("SMreg2", "+14155550502", EventKind::OptOut, SERVICE_B, s(2)),
            event_in("SMreg3", "+14155550503", EventKind::OptOut, ORGANISATION_SCOPE, s(3)),
            event_in("SMreg4", "+14155550504", EventKind::OptOut, SERVICE_A, s(4)),
            event_in("SMreg5", "+14155550504", EventKind::OptIn, SERVICE_A, s(5)),
            event_in("SMreg6", "+14155550505", EventKind::OptIn, SERVICE_A, s(6)),
            event_in("SMreg7", "+14155550506", EventKind::OptIn, ORGANISATION_SCOPE, s(7)),
        ],
        &[],
    )
    .await;
    let sinks = [follow("study_a", Some(&[SERVICE_A])), follow("everything", None)];
    let added = db.store.register_sinks(&sinks).await.expect("register");
    assert_eq!(added, ["study_a", "everything"]);
    assert!(db.sinks_of("+14155550501").await.is_empty(), "registering queues nothing");
    for sink in &sinks {
        db.store.backfill(sink).await.expect("backfill");
    }
    assert_eq!(db.sinks_of("+14155550501").await, ["everything", "study_a"]);
    assert_eq!(db.sinks_of("+14155550502").await, ["everything"], "study_a does not follow B");
    assert_eq!(db.sinks_of("+14155550503").await, ["everything", "study_a"], "organisation-wide counts everywhere");
    for opted_in in ["+14155550504", "+14155550505", "+14155550506"] {
        assert!(db.sinks_of(opted_in).await.is_empty(), "{opted_in} is opted in: nothing to write");
    }
    let row = db.row("study_a", "+14155550501").await.expect("row");
    assert_eq!((row.status.as_str(), row.written()), ("pending", None), "pending, nothing written yet");
    assert!(row.event_id.is_some());

    // Known sinks: a backoff ends, and what was recorded while they were
    // absent from the configuration is backfilled (rows they have are kept).
    db.record(&[event_in("SMreg8", "+14155550507", EventKind::OptOut, SERVICE_A, s(8))], &[]).await;
    let far = Utc::now() + chrono::Duration::hours(1);
    db.store.sink_failed("study_a", Failing::Misconfigured, 1, far, "403").await.expect("failed");
    let before = Utc::now();
    assert!(db.store.register_sinks(&sinks).await.expect("register").is_empty(), "nothing new");
    assert!(db.sinks_of("+14155550507").await.is_empty());
    assert_eq!(db.store.backfill(&sinks[0]).await.expect("backfill"), 1, "only the phone it had no row for");
    assert_eq!(db.sinks_of("+14155550507").await, ["study_a"]);
    let sink = db.store.sink("study_a").await.expect("read").expect("known");
    let due = sink.next_probe_at.expect("due");
    assert!(due >= before - chrono::Duration::seconds(1) && due <= Utc::now(), "due now: {due}");
    assert_eq!(db.store.sinks().await.expect("sinks").len(), 2);
    // An operator's retry does the same without a restart.
    db.store.sink_failed("study_a", Failing::BackingOff, 4, far, "503").await.expect("failed");
    let before = Utc::now();
    assert!(db.store.release_sink("study_a").await.expect("release"));
    let due = db.store.sink("study_a").await.expect("read").expect("known").next_probe_at.expect("due");
    assert!(due >= before - chrono::Duration::seconds(1) && due <= Utc::now(), "due now: {due}");
    assert!(!db.store.release_sink("nosuch").await.expect("release"), "an unknown sink");
    db.stop().await;
}

async fn one_of_two_concurrent_callers_takes_the_probe(b: Backend) {
    let db = fresh_store(b).await;
    db.store.register_sinks(&redcap()).await.expect("register");
    let next = Utc::now() + chrono::Duration::minutes(1);
    assert!(!db.store.take_probe("redcap", next).await.expect("probe"), "a healthy sink has no probe to take");
    for round in 1..=5 {
        let due = Utc::now() - chrono::Duration::seconds(1);
        db.store.sink_failed("redcap", Failing::BackingOff, round, due, "503").await.expect("failed");
        let next = Utc::now() + chrono::Duration::minutes(1);
        let (s1, s2) = (db.store.clone(), db.store.clone());
        let a = tokio::spawn(async move { s1.take_probe("redcap", next).await.expect("probe") });
        let b = tokio::spawn(async move { s2.take_probe("redcap", next).await.expect("probe") });
        let won = [a.await.expect("task"), b.await.expect("task")];
        assert_eq!(won.iter().filter(|w| **w).count(), 1, "round {round}: {won:?}");
        assert!(!db.store.take_probe("redcap", next).await.expect("probe"), "not due again before `next`");
        let sink = db.store.sink("redcap").await.expect("read").expect("known");
        assert_eq!(sink.health, "backing_off");
        assert_eq!(sink.backoff_step, round);
    }
    db.stop().await;
}

// ---------------------------------------------------------------- states

async fn an_older_said_event_arriving_later_does_not_overwrite_the_state(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550601";
    let t = whole_seconds(Utc::now());
    db.record(&[event_in("SMnew1", p, EventKind::OptOut, SERVICE, t)], &redcap()).await;
    let stop_id = db.store.recent_events(&phone(p), 1).await.expect("events")[0].id;
    // A START said an hour earlier, delivered late (Twilio retries, a backfill).
    db.record(&[event_in("SMnew2", p, EventKind::OptIn, SERVICE, t - chrono::Duration::hours(1))], &redcap()).await;
    let states = db.store.states(&phone(p)).await.expect("states");
    assert_eq!(states.len(), 1);
    assert!(states[0].opted_out, "the STOP is newer by when it was said");
    assert_eq!((states[0].event_id, states[0].said_at, states[0].since), (stop_id, t, t));
    // Said later, it does win.
    db.record(&[event_in("SMnew3", p, EventKind::OptIn, SERVICE, t + chrono::Duration::seconds(1))], &redcap()).await;
    assert!(!db.store.states(&phone(p)).await.expect("states")[0].opted_out);
    // And in one batch the same rule holds, whatever the arrival order.
    let q = "+14155550602";
    let batch = [
        event_in("SMnew4", q, EventKind::OptOut, SERVICE, t),
        event_in("SMnew5", q, EventKind::OptIn, SERVICE, t - chrono::Duration::hours(1)),
    ];
    db.record(&batch, &redcap()).await;
    let states = db.store.states(&phone(q)).await.expect("states");
    assert!(states[0].opted_out, "{states:?}");
    db.stop().await;
}

async fn since_stays_at_the_first_stop_while_stops_repeat(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550603";
    let t = whole_seconds(Utc::now()) - chrono::Duration::hours(1);
    let s = |n: i64| t + chrono::Duration::seconds(n);
    let state = || async { db.store.states(&phone(p)).await.expect("states").remove(0) };
    db.record(&[event_in("SMsin1", p, EventKind::OptOut, SERVICE, s(0))], &redcap()).await;
    db.record(&[event_in("SMsin2", p, EventKind::OptOut, SERVICE, s(10))], &redcap()).await;
    let st = state().await;
    assert_eq!((st.opted_out, st.since, st.said_at), (true, s(0), s(10)), "a second STOP does not move `since`");
    db.record(&[event_in("SMsin3", p, EventKind::OptIn, SERVICE, s(20))], &redcap()).await;
    let st = state().await;
    assert_eq!((st.opted_out, st.since), (false, s(20)));
    db.record(&[event_in("SMsin4", p, EventKind::OptOut, SERVICE, s(30))], &redcap()).await;
    let st = state().await;
    assert_eq!((st.opted_out, st.since), (true, s(30)), "a new opt-out begins at its STOP");
    db.stop().await;
}

/// The same rule when the events come in one batch (the batch writer groups
/// webhooks that arrive together).
async fn since_is_kept_the_same_way_within_one_batch(b: Backend) {
    let db = fresh_store(b).await;
    let p = "+14155550604";
    let t = whole_seconds(Utc::now()) - chrono::Duration::hours(1);
    let s = |n: i64| t + chrono::Duration::seconds(n);
    let state = || async { db.store.states(&phone(p)).await.expect("states").remove(0) };
    let batch = [
        event_in("SMsib1", p, EventKind::OptOut, SERVICE, s(0)),
        event_in("SMsib2", p, EventKind::OptOut, SERVICE, s(10)),
    ];
    db.record(&batch, &redcap()).await;
    let st = state().await;
    assert_eq!((st.opted_out, st.since, st.said_at), (true, s(0), s(10)), "the opt-out began at the first STOP");
    // Opted out since s(0); a START and a new STOP arrive together: the
    // opt-out now begins at the new STOP.
    let batch = [
        event_in("SMsib3", p, EventKind::OptIn, SERVICE, s(20)),
        event_in("SMsib4", p, EventKind::OptOut, SERVICE, s(30)),
    ];
    db.record(&batch, &redcap()).await;
    let st = state().await;
    assert_eq!((st.opted_out, st.since, st.said_at), (true, s(30), s(30)), "the START in between ended the first");
    db.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_is_kept_the_same_way_within_one_batch_on_sqlite() {
    since_is_kept_the_same_way_within_one_batch(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_is_kept_the_same_way_within_one_batch_on_postgres() {
    since_is_kept_the_same_way_within_one_batch(Backend::Postgres).await;
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
        db.record(chunk, &redcap()).await;
    }
    let status = optout_relay::ops::phone_status(&db.store, &[], &phone("+14155550102")).await.unwrap();
    assert_eq!(status.events.len(), 500);
    let sids: Vec<&str> = status.events.iter().map(|e| e.message_sid.as_str()).collect();
    assert_eq!(sids[0], "SMhist0519", "the newest event first");
    assert_eq!(sids[499], "SMhist0020", "the oldest shown is the 500th newest");
    assert!(status.events.windows(2).all(|w| w[0].id > w[1].id), "strictly newest first");
    // The last event is a START (odd index): the phone is not opted out.
    assert!(!status.opted_out);
    assert_eq!(status.states.len(), 1);
    db.stop().await;
}

async fn a_replayed_row_restarts_its_age_clock(b: Backend) {
    let db = fresh_store(b).await;
    db.record(&[event("SMage1", "+14155550103", EventKind::OptOut)], &redcap()).await;
    let claimed = db.claim("w1").await;
    let now = Utc::now();
    let failed = Settle::Failed { error: "503".into() };
    assert_eq!(db.settle("w1", &[(&claimed[0], failed.clone())], (now, now)).await, 1);
    // Older than max_age (here: anything queued before a second from now): dead.
    assert_eq!(db.store.expire("redcap", Utc::now() + chrono::Duration::seconds(1), "gave up").await.unwrap(), 1);
    let row = db.row("redcap", "+14155550103").await.expect("row");
    assert_eq!((row.status.as_str(), row.last_error.as_deref()), ("dead", Some("503")));
    // It was queued (and dead-lettered) four days ago.
    let old = db.at(Utc::now() - chrono::Duration::days(4));
    db.exec(&format!("UPDATE sink_phones SET queued_at = {old}")).await.unwrap();

    assert_eq!(db.store.replay_dead(Some("other")).await.unwrap(), 0, "only the named sink");
    assert_eq!(db.store.replay_dead(Some("redcap")).await.unwrap(), 1);
    let again = db.claim("w2").await;
    assert_eq!(again.len(), 1);
    let d = &again[0];
    assert_eq!(d.attempts, 0, "attempts start again");
    assert!((Utc::now() - d.queued_at).num_seconds() < 60, "max_age counts from the replay: {}", d.queued_at);

    // With the relay's max_age, its next failure keeps it pending, not dead.
    let max_age = optout_relay::config::RelayConfig::default().max_age;
    let dead_before = Utc::now() - chrono::Duration::from_std(max_age).unwrap();
    let settled = Settled { id: d.id, generation: d.generation, how: failed };
    assert_eq!(db.store.settle_many("w2", &[settled], dead_before, (now, now), now).await.unwrap(), 1);
    assert_eq!(db.store.expire("redcap", dead_before, "gave up").await.unwrap(), 0);
    assert_eq!(db.row("redcap", "+14155550103").await.expect("row").status, "pending");
    db.stop().await;
}

// ---------------------------------------------------------------- corrupt rows

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stored_time_or_json_is_an_error_naming_the_row_not_1970() {
    let db = fresh_store(Backend::Sqlite).await;
    db.record(&[event("SMbad1", "+14155550104", EventKind::OptOut)], &redcap()).await;
    let p = phone("+14155550104");
    assert_eq!(db.store.recent_events(&p, 10).await.unwrap().len(), 1);

    for bad in ["'yesterday'", "9223372036854775807"] {
        db.exec(&format!("UPDATE events SET received_at = {bad}")).await.unwrap();
        match db.store.recent_events(&p, 10).await {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("events row 1"), "{m}"),
            other => panic!("{bad}: expected a corrupt-row error, got {other:?}"),
        }
    }
    db.exec(&format!("UPDATE events SET received_at = {}", Utc::now().timestamp_millis())).await.unwrap();

    // A claim reading a bad written time says so, rather than stamping REDCap with 1970.
    let id = db.row("redcap", "+14155550104").await.expect("row").id;
    let now = Utc::now().timestamp_millis();
    db.exec(&format!("UPDATE sink_phones SET written_opted_out = 1, written_since = 'yesterday', written_at = {now}"))
        .await
        .unwrap();
    match db.store.claim("redcap", "w", 1, LEASE).await {
        Err(StoreError::Corrupt(m)) => {
            assert!(m.contains(&format!("sink_phones row {id}")) && m.contains("written_since"), "{m}")
        }
        other => panic!("expected a corrupt-row error, got {other:?}"),
    }
    db.exec(&format!("UPDATE sink_phones SET written_since = {now}, locked_until = NULL, locked_by = NULL"))
        .await
        .unwrap();
    let claimed = db.claim("w").await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(db.settle("w", &[(&claimed[0], written(true, Some(Utc::now())))], (Utc::now(), Utc::now())).await, 1);
    db.exec("UPDATE sink_phones SET result = '{not json'").await.unwrap();
    match db.store.deliveries_of_phone(&p).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains(&format!("sink_phones row {id}")), "{m}"),
        other => panic!("expected a corrupt-row error, got {other:?}"),
    }
    db.stop().await;
}

/// A NUL byte, which PostgreSQL's text and jsonb refuse, in an event from
/// any way in (not only the HTTP edge: the CLI, imports) is stored as U+FFFD
/// instead of failing the commit on every retry.
async fn an_event_with_a_nul_byte_is_recorded_with_a_replacement_character(b: Backend) {
    let db = fresh_store(b).await;
    let mut e = event("SMnul1", "+14155550710", EventKind::OptOut);
    e.body = "STOP\0please".into();
    e.source = "staff:\0x".into();
    e.params = json!({"Body": "STOP\0", "we\0ird": ["a\0", 1]});
    let outcome = db.store.record_events(&[e]).await.expect("recorded, not refused");
    let id = match outcome[0] {
        optout_relay::store::RecordOutcome::Recorded(id) => id,
        other => panic!("{other:?}"),
    };
    let row = db.store.event(id).await.expect("read").expect("the event");
    assert_eq!(row.body, "STOP\u{FFFD}please");
    assert_eq!(row.source, "staff:\u{FFFD}x");
    db.stop().await;
}

// ------------------------------------------------------------------ fan-out

/// Ingest writes one change whatever the number of sinks; the fan-out gives
/// it to every sink that follows it, once. A notification sink registered
/// after the change does not get it (the past is not news); any other sink
/// does, so a change recorded while a sink is registered and backfilled
/// cannot slip between the two.
async fn the_fan_out_gives_each_sink_the_changes_recorded_since_it_was_registered(b: Backend) {
    let db = fresh_store(b).await;
    let a = follow("study_a", None);
    let later = SinkFollow { since_registered: true, ..follow("later", None) };
    let backfilled = follow("backfilled", None);
    db.store.register_sinks(std::slice::from_ref(&a)).await.expect("register");
    db.store.record_events(&[event("SMfo1", "+14155550701", EventKind::OptOut)]).await.expect("record");
    assert_eq!(db.store.changes_waiting().await.expect("count"), 1, "one change, not one row per sink");
    assert!(db.sinks_of("+14155550701").await.is_empty(), "nothing fanned out yet");
    db.store.register_sinks(&[later.clone(), backfilled.clone()]).await.expect("register");
    let sinks = [a, later, backfilled];
    assert_eq!(db.store.fan_out(&sinks, 100).await.expect("fan out"), 1);
    assert_eq!(db.sinks_of("+14155550701").await, ["backfilled", "study_a"], "recorded before `later` existed");
    db.store.record_events(&[event("SMfo2", "+14155550702", EventKind::OptOut)]).await.expect("record");
    db.store.fan_out(&sinks, 100).await.expect("fan out");
    assert_eq!(db.sinks_of("+14155550702").await, ["backfilled", "later", "study_a"]);
    assert_eq!(db.store.changes_waiting().await.expect("count"), 0);
    assert_eq!(db.store.fan_out(&sinks, 100).await.expect("fan out"), 0, "each change is taken once");
    let row = db.row("study_a", "+14155550701").await.expect("row");
    assert_eq!(db.generation(row.id).await, 1, "made pending once");
    // HELP is no change; a scope nobody follows is taken and dropped.
    db.record(&[event("SMfo3", "+14155550703", EventKind::Help)], &sinks).await;
    let scoped = [follow("study_b", Some(&[SERVICE_B]))];
    db.record(&[event_in("SMfo4", "+14155550704", EventKind::OptOut, SERVICE_A, Utc::now())], &scoped).await;
    assert!(db.sinks_of("+14155550703").await.is_empty() && db.sinks_of("+14155550704").await.is_empty());
    assert_eq!(db.store.changes_waiting().await.expect("count"), 0);
    db.stop().await;
}

/// Fan-outs running at once (two workers, two replicas) take disjoint
/// changes: every change reaches its sinks once, none is left behind.
async fn concurrent_fan_outs_lose_and_repeat_nothing(b: Backend) {
    let db = fresh_store(b).await;
    let phones: Vec<String> = (0..400).map(|i| format!("+1415555{:04}", 2000 + i)).collect();
    let events: Vec<NewEvent> =
        phones.iter().enumerate().map(|(i, p)| event(&format!("SMcf{i}"), p, EventKind::OptOut)).collect();
    for chunk in events.chunks(50) {
        db.store.record_events(chunk).await.expect("record");
    }
    let sinks = vec![follow("one", None), follow("two", None), follow("three", None)];
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (store, sinks) = (db.store.clone(), sinks.clone());
        tasks.push(tokio::spawn(async move {
            let mut taken = 0;
            loop {
                let n = store.fan_out(&sinks, 30).await.expect("fan out");
                taken += n;
                if n < 30 {
                    return taken;
                }
            }
        }));
    }
    let mut taken = 0;
    for t in tasks {
        taken += t.await.expect("task");
    }
    assert_eq!(taken, 400, "every change taken exactly once");
    assert_eq!(db.store.changes_waiting().await.expect("count"), 0);
    let counts = query_texts(&db.url, "SELECT CAST(COUNT(*) AS TEXT) FROM sink_phones").await;
    assert_eq!(counts, ["1200"], "one row per sink and phone");
    let twice = query_texts(&db.url, "SELECT CAST(COUNT(*) AS TEXT) FROM sink_phones WHERE generation <> 1").await;
    assert_eq!(twice, ["0"], "no row made pending twice");
    db.stop().await;
}

both_backends!(
    an_event_with_a_nul_byte_is_recorded_with_a_replacement_character,
    the_fan_out_gives_each_sink_the_changes_recorded_since_it_was_registered,
    concurrent_fan_outs_lose_and_repeat_nothing,
    schema_refuses_rows_that_break_the_queue_invariants,
    a_claim_skips_rows_not_yet_due_and_a_lost_lease_comes_due,
    each_event_marks_only_the_sinks_that_follow_its_scope,
    a_newer_event_bumps_the_generation_and_a_write_of_the_older_target_stays_pending,
    a_write_settled_after_its_lease_was_lost_is_re_read_soon_and_late,
    a_newer_change_between_the_re_reads_does_not_cancel_the_late_one,
    a_write_settled_late_while_another_worker_holds_the_row_is_re_read_too,
    a_new_sink_gets_the_opt_outs_it_follows_and_a_known_one_is_made_due,
    one_of_two_concurrent_callers_takes_the_probe,
    an_older_said_event_arriving_later_does_not_overwrite_the_state,
    since_stays_at_the_first_stop_while_stops_repeat,
    phone_status_shows_the_newest_events_newest_first,
    a_replayed_row_restarts_its_age_clock,
);
