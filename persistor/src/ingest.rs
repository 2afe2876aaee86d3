//! The ingest loop: a durable pull consumer on the events stream, writing events to the store in batches (a few
//! batches in flight at once) and acknowledging each event only after the store has it.
//!
//! Failures are told apart by their kind, never by counting alone:
//! - the store is **unavailable** (down, timing out, overloaded): the batch is held, its events are kept from
//!   redelivery with progress acks, and the same write is retried with exponential backoff until it succeeds or the
//!   persistor stops. No event is ever dead-lettered for an outage, and nothing more is pulled meanwhile, so
//!   JetStream buffers the rest;
//! - the store **rejects** a write (a value it cannot hold): the batch is split until the rejected event is alone;
//!   the rest is written and acked, and the rejected event is nak'ed with a growing delay. When it has been delivered
//!   `max_deliver` times and is still rejected, it goes to the dead-letter stream and is terminated. A lone event is
//!   only blamed while the store is taking other writes (one succeeded after its batch was pulled); when every write is
//!   rejected (a dropped table, say) it is held like an outage, so healthy events are never dead-lettered;
//! - an event that cannot even be decoded goes to the dead-letter stream at once.
//!
//! Writes are idempotent, so redeliveries after a crash are harmless. This module does not serve reads.

use crate::store::{HistoryStore, StoreError};
use crate::PersistorError;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, consumer, stream, AckKind, Message};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use std::ops::Range;
use std::time::{Duration, Instant};
use switchyard_protocol::internal::RoomEvent;
use switchyard_protocol::{codec, subjects};
use tokio_util::sync::CancellationToken;

/// Headers a dead letter carries, beside the original payload.
pub mod dead_letter_headers {
    /// Why the event was dead-lettered.
    pub const REASON: &str = "Sy-Dead-Reason";
    /// The events-stream subject the event was appended to.
    pub const SUBJECT: &str = "Sy-Dead-Subject";
    /// The event's sequence in the events stream.
    pub const STREAM_SEQ: &str = "Sy-Dead-Stream-Seq";
    /// How many times it had been delivered.
    pub const DELIVERIES: &str = "Sy-Dead-Deliveries";
}

/// How the persistor consumes: the consumer's settings and the persistor's own retry rules.
#[derive(Debug, Clone)]
pub struct IngestSettings {
    /// Most events written in one store call.
    pub batch_max: usize,
    /// Most batches being written at once.
    pub batches_in_flight: usize,
    /// How long JetStream waits for an ack (or a progress ack) before redelivering an event.
    pub ack_wait: Duration,
    /// Most events delivered and not yet acked, over every persistor sharing the consumer.
    pub max_ack_pending: i64,
    /// Deliveries after which an event the store still rejects is dead-lettered.
    pub max_deliver: u32,
    /// Nak delays for a rejected event: the n-th delivery waits `backoff[n - 1]` (the last one repeats).
    pub backoff: Vec<Duration>,
    /// Longest pause between two attempts while the store is unavailable.
    pub outage_retry_max: Duration,
}

impl Default for IngestSettings {
    fn default() -> Self {
        IngestSettings {
            batch_max: 512,
            batches_in_flight: 4,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            max_deliver: 5,
            backoff: vec![Duration::from_secs(1), Duration::from_secs(5), Duration::from_secs(15)],
            outage_retry_max: Duration::from_secs(5),
        }
    }
}

/// The persistors' consumer configuration. `max_deliver` is left unbounded on the server on purpose: JetStream
/// would silently stop delivering an event after that many deliveries, whatever the reason (a crash loop, an
/// outage), so the bound is enforced here, where a rejection can be told from an outage.
pub fn consumer_config(settings: &IngestSettings) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(subjects::PERSISTOR_CONSUMER.to_owned()),
        description: Some("switchyard persistors: room events into the history store".to_owned()),
        deliver_policy: consumer::DeliverPolicy::All,
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        max_deliver: -1,
        max_ack_pending: settings.max_ack_pending,
        ..Default::default()
    }
}

