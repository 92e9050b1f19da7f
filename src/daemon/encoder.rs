//! The encoder role: a latent for every frame, read straight from WM_FRAMES
//! through the durable consumer `wmvae-encode` that every encoder replica
//! shares (each frame goes to one replica), off the trainer's commit path.
//!
//! Four parts. The follower watches the cluster's active version (`wm-meta`
//! `active`, which the leader moves after announcing), fetches each newly
//! active version's weights from the object store and checks their sha256
//! against it. The fetcher pulls micro-batches of frames (bounded in
//! size and wait by `[latents]`), but only once a version is loaded: until
//! then the consumer stays idle. The worker thread owns the network: it
//! decodes and checks each frame with the same code as ingest (a bad frame
//! is terminated here without a dead letter; ingest dead-letters it) and
//! encodes; the publisher then stores the latents in WM_LATENTS with
//! `Nats-Msg-Id` and acks the frames only once JetStream has stored them,
//! while the worker encodes the next micro-batch. Weights switch
//! between two micro-batches, in the order `active` moved, so a latent names
//! only a version that was announced and can be fetched.

use super::status::{EncoderState, Heart, StatusBoard, IDLE_TICK};
use super::supervisor::Supervisor;
use super::undeliverable::{self, Failures};
use crate::backoff::Backoff;
use crate::bus::kv::Active;
use crate::bus::messages::{weights_object, DecodeReply, LatentMessage};
use crate::bus::{Bus, Delivery, FrameConsumer, LatentPublisher, TooLarge};
use crate::config::Config;
use crate::frames::preprocess::Policy;
use crate::frames::{wire, Frame};
use crate::store::UnknownVersion;
use crate::vae::checkpoint::sha256_hex;
use crate::vae::device::Device;
use crate::vae::learner::Network;
use crate::vae::model::VaeConfig;
use anyhow::{anyhow, Context, Result};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Micro-batches queued ahead of the worker: bounds memory (and unacked
/// frames) when encoding falls behind; the fetcher then waits to queue.
const QUEUE_DEPTH: usize = 4;
/// Encoded micro-batches waiting for their latents to be stored: the worker
/// encodes the next batch while the previous one's publishes and acks are in
/// flight. Measured at 500 frames/s with the trainer running (2 cores):
/// done in turn, publish and acks took 1.8 ms of every 4.1 ms a batch kept
/// the worker busy.
const PUBLISH_DEPTH: usize = 2;

/// A micro-batch encoded: its latents, then what to ack, to terminate
/// (invalid: ingest dead-letters them) and to hand back (they failed to
/// encode, their error recorded: redelivered until `max_deliver`).
struct Encoded {
    latents: Vec<(String, LatentMessage)>,
    good: Vec<Delivery>,
    bad: Vec<Delivery>,
    failed: Vec<Delivery>,
}

/// Versions other than the active one kept loaded for requests that pin
/// one (`wm.ctl.encode`, `wm.ctl.decode` with a `version`): a controller
/// evaluated against a fixed V, and maybe one more; ~17 MB each.
const PINNED_KEPT: usize = 2;

enum Work {
    /// A micro-batch of frame deliveries: a latent for each valid one.
    Frames(Vec<Delivery>),
    /// The `encode` endpoint: one frame, its latent back, by the active
    /// version or the one given.
    Encode {
        frame: Frame,
        version: Option<u64>,
        reply: oneshot::Sender<Result<LatentMessage>>,
    },
    /// The `decode` endpoint: latents (N x z_size, row-major) to frames.
    Decode {
        z: Vec<f32>,
        version: Option<u64>,
        reply: oneshot::Sender<Result<DecodeReply>>,
    },
    /// Newly active weights, loaded and warmed off this thread.
    Switch { version: u64, net: Box<Network> },
    /// A pinned version's weights, loaded off this thread, kept beside the active ones.
    Pin { version: u64, net: Box<Network> },
    /// Nothing to do (the feed is idle): the worker beats all the same.
    Tick,
}

/// A request for a version this encoder has not loaded: the handle fetches
/// its weights and asks again.
#[derive(Debug)]
struct NotLoaded(u64);

impl std::fmt::Display for NotLoaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "v{} is not loaded here", self.0)
    }
}

