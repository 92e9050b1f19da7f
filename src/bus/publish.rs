//! Publishing: frames by the wire contract (with `Nats-Msg-Id` and a bounded
//! window of acks), latents, and checkpoint announcements, plus a live
//! latent subscription for the benches. Encoding is the messages' own.

use super::messages::{Announcement, LatentMessage};
use super::Bus;
use crate::frames::wire::FrameMessage;
use anyhow::{Context, Result};
use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::StreamExt;
use std::collections::VecDeque;

/// JetStream publish acks awaited at most this far behind the newest
/// publish: pipelining without unbounded memory.
const PUBLISH_WINDOW: usize = 256;
impl Bus {
    /// Publishes a latent on `<prefix>.latents.<source>` (core NATS; the
    /// WM_LATENTS stream captures it). Buffered: call `flush` to push.
    pub async fn publish_latent(&self, source: &str, latent: &LatentMessage) -> Result<()> {
        self.client
            .publish(self.subject(&format!("latents.{source}")), latent.to_msgpack().into())
            .await
            .context("publishing a latent")
    }

    /// Announces a checkpoint event on `<prefix>.checkpoints` and waits
    /// until WM_CHECKPOINTS has stored it.
    pub async fn announce(&self, announcement: &Announcement) -> Result<()> {
        self.js
            .publish(self.subject("checkpoints"), announcement.to_msgpack().into())
            .await
            .context("announcing a checkpoint")?
            .await
            .context("storing a checkpoint announcement")?;
        Ok(())
    }

    /// Publishes one frame message on `<prefix>.frames.<source>` with core
    /// NATS (no stored-ack wait; the stream captures it).
    pub async fn publish_frame_core(&self, source: &str, frame: &FrameMessage<'_>) -> Result<()> {
        self.client.publish(self.subject(&format!("frames.{source}")), frame.to_msgpack().into()).await.context("publishing a frame")
    }

    /// Subscribes to the latents of `source` (core NATS, live only).
    pub async fn subscribe_latents(&self, source: &str) -> Result<impl futures::Stream<Item = LatentMessage> + Unpin> {
        let subscriber = self.client.subscribe(self.subject(&format!("latents.{source}"))).await.context("subscribing to latents")?;
        Ok(subscriber.filter_map(|m| std::future::ready(rmp_serde::from_slice(&m.payload).ok())))
    }

    /// A publisher of frames from `source` on `<prefix>.frames.<source>`.
    pub fn frame_publisher(&self, source: &str) -> FramePublisher {
        FramePublisher { js: self.js.clone(), subject: self.subject(&format!("frames.{source}")), source: source.to_string(), in_flight: VecDeque::new() }
    }
}

/// Publishes frames by the wire contract to JetStream, with a bounded
/// window of outstanding acks.
pub struct FramePublisher {
    js: jetstream::Context,
    subject: String,
    source: String,
    in_flight: VecDeque<jetstream::context::PublishAckFuture>,
}

impl FramePublisher {
    /// Publishes one frame with `Nats-Msg-Id` = `source:episode:step`, so the
    /// server drops a re-publish within its duplicate window.
    pub async fn send(&mut self, frame: &FrameMessage<'_>) -> Result<()> {
        if self.in_flight.len() >= PUBLISH_WINDOW {
            self.settle_one().await?;
        }
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{}:{}:{}", self.source, frame.episode, frame.step).as_str());
        let ack = self
            .js
            .publish_with_headers(self.subject.clone(), headers, frame.to_msgpack().into())
            .await
            .context("publishing a frame")?;
        self.in_flight.push_back(ack);
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<()> {
        if let Some(ack) = self.in_flight.pop_front() {
            ack.await.context("frame not stored by JetStream (is stream WM_FRAMES there? run wmvae migrate)")?;
        }
        Ok(())
    }

    /// Waits until every frame sent is stored by the server.
    pub async fn finish(mut self) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }
}

