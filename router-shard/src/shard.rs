//! The shard worker: while this router shard holds a shard's lease, it takes that shard's commands from NATS and
//! hands each to its room's actor, starting actors on demand.
//!
//! It does not renew leases (see `leases`) and keeps no room state itself.

use crate::context::RouterContext;
use crate::room::{RoomActor, RoomJob};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::internal::{CommandReply, CommandRequest, INTERNAL_VERSION};
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, RoomId, ShardId};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Queue group of every router shard on a command subject: during a lease hand-over two processes may both be
/// subscribed, and each command must still be served once.
const COMMAND_QUEUE: &str = "routers";
/// Jobs waiting for one room actor.
const ROOM_QUEUE: usize = 256;
/// How long a stopping worker waits for its room actors to finish what they hold.
const DRAIN: Duration = Duration::from_secs(5);

/// Serve `shard` until `stop` fires or the subscription ends.
pub(crate) async fn serve_shard(ctx: Arc<RouterContext>, shard: ShardId, stop: CancellationToken) {
    let mut commands = match ctx.nats.queue_subscribe(subjects::command(shard), COMMAND_QUEUE.into()).await {
        Ok(subscription) => subscription,
        Err(error) => {
            tracing::error!(%shard, %error, "cannot subscribe to the shard's commands");
            return;
        }
    };
    tracing::info!(%shard, "serving shard");
    // The queue of each active room's actor.
    let mut rooms: HashMap<(ProjectId, RoomId), mpsc::Sender<RoomJob>> = HashMap::new();
    let mut actors = JoinSet::new();
    let idle = Duration::from_millis(ctx.config.room_idle_ms);
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => break,
            message = commands.next() => match message {
                Some(message) => message,
                None => break,
            },
            // Reap finished actors so the set does not grow.
            Some(_) = actors.join_next(), if !actors.is_empty() => continue,
        };
        let Some(reply_to) = message.reply else {
            tracing::warn!(%shard, "command without a reply subject dropped");
            continue;
        };
        let request: CommandRequest = match codec::decode(&message.payload) {
            Ok(request) if request_version_ok(&request) => request,
            Ok(_) | Err(_) => {
                reply_error(&ctx, reply_to, ErrorCode::BadRequest, "undecodable or unsupported command").await;
                continue;
            }
        };
        let room = request.command.room().clone();
        let key = (request.tenant.clone(), room.clone());
        let mut job = RoomJob { user: request.user, command: request.command, reply_to };
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
    let _ = commands.unsubscribe().await;
    drop(rooms);
    if tokio::time::timeout(DRAIN, async { while actors.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(%shard, "room actors did not finish in time; aborting them");
        actors.abort_all();
    }
    tracing::info!(%shard, "stopped serving shard");
}

fn request_version_ok(request: &CommandRequest) -> bool {
    request.v == INTERNAL_VERSION
}

async fn reply_error(ctx: &RouterContext, reply_to: async_nats::Subject, code: ErrorCode, message: &str) {
    if let Ok(payload) = codec::encode(&CommandReply::err(code, message)) {
        let _ = ctx.nats.publish(reply_to, payload).await;
    }
}
