//! `wmvae bench train|encode`: measured figures, never asserted by tests.
//!
//! Each bench warms up, then times whole steps and reports images/s as one
//! JSON object (`--json`) or a line of text. Inputs are random frames: speed
//! does not depend on pixel content. BENCHMARKS.md records the figures.

use crate::adam::AdamConfig;
use crate::device::{describe, DeviceChoice};
use crate::learner::{frames_to_tensor, Learner};
use crate::model::VaeConfig;
use anyhow::Result;
use serde_json::{json, Value};
use std::time::Instant;
use tch::Tensor;

/// Untimed steps first: libtorch picks kernels and allocates on the first few.
const WARMUP_STEPS: usize = 3;

/// Common knobs of the benches.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub device: DeviceChoice,
    pub steps: usize,
    /// libtorch intra-op threads; 0 keeps libtorch's default.
    pub threads: usize,
}

fn random_frames(batch: usize, device: tch::Device) -> Result<Tensor> {
    let bytes: Vec<u8> = (0..batch * 64 * 64 * 3).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    frames_to_tensor(&bytes, device)
}

fn apply_threads(threads: usize) {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
}

/// Images per second of `step`, run `steps` times after the warm-up. Each
/// step must end by reading a value back, which synchronises CUDA.
fn images_per_s(batch: usize, steps: usize, mut step: impl FnMut()) -> f64 {
    for _ in 0..WARMUP_STEPS {
        step();
    }
    let start = Instant::now();
    for _ in 0..steps {
        step();
    }
    (batch * steps) as f64 / start.elapsed().as_secs_f64()
}

/// Full training steps (forward, loss, backward, Adam) at batch `batch`.
pub fn train(options: BenchOptions, batch: usize) -> Result<Value> {
    apply_threads(options.threads);
    let device = options.device.resolve()?;
    let mut learner = Learner::new(device, VaeConfig::default(), AdamConfig::default());
    let xs = random_frames(batch, device)?;
    let first_loss = learner.train_step(&xs).total;
    let mut last_loss = first_loss;
    let rate = images_per_s(batch, options.steps, || {
        last_loss = learner.train_step(&xs).total;
    });
    Ok(json!({
        "bench": "train",
        "device": describe(device),
        "batch": batch,
        "steps": options.steps,
        "threads": tch::get_num_threads(),
        "train_images_per_s": rate,
        // A smoke check for new devices: the loss must fall on a fixed batch.
        "first_loss": first_loss,
        "last_loss": last_loss,
    }))
}

/// Encoding (mu, logvar) without gradient, at batch 1 and batch 256.
pub fn encode(options: BenchOptions) -> Result<Value> {
    apply_threads(options.threads);
    let device = options.device.resolve()?;
    let learner = Learner::new(device, VaeConfig::default(), AdamConfig::default());
    let mut rates = serde_json::Map::new();
    for batch in [1usize, 256] {
        let xs = random_frames(batch, device)?;
        // Batch 1 is latency-bound: give it as many images as batch 256 gets.
        let steps = if batch == 1 { options.steps * 256 } else { options.steps };
        let rate = images_per_s(batch, steps, || {
            let (mu, _) = learner.encode(&xs);
            mu.sum(tch::Kind::Float).double_value(&[]);
        });
        rates.insert(batch.to_string(), json!(rate));
    }
    Ok(json!({
        "bench": "encode",
        "device": describe(device),
        "steps": options.steps,
        "threads": tch::get_num_threads(),
        "encode_images_per_s": rates,
    }))
}
