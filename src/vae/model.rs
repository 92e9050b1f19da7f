//! The World Models convolutional VAE (Ha & Schmidhuber, 2018) on tch.
//!
//! A struct of layers built from an [`nn::Path`] with stable names, so the
//! VarStore's names are exactly PyTorch's `state_dict` keys
//! (`encoder.conv1.weight`, ..., `decoder.deconv4.bias`), plus the free
//! function [`loss`]. Deliberately no I/O and no optimizer: files live in
//! `weights`/`checkpoint`, the update rule in `adam`.

use tch::{nn, Kind, Tensor};

/// Side of the square frames the model sees.
pub const IMAGE_SIZE: i64 = crate::frames::SIDE as i64;
/// Colour channels (RGB).
pub const CHANNELS: i64 = crate::frames::CHANNELS as i64;
/// Width of the flattened encoder output: 256 channels x 2 x 2.
const ENCODED_WIDTH: i64 = 1024;
/// deconv1 maps those 1024 channels at 1x1 to 128 channels at 5x5.
const DECONV1_CHANNELS: i64 = 128;
const DECONV1_KERNEL: i64 = 5;
/// Every conv and transposed conv: stride 2, no padding.
const STRIDE: i64 = 2;

/// The arithmetic of a forward pass (and so of its backward). The weights,
/// Adam's state and the loss stay float32 either way: in bf16 the layers
/// compute on bf16 copies of the float32 weights (autograd carries the
/// gradients back to them), and their outputs return to float32 before the
/// reparameterisation and the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    fn kind(self) -> Kind {
        match self {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

/// Shape hyper-parameters of the VAE: the config's `[model]` section.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeConfig {
    /// Latent size (32 in World Models).
    pub z_size: i64,
    /// Free bits: the KL term is floored at `kl_tolerance * z_size` nats per image.
    pub kl_tolerance: f64,
}

impl VaeConfig {
    /// Checks the bounds, naming the config's keys (`[model]`).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.z_size < 1 {
            anyhow::bail!("model.z_size must be at least 1");
        }
        if !(0.0..=1e4).contains(&self.kl_tolerance) {
            anyhow::bail!("model.kl_tolerance must be in [0, 10000]");
        }
        Ok(())
    }
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            z_size: 32,
            kl_tolerance: 0.5,
        }
    }
}

/// Encoder: 4 stride-2 convs (32, 64, 128, 256 filters, kernel 4) and two heads.
/// Decoder: linear to 1024, then 4 stride-2 transposed convs back to 3x64x64.
#[derive(Debug)]
pub struct Vae {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    conv3: nn::Conv2D,
    conv4: nn::Conv2D,
    fc_mu: nn::Linear,
    fc_logvar: nn::Linear,
    fc: nn::Linear,
    deconv1: nn::ConvTranspose2D,
    deconv2: nn::ConvTranspose2D,
    deconv3: nn::ConvTranspose2D,
    deconv4: nn::ConvTranspose2D,
    config: VaeConfig,
}

/// What one forward pass returns.
#[derive(Debug)]
pub struct VaeOutput {
    /// Reconstruction, N x 3 x 64 x 64 in [0, 1].
    pub recon: Tensor,
    pub mu: Tensor,
    pub logvar: Tensor,
}

/// The three numbers every report carries, batch means per image.
#[derive(Debug)]
pub struct Loss {
    /// Optimised objective: `recon + max(kl, kl_tolerance * z_size)` (per-image floor).
    pub total: Tensor,
    /// Sum over pixels of squared error.
    pub recon: Tensor,
    /// Raw KL to N(0, 1), before the free-bits floor (so collapse stays visible).
    pub kl: Tensor,
}

fn conv(path: nn::Path, c_in: i64, c_out: i64) -> nn::Conv2D {
    let config = nn::ConvConfig {
        stride: STRIDE,
        ..Default::default()
    };
    nn::conv2d(path, c_in, c_out, 4, config)
}

fn deconv(path: nn::Path, c_in: i64, c_out: i64, kernel: i64) -> nn::ConvTranspose2D {
    let config = nn::ConvTransposeConfig {
        stride: STRIDE,
        ..Default::default()
    };
    nn::conv_transpose2d(path, c_in, c_out, kernel, config)
}

