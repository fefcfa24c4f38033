//! `POST /twilio/messages`: the Messaging Service's inbound webhook.
//!
//! Order of checks: size (413) → content type (415) → signature (403) →
//! fields (400) → classify → record (503 unless committed) → empty TwiML.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono::Utc;

use super::error::ApiError;
use super::AppState;
use crate::domain::EventKind;
use crate::metrics;
use crate::store::{NewEvent, NewReview, RecordOutcome};
use crate::twilio::keywords::Classified;
use crate::twilio::signature::SignedBody;
use crate::twilio::webhook::{decode_form, parse_inbound};

/// Advanced Opt-Out has already answered the person; a second reply from us
/// would be one text too many, so the TwiML is empty.
const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response></Response>";

/// What a request that was answered 200 amounted to.
#[derive(Clone, Copy)]
enum Accepted {
    Recorded,
    Duplicate,
    Ignored,
}

impl Accepted {
    fn outcome(self) -> &'static str {
        match self {
            Accepted::Recorded => "accepted",
            Accepted::Duplicate => "duplicate",
            Accepted::Ignored => "ignored",
        }
    }
}

pub async fn inbound(
    State(app): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let result = handle(&app, &uri, &headers, body).await;
    let outcome = match &result {
        Ok(a) => a.outcome(),
        Err(e) => e.outcome(),
    };
    tracing::Span::current().record("outcome", outcome);
    metrics::webhook(outcome);
    metrics::webhook_latency(started.elapsed().as_secs_f64());
    match result {
        Ok(_) => twiml(),
        Err(e) => e.into_response(),
    }
}

async fn handle(
    app: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Accepted, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::BadRequest("unreadable body".into()),
    })?;
    if !is_form(headers) {
        return Err(ApiError::UnsupportedMediaType("application/x-www-form-urlencoded"));
    }
    let pairs = decode_form(&body);

    app.verify_twilio(uri, headers, SignedBody::Form(&pairs))?;

    let msg = parse_inbound(&pairs, app.region)?;
    let span = tracing::Span::current();
    span.record("phone", tracing::field::display(app.show_phone(&msg.from)));

    // A review phrase is held as the opt-out it may be, for staff to decide.
    let (kind, review) = match app.keywords.classify_message(msg.opt_out_type.as_deref(), &msg.body) {
        Classified::Nothing => return Ok(Accepted::Ignored),
        Classified::Event(kind) => (kind, None),
        Classified::Review { matched } => (EventKind::OptOut, Some(matched)),
    };
    span.record("kind", if review.is_some() { "review" } else { kind.as_str() });

    let event = NewEvent {
        scope: msg.scope().to_owned(),
        message_sid: msg.message_sid,
        account_sid: msg.account_sid,
        messaging_service_sid: msg.messaging_service_sid,
        phone: msg.from,
        from_raw: msg.from_raw,
        to: msg.to,
        kind,
        body: msg.body,
        params: msg.params,
        received_at: Utc::now(),
        source: "twilio".to_owned(),
    };
    app.schema_ready().await?;
    if let Some(matched) = review {
        return Ok(match super::reviews::hold(app, NewReview { event, matched }).await? {
            RecordOutcome::Recorded(_) => Accepted::Recorded,
            RecordOutcome::Duplicate => Accepted::Duplicate,
        });
    }
    match app.writer.record(event).await? {
        RecordOutcome::Recorded(_) => {
            metrics::event(kind.as_str());
            Ok(Accepted::Recorded)
        }
        RecordOutcome::Duplicate => Ok(Accepted::Duplicate),
    }
}

fn twiml() -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], EMPTY_TWIML).into_response()
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"))
}
