//! HTTP API errors: a protocol error code, a message, and the JSON body `{"code", "message"}` with its status.
//!
//! This module shapes errors; it does not log them.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use switchyard_protocol::ErrorCode;

/// An error answered to an HTTP caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// For `rate_limited`: when to retry; sent as `retry_after_ms` and a `Retry-After` header.
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), retry_after_ms: None }
    }
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        ApiError {
            retry_after_ms: Some(retry_after.as_millis() as u64 + 1),
            ..ApiError::new(ErrorCode::RateLimited, message)
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unauthorized, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::Unavailable, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut body = serde_json::json!({"code": self.code, "message": self.message});
        let mut response = match self.retry_after_ms {
            Some(ms) => {
                body["retry_after_ms"] = ms.into();
                let secs = ms.div_ceil(1000).max(1);
                (status, [(axum::http::header::RETRY_AFTER, secs.to_string())], Json(body)).into_response()
            }
            None => (status, Json(body)).into_response(),
        };
        if self.code == ErrorCode::Unauthorized {
            response
                .headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        response
    }
}
