//! The training lease: one trainer node trains, checkpoints and announces;
//! the others are hot standbys. The lease is the key `trainer` in KV bucket
//! `wm-lease`: `create` takes it (its revision then is the leader's
//! **epoch**), an `update` with the held revision every third of the TTL
//! renews it, and a clean stop deletes it with that revision so a standby
//! takes over at once. A renewal that fails stops this node's training,
//! checkpoints and announcements at once ([`Lease::epoch`] answers None);
//! one refused (the key is another's now), or not done within two thirds
//! of the TTL, makes it a standby, before the TTL could have run out.
//! Other failures (an election of the bucket's leader) are tried again
//! meanwhile, and a renewal that succeeds lets it lead on, same epoch. A
//! standby watches the key and takes it when it is free. The TTL is the
//! cluster's (the bucket's max age, read again every second while leading),
//! and the lease's age is counted on the boot clock (a suspend counts) from
//! before the request that took or renewed it, as the server's can only be
//! younger. Deciding, not doing: the trainer and the announcer ask.

use super::supervisor::Supervisor;
use crate::bus::kv::{LeaseEvent, Shared};
use anyhow::Result;
use futures::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Pause between tries of a renewal that failed without a refusal: a
/// bucket's leader election takes a few seconds, the lease can't lapse
/// for two thirds of the TTL.
const RENEW_RETRY: Duration = Duration::from_millis(250);
/// How often a leader reads the cluster's lease TTL between renewals: an
/// operator's shorter TTL is heeded within this long.
const TTL_POLL: Duration = Duration::from_secs(1);
/// How long one read of the TTL may take before the last one read is kept:
/// a read stuck behind a bucket's leader election must not hold a renewal.
pub(super) const TTL_READ_LIMIT: Duration = Duration::from_millis(500);

/// A clock that counts a host's suspend (Linux's `CLOCK_BOOTTIME`; std's
/// `Instant` does not): a node resumed after a suspend sees its lease's
/// age as the server does, not as if no time had passed.
#[derive(Debug, Clone, Copy)]
struct BootTime(Duration);

impl BootTime {
    fn now() -> BootTime {
        let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: `t` is a valid timespec to write; CLOCK_BOOTTIME exists on every Linux this runs on.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_BOOTTIME)");
        BootTime(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
    }

    fn elapsed(self) -> Duration {
        BootTime::now().0.saturating_sub(self.0)
    }
}

/// One holding of the lease by this node: its epoch, and which of this
/// node's holdings it is (epochs are KV revisions, which a server that
/// lost its state hands out again from 1: the term tells them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub epoch: u64,
    term: u64,
}

/// What this node may do now, and since when.
#[derive(Debug, Clone, Copy)]
struct Held {
    grant: Grant,
    /// When the request that took or last renewed the lease was sent: the
    /// server's TTL runs from a moment after it.
    renewed_at: BootTime,
    /// A renewal failed and is being tried again: nothing is done under
    /// this epoch until one succeeds.
    failing: bool,
}

/// A handle on this node's leadership; clones share it.
#[derive(Clone)]
pub struct Lease {
    held: Arc<Mutex<Option<Held>>>,
    /// Holdings so far.
    terms: Arc<AtomicU64>,
    /// The cluster's lease TTL in milliseconds: the lease bucket's max age,
    /// read again at every renewal (an operator may change it).
    ttl_ms: Arc<AtomicU64>,
    /// The announcements' fence this node wrote last: (epoch, its sequence).
    fence: Arc<Mutex<Option<(u64, u64)>>>,
}

