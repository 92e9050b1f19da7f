//! The durable, bounded replay buffer in sled. The only module that touches
//! sled.
//!
//! One tree, so that a group of frames, their index entries, evictions and
//! counters commit in one atomic `apply_batch`, followed by one flush (group
//! commit). Keys:
//!
//! | key                                   | value                          |
//! |---------------------------------------|--------------------------------|
//! | `C` split first_seq(u64 BE)           | a chunk: up to [`CHUNK_FRAMES`] stored frames with consecutive seqs from first_seq (MessagePack, pixels LZ4) |
//! | `I` source 0 episode 0 block(u64 BE)  | an index block: a (step offset, split, seq) record per stored step of the episode's steps block*64.. block*64+63: dedup and export order |
//! | `E` source 0 episode                  | frames held of that episode    |
//! | `S` source                            | frames held of that source     |
//! | `M` name                              | schema version, ring bounds, counters |
//!
//! Each split (train, validation) is a ring of consecutive sequence numbers
//! `[tail, head)`, so uniform sampling is O(batch): draw seqs, read the
//! chunk holding each. Episodes go to the validation split by a stable hash
//! of (source, episode). Nothing here knows about NATS or tensors.
//! Checkpoints live in a second tree (`checkpoints.rs`); stores written
//! with an older layout are upgraded at open (`upgrade.rs`).

mod checkpoints;
mod upgrade;
pub use checkpoints::{best_by_eval, HistoryEntry, UnknownVersion};

use crate::preprocess::OUT_BYTES;
use crate::wire::{Frame, Reason};
use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::{hash_map, BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Layout version of the store. A store with a newer one is refused; an
/// older one is upgraded in place. 2: checkpoint envelopes in chunks
/// (`checkpoints.rs`); schema 1's whole envelopes still read the same way.
/// 3: frames in chunks, pixels LZ4, the index in blocks (`upgrade.rs`
/// rewrites the frames and index of older stores).
pub const SCHEMA_VERSION: u64 = 3;
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
const CHUNK_FRAMES: usize = 2;
/// Steps of one episode per index block (one sled value): dedup reads and
/// writes a block per 64 steps instead of an entry per frame.
const INDEX_BLOCK_STEPS: u64 = 64;
/// Bytes of one index record: step offset in the block, split, seq.
const INDEX_RECORD_BYTES: usize = 10;
/// Draws that may find their frame evicted meanwhile (a race with a commit)
/// before sampling gives up and calls the ring corrupt.
const MAX_SAMPLE_MISSES: usize = 1_000;
/// sled's page cache. Its default is 1 GiB; sampling reads are random, so a
/// big cache buys little, and the daemon must stay well inside its memory
/// (sled alone, 20,000 frames in: ~55 MB resident at 32 MB, ~76 at 64).
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// How long opening waits for a store's lock. sled's I/O threads let go of
/// a store a moment after it is closed, so a store just closed (by this
/// process, or by a daemon exiting) can look locked for a few ms.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const LOCK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

/// Where a frame's episode belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Validation,
}

impl Split {
    fn byte(self) -> u8 {
        match self {
            Split::Train => 0,
            Split::Validation => 1,
        }
    }
    fn from_byte(b: u8) -> Option<Split> {
        match b {
            0 => Some(Split::Train),
            1 => Some(Split::Validation),
            _ => None,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }
}

/// Buffer sizing: the config's `[buffer]` section.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Frames held in all; the oldest are evicted first.
    pub capacity: u64,
    /// Fraction of episodes (by hash) kept apart for evaluation.
    pub validation_fraction: f64,
}

impl BufferConfig {
    /// The validation split's share of the capacity (at least one frame
    /// when the fraction is positive); the training split gets the rest.
    fn capacity_of(&self, split: Split) -> u64 {
        let validation = if self.validation_fraction > 0.0 {
            ((self.capacity as f64 * self.validation_fraction).ceil() as u64).clamp(1, self.capacity)
        } else {
            0
        };
        match split {
            Split::Validation => validation,
            Split::Train => self.capacity - validation,
        }
    }

    /// FNV-1a over (source, episode): stable across builds and platforms.
    pub fn split_of(&self, source: &str, episode: &str) -> Split {
        let mut hash: u64 = 0xcbf29ce484222325;
        for b in source.bytes().chain([0]).chain(episode.bytes()) {
            hash = (hash ^ b as u64).wrapping_mul(0x100000001b3);
        }
        if ((hash % 10_000) as f64) < self.validation_fraction * 10_000.0 {
            Split::Validation
        } else {
            Split::Train
        }
    }
}

