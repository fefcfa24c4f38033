//! Load generator for `POST /twilio/messages`: distinct, correctly signed
//! Twilio inbound STOP (or START) webhooks over N concurrent keep-alive
//! connections, with per-request latency.
//!
//! ```text
//! cargo run --release --example loadgen -- \
//!     --url http://127.0.0.1:8080 --public-url https://optout.example.org \
//!     --token 12345 --concurrency 32 --requests 20000
//! ```
//!
//! Every request has its own random `MessageSid` (`SM` + 32 hex) and its own
//! `From` (a valid US number, no two alike within a run), so the server writes
//! one new `events` row and one new `opt_out_state` row per request. The
//! signature is computed with the library's own
//! [`optout_relay::twilio::signature::compute`] over `public_url +
//! "/twilio/messages"`, the way Twilio signs.
//!
//! A warm-up (`--warmup`, default 2 s, same traffic) runs first and is not
//! counted. The measured requests are signed before the clock starts, so the
//! generator spends its CPU on HTTP only. Output: one line per non-200 answer
//! (the first 20) on stderr, then on stdout
//!
//! ```text
//! RESULT requests=… errors=… seconds=… rps=… p50_ms=… p90_ms=… p99_ms=… max_ms=… warmup_requests=… warmup_errors=… ok_total=…
//! CPU window_s=… loadgen=…% [label=…% …] host=…%/200
//! ```
//!
//! `ok_total` is every 200 including the warm-up: the number of rows the
//! server must have written. `--watch LABEL=pid:PID[,PID…]`,
//! `--watch LABEL=comm:NAME` or `--watch LABEL=tree:PID` (a process and its
//! descendants, counting those that exit, e.g. a PostgreSQL postmaster) adds
//! the CPU those processes used during the measured window (percent of one
//! core), read from `/proc`; `host` is the
//! busy time of the whole machine out of 100 % per CPU, so whatever else ran
//! meanwhile shows as host minus the listed processes.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use optout_relay::twilio::signature::compute;

#[derive(Parser, Debug)]
#[command(about = "Signed Twilio inbound-SMS webhook load generator")]
struct Args {
    /// Base URL the requests go to, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Base URL the server is configured with (server.public_url), used for signing. Default: --url.
    #[arg(long)]
    public_url: Option<String>,
    /// Twilio Auth Token (server.twilio.auth_tokens).
    #[arg(long)]
    token: String,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured requests (signed up front).
    #[arg(long, default_value_t = 20_000, conflicts_with = "duration")]
    requests: u64,
    /// Measure for this many seconds instead of a fixed number of requests (signed on the fly).
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of uncounted warm-up traffic before measuring (0 for none).
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// stop or start.
    #[arg(long, default_value = "stop")]
    kind: String,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    #[arg(long, default_value = "AC00000000000000000000000000000001")]
    account_sid: String,
    #[arg(long, default_value = "MG00000000000000000000000000000001")]
    messaging_service_sid: String,
    #[arg(long, default_value = "+14155550100")]
    to: String,
    /// Seed for the From numbers (default: random). MessageSids are always random.
    #[arg(long)]
    seed: Option<u64>,
    /// LABEL=pid:PID[,PID…], LABEL=comm:NAME or LABEL=tree:PID; repeatable. CPU used in the measured window.
    #[arg(long)]
    watch: Vec<String>,
    /// Print one signed request (URL, headers, body) and exit.
    #[arg(long)]
    print_sample: bool,
}

