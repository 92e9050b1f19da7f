//! `wmvae buffer export`: the stored frames in (source, episode, step) order
//! as an `.npz` that numpy and an offline memory-model trainer read:
//! `frames` (uint8, N x 64 x 64 x 3, as stored after preprocessing),
//! `source`, `episode` (unicode), `step` (uint64), `action` (float32,
//! N x A, NaN-padded), `reward` (float64, NaN if absent), `done` (bool).
//!
//! Streams: one pass over the store per array, so memory stays at one frame
//! whatever the buffer's size. Reads through `store`; never writes to it.

use crate::frames::Frame;
use crate::frames::{
    self,
    npy::{self, NpzWriter},
};
use crate::store::Store;
use crate::tools::progress::Progress;
use anyhow::Result;
use std::io::Write;
use std::path::Path;

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportSummary {
    pub frames: usize,
    pub action_width: usize,
}

/// Writes the export of `store` (optionally one `source`) to `out`.
pub fn export(store: &Store, source: Option<&str>, out: &Path) -> Result<ExportSummary> {
    // Pass 1: sizes.
    let sizes = Sizes::measure(store, source)?;
    let mut npz = NpzWriter::create(out)?;
    let columns = columns(&sizes);
    let mut progress = Progress::new("export", (sizes.n * columns.len()) as u64);
    for (name, descr, shape, encode, with_pixels) in &columns {
        let array = npz.array(name, descr, shape)?;
        write_column(array, store, source, encode, *with_pixels, &mut progress)?;
    }
    npz.finish()?;
    Ok(ExportSummary {
        frames: sizes.n,
        action_width: sizes.action_width,
    })
}

/// The export's sizes: how many frames, and the widest source, episode and action among them.
struct Sizes {
    n: usize,
    source_width: usize,
    episode_width: usize,
    action_width: usize,
}

impl Sizes {
    /// One pass over the frames (without their pixels) to find the sizes.
    fn measure(store: &Store, source: Option<&str>) -> Result<Sizes> {
        let (mut n, mut source_width, mut episode_width, mut action_width) = (0usize, 1usize, 1usize, 0usize);
        for frame in store.frames_in_order(source, false) {
            let frame = frame?;
            n += 1;
            source_width = source_width.max(frame.source.chars().count());
            episode_width = episode_width.max(frame.episode.chars().count());
            action_width = action_width.max(frame.action.as_ref().map_or(0, Vec::len));
        }
        Ok(Sizes {
            n,
            source_width,
            episode_width,
            action_width,
        })
    }
}

/// One array of the export: its name, numpy dtype, shape, each frame's bytes, and whether it needs the pixels.
type Column = (&'static str, String, Vec<usize>, Box<dyn Fn(&Frame) -> Vec<u8>>, bool);

/// The export's arrays, in the order they are written.
fn columns(sizes: &Sizes) -> Vec<Column> {
    let mut columns = identity_columns(sizes);
    columns.extend(transition_columns(sizes));
    columns
}

/// The pixels and each frame's identity (source, episode, step).
fn identity_columns(sizes: &Sizes) -> Vec<Column> {
    let Sizes {
        n,
        source_width,
        episode_width,
        ..
    } = *sizes;
    vec![
        (
            "frames",
            "|u1".into(),
            vec![n, frames::SIDE, frames::SIDE, 3],
            Box::new(|f: &Frame| f.pixels.to_vec()),
            true,
        ),
        (
            "source",
            format!("<U{source_width}"),
            vec![n],
            Box::new(move |f: &Frame| npy::utf32(&f.source, source_width)),
            false,
        ),
        (
            "episode",
            format!("<U{episode_width}"),
            vec![n],
            Box::new(move |f: &Frame| npy::utf32(&f.episode, episode_width)),
            false,
        ),
        (
            "step",
            "<u8".into(),
            vec![n],
            Box::new(|f: &Frame| f.step.to_le_bytes().to_vec()),
            false,
        ),
    ]
}

/// Each frame's transition: action (NaN-padded to the widest), reward and done.
fn transition_columns(sizes: &Sizes) -> Vec<Column> {
    let Sizes { n, action_width, .. } = *sizes;
    vec![
        (
            "action",
            "<f4".into(),
            vec![n, action_width],
            Box::new(move |f: &Frame| {
                let given = f.action.as_deref().unwrap_or(&[]);
                (0..action_width)
                    .flat_map(|i| given.get(i).copied().unwrap_or(f32::NAN).to_le_bytes())
                    .collect()
            }),
            false,
        ),
        (
            "reward",
            "<f8".into(),
            vec![n],
            Box::new(|f: &Frame| f.reward.unwrap_or(f64::NAN).to_le_bytes().to_vec()),
            false,
        ),
        (
            "done",
            "|b1".into(),
            vec![n],
            Box::new(|f: &Frame| vec![f.done.unwrap_or(false) as u8]),
            false,
        ),
    ]
}

/// Writes one array: a pass over the frames in order, each frame's bytes from `encode`.
fn write_column(
    mut array: impl Write,
    store: &Store,
    source: Option<&str>,
    encode: &dyn Fn(&Frame) -> Vec<u8>,
    with_pixels: bool,
    progress: &mut Progress,
) -> Result<()> {
    for frame in store.frames_in_order(source, with_pixels) {
        let frame = frame?;
        if with_pixels {
            debug_assert_eq!(frame.pixels.len(), frames::BYTES);
        }
        array.write_all(&encode(&frame))?;
        progress.advance(1);
    }
    Ok(())
}
