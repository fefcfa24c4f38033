//! The command line. Everything else lives in the library.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use optout_relay::config::{Config, SinkConfig};
use optout_relay::domain::{EventKind, Phone};
use optout_relay::ops;
use optout_relay::relay::resync;
use optout_relay::sinks::redcap::RedcapSink;
use optout_relay::sinks::Sink;
use optout_relay::startup::{build_sinks, Application};
use optout_relay::store::Store;
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;

/// Where the configuration and the database come from, for `--help`.
const AFTER_HELP: &str = "\
Configuration, later layers win:
  1. built-in defaults (config.example.toml documents every key)
  2. a TOML file: --config PATH, else the file OPTOUT_RELAY_CONFIG names,
     else optout-relay.toml in the working directory if present
  3. DATABASE_URL
  4. OPTOUT_RELAY__SECTION__KEY environment variables, one per key, e.g.
     OPTOUT_RELAY__SERVER__PUBLIC_URL, OPTOUT_RELAY__TWILIO__AUTH_TOKENS,
     OPTOUT_RELAY__REDCAP__TOKEN, OPTOUT_RELAY__SINKS__NAME__TOKEN
  RUST_LOG sets the log level (default info,sqlx=warn).

Database: by default the SQLite file optout-relay.db in the working directory,
created by serve or migrate (other commands only open it); set
OPTOUT_RELAY__DATABASE__URL=postgres://... for PostgreSQL.

First run: optout-relay check-config, then serve, then
optout-relay send-test STOP +14155550101 to see a signed webhook recorded.";

#[derive(Parser)]
#[command(
    name = "optout-relay",
    version,
    about = "Relays Twilio opt-outs (STOP/START) to REDCap, durably",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Config file (default: the file OPTOUT_RELAY_CONFIG names, else optout-relay.toml if present, else built-in defaults).
    #[arg(long, global = true, env = "OPTOUT_RELAY_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the webhook (and run the relay).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Validate the configuration and print every problem found (and check REDCap when configured).
    CheckConfig,
    /// Re-queue dead-lettered deliveries.
    Replay {
        /// Replay every dead delivery (the only mode for now).
        #[arg(long)]
        dead: bool,
        /// Only this sink (e.g. redcap).
        #[arg(long)]
        sink: Option<String>,
    },
    /// Probe /readyz at the configured listen address; exit 0 only on 200 (container HEALTHCHECK).
    Healthcheck,
    /// Without a phone: every sink's health and backlog. With one: is this
    /// number opted out, since when, and does each sink hold it? (JSON)
    Status {
        /// The phone number, in any format.
        phone: Option<String>,
    },
    /// End a sink's backoff now (after fixing its token, say); a running `serve` picks it up.
    Retry {
        /// The sink's name (e.g. redcap).
        sink: String,
    },
    /// Check every opted-out phone the sink follows against it now and stamp
    /// records whose field is blank or differs (never clears).
    Resync {
        /// The sink's name (a REDCap sink).
        sink: String,
    },
    /// Import the phone -> vanId mapping every everyaction sink uses (CSV with the
    /// columns phone, vanid and optionally committeeid; any phone format).
    ///
    /// Idempotent: rows already known are left alone. A phone already on the
    /// opt-out list that gains a vanId is sent to VAN by a running `serve`.
    ImportVanIds {
        /// The CSV file, e.g. the Parsons opt-out script's table.
        file: PathBuf,
    },
    /// Record an opt-out received another way (call, email, letter); it is relayed like a STOP.
    OptOut(StaffArgs),
    /// Record an opt-in received another way; it is relayed like a START.
    OptIn(StaffArgs),
    /// Read Twilio's message log once (twilio.account_sid, with twilio.api_key_sid/api_key_secret
    /// or the first of twilio.auth_tokens) and record every opt-out, opt-in and help message no
    /// endpoint delivered, said at the message's date_sent; prints a summary (JSON). A running
    /// `serve` relays what it records.
    Backfill {
        /// First GMT day to read (messages sent on or after it), YYYY-MM-DD.
        #[arg(long, value_parser = parse_day)]
        since: chrono::NaiveDate,
        /// Last GMT day to read (messages sent on or before it), YYYY-MM-DD; default: up to now.
        #[arg(long, value_parser = parse_day)]
        until: Option<chrono::NaiveDate>,
    },
    /// Import an opt-out list (CSV with a phone column; optional time, kind/status,
    /// scope and note columns). Each row is recorded and relayed like a STOP
    /// (or START); a row older than what is known is kept as history only.
    /// Importing the same file again records nothing. Exit 0 once the file
    /// was read, even with invalid lines (listed with their line numbers).
    Import {
        /// The CSV file.
        file: std::path::PathBuf,
        /// Scope of rows without one (a Messaging Service SID); default: the whole organisation.
        #[arg(long)]
        scope: Option<String>,
        /// Where the list came from, kept as `import:NAME`; default: the file's name.
        #[arg(long)]
        source: Option<String>,
        /// Kind of rows without a kind/status column.
        #[arg(long, value_enum, default_value = "opt_out")]
        kind: optout_relay::lists::import::ImportKind,
        /// Read and check the whole file, record nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print the phones currently opted out (phone, scope, since, source), streamed.
    Export {
        /// Only this scope (its own states and organisation-wide ones).
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, value_enum, default_value = "csv")]
        format: optout_relay::lists::export::Format,
    },
    /// Post a webhook signed as Twilio signs it (the first of twilio.auth_tokens, over
    /// server.public_url + /twilio/messages) to the running service and print its answer.
    ///
    /// A 200 through the public URL proves that the proxy, server.public_url and the
    /// token agree; a 403 means Twilio's webhooks would be refused too. The event is
    /// real: STOP records an opt-out of PHONE that is relayed to every sink (send START
    /// to take it back).
    SendTest {
        /// STOP, START or HELP, reported as Advanced Opt-Out reports it (OptOutType).
        keyword: ops::TestKeyword,
        /// The number the message comes from, in any format.
        phone: String,
        /// Sign for and post to this URL instead, e.g. http://127.0.0.1:8080/twilio/messages
        /// (the service accepts it only if it is the URL its public_url names).
        #[arg(long)]
        url: Option<String>,
        /// The number texted (the event's scope when no Messaging Service is named).
        #[arg(long, default_value = ops::TEST_TO)]
        to: String,
        /// The Messaging Service SID (MG…) the message came through.
        #[arg(long)]
        messaging_service_sid: Option<String>,
    },
}

