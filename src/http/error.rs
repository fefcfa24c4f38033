//! The one place where errors become HTTP answers.
//!
//! Clients get a status and a short, fixed text; the detail (which check
//! failed, what the database said) goes to the log only.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::store::StoreError;
use crate::twilio::signature::SignatureError;
use crate::twilio::webhook::WebhookError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The signature did not verify; the second field says over which URLs
    /// (scheme, host, port, path: no credentials, no query) it was checked,
    /// which is how an operator finds a wrong `public_url`.
    #[error("signature refused: {0}; checked against {1}")]
    Forbidden(SignatureError, String),
    #[error("body larger than the limit")]
    PayloadTooLarge,
    #[error("body not received within the time allowed")]
    RequestTimeout,
    /// The body is not of the one type the endpoint reads (named here).
    #[error("body is not {0}")]
    UnsupportedMediaType(&'static str),
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The event was not committed; Twilio (or the caller) should retry.
    #[error("{0}")]
    Unavailable(#[from] StoreError),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

/// The JSON body of every refusal but 403 (which says nothing to a forger).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable: `bad_request`, `unauthorized`, `not_found`,
    /// `conflict`, `payload_too_large`, `unsupported_media_type`,
    /// `request_timeout`, `store_unavailable`.
    pub code: String,
    /// What was wrong, for a person.
    pub detail: String,
}

impl From<WebhookError> for ApiError {
    fn from(e: WebhookError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Forbidden(..) => StatusCode::FORBIDDEN,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
        }
    }

    /// A stable machine-readable code for the JSON body.
    fn code(&self) -> &'static str {
        match self {
            ApiError::Forbidden(..) => "forbidden",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::RequestTimeout => "request_timeout",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unavailable(_) => "store_unavailable",
            ApiError::Unauthorized => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
        }
    }

    /// The word logged as the request's outcome.
    pub fn outcome(&self) -> &'static str {
        match self {
            ApiError::Forbidden(..) => "bad_signature",
            ApiError::PayloadTooLarge
            | ApiError::RequestTimeout
            | ApiError::UnsupportedMediaType(_)
            | ApiError::BadRequest(_) => "rejected",
            ApiError::Unavailable(_) => "store_unavailable",
            ApiError::Unauthorized | ApiError::NotFound(_) | ApiError::Conflict(_) => "rejected",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Unavailable(e) => tracing::error!(error = %e, "event not committed; answering 503"),
            // A rejection may echo its input (serde quotes the value it could
            // not read): phone numbers in it are masked.
            other => tracing::warn!(reason = %crate::domain::mask_phones_in(&other.to_string()), "request refused"),
        }
        // 403 says nothing to a forger; 503 hides the database's words; the
        // rest are the client's own mistakes and say what they were.
        let detail = match &self {
            ApiError::Forbidden(..) => None,
            ApiError::Unavailable(_) => Some("store unavailable, retry later".to_owned()),
            other => Some(other.to_string()),
        };
        let mut resp = match detail {
            None => status.into_response(),
            Some(detail) => (status, Json(ErrorBody { code: self.code().to_owned(), detail })).into_response(),
        };
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                resp.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
            }
            // The rest of the body may still be on its way: it must not be
            // read as the next request, so the connection ends here.
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
                resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            }
            StatusCode::UNAUTHORIZED => {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}
