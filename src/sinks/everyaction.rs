//! EveryAction / NGP VAN: marks a phone opted out (`O`) or back in (`I`) on
//! every VAN person known to hold it, so lists pulled from VAN stop
//! including people who said STOP in any texting tool.
//!
//! **Calls.** `POST {url}people/{vanId}` with
//! `{"phones": [{"phoneNumber": "<10 digits>", "phoneOptInStatus": "O"}]}`:
//! VAN's findOrCreate with the vanId set updates that person only (it never
//! creates one). With `result_code_id`, an opt-out also posts a canvass
//! response (`people/{vanId}/canvassResponses`, contact type SMS) such as
//! 130 "Do Not Text". HTTP Basic auth: the application name, and the key
//! with the database mode (`KEY|1` MyCampaign / EveryAction, `KEY|0` MyVoters).
//!
//! **Mapping.** The relay, not the sink, looks up the vanIds of a phone
//! (`van_ids`, imported with `import-van-ids`) and hands them over; a phone
//! with none, or a number VAN cannot take (not a US number), never reaches
//! the sink (see [`skip_reason`]).
//!
//! **Answers.** 2xx: done (the vanId and VAN's `status` are kept on the
//! delivery). 404: that person is gone (deleted or merged): done, with a
//! note, never retried in a loop. 401/403: the key is wrong; 400: VAN
//! refuses what we send (its error text is quoted): both misconfigured.
//! 429 and 5xx: transient, `Retry-After` honoured. A request that was sent
//! and got no answer (timeout, cut connection) is uncertain: VAN may still
//! apply it, so the relay writes the phone's current target again soon and
//! once more later, in case the stray request lands after a newer write.
//!
//! **Pace and leases.** VAN publishes no rate limit: calls are spaced at
//! `max_calls_per_minute` (one limiter per sink, shared by its workers). No
//! call starts with less than the request timeout left before the caller's
//! deadline (the end of its lease); the items done so far are reported and
//! the rest go back to the queue.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::http::{self, NoAnswer};
use super::redcap::limiter::Limiter;
use super::{Converged, SinkError, Target};
use crate::config::EveryActionConfig;
use crate::domain::Phone;

/// VAN's contact type for a text message, for canvass responses.
const CONTACT_TYPE_SMS: u32 = 37;
/// VAN's input type "API".
const INPUT_TYPE_API: u32 = 11;

/// One phone to bring to its target on these VAN people.
#[derive(Debug, Clone)]
pub struct VanItem {
    pub phone: Phone,
    pub target: Target,
    /// Never empty: a phone without one is not sent (see [`skip_reason`]).
    pub van_ids: Vec<u64>,
}

/// Why a phone is not sent to VAN at all (its delivery is done, with this
/// as the note), or `None` when it is.
pub fn skip_reason(phone: &Phone, van_ids: &[u64]) -> Option<&'static str> {
    if van_ids.is_empty() {
        return Some("no vanId is known for this phone (import them with optout-relay import-van-ids FILE.csv)");
    }
    if van_phone(phone).is_none() {
        return Some("VAN takes US numbers only; this one is not");
    }
    None
}

/// The number as VAN takes it: 10 digits of a US number
/// (`^1?[2-9][0-8]\d[2-9]\d{6}$`, without the leading 1).
pub fn van_phone(phone: &Phone) -> Option<String> {
    let digits = phone.as_str().strip_prefix("+1")?;
    let b = digits.as_bytes();
    let ok = b.len() == 10
        && b.iter().all(u8::is_ascii_digit)
        && (b'2'..=b'9').contains(&b[0])
        && (b'0'..=b'8').contains(&b[1])
        && (b'2'..=b'9').contains(&b[3]);
    ok.then(|| digits.to_owned())
}

/// The EveryAction / VAN client of one committee. Cheap to clone; clones share the limiter.
#[derive(Clone)]
pub struct EveryActionSink {
    client: reqwest::Client,
    base: reqwest::Url,
    user: String,
    /// `KEY|mode`.
    password: SecretString,
    timeout: Duration,
    limiter: Limiter,
    result_code_id: Option<u64>,
    name: Arc<str>,
}

/// What one person's call came to.
enum Person {
    Updated { status: Option<String> },
    NotFound,
}

