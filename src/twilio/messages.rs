//! The one client of Twilio's REST API: listing an account's message log
//! (`GET /2010-04-01/Accounts/{sid}/Messages.json`), for reconciliation and
//! `backfill`.
//!
//! What the log holds and how it pages: newest first, `PageSize` up to 1000,
//! `next_page_uri` relative to the API base (null on the last page), dates
//! filtered by GMT day with `DateSent>` (on or after) and `DateSent<` (on or
//! before). A message carries no `OptOutType`: the caller classifies the body.
//!
//! Failures: 429 (Twilio's 20429, too many concurrent requests) and 5xx are
//! retried with a growing delay, or the one `Retry-After` asks for when that
//! is longer; a connection failure or timeout likewise. 401 is a
//! configuration mistake, never retried, and says which keys to look at.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use crate::config::TwilioConfig;

/// The most Twilio gives per page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Attempts per page before giving up on a run (429/5xx/network).
const ATTEMPTS: u32 = 6;
const FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest wait between attempts, whatever `Retry-After` says.
const MAX_DELAY: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum MessagesError {
    #[error("no twilio.account_sid configured: reading Twilio's message log needs the account (AC…)")]
    NoAccount,
    #[error("no credential for Twilio's API: set twilio.api_key_sid and twilio.api_key_secret, or twilio.auth_tokens")]
    NoCredential,
    #[error(
        "Twilio refused the credentials (401): check twilio.account_sid and twilio.api_key_sid/api_key_secret \
         (or the first of twilio.auth_tokens)"
    )]
    Unauthorized,
    #[error("Twilio answered {status} to the message list: {detail}")]
    Refused { status: u16, detail: String },
    #[error("Twilio still unavailable after {ATTEMPTS} attempts: {0}")]
    Unavailable(String),
    #[error("Twilio's message list cannot be read: {0}")]
    Unreadable(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// One message of the log, as much as reconciliation needs.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Message {
    pub sid: String,
    #[serde(default)]
    pub account_sid: Option<String>,
    #[serde(default)]
    pub messaging_service_sid: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub direction: Option<String>,
    /// RFC 2822, e.g. `Mon, 23 Nov 2026 17:45:04 +0000`; see [`Message::sent_at`].
    #[serde(default)]
    pub date_sent: Option<String>,
}

impl Message {
    /// Only what people sent us can be a revocation.
    pub fn is_inbound(&self) -> bool {
        self.direction.as_deref() == Some("inbound")
    }

    /// `date_sent` as an instant, when it is there and reads.
    pub fn sent_at(&self) -> Option<DateTime<Utc>> {
        parse_date_sent(self.date_sent.as_deref()?)
    }
}

/// Twilio's RFC 2822 dates.
pub fn parse_date_sent(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc2822(s.trim()).ok().map(|t| t.with_timezone(&Utc))
}

#[derive(Debug, Deserialize)]
struct Page {
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    next_page_uri: Option<String>,
}

/// Which part of the log to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// `DateSent>`: sent on or after this GMT day.
    pub since: NaiveDate,
    /// `DateSent<`: sent on or before this GMT day.
    pub until: Option<NaiveDate>,
    /// `To`: only messages to this number.
    pub to: Option<String>,
    pub page_size: u32,
}

/// The first page's path and query (relative to the API base), encoded as
/// Twilio documents it: `DateSent%3E=2026-11-22`.
pub fn first_page(account_sid: &str, listing: &Listing) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("DateSent>", &listing.since.format("%Y-%m-%d").to_string());
    if let Some(until) = listing.until {
        query.append_pair("DateSent<", &until.format("%Y-%m-%d").to_string());
    }
    if let Some(to) = &listing.to {
        query.append_pair("To", to);
    }
    query.append_pair("PageSize", &listing.page_size.clamp(1, MAX_PAGE_SIZE).to_string());
    let account: String = form_urlencoded::byte_serialize(account_sid.as_bytes()).collect();
    format!("/2010-04-01/Accounts/{account}/Messages.json?{}", query.finish())
}

/// The delay before attempt `n + 1` after `n` failures: 0.5 s doubling,
/// lengthened (never shortened) to what `Retry-After` asks, capped at a minute.
pub fn retry_delay(failures: u32, retry_after: Option<Duration>) -> Duration {
    let grown = FIRST_DELAY.saturating_mul(1 << failures.saturating_sub(1).min(10));
    grown.max(retry_after.unwrap_or_default()).min(MAX_DELAY)
}