impl std::error::Error for NotLoaded {}

/// A handle for the `encode` and `decode` endpoints; clones share the worker.
#[derive(Clone)]
pub struct EncoderHandle {
    queue: mpsc::Sender<Work>,
    bus: Bus,
    vae: VaeConfig,
    device: Device,
}

impl EncoderHandle {
    /// Encodes one preprocessed frame with the weights the latents use
    /// now, or with `version`'s.
    pub async fn encode(&self, frame: Frame, version: Option<u64>) -> Result<LatentMessage> {
        self.ask(|reply| Work::Encode {
            frame: frame.clone(),
            version,
            reply,
        })
        .await
    }

    /// Decodes latents (N x z_size, row-major) to uint8 frames with the
    /// active version's weights, or with `version`'s.
    pub async fn decode(&self, z: Vec<f32>, version: Option<u64>) -> Result<DecodeReply> {
        self.ask(|reply| Work::Decode {
            z: z.clone(),
            version,
            reply,
        })
        .await
    }

    /// Hands `work` to the worker; when it names a version not loaded
    /// there, fetches that version's weights (checked against their
    /// announcement), loads them and asks again.
    async fn ask<T>(&self, work: impl Fn(oneshot::Sender<Result<T>>) -> Work) -> Result<T> {
        let first = self.send(&work).await;
        let Err(e) = &first else { return first };
        let Some(NotLoaded(version)) = e.downcast_ref::<NotLoaded>().map(|n| NotLoaded(n.0)) else {
            return first;
        };
        let weights = self
            .bus
            .announced_weights(version)
            .await?
            .ok_or(UnknownVersion(version))?;
        let (vae, device) = (self.vae, self.device);
        let net = tokio::task::spawn_blocking(move || {
            Network::from_safetensors(device, vae, &weights, &format!("v{version} from the object store"))
        })
        .await??;
        self.queue
            .send(Work::Pin {
                version,
                net: Box::new(net),
            })
            .await
            .map_err(|_| anyhow!("the encoder has stopped"))?;
        tracing::info!(version, "encoder: v{version} loaded for requests that pin it");
        self.send(&work).await
    }

    async fn send<T>(&self, work: &impl Fn(oneshot::Sender<Result<T>>) -> Work) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(work(reply))
            .await
            .map_err(|_| anyhow!("the encoder has stopped"))?;
        answer.await.context("the encoder has stopped")?
    }
}

/// The running encoder: its handle, and its task, which ends after
/// `shutdown` once the frames in flight are done (or with the first error).
pub struct Encoder {
    pub handle: EncoderHandle,
    pub task: JoinHandle<Result<()>>,
}

