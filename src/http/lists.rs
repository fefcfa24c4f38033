//! Lists over the admin API: `POST /v1/imports` (a CSV list in),
//! `GET /v1/opt-outs?format=csv|json` (the suppression list out) and
//! `POST /v1/phones/check` (a campaign's numbers, before it goes out). The
//! work is in `crate::lists`, shared with the command line.
//!
//! The import body is the one body not read whole before its handler
//! (`body.rs` lets it through): a six-figure list is streamed into the CSV
//! reader under its own limits (`lists.max_import_bytes`,
//! `lists.import_timeout`), so memory does not grow with the file.

use std::io::Read;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::domain::storable;
use crate::lists::check::{check, Checked, MAX_PHONES};
use crate::lists::export::{export, Format, ListedOptOut};
use crate::lists::import::{import, ImportError, ImportKind, ImportOptions, ImportReport};
use crate::lists::read::ListError;

pub const IMPORT_PATH: &str = "/v1/imports";
pub const CHECK_PATH: &str = "/v1/phones/check";
/// 10,000 numbers as JSON strings, with room for how people type them.
pub const CHECK_MAX_BYTES: usize = 2 * 1024 * 1024;

/// The routes, mounted by the admin router behind its bearer tokens.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(IMPORT_PATH, post(import_list))
        .route("/v1/opt-outs", get(export_list))
        .route(CHECK_PATH, post(check_phones).layer(DefaultBodyLimit::max(CHECK_MAX_BYTES)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// Scope of rows without one (a Messaging Service SID); default: the whole organisation.
    scope: Option<String>,
    /// Where the list came from, kept on each event as `import:<source>`; default `api`.
    source: Option<String>,
    /// Kind of rows without a kind/status column; default `opt_out`.
    kind: Option<ImportKind>,
    /// Read and check the whole file, record nothing.
    dry_run: Option<bool>,
}

/// A body that ended before it was whole.
#[derive(Debug, thiserror::Error)]
enum BodyCut {
    #[error("body larger than lists.max_import_bytes")]
    TooLarge,
    #[error("body not received within lists.import_timeout")]
    TooSlow,
}

/// Records every usable row of a CSV list as an event (relayed like any
/// other) and reports rows read, recorded, unchanged (already known) and
/// each invalid row with its line number. Idempotent: the same file twice
/// records nothing the second time.
#[utoipa::path(post, path = "/v1/imports", params(ImportQuery),
    request_body(content = String, content_type = "text/csv",
        description = "A CSV list with a header naming a phone column (phone, phone number, number, mobile, cell, primary phone…) and optionally a time (opted_out_at, opt out date, date…), kind/status, scope and note"),
    responses(
        (status = 200, body = ImportReport, description = "read to the end; invalid rows listed"),
        (status = 400, body = ErrorBody, description = "no phone column, an empty file, or a bad query parameter"),
        (status = 401, body = ErrorBody),
        (status = 408, body = ErrorBody, description = "body slower than lists.import_timeout"),
        (status = 413, body = ErrorBody, description = "body over lists.max_import_bytes (the batches before the limit are recorded; importing again records only the rest)"),
        (status = 415, body = ErrorBody, description = "body not text/csv"),
        (status = 503, body = ErrorBody, description = "store unavailable (batches already committed stay; importing again records only the rest)"),
    ))]
pub(super) async fn import_list(
    State(app): State<AppState>,
    q: Result<Query<ImportQuery>, QueryRejection>,
    request: Request,
) -> Result<Json<ImportReport>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    if !is_csv(request.headers()) {
        return Err(ApiError::UnsupportedMediaType("text/csv"));
    }
    let limits = &app.lists;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_import_bytes as u64) {
        return Err(ApiError::PayloadTooLarge);
    }
    app.schema_ready().await?;
    let opts = ImportOptions {
        scope: q.scope.map(storable),
        source: q.source.map(storable).filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "api".to_owned()),
        kind: q.kind.unwrap_or_default().into(),
        dry_run: q.dry_run.unwrap_or(false),
        region: app.region,
    };
    let reader = stream_body(request.into_body(), limits.max_import_bytes, limits.import_timeout);
    let report = import(&app.store, reader, &opts, || app.wake_relay()).await.map_err(|e| match e {
        ImportError::List(ListError::Io(io)) => match io.get_ref().and_then(|e| e.downcast_ref::<BodyCut>()) {
            Some(BodyCut::TooLarge) => ApiError::PayloadTooLarge,
            Some(BodyCut::TooSlow) => ApiError::RequestTimeout,
            None => ApiError::BadRequest(format!("unreadable body: {io}")),
        },
        ImportError::List(other) => ApiError::BadRequest(other.to_string()),
        ImportError::Store { error, recorded } => {
            tracing::warn!(recorded, "import stopped part-way by the store");
            ApiError::Unavailable(error)
        }
    })?;
    tracing::info!(
        rows = report.rows_read,
        recorded = report.recorded,
        unchanged = report.unchanged,
        invalid = report.invalid_count,
        dry_run = report.dry_run,
        "list imported"
    );
    Ok(Json(report))
}

