//! Checkpoint events out to NATS: a created version's weights and full
//! checkpoint to the object store, its announcement, then `active` moved to
//! it by compare-and-set under the leader's epoch; rollbacks and deletions
//! likewise; and when a node starts leading, NATS caught up with what its
//! store holds. Runs on the daemon's runtime; the trainer hands it
//! [`Event`]s. It decides nothing about versions: the registry holds them.

use super::lease::Lease;
use super::trainer::Event;
use crate::backoff::Backoff;
use crate::bus::kv::{Active, Shared};
use crate::bus::messages::{checkpoint_envelope_object, weights_object, Announcement, CheckpointEvent};
use crate::bus::Bus;
use crate::store::{self, Store};
use crate::vae::checkpoint::{Checkpoint, Metadata};
use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::mpsc;

/// Puts a version's weights and full checkpoint in the object store, then
/// announces it under `epoch` if `lease` still lets this node lead under it
/// (the upload takes seconds: a node paused meanwhile past its TTL, whose
/// standby took over, must not announce).
async fn publish_created(bus: &Bus, lease: &Lease, checkpoint: &Checkpoint, epoch: u64) -> Result<()> {
    let version = checkpoint.metadata.version;
    // A slow upload, for tests (its `sleep` blocks this runtime thread).
    fail::fail_point!("publish-created");
    bus.put_object(&weights_object(version), &checkpoint.weights).await?;
    // An upload that stops between the two objects, for tests.
    fail::fail_point!("publish-envelope", |_| Err(anyhow::anyhow!(
        "the publish-envelope failpoint"
    )));
    bus.put_object(&checkpoint_envelope_object(version), &checkpoint.to_bytes()?)
        .await?;
    if !lease.may_lead(epoch) {
        bail!("v{version} uploaded, not announced: the lease went meanwhile");
    }
    let mut announcement = Announcement::new(
        CheckpointEvent::Created,
        &checkpoint.metadata,
        checkpoint.weights.len() as u64,
    );
    announcement.epoch = epoch;
    announce(bus, lease, &announcement, epoch).await
}