/// A client of one account's message log.
#[derive(Clone)]
pub struct MessagesClient {
    http: reqwest::Client,
    base: String,
    account_sid: String,
    user: String,
    password: SecretString,
}

impl MessagesClient {
    /// The account and credential from `[twilio]`: the API key when one is
    /// configured, else the account SID and the first Auth Token.
    pub fn from_config(cfg: &TwilioConfig) -> Result<MessagesClient, MessagesError> {
        let account_sid =
            cfg.account_sid.as_deref().map(str::trim).filter(|s| !s.is_empty()).ok_or(MessagesError::NoAccount)?;
        let (user, password) = match (&cfg.api_key_sid, &cfg.api_key_secret) {
            (Some(sid), Some(secret)) => (sid.clone(), secret.clone()),
            _ => {
                let token = cfg.auth_tokens.first().ok_or(MessagesError::NoCredential)?;
                (account_sid.to_owned(), token.clone())
            }
        };
        // Idempotent; a client built before `main` installed it would panic.
        crate::install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("optout-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| MessagesError::Client(e.to_string()))?;
        Ok(MessagesClient {
            http,
            base: cfg.api_base.trim_end_matches('/').to_owned(),
            account_sid: account_sid.to_owned(),
            user,
            password,
        })
    }

    pub fn account_sid(&self) -> &str {
        &self.account_sid
    }

    /// The pages of `listing`, read one at a time as the caller asks (so a
    /// long backfill records as it goes and holds one page in memory).
    pub fn pages(&self, listing: &Listing) -> Pages<'_> {
        Pages { client: self, next: Some(first_page(&self.account_sid, listing)) }
    }

    /// One page, retried on 429, 5xx and network failures.
    async fn page(&self, uri: &str) -> Result<Page, MessagesError> {
        let url = format!("{}{uri}", self.base);
        let mut failures = 0;
        loop {
            let (why, retry_after) = match self.attempt(&url).await {
                Attempt::Done(page) => return Ok(*page),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry { why, retry_after } => (why, retry_after),
            };
            failures += 1;
            if failures >= ATTEMPTS {
                return Err(MessagesError::Unavailable(why));
            }
            let delay = retry_delay(failures, retry_after);
            tracing::warn!(reason = %why, ?delay, attempt = failures, "Twilio message list: retrying");
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, url: &str) -> Attempt {
        let sent = self
            .http
            .get(url)
            .basic_auth(&self.user, Some(self.password.expose_secret()))
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await;
        let res = match sent {
            Ok(res) => res,
            // The error names the URL, which holds no secret (auth is a header).
            Err(e) => return Attempt::Retry { why: format!("no answer: {e}"), retry_after: None },
        };
        let status = res.status();
        let retry_after = res
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = match res.text().await {
            Ok(t) => t,
            Err(e) => return Attempt::Retry { why: format!("body unreadable: {e}"), retry_after: None },
        };
        if status.is_success() {
            return match serde_json::from_str::<Page>(&text) {
                Ok(page) => Attempt::Done(Box::new(page)),
                Err(e) => Attempt::Fatal(MessagesError::Unreadable(e.to_string())),
            };
        }
        let detail = twilio_error(&text);
        match status.as_u16() {
            401 => Attempt::Fatal(MessagesError::Unauthorized),
            429 => Attempt::Retry { why: format!("429 {detail}"), retry_after },
            s if status.is_server_error() => Attempt::Retry { why: format!("{s} {detail}"), retry_after },
            s => Attempt::Fatal(MessagesError::Refused { status: s, detail }),
        }
    }
}

/// A listing being read; see [`MessagesClient::pages`].
pub struct Pages<'a> {
    client: &'a MessagesClient,
    next: Option<String>,
}

impl Pages<'_> {
    /// The next page's messages; `None` after the last page.
    pub async fn next(&mut self) -> Result<Option<Vec<Message>>, MessagesError> {
        let Some(uri) = self.next.take() else { return Ok(None) };
        let page = self.client.page(&uri).await?;
        // A relative URI continues on our base; anything else is not Twilio's paging.
        self.next = page.next_page_uri.filter(|u| u.starts_with('/'));
        Ok(Some(page.messages))
    }
}

