//! Operator and relay query benchmark (issues #7, #8): how long the queries
//! behind `GET /v1/phones/{phone}`, `GET /v1/events?phone=`,
//! `GET /v1/deliveries` (the `sink_phones` list), `GET /metrics` (the queue
//! statistics) and the relay's claim and settle take on an empty store and on
//! a store holding a realistic history, measured in the same run.
//!
//! ```text
//! cargo run --release --locked --example query_bench -- --backend postgres   # or sqlite
//! ```
//!
//! For each database (first an empty one, the baseline, then a seeded one):
//!
//! * **Seeding** (not measured). `--events` (200,000) events go through
//!   `Store::record_events` in batches of `--batch`, with sinks `redcap` and
//!   `email` following every scope, so every phone has one `sink_phones` row
//!   per sink. Event `i` is from phone `i % --phones` (50,000 phones, so four
//!   events each, 100,000 rows); a phone's events alternate opt-out/opt-in
//!   and move through `--scopes` (3) scopes. One event a minute, the newest
//!   now. Then plain SQL over a separate connection gives the rows the shape
//!   of a store that has been relaying for a while, by the phone's newest
//!   event: the `--pending` (5,000) phones heard from last stay pending, the
//!   oldest `--not-due` (4,000) of those wait an hour (a sink backing off
//!   leaves them due later), `--dead` (500) phones from the middle are dead,
//!   and all the others are done, holding what the phone's newest event
//!   said. PostgreSQL then gets
//!   `VACUUM ANALYZE`, the state autovacuum keeps a live database in (and
//!   autovacuum cannot start during the measurement); SQLite gets nothing,
//!   because the application never runs `ANALYZE` on it.
//! * **Timing.** The application (`Application::build`, admin token set, no
//!   sink configured so no relay worker touches the queue) listens on
//!   127.0.0.1:0. Each query runs `--warmup` (20) times unmeasured, then
//!   `--reps` (200) times in a row over one keep-alive connection; the time of
//!   one HTTP request is from sending it to having read the whole body. The
//!   phone requests rotate over 64 phones spread through the history, each
//!   with `events / phones` events and one row per sink (`/v1/phones` reads
//!   them whether or not a sink is configured). The list is
//!   `GET /v1/deliveries?status=pending&sink=redcap` (first page of 100). The
//!   claim is `Store::claim("redcap", …, 500, 60 s)`, as a relay worker makes
//!   it, straight on the store; the batch is then settled as written
//!   (`settle_many` with `Settle::Written`, the worker's common case, timed on
//!   its own line), and put back to pending at its old due time by plain SQL
//!   (not timed), so every claim finds the same due work.
//! * **Plans** (after the timing, unless `--no-plans`). The same requests once
//!   more, recording what the store actually ran: on PostgreSQL through
//!   `auto_explain` (loaded for the benchmark database only, `log_analyze`
//!   on, sent to the client as NOTICEs), on SQLite by capturing sqlx's
//!   statement log and running `EXPLAIN QUERY PLAN` on each statement. These
//!   are the plans of whatever store the binary was built from.
//!
//! Output: `RESULT …` lines (key=value), then a markdown table and the plans.
//! Exit code 1 if a check failed (an answer that is not 200, a phone without
//! its history, a claim that did not find the due work, seeded counts that do
//! not match). PostgreSQL: creates `optout_bench_<16 hex>` through
//! `--pg-admin-url` (a superuser, for `auto_explain`) and drops it at the end.
//! SQLite: a file in a temporary directory. Loopback only.

#[path = "bench_db/mod.rs"]
mod bench_db;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bench_db::{drop_db, fresh_db, Db};
use chrono::Utc;
use clap::Parser;
use optout_relay::config::Config;
use optout_relay::domain::{EventKind, MessageSid, Phone};
use optout_relay::startup::Application;
use optout_relay::store::{Held, NewEvent, Settle, Settled, SinkFollow, Store};
use secrecy::SecretString;
use serde_json::{json, Value};
use sqlx::{Connection, Row};
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const ADMIN_TOKEN: &str = "query-bench-admin-token-0123456789";
const AUTH_TOKEN: &str = "bench-auth-token-0123456789abcdef";
const PUBLIC_URL: &str = "https://optout.bench.example";
const SINKS: [&str; 2] = ["redcap", "email"];
/// Rows per page of the measured `/v1/deliveries` list (the endpoint's default).
const LIST_PAGE: usize = 100;
const OWNER: &str = "query-bench";
const CLAIM_LIMIT: u32 = 500;
/// Phones the phone requests rotate over.
const PROBE_PHONES: usize = 64;

