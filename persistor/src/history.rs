//! The history responder: answers history requests from gateways (a NATS queue group shared by every persistor)
//! with pages read from the store, after waiting briefly for the store to catch up to the room's last seq; and
//! room-head requests from router shards (a room's last stored seq and time, for a room whose events have left
//! the events stream); and a user's authorship across a tenant (rooms, then messages), for erasing and exporting
//! the user.
//!
//! It does not authorise the reader: the gateway asked the room's router shard first.

use crate::store::{HistoryQuery, HistoryStore};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::internal::{
    AuthoredPage, AuthoredReply, AuthoredRequest, HistoryReply, HistoryRequest, RoomHeadReply, RoomHeadRequest,
    INTERNAL_VERSION,
};
use switchyard_protocol::{codec, limits, subjects, ErrorCode};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Most history requests served at once by one persistor.
const CONCURRENCY: usize = 64;
/// Most rooms one page of a user's authorship lists.
pub const AUTHORED_ROOMS_MAX: u32 = 100;
/// Most index entries one page of a user's messages reads: a page of messages of the largest size still fits a
/// NATS message.
pub const AUTHORED_MESSAGES_MAX: u32 = 25;

pub async fn serve<S: HistoryStore>(
    nats: async_nats::Client,
    store: Arc<S>,
    catch_up: Duration,
    shutdown: CancellationToken,
) -> Result<(), crate::PersistorError> {
    let pages = nats
        .queue_subscribe(subjects::HISTORY_SUBJECT, subjects::HISTORY_QUEUE.into())
        .await
        .map_err(crate::PersistorError::nats("history subscription"))?;
    let heads = nats
        .queue_subscribe(subjects::ROOM_HEAD_SUBJECT, subjects::HISTORY_QUEUE.into())
        .await
        .map_err(crate::PersistorError::nats("room head subscription"))?;
    let authored = nats
        .queue_subscribe(subjects::AUTHORED_SUBJECT, subjects::HISTORY_QUEUE.into())
        .await
        .map_err(crate::PersistorError::nats("authorship subscription"))?;
    let mut requests = futures::stream::select_all([pages, heads, authored]);
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
            if message.subject.as_str() == subjects::ROOM_HEAD_SUBJECT {
                if let Ok(payload) = codec::encode(&answer_head(&*store, &message.payload).await) {
                    let _ = nats.publish(reply_to, payload).await;
                }
                drop(permit);
                return;
            }
            if message.subject.as_str() == subjects::AUTHORED_SUBJECT {
                if let Ok(payload) = codec::encode(&answer_authored(&*store, &message.payload).await) {
                    let _ = nats.publish(reply_to, payload).await;
                }
                drop(permit);
                return;
            }
            let forward = codec::decode::<HistoryRequest>(&message.payload).is_ok_and(|r| r.after.is_some());
            let reply = answer(&*store, &message.payload, catch_up).await;
            // Leave room for the reply's headers within the server's largest message.
            let budget = nats.server_info().max_payload.saturating_sub(4 * 1024);
            if let Some(payload) = encode_within(reply, forward, budget) {
                let _ = nats.publish(reply_to, payload).await;
            }
            drop(permit);
        });
    }
    for mut subscription in requests {
        let _ = subscription.unsubscribe().await;
    }
    Ok(())
}

/// Encode `reply`, dropping messages from the far end of the page until it fits in `budget` bytes (a page of large
/// messages can exceed what NATS carries); the page then says `more`. Forward pages (`after`) lose their last
/// messages, backward pages their first, so paging on from the page's edge finds the dropped ones.
fn encode_within(mut reply: HistoryReply, forward: bool, budget: usize) -> Option<bytes::Bytes> {
    loop {
        let payload = codec::encode(&reply).ok()?;
        match &mut reply {
            HistoryReply::Ok { messages, more } if payload.len() > budget && messages.len() > 1 => {
                let drop = (messages.len() / 4).max(1);
                if forward {
                    messages.truncate(messages.len() - drop);
                } else {
                    messages.drain(..drop);
                }
                *more = true;
            }
            _ => return Some(payload),
        }
    }
}

