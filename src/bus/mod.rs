//! Everything NATS: the connection, the migrations of streams and consumers,
//! the frame feed (a JetStream pull consumer), and the dead-letter stream.
//! The only module that touches async-nats.
//!
//! It moves bytes and acks; it does not decode frames (`wire`) or store
//! them (`store`).

mod connection;

use crate::config::NatsConfig;
use crate::wire::{Announcement, FrameMessage, LatentMessage};
use std::collections::VecDeque;
use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Migration files, in order. Adding one means adding it here.
const MIGRATIONS: &[(&str, &str)] = &[
    ("0001_frames.toml", include_str!("../../migrations/0001_frames.toml")),
    ("0002_training.toml", include_str!("../../migrations/0002_training.toml")),
    ("0003_checkpoint_chunks.toml", include_str!("../../migrations/0003_checkpoint_chunks.toml")),
    ("0004_frame_chunks.toml", include_str!("../../migrations/0004_frame_chunks.toml")),
];
/// The checkpoint weights bucket (migration 0002).
pub const CHECKPOINT_BUCKET: &str = "wm-checkpoints";
/// The micro service's name, as `$SRV.PING` discovery shows it.
pub const SERVICE_NAME: &str = "wmvae";
/// Stream metadata key recording the migration that shaped a stream.
const MIGRATION_METADATA_KEY: &str = "wmvae_migration";
/// Header carrying the reason of a dead-lettered frame.
pub const REASON_HEADER: &str = "Wmvae-Reason";
/// Header carrying the original subject of a dead-lettered frame.
pub const SUBJECT_HEADER: &str = "Wmvae-Subject";
/// JetStream publish acks awaited at most this far behind the newest
/// publish: pipelining without unbounded memory.
const PUBLISH_WINDOW: usize = 256;
/// Longest wait for buffered publishes to reach the server.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages the server pushes per pull request: enough to keep a group
/// commit full, small enough that a slow store holds few of them.
const PULL_BATCH: usize = 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Migration {
    version: u64,
    store_schema: u64,
    #[serde(default)]
    stream: Vec<StreamDef>,
    #[serde(default)]
    consumer: Vec<ConsumerDef>,
    #[serde(default)]
    object_store: Vec<ObjectStoreDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectStoreDef {
    bucket: String,
    description: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamDef {
    name: String,
    subjects: Vec<String>,
    description: String,
    max_age_secs: u64,
    max_bytes: i64,
    duplicate_window_secs: u64,
    /// Take max age and bytes from the config's `[latents]` instead.
    #[serde(default)]
    limits_from_config: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerDef {
    stream: String,
    durable: String,
}

fn migrations() -> Result<Vec<Migration>> {
    MIGRATIONS
        .iter()
        .map(|(name, text)| toml::from_str(text).with_context(|| format!("migrations/{name}")))
        .collect()
}

/// The newest store schema the migrations declare (the store checks it).
pub fn latest_store_schema() -> Result<u64> {
    Ok(migrations()?.iter().map(|m| m.store_schema).max().unwrap_or(0))
}

/// What `migrate` did, for logs and `wmvae migrate`.
#[derive(Debug, Default)]
pub struct MigrationReport {
    pub version: u64,
    pub streams: Vec<String>,
    pub consumers: Vec<String>,
}

/// Limits the config sets on what `migrate` creates.
#[derive(Debug, Clone, Copy)]
pub struct BusLimits {
    /// Unacked frames are redelivered after this long (`[ingest]`).
    pub ack_wait_secs: u64,
    /// Frames handed out but not yet acked, at most (`[ingest]`).
    pub max_ack_pending: i64,
    /// WM_LATENTS keeps latents this long (`[latents]`).
    pub latents_max_age_secs: u64,
    /// ... and at most this many bytes.
    pub latents_max_bytes: i64,
}

/// A connected client with its JetStream context.
#[derive(Clone)]
pub struct Bus {
    limits: BusLimits,
    /// Disconnections seen since connecting (each is followed by a reconnect attempt).
    disconnects: Arc<AtomicU64>,
    client: async_nats::Client,
    js: jetstream::Context,
    prefix: String,
}

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

    /// The frame was dead-lettered: never redeliver it.
    pub async fn terminate(&self) -> Result<()> {
        self.acker.ack_with(jetstream::AckKind::Term).await.map_err(|e| anyhow!("term: {e}"))
    }
}

/// The pull consumer `wmvae-ingest`, as batches of deliveries.
pub struct FrameFeed {
    consumer: jetstream::consumer::Consumer<pull::Config>,
    messages: Option<pull::Stream>,
    subject_prefix: String,
}

impl Bus {
    /// Connects, waiting up to [`connection::STARTUP_PATIENCE`] for a server
    /// that is still starting (for the daemon); reconnects for ever after.
    pub async fn connect(config: &NatsConfig, limits: BusLimits) -> Result<Bus> {
        Self::open(config, limits, connection::STARTUP_PATIENCE, false).await
    }

    /// Connects once, failing fast when no server answers (for the CLI).
    pub async fn connect_once(config: &NatsConfig, limits: BusLimits) -> Result<Bus> {
        Self::open(config, limits, Duration::ZERO, true).await
    }

    async fn open(config: &NatsConfig, limits: BusLimits, patience: Duration, once: bool) -> Result<Bus> {
        let disconnects = Arc::new(AtomicU64::new(0));
        let make = || async {
            let counter = disconnects.clone();
            let options = connection::options(config).await?.event_callback(move |event| {
                let counter = counter.clone();
                async move {
                    match event {
                        async_nats::Event::Disconnected => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        // Permission violations and the like: the server's words.
                        async_nats::Event::ServerError(e) => tracing::warn!("NATS server: {e}"),
                        _ => {}
                    }
                }
            });
            Ok(if once { options.max_reconnects(0) } else { options })
        };
        let client = connection::connect(config, patience, make).await?;
        tracing::debug!(url = %config.url, auth = config.auth_kind(), "NATS connected");
        let js = jetstream::new(client.clone());
        Ok(Bus { limits, disconnects, client, js, prefix: config.prefix.clone() })
    }

    /// Whether the connection to the server is up now.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Disconnections since the daemon connected (each one reconnects).
    pub fn disconnects(&self) -> u64 {
        self.disconnects.load(Ordering::Relaxed)
    }

    pub fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// Applies every migration: creates or updates streams and consumers.
    pub async fn migrate(&self) -> Result<MigrationReport> {
        let mut report = MigrationReport::default();
        for migration in migrations()? {
            for def in &migration.stream {
                self.apply_stream(def, migration.version).await?;
                report.streams.push(def.name.clone());
            }
            for def in &migration.object_store {
                self.apply_object_store(def).await?;
                report.streams.push(format!("OBJ_{}", def.bucket));
            }
            for def in &migration.consumer {
                self.apply_consumer(def).await?;
                report.consumers.push(format!("{}/{}", def.stream, def.durable));
            }
            report.version = migration.version;
        }
        Ok(report)
    }

    async fn apply_stream(&self, def: &StreamDef, version: u64) -> Result<()> {
        if let Ok(mut existing) = self.js.get_stream(&def.name).await {
            let info = existing.info().await.with_context(|| format!("reading stream {}", def.name))?;
            let theirs = info.config.metadata.get(MIGRATION_METADATA_KEY).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let newest = migrations()?.iter().map(|m| m.version).max().unwrap_or(0);
            if theirs > newest {
                bail!("stream {} was shaped by migration {theirs} of a newer wmvae; this build knows up to {newest}", def.name);
            }
        }
        let config = stream::Config {
            name: def.name.clone(),
            subjects: def.subjects.iter().map(|s| s.replace("{prefix}", &self.prefix)).collect(),
            description: Some(def.description.clone()),
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: Duration::from_secs(if def.limits_from_config { self.limits.latents_max_age_secs } else { def.max_age_secs }),
            max_bytes: if def.limits_from_config { self.limits.latents_max_bytes } else { def.max_bytes },
            max_messages: -1,
            max_messages_per_subject: -1,
            duplicate_window: Duration::from_secs(def.duplicate_window_secs),
            metadata: HashMap::from([(MIGRATION_METADATA_KEY.to_string(), version.to_string())]),
            ..Default::default()
        };
        self.js.create_or_update_stream(config).await.with_context(|| format!("applying stream {}", def.name))?;
        Ok(())
    }

    async fn apply_object_store(&self, def: &ObjectStoreDef) -> Result<()> {
        if self.js.get_object_store(&def.bucket).await.is_ok() {
            return Ok(());
        }
        let config = jetstream::object_store::Config {
            bucket: def.bucket.clone(),
            description: Some(def.description.clone()),
            storage: stream::StorageType::File,
            ..Default::default()
        };
        self.js.create_object_store(config).await.with_context(|| format!("creating object store {}", def.bucket))?;
        Ok(())
    }

    async fn apply_consumer(&self, def: &ConsumerDef) -> Result<()> {
        let config = pull::Config {
            durable_name: Some(def.durable.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(self.limits.ack_wait_secs),
            max_ack_pending: self.limits.max_ack_pending,
            ..Default::default()
        };
        let stream = self.js.get_stream(&def.stream).await.with_context(|| format!("stream {}", def.stream))?;
        let what = || format!("applying consumer {}/{}", def.stream, def.durable);
        match stream.get_consumer::<pull::Config>(&def.durable).await {
            Ok(_) => self.js.update_consumer_on_stream(config, &def.stream).await.map(drop).with_context(what),
            Err(_) => self.js.create_consumer_on_stream(config, &def.stream).await.map(drop).with_context(what),
        }
    }

    /// The durable frame consumer (after `migrate`).
    pub async fn frame_feed(&self) -> Result<FrameFeed> {
        let stream = self.js.get_stream("WM_FRAMES").await.context("stream WM_FRAMES (run wmvae migrate)")?;
        let consumer = stream.get_consumer("wmvae-ingest").await.map_err(|e| anyhow!("consumer wmvae-ingest: {e}"))?;
        Ok(FrameFeed { consumer, messages: None, subject_prefix: self.subject("frames.") })
    }

    /// The bench's baseline: a bare ephemeral pull consumer over WM_FRAMES
    /// that reads `n` messages and only acks them. Returns the time taken.
    pub async fn consume_and_ack_only(&self, n: u64) -> Result<Duration> {
        let stream = self.js.get_stream("WM_FRAMES").await.context("stream WM_FRAMES")?;
        let config = pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: self.limits.max_ack_pending,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.context("creating the baseline consumer")?;
        let mut messages = consumer.stream().max_messages_per_batch(PULL_BATCH).messages().await?;
        let start = Instant::now();
        for _ in 0..n {
            let message = messages.next().await.context("baseline consumer ended")?.map_err(|e| anyhow!("baseline consumer: {e}"))?;
            message.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        }
        Ok(start.elapsed())
    }

    /// Publishes a latent on `<prefix>.latents.<source>` (core NATS; the
    /// WM_LATENTS stream captures it). Buffered: call `flush` to push.
    pub async fn publish_latent(&self, source: &str, latent: &LatentMessage) -> Result<()> {
        self.client
            .publish(self.subject(&format!("latents.{source}")), latent.to_msgpack().into())
            .await
            .context("publishing a latent")
    }

    /// Pushes buffered core-NATS publishes to the server; gives up after
    /// [`FLUSH_TIMEOUT`] so a lost server never wedges a caller (or shutdown).
    pub async fn flush(&self) -> Result<()> {
        match tokio::time::timeout(FLUSH_TIMEOUT, self.client.flush()).await {
            Ok(result) => result.context("flushing to NATS"),
            Err(_) => bail!("flushing to NATS timed out after {FLUSH_TIMEOUT:?} (server unreachable?)"),
        }
    }

    async fn checkpoint_bucket(&self) -> Result<jetstream::object_store::ObjectStore> {
        self.js.get_object_store(CHECKPOINT_BUCKET).await.with_context(|| format!("object store {CHECKPOINT_BUCKET} (run wmvae migrate)"))
    }

    /// Puts an object in the `wm-checkpoints` bucket (`vae/v{version}.safetensors`
    /// for a version's weights; `imports/...` for uploads to import).
    pub async fn put_object(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let bucket = self.checkpoint_bucket().await?;
        bucket.put(name, &mut std::io::Cursor::new(bytes)).await.with_context(|| format!("putting {name}"))?;
        Ok(())
    }

    /// An object's bytes, if it is there.
    pub async fn get_object(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let bucket = self.checkpoint_bucket().await?;
        let mut object = match bucket.get(name).await {
            Ok(object) => object,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!("getting {name}: {e}")),
        };
        let mut bytes = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut bytes).await.with_context(|| format!("reading {name}"))?;
        Ok(Some(bytes))
    }

    /// Removes an object (absent is fine).
    pub async fn delete_object(&self, name: &str) -> Result<()> {
        let bucket = self.checkpoint_bucket().await?;
        match bucket.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!("deleting {name}: {e}")),
        }
    }

    /// Versions whose weights are in the bucket.
    pub async fn object_versions(&self) -> Result<Vec<u64>> {
        let bucket = self.checkpoint_bucket().await?;
        let mut list = bucket.list().await.map_err(|e| anyhow!("listing {CHECKPOINT_BUCKET}: {e}"))?;
        let mut versions = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| anyhow!("listing {CHECKPOINT_BUCKET}: {e}"))?;
            if info.deleted {
                continue;
            }
            if let Some(v) = info.name.strip_prefix("vae/v").and_then(|r| r.strip_suffix(".safetensors")).and_then(|v| v.parse().ok()) {
                versions.push(v);
            }
        }
        Ok(versions)
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

    /// Runs the `wmvae` micro service (`$SRV.PING` finds it) with one
    /// endpoint per name under `<prefix>.ctl.`, until `shutdown`. Each
    /// request's payload goes to `handler` with its endpoint name; errors
    /// become service errors carrying their code and text.
    pub async fn serve_control(&self, endpoints: &[&str], handler: crate::control::Handler, shutdown: CancellationToken) -> Result<()> {
        use async_nats::service::ServiceExt;
        let service = self
            .client
            .service_builder()
            .description("World Models VAE trainer: status, encode, checkpoints")
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| anyhow!("starting the {SERVICE_NAME} service: {e}"))?;
        let group = service.group(self.subject("ctl"));
        let mut tasks = tokio::task::JoinSet::new();
        for name in endpoints {
            let mut endpoint = group.endpoint(*name).await.map_err(|e| anyhow!("endpoint {name}: {e}"))?;
            let (handler, name, shutdown) = (handler.clone(), name.to_string(), shutdown.clone());
            tasks.spawn(async move {
                loop {
                    let request = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        request = endpoint.next() => match request { Some(r) => r, None => break },
                    };
                    let reply = handler(name.clone(), request.message.payload.clone()).await;
                    let reply = reply.map(Bytes::from).map_err(|e| async_nats::service::error::Error { status: e.message, code: e.code });
                    if let Err(e) = request.respond(reply).await {
                        tracing::warn!("control {name}: reply failed: {e}");
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        service.stop().await.map_err(|e| anyhow!("stopping the service: {e}"))?;
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

    /// A request to a control endpoint (`<prefix>.ctl.<endpoint>`); a
    /// service error comes back as a [`crate::control::ControlError`].
    pub async fn control_request(&self, endpoint: &str, payload: Vec<u8>) -> Result<Bytes> {
        let subject = self.subject(&format!("ctl.{endpoint}"));
        let reply = self.client.request(subject.clone(), payload.into()).await.map_err(|e| anyhow!("{subject}: {e}"))?;
        if let Some(headers) = reply.headers.as_ref() {
            if let Some(error) = headers.get(async_nats::service::NATS_SERVICE_ERROR) {
                let code = headers.get(async_nats::service::NATS_SERVICE_ERROR_CODE).and_then(|c| c.as_str().parse().ok()).unwrap_or(500);
                return Err(crate::control::ControlError { code, message: error.to_string() }.into());
            }
        }
        Ok(reply.payload)
    }

    /// A publisher of frames from `source` on `<prefix>.frames.<source>`.
    pub fn frame_publisher(&self, source: &str) -> FramePublisher {
        FramePublisher { js: self.js.clone(), subject: self.subject(&format!("frames.{source}")), source: source.to_string(), in_flight: VecDeque::new() }
    }

    /// Copies a rejected frame to `<prefix>.dlq.frames` with its reason, and
    /// waits for JetStream to store it. Deduplicated by the original's stream
    /// sequence, so a redelivered bad frame is dead-lettered once.
    pub async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let mut headers = HeaderMap::new();
        headers.insert(REASON_HEADER, reason);
        headers.insert(SUBJECT_HEADER, delivery.subject.as_str());
        headers.insert("Nats-Msg-Id", format!("frames-{}", delivery.stream_sequence).as_str());
        self.js
            .publish_with_headers(self.subject("dlq.frames"), headers, delivery.payload.clone())
            .await
            .context("publishing a dead letter")?
            .await
            .context("storing a dead letter")?;
        Ok(())
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

impl FrameFeed {
    /// Waits for at least one frame, then gathers more until `max` or
    /// `max_wait` after the first. Transient consumer errors are logged
    /// and retried; the stream is re-opened if it ends.
    /// On `shutdown` it stops waiting and returns what it has (maybe nothing).
    pub async fn next_batch(&mut self, max: usize, max_wait: Duration, shutdown: &CancellationToken) -> Result<Vec<Delivery>> {
        let mut batch = Vec::new();
        let mut deadline: Option<Instant> = None;
        while batch.len() < max {
            if self.messages.is_none() {
                let stream = self.consumer.stream().max_messages_per_batch(PULL_BATCH).messages().await;
                self.messages = Some(stream.context("opening the frame consumer")?);
            }
            let messages = self.messages.as_mut().expect("opened above");
            // Before the first frame: wait indefinitely; after it: until the deadline.
            let deadline_or_never = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400));
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = tokio::time::timeout_at(deadline_or_never, messages.next()) => match next {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            match next {
                Some(Ok(message)) => {
                    let stream_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
                    let (message, acker) = message.split();
                    let subject = message.subject.to_string();
                    let source = subject.strip_prefix(&self.subject_prefix).unwrap_or("").to_string();
                    batch.push(Delivery { source, subject, payload: message.payload, stream_sequence, received_at: std::time::Instant::now(), acker });
                    deadline.get_or_insert_with(|| Instant::now() + max_wait);
                }
                Some(Err(e)) => {
                    tracing::warn!("frame consumer: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
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
}

#[cfg(test)]
mod tests {
    /// The migrations declare the store schema this build writes.
    #[test]
    fn migrations_declare_this_builds_store_schema() {
        assert_eq!(super::latest_store_schema().unwrap(), crate::store::SCHEMA_VERSION);
    }
}
