//! The durable, bounded replay buffer in sled. The only module that touches
//! sled.
//!
//! One tree, so that a group of frames, their index entries, evictions and
//! counters commit in one atomic `apply_batch`, followed by one flush (group
//! commit). Keys:
//!
//! | key                                   | value                          |
//! |---------------------------------------|--------------------------------|
//! | `C` split first_seq(u64 BE)           | a chunk: up to `layout::CHUNK_FRAMES` stored frames with consecutive seqs from first_seq (MessagePack, pixels LZ4) |
//! | `I` source 0 episode 0 block(u64 BE)  | an index block: a (step offset, split, seq) record per stored step of the episode's steps block*64.. block*64+63: dedup and export order |
//! | `E` source 0 episode                  | frames held of that episode    |
//! | `S` source                            | frames held of that source     |
//! | `M` name                              | schema version, ring bounds, counters |
//!
//! Each split (train, validation) is a ring of consecutive sequence numbers
//! `[tail, head)`, so uniform sampling is O(batch): draw seqs, read the
//! chunk holding each. Episodes go to the validation split by a stable hash
//! of (source, episode). Nothing here knows about NATS or tensors.
//! Versions live in a second tree, behind their own type ([`Registry`],
//! `registry.rs`); stores written with an older layout are upgraded at open
//! (`upgrade.rs`). Every write first claims room on the disk (`room.rs`):
//! sled must never meet a full disk. The buffer's writes and sampling are
//! in `buffer.rs`, its reads in order (export, series) in `episodes.rs`,
//! its bytes in `layout.rs`; this file opens the database and holds it.

mod buffer;
mod episodes;
mod errors;
mod layout;
mod registry;
mod room;
mod upgrade;
pub use buffer::{BufferConfig, Committed, Stats};
pub use episodes::{Cursor, EpisodeCount, Scope};
pub use errors::Error;
pub use layout::{compress_frames, Compressed, Split};
pub use registry::{best_by_eval, Actor, Change, HistoryEntry, HistoryPage, Provenance, Registry};

/// Entry points for `fuzz/` (cargo fuzz builds with `--cfg fuzzing`): the
/// decoders of what sled holds, fed arbitrary bytes. In no normal build.
#[cfg(fuzzing)]
pub mod fuzzing {
    /// Decodes a frame chunk and every frame in it, pixels included.
    pub fn chunk(bytes: &[u8]) {
        if let Ok(frames) = super::layout::decode_chunk(bytes) {
            for frame in frames {
                let _ = frame.to_frame(true);
            }
        }
    }

    /// Decodes an index block.
    pub fn index_block(bytes: &[u8]) {
        let _ = super::layout::decode_index_block(bytes);
    }
}

use anyhow::{bail, Context, Result};
use layout::{be_u64, meta_key};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Layout version of the store. A store with a newer one is refused; an
/// older one is upgraded in place. 2: checkpoint envelopes in chunks
/// (`checkpoints.rs`); schema 1's whole envelopes still read the same way.
/// 3: frames in chunks, pixels LZ4, the index in blocks (`upgrade.rs`
/// rewrites the frames and index of older stores).
pub const SCHEMA_VERSION: u64 = 3;
/// sled's page cache. Its default is 1 GiB; sampling reads are random, so a
/// big cache buys little, and the daemon must stay well inside its memory
/// (sled alone, 20,000 frames in: ~55 MB resident at 32 MB, ~76 at 64).
const SLED_CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// How long opening waits for a store's lock. sled's I/O threads let go of
/// a store a moment after it is closed, so a store just closed (by this
/// process, or by a daemon exiting) can look locked for a few ms.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
const LOCK_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);
/// The write that tells a full disk from a store that keeps an old error:
/// a group commit's worth of frames, so a disk that takes it has room for one.
const PROBE_BYTES: usize = 1 << 20;
use room::Room;

/// The replay buffer. Clones share one sled database; writes are
/// serialised by an internal lock, reads (sampling) run alongside.
#[derive(Clone)]
pub struct Store {
    /// The directory the store lives in.
    dir: std::path::PathBuf,
    db: sled::Db,
    tree: sled::Tree,
    registry: Registry,
    /// The disk's room, claimed by every write before it reaches sled.
    room: Room,
    config: BufferConfig,
    counters: Arc<Mutex<buffer::Counters>>,
    /// The write failure sled latched, once [`Store::check_write_failure`]
    /// found the disk taking writes again: this store must be reopened.
    latched: Arc<Mutex<Option<String>>>,
}

