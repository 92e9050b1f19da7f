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
pub mod guard;
pub mod http;
pub mod ingest;
pub mod leadership;
pub mod lease;
pub mod metrics;
pub mod recovery;
pub mod sampler;
pub mod showcase;
pub mod status;
pub mod supervisor;
pub mod takeover;
pub mod trainer;
pub mod undeliverable;

use crate::bus::Bus;
use crate::config::Config;
use crate::daemon::status::{Heart, StatusBoard};
use crate::daemon::supervisor::{Supervisor, Watchdog};
use crate::daemon::trainer::Trainer;
use crate::store::{NeedsReopen, Store};
use crate::vae::device::{self, Device};

use crate::backoff::Backoff;
use crate::bus::service::{Endpoint, Handler, NodeInfo, StatusProbe};
use anyhow::{anyhow, bail, Context, Result};
use control::Command;
use encoder::Encoder;
use leadership::Leadership;
use lease::Lease;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often leader-only serving looks at the lease: well under a TTL.
const LEASE_POLL: Duration = Duration::from_millis(200);
/// How often shutdown looks whether the trainer thread has ended.
const THREAD_POLL: Duration = Duration::from_millis(20);
/// Between the parts stopping for a store reopen and starting again: sled's
/// threads let go of the store's lock, and the old control service's
/// subscriptions are gone before the new one checks for a twin.
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

/// The trainer role's parts, running.
struct TrainerRole {
    store: Store,
    commands: mpsc::Sender<Command>,
    lease: Lease,
    ingest: JoinHandle<Result<()>>,
    thread: std::thread::JoinHandle<Result<()>>,
    publisher: JoinHandle<Result<()>>,
    contender: JoinHandle<Result<()>>,
    /// Stops contending for the lease (and releases it), last.
    lease_stop: CancellationToken,
}

/// Refuses a second trainer node with this node's id (or, both without
/// one, a second single-node trainer) on the same NATS: they would split
/// one consumer's frames.
async fn refuse_twin(bus: &Bus, node_id: &str) -> Result<()> {
    let twins = bus
        .service_nodes()
        .await?
        .into_iter()
        .filter(|n| n.roles.trainer && n.id == node_id)
        .count();
    if twins > 0 {
        let named = if node_id.is_empty() {
            "without a [node] id".to_string()
        } else {
            format!("with [node] id {node_id:?}")
        };
        bail!(
            "another trainer node {named} already runs on this NATS; give each trainer node its own [node] id \
            (WMVAE_NODE__ID)"
        );
    }
    Ok(())
}

impl TrainerRole {
    /// Resumes (or starts) the learner from the store, then starts ingest
    /// through this node's own consumer, contending for the lease, the
    /// trainer thread (which trains only while leading) and the checkpoint
    /// publisher, each under `supervisor`.
    async fn start(
        config: &Config,
        bus: &Bus,
        store: &Store,
        device: Device,
        status: &StatusBoard,
        supervisor: &Supervisor,
    ) -> Result<TrainerRole> {
        refuse_twin(bus, &config.node.id).await?;
        let resumed = {
            let (config, store, bus) = (config.clone(), store.clone(), bus.clone());
            tokio::task::spawn_blocking(move || recovery::resume(&config, &store, &bus, device)).await??
        };
        let shared = bus.shared().await?;
        let lease_stop = CancellationToken::new();
        let (lease, contender) = lease::start(
            shared.clone(),
            config.node.holder(),
            Duration::from_secs(config.node.lease_ttl_secs),
            lease_stop.clone(),
            supervisor,
        );
        let runtime = tokio::runtime::Handle::current();
        let leadership = Leadership::new(
            lease.clone(),
            shared.clone(),
            bus.clone(),
            runtime,
            supervisor.shutdown().clone(),
        );
        let (trainer, event_queue, commands) = Trainer::new(
            config.clone(),
            store.clone(),
            resumed,
            status.clone(),
            supervisor.clone(),
            leadership,
        );
        let publisher = supervisor.spawn(
            "checkpoint publisher",
            announce::publish_events(bus.clone(), store.clone(), shared, lease.clone(), event_queue),
        );
        status.beat(Heart::Trainer);
        let thread = supervisor.thread("trainer thread", move || trainer.run())?;
        status.beat(Heart::Ingest);
        let ingest = supervisor.spawn(
            "ingest",
            ingest::run(
                bus.clone(),
                store.clone(),
                config.ingest.clone(),
                config.node.id.clone(),
                status.clone(),
                supervisor.clone(),
            ),
        );
        Ok(TrainerRole {
            store: store.clone(),
            commands,
            lease,
            ingest,
            thread,
            publisher,
            contender,
            lease_stop,
        })
    }

    /// After shutdown: ingest's batches in flight committed and acked, the
    /// last checkpoint written, every checkpoint event published, then the
    /// lease released so a standby takes over at once; each waited for
    /// until `deadline` at most. Errors of the parts themselves are the
    /// supervisor's; here, what kept the shutdown from finishing.
    async fn finish(self, deadline: tokio::time::Instant) -> Result<()> {
        until(deadline, "ingest", "frames not acked yet are redelivered", self.ingest).await;
        // The trainer thread needs no NATS to write its last checkpoint, but
        // it may wait on the event queue while NATS is away.
        while !self.thread.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(THREAD_POLL).await;
        }
        let trained = match self.thread.is_finished() {
            true => Ok(()),
            false => Err(anyhow!("the trainer thread did not stop within the shutdown grace")),
        };
        drop(self.commands);
        until(
            deadline,
            "checkpoint publisher",
            "unannounced versions go out at the next start",
            self.publisher,
        )
        .await;
        self.lease_stop.cancel();
        until(deadline, "lease", "the lease lapses by itself", self.contender).await;
        // A store that can't flush must not hide why the daemon stopped.
        let flushed = self.store.flush();
        if flushed.is_ok() {
            tracing::info!("store flushed");
        }
        trained.and(flushed.context("flushing the store"))
    }
}