/// What the buffer holds and has refused, as `wmvae buffer stats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub frames: u64,
    pub train_frames: u64,
    pub validation_frames: u64,
    pub capacity: u64,
    pub episodes: u64,
    pub sources: u64,
    /// Frames ever stored (evicted ones included; duplicates not).
    pub frames_ingested: u64,
    pub duplicates: u64,
    pub evicted: u64,
    pub bytes_on_disk: u64,
    pub rejected: BTreeMap<String, u64>,
}

/// What one group commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Indices (into the committed slice) of the frames newly stored.
    pub stored_indices: Vec<usize>,
    pub duplicates: u64,
    pub evicted: u64,
}

/// A frame as stored: the frame's fields, pixels compressed. Read
/// borrowing from the chunk's bytes, so that finding one frame of a chunk
/// copies no other's pixels.
#[derive(Serialize, Deserialize)]
struct StoredFrame<'a> {
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(borrow)]
    episode: Cow<'a, str>,
    step: u64,
    #[serde(borrow, with = "serde_bytes")]
    zpixels: Cow<'a, [u8]>,
    action: Option<Cow<'a, [f32]>>,
    reward: Option<f64>,
    done: Option<bool>,
}

impl<'a> StoredFrame<'a> {
    /// `frame` as stored, with its `zpixels`, borrowing both.
    fn of(frame: &'a Frame, zpixels: &'a [u8]) -> StoredFrame<'a> {
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
    fn to_frame(&self, pixels: bool) -> Result<Frame> {
        Ok(Frame {
            pixels: if pixels { decompress(&self.zpixels)?.into() } else { Default::default() },
            source: self.source.to_string(),
            episode: self.episode.to_string(),
            step: self.step,
            action: self.action.as_ref().map(|a| a.to_vec()),
            reward: self.reward,
            done: self.done,
            received_at: None,
        })
    }
}

/// Bytes a stored frame takes beside its pixels (field names, strings,
/// action): room reserved so that encoding a chunk allocates once.
const STORED_FRAME_OVERHEAD: usize = 256;

/// A chunk's bytes: its frames as one MessagePack array.
fn encode_chunk(frames: &[StoredFrame]) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(frames.iter().map(|f| f.zpixels.len() + STORED_FRAME_OVERHEAD).sum());
    frames.serialize(&mut rmp_serde::Serializer::new(&mut bytes).with_struct_map())?;
    Ok(bytes)
}

fn decode_chunk(bytes: &[u8]) -> Result<Vec<StoredFrame<'_>>> {
    rmp_serde::from_slice(bytes).context("corrupt stored chunk of frames")
}

/// `read` applied to frame `seq` of the chunk `bytes` that starts at seq
/// `first`; None when the chunk does not hold it.
fn read_in_chunk<T>(first: u64, bytes: &[u8], seq: u64, read: impl FnOnce(&StoredFrame) -> Result<T>) -> Result<Option<T>> {
    let chunk = decode_chunk(bytes)?;
    seq.checked_sub(first).and_then(|i| chunk.get(i as usize)).map(read).transpose()
}

/// An index block decoded: step offset in the block -> (split, seq).
type IndexBlock = BTreeMap<u8, (Split, u64)>;

fn decode_index_block(bytes: &[u8]) -> Result<IndexBlock> {
    ensure!(bytes.len() % INDEX_RECORD_BYTES == 0, "corrupt index block of {} bytes", bytes.len());
    bytes
        .chunks(INDEX_RECORD_BYTES)
        .map(|record| Ok((record[0], (Split::from_byte(record[1]).context("corrupt index record")?, be_u64(&record[2..])?))))
        .collect()
}

fn encode_index_block(block: &IndexBlock) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(block.len() * INDEX_RECORD_BYTES);
    for (offset, (split, seq)) in block {
        bytes.push(*offset);
        bytes.push(split.byte());
        bytes.extend_from_slice(&seq.to_be_bytes());
    }
    bytes
}

/// The counters kept in memory and written with every batch.
#[derive(Debug, Default, Clone)]
struct Counters {
    head: [u64; 2],
    tail: [u64; 2],
    episodes: u64,
    sources: u64,
    ingested: u64,
    duplicates: u64,
    evicted: u64,
    rejected: BTreeMap<Reason, u64>,
}

/// A group commit in the making: its sled batch, the counters it moves to,
/// and the episode and source counts and index blocks it changes (kept here
/// so that later frames of the same group see earlier ones).
struct PendingCommit<'s> {
    store: &'s Store,
    batch: sled::Batch,
    next: Counters,
    counts: HashMap<Vec<u8>, u64>,
    index: HashMap<Vec<u8>, IndexBlock>,
}

