//! A trainer node's leadership of training, as one value: the lease it
//! contends for, the grant it took over under, the cluster's shared state
//! (active version, version numbers) and bus it writes as the leader, and
//! the one way the trainer's plain thread reaches NATS (the runtime handle,
//! bounded by the shutdown signal).
//!
//! It decides nothing: when to take over and what to catch up on is
//! `takeover.rs`'s, what to train and write is `trainer.rs`'s; contending
//! for the lease is `lease.rs`'s task.

use super::lease::{Grant, Lease};
use crate::backoff::Backoff;
use crate::bus::kv::{Active, Shared};
use crate::bus::Bus;
use anyhow::{anyhow, bail, Result};
use std::future::Future;
use std::time::Duration;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

pub struct Leadership {
    lease: Lease,
    /// The holding of the lease the trainer took over under (None: not leading).
    grant: Option<Grant>,
    shared: Shared,
    bus: Bus,
    runtime: Handle,
    shutdown: CancellationToken,
}

impl Leadership {
    /// Not leading yet; `runtime` is the daemon's, `shutdown` its signal.
    pub fn new(lease: Lease, shared: Shared, bus: Bus, runtime: Handle, shutdown: CancellationToken) -> Leadership {
        Leadership {
            lease,
            grant: None,
            shared,
            bus,
            runtime,
            shutdown,
        }
    }

    /// The lease's holding now, when this node holds it (taken over or not).
    pub fn offered(&self) -> Option<Grant> {
        self.lease.grant()
    }

    /// Whether the trainer already took over under `grant`.
    pub fn took_over_under(&self, grant: Grant) -> bool {
        self.grant == Some(grant)
    }

    /// The trainer starts leading under `grant`.
    pub fn begin(&mut self, grant: Grant) {
        self.grant = Some(grant);
    }

    /// The trainer stops leading; true when it was.
    pub fn end(&mut self) -> bool {
        self.grant.take().is_some()
    }

    /// Whether the trainer took over under some grant (it may have lapsed since).
    pub fn began(&self) -> bool {
        self.grant.is_some()
    }

    /// The epoch this node leads under, or an error when it no longer does.
    pub fn epoch(&self) -> Result<u64> {
        match (self.lease.grant(), self.grant) {
            (Some(now), Some(took_over)) if now == took_over => Ok(now.epoch),
            _ => bail!("this node no longer holds the training lease"),
        }
    }

    /// Gives the lease up at once (another node fenced this one).
    pub fn lose(&self) {
        self.lease.lose();
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// A NATS call made from the trainer's thread, the one way it reaches
    /// the runtime: given up when the shutdown signal comes while it waits
    /// (a server gone mid-request must not hold the shutdown), and after
    /// `limit` when one is given. A call made once the shutdown began (the
    /// last checkpoint's) is bounded by its `limit` alone.
    pub fn nats<T, E: From<anyhow::Error>>(
        &self,
        call: impl Future<Output = Result<T, E>>,
        limit: Option<Duration>,
    ) -> Result<T, E> {
        let shutdown = self.shutdown.clone();
        let interruptible = !shutdown.is_cancelled();
        // The timers are made inside the runtime: this thread is not one of its.
        self.runtime.block_on(async {
            let bounded = async {
                match limit {
                    Some(limit) => tokio::time::timeout(limit, call)
                        .await
                        .map_err(|_| E::from(anyhow!("NATS did not answer within {limit:?}")))?,
                    None => call.await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled(), if interruptible => {
                    Err(E::from(anyhow!("given up: the daemon is shutting down")))
                }
                done = bounded => done,
            }
        })
    }

    /// Fences older leaders' announcements, right after [`Leadership::fence`]:
    /// this epoch written on the fences' subject, conditioned by the server
    /// on the last fence read ([`Bus::fence_announcements`]); every later
    /// announcement of this node's under `epoch` names it, so the server
    /// refuses an older leader's from now on. Refused: leadership ends at once.
    pub fn fence_announcements(&self, epoch: u64) -> Result<()> {
        match self.nats(self.bus.fence_announcements(epoch), None) {
            Ok(sequence) => {
                self.lease.set_fence(epoch, sequence);
                tracing::info!(epoch, sequence, "fenced: announcements go out under this epoch's fence");
                Ok(())
            }
            Err(e) => {
                if matches!(e, crate::bus::Error::Conflict(_)) {
                    self.lose();
                }
                Err(anyhow::Error::from(e).context("fencing the announcements under this epoch"))
            }
        }
    }

    /// The cluster's active version and its KV revision, if it has one.
    pub fn cluster_active(&self) -> Result<Option<(Active, u64)>> {
        self.nats(self.shared.active(), None)
    }

    /// Fences older leaders, first thing on taking over under `epoch`:
    /// `active` rewritten (same version) under this epoch by compare-and-set
    /// from the revision just read, so a former leader's compare-and-set
    /// from an older read fails at the server, and one that reads it anew
    /// sees a newer epoch and stops. The active version as it was before,
    /// and the revision this fence wrote (None on a new cluster: nothing to
    /// fence). Refused, or a newer epoch found there: leadership ends at once.
    pub fn fence(&self, epoch: u64) -> Result<Option<(Active, u64)>> {
        self.epoch()?;
        let Some((before, revision)) = self.cluster_active()? else {
            return Ok(None);
        };
        if before.epoch > epoch {
            self.lose();
            bail!("a newer leader (epoch {}) set the active version", before.epoch);
        }
        let fenced = Active {
            epoch,
            ..before.clone()
        };
        match self.set_active(&fenced, Some(revision)) {
            Ok(fenced) => {
                tracing::info!(
                    epoch,
                    version = before.version,
                    "fenced: the active version is held under this epoch"
                );
                Ok(Some((before, fenced)))
            }
            Err(e) => {
                if matches!(e, crate::bus::Error::Conflict(_)) {
                    self.lose();
                }
                Err(anyhow::Error::from(e).context("fencing the active version under this epoch"))
            }
        }
    }

    /// Writes the cluster's active version if its revision is still `seen`.
    pub fn set_active(&self, active: &Active, seen: Option<u64>) -> Result<u64, crate::bus::Error> {
        self.nats(self.shared.set_active(active, seen), None)
    }

    /// A version number unique across nodes, at least `at_least`, waited
    /// for at most `within`; only while leading.
    pub fn allocate_version(&self, at_least: u64, within: Option<Duration>) -> Result<u64> {
        self.epoch()?;
        self.nats(self.shared.allocate_version(at_least), within)
    }

    /// Waits out `backoff`'s next pause on the runtime (cut short by the shutdown).
    pub fn pause(&self, backoff: &mut Backoff) {
        self.runtime.block_on(backoff.wait(&self.shutdown));
    }
}
