//! The latent worker: one thread owning an inference copy of the VAE with
//! the **active checkpoint's** weights. It encodes every newly stored frame
//! in micro-batches (bounded in size and wait) and publishes a latent per
//! frame, and it answers the `encode` endpoint. Weights change only through
//! [`LatentWorker::switch_to`], which returns once every later latent
//! carries the new version: no latent ever names unversioned weights.

use crate::bus::Bus;
use crate::vae::checkpoint::Checkpoint;
use crate::config::LatentsConfig;
use crate::vae::device::Device;
use crate::vae::learner::Network;
use crate::vae::model::VaeConfig;
use crate::daemon::status::StatusBoard;
use crate::bus::messages::LatentMessage;
use crate::frames::Frame;
use anyhow::{anyhow, Context, Result};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Work items queued ahead of the worker: bounds memory when encoding falls
/// behind, and then slows ingest (it waits to queue) instead of growing.
const QUEUE_DEPTH: usize = 64;

enum Work {
    /// Newly stored frames: publish a latent for each.
    Frames(Vec<Frame>),
    /// The `encode` endpoint: one frame, the latent back.
    Encode(Frame, oneshot::Sender<Result<LatentMessage>>),
    /// New active weights; `done` fires once they are loaded.
    Switch(Arc<Checkpoint>, oneshot::Sender<Result<()>>),
}

/// A handle to the worker thread; clones share it.
#[derive(Clone)]
pub struct LatentWorker {
    queue: mpsc::Sender<Work>,
}

struct Worker {
    net: Network,
    version: u64,
    bus: Bus,
    config: LatentsConfig,
    status: StatusBoard,
    runtime: tokio::runtime::Runtime,
}

impl LatentWorker {
    /// Starts the worker with `active`'s weights. It stops when every
    /// handle is dropped and its queue is drained.
    pub fn start(
        device: Device,
        vae: VaeConfig,
        active: &Checkpoint,
        config: LatentsConfig,
        bus: Bus,
        status: StatusBoard,
    ) -> Result<(LatentWorker, std::thread::JoinHandle<()>)> {
        let (queue, incoming) = mpsc::channel(QUEUE_DEPTH);
        let mut net = Network::new(device, vae);
        net.load_checkpoint_weights(active)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build()?;
        let mut worker = Worker { net, version: active.metadata.version, bus, config, status, runtime };
        let thread = std::thread::Builder::new().name("wmvae-latents".into()).spawn(move || worker.run(incoming))?;
        Ok((LatentWorker { queue }, thread))
    }

    /// Queues newly stored frames for latents (waits while the queue is full).
    pub async fn submit(&self, frames: Vec<Frame>) -> Result<()> {
        self.queue.send(Work::Frames(frames)).await.map_err(|_| anyhow!("latent worker stopped"))
    }

    /// Encodes one preprocessed frame with the active weights.
    pub async fn encode(&self, frame: Frame) -> Result<LatentMessage> {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Work::Encode(frame, reply)).await.map_err(|_| anyhow!("latent worker stopped"))?;
        answer.await.context("latent worker stopped")?
    }

    /// Switches to a checkpoint's weights; returns once loaded, so every
    /// latent published afterwards carries its version. For blocking callers.
    pub fn switch_to(&self, checkpoint: Arc<Checkpoint>) -> Result<()> {
        let (done, loaded) = oneshot::channel();
        self.queue.blocking_send(Work::Switch(checkpoint, done)).map_err(|_| anyhow!("latent worker stopped"))?;
        loaded.blocking_recv().context("latent worker stopped")?
    }
}

impl Worker {
    fn run(&mut self, mut incoming: mpsc::Receiver<Work>) {
        let max_wait = Duration::from_millis(self.config.max_wait_ms);
        while let Some(first) = incoming.blocking_recv() {
            // Gather a micro-batch of frames; other work is handled in order.
            let mut frames: Vec<Frame> = Vec::new();
            let mut next = Some(first);
            let deadline = tokio::time::Instant::now() + max_wait;
            while let Some(work) = next.take() {
                match work {
                    Work::Frames(batch) => frames.extend(batch),
                    Work::Encode(frame, reply) => {
                        let _ = reply.send(self.encode(std::slice::from_ref(&frame)).map(|mut v| v.remove(0)));
                    }
                    Work::Switch(checkpoint, done) => {
                        // Frames queued before the switch keep the old version.
                        self.publish(std::mem::take(&mut frames));
                        let _ = done.send(self.switch(&checkpoint));
                    }
                }
                if frames.len() < self.config.max_batch {
                    next = self.runtime.block_on(async { tokio::time::timeout_at(deadline, incoming.recv()).await.ok().flatten() });
                }
            }
            self.publish(frames);
        }
    }

    fn switch(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        self.net.load_checkpoint_weights(checkpoint)?;
        self.version = checkpoint.metadata.version;
        Ok(())
    }

    fn encode(&self, frames: &[Frame]) -> Result<Vec<LatentMessage>> {
        let pixels: Vec<u8> = frames.iter().map(|f| &f.pixels[..]).collect::<Vec<_>>().concat();
        let latents = self.net.encode_frames(&pixels)?;
        Ok(frames
            .iter()
            .zip(latents.mu.into_iter().zip(latents.logvar))
            .map(|(f, (mu, logvar))| LatentMessage { episode: f.episode.clone(), step: f.step, model_version: self.version, mu, logvar })
            .collect())
    }

    /// Encodes and publishes `frames` in chunks of `max_batch`.
    fn publish(&mut self, frames: Vec<Frame>) {
        for chunk in frames.chunks(self.config.max_batch.max(1)) {
            let result = self.encode(chunk).and_then(|latents| {
                self.runtime.block_on(async {
                    for (frame, latent) in chunk.iter().zip(&latents) {
                        self.bus.publish_latent(&frame.source, latent).await?;
                    }
                    self.bus.flush().await
                })
            });
            match result {
                Ok(()) => {
                    self.status.update(|s| s.latents_published += chunk.len() as u64);
                    for received in chunk.iter().filter_map(|f| f.received_at) {
                        self.status.latent_latency().observe(received.elapsed());
                    }
                }
                Err(e) => tracing::error!("latents for {} frames not published: {e:#}", chunk.len()),
            }
        }
    }
}
