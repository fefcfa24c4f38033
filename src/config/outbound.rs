//! The configuration of the sinks that post to other services over HTTP:
//! EveryAction / NGP VAN (`type = "everyaction"`) and signed webhooks
//! (`type = "webhook"`). Kept apart from `config.rs` so each sink type's
//! keys, defaults and checks read in one place.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};

use super::{empty_secret, env_var, scope_list};

/// VAN's API, version 4.
pub const DEFAULT_VAN_URL: &str = "https://api.securevan.com/v4/";

/// `[sinks.NAME]` with `type = "everyaction"`: one EveryAction / VAN
/// committee. VAN keys are per committee, so a second committee is a
/// second sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EveryActionConfig {
    /// The API's base URL, ending in `/v4/`.
    #[serde(default = "default_van_url")]
    pub url: String,
    /// The application name VAN issued with the key (the Basic auth user).
    #[serde(default)]
    pub application_name: String,
    /// The API key (a GUID); missing is allowed here so `check-config` can
    /// name the environment variable to set.
    #[serde(default = "empty_secret")]
    pub api_key: SecretString,
    /// `MyCampaign` (the default, also called `EveryAction`) or `MyVoters`.
    #[serde(default = "default_van_database")]
    pub database: String,
    /// Use only the mapping rows of this committee; unset: every row.
    #[serde(default, deserialize_with = "optional_id")]
    pub committee_id: Option<u64>,
    /// Also post a canvass response with this result code on an opt-out
    /// (e.g. 130, "Do Not Text"), contact type SMS.
    #[serde(default, deserialize_with = "optional_id")]
    pub result_code_id: Option<u64>,
    /// VAN publishes no limit: calls are spaced to at most this many a minute.
    #[serde(default = "default_van_calls_per_minute")]
    pub max_calls_per_minute: u32,
    /// How long one call may take, its answer read included.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Scopes this sink follows; unset: every scope.
    #[serde(default, deserialize_with = "scope_list")]
    pub scopes: Option<Vec<String>>,
}

/// `[sinks.NAME]` with `type = "webhook"`: a signed POST (Standard
/// Webhooks) to `url` on every change of a phone's target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// `whsec_` and base64 of the key, as Standard Webhooks libraries take it.
    #[serde(default = "empty_secret")]
    pub secret: SecretString,
    /// How long one delivery may take, its answer included.
    #[serde(default = "default_http_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default, deserialize_with = "scope_list")]
    pub scopes: Option<Vec<String>>,
}

fn default_van_url() -> String {
    DEFAULT_VAN_URL.to_owned()
}
fn default_van_database() -> String {
    "MyCampaign".to_owned()
}
/// One a second: VAN names no limit, and an opt-out a second is far above
/// what a texting programme produces.
fn default_van_calls_per_minute() -> u32 {
    60
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(10)
}

/// A VAN id given as a number or as text (an environment value may be either).
fn optional_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        N(u64),
        S(String),
    }
    match Option::<Id>::deserialize(d)? {
        None => Ok(None),
        Some(Id::N(n)) => Ok(Some(n)),
        Some(Id::S(s)) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a positive whole number"))),
    }
}

impl EveryActionConfig {
    /// The required keys; every other key takes its default.
    pub fn new(application_name: impl Into<String>, api_key: SecretString) -> Self {
        Self {
            url: default_van_url(),
            application_name: application_name.into(),
            api_key,
            database: default_van_database(),
            committee_id: None,
            result_code_id: None,
            max_calls_per_minute: default_van_calls_per_minute(),
            request_timeout: default_http_timeout(),
            scopes: None,
        }
    }

    /// The database mode after the key's `|`: 1 for MyCampaign (EveryAction), 0 for MyVoters.
    pub fn mode(&self) -> Option<u8> {
        match self.database.trim().to_ascii_lowercase().as_str() {
            "mycampaign" | "everyaction" => Some(1),
            "myvoters" => Some(0),
            _ => None,
        }
    }

