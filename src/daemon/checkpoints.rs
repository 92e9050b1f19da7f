//! How the trainer writes versions: a checkpoint when one is due (its
//! number from NATS, postponed when NATS can't give one), the last one at
//! shutdown (kept as pending without a number), each with its eval and
//! latent diagnostics, then made active, handed to the daemon to publish,
//! and retention applied. When checkpoints are due is the loop's
//! (`trainer.rs`); publishing them is `announce.rs`'s.

use super::trainer::{Event, Run, Trainer};
use crate::store::{Change, Provenance};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::vae::properties::{Diagnostics, DIAGNOSTIC_FRAMES};
use anyhow::{Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// How long a checkpoint waits for its version number from NATS (ms when
/// NATS is well) before it is postponed: training goes on meanwhile.
const ALLOCATE_PATIENCE: Duration = Duration::from_secs(5);
/// Training time between tries of a postponed checkpoint.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// How much a checkpoint is judged before it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judged {
    /// Eval and latent diagnostics on held-out frames: a checkpoint of training.
    Fully,
    /// The training loss alone: the last checkpoint at shutdown, whose
    /// forward passes would not fit in the grace on a busy CPU (one
    /// shutdown test failed so: eval and diagnostics ran past it).
    TrainingLossOnly,
}

impl Trainer {
    /// At shutdown, a last checkpoint of what was trained since the previous
    /// one. Its number comes from NATS: waited for until half the shutdown
    /// grace has passed since the signal (the loop may notice it a step
    /// late), so a stop without NATS still ends in time, the other half left
    /// for the write; without a number it is kept as the pending checkpoint.
    pub(super) fn last_checkpoint(&mut self, run: &mut Run) -> Result<()> {
        if run.since_checkpoint.steps == 0 || !self.leadership.began() {
            return Ok(());
        }
        let half = Duration::from_secs(self.config.serve.shutdown_grace_secs) / 2;
        let limit = half.saturating_sub(self.supervisor.since_shutdown().unwrap_or_default());
        let version = self.allocate_version(Some(limit));
        let Some(metadata) = self.next_metadata(run, Judged::TrainingLossOnly)? else {
            return Ok(());
        };
        match version {
            Ok(version) => self.write_checkpoint(version, metadata),
            Err(e) => {
                let (step, parent) = (metadata.step, metadata.parent);
                self.store.registry().set_pending(&self.learner.snapshot(metadata)?)?;
                tracing::warn!(
                    step,
                    "no version number for the last checkpoint ({e:#}): kept in the store as pending; it becomes a \
                    version when this node leads again, if the cluster's active version is still v{}",
                    parent.unwrap_or(0)
                );
                Ok(())
            }
        }
    }

    /// Writes the next version from the current weights (after an eval),
    /// makes it active, hands it to the daemon to publish (encoders follow
    /// the announcement), and applies retention. Without a version number
    /// (NATS electing a leader, the lease lost meanwhile) it is postponed.
    pub(super) fn checkpoint(&mut self, run: &mut Run) -> Result<()> {
        // Once the shutdown began, the last checkpoint (after the loop) is
        // the one written, within its share of the grace: a due one started
        // here would wait ALLOCATE_PATIENCE on a NATS that may be gone.
        if self.supervisor.shutdown().is_cancelled() {
            return Ok(());
        }
        match self.allocate_version(Some(ALLOCATE_PATIENCE)) {
            Ok(version) => {
                run.checkpoint_due = None;
                match self.next_metadata(run, Judged::Fully)? {
                    Some(metadata) => self.write_checkpoint(version, metadata),
                    None => {
                        self.give_back(version, None);
                        Ok(())
                    }
                }
            }
            Err(e) => {
                tracing::warn!(
                    step = self.learner.steps(),
                    "checkpoint postponed: no version number ({e:#}); trying again in {CHECKPOINT_RETRY:?}"
                );
                run.checkpoint_due = Some(Instant::now() + CHECKPOINT_RETRY);
                Ok(())
            }
        }
    }

