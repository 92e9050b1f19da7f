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
//!
//! Here: the wiring, the fetcher and the publisher; the follower is
//! `follow.rs`, the worker thread `worker.rs`.

mod follow;
mod worker;

use super::status::{EncoderState, Heart, StatusBoard, IDLE_TICK};
use super::supervisor::Supervisor;
use super::undeliverable::{self, Failures};
use super::Error;
use crate::bus::messages::{DecodeReply, LatentMessage};
use crate::bus::{Bus, Delivery, FrameConsumer, LatentPublisher};
use crate::config::Config;
use crate::frames::Frame;
use crate::store;
use crate::vae::device::Device;
use crate::vae::learner::Network;
use crate::vae::model::VaeConfig;
use anyhow::{anyhow, Context, Result};
use follow::follow;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use worker::Worker;

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
        reply: oneshot::Sender<Result<LatentMessage, Error>>,
    },
    /// The `decode` endpoint: latents (N x z_size, row-major) to frames.
    Decode {
        z: Vec<f32>,
        version: Option<u64>,
        reply: oneshot::Sender<Result<DecodeReply, Error>>,
    },
    /// Newly active weights, loaded and warmed off this thread.
    Switch { version: u64, net: Box<Network> },
    /// A pinned version's weights, loaded off this thread, kept beside the active ones.
    Pin { version: u64, net: Box<Network> },
    /// Nothing to do (the feed is idle): the worker beats all the same.
    Tick,
}

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
    pub async fn encode(&self, frame: Frame, version: Option<u64>) -> Result<LatentMessage, Error> {
        self.ask(|reply| Work::Encode {
            frame: frame.clone(),
            version,
            reply,
        })
        .await
    }

    /// Decodes latents (N x z_size, row-major) to uint8 frames with the
    /// active version's weights, or with `version`'s.
    pub async fn decode(&self, z: Vec<f32>, version: Option<u64>) -> Result<DecodeReply, Error> {
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
    async fn ask<T>(&self, work: impl Fn(oneshot::Sender<Result<T, Error>>) -> Work) -> Result<T, Error> {
        let first = self.send(&work).await;
        let Err(Error::NotLoaded(version)) = first else {
            return first;
        };
        let weights = self
            .bus
            .announced_weights(version)
            .await?
            .ok_or(store::Error::UnknownVersion(version))?;
        let (vae, device) = (self.vae, self.device);
        let net = tokio::task::spawn_blocking(move || follow::warmed(device, vae, version, &weights))
            .await
            .map_err(anyhow::Error::from)??;
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

    async fn send<T>(&self, work: &impl Fn(oneshot::Sender<Result<T, Error>>) -> Work) -> Result<T, Error> {
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
    let net = Network::new(device, config.vae());
    let worker = Worker::new(net, config.ingest.preprocess, status.clone(), encoded, failures.clone());
    let thread = start_worker(worker, incoming, &status, supervisor)?;
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
    let task = tokio::spawn(await_parts(parts, thread));
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

/// Starts the worker's thread under `supervisor`, the status board saying it waits for a version.
fn start_worker(
    worker: Worker,
    incoming: mpsc::Receiver<Work>,
    status: &StatusBoard,
    supervisor: &Supervisor,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    status.update(|s| s.encoder_state = Some(EncoderState::WaitingForVersion));
    status.beat(Heart::Encoder);
    let (runtime, stop) = (tokio::runtime::Handle::current(), supervisor.shutdown().clone());
    supervisor.thread("encoder thread", move || {
        worker.run(incoming, &runtime, &stop);
        Ok(())
    })
}

/// Waits for the encoder's tasks and then its worker thread to end.
async fn await_parts(parts: [JoinHandle<Result<()>>; 4], thread: std::thread::JoinHandle<Result<()>>) -> Result<()> {
    // Their failures are the supervisor's to report; here only their end is
    // awaited. The worker drains its queue and stops on shutdown; the
    // publisher, once the worker has stopped.
    futures::future::join_all(parts).await;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
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
