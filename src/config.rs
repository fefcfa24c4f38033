//! Typed configuration.
//!
//! Layers, later wins: built-in defaults → the TOML file → `DATABASE_URL` →
//! `OPTOUT_RELAY__SECTION__KEY` environment variables (secrets usually arrive
//! that way). Secrets are `SecretString`, so a `Debug` print of the whole
//! config cannot leak them. [`Config::problems`] checks the whole struct and
//! returns every problem, not just the first, for `check-config`.
//!
//! Sinks are named: `[sinks.NAME]` with `type = "redcap" | "email" | "everyaction" | "webhook"`
//! (the last two in `config/outbound.rs`), and the
//! older `[redcap]` / `[email]` tables are shorthand for sinks named `redcap`
//! / `email`. [`Config::sinks`] is the one resolved list everything else
//! reads. This module knows nothing of `crate::sinks` (the sinks import their
//! configuration from here, never the reverse).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

mod outbound;
pub use outbound::{webhook_key, EveryActionConfig, WebhookConfig, DEFAULT_VAN_URL};

/// The environment prefix; `__` separates section from key.
pub const ENV_PREFIX: &str = "OPTOUT_RELAY__";
/// Used when `--config` is not given and this file exists in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "optout-relay.toml";

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub database: DatabaseConfig,
    pub twilio: TwilioConfig,
    pub keywords: KeywordsConfig,
    /// Shorthand for `[sinks.redcap]` with `type = "redcap"`.
    pub redcap: Option<RedcapConfig>,
    /// Shorthand for `[sinks.email]` with `type = "email"`.
    pub email: Option<EmailConfig>,
    /// Named sinks, `[sinks.NAME]`. Several REDCap projects are several sinks.
    pub sinks: BTreeMap<String, SinkConfig>,
    pub relay: RelayConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    pub reconcile: ReconcileConfig,
    pub lists: ListsConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer tokens for `/v1/…`. None configured: the admin API is disabled (404).
    #[serde(deserialize_with = "secret_list")]
    pub tokens: Vec<SecretString>,
}

/// Opt-out lists (`POST /v1/imports`): the import body is streamed, not
/// held, so its limit is far above `server.max_body_bytes`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListsConfig {
    /// Largest CSV body `POST /v1/imports` takes (413 above).
    pub max_import_bytes: usize,
    /// How long an import's body may take to arrive (408 after).
    #[serde(with = "humantime_serde")]
    pub import_timeout: Duration,
}

impl Default for ListsConfig {
    fn default() -> Self {
        // A six-figure list of a spreadsheet's columns is tens of MB.
        ListsConfig { max_import_bytes: 256 * 1024 * 1024, import_timeout: Duration::from_secs(600) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EmailTls {
    /// Plain SMTP (a relay on the same host or network only).
    None,
    /// SMTP then STARTTLS, required (port 587).
    #[default]
    Starttls,
    /// Implicit TLS (port 465).
    Tls,
}

/// One sink's configuration: `[sinks.NAME]` with `type = "redcap"` or
/// `type = "email"` and that type's keys. An unknown key is an error naming
/// it: the inner structs deny unknown fields, and serde hands them the table
/// without the `type` tag.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Redcap(RedcapConfig),
    Email(EmailConfig),
    /// EveryAction / NGP VAN, one committee (`src/config/outbound.rs`).
    Everyaction(EveryActionConfig),
    /// A Standard Webhooks endpoint (`src/config/outbound.rs`).
    Webhook(WebhookConfig),
}

impl SinkConfig {
    /// The scopes this sink follows; `None`: every scope.
    pub fn scopes(&self) -> Option<&[String]> {
        match self {
            SinkConfig::Redcap(c) => c.scopes.as_deref(),
            SinkConfig::Email(c) => c.scopes.as_deref(),
            SinkConfig::Everyaction(c) => c.scopes.as_deref(),
            SinkConfig::Webhook(c) => c.scopes.as_deref(),
        }
    }

    /// The `type` as written in the configuration, for logs and the admin API.
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Redcap(_) => "redcap",
            SinkConfig::Email(_) => "email",
            SinkConfig::Everyaction(_) => "everyaction",
            SinkConfig::Webhook(_) => "webhook",
        }
    }
}

/// The notification email (the REDCap module's "Notification Email"), and
/// the alerts about failing sinks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    pub smtp_host: String,
    /// Default: 25 (none), 587 (starttls), 465 (tls).
    #[serde(default)]
    pub smtp_port: Option<u16>,
    #[serde(default)]
    pub tls: EmailTls,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretString>,
    pub from: String,
    /// One address or a list.
    #[serde(deserialize_with = "string_list")]
    pub to: Vec<String>,
    /// Zone the times in the message are written in (default UTC).
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default = "default_smtp_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// A PEM file of extra root certificates trusted for the server's TLS
    /// certificate, on top of the built-in ones: for a relay whose
    /// certificate comes from the organisation's private CA.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Only changes in these scopes are notified (MessagingServiceSids
    /// `MG…` or To numbers `+1…`); unset: every scope.
    #[serde(default, deserialize_with = "scope_list")]
    pub scopes: Option<Vec<String>>,
    /// An alert is mailed once a sink has been failing longer than this, so
    /// an outage is heard of while there is time to act, not when opt-outs
    /// are dead-lettered days later.
    #[serde(default = "default_alert_after", with = "humantime_serde")]
    pub alert_after: Duration,
    /// How long a notification waits for the other sinks' outcome (which
    /// records REDCap updated) before it is sent with those still pending:
    /// a sink in backoff must not hold the news back indefinitely.
    #[serde(default = "default_report_wait", with = "humantime_serde")]
    pub report_wait: Duration,
}

fn default_smtp_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_alert_after() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_report_wait() -> Duration {
    Duration::from_secs(10 * 60)
}

impl EmailConfig {
    /// The required keys; every other key takes its default.
    pub fn new(smtp_host: impl Into<String>, from: impl Into<String>, to: Vec<String>) -> Self {
        Self {
            smtp_host: smtp_host.into(),
            smtp_port: None,
            tls: EmailTls::default(),
            username: None,
            password: None,
            from: from.into(),
            to,
            timezone: default_timezone(),
            timeout: default_smtp_timeout(),
            ca_file: None,
            scopes: None,
            alert_after: default_alert_after(),
            report_wait: default_report_wait(),
        }
    }

    /// The PEM text of `ca_file` (None when unset), checked to hold at least
    /// one certificate; the error names the setting and the file.
    pub fn extra_roots(&self) -> Result<Option<Vec<u8>>, String> {
        self.extra_roots_at("email")
    }

