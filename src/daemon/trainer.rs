//! The training loop: one thread, read top to bottom like nanoGPT's
//! train.py. Gate (enough frames, samples per insert); step, unless the
//! divergence guard refuses the loss (then, after `max_bad_steps`, roll
//! back); log every `log_every_steps`; evaluate every `eval_every_steps`;
//! checkpoint every `checkpoint_every_steps` and at shutdown.
//!
//! The trainer owns the training tensors (they are not `Sync`), writes
//! checkpoints to the store itself (how: `checkpoints.rs`) and hands NATS work (object store,
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
use crate::vae::checkpoint::{Checkpoint, Metadata};
use crate::vae::learner::{Learner, LossValues};
use anyhow::{bail, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Validation batches averaged for one eval.
const EVAL_BATCHES: usize = 4;
/// How long the loop sleeps while it waits for frames or is throttled.
const IDLE_PAUSE: Duration = Duration::from_millis(50);

/// NATS work the trainer hands to the daemon, in order. `epoch` is the
/// lease under which the trainer made the change: the announcer makes a
/// version active only while this node still leads under it.
pub enum Event {
    /// Put the weights and the full checkpoint in the object store, make the
    /// version active (compare-and-set) and announce; then say so on
    /// `published`, where someone waits for it (an operator's import).
    Created {
        checkpoint: Arc<Checkpoint>,
        epoch: u64,
        published: Option<oneshot::Sender<()>>,
    },
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
    /// The active version's metadata: the last good one, where rollbacks
    /// return (its bytes are read from the store then: holding them here
    /// kept ~52 MB resident for nothing). None until this node first leads
    /// on an empty store.
    pub(super) active: Option<Metadata>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) status: StatusBoard,
    pub(super) commands: mpsc::Receiver<Command>,
    /// Starts the sampler's threads; its token is the shutdown signal.
    pub(super) supervisor: Supervisor,
    /// Whether this node leads training, under which epoch, and its way to NATS.
    pub(super) leadership: Leadership,
    /// Automatic rollbacks since the last version trained.
    pub(super) auto_rollbacks_in_a_row: u32,
    /// A version number allocated under an epoch (epoch, number) for a write
    /// that never reached the store (refused for want of room, or skipped):
    /// the next write under that epoch takes it, so a full disk burns none.
    pub(super) unused_version: Option<(u64, u64)>,
}

/// What resuming from the store gave: the learner, and the active version's metadata if any.
pub type Resumed = (Learner, Option<Metadata>);

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
            unused_version: None,
        };
        (trainer, event_queue, command_sender)
    }
}

/// The state of one run of training from the active version: reset when
/// the weights change under it (a rollback or an import).
pub(super) struct Run {
    pub(super) guard: DivergenceGuard,
    /// Frames trained on since version 1 (saved with each checkpoint).
    pub(super) frames_seen: u64,
    pub(super) since_log: LossWindow,
    pub(super) since_checkpoint: LossWindow,
    pub(super) log_started: Instant,
    /// A checkpoint is due (its step passed, not written yet): tried from
    /// this instant on (later once postponed).
    pub(super) checkpoint_due: Option<Instant>,
}

impl Run {
    fn from(active: Option<&Metadata>, cfg: &TrainConfig) -> Run {
        Run {
            guard: DivergenceGuard::new(cfg.divergence_factor),
            frames_seen: active.map_or(0, |a| a.frames_seen),
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
        let mut run = Run::from(self.active.as_ref(), &cfg);
        let mut takeover = None;
        let sampler = Sampler::start(
            self.store.clone(),
            Split::Train,
            cfg.batch_size,
            cfg.min_frames,
            &self.supervisor,
        )?;
        self.status
            .update(|s| (s.step, s.active_version) = (self.learner.steps(), self.active.as_ref().map(|a| a.version)));
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
                run = Run::from(self.active.as_ref(), &cfg);
            }
            // Operator commands between two steps; new weights start a new run.
            if self.run_commands() {
                run = Run::from(self.active.as_ref(), &cfg);
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
            self.after_step(&mut run, loss, &cfg)?;
        }
        self.status.update(|s| s.state = Some(TrainerState::Stopping));
        drop(sampler);
        self.last_checkpoint(&mut run)?;
        Ok(())
    }

    /// Records a step taken, then logs, evaluates and checkpoints where the step calls for it.
    fn after_step(&mut self, run: &mut Run, loss: LossValues, cfg: &TrainConfig) -> Result<()> {
        run.record(&loss, cfg.batch_size);
        let step = self.learner.steps();
        self.status.update(|s| s.step = step);
        if step % cfg.log_every_steps as i64 == 0 {
            self.log(step, run, loss);
        }
        let early = cfg.is_early_checkpoint(step as u64);
        if step % cfg.eval_every_steps as i64 == 0 || early {
            self.report_eval(step)?;
        }
        if step % cfg.checkpoint_every_steps as i64 == 0 || early {
            run.checkpoint_due.get_or_insert_with(Instant::now);
        }
        if run.checkpoint_due.is_some_and(|from| Instant::now() >= from) {
            self.checkpoint(run)?;
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
                    self.active()?.version
                );
            };
            let reason = format!(
                "automatic rollback on divergence: {} bad steps in a row (attempt {attempt} of {})",
                run.guard.bad_in_a_row, cfg.max_auto_rollbacks
            );
            self.roll_back(version, Provenance::daemon(Change::AutoRollback).because(&reason))?;
            tracing::warn!(to = version, "{reason}");
            self.status.update(|s| s.auto_rollbacks += 1);
            *run = Run::from(self.active.as_ref(), cfg);
        }
        Ok(())
    }

    /// The log line and the status board's train curve.
    fn log(&self, step: i64, run: &mut Run, last: LossValues) {
        let images_per_s = run.since_log.images as f64 / run.log_started.elapsed().as_secs_f64();
        let mean = run.since_log.mean().unwrap_or(last);
        let buffer_frames = self.store.len(Split::Train) + self.store.len(Split::Validation);
        let active_version = self.active.as_ref().map(|a| a.version);
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
    pub(super) fn evaluate(&self) -> Result<Option<LossValues>> {
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
}
