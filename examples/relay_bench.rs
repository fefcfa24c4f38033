//! Relay benchmark (issue: batched REDCap delivery): the real application,
//! a real store and an in-process fake REDCap that answers every call after
//! 50 ms and holds 20,000 records.
//!
//! ```text
//! cargo run --release --example relay_bench -- --backend postgres   # or sqlite
//! ```
//!
//! * **Phase A, throughput.** 10,000 pending opt-outs for distinct phones are
//!   written straight into a fresh store (`record_events`, one pending
//!   `redcap` row in `sink_phones` each); 10,000 of the fake's 20,000 records hold those phones,
//!   typed in six formats, the others hold other valid numbers. The app is
//!   started with the default relay configuration (2 workers, batch 500,
//!   `max_calls_per_minute` 300) and timed until every delivery is settled.
//!   Every benchmark record must be stamped, no other record changed.
//! * **Baseline, same run.** The same setup with `relay.batch_size = 1`
//!   (one export + one import per event: one-call-at-a-time), run for a fixed
//!   `--baseline-secs` (15 s); events/s and the ratio to phase A.
//! * **Phase B, latency.** A fresh store and fake, the app running, then signed
//!   STOP webhooks over real HTTP at a steady `--rate` (50/s) for
//!   `--latency-secs` (20 s), each for a distinct phone that is in the project.
//!   The fake is polled every 10 ms; webhook-to-stamped is the time from
//!   sending the webhook to first seeing its record stamped.
//!
//! The relay's own tracing events (`REDCap call` at debug with the call's
//! duration after the rate limiter, `REDCap batch converged`, `sink brought
//! to target`) are
//! captured per worker task to split each batch cycle into: store (the
//! claim and the previous batch's settle), wait before the export (rate
//! limiter), export, export-to-import (phone matching + the limiter's wait for
//! the import), import; sqlx's own statement events (`sqlx::query`, debug)
//! give the claim and settle statements' durations.
//!
//! Output: `RESULT …`/`CYCLES …`/`LIMITER …` lines (key=value, machine-readable),
//! then a markdown table. Exit code 1 if a check failed (a record not
//! stamped, another record changed, a webhook refused, a delivery left).
//! Loopback only. PostgreSQL: creates `optout_bench_<rand>` through
//! `--pg-admin-url` (default postgres://postgres@127.0.0.1:5432/postgres) and
//! drops it at the end.

#[path = "../tests/it/common/fake_redcap.rs"]
mod fake_redcap;

#[path = "bench_db/mod.rs"]
mod bench_db;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bench_db::{drop_db, fresh_db, Db};
use chrono::Utc;
use clap::Parser;
use fake_redcap::{CallKind, FakeProject, FakeRedcap};
use optout_relay::config::{Config, RedcapConfig};
use optout_relay::domain::{EventKind, MessageSid, Phone};
use optout_relay::startup::Application;
use optout_relay::store::{NewEvent, SinkFollow, Store};
use optout_relay::twilio::signature::compute;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde_json::json;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const AUTH_TOKEN: &str = "bench-auth-token-0123456789abcdef";
const PUBLIC_URL: &str = "https://optout.bench.example";
const SERVICE: &str = "MG00000000000000000000000000000001";
const FIELD: &str = "opted_out_at";
/// The limiter's spacing at the default 300 calls/min.
const SPACING: Duration = Duration::from_millis(200);

#[derive(Parser, Debug, Clone)]
#[command(about = "Relay throughput and latency benchmark against a fake REDCap")]
struct Args {
    /// postgres or sqlite.
    #[arg(long, default_value = "postgres")]
    backend: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Pending opt-outs in phase A (and records holding their phones).
    #[arg(long, default_value_t = 10_000)]
    events: usize,
    /// Other records in the project (other numbers).
    #[arg(long, default_value_t = 10_000)]
    others: usize,
    /// Latency of every fake REDCap call, ms.
    #[arg(long, default_value_t = 50)]
    redcap_ms: u64,
    /// How long the batch_size = 1 baseline runs, seconds.
    #[arg(long, default_value_t = 15.0)]
    baseline_secs: f64,
    /// Webhooks per second in phase B.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Seconds of webhooks in phase B.
    #[arg(long, default_value_t = 20)]
    latency_secs: u32,
    /// Run ANALYZE on the store after seeding (planner statistics) — a diagnostic
    /// variant; by default the relay meets the backlog as the app would, without.
    #[arg(long)]
    analyze: bool,
    /// Override relay.workers (default: the app's default) — a diagnostic variant.
    #[arg(long)]
    workers: Option<usize>,
    /// Skip phases: any of a, baseline, b (comma-separated).
    #[arg(long, default_value = "")]
    skip: String,
}

// ---------------------------------------------------------------------------
// Capturing the relay's tracing events.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Metadata,
    Export,
    Import,
    Other,
}

/// Store statements, from sqlx's own `sqlx::query` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sql {
    /// The relay's claim (`WITH picked AS MATERIALIZED … UPDATE sink_phones …`).
    Claim,
    /// One row's outcome (`UPDATE sink_phones … WHERE id = $1 AND locked_by = $2`).
    Settle,
    /// Any COMMIT (settles and ingest alike).
    Commit,
    Other,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// `elapsed` is measured after the rate limiter let the call go.
    Call {
        op: Op,
        elapsed: Duration,
        ok: bool,
    },
    Applied,
    Delivered {
        n: u64,
        ms: u64,
    },
    Sql {
        kind: Sql,
        elapsed: Duration,
        rows: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    t: Instant,
    task: Option<tokio::task::Id>,
    ev: Ev,
}

static LOG: Mutex<Vec<Rec>> = Mutex::new(Vec::new());

fn take_log() -> Vec<Rec> {
    std::mem::take(&mut *LOG.lock().unwrap())
}

fn delivered_so_far() -> (u64, Option<Instant>) {
    let log = LOG.lock().unwrap();
    let mut n = 0;
    let mut last = None;
    for r in log.iter() {
        if let Ev::Delivered { n: k, .. } = r.ev {
            n += k;
            last = Some(r.t);
        }
    }
    (n, last)
}

