//! The training loop: one thread, read top to bottom like nanoGPT's
//! train.py. Gate (enough frames, samples per insert); step, unless the
//! divergence guard refuses the loss (then, after `max_bad_steps`, roll
//! back); log every `log_every_steps`; evaluate every `eval_every_steps`;
//! checkpoint every `checkpoint_every_steps` and at shutdown.
//!
//! The trainer owns the training tensors (they are not `Sync`), writes
//! checkpoints to the store itself and hands NATS work (object store,
//! announcements) to the daemon as [`Event`]s. Operator commands are
//! carried out between two steps by `commands.rs`; this file is the loop.

use super::control::Command;
use super::guard::{DivergenceGuard, LossWindow};
use super::leadership::Leadership;
use super::sampler::Sampler;
use super::status::{Heart, StatusBoard, TrainerState};
use super::supervisor::Supervisor;
use crate::config::{Config, TrainConfig};
use crate::store::{Change, Provenance, Split, Store};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::vae::learner::{Learner, LossValues};
use crate::vae::properties::{Diagnostics, DIAGNOSTIC_FRAMES};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Validation batches averaged for one eval.
const EVAL_BATCHES: usize = 4;
/// How long the loop sleeps while it waits for frames or is throttled.
const IDLE_PAUSE: Duration = Duration::from_millis(50);
/// How long a checkpoint waits for its version number from NATS (ms when
/// NATS is well) before it is postponed: training goes on meanwhile.
const ALLOCATE_PATIENCE: Duration = Duration::from_secs(5);
/// Training time between tries of a postponed checkpoint.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// NATS work the trainer hands to the daemon, in order. `epoch` is the
/// lease under which the trainer made the change: the announcer makes a
/// version active only while this node still leads under it.
pub enum Event {
    /// Put the weights and the full checkpoint in the object store, make the
    /// version active (compare-and-set) and announce.
    Created { checkpoint: Arc<Checkpoint>, epoch: u64 },
    /// Make `to` active again and announce the rollback (from version `from`).
    Rollback {
        from: Option<u64>,
        to: Arc<Checkpoint>,
        reason: String,
        epoch: u64,
    },
    /// Remove the weights from the object store and announce.
    Deleted { metadata: Metadata, epoch: u64 },
}

/// Checkpoint events queued for publishing: a handful; the trainer makes a
/// version every `checkpoint_every_steps`, far slower than they publish.
const EVENT_QUEUE: usize = 16;
/// Operator commands waiting for the trainer: operators are few.
const COMMAND_QUEUE: usize = 16;

/// Everything the loop talks to.
pub struct Trainer {
    pub(super) config: Config,
    pub(super) store: Store,
    pub(super) learner: Learner,
    /// The active checkpoint: the last good one, where rollbacks return.
    /// None until this node first leads on an empty store.
    pub(super) active: Option<Arc<Checkpoint>>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) status: StatusBoard,
    pub(super) commands: mpsc::Receiver<Command>,
    /// Starts the sampler's threads; its token is the shutdown signal.
    pub(super) supervisor: Supervisor,
    /// Whether this node leads training, under which epoch, and its way to NATS.
    pub(super) leadership: Leadership,
    /// Automatic rollbacks since the last version trained.
    pub(super) auto_rollbacks_in_a_row: u32,
}

/// What resuming from the store gave: the learner, and the active checkpoint if any.
pub type Resumed = (Learner, Option<Arc<Checkpoint>>);

impl Trainer {
    /// A trainer (not leading yet), with the queue its events go out on and
    /// the one operator commands come in on.
    pub(super) fn new(
        config: Config,
        store: Store,
        (learner, active): Resumed,
        status: StatusBoard,
        supervisor: Supervisor,
        leadership: Leadership,
    ) -> (Trainer, mpsc::Receiver<Event>, mpsc::Sender<Command>) {
        let (events, event_queue) = mpsc::channel(EVENT_QUEUE);
        let (command_sender, commands) = mpsc::channel(COMMAND_QUEUE);
        let trainer = Trainer {
            config,
            store,
            learner,
            active,
            events,
            status,
            commands,
            supervisor,
            leadership,
            auto_rollbacks_in_a_row: 0,
        };
        (trainer, event_queue, command_sender)
    }
}