    /// The metadata of a checkpoint of the weights now (after an eval),
    /// numbered 0; None when a loss is not finite (no checkpoint then).
    fn next_metadata(&mut self, run: &mut Run, judged: Judged) -> Result<Option<Metadata>> {
        let train = std::mem::take(&mut run.since_checkpoint).mean();
        let eval = match judged {
            Judged::Fully => self.evaluate()?,
            Judged::TrainingLossOnly => None,
        };
        if eval.is_some_and(|e| !e.total.is_finite()) || train.is_some_and(|t| !t.total.is_finite()) {
            tracing::warn!("checkpoint skipped: non-finite loss");
            return Ok(None);
        }
        let parent = self.active()?.version;
        let diagnostics = match judged {
            Judged::Fully => self.diagnose()?,
            Judged::TrainingLossOnly => None,
        };
        Ok(Some(Metadata {
            version: 0,
            parent: Some(parent),
            step: self.learner.steps() as u64,
            frames_seen: run.frames_seen,
            train_loss: train.map(|t| t.total),
            eval_loss: eval.map(|e| e.total),
            eval_recon: eval.map(|e| e.recon),
            eval_kl: eval.map(|e| e.kl),
            created_at: now_rfc3339(),
            sha256: String::new(),
            config: serde_json::to_value(&self.config)?,
            active_units: diagnostics.as_ref().map(|d| d.active_units),
            kl_per_dim: diagnostics.map(|d| d.kl_per_dim),
        }))
    }

    /// Latent diagnostics of the weights now on up to [`DIAGNOSTIC_FRAMES`]
    /// held-out frames; None while the validation split is empty.
    fn diagnose(&self) -> Result<Option<Diagnostics>> {
        match crate::versions::held_out_frames(&self.store, DIAGNOSTIC_FRAMES)? {
            Some(frames) => Ok(Some(self.learner.net().diagnostics(&frames)?)),
            None => Ok(None),
        }
    }

    /// [`Trainer::checkpoint`] as `version`, a number already allocated.
    fn write_checkpoint(&mut self, version: u64, metadata: Metadata) -> Result<()> {
        let learner = &self.learner;
        let checkpoint = match self.store.registry().add(
            Some(version),
            |version| learner.snapshot(Metadata { version, ..metadata }),
            &Provenance::daemon(Change::Trained),
        ) {
            Ok(checkpoint) => checkpoint,
            Err(e) => {
                // No room for it (refused before sled saw it: frames still
                // go in), or sled's error: training goes on from memory and
                // the next checkpoint tries again. Only a store that keeps
                // sled's error while its disk takes writes is reopened.
                self.status.checkpoint_failed(&e);
                self.give_back(version, Some(&e));
                let every = self.config.train.checkpoint_every_steps;
                tracing::error!(
                    version,
                    step = self.learner.steps(),
                    "checkpoint v{version} not written ({e:#}); \
                    training goes on from memory, and the next checkpoint (every {every} steps) tries again"
                );
                self.store.check_write_failure(&e)?;
                return Ok(());
            }
        };
        self.status.checkpoint_written();
        crash_point!("checkpoint-before-announce");
        self.auto_rollbacks_in_a_row = 0;
        let m = &checkpoint.metadata;
        tracing::info!(version = m.version, parent = ?m.parent, step = m.step, eval_loss = ?m.eval_loss, "checkpoint");
        self.adopt(Arc::new(checkpoint), None)?;
        // Retention is the leader's: a node that stopped leading meanwhile keeps all.
        let Ok(epoch) = self.leadership.epoch() else {
            return Ok(());
        };
        for victim in self.store.registry().retention_victims(self.config.train.keep_last)? {
            let metadata = self.store.registry().delete(victim)?;
            self.events
                .blocking_send(Event::Deleted { metadata, epoch })
                .context("daemon event queue closed")?;
        }
        self.store.registry().prune_history(self.config.train.keep_history)?;
        Ok(())
    }

    /// A new version, already active in the store, goes out: to the object
    /// store, then announced (encoders switch to it on the announcement).
    /// A node that stopped leading since the version was made keeps it
    /// unannounced: when it leads again, the cluster's active version decides.
    /// `published` hears once it is out; it is dropped if it never goes out.
    pub(super) fn adopt(&mut self, checkpoint: Arc<Checkpoint>, published: Option<oneshot::Sender<()>>) -> Result<()> {
        let version = checkpoint.metadata.version;
        match self.leadership.epoch() {
            Ok(epoch) => self
                .events
                .blocking_send(Event::Created {
                    checkpoint: checkpoint.clone(),
                    epoch,
                    published,
                })
                .context("daemon event queue closed")?,
            Err(e) => tracing::warn!(version, "v{version} stays unannounced in the store: {e:#}"),
        }
        self.active = Some(checkpoint.metadata.clone());
        self.status.update(|s| s.active_version = Some(version));
        Ok(())
    }
}
