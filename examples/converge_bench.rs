//! Converge benchmark (issue #8): the figures the relay's "converge, don't
//! fire" model promises, measured on the real application
//! (`Application::build`, DEFAULT relay settings) against in-process fake
//! REDCap projects (the tests' fake) and a real store.
//!
//! ```text
//! cargo run --release --example converge_bench -- --backend postgres   # or sqlite
//! ```
//!
//! Every phase starts from a fresh database and fresh fake projects holding
//! the benchmark phones (typed six ways) among `--others` (5,000) other
//! records, every call answered after `--redcap-ms` (50 ms). The app is
//! started and left until each sink's first resync (one export at start)
//! is done, so only the phase's own calls are counted.
//!
//! * **Outage** (`--outage-secs`, 90 s): REDCap answers every call with a 500
//!   (`Fault::Status500`); `--outage-phones` (20) signed STOP webhooks arrive
//!   at its start. Counted: REDCap calls during the outage (each with its
//!   time: the probe schedule). Then the fault is cleared and the fake is
//!   polled every 10 ms: time from REDCap answering again to the last (and
//!   the first) of the 20 records stamped, and the calls that took.
//!   Figures: last stamped within 30 s, at most 15 calls during the outage.
//! * **Long outage** (`--long-outage-secs`, 600 s): the same, reported
//!   (no figure). It runs alongside the phases below, which end long before
//!   it does (their load does not change its call count, which timers set);
//!   its recovery is timed with nothing else running (checked: the run says
//!   so if not). With `--long-outage-secs` under 300 it runs after them.
//! * **Backlog** (`--backlog`, 5,000): REDCap down, that many STOP webhooks
//!   (distinct phones, 16 at a time) are recorded and wait; once all are
//!   pending and the sink is backing off, the fault is cleared. Counted from
//!   then until every record is stamped: record exports (figure: at most
//!   12), imports, other calls, seconds.
//! * **Latency** (`--rate` 50/s for `--latency-secs` 20 s), with 1 REDCap sink
//!   and with 3 (`[sinks.a]`, `[sinks.b]`, `[sinks.c]`, each its own fake
//!   project holding the same phones): webhook sent to the phone stamped in
//!   every sink, p50/p90/p99/max. Reported (no figure).
//!
//! `--serve-fakes N` instead starts N fake projects of `--others` records,
//! prints `FAKE <name> <url> <token>` per project and serves until killed:
//! `bench/converge.sh` points the release server's sinks at them while it
//! measures ingest with 1 and 3 sinks (`examples/loadgen.rs`).
//!
//! Output: `RESULT …` lines (key=value), then a markdown table. Exit code 1
//! if a figure is not met or a check failed (a webhook refused, a record not
//! stamped or stamped that should not be, work left in the queue).
//! Loopback only. PostgreSQL: creates `optout_bench_<16 hex>` databases
//! through `--pg-admin-url` and drops them.

#[path = "../tests/it/common/fake_redcap.rs"]
mod fake_redcap;

#[path = "bench_db/mod.rs"]
mod bench_db;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench_db::{drop_db, fresh_db, Db};
use clap::Parser;
use fake_redcap::{CallKind, FakeProject, FakeRedcap, Fault};
use optout_relay::config::{Config, RedcapConfig, SinkConfig};
use optout_relay::domain::Phone;
use optout_relay::startup::Application;
use optout_relay::store::Store;
use optout_relay::twilio::signature::compute;
use rand::{Rng, SeedableRng};
use secrecy::SecretString;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const REDCAP_TOKEN: &str = "0123456789ABCDEF0123456789ABCDEF";
const AUTH_TOKEN: &str = "bench-auth-token-0123456789abcdef";
const PUBLIC_URL: &str = "https://optout.bench.example";
const SERVICE: &str = "MG00000000000000000000000000000001";
const FIELD: &str = "opted_out_at";
const SINK_NAMES: [&str; 3] = ["a", "b", "c"];

/// The issue's figures.
const OUTAGE_LAND_WITHIN_S: f64 = 30.0;
const OUTAGE_MAX_CALLS: usize = 15;
const BACKLOG_MAX_EXPORTS: usize = 12;

