//! The frame feed: a durable pull consumer of WM_FRAMES as batches of
//! [`Delivery`]s to ack or terminate, dead letters with their reason, and
//! the bench's bare consume+ack baseline. Bytes only: decoding is `frames`'.

use super::headers;
use super::migrate::{FrameConsumer, FRAMES_STREAM};
use super::Bus;
use crate::backoff::Backoff;
use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::{
    self,
    consumer::{pull, StreamError},
};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one pull request waits at the server. A pull request lost on
/// its way (sent through a server cut from the consumer's leader) is sent
/// again only when async-nats's own timer for it runs out, this plus 5 s:
/// at its default of 30 s, encoders stood idle for up to 35 s after a
/// partition healed while frames piled up (`bench nemesis`, partition).
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// The server's idle heartbeat on a waiting pull: two missed and the pull
/// stream is opened again at once, with a fresh request (async-nats asks
/// for none unless told).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);

/// One frame message as delivered, with what is needed to ack it.
pub struct Delivery {
    /// The subject's last part: `wm.frames.<source>`.
    pub source: String,
    pub subject: String,
    pub payload: Bytes,
    /// Stream sequence: a stable id for dead-letter dedup.
    pub stream_sequence: u64,
    /// When this process received it.
    pub received_at: std::time::Instant,
    acker: jetstream::message::Acker,
}

impl Delivery {
    /// The frame is durable: the server may forget it.
    pub async fn ack(&self) -> Result<()> {
        self.acker.ack().await.map_err(|e| anyhow!("ack: {e}"))
    }

    /// The frame could not be made durable now: redeliver it after `delay`.
    pub async fn nak(&self, delay: Duration) -> Result<()> {
        self.acker
            .ack_with(jetstream::AckKind::Nak(Some(delay)))
            .await
            .map_err(|e| anyhow!("nak: {e}"))
    }

    /// The frame is still being worked on (a commit retried while the disk
    /// is full): the server waits another `ack_wait` before redelivering.
    pub async fn in_progress(&self) -> Result<()> {
        self.acker
            .ack_with(jetstream::AckKind::Progress)
            .await
            .map_err(|e| anyhow!("in progress: {e}"))
    }

    /// The frame was dead-lettered: never redeliver it.
    pub async fn terminate(&self) -> Result<()> {
        self.acker
            .ack_with(jetstream::AckKind::Term)
            .await
            .map_err(|e| anyhow!("term: {e}"))
    }
}

/// A durable pull consumer of WM_FRAMES, as batches of deliveries.
pub struct FrameFeed {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    messages: Option<pull::Stream>,
    subject_prefix: String,
    /// Messages asked of the server per pull request.
    pull_batch: usize,
    /// How to make the durable consumer again when the server lost it
    /// (None for the bench's ephemeral one).
    remake: Option<(Bus, FrameConsumer)>,
    /// The pause before the next try after an error.
    pause: Backoff,
}

impl Bus {
    /// A durable frame consumer (after `migrate`).
    pub async fn frame_feed(&self, which: FrameConsumer) -> Result<FrameFeed> {
        self.ensure_consumer(&which).await?;
        let stream = self
            .js
            .get_stream(FRAMES_STREAM)
            .await
            .with_context(|| format!("stream {FRAMES_STREAM} (run wmvae migrate)"))?;
        let consumer = stream
            .get_consumer(&which.durable_name())
            .await
            .map_err(|e| anyhow!("consumer {}: {e}", which.durable_name()))?;
        let mut feed = FrameFeed::over(consumer, self.subject("frames."), which.pull_batch());
        feed.remake = Some((self.clone(), which));
        Ok(feed)
    }

