//! The latency bench's floor: a bare relay that does what an encoder does
//! on the wire and nothing else. It consumes each frame from WM_FRAMES
//! through its own ephemeral consumer in micro-batches (the encoder's pull
//! size and wait), publishes [`RELAY_BYTES`] bytes per frame to a second
//! stream with `Nats-Msg-Id`, waits for JetStream's acks, then acks the
//! frames: no decoding, no model. For `wmvae bench latency` only.

use super::feed::FrameFeed;
use super::headers;
use super::migrate::{FrameConsumer, FRAMES_STREAM};
use super::publish::AckWindow;
use super::Bus;
use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use futures::StreamExt;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The stream the relay publishes to.
const RELAY_STREAM: &str = "WM_BENCH_RELAY";
/// Bytes relayed per frame: about a latent message's size.
pub const RELAY_BYTES: usize = 300;
/// How long the relay waits for a frame before it looks at its shutdown again.
const RELAY_IDLE: Duration = Duration::from_secs(1);
/// Header naming the relayed frame's WM_FRAMES sequence.
const SEQUENCE_HEADER: &str = "Wmvae-Frame-Sequence";

impl Bus {
    /// Relays frames until `shutdown`, micro-batches of at most `max_batch`
    /// gathered for at most `max_wait`, as an encoder's.
    pub async fn relay(&self, max_batch: usize, max_wait: Duration, shutdown: CancellationToken) -> Result<()> {
        let subject = self.subject("bench.relay");
        let config = stream::Config {
            name: RELAY_STREAM.into(),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| anyhow!("stream {RELAY_STREAM}: {e}"))?;
        let frames = self
            .js
            .get_stream(FRAMES_STREAM)
            .await
            .with_context(|| format!("stream {FRAMES_STREAM}"))?;
        let consumer_config = pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: self.limits.max_ack_pending,
            ..Default::default()
        };
        let consumer = frames
            .create_consumer(consumer_config)
            .await
            .context("creating the relay's consumer")?;
        let mut feed = FrameFeed::over(consumer, self.subject("frames."), FrameConsumer::Encode.pull_batch());
        let mut window = AckWindow::default();
        loop {
            let batch = feed.next_batch(max_batch, max_wait, RELAY_IDLE, &shutdown).await?;
            if shutdown.is_cancelled() && batch.is_empty() {
                return Ok(());
            }
            for delivery in &batch {
                let id = delivery.stream_sequence.to_string();
                window
                    .send(
                        &self.js,
                        subject.clone(),
                        headers::with_id(&id, &[(SEQUENCE_HEADER, &id)]),
                        vec![0; RELAY_BYTES],
                        RELAY_STREAM,
                    )
                    .await?;
            }
            window.settle(&self.js, RELAY_STREAM).await?;
            for delivery in &batch {
                delivery.ack().await?;
            }
        }
    }

    /// The WM_FRAMES sequence of each relayed frame, as it is relayed (core NATS, live only).
    pub async fn subscribe_relayed(&self) -> Result<impl futures::Stream<Item = u64> + Unpin> {
        let subscriber = self
            .client
            .subscribe(self.subject("bench.relay"))
            .await
            .context("subscribing to the relay")?;
        Ok(subscriber.filter_map(|m| {
            std::future::ready(
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(SEQUENCE_HEADER))
                    .and_then(|v| v.as_str().parse().ok()),
            )
        }))
    }
}
