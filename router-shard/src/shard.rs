//! The shard worker: while this router shard holds a shard's lease, it takes that shard's room commands (handing
//! each to its room's actor, started on demand), its user requests and presence snapshots (kept in the shard's
//! presence table).
//!
//! It does not renew leases (see `leases`) and keeps no room state itself.

use crate::context::RouterContext;
use crate::presence::PresenceTable;
use crate::room::{RoomActor, RoomJob};
use crate::user_reads;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::client::OkResult;
use switchyard_protocol::internal::{
    CommandReply, CommandRequest, PresenceResync, PresenceSnapshot, UserCommand, UserRequest, INTERNAL_VERSION,
};
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, RoomId, ShardId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Queue group of every router shard on a shard's subjects: during a lease hand-over two processes may both be
/// subscribed, and each command must still be served once.
const QUEUE: &str = "routers";
/// Jobs waiting for one room actor.
const ROOM_QUEUE: usize = 256;
/// How long a stopping worker waits for its room actors to finish what they hold.
const DRAIN: Duration = Duration::from_secs(5);

/// Serve `shard` until `stop` fires or a subscription ends.
pub(crate) async fn serve_shard(ctx: Arc<RouterContext>, shard: ShardId, stop: CancellationToken) {
    let subscribe = |subject: String| ctx.nats.queue_subscribe(subject, QUEUE.into());
    let (mut commands, mut user_requests, mut snapshots) = match tokio::try_join!(
        subscribe(subjects::command(shard)),
        subscribe(subjects::user_command(shard)),
        subscribe(subjects::presence_snapshot(shard)),
    ) {
        Ok(subscriptions) => subscriptions,
        Err(error) => {
            tracing::error!(%shard, %error, "cannot subscribe to the shard's subjects");
            return;
        }
    };
    tracing::info!(%shard, "serving shard");
    // A new owner starts with an empty presence table: ask every gateway to report this shard's users now.
    if let Ok(payload) = codec::encode(&PresenceResync { v: INTERNAL_VERSION, shard }) {
        let _ = ctx.nats.publish(subjects::PRESENCE_RESYNC, payload).await;
    }
    // The queue of each active room's actor.
    let mut rooms: HashMap<(ProjectId, RoomId), mpsc::Sender<RoomJob>> = HashMap::new();
    let mut actors: JoinSet<(ProjectId, RoomId)> = JoinSet::new();
    // The user requests being read, one per user at a time (see `user_reads`).
    let mut reads = user_reads::ReadQueue::default();
    let mut presence = PresenceTable::new(ctx.clone());
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let idle = Duration::from_millis(ctx.config.room_idle_ms);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished actors so neither the set nor the map of queues grows.
            Some(finished) = actors.join_next(), if !actors.is_empty() => {
                if let Ok(key) = finished {
                    if rooms.get(&key).is_some_and(|sender| sender.is_closed()) {
                        rooms.remove(&key);
                    }
                }
            }
            _ = expiry.tick() => presence.expire().await,
            message = snapshots.next() => {
                let Some(message) = message else { break };
                match codec::decode::<PresenceSnapshot>(&message.payload) {
                    Ok(snapshot) if snapshot.v == INTERNAL_VERSION => presence.snapshot(snapshot).await,
                    _ => tracing::warn!(%shard, "undecodable presence snapshot dropped"),
                }
            }
            // Reap finished reads.
            () = reads.reap() => {}
            message = user_requests.next() => {
                let Some(message) = message else { break };
                serve_user_request(&ctx, &mut presence, &mut reads, message).await;
            }
            message = commands.next() => {
                let Some(message) = message else { break };
                route_command(&ctx, shard, &mut rooms, &mut actors, idle, message).await;
            }
        }
    }
    reads.abort_all();
    let _ = commands.unsubscribe().await;
    let _ = user_requests.unsubscribe().await;
    let _ = snapshots.unsubscribe().await;
    // Commands already delivered to this process are served, not dropped: the lease is released only after this
    // returns, so this process is still the shard's owner while it does.
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(200), commands.next()).await {
        route_command(&ctx, shard, &mut rooms, &mut actors, idle, message).await;
    }
    drop(rooms);
    if tokio::time::timeout(DRAIN, async { while actors.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(%shard, "room actors did not finish in time; aborting them");
        actors.abort_all();
    }
    tracing::info!(%shard, "stopped serving shard");
}