    /// As [`Self::extra_roots`], the error naming the key under `section`
    /// (`email` or `sinks.NAME`).
    fn extra_roots_at(&self, section: &str) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.ca_file else { return Ok(None) };
        use rustls::pki_types::pem::PemObject as _;
        let pem = std::fs::read(path).map_err(|e| format!("{section}.ca_file {}: {e}", path.display()))?;
        // Parsed the way the TLS client will parse it, so what passes here loads there.
        let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{section}.ca_file {}: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("{section}.ca_file {} holds no PEM certificate", path.display()));
        }
        Ok(Some(pem))
    }

    pub fn port(&self) -> u16 {
        self.smtp_port.unwrap_or(match self.tls {
            EmailTls::None => 25,
            EmailTls::Starttls => 587,
            EmailTls::Tls => 465,
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Base URL Twilio calls, e.g. `https://optout.example.org`. Signatures are
    /// computed over it, because behind a proxy the server cannot see it.
    pub public_url: Option<String>,
    /// Other base URLs Twilio may sign over (a Fallback URL on another host).
    pub alternate_public_urls: Vec<String>,
    pub max_body_bytes: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a client has to send a request's headers, from the moment the
    /// connection is opened or its first byte of the request arrives.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// How long a client has to send a request's whole body once its headers arrived.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// How long a keep-alive connection may sit between requests.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            alternate_public_urls: Vec::new(),
            max_body_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(10),
            // Twilio sends a webhook in one go and waits 15 s for the answer:
            // a client slower than this is not Twilio.
            header_read_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            // Longer than the 60 s idle timeout of common proxies and load
            // balancers, so the proxy closes first and never reuses a
            // connection this side has just closed.
            idle_timeout: Duration::from_secs(75),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// May carry a password, hence secret.
    pub url: SecretString,
    pub max_connections: u32,
    pub run_migrations_on_start: bool,
    /// How long a request waits for a connection before answering 503.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: SecretString::from("sqlite://optout-relay.db?mode=rwc"),
            max_connections: 10,
            run_migrations_on_start: true,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwilioConfig {
    /// Primary and secondary Auth Tokens, so one can be rotated without downtime.
    #[serde(deserialize_with = "secret_list")]
    pub auth_tokens: Vec<SecretString>,
    pub validate_signatures: bool,
    /// SharedKey id → secret, for `X-Twilio-Webhooks-Signature-Settings` (HMAC-SHA256).
    pub shared_keys: BTreeMap<String, SecretString>,
    /// The account whose message log reconciliation and `backfill` read (AC…).
    pub account_sid: Option<String>,
    /// Twilio's REST API; tests point it at a fake.
    pub api_base: String,
    /// An API key (SK…) and its secret for the REST API, instead of the
    /// account SID and the first of `auth_tokens`.
    pub api_key_sid: Option<String>,
    pub api_key_secret: Option<SecretString>,
}

/// Twilio's REST API, unless `[twilio] api_base` says otherwise.
pub const TWILIO_API_BASE: &str = "https://api.twilio.com";

impl Default for TwilioConfig {
    fn default() -> Self {
        Self {
            auth_tokens: Vec::new(),
            validate_signatures: true,
            shared_keys: BTreeMap::new(),
            account_sid: None,
            api_base: TWILIO_API_BASE.to_owned(),
            api_key_sid: None,
            api_key_secret: None,
        }
    }
}

/// `[reconcile]`: reading Twilio's message log for what no endpoint delivered.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// How often to read the log; absent: never (`backfill` still works).
    #[serde(with = "humantime_serde")]
    pub interval: Option<Duration>,
    /// How far back each run looks (from the start of that GMT day).
    #[serde(with = "humantime_serde")]
    pub lookback: Duration,
    /// List per number texted (`To`) instead of the whole account: cheaper
    /// on an account that sends much more than it receives.
    #[serde(deserialize_with = "number_list")]
    pub to: Vec<String>,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self { interval: None, lookback: Duration::from_secs(2 * 86_400), to: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeywordsConfig {
    pub opt_out: Vec<String>,
    pub opt_in: Vec<String>,
    pub help: Vec<String>,
    /// ISO 3166 region used to read numbers typed without a country code.
    pub default_region: String,
    /// Words and phrases that make a message that is no whole-message
    /// keyword a possible revocation ("please stop texting me"), matched as
    /// whole words, case-insensitively.
    pub review: Vec<String>,
    pub review_policy: ReviewPolicy,
}

/// What a message that matches `[keywords] review` becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReviewPolicy {
    /// A review item for staff (`GET /v1/reviews`), not relayed until decided.
    #[default]
    Review,
    /// An opt-out at once, relayed like a STOP.
    OptOut,
    /// Nothing, as before reviews existed.
    Ignore,
}

impl KeywordsConfig {
    /// `default_region` as a libphonenumber region (`None` if it is not one;
    /// `Config::problems` reports that, so past validation it is always `Some`).
    pub fn region(&self) -> Option<phonenumber::country::Id> {
        crate::domain::parse_region(&self.default_region)
    }
}

impl Default for KeywordsConfig {
    fn default() -> Self {
        let list = |words: &[&str]| words.iter().map(|w| (*w).to_owned()).collect();
        Self {
            // Twilio's defaults, the 2025 additions (REVOKE, OPTOUT) and the FCC's
            // "opt out" with a space, which Twilio does not treat as a keyword.
            opt_out: list(&["STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT", "OPT OUT"]),
            opt_in: list(&["START", "YES", "UNSTOP"]),
            help: list(&["HELP", "INFO"]),
            default_region: "US".to_owned(),
            // The FCC's words, then common ways of saying it in a sentence.
            review: list(&[
                "stop",
                "quit",
                "end",
                "revoke",
                "opt out",
                "optout",
                "cancel",
                "unsubscribe",
                "stop texting",
                "stop messaging",
                "remove me",
                "take me off",
                "don't text",
                "do not text",
                "don't contact",
                "do not contact",
                "no more texts",
                "leave me alone",
            ]),
            review_policy: ReviewPolicy::Review,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TimestampFormat {
    /// Chosen from the field's validation in the project's metadata.
    #[default]
    Auto,
    /// `YYYY-MM-DD HH:MM`
    Minutes,
    /// `YYYY-MM-DD HH:MM:SS`
    Seconds,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedcapConfig {
    /// The API endpoint, e.g. `https://redcap.example.edu/api/`.
    pub url: String,
    /// Missing is allowed here so that `check-config` can say which
    /// environment variable to set, instead of a parse error.
    #[serde(default = "empty_secret")]
    pub token: SecretString,
    pub phone_field: String,
    #[serde(default)]
    pub phone_event: Option<String>,
    pub optout_field: String,
    #[serde(default)]
    pub optout_event: Option<String>,
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    #[serde(default = "default_redcap_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// REDCap bans an IP for good past its per-IP limit (600/min by default).
    #[serde(default = "default_calls_per_minute")]
    pub max_calls_per_minute: u32,
    /// This sink follows only events of these scopes (MessagingServiceSids
    /// `MG…` or To numbers `+1…`): one project per study line. Unset: every
    /// scope. Organisation-wide events (recorded by staff) count in all.
    #[serde(default, deserialize_with = "scope_list")]
    pub scopes: Option<Vec<String>>,
    /// How often the whole project is exported and every record whose phone
    /// is opted out but whose field is blank or differs is stamped: records
    /// enrolled after the STOP, and writes lost in flight, are repaired this
    /// way. "0s" turns it off.
    #[serde(default = "default_resync_interval", with = "humantime_serde")]
    pub resync_interval: Duration,
}

fn default_timezone() -> String {
    "UTC".to_owned()
}
fn default_redcap_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_calls_per_minute() -> u32 {
    300
}
fn default_resync_interval() -> Duration {
    Duration::from_secs(3600)
}

impl RedcapConfig {
    /// The required keys; every other key takes its default.
    pub fn new(
        url: impl Into<String>,
        token: SecretString,
        phone_field: impl Into<String>,
        optout_field: impl Into<String>,
    ) -> Self {
        Self {
            url: url.into(),
            token,
            phone_field: phone_field.into(),
            phone_event: None,
            optout_field: optout_field.into(),
            optout_event: None,
            timezone: default_timezone(),
            timestamp_format: TimestampFormat::default(),
            request_timeout: default_redcap_timeout(),
            max_calls_per_minute: default_calls_per_minute(),
            scopes: None,
            resync_interval: default_resync_interval(),
        }
    }

    /// The longest a batch may take against this project: at most three
    /// calls, each up to `request_timeout` and each after a wait for the rate
    /// limiter. A lease must outlast it, or another worker could take the
    /// batch over while this one is still writing. `None` when
    /// `max_calls_per_minute` is 0 (a problem of its own).
    pub fn batch_worst_case(&self) -> Option<Duration> {
        let limiter_wait = Duration::from_secs(60).checked_div(self.max_calls_per_minute)?;
        Some(self.request_timeout.saturating_mul(3).saturating_add(limiter_wait.saturating_mul(3)))
    }
}

/// How the relay converges sinks. Backoff is per sink, not per delivery: a
/// failing sink gets one probe per step, and when a probe succeeds
/// everything waiting for it is sent at once in full batches.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Workers per sink; several replicas on one PostgreSQL cooperate safely.
    pub workers: usize,
    /// Deliveries one worker claims and sends to a sink in one go: one
    /// export and one import for REDCap, however many phones.
    pub batch_size: u32,
    /// How often an idle worker looks for due deliveries; new webhooks wake
    /// it at once, so this only bounds the wait for timers (backoff, rechecks).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A claimed delivery whose worker vanished becomes due again after
    /// this. It must outlast a batch's worst case (see `problems`), or a
    /// slow worker's write could land after its successor's.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// First step of a failing sink's backoff (timeouts, connection errors,
    /// 5xx, 429); each step doubles, with jitter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    /// Longest backoff step. Kept low, so that the first probe after an
    /// outage comes soon and recovery does not take as long as the outage.
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
    /// Delay after an answer that means misconfiguration (bad token, unknown
    /// field): retrying sooner would not help and only adds calls. A restart
    /// that passes check-config, or a manual retry, releases it at once.
    #[serde(with = "humantime_serde")]
    pub misconfigured_retry: Duration,
    /// A change still not applied after this is dead-lettered (probes do not
    /// use up attempts, so age is the only limit). Well inside the FCC's 10
    /// business days, so an operator has time to act.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// After a write whose outcome is unknown (timeout, connection cut), the
    /// records are re-read and re-written where they differ this soon...
    #[serde(with = "humantime_serde")]
    pub recheck_soon: Duration,
    /// ...and again after this, because REDCap may still be finishing a
    /// request its client gave up on (PHP runs on after the timeout).
    #[serde(with = "humantime_serde")]
    pub recheck_late: Duration,
    /// Events recorded per second above which the relay steps aside for
    /// ingest: its workers and fan-out wait for the burst to pass (at most
    /// `yield_max` between two passes), so webhooks keep the CPUs and the
    /// database. 0: never.
    pub yield_above: u32,
    /// The longest a relay task waits for a burst to pass: under sustained
    /// load each worker (and the fan-out) still takes a batch this often.
    #[serde(with = "humantime_serde")]
    pub yield_max: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(120),
            retry_base: Duration::from_secs(1),
            retry_cap: Duration::from_secs(15),
            misconfigured_retry: Duration::from_secs(15 * 60),
            max_age: Duration::from_secs(3 * 24 * 3600),
            recheck_soon: Duration::from_secs(15),
            recheck_late: Duration::from_secs(10 * 60),
            yield_above: 200,
            yield_max: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Mask phone numbers in logs (`+1415***0101`). Turn off only to debug.
    pub mask_phones: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, mask_phones: true }
    }
}

/// Accepts one string or a list (an environment variable is often just one).
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Accepts one secret or a list; environment values may arrive as numbers
/// (figment parses `12345` as an integer), so those are taken as text too.
fn secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SecretString>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Scalar),
        Many(Vec<Scalar>),
    }
    let text = |s: Scalar| match s {
        Scalar::S(s) => s,
        Scalar::I(i) => i.to_string(),
        Scalar::U(u) => u.to_string(),
    };
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![text(s)],
        OneOrMany::Many(v) => v.into_iter().map(text).collect(),
    };
    Ok(items.into_iter().filter(|s| !s.is_empty()).map(SecretString::from).collect())
}