impl Lease {
    /// The cluster's lease TTL, as last read.
    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms.load(Ordering::Relaxed))
    }

    /// Past this since the last renewal, the lease counts as lost here:
    /// two thirds of the TTL, so a lapse is noticed before it happens.
    fn trust(&self) -> Duration {
        self.ttl() * 2 / 3
    }

    /// Reads the cluster's TTL again; on a failure (NATS away) or past
    /// [`TTL_READ_LIMIT`] the last one read stays.
    async fn refresh_ttl(&self, shared: &Shared) {
        let Ok(Ok(ttl)) = tokio::time::timeout(TTL_READ_LIMIT, shared.lease_ttl()).await else {
            return;
        };
        let before = self.ttl_ms.swap(ttl.as_millis() as u64, Ordering::Relaxed);
        if before != ttl.as_millis() as u64 {
            tracing::info!(
                "lease: the cluster's lease TTL is {ttl:?} now (was {:?})",
                Duration::from_millis(before)
            );
        }
    }

    /// The epoch while this node holds a fresh lease; None on a standby,
    /// and from the moment a renewal fails or is late.
    pub fn epoch(&self) -> Option<u64> {
        self.grant().map(|g| g.epoch)
    }

    /// As [`Lease::epoch`], with the holding it belongs to.
    pub fn grant(&self) -> Option<Grant> {
        let held = *self.held.lock().unwrap();
        held.filter(|h| !h.failing && h.renewed_at.elapsed() < self.trust())
            .map(|h| h.grant)
    }

    /// Whether the lease, renewed or not now, can't have lapsed yet.
    fn fresh(&self) -> bool {
        self.held
            .lock()
            .unwrap()
            .is_some_and(|h| h.renewed_at.elapsed() < self.trust())
    }

    /// Whether this node may still lead under `epoch`: leading now, or its
    /// renewal failing but the lease not lapsed (work under it waits).
    pub fn may_lead(&self, epoch: u64) -> bool {
        self.held
            .lock()
            .unwrap()
            .is_some_and(|h| h.grant.epoch == epoch && h.renewed_at.elapsed() < self.trust())
    }

    /// Marks renewals failing (or not any more), keeping the lease.
    fn set_failing(&self, failing: bool) {
        if let Some(h) = self.held.lock().unwrap().as_mut() {
            h.failing = failing;
        }
    }

    /// Records the announcements' fence written under `epoch` (its sequence).
    pub fn set_fence(&self, epoch: u64, sequence: u64) {
        *self.fence.lock().unwrap() = Some((epoch, sequence));
    }

    /// The sequence of the announcements' fence written under `epoch`,
    /// while this node may still lead under it; None before it fenced.
    pub fn fence(&self, epoch: u64) -> Option<u64> {
        let fence = *self.fence.lock().unwrap();
        fence
            .filter(|(fenced, _)| *fenced == epoch && self.may_lead(epoch))
            .map(|(_, sequence)| sequence)
    }

    /// Gives leadership up here at once (another node moved the active
    /// version: this one is a zombie); the lease lapses or is taken.
    pub fn lose(&self) {
        *self.held.lock().unwrap() = None;
    }
}

/// Starts contending for the lease as `holder`, under `supervisor`, with
/// `ttl` the cluster's lease TTL ([`Shared::lease_ttl`]). `stop` ends the
/// task: it then releases a lease it holds (the daemon stops it last,
/// after the final checkpoint is announced).
pub fn start(
    shared: Shared,
    holder: String,
    ttl: Duration,
    stop: CancellationToken,
    supervisor: &Supervisor,
) -> (Lease, JoinHandle<Result<()>>) {
    let lease = Lease {
        held: Arc::default(),
        terms: Arc::default(),
        ttl_ms: Arc::new(AtomicU64::new(ttl.as_millis() as u64)),
        fence: Arc::default(),
    };
    let task = supervisor.spawn("lease", contend(shared, holder, lease.clone(), stop));
    (lease, task)
}

async fn contend(shared: Shared, holder: String, lease: Lease, stop: CancellationToken) -> Result<()> {
    while !stop.is_cancelled() {
        lease.refresh_ttl(&shared).await;
        let asked = BootTime::now();
        match shared.acquire(&holder).await {
            Ok(Some(revision)) => lead(&shared, &holder, (revision, asked), &lease, &stop).await,
            Ok(None) => wait_until_free(&shared, lease.ttl(), &stop).await,
            Err(e) => {
                tracing::warn!("lease: {e:#}; trying again");
                tokio::select! { _ = stop.cancelled() => {}, _ = tokio::time::sleep(lease.ttl() / 3) => {} }
            }
        }
    }
    Ok(())
}