/// Open the persistors' durable consumer (creating it, or updating its settings, so every persistor of a release
/// agrees), waiting for the events stream to exist; and make sure the dead-letter stream exists. Errors that pass
/// (a NATS node restarting, a stream leader being elected) are retried until `shutdown`.
pub async fn open_consumer(
    js: &jetstream::Context,
    settings: &IngestSettings,
    shutdown: &CancellationToken,
) -> Result<Option<consumer::PullConsumer>, PersistorError> {
    loop {
        match try_open_consumer(js, settings).await {
            Ok(consumer) => return Ok(Some(consumer)),
            Err(error) => tracing::info!(%error, "the persistor's consumer is not ready yet; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn try_open_consumer(
    js: &jetstream::Context,
    settings: &IngestSettings,
) -> Result<consumer::PullConsumer, PersistorError> {
    let stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .map_err(PersistorError::nats("waiting for the events stream (router shards create it)"))?;
    js.get_or_create_stream(stream::Config {
        name: subjects::DEAD_LETTER_STREAM.to_owned(),
        subjects: vec![subjects::DEAD_LETTER_SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        max_age: subjects::DEAD_LETTER_MAX_AGE,
        duplicate_window: Duration::from_secs(120),
        num_replicas: stream.cached_info().config.num_replicas,
        ..Default::default()
    })
    .await
    .map_err(PersistorError::nats("dead-letter stream"))?;
    stream.create_consumer(consumer_config(settings)).await.map_err(PersistorError::nats("persistor consumer"))
}

/// What every batch shares.
struct Ingest<'a, S> {
    js: jetstream::Context,
    store: &'a S,
    settings: &'a IngestSettings,
    shutdown: CancellationToken,
    /// When a store write last succeeded (a plain mutex, never held across an await).
    last_write_ok: std::sync::Mutex<Option<Instant>>,
}

/// Consume until `shutdown`, then finish the batches being written (acking what was written) and return. Events
/// pulled but not written are redelivered to another persistor after `ack_wait`.
pub async fn run<S: HistoryStore>(
    js: jetstream::Context,
    consumer: consumer::PullConsumer,
    store: &S,
    settings: &IngestSettings,
    shutdown: CancellationToken,
) -> Result<(), PersistorError> {
    let ingest = Ingest { js, store, settings, shutdown: shutdown.clone(), last_write_ok: std::sync::Mutex::new(None) };
    let mut in_flight = FuturesUnordered::new();
    'pull: while !shutdown.is_cancelled() {
        let messages = match consumer.messages().await {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "cannot pull from the events stream; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pull,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pull,
                }
            }
        };
        let mut batches = messages.ready_chunks(settings.batch_max.max(1));
        loop {
            if in_flight.len() >= settings.batches_in_flight.max(1) {
                // Wait for a batch to finish before pulling more; during an outage this is where pulling stops.
                in_flight.next().await;
                continue;
            }
            tokio::select! {
                _ = shutdown.cancelled() => break 'pull,
                Some(()) = in_flight.next(), if !in_flight.is_empty() => {}
                batch = batches.next() => match batch {
                    Some(batch) => in_flight.push(ingest.batch(batch)),
                    None => {
                        tracing::warn!("the events stream's pull ended; pulling again");
                        continue 'pull;
                    }
                },
            }
        }
    }
    // Graceful stop: the batches being written finish and are acked (a batch waiting out an outage gives up
    // without acking, and is redelivered).
    while in_flight.next().await.is_some() {}
    Ok(())
}

