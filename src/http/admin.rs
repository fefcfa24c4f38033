//! The admin API under `/v1/`: what an operator needs without touching SQL.
//! Bearer tokens from `[admin] tokens`, compared in constant time; with no
//! token configured the routes are not mounted at all.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::domain::{storable, EventKind, Phone};
use crate::ops::{self, PhoneStatus, SinkStatus, SinkTarget};
use crate::relay::target::Effective;
use crate::store::{DeliveryFilter, DeliveryRow, EventFilter, EventRow, Held, RecordOutcome, RetryOutcome, StateRow};

const MAX_LIMIT: i64 = 500;

#[derive(OpenApi)]
#[openapi(
    info(title = "optout-relay admin API", description = "Opt-out state, events, sinks and what each holds; staff-recorded revocations."),
    paths(phone, events, sinks, retry_sink, deliveries, retry_one, retry_dead, opt_out, opt_in, super::reviews::list, super::reviews::decide,
          super::lists::import_list, super::lists::export_list, super::lists::check_phones),
    components(schemas(crate::lists::import::ImportReport, crate::lists::read::InvalidRow, crate::lists::export::ListedOptOut, crate::lists::export::Format,
                       crate::lists::check::Checked, super::lists::CheckRequest, super::lists::CheckResults, crate::lists::import::ImportKind, PhoneStatus, SinkTarget, Effective, Held, SinkStatus, EventRow, DeliveryRow, StateRow, EventPage, DeliveryPage, StaffChange, Recorded, ErrorBody, EventKind, DeliveryStatus, SinkReleased, DeliveryRequeued, DeadRequeued, crate::store::ReviewRow, super::reviews::DecisionBody, super::reviews::ReviewDecision)),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
pub struct AdminDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

pub fn router(tokens: Vec<SecretString>) -> Router<AppState> {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/phones/{phone}", get(phone))
        .route("/v1/events", get(events))
        .route("/v1/sinks", get(sinks))
        .route("/v1/sinks/{name}/retry", post(retry_sink))
        .route("/v1/deliveries", get(deliveries))
        .route("/v1/deliveries/retry-dead", post(retry_dead))
        .route("/v1/deliveries/{id}/retry", post(retry_one))
        .route("/v1/opt-outs", post(opt_out))
        .route("/v1/opt-ins", post(opt_in))
        .route("/v1/reviews", get(super::reviews::list))
        .route("/v1/reviews/{id}", post(super::reviews::decide))
        .merge(super::lists::routes())
        // Only on these routes (not `layer`, which would also wrap the
        // fallback): a path that exists nowhere is 404, not a 401 asking for
        // a token that would not help.
        .route_layer(middleware::from_fn_with_state(std::sync::Arc::new(tokens), require_bearer))
}

async fn require_bearer(
    State(tokens): State<std::sync::Arc<Vec<SecretString>>>,
    request: Request,
    next: Next,
) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    // Compare with every token (no early exit) so timing tells nothing.
    let mut ok = subtle::Choice::from(0u8);
    for t in tokens.iter() {
        ok |= t.expose_secret().as_bytes().ct_eq(given.as_bytes());
    }
    if given.is_empty() || !bool::from(ok) {
        return ApiError::Unauthorized.into_response();
    }
    next.run(request).await
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(AdminDoc::openapi())
}

fn parse_phone(app: &AppState, raw: &str) -> Result<Phone, ApiError> {
    // The input is not echoed: the message is logged, and it may be most of a number.
    Phone::parse(raw, app.region).map_err(|_| ApiError::BadRequest("phone is not a phone number".into()))
}

/// A query string or path segment that does not parse is the client's
/// mistake, answered like any other (JSON 400), not axum's plain-text one.
fn bad_query(e: QueryRejection) -> ApiError {
    ApiError::BadRequest(e.body_text())
}

fn bad_path(e: PathRejection) -> ApiError {
    ApiError::BadRequest(e.body_text())
}

fn limit(requested: Option<i64>) -> i64 {
    requested.unwrap_or(100).clamp(1, MAX_LIMIT)
}

/// Current opt-out state per scope, per sink the target against what was
/// last written there (and when), and the events that made it.
#[utoipa::path(get, path = "/v1/phones/{phone}",
    params(("phone" = String, Path, pattern = r"^((whatsapp|tel):)?[+]?[0-9 ().-]{7,24}$", example = "+14155550101",
        description = "A number valid for its region, in any format (`+14155550101`, `(415) 555-0101`, `whatsapp:+1…`); read with keywords.default_region")),
    responses(
        (status = 200, body = PhoneStatus),
        (status = 400, body = ErrorBody, description = "not a phone number"),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "store unavailable"),
    ))]
async fn phone(
    State(app): State<AppState>,
    raw: Result<Path<String>, PathRejection>,
) -> Result<Json<PhoneStatus>, ApiError> {
    let Path(raw) = raw.map_err(bad_path)?;
    let phone = parse_phone(&app, &raw)?;
    Ok(Json(ops::phone_status(&app.store, &app.relay.sinks, &phone).await?))
}

