//! The HTTP edge: one router, one shared state, errors mapped in `error.rs`.

mod admin;
mod body;
pub mod error;
mod events;
mod health;
mod lists;
mod reviews;
pub mod serve;
mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderMap, Request, Response};
use axum::routing::{get, post};
use axum::Router;
use phonenumber::country;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::domain::{mask_phones_in, Phone};
use crate::store::batch::BatchWriter;
use crate::store::Store;
use crate::twilio::keywords::Keywords;
use crate::twilio::signature::Verifier;

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub writer: BatchWriter,
    pub verifier: Verifier,
    pub validate_signatures: bool,
    /// Base URLs Twilio may have signed over (public_url first, then alternates).
    pub base_urls: Vec<String>,
    pub keywords: Keywords,
    pub region: country::Id,
    pub mask_phones: bool,
    /// The configured sinks and the relay's policy (the relay itself runs
    /// apart); the admin API computes targets and releases sinks through it.
    pub relay: Arc<crate::relay::Relay>,
    /// The supervised background tasks, for `/readyz`.
    pub tasks: crate::supervise::Tasks,
    /// True once this process's migrations are applied (from the start when
    /// it does not apply them): until then a write is held, not failed.
    pub schema_ready: tokio::sync::watch::Receiver<bool>,
    /// Limits of `POST /v1/imports`.
    pub lists: crate::config::ListsConfig,
}

/// How long a write waits for the migrations on a fresh database before it
/// answers 503: well under the 15 s Twilio waits for an answer, and Twilio
/// does not retry a 503 unless told to, so a short hold beats a quick refusal.
const SCHEMA_WAIT: Duration = Duration::from_secs(10);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(inner: Inner) -> AppState {
        AppState(Arc::new(inner))
    }

    /// Candidate full URLs for the signature: each configured base + the raw
    /// path and query received (a `#fragment` of connection overrides in the
    /// configured URL is tried with and without). With no `public_url`, the
    /// request's own Host and `X-Forwarded-Proto` stand in.
    pub fn signed_urls(&self, path_and_query: &str, headers: &HeaderMap) -> Vec<String> {
        let mut out = Vec::new();
        for base in &self.base_urls {
            let (base, fragment) = match base.split_once('#') {
                Some((b, f)) => (b, Some(f)),
                None => (base.as_str(), None),
            };
            let full = format!("{}{}", base.trim_end_matches('/'), path_and_query);
            if let Some(f) = fragment {
                out.push(format!("{full}#{f}"));
            }
            out.push(full);
        }
        if out.is_empty() {
            let host = headers.get("host").and_then(|v| v.to_str().ok()).unwrap_or("localhost");
            let proto = headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()).unwrap_or("http");
            out.push(format!("{proto}://{host}{path_and_query}"));
        }
        out
    }

    /// Returns once the schema is there (at once, but for the first moments
    /// of a process on a fresh database), or 503 after `SCHEMA_WAIT`.
    pub async fn schema_ready(&self) -> Result<(), error::ApiError> {
        let mut ready = self.schema_ready.clone();
        if *ready.borrow() {
            return Ok(());
        }
        tracing::info!("holding a request until the migrations are applied");
        // Counted so an operator (and a test) can see requests were held, not lost.
        ::metrics::counter!("optout_requests_held_for_schema_total").increment(1);
        let waited = tokio::time::timeout(SCHEMA_WAIT, ready.wait_for(|r| *r)).await.map(|r| r.is_ok());
        match waited {
            Ok(true) => Ok(()),
            _ => Err(error::ApiError::Unavailable(crate::store::StoreError::Unavailable(
                "the database schema is not there yet (migrations pending)".into(),
            ))),
        }
    }

    /// Checks a Twilio request's signature (when `validate_signatures`) over
    /// every URL it may have been signed for; the error names those URLs.
    /// Shared by the Messaging webhook and Event Streams.
    pub fn verify_twilio(
        &self,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
        body: crate::twilio::signature::SignedBody<'_>,
    ) -> Result<(), error::ApiError> {
        if !self.validate_signatures {
            return Ok(());
        }
        let path_and_query = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
        let urls = self.signed_urls(path_and_query, headers);
        let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        self.verifier
            .verify(&urls, header_str("x-twilio-signature"), header_str("x-twilio-webhooks-signature-settings"), body)
            .map_err(|e| error::ApiError::Forbidden(e, url_origins_and_paths(&urls)))
    }

    pub fn wake_relay(&self) {
        self.relay.wake_all();
    }

    pub fn show_phone(&self, phone: &Phone) -> String {
        if self.mask_phones {
            phone.masked()
        } else {
            phone.as_str().to_owned()
        }
    }
}