/// A layer's weight and bias in `kind` (the very tensors when already so).
fn in_kind(ws: &Tensor, bs: &Option<Tensor>, kind: Kind) -> (Tensor, Option<Tensor>) {
    (ws.to_kind(kind), bs.as_ref().map(|b| b.to_kind(kind)))
}

/// `layer` (built by [`conv`]) on `x`, computed in `kind`.
fn conv_in(x: &Tensor, layer: &nn::Conv2D, kind: Kind) -> Tensor {
    let (ws, bs) = in_kind(&layer.ws, &layer.bs, kind);
    x.conv2d(&ws, bs.as_ref(), [STRIDE; 2], [0; 2], [1; 2], 1)
}

/// `layer` (built by [`deconv`]) on `x`, computed in `kind`.
fn deconv_in(x: &Tensor, layer: &nn::ConvTranspose2D, kind: Kind) -> Tensor {
    let (ws, bs) = in_kind(&layer.ws, &layer.bs, kind);
    x.conv_transpose2d(&ws, bs.as_ref(), [STRIDE; 2], [0; 2], [0; 2], 1, [1; 2])
}

fn linear_in(x: &Tensor, layer: &nn::Linear, kind: Kind) -> Tensor {
    let (ws, bs) = in_kind(&layer.ws, &layer.bs, kind);
    x.linear(&ws, bs.as_ref())
}

/// `deconv1` applied to the N x 1024 output of `decoder.fc`, as if it were
/// the N x 1024 x 1 x 1 image PyTorch feeds it. A transposed conv of a 1x1
/// input is a plain matrix product, `out[n, o, i, j] = b[o] + sum_c h[n, c] *
/// W[c, o, i, j]`, and libtorch runs it ~4x faster as one GEMM than through
/// its transposed-conv kernel (84 vs 21 ms forward + backward at batch 100 on
/// the 2-core CPU box; BENCHMARKS.md). Same weights, same names, same result
/// up to float rounding.
fn transposed_conv_of_point(h: &Tensor, layer: &nn::ConvTranspose2D, kind: Kind) -> Tensor {
    let (ws, bs) = in_kind(&layer.ws, &layer.bs, kind);
    let out = h
        .matmul(&ws.view([ENCODED_WIDTH, -1]))
        .view([-1, DECONV1_CHANNELS, DECONV1_KERNEL, DECONV1_KERNEL]);
    match bs {
        Some(bias) => out + bias.view([1, -1, 1, 1]),
        None => out,
    }
}

impl Vae {
    /// Builds the layers under `root` (normally `vs.root()`).
    pub fn new(root: &nn::Path, config: VaeConfig) -> Vae {
        let enc = root / "encoder";
        let dec = root / "decoder";
        Vae {
            conv1: conv(&enc / "conv1", CHANNELS, 32),
            conv2: conv(&enc / "conv2", 32, 64),
            conv3: conv(&enc / "conv3", 64, 128),
            conv4: conv(&enc / "conv4", 128, 256),
            fc_mu: nn::linear(&enc / "fc_mu", ENCODED_WIDTH, config.z_size, Default::default()),
            fc_logvar: nn::linear(&enc / "fc_logvar", ENCODED_WIDTH, config.z_size, Default::default()),
            fc: nn::linear(&dec / "fc", config.z_size, ENCODED_WIDTH, Default::default()),
            deconv1: deconv(&dec / "deconv1", ENCODED_WIDTH, DECONV1_CHANNELS, DECONV1_KERNEL),
            deconv2: deconv(&dec / "deconv2", 128, 64, 5),
            deconv3: deconv(&dec / "deconv3", 64, 32, 6),
            deconv4: deconv(&dec / "deconv4", 32, CHANNELS, 6),
            config,
        }
    }

    pub fn config(&self) -> VaeConfig {
        self.config
    }

