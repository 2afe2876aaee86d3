//! The demo chat page, served only when `demo_project_id` is configured: the page itself at `/`, its script and
//! stylesheet and the JavaScript client library under `/demo/`, and `POST /demo/v1/session`, which hands out a
//! token for any user of the demo tenant so that a visitor can sign in by typing a name.
//!
//! That endpoint lets anyone act as anyone in the demo tenant; it exists for local trials (`cargo xtask up`) and
//! must never be enabled in production. The assets are compiled into the binary; this module holds no state and
//! does not talk to the fleet beyond the tenant lookup and token issue.

use super::ApiError;
use super::{now_ms, parse_body};
use crate::tokens::TokenGrant;
use crate::Gateway;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use switchyard_protocol::{ErrorCode, ProjectId, UserId};

/// How long a demo token lives. The page asks for a new one on every reconnect, so it can be short.
const DEMO_TOKEN_TTL_SECS: u64 = 3600;

const INDEX_HTML: &str = include_str!("../../demo/index.html");
const APP_JS: &str = include_str!("../../demo/app.js");
const STYLE_CSS: &str = include_str!("../../demo/style.css");
/// The published client library, the same file npm ships.
const CLIENT_JS: &str = include_str!("../../../clients/js/src/index.js");

/// Scripts and styles only from this origin; sockets to this host; nothing framed.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The demo's routes, merged into the gateway's router when the demo is enabled.
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/demo/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/demo/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
        .route("/demo/switchyard-client.js", get(|| async { asset("text/javascript; charset=utf-8", CLIENT_JS) }))
        .route("/demo/v1/session", post(create_session))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRequest {
    user_id: String,
}

/// `POST /demo/v1/session {"user_id"}` -> 201 `{"token", "user", "project_id", "expires_at"}` for the demo tenant.
async fn create_session(State(gw): State<Arc<Gateway>>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let Some(project) = gw.config.demo_project_id.as_deref() else {
        return Err(ApiError::new(ErrorCode::NotFound, "the demo is not enabled"));
    };
    let project_id =
        ProjectId::parse(project).map_err(|e| ApiError::new(ErrorCode::Internal, format!("demo tenant: {e}")))?;
    let request: SessionRequest = parse_body(&body)?;
    let user_id = UserId::parse(&request.user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match gw.tenants.lookup(&project_id).await? {
        None => return Err(ApiError::unavailable(format!("the demo tenant {project_id} does not exist"))),
        Some(entry) if entry.record.disabled => {
            return Err(ApiError::new(ErrorCode::Forbidden, format!("the demo tenant {project_id} is disabled")))
        }
        Some(_) => {}
    }
    let expires_at_ms = now_ms() + DEMO_TOKEN_TTL_SECS * 1000;
    let grant = TokenGrant { project_id: project_id.clone(), user_id: user_id.clone(), expires_at_ms };
    let token = gw.tokens.issue(&grant, DEMO_TOKEN_TTL_SECS).await?;
    let body = json!({"token": token, "user": user_id, "project_id": project_id, "expires_at": expires_at_ms});
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
