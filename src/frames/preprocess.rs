//! World Models frame preprocessing: uint8 RGB frames (row-major HWC) to the
//! model's 64x64x3.
//!
//! 64x64 frames pass as they are; 96x96 CarRacing frames lose their bottom
//! 12 rows (the dashboard: rows 0..84 are kept) and are resized to 64x64 with
//! PIL's `Image.resize((64, 64), Image.BILINEAR)` algorithm, reproduced in
//! fixed point (antialiased separable filter, horizontal pass first, 22-bit
//! coefficients) so our frames equal PIL's. No I/O, no tensors.

use super as frames;
use anyhow::{bail, Result};
use bytes::Bytes;

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
    let expected = height.checked_mul(width).and_then(|n| n.checked_mul(frames::CHANNELS));
    if height == 0 || width == 0 || expected != Some(pixels.len()) {
        bail!(
            "frame of {height}x{width}x{} needs {expected:?} bytes, got {}",
            frames::CHANNELS,
            pixels.len()
        );
    }
    match (height, width, policy) {
        (frames::SIDE, frames::SIDE, _) => Ok(pixels),
        (CARRACING_SIDE, CARRACING_SIDE, _) => {
            let kept = &pixels[..CARRACING_KEPT_ROWS * width * frames::CHANNELS];
            Ok(CARRACING_RESIZE.resize(kept).into())
        }
        (_, _, Policy::Resize) => Ok(BilinearResize::new(height, width, frames::SIDE, frames::SIDE)
            .resize(&pixels)
            .into()),
        (_, _, Policy::WorldModels) => {
            bail!(
                "frame size {height}x{width} unsupported: expected 64x64 or 96x96 (set preprocess = \"resize\" to \
                accept others)"
            )
        }
    }
}

/// The resize of every CarRacing frame, its filter taps computed once.
static CARRACING_RESIZE: std::sync::LazyLock<BilinearResize> =
    std::sync::LazyLock::new(|| BilinearResize::new(CARRACING_KEPT_ROWS, CARRACING_SIDE, frames::SIDE, frames::SIDE));

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

/// PIL's `clip8`: a fixed-point sum back to a pixel value.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Separable bilinear resize of HWC RGB images from one size to another,
/// as PIL does it (its sums are 32-bit too: weights total 2^22, times 255,
/// stay under 2^31).
struct BilinearResize {
    height: usize,
    width: usize,
    out_w: usize,
    horizontal: Vec<Taps>,
    vertical: Vec<Taps>,
}

impl BilinearResize {
    fn new(height: usize, width: usize, out_h: usize, out_w: usize) -> BilinearResize {
        BilinearResize {
            height,
            width,
            out_w,
            horizontal: bilinear_taps(width, out_w),
            vertical: bilinear_taps(height, out_h),
        }
    }

    /// Resizes one `height` x `width` image. Slices and whole rows, taps
    /// computed once: 133 -> 56-71 us a CarRacing frame here, which counts
    /// at 1,000 frames/s.
    fn resize(&self, src: &[u8]) -> Vec<u8> {
        const ROUNDING: i32 = 1 << (PRECISION_BITS - 1);
        // Horizontal pass: height x out_w, a pixel's three channels together.
        let mid_row_len = self.out_w * frames::CHANNELS;
        let mut mid = vec![0u8; self.height * mid_row_len];
        for (row, mid_row) in src
            .chunks_exact(self.width * frames::CHANNELS)
            .zip(mid.chunks_exact_mut(mid_row_len))
        {
            for (taps, out) in self.horizontal.iter().zip(mid_row.chunks_exact_mut(frames::CHANNELS)) {
                let window = &row[taps.first * frames::CHANNELS..(taps.first + taps.weights.len()) * frames::CHANNELS];
                let mut acc = [ROUNDING; frames::CHANNELS];
                for (pixel, &w) in window.chunks_exact(frames::CHANNELS).zip(&taps.weights) {
                    for (a, &p) in acc.iter_mut().zip(pixel) {
                        *a += p as i32 * w;
                    }
                }
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = clip8(a);
                }
            }
        }
        // Vertical pass: out_h x out_w, a whole row at a time.
        let mut out = vec![0u8; self.vertical.len() * mid_row_len];
        let mut acc = vec![0i32; mid_row_len];
        for (taps, out_row) in self.vertical.iter().zip(out.chunks_exact_mut(mid_row_len)) {
            acc.fill(ROUNDING);
            for (mid_row, &w) in mid[taps.first * mid_row_len..]
                .chunks_exact(mid_row_len)
                .zip(&taps.weights)
            {
                for (a, &p) in acc.iter_mut().zip(mid_row) {
                    *a += p as i32 * w;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_frames_pass_unchanged() {
        let pixels: Vec<u8> = (0..frames::BYTES).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            preprocess(pixels.clone().into(), 64, 64, Policy::WorldModels).unwrap(),
            pixels
        );
    }

    #[test]
    fn uniform_frames_stay_uniform() {
        let pixels = vec![77u8; 96 * 96 * 3];
        let out = preprocess(pixels.into(), 96, 96, Policy::WorldModels).unwrap();
        assert_eq!(out.len(), frames::BYTES);
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
        let err = preprocess(vec![0u8; 10].into(), 64, 64, Policy::WorldModels)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs Some(12288) bytes, got 10"), "{err}");
        let err = preprocess(vec![0u8; 32 * 32 * 3].into(), 32, 32, Policy::WorldModels)
            .unwrap_err()
            .to_string();
        assert!(err.contains("32x32 unsupported"), "{err}");
        assert_eq!(
            preprocess(vec![9u8; 32 * 32 * 3].into(), 32, 32, Policy::Resize)
                .unwrap()
                .len(),
            frames::BYTES
        );
        assert!(preprocess(Bytes::new(), 0, 0, Policy::Resize).is_err());
    }
}