    /// N x 3 x 64 x 64 floats in [0, 1] to (mu, logvar), each N x z (float32).
    pub fn encode(&self, xs: &Tensor, precision: Precision) -> (Tensor, Tensor) {
        let kind = precision.kind();
        let h = [&self.conv1, &self.conv2, &self.conv3, &self.conv4]
            .iter()
            .fold(xs.to_kind(kind), |h, layer| conv_in(&h, layer, kind).relu())
            // PyTorch's x.flatten(1): NCHW order whatever the memory format.
            .contiguous()
            .flatten(1, -1);
        (
            linear_in(&h, &self.fc_mu, kind).to_kind(Kind::Float),
            linear_in(&h, &self.fc_logvar, kind).to_kind(Kind::Float),
        )
    }

    /// N x z latents to N x 3 x 64 x 64 reconstructions in [0, 1] (float32).
    pub fn decode(&self, zs: &Tensor, precision: Precision) -> Tensor {
        let kind = precision.kind();
        let h = transposed_conv_of_point(&linear_in(&zs.to_kind(kind), &self.fc, kind), &self.deconv1, kind).relu();
        let h = deconv_in(&h, &self.deconv2, kind).relu();
        let h = deconv_in(&h, &self.deconv3, kind).relu();
        deconv_in(&h, &self.deconv4, kind).sigmoid().to_kind(Kind::Float)
    }

    /// Encode, sample z = mu + exp(logvar / 2) * eps with eps ~ N(0, 1) when
    /// `train` (z = mu otherwise), decode.
    pub fn forward_t(&self, xs: &Tensor, train: bool, precision: Precision) -> VaeOutput {
        let (mu, logvar) = self.encode(xs, precision);
        let z = if train {
            &mu + (&logvar * 0.5).exp() * mu.randn_like()
        } else {
            mu.shallow_clone()
        };
        VaeOutput {
            recon: self.decode(&z, precision),
            mu,
            logvar,
        }
    }
}