    /// The longest one call can take when this sink is its only caller:
    /// its limiter slot, then the request timeout. A lease shorter than
    /// this could never start a call.
    pub fn call_worst_case(&self) -> Option<Duration> {
        let spacing = Duration::from_secs(60).checked_div(self.max_calls_per_minute)?;
        Some(self.request_timeout.saturating_add(spacing))
    }
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>, secret: SecretString) -> Self {
        Self { url: url.into(), secret, timeout: default_http_timeout(), scopes: None }
    }
}

/// The key a Standard Webhooks secret stands for: `whsec_` (optional)
/// then standard base64, as every Standard Webhooks library reads it.
pub fn webhook_key(secret: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    let encoded = secret.trim().strip_prefix("whsec_").unwrap_or(secret.trim());
    let key = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| {
        "is not whsec_ followed by base64 (as the receiver's Standard Webhooks library expects)".to_owned()
    })?;
    if key.len() < 16 {
        return Err(format!("holds {} bytes of key: use at least 16 (24 to 64 is usual)", key.len()));
    }
    Ok(key)
}

fn url_problem(path: &str, url: &str, out: &mut Vec<String>) {
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        out.push(format!("{path}.url {url:?} must start with https:// or http://"));
    }
}

pub(super) fn everyaction_problems(path: &str, c: &EveryActionConfig, lease: Duration, out: &mut Vec<String>) {
    url_problem(path, &c.url, out);
    if c.application_name.trim().is_empty() {
        out.push(format!(
            "{path}.application_name is empty: set it to the application name VAN issued with the API key"
        ));
    }
    if c.api_key.expose_secret().trim().is_empty() {
        out.push(format!("{path}.api_key is empty (set {})", env_var(path, "api_key")));
    } else if c.api_key.expose_secret().contains('|') {
        out.push(format!(
            "{path}.api_key holds a |: give the key alone and the database with {path}.database (the relay adds |0 or |1)"
        ));
    }
    if c.mode().is_none() {
        out.push(format!("{path}.database {:?} is not one of MyCampaign, EveryAction, MyVoters", c.database));
    }
    for (key, id) in [("committee_id", c.committee_id), ("result_code_id", c.result_code_id)] {
        if id == Some(0) {
            out.push(format!("{path}.{key} must be a VAN id above 0 (remove it to leave it unset)"));
        }
    }
    if !(1..=600).contains(&c.max_calls_per_minute) {
        out.push(format!("{path}.max_calls_per_minute must be between 1 and 600"));
    }
    if c.request_timeout.is_zero() {
        out.push(format!("{path}.request_timeout must be above 0"));
    }
    if let Some(worst) = c.call_worst_case().filter(|w| lease <= *w) {
        out.push(format!(
            "relay.lease {} is not longer than one call to {path}, {} ({path}.request_timeout and the spacing \
             of {path}.max_calls_per_minute): raise relay.lease or lower request_timeout",
            humantime::format_duration(lease),
            humantime::format_duration(worst),
        ));
    }
}

pub(super) fn webhook_problems(path: &str, c: &WebhookConfig, lease: Duration, out: &mut Vec<String>) {
    url_problem(path, &c.url, out);
    let secret = c.secret.expose_secret();
    if secret.trim().is_empty() {
        out.push(format!("{path}.secret is empty (set {})", env_var(path, "secret")));
    } else if let Err(e) = webhook_key(secret) {
        out.push(format!("{path}.secret {e}"));
    }
    if c.timeout.is_zero() {
        out.push(format!("{path}.timeout must be above 0"));
    } else if lease <= c.timeout {
        out.push(format!(
            "relay.lease {} is not longer than {path}.timeout {}: raise relay.lease or lower the timeout",
            humantime::format_duration(lease),
            humantime::format_duration(c.timeout),
        ));
    }
}

#[cfg(test)]
mod tests {
    use figment::providers::{Format, Toml};
    use figment::Figment;

    use super::super::{Config, SinkConfig};
    use super::*;

    fn parse(toml: &str) -> Result<Config, String> {
        Config::extract(Figment::from(Toml::string(toml))).map_err(|e| e.to_string())
    }

