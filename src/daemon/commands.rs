//! Operator commands (rollback, import, pin, delete) from the control
//! service, carried out by the trainer thread between two steps: they never
//! race a checkpoint write or an automatic rollback, and the history records
//! them in order; and where an automatic rollback returns (the divergence
//! guard's). The loop itself is `trainer.rs`'s.

use super::control::{Command, Imported};
use super::trainer::{Event, Trainer};
use super::Error;
use crate::store::Provenance;
use crate::vae::checkpoint::Metadata;
use crate::versions;
use anyhow::{Context, Result};
use std::sync::Arc;
use tokio::sync::oneshot;

impl Trainer {
    /// Runs queued operator commands; true when the training weights changed.
    pub(super) fn run_commands(&mut self) -> bool {
        let mut changed = false;
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Rollback {
                    version,
                    provenance,
                    reply,
                } => {
                    let result = self.roll_back(version, provenance);
                    changed |= result.is_ok();
                    let _ = reply.send(result);
                }
                Command::Import {
                    weights,
                    origin,
                    provenance,
                    reply,
                } => {
                    let result = self.import(&weights, &origin, &provenance);
                    changed |= result.is_ok();
                    let _ = reply.send(result);
                }
                Command::Pin { version, pinned, reply } => {
                    let _ = reply.send(self.store.registry().set_pinned(version, pinned).map_err(Error::from));
                }
                Command::Delete { version, reply } => {
                    let _ = reply.send(self.delete(version));
                }
            }
        }
        changed
    }

    /// Where automatic rollback number `attempt` (since the last trained
    /// version) returns: the active version, then each time one version
    /// further back along its parents; None when that one is gone.
    pub(super) fn rollback_target(&self, attempt: u32) -> Result<Option<u64>> {
        let mut version = self.active()?.version;
        let registry = self.store.registry();
        for _ in 1..attempt {
            let Some(parent) = registry.metadata(version)?.and_then(|m| m.parent) else {
                return Ok(None);
            };
            if registry.metadata(parent)?.is_none() {
                return Ok(None);
            }
            version = parent;
        }
        Ok(Some(version))
    }

    /// Training weights and Adam state move to `version`, then the rollback
    /// is announced (encoders follow it). Nothing changes if the version is
    /// unknown or its checkpoint does not load.
    pub(super) fn roll_back(&mut self, version: u64, provenance: Provenance) -> Result<Option<u64>, Error> {
        let epoch = self.leadership.epoch()?;
        let to = Arc::new(versions::checkpoint(&self.store, version)?);
        self.learner.restore(&to)?;
        let from = self.store.registry().activate(version, &provenance)?;
        self.active = Some(to.metadata.clone());
        self.status.update(|s| s.active_version = Some(version));
        let reason = provenance.reason.unwrap_or_else(|| provenance.why.to_string());
        self.events
            .blocking_send(Event::Rollback {
                from,
                to,
                reason,
                epoch,
            })
            .context("daemon event queue closed")?;
        Ok(from)
    }

    /// A foreign model becomes the next version, active, with fresh Adam
    /// state; the receiver hears once it is published.
    fn import(&mut self, weights: &[u8], origin: &str, provenance: &Provenance) -> Result<Imported, Error> {
        let version = self.allocate_version(None)?;
        let checkpoint = Arc::new(versions::import(
            &self.store,
            Some(version),
            weights,
            origin,
            &self.config,
            provenance,
        )?);
        self.learner.restore(&checkpoint)?;
        let metadata = checkpoint.metadata.clone();
        let (published, heard) = oneshot::channel();
        self.adopt(checkpoint, Some(published))?;
        Ok((metadata, heard))
    }

    /// Deletes a version (never the active one) and hands the removal of its
    /// object to the daemon.
    fn delete(&mut self, version: u64) -> Result<Metadata, Error> {
        let epoch = self.leadership.epoch()?;
        let metadata = self.store.registry().delete(version)?;
        self.events
            .blocking_send(Event::Deleted {
                metadata: metadata.clone(),
                epoch,
            })
            .context("daemon event queue closed")?;
        Ok(metadata)
    }
}