#[derive(Default)]
struct Fields {
    message: String,
    op: String,
    statement: String,
    summary: String,
    elapsed_secs: Option<f64>,
    u: HashMap<&'static str, u64>,
    ok: Option<bool>,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "op" => self.op = value.to_owned(),
            "message" => self.message = value.to_owned(),
            "db.statement" => self.statement = value.to_owned(),
            "summary" => self.summary = value.to_owned(),
            _ => {}
        }
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if field.name() == "elapsed_secs" {
            self.elapsed_secs = Some(value);
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.u.insert(field.name(), value);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.u.insert(field.name(), value.max(0) as u64);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        if field.name() == "ok" {
            self.ok = Some(value);
        }
    }
}

struct Capture;

impl<S: tracing::Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let t = Instant::now();
        let mut f = Fields::default();
        event.record(&mut f);
        if event.metadata().target() == "sqlx::query" {
            let text = if f.statement.is_empty() { &f.summary } else { &f.statement };
            let kind = if text.contains("WITH picked AS MATERIALIZED") {
                Sql::Claim
            } else if text.contains("UPDATE sink_phones") && text.contains("WHERE id = $1 AND locked_by = $2") {
                Sql::Settle
            } else if text.trim().eq_ignore_ascii_case("COMMIT") {
                Sql::Commit
            } else {
                Sql::Other
            };
            let elapsed = Duration::from_secs_f64(f.elapsed_secs.unwrap_or(0.0).max(0.0));
            let rows = f.u.get("rows_affected").copied().unwrap_or(0);
            LOG.lock().unwrap().push(Rec { t, task: tokio::task::try_id(), ev: Ev::Sql { kind, elapsed, rows } });
            return;
        }
        let ev = match f.message.as_str() {
            "REDCap call" => {
                let op = match f.op.as_str() {
                    "metadata export" => Op::Metadata,
                    "record export" => Op::Export,
                    "record import" => Op::Import,
                    _ => Op::Other,
                };
                let elapsed = Duration::from_millis(f.u.get("elapsed_ms").copied().unwrap_or(0));
                Ev::Call { op, elapsed, ok: f.ok.unwrap_or(true) }
            }
            "REDCap batch converged" => Ev::Applied,
            "sink brought to target" => {
                Ev::Delivered { n: f.u.get("phones").copied().unwrap_or(0), ms: f.u.get("ms").copied().unwrap_or(0) }
            }
            _ => return,
        };
        LOG.lock().unwrap().push(Rec { t, task: tokio::task::try_id(), ev });
    }
}

fn init_tracing() {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
    let capture = Targets::new()
        .with_target("optout_relay::sinks::redcap", LevelFilter::DEBUG)
        .with_target("optout_relay::relay", LevelFilter::INFO)
        .with_target("sqlx::query", LevelFilter::DEBUG);
    let shown = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,sqlx::query=error"));
    tracing_subscriber::registry()
        .with(Capture.with_filter(capture))
        .with(tracing_subscriber::fmt::layer().compact().with_writer(std::io::stderr).with_filter(shown))
        .init();
}

// ---------------------------------------------------------------------------
// Data.

/// `n` distinct valid US numbers (E.164), deterministic.
fn us_numbers(n: usize, seed: u64) -> Vec<String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    let mut valid_area: HashMap<u32, bool> = HashMap::new();
    while out.len() < n {
        let area: u32 = rng.random_range(201..=989);
        let exchange: u32 = rng.random_range(200..=999);
        if area % 100 == 11 || exchange % 100 == 11 || exchange == 555 {
            continue;
        }
        let line: u32 = rng.random_range(0..=9999);
        let e164 = format!("+1{area}{exchange}{line:04}");
        if seen.contains(&e164) {
            continue;
        }
        // Area codes libphonenumber does not know never match: probe once per area code,
        // then check every number (some exchanges are not valid either).
        let area_ok = *valid_area.entry(area).or_insert_with(|| {
            (0..20).any(|k| {
                Phone::parse_valid(&format!("+1{area}{}{:04}", 200 + k * 37, k * 311), phonenumber_us()).is_some()
            })
        });
        if !area_ok {
            continue;
        }
        if Phone::parse_valid(&e164, phonenumber_us()).as_ref().map(Phone::as_str) != Some(e164.as_str()) {
            continue;
        }
        seen.insert(e164.clone());
        out.push(e164);
    }
    out
}

fn phonenumber_us() -> phonenumber::country::Id {
    optout_relay::domain::parse_region("US").expect("US")
}

/// The number as people type it, six ways.
fn typed(e164: &str, i: usize) -> String {
    let d = &e164[2..];
    let (a, b, c) = (&d[0..3], &d[3..6], &d[6..]);
    match i % 6 {
        0 => format!("({a}) {b}-{c}"),
        1 => format!("{a}-{b}-{c}"),
        2 => format!("+1 {a} {b} {c}"),
        3 => d.to_owned(),
        4 => format!("1-{a}-{b}-{c}"),
        _ => format!("{a}.{b}.{c}"),
    }
}

struct Data {
    bench: Vec<String>,
    others: Vec<String>,
}

impl Data {
    fn new(events: usize, others: usize) -> Data {
        let all = us_numbers(events + others, 0x005e_ed0f_0b70_u64);
        let others = all[events..].to_vec();
        let mut bench = all;
        bench.truncate(events);
        Data { bench, others }
    }
    /// Benchmark phone i lives in record 2i+1, other number j in record 2j+2.
    fn bench_record(i: usize) -> String {
        (2 * i + 1).to_string()
    }
    fn other_record(j: usize) -> String {
        (2 * j + 2).to_string()
    }
    fn project(&self) -> FakeProject {
        let mut p = FakeProject::new(
            REDCAP_TOKEN,
            &[("study_id", "enrol", ""), ("phone", "enrol", ""), (FIELD, "enrol", "datetime_seconds_ymd")],
        );
        let n = self.bench.len().max(self.others.len());
        for k in 0..n {
            if let Some(b) = self.bench.get(k) {
                p.records.push((Data::bench_record(k), None, HashMap::from([("phone".to_owned(), typed(b, k))])));
            }
            if let Some(o) = self.others.get(k) {
                p.records.push((Data::other_record(k), None, HashMap::from([("phone".to_owned(), typed(o, k + 3))])));
            }
        }
        p
    }
}

