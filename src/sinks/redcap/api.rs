//! The REDCap API client: one form POST per call, each waiting its turn at
//! the limiter, and every answer turned into the JSON it carries or the
//! [`SinkError`] it means. Also what the metadata export says about fields.
//!
//! Errors are classified here once: what an operator must fix (a refused
//! token, an unknown field, a redirect) is `Misconfigured`; what may pass by
//! itself (timeouts, 5xx, 429, a garbled body) is `Transient`. The token is
//! scrubbed from every message, though REDCap never echoes it.
//!
//! A write (the record import) is classified apart: once its request may
//! have reached REDCap, a failure no longer means "nothing happened". PHP
//! runs on after the client hangs up and a proxy's 5xx says nothing of what
//! the PHP behind it did, so a timeout, a connection lost after connecting,
//! a 5xx or an unreadable answer is `Uncertain`: the write may land, now or
//! later, and the relay re-reads rather than assuming either way. Only what
//! proves nothing was applied stays `Transient` (no connection made, 429:
//! REDCap's limiter refuses before running the call) or `Misconfigured`
//! (4xx and `{"error"}` answers: REDCap validates the whole import before
//! writing any of it).
//!
//! A call can be given a deadline (the end of the worker's lease): it is
//! checked after the limiter wait, right before sending, because that wait
//! can be long and a write sent by a worker whose lease has run out may land
//! after a newer worker's write.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use tokio::time::Instant;

use super::limiter::Limiter;
use super::SINK_NAME;
use crate::sinks::http::no_answer;
use crate::sinks::SinkError;

/// REDCap error texts (HTML pages on a 5xx) are cut to this for messages.
const MAX_MESSAGE_CHARS: usize = 500;

/// The API endpoint of one project. Cheap to clone; clones share the limiter.
#[derive(Clone)]
pub(super) struct Api {
    client: reqwest::Client,
    url: String,
    /// Scheme, host and port only, for messages (never user info, path or query).
    host: String,
    token: SecretString,
    timeout: Duration,
    limiter: Limiter,
    /// The sink's name, for metrics and logs.
    sink: Arc<str>,
}

/// The API URL, refused unless it is http(s).
pub(super) fn endpoint(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|e| format!("redcap.url is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("redcap.url must start with https:// or http://".to_owned());
    }
    Ok(url)
}

impl Api {
    /// Builds the HTTP client. Makes no call.
    pub(super) fn new(
        url: reqwest::Url,
        token: SecretString,
        timeout: Duration,
        calls_per_minute: u32,
    ) -> Result<Api, String> {
        crate::install_tls_provider();
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            // A redirect would turn the POST into a GET without its body (and
            // REDCap answers 501); better to tell the operator the right URL.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("optout-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Api {
            client,
            host: url.origin().ascii_serialization(),
            url: url.to_string(),
            token,
            timeout,
            limiter: Limiter::per_minute(calls_per_minute),
            sink: Arc::from(SINK_NAME),
        })
    }

    /// The same client reporting under another sink name.
    pub(super) fn named(mut self, name: &str) -> Api {
        self.sink = Arc::from(name);
        self
    }

    pub(super) fn sink(&self) -> &str {
        &self.sink
    }

    /// How long one call may take, answer read included.
    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The limiter's spacing between two calls.
    pub(super) fn spacing(&self) -> Duration {
        self.limiter.interval()
    }

    /// Scheme, host and port of the endpoint: safe to show.
    pub(super) fn host(&self) -> &str {
        &self.host
    }

    /// One API call: waits for the limiter, POSTs the form, classifies the answer.
    pub(super) async fn call(&self, op: Op, params: &[(&str, &str)]) -> Result<Value, SinkError> {
        self.call_within(op, params, None).await
    }

    /// [`Api::call`], but refused as transient, without sending anything,
    /// when less than the request timeout is left before `deadline` once the
    /// limiter has let the call through: it could not finish in time.
    pub(super) async fn call_within(
        &self,
        op: Op,
        params: &[(&str, &str)],
        deadline: Option<Instant>,
    ) -> Result<Value, SinkError> {
        self.limiter.wait().await;
        if let Some(deadline) = deadline {
            if deadline.saturating_duration_since(Instant::now()) < self.timeout {
                tracing::info!(sink = %self.sink, op = op.what(), "REDCap call not started: the lease runs out first");
                return Err(SinkError::OutOfTime);
            }
        }
        let mut form: Vec<(&str, &str)> = Vec::with_capacity(params.len() + 3);
        form.push(("token", self.token.expose_secret()));
        form.push(("format", "json"));
        form.push(("returnFormat", "json"));
        form.extend_from_slice(params);
        let started = std::time::Instant::now();
        let result = async {
            let res = self.client.post(&self.url).form(&form).send().await.map_err(|e| self.transport_error(op, e))?;
            let status = res.status().as_u16();
            let retry_after = res
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let location =
                res.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = res.text().await.map_err(|e| self.transport_error(op, e))?;
            classify(op, status, retry_after, location.as_deref(), &body)
        }
        .await;
        crate::metrics::sink_call(&self.sink, op.label(), started.elapsed().as_secs_f64());
        tracing::debug!(
            sink = %self.sink,
            op = op.what(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            ok = result.is_ok(),
            "REDCap call"
        );
        // Belt and braces: REDCap never echoes the token, but no message of ours may carry it.
        result.map_err(|e| scrub(e, self.token.expose_secret()))
    }

    fn transport_error(&self, op: Op, e: reqwest::Error) -> SinkError {
        if e.is_builder() {
            return SinkError::Misconfigured(format!("cannot build the REDCap {}: {}", op.what(), e.without_url()));
        }
        let failed = no_answer(e);
        transport_failure(op, &self.host, self.timeout, failed.connected, failed.timed_out, &failed.text)
    }
}

