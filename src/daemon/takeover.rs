//! How a trainer node starts leading, and what it does only while it leads.
//! On a new epoch it catches up with the cluster's active version (`wm-meta`
//! `active`): when its own store lacks it, from the full checkpoint in the
//! object store (sha256 checked), so step, Adam moments and versions
//! continue; then it fences older leaders by rewriting `active` under its
//! epoch (compare-and-set), and catches NATS up with what its store holds.
//! Version numbers come from `wm-meta` too, unique across nodes. A takeover
//! that fails (the streams' leaders still being elected after a server was
//! lost) is tried again, backing off, for [`TAKEOVER_PATIENCE`]. A standby
//! refuses operator commands: the leader answers them.

use super::announce;
use super::control::Command;
use super::lease::Grant;
use super::status::{LeaseRole, TrainerState};
use super::trainer::Trainer;
use crate::backoff::Backoff;
use crate::bus::kv::Active;
use crate::bus::messages::checkpoint_envelope_object;
use crate::bus::Bus;
use crate::store::{self, Change, Provenance};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use anyhow::{anyhow, bail, Context, Result};
use std::time::{Duration, Instant};

/// How long a standby sleeps between looks at the lease.
const STANDBY_PAUSE: Duration = Duration::from_millis(100);
/// How long a node holding the lease keeps trying to take over (NATS
/// electing the leaders of a lost server's streams takes seconds) before
/// it exits non-zero with the reason, releasing the lease to a standby.
const TAKEOVER_PATIENCE: Duration = Duration::from_secs(120);

/// Failed tries at taking over, since when.
pub(super) struct Retrying {
    since: Instant,
    pause: Backoff,
}

/// The object store's full checkpoint of `version` (its envelope's sha256
/// checked, and its weights' against `sha256` when given); None when the
/// object store has none.
pub(super) async fn object_store_copy(bus: &Bus, version: u64, sha256: Option<&str>) -> Result<Option<Checkpoint>> {
    let name = checkpoint_envelope_object(version);
    let Some(bytes) = bus.get_object(&name).await? else {
        return Ok(None);
    };
    let checkpoint = Checkpoint::from_bytes(&bytes).with_context(|| name.clone())?;
    checkpoint.verify()?;
    if sha256.is_some_and(|sha256| checkpoint.metadata.sha256 != sha256) || checkpoint.metadata.version != version {
        bail!("{name}: not the version (or weights) expected");
    }
    Ok(Some(checkpoint))
}

impl Trainer {
    /// The active checkpoint, which a leader always has.
    pub(super) fn active(&self) -> Result<&Metadata> {
        self.active
            .as_ref()
            .context("no active version yet: this node has not led")
    }

    /// A version number unique across nodes, waited for at most `within`:
    /// the one given back under this epoch, if it is still above every
    /// stored version, else a new one.
    pub(super) fn allocate_version(&mut self, within: Option<Duration>) -> Result<u64> {
        let at_least = self.store.registry().next_free()?;
        if let Some((epoch, version)) = self.unused_version.take() {
            if self.leadership.epoch().ok() == Some(epoch) && version >= at_least {
                return Ok(version);
            }
        }
        self.leadership.allocate_version(at_least, within)
    }

    /// Gives back `version`, allocated for a write that wrote nothing: the
    /// store refused it for want of room (`error`), or none was made.
    pub(super) fn give_back(&mut self, version: u64, error: Option<&store::Error>) {
        let unwritten = error.is_none_or(|e| matches!(e, store::Error::NoRoom { .. }));
        if let (true, Ok(epoch)) = (unwritten, self.leadership.epoch()) {
            self.unused_version = Some((epoch, version));
        }
    }

    /// Not leading: say so, refuse queued operator commands, wait a moment.
    pub(super) fn stand_by(&mut self) {
        if self.leadership.end() {
            tracing::warn!(
                "not leading (the lease lost, or its renewal failing): training, checkpoints and \
                announcements stop here"
            );
        }
        self.status
            .update(|s| (s.state, s.lease, s.epoch) = (Some(TrainerState::Standby), Some(LeaseRole::Standby), None));
        while let Ok(command) = self.commands.try_recv() {
            let refused = || super::Error::from(anyhow!("this trainer node is a standby; the leader answers"));
            match command {
                Command::Rollback { reply, .. } => drop(reply.send(Err(refused()))),
                Command::Import { reply, .. } => drop(reply.send(Err(refused()))),
                Command::Pin { reply, .. } => drop(reply.send(Err(refused()))),
                Command::Delete { reply, .. } => drop(reply.send(Err(refused()))),
            }
        }
        std::thread::sleep(STANDBY_PAUSE);
    }

