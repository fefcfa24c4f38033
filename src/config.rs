//! Typed configuration.
//!
//! Layers, later wins: built-in defaults → the TOML file → `DATABASE_URL` →
//! `OPTOUT_RELAY__SECTION__KEY` environment variables (secrets usually arrive
//! that way). Secrets are `SecretString`, so a `Debug` print of the whole
//! config cannot leak them. [`Config::problems`] checks the whole struct and
//! returns every problem, not just the first, for `check-config`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

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
    pub redcap: Option<RedcapConfig>,
    pub email: Option<EmailConfig>,
    pub sinks: BTreeMap<String, SinkConfig>,
    pub relay: RelayConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer tokens for `/v1/…`. None configured: the admin API is disabled (404).
    #[serde(deserialize_with = "secret_list")]
    pub tokens: Vec<SecretString>,
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

/// The notification email (the REDCap module's "Notification Email").
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
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default = "default_alert_after", with = "humantime_serde")]
    pub alert_after: Duration,
    #[serde(default = "default_report_wait", with = "humantime_serde")]
    pub report_wait: Duration,
}

fn default_alert_after() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_report_wait() -> Duration {
    Duration::from_secs(10 * 60)
}

fn default_smtp_timeout() -> Duration {
    Duration::from_secs(30)
}

impl EmailConfig {
    /// The PEM text of `ca_file` (None when unset), checked to hold at least
    /// one certificate; the error names the setting and the file.
    pub fn extra_roots(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.ca_file else { return Ok(None) };
        use rustls::pki_types::pem::PemObject as _;
        let pem = std::fs::read(path).map_err(|e| format!("email.ca_file {}: {e}", path.display()))?;
        // Parsed the way the TLS client will parse it, so what passes here loads there.
        let certificates = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("email.ca_file {}: {e}", path.display()))?;
        if certificates.is_empty() {
            return Err(format!("email.ca_file {} holds no PEM certificate", path.display()));
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            alternate_public_urls: Vec::new(),
            max_body_bytes: 64 * 1024,
            shutdown_grace: Duration::from_secs(10),
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
}

impl Default for TwilioConfig {
    fn default() -> Self {
        Self { auth_tokens: Vec::new(), validate_signatures: true, shared_keys: BTreeMap::new() }
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
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default = "default_resync_interval", with = "humantime_serde")]
    pub resync_interval: Duration,
}

fn default_resync_interval() -> Duration {
    Duration::from_secs(3600)
}

/// TEMP (replaced by the config branch).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SinkConfig {
    Redcap(RedcapConfig),
    Email(EmailConfig),
}

impl SinkConfig {
    pub fn scopes(&self) -> Option<&[String]> {
        match self {
            SinkConfig::Redcap(c) => c.scopes.as_deref(),
            SinkConfig::Email(c) => c.scopes.as_deref(),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Redcap(_) => "redcap",
            SinkConfig::Email(_) => "email",
        }
    }
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

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    pub workers: usize,
    /// Deliveries one worker claims and sends to a sink in one go.
    pub batch_size: u32,
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A claimed delivery whose worker vanished becomes due again after this.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_cap: Duration,
    /// Delay after an answer that means misconfiguration (bad token, unknown field).
    #[serde(with = "humantime_serde")]
    pub misconfigured_retry: Duration,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(with = "humantime_serde")]
    pub recheck_soon: Duration,
    #[serde(with = "humantime_serde")]
    pub recheck_late: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            batch_size: 500,
            poll_interval: Duration::from_millis(500),
            lease: Duration::from_secs(120),
            retry_base: Duration::from_secs(5),
            retry_cap: Duration::from_secs(30 * 60),
            misconfigured_retry: Duration::from_secs(15 * 60),
            max_attempts: 100,
            // Well inside the FCC's 10 business days, so an operator has time to act.
            max_age: Duration::from_secs(3 * 24 * 3600),
            recheck_soon: Duration::from_secs(15),
            recheck_late: Duration::from_secs(600),
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

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(String);

