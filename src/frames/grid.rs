//! Picture grids: rows of 64x64 RGB frames side by side, as PNG bytes. For
//! `checkpoint show --recon` and the status page. Pure encoding, no I/O.

use super::{BYTES, SIDE};
use anyhow::{bail, Result};

/// `rows` of frames (each 64x64x3 HWC bytes, concatenated), `columns` per
/// row (shorter rows are padded black), as one PNG.
pub fn png_grid(rows: &[&[u8]], columns: usize) -> Result<Vec<u8>> {
    if columns == 0 || rows.is_empty() {
        bail!("an empty grid");
    }
    let (width, height) = (columns * SIDE, rows.len() * SIDE);
    let mut canvas = vec![0u8; width * height * 3];
    for (r, frames) in rows.iter().enumerate() {
        for (c, frame) in frames.chunks_exact(BYTES).take(columns).enumerate() {
            for y in 0..SIDE {
                let dst = ((r * SIDE + y) * width + c * SIDE) * 3;
                canvas[dst..dst + SIDE * 3].copy_from_slice(&frame[y * SIDE * 3..(y + 1) * SIDE * 3]);
            }
        }
    }
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.write_header()?.write_image_data(&canvas)?;
    }
    Ok(png_bytes)
}
