//! The version registry in sled's `checkpoints` tree: immutable versions
//! (checkpoint envelopes), the active one, pins, and the history of every
//! change of the active version. Its own type over the store's shared sled
//! database: it knows nothing of frames, and the buffer nothing of it. Version numbers only grow and are never reused: the counter is
//! committed in the same atomic batch as the version it hands out. A
//! checkpoint's envelope is written only once the disk has room for it
//! (`room.rs`).
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

use super::layout::be_u64;
use super::room::{Claim, Room, CHECKPOINT_FACTOR};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// A version that does not exist (any more): exit code 2 at the CLI, 404 on the service.
#[derive(Debug)]
pub struct UnknownVersion(pub u64);

impl std::fmt::Display for UnknownVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no checkpoint version {} (unknown or deleted)", self.0)
    }
}

impl std::error::Error for UnknownVersion {}

/// A version that can't be deleted because it is the active one (a refused
/// request: 400 on the service).
#[derive(Debug)]
pub struct InUse(pub u64);

impl std::fmt::Display for InUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint v{} is the active version; roll back to another first", self.0)
    }
}

impl std::error::Error for InUse {}

/// A stored version whose bytes do not decode or match their sha256 (bit
/// rot, a torn write): never loaded or made active. The daemon repairs it
/// from the object store's copy, or rolls back past it
/// ([`Change::Recovery`]).
#[derive(Debug)]
pub struct Damaged {
    pub version: u64,
    why: String,
}

impl std::fmt::Display for Damaged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "checkpoint v{} in the store is damaged: {}", self.version, self.why)
    }
}

impl std::error::Error for Damaged {}

/// The version with the lowest finite eval loss, if any has one.
pub fn best_by_eval(all: &[Metadata]) -> Option<u64> {
    all.iter()
        .filter_map(|m| Some((m.eval_loss.filter(|l| l.is_finite())?, m.version)))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, version)| version)
}

/// Why the active version changed. Stored and shown as the strings each
/// variant names (the history's `why`, pinned in JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Version 1: fresh weights on a new store.
    #[serde(rename = "initial")]
    Initial,
    /// A checkpoint of training.
    #[serde(rename = "trained")]
    Trained,
    /// An operator's rollback (live or offline).
    #[serde(rename = "rollback")]
    Rollback,
    /// The trainer's own rollback after a run of diverging steps.
    #[serde(rename = "automatic rollback on divergence")]
    AutoRollback,
    /// Weights trained elsewhere.
    #[serde(rename = "import")]
    Import,
    /// A new leader's store catching up with the active version (from the
    /// object store's full checkpoint).
    #[serde(rename = "takeover")]
    Takeover,
    /// The daemon's rollback past an active version found [`Damaged`] in
    /// the store, with no copy of it in the object store.
    #[serde(rename = "recovery from a damaged version")]
    Recovery,
}