impl EveryActionSink {
    /// Builds the client; refuses settings it cannot work with. Makes no call.
    pub fn new(cfg: &EveryActionConfig) -> Result<EveryActionSink, String> {
        let mut base =
            reqwest::Url::parse(cfg.url.trim()).map_err(|e| format!("url {:?} is not a URL: {e}", cfg.url))?;
        if !matches!(base.scheme(), "https" | "http") {
            return Err(format!("url {:?} must start with https:// or http://", cfg.url));
        }
        // `people/1` is joined onto the base: without a trailing slash `v4` would be replaced.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        let mode = cfg.mode().ok_or_else(|| format!("database {:?} is not MyCampaign or MyVoters", cfg.database))?;
        let key = cfg.api_key.expose_secret().trim();
        if key.is_empty() || cfg.application_name.trim().is_empty() {
            return Err("application_name and api_key are required".to_owned());
        }
        if !(1..=600).contains(&cfg.max_calls_per_minute) {
            return Err("max_calls_per_minute must be between 1 and 600".to_owned());
        }
        Ok(EveryActionSink {
            client: http::client(cfg.request_timeout)?,
            base,
            user: cfg.application_name.trim().to_owned(),
            password: SecretString::from(format!("{key}|{mode}")),
            timeout: cfg.request_timeout,
            limiter: Limiter::per_minute(cfg.max_calls_per_minute),
            result_code_id: cfg.result_code_id,
            name: Arc::from("everyaction"),
        })
    }

    /// The same sink under its configured name (logs, metrics).
    pub fn named(mut self, name: &str) -> EveryActionSink {
        self.name = Arc::from(name);
        self
    }

    /// How long one call may take, its answer read included.
    pub fn request_timeout(&self) -> Duration {
        self.timeout
    }

    /// Brings each item's people to its target, in order, one call per
    /// vanId (two with a canvass response). Returns one account per item
    /// done; on a failure (or a deadline reached) the items done before it
    /// and the error: the rest are not done.
    pub async fn converge(&self, items: &[VanItem], deadline: Option<Instant>) -> Converged {
        let mut done = Vec::with_capacity(items.len());
        for item in items {
            match self.converge_one(item, deadline).await {
                Ok(value) => done.push(value),
                Err(error) => return Converged { done, error: Some(error) },
            }
        }
        Converged { done, error: None }
    }

    async fn converge_one(&self, item: &VanItem, deadline: Option<Instant>) -> Result<Value, SinkError> {
        let number = van_phone(&item.phone)
            .ok_or_else(|| SinkError::Misconfigured("VAN takes US numbers only (the relay should skip it)".into()))?;
        let status = if item.target.is_opted_out() { "O" } else { "I" };
        let body = json!({"phones": [{"phoneNumber": number, "phoneOptInStatus": status}]});
        let mut written = Vec::new();
        let mut not_found = Vec::new();
        let mut statuses = Map::new();
        let mut canvassed = Vec::new();
        for van_id in &item.van_ids {
            match self.person(*van_id, &body, deadline).await? {
                Person::Updated { status } => {
                    written.push(*van_id);
                    statuses.insert(van_id.to_string(), status.map_or(Value::Null, Value::String));
                }
                Person::NotFound => {
                    not_found.push(*van_id);
                    continue;
                }
            }
            if let (Some(code), Target::OptedOut { since }) = (self.result_code_id, item.target) {
                let response = json!({
                    "canvassContext": {
                        "contactTypeId": CONTACT_TYPE_SMS,
                        "inputTypeId": INPUT_TYPE_API,
                        "dateCanvassed": since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        "phone": {"phoneNumber": number, "smsOptInStatus": "O"},
                    },
                    "resultCodeId": code,
                    "responses": null,
                });
                let path = format!("people/{van_id}/canvassResponses");
                // The person was just updated, so a 404 here is as good as gone: noted, not retried.
                if self.post(&path, &response, deadline).await?.is_some() {
                    canvassed.push(*van_id);
                }
            }
        }
        let mut out = json!({
            "van_ids": item.van_ids,
            "written": written,
            "phone_opt_in_status": status,
            "van_status": statuses,
        });
        if self.result_code_id.is_some() && item.target.is_opted_out() {
            out["canvass_response"] = json!({"result_code_id": self.result_code_id, "van_ids": canvassed});
        }
        if !not_found.is_empty() {
            out["not_found"] = json!(not_found);
            let ids: Vec<String> = not_found.iter().map(u64::to_string).collect();
            out["note"] = json!(format!(
                "VAN has no person with vanId {} (deleted or merged; fix the mapping and import it again)",
                ids.join(", ")
            ));
            tracing::warn!(
                sink = %self.name,
                phone = %item.phone.masked(),
                van_ids = %ids.join(","),
                "VAN has no person with this vanId; nothing to update there"
            );
        }
        Ok(out)
    }