    /// [`Trainer::take_over`], true once it leads; a failure is warned about
    /// and waited out (false), and is the trainer's error after
    /// [`TAKEOVER_PATIENCE`] of failing.
    pub(super) fn take_over_or_wait(&mut self, grant: Grant, failing: &mut Option<Retrying>) -> Result<bool> {
        let epoch = grant.epoch;
        let Err(e) = self.take_over(grant) else {
            if failing.take().is_some() {
                self.status.store_writes();
            }
            return Ok(true);
        };
        self.leadership.end();
        // A store write may be what failed, anywhere in the takeover: a full disk shows in /healthz
        // while it lasts, and a write error sled keeps once the disk takes writes again ends the
        // trainer at once, for the daemon to reopen the store.
        match self.store.check_writes() {
            Ok(()) => {}
            Err(reopen @ store::Error::NeedsReopen { .. }) => return Err(reopen.into()),
            Err(cannot_write) => self.status.store_failed(&cannot_write),
        }
        let retrying = failing.get_or_insert_with(|| Retrying {
            since: Instant::now(),
            pause: Backoff::default(),
        });
        if retrying.since.elapsed() > TAKEOVER_PATIENCE {
            return Err(e).context(format!("could not take over training for {TAKEOVER_PATIENCE:?}"));
        }
        tracing::warn!(
            epoch,
            "taking over training failed ({e:#}); trying again in {:?}",
            retrying.pause.next
        );
        self.leadership.pause(&mut retrying.pause);
        Ok(false)
    }

    /// Starts leading under `grant`.
    fn take_over(&mut self, grant: Grant) -> Result<()> {
        let epoch = grant.epoch;
        tracing::info!(epoch, "taking over training");
        self.leadership.begin(grant);
        // Before anything else: a former leader paused mid-write can't move `active` from here on.
        let fenced = self.leadership.fence(epoch)?;
        self.leadership.fence_announcements(epoch)?;
        fail::fail_point!("takeover-fenced");
        let cluster = fenced.as_ref().map(|(active, _)| active.clone());
        let registry = self.store.registry().clone();
        // An operator's rollback or import made offline to this store, or its
        // recovery from a damaged version the object store had no copy of, is
        // newer than what the cluster last agreed: it wins; so do versions
        // this node trained on from the cluster's active version that never
        // reached NATS, when nobody has moved `active` since this node last
        // led (its epoch is still the one there). Anything else
        // this store holds unannounced (a version made just before it lost
        // the lease, while another node trained on) gives way to the
        // cluster's active version.
        let operator_changes = registry
            .unannounced_history()?
            .iter()
            .any(|h| matches!(h.why, Change::Rollback | Change::Import | Change::Recovery));
        let mine = self.active.as_ref().map(|a| a.version);
        match &cluster {
            Some(active) if !operator_changes && mine != Some(active.version) && !self.continues(active)? => {
                self.catch_up(active)?
            }
            None if mine.is_none() => self.start_fresh()?,
            _ => {}
        }
        self.adopt_pending()?;
        // NATS catches up with this store (objects it lacks, offline rollbacks).
        let (bus, lease) = (self.leadership.bus(), self.leadership.lease());
        let offline_changes = announce::publish_offline_changes(bus, &self.store, lease, epoch, cluster.is_none());
        self.leadership.nats(offline_changes, None)?;
        // This node's active version, by compare-and-set from the fence's own revision: any
        // write to `active` since (another leader's) refuses it and ends this leadership.
        let (version, sha256) = (self.active()?.version, self.active()?.sha256.clone());
        let active = Active { version, sha256, epoch };
        let seen = fenced.map(|(_, revision)| revision);
        match self.leadership.set_active(&active, seen) {
            Ok(_) => registry.set_led_epoch(epoch)?,
            Err(e @ crate::bus::Error::Conflict(_)) => {
                self.leadership.lose();
                return Err(e).context("another node moved the active version while this one took over");
            }
            Err(e) => return Err(e.into()),
        }
        self.status.update(|s| {
            (s.lease, s.epoch, s.active_version, s.step) = (
                Some(LeaseRole::Leader),
                Some(epoch),
                Some(version),
                self.learner.steps(),
            )
        });
        tracing::info!(epoch, version, step = self.learner.steps(), "leading training");
        Ok(())
    }