/// What a call that got no complete answer means. `connected`: a connection
/// was made, so the request may have been sent (reqwest cannot say whether
/// all of it went out); a write is then uncertain, as REDCap may run it
/// whatever became of the connection.
fn transport_failure(op: Op, host: &str, timeout: Duration, connected: bool, timed_out: bool, text: &str) -> SinkError {
    let what = op.what();
    if op.writes() && connected {
        let message = if timed_out {
            format!("REDCap at {host} did not answer the {what} within {timeout:?}: it may still apply it")
        } else {
            format!("the connection to REDCap at {host} failed during the {what} ({text}): it may have been applied")
        };
        return SinkError::Uncertain(message);
    }
    let message = if timed_out {
        format!("REDCap at {host} did not answer the {what} within {timeout:?}")
    } else {
        format!("cannot reach REDCap at {host} for the {what}: {text}")
    };
    SinkError::Transient { message, retry_after: None }
}

/// The calls the sink makes, for messages and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Project,
    Metadata,
    Events,
    Export,
    Import,
}

impl Op {
    /// Short label for metrics.
    fn label(self) -> &'static str {
        match self {
            Op::Project => "project",
            Op::Metadata => "metadata",
            Op::Events => "event",
            Op::Export => "export",
            Op::Import => "import",
        }
    }

    /// Whether the call changes the project, so a failure after sending leaves it uncertain.
    fn writes(self) -> bool {
        self == Op::Import
    }

    /// What the call is, for messages.
    fn what(self) -> &'static str {
        match self {
            Op::Project => "project info request",
            Op::Metadata => "metadata export",
            Op::Events => "event export",
            Op::Export => "record export",
            Op::Import => "record import",
        }
    }
}

/// Turns an HTTP answer into the JSON it carries or the sink error it means.
pub(super) fn classify(
    op: Op,
    status: u16,
    retry_after: Option<Duration>,
    location: Option<&str>,
    body: &str,
) -> Result<Value, SinkError> {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let error_text = parsed.as_ref().and_then(|v| v.get("error")).map(text_of);
    let message = error_text.clone().unwrap_or_else(|| snippet(body));
    let what = op.what();
    match status {
        200..=299 => match parsed {
            _ if error_text.is_some() => Err(SinkError::Misconfigured(format!("REDCap refused the {what}: {message}"))),
            Some(v) => Ok(v),
            None if op.writes() => Err(SinkError::Uncertain(format!(
                "REDCap answered the {what} with a body that is not JSON ({message}): it may have been applied"
            ))),
            None => Err(SinkError::Transient {
                message: format!("REDCap answered the {what} with a body that is not JSON: {message}"),
                retry_after: None,
            }),
        },
        429 => {
            tracing::error!(
                retry_after_secs = retry_after.map(|d| d.as_secs()),
                "REDCap answered 429: it is rate-limiting this IP, and past its limit it bans the IP until an \
                 administrator lifts the ban; check redcap.max_calls_per_minute and other API clients on this IP"
            );
            Err(SinkError::Transient {
                message: format!("REDCap is rate-limiting this IP (429) on the {what}: {message}"),
                retry_after,
            })
        }
        403 => Err(SinkError::Misconfigured(format!("REDCap refused the API token (403): {message}"))),
        400 => Err(SinkError::Misconfigured(format!("REDCap rejected the {what} (400): {message}"))),
        // A proxy's 504 or a PHP fatal error says nothing of what REDCap wrote before it.
        408 | 500..=599 if op.writes() => Err(SinkError::Uncertain(format!(
            "REDCap answered {status} to the {what} ({message}): it may have been applied, in part or whole"
        ))),
        408 | 500..=599 => Err(SinkError::Transient {
            message: format!("REDCap answered {status} to the {what}: {message}"),
            retry_after,
        }),
        300..=399 => Err(SinkError::Misconfigured(format!(
            "REDCap answered the {what} with a redirect ({status}) to {}: set redcap.url to the final API address",
            location.unwrap_or("?")
        ))),
        _ => Err(SinkError::Misconfigured(format!("REDCap answered {status} to the {what}: {message}"))),
    }
}