    async fn person(&self, van_id: u64, body: &Value, deadline: Option<Instant>) -> Result<Person, SinkError> {
        let answer = self.post(&format!("people/{van_id}"), body, deadline).await?;
        Ok(match answer {
            None => Person::NotFound,
            Some(v) => Person::Updated { status: v.get("status").and_then(Value::as_str).map(str::to_owned) },
        })
    }

    /// One POST: its JSON answer (`Null` when empty), `None` on a 404, or the error it means.
    async fn post(&self, path: &str, body: &Value, deadline: Option<Instant>) -> Result<Option<Value>, SinkError> {
        self.limiter.wait().await;
        if let Some(deadline) = deadline {
            if deadline.saturating_duration_since(Instant::now()) < self.timeout {
                tracing::info!(sink = %self.name, "VAN call not started: the lease runs out first");
                return Err(SinkError::OutOfTime);
            }
        }
        let url = self.base.join(path).map_err(|e| SinkError::Misconfigured(format!("VAN url: {e}")))?;
        let started = std::time::Instant::now();
        let result = async {
            let res = self
                .client
                .post(url)
                .basic_auth(&self.user, Some(self.password.expose_secret()))
                .json(body)
                .send()
                .await
                .map_err(|e| self.no_answer(http::no_answer(e), true))?;
            let status = res.status().as_u16();
            let retry_after = http::retry_after(res.headers());
            let text = res.text().await.map_err(|e| self.no_answer(http::no_answer(e), true))?;
            classify(status, retry_after, &text)
        }
        .await;
        crate::metrics::sink_call(&self.name, "van_post", started.elapsed().as_secs_f64());
        result.map_err(|e| scrub(e, self.password.expose_secret()))
    }

    /// One read that proves the key works (`GET apiKeyProfiles`): how a
    /// failing sink with nothing to write finds out it works again.
    pub async fn probe(&self) -> Result<(), SinkError> {
        self.limiter.wait().await;
        let url = self.base.join("apiKeyProfiles").map_err(|e| SinkError::Misconfigured(format!("VAN url: {e}")))?;
        let result = async {
            let res = self
                .client
                .get(url)
                .basic_auth(&self.user, Some(self.password.expose_secret()))
                .send()
                .await
                .map_err(|e| self.no_answer(http::no_answer(e), false))?;
            let status = res.status().as_u16();
            let retry_after = http::retry_after(res.headers());
            let text = res.text().await.map_err(|e| self.no_answer(http::no_answer(e), false))?;
            match classify(status, retry_after, &text)? {
                Some(_) => Ok(()),
                None => Err(SinkError::Misconfigured(
                    "VAN answered 404 to apiKeyProfiles: is url the API's base (…/v4/)?".to_owned(),
                )),
            }
        }
        .await;
        result.map_err(|e| scrub(e, self.password.expose_secret()))
    }

    fn no_answer(&self, n: NoAnswer, writes: bool) -> SinkError {
        let host = self.base.origin().ascii_serialization();
        if writes && n.connected {
            let why = if n.timed_out { format!("no answer within {:?}", self.timeout) } else { n.text };
            return SinkError::Uncertain(format!(
                "VAN at {host} did not answer a sent update ({why}): it may apply it"
            ));
        }
        let message = if n.timed_out {
            format!("VAN at {host} did not answer within {:?}", self.timeout)
        } else {
            format!("cannot reach VAN at {host}: {}", n.text)
        };
        SinkError::Transient { message, retry_after: None }
    }
}

/// What VAN's answer means: its JSON (`Null` when empty), `None` for a 404
/// (no such person), or the error to back off on.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> Result<Option<Value>, SinkError> {
    match status {
        200..=299 => Ok(Some(serde_json::from_str(body).unwrap_or(Value::Null))),
        404 => Ok(None),
        401 | 403 => Err(SinkError::Misconfigured(format!(
            "VAN refused the application name or API key ({status}): {}; check application_name, api_key and \
             database (the key's mode)",
            van_error(body)
        ))),
        400 => Err(SinkError::Misconfigured(format!("VAN rejected the request (400): {}", van_error(body)))),
        429 => Err(SinkError::Transient {
            message: format!("VAN is rate-limiting this key (429): {}", van_error(body)),
            retry_after,
        }),
        500..=599 => {
            Err(SinkError::Transient { message: format!("VAN answered {status}: {}", van_error(body)), retry_after })
        }
        300..=399 => Err(SinkError::Misconfigured(format!(
            "VAN answered with a redirect ({status}): set url to the API's final address"
        ))),
        _ => Err(SinkError::Misconfigured(format!("VAN answered {status}: {}", van_error(body)))),
    }
}

