//! `wmvae encode`: frames from an `.npy` file to latents in an `.npz`, with
//! the weights of a `.safetensors` file, in chunks of bounded size.
//!
//! File formats only; the model math is `learner::Inference`'s.

use crate::device::DeviceChoice;
use crate::learner::{frames_to_tensor, Inference};
use crate::model::VaeConfig;
use crate::npy::FrameReader;
use crate::preprocess::{self, Policy};
use crate::weights;
use anyhow::{Context, Result};
use bytes::Bytes;
use std::path::Path;
use tch::{Kind, Tensor};

/// Frames encoded at once: bounds memory (256 x 12 KB in, ~20 MB of
/// activations) whatever the file's length.
pub const ENCODE_CHUNK_FRAMES: usize = 256;

/// Summary of one `wmvae encode` run.
#[derive(Debug)]
pub struct EncodeReport {
    pub frames: usize,
    pub input_height: usize,
    pub input_width: usize,
}

/// The network holding the weights of a `.safetensors` file.
pub fn net_from_weights(path: &Path, device: DeviceChoice, vae: VaeConfig) -> Result<Inference> {
    let named = weights::read_file(path)?;
    let mut net = Inference::new(device.resolve()?, vae);
    net.load_weights(&named, &path.display().to_string())?;
    Ok(net)
}

/// Encodes every frame of `input` and writes `mu` and `logvar` (float32,
/// N x z) to `output`.
pub fn encode_file(net: &Inference, input: &Path, output: &Path) -> Result<EncodeReport> {
    let mut reader = FrameReader::open(input)?;
    let (height, width) = (reader.height, reader.width);
    let mut mus = Vec::new();
    let mut logvars = Vec::new();
    let mut done = 0usize;
    let mut progress = crate::progress::Progress::new("encode", reader.count as u64);
    loop {
        let chunk = reader.read_chunk(ENCODE_CHUNK_FRAMES)?;
        if chunk.is_empty() {
            break;
        }
        let mut frames = Vec::with_capacity(chunk.len() / reader.frame_bytes() * preprocess::OUT_BYTES);
        for (i, frame) in chunk.chunks_exact(reader.frame_bytes()).enumerate() {
            let pixels = preprocess::preprocess(Bytes::copy_from_slice(frame), height, width, Policy::WorldModels)
                .with_context(|| format!("{}: frame {}", input.display(), done + i))?;
            frames.extend_from_slice(&pixels);
        }
        let xs = frames_to_tensor(&frames, net.device())?;
        let (mu, logvar) = net.encode(&xs);
        mus.push(mu.to_device(tch::Device::Cpu));
        logvars.push(logvar.to_device(tch::Device::Cpu));
        done += chunk.len() / reader.frame_bytes();
        progress.advance((chunk.len() / reader.frame_bytes()) as u64);
    }
    let z = net.model().config().z_size;
    let stack = |parts: &[Tensor]| if parts.is_empty() { Tensor::zeros([0, z], (Kind::Float, tch::Device::Cpu)) } else { Tensor::cat(parts, 0) };
    Tensor::write_npz(&[("mu", stack(&mus)), ("logvar", stack(&logvars))], output)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(EncodeReport { frames: done, input_height: height, input_width: width })
}