/// Starts the worker thread, the follower, the fetcher, the publisher and
/// the dead-letter forwarder, each under `supervisor` (one failing stops
/// the daemon, saying why).
pub fn start(
    bus: &Bus,
    config: &Config,
    device: Device,
    status: StatusBoard,
    supervisor: &Supervisor,
) -> Result<Encoder> {
    let shutdown = supervisor.shutdown().clone();
    let (queue, incoming) = mpsc::channel(QUEUE_DEPTH);
    let (encoded, to_publish) = mpsc::channel(PUBLISH_DEPTH);
    let failures = Failures::default();
    let worker = Worker {
        net: Network::new(device, config.vae()),
        version: None,
        pinned: Default::default(),
        policy: config.ingest.preprocess,
        status: status.clone(),
        encoded,
        failures: failures.clone(),
    };
    status.update(|s| s.encoder_state = Some(EncoderState::WaitingForVersion));
    status.beat(Heart::Encoder);
    let (runtime, stop) = (tokio::runtime::Handle::current(), shutdown.clone());
    let thread = supervisor.thread("encoder thread", move || {
        worker.run(incoming, &runtime, &stop);
        Ok(())
    })?;
    let (loaded, ready) = watch::channel(false);
    let max_wait = Duration::from_millis(config.latents.max_wait_ms);
    let parts = [
        supervisor.spawn(
            "encoder's follower",
            follow(
                bus.clone(),
                queue.clone(),
                (config.vae(), device),
                loaded,
                shutdown.clone(),
            ),
        ),
        supervisor.spawn(
            "encoder's fetch",
            fetch(
                bus.clone(),
                queue.clone(),
                ready,
                config.latents.max_batch,
                max_wait,
                shutdown.clone(),
            ),
        ),
        supervisor.spawn(
            "encoder's latent publisher",
            publish(bus.latent_publisher(), to_publish, status, failures.clone()),
        ),
        supervisor.spawn(
            "encoder's dead letters",
            undeliverable::forward(bus.clone(), FrameConsumer::Encode, failures, shutdown),
        ),
    ];
    // Their failures are the supervisor's to report; here only their end is
    // awaited. The worker drains its queue and stops on shutdown; the
    // publisher, once the worker has stopped.
    let task = tokio::spawn(async move {
        futures::future::join_all(parts).await;
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        Ok(())
    });
    Ok(Encoder {
        handle: EncoderHandle {
            queue,
            bus: bus.clone(),
            vae: config.vae(),
            device,
        },
        task,
    })
}

