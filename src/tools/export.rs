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
    let (mut n, mut source_width, mut episode_width, mut action_width) = (0usize, 1usize, 1usize, 0usize);
    for frame in store.frames_in_order(source, false) {
        let frame = frame?;
        n += 1;
        source_width = source_width.max(frame.source.chars().count());
        episode_width = episode_width.max(frame.episode.chars().count());
        action_width = action_width.max(frame.action.as_ref().map_or(0, Vec::len));
    }
    let mut npz = NpzWriter::create(out)?;

    type Column<'a> = (&'a str, String, Vec<usize>, Box<dyn Fn(&Frame) -> Vec<u8> + 'a>, bool);
    let columns: Vec<Column> = vec![
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
    ];
    let mut progress = crate::tools::progress::Progress::new("export", (n * columns.len()) as u64);
    for (name, descr, shape, encode, with_pixels) in &columns {
        let array = npz.array(name, descr, shape)?;
        for frame in store.frames_in_order(source, *with_pixels) {
            let frame = frame?;
            if *with_pixels {
                debug_assert_eq!(frame.pixels.len(), frames::BYTES);
            }
            array.write_all(&encode(&frame))?;
            progress.advance(1);
        }
    }
    npz.finish()?;
    Ok(ExportSummary {
        frames: n,
        action_width,
    })
}
