//! The gateway's HTTP API: health, readiness and metrics; the admin API (tenants, in `admin`); the tenant backend
//! API (tokens and revocation in `credentials`, hook settings in `hooks`, room messages here); the route to the
//! WebSocket upgrade; and, only when configured, the demo chat page (`demo`). Every request is bounded in time and
//! body size.
//!
//! Handlers authenticate their caller and translate between JSON bodies and the fleet's requests; they hold no state.

mod admin;
mod credentials;
mod demo;
mod error;
mod hooks;
mod moderation;
mod users;

pub use error::ApiError;

// The request-body decoders, public so they can be fuzzed on their own (see docs/fuzzing.md).
pub use admin::{parse_create_tenant, parse_set_jwt, parse_set_limits};
pub use credentials::parse_create_token;
pub use hooks::parse_set_pre_send;
pub use moderation::{parse_restriction, parse_room_settings};

use crate::auth::bearer;
use crate::rooms::{self, HistoryPage, Reader};
use crate::upstream;
use crate::ws::upgrade::ws_handler;
use crate::Gateway;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use switchyard_protocol::client::{OkResult, Role};
use switchyard_protocol::internal::{RoomCommand, TenantRecord};
use switchyard_protocol::{limits, ErrorCode, RoomId, UserId};

pub fn router(gw: Arc<Gateway>) -> Router {
    let demo = match &gw.config.demo_project_id {
        Some(project) => {
            tracing::warn!(
                project = %project,
                "the demo chat page is enabled: anyone can sign in as any user of this tenant; never in production"
            );
            demo::routes()
        }
        None => Router::new(),
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/admin/tenants", post(admin::create_tenant))
        .route("/v1/admin/tenants/{project_id}", get(admin::get_tenant).delete(admin::delete_tenant))
        .route("/v1/admin/tenants/{project_id}/jwt", put(admin::set_jwt))
        .route("/v1/admin/tenants/{project_id}/rotate-key", post(admin::rotate_key))
        .route("/v1/admin/tenants/{project_id}/limits", put(admin::set_limits))
        .route("/v1/tokens", post(credentials::create_token))
        .route("/v1/tokens/{token}", delete(credentials::revoke_token))
        .route("/v1/users/{user_id}/sessions", delete(credentials::revoke_user_sessions))
        .route("/v1/users/{user_id}/ban", put(moderation::ban_user).delete(moderation::unban_user))
        .route("/v1/users/{user_id}", delete(users::erase_user))
        .route("/v1/users/{user_id}/export", get(users::export_user))
        .route("/v1/hooks", get(hooks::get_hooks))
        .route("/v1/hooks/pre-send", put(hooks::set_pre_send).delete(hooks::remove_pre_send))
        .route("/v1/hooks/rotate-secret", post(hooks::rotate_secret))
        .route("/v1/rooms", post(create_room))
        .route("/v1/rooms/{room}", delete(delete_room))
        .route("/v1/rooms/{room}/members", get(list_members))
        .route("/v1/rooms/{room}/members/{user_id}", put(set_member).delete(remove_member))
        .route("/v1/rooms/{room}/messages", post(post_message).get(get_messages))
        .route("/v1/rooms/{room}/bans/{user_id}", put(moderation::set_room_ban).delete(moderation::lift_room_ban))
        .route("/v1/rooms/{room}/mutes/{user_id}", put(moderation::set_room_mute).delete(moderation::lift_room_mute))
        .route("/v1/rooms/{room}/moderation", put(moderation::set_room_settings))
        .route("/v1/rooms/{room}/retention", put(set_room_retention).delete(clear_room_retention))
        .route("/v1/ws", get(ws_handler))
        .merge(demo)
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(gw.config.max_http_body_bytes))
        .layer(axum::middleware::from_fn_with_state(gw.clone(), bound_requests))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(gw)
}

