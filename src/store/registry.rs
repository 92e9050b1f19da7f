//! The version registry in sled's `checkpoints` tree: immutable versions
//! (checkpoint envelopes), the active one, pins, and the history of every
//! change of the active version. Its own type over the store's shared sled
//! database: it knows nothing of frames, and the buffer nothing of it. Version numbers only grow and are never reused: the counter is
//! committed in the same atomic batch as the version it hands out. A
//! checkpoint's envelope is written only once the disk has room for it
//! (`room.rs`). Opening checks every version (`registry/verify.rs`): one
//! a failed write left half there is forgotten, never used; the history's
//! pages and retention are `registry/history.rs`'s.
//!
//! | key                 | value                                   |
//! |---------------------|-----------------------------------------|
//! | `V` version(u64 BE) chunk(u32 BE) | the checkpoint envelope (`checkpoint`), in chunks of [`CHUNK_BYTES`]; schema 1 stores hold it whole under `V` version |
//! | `D` version         | its metadata alone (MessagePack), for listings |
//! | `P` version         | empty: the version is pinned            |
//! | `H` seq(u64 BE)     | a history entry (MessagePack)           |
//! | `A` seq(u64 BE)     | empty: that entry (at or past `history_announced`) was announced |
//! | `W` chunk(u32 BE)   | the pending checkpoint: a shutdown's last, made without a version number (NATS away), in chunks |
//! | `M` name            | `next_version`, `active`, `history_next`, `history_announced` (every entry below it was announced), `led_epoch` (the lease epoch this node last led under) |

use super::errors::Error;
use super::layout::be_u64;
use super::room::{Claim, Room, CHECKPOINT_FACTOR};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// The version with the lowest finite eval loss, if any has one.
pub fn best_by_eval(all: &[Metadata]) -> Option<u64> {
    all.iter()
        .filter_map(|m| Some((m.eval_loss.filter(|l| l.is_finite())?, m.version)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, version)| version)
}

/// One change of the active version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// RFC 3339.
    pub at: String,
    pub from: Option<u64>,
    pub to: u64,
    pub why: Change,
    /// Who asked: [`Actor::name`] ("wmvae" for the daemon itself, else a
    /// NATS user or user@host).
    pub by: String,
    pub reason: Option<String>,
}

/// A checkpoint envelope goes into sled in pieces of this size. Stored
/// whole (~51 MB with the optimizer state), it stalled the buffer's next
/// group commit by ~240 ms once the log rolled over to a new segment
/// (sled moves the big value along); in 64 KB pieces the worst commit
/// after a checkpoint took 3.5 ms (BENCHMARKS.md).
const CHUNK_BYTES: usize = 64 * 1024;

fn key(tag: u8, n: u64) -> Vec<u8> {
    [&[tag][..], &n.to_be_bytes()].concat()
}
/// Where the pending checkpoint's chunks live (`W` chunk).
const PENDING: &[u8] = b"W";
/// A version's metadata as its `D` key holds it.
fn encode_metadata(metadata: &Metadata) -> Result<Vec<u8>> {
    Ok(rmp_serde::to_vec_named(metadata)?)
}

fn meta(counter: Counter) -> Vec<u8> {
    [b"M", counter.name().as_bytes()].concat()
}

/// The registry's counters, each a big-endian u64 under `M` + its name.
#[derive(Debug, Clone, Copy)]
enum Counter {
    /// The number the next version gets.
    NextVersion,
    /// The active version.
    Active,
    /// The sequence number of the next history entry.
    HistoryNext,
    /// Every history entry below it was announced.
    HistoryAnnounced,
    /// The lease epoch this node last led under.
    LedEpoch,
}

impl Counter {
    /// Its name in the stored key (pinned: stores on disk hold these).
    fn name(self) -> &'static str {
        match self {
            Counter::NextVersion => "next_version",
            Counter::Active => "active",
            Counter::HistoryNext => "history_next",
            Counter::HistoryAnnounced => "history_announced",
            Counter::LedEpoch => "led_epoch",
        }
    }
}