    /// The bench's baseline: a bare ephemeral pull consumer over WM_FRAMES
    /// that reads `n` messages and only acks them. Returns the time taken.
    pub async fn consume_and_ack_only(&self, n: u64) -> Result<Duration> {
        let stream = self
            .js
            .get_stream(FRAMES_STREAM)
            .await
            .with_context(|| format!("stream {FRAMES_STREAM}"))?;
        let config = pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: self.limits.max_ack_pending,
            ..Default::default()
        };
        let consumer = stream
            .create_consumer(config)
            .await
            .context("creating the baseline consumer")?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(FrameConsumer::Ingest.pull_batch())
            .messages()
            .await?;
        let start = Instant::now();
        for _ in 0..n {
            let message = messages
                .next()
                .await
                .context("baseline consumer ended")?
                .map_err(|e| anyhow!("baseline consumer: {e}"))?;
            message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        }
        Ok(start.elapsed())
    }

    /// Copies a rejected frame to `<prefix>.dlq.frames` with its reason, and
    /// waits for JetStream to store it. Deduplicated by the original's stream
    /// sequence, so a redelivered bad frame is dead-lettered once.
    pub async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let headers = headers::dead_letter(&delivery.subject, delivery.stream_sequence, reason);
        self.js
            .publish_with_headers(self.subject("dlq.frames"), headers, delivery.payload.clone())
            .await
            .context("publishing a dead letter")?
            .await
            .context("storing a dead letter")?;
        Ok(())
    }
}

/// A frame a durable consumer gave up on: delivered `max_deliver` times
/// without an ack, as the server's advisory says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Undeliverable {
    /// Its sequence in WM_FRAMES.
    #[serde(rename = "stream_seq")]
    pub stream_sequence: u64,
    pub deliveries: u64,
}

/// Queue group of a consumer's advisory subscribers: one node handles each
/// advisory (encoders share `wmvae-encode`).
const ADVISORY_GROUP_PREFIX: &str = "wmvae-undeliverable-";

impl Bus {
    /// The frames `which` gives up on from now on, from the server's
    /// `MAX_DELIVERIES` advisories (in a queue group, so one of the nodes
    /// sharing the consumer gets each). Advisories that don't decode are
    /// skipped. The subscription survives reconnects.
    pub async fn undeliverable(
        &self,
        which: &FrameConsumer,
    ) -> Result<impl futures::Stream<Item = Undeliverable> + Unpin> {
        let durable = which.durable_name();
        let subject = format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{FRAMES_STREAM}.{durable}");
        let subscriber = self
            .client
            .queue_subscribe(subject, format!("{ADVISORY_GROUP_PREFIX}{durable}"))
            .await
            .context("subscribing to max-deliveries advisories")?;
        Ok(subscriber.filter_map(|m| std::future::ready(serde_json::from_slice(&m.payload).ok())))
    }

    /// Copies frame `stream_sequence` of WM_FRAMES, as stored, to the
    /// dead-letter stream with `reason`. False when the stream no longer
    /// holds it (aged out).
    pub async fn dead_letter_sequence(&self, stream_sequence: u64, reason: &str) -> Result<bool> {
        let stream = self
            .js
            .get_stream(FRAMES_STREAM)
            .await
            .with_context(|| format!("stream {FRAMES_STREAM}"))?;
        let message = match stream.get_raw_message(stream_sequence).await {
            Ok(message) => message,
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => return Ok(false),
            Err(e) => return Err(anyhow!("reading frame {stream_sequence} of {FRAMES_STREAM}: {e}")),
        };
        let headers = headers::dead_letter(message.subject.as_str(), stream_sequence, reason);
        self.js
            .publish_with_headers(self.subject("dlq.frames"), headers, message.payload)
            .await
            .context("publishing a dead letter")?
            .await
            .context("storing a dead letter")?;
        Ok(true)
    }
}

impl FrameFeed {
    /// A feed over `consumer`, whose subjects start with `subject_prefix`
    /// (`<prefix>.frames.`), pulling `pull_batch` messages at a time.
    pub(super) fn over(
        consumer: jetstream::consumer::Consumer<pull::Config>,
        subject_prefix: String,
        pull_batch: usize,
    ) -> FrameFeed {
        FrameFeed {
            consumer,
            messages: None,
            subject_prefix,
            pull_batch,
            remake: None,
            pause: Backoff::default(),
        }
    }

