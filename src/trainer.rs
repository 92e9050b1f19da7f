//! The training loop: one thread, reading top to bottom like nanoGPT's
//! train.py. Wait for `min_frames`; respect the samples-per-insert ratio;
//! step; skip diverging steps and roll back after `max_bad_steps`; log every
//! `log_every_steps`; evaluate every `eval_every_steps`; checkpoint every
//! `checkpoint_every_steps` and at shutdown.
//!
//! The trainer owns the tch tensors (they are not `Sync`). It writes
//! checkpoints to the store itself and hands NATS work (object store,
//! announcements) to the daemon as [`Event`]s.

use crate::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::config::Config;
use crate::latents::LatentWorker;
use crate::learner::{frames_to_tensor, Learner, LossValues};
use crate::sampler::Sampler;
use crate::status::StatusBoard;
use crate::store::{Split, Store};
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Validation batches averaged for one eval.
const EVAL_BATCHES: usize = 4;
/// Accepted losses the divergence guard's running median covers.
const GUARD_WINDOW: usize = 100;
/// Losses needed before the median judges anything.
const GUARD_MIN_HISTORY: usize = 20;
/// How long the loop sleeps while it waits for frames or is throttled.
const IDLE_PAUSE: Duration = Duration::from_millis(50);

/// NATS work the trainer hands to the daemon, in order.
pub enum Event {
    /// Put the weights in the object store and announce; `done` fires after.
    Created(Arc<Checkpoint>, oneshot::Sender<()>),
    /// Announce a rollback to `to` (from version `from`).
    Rollback { from: Option<u64>, to: Arc<Checkpoint>, reason: String },
    /// Remove the weights from the object store and announce.
    Deleted(Metadata),
}

/// Operator requests (from the control service), carried out by the
/// trainer between two steps: they never race a checkpoint write or an
/// automatic rollback, and the history records them in order.
pub enum Command {
    Rollback { version: u64, by: String, reason: Option<String>, reply: oneshot::Sender<Result<Option<u64>>> },
    Import { weights: Vec<u8>, origin: String, by: String, reason: Option<String>, reply: oneshot::Sender<Result<Metadata>> },
    Pin { version: u64, pinned: bool, reply: oneshot::Sender<Result<()>> },
    Delete { version: u64, reply: oneshot::Sender<Result<Metadata>> },
}

/// Everything the loop talks to.
pub struct Trainer {
    pub config: Config,
    pub store: Store,
    pub learner: Learner,
    /// The active checkpoint: the last good one, where rollbacks return.
    pub active: Arc<Checkpoint>,
    pub latents: LatentWorker,
    pub events: mpsc::Sender<Event>,
    pub status: StatusBoard,
    pub commands: mpsc::Receiver<Command>,
    pub shutdown: CancellationToken,
}

/// Skips non-finite losses and losses above `factor` x the running median.
struct DivergenceGuard {
    factor: f64,
    recent: VecDeque<f64>,
    bad_in_a_row: usize,
}

impl DivergenceGuard {
    fn new(factor: f64) -> DivergenceGuard {
        DivergenceGuard { factor, recent: VecDeque::new(), bad_in_a_row: 0 }
    }

    fn accept(&mut self, loss: &LossValues) -> bool {
        let ok = loss.total.is_finite() && (self.recent.len() < GUARD_MIN_HISTORY || loss.total <= self.factor * self.median());
        if ok {
            if self.recent.len() == GUARD_WINDOW {
                self.recent.pop_front();
            }
            self.recent.push_back(loss.total);
            self.bad_in_a_row = 0;
        } else {
            self.bad_in_a_row += 1;
        }
        ok
    }

    fn median(&self) -> f64 {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }
}

/// Losses and images since the last log line or checkpoint (or over one eval).
#[derive(Default)]
struct Window {
    steps: u64,
    images: u64,
    total: f64,
    recon: f64,
    kl: f64,
}

impl Window {
    fn add(&mut self, loss: &LossValues, images: u64) {
        self.steps += 1;
        self.images += images;
        (self.total, self.recon, self.kl) = (self.total + loss.total, self.recon + loss.recon, self.kl + loss.kl);
    }
    fn mean(&self) -> Option<LossValues> {
        let n = self.steps as f64;
        (self.steps > 0).then(|| LossValues { total: self.total / n, recon: self.recon / n, kl: self.kl / n })
    }
}