/// Bound every request: a declared body over the limit is refused with `too_large` before it is read, a request
/// that takes longer than the request timeout (a slow body, say) gets `unavailable`, and the body-limit rejection of
/// an undeclared body gets the same JSON error shape as everything else.
async fn bound_requests(
    State(gw): State<Arc<Gateway>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = gw.config.max_http_body_bytes;
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return ApiError::new(ErrorCode::TooLarge, format!("request body exceeds {limit} bytes")).into_response();
    }
    let response = match tokio::time::timeout(gw.config.request_timeout(), next.run(request)).await {
        Ok(response) => response,
        Err(_) => return ApiError::unavailable("request took too long").into_response(),
    };
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_json {
        return ApiError::new(ErrorCode::TooLarge, format!("request body exceeds {limit} bytes")).into_response();
    }
    response
}

/// Count HTTP requests by status class.
async fn count_requests(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let class = match response.status().as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    metrics::counter!("switchyard_gateway_http_requests_total", "status" => class).increment(1);
    response
}

/// The body of a JSON request, with a clear `bad_request` when it does not parse.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let nats = gw.nats.connection_state() == async_nats::connection::State::Connected;
    let redis = gw.tokens.is_connected();
    let draining = gw.is_draining();
    let body = json!({"nats": nats, "redis": redis, "draining": draining});
    let status = if nats && redis && !draining { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(gw): State<Arc<Gateway>>) -> String {
    switchyard_service::telemetry::render(&gw.metrics)
}

pub(crate) async fn tenant_of_request(gw: &Gateway, headers: &HeaderMap) -> Result<TenantRecord, ApiError> {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .ok_or_else(|| ApiError::unauthorized("API key required as a bearer token"))?;
    Ok(gw.tenants.authenticate_key(key).await?)
}

pub(crate) fn parse_room(room: &str) -> Result<RoomId, ApiError> {
    RoomId::parse(room).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    from: String,
    body: String,
    attrs: Option<Value>,
}

/// The body of `POST /v1/rooms/{room}/messages`, checked against the body and attrs limits: the sender and the
/// `send` command.
pub fn parse_post_message(
    room: RoomId,
    body: &[u8],
    max_body_bytes: usize,
    max_attrs_bytes: usize,
) -> Result<(UserId, RoomCommand), ApiError> {
    let request: PostMessage = parse_body(body)?;
    let from = UserId::parse(&request.from).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if request.body.len() > max_body_bytes {
        return Err(ApiError::new(ErrorCode::TooLarge, format!("body exceeds {max_body_bytes} bytes")));
    }
    if let Some(attrs) = &request.attrs {
        if !attrs.is_object() {
            return Err(ApiError::bad_request("attrs must be a JSON object"));
        }
        let size = serde_json::to_vec(attrs).map(|v| v.len()).unwrap_or(usize::MAX);
        if size > max_attrs_bytes {
            return Err(ApiError::new(ErrorCode::TooLarge, format!("attrs exceed {max_attrs_bytes} bytes of JSON")));
        }
    }
    let command = RoomCommand::Send { room, body: request.body, attrs: request.attrs, reply_to: None, cmid: None };
    Ok((from, command))
}