impl<'s> PendingCommit<'s> {
    fn new(store: &'s Store, counters: Counters) -> PendingCommit<'s> {
        PendingCommit { store, batch: sled::Batch::default(), next: counters, counts: HashMap::new(), index: HashMap::new() }
    }

    fn index_block(&mut self, key: Vec<u8>) -> Result<&mut IndexBlock> {
        Ok(match self.index.entry(key) {
            hash_map::Entry::Occupied(held) => held.into_mut(),
            hash_map::Entry::Vacant(slot) => {
                let block = self.store.read_index_block(slot.key())?;
                slot.insert(block)
            }
        })
    }

    /// Adjusts a per-episode or per-source frame count by `delta`; returns
    /// the count before and after.
    fn count(&mut self, key: Vec<u8>, delta: i64) -> Result<(u64, u64)> {
        let before = match self.counts.get(&key) {
            Some(n) => *n,
            None => self.store.tree.get(&key)?.map(|v| be_u64(&v)).transpose()?.unwrap_or(0),
        };
        let after = (before as i64 + delta).max(0) as u64;
        self.counts.insert(key, after);
        Ok((before, after))
    }

    /// Gives a new frame the next seq of `split` and indexes it; false (and
    /// nothing changes) when (source, episode, step) is already held.
    fn remember(&mut self, source: &str, episode: &str, step: u64, split: Split) -> Result<bool> {
        let (key, offset) = index_block_key(source, episode, step);
        let seq = self.next.head[split.byte() as usize];
        let block = self.index_block(key)?;
        if block.contains_key(&offset) {
            return Ok(false);
        }
        block.insert(offset, (split, seq));
        self.next.head[split.byte() as usize] += 1;
        if self.count(episode_key(source, episode), 1)?.0 == 0 {
            self.next.episodes += 1;
        }
        if self.count(source_key(source), 1)?.0 == 0 {
            self.next.sources += 1;
        }
        Ok(true)
    }

    /// Drops an evicted frame from the index and the counts.
    fn forget(&mut self, source: &str, episode: &str, step: u64) -> Result<()> {
        let (key, offset) = index_block_key(source, episode, step);
        self.index_block(key)?.remove(&offset);
        if self.count(episode_key(source, episode), -1)?.1 == 0 {
            self.next.episodes -= 1;
        }
        if self.count(source_key(source), -1)?.1 == 0 {
            self.next.sources -= 1;
        }
        Ok(())
    }

    /// Evicts the stored frames `[from, to)` of `split`: forgets each, and
    /// removes every chunk left with no frame at or past `to`.
    fn evict_stored(&mut self, split: Split, from: u64, to: u64) -> Result<()> {
        let mut seq = from;
        while seq < to {
            let (first, bytes) = self.store.chunk_holding(split, seq)?.context("the buffer ring points at a missing frame")?;
            let chunk = decode_chunk(&bytes)?;
            let end = first + chunk.len() as u64;
            ensure!(end > seq, "the buffer ring points at a missing frame (seq {seq})");
            for stored in &chunk[(seq - first) as usize..(end.min(to) - first) as usize] {
                self.forget(&stored.source, &stored.episode, stored.step)?;
            }
            if end <= to {
                self.batch.remove(chunk_key(split, first));
            }
            seq = end.min(to);
        }
        Ok(())
    }

    /// The batch with every count and index block written, and the counters.
    fn finish(mut self) -> (sled::Batch, Counters) {
        for (key, n) in self.counts {
            match n {
                0 => self.batch.remove(key),
                n => self.batch.insert(key, &n.to_be_bytes()),
            }
        }
        for (key, block) in self.index {
            match block.is_empty() {
                true => self.batch.remove(key),
                false => self.batch.insert(key, encode_index_block(&block)),
            }
        }
        (self.batch, self.next)
    }
}

/// The replay buffer. Clones share one sled database; writes are
/// serialised by an internal lock, reads (sampling) run alongside.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    checkpoints: sled::Tree,
    /// Serialises checkpoint registry changes (create, activate, delete).
    registry_lock: Arc<Mutex<()>>,
    config: BufferConfig,
    counters: Arc<Mutex<Counters>>,
}