/// An optional list of scopes: one string or a list, numbers refused (see
/// [`quoted_texts`]).
fn scope_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    quoted_texts(d, "scope", "scopes").map(Some)
}

/// Phone numbers: one string or a list, numbers refused (see [`quoted_texts`]).
fn number_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    quoted_texts(d, "number", "to")
}

/// One string or a list. A number is refused rather than turned into text:
/// an environment value such as `+14155550100` is read as a number, and its
/// `+` would be lost. The error says how to quote it (`what` it is, the
/// `key` to write).
fn quoted_texts<'de, D: Deserializer<'de>>(d: D, what: &str, key: &str) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        F(f64),
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Scalar),
        Many(Vec<Scalar>),
    }
    let items = match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    };
    let number = |n: String| {
        serde::de::Error::custom(format!(
            "{what} {n} is a number, not text; quote it with its +, e.g. {key} = [\"+{n}\"] \
             (in the environment: '[\"+{n}\"]')"
        ))
    };
    items
        .into_iter()
        .map(|s| match s {
            Scalar::S(s) => Ok(s),
            Scalar::I(i) => Err(number(i.to_string())),
            Scalar::U(u) => Err(number(u.to_string())),
            Scalar::F(f) => Err(number(f.to_string())),
        })
        .collect()
}

/// Every problem found while reading the layers, one line each, naming the
/// key, where it came from and the environment variable that sets it.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct LoadError(pub Vec<String>);

/// What [`Config::load_all`] gives when the layers do not read: every
/// problem, and the configuration read past them (unknown keys and bad
/// values dropped, missing ones empty), so that `check-config` can go on to
/// the checks that need a configuration. The keys mended are listed, so
/// that their consequences are not reported twice.
pub struct Unreadable {
    pub problems: Vec<String>,
    pub mended: Option<Box<Config>>,
    pub keys: Vec<String>,
}

/// Each pass of [`Config::extract`] mends the one error serde stops at, so
/// a file with many mistakes is read this many times at most.
const MAX_LOAD_PASSES: usize = 64;

impl Config {
    /// Loads the layers. `path` is `--config`; when `None`, `optout-relay.toml`
    /// is read if present, else only defaults and environment apply.
    pub fn load(path: Option<&Path>) -> Result<Config, LoadError> {
        Self::extract(Self::layers(path)?)
    }

