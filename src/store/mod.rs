//! The durable, bounded replay buffer in sled. The only module that touches
//! sled.
//!
//! One tree, so that a group of frames, their index entries, evictions and
//! counters commit in one atomic `apply_batch`, followed by one flush (group
//! commit). Keys:
//!
//! | key                                   | value                          |
//! |---------------------------------------|--------------------------------|
//! | `F` split seq(u64 BE)                 | a stored frame (MessagePack, pixels zlib) |
//! | `K` source 0 episode 0 step(u64 BE)   | split, seq: dedup and export order |
//! | `E` source 0 episode                  | frames held of that episode    |
//! | `S` source                            | frames held of that source     |
//! | `M` name                              | schema version, ring bounds, counters |
//!
//! Each split (train, validation) is a ring of consecutive sequence numbers
//! `[tail, head)`, so uniform sampling is O(batch): draw seqs, get each.
//! Episodes go to the validation split by a stable hash of (source, episode).
//! Nothing here knows about NATS or tensors. Checkpoints live in a second
//! tree (`checkpoints.rs`).

mod checkpoints;
pub use checkpoints::{best_by_eval, HistoryEntry, UnknownVersion};

use crate::preprocess::OUT_BYTES;
use crate::wire::{Frame, Reason};
use anyhow::{bail, ensure, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Layout version of the store. A store with a newer one is refused; an
/// older one is upgraded in place. 2: checkpoint envelopes in chunks
/// (`checkpoints.rs`); schema 1's whole envelopes still read the same way.
pub const SCHEMA_VERSION: u64 = 2;
/// sled's page cache. Its default is 1 GiB; sampling reads are random, so a
/// big cache buys little, and the daemon must stay well inside its memory
/// (sled alone, 20,000 frames in: ~55 MB resident at 32 MB, ~76 at 64).
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// Threads compressing one group commit (the machine this targets has 2 cores).
const COMPRESSION_THREADS: usize = 2;
/// zlib level 1: CarRacing frames shrink ~7x at a fraction of level 6's cost.
const COMPRESSION_LEVEL: u32 = 1;

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

/// A frame as stored: the frame's fields, pixels compressed.
#[derive(Serialize, Deserialize)]
struct StoredFrame {
    source: String,
    episode: String,
    step: u64,
    #[serde(with = "serde_bytes")]
    zpixels: Vec<u8>,
    action: Option<Vec<f32>>,
    reward: Option<f64>,
    done: Option<bool>,
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
fn frame_key(split: Split, seq: u64) -> Vec<u8> {
    [&[b'F', split.byte()][..], &seq.to_be_bytes()].concat()
}
fn index_key(source: &str, episode: &str, step: u64) -> Vec<u8> {
    [b"K", source.as_bytes(), b"\0", episode.as_bytes(), b"\0", &step.to_be_bytes()].concat()
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

/// One compression thread's zlib state, reused frame after frame: a fresh
/// encoder per 12 KB frame spent more time allocating and zeroing its
/// ~200 KB of tables than compressing (25 vs 21 us a frame measured here).
struct Compressor {
    zlib: flate2::Compress,
    scratch: Vec<u8>,
}

impl Compressor {
    fn new() -> Compressor {
        Compressor { zlib: flate2::Compress::new(flate2::Compression::new(COMPRESSION_LEVEL), true), scratch: Vec::new() }
    }

    /// One complete zlib stream of `pixels` (what [`decompress`] reads).
    fn compress(&mut self, pixels: &[u8]) -> Result<Vec<u8>> {
        self.zlib.reset();
        self.scratch.clear();
        // zlib's worst case for incompressible input is a few bytes per 16 KB over the input.
        self.scratch.reserve(pixels.len() + pixels.len() / 64 + 64);
        loop {
            let consumed = self.zlib.total_in() as usize;
            match self.zlib.compress_vec(&pixels[consumed..], &mut self.scratch, flate2::FlushCompress::Finish)? {
                flate2::Status::StreamEnd => return Ok(self.scratch.clone()),
                // The output space ran out (not expected with the reserve above): give it more.
                flate2::Status::Ok | flate2::Status::BufError => self.scratch.reserve(self.scratch.capacity()),
            }
        }
    }
}

/// A batch's pixels compressed for [`Store::commit`], one entry per frame.
/// Compression is half of a commit's CPU time and touches no sled state, so
/// ingest does it for the next batch while the current one commits.
pub struct Compressed(Vec<Vec<u8>>);

/// Compresses every frame's pixels, split over `COMPRESSION_THREADS`
/// scoped threads.
pub fn compress_frames(frames: &[Frame]) -> Result<Compressed> {
    let chunk = frames.len().div_ceil(COMPRESSION_THREADS).max(1);
    let parts = std::thread::scope(|scope| {
        let parts: Vec<_> = frames
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    let mut compressor = Compressor::new();
                    part.iter().map(|f| compressor.compress(&f.pixels)).collect::<Result<Vec<_>>>()
                })
            })
            .collect();
        parts.into_iter().map(|p| p.join().expect("compression does not panic")).collect::<Result<Vec<_>>>()
    })?;
    Ok(Compressed(parts.into_iter().flatten().collect()))
}

