//! Batched direct gets (JetStream's `$JS.API.DIRECT.GET.<stream>` with `batch` or `multi_last`): many messages of a
//! stream for one request, read off an inbox of their own until the end-of-batch marker.
//!
//! It does not page by itself: a caller asks again from where a batch ended, and every request is bounded in
//! messages and bytes.

use bytes::Bytes;
use futures::StreamExt;
use std::time::Duration;

/// How long one batch may take to arrive.
const BATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes one batch carries (the server stops at the message that crosses it).
pub(crate) const BATCH_BYTES: usize = 512 * 1024;

/// Why a batch could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DirectGetError {
    #[error("encode a direct-get request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("subscribe: {0}")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error("publish: {0}")]
    Publish(#[source] async_nats::PublishError),
    #[error("the reply subscription ended")]
    SubscriptionEnded,
    #[error("no answer from the stream in time")]
    TimedOut,
    #[error("direct get answered {code}: {description:?}")]
    Status { code: u16, description: Option<String> },
    #[error("a direct-get answer without its {0}")]
    MissingHeader(&'static str),
}

/// One message of a batch.
#[derive(Debug)]
pub(crate) struct Got {
    pub subject: String,
    /// Its stream sequence.
    pub sequence: u64,
    /// How many more messages match the request after this one: the server's `Nats-Num-Pending`. nats-server 2.11
    /// counted the message itself too (one more); the pinned release and later do not.
    pub pending: u64,
    /// A KV delete or purge marker rather than a value.
    pub removed: bool,
    pub payload: Bytes,
}

/// What to read.
pub(crate) enum Ask<'a> {
    /// Up to `batch` messages on subjects matching `filter` (wildcards allowed), from stream sequence `from` on.
    Matching { filter: &'a str, from: u64, batch: usize },
    /// The last message of each of `subjects` (those with none are skipped).
    LastOf { subjects: &'a [String] },
}

#[derive(serde::Serialize)]
struct Request<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_by_subj: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multi_last: Option<&'a [String]>,
    batch: usize,
    max_bytes: usize,
}

/// Ask `api` (a stream's direct-get subject) for a batch.
pub(crate) async fn batch(nats: &async_nats::Client, api: &str, ask: Ask<'_>) -> Result<Vec<Got>, DirectGetError> {
    let request = match ask {
        Ask::Matching { filter, from, batch } => Request {
            seq: Some(from.max(1)),
            next_by_subj: Some(filter),
            multi_last: None,
            batch: batch.max(1),
            max_bytes: BATCH_BYTES,
        },
        Ask::LastOf { subjects } => {
            if subjects.is_empty() {
                return Ok(Vec::new());
            }
            Request {
                seq: None,
                next_by_subj: None,
                multi_last: Some(subjects),
                batch: subjects.len(),
                max_bytes: BATCH_BYTES,
            }
        }
    };
    let payload = serde_json::to_vec(&request).map_err(DirectGetError::Encode)?;
    let inbox = async_nats::Subject::from(nats.new_inbox());
    let mut replies = nats.subscribe(inbox.clone()).await.map_err(DirectGetError::Subscribe)?;
    nats.publish_with_reply(api.to_owned(), inbox, payload.into()).await.map_err(DirectGetError::Publish)?;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + BATCH_TIMEOUT;
    loop {
        let message = match tokio::time::timeout_at(deadline, replies.next()).await {
            Ok(Some(message)) => message,
            Ok(None) => return Err(DirectGetError::SubscriptionEnded),
            Err(_) => return Err(DirectGetError::TimedOut),
        };
        if let Some(status) = message.status {
            match status.as_u16() {
                // End of the batch, or nothing (more) matches.
                204 | 404 => break,
                code => return Err(DirectGetError::Status { code, description: message.description.clone() }),
            }
        }
        let header = |name: &str| message.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str().to_owned());
        let sequence = header("Nats-Sequence")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(DirectGetError::MissingHeader("stream sequence"))?;
        let subject = header("Nats-Subject").ok_or(DirectGetError::MissingHeader("subject"))?;
        let pending = header("Nats-Num-Pending").and_then(|v| v.parse::<u64>().ok());
        let removed = header("KV-Operation").is_some_and(|op| op == "DEL" || op == "PURGE");
        got.push(Got { subject, sequence, pending: pending.unwrap_or(0), removed, payload: message.payload });
        // A server without batched reads answers one message and no end-of-batch marker.
        if pending.is_none() {
            break;
        }
    }
    Ok(got)
}
