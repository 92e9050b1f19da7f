//! The encoder's worker thread: owns the networks (the active version's
//! and up to [`PINNED_KEPT`] pinned ones), decodes and checks each frame
//! with ingest's code, encodes micro-batches (frame by frame after a failed
//! batch, so one poison frame holds back no other), answers decode and
//! pinned encode requests, and switches weights between two micro-batches.
//! Storing and acking the latents is the publisher's (`mod.rs`).

use super::{Encoded, Work, PINNED_KEPT};
use crate::bus::messages::{DecodeReply, LatentMessage};
use crate::bus::Delivery;
use crate::daemon::status::{EncoderState, Heart, StatusBoard};
use crate::daemon::undeliverable::Failures;
use crate::daemon::Error;
use crate::frames::preprocess::Policy;
use crate::frames::{wire, Frame};
use crate::vae::learner::Network;
use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The worker thread's state: the network and the version it holds.
pub(super) struct Worker {
    /// The active version's network (fresh weights until the first).
    pub(super) net: Network,
    pub(super) version: Option<u64>,
    /// Pinned versions' networks, newest use first, at most [`PINNED_KEPT`].
    pub(super) pinned: std::collections::VecDeque<(u64, Network)>,
    pub(super) policy: Policy,
    pub(super) status: StatusBoard,
    /// Where encoded micro-batches go to be stored and acked.
    pub(super) encoded: mpsc::Sender<Encoded>,
    /// Why frames failed to encode, for their dead letter.
    pub(super) failures: Failures,
}

impl Worker {
    /// A worker holding fresh weights (`net`) and no version yet.
    pub(super) fn new(
        net: Network,
        policy: Policy,
        status: StatusBoard,
        encoded: mpsc::Sender<Encoded>,
        failures: Failures,
    ) -> Worker {
        Worker {
            net,
            version: None,
            pinned: Default::default(),
            policy,
            status,
            encoded,
            failures,
        }
    }

    /// Works through `incoming` until `shutdown` finds it empty (or every
    /// sender is gone), beating at each item.
    pub(super) fn run(
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
    /// number; [`Error::NotLoaded`] for a version not held here.
    fn net_for(&self, version: Option<u64>) -> Result<(u64, &Network), Error> {
        let active = self.version.map(|v| (v, &self.net));
        match version {
            None => Ok(active.context("this encoder has no version yet")?),
            Some(v) if self.version == Some(v) => Ok((v, &self.net)),
            Some(v) => self
                .pinned
                .iter()
                .find(|(p, _)| *p == v)
                .map(|(p, net)| (*p, net))
                .ok_or(Error::NotLoaded(v)),
        }
    }

    /// Latent messages for `frames` by the active version, naming it.
    fn encode(&self, frames: &[Frame]) -> Result<Vec<LatentMessage>> {
        Ok(self.encode_with(None, frames)?)
    }

    /// Latent messages for `frames` by `version` (the active one when None), naming it.
    fn encode_with(&self, version: Option<u64>, frames: &[Frame]) -> Result<Vec<LatentMessage>, Error> {
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

/// A test hook (the `failpoints` feature): `FAILPOINTS=encoder-poison=return(E)`
/// makes encoding fail for any batch holding a frame of episode `E`, as a
/// frame no encoder can handle would. Compiled out without the feature.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn poisoned(frames: &[Frame]) -> Result<()> {
    fail::fail_point!("encoder-poison", |episode: Option<String>| match frames
        .iter()
        .any(|f| Some(&f.episode) == episode.as_ref())
    {
        true => Err(anyhow::anyhow!("failpoint encoder-poison: this frame can't be encoded")),
        false => Ok(()),
    });
    Ok(())
}