/// US area codes in service (all valid for libphonenumber), none of them N11.
const AREA_CODES: &[u16] = &[
    201, 202, 203, 205, 206, 207, 208, 209, 210, 212, 213, 214, 215, 216, 217, 218, 219, 224, 225, 228, 229, 231, 234,
    239, 240, 248, 251, 252, 253, 254, 256, 260, 262, 267, 269, 270, 276, 281, 301, 302, 303, 304, 305, 307, 308, 309,
    310, 312, 313, 314, 315, 316, 317, 318, 319, 320, 321, 323, 330, 334, 336, 337, 339, 347, 352, 360, 361, 386, 401,
    402, 404, 405, 406, 407, 408, 409, 410, 412, 413, 414, 415, 417, 419, 423, 425, 430, 432, 434, 435, 440, 443, 469,
    478, 479, 480, 484, 501, 502, 503, 504, 505, 507, 508, 509, 510, 512, 513, 515, 516, 517, 518, 520, 530, 540, 541,
    551, 559, 561, 562, 563, 567, 570, 571, 573, 574, 575, 580, 585, 586, 601, 602, 603, 605, 606, 607, 608, 609, 610,
    612, 614, 615, 616, 617, 618, 619, 620, 623, 626, 630, 631, 636, 641, 646, 650, 651, 660, 661, 662, 678, 682, 701,
    702, 703, 704, 706, 707, 708, 712, 713, 714, 715, 716, 717, 718, 719, 720, 724, 727, 731, 732, 734, 740, 754, 757,
    760, 763, 765, 770, 772, 773, 774, 775, 781, 785, 786, 801, 802, 803, 804, 805, 806, 808, 810, 812, 813, 814, 815,
    816, 817, 818, 828, 830, 831, 832, 843, 845, 847, 848, 850, 856, 857, 858, 859, 860, 862, 863, 864, 865, 870, 901,
    903, 904, 906, 907, 908, 909, 910, 912, 913, 914, 915, 916, 917, 918, 919, 920, 925, 928, 931, 936, 937, 940, 941,
    949, 951, 952, 954, 956, 970, 971, 972, 973, 978, 979, 980, 985, 989,
];

/// Exchanges 200–999 without the N11 service codes and without 555 (partly fictional).
fn exchanges() -> Vec<u16> {
    (200..1000u16).filter(|e| e % 100 != 11 && *e != 555).collect()
}

/// Maps request numbers to distinct valid US numbers in a scrambled order:
/// `i ↦ (i·step + offset) mod space` is a bijection when `gcd(step, space) = 1`.
struct Numbers {
    exchanges: Vec<u16>,
    space: u64,
    step: u64,
    offset: u64,
}

impl Numbers {
    fn new(seed: u64) -> Numbers {
        let exchanges = exchanges();
        let space = AREA_CODES.len() as u64 * exchanges.len() as u64 * 10_000;
        let mut step = 2_654_435_761u64 % space;
        while gcd(step, space) != 1 {
            step += 1;
        }
        Numbers { exchanges, space, step, offset: seed % space }
    }