/// Follows the cluster's active version (`wm-meta` `active`, moved by the
/// leader after it announced the version): each newly active version's
/// weights (the newest, when several came meanwhile), fetched and checked
/// against the sha256 `active` names, go to the worker; `loaded` turns true
/// after the first. An announcement alone moves nothing: a former leader's
/// can't reach the encoders. NATS failing under it (an election, a lost
/// server) is waited out: the watch is made again and a fetch retried, with
/// the current weights kept meanwhile.
async fn follow(
    bus: Bus,
    queue: mpsc::Sender<Work>,
    model: (VaeConfig, Device),
    loaded: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<()> {
    let shared = bus.shared().await?;
    let mut pause = Backoff::default();
    let mut current: Option<(u64, String)> = None;
    let failed = |e: &anyhow::Error, next| tracing::warn!("encoder: {e:#}; watching again in {next:?}");
    while let Some(updates) = pause.retry(&shutdown, || shared.watch_active(), failed).await {
        let mut updates = Box::pin(updates);
        while let Some(active) = next_active(&mut updates, &shutdown).await {
            if current.as_ref() == Some(&(active.version, active.sha256.clone())) {
                continue;
            }
            let Some(net) = load_active(&bus, &active, model, &mut pause, &shutdown).await? else {
                continue;
            };
            let version = active.version;
            if queue
                .send(Work::Switch {
                    version,
                    net: Box::new(net),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            current = Some((version, active.sha256));
            loaded.send_replace(true);
        }
        pause.wait(&shutdown).await;
    }
    Ok(())
}

/// The next newly active version the watch gives (an update with newer
/// ones behind it is skipped); None when the watch failed or ended (said
/// so: it is made again) or the shutdown came.
async fn next_active(
    updates: &mut (impl futures::Stream<Item = Result<(Active, u64)>> + Unpin),
    shutdown: &CancellationToken,
) -> Option<Active> {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return None,
            next = updates.next() => next,
        };
        match next {
            Some(Ok((active, 0))) => return Some(active),
            Some(Ok(_newer_behind)) => {}
            Some(Err(e)) => {
                tracing::warn!("encoder: {e:#}; watching again");
                return None;
            }
            None => {
                tracing::warn!("encoder: the watch of the active version ended; watching again");
                return None;
            }
        }
    }
}

/// The `active` version's network: its weights from the object store
/// (fetched again while NATS fails), checked against the sha256 `active`
/// names, built and warmed off the runtime. None (said why) when they
/// can't be had, don't match or don't load: the current weights stay.
async fn load_active(
    bus: &Bus,
    active: &Active,
    (vae, device): (VaeConfig, Device),
    pause: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<Option<Network>> {
    let version = active.version;
    let fetch = || async {
        match bus.get_object(&weights_object(version)).await {
            Err(e) if e.is::<TooLarge>() => {
                tracing::error!(version, "encoder: the active version's weights are refused: {e:#}");
                Ok(None)
            }
            fetched => fetched,
        }
    };
    let failed = |e: &anyhow::Error, next| {
        tracing::warn!(
            version,
            "encoder: fetching the active version's weights: {e:#}; trying again in {next:?}"
        )
    };
    let Some(fetched) = pause.retry(shutdown, fetch, failed).await else {
        return Ok(None);
    };
    let Some(weights) = fetched else {
        tracing::warn!(
            version,
            "the active version's weights can't be had from the object store; keeping the current ones"
        );
        return Ok(None);
    };
    if sha256_hex(&weights) != active.sha256 {
        tracing::error!(
            version,
            "the object store's weights do not match the active version's sha256; keeping the current ones"
        );
        return Ok(None);
    }
    match tokio::task::spawn_blocking(move || warmed(device, vae, version, &weights)).await? {
        Ok(net) => Ok(Some(net)),
        Err(e) => {
            tracing::error!(
                version,
                "encoder: the active version's weights do not load: {e:#}; keeping the current ones"
            );
            Ok(None)
        }
    }
}

/// Pulls micro-batches from `wmvae-encode` for the worker, once a version is loaded.
async fn fetch(
    bus: Bus,
    queue: mpsc::Sender<Work>,
    mut ready: watch::Receiver<bool>,
    max_batch: usize,
    max_wait: Duration,
    shutdown: CancellationToken,
) -> Result<()> {
    // The follower gone before any version (it stopped on shutdown, or
    // failed and says why itself): nothing to fetch for.
    // Meanwhile the worker beats on an idle tick.
    loop {
        let loaded = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            waited = ready.wait_for(|loaded| *loaded) => match waited {
                Ok(_) => true,
                Err(_) => return Ok(()),
            },
            _ = tokio::time::sleep(IDLE_TICK) => false,
        };
        if loaded {
            break;
        }
        if queue.send(Work::Tick).await.is_err() {
            return Ok(());
        }
    }
    let mut feed = bus.frame_feed(FrameConsumer::Encode).await?;
    while !shutdown.is_cancelled() {
        let batch = feed.next_batch(max_batch, max_wait, IDLE_TICK, &shutdown).await?;
        let work = match batch.is_empty() {
            true if shutdown.is_cancelled() => break,
            true => Work::Tick,
            false => Work::Frames(batch),
        };
        if queue.send(work).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Stores each encoded micro-batch's latents in WM_LATENTS, then acks its
/// frames (bad ones terminated, failed ones handed back at once). A batch
/// whose latents are not stored is not acked: its frames are redelivered
/// after `ack_wait`, the error recorded for each.
async fn publish(
    mut publisher: LatentPublisher,
    mut encoded: mpsc::Receiver<Encoded>,
    status: StatusBoard,
    failures: Failures,
) -> Result<()> {
    while let Some(Encoded {
        latents,
        good,
        bad,
        failed,
    }) = encoded.recv().await
    {
        for delivery in &failed {
            if let Err(e) = delivery.nak(Duration::ZERO).await {
                tracing::warn!("encoder: {e:#}; the frame comes back after ack_wait");
            }
        }
        let stored: Result<()> = async {
            for (source, latent) in &latents {
                publisher.send(source, latent).await?;
            }
            publisher.settle().await?;
            crash_point!("encoder-before-ack");
            for delivery in &good {
                delivery.ack().await?;
            }
            for delivery in &bad {
                delivery.terminate().await?;
            }
            Ok(())
        }
        .await;
        match stored {
            Ok(()) => {
                status.update(|s| s.latents_published += latents.len() as u64);
                for delivery in &good {
                    status.latent_latency().observe(delivery.received_at.elapsed());
                }
            }
            Err(e) => {
                tracing::error!(
                    "latents for {} frames not stored; the frames will be redelivered: {e:#}",
                    good.len()
                );
                good.iter().for_each(|d| failures.record(d.stream_sequence, &e));
            }
        }
    }
    Ok(())
}

/// The worker thread's state: the network and the version it holds.
struct Worker {
    /// The active version's network (fresh weights until the first).
    net: Network,
    version: Option<u64>,
    /// Pinned versions' networks, newest use first, at most [`PINNED_KEPT`].
    pinned: std::collections::VecDeque<(u64, Network)>,
    policy: Policy,
    status: StatusBoard,
    /// Where encoded micro-batches go to be stored and acked.
    encoded: mpsc::Sender<Encoded>,
    /// Why frames failed to encode, for their dead letter.
    failures: Failures,
}

impl Worker {
    /// Works through `incoming` until `shutdown` finds it empty (or every
    /// sender is gone), beating at each item.
    fn run(
        mut self,
        mut incoming: mpsc::Receiver<Work>,
        runtime: &tokio::runtime::Handle,
        shutdown: &CancellationToken,
    ) {
        let next = |incoming: &mut mpsc::Receiver<Work>| {
            runtime.block_on(async {
                tokio::select! {
                    biased;
                    work = incoming.recv() => work,
                    _ = shutdown.cancelled() => incoming.try_recv().ok(),
                }
            })
        };
        while let Some(work) = next(&mut incoming) {
            self.status.beat(Heart::Encoder);
            match work {
                Work::Tick => {}
                Work::Switch { version, net } => self.switch(version, *net),
                Work::Pin { version, net } => {
                    self.pinned.retain(|(v, _)| *v != version);
                    self.pinned.push_front((version, *net));
                    self.pinned.truncate(PINNED_KEPT);
                }
                Work::Encode { frame, version, reply } => {
                    let _ = reply.send(
                        self.encode_with(version, std::slice::from_ref(&frame))
                            .map(|mut latents| latents.remove(0)),
                    );
                }
                Work::Decode { z, version, reply } => {
                    let decoded = self.net_for(version).and_then(|(version, net)| {
                        Ok(DecodeReply {
                            version,
                            frames: net.decode_frames(&z)?,
                            png: None,
                        })
                    });
                    let _ = reply.send(decoded);
                }
                Work::Frames(batch) => {
                    if self.encoded.blocking_send(self.latents_for(batch)).is_err() {
                        return; // the publisher stopped: the daemon is going down
                    }
                }
            }
        }
    }

    /// Swaps in the newly active version's network, loaded and warmed
    /// beside the old one: the switch costs the worker no load time.
    fn switch(&mut self, version: u64, net: Network) {
        self.net = net;
        self.version = Some(version);
        self.status
            .update(|s| (s.encoder_state, s.encoder_version) = (Some(EncoderState::Encoding), Some(version)));
        tracing::info!(version, "encoder: latents now from this version");
    }

    /// The network of `version` (the active one when None), with its
    /// number; [`NotLoaded`] for a version not held here.
    fn net_for(&self, version: Option<u64>) -> Result<(u64, &Network)> {
        let active = self.version.map(|v| (v, &self.net));
        match version {
            None => active.context("this encoder has no version yet"),
            Some(v) if self.version == Some(v) => Ok((v, &self.net)),
            Some(v) => self
                .pinned
                .iter()
                .find(|(p, _)| *p == v)
                .map(|(p, net)| (*p, net))
                .ok_or_else(|| NotLoaded(v).into()),
        }
    }

    /// Latent messages for `frames` by the active version, naming it.
    fn encode(&self, frames: &[Frame]) -> Result<Vec<LatentMessage>> {
        self.encode_with(None, frames)
    }

    /// Latent messages for `frames` by `version` (the active one when None), naming it.
    fn encode_with(&self, version: Option<u64>, frames: &[Frame]) -> Result<Vec<LatentMessage>> {
        let (version, net) = self.net_for(version)?;
        poisoned(frames)?;
        let pixels: Vec<u8> = frames.iter().flat_map(|f| f.pixels.iter().copied()).collect();
        let latents = net.encode_frames(&pixels)?;
        Ok(frames
            .iter()
            .zip(latents.mu.into_iter().zip(latents.logvar))
            .map(|(f, (mu, logvar))| LatentMessage::of(f, version, mu, logvar))
            .collect())
    }

    /// Decodes and encodes a micro-batch: a latent per valid frame. When
    /// the batch fails to encode, each frame is tried alone, so one frame
    /// that can't be encoded holds back no other; those that fail alone are
    /// handed back with their error recorded.
    fn latents_for(&self, batch: Vec<Delivery>) -> Encoded {
        let (mut frames, mut good, mut bad) = (Vec::new(), Vec::new(), Vec::new());
        for delivery in batch {
            match wire::decode_frame(&delivery.source, &delivery.payload, self.policy) {
                Ok(frame) => {
                    frames.push(frame);
                    good.push(delivery);
                }
                Err(_) => bad.push(delivery),
            }
        }
        let mut encoded = Encoded {
            latents: Vec::new(),
            good: Vec::new(),
            bad,
            failed: Vec::new(),
        };
        let whole = if frames.is_empty() {
            Ok(Vec::new())
        } else {
            self.encode(&frames)
        };
        let latents: Vec<Result<LatentMessage>> = match whole {
            Ok(latents) => latents.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::warn!(
                    "a micro-batch of {} frames was not encoded ({e:#}); trying each alone",
                    frames.len()
                );
                frames
                    .iter()
                    .map(|f| self.encode(std::slice::from_ref(f)).map(|mut one| one.remove(0)))
                    .collect()
            }
        };
        for ((frame, delivery), latent) in frames.into_iter().zip(good).zip(latents) {
            match latent {
                Ok(latent) => {
                    encoded.latents.push((frame.source, latent));
                    encoded.good.push(delivery);
                }
                Err(e) => {
                    tracing::error!(
                        sequence = delivery.stream_sequence,
                        "a frame was not encoded; it is handed back: {e:#}"
                    );
                    self.failures.record(delivery.stream_sequence, &e);
                    encoded.failed.push(delivery);
                }
            }
        }
        encoded
    }
}

/// A network holding `version`'s `weights`, its kernels warmed by one
/// encode, so the switch to it costs the worker nothing.
fn warmed(device: Device, vae: VaeConfig, version: u64, weights: &[u8]) -> Result<Network> {
    let net = Network::from_safetensors(device, vae, weights, &format!("v{version} from the object store"))?;
    net.encode_frames(&[0u8; crate::frames::BYTES])?;
    Ok(net)
}

/// A test hook (the `failpoints` feature): `FAILPOINTS=encoder-poison=return(E)`
/// makes encoding fail for any batch holding a frame of episode `E`, as a
/// frame no encoder can handle would. Compiled out without the feature.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn poisoned(frames: &[Frame]) -> Result<()> {
    fail::fail_point!("encoder-poison", |episode: Option<String>| match frames
        .iter()
        .any(|f| Some(&f.episode) == episode.as_ref())
    {
        true => Err(anyhow!("failpoint encoder-poison: this frame can't be encoded")),
        false => Ok(()),
    });
    Ok(())
}