impl Config {
    /// Loads the layers. `path` is `--config`; when `None`, `optout-relay.toml`
    /// is read if present, else only defaults and environment apply.
    pub fn load(path: Option<&Path>) -> Result<Config, LoadError> {
        let mut figment = Figment::new();
        match path {
            Some(p) => {
                if !p.exists() {
                    return Err(LoadError(format!("config file {} does not exist", p.display())));
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
        figment.extract::<Config>().map_err(|e| {
            let all: Vec<String> = e.into_iter().map(|e| e.to_string()).collect();
            LoadError(all.join("\n"))
        })
    }

    /// Every semantic problem in the configuration (empty when it is usable).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for url in self.server.public_url.iter().chain(&self.server.alternate_public_urls) {
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                out.push(format!("server.public_url {url:?} must start with https:// or http://"));
            }
        }
        if self.server.max_body_bytes < 1024 {
            out.push("server.max_body_bytes must be at least 1024".to_owned());
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
        if let Some(r) = &self.redcap {
            if !(r.url.starts_with("https://") || r.url.starts_with("http://")) {
                out.push(format!("redcap.url {:?} must start with https:// or http://", r.url));
            }
            if r.token.expose_secret().is_empty() {
                out.push("redcap.token is empty (set OPTOUT_RELAY__REDCAP__TOKEN)".to_owned());
            }
            for (name, v) in [("phone_field", &r.phone_field), ("optout_field", &r.optout_field)] {
                if v.trim().is_empty() {
                    out.push(format!("redcap.{name} is empty"));
                }
            }
            if r.timezone.parse::<chrono_tz::Tz>().is_err() {
                out.push(format!("redcap.timezone {:?} is not an IANA zone name", r.timezone));
            }
            if r.max_calls_per_minute == 0 || r.max_calls_per_minute > 600 {
                out.push("redcap.max_calls_per_minute must be between 1 and 600 (REDCap bans past its limit)".into());
            }
        }
        if let Some(e) = &self.email {
            if e.smtp_host.trim().is_empty() {
                out.push("email.smtp_host is empty".to_owned());
            }
            if e.from.parse::<lettre::message::Mailbox>().is_err() {
                out.push(format!("email.from {:?} is not an address", e.from));
            }
            if e.to.is_empty() {
                out.push("email.to must list at least one address".to_owned());
            }
            for to in e.to.iter().filter(|t| t.parse::<lettre::message::Mailbox>().is_err()) {
                out.push(format!("email.to {to:?} is not an address"));
            }
            if e.timeout.is_zero() {
                out.push("email.timeout must be above 0".to_owned());
            }
            if e.timezone.parse::<chrono_tz::Tz>().is_err() {
                out.push(format!("email.timezone {:?} is not an IANA zone name", e.timezone));
            }
            if e.username.is_some() != e.password.is_some() {
                out.push("email.username and email.password go together".to_owned());
            }
            if e.ca_file.is_some() && e.tls == EmailTls::None {
                out.push("email.ca_file is set but email.tls is \"none\": no certificate would be checked".to_owned());
            }
            if let Err(problem) = e.extra_roots() {
                out.push(problem);
            }
        }
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
        if relay.max_attempts == 0 {
            out.push("relay.max_attempts must be at least 1".to_owned());
        }
        out
    }

    /// TEMP: the resolved sinks, shorthand included, by name.
    pub fn sinks(&self) -> Vec<(String, SinkConfig)> {
        let mut out: Vec<(String, SinkConfig)> = self.sinks.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(r) = &self.redcap {
            out.push(("redcap".to_owned(), SinkConfig::Redcap(r.clone())));
        }
        if let Some(e) = &self.email {
            out.push(("email".to_owned(), SinkConfig::Email(e.clone())));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}