    fn get(&self, i: u64) -> String {
        let x = ((u128::from(i % self.space) * u128::from(self.step) + u128::from(self.offset))
            % u128::from(self.space)) as u64;
        let line = x % 10_000;
        let rest = x / 10_000;
        let exchange = self.exchanges[(rest % self.exchanges.len() as u64) as usize];
        let area = AREA_CODES[(rest / self.exchanges.len() as u64) as usize];
        format!("+1{area}{exchange}{line:04}")
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

struct Generator {
    numbers: Numbers,
    signed_url: String,
    token: String,
    account_sid: String,
    messaging_service_sid: String,
    to: String,
    body: &'static str,
    opt_out_type: &'static str,
}

struct Prepared {
    body: Vec<u8>,
    signature: String,
}

impl Generator {
    /// The fields Twilio posts for an inbound SMS on a Messaging Service with Advanced Opt-Out.
    fn pairs(&self, i: u64) -> Vec<(String, String)> {
        let sid = format!("SM{:032x}", rand::random::<u128>());
        let from = self.numbers.get(i);
        let list: [(&str, &str); 22] = [
            ("ToCountry", "US"),
            ("ToState", "CA"),
            ("SmsMessageSid", &sid),
            ("NumMedia", "0"),
            ("ToCity", "SAN FRANCISCO"),
            ("FromZip", "94105"),
            ("SmsSid", &sid),
            ("FromState", "CA"),
            ("SmsStatus", "received"),
            ("FromCity", "SAN FRANCISCO"),
            ("Body", self.body),
            ("FromCountry", "US"),
            ("To", &self.to),
            ("MessagingServiceSid", &self.messaging_service_sid),
            ("ToZip", "94105"),
            ("NumSegments", "1"),
            ("ReferralNumMedia", "0"),
            ("MessageSid", &sid),
            ("AccountSid", &self.account_sid),
            ("From", &from),
            ("ApiVersion", "2010-04-01"),
            ("OptOutType", self.opt_out_type),
        ];
        list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn prepare(&self, i: u64) -> Prepared {
        let pairs = self.pairs(i);
        let signature = compute(&self.token, &self.signed_url, &pairs);
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish().into_bytes();
        Prepared { body, signature }
    }
}

#[derive(Default)]
struct Outcome {
    latencies_us: Vec<u64>,
    errors: u64,
    ok: u64,
}

/// Errors printed so far (the first 20 are shown).
static SHOWN: AtomicUsize = AtomicUsize::new(0);

fn show_error(what: String) {
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 20 {
        eprintln!("error: {what}");
    }
}

async fn send(client: &reqwest::Client, url: &str, p: Prepared, out: &mut Outcome, record: bool) {
    let started = Instant::now();
    let result = client
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", p.signature)
        .header("user-agent", "TwilioProxy/1.1")
        .body(p.body)
        .send()
        .await;
    let outcome = match result {
        Ok(resp) => {
            let status = resp.status();
            // Read the body so the connection goes back to the pool.
            let text = resp.text().await.unwrap_or_default();
            if status == reqwest::StatusCode::OK {
                Ok(())
            } else {
                Err(format!("HTTP {status}: {}", text.chars().take(200).collect::<String>()))
            }
        }
        Err(e) => Err(format!("transport: {e}")),
    };
    let elapsed = started.elapsed();
    match outcome {
        Ok(()) => out.ok += 1,
        Err(e) => {
            out.errors += 1;
            show_error(e);
        }
    }
    if record {
        out.latencies_us.push(elapsed.as_micros() as u64);
    }
}

/// CPU of a process and of its reaped children (utime + stime + cutime +
/// cstime, `/proc/PID/stat` fields 14–17), in clock ticks. The children count
/// so that a PostgreSQL backend that exits during the window is not lost: its
/// time moves to the postmaster's cutime.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    (11..=14).map(|k| f.get(k)?.parse::<u64>().ok()).sum()
}

/// Busy ticks of the whole host (every CPU), from the first line of `/proc/stat`.
fn host_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    Some(f.iter().take(8).sum::<u64>() - f.get(3)? - f.get(4)?)
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_owned())
}

enum Watch {
    Pids(Vec<u32>),
    Comm(String),
    /// A process and all its descendants (a PostgreSQL postmaster and its backends).
    Tree(u32),
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()).collect())
        .unwrap_or_default()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?.parse().ok()
}

impl Watch {
    fn parse(spec: &str) -> Result<(String, Watch), String> {
        let (label, what) =
            spec.split_once('=').ok_or_else(|| format!("--watch {spec}: expected LABEL=pid:… or LABEL=comm:…"))?;
        let w = if let Some(pids) = what.strip_prefix("pid:") {
            Watch::Pids(
                pids.split(',')
                    .map(|p| p.trim().parse::<u32>().map_err(|e| format!("--watch {spec}: {e}")))
                    .collect::<Result<_, _>>()?,
            )
        } else if let Some(name) = what.strip_prefix("comm:") {
            Watch::Comm(name.to_owned())
        } else if let Some(pid) = what.strip_prefix("tree:") {
            Watch::Tree(pid.trim().parse::<u32>().map_err(|e| format!("--watch {spec}: {e}"))?)
        } else {
            return Err(format!("--watch {spec}: expected pid:…, comm:… or tree:…"));
        };
        Ok((label.to_owned(), w))
    }

