//! The store's errors, each a type the daemon and the CLI tell apart (a
//! 404, a 400, a reopen, a wait for room). Only the messages live here;
//! where each is raised is the registry's, the buffer's or the room's.

use super::room::RESERVE_BYTES;
use std::path::PathBuf;
use thiserror::Error;

/// A version that does not exist (any more): exit code 2 at the CLI, 404 on the service.
#[derive(Debug, Error)]
#[error("no checkpoint version {0} (unknown or deleted)")]
pub struct UnknownVersion(pub u64);

/// A version that can't be deleted because it is the active one (a refused
/// request: 400 on the service).
#[derive(Debug, Error)]
#[error("checkpoint v{0} is the active version; roll back to another first")]
pub struct InUse(pub u64);

/// A stored version whose bytes do not decode or match their sha256 (bit
/// rot, a torn write): never loaded or made active. The daemon repairs it
/// from the object store's copy, or rolls back past it
/// ([`super::Change::Recovery`]).
#[derive(Debug, Error)]
#[error("checkpoint v{version} in the store is damaged: {why}")]
pub struct Damaged {
    pub version: u64,
    pub(super) why: String,
}

/// The store can't write though its disk takes writes again: sled keeps
/// the first write error it hits until the database is reopened. Whoever
/// holds the store drops every clone of it and opens it again (the daemon
/// restarts its parts in-process); nothing acked is lost.
#[derive(Debug, Error)]
#[error(
    "the store in {} can't write, though its disk takes writes again: sled keeps a write error until the store is \
    reopened ({failed})",
    dir.display()
)]
pub struct NeedsReopen {
    pub(super) dir: PathBuf,
    pub(super) failed: String,
}

/// A write refused because the store's disk has no room for it: nothing
/// reached sled, so the write succeeds once there is room again (no
/// reopen needed).
#[derive(Debug, Error)]
#[error(
    "no room on the store's disk for {what}: it needs {:.1} MB free (with {} MB kept for sled), {:.1} MB are (No \
    space left on device)",
    *needed as f64 / 1e6,
    RESERVE_BYTES >> 20,
    *free as f64 / 1e6
)]
pub struct NoRoom {
    /// What was to be written, for people.
    pub what: String,
    pub needed: u64,
    pub free: u64,
}
