//! `wmvae serve`: the daemon's wiring, by role (`[serve] roles`). Connects
//! to NATS and applies the migrations; a **trainer** opens the store,
//! restores the active checkpoint (or writes version 1 on a new store) and
//! runs ingest, the trainer thread and the task that publishes checkpoints;
//! an **encoder** follows the announcements and publishes a latent per
//! frame; both serve their control endpoints (and HTTP, when configured)
//! until the one shutdown token is cancelled: by a signal, or by the first
//! part that fails. Then each part finishes its work in flight, in order.
//! Wiring and shutdown only: the parts are the sibling modules.

pub mod announce;
pub mod commands;
pub mod control;
pub mod encoder;
pub mod guard;
pub mod http;
pub mod ingest;
pub mod metrics;
pub mod sampler;
pub mod status;
pub mod trainer;

use crate::bus::Bus;
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::config::Config;
use crate::vae::learner::Learner;
use crate::daemon::status::StatusBoard;
use crate::store::Store;
use crate::daemon::trainer::Trainer;
use crate::vae::device::{self, Device};
use crate::store::Change;

use crate::bus::service::Endpoint;
use control::Command;
use encoder::Encoder;
use anyhow::{anyhow, Context, Result};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Checkpoint events queued for publishing: a handful; the trainer makes a
/// version every `checkpoint_every_steps`, far slower than they publish.
const EVENT_QUEUE: usize = 16;
/// Operator commands waiting for the trainer: operators are few.
const COMMAND_QUEUE: usize = 16;

/// One token cancelled by SIGTERM or Ctrl-C, passed down to every task.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

/// The learner resumed from the active version, or fresh weights written
/// as version 1 when the store has none.
fn resume_or_start(config: &Config, store: &Store, device: Device) -> Result<(Learner, Arc<Checkpoint>)> {
    let mut learner = Learner::new(device, config.vae(), config.adam());
    if let Some(version) = store.registry().active_version()? {
        let checkpoint = store.registry().get(version)?.with_context(|| format!("active checkpoint v{version} is missing from the store"))?;
        learner.restore(&checkpoint)?;
        tracing::info!(version, step = learner.steps(), "resumed from the active checkpoint");
        return Ok((learner, Arc::new(checkpoint)));
    }
    let metadata = Metadata { created_at: now_rfc3339(), config: serde_json::to_value(config)?, ..Default::default() };
    let checkpoint = store.registry().add(|version| learner.snapshot(Metadata { version, ..metadata }), Change::Initial, "wmvae", None)?;
    tracing::info!(version = checkpoint.metadata.version, "initial weights written");
    Ok((learner, Arc::new(checkpoint)))
}

/// The trainer role's parts, running.
struct TrainerRole {
    store: Store,
    commands: mpsc::Sender<Command>,
    ingest: JoinHandle<Result<()>>,
    thread: std::thread::JoinHandle<Result<()>>,
    publisher: JoinHandle<()>,
}

/// Cancels `shutdown` when `result` is an error, so one part failing stops
/// the whole daemon (which then exits non-zero with the reason).
fn stop_on_error<T>(result: Result<T>, shutdown: &CancellationToken) -> Result<T> {
    if result.is_err() {
        shutdown.cancel();
    }
    result
}

impl TrainerRole {
    /// Resumes (or starts) the learner, catches NATS up with the store, and
    /// starts ingest, the trainer thread and the checkpoint publisher.
    async fn start(config: &Config, bus: &Bus, store: &Store, device: Device, status: &StatusBoard, shutdown: &CancellationToken) -> Result<TrainerRole> {
        let (learner, active) = {
            let (config, store) = (config.clone(), store.clone());
            tokio::task::spawn_blocking(move || resume_or_start(&config, &store, device)).await??
        };
        announce::publish_offline_changes(bus, store).await?;
        let (events, event_queue) = mpsc::channel(EVENT_QUEUE);
        let (commands, command_queue) = mpsc::channel(COMMAND_QUEUE);
        let publisher = tokio::spawn(announce::publish_events(bus.clone(), store.clone(), event_queue));
        let trainer = Trainer {
            config: config.clone(),
            store: store.clone(),
            learner,
            active,
            events,
            status: status.clone(),
            commands: command_queue,
            shutdown: shutdown.clone(),
        };
        let stop = shutdown.clone();
        let thread = std::thread::Builder::new().name("wmvae-trainer".into()).spawn(move || stop_on_error(trainer.run(), &stop))?;
        let (bus, store_for_ingest, ingest_config, stop) = (bus.clone(), store.clone(), config.ingest.clone(), shutdown.clone());
        let ingest = tokio::spawn(async move { stop_on_error(ingest::run(bus, store_for_ingest, ingest_config, stop.clone()).await, &stop) });
        Ok(TrainerRole { store: store.clone(), commands, ingest, thread, publisher })
    }