impl Change {
    /// Whether the active version went back to an older one (announced as a `rollback`).
    pub fn is_rollback(self) -> bool {
        matches!(self, Change::Rollback | Change::AutoRollback | Change::Recovery)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Change::Initial => "initial",
            Change::Trained => "trained",
            Change::Rollback => "rollback",
            Change::AutoRollback => "automatic rollback on divergence",
            Change::Import => "import",
            Change::Takeover => "takeover",
            Change::Recovery => "recovery from a damaged version",
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// One change of the active version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// RFC 3339.
    pub at: String,
    pub from: Option<u64>,
    pub to: u64,
    pub why: Change,
    /// Who asked: "wmvae" for the daemon itself, else a NATS user or user@host.
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
fn meta(name: &str) -> Vec<u8> {
    [b"M", name.as_bytes()].concat()
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

impl Registry {
    /// Opens the registry, rebuilding any version's listing metadata that
    /// no longer decodes from its envelope (which carries it too).
    pub(super) fn open(db: &sled::Db, room: Room) -> Result<Registry> {
        let registry = Registry { db: db.clone(), tree: db.open_tree("checkpoints")?, lock: Arc::default(), room };
        registry.repair_listings()?;
        Ok(registry)
    }

    /// `D` entries that do not decode, rewritten from intact envelopes; a
    /// version damaged in both stays out of listings ([`Registry::list`]).
    fn repair_listings(&self) -> Result<()> {
        for entry in self.tree.scan_prefix([b'D']) {
            let (k, v) = entry?;
            if rmp_serde::from_slice::<Metadata>(&v).is_ok() {
                continue;
            }
            let version = be_u64(&k[1..])?;
            match self.get(version) {
                Ok(Some(checkpoint)) => {
                    self.tree.insert(k, rmp_serde::to_vec_named(&checkpoint.metadata)?)?;
                    self.db.flush()?;
                    tracing::warn!(version, "v{version}'s listing metadata was damaged; rebuilt from its checkpoint");
                }
                Ok(None) => tracing::error!(version, "v{version}'s listing metadata is damaged and its checkpoint is gone"),
                Err(e) => tracing::error!(version, "v{version}'s listing metadata is damaged, and so is its checkpoint ({e:#}); it stays out of listings"),
            }
        }
        Ok(())
    }

    /// Replaces a stored version's bytes with `checkpoint` (the same
    /// version, from a good copy such as the object store's, sha256
    /// checked by the caller): a [`Damaged`] version made whole again.
    pub fn repair(&self, checkpoint: &Checkpoint) -> Result<()> {
        let _guard = self.serialised();
        let version = checkpoint.metadata.version;
        if !self.contains(version)? {
            return Err(UnknownVersion(version).into());
        }
        let mut batch = sled::Batch::default();
        let _room = self.put_chunks(&mut batch, &key(b'V', version), checkpoint)?;
        batch.insert(key(b'D', version), rmp_serde::to_vec_named(&checkpoint.metadata)?);
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
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
    /// once the disk has room for it ([`super::NoRoom`] else): the room
    /// stays claimed while the returned [`Claim`] lives (until the batch
    /// is applied and flushed).
    fn put_chunks(&self, batch: &mut sled::Batch, prefix: &[u8], checkpoint: &Checkpoint) -> Result<Claim> {
        let bytes = checkpoint.to_bytes()?;
        let what = || match prefix == PENDING {
            true => format!("the pending checkpoint ({:.1} MB)", bytes.len() as f64 / 1e6),
            false => format!("checkpoint v{} ({:.1} MB)", checkpoint.metadata.version, bytes.len() as f64 / 1e6),
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

    fn counter(&self, name: &str) -> Result<Option<u64>> {
        self.tree.get(meta(name))?.map(|v| be_u64(&v)).transpose()
    }

    /// Adds "`version` is now active" and its history entry to `batch`;
    /// returns the version active before.
    fn activate_in(&self, batch: &mut sled::Batch, version: u64, why: Change, by: &str, reason: Option<&str>) -> Result<Option<u64>> {
        let from = self.counter("active")?;
        batch.insert(meta("active"), &version.to_be_bytes());
        let entry = HistoryEntry { at: now_rfc3339(), from, to: version, why, by: by.into(), reason: reason.map(str::to_string) };
        let seq = self.counter("history_next")?.unwrap_or(0);
        batch.insert(key(b'H', seq), rmp_serde::to_vec_named(&entry)?);
        batch.insert(meta("history_next"), &(seq + 1).to_be_bytes());
        Ok(from)
    }

    /// The number the next version gets when none is `given` to [`Registry::add`].
    pub fn next_free(&self) -> Result<u64> {
        Ok(self.counter("next_version")?.unwrap_or(1))
    }

    /// Stores a new version built by `make` (given its number) and makes it
    /// the active one with a history entry. The number is `given` (allocated
    /// across nodes, never below [`Registry::next_free`]) or the registry's
    /// next. Atomic and flushed before it returns.
    pub fn add(&self, given: Option<u64>, make: impl FnOnce(u64) -> Result<Checkpoint>, why: Change, by: &str, reason: Option<&str>) -> Result<Checkpoint> {
        let _guard = self.serialised();
        let next = self.next_free()?;
        let version = given.unwrap_or(next);
        if version < next {
            bail!("v{version} is below this store's next version number v{next}: numbers are never reused");
        }
        let checkpoint = make(version)?;
        if checkpoint.metadata.version != version {
            bail!("checkpoint built as v{} but v{version} was allocated", checkpoint.metadata.version);
        }
        let mut batch = sled::Batch::default();
        let _room = self.put_chunks(&mut batch, &key(b'V', version), &checkpoint)?;
        batch.insert(key(b'D', version), rmp_serde::to_vec_named(&checkpoint.metadata)?);
        batch.insert(meta("next_version"), &(version + 1).to_be_bytes());
        self.activate_in(&mut batch, version, why, by, reason)?;
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(checkpoint)
    }

    /// Makes an existing version active, once its stored bytes decode and
    /// match their sha256 (a damaged version is never made active). Returns
    /// the previous active version.
    pub fn activate(&self, version: u64, why: Change, by: &str, reason: Option<&str>) -> Result<Option<u64>> {
        let _guard = self.serialised();
        if self.get(version).with_context(|| format!("v{version} is not made active"))?.is_none() {
            return Err(UnknownVersion(version).into());
        }
        let mut batch = sled::Batch::default();
        let from = self.activate_in(&mut batch, version, why, by, reason)?;
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(from)
    }

    pub fn active_version(&self) -> Result<Option<u64>> {
        self.counter("active")
    }

    /// Whether `version` is stored (its metadata is written and removed
    /// in the same batches as its envelope).
    fn contains(&self, version: u64) -> Result<bool> {
        Ok(self.tree.contains_key(key(b'D', version))?)
    }

    /// A whole checkpoint, its sha256 verified ([`Damaged`] when that fails).
    pub fn get(&self, version: u64) -> Result<Option<Checkpoint>> {
        // A schema 1 store has one piece under the bare prefix.
        let bytes = self.read_chunks(&key(b'V', version))?;
        if bytes.is_empty() {
            return Ok(None);
        }
        Checkpoint::from_bytes(&bytes).map(Some).map_err(|e| Damaged { version, why: format!("{e:#}") }.into())
    }

    pub fn metadata(&self, version: u64) -> Result<Option<Metadata>> {
        self.tree.get(key(b'D', version))?.map(|b| rmp_serde::from_slice(&b).context("corrupt checkpoint metadata")).transpose()
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
        self.tree.scan_prefix([b'P']).map(|entry| be_u64(&entry?.0[1..])).collect()
    }

    /// Pins (kept by retention) or unpins a version.
    pub fn set_pinned(&self, version: u64, pinned: bool) -> Result<()> {
        let _guard = self.serialised();
        if !self.contains(version)? {
            return Err(UnknownVersion(version).into());
        }
        if pinned {
            self.tree.insert(key(b'P', version), &[])?;
        } else {
            self.tree.remove(key(b'P', version))?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Deletes a version (never the active one). Returns its metadata.
    pub fn delete(&self, version: u64) -> Result<Metadata> {
        let _guard = self.serialised();
        if self.counter("active")? == Some(version) {
            return Err(InUse(version).into());
        }
        let metadata = self.metadata(version)?.ok_or(UnknownVersion(version))?;
        let mut batch = sled::Batch::default();
        self.remove_chunks(&mut batch, &key(b'V', version))?;
        for tag in [b'D', b'P'] {
            batch.remove(key(tag, version));
        }
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
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

    /// History entries not yet announced on NATS (made offline, before a
    /// crash, or while NATS was away), oldest first, with their sequence numbers.
    fn unannounced(&self) -> Result<Vec<(u64, HistoryEntry)>> {
        let from = self.counter("history_announced")?.unwrap_or(0);
        let mut out = Vec::new();
        for entry in self.tree.range(key(b'H', from)..key(b'H', u64::MAX)) {
            let (k, v) = entry?;
            let seq = be_u64(&k[1..])?;
            if !self.tree.contains_key(key(b'A', seq))? {
                out.push((seq, rmp_serde::from_slice(&v).context("corrupt history entry")?));
            }
        }
        Ok(out)
    }

    /// History entries not yet announced on NATS, oldest first.
    pub fn unannounced_history(&self) -> Result<Vec<HistoryEntry>> {
        Ok(self.unannounced()?.into_iter().map(|(_, entry)| entry).collect())
    }

    /// Records that the oldest unannounced change to `version` has been
    /// announced (changes are announced in order): a rollback's when
    /// `rollback`, else the version's making; others stay unannounced.
    pub fn mark_announced(&self, version: u64, rollback: bool) -> Result<()> {
        let _guard = self.serialised();
        let matches = |entry: &HistoryEntry| entry.to == version && entry.why.is_rollback() == rollback;
        let Some((seq, _)) = self.unannounced()?.into_iter().find(|(_, entry)| matches(entry)) else { return Ok(()) };
        // The mark, and `history_announced` moved past every entry now
        // announced in a row (their marks dropped), so the scan above stays
        // as short as what is still unannounced.
        let mut batch = sled::Batch::default();
        let mut watermark = self.counter("history_announced")?.unwrap_or(0);
        if seq != watermark {
            batch.insert(key(b'A', seq), &[]);
        } else {
            watermark += 1;
            while self.tree.contains_key(key(b'A', watermark))? {
                batch.remove(key(b'A', watermark));
                watermark += 1;
            }
            batch.insert(meta("history_announced"), &watermark.to_be_bytes());
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Records that every history entry so far has been announced (or
    /// superseded by the cluster's active version).
    pub fn mark_history_announced(&self) -> Result<()> {
        let _guard = self.serialised();
        let next = self.counter("history_next")?.unwrap_or(0);
        let mut batch = sled::Batch::default();
        batch.insert(meta("history_announced"), &next.to_be_bytes());
        for marked in self.tree.scan_prefix([b'A']).keys() {
            batch.remove(marked?);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// The lease epoch this store's node last led under (set when it took over).
    pub fn led_epoch(&self) -> Result<Option<u64>> {
        self.counter("led_epoch")
    }

    pub fn set_led_epoch(&self, epoch: u64) -> Result<()> {
        self.tree.insert(meta("led_epoch"), &epoch.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// Keeps `checkpoint` (version 0: no number could be had) as the
    /// pending one, replacing any before it; flushed before it returns.
    pub fn set_pending(&self, checkpoint: &Checkpoint) -> Result<()> {
        let _guard = self.serialised();
        let mut batch = sled::Batch::default();
        let _room = self.put_chunks(&mut batch, PENDING, checkpoint)?;
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// The pending checkpoint, if one is kept ([`Damaged`] when it does
    /// not decode).
    pub fn pending(&self) -> Result<Option<Checkpoint>> {
        let bytes = self.read_chunks(PENDING)?;
        if bytes.is_empty() {
            return Ok(None);
        }
        Checkpoint::from_bytes(&bytes).map(Some).map_err(|e| Damaged { version: 0, why: format!("the pending checkpoint: {e:#}") }.into())
    }

    /// Drops the pending checkpoint (made a version, or given up).
    pub fn clear_pending(&self) -> Result<()> {
        let _guard = self.serialised();
        let mut batch = sled::Batch::default();
        self.remove_chunks(&mut batch, PENDING)?;
        self.tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    /// Every change of the active version, oldest first.
    pub fn history(&self) -> Result<Vec<HistoryEntry>> {
        self.tree.scan_prefix([b'H']).map(|entry| rmp_serde::from_slice(&entry?.1).context("corrupt history entry")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{BufferConfig, Store};

    #[test]
    fn announcement_is_tracked_per_entry() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).registry().clone();
        let (v1, v2) = (add(&s, 1.0), add(&s, 2.0));
        s.activate(v1, Change::Rollback, "ops", None).unwrap();
        let whys = |s: &Registry| s.unannounced_history().unwrap().iter().map(|h| (h.to, h.why)).collect::<Vec<_>>();
        assert_eq!(whys(&s), [(v1, Change::Trained), (v2, Change::Trained), (v1, Change::Rollback)]);
        // v2's announcement and the rollback's went out; v1's did not.
        s.mark_announced(v2, false).unwrap();
        s.mark_announced(v1, true).unwrap();
        assert_eq!(whys(&s), [(v1, Change::Trained)]);
        s.mark_history_announced().unwrap();
        assert!(whys(&s).is_empty());
        s.activate(v2, Change::Rollback, "ops", None).unwrap();
        assert_eq!(whys(&s), [(v2, Change::Rollback)], "marks from before do not hide a new entry");
    }

    fn store(dir: &std::path::Path) -> Store {
        Store::open(dir, BufferConfig { capacity: 10, validation_fraction: 0.0 }).unwrap()
    }

    fn add(s: &Registry, eval_loss: f64) -> u64 {
        let make = |version| {
            let metadata = Metadata { version, eval_loss: Some(eval_loss), ..Default::default() };
            Ok(Checkpoint::new(metadata, vec![version as u8; 8], vec![]))
        };
        s.add(None, make, Change::Trained, "wmvae", None).unwrap().metadata.version
    }

    #[test]
    fn versions_grow_across_reopen_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let st = store(dir.path());
            let s = st.registry();
            assert_eq!((add(s, 5.0), add(s, 4.0)), (1, 2));
            s.activate(1, Change::Rollback, "ops@host", Some("bad run")).unwrap();
            s.delete(2).unwrap();
        }
        let st = store(dir.path());
        let s = st.registry();
        assert_eq!(add(s, 3.0), 3, "a deleted version's number is never reused");
        let history: Vec<(Option<u64>, u64, Change)> = s.history().unwrap().into_iter().map(|h| (h.from, h.to, h.why)).collect();
        assert_eq!(history, [(None, 1, Change::Trained), (Some(1), 2, Change::Trained), (Some(2), 1, Change::Rollback), (Some(1), 3, Change::Trained)]);
        assert_eq!(s.get(3).unwrap().unwrap().weights, vec![3u8; 8]);
    }

    #[test]
    fn a_damaged_version_is_never_made_active() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path());
        let s = st.registry();
        assert_eq!((add(s, 5.0), add(s, 4.0)), (1, 2));
        // Flip the byte holding v1's weights (eight 1s: the envelope's last run of them).
        let (chunk, mut bytes) = s.tree.scan_prefix(key(b'V', 1)).next().unwrap().unwrap();
        let at = bytes.windows(8).rposition(|w| w == [1u8; 8]).unwrap();
        let mut damaged = bytes.to_vec();
        damaged[at] ^= 0xff;
        bytes = damaged.into();
        s.tree.insert(chunk, bytes).unwrap();
        let refused = s.activate(1, Change::Rollback, "ops@host", None).unwrap_err();
        assert!(format!("{refused:#}").contains("sha256"), "{refused:#}");
        assert_eq!(s.active_version().unwrap(), Some(2));
        assert!(s.activate(9, Change::Rollback, "ops@host", None).unwrap_err().downcast_ref::<UnknownVersion>().is_some());
    }

    /// A damaged version is found as such, and made whole by `repair`
    /// from a good copy; listing metadata that no longer decodes is rebuilt
    /// from the envelope when the store opens, and a version damaged in
    /// both stays out of listings.
    #[test]
    fn damaged_versions_are_found_and_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2, v3) = {
            let st = store(dir.path());
            let s = st.registry();
            let (v1, v2, v3) = (add(s, 5.0), add(s, 4.0), add(s, 3.0));
            let good = s.get(v1).unwrap().unwrap();
            let (chunk, bytes) = s.tree.scan_prefix(key(b'V', v1)).next().unwrap().unwrap();
            let mut damaged = bytes.to_vec();
            let last = damaged.len() - 1;
            damaged[last] ^= 0xff;
            s.tree.insert(&chunk, damaged.clone()).unwrap();
            let found = s.get(v1).unwrap_err();
            assert!(found.chain().any(|c| c.is::<Damaged>()), "{found:#}");
            s.repair(&good).unwrap();
            assert_eq!(s.get(v1).unwrap().unwrap().weights, good.weights);
            // v2: its listing damaged; v3: its listing and its envelope.
            s.tree.insert(key(b'D', v2), &b"\xc1garbage"[..]).unwrap();
            s.tree.insert(key(b'D', v3), &b"\xc1garbage"[..]).unwrap();
            let (chunk, _) = s.tree.scan_prefix(key(b'V', v3)).next().unwrap().unwrap();
            s.tree.insert(&chunk, damaged).unwrap();
            st.flush().unwrap();
            (v1, v2, v3)
        };
        let st = store(dir.path());
        let listed: Vec<(u64, Option<f64>)> = st.registry().list().unwrap().iter().map(|m| (m.version, m.eval_loss)).collect();
        assert_eq!(listed, vec![(v1, Some(5.0)), (v2, Some(4.0))], "v{v3} is damaged throughout");
    }

    /// A pending checkpoint survives a reopen until cleared, and is no version.
    #[test]
    fn a_pending_checkpoint_is_kept_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        {
            let st = store(dir.path());
            let s = st.registry();
            assert!(s.pending().unwrap().is_none());
            let parent = add(s, 5.0);
            let pending = Checkpoint::new(Metadata { parent: Some(parent), step: 7, ..Default::default() }, vec![9u8; 200_000], vec![1u8; 100_000]);
            s.set_pending(&pending).unwrap();
        }
        let st = store(dir.path());
        let s = st.registry();
        let pending = s.pending().unwrap().unwrap();
        assert_eq!((pending.metadata.parent, pending.metadata.step, pending.weights.len()), (Some(1), 7, 200_000));
        assert_eq!(s.list().unwrap().len(), 1);
        s.clear_pending().unwrap();
        assert!(s.pending().unwrap().is_none());
    }

    #[test]
    fn retention_keeps_newest_pinned_best_and_active() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path());
        let s = st.registry();
        for loss in [9.0, 1.0, 8.0, 7.0, 6.0, 5.0] {
            add(s, loss);
        }
        s.set_pinned(3, true).unwrap();
        // Newest 2 (5, 6), pinned 3, best 2 (loss 1.0), active 6.
        assert_eq!(s.retention_victims(2).unwrap(), [1, 4]);
        assert!(s.delete(6).unwrap_err().to_string().contains("active"));
        assert!(s.activate(42, Change::Rollback, "me", None).is_err());
    }

    /// A checkpoint larger than a chunk is stored in pieces, read back
    /// whole, and deleted without leaving a piece behind.
    #[test]
    fn big_checkpoints_round_trip_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let st = store(dir.path());
        let s = st.registry();
        let weights: Vec<u8> = (0..3 * CHUNK_BYTES + 17).map(|i| (i % 251) as u8).collect();
        let make = |version| Ok(Checkpoint::new(Metadata { version, ..Default::default() }, weights.clone(), vec![1, 2, 3]));
        assert_eq!(s.add(None, make, Change::Trained, "wmvae", None).unwrap().metadata.version, 1);
        add(s, 1.0);
        assert!(s.tree.scan_prefix(key(b'V', 1)).count() > 3);
        let back = s.get(1).unwrap().unwrap();
        assert_eq!((back.weights, back.optimizer), (weights, vec![1, 2, 3]));
        s.delete(1).unwrap();
        assert_eq!(s.tree.scan_prefix(key(b'V', 1)).count(), 0);
        assert!(s.get(1).unwrap().is_none());
    }

    /// A schema 1 store (each envelope whole under `V` version) still reads,
    /// and is marked current so that older builds refuse it from now on.
    #[test]
    fn schema_1_stores_are_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let st = store(dir.path());
            let s = st.registry();
            let old = Checkpoint::new(Metadata { version: 1, ..Default::default() }, vec![9; 100], vec![]);
            s.tree.insert(key(b'V', 1), old.to_bytes().unwrap()).unwrap();
            s.tree.insert(key(b'D', 1), rmp_serde::to_vec_named(&old.metadata).unwrap()).unwrap();
            s.tree.insert(meta("next_version"), &2u64.to_be_bytes()).unwrap();
            st.tree.insert(crate::store::layout::meta_key("schema_version"), &1u64.to_be_bytes()).unwrap();
            st.flush().unwrap();
        }
        let st = store(dir.path());
        let s = st.registry();
        assert_eq!(s.get(1).unwrap().unwrap().weights, vec![9; 100]);
        assert_eq!(st.tree.get(crate::store::layout::meta_key("schema_version")).unwrap().unwrap().as_ref(), crate::store::SCHEMA_VERSION.to_be_bytes());
        s.delete(1).unwrap();
        assert!(s.get(1).unwrap().is_none());
    }
}