impl<S: HistoryStore> Ingest<'_, S> {
    /// Decode, write and acknowledge one pulled batch.
    async fn batch(&self, batch: Vec<Result<Message, async_nats::jetstream::consumer::pull::MessagesError>>) {
        let pulled_at = Instant::now();
        let mut events = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        let mut redelivered = 0u64;
        let mut pending = None;
        for message in batch {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "pull error");
                    continue;
                }
            };
            if let Ok(info) = message.info() {
                if info.delivered > 1 {
                    redelivered += 1;
                }
                pending = Some(info.pending);
            }
            match codec::decode::<RoomEvent>(&message.payload) {
                Ok(event) => {
                    events.push(event);
                    messages.push(message);
                }
                Err(error) => self.dead_letter(&message, &format!("undecodable event: {error}")).await,
            }
        }
        if let Some(pending) = pending {
            metrics::gauge!("switchyard_persistor_lag_events").set(pending as f64);
        }
        if redelivered > 0 {
            metrics::counter!("switchyard_persistor_redeliveries_total").increment(redelivered);
            tracing::info!(redelivered, batch = messages.len(), "batch holds redelivered events");
        }
        if events.is_empty() {
            return;
        }
        metrics::histogram!("switchyard_persistor_batch_size_events").record(events.len() as f64);
        // One span per traced event, each a child of its append, open until its batch is written and acked.
        let _traced: Vec<tracing::Span> = match switchyard_service::trace::enabled() {
            true => messages
                .iter()
                .zip(&events)
                .filter(|(message, _)| switchyard_service::trace::carried(message.headers.as_ref()).is_some())
                .map(|(message, event)| {
                    let span = tracing::info_span!(target: "switchyard::trace", "persist event", seq = event.seq, batch = events.len());
                    switchyard_service::trace::follow(span, message.headers.as_ref())
                })
                .collect(),
            false => Vec::new(),
        };

        // Parts still to write: a rejected part is split in two until the rejected event stands alone.
        let mut parts: Vec<Range<usize>> = Vec::with_capacity(8);
        parts.push(0..events.len());
        while let Some(part) = parts.pop() {
            match self.write(&events[part.clone()], &messages[part.clone()], pulled_at).await {
                Written::Yes => {
                    for message in &messages[part.clone()] {
                        if let Err(error) = message.ack().await {
                            tracing::warn!(%error, "ack failed; the event will be redelivered and rewritten");
                        }
                    }
                    metrics::counter!("switchyard_persistor_events_written_total").increment(part.len() as u64);
                }
                Written::Rejected(error) if part.len() == 1 => self.rejected(&messages[part.start], &error).await,
                Written::Rejected(_) => {
                    let mid = part.start + part.len() / 2;
                    parts.push(mid..part.end);
                    parts.push(part.start..mid);
                }
                Written::Stopped => return,
            }
        }
    }

    /// Write `events`, retrying with backoff for as long as the store is unavailable. `pulled_at` is when their batch
    /// was pulled: a lone event's rejection is its own fault only if some write succeeded after that.
    async fn write(&self, events: &[RoomEvent], messages: &[Message], pulled_at: Instant) -> Written {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u64;
        loop {
            let started = Instant::now();
            let result = self.store.apply(events).await;
            metrics::histogram!("switchyard_persistor_write_duration_seconds").record(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => {
                    if let Ok(mut last) = self.last_write_ok.lock() {
                        *last = Some(Instant::now());
                    }
                    if failures > 0 {
                        tracing::info!(failures, events = events.len(), "store write succeeded again");
                    }
                    return Written::Yes;
                }
                Err(error @ (StoreError::Rejected(_) | StoreError::InvalidQuery(_)))
                    if events.len() > 1 || self.store_accepted_a_write_since(pulled_at) =>
                {
                    metrics::counter!("switchyard_persistor_store_errors_total").increment(1);
                    return Written::Rejected(error);
                }
                // A lone event rejected while no write has succeeded lately: the store may be refusing everything
                // (a dropped table, a broken schema). Hold it like an outage rather than dead-letter healthy events;
                // once other writes succeed again, its next rejection counts as its own fault.
                Err(error) => error,
            };
            metrics::counter!("switchyard_persistor_store_errors_total").increment(1);
            failures += 1;
            // One line for the first failure, then one every ten, so an outage does not flood the log.
            if failures == 1 || failures.is_multiple_of(10) {
                tracing::warn!(%error, failures, events = events.len(), retry_in = ?backoff, "store write failed; holding the batch and retrying");
            }
            // Keep JetStream from redelivering events this persistor is still trying to write.
            for message in messages {
                let _ = message.ack_with(AckKind::Progress).await;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Written::Stopped,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.settings.outage_retry_max);
        }
    }

    /// Whether a store write succeeded at or after `since`: the store is taking writes, so a rejection is the event's
    /// fault. A success from before the batch was pulled proves nothing: the table may have been dropped since.
    fn store_accepted_a_write_since(&self, since: Instant) -> bool {
        let last = self.last_write_ok.lock().ok().and_then(|last| *last);
        last.is_some_and(|at| at >= since)
    }

    /// The store rejected this event alone: nak it for a later attempt, or dead-letter it after `max_deliver`.
    async fn rejected(&self, message: &Message, error: &StoreError) {
        let delivered = message.info().map(|i| i.delivered.max(1) as u64).unwrap_or(1);
        if delivered >= u64::from(self.settings.max_deliver) {
            self.dead_letter(message, &format!("rejected by the store on {delivered} deliveries: {error}")).await;
            return;
        }
        let delay = self
            .settings
            .backoff
            .get(delivered as usize - 1)
            .or(self.settings.backoff.last())
            .copied()
            .unwrap_or(Duration::from_secs(1));
        tracing::warn!(
            subject = %message.subject,
            delivered,
            max_deliver = self.settings.max_deliver,
            retry_in = ?delay,
            %error,
            "the store rejected an event; it will be retried"
        );
        if let Err(error) = message.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(%error, "nak failed; the event will be redelivered after the ack wait");
        }
    }

    /// Store the event in the dead-letter stream, then terminate it in the events stream. When the dead-letter
    /// stream cannot take it, the event stays unacknowledged (and is redelivered) rather than being lost.
    async fn dead_letter(&self, message: &Message, reason: &str) {
        let info = message.info().ok();
        let stream_seq = info.as_ref().map_or(0, |i| i.stream_sequence);
        let delivered = info.as_ref().map_or(0, |i| i.delivered);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(dead_letter_headers::REASON, header_value(reason));
        headers.insert(dead_letter_headers::SUBJECT, header_value(message.subject.as_str()));
        headers.insert(dead_letter_headers::STREAM_SEQ, header_value(&stream_seq.to_string()));
        headers.insert(dead_letter_headers::DELIVERIES, header_value(&delivered.to_string()));
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            header_value(&format!("{}-{stream_seq}", subjects::EVENTS_STREAM)),
        );
        let publish = PublishMessage::build().payload(message.payload.clone()).headers(headers);
        let stored = match self.js.send_publish(subjects::DEAD_LETTER_SUBJECT, publish).await {
            Ok(ack) => ack.await.map(drop),
            Err(error) => Err(error),
        };
        if let Err(error) = stored {
            tracing::error!(%error, stream_seq, "cannot store a dead letter; the event stays for redelivery");
            let _ = message.ack_with(AckKind::Nak(Some(Duration::from_secs(5)))).await;
            return;
        }
        metrics::counter!("switchyard_persistor_dead_letters_total").increment(1);
        tracing::error!(
            subject = %message.subject,
            stream_seq,
            delivered,
            reason,
            dead_letter_subject = subjects::DEAD_LETTER_SUBJECT,
            "event dead-lettered"
        );
        if let Err(error) = message.ack_with(AckKind::Term).await {
            tracing::warn!(%error, stream_seq, "cannot terminate a dead-lettered event; it may be dead-lettered again");
        }
    }
}

/// What became of one write.
enum Written {
    Yes,
    /// The store refused it (the event's fault); the error says why.
    Rejected(StoreError),
    /// The persistor is stopping while the store was unavailable: nothing acked.
    Stopped,
}

/// A header value: one line, bounded.
/// `text` as a header value, through the fallible constructor: control characters become spaces first, so it
/// always succeeds, and an empty value stands in if it ever did not.
fn header_value(text: &str) -> async_nats::HeaderValue {
    std::str::FromStr::from_str(&one_line(text)).unwrap_or_default()
}

fn one_line(text: &str) -> String {
    text.chars().map(|c| if c.is_control() { ' ' } else { c }).take(512).collect()
}
