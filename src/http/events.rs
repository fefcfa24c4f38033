//! `POST /twilio/events`: a Twilio Event Streams webhook sink.
//!
//! Event Streams delivers a copy of every inbound message without touching
//! the number's SMS URL (which REDCap's SMS surveys own), and retries a
//! failed delivery for up to 4 hours. Its messages go through the same
//! classification and the same record path as the Messaging webhook, with
//! the same MessageSid, so a message that arrives by both is one event.
//!
//! Order of checks: size (413) → signature over the URL and `bodySHA256`
//! (403) → a batch of CloudEvents (400) → classify each → record every one
//! and wait for all commits (503 unless all committed) → 400 if the batch
//! held a message we could not read (after recording its neighbours), else
//! 200. The whole answer comes within [`ANSWER_WITHIN`]: Event Streams
//! counts a slower one as failed and retries it anyway.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures_util::future::join_all;

use super::error::ApiError;
use super::AppState;
use crate::domain::mask_phones_in;
use crate::domain::EventKind;
use crate::metrics;
use crate::store::{NewEvent, NewReview, RecordOutcome, StoreError};
use crate::twilio::events::{parse_batch, Item};
use crate::twilio::keywords::Classified;
use crate::twilio::signature::SignedBody;

/// Event Streams wants a 2xx within 5 s; the rest of the 5 s is for the network.
const ANSWER_WITHIN: Duration = Duration::from_secs(4);

/// `source` of the events this endpoint records.
pub const SOURCE: &str = "event_streams";