    /// Whether this node's active version continues the cluster's `active`:
    /// this node set it, in the epoch it last led, and its parents lead back
    /// to it.
    fn continues(&self, active: &Active) -> Result<bool> {
        let registry = self.store.registry();
        if registry.led_epoch()? != Some(active.epoch) {
            return Ok(false);
        }
        let version = active.version;
        let mut parent = self.active.as_ref().and_then(|a| a.parent);
        while let Some(p) = parent {
            if p == version {
                return Ok(true);
            }
            parent = registry.metadata(p)?.and_then(|m| m.parent);
        }
        Ok(false)
    }

    /// The pending checkpoint (a shutdown's last, made while NATS was away)
    /// becomes the next version when it continues the active version, and
    /// training goes on from it; else it gives way to the cluster's.
    fn adopt_pending(&mut self) -> Result<()> {
        let registry = self.store.registry().clone();
        let pending = match registry.pending() {
            Ok(Some(pending)) => pending,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::error!("{e:#}; dropped");
                return registry.clear_pending();
            }
        };
        let (active, step) = (self.active()?.version, pending.metadata.step);
        if pending.metadata.parent == Some(active) {
            let version = self.allocate_version(None)?;
            let make = move |version| {
                Ok(Checkpoint {
                    metadata: Metadata {
                        version,
                        ..pending.metadata.clone()
                    },
                    ..pending
                })
            };
            let checkpoint = registry.add(Some(version), make, &Provenance::daemon(Change::Trained))?;
            self.learner.restore(&checkpoint)?;
            tracing::info!(version, step, "the last shutdown's pending checkpoint is v{version}");
            self.active = Some(checkpoint.metadata);
        } else {
            tracing::warn!(
                step,
                "the last shutdown's pending checkpoint (after v{}) gives way: the cluster's active \
                version is v{active}",
                pending.metadata.parent.unwrap_or(0)
            );
        }
        registry.clear_pending()
    }

    /// A new cluster: this node's fresh weights become the first version.
    fn start_fresh(&mut self) -> Result<()> {
        let version = self.allocate_version(None)?;
        let metadata = Metadata {
            created_at: now_rfc3339(),
            config: serde_json::to_value(&self.config)?,
            ..Default::default()
        };
        let learner = &self.learner;
        let written = self.store.registry().add(
            Some(version),
            |version| learner.snapshot(Metadata { version, ..metadata }),
            &Provenance::daemon(Change::Initial),
        );
        let checkpoint = written.inspect_err(|e| self.give_back(version, Some(e)))?;
        tracing::info!(version, "initial weights written");
        self.active = Some(checkpoint.metadata);
        Ok(())
    }

    /// Resumes from the cluster's active version: from this store when it
    /// holds it whole, else from the object store's full checkpoint, added
    /// as a version new to this store, or written back over a copy here
    /// that is damaged or was forgotten (a number this store handed out).
    fn catch_up(&mut self, active: &Active) -> Result<()> {
        let registry = self.store.registry().clone();
        let checkpoint = match registry.get(active.version) {
            Ok(Some(held)) => held,
            Err(e) if !matches!(e, store::Error::Damaged { .. }) => return Err(e.into()),
            _damaged_or_missing => {
                let name = checkpoint_envelope_object(active.version);
                let checkpoint = self
                    .leadership
                    .nats(
                        object_store_copy(self.leadership.bus(), active.version, Some(&active.sha256)),
                        None,
                    )?
                    .with_context(|| format!("{name} is not in the object store"))?;
                if active.version >= registry.next_free()? {
                    let envelope = checkpoint.clone();
                    registry.add(
                        Some(active.version),
                        move |_| Ok(envelope),
                        &Provenance::daemon(Change::Takeover),
                    )?
                } else {
                    registry.repair(&checkpoint)?;
                    tracing::warn!(
                        version = active.version,
                        "v{} was damaged or missing in the store; repaired from the object store's copy",
                        active.version
                    );
                    checkpoint
                }
            }
        };
        self.learner.restore(&checkpoint)?;
        if registry.active_version()? != Some(active.version) {
            registry.activate(active.version, &Provenance::daemon(Change::Takeover))?;
        }
        registry.mark_history_announced()?;
        tracing::info!(
            version = active.version,
            step = self.learner.steps(),
            "resumed from the cluster's active version"
        );
        self.active = Some(checkpoint.metadata);
        Ok(())
    }
}