#[derive(clap::Args)]
struct StaffArgs {
    /// The phone number, in any format.
    phone: String,
    /// Scope (a Messaging Service SID); default: the whole organisation.
    #[arg(long)]
    scope: Option<String>,
    /// Free text kept with the event.
    #[arg(long)]
    note: Option<String>,
    /// Who recorded it.
    #[arg(long, default_value = "cli")]
    source: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let loaded = Config::load_all(cli.config.as_deref());
    if let Command::CheckConfig = cli.command {
        // check-config reports a configuration that does not read too, with everything else it finds.
        let format = loaded.as_ref().map_or_else(|u| u.mended.as_ref().map(|c| c.log.format), |c| Some(c.log.format));
        optout_relay::telemetry::init(format.unwrap_or_default());
        optout_relay::install_tls_provider();
        return match runtime() {
            Ok(rt) => rt.block_on(check_config(loaded)),
            Err(code) => code,
        };
    }
    let config = match loaded {
        Ok(c) => c,
        Err(unreadable) => {
            eprintln!("configuration error (`optout-relay check-config` lists every problem):");
            for problem in &unreadable.problems {
                eprintln!("  - {problem}");
            }
            return ExitCode::from(2);
        }
    };
    optout_relay::telemetry::init(config.log.format);
    optout_relay::install_tls_provider();
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::CheckConfig => unreachable!("handled above"),
            Command::Replay { dead, sink } => replay(config, dead, sink).await,
            Command::Healthcheck => healthcheck(config).await,
            Command::Status { phone } => status(config, phone.as_deref()).await,
            Command::Retry { sink } => retry(config, &sink).await,
            Command::Resync { sink } => resync(config, &sink).await,
            Command::ImportVanIds { file } => import_van_ids(config, &file).await,
            Command::OptOut(args) => staff(config, args, EventKind::OptOut).await,
            Command::OptIn(args) => staff(config, args, EventKind::OptIn).await,
            Command::Backfill { since, until } => backfill(config, since, until).await,
            Command::Import { file, scope, source, kind, dry_run } => {
                import_list(config, &file, scope, source, kind, dry_run).await
            }
            Command::Export { scope, format } => export_list(config, scope, format).await,
            Command::SendTest { keyword, phone, url, to, messaging_service_sid } => {
                send_test(config, keyword, &phone, url.as_deref(), &to, messaging_service_sid.as_deref()).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // A message for the person at the terminal, not a log line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        ExitCode::FAILURE
    })
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let app = Application::build(config).await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_handler(shutdown.clone()));
    app.run_until(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn migrate(config: Config) -> anyhow::Result<ExitCode> {
    let store = Store::connect_lazy(&config.database)?;
    store.migrate().await?;
    tracing::info!(backend = store.backend(), "migrations applied");
    store.close().await;
    Ok(ExitCode::SUCCESS)
}

/// What check-config found, printed once each: `ok` lines and `FAIL` lines.
#[derive(Default)]
struct Findings {
    lines: Vec<(&'static str, String)>,
}

impl Findings {
    fn ok(&mut self, message: String) {
        self.lines.push(("ok  ", message));
    }
    fn fail(&mut self, message: String) {
        self.lines.push(("FAIL", message));
    }
    fn skip(&mut self, message: String) {
        self.lines.push(("skip", message));
    }
    fn failures(&self) -> usize {
        self.lines.iter().filter(|(tag, _)| *tag == "FAIL").count()
    }
}

/// Every problem in one run: the file and environment as read (every
/// unknown key, every missing value), the configuration's own checks, what
/// the service needs to work for Twilio (a credential, a real public URL),
/// the database, and each REDCap project. Exit 0 only when nothing failed.
async fn check_config(loaded: Result<Config, optout_relay::config::Unreadable>) -> ExitCode {
    let mut found = Findings::default();
    let (config, mended_keys) = match loaded {
        Ok(config) => (Some(config), Vec::new()),
        Err(u) => {
            for p in u.problems {
                found.fail(p);
            }
            (u.mended.map(|c| *c), u.keys)
        }
    };
    let readable = mended_keys.is_empty() && found.failures() == 0;
    let Some(config) = config else { return report(&found, None).await };
    // A key already reported as unreadable is not reported again as empty.
    let fresh = |p: &String| !mended_keys.iter().any(|k| p.starts_with(k.as_str()));
    let problems = config.problems();
    let valid = problems.is_empty();
    for p in problems.into_iter().chain(config.first_run_problems()).filter(fresh) {
        found.fail(p);
    }
    if readable {
        check_database(&config, &mut found).await;
        // Only a configuration valid by itself is worth testing against REDCap.
        if valid {
            check_redcap(&config, &mut found).await;
            check_van(&config, &mut found).await;
        }
    } else {
        found.skip("database and REDCap not checked: fix the problems above first".to_owned());
    }
    report(&found, Some(&config)).await
}

async fn report(found: &Findings, config: Option<&Config>) -> ExitCode {
    for (tag, message) in &found.lines {
        println!("{tag} {message}");
    }
    match (found.failures(), config) {
        (0, Some(config)) => {
            release_sinks(config).await;
            println!("configuration OK");
            ExitCode::SUCCESS
        }
        (n, _) => {
            println!("{n} problem(s)");
            ExitCode::from(1)
        }
    }
}

/// Reachable, and with this version's schema or one `serve` will migrate to.
/// A SQLite file that does not exist yet is fine where `serve` can create it.
async fn check_database(config: &Config, found: &mut Findings) {
    let db = &config.database;
    match optout_relay::store::sqlite_file(db) {
        Err(e) => return found.fail(format!("database: {e}")),
        Ok(Some(path)) if !path.exists() => {
            let shown = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
            let dir = shown.parent().map(std::path::Path::to_path_buf).unwrap_or_default();
            return if dir.is_dir() {
                found.ok(format!("database: SQLite file {} does not exist yet; serve creates it", shown.display()))
            } else {
                found.fail(format!(
                    "database: the directory of the SQLite file {} does not exist (database.url, OPTOUT_RELAY__DATABASE__URL)",
                    shown.display()
                ))
            };
        }
        Ok(_) => {}
    }
    let store = match Store::connect_lazy(db) {
        Ok(store) => store,
        Err(e) => return found.fail(format!("database: {e}")),
    };
    match store.ping().await {
        Err(e) => found.fail(format!(
            "database ({}): {e}; check database.url (OPTOUT_RELAY__DATABASE__URL or DATABASE_URL)",
            store.backend()
        )),
        Ok(()) if store.readiness().await.migrations => {
            found.ok(format!("database ({}): reachable, schema up to date", store.backend()))
        }
        Ok(()) if db.run_migrations_on_start => {
            found.ok(format!("database ({}): reachable; serve applies the migrations at start", store.backend()))
        }
        Ok(()) => found.fail(format!(
            "database ({}): reachable but not migrated and database.run_migrations_on_start is false: \
             run optout-relay migrate",
            store.backend()
        )),
    }
    store.close().await;
}

/// Asks VAN, for every everyaction sink, whether it takes the application
/// name and key (one read: `apiKeyProfiles`).
async fn check_van(config: &Config, found: &mut Findings) {
    for (name, cfg) in config.sinks() {
        let SinkConfig::Everyaction(cfg) = cfg else { continue };
        match optout_relay::sinks::everyaction::EveryActionSink::new(&cfg) {
            Ok(sink) => match sink.named(&name).probe().await {
                Ok(()) => found.ok(format!("{name}: VAN at {} accepts the application name and API key", cfg.url)),
                Err(e) => found.fail(format!("{name}: {e}")),
            },
            Err(e) => found.fail(format!("{name}: {e}")),
        }
    }
}

/// Asks every REDCap project: token, fields, events, the field's validation.
async fn check_redcap(config: &Config, found: &mut Findings) {
    let Some(region) = config.keywords.region() else { return };
    for (name, cfg) in config.sinks() {
        let SinkConfig::Redcap(cfg) = cfg else { continue };
        match RedcapSink::new(&cfg, region) {
            Ok(sink) => {
                for line in sink.named(&name).check().await {
                    let message = format!("{name}: {}", line.message);
                    if line.ok {
                        found.ok(message);
                    } else {
                        found.fail(message);
                    }
                }
            }
            Err(e) => found.fail(format!("{name}: {e}")),
        }
    }
}

/// A configuration that passes its checks (a token fixed, say) makes every
/// sink due at once for a running `serve`, instead of waiting out a backoff.
/// Best effort, and only in a database that exists.
async fn release_sinks(config: &Config) {
    let Ok(store) = Store::open_existing(&config.database).await else { return };
    for (name, _) in config.sinks() {
        if let Ok(true) = store.release_sink(&name).await {
            println!("ok   {name}: due now for a running serve");
        }
    }
    store.close().await;
}

async fn replay(config: Config, dead: bool, sink: Option<String>) -> anyhow::Result<ExitCode> {
    if !dead {
        eprintln!("nothing to do: pass --dead to re-queue dead-lettered deliveries");
        return Ok(ExitCode::from(2));
    }
    let store = Store::open_existing(&config.database).await?;
    let n = store.replay_dead(sink.as_deref()).await?;
    store.close().await;
    println!("re-queued {n} dead deliveries");
    Ok(ExitCode::SUCCESS)
}

fn phone_arg(config: &Config, raw: &str) -> anyhow::Result<Phone> {
    let region = config.keywords.region().context("keywords.default_region")?;
    Phone::parse(raw, region).map_err(|_| anyhow::anyhow!("{raw:?} is not a phone number"))
}

/// The configured sinks, built as `serve` builds them (no call is made).
fn sinks_of(config: &Config) -> anyhow::Result<Vec<Arc<Sink>>> {
    let region = config.keywords.region().context("keywords.default_region")?;
    Ok(build_sinks(config, region)?)
}

async fn status(config: Config, raw: Option<&str>) -> anyhow::Result<ExitCode> {
    let sinks = sinks_of(&config)?;
    let store = Store::open_existing(&config.database).await?;
    let out = match raw {
        Some(raw) => {
            let phone = phone_arg(&config, raw)?;
            serde_json::to_string_pretty(&ops::phone_status(&store, &sinks, &phone).await?)?
        }
        None => serde_json::to_string_pretty(&ops::sinks_status(&store, &sinks).await?)?,
    };
    store.close().await;
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

async fn retry(config: Config, name: &str) -> anyhow::Result<ExitCode> {
    let sinks = sinks_of(&config)?;
    if !sinks.iter().any(|s| s.name == name) {
        anyhow::bail!("no sink {name:?} in the configuration");
    }
    let store = Store::open_existing(&config.database).await?;
    let known = store.release_sink(name).await?;
    store.close().await;
    if !known {
        anyhow::bail!("sink {name:?} has not run yet; `serve` makes it due when it starts");
    }
    println!(
        "sink {name} is due now; a running `serve` probes it within {}",
        humantime::format_duration(config.relay.poll_interval * 4)
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads the mapping file, prints what it read and skipped and why, stores
/// the new rows, and says which VAN deliveries that queued.
async fn import_van_ids(config: Config, file: &std::path::Path) -> anyhow::Result<ExitCode> {
    let region = config.keywords.region().context("keywords.default_region is not a region")?;
    let input = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let read = optout_relay::van_mapping::read(std::io::BufReader::new(input), region)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let sinks: Vec<optout_relay::store::VanSinkScope> = config
        .sinks()
        .into_iter()
        .filter_map(|(sink, c)| match c {
            SinkConfig::Everyaction(c) => {
                Some(optout_relay::store::VanSinkScope { sink, committee_id: c.committee_id })
            }
            _ => None,
        })
        .collect();
    println!(
        "{}: {} line(s) read, {} usable row(s), {} repeated in the file, {} skipped",
        file.display(),
        read.lines,
        read.rows.len(),
        read.repeated,
        read.skipped.len()
    );
    for (line, why) in &read.skipped {
        println!("  skipped line {line}: {why}");
    }
    let store = Store::open_existing(&config.database).await?;
    let report = store.import_van_ids(&read.rows, &sinks).await;
    let total = store.van_id_count().await;
    store.close().await;
    let report = report?;
    println!("{} new mapping row(s) stored, {} already known; {} row(s) in all", report.added, report.known, total?);
    if sinks.is_empty() {
        println!("no everyaction sink is configured: nothing is sent to VAN until one is");
    } else {
        let names: Vec<&str> = sinks.iter().map(|s| s.sink.as_str()).collect();
        println!(
            "{} phone(s) on the opt-out list queued for {} (a running `serve` sends them)",
            report.requeued,
            names.join(", ")
        );
    }
    Ok(if read.skipped.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

async fn resync(config: Config, name: &str) -> anyhow::Result<ExitCode> {
    let sinks = sinks_of(&config)?;
    let sink =
        sinks.iter().find(|s| s.name == name).with_context(|| format!("no sink {name:?} in the configuration"))?;
    let store = Store::open_existing(&config.database).await?;
    let late = chrono::Utc::now()
        + chrono::Duration::from_std(config.relay.recheck_late).unwrap_or(chrono::Duration::minutes(10));
    let report = resync::run(&store, sink, late).await;
    store.close().await;
    println!("{}", serde_json::to_string_pretty(&report?)?);
    Ok(ExitCode::SUCCESS)
}

async fn staff(config: Config, args: StaffArgs, kind: EventKind) -> anyhow::Result<ExitCode> {
    if args.source.trim().is_empty() {
        anyhow::bail!("--source must name who recorded this");
    }
    let phone = phone_arg(&config, &args.phone)?;
    let store = Store::open_existing(&config.database).await?;
    let event = ops::staff_event(phone, kind, args.scope, args.note, &args.source);
    let id = ops::record(&store, event).await?;
    store.close().await;
    println!("recorded {} as event {id}; a running `serve` relays it", kind.as_str());
    Ok(ExitCode::SUCCESS)
}

fn parse_day(s: &str) -> Result<chrono::NaiveDate, String> {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| format!("{s:?} is not a date as YYYY-MM-DD"))
}

async fn backfill(
    config: Config,
    since: chrono::NaiveDate,
    until: Option<chrono::NaiveDate>,
) -> anyhow::Result<ExitCode> {
    use optout_relay::reconcile::{listings, Reconciler};
    if until.is_some_and(|u| u < since) {
        anyhow::bail!("--until {} is before --since {since}", until.unwrap_or(since));
    }
    let region = config.keywords.region().context("keywords.default_region")?;
    let client = optout_relay::twilio::messages::MessagesClient::from_config(&config.twilio)?;
    let store = Store::open_existing(&config.database).await?;
    let keywords = optout_relay::twilio::keywords::Keywords::new(&config.keywords);
    let reconciler = Reconciler::new(client, store.clone(), keywords, region, config.log.mask_phones, None);
    let run = reconciler.run(&listings(&config.reconcile.to, since, until)).await;
    store.close().await;
    let summary = run?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    println!(
        "{} opt-out(s), {} opt-in(s) and {} help message(s) no endpoint had delivered are recorded now; \
         {} were recorded already; a running `serve` relays the changes",
        summary.missed_opt_outs, summary.missed_opt_ins, summary.missed_help, summary.already_recorded
    );
    Ok(ExitCode::SUCCESS)
}

/// `import FILE`: the report as text; exit 0 once the file was read.
async fn import_list(
    config: Config,
    file: &std::path::Path,
    scope: Option<String>,
    source: Option<String>,
    kind: optout_relay::lists::import::ImportKind,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    use optout_relay::lists::import::{import, ImportOptions};
    let region = config.keywords.region().context("keywords.default_region is not a region")?;
    let input = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let source =
        source.unwrap_or_else(|| file.file_name().map_or_else(|| "cli".into(), |n| n.to_string_lossy().into()));
    let opts = ImportOptions { scope, source, kind: kind.into(), dry_run, region };
    let store = Store::open_existing(&config.database).await?;
    let report = import(&store, input, &opts, || {}).await;
    store.close().await;
    let report = report?;
    print!("{}", report.to_text());
    if report.recorded > 0 && !dry_run {
        println!("a running `serve` relays what was recorded");
    }
    Ok(ExitCode::SUCCESS)
}

/// `export`: the suppression list on stdout.
async fn export_list(
    config: Config,
    scope: Option<String>,
    format: optout_relay::lists::export::Format,
) -> anyhow::Result<ExitCode> {
    let store = Store::open_existing(&config.database).await?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = optout_relay::lists::export::write_to(store.clone(), scope, format, &mut out).await;
    store.close().await;
    written?;
    Ok(ExitCode::SUCCESS)
}

async fn send_test(
    config: Config,
    keyword: ops::TestKeyword,
    phone: &str,
    url: Option<&str>,
    to: &str,
    messaging_service_sid: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let phone = phone_arg(&config, phone)?;
    let Some(token) = config.twilio.auth_tokens.first() else {
        anyhow::bail!("no Twilio Auth Token to sign with: set OPTOUT_RELAY__TWILIO__AUTH_TOKENS (twilio.auth_tokens)");
    };
    let url = ops::webhook_url(&config, url);
    let form = ops::test_webhook(keyword, &phone, to, messaging_service_sid);
    let signature = optout_relay::twilio::signature::compute(token.expose_secret(), &url, &form);
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish();
    let sid = form.iter().find(|(k, _)| k == "MessageSid").map_or("", |(_, v)| v.as_str());
    println!("POST {url}");
    println!(
        "  {} from {} to {to}, MessageSid {sid}, signed with the first of twilio.auth_tokens",
        keyword.as_str(),
        phone
    );
    // Twilio waits 15 s for an answer; so does this.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build()?;
    let res = client
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .body(body)
        .send()
        .await;
    let res = match res {
        Ok(res) => res,
        Err(e) => {
            println!("no answer: {e:#}");
            println!("Is `optout-relay serve` running, and does {url} reach it?");
            return Ok(ExitCode::FAILURE);
        }
    };
    let status = res.status();
    let text = res.text().await.unwrap_or_default();
    println!("{status}");
    if !text.is_empty() {
        println!("{text}");
    }
    let hint = match status.as_u16() {
        200 if keyword == ops::TestKeyword::Help => "recorded (HELP changes nothing downstream)".to_owned(),
        200 => format!("recorded: `optout-relay status {}` shows it and what each sink should hold", phone.as_str()),
        403 => "refused as Twilio's own webhooks would be: the service checks the signature against \
                its server.public_url (and alternate_public_urls) + the path it received. Check that \
                public_url is exactly the URL Twilio calls (scheme, host, port, path prefix), that the \
                proxy keeps the path and query, and that both sides use the same Auth Token; the \
                service's log names the URLs it tried"
            .to_owned(),
        404 => "nothing answers this path: is the proxy forwarding /twilio/messages to the service?".to_owned(),
        503 => "the service could not store the event (database unavailable?): see its log and /readyz".to_owned(),
        _ => "unexpected answer: see the service's log".to_owned(),
    };
    println!("{hint}");
    Ok(if status.is_success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn healthcheck(config: Config) -> anyhow::Result<ExitCode> {
    let mut addr = config.server.listen;
    // A wildcard listen address is reached through loopback.
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
    }
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
    match client.get(format!("http://{addr}/readyz")).send().await {
        Ok(res) if res.status().is_success() => Ok(ExitCode::SUCCESS),
        Ok(res) => {
            eprintln!("not ready: {} {}", res.status(), res.text().await.unwrap_or_default());
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            eprintln!("cannot reach http://{addr}/readyz: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// SIGTERM (container stop) or SIGINT (Ctrl-C) cancel the token.
async fn signal_handler(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown signal received");
    token.cancel();
}
