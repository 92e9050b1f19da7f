//! Room on the store's disk, checked before every write reaches sled.
//!
//! sled 0.34 must never meet a full disk: a write that fails inside a
//! batch leaves the batch half applied in memory and, after a reopen, part
//! of it recovered and part not (a checkpoint's `active` and half its
//! chunks, without its listing); and a large value's file that fails to be
//! written leaks a writer of sled's I/O buffer, so the next flush never
//! returns (both seen on a 120 MB tmpfs; `tests/disk_faults.rs`). So each
//! write claims what sled will take for it, plus [`RESERVE_BYTES`], against
//! the disk's free bytes less what writes in flight have claimed, and is
//! refused with [`Error::NoRoom`] before it starts when that is short: sled then
//! holds no error, and the write succeeds once there is room again. Another
//! program can still fill the disk between a claim and its write: each
//! claim and flush is timed while in flight ([`Room::oldest_write`]), for the
//! daemon to find a write sled left waiting for ever.
//!
//! With the `failpoints` feature, `FAILPOINTS=store-write=return(FLAG)`
//! makes the disk read as having the bytes the file FLAG holds free (none
//! when it is empty) while FLAG exists: tests fill and free it at will;
//! `store-claimed=return(FLAG)` holds each write just after its claim while
//! FLAG exists, for a test to fill the disk under it.