fn decompress(z: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(OUT_BYTES);
    flate2::read::ZlibDecoder::new(z).take(OUT_BYTES as u64 + 1).read_to_end(&mut out).context("corrupt frame pixels")?;
    if out.len() != OUT_BYTES {
        bail!("corrupt frame: {} pixel bytes, expected {OUT_BYTES}", out.len());
    }
    Ok(out)
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
        let db = sled::Config::new().path(dir.join("sled")).cache_capacity(SLED_CACHE_BYTES).open().map_err(|e| match e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                anyhow::anyhow!("store {} is locked by another process (is wmvae serve running?)", dir.display())
            }
            other => anyhow::anyhow!("opening store {}: {other}", dir.display()),
        })?;
        let tree = db.open_tree("buffer")?;
        let checkpoints = db.open_tree("checkpoints")?;
        let store = Store { db, tree, checkpoints, registry_lock: Arc::default(), config, counters: Arc::default() };
        store.migrate()?;
        *store.counters.lock().unwrap() = store.read_counters()?;
        Ok(store)
    }

    /// Applies the store's schema version: writes it on a new store, accepts
    /// an equal one, marks an older one current (its data reads as it is),
    /// refuses a newer one (never rewrites it).
    fn migrate(&self) -> Result<()> {
        let found = self.tree.get(meta_key("schema_version"))?.map(|v| be_u64(&v)).transpose()?;
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                bail!("store schema version {found} was written by a newer wmvae; this build knows up to {SCHEMA_VERSION}")
            }
            Some(found) if found == SCHEMA_VERSION => {}
            // New, or older: nothing to rewrite, but older builds must now refuse it.
            _ => {
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

    /// Adjusts a per-episode or per-source frame count by `delta`, in the
    /// batch and in `pending` (later reads in the same batch see it);
    /// returns the count before and after.
    fn bump(&self, pending: &mut HashMap<Vec<u8>, u64>, batch: &mut sled::Batch, key: Vec<u8>, delta: i64) -> Result<(u64, u64)> {
        let before = match pending.get(&key) {
            Some(n) => *n,
            None => self.tree.get(&key)?.map(|v| be_u64(&v)).transpose()?.unwrap_or(0),
        };
        let after = (before as i64 + delta).max(0) as u64;
        if after == 0 {
            batch.remove(key.clone());
        } else {
            batch.insert(key.clone(), &after.to_be_bytes());
        }
        pending.insert(key, after);
        Ok((before, after))
    }

    /// Group commit: stores `frames` (skipping ones already held) with their
    /// `compressed` pixels (from [`compress_frames`]), counts `rejected`,
    /// evicts the oldest past capacity, all in one atomic batch, then
    /// flushes. When this returns Ok, everything is on disk.
    pub fn commit(&self, frames: &[Frame], compressed: Compressed, rejected: &[Reason]) -> Result<Committed> {
        ensure!(compressed.0.len() == frames.len(), "{} frames but {} compressed", frames.len(), compressed.0.len());
        let mut counters = self.counters.lock().unwrap();
        let mut next = counters.clone();
        let mut batch = sled::Batch::default();
        let mut pending: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut seen_in_batch = HashSet::new();
        let mut added: HashMap<Vec<u8>, (String, String, u64)> = HashMap::new();
        let mut done = Committed::default();
        for (index, (frame, zpixels)) in frames.iter().zip(compressed.0).enumerate() {
            let key = index_key(&frame.source, &frame.episode, frame.step);
            if !seen_in_batch.insert(key.clone()) || self.tree.contains_key(&key)? {
                done.duplicates += 1;
                continue;
            }
            let split = self.config.split_of(&frame.source, &frame.episode);
            let seq = next.head[split.byte() as usize];
            next.head[split.byte() as usize] += 1;
            let stored = StoredFrame {
                source: frame.source.clone(),
                episode: frame.episode.clone(),
                step: frame.step,
                zpixels,
                action: frame.action.clone(),
                reward: frame.reward,
                done: frame.done,
            };
            batch.insert(frame_key(split, seq), rmp_serde::to_vec_named(&stored)?);
            added.insert(frame_key(split, seq), (frame.source.clone(), frame.episode.clone(), frame.step));
            let mut location = vec![split.byte()];
            location.extend_from_slice(&seq.to_be_bytes());
            batch.insert(key, location);
            if self.bump(&mut pending, &mut batch, episode_key(&frame.source, &frame.episode), 1)?.0 == 0 {
                next.episodes += 1;
            }
            if self.bump(&mut pending, &mut batch, source_key(&frame.source), 1)?.0 == 0 {
                next.sources += 1;
            }
            done.stored_indices.push(index);
        }
        for split in [Split::Train, Split::Validation] {
            let i = split.byte() as usize;
            while next.head[i] - next.tail[i] > self.config.capacity_of(split) {
                let seq = next.tail[i];
                next.tail[i] += 1;
                done.evicted += 1;
                // A frame of this very batch (a burst over capacity) is not
                // in the tree yet: its identity comes from `added`.
                let (source, episode, step) = match added.remove(&frame_key(split, seq)) {
                    Some(identity) => identity,
                    None => {
                        let old = self.tree.get(frame_key(split, seq))?.context("buffer ring points at a missing frame")?;
                        let old: StoredFrame = rmp_serde::from_slice(&old).context("corrupt stored frame")?;
                        (old.source, old.episode, old.step)
                    }
                };
                batch.remove(frame_key(split, seq));
                batch.remove(index_key(&source, &episode, step));
                if self.bump(&mut pending, &mut batch, episode_key(&source, &episode), -1)?.1 == 0 {
                    next.episodes -= 1;
                }
                if self.bump(&mut pending, &mut batch, source_key(&source), -1)?.1 == 0 {
                    next.sources -= 1;
                }
            }
        }
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
        let mut out = Vec::with_capacity(n * OUT_BYTES);
        let mut drawn = 0;
        while drawn < n {
            let (tail, head) = {
                let c = self.counters.lock().unwrap();
                (c.tail[split.byte() as usize], c.head[split.byte() as usize])
            };
            if head == tail {
                return Ok(None);
            }
            // An eviction may race the draw: then draw again.
            let Some(bytes) = self.tree.get(frame_key(split, rng.gen_range(tail..head)))? else { continue };
            let stored: StoredFrame = rmp_serde::from_slice(&bytes).context("corrupt stored frame")?;
            out.extend_from_slice(&decompress(&stored.zpixels)?);
            drawn += 1;
        }
        Ok(Some(out))
    }

    /// Every stored frame in (source, episode, step) order, optionally of
    /// one source; with `pixels` false their pixels are left empty (no
    /// decompression).
    pub fn frames_in_order<'a>(&'a self, source: Option<&'a str>, pixels: bool) -> impl Iterator<Item = Result<Frame>> + 'a {
        let prefix: Vec<u8> = match source {
            Some(s) => [b"K", s.as_bytes(), b"\0"].concat(),
            None => b"K".to_vec(),
        };
        self.tree.scan_prefix(prefix).map(move |entry| {
            let (_, location) = entry?;
            let split = location.first().copied().and_then(Split::from_byte).context("corrupt index entry")?;
            let seq = be_u64(&location[1..])?;
            let bytes = self.tree.get(frame_key(split, seq))?.context("index points at a missing frame")?;
            let stored: StoredFrame = rmp_serde::from_slice(&bytes).context("corrupt stored frame")?;
            Ok(Frame {
                pixels: if pixels { decompress(&stored.zpixels)?.into() } else { Default::default() },
                source: stored.source,
                episode: stored.episode,
                step: stored.step,
                action: stored.action,
                reward: stored.reward,
                done: stored.done,
                received_at: None,
            })
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
        store.commit(frames, compress_frames(frames)?, rejected)
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
