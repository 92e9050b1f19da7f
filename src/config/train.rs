//! The `[train]` section: the device and arithmetic, the batch, Adam's
//! learning rate and its schedule (straight into `vae::adam`'s types), the
//! rate limiter, the divergence guard, and the checkpoint cadence and
//! retention. It checks its own bounds; the training loop is the daemon's.

use crate::vae::adam::{AdamConfig, Schedule};
use crate::vae::device::DeviceChoice;
use crate::vae::model::Precision;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Upper bound on a training batch: 4,096 frames are ~200 MB of float
/// activations per conv layer on the CPU, past what a 24 GiB box should spend.
pub const MAX_BATCH_SIZE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub device: DeviceChoice,
    /// The training step's arithmetic: `fp32`, or `bf16` layers over
    /// float32 weights, optimizer and loss.
    pub precision: Precision,
    pub batch_size: usize,
    /// Adam's (peak) learning rate.
    pub learning_rate: f64,
    /// How it moves with the step: `constant` (the paper) or `warmup_cosine`.
    pub lr_schedule: Schedule,
    /// `warmup_cosine`: steps of linear warmup, then steps of cosine decay
    /// down to `min_learning_rate`, which holds after.
    pub warmup_steps: u64,
    pub decay_steps: u64,
    pub min_learning_rate: f64,
    /// libtorch intra-op threads; 0 keeps libtorch's default (one per core).
    pub threads: usize,
    /// Training starts once the training split holds this many frames.
    pub min_frames: u64,
    /// Frames trained on per frame inserted, at most (0: unlimited).
    pub samples_per_insert: f64,
    pub eval_every_steps: u64,
    pub log_every_steps: u64,
    /// A loss above this times the running median is skipped.
    pub divergence_factor: f64,
    /// Skipped steps in a row that trigger an automatic rollback.
    pub max_bad_steps: usize,
    /// Automatic rollbacks in a row before training stops with an error.
    pub max_auto_rollbacks: u32,
    pub checkpoint_every_steps: u64,
    /// While the model is young, versions (and evals) also at this step
    /// and each doubling of it below `checkpoint_every_steps` (0: none).
    pub first_checkpoint_steps: u64,
    /// Newest versions kept by retention (besides pinned, best and active).
    pub keep_last: usize,
    /// Newest history entries kept; older ones go once announced.
    pub keep_history: u64,
}

impl TrainConfig {
    /// Whether `step` is one of the young model's extra versions and
    /// evals: `first_checkpoint_steps` x 1, 2, 4, ... below `checkpoint_every_steps`.
    pub fn is_early_checkpoint(&self, step: u64) -> bool {
        let first = self.first_checkpoint_steps;
        first > 0 && step < self.checkpoint_every_steps && step % first == 0 && (step / first).is_power_of_two()
    }

    /// The optimizer these keys describe (betas and eps: the defaults).
    pub fn adam(&self) -> AdamConfig {
        AdamConfig {
            learning_rate: self.learning_rate,
            schedule: self.lr_schedule,
            warmup_steps: self.warmup_steps,
            decay_steps: self.decay_steps,
            min_learning_rate: self.min_learning_rate,
            ..AdamConfig::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > MAX_BATCH_SIZE {
            bail!("train.batch_size must be in 1..={MAX_BATCH_SIZE}");
        }
        self.validate_learning_rate()?;
        for (name, value) in [
            ("eval_every_steps", self.eval_every_steps),
            ("log_every_steps", self.log_every_steps),
            ("checkpoint_every_steps", self.checkpoint_every_steps),
            ("max_bad_steps", self.max_bad_steps as u64),
            ("max_auto_rollbacks", self.max_auto_rollbacks as u64),
            ("keep_last", self.keep_last as u64),
            ("keep_history", self.keep_history),
        ] {
            if value == 0 {
                bail!("train.{name} must be at least 1");
            }
        }
        if !(self.samples_per_insert >= 0.0 && self.samples_per_insert.is_finite()) {
            bail!("train.samples_per_insert must be 0 (unlimited) or positive");
        }
        // Written so that NaN fails as well.
        if !(self.divergence_factor > 1.0 && self.divergence_factor.is_finite()) {
            bail!("train.divergence_factor must be above 1");
        }
        Ok(())
    }

    fn validate_learning_rate(&self) -> Result<()> {
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            bail!("train.learning_rate must be a positive number");
        }
        if self.lr_schedule == Schedule::WarmupCosine {
            if self.decay_steps == 0 {
                bail!("train.decay_steps must be at least 1 with lr_schedule = \"warmup_cosine\"");
            }
            if !(self.min_learning_rate >= 0.0 && self.min_learning_rate <= self.learning_rate) {
                bail!("train.min_learning_rate must be between 0 and train.learning_rate");
            }
        }
        Ok(())
    }
}