    /// Per-pid tick counts now.
    fn sample(&self) -> HashMap<u32, u64> {
        let pids: Vec<u32> = match self {
            Watch::Pids(p) => p.clone(),
            Watch::Comm(name) => {
                all_pids().into_iter().filter(|pid| comm(*pid).as_deref() == Some(name.as_str())).collect()
            }
            Watch::Tree(root) => {
                let parents: HashMap<u32, u32> = all_pids().into_iter().filter_map(|p| Some((p, parent(p)?))).collect();
                let mut tree = vec![*root];
                let mut k = 0;
                while k < tree.len() {
                    let node = tree[k];
                    tree.extend(parents.iter().filter(|(_, pp)| **pp == node).map(|(p, _)| *p));
                    k += 1;
                }
                tree
            }
        };
        pids.into_iter().filter_map(|p| Some((p, cpu_ticks(p)?))).collect()
    }
}

/// Ticks used between two samples by processes alive at the end (a process
/// born in between counts from zero).
fn used(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> u64 {
    after.iter().map(|(pid, t)| t.saturating_sub(*before.get(pid).unwrap_or(&0))).sum()
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (body, opt_out_type) = match args.kind.to_ascii_lowercase().as_str() {
        "stop" => ("STOP", "STOP"),
        "start" => ("START", "START"),
        other => {
            eprintln!("--kind {other}: expected stop or start");
            return ExitCode::from(2);
        }
    };
    let mut watches = Vec::new();
    for w in &args.watch {
        match Watch::parse(w) {
            Ok(w) => watches.push(w),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        }
    }
    let concurrency = args.concurrency.max(1);
    let base = args.url.trim_end_matches('/').to_owned();
    let public = args.public_url.as_deref().unwrap_or(&base).trim_end_matches('/').to_owned();
    let target = format!("{base}/twilio/messages");
    let gen = Arc::new(Generator {
        numbers: Numbers::new(args.seed.unwrap_or_else(rand::random)),
        signed_url: format!("{public}/twilio/messages"),
        token: args.token.clone(),
        account_sid: args.account_sid.clone(),
        messaging_service_sid: args.messaging_service_sid.clone(),
        to: args.to.clone(),
        body,
        opt_out_type,
    });

    // Every number of the run must be one the server and a relay accept as a valid US number.
    for i in 0..AREA_CODES.len() as u64 * 3 {
        let n = gen.numbers.get(i * 7919);
        if optout_relay::domain::Phone::parse_valid(&n, phonenumber::country::Id::US).is_none() {
            eprintln!("generated number {n} is not valid for libphonenumber");
            return ExitCode::FAILURE;
        }
    }
    for ac in AREA_CODES {
        let n = format!("+1{ac}2000000");
        if optout_relay::domain::Phone::parse_valid(&n, phonenumber::country::Id::US).is_none() {
            eprintln!("area code {ac} is not valid for libphonenumber");
            return ExitCode::FAILURE;
        }
    }

    if args.print_sample {
        let p = gen.prepare(0);
        println!(
            "POST {target}\nX-Twilio-Signature: {}\nsigned over: {}\n\n{}",
            p.signature,
            gen.signed_url,
            String::from_utf8_lossy(&p.body)
        );
        return ExitCode::SUCCESS;
    }

    optout_relay::install_tls_provider();
    let client = match reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .timeout(Duration::from_secs_f64(args.timeout))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let next = Arc::new(AtomicU64::new(0));

    // Warm-up: same traffic, signed on the fly, not counted.
    let mut warm = Outcome::default();
    if args.warmup > 0.0 {
        let until = Instant::now() + Duration::from_secs_f64(args.warmup);
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (client, gen, next, target) = (client.clone(), gen.clone(), next.clone(), target.clone());
                tokio::spawn(async move {
                    let mut out = Outcome::default();
                    while Instant::now() < until {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        send(&client, &target, gen.prepare(i), &mut out, false).await;
                    }
                    out
                })
            })
            .collect();
        for t in tasks {
            let o = t.await.unwrap_or_default();
            warm.ok += o.ok;
            warm.errors += o.errors;
        }
    }
    let warm_total = next.load(Ordering::Relaxed);

    // Measured: a fixed count signed up front, or a duration signed on the fly.
    let queue: Option<Arc<Vec<std::sync::Mutex<Option<Prepared>>>>> = match args.duration {
        Some(_) => None,
        None => Some(Arc::new(
            (0..args.requests).map(|k| std::sync::Mutex::new(Some(gen.prepare(warm_total + k)))).collect(),
        )),
    };
    let taken = Arc::new(AtomicU64::new(0));
    let samples_before: Vec<_> = watches.iter().map(|(_, w)| w.sample()).collect();
    let self_before = cpu_ticks(std::process::id()).unwrap_or(0);
    let host_before = host_busy_ticks().unwrap_or(0);
    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, gen, next, target, queue, taken) =
                (client.clone(), gen.clone(), next.clone(), target.clone(), queue.clone(), taken.clone());
            tokio::spawn(async move {
                let mut out = Outcome::default();
                loop {
                    let p = match (&queue, deadline) {
                        (Some(q), _) => {
                            let k = taken.fetch_add(1, Ordering::Relaxed) as usize;
                            match q.get(k) {
                                Some(slot) => {
                                    slot.lock().map(|mut s| s.take()).ok().flatten().expect("each slot is taken once")
                                }
                                None => break,
                            }
                        }
                        (None, Some(d)) => {
                            if Instant::now() >= d {
                                break;
                            }
                            gen.prepare(next.fetch_add(1, Ordering::Relaxed))
                        }
                        (None, None) => unreachable!("either --requests or --duration"),
                    };
                    send(&client, &target, p, &mut out, true).await;
                }
                out
            })
        })
        .collect();
    let mut all = Outcome::default();
    for t in tasks {
        match t.await {
            Ok(o) => {
                all.ok += o.ok;
                all.errors += o.errors;
                all.latencies_us.extend(o.latencies_us);
            }
            Err(e) => {
                eprintln!("a worker task failed: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let self_after = cpu_ticks(std::process::id()).unwrap_or(0);
    let host_after = host_busy_ticks().unwrap_or(0);
    let samples_after: Vec<_> = watches.iter().map(|(_, w)| w.sample()).collect();

    all.latencies_us.sort_unstable();
    let n = all.latencies_us.len() as u64;
    let max = all.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0;
    println!(
        "RESULT requests={n} errors={} seconds={seconds:.3} rps={:.1} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={max:.2} warmup_requests={} warmup_errors={} ok_total={}",
        all.errors,
        n as f64 / seconds,
        percentile(&all.latencies_us, 50.0),
        percentile(&all.latencies_us, 90.0),
        percentile(&all.latencies_us, 99.0),
        warm.ok + warm.errors,
        warm.errors,
        warm.ok + all.ok,
    );
    // Clock ticks are 100 per second on Linux (USER_HZ).
    let pct = |ticks: u64| ticks as f64 / 100.0 / seconds * 100.0;
    let mut cpu = format!("CPU window_s={seconds:.3} loadgen={:.0}%", pct(self_after.saturating_sub(self_before)));
    for (((label, _), b), a) in watches.iter().zip(&samples_before).zip(&samples_after) {
        cpu.push_str(&format!(" {label}={:.0}%", pct(used(b, a))));
    }
    cpu.push_str(&format!(
        " host={:.0}%/{}",
        pct(host_after.saturating_sub(host_before)),
        100 * std::thread::available_parallelism().map_or(1, |n| n.get())
    ));
    println!("{cpu}");
    if all.errors > 0 || warm.errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
