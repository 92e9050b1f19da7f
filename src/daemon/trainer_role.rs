//! The trainer role's parts and their lifetime: claiming the node id, resuming
//! from the store, contending for the lease, the trainer thread, ingest,
//! the checkpoint publisher and the leader-only endpoints, started under the
//! supervisor and finished in order at shutdown. What each part does is in
//! its own file; the daemon's other roles are wired in `mod.rs`.

use super::control::Command;
use super::leadership::Leadership;
use super::lease::{self, Lease};
use super::node_claim::NodeClaim;
use super::status::{Heart, StatusBoard};
use super::supervisor::Supervisor;
use super::trainer::{Resumed, Trainer};
use super::{announce, ingest, recovery, until};
use crate::bus::kv::Shared;
use crate::bus::service::{Endpoint, Handler, NodeInfo};
use crate::bus::Bus;
use crate::config::Config;
use crate::store::Store;
use crate::vae::device::Device;
use anyhow::{anyhow, Context, Result};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often leader-only serving looks at the lease: well under a TTL.
const LEASE_POLL: Duration = Duration::from_millis(200);
/// How often shutdown looks whether the trainer thread has ended.
const THREAD_POLL: Duration = Duration::from_millis(20);

/// The trainer role's parts, running.
pub(super) struct TrainerRole {
    pub(super) store: Store,
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) lease: Lease,
    pub(super) ingest: JoinHandle<Result<()>>,
    pub(super) thread: std::thread::JoinHandle<Result<()>>,
    pub(super) publisher: JoinHandle<Result<()>>,
    pub(super) contender: JoinHandle<Result<()>>,
    /// Stops contending for the lease (and releases it), last but one.
    pub(super) lease_stop: CancellationToken,
    /// This process's claim on its node id, released last.
    pub(super) claim: NodeClaim,
}

/// The cluster's lease TTL, which this node follows, said when this
/// node's `[node] lease_ttl_secs` differs (it only sets a new bucket's).
async fn cluster_lease_ttl(shared: &Shared, config: &Config) -> Result<Duration> {
    let ttl = shared.lease_ttl().await?;
    if ttl != Duration::from_secs(config.node.lease_ttl_secs) {
        tracing::warn!(
            "[node] lease_ttl_secs = {} is not the cluster's lease TTL, {ttl:?}, which this node follows \
            (set when the lease bucket was made; `wmvae cluster set lease-ttl` changes it)",
            config.node.lease_ttl_secs
        );
    }
    Ok(ttl)
}

/// The learner resumed from the store (off the runtime: it reads and builds the network).
async fn resume(config: &Config, store: &Store, bus: &Bus, device: Device) -> Result<Resumed> {
    let (config, store, bus) = (config.clone(), store.clone(), bus.clone());
    tokio::task::spawn_blocking(move || recovery::resume(&config, &store, &bus, device)).await?
}

/// Starts ingest under `supervisor`, through this node's own consumer.
fn start_ingest(
    config: &Config,
    bus: &Bus,
    store: &Store,
    status: &StatusBoard,
    supervisor: &Supervisor,
) -> JoinHandle<Result<()>> {
    status.beat(Heart::Ingest);
    supervisor.spawn(
        "ingest",
        ingest::run(
            bus.clone(),
            store.clone(),
            config.ingest.clone(),
            config.node.id.clone(),
            status.clone(),
            supervisor.clone(),
        ),
    )
}

impl TrainerRole {
    /// Resumes (or starts) the learner from the store, then starts ingest
    /// through this node's own consumer, contending for the lease, the
    /// trainer thread (which trains only while leading) and the checkpoint
    /// publisher, each under `supervisor`.
    pub(super) async fn start(
        config: &Config,
        bus: &Bus,
        store: &Store,
        device: Device,
        status: &StatusBoard,
        supervisor: &Supervisor,
    ) -> Result<TrainerRole> {
        let shared = bus.shared().await?;
        let claim = NodeClaim::take(&shared, &config.node.id, supervisor).await?;
        let resumed = resume(config, store, bus, device).await?;
        let ttl = cluster_lease_ttl(&shared, config).await?;
        let lease_stop = CancellationToken::new();
        let (lease, contender) = lease::start(
            shared.clone(),
            config.node.holder(),
            ttl,
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
        let ingest = start_ingest(config, bus, store, status, supervisor);
        Ok(TrainerRole {
            store: store.clone(),
            commands,
            lease,
            ingest,
            thread,
            publisher,
            contender,
            lease_stop,
            claim,
        })
    }

    /// After shutdown: ingest's batches in flight committed and acked, the
    /// last checkpoint written, every checkpoint event published, then the
    /// lease released so a standby takes over at once, and the node id's
    /// claim so a restart takes it at once; each waited for
    /// until `deadline` at most. Errors of the parts themselves are the
    /// supervisor's; here, what kept the shutdown from finishing.
    pub(super) async fn finish(self, deadline: tokio::time::Instant) -> Result<()> {
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
        self.claim.release(deadline).await;
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
pub(super) async fn serve_while_leading(
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
