//! The replay buffer's operations on the shared sled tree: group commits
//! (frames + index + evictions + counters in one atomic batch, one flush),
//! uniform sampling from a split's ring of sequence numbers, frames in
//! (source, episode, step) order, and the counters behind `buffer stats`.
//! The key layout and codecs are [`super::layout`]'s; opening is `mod.rs`'s;
//! room on the disk is claimed through `room.rs` before each commit.
//! Over 400 lines for one concern: the commit, its eviction and dedup
//! bookkeeping, and the reads that must agree with them.

use super::layout::*;
use super::Store;
use crate::frames::wire::Reason;
use crate::frames::{self, Frame};
use anyhow::{anyhow, ensure, Context, Result};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{hash_map, BTreeMap, HashMap};

/// Draws that may find their frame evicted meanwhile (a race with a commit)
/// before sampling gives up and calls the ring corrupt.
const MAX_SAMPLE_MISSES: usize = 1_000;
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
    /// Checks the bounds, naming the config's keys (`[buffer]`).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.capacity != 0, "buffer.capacity must be at least 1");
        ensure!(
            (0.0..1.0).contains(&self.validation_fraction),
            "buffer.validation_fraction must be in [0, 1)"
        );
        Ok(())
    }

    /// The validation split's share of the capacity (at least one frame
    /// when the fraction is positive); the training split gets the rest.
    pub(super) fn capacity_of(&self, split: Split) -> u64 {
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

/// The counters kept in memory and written with every batch.
#[derive(Debug, Default, Clone)]
pub(super) struct Counters {
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
        PendingCommit {
            store,
            batch: sled::Batch::default(),
            next: counters,
            counts: HashMap::new(),
            index: HashMap::new(),
        }
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
            let (first, bytes) = self
                .store
                .chunk_holding(split, seq)?
                .context("the buffer ring points at a missing frame")?;
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

impl Committed {
    /// Frames newly stored.
    pub fn stored(&self) -> u64 {
        self.stored_indices.len() as u64
    }
}

impl Store {
    fn read_counter(&self, name: &str) -> Result<u64> {
        self.tree.get(meta_key(name))?.map(|v| be_u64(&v)).unwrap_or(Ok(0))
    }

    pub(super) fn read_counters(&self) -> Result<Counters> {
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
    /// flushes. When this returns Ok, everything is on disk; without room
    /// on the disk for it, nothing is written ([`super::Error::NoRoom`]).
    pub fn commit(
        &self,
        frames: &[Frame],
        compressed: Compressed,
        rejected: &[Reason],
    ) -> Result<Committed, super::Error> {
        if compressed.0.len() != frames.len() {
            let (n, z) = (frames.len(), compressed.0.len());
            return Err(anyhow!("{n} frames but {z} compressed").into());
        }
        // The `store-commit` failpoint: a write error sled would keep (tests/failpoints.rs).
        fail::fail_point!("store-commit", |_| Err(anyhow!(
            "the store-commit failpoint: a write error"
        )
        .into()));
        let bytes: u64 = compressed.0.iter().map(|z| z.len() as u64).sum();
        let _room = self.room.claim(bytes * super::room::COMMIT_FACTOR, || {
            format!("a group commit of {} frames", frames.len())
        })?;
        Ok(self.commit_claimed(frames, compressed, rejected)?)
    }

    /// [`Store::commit`] once its room is claimed.
    fn commit_claimed(&self, frames: &[Frame], compressed: Compressed, rejected: &[Reason]) -> Result<Committed> {
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
            let new_tail = pending.next.head[i]
                .saturating_sub(self.config.capacity_of(split))
                .max(old_tail);
            pending.evict_stored(split, old_tail, new_tail.min(old_head))?;
            // A burst over capacity: frames of this very batch evicted before they were ever written.
            let burst = new_tail.saturating_sub(old_head) as usize;
            for frame in &added[i][..burst] {
                pending.forget(&frame.source, &frame.episode, frame.step)?;
            }
            let first_kept = old_head + burst as u64;
            for (n, chunk) in added[i][burst..].chunks(CHUNK_FRAMES).enumerate() {
                pending.batch.insert(
                    chunk_key(split, first_kept + (n * CHUNK_FRAMES) as u64),
                    encode_chunk(chunk)?,
                );
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
        self.room.flush(&self.db)?;
        *counters = next;
        Ok(done)
    }

    /// The index block under `key` as stored (empty when there is none).
    pub(super) fn read_index_block(&self, key: &[u8]) -> Result<IndexBlock> {
        self.tree
            .get(key)?
            .map(|bytes| decode_index_block(&bytes))
            .unwrap_or(Ok(IndexBlock::new()))
    }

    /// The chunk that holds frame `seq` of `split`, as its first seq and
    /// bytes; None when no chunk holds it (evicted meanwhile).
    pub(super) fn chunk_holding(&self, split: Split, seq: u64) -> Result<Option<(u64, sled::IVec)>> {
        // The first frame of every chunk is one point lookup away; the others need a range lookup.
        if let Some(bytes) = self.tree.get(chunk_key(split, seq))? {
            return Ok(Some((seq, bytes)));
        }
        let Some((key, bytes)) = self.tree.get_lt(chunk_key(split, seq + 1))? else {
            return Ok(None);
        };
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
        let mut out = vec![0; n * frames::BYTES];
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
                let slot = &mut out[drawn * frames::BYTES..][..frames::BYTES];
                if read_in_chunk(first, &bytes, seq, |stored| decompress_into(&stored.zpixels, slot))?.is_some() {
                    drawn += 1;
                    continue;
                }
            }
            misses += 1;
            ensure!(
                misses <= MAX_SAMPLE_MISSES,
                "the {} ring points at missing frames (seq {seq})",
                split.name()
            );
        }
        Ok(Some(out))
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
}

#[cfg(test)]
mod tests;
