//! `wmvae decode`: latents from an `.npz` array (N x z) to uint8 frames in
//! an `.npy` (N, 64, 64, 3), and optionally a PNG grid of them, with one
//! version's weights, in chunks of bounded size.
//!
//! File formats only; the decoder is `vae::properties`'.

use crate::frames::npy;
use crate::vae::learner::Network;
use anyhow::{bail, Result};
use std::path::Path;

/// Latents decoded at once: bounds the activations (256 frames, ~12 MB of
/// output) whatever the file's length.
pub const DECODE_CHUNK: usize = 256;
/// Frames in a row of the PNG grid.
const GRID_COLUMNS: usize = 16;

/// Decodes array `key` of `input` (float32, N x z_size) and writes the
/// frames to `output`; with `grid`, a PNG of them too. Returns N.
pub fn decode_file(net: &Network, input: &Path, key: &str, output: &Path, grid: Option<&Path>) -> Result<usize> {
    let z_size = net.model().config().z_size as usize;
    let (shape, z) = npy::read_npz_f32(input, key)?;
    if shape.len() != 2 || shape[1] != z_size || shape[0] == 0 {
        bail!(
            "{}: array {key:?} has shape {shape:?}, expected (N, {z_size}) with N >= 1",
            input.display()
        );
    }
    let mut frames = Vec::with_capacity(shape[0] * crate::frames::BYTES);
    let mut progress = crate::tools::progress::Progress::new("decode", shape[0] as u64);
    for chunk in z.chunks(DECODE_CHUNK * z_size) {
        frames.extend(net.decode_frames(chunk)?);
        progress.advance((chunk.len() / z_size) as u64);
    }
    npy::write_frames(output, &frames, crate::frames::SIDE, crate::frames::SIDE)?;
    if let Some(grid) = grid {
        let rows: Vec<&[u8]> = frames.chunks(GRID_COLUMNS * crate::frames::BYTES).collect();
        let columns = shape[0].min(GRID_COLUMNS);
        // The last row may be short: the grid pads it with black.
        std::fs::write(grid, crate::frames::grid::png_grid(&rows, columns)?)?;
    }
    Ok(shape[0])
}
