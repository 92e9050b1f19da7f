//! Checkpoint events out to NATS: a created version's weights to the
//! object store, then its announcement; rollbacks and deletions announced;
//! and at start, NATS caught up with what changed in the store while it
//! was away. Runs on the daemon's runtime; the trainer hands it [`Event`]s.
//! It decides nothing about versions: the registry already holds them.

use super::trainer::Event;
use crate::bus::messages::{weights_object, Announcement, CheckpointEvent};
use crate::bus::Bus;
use crate::store::{Change, Store};
use crate::vae::checkpoint::{Checkpoint, Metadata};
use anyhow::{Context, Result};
use tokio::sync::mpsc;

/// Puts a version's weights in the object store, then announces it.
async fn publish_created(bus: &Bus, checkpoint: &Checkpoint) -> Result<()> {
    bus.put_object(&weights_object(checkpoint.metadata.version), &checkpoint.weights).await?;
    bus.announce(&Announcement::new(CheckpointEvent::Created, &checkpoint.metadata, checkpoint.weights.len() as u64)).await
}

/// Catches NATS up with the store after a start: versions whose weights
/// are not in the object store yet (written while NATS was away, or
/// imported offline) are published; objects of versions deleted offline are
/// removed and announced; rollbacks made offline are announced.
pub(super) async fn publish_offline_changes(bus: &Bus, store: &Store) -> Result<()> {
    let registry = store.registry();
    let published = bus.object_versions().await?;
    let stored = registry.list()?;
    for version in published.iter().filter(|v| !stored.iter().any(|m| m.version == **v)) {
        bus.delete_object(&weights_object(*version)).await?;
        let metadata = Metadata { version: *version, ..Default::default() };
        bus.announce(&Announcement::new(CheckpointEvent::Deleted, &metadata, 0)).await?;
    }
    for entry in registry.unannounced_history()? {
        if entry.why == Change::Rollback {
            if let Some(to) = registry.metadata(entry.to)? {
                let mut a = Announcement::new(CheckpointEvent::Rollback, &to, 0);
                (a.from, a.to, a.reason) = (entry.from, Some(entry.to), entry.reason.clone().or(Some("offline rollback".into())));
                bus.announce(&a).await?;
            }
        }
    }
    for metadata in stored {
        if !published.contains(&metadata.version) {
            let checkpoint = registry.get(metadata.version)?.with_context(|| format!("checkpoint v{} vanished", metadata.version))?;
            publish_created(bus, &checkpoint).await?;
        }
    }
    registry.mark_history_announced()
}

/// Publishes the trainer's events in order until the trainer is gone.
pub(super) async fn publish_events(bus: Bus, store: Store, mut events: mpsc::Receiver<Event>) {
    while let Some(event) = events.recv().await {
        let result = match event {
            Event::Created(checkpoint) => publish_created(&bus, &checkpoint).await,
            Event::Rollback { from, to, reason } => {
                let mut a = Announcement::new(CheckpointEvent::Rollback, &to.metadata, to.weights.len() as u64);
                (a.from, a.to, a.reason) = (from, Some(to.metadata.version), Some(reason));
                bus.announce(&a).await
            }
            Event::Deleted(metadata) => match bus.delete_object(&weights_object(metadata.version)).await {
                Ok(()) => bus.announce(&Announcement::new(CheckpointEvent::Deleted, &metadata, 0)).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result.and_then(|()| store.registry().mark_history_announced()) {
            tracing::error!("publishing a checkpoint event: {e:#}");
        }
    }
}