/// Checks the fake after a run: the `stamped` benchmark records hold a
/// datetime, every other record (and every phone) is as it was.
fn verify(fake: &FakeRedcap, data: &Data, stamped: &HashSet<usize>) -> Vec<String> {
    let mut problems = Vec::new();
    let expected = data.bench.len() + data.others.len();
    if fake.record_count() != expected {
        problems.push(format!("the project holds {} records, expected {expected}", fake.record_count()));
    }
    let mut not_stamped = 0;
    let mut wrongly_stamped = 0;
    let mut phone_changed = 0;
    let mut bad_format = 0;
    for (i, b) in data.bench.iter().enumerate() {
        let rec = Data::bench_record(i);
        let v = fake.value(&rec, None, FIELD).unwrap_or_default();
        if stamped.contains(&i) {
            if v.is_empty() {
                not_stamped += 1;
            } else if chrono::NaiveDateTime::parse_from_str(&v, "%Y-%m-%d %H:%M:%S").is_err() {
                bad_format += 1;
            }
        } else if !v.is_empty() {
            wrongly_stamped += 1;
        }
        if fake.value(&rec, None, "phone").as_deref() != Some(typed(b, i).as_str()) {
            phone_changed += 1;
        }
    }
    for (j, o) in data.others.iter().enumerate() {
        let rec = Data::other_record(j);
        if !fake.value(&rec, None, FIELD).unwrap_or_default().is_empty() {
            wrongly_stamped += 1;
        }
        if fake.value(&rec, None, "phone").as_deref() != Some(typed(o, j + 3).as_str()) {
            phone_changed += 1;
        }
    }
    for (what, n) in [
        ("benchmark records not stamped", not_stamped),
        ("records stamped that should not be", wrongly_stamped),
        ("phone values changed", phone_changed),
        ("stamps not in YYYY-MM-DD HH:MM:SS", bad_format),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Store and app.

fn config(args: &Args, db_url: &str, redcap_url: &str, batch_size: Option<u32>) -> anyhow::Result<Config> {
    let mut c = Config::default();
    c.server.listen = ([127, 0, 0, 1], 0).into();
    c.server.public_url = Some(PUBLIC_URL.to_owned());
    c.server.shutdown_grace = Duration::from_secs(5);
    c.database.url = SecretString::from(db_url.to_owned());
    c.twilio.auth_tokens = vec![SecretString::from(AUTH_TOKEN)];
    // Through serde, so every setting not named here keeps its default
    // (max_calls_per_minute 300, request_timeout, timezone UTC, format auto).
    let redcap: RedcapConfig = serde_json::from_value(json!({
        "url": redcap_url,
        "token": REDCAP_TOKEN,
        "phone_field": "phone",
        "optout_field": FIELD,
    }))?;
    c.redcap = Some(redcap);
    if let Some(b) = batch_size {
        c.relay.batch_size = b;
    }
    if let Some(w) = args.workers {
        c.relay.workers = w;
    }
    Ok(c)
}

/// A migrated store holding one pending `redcap` opt-out per phone.
async fn seeded(db: &Db, phones: &[String]) -> anyhow::Result<Store> {
    let mut cfg = Config::default().database;
    cfg.url = SecretString::from(db.url.clone());
    cfg.max_connections = 4;
    let store = Store::connect_lazy(&cfg)?;
    store.migrate().await?;
    let region = phonenumber_us();
    for (c, chunk) in phones.chunks(1000).enumerate() {
        let events: Vec<NewEvent> = chunk
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let i = c * 1000 + k;
                Ok(NewEvent {
                    message_sid: MessageSid::parse(&format!("SMbench{i:08}")).ok_or_else(|| anyhow::anyhow!("sid"))?,
                    account_sid: Some(format!("AC{}", "0".repeat(32))),
                    messaging_service_sid: Some(SERVICE.into()),
                    scope: SERVICE.into(),
                    phone: Phone::parse(p, region).map_err(|_| anyhow::anyhow!("bad phone {p}"))?,
                    from_raw: p.clone(),
                    to: Some("+14155550100".into()),
                    kind: EventKind::OptOut,
                    body: "STOP".into(),
                    params: json!({"Body": "STOP", "From": p, "OptOutType": "STOP"}),
                    received_at: Utc::now(),
                    source: "twilio".into(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        store.record_events(&events).await?;
        store.fan_out(&[SinkFollow { sink: "redcap".into(), scopes: None, since_registered: false }], u32::MAX).await?;
    }
    Ok(store)
}

/// Gives the planner statistics (PostgreSQL's autovacuum would, after a
/// minute or so; SQLite never does on its own).
async fn analyze(db: &Db) -> anyhow::Result<()> {
    if db.pg_name.is_some() {
        let mut c = sqlx::PgConnection::connect(&db.url).await?;
        sqlx::query("ANALYZE").execute(&mut c).await?;
        let _ = c.close().await;
    } else {
        let mut c = sqlx::SqliteConnection::connect(&db.url).await?;
        sqlx::query("ANALYZE").execute(&mut c).await?;
        let _ = c.close().await;
    }
    Ok(())
}

struct Running {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(config: Config) -> anyhow::Result<Running> {
    let app = Application::build(config).await.map_err(|e| anyhow::anyhow!("build: {e}"))?;
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

async fn pending_and_dead(store: &Store) -> (i64, i64) {
    match store.queue_stats().await {
        Ok(q) => q.iter().filter(|s| s.sink == "redcap").fold((0, 0), |(p, d), s| (p + s.pending, d + s.dead)),
        Err(e) => {
            eprintln!("queue_stats: {e}");
            (-1, -1)
        }
    }
}

/// Seconds of CPU this process used (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = 100.0; // USER_HZ on Linux
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // After the comm field: state is 0, utime 11, stime 12.
    (get(11) + get(12)) / tick
}

// ---------------------------------------------------------------------------
// Analysis of the captured events.

#[derive(Debug, Default, Clone, Copy)]
struct Cycle {
    n: u64,
    /// Everything of the cycle outside the sink call: the previous batch's
    /// settle, this batch's claim (and, under light load, idle polling).
    store: Duration,
    metadata: Duration,
    /// Sink call start to the export leaving: the rate limiter.
    wait_export: Duration,
    export: Duration,
    /// Export answered to import leaving: phone matching + the limiter's wait.
    gap: Duration,
    import: Duration,
    /// Import answered to the batch's outcome known (building results).
    tail: Duration,
    total: Duration,
    /// The import left without waiting for the limiter (so `gap` is matching alone).
    import_unlimited: bool,
}

/// sqlx's timings of one kind of statement: (count, total, max, rows).
#[derive(Debug, Default, Clone, Copy)]
struct SqlStats {
    count: usize,
    total: Duration,
    max: Duration,
    rows: u64,
}

struct Analysis {
    cycles: Vec<Cycle>,
    claims: SqlStats,
    settles: SqlStats,
    commits: SqlStats,
    /// (start after the limiter, op)
    calls: Vec<(Instant, Op)>,
    failed_calls: usize,
}

fn sub(a: Instant, b: Instant) -> Duration {
    a.saturating_duration_since(b)
}

fn analyse(log: &[Rec], t0: Instant) -> Analysis {
    let mut by_task: HashMap<Option<tokio::task::Id>, Vec<Rec>> = HashMap::new();
    let mut calls = Vec::new();
    let mut failed_calls = 0;
    let (mut claims, mut settles, mut commits) = (SqlStats::default(), SqlStats::default(), SqlStats::default());
    for r in log {
        match r.ev {
            Ev::Call { op, elapsed, ok } => {
                calls.push((r.t - elapsed, op));
                if !ok {
                    failed_calls += 1;
                }
            }
            Ev::Sql { kind, elapsed, rows } => {
                let slot = match kind {
                    Sql::Claim => &mut claims,
                    Sql::Settle => &mut settles,
                    Sql::Commit => &mut commits,
                    Sql::Other => continue,
                };
                slot.count += 1;
                slot.total += elapsed;
                slot.max = slot.max.max(elapsed);
                slot.rows += rows;
                continue;
            }
            _ => {}
        }
        by_task.entry(r.task).or_default().push(*r);
    }
    calls.sort_by_key(|c| c.0);
    let limited_starts: HashSet<Instant> =
        calls.windows(2).filter(|w| sub(w[1].0, w[0].0) < SPACING + Duration::from_millis(3)).map(|w| w[1].0).collect();
    let mut cycles = Vec::new();
    for recs in by_task.values() {
        let mut start = t0;
        let mut in_cycle: Vec<(Op, Instant, Instant)> = Vec::new();
        let mut applied: Option<Instant> = None;
        for r in recs {
            match r.ev {
                Ev::Call { op, elapsed, .. } => in_cycle.push((op, r.t - elapsed, r.t)),
                Ev::Sql { .. } => {}
                Ev::Applied => applied = Some(r.t),
                Ev::Delivered { n, ms } => {
                    let applied_t = applied.unwrap_or(r.t);
                    let apply_start = applied_t.checked_sub(Duration::from_millis(ms)).unwrap_or(start).max(start);
                    let mut c = Cycle { n, ..Cycle::default() };
                    let mut cursor = apply_start;
                    let mut export_end = None;
                    for &(op, s, e) in &in_cycle {
                        match op {
                            Op::Metadata => {
                                c.metadata += sub(e, s);
                                cursor = e;
                            }
                            Op::Export => {
                                c.wait_export += sub(s, cursor);
                                c.export += sub(e, s);
                                export_end = Some(e);
                                cursor = e;
                            }
                            Op::Import => {
                                c.gap += sub(s, export_end.unwrap_or(cursor));
                                c.import += sub(e, s);
                                c.import_unlimited = !limited_starts.contains(&s);
                                cursor = e;
                            }
                            Op::Other => cursor = e,
                        }
                    }
                    c.tail = sub(applied_t, cursor);
                    c.total = sub(r.t, start);
                    // The rest: before the sink call (claim, the previous settle) and after it.
                    let sink = c.metadata + c.wait_export + c.export + c.gap + c.import + c.tail;
                    c.store = c.total.saturating_sub(sink);
                    cycles.push(c);
                    start = r.t;
                    in_cycle.clear();
                    applied = None;
                }
            }
        }
    }
    Analysis { cycles, claims, settles, commits, calls, failed_calls }
}

/// Calls per second between the first and the last call: (n - 1) / span.
fn call_rate(starts: &[Instant]) -> f64 {
    match (starts.first(), starts.last()) {
        (Some(a), Some(b)) if starts.len() > 1 => (starts.len() - 1) as f64 / sub(*b, *a).as_secs_f64().max(1e-9),
        _ => 0.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mean_ms(cycles: &[Cycle], f: impl Fn(&Cycle) -> Duration) -> f64 {
    if cycles.is_empty() {
        return 0.0;
    }
    cycles.iter().map(|c| ms(f(c))).sum::<f64>() / cycles.len() as f64
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// `CYCLES` and `LIMITER` lines; returns a one-line summary for the table.
fn report_cycles(backend: &str, phase: &str, a: &Analysis, window: Duration) -> String {
    let cs = &a.cycles;
    let mut sizes: Vec<f64> = cs.iter().map(|c| c.n as f64).collect();
    sizes.sort_by(f64::total_cmp);
    let unlimited: Vec<f64> = {
        let mut v: Vec<f64> = cs.iter().filter(|c| c.import_unlimited).map(|c| ms(c.gap)).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    println!(
        "CYCLES backend={backend} phase={phase} cycles={} batch_min={} batch_p50={} batch_max={} batch_mean={:.1} \
         mean_ms_store={:.1} mean_ms_metadata={:.1} mean_ms_wait_export={:.1} mean_ms_export={:.1} \
         mean_ms_gap={:.1} mean_ms_import={:.1} mean_ms_tail={:.1} mean_ms_total={:.1} \
         matching_ms_p50_unlimited_imports={:.1} unlimited_imports={}",
        cs.len(),
        sizes.first().copied().unwrap_or(0.0),
        percentile(&sizes, 50.0),
        sizes.last().copied().unwrap_or(0.0),
        sizes.iter().sum::<f64>() / sizes.len().max(1) as f64,
        mean_ms(cs, |c| c.store),
        mean_ms(cs, |c| c.metadata),
        mean_ms(cs, |c| c.wait_export),
        mean_ms(cs, |c| c.export),
        mean_ms(cs, |c| c.gap),
        mean_ms(cs, |c| c.import),
        mean_ms(cs, |c| c.tail),
        mean_ms(cs, |c| c.total),
        percentile(&unlimited, 50.0),
        unlimited.len(),
    );
    let stat = |s: &SqlStats| {
        let mean = if s.count == 0 { 0.0 } else { ms(s.total) / s.count as f64 };
        (s.count, mean, ms(s.max), ms(s.total), s.rows)
    };
    let (cl, se, co) = (stat(&a.claims), stat(&a.settles), stat(&a.commits));
    println!(
        "STORE backend={backend} phase={phase} claims={} claim_mean_ms={:.1} claim_max_ms={:.1} claim_total_ms={:.0} claimed_rows={} \
         settle_statements={} settle_mean_ms={:.2} settle_total_ms={:.0} commits_all={} commit_mean_ms={:.2} commit_total_ms={:.0}",
        cl.0, cl.1, cl.2, cl.3, cl.4, se.0, se.1, se.3, co.0, co.1, co.3,
    );
    let starts: Vec<Instant> = a.calls.iter().map(|c| c.0).collect();
    let spacings: Vec<Duration> = starts.windows(2).map(|w| sub(w[1], w[0])).collect();
    let limited = spacings.iter().filter(|s| **s < SPACING + Duration::from_millis(3)).count();
    let min_spacing = spacings.iter().min().copied().unwrap_or_default();
    // Most calls that left within any 1 s and any 60 s window.
    let max_in = |w: Duration| {
        let mut best = 0;
        let mut j = 0;
        for i in 0..starts.len() {
            while sub(starts[i], starts[j]) >= w {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    };
    let secs = window.as_secs_f64().max(1e-9);
    println!(
        "LIMITER backend={backend} phase={phase} calls={} calls_per_s_over_window={:.2} call_rate_first_to_last_per_s={:.3} \
         budget_per_s=5.00 limiter_busy={:.0}% calls_that_waited_for_limiter={limited}/{} min_spacing_ms={:.1} \
         max_calls_any_60s={} failed_calls={}",
        starts.len(),
        starts.len() as f64 / secs,
        call_rate(&starts),
        100.0 * starts.len() as f64 * SPACING.as_secs_f64() / secs,
        spacings.len(),
        ms(min_spacing),
        max_in(Duration::from_secs(60)),
        a.failed_calls,
    );
    format!(
        "{} cycles, batch p50 {} (max {}); per cycle: store (claim + settle) {:.0} ms, limiter before export {:.0} ms, export {:.0} ms, \
         matching+limiter {:.0} ms, import {:.0} ms = {:.0} ms; {} of {} calls waited for the limiter; \
         claim statement mean {:.0} ms (max {:.0}), {} settle UPDATEs {:.2} ms each",
        cs.len(),
        percentile(&sizes, 50.0),
        sizes.last().copied().unwrap_or(0.0),
        mean_ms(cs, |c| c.store),
        mean_ms(cs, |c| c.wait_export + c.metadata),
        mean_ms(cs, |c| c.export),
        mean_ms(cs, |c| c.gap),
        mean_ms(cs, |c| c.import),
        mean_ms(cs, |c| c.total),
        limited,
        spacings.len(),
        cl.1,
        cl.2,
        se.0,
        se.1,
    )
}

// ---------------------------------------------------------------------------
// Webhooks.

/// Posts a Twilio-signed inbound message; returns the HTTP status (0: no answer).
async fn post_webhook(client: &reqwest::Client, url: &str, sid: &str, phone: &str, body: &str) -> u16 {
    let mut params: Vec<(String, String)> = [
        ("MessageSid", sid),
        ("SmsSid", sid),
        ("AccountSid", "AC00000000000000000000000000000000"),
        ("MessagingServiceSid", SERVICE),
        ("From", phone),
        ("To", "+14155550100"),
        ("Body", body),
        ("NumMedia", "0"),
        ("SmsStatus", "received"),
        ("ApiVersion", "2010-04-01"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if matches!(body, "STOP" | "START" | "HELP") {
        params.push(("OptOutType".to_owned(), body.to_owned()));
    }
    let form = {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &params {
            ser.append_pair(k, v);
        }
        ser.finish()
    };
    let sig = compute(AUTH_TOKEN, &format!("{PUBLIC_URL}/twilio/messages"), &params);
    client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(form)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// While a phase runs: a signed HELP webhook every 250 ms (recorded, relayed
/// nowhere), to see whether ingest stays responsive while the relay works.
fn spawn_ingest_probe(
    addr: std::net::SocketAddr,
    phone: String,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(Vec<f64>, usize)> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/twilio/messages");
        let mut lat = Vec::new();
        let mut failed = 0;
        let mut k = 0u32;
        while !stop.is_cancelled() {
            let at = Instant::now();
            let sid = format!("SMprobe{k:06}{:08x}", rand::random::<u32>());
            let status = post_webhook(&client, &url, &sid, &phone, "HELP").await;
            lat.push(ms(at.elapsed()));
            if status != 200 {
                failed += 1;
            }
            k += 1;
            tokio::select! {
                () = stop.cancelled() => {}
                () = tokio::time::sleep(Duration::from_millis(250).saturating_sub(at.elapsed())) => {}
            }
        }
        lat.sort_by(f64::total_cmp);
        (lat, failed)
    })
}

// ---------------------------------------------------------------------------
// Phases.

struct Throughput {
    events: u64,
    seconds: f64,
    eps: f64,
    export: usize,
    import: usize,
    metadata: usize,
    cycles_line: String,
    cpu: f64,
    /// HELP webhooks sent during the run: (count, not 200, p50 ms, max ms).
    probe: (usize, usize, f64, f64),
}

/// Phase A (batch_size None: the default) or the baseline (Some(1), bounded by `limit`).
async fn throughput(
    args: &Args,
    data: &Data,
    phase: &str,
    batch_size: Option<u32>,
    limit: Option<Duration>,
    problems: &mut Vec<String>,
) -> anyhow::Result<Throughput> {
    let backend = args.backend.as_str();
    eprintln!(
        "== {backend} {phase}: seeding {} pending opt-outs, {} records",
        data.bench.len(),
        data.bench.len() + data.others.len()
    );
    let fake = FakeRedcap::start(data.project()).await;
    fake.set_latency(Duration::from_millis(args.redcap_ms));
    let db = fresh_db(&args.backend, &args.pg_admin_url, "relay.db").await?;
    let result: anyhow::Result<Throughput> = async {
        let store = seeded(&db, &data.bench).await?;
        let (p, _) = pending_and_dead(&store).await;
        anyhow::ensure!(p == data.bench.len() as i64, "{p} pending deliveries after seeding");
        if args.analyze {
            analyze(&db).await?;
        }
        let cfg = config(args, &db.url, &fake.url, batch_size)?;
        let total = data.bench.len() as u64;
        take_log();
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        let app = start(cfg).await?;
        let probe_stop = CancellationToken::new();
        let probe = spawn_ingest_probe(app.addr, data.others[0].clone(), probe_stop.clone());
        let deadline = t0 + limit.unwrap_or(Duration::from_secs(300));
        // Cheap wait on the relay's log first, then on the store itself:
        // `delivered` is logged before the batch's outcomes are committed.
        let mut settled_at = None;
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (n, _) = delivered_so_far();
            if Instant::now() >= deadline {
                break;
            }
            if n >= total && limit.is_none() {
                loop {
                    let (p, _) = pending_and_dead(&store).await;
                    if p == 0 || Instant::now() >= deadline {
                        settled_at = (p == 0).then(Instant::now);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                break;
            }
        }
        let t_stop = Instant::now();
        probe_stop.cancel();
        let (probe_ms, probe_failed) = probe.await.unwrap_or_default();
        app.stop().await;
        let cpu = cpu_seconds() - cpu0;
        let log = take_log();
        // Events settled within the window (the baseline is cut at `limit`).
        let end = limit.map_or(t_stop, |l| t0 + l);
        let mut delivered = 0;
        let mut last = t0;
        for r in &log {
            if let Ev::Delivered { n, .. } = r.ev {
                if r.t <= end {
                    delivered += n;
                    last = r.t;
                }
            }
        }
        let window = match limit {
            Some(l) => l,
            None => sub(settled_at.unwrap_or(last), t0),
        };
        let seconds = window.as_secs_f64();
        let in_window: Vec<Rec> = log.iter().copied().filter(|r| r.t <= t0 + window).collect();
        let analysis = analyse(&in_window, t0);
        let cycles_line = report_cycles(backend, phase, &analysis, window);

        let (pending, dead) = pending_and_dead(&store).await;
        store.close().await;
        if limit.is_none() {
            if delivered != total || pending != 0 {
                problems.push(format!("{backend} {phase}: {delivered} of {total} delivered, {pending} still pending"));
            }
            let all: HashSet<usize> = (0..data.bench.len()).collect();
            for p in verify(&fake, data, &all) {
                problems.push(format!("{backend} {phase}: {p}"));
            }
        } else {
            // Only what was delivered is stamped: read the stamped set from the fake itself.
            let stamped: HashSet<usize> = (0..data.bench.len())
                .filter(|&i| fake.value(&Data::bench_record(i), None, FIELD).is_some_and(|v| !v.is_empty()))
                .collect();
            if (stamped.len() as u64) < delivered {
                problems.push(format!("{backend} {phase}: {delivered} delivered but {} records stamped", stamped.len()));
            }
            for p in verify(&fake, data, &stamped) {
                problems.push(format!("{backend} {phase}: {p}"));
            }
        }
        if dead != 0 {
            problems.push(format!("{backend} {phase}: {dead} dead deliveries"));
        }
        let eps = delivered as f64 / seconds.max(1e-9);
        let (export, import, metadata) =
            (fake.calls_of(CallKind::Export), fake.calls_of(CallKind::Import), fake.calls_of(CallKind::Metadata));
        println!(
            "RESULT backend={backend} phase={phase} batch_size={} events={delivered} seconds={seconds:.2} events_per_s={eps:.1} \
             calls_export={export} calls_import={import} calls_metadata={metadata} calls_total={} pending_left={pending} dead={dead} \
             bench_process_cpu_s={cpu:.2} analyzed={} ingest_probe_webhooks={} ingest_probe_not_200={probe_failed} \
             ingest_probe_p50_ms={:.1} ingest_probe_max_ms={:.1}",
            batch_size.map_or("500(default)".to_owned(), |b| b.to_string()),
            fake.calls(),
            args.analyze,
            probe_ms.len(),
            percentile(&probe_ms, 50.0),
            probe_ms.last().copied().unwrap_or(f64::NAN),
        );
        if probe_failed > 0 {
            problems.push(format!("{backend} {phase}: {probe_failed} of {} HELP webhooks sent during the run were not answered 200", probe_ms.len()));
        }
        let probe = (probe_ms.len(), probe_failed, percentile(&probe_ms, 50.0), probe_ms.last().copied().unwrap_or(f64::NAN));
        Ok(Throughput { events: delivered, seconds, eps, export, import, metadata, cycles_line, cpu, probe })
    }
    .await;
    drop_db(&args.pg_admin_url, &db).await;
    result
}

struct Latency {
    sent: usize,
    refused: usize,
    stamped: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    http_p50: f64,
    calls: usize,
    /// (calls - 1) / (last call - first call), client side.
    call_rate: f64,
    min_spacing_ms: f64,
    max_60s: usize,
    window: f64,
    cycles_line: String,
}

async fn latency(args: &Args, data: &Data, problems: &mut Vec<String>) -> anyhow::Result<Latency> {
    let backend = args.backend.as_str();
    let count = (args.rate * args.latency_secs) as usize;
    anyhow::ensure!(count < data.bench.len(), "--rate × --latency-secs must be below --events");
    eprintln!("== {backend} latency: {count} webhooks at {}/s", args.rate);
    let fake = Arc::new(FakeRedcap::start(data.project()).await);
    fake.set_latency(Duration::from_millis(args.redcap_ms));
    let db = fresh_db(&args.backend, &args.pg_admin_url, "relay.db").await?;
    let result: anyhow::Result<Latency> = async {
        let store = seeded(&db, &[]).await?;
        let app = start(config(args, &db.url, &fake.url, None)?).await?;
        let client = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
        let url = format!("http://{}/twilio/messages", app.addr);
        let send = {
            let (client, url) = (client.clone(), url.clone());
            move |i: usize, phone: String| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let sid = format!("SMlat{i:08}{:08x}", rand::random::<u32>());
                    post_webhook(&client, &url, &sid, &phone, "STOP").await
                }
            }
        };
        // Warm-up: one webhook (its metadata read, connections) not counted.
        let warm = count;
        let status = send(warm, data.bench[warm].clone()).await;
        anyhow::ensure!(status == 200, "warm-up webhook answered {status}");
        let warm_deadline = Instant::now() + Duration::from_secs(15);
        while fake.value(&Data::bench_record(warm), None, FIELD).unwrap_or_default().is_empty() {
            anyhow::ensure!(Instant::now() < warm_deadline, "warm-up webhook not stamped within 15 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        take_log();
        fake.reset_calls();

        let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; count]));
        let http_ms: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::with_capacity(count)));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let interval = Duration::from_secs(1) / args.rate;
        let t0 = Instant::now();
        let sender = {
            let (sent_at, http_ms, refused) = (sent_at.clone(), http_ms.clone(), refused.clone());
            let phones: Vec<String> = data.bench[..count].to_vec();
            let send = send.clone();
            tokio::spawn(async move {
                let mut tasks = Vec::with_capacity(phones.len());
                for (i, phone) in phones.into_iter().enumerate() {
                    tokio::time::sleep_until((t0 + interval * i as u32).into()).await;
                    let (sent_at, http_ms, refused, send) = (sent_at.clone(), http_ms.clone(), refused.clone(), send.clone());
                    tasks.push(tokio::spawn(async move {
                        let at = Instant::now();
                        sent_at.lock().unwrap()[i] = Some(at);
                        let status = send(i, phone).await;
                        http_ms.lock().unwrap().push(ms(at.elapsed()));
                        if status != 200 {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        };
        // Poll the fake every 10 ms for the records whose webhook went out.
        let mut stamped_at: Vec<Option<Instant>> = vec![None; count];
        let mut open: Vec<usize> = Vec::new();
        let mut next_seen = 0;
        let send_end = t0 + interval * count as u32;
        let deadline = send_end + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            {
                let sent = sent_at.lock().unwrap();
                while next_seen < count && sent[next_seen].is_some() {
                    open.push(next_seen);
                    next_seen += 1;
                }
            }
            let now = Instant::now();
            open.retain(|&i| {
                let hit = fake.value(&Data::bench_record(i), None, FIELD).is_some_and(|v| !v.is_empty());
                if hit {
                    stamped_at[i] = Some(now);
                }
                !hit
            });
            if (next_seen == count && open.is_empty()) || now >= deadline {
                break;
            }
        }
        let _ = sender.await;
        let t_end = stamped_at.iter().flatten().max().copied().unwrap_or_else(Instant::now);
        let window = sub(t_end, t0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.stop().await;
        let log = take_log();
        let analysis = analyse(&log.iter().copied().filter(|r| r.t <= t_end).collect::<Vec<_>>(), t0);
        let cycles_line = report_cycles(backend, "latency", &analysis, window);
        let starts: Vec<Instant> = analysis.calls.iter().map(|c| c.0).collect();
        let max_60s = {
            let mut best = 0;
            let mut j = 0;
            for i in 0..starts.len() {
                while sub(starts[i], starts[j]) >= Duration::from_secs(60) {
                    j += 1;
                }
                best = best.max(i - j + 1);
            }
            best
        };
        let min_spacing_ms = starts.windows(2).map(|w| ms(sub(w[1], w[0]))).fold(f64::INFINITY, f64::min);
        let call_rate = call_rate(&starts);

        let sent = sent_at.lock().unwrap().clone();
        let mut lat: Vec<f64> =
            sent.iter().zip(&stamped_at).filter_map(|(s, e)| Some(ms(sub((*e)?, (*s)?)))).collect();
        lat.sort_by(f64::total_cmp);
        let mut http = http_ms.lock().unwrap().clone();
        http.sort_by(f64::total_cmp);
        let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
        let stamped = lat.len();
        if refused > 0 {
            problems.push(format!("{backend} latency: {refused} webhooks not answered 200"));
        }
        if stamped < count {
            problems.push(format!("{backend} latency: {} of {count} records never stamped", count - stamped));
        }
        let mut expect: HashSet<usize> = (0..count).collect();
        expect.insert(warm);
        for p in verify(&fake, data, &expect) {
            problems.push(format!("{backend} latency: {p}"));
        }
        let (pending, dead) = pending_and_dead(&store).await;
        if pending != 0 || dead != 0 {
            problems.push(format!("{backend} latency: {pending} pending, {dead} dead after the run"));
        }
        store.close().await;
        let calls = fake.calls();
        let out = Latency {
            sent: count,
            refused,
            stamped,
            p50: percentile(&lat, 50.0),
            p90: percentile(&lat, 90.0),
            p99: percentile(&lat, 99.0),
            max: lat.last().copied().unwrap_or(f64::NAN),
            http_p50: percentile(&http, 50.0),
            calls,
            call_rate,
            min_spacing_ms,
            max_60s,
            window: window.as_secs_f64(),
            cycles_line,
        };
        println!(
            "RESULT backend={backend} phase=latency webhooks={count} rate_per_s={} refused={refused} stamped={stamped} \
             p50_ms={:.0} p90_ms={:.0} p99_ms={:.0} max_ms={:.0} webhook_http_p50_ms={:.1} window_s={:.2} \
             calls={calls} calls_export={} calls_import={} calls_metadata={} call_rate_per_s={call_rate:.3} min_spacing_ms={min_spacing_ms:.1} max_calls_any_60s={max_60s}",
            args.rate,
            out.p50,
            out.p90,
            out.p99,
            out.max,
            out.http_p50,
            out.window,
            fake.calls_of(CallKind::Export),
            fake.calls_of(CallKind::Import),
            fake.calls_of(CallKind::Metadata),
        );
        Ok(out)
    }
    .await;
    drop_db(&args.pg_admin_url, &db).await;
    result
}

// ---------------------------------------------------------------------------

#[tokio::main]
async fn main() -> ExitCode {
    optout_relay::install_tls_provider();
    init_tracing();
    let args = Args::parse();
    if !matches!(args.backend.as_str(), "postgres" | "sqlite") {
        eprintln!("--backend must be postgres or sqlite");
        return ExitCode::from(2);
    }
    let skip: HashSet<&str> = args.skip.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    let started = Instant::now();
    let data = Data::new(args.events, args.others);
    eprintln!("== {} numbers generated in {:.1}s", args.events + args.others, started.elapsed().as_secs_f64());
    let mut problems = Vec::new();
    let backend = args.backend.clone();

    let a = if skip.contains("a") {
        None
    } else {
        match throughput(&args, &data, "throughput", None, None, &mut problems).await {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(format!("{backend} throughput: {e:#}"));
                None
            }
        }
    };
    let base = if skip.contains("baseline") {
        None
    } else {
        let limit = Duration::from_secs_f64(args.baseline_secs);
        match throughput(&args, &data, "baseline", Some(1), Some(limit), &mut problems).await {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(format!("{backend} baseline: {e:#}"));
                None
            }
        }
    };
    let b = if skip.contains("b") {
        None
    } else {
        match latency(&args, &data, &mut problems).await {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(format!("{backend} latency: {e:#}"));
                None
            }
        }
    };

    let ratio = match (&a, &base) {
        (Some(a), Some(b)) if b.eps > 0.0 => a.eps / b.eps,
        _ => f64::NAN,
    };
    let eps_ok = a.as_ref().is_some_and(|a| a.eps >= 200.0);
    let lat_ok = b.as_ref().is_some_and(|b| b.p50 <= 2000.0 && b.stamped == b.sent);
    // 300/min: at most 300 calls in any 60 s and a rate of at most 5/s (call
    // times are read from the relay's log, a few ms late at worst: 1 % slack).
    let budget_ok = b.as_ref().is_some_and(|b| b.max_60s <= 300 && b.call_rate <= 5.0 * 1.01);
    println!(
        "RESULT backend={backend} phase=summary events_per_s={} baseline_events_per_s={} ratio={ratio:.1} \
         latency_p50_ms={} target_events_per_s_200={} target_p50_2s={} calls_within_300_per_min={} checks_failed={} total_s={:.1}",
        a.as_ref().map_or("NA".into(), |a| format!("{:.1}", a.eps)),
        base.as_ref().map_or("NA".into(), |b| format!("{:.2}", b.eps)),
        b.as_ref().map_or("NA".into(), |b| format!("{:.0}", b.p50)),
        if a.is_none() { "not_run" } else if eps_ok { "met" } else { "MISSED" },
        if b.is_none() { "not_run" } else if lat_ok { "met" } else { "MISSED" },
        if b.is_none() { "not_run" } else if budget_ok { "yes" } else { "NO" },
        problems.len(),
        started.elapsed().as_secs_f64(),
    );

    let mut md = String::new();
    let mut variant = Vec::new();
    if args.analyze {
        variant.push("store ANALYZEd after seeding".to_owned());
    }
    if let Some(w) = args.workers {
        variant.push(format!("relay.workers = {w}"));
    }
    let variant = if variant.is_empty() { String::new() } else { format!(" ({})", variant.join(", ")) };
    let _ = writeln!(md, "\n### Relay, {backend}{variant}\n");
    let _ = writeln!(md, "| Measure | Result | Target |");
    let _ = writeln!(md, "|---|---|---|");
    if let Some(a) = &a {
        let _ = writeln!(
            md,
            "| Backlog of {} opt-outs, default relay (batch 500, {} workers) | **{:.0} events/s** ({} events in {:.2} s) | ≥ 200 events/s {} |",
            a.events,
            args.workers.unwrap_or(Config::default().relay.workers),
            a.eps,
            a.events,
            a.seconds,
            if eps_ok { "✅" } else { "❌" }
        );
        let _ = writeln!(
            md,
            "| REDCap calls for the backlog | {} ({} export, {} import, {} metadata) | — |",
            a.export + a.import + a.metadata,
            a.export,
            a.import,
            a.metadata
        );
        let _ = writeln!(md, "| Batch cycles (phase A) | {} | — |", a.cycles_line);
        let _ = writeln!(md, "| CPU of the bench process (app + fake REDCap) | {:.1} s | — |", a.cpu);
        let _ = writeln!(
            md,
            "| Ingest meanwhile: a signed HELP webhook every 250 ms | {} sent, {} not 200, p50 {:.1} ms, max {:.0} ms | — |",
            a.probe.0, a.probe.1, a.probe.2, a.probe.3
        );
    }
    if let Some(base) = &base {
        let _ = writeln!(
            md,
            "| Baseline in the same run: batch_size = 1, {:.0} s | {:.2} events/s ({} events; {} export, {} import) | — |",
            base.seconds, base.eps, base.events, base.export, base.import
        );
        let _ = writeln!(md, "| Speed-up over the baseline | **{ratio:.0}×** | — |");
        let _ = writeln!(md, "| Baseline cycles | {} | — |", base.cycles_line);
        let _ = writeln!(
            md,
            "| Ingest during the baseline (HELP every 250 ms) | {} sent, {} not 200, p50 {:.1} ms, max {:.0} ms | — |",
            base.probe.0, base.probe.1, base.probe.2, base.probe.3
        );
    }
    if let Some(b) = &b {
        let _ = writeln!(
            md,
            "| Webhook → stamped, {} STOPs at {}/s | **p50 {:.0} ms**, p90 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} of {} stamped, {} refused) | p50 ≤ 2 s {} |",
            b.sent,
            args.rate,
            b.p50,
            b.p90,
            b.p99,
            b.max,
            b.stamped,
            b.sent,
            b.refused,
            if lat_ok { "✅" } else { "❌" }
        );
        let _ = writeln!(
            md,
            "| REDCap calls during the latency run | {} in {:.1} s: {:.2}/s first to last call, closest two {:.0} ms apart, at most {} in any 60 s | ≤ 5/s, ≤ 300 per minute {} |",
            b.calls,
            b.window,
            b.call_rate,
            b.min_spacing_ms,
            b.max_60s,
            if budget_ok { "✅" } else { "❌" }
        );
        let _ = writeln!(md, "| Batch cycles (phase B) | {} | — |", b.cycles_line);
        let _ = writeln!(md, "| Webhook HTTP answer, p50 | {:.1} ms | — |", b.http_p50);
    }
    let _ = writeln!(
        md,
        "| Checks (every benchmark record stamped, no other record or phone changed, no delivery left) | {} | all pass |",
        if problems.is_empty() { "all pass".to_owned() } else { format!("{} FAILED", problems.len()) }
    );
    println!("{md}");
    for p in &problems {
        eprintln!("CHECK FAILED: {p}");
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