#[derive(Parser, Debug, Clone)]
#[command(about = "Outage recovery, backlog and latency of the converging relay against fake REDCap projects")]
struct Args {
    /// postgres or sqlite.
    #[arg(long, default_value = "postgres")]
    backend: String,
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg_admin_url: String,
    /// Length of the outage of the figure, seconds.
    #[arg(long, default_value_t = 90.0)]
    outage_secs: f64,
    /// Opt-outs waiting during an outage.
    #[arg(long, default_value_t = 20)]
    outage_phones: usize,
    /// Length of the long outage, seconds (0: skip it).
    #[arg(long, default_value_t = 600.0)]
    long_outage_secs: f64,
    /// Opt-outs in the backlog phase.
    #[arg(long, default_value_t = 5_000)]
    backlog: usize,
    /// Other records in every project.
    #[arg(long, default_value_t = 5_000)]
    others: usize,
    /// Latency of every fake REDCap call, ms.
    #[arg(long, default_value_t = 50)]
    redcap_ms: u64,
    /// Webhooks per second in the latency phase.
    #[arg(long, default_value_t = 50)]
    rate: u32,
    /// Seconds of webhooks in the latency phase.
    #[arg(long, default_value_t = 20)]
    latency_secs: u32,
    /// Skip phases: any of outage, long, backlog, latency (comma-separated).
    #[arg(long, default_value = "")]
    skip: String,
    /// Only serve this many fake projects (for bench/converge.sh's ingest runs) until killed.
    #[arg(long)]
    serve_fakes: Option<usize>,
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        !self.skip.split(',').any(|s| s.trim() == phase)
    }
}

// ---------------------------------------------------------------------------
// Data: numbers, the projects holding them.

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
        // Area codes libphonenumber does not know never match: probe once per area code.
        let area_ok = *valid_area.entry(area).or_insert_with(|| {
            (0..20).any(|k| Phone::parse_valid(&format!("+1{area}{}{:04}", 200 + k * 37, k * 311), us()).is_some())
        });
        if !area_ok {
            continue;
        }
        if Phone::parse_valid(&e164, us()).as_ref().map(Phone::as_str) != Some(e164.as_str()) {
            continue;
        }
        seen.insert(e164.clone());
        out.push(e164);
    }
    out
}

