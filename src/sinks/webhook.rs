//! Signed webhooks: any other system (a CRM, a texting tool, a warehouse, a
//! no-code automation) subscribes to opt-outs with a URL, and checks each
//! POST with the Standard Webhooks library of its own language.
//!
//! Each change of a phone's target is one POST of
//! `{"type": "phone.opted_out" | "phone.opted_in", "timestamp", "data": {…}}`
//! with the headers `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`
//! (signed with the `standardwebhooks` crate, the spec authors' own).
//!
//! **Retries keep the id.** The relay derives the id from the delivery row
//! and the target it carries, so every retry of one change (after a 5xx, a
//! timeout, a restart) has the same `webhook-id` and the same body, and a
//! receiver that saw it already can drop it; only the timestamp and
//! signature are new (receivers refuse old timestamps).
//!
//! **Answers.** 2xx: done. 410: the endpoint says it is gone:
//! misconfigured (the sink backs off for `misconfigured_retry` and an
//! operator is told). 429, 408, 5xx, timeouts and connection failures:
//! transient, `Retry-After` honoured. Any other 4xx or a redirect:
//! misconfigured, quoting the answer.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::http::{self, NoAnswer};
use super::{Converged, SinkError, Target};
use crate::config::WebhookConfig;
use crate::domain::Phone;

/// One change to announce, as the relay hands it over.
#[derive(Debug, Clone)]
pub struct WebhookItem {
    pub phone: Phone,
    pub target: Target,
    /// The same for every retry of this change (`webhook-id`).
    pub message_id: String,
    /// When the change took effect: the opt-out's start, or when the opt-in began.
    pub changed_at: DateTime<Utc>,
    /// The scopes (of those the sink follows) that decide the target: those
    /// opted out for an opt-out, every one for an opt-in.
    pub scopes: Vec<String>,
    /// Who recorded the change that made the delivery (`twilio`, `staff:NAME`, …).
    pub source: Option<String>,
    pub event_id: Option<i64>,
}

/// The body of one delivery. The same item gives the same bytes.
pub fn payload(item: &WebhookItem) -> Value {
    let (kind, since) = match item.target {
        Target::OptedOut { since } => ("phone.opted_out", Some(since)),
        Target::OptedIn => ("phone.opted_in", None),
    };
    let rfc3339 = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
    json!({
        "type": kind,
        "timestamp": rfc3339(item.changed_at),
        "data": {
            "phone": item.phone.as_str(),
            "since": since.map(rfc3339),
            "scopes": item.scopes,
            "source": item.source,
            "event_id": item.event_id,
        }
    })
}

/// The webhook client of one endpoint. Cheap to clone.
#[derive(Clone)]
pub struct WebhookSink {
    client: reqwest::Client,
    url: reqwest::Url,
    signer: Arc<standardwebhooks::Webhook>,
    timeout: Duration,
    name: Arc<str>,
}

impl WebhookSink {
    /// Builds the client; refuses a URL or secret it cannot use. Makes no call.
    pub fn new(cfg: &WebhookConfig) -> Result<WebhookSink, String> {
        let url = reqwest::Url::parse(cfg.url.trim()).map_err(|e| format!("url {:?} is not a URL: {e}", cfg.url))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(format!("url {:?} must start with https:// or http://", cfg.url));
        }
        let key = crate::config::webhook_key(cfg.secret.expose_secret()).map_err(|e| format!("secret {e}"))?;
        let signer = standardwebhooks::Webhook::from_bytes(key).map_err(|e| format!("secret: {e}"))?;
        Ok(WebhookSink {
            client: http::client(cfg.timeout)?,
            url,
            signer: Arc::new(signer),
            timeout: cfg.timeout,
            name: Arc::from("webhook"),
        })
    }

    /// The same sink under its configured name (logs, metrics).
    pub fn named(mut self, name: &str) -> WebhookSink {
        self.name = Arc::from(name);
        self
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Delivers each item in order; stops at the first failure, or before a
    /// delivery that could not finish before `deadline`.
    pub async fn converge(&self, items: &[WebhookItem], deadline: Option<Instant>) -> Converged {
        let mut done = Vec::with_capacity(items.len());
        for item in items {
            if deadline.is_some_and(|d| d.saturating_duration_since(Instant::now()) < self.timeout) {
                return Converged { done, error: Some(SinkError::OutOfTime) };
            }
            match self.deliver(item).await {
                Ok(v) => done.push(v),
                Err(error) => return Converged { done, error: Some(error) },
            }
        }
        Converged { done, error: None }
    }

    /// One signed POST; the account kept on the delivery: its id and the answer's status.
    pub async fn deliver(&self, item: &WebhookItem) -> Result<Value, SinkError> {
        let body = payload(item).to_string();
        let timestamp = Utc::now().timestamp();
        let signature = self
            .signer
            .sign(&item.message_id, timestamp, body.as_bytes())
            .map_err(|e| SinkError::Misconfigured(format!("cannot sign the webhook: {e}")))?;
        let started = std::time::Instant::now();
        let sent = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(standardwebhooks::HEADER_WEBHOOK_ID, &item.message_id)
            .header(standardwebhooks::HEADER_WEBHOOK_TIMESTAMP, timestamp.to_string())
            .header(standardwebhooks::HEADER_WEBHOOK_SIGNATURE, signature)
            .body(body)
            .send()
            .await;
        let result = match sent {
            Err(e) => Err(self.no_answer(http::no_answer(e))),
            Ok(res) => {
                let status = res.status().as_u16();
                let retry_after = http::retry_after(res.headers());
                // The answer's body matters only in an error message.
                let text =
                    if (200..300).contains(&status) { String::new() } else { res.text().await.unwrap_or_default() };
                classify(status, retry_after, &text).map(
                    |()| json!({"webhook_id": item.message_id, "status": status, "type": payload_type(item.target)}),
                )
            }
        };
        crate::metrics::sink_call(&self.name, "webhook_post", started.elapsed().as_secs_f64());
        result
    }

    /// A webhook has nothing to read: with nothing waiting there is nothing
    /// to deliver, and the next delivery is the test of the endpoint.
    pub async fn probe(&self) -> Result<(), SinkError> {
        Ok(())
    }

    fn no_answer(&self, n: NoAnswer) -> SinkError {
        let host = self.url.origin().ascii_serialization();
        let message = if n.timed_out {
            format!("the webhook at {host} did not answer within {:?}", self.timeout)
        } else {
            format!("cannot deliver to the webhook at {host}: {}", n.text)
        };
        SinkError::Transient { message, retry_after: None }
    }
}