/// Holds the lease taken at `(revision, asked)` until a renewal fails or
/// `stop`, which releases it. Renews every third of the cluster's TTL,
/// read again every [`TTL_POLL`].
async fn lead(
    shared: &Shared,
    holder: &str,
    (mut revision, asked): (u64, BootTime),
    lease: &Lease,
    stop: &CancellationToken,
) {
    let epoch = revision;
    let grant = Grant {
        epoch,
        term: lease.terms.fetch_add(1, Ordering::Relaxed) + 1,
    };
    let mut renewed_at = asked;
    *lease.held.lock().unwrap() = Some(Held {
        grant,
        renewed_at,
        failing: false,
    });
    tracing::info!(epoch, "lease: this node leads training");
    loop {
        let due = (lease.ttl() / 3).saturating_sub(renewed_at.elapsed()).min(TTL_POLL);
        tokio::select! {
            _ = stop.cancelled() => {
                lease.lose();
                match shared.release(revision).await {
                    Ok(()) => tracing::info!(epoch, "lease: released"),
                    Err(e) => tracing::warn!(epoch, "lease: not released ({e:#}); it lapses by itself"),
                }
                return;
            }
            _ = tokio::time::sleep(due) => {}
        }
        if lease.held.lock().unwrap().is_none() {
            tracing::warn!(epoch, "lease: given up; a standby takes over once it lapses");
            return;
        }
        lease.refresh_ttl(shared).await;
        if renewed_at.elapsed() < lease.ttl() / 3 {
            continue;
        }
        match renew(shared, holder, revision, lease, stop).await {
            Ok((renewed, sent)) => {
                (revision, renewed_at) = (renewed, sent);
                let mut held = lease.held.lock().unwrap();
                if let Some(h) = held.as_mut() {
                    if h.failing {
                        tracing::info!(epoch, "lease: renewed again; leading on");
                    }
                    (h.renewed_at, h.failing) = (sent, false);
                }
            }
            Err(e) => {
                lease.lose();
                tracing::warn!(epoch, "lease: lost ({e:#}); this node is a standby now");
                return;
            }
        }
    }
}

/// One renewal: a refusal (another node holds the key now) is final; any
/// other failure (an election of the bucket's leader, a reconnect) stops
/// this node's work under the lease at once ([`Lease::epoch`] is None) and
/// is tried again every [`RENEW_RETRY`] while the lease can't have lapsed;
/// a renewal that then succeeds lets it lead on under the same epoch: its
/// revision, and when its request was sent.
async fn renew(
    shared: &Shared,
    holder: &str,
    revision: u64,
    lease: &Lease,
    stop: &CancellationToken,
) -> Result<(u64, BootTime), crate::bus::Error> {
    loop {
        let sent = BootTime::now();
        match shared.renew(holder, revision).await {
            Ok(renewed) => return Ok((renewed, sent)),
            Err(e) if matches!(e, crate::bus::Error::Conflict(_)) || !lease.fresh() || stop.is_cancelled() => {
                return Err(e)
            }
            Err(e) => {
                lease.set_failing(true);
                tracing::warn!("lease: not renewed ({e:#}); paused, trying again");
                tokio::time::sleep(RENEW_RETRY).await;
            }
        }
    }
}

/// Waits until the lease is free (released, lapsed) or `stop`; at most a
/// TTL, then looks again.
async fn wait_until_free(shared: &Shared, ttl: Duration, stop: &CancellationToken) {
    let Ok(mut events) = shared.watch_lease().await else {
        tokio::select! { _ = stop.cancelled() => {}, _ = tokio::time::sleep(ttl / 3) => {} }
        return;
    };
    let deadline = tokio::time::sleep(ttl);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut deadline => return,
            event = events.next() => match event {
                Some(Ok(LeaseEvent::Free)) | None => return,
                Some(Ok(LeaseEvent::Held(_))) => {}
                Some(Err(e)) => {
                    tracing::warn!("lease: {e:#}");
                    return;
                }
            },
        }
    }
}