fn us() -> phonenumber::country::Id {
    optout_relay::domain::parse_region("US").unwrap_or(phonenumber::country::Id::US)
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

/// Benchmark phones (records 2i+1) and other numbers (records 2j+2).
struct Data {
    bench: Vec<String>,
    others: Vec<String>,
}

impl Data {
    fn new(bench: usize, others: usize) -> Data {
        let all = us_numbers(bench + others, 0x00c0_1e2e_0008_u64);
        let others = all[bench..].to_vec();
        let mut bench_phones = all;
        bench_phones.truncate(bench);
        Data { bench: bench_phones, others }
    }
    fn bench_record(i: usize) -> String {
        (2 * i + 1).to_string()
    }
    /// A project holding the first `n` benchmark phones and every other number.
    fn project(&self, n: usize) -> FakeProject {
        let mut p = FakeProject::new(
            REDCAP_TOKEN,
            &[("study_id", "enrol", ""), ("phone", "enrol", ""), (FIELD, "enrol", "datetime_seconds_ymd")],
        );
        for (i, b) in self.bench.iter().take(n).enumerate() {
            p.records.push((Data::bench_record(i), None, HashMap::from([("phone".to_owned(), typed(b, i))])));
        }
        for (j, o) in self.others.iter().enumerate() {
            p.records.push(((2 * j + 2).to_string(), None, HashMap::from([("phone".to_owned(), typed(o, j + 3))])));
        }
        p
    }
}

fn stamped(fake: &FakeRedcap, i: usize) -> bool {
    fake.value(&Data::bench_record(i), None, FIELD).is_some_and(|v| !v.is_empty())
}

/// Records stamped that should not be: any other number, or a benchmark
/// phone at or beyond `sent` (no webhook for it).
fn wrongly_stamped(fake: &FakeRedcap, data: &Data, project_phones: usize, sent: usize) -> usize {
    let others = (0..data.others.len())
        .filter(|j| fake.value(&(2 * j + 2).to_string(), None, FIELD).is_some_and(|v| !v.is_empty()))
        .count();
    others + (sent..project_phones).filter(|&i| stamped(fake, i)).count()
}

async fn start_fakes(data: &Data, n: usize, phones: usize, redcap_ms: u64) -> Vec<Arc<FakeRedcap>> {
    let mut fakes = Vec::with_capacity(n);
    for _ in 0..n {
        let fake = FakeRedcap::start(data.project(phones)).await;
        fake.set_latency(Duration::from_millis(redcap_ms));
        fakes.push(Arc::new(fake));
    }
    fakes
}

// ---------------------------------------------------------------------------
// The application.

fn redcap_sink(url: &str) -> anyhow::Result<SinkConfig> {
    // Through serde, so every setting not named keeps its default
    // (request_timeout, max_calls_per_minute, resync_interval, …).
    let c: RedcapConfig = serde_json::from_value(json!({
        "url": url,
        "token": REDCAP_TOKEN,
        "phone_field": "phone",
        "optout_field": FIELD,
    }))?;
    Ok(SinkConfig::Redcap(c))
}

/// The default configuration, and one named REDCap sink per fake.
fn config(db: &Db, fakes: &[Arc<FakeRedcap>]) -> anyhow::Result<Config> {
    let mut c = Config::default();
    c.server.listen = ([127, 0, 0, 1], 0).into();
    c.server.public_url = Some(PUBLIC_URL.to_owned());
    c.server.shutdown_grace = Duration::from_secs(5);
    c.database.url = SecretString::from(db.url.clone());
    // Migrated by the benchmark before the start.
    c.database.run_migrations_on_start = false;
    c.twilio.auth_tokens = vec![SecretString::from(AUTH_TOKEN)];
    let mut sinks = BTreeMap::new();
    for (name, fake) in SINK_NAMES.iter().zip(fakes) {
        sinks.insert((*name).to_owned(), redcap_sink(&fake.url)?);
    }
    c.sinks = sinks;
    Ok(c)
}

struct Running {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
    store: Store,
    http: reqwest::Client,
}

async fn start(db: &Db, fakes: &[Arc<FakeRedcap>]) -> anyhow::Result<Running> {
    let mut cfg = Config::default().database;
    cfg.url = SecretString::from(db.url.clone());
    cfg.max_connections = 2;
    let store = Store::connect_lazy(&cfg)?;
    store.migrate().await?;
    let app = Application::build(config(db, fakes)?).await.map_err(|e| anyhow::anyhow!("build: {e}"))?;
    let addr = app.local_addr();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(app.run_until(shutdown.clone()));
    let http = reqwest::Client::builder().pool_max_idle_per_host(64).build()?;
    let r = Running { addr, shutdown, handle, store, http };
    match r.settled(fakes).await {
        Ok(()) => Ok(r),
        Err(e) => {
            r.stop().await;
            Err(e)
        }
    }
}

impl Running {
    /// Waits until every sink is registered and its first resync taken (it
    /// reads REDCap only when something is opted out), lets anything under
    /// way finish, and forgets the calls so far: a phase counts its own.
    async fn settled(&self, fakes: &[Arc<FakeRedcap>]) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sinks = self.store.sinks().await.unwrap_or_default();
            let ready = SINK_NAMES
                .iter()
                .take(fakes.len())
                .all(|n| sinks.iter().any(|s| s.name == *n && s.resynced_at.is_some()));
            if ready {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "sinks not registered and resynced within 60 s of the start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for f in fakes {
            f.reset_calls();
        }
        Ok(())
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(15), self.handle).await;
        self.store.close().await;
    }

    async fn stop_webhook(&self, sid: &str, phone: &str) -> u16 {
        post_webhook(&self.http, &format!("http://{}/twilio/messages", self.addr), sid, phone, "STOP").await
    }

    /// (pending, dead) over every sink.
    async fn queue(&self) -> (i64, i64) {
        match self.store.queue_stats().await {
            Ok(q) => q.iter().fold((0, 0), |(p, d), s| (p + s.pending, d + s.dead)),
            Err(e) => {
                eprintln!("queue_stats: {e}");
                (-1, -1)
            }
        }
    }

    /// Waits (up to `limit`) for the queue to be empty; the (pending, dead) seen last.
    async fn drained(&self, limit: Duration) -> (i64, i64) {
        let deadline = Instant::now() + limit;
        loop {
            let q = self.queue().await;
            if q.0 == 0 || Instant::now() >= deadline {
                return q;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn health(&self, sink: &str) -> String {
        match self.store.sink(sink).await {
            Ok(Some(h)) => h.health,
            Ok(None) => "unknown".to_owned(),
            Err(e) => format!("error: {e}"),
        }
    }
}

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
    if matches!(body, "STOP" | "START") {
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

fn sid(tag: &str, i: usize) -> String {
    format!("SM{tag}{i:08}{:016x}", rand::random::<u64>())
}

/// Sends a STOP from each phone, `concurrency` at a time; how many were not answered 200.
async fn send_stops(app: &Running, phones: &[String], tag: &str, concurrency: usize) -> usize {
    use futures_util::stream::{self, StreamExt};
    let refused = stream::iter(phones.iter().cloned().enumerate())
        .map(|(i, p): (usize, String)| async move { app.stop_webhook(&sid(tag, i), &p).await != 200 })
        .buffer_unordered(concurrency.max(1))
        .filter(|refused| std::future::ready(*refused))
        .count()
        .await;
    refused
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
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

fn calls_by_kind(fake: &FakeRedcap) -> String {
    [
        ("export", CallKind::Export),
        ("import", CallKind::Import),
        ("metadata", CallKind::Metadata),
        ("project", CallKind::Project),
        ("event", CallKind::Event),
        ("other", CallKind::Other),
    ]
    .iter()
    .map(|(name, k)| (name, fake.calls_of(*k)))
    .filter(|(_, n)| *n > 0)
    .map(|(name, n)| format!("{name}:{n}"))
    .collect::<Vec<_>>()
    .join(",")
}

// ---------------------------------------------------------------------------
// Outage.

#[derive(Debug, Clone)]
struct Outage {
    outage_s: f64,
    phones: usize,
    refused: usize,
    calls_during: usize,
    calls_during_kinds: String,
    /// Seconds into the outage at which the fake saw calls (probes), with their count.
    call_times: Vec<(f64, usize)>,
    landed: usize,
    first_s: f64,
    last_s: f64,
    calls_after: usize,
    calls_after_kinds: String,
    health_before_back: String,
    /// When REDCap came back.
    back_at: Option<Instant>,
}

async fn outage(
    args: &Args,
    data: &Data,
    label: &'static str,
    outage: Duration,
    problems: &mut Vec<String>,
) -> anyhow::Result<Outage> {
    let backend = args.backend.as_str();
    let n = args.outage_phones;
    eprintln!("== {backend} {label}: {:.0} s outage, {n} opt-outs waiting", secs(outage));
    let fakes = start_fakes(data, 1, n, args.redcap_ms).await;
    let fake = fakes[0].clone();
    let db = fresh_db(&args.backend, &args.pg_admin_url, "converge.db").await?;
    let result = async {
        let app = start(&db, &fakes).await?;
        let t_fault = Instant::now();
        fake.set_fault(Fault::Status500);
        let refused = send_stops(&app, &data.bench[..n], "out", 4).await;
        // The calls of the outage, as the fake sees them arrive (polled every 50 ms).
        let mut call_times = Vec::new();
        let mut seen = 0;
        let end = t_fault + outage;
        let mut next_note = t_fault + Duration::from_secs(60);
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50).min(end.saturating_duration_since(Instant::now()))).await;
            let c = fake.calls();
            if c > seen {
                call_times.push((secs(t_fault.elapsed()), c - seen));
                seen = c;
            }
            if Instant::now() >= next_note {
                eprintln!("   {label}: {:.0} s into the outage, {c} calls", secs(t_fault.elapsed()));
                next_note += Duration::from_secs(60);
            }
        }
        let calls_during = fake.calls();
        let calls_during_kinds = calls_by_kind(&fake);
        let health_before_back = app.health("a").await;
        fake.reset_calls();
        fake.clear_fault();
        let back = Instant::now();
        let mut landed_at: Vec<Option<Instant>> = vec![None; n];
        let deadline = back + Duration::from_secs(180);
        while landed_at.iter().any(Option::is_none) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = Instant::now();
            for (i, at) in landed_at.iter_mut().enumerate() {
                if at.is_none() && stamped(&fake, i) {
                    *at = Some(now);
                }
            }
        }
        let calls_after = fake.calls();
        let calls_after_kinds = calls_by_kind(&fake);
        let landed: Vec<f64> = landed_at.iter().flatten().map(|t| secs(t.saturating_duration_since(back))).collect();
        let (pending, dead) = app.drained(Duration::from_secs(30)).await;
        let wrong = wrongly_stamped(&fake, data, n, n);
        app.stop().await;
        if refused > 0 {
            problems.push(format!("{backend} {label}: {refused} webhooks not answered 200"));
        }
        if landed.len() < n {
            problems.push(format!("{backend} {label}: {} of {n} records never stamped", n - landed.len()));
        }
        if pending != 0 || dead != 0 {
            problems.push(format!("{backend} {label}: {pending} pending, {dead} dead after the run"));
        }
        if wrong > 0 {
            problems.push(format!("{backend} {label}: {wrong} records stamped that should not be"));
        }
        Ok(Outage {
            outage_s: secs(outage),
            phones: n,
            refused,
            calls_during,
            calls_during_kinds,
            call_times,
            landed: landed.len(),
            first_s: landed.iter().copied().fold(f64::INFINITY, f64::min),
            last_s: if landed.len() == n { landed.iter().copied().fold(0.0, f64::max) } else { f64::NAN },
            calls_after,
            calls_after_kinds,
            health_before_back,
            back_at: Some(back),
        })
    }
    .await;
    drop_db(&args.pg_admin_url, &db).await;
    if let Ok(o) = &result {
        let times: Vec<String> =
            o.call_times.iter().map(|(t, k)| if *k == 1 { format!("{t:.1}") } else { format!("{t:.1}x{k}") }).collect();
        println!(
            "RESULT backend={backend} phase={label} outage_s={:.0} phones={} refused={} calls_during={} calls_during_kinds={} \
             health_at_end={} landed={} first_stamped_s={:.2} last_stamped_s={:.2} calls_after={} calls_after_kinds={} \
             call_times_s={}",
            o.outage_s,
            o.phones,
            o.refused,
            o.calls_during,
            o.calls_during_kinds,
            o.health_before_back,
            o.landed,
            o.first_s,
            o.last_s,
            o.calls_after,
            o.calls_after_kinds,
            times.join(","),
        );
    }
    result
}