fn meta_key(name: &str) -> Vec<u8> {
    [b"M".as_slice(), name.as_bytes()].concat()
}
fn chunk_key(split: Split, first_seq: u64) -> Vec<u8> {
    [&[b'C', split.byte()][..], &first_seq.to_be_bytes()].concat()
}
/// The key of the index block holding `step`, and the step's offset in it.
fn index_block_key(source: &str, episode: &str, step: u64) -> (Vec<u8>, u8) {
    index_block_key_under(&[source.as_bytes(), b"\0", episode.as_bytes(), b"\0"], step)
}
/// As [`index_block_key`], for an episode named by the parts of
/// `source 0 episode 0` (one allocation: this runs for every frame).
fn index_block_key_under(episode_name: &[&[u8]], step: u64) -> (Vec<u8>, u8) {
    let mut key = Vec::with_capacity(1 + episode_name.iter().map(|part| part.len()).sum::<usize>() + 8);
    key.push(b'I');
    episode_name.iter().for_each(|part| key.extend_from_slice(part));
    key.extend_from_slice(&(step / INDEX_BLOCK_STEPS).to_be_bytes());
    (key, (step % INDEX_BLOCK_STEPS) as u8)
}
fn episode_key(source: &str, episode: &str) -> Vec<u8> {
    [b"E", source.as_bytes(), b"\0", episode.as_bytes()].concat()
}
fn source_key(source: &str) -> Vec<u8> {
    [b"S", source.as_bytes()].concat()
}
fn be_u64(bytes: &[u8]) -> Result<u64> {
    Ok(u64::from_be_bytes(bytes.try_into().context("corrupt counter in the store")?))
}

/// A batch's pixels compressed for [`Store::commit`], one entry per frame.
/// Compression touches no sled state, so ingest does it for the next batch
/// while the current one commits.
pub struct Compressed(Vec<Vec<u8>>);

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
fn decompress(z: &[u8]) -> Result<Vec<u8>> {
    let mut out = vec![0; OUT_BYTES];
    decompress_into(z, &mut out)?;
    Ok(out)
}

/// As [`decompress`], into `out` (OUT_BYTES long).
fn decompress_into(z: &[u8], out: &mut [u8]) -> Result<()> {
    let n = lz4_flex::block::decompress_into(z, out).context("corrupt frame pixels")?;
    ensure!(n == OUT_BYTES, "corrupt frame: {n} pixel bytes, expected {OUT_BYTES}");
    Ok(())
}

