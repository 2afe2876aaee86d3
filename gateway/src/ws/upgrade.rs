//! The WebSocket upgrade: origin check, subprotocol choice, and authentication from the `Authorization` header or
//! the `token` query parameter, all before the upgrade so failures get plain HTTP errors (403, 400, 401; 503 when
//! the token store is down; 429 when the tenant or the user is at its fleet-wide socket quota).
//!
//! Without a token the upgrade proceeds and the session waits for a first-frame `auth`; at most
//! `max_unauthenticated` sockets of a gateway wait so at once (503 past it).

use crate::auth::{authenticate, bearer};
use crate::http::ApiError;
use crate::sockets;
use crate::ws::session;
use crate::Gateway;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchyard_protocol::client::Format;
use switchyard_protocol::ErrorCode;

/// Bytes the socket reads at a time.
const READ_BUFFER_BYTES: usize = 1024;
/// Bytes of fed frames the socket's writer collects before it writes them out without waiting for a flush.
const WRITE_BATCH_BYTES: usize = 16 * 1024;

/// A socket that upgraded without a token and has not authenticated yet, counted against the gateway's
/// `max_unauthenticated`; dropping it (authenticated, refused or gone) frees its place.
pub struct Unauthenticated(Arc<Gateway>);

impl Unauthenticated {
    /// A place among the gateway's unauthenticated sockets; `None` when all are taken.
    fn take(gw: &Arc<Gateway>) -> Option<Self> {
        let max = gw.config.max_unauthenticated;
        gw.unauthenticated
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Unauthenticated(gw.clone()))
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        self.0.unauthenticated.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    token: Option<String>,
}

/// Pick the session's format from `Sec-WebSocket-Protocol`: JSON when none is requested, the first supported one
/// otherwise, and an error when some are requested but none is supported.
pub fn choose_format(headers: &HeaderMap) -> Result<Format, ApiError> {
    let requested: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    if requested.is_empty() {
        return Ok(Format::Json);
    }
    requested.iter().find_map(|name| Format::from_subprotocol(name)).ok_or_else(|| {
        ApiError::bad_request(
            "none of the requested subprotocols is supported: use switchyard.v1.json or switchyard.v1.msgpack",
        )
    })
}

pub async fn ws_handler(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<WsQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !gw.config.allowed_origins.is_empty() {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !gw.config.allowed_origins.iter().any(|allowed| allowed == origin) {
            return ApiError::new(ErrorCode::Forbidden, "origin not allowed").into_response();
        }
    }
    if gw.is_draining() {
        return ApiError::unavailable("gateway is draining").into_response();
    }
    let format = match choose_format(&headers) {
        Ok(format) => format,
        Err(error) => return error.into_response(),
    };
    let header_token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
    let token = header_token.map(str::to_owned).or(query.token);
    let identity = match token {
        Some(token) => match authenticate(&gw, &token).await {
            Ok(identity) => Some(identity),
            Err(error) => return ApiError::from(error).into_response(),
        },
        None => None,
    };
    let admitted = match identity {
        Some(identity) => match sockets::admit(&gw, &identity.tenant, &identity.user).await {
            Ok(slot) => Some((identity, slot)),
            Err(over) => {
                return ApiError::rate_limited(over.reason(), std::time::Duration::from_secs(1)).into_response();
            }
        },
        None => None,
    };
    let waiting = match admitted {
        Some(_) => None,
        None => match Unauthenticated::take(&gw) {
            Some(place) => Some(place),
            None => {
                metrics::counter!("switchyard_gateway_unauthenticated_refused_total").increment(1);
                return ApiError::unavailable("too many connections are waiting to authenticate on this gateway")
                    .into_response();
            }
        },
    };
    let max_frame = gw.config.max_frame_bytes;
    let mut upgrade = upgrade
        // Frames a little over the limit are read and refused with 1009; far larger ones fail the read.
        .max_message_size(max_frame * 2)
        .max_frame_size(max_frame * 2)
        // Allocated up front for every socket, idle or not: client frames are small ops, and a larger frame grows
        // the buffer (it is read in several calls).
        .read_buffer_size(READ_BUFFER_BYTES)
        // Events are fed in batches and flushed once per batch; the buffer only grows for a session that receives.
        .write_buffer_size(WRITE_BATCH_BYTES);
    if headers.contains_key(header::SEC_WEBSOCKET_PROTOCOL) {
        upgrade = upgrade.protocols([format.subprotocol()]);
    }
    // Tracked so the drain can wait for every session to say `bye` and close.
    let tracked = gw.session_tasks.token();
    upgrade
        .on_upgrade(move |socket| async move {
            session::run(gw, socket, format, admitted, waiting).await;
            drop(tracked);
        })
        .into_response()
}