/// The registry. Clones share the store's sled database; changes are
/// serialised by one lock, reads run alongside.
#[derive(Clone)]
pub struct Registry {
    db: sled::Db,
    tree: sled::Tree,
    /// Serialises changes (create, activate, pin, delete).
    lock: Arc<Mutex<()>>,
    /// The store's disk, claimed before an envelope is written.
    room: Room,
}

mod history;
mod provenance;
mod verify;
pub use history::HistoryPage;
pub use provenance::{Actor, Change, Provenance};

impl Registry {
    /// Opens the registry and checks what it holds (`verify.rs`): versions
    /// a failed write left half there forgotten, listings rebuilt from
    /// intact envelopes, counters never behind what is stored.
    pub(super) fn open(db: &sled::Db, room: Room) -> Result<Registry> {
        let registry = Registry {
            db: db.clone(),
            tree: db.open_tree("checkpoints")?,
            lock: Arc::default(),
            room,
        };
        registry.verify()?;
        Ok(registry)
    }

    /// Writes a version back from a good copy (the same version, such as
    /// the object store's, sha256 checked by the caller): an [`Error::Damaged`]
    /// version made whole again, or one this store numbered but no longer
    /// holds whole (forgotten at open) put back. Never a number the store
    /// has not handed out ([`Error::UnknownVersion`]): new versions are `add`'s.
    pub fn repair(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        let _guard = self.serialised();
        let version = checkpoint.metadata.version;
        if version >= self.next_free()? {
            return Err(Error::UnknownVersion(version));
        }
        let mut batch = sled::Batch::default();
        let _room = self.put_chunks(&mut batch, &key(b'V', version), checkpoint)?;
        batch.insert(key(b'D', version), encode_metadata(&checkpoint.metadata)?);
        self.tree.apply_batch(batch)?;
        self.room.flush(&self.db)?;
        Ok(())
    }

    /// Adds to `batch` the removal of every chunk under `prefix`.
    fn remove_chunks(&self, batch: &mut sled::Batch, prefix: &[u8]) -> Result<()> {
        for chunk in self.tree.scan_prefix(prefix).keys() {
            batch.remove(chunk?);
        }
        Ok(())
    }

    /// Adds to `batch` `checkpoint`'s envelope under `prefix` in pieces of
    /// [`CHUNK_BYTES`] (`prefix` chunk(u32 BE)), replacing what was there,
    /// once the disk has room for it ([`Error::NoRoom`] else): the room
    /// stays claimed while the returned [`Claim`] lives (until the batch
    /// is applied and flushed).
    fn put_chunks(&self, batch: &mut sled::Batch, prefix: &[u8], checkpoint: &Checkpoint) -> Result<Claim, Error> {
        let bytes = checkpoint.to_bytes()?;
        let what = || match prefix == PENDING {
            true => format!("the pending checkpoint ({:.1} MB)", bytes.len() as f64 / 1e6),
            false => format!(
                "checkpoint v{} ({:.1} MB)",
                checkpoint.metadata.version,
                bytes.len() as f64 / 1e6
            ),
        };
        let room = self.room.claim(bytes.len() as u64 * CHECKPOINT_FACTOR, what)?;
        self.remove_chunks(batch, prefix)?;
        for (chunk, piece) in (0u32..).zip(bytes.chunks(CHUNK_BYTES)) {
            batch.insert([prefix, &chunk.to_be_bytes()].concat(), piece);
        }
        Ok(room)
    }

    /// The bytes of every chunk under `prefix`, in key order (empty: none).
    fn read_chunks(&self, prefix: &[u8]) -> Result<Vec<u8>> {
        let mut bytes = Vec::new();
        for entry in self.tree.scan_prefix(prefix) {
            bytes.extend_from_slice(&entry?.1);
        }
        Ok(bytes)
    }