async fn post_message(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let (from, command) = parse_post_message(room, &body, gw.config.max_body_bytes, gw.config.max_attrs_bytes)?;
    if let Err(wait) = crate::limits::take_tenant_message(&gw, &tenant.project_id).await {
        return Err(ApiError::rate_limited("the project's message rate is exceeded", wait));
    }
    match upstream::command_for_backend(&gw, &tenant.project_id, &from, command).await {
        Ok(OkResult::Sent { id, seq, ts, .. }) => {
            Ok((StatusCode::CREATED, Json(json!({"id": id, "seq": seq, "ts": ts}))).into_response())
        }
        Ok(_) => Err(ApiError::new(ErrorCode::Internal, "unexpected router reply")),
        Err(error) => Err(error.into()),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
    /// The replies to this message only.
    thread: Option<u64>,
}

async fn get_messages(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    page: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(page) = page.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let limit = rooms::history_limit(page.limit).map_err(|e| ApiError::bad_request(e.to_string()))?;
    // The tenant's backend may read any of its rooms; the room's owner tells its last seq, so the page includes the
    // backend's own writes.
    let page = HistoryPage { before: page.before, after: page.after, limit, thread: page.thread };
    let (messages, more) = rooms::read_history(&gw, &tenant.project_id, Reader::Backend, &room, page).await?;
    Ok(Json(json!({"messages": messages, "more": more})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRoom {
    room: String,
    #[serde(default)]
    private: bool,
    title: Option<String>,
}

/// The body of `POST /v1/rooms`, checked: the `create` command.
pub fn parse_create_room(body: &[u8]) -> Result<RoomCommand, ApiError> {
    let request: CreateRoom = parse_body(body)?;
    let room = parse_room(&request.room)?;
    if request.title.as_ref().is_some_and(|t| t.len() > limits::MAX_TITLE_BYTES) {
        return Err(ApiError::bad_request(format!("title must be at most {} bytes", limits::MAX_TITLE_BYTES)));
    }
    Ok(RoomCommand::Create { room, private: request.private, title: request.title })
}

async fn create_room(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let command = parse_create_room(&body)?;
    let room = command.room().clone();
    upstream::command(&gw, &tenant.project_id, None, command).await.map_err(|e| ApiError::new(e.code, e.message))?;
    Ok((StatusCode::CREATED, Json(json!({"room": room}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetMember {
    role: Role,
}

/// The body of `PUT /v1/rooms/{room}/members/{user}`: the member's role.
pub fn parse_set_member(body: &[u8]) -> Result<Role, ApiError> {
    let request: SetMember = parse_body(body)?;
    Ok(request.role)
}

async fn set_member(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((room, user_id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let user = UserId::parse(&user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let role = parse_set_member(&body)?;
    let command = RoomCommand::SetMember { room, user, role };
    upstream::command(&gw, &tenant.project_id, None, command).await.map_err(|e| ApiError::new(e.code, e.message))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((room, user_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let user = UserId::parse(&user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let command = RoomCommand::Kick { room, user };
    upstream::command(&gw, &tenant.project_id, None, command).await.map_err(|e| ApiError::new(e.code, e.message))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/rooms/{room}`: the room's members are told by a `room_deleted` event, its history before it is
/// erased, and its name is free again.
async fn delete_room(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let command = RoomCommand::DeleteRoom { room: room.clone() };
    let seq = match upstream::command(&gw, &tenant.project_id, None, command).await {
        Ok(OkResult::RoomSeq { seq, .. }) => seq,
        Ok(_) => return Err(ApiError::new(ErrorCode::Internal, "unexpected router reply")),
        Err(error) => return Err(error.into()),
    };
    Ok(Json(json!({"room": room, "seq": seq})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetRetention {
    secs: u64,
}

/// `PUT /v1/rooms/{room}/retention` `{"secs"}`: the room's own history retention (0: for good), for the events
/// sequenced from now on.
async fn set_room_retention(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let request: SetRetention = parse_body(&body)?;
    if request.secs > limits::MAX_RETENTION_SECS {
        return Err(ApiError::bad_request(format!("secs must be 0..={}", limits::MAX_RETENTION_SECS)));
    }
    set_retention(&gw, &tenant, room, Some(request.secs)).await
}

/// `DELETE /v1/rooms/{room}/retention`: the room follows the tenant's retention again.
async fn clear_room_retention(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    set_retention(&gw, &tenant, parse_room(&room)?, None).await
}

/// Set the room's own retention (`None`: follow the tenant's).
async fn set_retention(
    gw: &Gateway,
    tenant: &TenantRecord,
    room: RoomId,
    secs: Option<u64>,
) -> Result<StatusCode, ApiError> {
    upstream::command(gw, &tenant.project_id, None, RoomCommand::SetRetention { room, secs }).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_members(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let members = rooms::members(&gw, &tenant.project_id, Reader::Backend, &room).await?;
    let members = OkResult::Members { members };
    Ok(Json(serde_json::to_value(members).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?))
}