/// The room's last stored event, as a router shard asks for it.
async fn answer_head<S: HistoryStore>(store: &S, payload: &[u8]) -> RoomHeadReply {
    let request = match codec::decode::<RoomHeadRequest>(payload) {
        Ok(request) if request.v == INTERNAL_VERSION => request,
        _ => {
            return RoomHeadReply::Err { code: ErrorCode::BadRequest, message: "undecodable room head request".into() }
        }
    };
    match store.head(&request.tenant, &request.room).await {
        Ok(head) => RoomHeadReply::Ok { last_seq: head.last_seq, last_ts_us: head.last_ts_us },
        Err(error) => RoomHeadReply::Err { code: ErrorCode::Unavailable, message: error.to_string() },
    }
}

/// A page of a user's authorship.
async fn answer_authored<S: HistoryStore>(store: &S, payload: &[u8]) -> AuthoredReply {
    let request = match codec::decode::<AuthoredRequest>(payload) {
        Ok(request) if request.v == INTERNAL_VERSION => request,
        _ => {
            return AuthoredReply::Err { code: ErrorCode::BadRequest, message: "undecodable authorship request".into() }
        }
    };
    let failed = |error: crate::store::StoreError| AuthoredReply::Err {
        code: ErrorCode::Unavailable,
        message: error.to_string(),
    };
    let (tenant, user) = (&request.tenant, &request.user);
    match &request.page {
        AuthoredPage::Rooms { after } => {
            let limit = request.limit.clamp(1, AUTHORED_ROOMS_MAX);
            match store.authored_rooms(tenant, user, after.as_ref(), limit).await {
                Ok((rooms, next)) => AuthoredReply::Rooms { rooms, next },
                Err(error) => failed(error),
            }
        }
        AuthoredPage::Messages { after } => {
            let limit = request.limit.clamp(1, AUTHORED_MESSAGES_MAX);
            let after = after.as_ref().map(|(room, seq)| (room, *seq));
            match store.authored_messages(tenant, user, after, limit).await {
                Ok(page) => AuthoredReply::Messages { messages: page.messages, next: page.next },
                Err(error) => failed(error),
            }
        }
    }
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
    let page = match request.thread {
        Some(0) => return err(ErrorCode::BadRequest, "thread must be the seq of a message".into()),
        Some(parent) => store.thread(&query, parent).await,
        None => store.history(&query).await,
    };
    match page {
        Ok(page) => HistoryReply::Ok { messages: page.messages, more: page.more },
        Err(crate::store::StoreError::InvalidQuery(fault)) => err(ErrorCode::BadRequest, fault.to_string()),
        Err(error) => err(ErrorCode::Unavailable, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_protocol::client::Message;
    use switchyard_protocol::{MessageId, UserId};

    fn page(n: u64, body_len: usize) -> HistoryReply {
        let messages = (1..=n)
            .map(|seq| Message {
                seq,
                id: MessageId::generate(seq),
                from: Some(UserId::parse("alice").unwrap()),
                body: Some("x".repeat(body_len)),
                attrs: None,
                reply_to: None,
                ts: seq,
                edited_ts: None,
                deleted: false,
                reactions: Default::default(),
                pinned: false,
                reply_count: 0,
            })
            .collect();
        HistoryReply::Ok { messages, more: false }
    }

    fn seqs(payload: &[u8]) -> (Vec<u64>, bool) {
        match codec::decode::<HistoryReply>(payload).unwrap() {
            HistoryReply::Ok { messages, more } => (messages.iter().map(|m| m.seq).collect(), more),
            HistoryReply::Err { .. } => panic!("not a page"),
        }
    }

    #[test]
    fn a_page_too_large_for_nats_loses_messages_at_its_far_end() {
        let budget = 100 * 1024;
        let forward = encode_within(page(100, 16 * 1024), true, budget).unwrap();
        assert!(forward.len() <= budget);
        let (kept, more) = seqs(&forward);
        assert!(more && kept.len() < 100 && kept[0] == 1, "{kept:?}");
        let backward = encode_within(page(100, 16 * 1024), false, budget).unwrap();
        let (kept, more) = seqs(&backward);
        assert!(more && kept.len() < 100 && *kept.last().unwrap() == 100, "{kept:?}");
    }

    #[test]
    fn a_page_that_fits_is_unchanged() {
        let (kept, more) = seqs(&encode_within(page(10, 100), true, 1 << 20).unwrap());
        assert_eq!((kept.len(), more), (10, false));
    }
}