    /// The pull stream could not be opened: the server may have lost the
    /// consumer (restarted without its JetStream state; the daemon applies
    /// the migrations again on the reconnect). Makes the consumer again.
    async fn remake_consumer(&mut self) -> Result<()> {
        let Some((bus, which)) = &self.remake else {
            return Ok(());
        };
        let stream = bus
            .js
            .get_stream(FRAMES_STREAM)
            .await
            .with_context(|| format!("stream {FRAMES_STREAM}"))?;
        bus.ensure_consumer(which).await?;
        self.consumer = stream
            .get_consumer(&which.durable_name())
            .await
            .map_err(|e| anyhow!("consumer {}: {e}", which.durable_name()))?;
        Ok(())
    }

    /// Waits for a first frame (at most `idle`: then it returns none, so
    /// the caller's loop goes round), then gathers more until `max` or
    /// `max_wait` after the first. Consumer errors are logged and retried,
    /// backing off; the stream is re-opened if it ends, and the consumer
    /// made again if it can't be (a server without its JetStream state).
    /// On `shutdown` it stops waiting and returns what it has (maybe nothing).
    pub async fn next_batch(
        &mut self,
        max: usize,
        max_wait: Duration,
        idle: Duration,
        shutdown: &CancellationToken,
    ) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        let mut deadline: Option<Instant> = None;
        let idle_until = Instant::now() + idle;
        while batch.len() < max {
            let messages = match &mut self.messages {
                Some(messages) => messages,
                None => match self.open_messages().await {
                    Ok(stream) => self.messages.insert(stream),
                    Err(e) => {
                        if !self.remake_after(e, shutdown).await {
                            break;
                        }
                        continue;
                    }
                },
            };
            // Before the first frame: until `idle` is over; after it: until the deadline.
            let until = deadline.unwrap_or(idle_until);
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = tokio::time::timeout_at(until, messages.next()) => match next {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            match next {
                Some(Ok(message)) => {
                    batch.push(self.delivery(message));
                    deadline.get_or_insert_with(|| Instant::now() + max_wait);
                    self.pause.reset();
                }
                Some(Err(e)) => {
                    if !self.retry_after(e, shutdown).await {
                        break;
                    }
                }
                None => {
                    self.messages = None;
                    if !batch.is_empty() {
                        break;
                    }
                }
            }
        }
        Ok(batch)
    }

    /// Opens the consumer's pull stream, `pull_batch` messages per request.
    async fn open_messages(&self) -> Result<pull::Stream, StreamError> {
        self.consumer
            .stream()
            .max_messages_per_batch(self.pull_batch)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
    }

    /// The pull stream could not be opened: after the pause, makes the consumer again; false on `shutdown`.
    async fn remake_after(&mut self, e: StreamError, shutdown: &CancellationToken) -> bool {
        tracing::warn!(
            "opening the frame consumer: {e}; making it again in {:?}",
            self.pause.next
        );
        if !self.pause.wait(shutdown).await {
            return false;
        }
        if let Err(e) = self.remake_consumer().await {
            tracing::warn!("making the frame consumer again: {e:#}");
        }
        true
    }

    /// The consumer failed: waits the pause (re-opening the stream once
    /// failing for long, or at once when its pull went missing); false on
    /// `shutdown`.
    async fn retry_after(&mut self, e: pull::MessagesError, shutdown: &CancellationToken) -> bool {
        tracing::warn!("frame consumer: {e}; retrying in {:?}", self.pause.next);
        if self.pause.at_longest() || e.kind() == pull::MessagesErrorKind::MissingHeartbeat {
            self.messages = None; // open it again, with a fresh pull request
        }
        self.pause.wait(shutdown).await
    }

    /// A received message as a delivery, its source read from its subject.
    fn delivery(&self, message: jetstream::Message) -> Delivery {
        let stream_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let (message, acker) = message.split();
        let subject = message.subject.to_string();
        let source = subject.strip_prefix(&self.subject_prefix).unwrap_or("").to_string();
        Delivery {
            source,
            subject,
            payload: message.payload,
            stream_sequence,
            received_at: std::time::Instant::now(),
            acker,
        }
    }
}
