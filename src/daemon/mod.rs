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
pub mod checkpoints;
pub mod commands;
pub mod control;
pub mod encoder;
mod error;
pub mod guard;
pub mod http;
pub mod ingest;
pub mod leadership;
pub mod lease;
mod memory;
pub mod metrics;
mod node_claim;
pub mod recovery;
pub mod sampler;
pub mod showcase;
pub mod status;
mod store_watch;
pub mod supervisor;
pub mod takeover;
pub mod trainer;
mod trainer_role;
pub mod undeliverable;

pub use error::Error;

use crate::bus::Bus;
use crate::config::Config;
use crate::daemon::status::StatusBoard;
use crate::daemon::supervisor::{Supervisor, Watchdog};
use crate::store::{self, Store};
use crate::vae::device;

use crate::backoff::Backoff;
use crate::bus::service::{Endpoint, NodeInfo, StatusProbe};
use anyhow::{Context, Result};
use encoder::Encoder;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use trainer_role::{serve_while_leading, TrainerRole};

/// Between the parts stopping for a store reopen and starting again: sled's
/// threads let go of the store's lock.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);
/// The final flush to NATS gets at least this long, even past the grace.
const FINAL_FLUSH: Duration = Duration::from_millis(500);
/// How long past the shutdown grace the [`Watchdog`] lets a shutdown run
/// before it ends the process: the parts are cut off at the grace, so what
/// is left (at most [`FINAL_FLUSH`] to NATS, the store's flush) is short.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(4);

/// One token cancelled by SIGTERM or Ctrl-C, passed down to every task. A
/// second signal ends the process at once (exit 1): the operator's way out
/// of a shutdown that waits on NATS.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down (again to exit at once)"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down (again to exit at once)"),
        }
        cancel.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = sigterm.recv() => {}
        }
        eprintln!(
            "error: a second signal: exiting at once; acked frames are in the store, unacked ones are \
            redelivered, unannounced versions go out at the next start"
        );
        // _exit, not exit: exit runs libtorch's static destructors while the
        // trainer thread may still be inside libtorch (a SIGSEGV, seen).
        // SAFETY: _exit only ends the process; nothing runs after it.
        unsafe { libc::_exit(1) }
    });
    Ok(token)
}

/// Awaits `task` until `deadline`; past it, aborts it and says what is
/// left. A part's own failure is the supervisor's to report.
async fn until<T>(deadline: tokio::time::Instant, what: &str, left: &str, task: JoinHandle<T>) {
    let abort = task.abort_handle();
    if tokio::time::timeout_at(deadline, task).await.is_err() {
        abort.abort();
        tracing::warn!("{what}: not done within the shutdown grace; {left}");
    }
}

/// On every reconnect, the migrations again: a server that came back
/// without its JetStream state (a new disk, a lost volume) gets its
/// streams, buckets and consumers back without a restart of the daemon.
/// Each part then retries against them as against any NATS fault.
async fn migrate_on_reconnect(bus: Bus, shutdown: CancellationToken) -> Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = bus.reconnected() => {}
        }
        let failed = |e: &anyhow::Error, next| {
            tracing::warn!("NATS reconnected, but the migrations failed ({e:#}); trying again in {next:?}")
        };
        let Some(report) = Backoff::default().retry(&shutdown, || bus.migrate(), failed).await else {
            return Ok(());
        };
        tracing::info!(streams = ?report.streams, "NATS reconnected: streams, buckets and consumers in place");
    }
}

/// Runs the daemon until `shutdown` (or the first part's failure, its
/// error). When the store must be reopened (sled latched a write error and
/// the disk takes writes again: [`store::Error::NeedsReopen`]), the parts stop as on a
/// shutdown and start again in this process after [`REOPEN_PAUSE`], which
/// reopens the store: frames not acked come back from JetStream, training
/// resumes from the active version.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    loop {
        let parts = shutdown.child_token();
        match run_parts(config.clone(), parts).await {
            Err(Error::Store(e @ store::Error::NeedsReopen { .. })) if !shutdown.is_cancelled() => {
                tracing::error!("{e:#}; the daemon's parts start again in {REOPEN_PAUSE:?}, reopening the store");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(REOPEN_PAUSE) => {}
                }
            }
            done => return Ok(done?),
        }
    }
}

/// The daemon's parts, once: until `shutdown` or the first failure (its
/// error). The shutdown is bounded: each part is waited for until the
/// grace is over, and a [`Watchdog`] ends the process if it still isn't.
/// Whichever part failed, a store found to need reopening is the error
/// ([`store::Error::NeedsReopen`]), for [`run`] to start the parts again.
async fn run_parts(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    let supervisor = Supervisor::new(shutdown.clone());
    let roles = config.serve.roles;
    device::set_threads(config.train.threads);
    let device = config.train.device.resolve()?;
    let store = match roles.trainer {
        true => Some(open_store(&config)?),
        false => None,
    };
    let bus = Bus::connect(&config).await?;
    let report = bus.migrate().await?;
    tracing::info!(url = %config.nats.url, migration = report.version, streams = ?report.streams, "NATS ready");
    let status = StatusBoard::new(roles, &config.node.id, store.clone(), device::describe(device));
    let migrations = supervisor.spawn(
        "migrations on reconnect",
        migrate_on_reconnect(bus.clone(), shutdown.clone()),
    );
    let store_watch = store
        .as_ref()
        .map(|store| store_watch::start(store, &config, &supervisor));
    let trainer = match &store {
        Some(store) => Some(TrainerRole::start(&config, &bus, store, device, &status, &supervisor).await?),
        None => None,
    };
    let encoder = match roles.encoder {
        true => Some(encoder::start(&bus, &config, device, status.clone(), &supervisor)?),
        false => None,
    };
    let (control, leader_control) = serve_control(&config, &bus, &status, (&trainer, &encoder), &supervisor);
    let http = match config.http.addr.is_empty() {
        true => None,
        false => {
            let listener = http::bind(&config.http.addr).await?;
            let context = http::HttpContext::new(status.clone(), store.clone(), bus.clone(), config.clone());
            Some(supervisor.spawn("HTTP", http::serve(listener, context, shutdown.clone())))
        }
    };
    tracing::info!(roles = %roles, node = %config.node.id, device = %device::describe(device), "serving");

    // Every part runs until the shutdown signal; the first to fail sends it.
    shutdown.cancelled().await;
    let running = Running {
        control,
        leader_control,
        trainer,
        http,
        encoder,
        migrations,
        store_watch,
    };
    let trained = running.stop(&config, &bus, &supervisor).await;
    tracing::info!("bye");
    let failure = supervisor.take_failure().map_or(trained, Err);
    match (failure, store.as_ref().and_then(Store::needs_reopen)) {
        (Err(_), Some(reopen)) => Err(Error::Store(reopen)),
        (failure, _) => Ok(failure?),
    }
}

