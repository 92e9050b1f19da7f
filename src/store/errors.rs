//! The store's errors, one enum whose variants the daemon and the CLI tell
//! apart by matching (a 404, a 400, a reopen, a wait for room); anything
//! else is [`Error::Other`]. Only the messages live here; where each is
//! raised is the registry's, the buffer's or the room's.

use super::room::RESERVE_BYTES;
use std::path::PathBuf;
use thiserror::Error;

/// An error of the store that a caller may act on by its kind.
#[derive(Debug, Error)]
pub enum Error {
    /// A version that does not exist (any more): exit code 2 at the CLI, 404 on the service.
    #[error("no checkpoint version {0} (unknown or deleted)")]
    UnknownVersion(u64),
    /// A version that can't be deleted because it is the active one (a
    /// refused request: 400 on the service).
    #[error("checkpoint v{0} is the active version; roll back to another first")]
    InUse(u64),
    /// A stored version whose bytes do not decode or match their sha256
    /// (bit rot, a torn write): never loaded or made active. The daemon
    /// repairs it from the object store's copy, or rolls back past it
    /// ([`super::Change::Recovery`]).
    #[error("checkpoint v{version} in the store is damaged: {why}")]
    Damaged {
        /// The damaged version (0: the pending checkpoint).
        version: u64,
        /// What failed to decode or match, for people.
        why: String,
    },
    /// The store can't write though its disk takes writes again: sled
    /// keeps the first write error it hits until the database is reopened.
    /// Whoever holds the store drops every clone of it and opens it again
    /// (the daemon restarts its parts in-process); nothing acked is lost.
    #[error(
        "the store in {} can't write, though its disk takes writes again: sled keeps a write error until the store \
        is reopened ({failed})",
        dir.display()
    )]
    NeedsReopen {
        /// The store's folder.
        dir: PathBuf,
        /// The write failure that sled keeps, for people.
        failed: String,
    },
    /// A write refused because the store's disk has no room for it:
    /// nothing reached sled, so the write succeeds once there is room
    /// again (no reopen needed).
    #[error(
        "no room on the store's disk for {what}: it needs {:.1} MB free (with {} MB kept for sled), {:.1} MB are (No \
        space left on device)",
        *needed as f64 / 1e6,
        RESERVE_BYTES >> 20,
        *free as f64 / 1e6
    )]
    NoRoom {
        /// What was to be written, for people.
        what: String,
        /// Bytes the write needed free, the reserve included.
        needed: u64,
        /// Bytes free, less what writes in flight claimed.
        free: u64,
    },
    /// Any other failure (sled's, a codec's, the model's).
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// sled's own failures are [`Error::Other`], so `?` reads as it does in
/// functions returning `anyhow::Result`.
impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::Other(e.into())
    }
}