/// The state of one run of training from the active version: reset when
/// the weights change under it (a rollback or an import).
struct Run {
    guard: DivergenceGuard,
    /// Frames trained on since version 1 (saved with each checkpoint).
    frames_seen: u64,
    since_log: LossWindow,
    since_checkpoint: LossWindow,
    log_started: Instant,
    /// A checkpoint is due (its step passed, not written yet): tried from
    /// this instant on (later once postponed).
    checkpoint_due: Option<Instant>,
}

impl Run {
    fn from(active: Option<&Checkpoint>, cfg: &TrainConfig) -> Run {
        Run {
            guard: DivergenceGuard::new(cfg.divergence_factor),
            frames_seen: active.map_or(0, |a| a.metadata.frames_seen),
            since_log: LossWindow::default(),
            since_checkpoint: LossWindow::default(),
            log_started: Instant::now(),
            checkpoint_due: None,
        }
    }

    fn record(&mut self, loss: &LossValues, images: usize) {
        self.frames_seen += images as u64;
        self.since_log.add(loss, images as u64);
        self.since_checkpoint.add(loss, images as u64);
    }
}

impl Trainer {
    /// Runs until shutdown, then writes a last checkpoint if it trained since the previous one.
    pub fn run(mut self) -> Result<()> {
        let cfg = self.config.train.clone();
        let mut run = Run::from(self.active.as_deref(), &cfg);
        let mut takeover = None;
        let sampler = Sampler::start(
            self.store.clone(),
            Split::Train,
            cfg.batch_size,
            cfg.min_frames,
            &self.supervisor,
        )?;
        self.status.update(|s| {
            (s.step, s.active_version) = (self.learner.steps(), self.active.as_ref().map(|a| a.metadata.version))
        });
        while !self.supervisor.shutdown().is_cancelled() {
            self.status.beat(Heart::Trainer);
            // Leadership: a standby keeps its buffer current and waits; a new epoch takes over.
            let Some(grant) = self.leadership.offered() else {
                self.stand_by();
                takeover = None;
                continue;
            };
            if !self.leadership.took_over_under(grant) {
                if !self.take_over_or_wait(grant, &mut takeover)? {
                    continue;
                }
                run = Run::from(self.active.as_deref(), &cfg);
            }
            // Operator commands between two steps; new weights start a new run.
            if self.run_commands() {
                run = Run::from(self.active.as_deref(), &cfg);
            }
            // Gate: enough frames, and no more replay than samples_per_insert allows.
            if let Some(waiting) = self.gate(&cfg, run.frames_seen) {
                self.status.update(|s| s.state = Some(waiting));
                std::thread::sleep(IDLE_PAUSE);
                continue;
            }
            let Some(batch) = sampler.next(IDLE_PAUSE) else {
                continue;
            };
            self.status.update(|s| s.state = Some(TrainerState::Training));
            // Step, unless the guard says the loss diverged.
            let (loss, applied) = self.learner.train_step_guarded(&batch, |l| run.guard.accept(l))?;
            if !applied {
                self.diverged(&mut run, &loss, &cfg)?;
                continue;
            }
            crash_point!("trainer-after-step");
            run.record(&loss, cfg.batch_size);
            let step = self.learner.steps();
            self.status.update(|s| s.step = step);
            if step % cfg.log_every_steps as i64 == 0 {
                self.log(step, &mut run, loss);
            }
            let early = cfg.is_early_checkpoint(step as u64);
            if step % cfg.eval_every_steps as i64 == 0 || early {
                self.report_eval(step)?;
            }
            if step % cfg.checkpoint_every_steps as i64 == 0 || early {
                run.checkpoint_due.get_or_insert_with(Instant::now);
            }
            if run.checkpoint_due.is_some_and(|from| Instant::now() >= from) {
                self.checkpoint(&mut run)?;
            }
        }
        self.status.update(|s| s.state = Some(TrainerState::Stopping));
        drop(sampler);
        if run.since_checkpoint.steps > 0 && self.leadership.began() {
            // Its number comes from NATS: waited for at most half the
            // shutdown grace, so a stop without NATS still ends in time;
            // without one it is kept as the pending checkpoint.
            let limit = Duration::from_secs(self.config.serve.shutdown_grace_secs) / 2;
            let version = self.allocate_version(Some(limit));
            if let Some(metadata) = self.next_metadata(&mut run)? {
                match version {
                    Ok(version) => self.write_checkpoint(version, metadata)?,
                    Err(e) => {
                        let (step, parent) = (metadata.step, metadata.parent);
                        self.store.registry().set_pending(&self.learner.snapshot(metadata)?)?;
                        tracing::warn!(
                            step,
                            "no version number for the last checkpoint ({e:#}): kept in the store as \
                            pending; it becomes a version when this node leads again, if the cluster's active version \
                            is still v{}",
                            parent.unwrap_or(0)
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Why training must wait now, if it must.
    fn gate(&self, cfg: &TrainConfig, frames_seen: u64) -> Option<TrainerState> {
        if self.store.len(Split::Train) < cfg.min_frames {
            return Some(TrainerState::WaitingForFrames);
        }
        let inserted = self.store.frames_ingested();
        let over_ratio = (frames_seen + cfg.batch_size as u64) as f64 > cfg.samples_per_insert * inserted as f64;
        (cfg.samples_per_insert > 0.0 && over_ratio).then_some(TrainerState::Throttled)
    }

    /// A skipped step: counted, and after `max_bad_steps` in a row, an
    /// automatic rollback to the active (last good) version.
    fn diverged(&mut self, run: &mut Run, loss: &LossValues, cfg: &TrainConfig) -> Result<()> {
        self.status.update(|s| s.skipped_steps += 1);
        tracing::warn!(
            loss = loss.total,
            bad_in_a_row = run.guard.bad_in_a_row,
            "step skipped: loss diverged"
        );
        if run.guard.bad_in_a_row >= cfg.max_bad_steps {
            self.auto_rollbacks_in_a_row += 1;
            let attempt = self.auto_rollbacks_in_a_row;
            if attempt > cfg.max_auto_rollbacks {
                bail!(
                    "training stopped: the loss diverged again after {} automatic rollbacks in a row \
                    (train.max_auto_rollbacks); look at the data and the learning rate, then roll back or import by \
                    hand",
                    cfg.max_auto_rollbacks
                );
            }
            if self.leadership.epoch().is_err() {
                return Ok(()); // not leading now: the loop stands by
            }
            let Some(version) = self.rollback_target(attempt)? else {
                bail!(
                    "training stopped: the loss diverged and no version before v{} is left to roll back to",
                    self.active()?.metadata.version
                );
            };
            let reason = format!(
                "automatic rollback on divergence: {} bad steps in a row (attempt {attempt} of {})",
                run.guard.bad_in_a_row, cfg.max_auto_rollbacks
            );
            self.roll_back(version, Provenance::daemon(Change::AutoRollback).because(&reason))?;
            tracing::warn!(to = version, "{reason}");
            self.status.update(|s| s.auto_rollbacks += 1);
            *run = Run::from(self.active.as_deref(), cfg);
        }
        Ok(())
    }

    /// The log line and the status board's train curve.
    fn log(&self, step: i64, run: &mut Run, last: LossValues) {
        let images_per_s = run.since_log.images as f64 / run.log_started.elapsed().as_secs_f64();
        let mean = run.since_log.mean().unwrap_or(last);
        let buffer_frames = self.store.len(Split::Train) + self.store.len(Split::Validation);
        let active_version = self.active.as_ref().map(|a| a.metadata.version);
        tracing::info!(
            step,
            images_per_s = images_per_s.round(),
            loss = mean.total,
            recon = mean.recon,
            kl = mean.kl,
            buffer_frames,
            ?active_version,
            "train"
        );
        self.status.update(|s| {
            (s.images_per_s, s.last_losses) = (images_per_s, Some(mean));
            s.record_train(step, mean.total);
        });
        (run.since_log, run.log_started) = (LossWindow::default(), Instant::now());
    }

    /// An eval on the validation split, logged and put on the status board.
    fn report_eval(&self, step: i64) -> Result<()> {
        if let Some(eval) = self.evaluate()? {
            tracing::info!(
                step,
                eval_loss = eval.total,
                eval_recon = eval.recon,
                eval_kl = eval.kl,
                "eval"
            );
            self.status.update(|s| {
                s.eval = Some(eval);
                s.record_eval(step, eval.total);
            });
        }
        Ok(())
    }

    /// Mean loss over a few validation batches; None while that split is empty.
    fn evaluate(&self) -> Result<Option<LossValues>> {
        let mut rng = rand::thread_rng();
        let mut window = LossWindow::default();
        for _ in 0..EVAL_BATCHES {
            let Some(batch) = self
                .store
                .sample(Split::Validation, self.config.train.batch_size, &mut rng)?
            else {
                return Ok(None);
            };
            window.add(
                &self.learner.net().evaluate_frames(&batch)?,
                self.config.train.batch_size as u64,
            );
        }
        Ok(window.mean())
    }

    /// Writes the next version from the current weights (after an eval),
    /// makes it active, hands it to the daemon to publish (encoders follow
    /// the announcement), and applies retention. Without a version number
    /// (NATS electing a leader, the lease lost meanwhile) it is postponed.
    fn checkpoint(&mut self, run: &mut Run) -> Result<()> {
        // Once the shutdown began, the last checkpoint (after the loop) is
        // the one written, within its share of the grace: a due one started
        // here would wait ALLOCATE_PATIENCE on a NATS that may be gone.
        if self.supervisor.shutdown().is_cancelled() {
            return Ok(());
        }
        match self.allocate_version(Some(ALLOCATE_PATIENCE)) {
            Ok(version) => {
                run.checkpoint_due = None;
                match self.next_metadata(run)? {
                    Some(metadata) => self.write_checkpoint(version, metadata),
                    None => Ok(()),
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
    fn next_metadata(&mut self, run: &mut Run) -> Result<Option<Metadata>> {
        let train = std::mem::take(&mut run.since_checkpoint).mean();
        let eval = self.evaluate()?;
        if eval.is_some_and(|e| !e.total.is_finite()) || train.is_some_and(|t| !t.total.is_finite()) {
            tracing::warn!("checkpoint skipped: non-finite loss");
            return Ok(None);
        }
        let parent = self.active()?.metadata.version;
        let diagnostics = self.diagnose()?;
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
        self.adopt(Arc::new(checkpoint))?;
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
    pub(super) fn adopt(&mut self, checkpoint: Arc<Checkpoint>) -> Result<()> {
        let version = checkpoint.metadata.version;
        match self.leadership.epoch() {
            Ok(epoch) => self
                .events
                .blocking_send(Event::Created {
                    checkpoint: checkpoint.clone(),
                    epoch,
                })
                .context("daemon event queue closed")?,
            Err(e) => tracing::warn!(version, "v{version} stays unannounced in the store: {e:#}"),
        }
        self.active = Some(checkpoint);
        self.status.update(|s| s.active_version = Some(version));
        Ok(())
    }
}
