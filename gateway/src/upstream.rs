//! Requests from the gateway to the rest of the fleet over NATS: commands to the router shard that owns a room's
//! shard, and history pages from the persistors.
//!
//! While a shard changes hands nobody answers its subject for a moment; commands are retried on "no responders"
//! until the command timeout. A command that timed out may have been executed, so most are not retried: the client
//! gets `unavailable` and may repeat it (with a `cmid`, safely). Commands that are safe to run twice (a `send` with a
//! `cmid`, which the stream deduplicates; joins, membership and permission reads, read markers, typing; history
//! pages) are tried in short attempts instead, each going to any member of the subject's queue group: a stalled
//! router shard (paused, or cut off without its connection closing) keeps its place in the queue group until NATS
//! notices, and short attempts reach the new owner instead of waiting out the command timeout on the stalled one.
//!
//! Every attempt is timed in `switchyard_gateway_nats_request_duration_seconds{target, outcome}`.

use crate::Gateway;
use async_nats::RequestErrorKind;
use std::collections::BTreeMap;
use std::time::Duration;
use switchyard_protocol::client::{OkResult, PresenceState, RoomSummary};
use switchyard_protocol::internal::{
    AuthoredPage, AuthoredReply, AuthoredRequest, CommandReply, CommandRequest, HistoryReply, HistoryRequest,
    RoomCommand, RoomQuotas, UserCommand, UserRequest, INTERNAL_VERSION,
};
use switchyard_protocol::shard::{shard_of_room, shard_of_user};
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, ShardId, UserId};
use tracing::Instrument as _;

/// A failed request, ready to be answered as an `err`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct UpstreamError {
    pub code: ErrorCode,
    pub message: String,
    /// For `rate_limited` (a room's slow mode): when the op may succeed.
    pub retry_after_ms: Option<u64>,
}

impl UpstreamError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        UpstreamError { code, message: message.into(), retry_after_ms: None }
    }
}

/// Ask the router shard that owns the room to run `command` for `user` (`None`: the tenant's backend).
pub async fn command(
    gw: &Gateway,
    tenant: &ProjectId,
    user: Option<&UserId>,
    command: RoomCommand,
) -> Result<OkResult, UpstreamError> {
    send_command(gw, tenant, user, false, command).await
}

/// Ask the router shard that owns the room to run `command`, sent by the tenant's backend on behalf of `user` (a
/// message posted through the HTTP API): the room's moderation does not hold it back.
pub async fn command_for_backend(
    gw: &Gateway,
    tenant: &ProjectId,
    user: &UserId,
    command: RoomCommand,
) -> Result<OkResult, UpstreamError> {
    send_command(gw, tenant, Some(user), true, command).await
}

async fn send_command(
    gw: &Gateway,
    tenant: &ProjectId,
    user: Option<&UserId>,
    by_backend: bool,
    command: RoomCommand,
) -> Result<OkResult, UpstreamError> {
    // A trace starts here (when traces are on): the op's span, whose context goes with the command to its shard.
    let span = tracing::info_span!(target: "switchyard::trace", "gateway op", op = command.name(), by_backend);
    send_command_in_span(gw, tenant, user, by_backend, command).instrument(span).await
}

async fn send_command_in_span(
    gw: &Gateway,
    tenant: &ProjectId,
    user: Option<&UserId>,
    by_backend: bool,
    command: RoomCommand,
) -> Result<OkResult, UpstreamError> {
    let shard = shard_of_room(tenant, command.room(), gw.config.shard_count);
    let attempt = retry_safe_attempt(&command);
    // The quotas go with the commands they bound; the retention with every command, since any may sequence events.
    let quotas = match command.is_bounded_by_quotas() {
        true => room_quotas(gw, tenant),
        false => RoomQuotas { retention_secs: retention(gw, tenant), ..RoomQuotas::default() },
    };
    let request = CommandRequest {
        v: INTERNAL_VERSION,
        tenant: tenant.clone(),
        user: user.cloned(),
        command,
        quotas,
        by_backend,
    };
    let payload = codec::encode(&request).map_err(|e| UpstreamError::new(ErrorCode::Internal, e.to_string()))?;
    let deadline = tokio::time::Instant::now() + gw.config.command_timeout();
    let mut backoff = NOT_TAKEN_BACKOFF;
    loop {
        let subject = subjects::command(shard);
        let reply = request_until(gw, subject, payload.clone(), Target::Router, attempt, deadline).await?;
        let reply = codec::decode::<CommandReply>(&reply);
        // A room whose queue was full took nothing of the command: send it again while the command may wait.
        let not_taken = reply.as_ref().is_ok_and(CommandReply::was_not_taken);
        if !not_taken || tokio::time::Instant::now() + backoff >= deadline {
            return command_result(reply);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(400));
    }
}