    const VAN: &str = r#"
[sinks.van_state]
type = "everyaction"
application_name = "acme.optout"
api_key = "2d1f2a4e-6f1c-4f7e-9a1b-3c5d7e9f1a2b"
committee_id = 12345
result_code_id = "130"
"#;

    const HOOK: &str = r#"
[sinks.crm]
type = "webhook"
url = "https://crm.example.net/hooks/optouts"
secret = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
timeout = "5s"
"#;

    #[test]
    fn everyaction_and_webhook_sinks_parse_with_their_defaults() {
        let c = parse(&format!("{VAN}{HOOK}")).unwrap();
        assert_eq!(c.problems(), Vec::<String>::new());
        let sinks = c.sinks();
        let kinds: Vec<(&str, &str)> = sinks.iter().map(|(n, s)| (n.as_str(), s.kind())).collect();
        assert_eq!(kinds, [("crm", "webhook"), ("van_state", "everyaction")]);
        let SinkConfig::Everyaction(v) = &sinks[1].1 else { panic!() };
        assert_eq!(v.url, DEFAULT_VAN_URL);
        assert_eq!((v.committee_id, v.result_code_id), (Some(12345), Some(130)));
        assert_eq!((v.database.as_str(), v.mode()), ("MyCampaign", Some(1)));
        assert_eq!(v.max_calls_per_minute, 60);
        let built = EveryActionConfig {
            committee_id: Some(12345),
            result_code_id: Some(130),
            ..EveryActionConfig::new(&v.application_name, v.api_key.clone())
        };
        assert_eq!(format!("{built:?}"), format!("{v:?}"));
        let SinkConfig::Webhook(w) = &sinks[0].1 else { panic!() };
        assert_eq!(w.timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_database_names_its_mode() {
        let mode =
            |db: &str| EveryActionConfig { database: db.into(), ..EveryActionConfig::new("a", empty_secret()) }.mode();
        assert_eq!(
            [mode("MyCampaign"), mode("everyaction"), mode(" MyVoters "), mode("VoterFile")],
            [Some(1), Some(1), Some(0), None]
        );
    }

    #[test]
    fn problems_name_the_key_and_the_variable() {
        let van = VAN
            .replace("application_name = \"acme.optout\"\n", "")
            .replace("api_key = \"2d1f2a4e-6f1c-4f7e-9a1b-3c5d7e9f1a2b\"\n", "database = \"VoterFile\"\n")
            .replace("committee_id = 12345", "committee_id = 0");
        let hook = HOOK.replace("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "not base64!").replace("5s", "3m");
        let problems = parse(&format!("{van}{hook}")).unwrap().problems();
        for expected in [
            "sinks.van_state.application_name is empty",
            "sinks.van_state.api_key is empty (set OPTOUT_RELAY__SINKS__VAN_STATE__API_KEY)",
            "sinks.van_state.database \"VoterFile\" is not one of MyCampaign, EveryAction, MyVoters",
            "sinks.van_state.committee_id must be a VAN id above 0",
            "sinks.crm.secret is not whsec_ followed by base64",
            "relay.lease 2m is not longer than sinks.crm.timeout 3m",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(expected)), "{expected} in {problems:#?}");
        }
        let keyed = parse(&VAN.replace("9f1a2b\"", "9f1a2b|1\"")).unwrap().problems();
        assert!(keyed.iter().any(|p| p.contains("api_key holds a |")), "{keyed:?}");
        let short = parse(&HOOK.replace("C2FVsBQIhrscChlQIMV+b5sSYspob7oD", "YWJj")).unwrap().problems();
        assert!(short.iter().any(|p| p.contains("3 bytes of key")), "{short:?}");
        let bad = parse(&VAN.replace("12345", "\"twelve\"")).unwrap_err();
        // serde reports it at the sink (the tagged table hides the key), naming the value.
        assert!(bad.contains("van_state") && bad.contains("\"twelve\" is not a positive whole number"), "{bad}");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = parse(&HOOK.replace("timeout", "timout")).unwrap_err();
        assert!(err.contains("timout"), "{err}");
        let err = parse(&VAN.replace("committee_id", "committee")).unwrap_err();
        assert!(err.contains("committee"), "{err}");
    }
}