fn payload_type(target: Target) -> &'static str {
    if target.is_opted_out() {
        "phone.opted_out"
    } else {
        "phone.opted_in"
    }
}

/// What the endpoint's answer means.
pub fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> Result<(), SinkError> {
    match status {
        200..=299 => Ok(()),
        410 => Err(SinkError::Misconfigured(format!(
            "the webhook endpoint answered 410 Gone (it asks not to be called again): {}; fix url or remove the sink",
            http::snippet(body)
        ))),
        408 | 429 | 500..=599 => Err(SinkError::Transient {
            message: format!("the webhook endpoint answered {status}: {}", http::snippet(body)),
            retry_after,
        }),
        300..=399 => Err(SinkError::Misconfigured(format!(
            "the webhook endpoint answered with a redirect ({status}): set url to the final address"
        ))),
        _ => Err(SinkError::Misconfigured(format!(
            "the webhook endpoint refused the delivery ({status}): {}",
            http::snippet(body)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn item(target: Target) -> WebhookItem {
        WebhookItem {
            phone: Phone::from_stored("+14155550101".into()),
            target,
            message_id: "msg_1".into(),
            changed_at: Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap(),
            scopes: vec!["MG1".into()],
            source: Some("twilio".into()),
            event_id: Some(9),
        }
    }

    #[test]
    fn payloads_name_the_change_and_carry_its_data() {
        let at = Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).unwrap();
        let out = payload(&item(Target::OptedOut { since: at }));
        assert_eq!(
            out,
            json!({"type": "phone.opted_out", "timestamp": "2026-11-24T12:00:00.000Z", "data": {
                "phone": "+14155550101", "since": "2026-11-24T12:00:00.000Z", "scopes": ["MG1"],
                "source": "twilio", "event_id": 9}})
        );
        let back = payload(&item(Target::OptedIn));
        assert_eq!((back["type"].as_str(), &back["data"]["since"]), (Some("phone.opted_in"), &Value::Null));
    }

    #[test]
    fn answers_are_classified() {
        assert!(classify(200, None, "").is_ok() && classify(204, None, "").is_ok());
        assert!(matches!(classify(410, None, "gone"), Err(SinkError::Misconfigured(m)) if m.contains("410")));
        for s in [408, 429, 500, 503] {
            assert!(matches!(classify(s, None, ""), Err(SinkError::Transient { .. })), "{s}");
        }
        match classify(429, Some(Duration::from_secs(9)), "") {
            Err(SinkError::Transient { retry_after, .. }) => assert_eq!(retry_after, Some(Duration::from_secs(9))),
            other => panic!("{other:?}"),
        }
        for s in [301, 400, 401, 404, 422] {
            assert!(matches!(classify(s, None, ""), Err(SinkError::Misconfigured(_))), "{s}");
        }
    }

    #[test]
    fn signatures_follow_the_spec_vector() {
        // The Standard Webhooks specification's example.
        let key = crate::config::webhook_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signer = standardwebhooks::Webhook::from_bytes(key).unwrap();
        let sig = signer.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#).unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }
}