/// The first wait before a command its room's full queue did not take is sent again; it doubles up to 400 ms.
const NOT_TAKEN_BACKOFF: Duration = Duration::from_millis(25);

/// The tenant's quotas on rooms: its own limits where it has them, else the gateway's defaults.
fn room_quotas(gw: &Gateway, tenant: &ProjectId) -> RoomQuotas {
    let own = gw.tenants.cached(tenant).map(|entry| entry.record.limits.clone()).unwrap_or_default();
    let config = &gw.config;
    RoomQuotas {
        members_per_room: Some(own.max_members_per_room.unwrap_or(config.max_members_per_room)),
        rooms_per_user: Some(own.max_rooms_per_user.unwrap_or(config.max_rooms_per_user)),
        backend_creates_rooms: own.backend_creates_rooms.unwrap_or(config.backend_creates_rooms),
        rooms_per_tenant: own.max_rooms.or(config.max_rooms_per_tenant),
        retention_secs: own.history_retention_secs,
    }
}

/// The tenant's history retention, in seconds (`None`: for good).
fn retention(gw: &Gateway, tenant: &ProjectId) -> Option<u64> {
    gw.tenants.cached(tenant).and_then(|entry| entry.record.limits.history_retention_secs)
}

/// How long one attempt of a command that is safe to run twice may wait for its answer before it is sent again.
const RETRY_SAFE_ATTEMPT: Duration = Duration::from_millis(400);

/// The attempt length for `command`: `Some` when running it twice changes nothing.
fn retry_safe_attempt(command: &RoomCommand) -> Option<Duration> {
    let safe = match command {
        RoomCommand::Send { cmid, .. } => cmid.is_some(),
        RoomCommand::Join { .. }
        | RoomCommand::CanRead { .. }
        | RoomCommand::Members { .. }
        | RoomCommand::Read { .. }
        | RoomCommand::Typing { .. } => true,
        RoomCommand::Create { .. }
        | RoomCommand::Leave { .. }
        | RoomCommand::Invite { .. }
        | RoomCommand::Kick { .. }
        | RoomCommand::SetMember { .. }
        | RoomCommand::React { .. }
        | RoomCommand::Edit { .. }
        | RoomCommand::Delete { .. }
        | RoomCommand::Pin { .. }
        | RoomCommand::Moderate { .. }
        | RoomCommand::DeleteRoom { .. }
        | RoomCommand::EraseUser { .. } => false,
        // Setting the same retention twice changes nothing.
        RoomCommand::SetRetention { .. } => true,
    };
    safe.then_some(RETRY_SAFE_ATTEMPT)
}

/// Who answers a request: the `target` label of the latency histogram.
#[derive(Clone, Copy)]
enum Target {
    Router,
    Persistor,
}

impl Target {
    fn label(self) -> &'static str {
        match self {
            Target::Router => "router",
            Target::Persistor => "persistor",
        }
    }

    fn who(self) -> &'static str {
        match self {
            Target::Router => "router shard",
            Target::Persistor => "persistor",
        }
    }
}

/// Send a command that is never answered (typing signals). Lost when its shard is moving, which is acceptable for
/// what it carries.
pub async fn notify(gw: &Gateway, tenant: &ProjectId, user: &UserId, command: RoomCommand) {
    let shard = shard_of_room(tenant, command.room(), gw.config.shard_count);
    // Signals never create rooms or members: no quotas to resolve.
    let quotas = RoomQuotas::default();
    let request = CommandRequest {
        v: INTERNAL_VERSION,
        tenant: tenant.clone(),
        user: Some(user.clone()),
        command,
        quotas,
        by_backend: false,
    };
    if let Ok(payload) = codec::encode(&request) {
        let _ = gw.nats.publish(subjects::command(shard), payload).await;
    }
}

