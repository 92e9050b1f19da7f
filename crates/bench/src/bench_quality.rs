//! `wmvae bench quality`: how fast a fresh VAE learns, not how fast it
//! steps. Trains on one file's frames with the config's `[train]` recipe
//! (batch size, learning rate and schedule) and measures the held-out
//! reconstruction loss and KL every tenth of the run, with the training's
//! wall time and the latent diagnostics (active units, KL per dimension, on
//! up to `DIAGNOSTIC_FRAMES` held-out frames spread over the file); how the
//! training defaults are chosen (BENCHMARKS.md).
//!
//! Frames only from files, batches drawn uniformly with a fixed seed, so two
//! recipes run on the same data see the same draws; no NATS, no store.

use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wmvae::config::Config;
use wmvae::frames::npy::FrameReader;
use wmvae::vae::device;
use wmvae::vae::learner::{Learner, LossValues};
use wmvae::vae::properties::DIAGNOSTIC_FRAMES;

/// Frames evaluated at once: bounds the activations an eval holds.
const EVAL_CHUNK_FRAMES: usize = 256;
/// Points on the curve besides step 0: every tenth of the run.
const CURVE_POINTS: u64 = 10;

/// What to train on and for how long.
#[derive(Debug, Clone)]
pub struct QualityOptions {
    /// Training frames (uint8 .npy, N x H x W x 3; 96x96 preprocessed).
    pub frames: PathBuf,
    /// Held-out frames (other episodes), the same way.
    pub heldout: PathBuf,
    pub steps: u64,
    /// Report the first curve step whose held-out recon is at or under it.
    pub target_recon: Option<f64>,
}

/// Every frame of `path`, preprocessed, as one byte vector.
fn read_frames(path: &Path) -> Result<Vec<u8>> {
    let mut reader = FrameReader::open(path)?;
    let mut all = Vec::with_capacity(reader.count * wmvae::frames::BYTES);
    loop {
        let chunk = reader.read_preprocessed(EVAL_CHUNK_FRAMES)?;
        if chunk.is_empty() {
            break;
        }
        all.extend_from_slice(&chunk);
    }
    ensure!(!all.is_empty(), "{}: no frames", path.display());
    Ok(all)
}

/// Mean held-out losses over every frame of `heldout`.
fn evaluate(learner: &Learner, heldout: &[u8]) -> Result<LossValues> {
    let (mut sum, mut frames) = (
        LossValues {
            total: 0.0,
            recon: 0.0,
            kl: 0.0,
        },
        0usize,
    );
    for chunk in heldout.chunks(EVAL_CHUNK_FRAMES * wmvae::frames::BYTES) {
        let n = chunk.len() / wmvae::frames::BYTES;
        let l = learner.net().evaluate_frames(chunk)?;
        (sum.total, sum.recon, sum.kl) = (
            sum.total + l.total * n as f64,
            sum.recon + l.recon * n as f64,
            sum.kl + l.kl * n as f64,
        );
        frames += n;
    }
    let n = frames as f64;
    Ok(LossValues {
        total: sum.total / n,
        recon: sum.recon / n,
        kl: sum.kl / n,
    })
}

/// Up to [`DIAGNOSTIC_FRAMES`] of `heldout`'s frames, every k-th from the
/// first (k: its frames over that, rounded down): the file's frames in
/// order are episodes, whose neighbours look alike.
fn spread(heldout: &[u8]) -> Vec<u8> {
    let stride = (heldout.len() / wmvae::frames::BYTES / DIAGNOSTIC_FRAMES).max(1);
    let frames = heldout.chunks_exact(wmvae::frames::BYTES).step_by(stride);
    frames.take(DIAGNOSTIC_FRAMES).flatten().copied().collect()
}

/// A point of the curve after `step` steps (`trained`: their wall time):
/// held-out losses on every frame, diagnostics on `spread`'s; and its recon.
fn point(learner: &Learner, step: u64, trained: Duration, heldout: &[u8], spread: &[u8]) -> Result<(Value, f64)> {
    let l = evaluate(learner, heldout)?;
    let d = learner.net().diagnostics(spread)?;
    let point = json!({ "step": step, "seconds": trained.as_secs_f64(), "eval_recon": l.recon, "eval_kl": l.kl,
        "active_units": d.active_units, "kl_per_dim": d.kl_per_dim });
    Ok((point, l.recon))
}

pub fn quality(config: &Config, options: &QualityOptions) -> Result<Value> {
    ensure!(options.steps > 0, "--steps must be at least 1");
    let t = &config.train;
    device::set_threads(t.threads);
    let device = config.train.device.resolve()?;
    let (train, heldout) = (read_frames(&options.frames)?, read_frames(&options.heldout)?);
    let count = train.len() / wmvae::frames::BYTES;
    let batch = config.train.batch_size;
    let mut learner = Learner::new(device, config.vae(), config.adam(), config.train.precision);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let every = (options.steps / CURVE_POINTS).max(1);
    let few = spread(&heldout);
    let mut curve = vec![point(&learner, 0, Duration::ZERO, &heldout, &few)?.0];
    let mut steps_to_recon = None;
    let mut trained = Duration::ZERO;
    let mut progress = wmvae::tools::progress::Progress::new("quality", options.steps);
    let mut bytes = vec![0u8; batch * wmvae::frames::BYTES];
    for step in 1..=options.steps {
        let started = Instant::now();
        for slot in bytes.chunks_exact_mut(wmvae::frames::BYTES) {
            let i = rng.gen_range(0..count);
            slot.copy_from_slice(&train[i * wmvae::frames::BYTES..(i + 1) * wmvae::frames::BYTES]);
        }
        learner.train_step_guarded(&bytes, |_| true)?;
        trained += started.elapsed();
        progress.advance(1);
        if step % every == 0 || step == options.steps {
            let (point, recon) = point(&learner, step, trained, &heldout, &few)?;
            if steps_to_recon.is_none() && options.target_recon.is_some_and(|target| recon <= target) {
                steps_to_recon = Some(step);
            }
            curve.push(point);
        }
    }
    Ok(json!({
        "bench": "quality",
        "device": device::describe(device),
        "threads": t.threads,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "train_frames": count,
        "heldout_frames": heldout.len() / wmvae::frames::BYTES,
        "batch_size": batch,
        "learning_rate": t.learning_rate,
        "lr_schedule": t.lr_schedule,
        "precision": t.precision,
        "warmup_steps": t.warmup_steps,
        "decay_steps": t.decay_steps,
        "min_learning_rate": t.min_learning_rate,
        "steps": options.steps,
        "curve": curve,
        "target_recon": options.target_recon,
        "steps_to_recon": steps_to_recon,
    }))
}
