//! Every request body is read here, before any handler: under
//! `server.max_body_bytes` and within `server.body_timeout` of its headers.
//!
//! A declared `Content-Length` above the limit is answered 413 before a byte
//! of the body is read; hyper sends `100 Continue` only when a body is first
//! read, so a client that asked with `Expect: 100-continue` gets the 413
//! instead. A body that arrives more slowly than the deadline allows (one
//! byte every few seconds) is answered 408: a per-chunk timeout, as
//! tower-http's `RequestBodyTimeout` has, would let such a body run for as
//! long as each byte comes in time.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use super::error::ApiError;

#[derive(Debug, Clone, Copy)]
pub struct BodyRules {
    pub max_bytes: usize,
    pub timeout: Duration,
}

pub async fn read_whole_body(State(rules): State<BodyRules>, request: Request, next: Next) -> Response {
    // A list import is streamed by its handler, under `lists.*` limits.
    if request.uri().path() == super::lists::IMPORT_PATH {
        return next.run(request).await;
    }
    // A batch check of 10,000 numbers is larger than a webhook.
    let rules = match request.uri().path() {
        super::lists::CHECK_PATH => {
            BodyRules { max_bytes: rules.max_bytes.max(super::lists::CHECK_MAX_BYTES), ..rules }
        }
        _ => rules,
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > rules.max_bytes as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(rules.timeout, Limited::new(body, rules.max_bytes).collect()).await;
    let bytes = match read {
        Err(_elapsed) => return ApiError::RequestTimeout.into_response(),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return ApiError::PayloadTooLarge.into_response();
        }
        Ok(Err(_)) => return ApiError::BadRequest("unreadable body".into()).into_response(),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    next.run(Request::from_parts(parts, Body::from(bytes))).await
}