/// Ask the router shard that owns `user`'s shard about that user.
pub async fn user_request(
    gw: &Gateway,
    tenant: &ProjectId,
    user: &UserId,
    command: UserCommand,
) -> Result<OkResult, UpstreamError> {
    let shard = shard_of_user(tenant, user, gw.config.shard_count);
    let request = UserRequest { v: INTERNAL_VERSION, tenant: tenant.clone(), user: user.clone(), command };
    let payload = codec::encode(&request).map_err(|e| UpstreamError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = request_with_retry(gw, subjects::user_command(shard), payload, Target::Router, None).await?;
    decode_reply(&reply)
}

/// Presence of up to a few hundred users, asking each owning shard once.
pub async fn presence(
    gw: &Gateway,
    tenant: &ProjectId,
    users: &[UserId],
) -> Result<BTreeMap<String, PresenceState>, UpstreamError> {
    let mut by_shard: BTreeMap<ShardId, Vec<UserId>> = BTreeMap::new();
    for user in users {
        by_shard.entry(shard_of_user(tenant, user, gw.config.shard_count)).or_default().push(user.clone());
    }
    let requests = by_shard.into_values().map(|users| async move {
        let first = users[0].clone();
        user_request(gw, tenant, &first, UserCommand::Presence { users }).await
    });
    let mut states = BTreeMap::new();
    for reply in futures::future::join_all(requests).await {
        match reply? {
            OkResult::Presence { users } => states.extend(users),
            _ => return Err(UpstreamError::new(ErrorCode::Internal, "unexpected presence reply")),
        }
    }
    Ok(states)
}

/// Every membership of `user`, read a page at a time from the router shard that owns the user's shard (each page
/// is one NATS message, whatever the user's room count).
pub async fn rooms(gw: &Gateway, tenant: &ProjectId, user: &UserId) -> Result<Vec<RoomSummary>, UpstreamError> {
    let shard = shard_of_user(tenant, user, gw.config.shard_count);
    // By room: a membership changed during the listing can show up on two pages; the later page is newer.
    let mut rooms = BTreeMap::new();
    let mut after = 0;
    // A cursor only moves forward; the bound stops a router that would answer the same page forever.
    for _ in 0..MAX_ROOMS_PAGES {
        let command = UserCommand::RoomsPage { after };
        let request = UserRequest { v: INTERNAL_VERSION, tenant: tenant.clone(), user: user.clone(), command };
        let payload = codec::encode(&request).map_err(|e| UpstreamError::new(ErrorCode::Internal, e.to_string()))?;
        let reply = request_with_retry(gw, subjects::user_command(shard), payload, Target::Router, None).await?;
        match codec::decode::<CommandReply>(&reply) {
            Ok(CommandReply::RoomsPage { rooms: page, next }) => {
                rooms.extend(page.into_iter().map(|summary| (summary.room.clone(), summary)));
                match next {
                    Some(next) if next > after => after = next,
                    _ => return Ok(rooms.into_values().collect()),
                }
            }
            Ok(CommandReply::Err { code, message, .. }) => return Err(UpstreamError::new(code, message)),
            Ok(CommandReply::Ok { .. }) => {
                return Err(UpstreamError::new(ErrorCode::Internal, "unexpected rooms reply"))
            }
            Err(e) => return Err(UpstreamError::new(ErrorCode::Internal, format!("unreadable router reply: {e}"))),
        }
    }
    Err(UpstreamError::new(ErrorCode::Unavailable, "the user's room list did not end; retry"))
}

/// More pages than any user's rooms can fill (rooms per user is capped well below this times a page).
const MAX_ROOMS_PAGES: usize = 1_000;

fn decode_reply(reply: &[u8]) -> Result<OkResult, UpstreamError> {
    command_result(codec::decode::<CommandReply>(reply))
}

fn command_result(reply: Result<CommandReply, codec::CodecError>) -> Result<OkResult, UpstreamError> {
    match reply {
        Ok(CommandReply::Ok { result }) => Ok(result),
        Ok(CommandReply::Err { code, message, retry_after_ms, .. }) => {
            Err(UpstreamError { code, message, retry_after_ms })
        }
        Ok(CommandReply::RoomsPage { .. }) => Err(UpstreamError::new(ErrorCode::Internal, "unexpected rooms page")),
        Err(e) => Err(UpstreamError::new(ErrorCode::Internal, format!("unreadable router reply: {e}"))),
    }
}

/// Ask a persistor for a page of a user's authorship (rooms, or messages).
pub async fn authored(
    gw: &Gateway,
    tenant: &ProjectId,
    user: &UserId,
    page: AuthoredPage,
) -> Result<AuthoredReply, UpstreamError> {
    let limit = match page {
        AuthoredPage::Rooms { .. } => 100,
        AuthoredPage::Messages { .. } => 25,
    };
    let request = AuthoredRequest { v: INTERNAL_VERSION, tenant: tenant.clone(), user: user.clone(), page, limit };
    let payload = codec::encode(&request).map_err(|e| UpstreamError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = request_with_retry(
        gw,
        subjects::AUTHORED_SUBJECT.to_owned(),
        payload,
        Target::Persistor,
        Some(RETRY_SAFE_ATTEMPT * 5),
    )
    .await?;
    codec::decode::<AuthoredReply>(&reply)
        .map_err(|e| UpstreamError::new(ErrorCode::Internal, format!("unreadable persistor reply: {e}")))
}

/// Ask a persistor for a page of history.
pub async fn history(gw: &Gateway, request: HistoryRequest) -> Result<HistoryReply, UpstreamError> {
    let payload = codec::encode(&request).map_err(|e| UpstreamError::new(ErrorCode::Internal, e.to_string()))?;
    let reply = request_with_retry(
        gw,
        subjects::HISTORY_SUBJECT.to_owned(),
        payload,
        Target::Persistor,
        Some(RETRY_SAFE_ATTEMPT * 5),
    )
    .await?;
    codec::decode::<HistoryReply>(&reply)
        .map_err(|e| UpstreamError::new(ErrorCode::Internal, format!("unreadable persistor reply: {e}")))
}

async fn request_with_retry(
    gw: &Gateway,
    subject: String,
    payload: bytes::Bytes,
    target: Target,
    attempt: Option<Duration>,
) -> Result<bytes::Bytes, UpstreamError> {
    let deadline = tokio::time::Instant::now() + gw.config.command_timeout();
    request_until(gw, subject, payload, target, attempt, deadline).await
}

/// `request_with_retry` within a deadline the caller chose.
async fn request_until(
    gw: &Gateway,
    subject: String,
    payload: bytes::Bytes,
    target: Target,
    attempt: Option<Duration>,
    deadline: tokio::time::Instant,
) -> Result<bytes::Bytes, UpstreamError> {
    let who = target.who();
    let mut backoff = Duration::from_millis(50);
    loop {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        if remaining.is_zero() {
            return Err(UpstreamError::new(ErrorCode::Unavailable, format!("no {who} answered in time; retry later")));
        }
        let this_attempt = attempt.map_or(remaining, |a| a.min(remaining));
        let mut request = async_nats::Request::new().payload(payload.clone()).timeout(Some(this_attempt));
        if let Some(headers) = switchyard_service::trace::current_headers() {
            request = request.headers(headers);
        }
        let started = std::time::Instant::now();
        let result = gw.nats.send_request(subject.clone(), request).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) if e.kind() == RequestErrorKind::NoResponders => "no_responders",
            Err(e) if e.kind() == RequestErrorKind::TimedOut => "timeout",
            Err(_) => "error",
        };
        metrics::histogram!(
            "switchyard_gateway_nats_request_duration_seconds",
            "target" => target.label(),
            "outcome" => outcome
        )
        .record(started.elapsed().as_secs_f64());
        match result {
            Ok(message) => return Ok(message.payload),
            Err(e) if e.kind() == RequestErrorKind::NoResponders => {
                tokio::time::sleep(backoff.min(remaining)).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) if e.kind() == RequestErrorKind::TimedOut && attempt.is_some() && this_attempt < remaining => {}
            Err(e) if e.kind() == RequestErrorKind::TimedOut => {
                return Err(UpstreamError::new(ErrorCode::Unavailable, format!("the {who} did not answer in time")));
            }
            Err(e) => return Err(UpstreamError::new(ErrorCode::Unavailable, format!("cannot reach a {who}: {e}"))),
        }
    }
}
