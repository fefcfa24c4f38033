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
use optout_relay::relay::{self, resync};
use optout_relay::sinks::redcap::RedcapSink;
use optout_relay::sinks::Sink;
use optout_relay::startup::{build_sinks, Application};
use optout_relay::store::Store;
use secrecy::ExposeSecret as _;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "optout-relay", version, about = "Relays Twilio opt-outs (STOP/START) to REDCap, durably")]
struct Cli {
    /// Config file (default: optout-relay.toml if present, else built-in defaults).
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
    /// Record an opt-out received another way (call, email, letter); it is relayed like a STOP.
    OptOut(StaffArgs),
    /// Record an opt-in received another way; it is relayed like a START.
    OptIn(StaffArgs),
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
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("configuration error:\n{e}");
            return ExitCode::from(2);
        }
    };
    optout_relay::telemetry::init(config.log.format);
    optout_relay::install_tls_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(config).await,
            Command::Migrate => migrate(config).await,
            Command::CheckConfig => check_config(config).await,
            Command::Replay { dead, sink } => replay(config, dead, sink).await,
            Command::Healthcheck => healthcheck(config).await,
            Command::Status { phone } => status(config, phone.as_deref()).await,
            Command::Retry { sink } => retry(config, &sink).await,
            Command::Resync { sink } => resync(config, &sink).await,
            Command::OptOut(args) => staff(config, args, EventKind::OptOut).await,
            Command::OptIn(args) => staff(config, args, EventKind::OptIn).await,
            Command::SendTest { keyword, phone, url, to, messaging_service_sid } => {
                send_test(config, keyword, &phone, url.as_deref(), &to, messaging_service_sid.as_deref()).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "failed");
            ExitCode::FAILURE
        }
    }
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

async fn check_config(config: Config) -> anyhow::Result<ExitCode> {
    let mut problems = config.problems();
    let mut lines = Vec::new();
    // Only a config that is valid by itself is worth testing against REDCap.
    if problems.is_empty() {
        if let Some(region) = config.keywords.region() {
            for (name, cfg) in config.sinks() {
                let SinkConfig::Redcap(cfg) = cfg else { continue };
                match RedcapSink::new(&cfg, region) {
                    Ok(sink) => {
                        for mut line in sink.named(&name).check().await {
                            line.message = format!("{name}: {}", line.message);
                            if !line.ok {
                                problems.push(line.message.clone());
                            }
                            lines.push(line);
                        }
                    }
                    Err(e) => problems.push(format!("{name}: {e}")),
                }
            }
        }
    }
    for line in &lines {
        println!("{} {}", if line.ok { "ok  " } else { "FAIL" }, line.message);
    }
    if problems.is_empty() {
        release_sinks(&config).await;
        println!("configuration OK");
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} problem(s):", problems.len());
    for p in &problems {
        println!("  - {p}");
    }
    Ok(ExitCode::from(1))
}

/// A configuration that passes its checks (a token fixed, say) makes every
/// sink due at once for a running `serve`, instead of waiting out a backoff.
/// Best effort: `check-config` also runs where no database is reachable.
async fn release_sinks(config: &Config) {
    // Never create an SQLite file just to say nothing is waiting in it.
    let url = config.database.url.expose_secret();
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.trim_start_matches("//").split('?').next().unwrap_or_default();
        if path.is_empty() || path == ":memory:" || !std::path::Path::new(path).exists() {
            return;
        }
    }
    let Ok(store) = Store::connect_lazy(&config.database) else { return };
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
    let store = Store::connect_lazy(&config.database)?;
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
    let store = Store::connect_lazy(&config.database)?;
    // A fresh directory has no tables yet: the answer is "nothing", not an error.
    store.migrate().await?;
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
    let store = Store::connect_lazy(&config.database)?;
    store.migrate().await?;
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

async fn resync(config: Config, name: &str) -> anyhow::Result<ExitCode> {
    let sinks = sinks_of(&config)?;
    let sink =
        sinks.iter().find(|s| s.name == name).with_context(|| format!("no sink {name:?} in the configuration"))?;
    let store = Store::connect_lazy(&config.database)?;
    store.migrate().await?;
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
    let store = Store::connect_lazy(&config.database)?;
    store.migrate().await?;
    let event = ops::staff_event(phone, kind, args.scope, args.note, &args.source);
    let id = ops::record(&store, event, &relay::follows(&sinks_of(&config)?)).await?;
    store.close().await;
    println!("recorded {} as event {id}; a running `serve` relays it", kind.as_str());
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
