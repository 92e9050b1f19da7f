//! The frame pipeline's sections: `[store]` (where the replay buffer
//! lives; its sizing, `[buffer]`, is `store::BufferConfig`), `[ingest]`
//! (frames from NATS into it) and `[latents]` (the encoder's micro-batches
//! and stream). Each checks its own bounds; none opens anything.

use crate::frames::preprocess::Policy;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Upper bound on a group commit: 8,192 frames of 96x96 is ~230 MB of
/// decoded pixels in flight, the most one batch should hold.
pub const MAX_INGEST_BATCH: usize = 8192;

/// Upper bound on a latent micro-batch: encoding is latency-bound, and 1,024
/// frames already fill a GPU's encoder pass.
pub const MAX_LATENT_BATCH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Where the sled store lives (created if missing).
    pub data_dir: PathBuf,
    /// A store write that has not returned for this long ends the daemon
    /// non-zero, saying so: sled can leave a write waiting for ever after
    /// one met a full disk, and only a new process opens the store again.
    pub write_timeout_secs: u64,
}

impl StoreConfig {
    pub fn validate(&self) -> Result<()> {
        // A checkpoint's write (~150 MB into sled) takes seconds on a busy disk.
        if self.write_timeout_secs < 10 {
            bail!("store.write_timeout_secs must be at least 10 (a checkpoint's write takes seconds)");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestConfig {
    /// "world_models" (64x64 as is, 96x96 cropped and resized, others
    /// rejected) or "resize" (others resized too).
    pub preprocess: Policy,
    /// Frames per group commit (one flush, then their acks).
    pub batch_max_frames: usize,
    /// Longest wait for a group to fill once its first frame is in.
    pub batch_max_wait_ms: u64,
    /// Unacked frames are redelivered after this many seconds.
    pub ack_wait_secs: u64,
    /// Frames handed out but not yet acked, at most (backpressure).
    pub max_ack_pending: i64,
    /// Deliveries of one frame, at most, on each consumer; past them the
    /// frame is dead-lettered as `undeliverable`.
    pub max_deliver: i64,
}

impl IngestConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch_max_frames == 0 || self.batch_max_frames > MAX_INGEST_BATCH {
            bail!("ingest.batch_max_frames must be in 1..={MAX_INGEST_BATCH}");
        }
        if self.batch_max_wait_ms > 10_000 {
            bail!("ingest.batch_max_wait_ms must be at most 10000");
        }
        if self.ack_wait_secs == 0 {
            bail!("ingest.ack_wait_secs must be at least 1");
        }
        if self.max_deliver < 2 {
            bail!("ingest.max_deliver must be at least 2 (one delivery and one retry)");
        }
        if self.max_ack_pending < self.batch_max_frames as i64 {
            bail!("ingest.max_ack_pending must be at least ingest.batch_max_frames");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatentsConfig {
    /// Frames encoded together, at most.
    pub max_batch: usize,
    /// Longest wait for a micro-batch to fill once its first frame is in.
    pub max_wait_ms: u64,
    /// WM_LATENTS keeps latents this long (seconds) ...
    pub stream_max_age_secs: u64,
    /// ... and at most this many bytes.
    pub stream_max_bytes: i64,
}

impl LatentsConfig {
    pub fn validate(&self) -> Result<()> {
        if self.max_batch == 0 || self.max_batch > MAX_LATENT_BATCH {
            bail!("latents.max_batch must be in 1..={MAX_LATENT_BATCH}");
        }
        Ok(())
    }
}
