//! What [`Registry::open`] checks, so that a store reopened after a failed
//! write comes back to a state it can use.
//!
//! A sled 0.34 batch that fails part way (a full disk) stays half applied
//! in memory, and those of its records that reached the log come back one
//! by one at the next open (its manifest was cancelled): a version's
//! listing without all its chunks, chunks without a listing, `active`
//! naming a version half there (seen after a checkpoint's batch met a full
//! tmpfs: `tests/disk_faults.rs`). So each version is checked at open: its
//! chunks cheaply (numbered 0.. in a row, each but the last full, the last
//! not), and decoded whole where that can't tell (the last chunk full: a
//! tail may be missing), where its listing must be rebuilt, and for the
//! active one. A version not whole is forgotten (its listing, pin and
//! chunks go, in one batch): never read as if whole, never half there.
//! `active` keeps naming it, and the daemon fetches it again from the
//! object store or rolls back past it (`daemon::resume`). A listing that
//! does not decode is rebuilt from an intact envelope; a version whose
//! listing and envelope are both damaged in place (bit rot, every chunk
//! there) stays out of listings, as before. The counters never stay
//! behind what is stored: a version number or history entry is never
//! handed out twice.

use super::*;
use std::collections::BTreeMap;

/// One version's chunks as found: enough to tell a torn envelope from a
/// whole one without decoding it.
#[derive(Default)]
struct Chunks {
    /// Chunks numbered 0..count.
    count: u32,
    /// A number out of line (a chunk missing before another).
    gap: bool,
    /// A chunk before the last shorter than [`CHUNK_BYTES`].
    short_inside: bool,
    /// The last chunk's length.
    last: usize,
    /// A schema 1 envelope, whole under the bare `V` version key.
    bare: bool,
}

impl Chunks {
    /// Counts the chunk under `key` (`V` version [chunk]), `len` bytes long.
    fn add(&mut self, key: &[u8], len: usize) {
        match key.len() {
            9 => self.bare = true,
            13 => {
                let mut number = [0u8; 4];
                number.copy_from_slice(&key[9..]);
                self.gap |= u32::from_be_bytes(number) != self.count;
                self.short_inside |= self.count > 0 && self.last != CHUNK_BYTES;
                (self.count, self.last) = (self.count + 1, len);
            }
            _ => self.gap = true,
        }
    }

    /// Why these chunks can't make a whole envelope, when they can't.
    fn torn(&self) -> Option<String> {
        if self.bare {
            return (self.count > 0).then(|| "a whole envelope and chunks under one version".into());
        }
        if self.gap {
            return Some(format!(
                "its chunks are not numbered 0 to {} in a row",
                self.count.saturating_sub(1)
            ));
        }
        (self.short_inside || self.last > CHUNK_BYTES).then(|| "a chunk before its last is short".into())
    }

    /// Whether a tail of chunks may be missing: the last one is full.
    fn may_lack_tail(&self) -> bool {
        !self.bare && self.last == CHUNK_BYTES
    }
}

impl Registry {
    /// Checks every version and the counters; see the module's doc.
    pub(super) fn verify(&self) -> Result<()> {
        let mut found: BTreeMap<u64, Chunks> = BTreeMap::new();
        for entry in self.tree.scan_prefix([b'V']) {
            let (k, v) = entry?;
            // (Every `V` key holds a version number: no shorter one is ever written.)
            let Some(version) = k.get(1..9) else { continue };
            found.entry(be_u64(version)?).or_default().add(&k, v.len());
        }
        let mut versions: BTreeSet<u64> = found.keys().copied().collect();
        for k in self.tree.scan_prefix([b'D']).keys() {
            versions.insert(be_u64(&k?[1..])?);
        }
        let active = self.counter(Counter::Active)?;
        for &version in &versions {
            self.check(version, found.get(&version), active)?;
        }
        for k in self.tree.scan_prefix([b'P']).keys() {
            let k = k?;
            if !self.contains(be_u64(&k[1..])?)? {
                self.tree.remove(k)?;
            }
        }
        if let Some(&newest) = versions.last() {
            if self.next_free()? <= newest {
                self.tree
                    .insert(meta(Counter::NextVersion), &(newest + 1).to_be_bytes())?;
                tracing::warn!(
                    newest,
                    "the next version number was behind v{newest} in the store; moved past it"
                );
            }
        }
        if let Some(last) = self.tree.scan_prefix([b'H']).keys().next_back() {
            let last = be_u64(&last?[1..])?;
            if self.counter(Counter::HistoryNext)?.unwrap_or(0) <= last {
                self.tree
                    .insert(meta(Counter::HistoryNext), &(last + 1).to_be_bytes())?;
                tracing::warn!("the history's next entry number was behind its entry {last}; moved past it");
            }
        }
        self.room.flush(&self.db)?;
        Ok(())
    }

    /// One version: forgotten when not whole, its listing rebuilt when
    /// that is all that is wrong.
    fn check(&self, version: u64, chunks: Option<&Chunks>, active: Option<u64>) -> Result<()> {
        let listing = self.tree.get(key(b'D', version))?;
        let listed = listing
            .as_deref()
            .map(|bytes| rmp_serde::from_slice::<Metadata>(bytes).is_ok());
        let Some(chunks) = chunks else {
            return self.forget(version, "its envelope is gone", active);
        };
        if let Some(why) = chunks.torn() {
            return self.forget(version, &why, active);
        }
        if listed == Some(true) && active != Some(version) && !chunks.may_lack_tail() {
            return Ok(());
        }
        match self.get(version) {
            Ok(Some(checkpoint)) if listed != Some(true) => {
                self.tree
                    .insert(key(b'D', version), rmp_serde::to_vec_named(&checkpoint.metadata)?)?;
                let was = if listed.is_some() { "damaged" } else { "missing" };
                tracing::warn!(
                    version,
                    "v{version}'s listing metadata was {was}; rebuilt from its checkpoint"
                );
            }
            Ok(_) => {}
            Err(e) if chunks.may_lack_tail() => {
                return self.forget(
                    version,
                    &format!(
                        "a tail of its chunks is missing: \
                {e:#}"
                    ),
                    active,
                )
            }
            Err(e) => match listed {
                None => {
                    return self.forget(
                        version,
                        &format!(
                            "chunks without a listing that do not decode: \
                    {e:#}"
                        ),
                        active,
                    )
                }
                Some(false) => tracing::error!(
                    version,
                    "v{version}'s listing metadata is damaged, and so is its \
                    checkpoint ({e:#}); it stays out of listings"
                ),
                // Damaged in place: the daemon repairs the active version or rolls back past it.
                Some(true) => tracing::error!(version, "{e:#}"),
            },
        }
        Ok(())
    }

    /// Drops what is left of a version that is not whole, in one batch.
    fn forget(&self, version: u64, why: &str, active: Option<u64>) -> Result<()> {
        let mut batch = sled::Batch::default();
        self.remove_chunks(&mut batch, &key(b'V', version))?;
        batch.remove(key(b'D', version));
        batch.remove(key(b'P', version));
        self.tree.apply_batch(batch)?;
        let then = match active == Some(version) {
            true => "; it is the active version: it is fetched again from the object store, or rolled back past",
            false => "",
        };
        tracing::error!(
            version,
            "v{version} is not whole in the store ({why}): a write that failed part way (a full \
            disk?) left it so; forgotten{then}"
        );
        Ok(())
    }
}