/// Replaces the token wherever a message carries it.
fn scrub(e: SinkError, token: &str) -> SinkError {
    if token.is_empty() {
        return e;
    }
    match e {
        SinkError::Transient { message, retry_after } => {
            SinkError::Transient { message: message.replace(token, "[REDACTED]"), retry_after }
        }
        SinkError::Misconfigured(m) => SinkError::Misconfigured(m.replace(token, "[REDACTED]")),
        SinkError::Uncertain(m) => SinkError::Uncertain(m.replace(token, "[REDACTED]")),
        SinkError::OutOfTime => SinkError::OutOfTime,
    }
}

/// A body reduced to one short line for an error message.
fn snippet(body: &str) -> String {
    crate::sinks::http::snippet_at(body, MAX_MESSAGE_CHARS)
}

/// A JSON scalar as REDCap means it: strings as they are, numbers as text, null as blank.
pub(super) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What the metadata says about one field.
#[derive(Debug, Clone)]
pub(super) struct FieldInfo {
    pub(super) name: String,
    /// The instrument the field is on.
    pub(super) form: String,
    pub(super) field_type: String,
    /// Lowercased; empty for free text.
    pub(super) validation: String,
}

/// The project's metadata export, reduced to what the sink needs.
pub(super) struct Metadata {
    /// The first field of the metadata.
    pub(super) record_id: String,
    pub(super) fields: HashMap<String, FieldInfo>,
}

impl Metadata {
    pub(super) fn parse(v: &Value) -> Result<Metadata, String> {
        let rows = v.as_array().ok_or("REDCap's metadata export is not a JSON array")?;
        let mut record_id = None;
        let mut fields = HashMap::with_capacity(rows.len());
        for row in rows {
            let get = |k: &str| row.get(k).map(text_of).unwrap_or_default();
            let name = get("field_name");
            if name.is_empty() {
                continue;
            }
            record_id.get_or_insert_with(|| name.clone());
            let info = FieldInfo {
                name: name.clone(),
                form: get("form_name"),
                field_type: get("field_type"),
                validation: get("text_validation_type_or_show_slider_number").trim().to_ascii_lowercase(),
            };
            fields.insert(name, info);
        }
        let record_id = record_id.ok_or("REDCap's metadata lists no fields")?;
        Ok(Metadata { record_id, fields })
    }
}