/// What a delivery amounted to, per CloudEvent.
#[derive(Debug, Default, serde::Serialize)]
pub struct Summary {
    pub recorded: usize,
    pub duplicates: usize,
    /// Other event types, and messages that are no opt-out, opt-in or help.
    pub ignored: usize,
    /// Messages held for staff review (possible revocations in free text),
    /// newly or again; absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub reviews: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub async fn receive(
    State(app): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let result = handle(&app, &uri, &headers, body).await;
    let outcome = match &result {
        // The request's log line says what the delivery amounted to as a whole.
        Ok(s) if s.recorded > 0 || s.reviews > 0 => "accepted",
        Ok(s) if s.duplicates > 0 => "duplicate",
        Ok(_) => "ignored",
        Err(e) => e.outcome(),
    };
    tracing::Span::current().record("outcome", outcome);
    match result {
        Ok(summary) => (StatusCode::OK, Json(summary)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A refusal of the whole delivery, counted once (per-event outcomes are
/// counted per CloudEvent as they are known).
fn whole(e: ApiError) -> ApiError {
    metrics::event_stream(e.outcome());
    e
}

async fn handle(
    app: &AppState,
    uri: &Uri,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Summary, ApiError> {
    let body = body.map_err(|e| {
        whole(match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
            _ => ApiError::BadRequest("unreadable body".into()),
        })
    })?;

    app.verify_twilio(uri, headers, SignedBody::Raw(&body)).map_err(whole)?;

    let items = parse_batch(&body).map_err(|e| whole(ApiError::BadRequest(e.to_string())))?;

    let mut summary = Summary::default();
    let mut invalid: Vec<String> = Vec::new();
    let mut to_record: Vec<NewEvent> = Vec::new();
    let mut to_review: Vec<NewReview> = Vec::new();
    let now = Utc::now();
    for item in items {
        let message = match item {
            Item::Other(kind) => {
                tracing::info!(event_type = %kind, "event stream: not an inbound message; nothing to record");
                summary.ignored += 1;
                metrics::event_stream("ignored");
                continue;
            }
            Item::Invalid(why) => {
                invalid.push(why);
                metrics::event_stream("rejected");
                continue;
            }
            Item::Message(m) => m,
        };
        // Classified before the sender is read: a message that is no keyword
        // is ignored whatever channel it came by, as nothing would be recorded.
        let (kind, review) = match app.keywords.classify_message(message.opt_out_type.as_deref(), &message.body) {
            Classified::Nothing => {
                summary.ignored += 1;
                metrics::event_stream("ignored");
                continue;
            }
            Classified::Event(kind) => (kind, None),
            // Held as the opt-out it may be, for staff to decide.
            Classified::Review { matched } => (EventKind::OptOut, Some(matched)),
        };
        let phone = match message.phone(app.region) {
            Ok(p) => p,
            Err(_) => {
                let from = if app.mask_phones { mask_phones_in(&message.from_raw) } else { message.from_raw.clone() };
                invalid.push(format!("message {}: from {from} is not a phone number", message.message_sid.as_str()));
                metrics::event_stream("rejected");
                continue;
            }
        };
        // The request's own log line names the phone and kind too, as the
        // webhook's does (the last message's, for a batch of several).
        let span = tracing::Span::current();
        span.record("phone", tracing::field::display(app.show_phone(&phone)));
        let shown_kind = if review.is_some() { "review" } else { kind.as_str() };
        span.record("kind", shown_kind);
        tracing::info!(
            message_sid = message.message_sid.as_str(),
            phone = %app.show_phone(&phone),
            kind = shown_kind,
            "event stream: inbound message to record"
        );
        let said_at = message.said_at(now);
        let scope = message.scope().to_owned();
        let m = *message;
        let event = NewEvent {
            scope,
            message_sid: m.message_sid,
            account_sid: m.account_sid,
            messaging_service_sid: m.messaging_service_sid,
            phone,
            from_raw: m.from_raw,
            to: m.to,
            kind,
            body: m.body,
            params: m.event,
            received_at: said_at,
            source: SOURCE.to_owned(),
        };
        match review {
            Some(matched) => to_review.push(NewReview { event, matched }),
            None => to_record.push(event),
        }
    }

    // One deadline for all the commits of a delivery, reviews and events alike.
    let deadline = tokio::time::Instant::now() + ANSWER_WITHIN;
    if !to_review.is_empty() {
        let held = tokio::time::timeout_at(deadline, async {
            app.schema_ready().await.map_err(whole)?;
            let mut outcomes = Vec::new();
            for review in to_review {
                outcomes.push(super::reviews::hold(app, review).await);
            }
            Ok::<_, ApiError>(outcomes)
        })
        .await
        .map_err(|_| {
            whole(ApiError::Unavailable(StoreError::Unavailable(format!(
                "review items not committed within {}s; Event Streams will retry",
                ANSWER_WITHIN.as_secs()
            ))))
        })??;
        for outcome in held {
            match outcome {
                Ok(RecordOutcome::Recorded(_)) => {
                    metrics::event_stream("accepted");
                    summary.reviews += 1;
                }
                Ok(RecordOutcome::Duplicate) => {
                    metrics::event_stream("duplicate");
                    summary.reviews += 1;
                }
                Err(e) => {
                    metrics::event_stream("store_unavailable");
                    return Err(e);
                }
            }
        }
    }

    if !to_record.is_empty() {
        let kinds: Vec<_> = to_record.iter().map(|e| e.kind).collect();
        let committed = tokio::time::timeout_at(deadline, async {
            app.schema_ready().await.map_err(whole)?;
            // All at once: the batch writer commits them together.
            let outcomes = join_all(to_record.into_iter().map(|e| app.writer.record(e))).await;
            Ok::<_, ApiError>(outcomes)
        })
        .await
        .map_err(|_| {
            whole(ApiError::Unavailable(StoreError::Unavailable(format!(
                "not committed within {}s; Event Streams will retry",
                ANSWER_WITHIN.as_secs()
            ))))
        })??;
        let mut failed = None;
        for (outcome, kind) in committed.into_iter().zip(kinds) {
            match outcome {
                Ok(RecordOutcome::Recorded(_)) => {
                    metrics::event(kind.as_str());
                    metrics::event_stream("accepted");
                    summary.recorded += 1;
                }
                Ok(RecordOutcome::Duplicate) => {
                    metrics::event_stream("duplicate");
                    summary.duplicates += 1;
                }
                Err(e) => {
                    metrics::event_stream("store_unavailable");
                    failed = Some(e);
                }
            }
        }
        // Those that did commit are duplicates on the retry: nothing is doubled.
        if let Some(e) = failed {
            return Err(ApiError::Unavailable(e));
        }
    }
    if !invalid.is_empty() {
        // Said after the rest was recorded: the readable messages are not
        // held hostage, and the operator sees the delivery fail in Twilio.
        return Err(ApiError::BadRequest(format!("{} (the other events were recorded)", invalid.join("; "))));
    }
    Ok(summary)
}