use super::errors::Error;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kept free beyond every write's own claim: sled's own writes (segment
/// cleaning, snapshots, a new 512 KB log segment) come on top of ours.
pub(super) const RESERVE_BYTES: u64 = 16 << 20;
/// What sled takes on disk for a group commit, per byte of compressed
/// frames: 1.3x overall for incompressible frames and 2.4x for the worst
/// batch, measured; 4.7x for a 0.4 MB batch of well-compressed ones, whose
/// index and counters weigh more (the reserve covers that).
pub(super) const COMMIT_FACTOR: u64 = 3;
/// What sled takes for a checkpoint envelope, per byte: a 51 MB one grew
/// the store by ~125 MB and peaked at ~126 MB over it while written (its
/// 64 KB chunks sit in leaves of 16 that are rewritten whole as they fill).
pub(super) const CHECKPOINT_FACTOR: u64 = 3;

/// The disk's room, shared by every clone of a store: free bytes less the
/// claims of writes in flight.
#[derive(Clone)]
pub(super) struct Room(Arc<Disk>);

struct Disk {
    /// The store's directory, on the disk in question.
    dir: PathBuf,
    /// Bytes claimed by writes in flight.
    claimed: Mutex<u64>,
    /// When each write in flight (a claim, a flush) began, by a number of its own.
    in_flight: Mutex<BTreeMap<u64, Instant>>,
    next_write: AtomicU64,
}

impl Disk {
    fn claimed(&self) -> std::sync::MutexGuard<'_, u64> {
        // A plain number: a thread that panicked holding it left it whole.
        self.claimed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn in_flight(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Instant>> {
        // Plain data as well.
        self.in_flight.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A write in flight, timed until it is dropped: sled 0.34 can leave a
/// write waiting for ever after it met a full disk ([`Room::oldest_write`]).
struct InFlight {
    disk: Arc<Disk>,
    number: u64,
}

impl InFlight {
    fn begin(disk: &Arc<Disk>) -> InFlight {
        let number = disk.next_write.fetch_add(1, Ordering::Relaxed);
        disk.in_flight().insert(number, Instant::now());
        InFlight {
            disk: disk.clone(),
            number,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.disk.in_flight().remove(&self.number);
    }
}

/// Room claimed by one write until it is dropped (done, or failed); the
/// write counts as in flight meanwhile.
pub(super) struct Claim {
    disk: Arc<Disk>,
    bytes: u64,
    _in_flight: InFlight,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut claimed = self.disk.claimed();
        *claimed = claimed.saturating_sub(self.bytes);
    }
}

impl Room {
    pub(super) fn new(dir: &Path) -> Room {
        Room(Arc::new(Disk {
            dir: dir.to_owned(),
            claimed: Mutex::new(0),
            in_flight: Mutex::default(),
            next_write: AtomicU64::new(0),
        }))
    }

    /// Flushes `db`, the flush counting as a write in flight.
    pub(super) fn flush(&self, db: &sled::Db) -> sled::Result<()> {
        let _in_flight = InFlight::begin(&self.0);
        db.flush().map(drop)
    }

    /// How long the oldest write in flight (a claim not yet dropped, a
    /// flush) has been going on; None when there is none.
    pub(super) fn oldest_write(&self) -> Option<Duration> {
        self.0.in_flight().values().min().map(Instant::elapsed)
    }

    /// Claims room for a write that takes `bytes` on disk, plus the
    /// reserve; [`Error::NoRoom`] when the disk has less free than that beyond
    /// what other writes claimed.
    pub(super) fn claim(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<Claim, Error> {
        let claim = self.claim_now(bytes, what)?;
        #[cfg(feature = "failpoints")]
        hold_after_claim();
        Ok(claim)
    }

    fn claim_now(&self, bytes: u64, what: impl FnOnce() -> String) -> Result<Claim, Error> {
        let mut claimed = self.0.claimed();
        // A disk whose free space can't be read is left to sled to find full.
        let free = self.free_bytes().unwrap_or(u64::MAX).saturating_sub(*claimed);
        let needed = bytes.saturating_add(RESERVE_BYTES);
        if free < needed {
            return Err(Error::NoRoom {
                what: what(),
                needed,
                free,
            });
        }
        *claimed += bytes;
        Ok(Claim {
            disk: self.0.clone(),
            bytes,
            _in_flight: InFlight::begin(&self.0),
        })
    }

    /// Bytes free on the disk holding the store, for an unprivileged user.
    fn free_bytes(&self) -> std::io::Result<u64> {
        #[cfg(feature = "failpoints")]
        if let Some(free) = faked_free() {
            return Ok(free);
        }
        let path = std::ffi::CString::new(self.0.dir.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
        // SAFETY: statvfs writes only into the struct it is given, which is
        // plain data (all zeroes is a valid value), and reads the
        // NUL-terminated path, which lives across the call.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // (Their C types are u64 here, narrower on some platforms.)
        Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
    }
}

/// The `store-write` failpoint: the bytes its flag file holds (0 when it
/// holds no number) while the file named by its argument exists.
#[cfg(feature = "failpoints")]
fn faked_free() -> Option<u64> {
    fail::fail_point!("store-write", |flag: Option<String>| {
        let held = std::fs::read_to_string(flag?).ok()?;
        Some(held.trim().parse().unwrap_or(0))
    });
    None
}

/// The `store-claimed` failpoint: a write that has claimed its room waits
/// while the file its argument names exists (`<file>.reached` says it
/// does), so that a test fills the disk between the claim and the write.
#[cfg(feature = "failpoints")]
fn hold_after_claim() {
    fail::fail_point!("store-claimed", |flag: Option<String>| {
        let Some(flag) = flag else { return };
        let _ = std::fs::write(format!("{flag}.reached"), "");
        while Path::new(&flag).exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_count_against_the_free_bytes_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let room = Room::new(dir.path());
        let free = room.free_bytes().unwrap();
        assert!(
            free > 2 * RESERVE_BYTES,
            "this test needs some free space ({free} bytes)"
        );
        let most = free - RESERVE_BYTES - (1 << 20);
        let held = room.claim(most, || "most of it".into()).unwrap();
        // (1 GB: the disk is shared; others' files may come and go meanwhile.)
        let refused = room
            .claim(1 << 30, || "a checkpoint".into())
            .err()
            .expect("no room beyond the first claim");
        let Error::NoRoom { what, needed, .. } = &refused else {
            panic!("{refused}")
        };
        assert_eq!((what.as_str(), *needed), ("a checkpoint", (1 << 30) + RESERVE_BYTES));
        assert!(refused.to_string().contains("No space left on device"), "{refused}");
        drop(held);
        room.claim(4 << 20, || "a group commit".into()).unwrap();
        assert_eq!(room.oldest_write(), None, "a dropped claim is no write in flight");
        let first = room.claim(1 << 20, || "a write".into()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let second = room.claim(1 << 20, || "another".into()).unwrap();
        assert!(
            room.oldest_write().unwrap() >= Duration::from_millis(20),
            "the oldest counts"
        );
        drop(first);
        assert!(room.oldest_write().unwrap() < Duration::from_millis(20));
        drop(second);
        assert!(
            room.claim(u64::MAX, String::new).is_err(),
            "never more than the disk holds"
        );
    }
}
