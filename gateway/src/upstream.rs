//! Requests from the gateway to the rest of the fleet over NATS: commands to the router shard that owns a room's
//! shard, and history pages from the persistors.
//!
//! While a shard changes hands nobody answers its subject for a moment; commands are retried on "no responders"
//! until the command timeout. A command that timed out may have been executed, so it is not retried: the client
//! gets `unavailable` and may repeat it (with a `cmid`, safely).

use crate::Gateway;
use async_nats::RequestErrorKind;
use std::time::Duration;
use switchyard_protocol::client::OkResult;
use switchyard_protocol::internal::{
    CommandReply, CommandRequest, HistoryReply, HistoryRequest, RoomCommand, INTERNAL_VERSION,
};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, UserId};

/// A failed request, ready to be answered as an `err`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct UpstreamError {
    pub code: ErrorCode,
    pub message: String,
}

fn upstream_error(code: ErrorCode, message: impl Into<String>) -> UpstreamError {
    UpstreamError { code, message: message.into() }
}

/// Ask the router shard that owns the room to run `command` for `user`.
pub async fn command(
    gw: &Gateway,
    tenant: &ProjectId,
    user: &UserId,
    command: RoomCommand,
) -> Result<OkResult, UpstreamError> {
    let shard = shard_of_room(tenant, command.room(), gw.config.shard_count);
    let request = CommandRequest { v: INTERNAL_VERSION, tenant: tenant.clone(), user: user.clone(), command };
    let payload = codec::encode(&request).map_err(|e| upstream_error(ErrorCode::Internal, e.to_string()))?;
    let reply = request_with_retry(gw, subjects::command(shard), payload, "router shard").await?;
    match codec::decode::<CommandReply>(&reply) {
        Ok(CommandReply::Ok { result }) => Ok(result),
        Ok(CommandReply::Err { code, message }) => Err(upstream_error(code, message)),
        Err(e) => Err(upstream_error(ErrorCode::Internal, format!("unreadable router reply: {e}"))),
    }
}

/// Ask a persistor for a page of history.
pub async fn history(gw: &Gateway, request: HistoryRequest) -> Result<HistoryReply, UpstreamError> {
    let payload = codec::encode(&request).map_err(|e| upstream_error(ErrorCode::Internal, e.to_string()))?;
    let reply = request_with_retry(gw, subjects::HISTORY_SUBJECT.to_owned(), payload, "persistor").await?;
    codec::decode::<HistoryReply>(&reply)
        .map_err(|e| upstream_error(ErrorCode::Internal, format!("unreadable persistor reply: {e}")))
}

async fn request_with_retry(
    gw: &Gateway,
    subject: String,
    payload: bytes::Bytes,
    who: &str,
) -> Result<bytes::Bytes, UpstreamError> {
    let deadline = tokio::time::Instant::now() + gw.config.command_timeout();
    let mut backoff = Duration::from_millis(50);
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(upstream_error(ErrorCode::Unavailable, format!("no {who} answered in time; retry later")));
        }
        let request = async_nats::Request::new().payload(payload.clone()).timeout(Some(remaining));
        match gw.nats.send_request(subject.clone(), request).await {
            Ok(message) => return Ok(message.payload),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                return Err(upstream_error(ErrorCode::Unavailable, format!("the {who} did not answer in time")));
            }
            Err(e) => return Err(upstream_error(ErrorCode::Unavailable, format!("cannot reach a {who}: {e}"))),
        }
    }
}
