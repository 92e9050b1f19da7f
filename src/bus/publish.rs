//! Publishing: frames and latents to JetStream (with `Nats-Msg-Id` and a
//! bounded window of acks), checkpoint announcements, plus a live latent
//! subscription for the benches. Encoding is the messages' own.

use super::headers;
use super::messages::{Announcement, Fence, LatentMessage};
use super::objects::CHECKPOINTS_STREAM;
use super::Bus;
use crate::frames::wire::FrameMessage;
use anyhow::{anyhow, Context, Result};
use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::HeaderMap;
use futures::StreamExt;
use std::collections::VecDeque;
use std::time::Duration;

/// The leaders' fences, under `<prefix>.` in WM_CHECKPOINTS.
const FENCE_SUBJECT: &str = "checkpoints.fence";
/// What a refused fence or announcement names in its [`super::Error::Conflict`].
const FENCE_WHAT: &str = "the announcements' fence";
/// The subject a `Nats-Expected-Last-Subject-Sequence` applies to, when not
/// the message's own (nats-server 2.11 and later).
const EXPECTED_LAST_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

/// A conditioned publish's ack: a wrong last sequence is a [`super::Error::Conflict`].
fn conditioned(
    ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> Result<jetstream::publish::PublishAck, super::Error> {
    ack.map_err(|e| match e.kind() {
        jetstream::context::PublishErrorKind::WrongLastSequence => super::Error::Conflict(FENCE_WHAT),
        _ => anyhow::Error::from(e)
            .context("storing a checkpoint announcement")
            .into(),
    })
}

/// JetStream publish acks awaited at most this far behind the newest
/// publish: pipelining without unbounded memory.
const PUBLISH_WINDOW: usize = 256;
impl Bus {
    /// A publisher of latents to WM_LATENTS.
    pub fn latent_publisher(&self) -> LatentPublisher {
        LatentPublisher {
            js: self.js.clone(),
            prefix: self.prefix.clone(),
            window: AckWindow::default(),
        }
    }

    /// Fences the announcements for a leader of `epoch`: writes `epoch` on
    /// `<prefix>.checkpoints.fence`, conditioned by the server on the last
    /// fence there being the one read (another leader fencing meanwhile
    /// refuses it), and refused here when that fence's epoch is newer. The
    /// new fence's sequence, for [`Bus::announce`]; [`super::Error::Conflict`]
    /// when refused.
    pub async fn fence_announcements(&self, epoch: u64) -> Result<u64, super::Error> {
        let subject = self.subject(FENCE_SUBJECT);
        let stream = self
            .js
            .get_stream(CHECKPOINTS_STREAM)
            .await
            .with_context(|| format!("stream {CHECKPOINTS_STREAM}"))?;
        let (last, last_epoch) = match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(fence) => (
                fence.sequence,
                rmp_serde::from_slice::<Fence>(&fence.payload).ok().map(|f| f.epoch),
            ),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => (0, None),
            Err(e) => return Err(anyhow!("reading the last fence on {subject}: {e}").into()),
        };
        if last_epoch.is_some_and(|last| last > epoch) {
            return Err(super::Error::Conflict(FENCE_WHAT));
        }
        let mut headers = HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, headers::value(&last.to_string()));
        let ack = self
            .js
            .publish_with_headers(subject, headers, Fence { epoch }.to_msgpack().into())
            .await
            .context("fencing the announcements")?
            .await;
        Ok(conditioned(ack)?.sequence)
    }

    /// Announces a checkpoint event on `<prefix>.checkpoints` under `fence`
    /// (a sequence [`Bus::fence_announcements`] returned) and waits until
    /// WM_CHECKPOINTS has stored it: the server refuses it
    /// ([`super::Error::Conflict`]) once another fence followed that one.
    pub async fn announce(&self, announcement: &Announcement, fence: u64) -> Result<(), super::Error> {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, headers::value(&fence.to_string()));
        headers.insert(EXPECTED_LAST_SUBJECT, headers::value(&self.subject(FENCE_SUBJECT)));
        let ack = self
            .js
            .publish_with_headers(self.subject("checkpoints"), headers, announcement.to_msgpack().into())
            .await
            .context("announcing a checkpoint")?
            .await;
        conditioned(ack)?;
        Ok(())
    }

    /// Publishes any bytes as a frame message on `<prefix>.frames.<source>`
    /// with `Nats-Msg-Id` `id`, waiting until JetStream stored them: for
    /// the chaos bench's malformed frames.
    pub async fn publish_frame_bytes(&self, source: &str, id: &str, payload: Vec<u8>) -> Result<()> {
        self.js
            .publish_with_headers(
                self.subject(&format!("frames.{source}")),
                headers::with_id(id, &[]),
                payload.into(),
            )
            .await
            .context("publishing a frame")?
            .await
            .context("storing a frame")?;
        Ok(())
    }

    /// Publishes one frame message on `<prefix>.frames.<source>` with core
    /// NATS (no stored-ack wait; the stream captures it).
    pub async fn publish_frame_core(&self, source: &str, frame: &FrameMessage<'_>) -> Result<()> {
        self.client
            .publish(self.subject(&format!("frames.{source}")), frame.to_msgpack().into())
            .await
            .context("publishing a frame")
    }

    /// Subscribes to the latents of `source` (core NATS, live only).
    pub async fn subscribe_latents(&self, source: &str) -> Result<impl futures::Stream<Item = LatentMessage> + Unpin> {
        let subscriber = self
            .client
            .subscribe(self.subject(&format!("latents.{source}")))
            .await
            .context("subscribing to latents")?;
        Ok(subscriber.filter_map(|m| std::future::ready(rmp_serde::from_slice(&m.payload).ok())))
    }

    /// A publisher of frames from `source` on `<prefix>.frames.<source>`.
    pub fn frame_publisher(&self, source: &str) -> FramePublisher {
        FramePublisher {
            js: self.js.clone(),
            subject: self.subject(&format!("frames.{source}")),
            source: source.to_string(),
            window: AckWindow::default(),
        }
    }
}