#[derive(Parser, Debug, Clone)]
#[command(about = "Operator and relay query timings on an empty and on a seeded store")]
struct Args {
    /// postgres or sqlite.
    #[arg(long, default_value = "postgres")]
    backend: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Events in the seeded store.
    #[arg(long, default_value_t = 200_000)]
    events: usize,
    /// Distinct phones the events come from.
    #[arg(long, default_value_t = 50_000)]
    phones: usize,
    /// Scopes (messaging services) a phone's events move through.
    #[arg(long, default_value_t = 3)]
    scopes: usize,
    /// Phones heard from last whose rows stay pending (per sink).
    #[arg(long, default_value_t = 5_000)]
    pending: usize,
    /// Of those, the oldest ones, due only an hour from now.
    #[arg(long, default_value_t = 4_000)]
    not_due: usize,
    /// Phones whose rows are dead (per sink), from the middle.
    #[arg(long, default_value_t = 500)]
    dead: usize,
    /// Events per record_events call while seeding.
    #[arg(long, default_value_t = 2_000)]
    batch: usize,
    /// Measured repetitions of each query.
    #[arg(long, default_value_t = 200)]
    reps: usize,
    /// Unmeasured repetitions before them.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Do not print the query plans.
    #[arg(long)]
    no_plans: bool,
    /// Skip the empty-database baseline.
    #[arg(long)]
    skip_empty: bool,
}

// ---------------------------------------------------------------------------
// Capturing what the store runs (plan pass only).

/// On only during the plan pass, so the timed requests pay nothing for it.
static CAPTURING: AtomicBool = AtomicBool::new(false);
static CAPTURED: Mutex<Vec<Captured>> = Mutex::new(Vec::new());

#[derive(Debug, Clone)]
enum Captured {
    /// A statement sqlx ran (its full text).
    Statement(String),
    /// A PostgreSQL NOTICE (auto_explain's plans arrive this way).
    Notice(String),
}

fn take_captured() -> Vec<Captured> {
    std::mem::take(&mut *CAPTURED.lock().unwrap_or_else(|e| e.into_inner()))
}

#[derive(Default)]
struct Fields {
    message: String,
    statement: String,
    summary: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" && self.message.is_empty() {
            self.message = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "db.statement" => self.statement = value.to_owned(),
            "summary" => self.summary = value.to_owned(),
            _ => {}
        }
    }
}

struct Capture;

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let item = if event.metadata().target() == "sqlx::postgres::notice" {
            Captured::Notice(f.message)
        } else {
            // sqlx leaves db.statement empty when the summary is the whole statement.
            let text = if f.statement.trim().is_empty() { f.summary } else { f.statement.trim().to_owned() };
            Captured::Statement(text)
        };
        CAPTURED.lock().unwrap_or_else(|e| e.into_inner()).push(item);
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::{dynamic_filter_fn, EnvFilter};
    let capture = dynamic_filter_fn(|meta, _| {
        CAPTURING.load(Ordering::Relaxed)
            && (meta.target() == "sqlx::query" || meta.target() == "sqlx::postgres::notice")
    });
    // The app's request logs are off (as cheap as a disabled log can be); warnings still show.
    let shown = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error,sqlx::postgres::notice=error"));
    tracing_subscriber::registry()
        .with(Capture.with_filter(capture))
        .with(tracing_subscriber::fmt::layer().compact().with_writer(std::io::stderr).with_filter(shown))
        .init();
}

// ---------------------------------------------------------------------------
// Databases.

fn store_for(db: &Db, max_connections: u32) -> anyhow::Result<Store> {
    let mut cfg = Config::default().database;
    cfg.url = SecretString::from(db.url.clone());
    cfg.max_connections = max_connections;
    Ok(Store::connect_lazy(&cfg)?)
}

// ---------------------------------------------------------------------------
// Seeding.

/// The n-th phone: distinct E.164 numbers that `Phone::parse` keeps as they are.
fn phone_of(n: usize) -> String {
    format!("+1415{:07}", 2_000_000 + n)
}