impl Store {
    /// Opens (or creates) the store in `dir`. Refuses a store written by a
    /// newer wmvae, and says so when another process holds it.
    pub fn open(dir: &Path, config: BufferConfig) -> Result<Store> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let locked_since = std::time::Instant::now();
        let db = loop {
            match sled::Config::new()
                .path(dir.join("sled"))
                .cache_capacity(SLED_CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock") => {
                    if locked_since.elapsed() >= LOCK_WAIT {
                        bail!(
                            "store {} is locked by another process (is wmvae serve running?)",
                            dir.display()
                        );
                    }
                    std::thread::sleep(LOCK_RETRY_INTERVAL);
                }
                Err(other) => bail!("opening store {}: {other}", dir.display()),
            }
        };
        let tree = db.open_tree("buffer")?;
        let room = Room::new(dir);
        let registry = Registry::open(&db, room.clone())?;
        let mut store = Store {
            dir: dir.to_owned(),
            db,
            tree,
            registry,
            room,
            config,
            counters: Arc::default(),
            latched: Arc::default(),
        };
        store.migrate()?;
        store.counters = Arc::new(Mutex::new(store.read_counters()?));
        Ok(store)
    }

    /// Applies the store's schema version: writes it on a new store, accepts
    /// an equal one, upgrades an older one in place, refuses a newer one
    /// (never rewrites it).
    fn migrate(&self) -> Result<()> {
        let found = self
            .tree
            .get(meta_key("schema_version"))?
            .map(|v| be_u64(&v))
            .transpose()?;
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                bail!(
                    "store schema version {found} was written by a newer wmvae; this build knows up to \
                    {SCHEMA_VERSION}"
                )
            }
            Some(found) if found == SCHEMA_VERSION => {}
            // New, or older: older frames move to the new layout (a new store
            // has none), and older builds must now refuse the store.
            _ => {
                upgrade::frames_and_index(self)?;
                self.tree
                    .insert(meta_key("schema_version"), &SCHEMA_VERSION.to_be_bytes())?;
                self.room.flush(&self.db)?;
            }
        }
        Ok(())
    }

    /// The version registry in the same database.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// After a write to the store failed: Ok when it was refused for want
    /// of room ([`Error::NoRoom`]: sled saw nothing, the write succeeds once there
    /// is room) or while the store's disk refuses a small write of its own
    /// too (the caller waits for space), else [`Error::NeedsReopen`] to stop on.
    /// sled keeps the first write error it hits and fails every later write
    /// with it, so once the disk takes writes again only reopening the
    /// store clears it.
    pub fn check_write_failure(&self, failed: &Error) -> Result<(), Error> {
        if let Error::NoRoom { .. } = failed {
            return Ok(());
        }
        let probe = self.dir.join(".write-probe");
        let disk_takes_writes = self.room.claim(PROBE_BYTES as u64, || "a write probe".into()).is_ok()
            && std::fs::File::create(&probe)
                .and_then(|mut f| std::io::Write::write_all(&mut f, &[0u8; PROBE_BYTES]).and_then(|()| f.sync_all()))
                .is_ok();
        let _ = std::fs::remove_file(&probe);
        if !disk_takes_writes {
            return Ok(());
        }
        let failed = format!("{failed:#}");
        *self.latched.lock().unwrap_or_else(|p| p.into_inner()) = Some(failed.clone());
        Err(Error::NeedsReopen {
            dir: self.dir.clone(),
            failed,
        })
    }

    /// Whether the store takes a write now, for a part whose write failed
    /// somewhere inside a longer operation (a takeover): a small write of
    /// its own, room claimed first, flushed. [`Error::NoRoom`] on a full
    /// disk, [`Error::NeedsReopen`] when sled keeps an earlier write error
    /// though the disk takes writes again ([`Store::check_write_failure`]),
    /// else sled's error; Ok when it writes.
    pub fn check_writes(&self) -> Result<(), Error> {
        let _room = self.room.claim(PROBE_BYTES as u64, || "a write check".into())?;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let written = self
            .tree
            .insert(meta_key("write_check"), &at.to_be_bytes())
            .and_then(|_| self.room.flush(&self.db));
        let Err(e) = written else { return Ok(()) };
        let failed = Error::from(e);
        self.check_write_failure(&failed)?;
        Err(failed)
    }

    /// [`Error::NeedsReopen`] once a write failure was found latched
    /// ([`Store::check_write_failure`]), for whoever holds the store to
    /// reopen it, whichever part met it; else None.
    pub fn needs_reopen(&self) -> Option<Error> {
        let latched = self.latched.lock().unwrap_or_else(|p| p.into_inner()).clone();
        latched.map(|failed| Error::NeedsReopen {
            dir: self.dir.clone(),
            failed,
        })
    }

    /// How long the oldest store write in flight has been going on (None:
    /// none is): sled 0.34 can leave a write waiting for ever after one met
    /// a full disk, and only a new process opens the store again then.
    pub fn oldest_write(&self) -> Option<std::time::Duration> {
        self.room.oldest_write()
    }

    /// Flushes everything to disk (for shutdown; `commit` already flushes).
    pub fn flush(&self) -> Result<()> {
        self.room.flush(&self.db)?;
        Ok(())
    }
}