// ---------------------------------------------------------------------------
// Backlog.

#[derive(Debug, Clone)]
struct Backlog {
    phones: usize,
    refused: usize,
    /// Seconds to record them all (REDCap down).
    send_s: f64,
    exports: usize,
    imports: usize,
    calls: usize,
    kinds: String,
    last_s: f64,
    drained_s: f64,
}

async fn backlog(args: &Args, data: &Data, problems: &mut Vec<String>) -> anyhow::Result<Backlog> {
    let backend = args.backend.as_str();
    let n = args.backlog;
    eprintln!("== {backend} backlog: {n} opt-outs recorded while REDCap is down");
    let fakes = start_fakes(data, 1, n, args.redcap_ms).await;
    let fake = fakes[0].clone();
    let db = fresh_db(&args.backend, &args.pg_admin_url, "converge.db").await?;
    let result = async {
        let app = start(&db, &fakes).await?;
        fake.set_fault(Fault::Status500);
        let t_send = Instant::now();
        let refused = send_stops(&app, &data.bench[..n], "blg", 16).await;
        let send_s = secs(t_send.elapsed());
        // Everything waits, and the sink is known to be failing.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let (pending, _) = app.queue().await;
            if (pending as usize >= n - refused && app.health("a").await != "ok") || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (pending_before, _) = app.queue().await;
        fake.reset_calls();
        fake.clear_fault();
        let back = Instant::now();
        let mut open: Vec<usize> = (0..n).collect();
        let mut last = back;
        let deadline = back + Duration::from_secs(300);
        while !open.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = Instant::now();
            open.retain(|&i| {
                let hit = stamped(&fake, i);
                if hit {
                    last = now;
                }
                !hit
            });
        }
        let (pending, dead) = app.drained(Duration::from_secs(60)).await;
        let drained_s = secs(back.elapsed());
        let exports = fake.calls_of(CallKind::Export);
        let imports = fake.calls_of(CallKind::Import);
        let calls = fake.calls();
        let kinds = calls_by_kind(&fake);
        let wrong = wrongly_stamped(&fake, data, n, n);
        app.stop().await;
        if refused > 0 {
            problems.push(format!("{backend} backlog: {refused} webhooks not answered 200"));
        }
        if pending_before as usize != n {
            problems.push(format!("{backend} backlog: {pending_before} pending when REDCap came back, expected {n}"));
        }
        if !open.is_empty() {
            problems.push(format!("{backend} backlog: {} of {n} records never stamped", open.len()));
        }
        if pending != 0 || dead != 0 {
            problems.push(format!("{backend} backlog: {pending} pending, {dead} dead after the run"));
        }
        if wrong > 0 {
            problems.push(format!("{backend} backlog: {wrong} records stamped that should not be"));
        }
        Ok(Backlog {
            phones: n,
            refused,
            send_s,
            exports,
            imports,
            calls,
            kinds,
            last_s: if open.is_empty() { secs(last.saturating_duration_since(back)) } else { f64::NAN },
            drained_s,
        })
    }
    .await;
    drop_db(&args.pg_admin_url, &db).await;
    if let Ok(b) = &result {
        println!(
            "RESULT backend={backend} phase=backlog phones={} refused={} send_s={:.1} exports={} imports={} calls={} kinds={} \
             last_stamped_s={:.2} queue_empty_s={:.2}",
            b.phones, b.refused, b.send_s, b.exports, b.imports, b.calls, b.kinds, b.last_s, b.drained_s
        );
    }
    result
}