fn event(args: &Args, i: usize, now: chrono::DateTime<Utc>) -> anyhow::Result<NewEvent> {
    let p = i % args.phones;
    let round = i / args.phones;
    let kind = if round % 2 == 0 { EventKind::OptOut } else { EventKind::OptIn };
    let body = if kind == EventKind::OptOut { "STOP" } else { "START" };
    let scope = format!("MG{:032x}", (p + round) % args.scopes.max(1) + 1);
    let sid = format!("SM{i:032x}");
    let from = phone_of(p);
    let account = format!("AC{:032x}", 7);
    // One event a minute, the newest now.
    let minutes = i64::try_from(args.events - i)?;
    Ok(NewEvent {
        message_sid: MessageSid::parse(&sid).ok_or_else(|| anyhow::anyhow!("bad sid {sid}"))?,
        account_sid: Some(account.clone()),
        messaging_service_sid: Some(scope.clone()),
        phone: Phone::parse(&from, optout_relay::domain::parse_region("US").ok_or_else(|| anyhow::anyhow!("US"))?)
            .map_err(|_| anyhow::anyhow!("bad phone {from}"))?,
        // The full set of fields Twilio posts, so rows are as wide as real ones.
        params: json!({
            "ToCountry": "US", "ToState": "CA", "SmsMessageSid": sid, "NumMedia": "0", "ToCity": "",
            "FromZip": "", "SmsSid": sid, "FromState": "CA", "SmsStatus": "received", "FromCity": "",
            "Body": body, "FromCountry": "US", "To": "+14155550100", "MessagingServiceSid": scope,
            "ToZip": "", "NumSegments": "1", "MessageSid": sid, "AccountSid": account, "From": from,
            "ApiVersion": "2010-04-01", "OptOutType": if kind == EventKind::OptOut { "STOP" } else { "START" },
        }),
        scope,
        from_raw: from,
        to: Some("+14155550100".into()),
        kind,
        body: body.into(),
        received_at: now - chrono::Duration::minutes(minutes),
        source: "twilio".into(),
    })
}

/// How the seeded `sink_phones` rows were shaped, by the `event_id` of each
/// row (the phone's newest event; the last `phones` events, one per phone).
struct Shape {
    events: usize,
    /// The newest event id (the newest pending row's).
    last_event: i64,
    /// Rows whose event id is above this stay pending.
    pending_after: i64,
    /// Pending rows with an event id up to this are due an hour from now.
    not_due_upto: i64,
    /// Rows with an event id in (dead_after, dead_upto] are dead.
    dead_after: i64,
    dead_upto: i64,
}

fn follows() -> Vec<SinkFollow> {
    SINKS.iter().map(|s| SinkFollow { sink: (*s).to_owned(), scopes: None, since_registered: false }).collect()
}

/// The shaping statements, the same SQL on both backends (the bounds are
/// integers written in; `$1`: the time an hour from now). Done rows hold
/// what the phone's newest event said, as if the relay had written it.
fn shaping(s: &Shape) -> [(String, bool); 3] {
    let Shape { pending_after, dead_after, dead_upto, not_due_upto, .. } = s;
    [
        (
            format!(
                "UPDATE sink_phones
                    SET status = 'done', attempts = 0, written_at = updated_at, result = '{{\"records\": [\"1\"]}}',
                        written_opted_out = (SELECT e.kind = 'opt_out' FROM events e WHERE e.id = sink_phones.event_id),
                        written_since = (SELECT CASE WHEN e.kind = 'opt_out' THEN e.received_at END
                                           FROM events e WHERE e.id = sink_phones.event_id)
                  WHERE event_id <= {pending_after} AND NOT (event_id > {dead_after} AND event_id <= {dead_upto})"
            ),
            false,
        ),
        (
            format!(
                "UPDATE sink_phones SET status = 'dead', attempts = 8, last_error = 'REDCap answered 403: no such field'
                  WHERE event_id > {dead_after} AND event_id <= {dead_upto}"
            ),
            false,
        ),
        (
            format!(
                "UPDATE sink_phones SET attempts = 3, next_attempt_at = $1, last_error = 'REDCap answered 503'
                  WHERE event_id > {pending_after} AND event_id <= {not_due_upto}"
            ),
            true,
        ),
    ]
}

async fn seed(args: &Args, db: &Db, store: &Store) -> anyhow::Result<Shape> {
    let now = Utc::now();
    let started = Instant::now();
    let mut next_report = 50_000;
    let follows = follows();
    for start in (0..args.events).step_by(args.batch.max(1)) {
        let end = (start + args.batch.max(1)).min(args.events);
        let batch: Vec<NewEvent> = (start..end).map(|i| event(args, i, now)).collect::<anyhow::Result<_>>()?;
        store.record_events(&batch).await?;
        store.fan_out(&follows, u32::MAX).await?;
        if end >= next_report {
            eprintln!("   {end} events recorded ({:.1} s)", started.elapsed().as_secs_f64());
            next_report += 50_000;
        }
    }
    let recorded = started.elapsed();

    let pending = i64::try_from(args.pending.min(args.events).min(args.phones))?;
    let not_due = i64::try_from(args.not_due.min(args.pending))?;
    let dead = i64::try_from(args.dead)?;
    let settled = Instant::now();
    let mut c = Raw::connect(db).await?;
    let (lo, hi) = c.event_id_range().await?;
    let shape = shape(args, lo, hi, pending, not_due, dead);
    let future = now + chrono::Duration::hours(1);
    for (sql, timed) in shaping(&shape) {
        c.execute(&sql, timed.then_some(future)).await?;
    }
    c.vacuum_analyze().await?;
    c.close().await;
    println!(
        "SEED backend={} events={} sink_phones_per_sink={} record_events_s={:.1} settle_sql_s={:.1} pending_per_sink={} not_due_per_sink={} dead_per_sink={}",
        args.backend,
        shape.events,
        hi - lo + 1,
        recorded.as_secs_f64(),
        settled.elapsed().as_secs_f64(),
        shape.last_event - shape.pending_after,
        shape.not_due_upto - shape.pending_after,
        shape.dead_upto - shape.dead_after,
    );
    Ok(shape)
}

