//! `wmvae serve`: the daemon's wiring. Opens the store, connects to NATS
//! and applies the migrations, restores the active checkpoint (or writes
//! version 1 on a new store), then runs the ingest loop, the latent worker,
//! the trainer thread, the control service and the task that publishes
//! checkpoints, until the one shutdown token is cancelled. Then each part
//! finishes its work in flight, in order, and the store is flushed.


pub mod announce;
pub mod commands;
pub mod control;
pub mod guard;
pub mod http;
pub mod ingest;
pub mod latents;
pub mod metrics;
pub mod sampler;
pub mod status;
pub mod trainer;

use crate::bus::Bus;
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::config::Config;
use crate::daemon::latents::LatentWorker;
use crate::vae::learner::Learner;
use crate::daemon::status::StatusBoard;
use crate::store::Store;
use crate::daemon::trainer::Trainer;
use crate::vae::device::{self, Device};
use crate::store::Change;

use anyhow::{anyhow, Context, Result};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Checkpoint events queued for publishing: a handful; the trainer waits
/// for each created version to be published anyway.
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

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let store = Store::open(&config.store.data_dir, config.buffer)?;
    let stats = store.stats()?;
    tracing::info!(data_dir = %config.store.data_dir.display(), frames = stats.frames, capacity = stats.capacity, "replay buffer open");
    device::set_threads(config.train.threads);
    let device = config.train.device.resolve()?;
    let bus = Bus::connect(&config).await?;
    let report = bus.migrate().await?;
    tracing::info!(url = %config.nats.url, migration = report.version, streams = ?report.streams, "NATS ready");

    let (learner, active) = {
        let (config, store) = (config.clone(), store.clone());
        tokio::task::spawn_blocking(move || resume_or_start(&config, &store, device)).await??
    };
    announce::publish_offline_changes(&bus, &store).await?;
    let status = StatusBoard::new(store.clone(), device::describe(device));
    let (latents, latent_thread) = LatentWorker::start(device, config.vae(), &active, config.latents.clone(), bus.clone(), status.clone())?;

    let (events, event_queue) = mpsc::channel(EVENT_QUEUE);
    let (commands, command_queue) = mpsc::channel(COMMAND_QUEUE);
    let publisher = tokio::spawn(announce::publish_events(bus.clone(), store.clone(), event_queue));
    let trainer = Trainer {
        config: config.clone(),
        store: store.clone(),
        learner,
        active,
        latents: latents.clone(),
        events,
        status: status.clone(),
        commands: command_queue,
        shutdown: shutdown.clone(),
    };
    let trainer_thread = std::thread::Builder::new().name("wmvae-trainer".into()).spawn(move || trainer.run())?;
    let control = tokio::spawn({
        let context = control::Context { status: status.clone(), latents: latents.clone(), store: store.clone(), bus: bus.clone(), commands, config: config.clone() };
        let (bus, handler) = (bus.clone(), control::handler(context));
        let shutdown = shutdown.clone();
        async move { bus.serve_control(handler, shutdown).await }
    });
    let http = if config.http.addr.is_empty() {
        None
    } else {
        let listener = crate::daemon::http::bind(&config.http.addr).await?;
        let context = crate::daemon::http::HttpContext::new(status.clone(), store.clone(), bus.clone(), config.clone());
        Some(tokio::spawn(crate::daemon::http::serve(listener, context, shutdown.clone())))
    };
    tracing::info!(device = %device::describe(device), "serving");

    // Ingest runs until the shutdown signal; a failure stops the daemon too.
    let ingest_result = ingest::run(bus.clone(), store.clone(), config.ingest.clone(), Some(latents), shutdown.clone()).await;
    shutdown.cancel();
    let trainer_result = tokio::task::spawn_blocking(move || trainer_thread.join()).await?.map_err(|_| anyhow!("trainer thread panicked"))?;
    let control_result = control.await.context("control task")?;
    let http_result = match http {
        Some(task) => task.await.context("HTTP task")?,
        None => Ok(()),
    };
    tokio::task::spawn_blocking(move || latent_thread.join()).await?.map_err(|_| anyhow!("latent worker panicked"))?;
    publisher.await.context("checkpoint publisher")?;
    bus.flush().await?;
    store.flush()?;
    tracing::info!("store flushed; bye");
    ingest_result.and(trainer_result).and(control_result).and(http_result)
}
