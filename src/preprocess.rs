//! World Models frame preprocessing: uint8 RGB frames (row-major HWC) to the
//! model's 64x64x3.
//!
//! 64x64 frames pass as they are; 96x96 CarRacing frames lose their bottom
//! 12 rows (the dashboard: rows 0..84 are kept) and are resized to 64x64 with
//! PIL's `Image.resize((64, 64), Image.BILINEAR)` algorithm, reproduced in
//! fixed point (antialiased separable filter, horizontal pass first, 22-bit
//! coefficients) so our frames equal PIL's. No I/O, no tensors.

use anyhow::{bail, Result};
use bytes::Bytes;

/// Output side length.
pub const OUT_SIDE: usize = 64;
/// Bytes of one preprocessed frame.
pub const OUT_BYTES: usize = OUT_SIDE * OUT_SIDE * CHANNELS;
/// RGB only.
pub const CHANNELS: usize = 3;
/// CarRacing's frame side, and the rows kept before resizing.
const CARRACING_SIDE: usize = 96;
const CARRACING_KEPT_ROWS: usize = 84;

/// What to do with sizes other than 64x64 and 96x96.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// 64x64 as is, 96x96 cropped and resized, anything else rejected.
    #[default]
    WorldModels,
    /// As `world_models`, but other sizes are resized (no crop) to 64x64.
    Resize,
}

/// Preprocesses one frame. `pixels` is height*width*3 bytes, row-major HWC;
/// a 64x64 frame comes back as the same buffer, not a copy.
pub fn preprocess(pixels: Bytes, height: usize, width: usize, policy: Policy) -> Result<Bytes> {
    let expected = height.checked_mul(width).and_then(|n| n.checked_mul(CHANNELS));
    if height == 0 || width == 0 || expected != Some(pixels.len()) {
        bail!("frame of {height}x{width}x{CHANNELS} needs {expected:?} bytes, got {}", pixels.len());
    }
    match (height, width, policy) {
        (OUT_SIDE, OUT_SIDE, _) => Ok(pixels),
        (CARRACING_SIDE, CARRACING_SIDE, _) => {
            let kept = &pixels[..CARRACING_KEPT_ROWS * width * CHANNELS];
            Ok(resize_bilinear(kept, CARRACING_KEPT_ROWS, width, OUT_SIDE, OUT_SIDE).into())
        }
        (_, _, Policy::Resize) => Ok(resize_bilinear(&pixels, height, width, OUT_SIDE, OUT_SIDE).into()),
        (_, _, Policy::WorldModels) => {
            bail!("frame size {height}x{width} unsupported: expected 64x64 or 96x96 (set preprocess = \"resize\" to accept others)")
        }
    }
}

/// PIL's fixed-point precision for 8-bit images (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One output pixel's source window and integer weights.
struct Taps {
    first: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` with the bilinear (triangle) filter, then
/// `normalize_coeffs_8bpc`.
fn bilinear_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = filter_scale; // the triangle filter's support is 1
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let first = ((center - support + 0.5) as i64).max(0) as usize;
            let last = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (first..last)
                .map(|x| (1.0 - ((x as f64 - center + 0.5) / filter_scale).abs()).max(0.0))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { 0.0 };
                    let fixed = w * (1u32 << PRECISION_BITS) as f64;
                    (if fixed < 0.0 { fixed - 0.5 } else { fixed + 0.5 }) as i32
                })
                .collect();
            Taps { first, weights }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Separable bilinear resize of an HWC RGB image, as PIL does it.
fn resize_bilinear(src: &[u8], height: usize, width: usize, out_h: usize, out_w: usize) -> Vec<u8> {
    let rounding = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass: height x out_w.
    let horizontal = bilinear_taps(width, out_w);
    let mut mid = vec![0u8; height * out_w * CHANNELS];
    for y in 0..height {
        let row = &src[y * width * CHANNELS..(y + 1) * width * CHANNELS];
        for (x, taps) in horizontal.iter().enumerate() {
            for c in 0..CHANNELS {
                let acc = taps
                    .weights
                    .iter()
                    .enumerate()
                    .fold(rounding, |acc, (k, &w)| acc + row[(taps.first + k) * CHANNELS + c] as i64 * w as i64);
                mid[(y * out_w + x) * CHANNELS + c] = clip8(acc);
            }
        }
    }
    // Vertical pass: out_h x out_w.
    let vertical = bilinear_taps(height, out_h);
    let mut out = vec![0u8; out_h * out_w * CHANNELS];
    for (y, taps) in vertical.iter().enumerate() {
        for i in 0..out_w * CHANNELS {
            let acc = taps
                .weights
                .iter()
                .enumerate()
                .fold(rounding, |acc, (k, &w)| acc + mid[(taps.first + k) * out_w * CHANNELS + i] as i64 * w as i64);
            out[y * out_w * CHANNELS + i] = clip8(acc);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frames_pass_unchanged() {
        let pixels: Vec<u8> = (0..OUT_BYTES).map(|i| (i % 251) as u8).collect();
        assert_eq!(preprocess(pixels.clone().into(), 64, 64, Policy::WorldModels).unwrap(), pixels);
    }

    #[test]
    fn uniform_frames_stay_uniform() {
        let pixels = vec![77u8; 96 * 96 * 3];
        let out = preprocess(pixels.into(), 96, 96, Policy::WorldModels).unwrap();
        assert_eq!(out.len(), OUT_BYTES);
        assert!(out.iter().all(|&p| p == 77));
    }

    #[test]
    fn dashboard_rows_are_cropped() {
        // Rows 84..96 white, the rest black: nothing white may survive.
        let mut pixels = vec![0u8; 96 * 96 * 3];
        pixels[84 * 96 * 3..].fill(255);
        let out = preprocess(pixels.into(), 96, 96, Policy::WorldModels).unwrap();
        assert!(out.iter().all(|&p| p == 0));
    }

    #[test]
    fn wrong_sizes_are_clear_errors() {
        let err = preprocess(vec![0u8; 10].into(), 64, 64, Policy::WorldModels).unwrap_err().to_string();
        assert!(err.contains("needs Some(12288) bytes, got 10"), "{err}");
        let err = preprocess(vec![0u8; 32 * 32 * 3].into(), 32, 32, Policy::WorldModels).unwrap_err().to_string();
        assert!(err.contains("32x32 unsupported"), "{err}");
        assert_eq!(preprocess(vec![9u8; 32 * 32 * 3].into(), 32, 32, Policy::Resize).unwrap().len(), OUT_BYTES);
        assert!(preprocess(Bytes::new(), 0, 0, Policy::Resize).is_err());
    }
}
