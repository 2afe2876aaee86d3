//! HTTP API errors: a protocol error code, a message, and the JSON body `{"code", "message"}` with its status; and
//! the conversions from the domain errors (`auth`, `jwt`, `tenants`, `tokens`) to what an HTTP caller sees.
//!
//! This module shapes errors; it does not log them.

use crate::auth::AuthError;
use crate::jwt::{JwtError, KeyError};
use crate::tenants::TenantError;
use crate::tokens::TokenError;
use crate::upstream::UpstreamError;
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

impl From<UpstreamError> for ApiError {
    fn from(error: UpstreamError) -> Self {
        ApiError { retry_after_ms: error.retry_after_ms, ..ApiError::new(error.code, error.message) }
    }
}

impl From<TokenError> for ApiError {
    /// Every token store failure is an outage: `unavailable`.
    fn from(error: TokenError) -> Self {
        ApiError::unavailable(error.to_string())
    }
}

impl From<TenantError> for ApiError {
    fn from(error: TenantError) -> Self {
        let code = match &error {
            TenantError::NotFound => ErrorCode::NotFound,
            TenantError::InvalidApiKey => ErrorCode::Unauthorized,
            TenantError::Disabled => ErrorCode::Forbidden,
            TenantError::Unreadable(_) | TenantError::Encode(_) => ErrorCode::Internal,
            TenantError::Read(_) | TenantError::Create(_) | TenantError::Write(_) | TenantError::Contended => {
                ErrorCode::Unavailable
            }
        };
        ApiError::new(code, error.to_string())
    }
}

impl From<JwtError> for ApiError {
    /// A refused JWT is `unauthorized`.
    fn from(error: JwtError) -> Self {
        ApiError::unauthorized(error.to_string())
    }
}

impl From<KeyError> for ApiError {
    /// Refused key material is the caller's mistake: `bad_request`.
    fn from(error: KeyError) -> Self {
        ApiError::bad_request(error.to_string())
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::TokenStore(error) => error.into(),
            AuthError::Tenant(error) => error.into(),
            AuthError::MalformedJwt(error) | AuthError::InvalidJwt(error) => error.into(),
            AuthError::TenantDisabled | AuthError::Banned => ApiError::new(ErrorCode::Forbidden, error.to_string()),
            AuthError::Missing
            | AuthError::TooLong
            | AuthError::UnknownKind
            | AuthError::UnknownToken
            | AuthError::UnknownProject
            | AuthError::NoJwtKey
            | AuthError::Revoked => ApiError::unauthorized(error.to_string()),
        }
    }
}