/// Waits before sending a publish again whose ack did not come (a
/// cluster electing a stream leader, a server restarting): ~16 s in all,
/// past the 4-9 s of an election after a crash.
const RETRY_PAUSES: [Duration; 6] = [
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
];

/// A publish whose ack is awaited, with what is needed to send it again.
struct InFlight {
    ack: jetstream::context::PublishAckFuture,
    subject: String,
    headers: HeaderMap,
    payload: bytes::Bytes,
}

/// JetStream publishes whose acks are awaited at most [`PUBLISH_WINDOW`]
/// behind the newest: pipelining without unbounded memory. A publish whose
/// ack fails is sent again with the same `Nats-Msg-Id` (so JetStream stores
/// it once) after each of [`RETRY_PAUSES`].
#[derive(Default)]
pub(super) struct AckWindow {
    in_flight: VecDeque<InFlight>,
}

impl AckWindow {
    /// Publishes `payload` on `subject` with `headers` (which carry a
    /// `Nats-Msg-Id`, so the server drops a re-publish within its
    /// duplicate window).
    pub(super) async fn send(
        &mut self,
        js: &jetstream::Context,
        subject: String,
        headers: HeaderMap,
        payload: Vec<u8>,
        stream: &str,
    ) -> Result<()> {
        if self.in_flight.len() >= PUBLISH_WINDOW {
            self.settle_one(js, stream).await?;
        }
        let payload = bytes::Bytes::from(payload);
        let ack = js
            .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
            .await
            .with_context(|| format!("publishing to {stream}"))?;
        self.in_flight.push_back(InFlight {
            ack,
            subject,
            headers,
            payload,
        });
        Ok(())
    }

    async fn settle_one(&mut self, js: &jetstream::Context, stream: &str) -> Result<()> {
        let Some(InFlight {
            ack,
            subject,
            headers,
            payload,
        }) = self.in_flight.pop_front()
        else {
            return Ok(());
        };
        let mut result = ack.await.map(drop);
        for pause in RETRY_PAUSES {
            let Err(e) = &result else { return Ok(()) };
            tracing::warn!("a publish to {stream} was not acked ({e}); sending it again in {pause:?}");
            tokio::time::sleep(pause).await;
            result = match js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await
            {
                Ok(ack) => ack.await.map(drop),
                Err(e) => Err(e),
            };
        }
        result.with_context(|| format!("not stored by JetStream (is stream {stream} there? run wmvae migrate)"))
    }

    /// Waits until every message sent is stored.
    pub(super) async fn settle(&mut self, js: &jetstream::Context, stream: &str) -> Result<()> {
        while !self.in_flight.is_empty() {
            self.settle_one(js, stream).await?;
        }
        Ok(())
    }
}

/// Publishes frames by the wire contract to JetStream, with a bounded
/// window of outstanding acks.
pub struct FramePublisher {
    js: jetstream::Context,
    subject: String,
    source: String,
    window: AckWindow,
}

impl FramePublisher {
    /// Publishes one frame with the `Nats-Msg-Id` of its identity
    /// (`identity::message_id`).
    pub async fn send(&mut self, frame: &FrameMessage<'_>) -> Result<()> {
        let headers = headers::frame_id(&self.source, &frame.episode, frame.step);
        self.window
            .send(&self.js, self.subject.clone(), headers, frame.to_msgpack(), "WM_FRAMES")
            .await
    }

    /// Publishes one frame and waits until it and every frame before it
    /// are stored: for a publisher that times each ack.
    pub async fn send_stored(&mut self, frame: &FrameMessage<'_>) -> Result<()> {
        self.send(frame).await?;
        self.window.settle(&self.js, "WM_FRAMES").await
    }

    /// Waits until every frame sent is stored by the server.
    pub async fn finish(mut self) -> Result<()> {
        self.window.settle(&self.js, "WM_FRAMES").await
    }
}

/// Publishes latents on `<prefix>.latents.<source>` to WM_LATENTS, each
/// with the `Nats-Msg-Id` of its frame's identity (`identity::message_id`),
/// so a frame delivered twice within the stream's duplicate window still
/// has one latent.
pub struct LatentPublisher {
    js: jetstream::Context,
    prefix: String,
    window: AckWindow,
}

impl LatentPublisher {
    pub async fn send(&mut self, source: &str, latent: &LatentMessage) -> Result<()> {
        let headers = headers::frame_id(source, &latent.episode, latent.step);
        self.window
            .send(
                &self.js,
                format!("{}.latents.{source}", self.prefix),
                headers,
                latent.to_msgpack(),
                "WM_LATENTS",
            )
            .await
    }

    /// Waits until JetStream has stored every latent sent.
    pub async fn settle(&mut self) -> Result<()> {
        self.window.settle(&self.js, "WM_LATENTS").await
    }
}