enum Attempt {
    Done(Box<Page>),
    Retry { why: String, retry_after: Option<Duration> },
    Fatal(MessagesError),
}

/// Twilio's error body (`{"code": 20429, "message": "…"}`), shortened, or the start of whatever came.
fn twilio_error(text: &str) -> String {
    #[derive(Deserialize)]
    struct Body {
        code: Option<i64>,
        message: Option<String>,
    }
    match serde_json::from_str::<Body>(text) {
        Ok(Body { code, message }) => {
            format!("(code {}) {}", code.map_or_else(|| "?".to_owned(), |c| c.to_string()), message.unwrap_or_default())
        }
        Err(_) => text.chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_page_filters_by_gmt_day_as_twilio_documents() {
        let listing = Listing {
            since: NaiveDate::from_ymd_opt(2026, 11, 22).expect("date"),
            until: None,
            to: None,
            page_size: 5000,
        };
        assert_eq!(
            first_page("AC123", &listing),
            "/2010-04-01/Accounts/AC123/Messages.json?DateSent%3E=2026-11-22&PageSize=1000"
        );
        let listing = Listing {
            until: Some(NaiveDate::from_ymd_opt(2026, 11, 23).expect("date")),
            to: Some("+15005550006".into()),
            page_size: 50,
            ..listing
        };
        assert_eq!(
            first_page("AC123", &listing),
            "/2010-04-01/Accounts/AC123/Messages.json?DateSent%3E=2026-11-22&DateSent%3C=2026-11-23\
             &To=%2B15005550006&PageSize=50"
        );
    }

    #[test]
    fn date_sent_reads_as_rfc_2822() {
        let t = parse_date_sent("Mon, 23 Nov 2026 17:45:04 +0000").expect("reads");
        assert_eq!(t.to_rfc3339(), "2026-11-23T17:45:04+00:00");
        assert_eq!(parse_date_sent("Mon, 23 Nov 2026 12:45:04 -0500"), Some(t));
        assert_eq!(parse_date_sent("2026-11-23"), None);
        assert_eq!(parse_date_sent(""), None);
    }

    #[test]
    fn retries_grow_and_honour_a_longer_retry_after_up_to_a_minute() {
        let cases: &[(u32, Option<u64>, u64)] = &[
            (1, None, 500),
            (2, None, 1000),
            (3, None, 2000),
            (1, Some(3), 3000),
            (3, Some(1), 2000),
            (1, Some(3600), 60_000),
            (20, None, 60_000),
        ];
        for &(failures, after, want_ms) in cases {
            let got = retry_delay(failures, after.map(Duration::from_secs));
            assert_eq!(got, Duration::from_millis(want_ms), "{failures} failures, Retry-After {after:?}");
        }
    }

    #[test]
    fn only_inbound_messages_count() {
        let m = |direction: &str| Message {
            sid: "SM1".into(),
            account_sid: None,
            messaging_service_sid: None,
            from: None,
            to: None,
            body: None,
            direction: Some(direction.into()),
            date_sent: None,
        };
        assert!(m("inbound").is_inbound());
        for d in ["outbound-api", "outbound-call", "outbound-reply", "Inbound "] {
            assert!(!m(d).is_inbound(), "{d}");
        }
    }

    #[test]
    fn the_credential_is_the_api_key_when_set_else_the_account_and_first_token() {
        let mut cfg = TwilioConfig { account_sid: Some("AC1".into()), ..TwilioConfig::default() };
        assert!(matches!(MessagesClient::from_config(&cfg), Err(MessagesError::NoCredential)));
        cfg.auth_tokens = vec![SecretString::from("tok1"), SecretString::from("tok2")];
        let c = MessagesClient::from_config(&cfg).expect("client");
        assert_eq!((c.user.as_str(), c.password.expose_secret()), ("AC1", "tok1"));
        cfg.api_key_sid = Some("SK9".into());
        cfg.api_key_secret = Some(SecretString::from("keysecret"));
        let c = MessagesClient::from_config(&cfg).expect("client");
        assert_eq!((c.user.as_str(), c.password.expose_secret()), ("SK9", "keysecret"));
        cfg.account_sid = None;
        assert!(matches!(MessagesClient::from_config(&cfg), Err(MessagesError::NoAccount)));
    }
}