pub use body::BodyRules;

pub fn router(state: AppState, body: BodyRules, admin_tokens: Vec<secrecy::SecretString>) -> Router {
    let mask_phones = state.mask_phones;
    let trace = TraceLayer::new_for_http()
        .make_span_with(move |req: &Request<_>| {
            let id = req.extensions().get::<RequestId>().and_then(|id| id.header_value().to_str().ok()).unwrap_or("-");
            tracing::info_span!(
                "request",
                request_id = %id,
                method = %req.method(),
                path = %if mask_phones { mask_phones_in(req.uri().path()) } else { req.uri().path().to_owned() },
                outcome = tracing::field::Empty,
                kind = tracing::field::Empty,
                phone = tracing::field::Empty,
            )
        })
        .on_request(())
        .on_response(|res: &Response<_>, latency: Duration, _span: &Span| {
            tracing::info!(status = res.status().as_u16(), latency_ms = latency.as_secs_f64() * 1000.0, "handled");
        })
        .on_failure(());

    let mut routes = Router::new()
        .route("/twilio/messages", post(webhook::inbound))
        .route("/twilio/events", post(events::receive))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics));
    // No token configured: the admin API does not exist (404), rather than being open.
    if !admin_tokens.is_empty() {
        routes = routes.merge(admin::router(admin_tokens));
    }
    routes
        .fallback(no_such_path)
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(body, body::read_whole_body))
        .layer(CatchPanicLayer::new())
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(trace)
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

async fn no_such_path() -> error::ApiError {
    error::ApiError::NotFound("no such path".to_owned())
}

/// `https://optout.example.org/twilio/messages, http://…`: each URL a
/// signature was checked over, reduced to scheme, host, port and path, for the
/// 403 log line. Userinfo (a URL may carry basic-auth credentials for
/// Twilio), query and fragment are left out.
pub fn url_origins_and_paths(urls: &[String]) -> String {
    let mut shown: Vec<String> = Vec::new();
    for url in urls {
        let without_fragment = url.split('#').next().unwrap_or_default();
        let one = match without_fragment.parse::<axum::http::Uri>() {
            Ok(uri) => {
                let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
                format!("{}://{}{port}{}", uri.scheme_str().unwrap_or("?"), uri.host().unwrap_or("?"), uri.path())
            }
            Err(_) => "(a URL that does not parse)".to_owned(),
        };
        if !shown.contains(&one) {
            shown.push(one);
        }
    }
    shown.join(", ")
}

#[cfg(test)]
mod tests {
    use super::url_origins_and_paths;

    #[test]
    fn urls_in_the_403_line_keep_scheme_host_port_and_path_only() {
        let urls = [
            "https://user:secret@optout.example.org/twilio/messages?x=1#rc=3".to_owned(),
            "https://user:secret@optout.example.org/twilio/messages?x=1".to_owned(),
            "http://10.0.0.5:8080/prefix/twilio/messages".to_owned(),
        ];
        let shown = url_origins_and_paths(&urls);
        assert_eq!(shown, "https://optout.example.org/twilio/messages, http://10.0.0.5:8080/prefix/twilio/messages");
        assert!(!shown.contains("secret"));
    }
}