/// The World Models VAE loss (the paper's `vae.py`):
///
/// ```text
/// recon = mean_n  sum_{c,h,w} (x - x_hat)^2
/// kl_n  = -0.5 * sum_z (1 + logvar - mu^2 - exp(logvar))
/// total = recon + mean_n max(kl_n, kl_tolerance * z_size)
/// ```
pub fn loss(out: &VaeOutput, xs: &Tensor, config: VaeConfig) -> Loss {
    let recon = (&out.recon - xs)
        .square()
        .sum_dim_intlist([1i64, 2, 3].as_slice(), false, Kind::Float)
        .mean(Kind::Float);
    let kl_per_image = (out.logvar.shallow_clone() + 1.0 - out.mu.square() - out.logvar.exp()).sum_dim_intlist(
        [1i64].as_slice(),
        false,
        Kind::Float,
    ) * -0.5;
    let floor = config.kl_tolerance * config.z_size as f64;
    let kl_floored = kl_per_image.clamp_min(floor).mean(Kind::Float);
    let kl = kl_per_image.mean(Kind::Float);
    Loss {
        total: &recon + kl_floored,
        recon,
        kl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device};

    fn small_model() -> (VarStore, Vae) {
        tch::manual_seed(0);
        let vs = VarStore::new(Device::Cpu);
        let vae = Vae::new(&vs.root(), VaeConfig::default());
        (vs, vae)
    }

    #[test]
    fn shapes_follow_the_paper() {
        let (_vs, vae) = small_model();
        let xs = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let out = vae.forward_t(&xs, true, Precision::Fp32);
        assert_eq!(out.mu.size(), [2, 32]);
        assert_eq!(out.logvar.size(), [2, 32]);
        assert_eq!(out.recon.size(), [2, 3, 64, 64]);
        let (min, max) = (out.recon.min().double_value(&[]), out.recon.max().double_value(&[]));
        assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max));
    }

    #[test]
    fn tensor_names_are_pytorch_state_dict_keys() {
        let (vs, _vae) = small_model();
        let mut names: Vec<(String, Vec<i64>)> = vs.variables().into_iter().map(|(n, t)| (n, t.size())).collect();
        names.sort();
        let expected: Vec<(&str, Vec<i64>)> = vec![
            ("decoder.deconv1.bias", vec![128]),
            ("decoder.deconv1.weight", vec![1024, 128, 5, 5]),
            ("decoder.deconv2.bias", vec![64]),
            ("decoder.deconv2.weight", vec![128, 64, 5, 5]),
            ("decoder.deconv3.bias", vec![32]),
            ("decoder.deconv3.weight", vec![64, 32, 6, 6]),
            ("decoder.deconv4.bias", vec![3]),
            ("decoder.deconv4.weight", vec![32, 3, 6, 6]),
            ("decoder.fc.bias", vec![1024]),
            ("decoder.fc.weight", vec![1024, 32]),
            ("encoder.conv1.bias", vec![32]),
            ("encoder.conv1.weight", vec![32, 3, 4, 4]),
            ("encoder.conv2.bias", vec![64]),
            ("encoder.conv2.weight", vec![64, 32, 4, 4]),
            ("encoder.conv3.bias", vec![128]),
            ("encoder.conv3.weight", vec![128, 64, 4, 4]),
            ("encoder.conv4.bias", vec![256]),
            ("encoder.conv4.weight", vec![256, 128, 4, 4]),
            ("encoder.fc_logvar.bias", vec![32]),
            ("encoder.fc_logvar.weight", vec![32, 1024]),
            ("encoder.fc_mu.bias", vec![32]),
            ("encoder.fc_mu.weight", vec![32, 1024]),
        ];
        let expected: Vec<(String, Vec<i64>)> = expected.into_iter().map(|(n, s)| (n.to_string(), s)).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn kl_of_standard_normal_is_zero_and_floored_to_free_bits() {
        let config = VaeConfig::default();
        let xs = Tensor::zeros([4, 3, 64, 64], (Kind::Float, Device::Cpu));
        let out = VaeOutput {
            recon: xs.shallow_clone(),
            mu: Tensor::zeros([4, 32], (Kind::Float, Device::Cpu)),
            logvar: Tensor::zeros([4, 32], (Kind::Float, Device::Cpu)),
        };
        let l = loss(&out, &xs, config);
        assert_eq!(l.kl.double_value(&[]), 0.0);
        assert_eq!(l.recon.double_value(&[]), 0.0);
        assert_eq!(l.total.double_value(&[]), 16.0);
    }

    #[test]
    fn loss_matches_hand_computed_values() {
        let config = VaeConfig::default();
        // Every pixel off by 0.5: 3*64*64 * 0.25 = 3072 per image.
        let xs = Tensor::zeros([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let recon = Tensor::full([2, 3, 64, 64], 0.5, (Kind::Float, Device::Cpu));
        // mu = 2 in every dim, logvar = 0: KL = 0.5 * 32 * 4 = 64 per image, above the floor.
        let mu = Tensor::full([2, 32], 2.0, (Kind::Float, Device::Cpu));
        let logvar = Tensor::zeros([2, 32], (Kind::Float, Device::Cpu));
        let l = loss(&VaeOutput { recon, mu, logvar }, &xs, config);
        assert_eq!(l.recon.double_value(&[]), 3072.0);
        assert_eq!(l.kl.double_value(&[]), 64.0);
        assert_eq!(l.total.double_value(&[]), 3136.0);
    }

    #[test]
    fn free_bits_floor_applies_per_image() {
        let config = VaeConfig::default();
        let xs = Tensor::zeros([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        // Image 0: KL 64 (mu = 2); image 1: KL 0, floored to 16. Mean floored = 40, raw = 32.
        let mu = Tensor::stack(
            &[
                Tensor::full([32], 2.0, (Kind::Float, Device::Cpu)),
                Tensor::zeros([32], (Kind::Float, Device::Cpu)),
            ],
            0,
        );
        let logvar = Tensor::zeros([2, 32], (Kind::Float, Device::Cpu));
        let l = loss(
            &VaeOutput {
                recon: xs.shallow_clone(),
                mu,
                logvar,
            },
            &xs,
            config,
        );
        assert_eq!(l.kl.double_value(&[]), 32.0);
        assert_eq!(l.total.double_value(&[]), 40.0);
    }
}
