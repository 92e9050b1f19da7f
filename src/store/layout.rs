//! How the replay buffer lies in sled: the key layout, a stored frame and
//! its chunk codec (MessagePack, pixels LZ4), index blocks, and the train /
//! validation split as a byte. Encoding and decoding only: what is written
//! when is [`super::buffer`]'s business, and nothing here opens sled.

use crate::frames::{self, Frame};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Frames per sled value. sled's cost is per insert and per byte it
/// rewrites: 16 frames a value took a group commit from 47-61 to 21-26 us a
/// frame (sled alone, groups of 512, one flush each). But sled 0.34 does not
/// hold its cache to `cache_capacity` for such values: its LRU evaluates a
/// shard only after 64 accesses to it, and a leaf of 16 values of 16 frames
/// (~600 KB) is accessed rarely, so pages stay resident: 687 MB after
/// 320,000 frames at 16 a value, growing linearly, against 133 MB at one a
/// value, 205 at 2 (232 after 640,000: nearly flat), 352 at 4. Memory must
/// stay bounded, so two frames a value: 20 us a frame in the same sled
/// bench, against 28.6 at one a value.
pub(super) const CHUNK_FRAMES: usize = 2;
/// Steps of one episode per index block (one sled value): dedup reads and
/// writes a block per 64 steps instead of an entry per frame.
pub(super) const INDEX_BLOCK_STEPS: u64 = 64;
/// Bytes of one index record: step offset in the block, split, seq.
pub(super) const INDEX_RECORD_BYTES: usize = 10;
/// Where a frame's episode belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    pub(super) fn byte(self) -> u8 {
        match self {
            Split::Train => 0,
            Split::Validation => 1,
        }
    }
    pub(super) fn from_byte(b: u8) -> Option<Split> {
        match b {
            0 => Some(Split::Train),
            1 => Some(Split::Validation),
            _ => None,
        }
    }
    pub(super) fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

/// A frame as stored: the frame's fields, pixels compressed. Read
/// borrowing from the chunk's bytes, so that finding one frame of a chunk
/// copies no other's pixels.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredFrame<'a> {
    #[serde(borrow)]
    pub(super) source: Cow<'a, str>,
    #[serde(borrow)]
    pub(super) episode: Cow<'a, str>,
    pub(super) step: u64,
    #[serde(borrow, with = "serde_bytes")]
    pub(super) zpixels: Cow<'a, [u8]>,
    pub(super) action: Option<Cow<'a, [f32]>>,
    pub(super) reward: Option<f64>,
    pub(super) done: Option<bool>,
}

impl<'a> StoredFrame<'a> {
    /// `frame` as stored, with its `zpixels`, borrowing both.
    pub(super) fn of(frame: &'a Frame, zpixels: &'a [u8]) -> StoredFrame<'a> {
        StoredFrame {
            source: Cow::Borrowed(&frame.source),
            episode: Cow::Borrowed(&frame.episode),
            step: frame.step,
            zpixels: Cow::Borrowed(zpixels),
            action: frame.action.as_deref().map(Cow::Borrowed),
            reward: frame.reward,
            done: frame.done,
        }
    }

    /// The frame, with its pixels decompressed when `pixels` (else empty).
    pub(super) fn to_frame(&self, pixels: bool) -> Result<Frame> {
        Ok(Frame {
            pixels: if pixels {
                decompress(&self.zpixels)?.into()
            } else {
                Default::default()
            },
            source: self.source.to_string(),
            episode: self.episode.to_string(),
            step: self.step,
            action: self.action.as_ref().map(|a| a.to_vec()),
            reward: self.reward,
            done: self.done,
        })
    }
}

/// Bytes a stored frame takes beside its pixels (field names, strings,
/// action): room reserved so that encoding a chunk allocates once.
pub(super) const STORED_FRAME_OVERHEAD: usize = 256;

/// A chunk's bytes: its frames as one MessagePack array.
pub(super) fn encode_chunk(frames: &[StoredFrame]) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(frames.iter().map(|f| f.zpixels.len() + STORED_FRAME_OVERHEAD).sum());
    frames.serialize(&mut rmp_serde::Serializer::new(&mut bytes).with_struct_map())?;
    Ok(bytes)
}

pub(super) fn decode_chunk(bytes: &[u8]) -> Result<Vec<StoredFrame<'_>>> {
    rmp_serde::from_slice(bytes).context("corrupt stored chunk of frames")
}

/// `read` applied to frame `seq` of the chunk `bytes` that starts at seq
/// `first`; None when the chunk does not hold it.
pub(super) fn read_in_chunk<T>(
    first: u64,
    bytes: &[u8],
    seq: u64,
    read: impl FnOnce(&StoredFrame) -> Result<T>,
) -> Result<Option<T>> {
    let chunk = decode_chunk(bytes)?;
    seq.checked_sub(first)
        .and_then(|i| chunk.get(i as usize))
        .map(read)
        .transpose()
}