/// `text/csv` (any parameters), or what spreadsheets and browsers send for a CSV file.
fn is_csv(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    matches!(essence.as_str(), "text/csv" | "application/csv" | "text/plain" | "application/vnd.ms-excel")
}

/// The body as a blocking `Read` for the CSV reader's thread: a task pulls
/// its frames (under the size limit and the deadline) into a small channel.
fn stream_body(body: Body, max_bytes: usize, timeout: std::time::Duration) -> ChannelRead {
    let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(8);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut body = body;
        let mut seen = 0usize;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => Err(std::io::Error::other(BodyCut::TooSlow)),
                Ok(None) => return,
                Ok(Some(Err(e))) => Err(std::io::Error::other(e.to_string())),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        seen += data.len();
                        if seen > max_bytes {
                            Err(std::io::Error::other(BodyCut::TooLarge))
                        } else {
                            Ok(data)
                        }
                    }
                    Err(_trailers) => continue,
                },
            };
            let stop = frame.is_err();
            if tx.send(frame).await.is_err() || stop {
                return;
            }
        }
    });
    ChannelRead { rx, current: Bytes::new() }
}

struct ChannelRead {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(chunk) => self.current = chunk?,
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// `csv` (default) or `json` (one array, streamed).
    format: Option<Format>,
    /// Only this scope (its own states and organisation-wide ones).
    scope: Option<String>,
}

/// The phones currently opted out: phone (E.164), scope, since, source;
/// streamed from the store, so its size does not matter.
#[utoipa::path(get, path = "/v1/opt-outs", params(ExportQuery),
    responses(
        (status = 200, body = [ListedOptOut], description = "CSV (`phone,scope,since,source`) or a JSON array of these"),
        (status = 400, body = ErrorBody, description = "an unknown format"),
        (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody, description = "store unavailable"),
    ))]
pub(super) async fn export_list(
    State(app): State<AppState>,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let format = q.format.unwrap_or_default();
    let scope = q.scope.map(storable).filter(|s| !s.trim().is_empty());
    let mut rx = export(app.store.clone(), scope, format);
    // The first chunk decides the status: a store that is down is a 503,
    // not a 200 with an empty list.
    let first = match rx.recv().await {
        Some(Ok(chunk)) => chunk,
        Some(Err(e)) => return Err(ApiError::Unavailable(e)),
        None => Vec::new(),
    };
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        // An error part-way ends the body abruptly: the client sees a failed
        // download, never a shorter list that looks whole.
        let item = item.map(Bytes::from).map_err(|e| {
            tracing::error!(error = %e, "export stopped part-way");
            std::io::Error::other(e.to_string())
        });
        Some((item, rx))
    });
    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(first))]);
    let body = Body::from_stream(futures_util::StreamExt::chain(body, rest));
    let name = match format {
        Format::Csv => "attachment; filename=\"opt-outs.csv\"",
        Format::Json => "attachment; filename=\"opt-outs.json\"",
    };
    Ok(([(header::CONTENT_TYPE, format.content_type()), (header::CONTENT_DISPOSITION, name)], body).into_response())
}

/// Numbers to check, as people typed them.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// Up to 10,000 numbers, in any format.
    #[schema(max_items = 10000)]
    phones: Vec<String>,
    /// Check in this scope (its own state and organisation-wide); default: opted out in any scope.
    scope: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CheckResults {
    /// One per number given, in the order given.
    results: Vec<Checked>,
}

/// Whether each number is opted out (and since when), in the order given;
/// a number that does not parse gets `e164: null`, `opted_out: false` and a reason.
#[utoipa::path(post, path = "/v1/phones/check", request_body = CheckRequest,
    responses(
        (status = 200, body = CheckResults),
        (status = 400, body = ErrorBody, description = "more than 10,000 numbers, or not this JSON"),
        (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody, description = "body over 2 MiB"),
        (status = 415, body = ErrorBody, description = "body not application/json"),
        (status = 503, body = ErrorBody, description = "store unavailable"),
    ))]
pub(super) async fn check_phones(
    State(app): State<AppState>,
    body: Result<Json<CheckRequest>, JsonRejection>,
) -> Result<Json<CheckResults>, ApiError> {
    let Json(req) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType("application/json"),
        _ => ApiError::BadRequest(e.body_text()),
    })?;
    if req.phones.len() > MAX_PHONES {
        return Err(ApiError::BadRequest(format!(
            "at most {MAX_PHONES} phones per call (got {}); split the list",
            req.phones.len()
        )));
    }
    let scope = req.scope.map(storable).filter(|s| !s.trim().is_empty());
    let results = check(&app.store, &req.phones, scope.as_deref(), app.region).await?;
    Ok(Json(CheckResults { results }))
}
