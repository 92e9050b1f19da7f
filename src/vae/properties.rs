//! What World Models asks of V, shown per version (besides the
//! reconstructions, `Network::recon_png`): decoding latents back to frames,
//! samples from the prior with fixed noise (the same draws for every
//! version, so a strip across versions shows learning), interpolation
//! between two frames, and latent diagnostics (per-dimension KL to the
//! prior and active units, Burda et al. 2016).
//!
//! Frames and latents in and out as plain numbers and bytes; no I/O, no
//! choice of which frames to show (the caller's).

use super::learner::{frames_to_tensor, Network};
use super::model::Precision;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Draws from the prior shown for every version.
pub const PRIOR_DRAWS: usize = 8;
/// The seed of those draws: fixed, so every version decodes the same noise.
const PRIOR_SEED: u64 = 2018;
/// Frames of an interpolation, both ends included.
pub const INTERPOLATION_STEPS: usize = 8;
/// Held-out frames a version's [`Diagnostics`] are computed on, at most:
/// one encoder pass over them (no decoder, no gradient) costs about one
/// training step of the default batch on a CPU (~0.12 s at 2,100 images/s
/// against ~0.17 s a step, BENCHMARKS.md), once per checkpoint (every 1,000
/// steps by default): ~0.1 % of training. And a variance over 256 draws is
/// within ~10 % of the split's, close enough to count dimensions against a
/// 0.01 threshold.
pub const DIAGNOSTIC_FRAMES: usize = 256;
/// A latent dimension is active when its posterior mean varies across
/// held-out frames by more than this (variance, Burda et al.'s threshold).
pub const ACTIVE_UNIT_VARIANCE: f64 = 0.01;

/// How a version uses its latent space, on held-out frames.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Diagnostics {
    /// Mean KL(q(z_j | x) || N(0, 1)) per dimension, nats.
    pub kl_per_dim: Vec<f64>,
    /// Dimensions whose posterior mean's variance across frames exceeds
    /// [`ACTIVE_UNIT_VARIANCE`].
    pub active_units: u32,
}

/// [`PRIOR_DRAWS`] fixed draws from N(0, I) of `z_size` dimensions
/// (row-major): the same numbers on every machine and for every version.
pub fn prior_draws(z_size: usize) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(PRIOR_SEED);
    // Box-Muller: two uniforms to one standard normal (enough for pictures).
    (0..PRIOR_DRAWS * z_size)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

impl Network {
    /// Decoded frames of latents `z` (N x z_size, row-major), as float32
    /// HWC in [0, 1] (N x 64 x 64 x 3): what the decoder computes, for
    /// parity with PyTorch.
    pub fn decode_floats(&self, z: &[f32]) -> Result<Vec<f32>> {
        Ok(Vec::try_from(self.decoded(z)?.flatten(0, -1))?)
    }

    /// Decoded frames of latents `z` as uint8 HWC (N x 64 x 64 x 3), each
    /// value rounded from [0, 1] x 255.
    pub fn decode_frames(&self, z: &[f32]) -> Result<Vec<u8>> {
        let bytes = (self.decoded(z)? * 255.0)
            .round()
            .clamp(0.0, 255.0)
            .to_kind(Kind::Uint8);
        Ok(Vec::try_from(bytes.flatten(0, -1))?)
    }

    /// The decoder's output for `z`, NHWC float on the CPU.
    fn decoded(&self, z: &[f32]) -> Result<Tensor> {
        let z_size = self.model().config().z_size as usize;
        if z.is_empty() || z.len() % z_size != 0 {
            bail!("{} numbers are not whole latents of {z_size}", z.len());
        }
        let zs = Tensor::from_slice(z)
            .view([(z.len() / z_size) as i64, z_size as i64])
            .to_device(self.device());
        let frames = tch::no_grad(|| self.model().decode(&zs, Precision::Fp32));
        Ok(frames.permute([0, 2, 3, 1]).contiguous().to_device(Device::Cpu))
    }

    /// The [`prior_draws`] decoded: a row of uint8 frames.
    pub fn prior_samples(&self) -> Result<Vec<u8>> {
        self.decode_frames(&prior_draws(self.model().config().z_size as usize))
    }

