//! The ingest loop: a durable pull consumer on the events stream, writing events to the store in batches and
//! acknowledging each only after the batch is written. An event that cannot be decoded goes to the dead-letter
//! subject and is terminated; a store failure is retried (the events stay unacknowledged and are never dropped).
//!
//! Writes are idempotent, so redeliveries after a crash are harmless. This module does not serve reads.

use crate::store::HistoryStore;
use crate::PersistorError;
use async_nats::jetstream::{self, consumer, AckKind};
use futures::StreamExt;
use std::time::Duration;
use switchyard_protocol::internal::RoomEvent;
use switchyard_protocol::{codec, subjects};
use tokio_util::sync::CancellationToken;

/// How long JetStream waits for an ack before redelivering.
const ACK_WAIT: Duration = Duration::from_secs(30);

/// Open (or create) the persistors' durable consumer, waiting for the events stream to exist.
pub async fn open_consumer(
    js: &jetstream::Context,
    shutdown: &CancellationToken,
) -> Result<Option<consumer::PullConsumer>, PersistorError> {
    let stream = loop {
        match js.get_stream(subjects::EVENTS_STREAM).await {
            Ok(stream) => break stream,
            Err(error) => {
                tracing::info!(%error, "waiting for the events stream (router shards create it)");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
    };
    let consumer = stream
        .get_or_create_consumer(
            subjects::PERSISTOR_CONSUMER,
            consumer::pull::Config {
                durable_name: Some(subjects::PERSISTOR_CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: 20_000,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| PersistorError::Nats(format!("persistor consumer: {e}")))?;
    Ok(Some(consumer))
}

/// Consume until `shutdown`. Unacknowledged events at shutdown are redelivered to the next persistor.
pub async fn run<S: HistoryStore>(
    nats: async_nats::Client,
    consumer: consumer::PullConsumer,
    store: &S,
    batch_max: usize,
    shutdown: CancellationToken,
) -> Result<(), PersistorError> {
    let messages = consumer.messages().await.map_err(|e| PersistorError::Nats(format!("pull: {e}")))?;
    let mut batches = messages.ready_chunks(batch_max);
    loop {
        let batch = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            batch = batches.next() => match batch {
                Some(batch) => batch,
                None => return Err(PersistorError::Nats("the consumer's message stream ended".into())),
            },
        };
        let mut events = Vec::with_capacity(batch.len());
        let mut acks = Vec::with_capacity(batch.len());
        for message in batch {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "pull error");
                    continue;
                }
            };
            match codec::decode::<RoomEvent>(&message.payload) {
                Ok(event) => {
                    events.push(event);
                    acks.push(message);
                }
                Err(error) => {
                    tracing::error!(%error, subject = %message.subject, "undecodable event sent to dead letters");
                    metrics::counter!("switchyard_persistor_dead_letters_total").increment(1);
                    if let Err(error) = nats.publish(subjects::DEAD_LETTER_SUBJECT, message.payload.clone()).await {
                        tracing::error!(%error, "cannot publish a dead letter; leaving the event for redelivery");
                        continue;
                    }
                    let _ = message.ack_with(AckKind::Term).await;
                }
            }
        }
        if events.is_empty() {
            continue;
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match store.apply(&events).await {
                Ok(()) => break,
                Err(error) => {
                    metrics::counter!("switchyard_persistor_store_errors_total").increment(1);
                    tracing::warn!(%error, events = events.len(), "store write failed; retrying");
                    for message in &acks {
                        let _ = message.ack_with(AckKind::Progress).await;
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        for message in &acks {
            if let Err(error) = message.ack().await {
                tracing::warn!(%error, "ack failed; the event will be redelivered and rewritten");
            }
        }
        metrics::counter!("switchyard_persistor_events_written_total").increment(events.len() as u64);
    }
}