/// Hand one command to its room's actor, starting the actor when the room has none (or its actor went idle). Never
/// waits: a room whose queue is full answers `unavailable` itself, and the shard goes on with the next command.
async fn route_command(
    ctx: &Arc<RouterContext>,
    shard: ShardId,
    rooms: &mut HashMap<(ProjectId, RoomId), mpsc::Sender<RoomJob>>,
    actors: &mut JoinSet<(ProjectId, RoomId)>,
    idle: Duration,
    message: async_nats::Message,
) {
    let request: CommandRequest = match codec::decode(&message.payload) {
        Ok(request) if request_version_ok(&request) => request,
        Ok(_) | Err(_) => {
            if let Some(reply_to) = message.reply {
                let reply = CommandReply::err(ErrorCode::BadRequest, "undecodable or unsupported command");
                send_reply(ctx, reply_to, &reply).await;
            }
            return;
        }
    };
    let key = (request.tenant.clone(), request.command.room().clone());
    let mut job = RoomJob {
        user: request.user,
        command: request.command,
        quotas: request.quotas,
        by_backend: request.by_backend,
        reply_to: message.reply,
        trace: switchyard_service::trace::carried(message.headers.as_ref()),
    };
    // An actor that went idle has closed its queue; start a new one and hand the job over (once: a new queue is
    // open and empty).
    for _ in 0..2 {
        let sender = rooms.entry(key.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(ROOM_QUEUE);
            let actor = RoomActor::new(ctx.clone(), shard, key.0.clone(), key.1.clone());
            let key = key.clone();
            actors.spawn(async move {
                actor.run(receiver, idle).await;
                key
            });
            sender
        });
        match sender.try_send(job) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(refused)) => {
                metrics::counter!("switchyard_router_room_queue_full_total").increment(1);
                if let Some(reply_to) = refused.reply_to {
                    let reply = CommandReply::not_taken(format!("room {} has too many commands waiting; retry", key.1));
                    send_reply(ctx, reply_to, &reply).await;
                }
                return;
            }
            Err(mpsc::error::TrySendError::Closed(returned)) => {
                rooms.remove(&key);
                job = returned;
            }
        }
    }
}

/// Serve one user request: presence changes at once (they are the loop's own state), reads in a task of their own.
/// A user's reads run one at a time; past the queue's bounds a read answers `unavailable` rather than wait.
async fn serve_user_request(
    ctx: &Arc<RouterContext>,
    presence: &mut PresenceTable,
    reads: &mut user_reads::ReadQueue,
    message: async_nats::Message,
) {
    let request = match codec::decode::<UserRequest>(&message.payload) {
        Ok(request) if request.v == INTERNAL_VERSION => request,
        _ => {
            if let Some(reply_to) = message.reply {
                let reply = CommandReply::err(ErrorCode::BadRequest, "undecodable or unsupported user request");
                send_reply(ctx, reply_to, &reply).await;
            }
            return;
        }
    };
    let UserRequest { tenant, user, command, .. } = request;
    let read = match command {
        UserCommand::SessionsChanged { gateway, online } => {
            presence.sessions_changed(tenant, user, gateway, online).await;
            if let Some(reply_to) = message.reply {
                send_reply(ctx, reply_to, &CommandReply::Ok { result: OkResult::Empty {} }).await;
            }
            return;
        }
        UserCommand::ForgetPresence => {
            let reply = match presence.forget(tenant, user).await {
                Ok(()) => CommandReply::Ok { result: OkResult::Empty {} },
                Err(error) => CommandReply::err(ErrorCode::Unavailable, format!("cannot forget a presence: {error}")),
            };
            if let Some(reply_to) = message.reply {
                send_reply(ctx, reply_to, &reply).await;
            }
            return;
        }
        UserCommand::Presence { users } => {
            let online = presence.online(&tenant, users);
            user_reads::presence(ctx.clone(), tenant.clone(), online).boxed()
        }
        UserCommand::Rooms => user_reads::all_rooms(ctx.clone(), tenant.clone(), user.clone()).boxed(),
        UserCommand::RoomsPage { after } => {
            user_reads::rooms_page(ctx.clone(), tenant.clone(), user.clone(), after).boxed()
        }
    };
    let Some(reply_to) = message.reply else { return };
    let answer = {
        let (ctx, reply_to) = (ctx.clone(), reply_to.clone());
        async move {
            let reply = read.await;
            send_reply(&ctx, reply_to, &reply).await;
        }
        .boxed()
    };
    let refused = match reads.offer(tenant, user, answer) {
        Ok(()) => return,
        Err(user_reads::Refused::ShardBusy) => "too many users' requests in flight on this shard; retry",
        Err(user_reads::Refused::UserBusy) => "too many of this user's requests are waiting; retry",
    };
    metrics::counter!("switchyard_router_user_reads_refused_total").increment(1);
    send_reply(ctx, reply_to, &CommandReply::err(ErrorCode::Unavailable, refused)).await;
}

fn request_version_ok(request: &CommandRequest) -> bool {
    request.v == INTERNAL_VERSION
}

async fn send_reply(ctx: &RouterContext, reply_to: async_nats::Subject, reply: &CommandReply) {
    if let Ok(payload) = codec::encode(reply) {
        let _ = ctx.nats.publish(reply_to, payload).await;
    }
}