impl Trainer {
    /// Runs until shutdown, then writes a last checkpoint if it trained since the previous one.
    pub fn run(mut self) -> Result<()> {
        let cfg = self.config.train.clone();
        let device = self.learner.net().device();
        let mut guard = DivergenceGuard::new(cfg.divergence_factor);
        let mut sampler: Option<Sampler> = None;
        let mut frames_seen = self.active.metadata.frames_seen;
        let (mut log_window, mut checkpoint_window) = (Window::default(), Window::default());
        let mut log_started = Instant::now();
        self.status.update(|s| (s.step, s.active_version) = (self.learner.steps(), Some(self.active.metadata.version)));

        while !self.shutdown.is_cancelled() {
            // Operator commands first: a rollback or import restarts the windows.
            if self.run_commands() {
                guard = DivergenceGuard::new(cfg.divergence_factor);
                (log_window, checkpoint_window) = (Window::default(), Window::default());
                frames_seen = self.active.metadata.frames_seen;
            }
            // Data: wait until the training split holds min_frames.
            if self.store.len(Split::Train) < cfg.min_frames {
                self.status.update(|s| s.state = "waiting for frames".into());
                std::thread::sleep(IDLE_PAUSE);
                continue;
            }
            let sampler = match sampler.take() {
                Some(running) => sampler.insert(running),
                None => sampler.insert(Sampler::start(self.store.clone(), Split::Train, cfg.batch_size)?),
            };

            // Samples per insert: never replay the buffer more than the ratio allows.
            let inserted = self.store.frames_ingested();
            if cfg.samples_per_insert > 0.0 && (frames_seen + cfg.batch_size as u64) as f64 > cfg.samples_per_insert * inserted as f64 {
                self.status.update(|s| s.state = "throttled".into());
                std::thread::sleep(IDLE_PAUSE);
                continue;
            }
            let Some(batch) = sampler.next(IDLE_PAUSE) else { continue };
            self.status.update(|s| s.state = "training".into());

            // Step, unless the guard says the loss diverged.
            let xs = frames_to_tensor(&batch, device)?;
            let (loss, applied) = self.learner.train_step_guarded(&xs, |l| guard.accept(l));
            if !applied {
                self.status.update(|s| s.skipped_steps += 1);
                tracing::warn!(loss = loss.total, bad_in_a_row = guard.bad_in_a_row, "step skipped: loss diverged");
                if guard.bad_in_a_row >= cfg.max_bad_steps {
                    self.roll_back_on_divergence(guard.bad_in_a_row)?;
                    guard = DivergenceGuard::new(cfg.divergence_factor);
                    (log_window, checkpoint_window) = (Window::default(), Window::default());
                }
                continue;
            }
            frames_seen += cfg.batch_size as u64;
            log_window.add(&loss, cfg.batch_size as u64);
            checkpoint_window.add(&loss, cfg.batch_size as u64);
            let step = self.learner.steps();
            self.status.update(|s| s.step = step);

            if step % cfg.log_every_steps as i64 == 0 {
                let images_per_s = log_window.images as f64 / log_started.elapsed().as_secs_f64();
                let mean = log_window.mean().unwrap_or(loss);
                tracing::info!(
                    step,
                    images_per_s = images_per_s.round(),
                    loss = mean.total,
                    recon = mean.recon,
                    kl = mean.kl,
                    buffer_frames = self.store.len(Split::Train) + self.store.len(Split::Validation),
                    active_version = self.active.metadata.version,
                    "train"
                );
                self.status.update(|s| {
                    (s.images_per_s, s.last_losses) = (images_per_s, Some(mean.into()));
                    s.record_train(step, mean.total);
                });
                (log_window, log_started) = (Window::default(), Instant::now());
            }
            if step % cfg.eval_every_steps as i64 == 0 {
                if let Some(eval) = self.evaluate()? {
                    tracing::info!(step, eval_loss = eval.total, eval_recon = eval.recon, eval_kl = eval.kl, "eval");
                    self.status.update(|s| {
                        s.eval = Some(eval.into());
                        s.record_eval(step, eval.total);
                    });
                }
            }
            if step % cfg.checkpoint_every_steps as i64 == 0 {
                self.checkpoint(frames_seen, checkpoint_window.mean())?;
                checkpoint_window = Window::default();
            }
        }
        self.status.update(|s| s.state = "stopping".into());
        drop(sampler);
        if checkpoint_window.steps > 0 {
            self.checkpoint(frames_seen, checkpoint_window.mean())?;
        }
        Ok(())
    }

    /// Mean loss over a few validation batches; None while that split is empty.
    fn evaluate(&self) -> Result<Option<LossValues>> {
        let mut rng = rand::thread_rng();
        let mut window = Window::default();
        for _ in 0..EVAL_BATCHES {
            let Some(batch) = self.store.sample(Split::Validation, self.config.train.batch_size, &mut rng)? else { return Ok(None) };
            window.add(&self.learner.net().evaluate(&frames_to_tensor(&batch, self.learner.net().device())?), self.config.train.batch_size as u64);
        }
        Ok(window.mean())
    }