/// Announces under this node's fence for `epoch`; refused by the server (a
/// newer leader fenced since), leadership ends here at once.
async fn announce(bus: &Bus, lease: &Lease, announcement: &Announcement, epoch: u64) -> Result<()> {
    let fence = lease
        .fence(epoch)
        .with_context(|| format!("no announcements' fence of this node's under epoch {epoch}"))?;
    match bus.announce(announcement, fence).await {
        Ok(()) => Ok(()),
        Err(e @ crate::bus::Error::Conflict(_)) => {
            lease.lose();
            Err(anyhow::Error::from(e).context("refused by the server: a newer leader fenced the announcements"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Catches NATS up with the store when this node starts leading, in the
/// order the store made the changes: versions this node made and never
/// announced (written while NATS was away, imported offline) are
/// published, rollbacks made offline announced. What gave way to the
/// cluster's active version (marked announced by the catch-up) is not:
/// a former standby's stale version is never announced as created. Only
/// where the cluster holds no active version (`cluster_state_lost`: its
/// servers lost their state, or it never had one) is every version the
/// object store lacks published again, oldest first. It only adds:
/// objects it does not know are left alone (they may be another node's).
pub(super) async fn publish_offline_changes(
    bus: &Bus,
    store: &Store,
    lease: &Lease,
    epoch: u64,
    cluster_state_lost: bool,
) -> Result<()> {
    let registry = store.registry();
    let mut published = bus.object_versions().await?;
    for entry in registry.unannounced_history()? {
        let Some(to) = registry.metadata(entry.to)? else {
            continue;
        };
        if entry.why.is_rollback() {
            let mut a = Announcement::new(CheckpointEvent::Rollback, &to, 0);
            (a.from, a.to, a.reason, a.epoch) = (
                entry.from,
                Some(entry.to),
                entry.reason.clone().or(Some("offline rollback".into())),
                epoch,
            );
            announce(bus, lease, &a, epoch).await?;
        } else if !published.contains(&to.version) {
            publish_stored(bus, store, lease, to.version, epoch).await?;
            published.push(to.version);
        }
    }
    if cluster_state_lost {
        for metadata in registry.list()? {
            if !published.contains(&metadata.version) {
                publish_stored(bus, store, lease, metadata.version, epoch).await?;
            }
        }
    }
    registry.mark_history_announced()
}

/// Publishes stored version `version` as created under `epoch`; a damaged
/// one is left out (never the active one: resuming repaired or left it;
/// NATS can do without it).
async fn publish_stored(bus: &Bus, store: &Store, lease: &Lease, version: u64, epoch: u64) -> Result<()> {
    let checkpoint = match store.registry().get(version) {
        Ok(checkpoint) => checkpoint.with_context(|| format!("checkpoint v{version} vanished"))?,
        Err(e @ store::Error::Damaged { .. }) => {
            tracing::error!(version, "{e:#}; not published");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    publish_created(bus, lease, &checkpoint, epoch).await
}

/// Makes `version` the cluster's active one under `epoch`, by
/// compare-and-set from the value last seen; refused (and this node's
/// leadership given up) when a newer epoch set it or another node moved it.
async fn activate(shared: &Shared, lease: &Lease, metadata: &Metadata, epoch: u64) -> Result<()> {
    let seen = shared.active().await?;
    if let Some((active, _)) = &seen {
        if active.epoch > epoch {
            lease.lose();
            bail!(
                "v{} not made active: a newer leader (epoch {}) set the active version",
                metadata.version,
                active.epoch
            );
        }
    }
    let active = Active {
        version: metadata.version,
        sha256: metadata.sha256.clone(),
        epoch,
    };
    if let Err(e) = shared.set_active(&active, seen.map(|(_, revision)| revision)).await {
        if matches!(e, crate::bus::Error::Conflict(_)) {
            lease.lose();
        }
        return Err(e).with_context(|| format!("making v{} active", metadata.version));
    }
    Ok(())
}

/// One event out to NATS under its epoch, its announcement at most once
/// (`announced` remembers it across tries); for a created version or a
/// rollback, the version is then made active.
async fn publish(bus: &Bus, shared: &Shared, lease: &Lease, event: &Event, announced: &mut bool) -> Result<()> {
    match event {
        Event::Created { checkpoint, epoch, .. } => {
            if !*announced {
                publish_created(bus, lease, checkpoint, *epoch).await?;
                *announced = true;
            }
            activate(shared, lease, &checkpoint.metadata, *epoch).await
        }
        Event::Rollback {
            from,
            to,
            reason,
            epoch,
        } => {
            if !*announced {
                let mut a = Announcement::new(CheckpointEvent::Rollback, &to.metadata, to.weights.len() as u64);
                (a.from, a.to, a.reason, a.epoch) = (*from, Some(to.metadata.version), Some(reason.clone()), *epoch);
                announce(bus, lease, &a, *epoch).await?;
                *announced = true;
            }
            activate(shared, lease, &to.metadata, *epoch).await
        }
        Event::Deleted { metadata, epoch } => {
            if !*announced {
                bus.delete_object(&weights_object(metadata.version)).await?;
                bus.delete_object(&checkpoint_envelope_object(metadata.version)).await?;
                let mut deleted = Announcement::new(CheckpointEvent::Deleted, metadata, 0);
                deleted.epoch = *epoch;
                announce(bus, lease, &deleted, *epoch).await?;
                *announced = true;
            }
            Ok(())
        }
    }
}

/// The trainer's events, in order, until the trainer is gone. Each is
/// published only while this node leads under the event's epoch, and tried
/// again, backing off, while it may still lead (a NATS election, a renewal
/// failing); a version is announced, then made active (encoders switch on
/// that), then its history entry is marked announced. An event given up
/// (the lease lost) leaves its entry unannounced, for the next start.
pub(super) async fn publish_events(
    bus: Bus,
    store: Store,
    shared: Shared,
    lease: Lease,
    mut events: mpsc::Receiver<Event>,
) -> Result<()> {
    while let Some(mut event) = events.recv().await {
        let (epoch, what) = match &event {
            Event::Created { checkpoint, epoch, .. } => (*epoch, format!("v{}", checkpoint.metadata.version)),
            Event::Rollback { to, epoch, .. } => (*epoch, format!("the rollback to v{}", to.metadata.version)),
            Event::Deleted { metadata, epoch } => (*epoch, format!("the deletion of v{}", metadata.version)),
        };
        let (mut pause, mut announced) = (Backoff::default(), false);
        loop {
            let error = match lease.epoch() == Some(epoch) {
                true => match publish(&bus, &shared, &lease, &event, &mut announced).await {
                    Ok(()) => {
                        mark_announced(&store, &event);
                        if let Event::Created { published, .. } = &mut event {
                            // Whoever waited may have given up: nothing to do then.
                            published.take().map(|p| p.send(()));
                        }
                        break;
                    }
                    Err(e) => e,
                },
                false => anyhow!("paused: the lease's renewal is failing"),
            };
            if !lease.may_lead(epoch) {
                tracing::error!(
                    "{what} not published: this node no longer leads (epoch {epoch}); last error: {error:#}"
                );
                break;
            }
            tracing::warn!("publishing {what}: {error:#}; trying again in {:?}", pause.next);
            pause.sleep().await;
        }
        drop(event); // the checkpoint's bytes, once the trainer holds them no more
        super::memory::release_freed_later();
    }
    Ok(())
}

/// Marks the history entry of a published change announced.
fn mark_announced(store: &Store, event: &Event) {
    let (version, rollback) = match event {
        Event::Created { checkpoint, .. } => (checkpoint.metadata.version, false),
        Event::Rollback { to, .. } => (to.metadata.version, true),
        Event::Deleted { .. } => return,
    };
    if let Err(e) = store.registry().mark_announced(version, rollback) {
        tracing::error!(
            "v{version} published, but not marked so in the store ({e:#}): the next start announces it again"
        );
    }
}
