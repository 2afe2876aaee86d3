//! The shard worker: while this router shard holds a shard's lease, it takes that shard's room commands (handing
//! each to its room's actor, started on demand), its user requests and presence snapshots (kept in the shard's
//! presence table).
//!
//! It does not renew leases (see `leases`) and keeps no room state itself.

use crate::context::RouterContext;
use crate::presence::PresenceTable;
use crate::room::{RoomActor, RoomJob};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::internal::{
    CommandReply, CommandRequest, PresenceResync, PresenceSnapshot, UserRequest, INTERNAL_VERSION,
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
    let mut actors = JoinSet::new();
    let mut presence = PresenceTable::new(ctx.clone());
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let idle = Duration::from_millis(ctx.config.room_idle_ms);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished actors so the set does not grow.
            Some(_) = actors.join_next(), if !actors.is_empty() => {}
            _ = expiry.tick() => presence.expire().await,
            message = snapshots.next() => {
                let Some(message) = message else { break };
                match codec::decode::<PresenceSnapshot>(&message.payload) {
                    Ok(snapshot) if snapshot.v == INTERNAL_VERSION => presence.snapshot(snapshot).await,
                    _ => tracing::warn!(%shard, "undecodable presence snapshot dropped"),
                }
            }
            message = user_requests.next() => {
                let Some(message) = message else { break };
                let reply = match codec::decode::<UserRequest>(&message.payload) {
                    Ok(request) if request.v == INTERNAL_VERSION => presence.handle(request).await,
                    _ => Some(CommandReply::err(ErrorCode::BadRequest, "undecodable or unsupported user request")),
                };
                if let (Some(reply), Some(reply_to)) = (reply, message.reply) {
                    send_reply(&ctx, reply_to, &reply).await;
                }
            }
            message = commands.next() => {
                let Some(message) = message else { break };
                route_command(&ctx, shard, &mut rooms, &mut actors, idle, message).await;
            }
        }
    }
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

/// Hand one command to its room's actor, starting the actor when the room has none (or its actor went idle).
async fn route_command(
    ctx: &Arc<RouterContext>,
    shard: ShardId,
    rooms: &mut HashMap<(ProjectId, RoomId), mpsc::Sender<RoomJob>>,
    actors: &mut JoinSet<()>,
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
    let mut job = RoomJob { user: request.user, command: request.command, reply_to: message.reply };
    // An actor that went idle has closed its queue; start a new one and hand the job over.
    loop {
        let sender = rooms.entry(key.clone()).or_insert_with(|| {
            let (sender, receiver) = mpsc::channel(ROOM_QUEUE);
            let actor = RoomActor::new(ctx.clone(), shard, key.0.clone(), key.1.clone());
            actors.spawn(actor.run(receiver, idle));
            sender
        });
        match sender.send(job).await {
            Ok(()) => break,
            Err(mpsc::error::SendError(returned)) => {
                rooms.remove(&key);
                job = returned;
            }
        }
    }
    rooms.retain(|_, sender| !sender.is_closed());
}

fn request_version_ok(request: &CommandRequest) -> bool {
    request.v == INTERNAL_VERSION
}

async fn send_reply(ctx: &RouterContext, reply_to: async_nats::Subject, reply: &CommandReply) {
    if let Ok(payload) = codec::encode(reply) {
        let _ = ctx.nats.publish(reply_to, payload).await;
    }
}