    fn layers(path: Option<&Path>) -> Result<Figment, LoadError> {
        let mut figment = Figment::new();
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(LoadError(vec![format!("config file {} does not exist", p.display())]));
                }
                figment = figment.merge(Toml::file(p));
            }
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                figment = figment.merge(Toml::file(DEFAULT_CONFIG_FILE));
            }
            None => {}
        }
        figment = figment
            .merge(Env::raw().only(&["DATABASE_URL"]).map(|_| "database.url".into()))
            .merge(Env::prefixed(ENV_PREFIX).split("__"));
        Ok(figment)
    }

    /// The configuration the layers of `figment` hold, or every problem in
    /// them. serde stops at the first error, so each pass mends that one
    /// (drops an unknown key or a bad value, so its default applies; fills a
    /// missing one) and reads again: one run lists every unknown key and
    /// every missing value, not one per run.
    fn extract(figment: Figment) -> Result<Config, LoadError> {
        Self::extract_all(figment).map_err(|u| LoadError(u.problems))
    }

    /// [`Config::load`] for `check-config`: on failure, also the configuration read past the problems.
    pub fn load_all(path: Option<&Path>) -> Result<Config, Unreadable> {
        let figment = match Self::layers(path) {
            Ok(f) => f,
            Err(LoadError(problems)) => return Err(Unreadable { problems, mended: None, keys: Vec::new() }),
        };
        Self::extract_all(figment)
    }

    fn extract_all(figment: Figment) -> Result<Config, Unreadable> {
        let first = match figment.extract::<Config>() {
            Ok(config) => return Ok(config),
            Err(e) => e,
        };
        let Ok(mut data) = figment.extract::<figment::value::Dict>() else {
            let problems = first.into_iter().map(|e| describe(&figment, &e)).collect();
            return Err(Unreadable { problems, mended: None, keys: Vec::new() });
        };
        let mut problems = Vec::new();
        // Keys this loop removed: a later "missing" for one of them is a
        // consequence, already reported.
        let mut removed: Vec<Vec<String>> = Vec::new();
        let mut error = first;
        for _ in 0..MAX_LOAD_PASSES {
            let mut mended = false;
            for e in error {
                let consequence = removed.iter().any(|r| key_of(&e).0.starts_with(r));
                if !consequence {
                    problems.push(describe(&figment, &e));
                }
                mended |= mend(&mut data, &e, &mut removed);
            }
            if !mended {
                break;
            }
            match Figment::from(figment::providers::Serialized::defaults(&data)).extract::<Config>() {
                Ok(mended) => {
                    let keys = removed.iter().map(|k| k.join(".")).filter(|k| !k.is_empty()).collect();
                    return Err(Unreadable { problems, mended: Some(Box::new(mended)), keys });
                }
                Err(e) => error = e,
            }
        }
        Err(Unreadable { problems, mended: None, keys: Vec::new() })
    }

    /// Every sink, named, sorted by name: the `[sinks.NAME]` tables and the
    /// `[redcap]` / `[email]` shorthand. A name defined both ways is a
    /// problem (see [`Config::problems`]); until fixed, the `[sinks]` table wins.
    pub fn sinks(&self) -> Vec<(String, SinkConfig)> {
        let mut all = self.sinks.clone();
        if let Some(r) = &self.redcap {
            all.entry(REDCAP_SHORTHAND.to_owned()).or_insert_with(|| SinkConfig::Redcap(r.clone()));
        }
        if let Some(e) = &self.email {
            all.entry(EMAIL_SHORTHAND.to_owned()).or_insert_with(|| SinkConfig::Email(e.clone()));
        }
        all.into_iter().collect()
    }

    /// Every sink as written, shorthand and named alike (duplicates kept),
    /// with the key path its problems are reported under.
    fn declared_sinks(&self) -> Vec<Declared<'_>> {
        let mut out = Vec::new();
        if let Some(r) = &self.redcap {
            out.push(Declared {
                name: REDCAP_SHORTHAND,
                path: REDCAP_SHORTHAND.to_owned(),
                config: SinkRef::Redcap(r),
            });
        }
        if let Some(e) = &self.email {
            out.push(Declared { name: EMAIL_SHORTHAND, path: EMAIL_SHORTHAND.to_owned(), config: SinkRef::Email(e) });
        }
        for (name, sink) in &self.sinks {
            let config = match sink {
                SinkConfig::Redcap(r) => SinkRef::Redcap(r),
                SinkConfig::Email(e) => SinkRef::Email(e),
                SinkConfig::Everyaction(c) => SinkRef::Everyaction(c),
                SinkConfig::Webhook(c) => SinkRef::Webhook(c),
            };
            out.push(Declared { name, path: format!("sinks.{name}"), config });
        }
        out
    }

    /// Every semantic problem in the configuration (empty when it is usable).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for url in self.server.public_url.iter().chain(&self.server.alternate_public_urls) {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                out.push(format!("server.public_url {url:?} must start with https:// or http://"));
            }
        }
        if self.lists.max_import_bytes < 1024 {
            out.push("lists.max_import_bytes must be at least 1024".to_owned());
        }
        if self.lists.import_timeout.is_zero() {
            out.push("lists.import_timeout must be above 0s".to_owned());
        }
        if self.server.max_body_bytes < 1024 {
            out.push("server.max_body_bytes must be at least 1024".to_owned());
        }
        for (name, d) in [
            ("header_read_timeout", self.server.header_read_timeout),
            ("body_timeout", self.server.body_timeout),
            ("idle_timeout", self.server.idle_timeout),
        ] {
            if d.is_zero() {
                out.push(format!("server.{name} must be above 0s"));
            }
        }
        let db = self.database.url.expose_secret();
        if !(db.starts_with("sqlite:") || db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            out.push("database.url must start with sqlite:, postgres:// or postgresql://".to_owned());
        }
        if self.database.max_connections == 0 {
            out.push("database.max_connections must be at least 1".to_owned());
        }
        if self.keywords.region().is_none() {
            out.push(format!(
                "keywords.default_region {:?} is not an ISO 3166 region code such as US",
                self.keywords.default_region
            ));
        }
        for (name, list) in [("opt_out", &self.keywords.opt_out), ("opt_in", &self.keywords.opt_in)] {
            if list.iter().all(|k| k.trim().is_empty()) {
                out.push(format!("keywords.{name} must list at least one keyword"));
            }
        }
        self.sink_problems(&mut out);
        let relay = &self.relay;
        if relay.workers == 0 {
            out.push("relay.workers must be at least 1".to_owned());
        }
        if relay.batch_size == 0 {
            out.push("relay.batch_size must be at least 1".to_owned());
        }
        if relay.retry_base.is_zero() || relay.retry_cap < relay.retry_base {
            out.push("relay.retry_base must be > 0 and not above relay.retry_cap".to_owned());
        }
        if relay.lease < Duration::from_secs(5) {
            out.push("relay.lease must be at least 5s".to_owned());
        }
        if relay.recheck_soon.is_zero() || relay.recheck_late <= relay.recheck_soon {
            out.push("relay.recheck_soon must be above 0 and relay.recheck_late above it".to_owned());
        }
        if relay.max_age.is_zero() {
            out.push("relay.max_age must be above 0".to_owned());
        }
        // Under sustained load a worker takes one batch per `yield_max`: a
        // longer wait would let a steady stream of webhooks hold sinks back.
        if relay.yield_max > Duration::from_secs(60) {
            out.push("relay.yield_max must be at most 1m".to_owned());
        }
        self.reconcile_problems(&mut out);
        out
    }

    /// Reconciliation needs an account, a credential and a sane schedule;
    /// only checked when it is switched on (`backfill` checks for itself).
    fn reconcile_problems(&self, out: &mut Vec<String>) {
        let t = &self.twilio;
        if !(t.api_base.starts_with("https://") || t.api_base.starts_with("http://")) {
            out.push(format!("twilio.api_base {:?} must start with https:// or http://", t.api_base));
        }
        if t.api_key_sid.is_some() != t.api_key_secret.is_some() {
            out.push("twilio.api_key_sid and twilio.api_key_secret go together: set both or neither".to_owned());
        }
        let r = &self.reconcile;
        if r.lookback < Duration::from_secs(3600) {
            out.push("reconcile.lookback must be at least 1h".to_owned());
        }
        for to in &r.to {
            if !to.starts_with('+') {
                out.push(format!("reconcile.to {to:?} must be an E.164 number such as +14155550100"));
            }
        }
        let Some(interval) = r.interval else { return };
        if interval < Duration::from_secs(1) {
            out.push("reconcile.interval must be at least 1s".to_owned());
        }
        if t.account_sid.as_deref().is_none_or(|s| s.trim().is_empty()) {
            out.push(
                "reconcile.interval is set but twilio.account_sid is not (OPTOUT_RELAY__TWILIO__ACCOUNT_SID)"
                    .to_owned(),
            );
        }
        if t.api_key_sid.is_none() && t.auth_tokens.is_empty() {
            out.push(
                "reconcile.interval is set but there is no credential for Twilio's API: set twilio.api_key_sid and \
                 twilio.api_key_secret, or twilio.auth_tokens"
                    .to_owned(),
            );
        }
    }

    /// What `check-config` finds beyond [`Config::problems`]: settings
    /// `serve` starts with (tests and experiments need that) but with which
    /// it cannot do its job for Twilio. Each says which variable to set.
    pub fn first_run_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let twilio = &self.twilio;
        if !twilio.validate_signatures {
            out.push(
                "twilio.validate_signatures is false: anyone who reaches the service can record opt-outs; \
                 remove it or set OPTOUT_RELAY__TWILIO__VALIDATE_SIGNATURES=true"
                    .to_owned(),
            );
        } else if twilio.auth_tokens.is_empty() && twilio.shared_keys.is_empty() {
            out.push(
                "no Twilio credential: every webhook would be refused (403); set \
                 OPTOUT_RELAY__TWILIO__AUTH_TOKENS to the account's Auth Token (Twilio Console, \
                 Account, API keys & tokens)"
                    .to_owned(),
            );
        }
        match &self.server.public_url {
            None => out.push(
                "server.public_url is not set: Twilio signs the URL it calls, which the service cannot \
                 see behind a proxy; set OPTOUT_RELAY__SERVER__PUBLIC_URL to it, e.g. https://optout.your-org.edu"
                    .to_owned(),
            ),
            Some(url) if is_placeholder(url) => out.push(format!(
                "server.public_url {url} is the example's placeholder: set OPTOUT_RELAY__SERVER__PUBLIC_URL \
                 to the URL Twilio calls"
            )),
            Some(_) => {}
        }
        for url in self.server.alternate_public_urls.iter().filter(|u| is_placeholder(u)) {
            out.push(format!(
                "server.alternate_public_urls holds the example's placeholder {url}: list the URLs Twilio \
                 calls, or remove OPTOUT_RELAY__SERVER__ALTERNATE_PUBLIC_URLS"
            ));
        }
        out
    }

    /// The sinks' names, their number by type, and each sink's own keys.
    fn sink_problems(&self, out: &mut Vec<String>) {
        for name in self.sinks.keys() {
            if !valid_sink_name(name) {
                out.push(format!(
                    "sink name {name:?} must match ^[a-z0-9_-]+$ (lowercase letters, digits, _ and -): \
                     it is used in metrics labels, URLs and environment variable names"
                ));
            }
        }
        for (shorthand, defined) in [(REDCAP_SHORTHAND, self.redcap.is_some()), (EMAIL_SHORTHAND, self.email.is_some())]
        {
            if defined && self.sinks.contains_key(shorthand) {
                out.push(format!(
                    "sink {shorthand:?} is defined twice, as [{shorthand}] and as [sinks.{shorthand}]: keep one"
                ));
            }
        }
        let declared = self.declared_sinks();
        let emails: Vec<&str> =
            declared.iter().filter(|d| matches!(d.config, SinkRef::Email(_))).map(|d| d.path.as_str()).collect();
        if emails.len() > 1 {
            out.push(format!(
                "only one email sink is allowed (alerts about failing sinks go to it); found {}",
                emails.join(", ")
            ));
        }
        for d in &declared {
            let scopes = match d.config {
                SinkRef::Redcap(r) => {
                    redcap_problems(&d.path, r, out);
                    self.lease_problem(d.name, &d.path, r, out);
                    &r.scopes
                }
                SinkRef::Email(e) => {
                    email_problems(&d.path, e, out);
                    &e.scopes
                }
                SinkRef::Everyaction(c) => {
                    outbound::everyaction_problems(&d.path, c, self.relay.lease, out);
                    &c.scopes
                }
                SinkRef::Webhook(c) => {
                    outbound::webhook_problems(&d.path, c, self.relay.lease, out);
                    &c.scopes
                }
            };
            scope_problems(&d.path, scopes.as_deref(), out);
        }
    }

    /// A lease shorter than a batch's worst case lets a second worker take
    /// the batch over while the first is still writing (issue #8: a frozen
    /// worker's older write landing after the newer one).
    fn lease_problem(&self, name: &str, path: &str, r: &RedcapConfig, out: &mut Vec<String>) {
        let Some(worst) = r.batch_worst_case() else { return };
        let lease = self.relay.lease;
        if lease <= worst {
            out.push(format!(
                "relay.lease {} is not longer than the worst case of a batch for sink {name:?}, {} \
                 (3 × {path}.request_timeout {} + 3 × 60s / {path}.max_calls_per_minute {}): \
                 raise relay.lease or lower request_timeout",
                humantime::format_duration(lease),
                humantime::format_duration(worst),
                humantime::format_duration(r.request_timeout),
                r.max_calls_per_minute,
            ));
        }
    }
}

