//! The VAE and its optimizer on one device: one training step, evaluation,
//! encoding, reconstruction pictures, and snapshots to and from checkpoint
//! bytes. Frames come in as uint8 bytes (64x64x3 each) and results go out
//! as numbers, bytes and PNGs, so callers never hold a tensor.
//!
//! Used by the trainer, the encoder, the CLI and the benches. Owns tch
//! tensors, so an instance lives on one thread; it does no I/O itself.

use crate::vae::adam::{Adam, AdamConfig};
use crate::vae::checkpoint::{Checkpoint, Metadata};
use crate::vae::model::{loss, Precision, Vae, VaeConfig, CHANNELS, IMAGE_SIZE};
use crate::vae::weights;
use anyhow::{bail, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Losses of one batch, as plain numbers (and as the status JSON's
/// `last_losses` and `eval`: keys `total`, `recon`, `kl`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossValues {
    pub total: f64,
    pub recon: f64,
    pub kl: f64,
}

/// Latents of a batch of frames: a `z_size` row of `mu` and of `logvar` per frame.
pub struct Latents {
    pub mu: Vec<Vec<f32>>,
    pub logvar: Vec<Vec<f32>>,
}

/// The VAE's network on a device, without an optimizer: encode,
/// reconstruct, evaluate, swap weights.
pub struct Network {
    vs: VarStore,
    vae: Vae,
    device: Device,
}

/// The VAE with its optimizer, for training.
pub struct Learner {
    net: Network,
    adam: Adam,
    /// The training step's arithmetic (evaluation and encoding stay float32).
    precision: Precision,
}

/// uint8 frames (N x 64 x 64 x 3, HWC bytes) to the model's N x 3 x 64 x 64
/// floats in [0, 1] on `device`, contiguous NCHW: measured here, that makes
/// batch-1 encoding ~5x faster than channels-last strides, and training no slower.
pub fn frames_to_tensor(frames: &[u8], device: Device) -> Result<Tensor> {
    let per_frame = crate::frames::BYTES;
    if frames.is_empty() || frames.len() % per_frame != 0 {
        bail!("{} bytes are not whole 64x64x3 frames", frames.len());
    }
    let n = (frames.len() / per_frame) as i64;
    let bytes = Tensor::from_slice(frames)
        .view([n, IMAGE_SIZE, IMAGE_SIZE, CHANNELS])
        .to_device(device);
    // One strided pass from the bytes into contiguous floats, then scaled
    // in place: ~2 ms for 256 frames on a CPU, where converting, dividing
    // and making contiguous as three tensors took 9-26 ms (measured with
    // the same libtorch; bit-identical results).
    let mut floats = Tensor::empty([n, CHANNELS, IMAGE_SIZE, IMAGE_SIZE], (Kind::Float, device));
    floats.copy_(&bytes.permute([0, 3, 1, 2]));
    Ok(floats.g_div_scalar_(255.0))
}

/// The three losses as numbers: one copy to the host (one device sync).
fn values(l: &crate::vae::model::Loss) -> LossValues {
    let host = Tensor::stack(&[&l.total, &l.recon, &l.kl], 0)
        .to_kind(Kind::Double)
        .to_device(Device::Cpu);
    let v: Vec<f64> = Vec::try_from(&host).expect("three scalars");
    LossValues {
        total: v[0],
        recon: v[1],
        kl: v[2],
    }
}

impl Network {
    /// Fresh weights (PyTorch-style default init).
    pub fn new(device: Device, vae_config: VaeConfig) -> Network {
        let vs = VarStore::new(device);
        let vae = Vae::new(&vs.root(), vae_config);
        Network { vs, vae, device }
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn model(&self) -> &Vae {
        &self.vae
    }

    /// Fresh architecture holding the weights of safetensors `bytes` (strict
    /// names and shapes); `origin` names the bytes in errors.
    pub fn from_safetensors(device: Device, vae_config: VaeConfig, bytes: &[u8], origin: &str) -> Result<Network> {
        let mut net = Network::new(device, vae_config);
        net.load_safetensors(bytes, origin)?;
        Ok(net)
    }

    /// (mu, logvar) without gradient.
    pub fn encode(&self, xs: &Tensor) -> (Tensor, Tensor) {
        tch::no_grad(|| self.vae.encode(xs, Precision::Fp32))
    }

    /// (mu, logvar) of uint8 frames (N x 64 x 64 x 3), one row per frame.
    pub fn encode_frames(&self, frames: &[u8]) -> Result<Latents> {
        let (mu, logvar) = self.encode(&frames_to_tensor(frames, self.device)?);
        Ok(Latents {
            mu: Vec::try_from(mu.to_device(Device::Cpu))?,
            logvar: Vec::try_from(logvar.to_device(Device::Cpu))?,
        })
    }

    /// Evaluation losses (z = mu, no gradient) of uint8 frames.
    pub fn evaluate_frames(&self, frames: &[u8]) -> Result<LossValues> {
        Ok(self.evaluate(&frames_to_tensor(frames, self.device)?))
    }

    /// A PNG of `frames` (top row) over their reconstructions (bottom row).
    pub fn recon_png(&self, frames: &[u8]) -> Result<Vec<u8>> {
        let recon = self.reconstruct(&frames_to_tensor(frames, self.device)?);
        let bytes = (recon * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8)
            .permute([0, 2, 3, 1])
            .contiguous()
            .flatten(0, -1);
        let recon_bytes = Vec::<u8>::try_from(bytes.to_device(Device::Cpu))?;
        crate::frames::grid::png_grid(&[frames, &recon_bytes], frames.len() / crate::frames::BYTES)
    }

    /// Reconstructions from z = mu, without gradient.
    pub fn reconstruct(&self, xs: &Tensor) -> Tensor {
        tch::no_grad(|| self.vae.forward_t(xs, false, Precision::Fp32).recon)
    }

    /// Loss with z = mu and no gradient, for evaluation.
    pub fn evaluate(&self, xs: &Tensor) -> LossValues {
        tch::no_grad(|| {
            values(&loss(
                &self.vae.forward_t(xs, false, Precision::Fp32),
                xs,
                self.vae.config(),
            ))
        })
    }

    /// The weights as PyTorch-loadable safetensors bytes.
    pub fn weights_bytes(&self) -> Result<Vec<u8>> {
        weights::to_safetensors_bytes(&weights::named_variables(&self.vs))
    }

    /// Loads the weights of safetensors `bytes` (strict names and shapes);
    /// all or nothing. The one way weights get into a model.
    pub fn load_safetensors(&mut self, bytes: &[u8], origin: &str) -> Result<()> {
        weights::load_into(&self.vs, &weights::from_safetensors_bytes(bytes, origin)?, origin)
    }

    /// Loads a checkpoint's weights after checking their sha256.
    pub fn load_checkpoint_weights(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        checkpoint.verify()?;
        self.load_safetensors(
            &checkpoint.weights,
            &format!("checkpoint v{}", checkpoint.metadata.version),
        )
    }
}

impl Learner {
    /// Fresh weights and a fresh optimizer; training steps in `precision`.
    pub fn new(device: Device, vae_config: VaeConfig, adam_config: AdamConfig, precision: Precision) -> Learner {
        let net = Network::new(device, vae_config);
        let adam = Adam::new(&net.vs, adam_config);
        Learner { net, adam, precision }
    }

    /// The network, for inference and weight export.
    pub fn net(&self) -> &Network {
        &self.net
    }

    /// Loads safetensors weights, keeping the optimizer as it is.
    pub fn load_safetensors(&mut self, bytes: &[u8], origin: &str) -> Result<()> {
        self.net.load_safetensors(bytes, origin)
    }

    /// Optimizer steps taken (restored with the optimizer state).
    pub fn steps(&self) -> i64 {
        self.adam.steps()
    }

    /// One step on uint8 frames: forward, loss, backward; the update is
    /// applied only when `accept` says the loss is fit to learn from (the
    /// divergence guard's hook). Returns the losses and whether it applied.
    pub fn train_step_guarded(
        &mut self,
        frames: &[u8],
        accept: impl FnOnce(&LossValues) -> bool,
    ) -> Result<(LossValues, bool)> {
        Ok(self.step(&frames_to_tensor(frames, self.net.device)?, accept))
    }

    fn step(&mut self, xs: &Tensor, accept: impl FnOnce(&LossValues) -> bool) -> (LossValues, bool) {
        let out = self.net.vae.forward_t(xs, true, self.precision);
        let l = loss(&out, xs, self.net.vae.config());
        let v = values(&l);
        if !accept(&v) {
            return (v, false);
        }
        self.adam.minimize(&l.total);
        (v, true)
    }

    /// One full training step: forward, loss, backward, Adam.
    pub fn train_step(&mut self, xs: &Tensor) -> LossValues {
        self.step(xs, |_| true).0
    }

    /// Everything needed to resume: weights, optimizer state, `metadata`
    /// (whose `sha256` is filled in here).
    pub fn snapshot(&self, metadata: Metadata) -> Result<Checkpoint> {
        let optimizer = weights::to_safetensors_bytes(&self.adam.state())?;
        Ok(Checkpoint::new(metadata, self.net.weights_bytes()?, optimizer))
    }

    /// Resumes from a checkpoint (verified first): weights and optimizer
    /// state. Nothing changes if any part is wrong.
    pub fn restore(&mut self, checkpoint: &Checkpoint) -> Result<()> {
        let origin = format!("checkpoint v{}", checkpoint.metadata.version);
        checkpoint.verify()?;
        let state = weights::from_safetensors_bytes(&checkpoint.optimizer, &origin)?;
        let state = self.adam.read_state(&state, &origin)?;
        self.net.load_safetensors(&checkpoint.weights, &origin)?;
        self.adam.set_state(state);
        Ok(())
    }
}