/// Serves the leader-only endpoints (checkpoints, buffer) while this node
/// leads; a standby does not answer them, so every request reaches the leader.
async fn serve_while_leading(
    bus: Bus,
    handler: Handler,
    node: NodeInfo,
    lease: Lease,
    shutdown: CancellationToken,
) -> Result<()> {
    while !shutdown.is_cancelled() {
        if lease.epoch().is_none() {
            tokio::select! { _ = shutdown.cancelled() => break, _ = tokio::time::sleep(LEASE_POLL) => continue }
        }
        let leading = shutdown.child_token();
        let watcher = {
            let (lease, leading) = (lease.clone(), leading.clone());
            tokio::spawn(async move {
                while lease.epoch().is_some() && !leading.is_cancelled() {
                    tokio::time::sleep(LEASE_POLL).await;
                }
                leading.cancel();
            })
        };
        bus.serve_control(handler.clone(), &Endpoint::leader_only(), &node, None, leading.clone())
            .await?;
        leading.cancel();
        watcher.await.context("lease watcher")?;
    }
    Ok(())
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
/// the disk takes writes again: [`NeedsReopen`]), the parts stop as on a
/// shutdown and start again in this process after [`REOPEN_PAUSE`], which
/// reopens the store: frames not acked come back from JetStream, training
/// resumes from the active version.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    loop {
        let parts = shutdown.child_token();
        match run_parts(config.clone(), parts).await {
            Err(e) if e.chain().any(|c| c.is::<NeedsReopen>()) && !shutdown.is_cancelled() => {
                tracing::error!("{e:#}; the daemon's parts start again in {REOPEN_PAUSE:?}, reopening the store");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(REOPEN_PAUSE) => {}
                }
            }
            done => return done,
        }
    }
}

/// The daemon's parts, once: until `shutdown` or the first failure (its
/// error). The shutdown is bounded: each part is waited for until the
/// grace is over, and a [`Watchdog`] ends the process if it still isn't.
async fn run_parts(config: Config, shutdown: CancellationToken) -> Result<()> {
    let supervisor = Supervisor::new(shutdown.clone());
    let roles = config.serve.roles;
    device::set_threads(config.train.threads);
    let device = config.train.device.resolve()?;
    let store = match roles.trainer {
        true => {
            let store = Store::open(&config.store.data_dir, config.buffer)?;
            let stats = store.stats()?;
            let (frames, capacity) = (stats.frames, stats.capacity);
            tracing::info!(data_dir = %config.store.data_dir.display(), frames, capacity, "replay buffer open");
            Some(store)
        }
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

    let trainer = match &store {
        Some(store) => Some(TrainerRole::start(&config, &bus, store, device, &status, &supervisor).await?),
        None => None,
    };
    let encoder = match roles.encoder {
        true => Some(encoder::start(&bus, &config, device, status.clone(), &supervisor)?),
        false => None,
    };
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
            serve_while_leading(bus.clone(), handler, node, t.lease.clone(), shutdown.clone()),
        )
    });
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
    let grace = Duration::from_secs(config.serve.shutdown_grace_secs);
    let watchdog = Watchdog::arm(grace + WATCHDOG_MARGIN, supervisor.clone())?;
    let deadline = tokio::time::Instant::now() + grace;
    watchdog.at("stopping the control service");
    until(deadline, "control service", "requests in flight go unanswered", control).await;
    if let Some(task) = leader_control {
        until(
            deadline,
            "leader's control service",
            "requests in flight go unanswered",
            task,
        )
        .await;
    }
    watchdog.at("stopping the trainer role");
    let trained = match trainer {
        Some(trainer) => trainer.finish(deadline).await,
        None => Ok(()),
    };
    watchdog.at("stopping HTTP and the encoder");
    if let Some(task) = http {
        until(deadline, "HTTP", "requests in flight are cut", task).await;
    }
    if let Some(Encoder { handle, task }) = encoder {
        drop(handle);
        until(deadline, "encoder", "frames not acked yet are redelivered", task).await;
    }
    until(deadline, "migrations on reconnect", "nothing is lost", migrations).await;
    // Unreachable NATS is no failure of this shutdown: the next start
    // catches up. What is buffered gets until the grace is over (a moment
    // at least).
    watchdog.at("flushing to NATS");
    let flush_until = deadline.max(tokio::time::Instant::now() + FINAL_FLUSH);
    match tokio::time::timeout_at(flush_until, bus.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{e:#}; what did not reach NATS goes out at the next start"),
        Err(_) => tracing::warn!(
            "flushing to NATS: not done within the shutdown grace; what did not reach NATS goes out at the next start"
        ),
    }
    tracing::info!("bye");
    match supervisor.take_failure() {
        Some(failure) => Err(failure),
        None => trained,
    }
}
