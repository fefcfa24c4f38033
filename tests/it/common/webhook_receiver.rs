//! A webhook receiver that checks Standard Webhooks signatures with its own
//! implementation (HMAC-SHA256 from the `hmac` crate over `id.timestamp.body`,
//! base64), not the `standardwebhooks` crate the relay signs with: a bug in
//! how the relay calls that crate cannot pass here by agreeing with itself.
//!
//! It records every delivery (verified or not) and answers from a script of
//! statuses, then 204.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

/// How far a `webhook-timestamp` may be from now (the spec's suggestion).
const TOLERANCE_SECS: i64 = 5 * 60;

#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    pub timestamp: i64,
    pub body: Value,
    pub raw: String,
    /// The signature checked out against the secret, and the timestamp is recent.
    pub verified: bool,
}

#[derive(Debug, Clone)]
pub enum Answer {
    Status {
        status: u16,
        retry_after: Option<u64>,
    },
    /// Hold the answer this long (longer than the relay waits: a timeout), then 204.
    Hang(Duration),
}

struct Inner {
    key: Vec<u8>,
    deliveries: Vec<Delivery>,
    script: VecDeque<Answer>,
}

#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    inner: Arc<Mutex<Inner>>,
}

/// Verifies one delivery as the spec says, independently: the signed
/// content is `{id}.{timestamp}.{body}`; the header holds space-separated
/// `v1,<base64>` entries, any of which may match.
pub fn verify(key: &[u8], id: &str, timestamp: &str, signatures: &str, body: &[u8], now: i64) -> bool {
    let Ok(ts) = timestamp.parse::<i64>() else { return false };
    if (now - ts).abs() > TOLERANCE_SECS {
        return false;
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    signatures.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|sig| {
        base64::engine::general_purpose::STANDARD
            .decode(sig)
            .is_ok_and(|bytes| mac.clone().verify_slice(&bytes).is_ok())
    })
}

/// The key of a `whsec_…` secret.
pub fn key_of(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(secret.trim_start_matches("whsec_")).expect("base64 secret")
}

impl Receiver {
    pub async fn start(secret: &str) -> Receiver {
        let inner =
            Arc::new(Mutex::new(Inner { key: key_of(secret), deliveries: Vec::new(), script: VecDeque::new() }));
        let app = Router::new().route("/hooks/optouts", post(receive)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the receiver");
        let url = format!("http://{}/hooks/optouts", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { url, inner }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn answer_next(&self, answer: Answer) {
        self.lock().script.push_back(answer);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.lock().deliveries.clone()
    }
}

type Shared = Arc<Mutex<Inner>>;

async fn receive(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let (id, timestamp, signature) = (h("webhook-id"), h("webhook-timestamp"), h("webhook-signature"));
    let answer = {
        let mut inner = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = chrono::Utc::now().timestamp();
        let verified = verify(&inner.key, &id, &timestamp, &signature, &body, now)
            && headers.get(header::CONTENT_TYPE).is_some_and(|v| v == "application/json");
        inner.deliveries.push(Delivery {
            id,
            timestamp: timestamp.parse().unwrap_or(0),
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            raw: String::from_utf8_lossy(&body).into_owned(),
            verified,
        });
        if !verified {
            return StatusCode::UNAUTHORIZED.into_response();
        }
        inner.script.pop_front()
    };
    match answer {
        None => StatusCode::NO_CONTENT.into_response(),
        Some(Answer::Hang(d)) => {
            tokio::time::sleep(d).await;
            StatusCode::NO_CONTENT.into_response()
        }
        Some(Answer::Status { status, retry_after }) => {
            let mut res = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR).into_response();
            if let Some(secs) = retry_after {
                res.headers_mut().insert(header::RETRY_AFTER, secs.to_string().parse().expect("header"));
            }
            res
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_independent_check_accepts_the_spec_vector_and_nothing_else() {
        let key = key_of("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD");
        let body = br#"{"email":"test@example.com","username":"test_user"}"#;
        let sig = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
        let (id, ts) = ("msg_27UH4WbU6Z5A5EzD8u03UvzRbpk", 1649367553);
        assert!(verify(&key, id, &ts.to_string(), sig, body, ts));
        assert!(verify(&key, id, &ts.to_string(), &format!("v1,AAAA {sig}"), body, ts + 10));
        assert!(!verify(&key, id, &ts.to_string(), sig, body, ts + TOLERANCE_SECS + 1), "too old");
        assert!(!verify(&key, "msg_other", &ts.to_string(), sig, body, ts), "another id");
        assert!(!verify(&key, id, &ts.to_string(), sig, b"{}", ts), "another body");
        assert!(!verify(&key, id, &ts.to_string(), &sig.replace("v1,", "v2,"), body, ts), "another version");
    }
}