/// VAN's error text: `{"errors": [{"code", "text", "properties"}]}`, else the body.
fn van_error(body: &str) -> String {
    let parsed: Option<Vec<String>> = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        let errors = v.get("errors")?.as_array()?;
        Some(
            errors
                .iter()
                .map(|e| {
                    let text = e.get("text").and_then(Value::as_str).unwrap_or("");
                    let code = e.get("code").and_then(Value::as_str).unwrap_or("");
                    let props: Vec<&str> = e
                        .get("properties")
                        .and_then(Value::as_array)
                        .map(|p| p.iter().filter_map(Value::as_str).collect())
                        .unwrap_or_default();
                    let mut s = if code.is_empty() { text.to_owned() } else { format!("{code}: {text}") };
                    if !props.is_empty() {
                        s.push_str(&format!(" ({})", props.join(", ")));
                    }
                    s
                })
                .collect(),
        )
    });
    match parsed {
        Some(list) if !list.is_empty() => http::snippet(&list.join("; ")),
        _ => http::snippet(body),
    }
}

/// Replaces the key wherever a message carries it.
fn scrub(e: SinkError, secret: &str) -> SinkError {
    let key = secret.split('|').next().unwrap_or_default();
    if key.is_empty() {
        return e;
    }
    let clean = |m: String| m.replace(key, "[REDACTED]");
    match e {
        SinkError::Transient { message, retry_after } => SinkError::Transient { message: clean(message), retry_after },
        SinkError::Misconfigured(m) => SinkError::Misconfigured(clean(m)),
        SinkError::Uncertain(m) => SinkError::Uncertain(clean(m)),
        SinkError::OutOfTime => SinkError::OutOfTime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(s: &str) -> Phone {
        Phone::from_stored(s.to_owned())
    }

    #[test]
    fn van_takes_ten_digits_of_a_us_number() {
        assert_eq!(van_phone(&phone("+14155550101")).as_deref(), Some("4155550101"));
        for not in ["+442071838750", "+11235550101", "+14195550101x", "+1415555010", "+14151550101"] {
            assert_eq!(van_phone(&phone(not)), None, "{not}");
        }
    }

    #[test]
    fn phones_without_a_van_id_or_a_us_number_are_skipped_with_a_reason() {
        assert!(skip_reason(&phone("+14155550101"), &[]).unwrap().contains("import-van-ids"));
        assert!(skip_reason(&phone("+442071838750"), &[7]).unwrap().contains("US numbers"));
        assert_eq!(skip_reason(&phone("+14155550101"), &[7]), None);
    }

    #[test]
    fn answers_are_classified() {
        assert_eq!(classify(201, None, r#"{"vanId":7,"status":"Processed"}"#).unwrap().unwrap()["vanId"], 7);
        assert_eq!(classify(204, None, "").unwrap(), Some(Value::Null));
        assert_eq!(classify(404, None, "").unwrap(), None);
        for s in [401, 403] {
            assert!(matches!(classify(s, None, ""), Err(SinkError::Misconfigured(_))), "{s}");
        }
        let body = r#"{"errors":[{"code":"INVALID_PARAMETER","text":"'phoneNumber' is invalid","properties":["phones[0].phoneNumber"]}]}"#;
        match classify(400, None, body) {
            Err(SinkError::Misconfigured(m)) => assert_eq!(
                m,
                "VAN rejected the request (400): INVALID_PARAMETER: 'phoneNumber' is invalid (phones[0].phoneNumber)"
            ),
            other => panic!("{other:?}"),
        }
        match classify(429, Some(Duration::from_secs(30)), "slow down") {
            Err(SinkError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(30))),
            other => panic!("{other:?}"),
        }
        for s in [500, 502, 503] {
            assert!(matches!(classify(s, None, "<html>"), Err(SinkError::Transient { .. })), "{s}");
        }
        assert!(matches!(classify(302, None, ""), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(405, None, ""), Err(SinkError::Misconfigured(_))));
    }

    #[test]
    fn messages_never_carry_the_key() {
        let e = scrub(SinkError::Misconfigured("echo 1234-abcd".into()), "1234-abcd|1");
        assert_eq!(e.to_string(), "echo [REDACTED]");
    }
}
