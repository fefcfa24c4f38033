//! Review items: messages that read like a revocation without being a
//! keyword ("please stop texting me"). The FCC counts any reasonable
//! wording, so such a message is not dropped: under `review_policy =
//! "review"` it is held here for staff, who decide it is an opt-out (then
//! relayed like any other, said when the person said it) or not.
//!
//! [`hold`] is what the inbound endpoints call; `GET /v1/reviews` and
//! `POST /v1/reviews/{id}` are the admin side (mounted, behind the bearer
//! token, by `admin::router`).

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::domain::{storable, EventKind, MessageSid, Phone};
use crate::metrics;
use crate::store::{Decided, Decision, NewEvent, NewReview, RecordOutcome, ReviewRow};

/// The most items `GET /v1/reviews` returns (oldest first).
const MAX_PENDING: i64 = 500;

/// `source` of the opt-out a review decision records.
pub const DECISION_SOURCE: &str = "staff:review";

/// Records a review item (idempotent per MessageSid), counts and logs a new one.
pub(super) async fn hold(app: &AppState, review: NewReview) -> Result<RecordOutcome, ApiError> {
    let outcome = app.store.record_review(&review).await?;
    if let RecordOutcome::Recorded(id) = outcome {
        metrics::review_created();
        tracing::info!(
            review = id,
            message_sid = review.event.message_sid.as_str(),
            phone = %app.show_phone(&review.event.phone),
            matched = %review.matched,
            "possible revocation held for review"
        );
    }
    Ok(outcome)
}

/// Pending review items, the longest waiting first.
#[utoipa::path(get, path = "/v1/reviews", responses(
    (status = 200, body = [ReviewRow], description = "pending items, oldest first (at most 500)"),
    (status = 401, body = ErrorBody),
    (status = 503, body = ErrorBody, description = "store unavailable"),
))]
pub(super) async fn list(State(app): State<AppState>) -> Result<Json<Vec<ReviewRow>>, ApiError> {
    Ok(Json(app.store.pending_reviews(MAX_PENDING).await?))
}

/// What staff decided.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum ReviewDecision {
    /// A revocation: recorded as an opt-out and relayed.
    OptOut,
    /// Not a revocation: nothing recorded.
    Dismiss,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DecisionBody {
    decision: ReviewDecision,
    /// Why, for the audit trail.
    note: Option<String>,
}

/// Decides a pending item, once.
#[utoipa::path(post, path = "/v1/reviews/{id}", request_body = DecisionBody,
    params(("id" = i64, Path, description = "the review item's id")),
    responses(
        (status = 200, body = ReviewRow, description = "decided; with `opt_out`, `event_id` is the opt-out recorded"),
        (status = 400, body = ErrorBody, description = "not this JSON"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such item"),
        (status = 409, body = ErrorBody, description = "decided already"),
        (status = 413, body = ErrorBody, description = "body over server.max_body_bytes"),
        (status = 415, body = ErrorBody, description = "body not application/json"),
        (status = 503, body = ErrorBody, description = "store unavailable; nothing was decided"),
    ))]
pub(super) async fn decide(
    State(app): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
    body: Result<Json<DecisionBody>, JsonRejection>,
) -> Result<Json<ReviewRow>, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let Json(body) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType("application/json"),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    let note = body.note.map(storable);
    let review = app.store.review(id).await?.ok_or_else(|| ApiError::NotFound(format!("no review {id}")))?;
    if review.status != "pending" {
        return Err(already(id, &review.status));
    }
    let decision = match body.decision {
        ReviewDecision::Dismiss => Decision::Dismissed,
        ReviewDecision::OptOut => Decision::OptedOut(record_opt_out(&app, &review, note.as_deref()).await?),
    };
    // The opt-out (if any) is recorded first: should the decision then fail
    // or lose a race, the revocation is kept, which is the safe side.
    match app.store.decide_review(id, decision, note.as_deref()).await? {
        Decided::Decided => {}
        Decided::NotFound => return Err(ApiError::NotFound(format!("no review {id}"))),
        Decided::AlreadyDecided(status) => return Err(already(id, &status)),
    }
    tracing::info!(review = id, decision = ?body.decision, "review decided");
    let decided = app.store.review(id).await?.ok_or_else(|| ApiError::NotFound(format!("no review {id}")))?;
    Ok(Json(decided))
}

fn already(id: i64, status: &str) -> ApiError {
    ApiError::Conflict(format!("review {id} was decided already ({status})"))
}

/// Records the opt-out a review stands for: scoped as the message was, said
/// when the person said it, under a MessageSid derived from the review so a
/// retried decision is the same event.
async fn record_opt_out(app: &AppState, review: &ReviewRow, note: Option<&str>) -> Result<i64, ApiError> {
    let sid = format!("RV{:032}", review.id);
    let message_sid = MessageSid::parse(&sid).ok_or_else(|| ApiError::BadRequest("review id".into()))?;
    let event = NewEvent {
        message_sid,
        account_sid: None,
        messaging_service_sid: None,
        scope: review.scope.clone(),
        phone: Phone::from_stored(review.phone.clone()),
        from_raw: review.phone.clone(),
        to: None,
        kind: EventKind::OptOut,
        body: review.body.clone(),
        params: json!({
            "review_id": review.id,
            "review_message_sid": review.message_sid,
            "matched": review.matched,
            "note": note,
            "decided_at": Utc::now().to_rfc3339(),
        }),
        received_at: review.time,
        source: DECISION_SOURCE.to_owned(),
    };
    app.schema_ready().await?;
    match app.writer.record(event).await? {
        RecordOutcome::Recorded(event_id) => {
            metrics::event(EventKind::OptOut.as_str());
            Ok(event_id)
        }
        // A decision retried after its opt-out committed: the same event.
        RecordOutcome::Duplicate => app
            .store
            .event_id_of(&sid)
            .await?
            .ok_or_else(|| ApiError::Conflict(format!("review {} is being decided", review.id))),
    }
}
