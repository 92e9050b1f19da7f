//! `wmvae encode`: frames from an `.npy` file to latents in an `.npz`, with
//! the weights of a `.safetensors` file, in chunks of bounded size.
//!
//! File formats only; the model math is `vae::learner::Network`'s.

use crate::frames::npy::{FrameReader, NpzWriter};
use crate::vae::device::DeviceChoice;
use crate::vae::learner::Network;
use crate::vae::model::VaeConfig;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

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
pub fn net_from_weights(path: &Path, device: DeviceChoice, vae: VaeConfig) -> Result<Network> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Network::from_safetensors(device.resolve()?, vae, &bytes, &path.display().to_string())
}

/// Encodes every frame of `input` and writes `mu` and `logvar` (float32,
/// N x z) to `output`.
pub fn encode_file(net: &Network, input: &Path, output: &Path) -> Result<EncodeReport> {
    let mut reader = FrameReader::open(input)?;
    let (height, width) = (reader.height, reader.width);
    let (mut mu, mut logvar) = (Vec::<f32>::new(), Vec::<f32>::new());
    let mut done = 0usize;
    let mut progress = crate::tools::progress::Progress::new("encode", reader.count as u64);
    loop {
        let frames = reader.read_preprocessed(ENCODE_CHUNK_FRAMES)?;
        if frames.is_empty() {
            break;
        }
        let latents = net.encode_frames(&frames)?;
        mu.extend(latents.mu.into_iter().flatten());
        logvar.extend(latents.logvar.into_iter().flatten());
        done += frames.len() / crate::frames::BYTES;
        progress.advance((frames.len() / crate::frames::BYTES) as u64);
    }
    let z = net.model().config().z_size as usize;
    let mut npz = NpzWriter::create(output)?;
    for (name, values) in [("mu", &mu), ("logvar", &logvar)] {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        npz.array(name, "<f4", &[done, z])?.write_all(&bytes)?;
    }
    npz.finish()?;
    Ok(EncodeReport {
        frames: done,
        input_height: height,
        input_width: width,
    })
}
