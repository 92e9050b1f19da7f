//! Rewrites the buffer of a store written by an older wmvae into this
//! build's layout, in place, when the store is opened. It knows the old
//! layouts and nothing else; checkpoints read old layouts as they are
//! (`checkpoints.rs`) and need no rewrite.
//!
//! Schemas 1 and 2 held one frame a value (`F` split seq, pixels zlib) and
//! one index entry a step (`K` source 0 episode 0 step -> split, seq);
//! schema 3 holds chunks (`C`, pixels LZ4) and index blocks (`I`). Each
//! step below is one atomic batch that moves a bounded number of entries
//! from the old keys to the new, so an upgrade cut short by a crash resumes
//! where it stopped.

use super::layout::{
    be_u64, chunk_key, encode_chunk, encode_index_block, index_block_key_under, IndexBlock, StoredFrame, CHUNK_FRAMES,
};
use super::{Split, Store};
use crate::frames;
use anyhow::{ensure, Context, Result};
use std::borrow::Cow;
use std::collections::{btree_map, BTreeMap};
use std::io::Read;

/// Old entries moved per atomic batch: bounds the upgrade's memory.
const ENTRIES_PER_BATCH: usize = 1_024;

/// Moves every old-layout frame and index entry to the new layout.
pub(super) fn frames_and_index(store: &Store) -> Result<()> {
    while frames_to_chunks(store)? {}
    while index_to_blocks(store)? {}
    Ok(())
}

/// Moves up to [`ENTRIES_PER_BATCH`] old frames into chunks of consecutive
/// seqs; false when none was left.
fn frames_to_chunks(store: &Store) -> Result<bool> {
    let old: Vec<(sled::IVec, sled::IVec)> = store
        .tree
        .scan_prefix(b"F")
        .take(ENTRIES_PER_BATCH)
        .collect::<Result<_, _>>()?;
    let mut batch = sled::Batch::default();
    // The chunk being filled: its split, first seq and frames.
    let mut chunk: Option<(Split, u64, Vec<StoredFrame>)> = None;
    for (key, value) in &old {
        ensure!(key.len() == 10, "corrupt frame key in a schema 2 store");
        let split = Split::from_byte(key[1]).context("corrupt frame key in a schema 2 store")?;
        let seq = be_u64(&key[2..])?;
        let mut frame: StoredFrame =
            rmp_serde::from_slice(value).context("corrupt stored frame in a schema 2 store")?;
        frame.zpixels = Cow::Owned(lz4_flex::block::compress(&unzlib(&frame.zpixels)?));
        match &mut chunk {
            Some((s, first, frames))
                if *s == split && *first + frames.len() as u64 == seq && frames.len() < CHUNK_FRAMES =>
            {
                frames.push(frame)
            }
            _ => {
                if let Some((s, first, frames)) = chunk.replace((split, seq, vec![frame])) {
                    batch.insert(chunk_key(s, first), encode_chunk(&frames)?);
                }
            }
        }
        batch.remove(key);
    }
    if let Some((s, first, frames)) = chunk {
        batch.insert(chunk_key(s, first), encode_chunk(&frames)?);
    }
    store.tree.apply_batch(batch)?;
    Ok(!old.is_empty())
}

/// Moves up to [`ENTRIES_PER_BATCH`] old index entries into index blocks
/// (merged with blocks an interrupted upgrade wrote); false when none was
/// left.
fn index_to_blocks(store: &Store) -> Result<bool> {
    let old: Vec<(sled::IVec, sled::IVec)> = store
        .tree
        .scan_prefix(b"K")
        .take(ENTRIES_PER_BATCH)
        .collect::<Result<_, _>>()?;
    let mut batch = sled::Batch::default();
    let mut blocks: BTreeMap<Vec<u8>, IndexBlock> = BTreeMap::new();
    for (key, value) in &old {
        ensure!(
            key.len() > 9 && value.len() == 9,
            "corrupt index entry in a schema 2 store"
        );
        let (name, step) = key.split_at(key.len() - 8);
        // `name` is `K` source 0 episode 0: the new key keeps it, under `I`.
        let (block_key, offset) = index_block_key_under(&[&name[1..]], be_u64(step)?);
        let location = (
            Split::from_byte(value[0]).context("corrupt index entry in a schema 2 store")?,
            be_u64(&value[1..])?,
        );
        let block = match blocks.entry(block_key) {
            btree_map::Entry::Occupied(held) => held.into_mut(),
            btree_map::Entry::Vacant(slot) => {
                let block = store.read_index_block(slot.key())?;
                slot.insert(block)
            }
        };
        block.insert(offset, location);
        batch.remove(key);
    }
    for (key, block) in &blocks {
        batch.insert(key.as_slice(), encode_index_block(block));
    }
    store.tree.apply_batch(batch)?;
    Ok(!old.is_empty())
}

/// A schema 2 frame's pixels from their zlib stream.
fn unzlib(z: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(frames::BYTES);
    flate2::read::ZlibDecoder::new(z)
        .take(frames::BYTES as u64 + 1)
        .read_to_end(&mut out)
        .context("corrupt frame pixels in a schema 2 store")?;
    ensure!(
        out.len() == frames::BYTES,
        "corrupt frame in a schema 2 store: {} pixel bytes, expected {}",
        out.len(),
        frames::BYTES
    );
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    /// Pixels compressed as schema 2 stored them (zlib level 1).
    pub fn zlib(pixels: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(1));
        z.write_all(pixels).unwrap();
        z.finish().unwrap()
    }
}