/// `lo..=hi`: the event ids the rows point at (contiguous: ids follow arrival).
fn shape(args: &Args, lo: i64, hi: i64, pending: i64, not_due: i64, dead: i64) -> Shape {
    let pending_after = (hi - pending).max(lo - 1);
    // Dead ones from the middle of the done ones, clear of the pending ones.
    let dead_after = (lo - 1 + (pending_after - lo + 1 - dead) / 2).max(lo - 1);
    Shape {
        events: args.events,
        last_event: hi,
        pending_after,
        not_due_upto: pending_after + not_due,
        dead_after,
        dead_upto: (dead_after + dead).min(pending_after),
    }
}

/// A plain connection beside the store's pool, for what the application
/// never does (shaping the seeded rows, putting claimed rows back).
enum Raw {
    Pg(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl Raw {
    async fn connect(db: &Db) -> anyhow::Result<Raw> {
        Ok(match &db.pg_name {
            Some(_) => Raw::Pg(sqlx::PgConnection::connect(&db.url).await?),
            None => Raw::Sqlite(sqlx::SqliteConnection::connect(&db.url).await?),
        })
    }

    async fn event_id_range(&mut self) -> anyhow::Result<(i64, i64)> {
        const SQL: &str =
            "SELECT COALESCE(MIN(event_id), 1), COALESCE(MAX(event_id), 0) FROM sink_phones WHERE sink = 'redcap'";
        Ok(match self {
            Raw::Pg(c) => sqlx::query_as(SQL).fetch_one(c).await?,
            Raw::Sqlite(c) => sqlx::query_as(SQL).fetch_one(c).await?,
        })
    }

    /// Runs `sql`, binding `at` as `$1` if given (the store keeps instants as
    /// TIMESTAMPTZ on PostgreSQL, milliseconds on SQLite).
    async fn execute(&mut self, sql: &str, at: Option<chrono::DateTime<Utc>>) -> anyhow::Result<u64> {
        let rows = match (self, at) {
            (Raw::Pg(c), Some(at)) => sqlx::query(sql).bind(at).execute(c).await?.rows_affected(),
            (Raw::Pg(c), None) => sqlx::query(sql).execute(c).await?.rows_affected(),
            (Raw::Sqlite(c), Some(at)) => {
                sqlx::query(sql).bind(at.timestamp_millis()).execute(c).await?.rows_affected()
            }
            (Raw::Sqlite(c), None) => sqlx::query(sql).execute(c).await?.rows_affected(),
        };
        Ok(rows)
    }

    /// Puts settled rows back to pending at their old due time (their
    /// `queued_at`, in the past), so the next claim finds the same work.
    async fn unsettle(&mut self, ids: &[i64]) -> anyhow::Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let sql = format!(
            "UPDATE sink_phones SET status = 'pending', next_attempt_at = queued_at,
                    locked_until = NULL, locked_by = NULL WHERE id IN ({list})"
        );
        self.execute(&sql, None).await.map(drop)
    }

    /// PostgreSQL only: the state autovacuum keeps a live database in.
    async fn vacuum_analyze(&mut self) -> anyhow::Result<()> {
        if let Raw::Pg(c) = self {
            sqlx::query("VACUUM ANALYZE").execute(c).await?;
        }
        Ok(())
    }

    async fn close(self) {
        match self {
            Raw::Pg(c) => {
                let _ = c.close().await;
            }
            Raw::Sqlite(c) => {
                let _ = c.close().await;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The application.

struct Running {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(db: &Db) -> anyhow::Result<Running> {
    let mut c = Config::default();
    c.server.listen = ([127, 0, 0, 1], 0).into();
    c.server.public_url = Some(PUBLIC_URL.to_owned());
    c.server.shutdown_grace = Duration::from_secs(5);
    c.database.url = SecretString::from(db.url.clone());
    // The benchmark migrated the store itself; nothing else runs on the pool.
    c.database.run_migrations_on_start = false;
    c.twilio.auth_tokens = vec![SecretString::from(AUTH_TOKEN)];
    c.admin.tokens = vec![SecretString::from(ADMIN_TOKEN)];
    // No sink: no relay worker claims from the queue while it is measured.
    let app = Application::build(c).await.map_err(|e| anyhow::anyhow!("build: {e}"))?;
    let addr = app.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone()));
    Ok(Running { addr, shutdown, handle })
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
    }
}

// ---------------------------------------------------------------------------
// Measuring.

#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    p50: f64,
    p99: f64,
    mean: f64,
    max: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mean = if n == 0 { f64::NAN } else { v.iter().sum::<f64>() / n as f64 };
    Stats { n, p50: percentile(&v, 50.0), p99: percentile(&v, 99.0), mean, max: v.last().copied().unwrap_or(f64::NAN) }
}

/// The queries, in the order they are measured and reported.
const QUERIES: [(&str, &str); 6] = [
    ("phone", "`GET /v1/phones/{phone}`"),
    ("events_by_phone", "`GET /v1/events?phone=…`"),
    ("deliveries", "`GET /v1/deliveries?status=pending&sink=redcap`"),
    ("metrics", "`GET /metrics` (queue statistics)"),
    ("claim", "claim of 500 (`redcap`)"),
    ("settle", "settle_many of 500 (written)"),
];

/// A claimed batch settled as a worker does after a successful write.
fn written(got: &[optout_relay::store::ClaimedPhone]) -> Vec<Settled> {
    let how = Settle::Written {
        held: Held { opted_out: true, since: Some(Utc::now()) },
        result: Some(json!({ "records": ["1"] })),
    };
    got.iter().map(|d| Settled { id: d.id, generation: d.generation, how: how.clone() }).collect()
}

async fn settle(store: &Store, batch: &[Settled]) -> anyhow::Result<u64> {
    let now = Utc::now();
    let dead_before = now - chrono::Duration::days(3);
    let recheck = (now + chrono::Duration::seconds(15), now + chrono::Duration::minutes(10));
    Ok(store.settle_many(OWNER, batch, dead_before, recheck, Utc::now()).await?)
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// One GET; the time covers sending it and reading the whole body.
    async fn get(&self, path: &str) -> anyhow::Result<(Duration, Vec<u8>)> {
        let t = Instant::now();
        let res = self.http.get(format!("{}{path}", self.base)).bearer_auth(ADMIN_TOKEN).send().await?;
        let status = res.status().as_u16();
        let body = res.bytes().await?;
        let took = t.elapsed();
        anyhow::ensure!(status == 200, "GET {path} answered {status}: {}", String::from_utf8_lossy(&body));
        Ok((took, body.to_vec()))
    }
}

fn probe_phones(args: &Args) -> Vec<String> {
    let phones = args.phones.max(1);
    (0..PROBE_PHONES).map(|k| phone_of((k * 7919 + 13) % phones)).collect()
}

/// What one phone's history holds in the seeded store (every phone has the same count).
fn events_per_phone(args: &Args, seeded: bool) -> usize {
    if !seeded {
        return 0;
    }
    args.events / args.phones.max(1)
}

async fn measure_all(
    args: &Args,
    db: &Db,
    store: &Store,
    app: &Running,
    seeded: Option<&Shape>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Vec<(&'static str, Stats)>> {
    let label = seeded.map_or("empty".to_owned(), |s| s.events.to_string());
    let client = Client { http: reqwest::Client::builder().build()?, base: format!("http://{}", app.addr) };
    let phones = probe_phones(args);
    let expect_events = events_per_phone(args, seeded.is_some());
    let mut out = Vec::new();

    // Checks first, once, outside the timing: the answers hold what the store holds.
    for phone in phones.iter().take(4) {
        let (_, body) = client.get(&format!("/v1/phones/{phone}")).await?;
        let v: Value = serde_json::from_slice(&body)?;
        let n = v["events"].as_array().map_or(0, Vec::len);
        // No sink is configured, so the answer lists none; the rows it read are checked on the store.
        let p = Phone::parse(phone, optout_relay::domain::parse_region("US").ok_or_else(|| anyhow::anyhow!("US"))?)
            .map_err(|_| anyhow::anyhow!("bad phone {phone}"))?;
        let rows = store.deliveries_of_phone(&p).await?.len();
        let want_rows = if seeded.is_some() { SINKS.len() } else { 0 };
        if n != expect_events || rows != want_rows {
            problems.push(format!(
                "{label}: /v1/phones/{phone} shows {n} events and the store {rows} sink rows, expected {expect_events} and {want_rows}"
            ));
        }
        let (_, body) = client.get(&format!("/v1/events?phone={}", phone.replace('+', "%2B"))).await?;
        let v: Value = serde_json::from_slice(&body)?;
        let n = v["items"].as_array().map_or(0, Vec::len);
        if n != expect_events {
            problems.push(format!("{label}: /v1/events?phone={phone} lists {n} events, expected {expect_events}"));
        }
    }
    let stats_now = store.queue_stats().await?;
    if let Some(s) = seeded {
        for sink in SINKS {
            let q = stats_now.iter().find(|q| q.sink == sink);
            let (pending, dead) = q.map_or((0, 0), |q| (q.pending, q.dead));
            let want_pending = s.last_event - s.pending_after;
            let want_dead = s.dead_upto - s.dead_after;
            if pending != want_pending || dead != want_dead {
                problems.push(format!(
                    "{label}: queue_stats for {sink}: {pending} pending, {dead} dead; seeded {want_pending} and {want_dead}"
                ));
            }
        }
    } else if stats_now.iter().any(|q| q.pending != 0 || q.dead != 0) {
        problems.push(format!("{label}: queue_stats of an empty store is not empty: {stats_now:?}"));
    }

    // GET /v1/phones/{phone}, rotating over the probe phones.
    let mut times = Vec::with_capacity(args.reps);
    for k in 0..args.warmup + args.reps {
        let (took, _) = client.get(&format!("/v1/phones/{}", phones[k % phones.len()])).await?;
        if k >= args.warmup {
            times.push(ms(took));
        }
    }
    out.push(("phone", stats(times)));

    // GET /v1/events?phone=…
    let mut times = Vec::with_capacity(args.reps);
    for k in 0..args.warmup + args.reps {
        let phone = phones[k % phones.len()].replace('+', "%2B");
        let (took, _) = client.get(&format!("/v1/events?phone={phone}")).await?;
        if k >= args.warmup {
            times.push(ms(took));
        }
    }
    out.push(("events_by_phone", stats(times)));

    // GET /v1/deliveries: the first page of a sink's pending rows.
    let want_page = seeded.map_or(0, |s| usize::try_from(s.last_event - s.pending_after).unwrap_or(0).min(LIST_PAGE));
    let mut times = Vec::with_capacity(args.reps);
    for k in 0..args.warmup + args.reps {
        let (took, body) = client.get("/v1/deliveries?status=pending&sink=redcap").await?;
        if k == 0 {
            let v: Value = serde_json::from_slice(&body)?;
            let n = v["items"].as_array().map_or(0, Vec::len);
            if n != want_page {
                problems.push(format!(
                    "{label}: /v1/deliveries?status=pending&sink=redcap lists {n}, expected {want_page}"
                ));
            }
        }
        if k >= args.warmup {
            times.push(ms(took));
        }
    }
    out.push(("deliveries", stats(times)));

    // GET /metrics: the queue statistics plus rendering.
    let mut times = Vec::with_capacity(args.reps);
    for k in 0..args.warmup + args.reps {
        let (took, _) = client.get("/metrics").await?;
        if k >= args.warmup {
            times.push(ms(took));
        }
    }
    out.push(("metrics", stats(times)));

    // The relay's claim, the batch settled as written (the worker's common
    // case), then put back to pending at its old due time (not timed) so the
    // next claim finds the same work.
    let due = seeded.map_or(0, |s| (s.last_event - s.not_due_upto).max(0));
    let want = usize::try_from(due.min(i64::from(CLAIM_LIMIT)))?;
    let (mut claims, mut settles) = (Vec::with_capacity(args.reps), Vec::with_capacity(args.reps));
    let mut short_claims = 0;
    let mut raw = Raw::connect(db).await?;
    for k in 0..args.warmup + args.reps {
        let t = Instant::now();
        let got = store.claim("redcap", OWNER, CLAIM_LIMIT, Duration::from_secs(60)).await?;
        let claim_took = t.elapsed();
        if got.len() != want {
            short_claims += 1;
        }
        let batch = written(&got);
        let t = Instant::now();
        let held = settle(store, &batch).await?;
        let settle_took = t.elapsed();
        if held != batch.len() as u64 {
            problems.push(format!("{label}: settle_many kept {held} of {}", batch.len()));
        }
        raw.unsettle(&got.iter().map(|d| d.id).collect::<Vec<_>>()).await?;
        if k >= args.warmup {
            claims.push(ms(claim_took));
            settles.push(ms(settle_took));
        }
    }
    raw.close().await;
    if short_claims > 0 {
        problems.push(format!("{label}: {short_claims} claims did not return the {want} due rows"));
    }
    out.push(("claim", stats(claims)));
    // An empty claim leaves nothing to settle (settle_many returns at once): no figure.
    if want > 0 {
        out.push(("settle", stats(settles)));
    }

    for (q, s) in &out {
        println!(
            "RESULT backend={} db={label} query={q} n={} p50_ms={:.3} p99_ms={:.3} mean_ms={:.3} max_ms={:.3}",
            args.backend, s.n, s.p50, s.p99, s.mean, s.max
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Plans.

/// Runs each request once more while recording what the store runs, and
/// returns markdown: per request, each statement's first line and its plan.
async fn plans(args: &Args, db: &Db) -> anyhow::Result<String> {
    let pg = db.pg_name.is_some();
    if let Some(name) = &db.pg_name {
        // Loaded for this database only; connections opened from now on explain
        // every statement, with actual row counts, and send it as a NOTICE.
        let mut c = sqlx::PgConnection::connect(&args.pg_admin_url).await?;
        for set in [
            "session_preload_libraries = 'auto_explain'",
            "auto_explain.log_min_duration = 0",
            "auto_explain.log_analyze = on",
            "auto_explain.log_buffers = on",
            "auto_explain.log_level = 'notice'",
        ] {
            sqlx::query(&format!("ALTER DATABASE {name} SET {set}")).execute(&mut c).await?;
        }
        let _ = c.close().await;
    }
    let store = store_for(db, 1)?;
    let app = start(db).await?;
    let client = Client { http: reqwest::Client::builder().build()?, base: format!("http://{}", app.addr) };
    let phone = probe_phones(args)[0].clone();
    let mut sections: Vec<(&str, Vec<Captured>)> = Vec::new();
    let result: anyhow::Result<()> = async {
        for (label, path) in [
            ("`GET /v1/phones/{phone}`", format!("/v1/phones/{phone}")),
            ("`GET /v1/events?phone=…`", format!("/v1/events?phone={}", phone.replace('+', "%2B"))),
            ("`GET /v1/deliveries?status=pending&sink=redcap`", "/v1/deliveries?status=pending&sink=redcap".to_owned()),
            ("`GET /metrics`", "/metrics".to_owned()),
        ] {
            take_captured();
            CAPTURING.store(true, Ordering::Relaxed);
            let r = client.get(&path).await;
            CAPTURING.store(false, Ordering::Relaxed);
            r?;
            sections.push((label, take_captured()));
        }
        CAPTURING.store(true, Ordering::Relaxed);
        let got = store.claim("redcap", OWNER, CLAIM_LIMIT, Duration::from_secs(60)).await;
        CAPTURING.store(false, Ordering::Relaxed);
        let got = got?;
        sections.push(("claim of 500 (`redcap`)", take_captured()));
        CAPTURING.store(true, Ordering::Relaxed);
        let held = settle(&store, &written(&got)).await;
        CAPTURING.store(false, Ordering::Relaxed);
        held?;
        sections.push(("settle_many of 500 (written)", take_captured()));
        Ok(())
    }
    .await;
    CAPTURING.store(false, Ordering::Relaxed);
    app.stop().await;
    store.close().await;
    result?;

    let mut md = String::new();
    for (label, items) in sections {
        let _ = writeln!(md, "\n{label}:\n\n```text");
        if pg {
            let statements: Vec<&str> = items
                .iter()
                .filter_map(|c| if let Captured::Statement(s) = c { Some(s.as_str()) } else { None })
                .collect();
            for c in &items {
                if let Captured::Notice(n) = c {
                    let _ = writeln!(md, "{}", pg_plan(n, &statements));
                }
            }
        } else {
            let mut conn = sqlx::SqliteConnection::connect(&db.url).await?;
            let mut seen = HashSet::new();
            for c in &items {
                let Captured::Statement(sql) = c else { continue };
                let head = sql.trim_start().to_ascii_uppercase();
                if !(head.starts_with("SELECT") || head.starts_with("UPDATE") || head.starts_with("WITH"))
                    || head.starts_with("SELECT 1")
                    || !seen.insert(sql.clone())
                {
                    continue;
                }
                let rows = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}")).fetch_all(&mut conn).await?;
                let _ = writeln!(md, "-- {}", first_line(sql));
                let mut depth: Vec<(i64, usize)> = Vec::new();
                for r in rows {
                    let id: i64 = r.try_get(0)?;
                    let parent: i64 = r.try_get(1)?;
                    let detail: String = r.try_get(3)?;
                    while depth.last().is_some_and(|&(p, _)| p != parent) {
                        depth.pop();
                    }
                    let level = depth.last().map_or(0, |&(_, l)| l + 1);
                    let _ = writeln!(md, "{}{detail}", "  ".repeat(level));
                    depth.push((id, level));
                }
                let _ = writeln!(md);
            }
            let _ = conn.close().await;
        }
        let _ = writeln!(md, "```");
    }
    Ok(md)
}

/// The statement's first meaningful line, squeezed, for a heading.
fn first_line(sql: &str) -> String {
    let squeezed = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    if squeezed.chars().count() > 110 {
        format!("{} …", squeezed.chars().take(110).collect::<String>())
    } else {
        squeezed
    }
}

/// auto_explain's message is `duration: … plan:\nQuery Text: <sql>\n<plan>`:
/// the SQL (known from sqlx's log) is shortened to one line.
fn pg_plan(notice: &str, statements: &[&str]) -> String {
    let Some((head, rest)) = notice.split_once("\nQuery Text: ") else { return notice.to_owned() };
    let sql = statements.iter().filter(|s| rest.starts_with(**s)).max_by_key(|s| s.len());
    match sql {
        Some(sql) => format!("-- {}  ({})\n{}", first_line(sql), head.trim(), rest[sql.len()..].trim_matches('\n')),
        None => notice.to_owned(),
    }
}

// ---------------------------------------------------------------------------

async fn run_db(
    args: &Args,
    seeded: bool,
    problems: &mut Vec<String>,
) -> anyhow::Result<(Vec<(&'static str, Stats)>, Option<String>, f64)> {
    let db = fresh_db(&args.backend, &args.pg_admin_url, "queries.db").await?;
    let result = async {
        let store = store_for(&db, 4)?;
        store.migrate().await?;
        let started = Instant::now();
        let shape = if seeded {
            eprintln!("== {} seeding {} events", args.backend, args.events);
            Some(seed(args, &db, &store).await?)
        } else {
            if db.pg_name.is_some() {
                // Same treatment as the seeded database.
                let mut c = sqlx::PgConnection::connect(&db.url).await?;
                sqlx::query("VACUUM ANALYZE").execute(&mut c).await?;
                let _ = c.close().await;
            }
            None
        };
        let seed_s = started.elapsed().as_secs_f64();
        eprintln!("== {} measuring ({})", args.backend, if seeded { "seeded" } else { "empty" });
        let app = start(&db).await?;
        let measured = measure_all(args, &db, &store, &app, shape.as_ref(), problems).await;
        app.stop().await;
        store.close().await;
        let measured = measured?;
        let plans = if args.no_plans || !seeded {
            None
        } else {
            match plans(args, &db).await {
                Ok(md) => Some(md),
                Err(e) => Some(format!("\n(plans not captured: {e:#})\n")),
            }
        };
        Ok((measured, plans, seed_s))
    }
    .await;
    drop_db(&args.pg_admin_url, &db).await;
    result
}

#[tokio::main]
async fn main() -> ExitCode {
    optout_relay::install_tls_provider();
    init_tracing();
    let args = Args::parse();
    if !matches!(args.backend.as_str(), "postgres" | "sqlite") {
        eprintln!("--backend must be postgres or sqlite");
        return ExitCode::from(2);
    }
    if args.phones == 0 || args.reps == 0 {
        eprintln!("--phones and --reps must be at least 1");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let mut problems = Vec::new();
    let empty = if args.skip_empty {
        None
    } else {
        match run_db(&args, false, &mut problems).await {
            Ok((m, _, _)) => Some(m),
            Err(e) => {
                problems.push(format!("empty database: {e:#}"));
                None
            }
        }
    };
    let (full, plans, seed_s) = match run_db(&args, true, &mut problems).await {
        Ok((m, p, s)) => (Some(m), p, s),
        Err(e) => {
            problems.push(format!("seeded database: {e:#}"));
            (None, None, f64::NAN)
        }
    };

    let n = args.events;
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n### Queries, {} — empty store vs {n} events ({} phones, {} scopes; per sink {} pending of which {} not yet due, {} dead)\n",
        args.backend,
        args.phones,
        args.scopes,
        args.pending.min(n),
        args.not_due.min(args.pending),
        args.dead
    );
    let _ = writeln!(md, "| query | empty p50 ms | empty p99 ms | {n} p50 ms | {n} p99 ms |");
    let _ = writeln!(md, "|---|---:|---:|---:|---:|");
    let find = |set: &Option<Vec<(&'static str, Stats)>>, q: &str| {
        set.as_ref().and_then(|v| v.iter().find(|(k, _)| *k == q).map(|(_, s)| *s))
    };
    let cell = |s: Option<Stats>, f: fn(&Stats) -> f64| s.map_or("—".to_owned(), |s| format!("{:.2}", f(&s)));
    for (q, title) in QUERIES {
        let (e, f) = (find(&empty, q), find(&full, q));
        let _ = writeln!(
            md,
            "| {title} | {} | {} | {} | {} |",
            cell(e, |s| s.p50),
            cell(e, |s| s.p99),
            cell(f, |s| s.p50),
            cell(f, |s| s.p99)
        );
    }
    let _ = writeln!(
        md,
        "\n{} measured repetitions of each after {} unmeasured; seeding took {seed_s:.0} s; whole run {:.0} s; checks: {}.",
        args.reps,
        args.warmup,
        started.elapsed().as_secs_f64(),
        if problems.is_empty() { "all pass".to_owned() } else { format!("{} FAILED", problems.len()) }
    );
    if let Some(p) = plans {
        let _ = writeln!(md, "\n#### Plans, {}, {n} events (as run by the store under test)\n{p}", args.backend);
    }
    println!("{md}");
    println!(
        "RESULT backend={} phase=summary total_s={:.1} seed_s={seed_s:.1} checks_failed={}",
        args.backend,
        started.elapsed().as_secs_f64(),
        problems.len()
    );
    for p in &problems {
        eprintln!("CHECK FAILED: {p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