/// The full key path an error is about (`server.listen_addr`) and the
/// table it sits in (`server`).
fn key_of(e: &figment::Error) -> (Vec<String>, Vec<String>) {
    use figment::error::Kind;
    let name = match &e.kind {
        Kind::UnknownField(name, _) => Some(name.clone()),
        Kind::MissingField(name) => Some(name.to_string()),
        _ => None,
    };
    match name {
        // serde reports a struct's unknown or missing field at the struct.
        Some(name) if e.path.last() != Some(&name) => {
            let mut key = e.path.clone();
            key.push(name);
            (key, e.path.clone())
        }
        _ => {
            let table = e.path[..e.path.len().saturating_sub(1)].to_vec();
            (e.path.clone(), table)
        }
    }
}

/// One line for a load error: the key with no profile prefix, where it was
/// set, what is wrong, and how to set it. No backticks: the line is read in
/// a terminal or a log, where they are noise.
fn describe(figment: &Figment, e: &figment::Error) -> String {
    use figment::error::Kind;
    let (key, table) = key_of(e);
    let dotted = key.join(".");
    let env = env_var_of(&key);
    let origin = || match figment.find_metadata(&dotted) {
        Some(m) => match &m.source {
            Some(figment::Source::File(path)) => format!(" in {}", path.display()),
            _ if m.name.contains("environment") => format!(" (from {env})"),
            _ => String::new(),
        },
        None => String::new(),
    };
    let table_name = if table.is_empty() { "the top level".to_owned() } else { format!("[{}]", table.join(".")) };
    match &e.kind {
        Kind::UnknownField(_, expected) => {
            format!("{dotted}{} is not a key of {table_name}; known keys: {}", origin(), expected.join(", "))
        }
        Kind::MissingField(name) => {
            format!("{dotted} is missing: set {name} in {table_name} or the environment variable {env}")
        }
        Kind::UnknownVariant(value, expected) => {
            format!("{dotted}{} {value:?} is not one of {}", origin(), expected.join(", "))
        }
        other => format!(
            "{dotted}{}: {} (set it in {table_name} or with {env})",
            origin(),
            other.to_string().replace('`', "")
        ),
    }
}

/// A URL on a host reserved for examples (RFC 2606: example.org, .com,
/// .net, `.example`, `.invalid`), as in `.env.example` and the README.
fn is_placeholder(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host = host.split(':').next().unwrap_or_default().trim_end_matches('.').to_ascii_lowercase();
    ["example.org", "example.com", "example.net"].iter().any(|d| host == *d || host.ends_with(&format!(".{d}")))
        || host.ends_with(".example")
        || host.ends_with(".invalid")
}

/// `OPTOUT_RELAY__SINKS__STUDY_A__TOKEN` for `sinks.study_a.token`.
fn env_var_of(key: &[String]) -> String {
    format!("{ENV_PREFIX}{}", key.join("__")).to_ascii_uppercase()
}