/// Every configured sink with its health (ok, backing off, misconfigured,
/// since when), the phones waiting for it and the oldest one's age.
#[utoipa::path(get, path = "/v1/sinks", responses(
    (status = 200, body = [SinkStatus]),
    (status = 401, body = ErrorBody),
    (status = 503, body = ErrorBody, description = "store unavailable"),
))]
async fn sinks(State(app): State<AppState>) -> Result<Json<Vec<SinkStatus>>, ApiError> {
    Ok(Json(ops::sinks_status(&app.store, &app.relay.sinks).await?))
}

#[derive(Debug, Serialize, ToSchema)]
struct SinkReleased {
    sink: String,
    /// Always `now`.
    due: String,
}

/// Ends a sink's backoff (after fixing its token, say): its next probe is due now.
#[utoipa::path(post, path = "/v1/sinks/{name}/retry", params(("name" = String, Path, description = "A configured sink")),
    responses(
        (status = 200, body = SinkReleased),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody, description = "no such sink"),
        (status = 503, body = ErrorBody, description = "store unavailable"),
    ))]
async fn retry_sink(
    State(app): State<AppState>,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<SinkReleased>, ApiError> {
    let Path(name) = name.map_err(bad_path)?;
    if app.relay.sink(&name).is_none() || !app.store.release_sink(&name).await? {
        return Err(ApiError::NotFound("no such sink".into()));
    }
    tracing::info!(sink = %name, "operator released the sink from backoff");
    app.wake_relay();
    Ok(Json(SinkReleased { sink: name, due: "now".to_owned() }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    /// A number valid for its region, in any format.
    phone: Option<String>,
    kind: Option<EventKind>,
    /// RFC 3339 time: events received at or after it.
    since: Option<DateTime<Utc>>,
    /// Page size (default 100); values outside 1–500 are brought into it.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Return events with an id above this (the previous page's `next_after`).
    after: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct EventPage {
    items: Vec<EventRow>,
    /// Pass as `after` for the next page; absent on the last page.
    next_after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/events", params(EventQuery), responses(
    (status = 200, body = EventPage),
    (status = 400, body = ErrorBody, description = "a filter that does not parse"),
    (status = 401, body = ErrorBody),
    (status = 503, body = ErrorBody, description = "store unavailable"),
))]
async fn events(
    State(app): State<AppState>,
    q: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<EventPage>, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    let phone = q.phone.as_deref().map(|p| parse_phone(&app, p)).transpose()?;
    let limit = limit(q.limit);
    let filter = EventFilter {
        phone: phone.map(|p| p.as_str().to_owned()),
        kind: q.kind.map(|k| k.as_str().to_owned()),
        since: q.since,
        after_id: q.after,
        limit,
    };
    let items = app.store.list_events(&filter).await?;
    let next_after = (items.len() as i64 == limit).then(|| items.last().map(|e| e.id)).flatten();
    Ok(Json(EventPage { items, next_after }))
}

/// Where a (sink, phone) row stands.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
enum DeliveryStatus {
    Pending,
    Dead,
    Done,
}

impl DeliveryStatus {
    fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "pending",
            DeliveryStatus::Dead => "dead",
            DeliveryStatus::Done => "done",
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeliveryQuery {
    status: Option<DeliveryStatus>,
    /// A sink's name.
    sink: Option<String>,
    /// A number valid for its region, in any format.
    phone: Option<String>,
    /// Page size (default 100); values outside 1–500 are brought into it.
    #[param(minimum = 1, maximum = 500)]
    limit: Option<i64>,
    /// Return rows with an id above this (the previous page's `next_after`).
    after: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
struct DeliveryPage {
    items: Vec<DeliveryRow>,
    next_after: Option<i64>,
}

#[utoipa::path(get, path = "/v1/deliveries", params(DeliveryQuery), responses(
    (status = 200, body = DeliveryPage),
    (status = 400, body = ErrorBody, description = "a filter that does not parse"),
    (status = 401, body = ErrorBody),
    (status = 503, body = ErrorBody, description = "store unavailable"),
))]
async fn deliveries(
    State(app): State<AppState>,
    q: Result<Query<DeliveryQuery>, QueryRejection>,
) -> Result<Json<DeliveryPage>, ApiError> {
    let Query(q) = q.map_err(bad_query)?;
    let phone = q.phone.as_deref().map(|p| parse_phone(&app, p)).transpose()?;
    let limit = limit(q.limit);
    let filter = DeliveryFilter {
        status: q.status.map(|s| s.as_str().to_owned()),
        // A filter holding a NUL matches nothing; PostgreSQL could not even compare it.
        sink: q.sink.map(storable),
        phone: phone.map(|p| p.as_str().to_owned()),
        after_id: q.after,
        limit,
    };
    let items = app.store.list_deliveries(&filter).await?;
    let next_after = (items.len() as i64 == limit).then(|| items.last().map(|d| d.id)).flatten();
    Ok(Json(DeliveryPage { items, next_after }))
}

#[derive(Debug, Serialize, ToSchema)]
struct DeliveryRequeued {
    id: i64,
    /// Always `pending`.
    status: String,
}

/// Re-queues one (sink, phone) row, due now: it is checked against the sink
/// once more, whatever its status.
#[utoipa::path(post, path = "/v1/deliveries/{id}/retry", params(("id" = i64, Path)),
    responses(
        (status = 200, body = DeliveryRequeued),
        (status = 400, body = ErrorBody, description = "an id that is not an integer"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "in a worker's hands"),
        (status = 503, body = ErrorBody, description = "store unavailable"),
    ))]