// ---------------------------------------------------------------------------
// Latency.

#[derive(Debug, Clone)]
struct Latency {
    sinks: usize,
    sent: usize,
    refused: usize,
    stamped: usize,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    calls: Vec<usize>,
}

async fn latency(args: &Args, data: &Data, sinks: usize, problems: &mut Vec<String>) -> anyhow::Result<Latency> {
    let backend = args.backend.as_str();
    let count = (args.rate * args.latency_secs) as usize;
    anyhow::ensure!(count < data.bench.len(), "--rate × --latency-secs must be below the phones generated");
    eprintln!("== {backend} latency, {sinks} sink(s): {count} webhooks at {}/s", args.rate);
    let fakes = start_fakes(data, sinks, count + 1, args.redcap_ms).await;
    let db = fresh_db(&args.backend, &args.pg_admin_url, "converge.db").await?;
    let result = async {
        let app = Arc::new(start(&db, &fakes).await?);
        let in_all = |i: usize| fakes.iter().all(|f| stamped(f, i));
        // Warm-up: one webhook (connections, each sink's metadata), not counted.
        let warm = count;
        anyhow::ensure!(app.stop_webhook(&sid("warm", warm), &data.bench[warm]).await == 200, "warm-up refused");
        let warm_deadline = Instant::now() + Duration::from_secs(30);
        while !in_all(warm) {
            anyhow::ensure!(Instant::now() < warm_deadline, "warm-up webhook not stamped within 30 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for f in &fakes {
            f.reset_calls();
        }

        let interval = Duration::from_secs(1) / args.rate;
        let t0 = Instant::now();
        let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> = Arc::new(std::sync::Mutex::new(vec![None; count]));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sender = {
            let (app, sent_at, refused) = (app.clone(), sent_at.clone(), refused.clone());
            let phones: Vec<String> = data.bench[..count].to_vec();
            tokio::spawn(async move {
                let mut tasks = Vec::with_capacity(phones.len());
                for (i, phone) in phones.into_iter().enumerate() {
                    tokio::time::sleep_until((t0 + interval * i as u32).into()).await;
                    let (app, sent_at, refused) = (app.clone(), sent_at.clone(), refused.clone());
                    tasks.push(tokio::spawn(async move {
                        sent_at.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(Instant::now());
                        if app.stop_webhook(&sid("lat", i), &phone).await != 200 {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        };
        let mut stamped_at: Vec<Option<Instant>> = vec![None; count];
        let mut open: Vec<usize> = Vec::new();
        let mut next_seen = 0;
        let deadline = t0 + interval * count as u32 + Duration::from_secs(60);
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            {
                let sent = sent_at.lock().unwrap_or_else(|e| e.into_inner());
                while next_seen < count && sent[next_seen].is_some() {
                    open.push(next_seen);
                    next_seen += 1;
                }
            }
            let now = Instant::now();
            open.retain(|&i| {
                let hit = in_all(i);
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
        let sent = sent_at.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut lat: Vec<f64> = sent
            .iter()
            .zip(&stamped_at)
            .filter_map(|(s, e)| Some(ms((*e)?.saturating_duration_since((*s)?))))
            .collect();
        lat.sort_by(f64::total_cmp);
        let calls: Vec<usize> = fakes.iter().map(|f| f.calls()).collect();
        let (pending, dead) = app.drained(Duration::from_secs(30)).await;
        let wrong: usize = fakes.iter().map(|f| wrongly_stamped(f, data, count + 1, count + 1)).sum();
        let refused = refused.load(std::sync::atomic::Ordering::Relaxed);
        match Arc::try_unwrap(app) {
            Ok(app) => app.stop().await,
            Err(_) => anyhow::bail!("the app is still shared"),
        }
        if refused > 0 {
            problems.push(format!("{backend} latency {sinks} sinks: {refused} webhooks not answered 200"));
        }
        if lat.len() < count {
            problems.push(format!(
                "{backend} latency {sinks} sinks: {} of {count} never stamped in every sink",
                count - lat.len()
            ));
        }
        if pending != 0 || dead != 0 {
            problems.push(format!("{backend} latency {sinks} sinks: {pending} pending, {dead} dead after the run"));
        }
        if wrong > 0 {
            problems.push(format!("{backend} latency {sinks} sinks: {wrong} records stamped that should not be"));
        }
        Ok(Latency {
            sinks,
            sent: count,
            refused,
            stamped: lat.len(),
            p50: percentile(&lat, 50.0),
            p90: percentile(&lat, 90.0),
            p99: percentile(&lat, 99.0),
            max: lat.last().copied().unwrap_or(f64::NAN),
            calls,
        })
    }
    .await;
    drop_db(&args.pg_admin_url, &db).await;
    if let Ok(l) = &result {
        println!(
            "RESULT backend={backend} phase=latency sinks={} rate={} sent={} refused={} stamped_in_all={} p50_ms={:.0} \
             p90_ms={:.0} p99_ms={:.0} max_ms={:.0} calls_per_sink={}",
            l.sinks,
            args.rate,
            l.sent,
            l.refused,
            l.stamped,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            l.calls.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
        );
    }
    result
}

// ---------------------------------------------------------------------------
// Fakes for the ingest runs.

async fn serve_fakes(args: &Args, n: usize) -> ExitCode {
    // The other numbers only: loadgen's random phones match no record, so
    // the relay reads the project and writes nothing.
    let data = Data::new(0, args.others);
    let fakes = start_fakes(&data, n, 0, args.redcap_ms).await;
    for (name, f) in SINK_NAMES.iter().cycle().zip(&fakes) {
        println!("FAKE {name} {} {REDCAP_TOKEN}", f.url);
    }
    println!("READY");
    // Served until the process is killed.
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**NOT MET**"
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    optout_relay::install_tls_provider();
    // The relay's warnings (a sink backing off, …) go to stderr with the run.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,sqlx=error"));
    tracing_subscriber::fmt().compact().with_ansi(false).with_writer(std::io::stderr).with_env_filter(filter).init();
    let args = Args::parse();
    if let Some(n) = args.serve_fakes {
        return serve_fakes(&args, n.clamp(1, SINK_NAMES.len())).await;
    }
    if !matches!(args.backend.as_str(), "postgres" | "sqlite") {
        eprintln!("--backend must be postgres or sqlite");
        return ExitCode::from(2);
    }
    let started = Instant::now();
    let latency_phones = (args.rate * args.latency_secs) as usize + 1;
    let data = Arc::new(Data::new(args.backlog.max(latency_phones).max(args.outage_phones), args.others));
    let mut problems: Vec<String> = Vec::new();

    // The long outage runs alongside the other phases when it outlasts them.
    let long =
        (args.runs("long") && args.long_outage_secs > 0.0).then(|| Duration::from_secs_f64(args.long_outage_secs));
    let alongside = long.is_some_and(|d| d >= Duration::from_secs(300));
    let spawn_long = |args: Arc<Args>, data: Arc<Data>, d: Duration| {
        tokio::spawn(async move {
            let mut p = Vec::new();
            let r = outage(&args, &data, "long_outage", d, &mut p).await;
            (r, p)
        })
    };
    let shared_args = Arc::new(args.clone());
    let mut long_task = match long {
        Some(d) if alongside => Some(spawn_long(shared_args.clone(), data.clone(), d)),
        _ => None,
    };

    let short = if args.runs("outage") {
        match outage(&args, &data, "outage", Duration::from_secs_f64(args.outage_secs), &mut problems).await {
            Ok(o) => Some(o),
            Err(e) => {
                problems.push(format!("outage: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let backlog = if args.runs("backlog") {
        match backlog(&args, &data, &mut problems).await {
            Ok(b) => Some(b),
            Err(e) => {
                problems.push(format!("backlog: {e:#}"));
                None
            }
        }
    } else {
        None
    };
    let mut lat = Vec::new();
    if args.runs("latency") {
        for sinks in [1, 3] {
            match latency(&args, &data, sinks, &mut problems).await {
                Ok(l) => lat.push(l),
                Err(e) => problems.push(format!("latency {sinks} sinks: {e:#}")),
            }
        }
    }
    let others_done = Instant::now();
    if let (Some(d), None) = (long, &long_task) {
        long_task = Some(spawn_long(shared_args.clone(), data.clone(), d));
    }
    let long_outage = match long_task {
        Some(t) => match t.await {
            Ok((Ok(o), p)) => {
                problems.extend(p);
                if alongside && o.back_at.is_some_and(|b| b < others_done + Duration::from_secs(5)) {
                    println!(
                        "NOTE backend={} the long outage's recovery overlapped the other phases (they ended {:.0} s before it)",
                        args.backend,
                        o.back_at.map_or(0.0, |b| secs(b.saturating_duration_since(others_done)))
                    );
                }
                Some(o)
            }
            Ok((Err(e), p)) => {
                problems.extend(p);
                problems.push(format!("long outage: {e:#}"));
                None
            }
            Err(e) => {
                problems.push(format!("long outage task: {e}"));
                None
            }
        },
        None => None,
    };

    // The figures.
    let mut failed_figures = 0;
    let mut md = String::new();
    let b = &args.backend;
    let _ = writeln!(
        md,
        "\n### Converge, {b} (default relay settings, fake REDCap answering after {} ms)\n",
        args.redcap_ms
    );
    let _ = writeln!(md, "| figure | measured | required | verdict |");
    let _ = writeln!(md, "|---|---:|---:|---|");
    if let Some(o) = &short {
        let land_ok = o.last_s <= OUTAGE_LAND_WITHIN_S;
        let calls_ok = o.calls_during <= OUTAGE_MAX_CALLS;
        failed_figures += usize::from(!land_ok) + usize::from(!calls_ok);
        let _ = writeln!(
            md,
            "| {:.0} s outage: last of {} opt-outs stamped after REDCap answers again (first at {:.1} s) | {:.1} s | ≤ {OUTAGE_LAND_WITHIN_S:.0} s | {} |",
            o.outage_s, o.phones, o.first_s, o.last_s, verdict(land_ok)
        );
        let _ = writeln!(
            md,
            "| {:.0} s outage: REDCap calls during the outage ({}) | {} | ≤ {OUTAGE_MAX_CALLS} | {} |",
            o.outage_s,
            o.calls_during_kinds,
            o.calls_during,
            verdict(calls_ok)
        );
        let _ = writeln!(
            md,
            "| {:.0} s outage: REDCap calls after it until the last stamp ({}) | {} | — | reported |",
            o.outage_s, o.calls_after_kinds, o.calls_after
        );
    }
    if let Some(o) = &long_outage {
        let _ = writeln!(
            md,
            "| {:.0} s outage: last of {} stamped after REDCap answers again (first at {:.1} s) | {:.1} s | — ({}within 30 s) | reported |",
            o.outage_s,
            o.phones,
            o.first_s,
            o.last_s,
            if o.last_s <= OUTAGE_LAND_WITHIN_S { "" } else { "not " }
        );
        let _ = writeln!(
            md,
            "| {:.0} s outage: REDCap calls during the outage ({}) | {} | — | reported |",
            o.outage_s, o.calls_during_kinds, o.calls_during
        );
    }
    if let Some(k) = &backlog {
        let ok = k.exports <= BACKLOG_MAX_EXPORTS && k.last_s.is_finite();
        failed_figures += usize::from(!ok);
        let _ = writeln!(
            md,
            "| {} backlog drained: record exports | {} | ≤ {BACKLOG_MAX_EXPORTS} | {} |",
            k.phones,
            k.exports,
            verdict(ok)
        );
        let _ = writeln!(
            md,
            "| {} backlog drained: imports, all calls ({}), seconds to the last stamp (queue empty) | {} imports, {} calls, {:.1} s ({:.1} s) | — | reported |",
            k.phones, k.kinds, k.imports, k.calls, k.last_s, k.drained_s
        );
    }
    for l in &lat {
        let _ = writeln!(
            md,
            "| webhook → stamped in {} REDCap sink{}, {}/s for {} s: p50 / p90 (p99, max) | {:.0} / {:.0} ms ({:.0}, {:.0}) | — | reported |",
            l.sinks,
            if l.sinks == 1 { "" } else { "s (all of them)" },
            args.rate,
            args.latency_secs,
            l.p50,
            l.p90,
            l.p99,
            l.max
        );
    }
    for o in short.iter().chain(&long_outage) {
        let times: Vec<String> = o.call_times.iter().map(|(t, _)| format!("{t:.0}")).collect();
        let _ = writeln!(md, "\nCalls during the {:.0} s outage arrived at (s): {}.", o.outage_s, times.join(", "));
    }
    let _ = writeln!(
        md,
        "\nWhole run {:.0} s; checks: {}; figures: {}.",
        secs(started.elapsed()),
        if problems.is_empty() { "all pass".to_owned() } else { format!("{} FAILED", problems.len()) },
        if failed_figures == 0 { "all met".to_owned() } else { format!("{failed_figures} NOT MET") }
    );
    println!("{md}");
    println!(
        "RESULT backend={b} phase=summary total_s={:.0} checks_failed={} figures_not_met={failed_figures}",
        secs(started.elapsed()),
        problems.len()
    );
    for p in &problems {
        println!("CHECK FAILED: {p}");
    }
    if problems.is_empty() && failed_figures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