/// The trainer role's store, opened (the replay buffer and the registry).
fn open_store(config: &Config) -> Result<Store> {
    let store = Store::open(&config.store.data_dir, config.buffer)?;
    let stats = store.stats()?;
    let (frames, capacity) = (stats.frames, stats.capacity);
    tracing::info!(data_dir = %config.store.data_dir.display(), frames, capacity, "replay buffer open");
    Ok(store)
}

/// The control service's endpoints of this node's roles, and the
/// leader-only ones (checkpoints, buffer) on a trainer node while it leads.
fn serve_control(
    config: &Config,
    bus: &Bus,
    status: &StatusBoard,
    (trainer, encoder): (&Option<TrainerRole>, &Option<Encoder>),
    supervisor: &Supervisor,
) -> (JoinHandle<Result<()>>, Option<JoinHandle<Result<()>>>) {
    let roles = config.serve.roles;
    let node = NodeInfo {
        id: config.node.id.clone(),
        roles,
    };
    let context = control::Context {
        status: status.clone(),
        bus: bus.clone(),
        config: config.clone(),
        encoder: encoder.as_ref().map(|e| e.handle.clone()),
        trainer: trainer.as_ref().map(|t| control::TrainerSide {
            store: t.store.clone(),
            commands: t.commands.clone(),
        }),
    };
    let handler = control::handler(context);
    let shutdown = supervisor.shutdown().clone();
    let control = {
        let (bus, handler, node, shutdown) = (bus.clone(), handler.clone(), node.clone(), shutdown.clone());
        let board = status.clone();
        let probe: StatusProbe = Arc::new(move || serde_json::to_value(board.snapshot()).unwrap_or_default());
        supervisor.spawn("control service", async move {
            bus.serve_control(handler, &Endpoint::served_by(roles), &node, Some(probe), shutdown)
                .await
        })
    };
    let leader_control = trainer.as_ref().map(|t| {
        supervisor.spawn(
            "leader's control service",
            serve_while_leading(bus.clone(), handler, node, t.lease.clone(), shutdown),
        )
    });
    (control, leader_control)
}

/// The daemon's parts while they run, to be stopped in order.
struct Running {
    control: JoinHandle<Result<()>>,
    leader_control: Option<JoinHandle<Result<()>>>,
    trainer: Option<TrainerRole>,
    http: Option<JoinHandle<Result<()>>>,
    encoder: Option<Encoder>,
    migrations: JoinHandle<Result<()>>,
    store_watch: Option<JoinHandle<Result<()>>>,
}

impl Running {
    /// After the shutdown signal: requests first, then the trainer role
    /// (its last checkpoint), HTTP, the encoder, and a last flush to NATS,
    /// each waited for until the grace is over; the trainer role's result.
    async fn stop(self, config: &Config, bus: &Bus, supervisor: &Supervisor) -> Result<()> {
        let grace = Duration::from_secs(config.serve.shutdown_grace_secs);
        let watchdog = Watchdog::arm(grace + WATCHDOG_MARGIN, supervisor.clone())?;
        let deadline = tokio::time::Instant::now() + grace;
        let unanswered = "requests in flight go unanswered";
        watchdog.at("stopping the control service");
        until(deadline, "control service", unanswered, self.control).await;
        if let Some(task) = self.leader_control {
            until(deadline, "leader's control service", unanswered, task).await;
        }
        watchdog.at("stopping the trainer role");
        let trained = match self.trainer {
            Some(trainer) => trainer.finish(deadline).await,
            None => Ok(()),
        };
        watchdog.at("stopping HTTP and the encoder");
        if let Some(task) = self.http {
            until(deadline, "HTTP", "requests in flight are cut", task).await;
        }
        if let Some(Encoder { handle, task }) = self.encoder {
            drop(handle);
            until(deadline, "encoder", "frames not acked yet are redelivered", task).await;
        }
        until(deadline, "migrations on reconnect", "nothing is lost", self.migrations).await;
        if let Some(task) = self.store_watch {
            until(deadline, "store writes", "nothing is lost", task).await;
        }
        // Unreachable NATS is no failure of this shutdown: the next start
        // catches up. What is buffered gets until the grace is over (a moment
        // at least).
        watchdog.at("flushing to NATS");
        let flush_until = deadline.max(tokio::time::Instant::now() + FINAL_FLUSH);
        let left = "what did not reach NATS goes out at the next start";
        match tokio::time::timeout_at(flush_until, bus.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e:#}; {left}"),
            Err(_) => tracing::warn!("flushing to NATS: not done within the shutdown grace; {left}"),
        }
        trained
    }
}
