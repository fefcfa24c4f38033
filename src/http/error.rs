//! The one place where errors become HTTP answers.
//!
//! Clients get a status and a short, fixed text; the detail (which check
//! failed, what the database said) goes to the log only.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;
use crate::twilio::signature::SignatureError;
use crate::twilio::webhook::WebhookError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("signature refused: {0}")]
    Forbidden(#[from] SignatureError),
    #[error("body larger than the limit")]
    PayloadTooLarge,
    #[error("body is not application/x-www-form-urlencoded")]
    UnsupportedMediaType,
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The event was not committed; Twilio (or the caller) should retry.
    #[error("{0}")]
    Unavailable(#[from] StoreError),
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The word logged as the request's outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::Forbidden(_) => "bad_signature",
            ApiError::PayloadTooLarge | ApiError::UnsupportedMediaType | ApiError::BadRequest(_) => "rejected",
            ApiError::Unavailable(_) => "store_unavailable",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Unavailable(e) => tracing::error!(error = %e, "event not committed; answering 503"),
            other => tracing::warn!(reason = %other, "request refused"),
        }
        let body = match &self {
            // No hint to a forger about which part of the signature failed.
            ApiError::Forbidden(_) => String::new(),
            ApiError::BadRequest(detail) => format!("{detail}\n"),
            ApiError::Unavailable(_) => "store unavailable, retry later\n".to_owned(),
            other => format!("{other}\n"),
        };
        let mut resp = (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        }
        resp
    }
}