/// Whether an import's `{"count": N}` (distinct records written) covers the
/// `sent` distinct records. A lower or unreadable count means some rows may
/// or may not have been written, so the write is uncertain: the relay reads
/// the records again and writes what still differs. A higher count is fine:
/// everything sent was written.
pub(super) fn confirm_import(answer: &Value, sent: usize) -> Result<(), SinkError> {
    let count = answer.get("count").and_then(|c| c.as_u64().or_else(|| c.as_str()?.trim().parse().ok()));
    let message = match count {
        Some(n) if n >= sent as u64 => return Ok(()),
        Some(n) => format!("REDCap's import reported {n} record(s) updated of {sent} sent: some may not be written"),
        None => format!(
            "REDCap's import answer holds no readable record count ({}) for {sent} record(s) sent: some may not be \
             written",
            snippet(&answer.to_string())
        ),
    };
    Err(SinkError::Uncertain(message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_classified() {
        let op = Op::Export;
        assert_eq!(classify(op, 200, None, None, "[]").unwrap(), json!([]));
        assert!(matches!(classify(op, 200, None, None, r#"{"error":"x"}"#), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(op, 200, None, None, "<html>"), Err(SinkError::Transient { .. })));
        assert!(matches!(classify(op, 500, None, None, "oops"), Err(SinkError::Transient { .. })));
        assert!(matches!(classify(op, 503, None, None, ""), Err(SinkError::Transient { .. })));
        match classify(op, 429, Some(Duration::from_secs(60)), None, "Too many") {
            Err(SinkError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(60))),
            other => panic!("{other:?}"),
        }
        match classify(op, 403, None, None, r#"{"error":"You do not have permissions to use the API"}"#) {
            Err(SinkError::Misconfigured(m)) => {
                assert!(m.starts_with("REDCap refused the API token (403): You do not have permissions"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match classify(
            op,
            400,
            None,
            None,
            r#"{"error":"The following values in the parameter \"fields\" are not valid: 'x'"}"#,
        ) {
            Err(SinkError::Misconfigured(m)) => assert!(m.contains("'x'"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify(op, 302, None, Some("https://x/"), ""), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(op, 404, None, None, "nope"), Err(SinkError::Misconfigured(_))));
    }

    #[test]
    fn messages_never_carry_the_token() {
        let token = "ABCDEF0123456789ABCDEF0123456789";
        let e = scrub(SinkError::Misconfigured(format!("echo {token}")), token);
        assert!(!e.to_string().contains(token));
        let e = scrub(SinkError::Transient { message: token.into(), retry_after: None }, token);
        assert!(!e.to_string().contains(token));
    }

    #[test]
    fn long_bodies_are_cut() {
        let s = snippet(&"x ".repeat(2000));
        assert!(s.chars().count() <= MAX_MESSAGE_CHARS + 1);
        assert_eq!(snippet("  a\n  b "), "a b");
    }

    #[test]
    fn an_import_count_covering_every_record_sent_is_a_success() {
        assert!(confirm_import(&json!({"count": 3}), 3).is_ok());
        assert!(confirm_import(&json!({"count": "3"}), 3).is_ok());
        assert!(confirm_import(&json!({"count": " 3 "}), 3).is_ok());
        assert!(confirm_import(&json!({"count": 4}), 3).is_ok());
    }

    #[test]
    fn a_short_import_count_is_uncertain_and_says_so() {
        for answer in [json!({"count": 1}), json!({"count": "1"})] {
            match confirm_import(&answer, 3) {
                Err(SinkError::Uncertain(message)) => assert_eq!(
                    message,
                    "REDCap's import reported 1 record(s) updated of 3 sent: some may not be written"
                ),
                other => panic!("{answer}: {other:?}"),
            }
        }
        assert!(matches!(confirm_import(&json!({"count": 0}), 1), Err(SinkError::Uncertain(_))));
    }

    #[test]
    fn a_missing_or_garbled_import_count_is_uncertain() {
        for answer in [json!({}), json!([]), json!({"count": null}), json!({"count": "three"}), json!({"count": -1})] {
            match confirm_import(&answer, 2) {
                Err(SinkError::Uncertain(message)) => {
                    assert!(
                        message.contains("no readable record count") && message.contains("2 record(s)"),
                        "{message}"
                    )
                }
                other => panic!("{answer}: {other:?}"),
            }
        }
    }

    #[test]
    fn an_import_that_may_have_run_is_uncertain() {
        let op = Op::Import;
        for (status, body) in [(500, "oops"), (502, ""), (503, "<html>"), (504, "Gateway Time-out"), (408, "")] {
            match classify(op, status, None, None, body) {
                Err(SinkError::Uncertain(m)) => {
                    assert!(m.contains(&status.to_string()) && m.contains("record import"), "{m}")
                }
                other => panic!("{status}: {other:?}"),
            }
        }
        assert!(matches!(classify(op, 200, None, None, "<html>"), Err(SinkError::Uncertain(_))));
        // What proves nothing was written stays as it was.
        assert!(matches!(classify(op, 429, None, None, "banned"), Err(SinkError::Transient { .. })));
        assert!(matches!(classify(op, 400, None, None, r#"{"error":"bad"}"#), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(op, 403, None, None, ""), Err(SinkError::Misconfigured(_))));
        assert!(matches!(classify(op, 200, None, None, r#"{"error":"x"}"#), Err(SinkError::Misconfigured(_))));
        // Reads are never uncertain.
        for read in [Op::Export, Op::Metadata, Op::Project, Op::Events] {
            assert!(matches!(classify(read, 500, None, None, ""), Err(SinkError::Transient { .. })), "{read:?}");
        }
    }

    #[test]
    fn a_lost_connection_leaves_only_a_sent_write_uncertain() {
        let t = Duration::from_secs(5);
        let host = "https://redcap.example.org";
        match transport_failure(Op::Import, host, t, true, true, "timed out") {
            SinkError::Uncertain(m) => assert_eq!(
                m,
                "REDCap at https://redcap.example.org did not answer the record import within 5s: it may still \
                 apply it"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(transport_failure(Op::Import, host, t, true, false, "reset"), SinkError::Uncertain(_)));
        // No connection: nothing was sent.
        assert!(matches!(transport_failure(Op::Import, host, t, false, false, "refused"), SinkError::Transient { .. }));
        assert!(matches!(transport_failure(Op::Import, host, t, false, true, "connect"), SinkError::Transient { .. }));
        // A read that timed out wrote nothing.
        assert!(matches!(transport_failure(Op::Export, host, t, true, true, "x"), SinkError::Transient { .. }));
    }
}