impl Committed {
    /// Frames newly stored.
    pub fn stored(&self) -> u64 {
        self.stored_indices.len() as u64
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. Refuses a store written by a
    /// newer wmvae, and says so when another process holds it.
    pub fn open(dir: &Path, config: BufferConfig) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let locked_since = std::time::Instant::now();
        let db = loop {
            match sled::Config::new().path(dir.join("sled")).cache_capacity(SLED_CACHE_BYTES).open() {
                Ok(db) => break db,
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if locked_since.elapsed() >= LOCK_WAIT {
                        bail!("store {} is locked by another process (is wmvae serve running?)", dir.display());
                    }
                    std::thread::sleep(LOCK_RETRY_INTERVAL);
                }
                Err(other) => bail!("opening store {}: {other}", dir.display()),
            }
        };
        let tree = db.open_tree("buffer")?;
        let checkpoints = db.open_tree("checkpoints")?;
        let store = Store { db, tree, checkpoints, registry_lock: Arc::default(), config, counters: Arc::default() };
        store.migrate()?;
        *store.counters.lock().unwrap() = store.read_counters()?;
        Ok(store)
    }

    /// Applies the store's schema version: writes it on a new store, accepts
    /// an equal one, upgrades an older one in place, refuses a newer one
    /// (never rewrites it).
    fn migrate(&self) -> Result<()> {
        let found = self.tree.get(meta_key("schema_version"))?.map(|v| be_u64(&v)).transpose()?;
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                bail!("store schema version {found} was written by a newer wmvae; this build knows up to {SCHEMA_VERSION}")
            }
            Some(found) if found == SCHEMA_VERSION => {}
            // New, or older: older frames move to the new layout (a new store
            // has none), and older builds must now refuse the store.
            _ => {
                upgrade::frames_and_index(self)?;
                self.tree.insert(meta_key("schema_version"), &SCHEMA_VERSION.to_be_bytes())?;
                self.db.flush()?;
            }
        }
        Ok(())
    }

    fn read_counter(&self, name: &str) -> Result<u64> {
        self.tree.get(meta_key(name))?.map(|v| be_u64(&v)).unwrap_or(Ok(0))
    }

    fn read_counters(&self) -> Result<Counters> {
        let mut c = Counters::default();
        for split in [Split::Train, Split::Validation] {
            c.head[split.byte() as usize] = self.read_counter(&format!("head.{}", split.name()))?;
            c.tail[split.byte() as usize] = self.read_counter(&format!("tail.{}", split.name()))?;
        }
        c.episodes = self.read_counter("episodes")?;
        c.sources = self.read_counter("sources")?;
        c.ingested = self.read_counter("ingested")?;
        c.duplicates = self.read_counter("duplicates")?;
        c.evicted = self.read_counter("evicted")?;
        for reason in Reason::ALL {
            let n = self.read_counter(&format!("rejected.{}", reason.code()))?;
            if n > 0 {
                c.rejected.insert(reason, n);
            }
        }
        Ok(c)
    }

    fn write_counters(c: &Counters, batch: &mut sled::Batch) {
        let mut put = |name: String, v: u64| batch.insert(meta_key(&name), &v.to_be_bytes());
        for split in [Split::Train, Split::Validation] {
            put(format!("head.{}", split.name()), c.head[split.byte() as usize]);
            put(format!("tail.{}", split.name()), c.tail[split.byte() as usize]);
        }
        put("episodes".into(), c.episodes);
        put("sources".into(), c.sources);
        put("ingested".into(), c.ingested);
        put("duplicates".into(), c.duplicates);
        put("evicted".into(), c.evicted);
        for (reason, n) in &c.rejected {
            put(format!("rejected.{}", reason.code()), *n);
        }
    }

    /// Group commit: stores `frames` (skipping ones already held) with their
    /// `compressed` pixels (from [`compress_frames`]), counts `rejected`,
    /// evicts the oldest past capacity, all in one atomic batch, then
    /// flushes. When this returns Ok, everything is on disk.
    pub fn commit(&self, frames: &[Frame], compressed: Compressed, rejected: &[Reason]) -> Result<Committed> {
        ensure!(compressed.0.len() == frames.len(), "{} frames but {} compressed", frames.len(), compressed.0.len());
        let mut counters = self.counters.lock().unwrap();
        let mut pending = PendingCommit::new(self, counters.clone());
        let mut done = Committed::default();
        // Per split, the frames new to the store, with seqs from the old head on.
        let mut added: [Vec<StoredFrame>; 2] = Default::default();
        for (index, (frame, zpixels)) in frames.iter().zip(&compressed.0).enumerate() {
            let split = self.config.split_of(&frame.source, &frame.episode);
            if !pending.remember(&frame.source, &frame.episode, frame.step, split)? {
                done.duplicates += 1;
                continue;
            }
            added[split.byte() as usize].push(StoredFrame::of(frame, zpixels));
            done.stored_indices.push(index);
        }
        for split in [Split::Train, Split::Validation] {
            let i = split.byte() as usize;
            let (old_head, old_tail) = (counters.head[i], counters.tail[i]);
            let new_tail = pending.next.head[i].saturating_sub(self.config.capacity_of(split)).max(old_tail);
            pending.evict_stored(split, old_tail, new_tail.min(old_head))?;
            // A burst over capacity: frames of this very batch evicted before they were ever written.
            let burst = new_tail.saturating_sub(old_head) as usize;
            for frame in &added[i][..burst] {
                pending.forget(&frame.source, &frame.episode, frame.step)?;
            }
            let first_kept = old_head + burst as u64;
            for (n, chunk) in added[i][burst..].chunks(CHUNK_FRAMES).enumerate() {
                pending.batch.insert(chunk_key(split, first_kept + (n * CHUNK_FRAMES) as u64), encode_chunk(chunk)?);
            }
            pending.next.tail[i] = new_tail;
            done.evicted += new_tail - old_tail;
        }
        let (mut batch, mut next) = pending.finish();
        next.ingested += done.stored();
        next.duplicates += done.duplicates;
        next.evicted += done.evicted;
        for reason in rejected {
            *next.rejected.entry(*reason).or_default() += 1;
        }
        Self::write_counters(&next, &mut batch);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        *counters = next;
        Ok(done)
    }

    /// The index block under `key` as stored (empty when there is none).
    fn read_index_block(&self, key: &[u8]) -> Result<IndexBlock> {
        self.tree.get(key)?.map(|bytes| decode_index_block(&bytes)).unwrap_or(Ok(IndexBlock::new()))
    }

    /// The chunk that holds frame `seq` of `split`, as its first seq and
    /// bytes; None when no chunk holds it (evicted meanwhile).
    fn chunk_holding(&self, split: Split, seq: u64) -> Result<Option<(u64, sled::IVec)>> {
        // The first frame of every chunk is one point lookup away; the others need a range lookup.
        if let Some(bytes) = self.tree.get(chunk_key(split, seq))? {
            return Ok(Some((seq, bytes)));
        }
        let Some((key, bytes)) = self.tree.get_lt(chunk_key(split, seq + 1))? else { return Ok(None) };
        if key.len() != 10 || key[..2] != [b'C', split.byte()] {
            return Ok(None);
        }
        Ok(Some((be_u64(&key[2..])?, bytes)))
    }

    /// Frames ever stored (evictions and restarts included, duplicates not).
    pub fn frames_ingested(&self) -> u64 {
        self.counters.lock().unwrap().ingested
    }

    /// Frames held in `split`.
    pub fn len(&self, split: Split) -> u64 {
        let c = self.counters.lock().unwrap();
        c.head[split.byte() as usize] - c.tail[split.byte() as usize]
    }

    /// `n` frames (64x64x3 bytes each, concatenated) drawn uniformly with
    /// replacement from `split`; None while the split is empty.
    pub fn sample(&self, split: Split, n: usize, rng: &mut impl Rng) -> Result<Option<Vec<u8>>> {
        let mut out = vec![0; n * OUT_BYTES];
        let (mut drawn, mut misses) = (0, 0);
        while drawn < n {
            let (tail, head) = {
                let c = self.counters.lock().unwrap();
                (c.tail[split.byte() as usize], c.head[split.byte() as usize])
            };
            if head == tail {
                return Ok(None);
            }
            let seq = rng.gen_range(tail..head);
            // An eviction may race the draw: then draw again.
            if let Some((first, bytes)) = self.chunk_holding(split, seq)? {
                // Only the pixels, straight into their place: no other field is copied.
                let slot = &mut out[drawn * OUT_BYTES..][..OUT_BYTES];
                if read_in_chunk(first, &bytes, seq, |stored| decompress_into(&stored.zpixels, slot))?.is_some() {
                    drawn += 1;
                    continue;
                }
            }
            misses += 1;
            ensure!(misses <= MAX_SAMPLE_MISSES, "the {} ring points at missing frames (seq {seq})", split.name());
        }
        Ok(Some(out))
    }

    /// Every stored frame in (source, episode, step) order, optionally of
    /// one source; with `pixels` false their pixels are left empty (no
    /// decompression).
    pub fn frames_in_order<'a>(&'a self, source: Option<&'a str>, pixels: bool) -> impl Iterator<Item = Result<Frame>> + 'a {
        let prefix: Vec<u8> = match source {
            Some(s) => [b"I", s.as_bytes(), b"\0"].concat(),
            None => b"I".to_vec(),
        };
        let locations = self.tree.scan_prefix(prefix).flat_map(|entry| {
            let block = entry.map_err(anyhow::Error::from).and_then(|(_, bytes)| decode_index_block(&bytes));
            match block {
                Ok(block) => block.into_values().map(Ok).collect::<Vec<_>>(),
                Err(e) => vec![Err(e)],
            }
        });
        // Consecutive steps mostly share a chunk: keep the last one read.
        let mut held: Option<(Split, u64, sled::IVec)> = None;
        locations.map(move |location| {
            let (split, seq) = location?;
            if let Some((_, first, bytes)) = held.as_ref().filter(|(held_split, ..)| *held_split == split) {
                if let Some(frame) = read_in_chunk(*first, bytes, seq, |stored| stored.to_frame(pixels))? {
                    return Ok(frame);
                }
            }
            let (first, bytes) = self.chunk_holding(split, seq)?.context("the index points at a missing frame")?;
            let frame = read_in_chunk(first, &bytes, seq, |stored| stored.to_frame(pixels))?.context("the index points at a missing frame")?;
            held = Some((split, first, bytes));
            Ok(frame)
        })
    }

    pub fn stats(&self) -> Result<Stats> {
        let c = self.counters.lock().unwrap().clone();
        let train = c.head[0] - c.tail[0];
        let validation = c.head[1] - c.tail[1];
        Ok(Stats {
            frames: train + validation,
            train_frames: train,
            validation_frames: validation,
            capacity: self.config.capacity,
            episodes: c.episodes,
            sources: c.sources,
            frames_ingested: c.ingested,
            duplicates: c.duplicates,
            evicted: c.evicted,
            bytes_on_disk: self.db.size_on_disk()?,
            rejected: c.rejected.iter().map(|(r, n)| (r.code().to_string(), *n)).collect(),
        })
    }

    /// Flushes everything to disk (for shutdown; `commit` already flushes).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(store: &Store, frames: &[Frame], rejected: &[Reason]) -> Result<Committed> {
        store.commit(frames, compress_frames(frames), rejected)
    }

    fn frame(source: &str, episode: &str, step: u64) -> Frame {
        Frame {
            source: source.into(),
            episode: episode.into(),
            step,
            pixels: vec![(step % 256) as u8; OUT_BYTES].into(),
            action: Some(vec![step as f32]),
            reward: Some(1.0),
            done: Some(false),
            received_at: None,
        }
    }

    fn config(capacity: u64) -> BufferConfig {
        BufferConfig { capacity, validation_fraction: 0.0 }
    }

    #[test]
    fn duplicates_are_stored_once_and_counters_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), config(100)).unwrap();
            let c = commit(&store, &[frame("a", "e1", 0), frame("a", "e1", 1), frame("a", "e1", 1)], &[Reason::BadPng]).unwrap();
            assert_eq!((c.stored(), c.duplicates), (2, 1));
            let c = commit(&store, &[frame("a", "e1", 0), frame("b", "e2", 0)], &[]).unwrap();
            assert_eq!((c.stored(), c.duplicates), (1, 1));
        }
        let store = Store::open(dir.path(), config(100)).unwrap();
        let s = store.stats().unwrap();
        assert_eq!((s.frames, s.episodes, s.sources, s.duplicates), (3, 2, 2, 2));
        assert_eq!(s.rejected.get("bad_png"), Some(&1));
        let order: Vec<(String, u64)> = store.frames_in_order(None, true).map(|f| f.unwrap()).map(|f| (f.episode, f.step)).collect();
        assert_eq!(order, [("e1".to_string(), 0), ("e1".to_string(), 1), ("e2".to_string(), 0)]);
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config(3)).unwrap();
        commit(&store, &[frame("a", "old", 0), frame("a", "old", 1)], &[]).unwrap();
        let c = commit(&store, &[frame("a", "new", 0), frame("a", "new", 1)], &[]).unwrap();
        assert_eq!(c.evicted, 1);
        let held: Vec<(String, u64)> = store.frames_in_order(None, true).map(|f| f.unwrap()).map(|f| (f.episode, f.step)).collect();
        assert_eq!(held, [("new".to_string(), 0), ("new".to_string(), 1), ("old".to_string(), 1)]);
        // More than the capacity in one batch: only the newest survive.
        commit(&store, &(10..20).map(|s| frame("b", "burst", s)).collect::<Vec<_>>(), &[]).unwrap();
        let steps: Vec<u64> = store.frames_in_order(None, true).map(|f| f.unwrap().step).collect();
        assert_eq!(steps, [17, 18, 19]);
        let s = store.stats().unwrap();
        assert_eq!((s.frames, s.episodes, s.sources), (3, 1, 1));
    }

    #[test]
    fn sampling_returns_stored_pixels_and_splits_by_episode() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BufferConfig { capacity: 1000, validation_fraction: 0.5 };
        let store = Store::open(dir.path(), cfg).unwrap();
        let frames: Vec<Frame> = (0..40).flat_map(|e| (0..3).map(move |s| frame("a", &format!("ep{e}"), s))).collect();
        commit(&store, &frames, &[]).unwrap();
        let (train, validation) = (store.len(Split::Train), store.len(Split::Validation));
        assert_eq!(train + validation, 120);
        assert!(train > 0 && validation > 0, "{train} / {validation}");
        for f in store.frames_in_order(None, true) {
            let f = f.unwrap();
            assert_eq!(f.pixels, vec![(f.step % 256) as u8; OUT_BYTES]);
        }
        let batch = store.sample(Split::Train, 5, &mut rand::thread_rng()).unwrap().unwrap();
        assert_eq!(batch.len(), 5 * OUT_BYTES);
        assert!(batch.chunks(OUT_BYTES).all(|p| p.iter().all(|&b| b == p[0]) && p[0] < 3));
    }

    fn keys_under(store: &Store, prefix: &[u8]) -> Vec<sled::IVec> {
        store.tree.scan_prefix(prefix).keys().map(|k| k.unwrap()).collect()
    }

    /// Evictions cut through chunks: a chunk goes once its last frame does.
    #[test]
    fn eviction_removes_chunks_once_all_their_frames_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), config(50)).unwrap();
        for group in 0..3 {
            let frames: Vec<Frame> = (group * 40..(group + 1) * 40).map(|s| frame("a", "e", s)).collect();
            assert_eq!(commit(&store, &frames, &[]).unwrap().stored(), 40);
        }
        let steps: Vec<u64> = store.frames_in_order(None, true).map(|f| f.unwrap()).map(|f| f.step).collect();
        assert_eq!(steps, (70..120).collect::<Vec<_>>());
        // Each group of 40 is cut into chunks from its first seq on; a chunk stays while it holds a frame from 70 on.
        let firsts: Vec<u64> = keys_under(&store, b"C\0").iter().map(|k| be_u64(&k[2..]).unwrap()).collect();
        let expected: Vec<u64> = (0..3u64)
            .flat_map(|g| (g * 40..(g + 1) * 40).step_by(CHUNK_FRAMES).filter(move |&first| (first + CHUNK_FRAMES as u64).min((g + 1) * 40) > 70))
            .collect();
        assert_eq!(firsts, expected);
        let batch = store.sample(Split::Train, 200, &mut rand::thread_rng()).unwrap().unwrap();
        assert!(batch.chunks(OUT_BYTES).all(|p| (70..120).any(|s| p == vec![(s % 256) as u8; OUT_BYTES].as_slice())));
        assert_eq!(commit(&store, &[frame("a", "e", 69), frame("a", "e", 70)], &[]).unwrap().duplicates, 1, "69 was evicted, 70 is held");
    }

    /// `frames` as a schema 2 store held them, at seqs from `first_seq` of
    /// the train split: a value per frame under `F` (pixels zlib), an index
    /// entry per step under `K`.
    fn schema_2_entries(frames: &[Frame], first_seq: u64) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for (seq, f) in (first_seq..).zip(frames) {
            let zpixels = upgrade::tests::zlib(&f.pixels);
            batch.insert([&b"F\0"[..], &seq.to_be_bytes()].concat(), rmp_serde::to_vec_named(&StoredFrame::of(f, &zpixels)).unwrap());
            let index = [b"K", f.source.as_bytes(), b"\0", f.episode.as_bytes(), b"\0", &f.step.to_be_bytes()].concat();
            batch.insert(index, [&[0u8][..], &seq.to_be_bytes()].concat());
        }
        batch
    }

    /// Writes `batch` with the counters of `frames` held in all, and marks
    /// the store schema 2.
    fn write_as_schema_2(store: &Store, mut batch: sled::Batch, frames: &[Frame]) {
        let mut counts: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
        for f in frames {
            *counts.entry(episode_key(&f.source, &f.episode)).or_default() += 1;
            *counts.entry(source_key(&f.source)).or_default() += 1;
        }
        let episodes = counts.keys().filter(|k| k[0] == b'E').count() as u64;
        let n = frames.len() as u64;
        let counters = Counters { head: [n, 0], episodes, sources: counts.len() as u64 - episodes, ingested: n, ..Default::default() };
        Store::write_counters(&counters, &mut batch);
        for (key, count) in counts {
            batch.insert(key, &count.to_be_bytes());
        }
        batch.insert(meta_key("schema_version"), &2u64.to_be_bytes());
        store.tree.apply_batch(batch).unwrap();
        store.flush().unwrap();
    }

    fn assert_holds_exactly(store: &Store, frames: &[Frame]) {
        assert!(keys_under(store, b"F").is_empty() && keys_under(store, b"K").is_empty(), "old keys left");
        assert_eq!(store.tree.get(meta_key("schema_version")).unwrap().unwrap().as_ref(), SCHEMA_VERSION.to_be_bytes());
        let held: Vec<Frame> = store.frames_in_order(None, true).map(|f| f.unwrap()).collect();
        assert_eq!(held.len(), frames.len());
        for (got, want) in held.iter().zip(frames) {
            assert_eq!((&got.source, &got.episode, got.step, &got.pixels, &got.action), (&want.source, &want.episode, want.step, &want.pixels, &want.action));
        }
    }

    /// A schema 2 store is rewritten into chunks and blocks at open, and
    /// holds the same frames afterwards.
    #[test]
    fn schema_2_buffers_are_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let frames: Vec<Frame> = (0..40).map(|s| frame("a", "old", s)).chain((0..5).map(|s| frame("b", "other", 100 + s))).collect();
        {
            let store = Store::open(dir.path(), config(1000)).unwrap();
            write_as_schema_2(&store, schema_2_entries(&frames, 0), &frames);
        }
        let store = Store::open(dir.path(), config(1000)).unwrap();
        assert_holds_exactly(&store, &frames);
        let c = commit(&store, &[frame("a", "old", 39), frame("a", "old", 40)], &[]).unwrap();
        assert_eq!((c.stored(), c.duplicates), (1, 1));
        let s = store.stats().unwrap();
        assert_eq!((s.frames, s.episodes, s.sources), (46, 2, 2));
        assert_eq!(store.sample(Split::Train, 10, &mut rand::thread_rng()).unwrap().unwrap().len(), 10 * OUT_BYTES);
    }

    /// An upgrade cut short, with some frames already in chunks and some
    /// steps already in index blocks, finishes at the next open, merging
    /// the rest into the same blocks.
    #[test]
    fn an_interrupted_upgrade_finishes_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let frames: Vec<Frame> = (0..45).map(|s| frame("a", "old", s)).collect();
        {
            let store = Store::open(dir.path(), config(1000)).unwrap();
            // Frames 0..20 already moved: a chunk at seq 0, steps 0..20 in block 0.
            commit(&store, &frames[..20], &[]).unwrap();
            write_as_schema_2(&store, schema_2_entries(&frames[20..], 20), &frames);
        }
        let store = Store::open(dir.path(), config(1000)).unwrap();
        assert_holds_exactly(&store, &frames);
        assert_eq!(commit(&store, &[frame("a", "old", 30)], &[]).unwrap().duplicates, 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), config(10)).unwrap();
            store.tree.insert(meta_key("schema_version"), &99u64.to_be_bytes()).unwrap();
            store.flush().unwrap();
        }
        let err = Store::open(dir.path(), config(10)).err().unwrap().to_string();
        assert!(err.contains("schema version 99") && err.contains("newer wmvae"), "{err}");
    }
}