    /// [`INTERPOLATION_STEPS`] frames decoded along the straight line
    /// between the posterior means of frames `a` and `b` (uint8 64x64x3 each).
    pub fn interpolation(&self, a: &[u8], b: &[u8]) -> Result<Vec<u8>> {
        let latents = self.encode_frames(&[a, b].concat())?;
        let (from, to) = (&latents.mu[0], &latents.mu[1]);
        let last = (INTERPOLATION_STEPS - 1) as f32;
        let z: Vec<f32> = (0..INTERPOLATION_STEPS)
            .flat_map(|i| {
                let t = i as f32 / last;
                from.iter().zip(to).map(move |(x, y)| x + t * (y - x))
            })
            .collect();
        self.decode_frames(&z)
    }

    /// [`Diagnostics`] of this version on uint8 `frames`.
    pub fn diagnostics(&self, frames: &[u8]) -> Result<Diagnostics> {
        let (mu, logvar) = self.encode(&frames_to_tensor(frames, self.device())?);
        let (mu, logvar) = (mu.to_kind(Kind::Double), logvar.to_kind(Kind::Double));
        // KL of each dimension: 0.5 (mu^2 + exp(logvar) - 1 - logvar), averaged over frames.
        let kl = ((&mu * &mu + logvar.exp() - 1.0 - &logvar) * 0.5).mean_dim(0, false, Kind::Double);
        let kl_per_dim = Vec::<f64>::try_from(kl.to_device(Device::Cpu))?;
        let variance = mu.var_dim(0, false, false);
        let active = variance.gt(ACTIVE_UNIT_VARIANCE).sum(Kind::Int64).int64_value(&[]);
        Ok(Diagnostics {
            kl_per_dim,
            active_units: active as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vae::model::VaeConfig;

    fn net() -> Network {
        tch::manual_seed(0);
        Network::new(
            Device::Cpu,
            VaeConfig {
                z_size: 32,
                kl_tolerance: 0.5,
            },
        )
    }

    #[test]
    fn prior_draws_are_fixed_and_look_normal() {
        let (a, b) = (prior_draws(32), prior_draws(32));
        assert_eq!(a, b);
        assert_eq!(a.len(), PRIOR_DRAWS * 32);
        let mean = a.iter().map(|&x| x as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.2 && (0.7..1.3).contains(&var), "mean {mean}, var {var}");
    }

    #[test]
    fn decoding_gives_frames_and_bytes_agree_with_floats() {
        let net = net();
        let z = prior_draws(32);
        let floats = net.decode_floats(&z).unwrap();
        let bytes = net.decode_frames(&z).unwrap();
        assert_eq!((floats.len(), bytes.len()), (PRIOR_DRAWS * 12288, PRIOR_DRAWS * 12288));
        // libtorch rounds halves to even (f.round() sends 0.5 up: one run in
        // some drew a value at exactly n + 0.5 and failed).
        assert!(floats
            .iter()
            .zip(&bytes)
            .all(|(f, &b)| ((f * 255.0).round_ties_even().clamp(0.0, 255.0) - b as f32).abs() <= 0.5));
        assert!(net.decode_frames(&z[..31]).is_err());
        assert_eq!(net.prior_samples().unwrap(), bytes);
    }

    #[test]
    fn interpolation_runs_from_one_frame_to_the_other() {
        let net = net();
        let (a, b) = (vec![10u8; 12288], vec![240u8; 12288]);
        let path = net.interpolation(&a, &b).unwrap();
        assert_eq!(path.len(), INTERPOLATION_STEPS * 12288);
        let ends = net.encode_frames(&[a, b].concat()).unwrap();
        let first = net.decode_frames(&ends.mu[0]).unwrap();
        assert_eq!(&path[..12288], &first[..]);
    }

    #[test]
    fn diagnostics_count_dimensions() {
        let net = net();
        let frames: Vec<u8> = (0..16 * 12288)
            .map(|i| ((i * 7 + i / 12288 * 31) % 256) as u8)
            .collect();
        let d = net.diagnostics(&frames).unwrap();
        assert_eq!(d.kl_per_dim.len(), 32);
        assert!(d.kl_per_dim.iter().all(|k| k.is_finite() && *k >= 0.0));
        assert!(d.active_units <= 32);
    }
}