async fn retry_one(
    State(app): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<DeliveryRequeued>, ApiError> {
    let Path(id) = id.map_err(bad_path)?;
    match app.store.retry_delivery(id).await? {
        RetryOutcome::Requeued => {
            app.wake_relay();
            Ok(Json(DeliveryRequeued { id, status: "pending".to_owned() }))
        }
        RetryOutcome::NotFound => Err(ApiError::NotFound(format!("no delivery {id}"))),
        RetryOutcome::NotRetryable => Err(ApiError::Conflict(format!("delivery {id} is being delivered right now"))),
    }
}

#[derive(Debug, Serialize, ToSchema)]
struct DeadRequeued {
    /// How many dead rows were made pending again.
    requeued: u64,
}

/// Re-queues every dead delivery.
#[utoipa::path(post, path = "/v1/deliveries/retry-dead", responses(
    (status = 200, body = DeadRequeued),
    (status = 401, body = ErrorBody),
    (status = 503, body = ErrorBody, description = "store unavailable"),
))]
async fn retry_dead(State(app): State<AppState>) -> Result<Json<DeadRequeued>, ApiError> {
    let requeued = app.store.replay_dead(None).await?;
    app.wake_relay();
    Ok(Json(DeadRequeued { requeued }))
}

/// A change of consent received another way (phone call, email, letter).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct StaffChange {
    /// A number valid for its region, in any format.
    #[schema(pattern = r"^((whatsapp|tel):)?[+]?[0-9 ().-]{7,24}$", example = "+14155550101")]
    phone: String,
    /// Default: the whole organisation.
    scope: Option<String>,
    note: Option<String>,
    /// Who or what recorded it, e.g. `call-center:jdoe`; not blank.
    #[schema(min_length = 1)]
    source: String,
}

#[derive(Debug, Serialize, ToSchema)]
struct Recorded {
    event_id: i64,
    message_sid: String,
    kind: String,
}

#[utoipa::path(post, path = "/v1/opt-outs", request_body = StaffChange, responses(
    (status = 201, body = Recorded),
    (status = 400, body = ErrorBody, description = "not a phone number, no source, or not this JSON"),
    (status = 401, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "already recorded"),
    (status = 413, body = ErrorBody, description = "body over server.max_body_bytes"),
    (status = 415, body = ErrorBody, description = "body not application/json"),
    (status = 503, body = ErrorBody, description = "store unavailable; nothing was recorded"),
))]
async fn opt_out(
    State(app): State<AppState>,
    body: Result<Json<StaffChange>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    staff_change(app, body, EventKind::OptOut).await
}

#[utoipa::path(post, path = "/v1/opt-ins", request_body = StaffChange, responses(
    (status = 201, body = Recorded),
    (status = 400, body = ErrorBody, description = "not a phone number, no source, or not this JSON"),
    (status = 401, body = ErrorBody),
    (status = 409, body = ErrorBody, description = "already recorded"),
    (status = 413, body = ErrorBody, description = "body over server.max_body_bytes"),
    (status = 415, body = ErrorBody, description = "body not application/json"),
    (status = 503, body = ErrorBody, description = "store unavailable; nothing was recorded"),
))]
async fn opt_in(
    State(app): State<AppState>,
    body: Result<Json<StaffChange>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    staff_change(app, body, EventKind::OptIn).await
}

async fn staff_change(
    app: AppState,
    body: Result<Json<StaffChange>, axum::extract::rejection::JsonRejection>,
    kind: EventKind,
) -> Result<Response, ApiError> {
    let Json(change) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType("application/json"),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    if change.source.trim().is_empty() {
        return Err(ApiError::BadRequest("source is required (who recorded this)".into()));
    }
    let phone = parse_phone(&app, &change.phone)?;
    let event =
        ops::staff_event(phone, kind, change.scope.map(storable), change.note.map(storable), &storable(change.source));
    let sid = event.message_sid.as_str().to_owned();
    app.schema_ready().await?;
    match app.writer.record(event).await? {
        RecordOutcome::Recorded(id) => {
            tracing::info!(event = id, kind = kind.as_str(), "staff recorded a consent change");
            let body = Recorded { event_id: id, message_sid: sid, kind: kind.as_str().to_owned() };
            Ok((StatusCode::CREATED, Json(body)).into_response())
        }
        RecordOutcome::Duplicate => Err(ApiError::Conflict("already recorded".into())),
    }
}