/// Changes `data` so that the next read gets past `e`: an unknown key or a
/// bad value is dropped (its default applies, or it is reported missing), a
/// missing value gets an empty text (the problems that follow say more). A
/// value that still does not fit takes its table with it. False when nothing
/// could be changed.
fn mend(data: &mut figment::value::Dict, e: &figment::Error, removed: &mut Vec<Vec<String>>) -> bool {
    use figment::error::Kind;
    let (key, table) = key_of(e);
    if let Kind::MissingField(_) = e.kind {
        if !removed.contains(&key) {
            removed.push(key.clone());
            return set_at(data, &key, figment::value::Value::from(String::new()));
        }
        // An empty text was not enough (a list, a number): drop the table.
        removed.push(table.clone());
        return remove_at(data, &table);
    }
    removed.push(key.clone());
    remove_at(data, &key) || (!table.is_empty() && remove_at(data, &table))
}

fn remove_at(data: &mut figment::value::Dict, key: &[String]) -> bool {
    let Some((last, parents)) = key.split_last() else { return false };
    let mut dict = data;
    for part in parents {
        match dict.get_mut(part) {
            Some(figment::value::Value::Dict(_, inner)) => dict = inner,
            _ => return false,
        }
    }
    dict.remove(last).is_some()
}

fn set_at(data: &mut figment::value::Dict, key: &[String], value: figment::value::Value) -> bool {
    let Some((last, parents)) = key.split_last() else { return false };
    let mut dict = data;
    for part in parents {
        match dict.get_mut(part) {
            Some(figment::value::Value::Dict(_, inner)) => dict = inner,
            _ => return false,
        }
    }
    dict.insert(last.clone(), value).is_none()
}

/// Names of the sinks the shorthand tables define.
const REDCAP_SHORTHAND: &str = "redcap";
const EMAIL_SHORTHAND: &str = "email";

/// A sink as written in the configuration, for `problems`.
struct Declared<'a> {
    name: &'a str,
    /// Where its keys live: `redcap`, `email` or `sinks.NAME`.
    path: String,
    config: SinkRef<'a>,
}