    /// Writes the next version from the current weights (after an eval),
    /// makes it active, moves the latent worker to it, hands it to the
    /// daemon to publish, and applies retention.
    fn checkpoint(&mut self, frames_seen: u64, train: Option<LossValues>) -> Result<()> {
        let eval = self.evaluate()?;
        if eval.is_some_and(|e| !e.total.is_finite()) || train.is_some_and(|t| !t.total.is_finite()) {
            tracing::warn!("checkpoint skipped: non-finite loss");
            return Ok(());
        }
        let metadata = Metadata {
            version: 0,
            parent: Some(self.active.metadata.version),
            step: self.learner.steps() as u64,
            frames_seen,
            train_loss: train.map(|t| t.total),
            eval_loss: eval.map(|e| e.total),
            eval_recon: eval.map(|e| e.recon),
            eval_kl: eval.map(|e| e.kl),
            created_at: now_rfc3339(),
            sha256: String::new(),
            config: serde_json::to_value(&self.config)?,
        };
        let learner = &self.learner;
        let checkpoint = self.store.add_checkpoint(|version| learner.snapshot(Metadata { version, ..metadata }), true, "trained", "wmvae", None)?;
        let m = &checkpoint.metadata;
        tracing::info!(version = m.version, parent = ?m.parent, step = m.step, eval_loss = ?m.eval_loss, "checkpoint");
        self.adopt(Arc::new(checkpoint))?;
        for victim in self.store.retention_victims(self.config.train.keep_last)? {
            let metadata = self.store.delete_checkpoint(victim)?;
            self.events.blocking_send(Event::Deleted(metadata)).context("daemon event queue closed")?;
        }
        Ok(())
    }

    /// Restores weights and optimizer from the active (last good) version.
    fn roll_back_on_divergence(&mut self, bad_steps: usize) -> Result<()> {
        let reason = format!("automatic rollback on divergence: {bad_steps} bad steps in a row");
        let version = self.active.metadata.version;
        self.roll_back(version, "automatic rollback on divergence", "wmvae", Some(reason.clone()))?;
        tracing::warn!(to = version, "{reason}");
        self.status.update(|s| s.auto_rollbacks += 1);
        Ok(())
    }

    /// Training weights, Adam state and the latent encoder all move to
    /// `version`, then the rollback is announced. Nothing changes if the
    /// version is unknown or its checkpoint does not load.
    fn roll_back(&mut self, version: u64, why: &str, by: &str, reason: Option<String>) -> Result<Option<u64>> {
        let to = Arc::new(crate::ops::checkpoint(&self.store, version)?);
        self.learner.restore(&to)?;
        let from = self.store.activate(version, why, by, reason.as_deref())?;
        self.latents.switch_to(to.clone())?;
        self.active = to.clone();
        self.status.update(|s| s.active_version = Some(version));
        let reason = reason.unwrap_or_else(|| why.to_string());
        self.events.blocking_send(Event::Rollback { from, to, reason }).context("daemon event queue closed")?;
        Ok(from)
    }

    /// A foreign model becomes the next version, active, with fresh Adam state.
    fn import(&mut self, weights: &[u8], origin: &str, by: &str, reason: Option<&str>) -> Result<Metadata> {
        let checkpoint = Arc::new(crate::ops::import(&self.store, weights, origin, &self.config, by, reason)?);
        self.learner.restore(&checkpoint)?;
        let metadata = checkpoint.metadata.clone();
        self.adopt(checkpoint)?;
        Ok(metadata)
    }

    /// A new version, already active in the store, goes out: published (the
    /// object is in the store before any latent names the version), then
    /// the latent worker moves to it.
    fn adopt(&mut self, checkpoint: Arc<Checkpoint>) -> Result<()> {
        let (published, done) = oneshot::channel();
        self.events.blocking_send(Event::Created(checkpoint.clone(), published)).context("daemon event queue closed")?;
        let _ = done.blocking_recv();
        self.latents.switch_to(checkpoint.clone())?;
        let version = checkpoint.metadata.version;
        self.active = checkpoint;
        self.status.update(|s| s.active_version = Some(version));
        Ok(())
    }

    /// Runs queued operator commands; true when the training weights changed.
    fn run_commands(&mut self) -> bool {
        let mut changed = false;
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Rollback { version, by, reason, reply } => {
                    let result = self.roll_back(version, "rollback", &by, reason);
                    changed |= result.is_ok();
                    let _ = reply.send(result);
                }
                Command::Import { weights, origin, by, reason, reply } => {
                    let result = self.import(&weights, &origin, &by, reason.as_deref());
                    changed |= result.is_ok();
                    let _ = reply.send(result);
                }
                Command::Pin { version, pinned, reply } => {
                    let _ = reply.send(self.store.set_pinned(version, pinned));
                }
                Command::Delete { version, reply } => {
                    let result = self.store.delete_checkpoint(version).and_then(|metadata| {
                        self.events.blocking_send(Event::Deleted(metadata.clone())).context("daemon event queue closed")?;
                        Ok(metadata)
                    });
                    let _ = reply.send(result);
                }
            }
        }
        changed
    }
}
