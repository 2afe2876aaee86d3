//! The history responder: answers history requests from gateways (a NATS queue group shared by every persistor)
//! with pages read from the store, after waiting briefly for the store to catch up to the room's last seq.
//!
//! It does not authorise the reader: the gateway asked the room's router shard first.

use crate::store::{HistoryQuery, HistoryStore};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::internal::{HistoryReply, HistoryRequest, INTERNAL_VERSION};
use switchyard_protocol::{codec, limits, subjects, ErrorCode};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Most history requests served at once by one persistor.
const CONCURRENCY: usize = 64;

pub async fn serve<S: HistoryStore>(
    nats: async_nats::Client,
    store: Arc<S>,
    catch_up: Duration,
    shutdown: CancellationToken,
) -> Result<(), crate::PersistorError> {
    let mut requests = nats
        .queue_subscribe(subjects::HISTORY_SUBJECT, subjects::HISTORY_QUEUE.into())
        .await
        .map_err(|e| crate::PersistorError::Nats(format!("history subscription: {e}")))?;
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let Some(reply_to) = message.reply.clone() else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let (nats, store) = (nats.clone(), store.clone());
        tokio::spawn(async move {
            let reply = answer(&*store, &message.payload, catch_up).await;
            if let Ok(payload) = codec::encode(&reply) {
                let _ = nats.publish(reply_to, payload).await;
            }
            drop(permit);
        });
    }
    let _ = requests.unsubscribe().await;
    Ok(())
}

async fn answer<S: HistoryStore>(store: &S, payload: &[u8], catch_up: Duration) -> HistoryReply {
    let err = |code, message: String| HistoryReply::Err { code, message };
    let request = match codec::decode::<HistoryRequest>(payload) {
        Ok(request) if request.v == INTERNAL_VERSION => request,
        _ => return err(ErrorCode::BadRequest, "undecodable history request".into()),
    };
    if !(1..=limits::HISTORY_MAX_LIMIT).contains(&request.limit) {
        return err(ErrorCode::BadRequest, "limit must be 1 to 100".into());
    }
    // Read your own writes: wait until this store holds the room's last seq at authorisation time.
    let deadline = tokio::time::Instant::now() + catch_up;
    if request.min_seq > 0 {
        loop {
            match store.last_seq(&request.tenant, &request.room).await {
                Ok(seq) if seq >= request.min_seq => break,
                Ok(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
                Ok(_) => break,
                Err(error) => return err(ErrorCode::Unavailable, error.to_string()),
            }
        }
    }
    let query = HistoryQuery {
        tenant: request.tenant,
        room: request.room,
        before: request.before,
        after: request.after,
        limit: request.limit,
    };
    match store.history(&query).await {
        Ok(page) => HistoryReply::Ok { messages: page.messages, more: page.more },
        Err(crate::store::StoreError::InvalidQuery(message)) => err(ErrorCode::BadRequest, message),
        Err(error) => err(ErrorCode::Unavailable, error.to_string()),
    }
}