enum SinkRef<'a> {
    Redcap(&'a RedcapConfig),
    Email(&'a EmailConfig),
    Everyaction(&'a EveryActionConfig),
    Webhook(&'a WebhookConfig),
}

/// `^[a-z0-9_-]+$`: safe in metrics labels, URL paths and (bar `-`)
/// environment variable names, which figment lowercases anyway.
fn valid_sink_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The environment variable that sets `key` under `path` (`sinks.study_a`).
fn empty_secret() -> SecretString {
    SecretString::from("")
}

fn env_var(path: &str, key: &str) -> String {
    format!("{ENV_PREFIX}{}__{}", path.replace('.', "__"), key).to_ascii_uppercase()
}

fn redcap_problems(path: &str, r: &RedcapConfig, out: &mut Vec<String>) {
    if !(r.url.starts_with("https://") || r.url.starts_with("http://")) {
        out.push(format!("{path}.url {:?} must start with https:// or http://", r.url));
    }
    if r.token.expose_secret().is_empty() {
        out.push(format!("{path}.token is empty (set {})", env_var(path, "token")));
    }
    for (name, v) in [("phone_field", &r.phone_field), ("optout_field", &r.optout_field)] {
        if v.trim().is_empty() {
            out.push(format!("{path}.{name} is empty"));
        }
    }
    if r.timezone.parse::<chrono_tz::Tz>().is_err() {
        out.push(format!("{path}.timezone {:?} is not an IANA zone name", r.timezone));
    }
    if r.max_calls_per_minute == 0 || r.max_calls_per_minute > 600 {
        out.push(format!("{path}.max_calls_per_minute must be between 1 and 600 (REDCap bans past its limit)"));
    }
    if r.request_timeout.is_zero() {
        out.push(format!("{path}.request_timeout must be above 0"));
    }
}

fn email_problems(path: &str, e: &EmailConfig, out: &mut Vec<String>) {
    if e.smtp_host.trim().is_empty() {
        out.push(format!("{path}.smtp_host is empty"));
    }
    if e.from.parse::<lettre::message::Mailbox>().is_err() {
        out.push(format!("{path}.from {:?} is not an address", e.from));
    }
    if e.to.is_empty() {
        out.push(format!("{path}.to must list at least one address"));
    }
    for to in e.to.iter().filter(|t| t.parse::<lettre::message::Mailbox>().is_err()) {
        out.push(format!("{path}.to {to:?} is not an address"));
    }
    if e.timeout.is_zero() {
        out.push(format!("{path}.timeout must be above 0"));
    }
    if e.timezone.parse::<chrono_tz::Tz>().is_err() {
        out.push(format!("{path}.timezone {:?} is not an IANA zone name", e.timezone));
    }
    if e.username.is_some() != e.password.is_some() {
        out.push(format!("{path}.username and {path}.password go together"));
    }
    if e.ca_file.is_some() && e.tls == EmailTls::None {
        out.push(format!("{path}.ca_file is set but {path}.tls is \"none\": no certificate would be checked"));
    }
    if let Err(problem) = e.extra_roots_at(path) {
        out.push(problem);
    }
    if e.alert_after.is_zero() {
        out.push(format!("{path}.alert_after must be above 0"));
    }
}

/// A scope that is blank or padded never equals an event's scope, so the
/// sink would silently follow nothing; `[]` likewise.
fn scope_problems(path: &str, scopes: Option<&[String]>, out: &mut Vec<String>) {
    let Some(scopes) = scopes else { return };
    if scopes.is_empty() {
        out.push(format!(
            "{path}.scopes is empty, so the sink would follow nothing: remove scopes to follow every scope"
        ));
    }
    for scope in scopes {
        if scope.trim().is_empty() {
            out.push(format!("{path}.scopes holds an empty scope"));
        } else if scope.trim() != scope {
            out.push(format!("{path}.scopes {scope:?} has spaces around it"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The configuration a TOML text gives, defaults beneath it, no environment.
    fn parse(toml: &str) -> Result<Config, String> {
        Config::extract(Figment::from(Toml::string(toml))).map_err(|e| e.to_string())
    }

    fn problems(toml: &str) -> Vec<String> {
        parse(toml).expect("parses").problems()
    }

    #[test]
    fn server_timeouts_have_defaults_read_from_the_file_and_refuse_zero() {
        let d = ServerConfig::default();
        assert_eq!(
            (d.header_read_timeout, d.body_timeout, d.idle_timeout),
            (Duration::from_secs(10), Duration::from_secs(10), Duration::from_secs(75))
        );
        let c =
            parse("[server]\nheader_read_timeout = \"2s\"\nbody_timeout = \"3s\"\nidle_timeout = \"90s\"\n").unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.server.body_timeout, Duration::from_secs(3));
        assert_eq!(c.server.idle_timeout, Duration::from_secs(90));
        let found = problems("[server]\nheader_read_timeout = \"0s\"\nidle_timeout = \"0s\"\n");
        assert!(found.iter().any(|p| p == "server.header_read_timeout must be above 0s"), "{found:?}");
        assert!(found.iter().any(|p| p == "server.idle_timeout must be above 0s"), "{found:?}");
        assert!(!found.iter().any(|p| p.contains("body_timeout")), "{found:?}");
    }

    const STUDY_A: &str = r#"
[sinks.study_a]
type = "redcap"
url = "https://redcap.example.edu/api/"
token = "0123456789ABCDEF0123456789ABCDEF"
phone_field = "phone"
optout_field = "sms_opted_out_at"
scopes = ["MG11111111111111111111111111111111", "+14155550100"]
resync_interval = "30m"
"#;

    const SHORTHAND: &str = r#"
[redcap]
url = "https://redcap.example.edu/api/"
token = "0123456789ABCDEF0123456789ABCDEF"
phone_field = "phone"
optout_field = "sms_opted_out_at"

[email]
smtp_host = "smtp.example.org"
from = "relay@example.org"
to = "ops@example.org"
"#;

    #[test]
    fn named_sinks_parse_with_their_type_and_scopes() {
        let c = parse(STUDY_A).unwrap();
        assert_eq!(c.problems(), Vec::<String>::new());
        let sinks = c.sinks();
        assert_eq!(sinks.len(), 1);
        let (name, sink) = &sinks[0];
        assert_eq!((name.as_str(), sink.kind()), ("study_a", "redcap"));
        assert_eq!(
            sink.scopes(),
            Some(&["MG11111111111111111111111111111111".to_owned(), "+14155550100".to_owned()][..])
        );
        let SinkConfig::Redcap(r) = sink else { panic!("{sink:?}") };
        assert_eq!(r.resync_interval, Duration::from_secs(30 * 60));
        assert_eq!(r.max_calls_per_minute, 300, "the type's defaults apply");
    }

    #[test]
    fn shorthand_tables_are_sinks_named_redcap_and_email_sorted_with_the_others() {
        let c = parse(&format!("{SHORTHAND}{STUDY_A}")).unwrap();
        assert_eq!(c.problems(), Vec::<String>::new());
        let sinks: Vec<(String, &str, Option<usize>)> =
            c.sinks().iter().map(|(n, s)| (n.clone(), s.kind(), s.scopes().map(<[_]>::len))).collect();
        assert_eq!(
            sinks,
            [
                ("email".to_owned(), "email", None),
                ("redcap".to_owned(), "redcap", None),
                ("study_a".to_owned(), "redcap", Some(2))
            ]
        );
        assert!(parse("").unwrap().sinks().is_empty());
    }

    #[test]
    fn new_keys_have_their_defaults() {
        let c = parse(SHORTHAND).unwrap();
        let r = c.redcap.as_ref().unwrap();
        assert_eq!((r.scopes.as_ref(), r.resync_interval), (None, Duration::from_secs(3600)));
        let e = c.email.as_ref().unwrap();
        assert_eq!(e.scopes, None);
        assert_eq!((e.alert_after, e.report_wait), (Duration::from_secs(15 * 60), Duration::from_secs(10 * 60)));
        let relay = &c.relay;
        assert_eq!((relay.retry_base, relay.retry_cap), (Duration::from_secs(1), Duration::from_secs(15)));
        assert_eq!((relay.recheck_soon, relay.recheck_late), (Duration::from_secs(15), Duration::from_secs(600)));
        assert_eq!(relay.misconfigured_retry, Duration::from_secs(15 * 60));
        assert_eq!(relay.max_age, Duration::from_secs(3 * 24 * 3600));
        assert_eq!((relay.yield_above, relay.yield_max), (200, Duration::from_secs(5)));
        // The constructors agree with the file's defaults.
        let built = RedcapConfig::new(&r.url, r.token.clone(), &r.phone_field, &r.optout_field);
        assert_eq!(format!("{built:?}"), format!("{r:?}"));
        let built = EmailConfig::new(&e.smtp_host, &e.from, e.to.clone());
        assert_eq!(format!("{built:?}"), format!("{e:?}"));
        // "0s" turns resync off; it is not a problem.
        let c = parse(&STUDY_A.replace("\"30m\"", "\"0s\"")).unwrap();
        let SinkConfig::Redcap(r) = &c.sinks()[0].1 else { panic!() };
        assert!(r.resync_interval.is_zero());
        assert_eq!(c.problems(), Vec::<String>::new());
    }

    #[test]
    fn an_unknown_key_in_a_sink_table_is_an_error_naming_it() {
        for (table, typo) in [(STUDY_A, "tokn"), (SHORTHAND, "tokn")] {
            let text = table.replacen("token =", &format!("{typo} = \"x\"\ntoken ="), 1);
            let err = parse(&text).unwrap_err();
            assert!(err.contains("is not a key") && err.contains(typo), "{err}");
        }
        let email = "[sinks.mail]\ntype = \"email\"\nsmtp_host = \"h\"\nfrom = \"a@b.c\"\nto = \"d@e.f\"\nalert_afer = \"1m\"\n";
        let err = parse(email).unwrap_err();
        assert!(err.contains("alert_afer"), "{err}");
        let err = parse(&STUDY_A.replace("\"redcap\"", "\"redcapp\"")).unwrap_err();
        assert!(err.contains("redcapp"), "{err}");
        let err = parse(&STUDY_A.replace("type = \"redcap\"\n", "")).unwrap_err();
        assert!(err.contains("type"), "{err}");
    }

    #[test]
    fn every_unknown_key_and_missing_value_is_listed_in_one_run_without_backticks() {
        let text = "[server]\nlisten_addr = \"x\"\npublik = 1\n[relay]\nworkrs = 2\nlease = \"soon\"\n\
                    [redcap]\nurl = \"https://r/api/\"\ntokn = \"t\"\n[sinks.b]\ntype = \"redcapp\"\n\
                    [sinks.c]\nurl = \"x\"\n";
        let err = parse(text).unwrap_err();
        let lines: Vec<&str> = err.lines().collect();
        for expected in [
            "server.listen_addr is not a key of [server]; known keys: listen, public_url,",
            "server.publik is not a key of [server]",
            "relay.workrs is not a key of [relay]",
            "relay.lease: ",
            "redcap.tokn is not a key of [redcap]",
            "redcap.phone_field is missing: set phone_field in [redcap] or the environment variable \
             OPTOUT_RELAY__REDCAP__PHONE_FIELD",
            "redcap.optout_field is missing",
            "sinks.c.type is missing",
        ] {
            assert!(lines.iter().any(|l| l.starts_with(expected)), "{expected:?} in {lines:#?}");
        }
        assert!(lines.iter().any(|l| l.contains("redcapp")), "{lines:#?}");
        // The empty text that stood in for the missing type is not a problem of its own.
        assert!(!lines.iter().any(|l| l.contains("\"\" is not one of")), "{lines:#?}");
        assert!(!err.contains('`') && !err.contains("default."), "{err}");
        // Each problem once.
        let mut unique = lines.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), lines.len(), "{lines:#?}");
    }

    #[test]
    fn first_run_problems_name_the_missing_credential_and_the_placeholder_url() {
        let c = parse("").unwrap();
        let p = c.first_run_problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("no Twilio credential") && p[0].contains("OPTOUT_RELAY__TWILIO__AUTH_TOKENS"));
        assert!(p[1].starts_with("server.public_url is not set") && p[1].contains("OPTOUT_RELAY__SERVER__PUBLIC_URL"));
        let c = parse("[server]\npublic_url = \"https://optout.example.org\"\nalternate_public_urls = [\"https://b.example.com:8443/x\", \"https://twilio.hospital.org\"]\n[twilio]\nauth_tokens = \"t\"\n").unwrap();
        let p = c.first_run_problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("https://optout.example.org is the example's placeholder"), "{p:?}");
        assert!(p[1].contains("https://b.example.com:8443/x"), "{p:?}");
        let c =
            parse("[server]\npublic_url = \"https://optout.examples.org\"\n[twilio]\nshared_keys = { k = \"s\" }\n")
                .unwrap();
        assert_eq!(c.first_run_problems(), Vec::<String>::new());
        let c = parse("[server]\npublic_url = \"https://a.b\"\n[twilio]\nvalidate_signatures = false\n").unwrap();
        assert!(c.first_run_problems()[0].starts_with("twilio.validate_signatures is false"));
    }

    #[test]
    fn max_attempts_is_now_an_unknown_key() {
        let err = parse("[relay]\nmax_attempts = 100\n").unwrap_err();
        assert!(err.starts_with("relay.max_attempts is not a key of [relay]"), "{err}");
    }

    #[test]
    fn a_scope_given_as_a_number_is_refused_not_stripped_of_its_plus() {
        let err = parse(&STUDY_A.replace("\"+14155550100\"", "14155550100")).unwrap_err();
        assert!(err.contains("14155550100") && err.contains("quote"), "{err}");
        // One text scope stands for a list of one (an environment value often is).
        let c = parse(&STUDY_A.replace("scopes = [", "scopes = \"MG1\"\n#")).unwrap();
        assert_eq!(c.sinks()[0].1.scopes(), Some(&["MG1".to_owned()][..]));
    }

    #[test]
    fn a_reconcile_number_given_as_a_number_is_refused_with_how_to_quote_it() {
        // What figment makes of OPTOUT_RELAY__RECONCILE__TO=+15005550006.
        let err = parse("[reconcile]\nto = 15005550006\n").unwrap_err();
        assert!(err.contains("number 15005550006 is a number") && err.contains("to = [\"+15005550006\"]"), "{err}");
        let c = parse("[reconcile]\nto = \"+15005550006\"\n").unwrap();
        assert_eq!(c.reconcile.to, ["+15005550006"]);
    }

    #[test]
    fn sink_names_must_be_lowercase_letters_digits_underscore_and_hyphen() {
        for bad in ["Study_A", "study a", "study.a", "ü"] {
            let toml = STUDY_A.replace("[sinks.study_a]", &format!("[sinks.\"{bad}\"]"));
            let problems = problems(&toml);
            assert!(
                problems.iter().any(|p| p.contains(&format!("{bad:?}")) && p.contains("^[a-z0-9_-]+$")),
                "{problems:?}"
            );
        }
        for good in ["study-a", "a1", "_"] {
            assert_eq!(problems(&STUDY_A.replace("[sinks.study_a]", &format!("[sinks.{good}]"))), Vec::<String>::new());
        }
    }

    #[test]
    fn a_name_defined_as_shorthand_and_under_sinks_is_a_problem() {
        let named = STUDY_A.replace("[sinks.study_a]", "[sinks.redcap]");
        let c = parse(&format!("{SHORTHAND}{named}")).unwrap();
        let problems = c.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"redcap\" is defined twice"), "{problems:?}");
        // Until then, the [sinks] table wins (the shorthand has no scopes).
        let sinks = c.sinks();
        assert_eq!(sinks.iter().filter(|(n, _)| n == "redcap").count(), 1);
        assert!(sinks.iter().any(|(n, s)| n == "redcap" && s.scopes().is_some()));
    }

    #[test]
    fn per_sink_checks_name_the_key_path() {
        let broken = |t: &str| {
            t.replace("https://redcap.example.edu/api/", "redcap.example.edu")
                .replace("0123456789ABCDEF0123456789ABCDEF", "")
                .replace("optout_field = \"sms_opted_out_at\"", "optout_field = \" \"\ntimezone = \"Mars/Olympus\"")
        };
        let problems = problems(&format!("{}{}", broken(SHORTHAND), broken(STUDY_A)));
        for (path, env) in
            [("redcap", "OPTOUT_RELAY__REDCAP__TOKEN"), ("sinks.study_a", "OPTOUT_RELAY__SINKS__STUDY_A__TOKEN")]
        {
            for expected in [
                format!("{path}.url \"redcap.example.edu\" must start with https://"),
                format!("{path}.token is empty (set {env})"),
                format!("{path}.optout_field is empty"),
                format!("{path}.timezone \"Mars/Olympus\""),
            ] {
                assert!(problems.iter().any(|p| p.starts_with(&expected)), "{expected} in {problems:?}");
            }
        }
        let mail = "[sinks.mail]\ntype = \"email\"\nsmtp_host = \"\"\nfrom = \"nobody\"\nto = []\nusername = \"u\"\n";
        let problems = self::problems(mail);
        for expected in [
            "sinks.mail.smtp_host is empty",
            "sinks.mail.from \"nobody\" is not an address",
            "sinks.mail.to must list at least one address",
            "sinks.mail.username and sinks.mail.password go together",
        ] {
            assert!(problems.contains(&expected.to_owned()), "{expected} in {problems:?}");
        }
        let problems = self::problems(&format!("{SHORTHAND}ca_file = \"/nonexistent/ca.pem\"\n"));
        assert!(problems.iter().any(|p| p.starts_with("email.ca_file /nonexistent/ca.pem")), "{problems:?}");
    }

    #[test]
    fn empty_scopes_are_problems() {
        let problems = problems(&STUDY_A.replace("\"+14155550100\"", "\"\", \" +14155550101\""));
        assert!(problems.contains(&"sinks.study_a.scopes holds an empty scope".to_owned()), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("\" +14155550101\" has spaces")), "{problems:?}");
        let none = self::problems(&format!(
            "{}scopes = []\n",
            STUDY_A.replace("scopes = [\"MG11111111111111111111111111111111\", \"+14155550100\"]\n", "")
        ));
        assert_eq!(none.len(), 1, "{none:?}");
        assert!(
            none[0].starts_with("sinks.study_a.scopes is empty")
                && none[0].contains("remove scopes to follow every scope")
        );
    }

    #[test]
    fn only_one_email_sink_is_allowed() {
        let second = "[sinks.alerts]\ntype = \"email\"\nsmtp_host = \"h\"\nfrom = \"a@b.c\"\nto = \"d@e.f\"\n";
        let problems = problems(&format!("{SHORTHAND}{second}"));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with("only one email sink is allowed") && problems[0].contains("email, sinks.alerts")
        );
    }

    #[test]
    fn the_lease_must_outlast_a_batchs_worst_case() {
        // Defaults: 3 × 30s + 3 × 200ms = 90.6s, inside the 2m lease.
        let r = parse(SHORTHAND).unwrap().redcap.unwrap();
        assert_eq!(r.batch_worst_case(), Some(Duration::from_millis(90_600)));

        let slow =
            STUDY_A.replace("resync_interval", "request_timeout = \"40s\"\nmax_calls_per_minute = 60\nresync_interval");
        // 3 × 40s + 3 × 1s = 123s: a 2m lease is too short, 2m3s is not longer, 2m4s is.
        let problems = problems(&slow);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let p = &problems[0];
        for part in [
            "relay.lease 2m ",
            "\"study_a\"",
            "2m 3s",
            "sinks.study_a.request_timeout 40s",
            "raise relay.lease or lower request_timeout",
        ] {
            assert!(p.contains(part), "{part:?} in {p}");
        }
        assert_eq!(self::problems(&format!("{slow}[relay]\nlease = \"123s\"\n")).len(), 1);
        assert_eq!(self::problems(&format!("{slow}[relay]\nlease = \"124s\"\n")), Vec::<String>::new());
        // A zero rate is its own problem, not a division by zero.
        let zero = self::problems(&STUDY_A.replace("resync_interval", "max_calls_per_minute = 0\nresync_interval"));
        assert_eq!(zero.len(), 1, "{zero:?}");
        assert!(zero[0].contains("max_calls_per_minute must be between 1 and 600"));
    }

    #[test]
    fn relay_yield_max_is_bounded() {
        assert_eq!(problems("[relay]\nyield_max = \"2m\"\n"), ["relay.yield_max must be at most 1m"]);
        assert_eq!(problems("[relay]\nyield_above = 0\nyield_max = \"1m\"\n"), Vec::<String>::new());
    }

    #[test]
    fn relay_rechecks_must_be_ordered() {
        let problems = problems("[relay]\nrecheck_soon = \"10m\"\nrecheck_late = \"1m\"\n");
        assert_eq!(problems, ["relay.recheck_soon must be above 0 and relay.recheck_late above it"]);
    }
}