    /// After shutdown: ingest's batches in flight committed and acked, the
    /// last checkpoint written, every checkpoint event published.
    async fn finish(self) -> Result<()> {
        let ingested = self.ingest.await.context("ingest task")?;
        let trained = tokio::task::spawn_blocking(move || self.thread.join()).await?.map_err(|_| anyhow!("the trainer thread panicked"))?;
        drop(self.commands);
        self.publisher.await.context("checkpoint publisher")?;
        self.store.flush()?;
        tracing::info!("store flushed");
        ingested.context("ingest").and(trained.context("trainer"))
    }
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let roles = config.serve.roles;
    device::set_threads(config.train.threads);
    let device = config.train.device.resolve()?;
    let store = match roles.trainer {
        true => {
            let store = Store::open(&config.store.data_dir, config.buffer)?;
            let stats = store.stats()?;
            tracing::info!(data_dir = %config.store.data_dir.display(), frames = stats.frames, capacity = stats.capacity, "replay buffer open");
            Some(store)
        }
        false => None,
    };
    let bus = Bus::connect(&config).await?;
    let report = bus.migrate().await?;
    tracing::info!(url = %config.nats.url, migration = report.version, streams = ?report.streams, "NATS ready");
    let status = StatusBoard::new(roles, &config.node.id, store.clone(), device::describe(device));

    let trainer = match &store {
        Some(store) => Some(TrainerRole::start(&config, &bus, store, device, &status, &shutdown).await?),
        None => None,
    };
    let encoder = match roles.encoder {
        true => Some(encoder::start(&bus, &config, device, status.clone(), shutdown.clone())?),
        false => None,
    };
    let control = tokio::spawn({
        let context = control::Context {
            status: status.clone(),
            bus: bus.clone(),
            config: config.clone(),
            encoder: encoder.as_ref().map(|e| e.handle.clone()),
            trainer: trainer.as_ref().map(|t| control::TrainerSide { store: t.store.clone(), commands: t.commands.clone() }),
        };
        let (bus, handler, shutdown) = (bus.clone(), control::handler(context), shutdown.clone());
        async move { stop_on_error(bus.serve_control(handler, &Endpoint::served_by(roles), shutdown.clone()).await, &shutdown) }
    });
    let http = if config.http.addr.is_empty() {
        None
    } else {
        let listener = http::bind(&config.http.addr).await?;
        let context = http::HttpContext::new(status.clone(), store.clone(), bus.clone(), config.clone());
        Some(tokio::spawn(http::serve(listener, context, shutdown.clone())))
    };
    tracing::info!(roles = %roles, node = %config.node.id, device = %device::describe(device), "serving");

    // Every part runs until the shutdown signal; the first to fail sends it.
    shutdown.cancelled().await;
    let trained = match trainer {
        Some(trainer) => trainer.finish().await,
        None => Ok(()),
    };
    let controlled = control.await.context("control task")?;
    let served = match http {
        Some(task) => task.await.context("HTTP task")?,
        None => Ok(()),
    };
    let encoded = match encoder {
        Some(Encoder { handle, task }) => {
            drop(handle);
            task.await.context("encoder task")?
        }
        None => Ok(()),
    };
    bus.flush().await?;
    tracing::info!("bye");
    trained.and(controlled).and(served).and(encoded)
}