    /// Holds the writers' lock. It guards no data of its own (each change
    /// is one atomic sled batch), so a thread that panicked holding it left
    /// nothing half-done: a poisoned lock is taken over, not a panic here.
    fn serialised(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn counter(&self, counter: Counter) -> Result<Option<u64>> {
        self.tree.get(meta(counter))?.map(|v| be_u64(&v)).transpose()
    }

    /// Adds "`version` is now active" and its history entry to `batch`;
    /// returns the version active before.
    fn activate_in(&self, batch: &mut sled::Batch, version: u64, provenance: &Provenance) -> Result<Option<u64>> {
        let from = self.counter(Counter::Active)?;
        batch.insert(meta(Counter::Active), &version.to_be_bytes());
        let entry = HistoryEntry {
            at: now_rfc3339(),
            from,
            to: version,
            why: provenance.why,
            by: provenance.by.name().into(),
            reason: provenance.reason.clone(),
        };
        let seq = self.counter(Counter::HistoryNext)?.unwrap_or(0);
        batch.insert(key(b'H', seq), rmp_serde::to_vec_named(&entry)?);
        batch.insert(meta(Counter::HistoryNext), &(seq + 1).to_be_bytes());
        Ok(from)
    }

    /// The number the next version gets when none is `given` to [`Registry::add`].
    pub fn next_free(&self) -> Result<u64> {
        Ok(self.counter(Counter::NextVersion)?.unwrap_or(1))
    }

    /// Stores a new version built by `make` (given its number) and makes it
    /// the active one with a history entry. The number is `given` (allocated
    /// across nodes, never below [`Registry::next_free`]) or the registry's
    /// next. Atomic and flushed before it returns.
    pub fn add(
        &self,
        given: Option<u64>,
        make: impl FnOnce(u64) -> Result<Checkpoint>,
        provenance: &Provenance,
    ) -> Result<Checkpoint, Error> {
        let _guard = self.serialised();
        let next = self.next_free()?;
        let version = given.unwrap_or(next);
        if version < next {
            return Err(anyhow!(
                "v{version} is below this store's next version number v{next}: numbers are never reused"
            )
            .into());
        }
        let checkpoint = make(version)?;
        if checkpoint.metadata.version != version {
            return Err(anyhow!(
                "checkpoint built as v{} but v{version} was allocated",
                checkpoint.metadata.version
            )
            .into());
        }
        let mut batch = sled::Batch::default();
        let _room = self.put_chunks(&mut batch, &key(b'V', version), &checkpoint)?;
        batch.insert(key(b'D', version), encode_metadata(&checkpoint.metadata)?);
        batch.insert(meta(Counter::NextVersion), &(version + 1).to_be_bytes());
        self.activate_in(&mut batch, version, provenance)?;
        self.tree.apply_batch(batch)?;
        self.room.flush(&self.db)?;
        Ok(checkpoint)
    }

    /// Makes an existing version active, once its stored bytes decode and
    /// match their sha256 (a damaged version is never made active). Returns
    /// the previous active version.
    pub fn activate(&self, version: u64, provenance: &Provenance) -> Result<Option<u64>, Error> {
        let _guard = self.serialised();
        if self
            .get(version)
            .with_context(|| format!("v{version} is not made active"))?
            .is_none()
        {
            return Err(Error::UnknownVersion(version));
        }
        let mut batch = sled::Batch::default();
        let from = self.activate_in(&mut batch, version, provenance)?;
        self.tree.apply_batch(batch)?;
        self.room.flush(&self.db)?;
        Ok(from)
    }

    pub fn active_version(&self) -> Result<Option<u64>> {
        self.counter(Counter::Active)
    }

    /// Whether `version` is stored (its metadata is written and removed
    /// in the same batches as its envelope).
    fn contains(&self, version: u64) -> Result<bool> {
        Ok(self.tree.contains_key(key(b'D', version))?)
    }

    /// A whole checkpoint, its sha256 verified ([`Error::Damaged`] when that fails).
    pub fn get(&self, version: u64) -> Result<Option<Checkpoint>, Error> {
        // A schema 1 store has one piece under the bare prefix.
        let bytes = self.read_chunks(&key(b'V', version))?;
        if bytes.is_empty() {
            return Ok(None);
        }
        Checkpoint::from_bytes(&bytes).map(Some).map_err(|e| Error::Damaged {
            version,
            why: format!("{e:#}"),
        })
    }

    pub fn metadata(&self, version: u64) -> Result<Option<Metadata>> {
        self.tree
            .get(key(b'D', version))?
            .map(|b| rmp_serde::from_slice(&b).context("corrupt checkpoint metadata"))
            .transpose()
    }

    /// Every stored version's metadata, oldest first (but for a version
    /// whose metadata and checkpoint are both damaged: see `open`).
    pub fn list(&self) -> Result<Vec<Metadata>> {
        let mut all = Vec::new();
        for entry in self.tree.scan_prefix([b'D']) {
            if let Ok(metadata) = rmp_serde::from_slice(&entry?.1) {
                all.push(metadata);
            }
        }
        Ok(all)
    }

    pub fn pinned(&self) -> Result<BTreeSet<u64>> {
        self.tree
            .scan_prefix([b'P'])
            .map(|entry| be_u64(&entry?.0[1..]))
            .collect()
    }

    /// Pins (kept by retention) or unpins a version.
    pub fn set_pinned(&self, version: u64, pinned: bool) -> Result<(), Error> {
        let _guard = self.serialised();
        if !self.contains(version)? {
            return Err(Error::UnknownVersion(version));
        }
        if pinned {
            self.tree.insert(key(b'P', version), &[])?;
        } else {
            self.tree.remove(key(b'P', version))?;
        }
        self.room.flush(&self.db)?;
        Ok(())
    }

    /// Deletes a version (never the active one). Returns its metadata.
    pub fn delete(&self, version: u64) -> Result<Metadata, Error> {
        let _guard = self.serialised();
        if self.counter(Counter::Active)? == Some(version) {
            return Err(Error::InUse(version));
        }
        let metadata = self.metadata(version)?.ok_or(Error::UnknownVersion(version))?;
        let mut batch = sled::Batch::default();
        self.remove_chunks(&mut batch, &key(b'V', version))?;
        for tag in [b'D', b'P'] {
            batch.remove(key(tag, version));
        }
        self.tree.apply_batch(batch)?;
        self.room.flush(&self.db)?;
        Ok(metadata)
    }

    /// Versions retention would delete: all but the newest `keep_last`, the
    /// pinned ones, the best by eval loss, and the active one.
    pub fn retention_victims(&self, keep_last: usize) -> Result<Vec<u64>> {
        let all = self.list()?;
        let mut keep: BTreeSet<u64> = all.iter().rev().take(keep_last).map(|m| m.version).collect();
        keep.extend(self.pinned()?);
        keep.extend(self.active_version()?);
        keep.extend(best_by_eval(&all));
        Ok(all.iter().map(|m| m.version).filter(|v| !keep.contains(v)).collect())
    }

    /// The lease epoch this store's node last led under (set when it took over).
    pub fn led_epoch(&self) -> Result<Option<u64>> {
        self.counter(Counter::LedEpoch)
    }

    pub fn set_led_epoch(&self, epoch: u64) -> Result<()> {
        self.tree.insert(meta(Counter::LedEpoch), &epoch.to_be_bytes())?;
        self.room.flush(&self.db)?;
        Ok(())
    }

    /// Keeps `checkpoint` (version 0: no number could be had) as the
    /// pending one, replacing any before it; flushed before it returns.
    pub fn set_pending(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        let _guard = self.serialised();
        let mut batch = sled::Batch::default();
        let _room = self.put_chunks(&mut batch, PENDING, checkpoint)?;
        self.tree.apply_batch(batch)?;
        self.room.flush(&self.db)?;
        Ok(())
    }

    /// The pending checkpoint, if one is kept ([`Error::Damaged`] when it
    /// does not decode).
    pub fn pending(&self) -> Result<Option<Checkpoint>, Error> {
        let bytes = self.read_chunks(PENDING)?;
        if bytes.is_empty() {
            return Ok(None);
        }
        Checkpoint::from_bytes(&bytes).map(Some).map_err(|e| Error::Damaged {
            version: 0,
            why: format!("the pending checkpoint: {e:#}"),
        })
    }

    /// Drops the pending checkpoint (made a version, or given up).
    pub fn clear_pending(&self) -> Result<()> {
        let _guard = self.serialised();
        let mut batch = sled::Batch::default();
        self.remove_chunks(&mut batch, PENDING)?;
        self.tree.apply_batch(batch)?;
        self.room.flush(&self.db)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