/// An index block decoded: step offset in the block -> (split, seq).
pub(super) type IndexBlock = BTreeMap<u8, (Split, u64)>;

pub(super) fn decode_index_block(bytes: &[u8]) -> Result<IndexBlock> {
    ensure!(
        bytes.len() % INDEX_RECORD_BYTES == 0,
        "corrupt index block of {} bytes",
        bytes.len()
    );
    bytes
        .chunks(INDEX_RECORD_BYTES)
        .map(|record| {
            Ok((
                record[0],
                (
                    Split::from_byte(record[1]).context("corrupt index record")?,
                    be_u64(&record[2..])?,
                ),
            ))
        })
        .collect()
}

pub(super) fn encode_index_block(block: &IndexBlock) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(block.len() * INDEX_RECORD_BYTES);
    for (offset, (split, seq)) in block {
        bytes.push(*offset);
        bytes.push(split.byte());
        bytes.extend_from_slice(&seq.to_be_bytes());
    }
    bytes
}

pub(super) fn meta_key(name: &str) -> Vec<u8> {
    [b"M".as_slice(), name.as_bytes()].concat()
}
pub(super) fn chunk_key(split: Split, first_seq: u64) -> Vec<u8> {
    [&[b'C', split.byte()][..], &first_seq.to_be_bytes()].concat()
}
/// The key of the index block holding `step`, and the step's offset in it.
pub(super) fn index_block_key(source: &str, episode: &str, step: u64) -> (Vec<u8>, u8) {
    index_block_key_under(&[source.as_bytes(), b"\0", episode.as_bytes(), b"\0"], step)
}
/// As [`index_block_key`], for an episode named by the parts of
/// `source 0 episode 0` (one allocation: this runs for every frame).
pub(super) fn index_block_key_under(episode_name: &[&[u8]], step: u64) -> (Vec<u8>, u8) {
    let mut key = Vec::with_capacity(1 + episode_name.iter().map(|part| part.len()).sum::<usize>() + 8);
    key.push(b'I');
    episode_name.iter().for_each(|part| key.extend_from_slice(part));
    key.extend_from_slice(&(step / INDEX_BLOCK_STEPS).to_be_bytes());
    (key, (step % INDEX_BLOCK_STEPS) as u8)
}
pub(super) fn episode_key(source: &str, episode: &str) -> Vec<u8> {
    [b"E", source.as_bytes(), b"\0", episode.as_bytes()].concat()
}
pub(super) fn source_key(source: &str) -> Vec<u8> {
    [b"S", source.as_bytes()].concat()
}
pub(super) fn be_u64(bytes: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(
        bytes.try_into().context("corrupt counter in the store")?,
    ))
}

/// A batch's pixels compressed for [`Store::commit`], one entry per frame.
/// Compression touches no sled state, so ingest does it for the next batch
/// while the current one commits.
pub struct Compressed(pub(super) Vec<Vec<u8>>);

/// Compresses every frame's pixels, on the calling thread: at 10-17 us a
/// frame, a 512-frame group takes 5-9 ms, well under the commit it
/// overlaps. (Two scoped threads a group, as zlib needed, bought nothing:
/// `bench ingest` ratio medians 0.445 and 0.494 with them, 5 and 8 runs;
/// 0.448 without, 8 runs.) LZ4 blocks: CarRacing frames shrink ~6x (zlib
/// level 1: ~7x) and decompress in a few us for sampling. Measured here on
/// 1,000 real 64x64 CarRacing frames: zlib-rs level 1 1,653 bytes and 36-38
/// us a frame, zstd level 1 1,359 bytes and 28-34 us, zstd -1 1,422 bytes
/// and 20-27 us, LZ4 2,063 bytes and 15-17 us.
pub fn compress_frames(frames: &[Frame]) -> Compressed {
    Compressed(frames.iter().map(|f| lz4_flex::block::compress(&f.pixels)).collect())
}

/// A frame's pixels from their LZ4 block; an error (never a panic) when
/// the block is corrupt or holds anything but one 64x64x3 frame.
pub(super) fn decompress(z: &[u8]) -> Result<Vec<u8>> {
    let mut out = vec![0; frames::BYTES];
    decompress_into(z, &mut out)?;
    Ok(out)
}

/// As [`decompress`], into `out` (frames::BYTES long).
pub(super) fn decompress_into(z: &[u8], out: &mut [u8]) -> Result<()> {
    let n = lz4_flex::block::decompress_into(z, out).context("corrupt frame pixels")?;
    ensure!(
        n == frames::BYTES,
        "corrupt frame: {n} pixel bytes, expected {}",
        frames::BYTES
    );
    Ok(())
}
