//! `wmvae bench failover`: what a crash costs on a 3-node JetStream cluster
//! on this host. Two `wmvae serve` processes (trainer and encoder roles,
//! node ids `a` and `b`, `[nats] replicas = 3`) while frames stream in at a
//! steady rate, each publish awaited until stored (retried through
//! elections with its `Nats-Msg-Id`, as rollout workers do):
//!
//! 1. the server leading `WM_FRAMES` is SIGKILLed, then restarted on the
//!    same port and store: `stream_failover_s`, kill to the first publish
//!    acked again;
//! 2. the node holding the training lease is SIGKILLed: `trainer_failover_s`, kill to
//!    the standby's first training step; `trainer_failover_checkpoint_s`,
//!    to its first announced version; `steps_lost`, the leader's step at
//!    the kill less the active version's step the standby resumes from;
//! 3. every acked frame must have exactly one latent in `WM_LATENTS`:
//!    `acked_frames_lost`, `duplicate_latents`.
//!
//! Drives real processes from outside through NATS; decides nothing.

use super::bench_daemon::{frame, frame_name};
use super::nats_server::LocalCluster;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wmvae::bus::kv::Shared;
use wmvae::bus::messages::{Announcement, CheckpointEvent, LatentMessage};
use wmvae::bus::Bus;
use wmvae::config::Config;
use wmvae::daemon::status::{LeaseRole, Status};

/// The source the bench publishes as (latent ids are `<source>/<episode>/<step>`).
pub(super) const SOURCE: &str = "bench";
/// Steps between checkpoints on the trainer nodes: the default (1000) takes
/// minutes on a CPU; `steps_lost` is bounded by this.
const CHECKPOINT_EVERY_STEPS: u64 = 50;
/// Frames in the buffer before training starts.
const MIN_FRAMES: u64 = 200;
/// Redelivery of frames the killed node held unacked: shorter than the
/// default 30 s, so the bench ends sooner; it changes no figure above.
const ACK_WAIT_SECS: u64 = 5;
/// The longest any one phase may take before the bench gives up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of each node's log shown when the bench fails.
const LOG_LINES: usize = 15;
/// How often the bench looks.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct FailoverOptions {
    /// Frames published per second, each awaited until stored.
    pub rate: f64,
    /// `[node] lease_ttl_secs` of both trainer nodes.
    pub lease_ttl_secs: u64,
    pub nats_server: PathBuf,
}

/// `wmvae serve` processes (this binary), each with its own data dir and
/// log under `dir`, killed when dropped.
pub(super) struct Nodes(Vec<(String, Child)>);

impl Nodes {
    pub(super) fn new() -> Nodes {
        Nodes(Vec::new())
    }

    /// Starts node `id` (`[node] id`) against `url`, data in `dir/id`, log
    /// in `dir/id.log` (appended to across restarts), with `env` on top.
    pub(super) fn start(&mut self, id: &str, url: &str, dir: &Path, env: &[(&str, String)]) -> Result<()> {
        let exe = crate::wmvae_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{id}.log")))?;
        let child = Command::new(exe)
            .args(["serve", "--nats-url", url, "--data-dir"])
            .arg(dir.join(id))
            .env("WMVAE_NODE__ID", id)
            .env("WMVAE_TRAIN__DEVICE", "cpu")
            .env("WMVAE_TRAIN__THREADS", "1")
            .env("WMVAE_HTTP__ADDR", "")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        self.0.retain(|(n, _)| n != id);
        self.0.push((id.to_string(), child));
        Ok(())
    }

    /// SIGKILL: no chance to release the lease or ack.
    pub(super) fn kill(&mut self, id: &str) -> Result<()> {
        let (_, child) = self.0.iter_mut().find(|(n, _)| n == id).context("no such node")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Sends `signal` (`-STOP`, `-CONT`, `-TERM` ...) to `id`.
    pub(super) fn signal(&self, id: &str, signal: &str) -> Result<()> {
        let (_, child) = self.0.iter().find(|(n, _)| n == id).context("no such node")?;
        Command::new("kill").args([signal, &child.id().to_string()]).status()?;
        Ok(())
    }

    /// SIGTERM to `id`; whether it then exited 0 within a minute.
    pub(super) fn terminate(&mut self, id: &str) -> Result<bool> {
        self.signal(id, "-TERM")?;
        let (_, child) = self.0.iter_mut().find(|(n, _)| n == id).context("no such node")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(POLL);
        }
        Ok(false)
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `check` until it answers Some, or fails after [`PHASE_TIMEOUT`].
async fn wait_for<T, F, Fut>(what: &str, check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_at_most(PHASE_TIMEOUT, what, check).await
}

/// As [`wait_for`], giving up after `timeout`.
pub(super) async fn wait_at_most<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = check().await {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("gave up waiting for {what} after {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What the publisher saw: each stored frame's index and when its ack came.
#[derive(Default)]
pub(super) struct Acks {
    pub(super) stored: Vec<(u64, Instant)>,
    pub(super) failed: u64,
}

/// Publishes frame 0, 1, ... at `rate`, each awaited until stored, until `stop`.
pub(super) async fn publish(bus: Bus, rate: f64, acks: Arc<Mutex<Acks>>, stop: CancellationToken) {
    let mut publisher = bus.frame_publisher(SOURCE);
    let start = tokio::time::Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    for i in 0.. {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(start + interval * i as u32) => {}
        }
        match publisher.send_stored(&frame(i)).await {
            Ok(()) => acks.lock().unwrap().stored.push((i, Instant::now())),
            Err(e) => {
                tracing::warn!("frame {i} not stored: {e:#}");
                acks.lock().unwrap().failed += 1;
            }
        }
    }
}

/// Node `id`'s status, asked of every node: a status request reaches the
/// node nearest the bench's server only.
async fn node_status(bus: &Bus, id: &str) -> Option<Status> {
    let statuses = bus.node_statuses().await.ok()?;
    statuses
        .into_iter()
        .filter_map(|s| serde_json::from_value::<Status>(s).ok())
        .find(|s| s.node_id == id)
}

/// Every announcement `WM_CHECKPOINTS` holds (not the leaders' fences), oldest first.
pub(super) async fn announcements(bus: &Bus) -> Result<Vec<Announcement>> {
    let subject = bus.subject("checkpoints");
    Ok(bus
        .stream_messages("WM_CHECKPOINTS")
        .await?
        .iter()
        .filter(|m| m.subject == subject)
        .filter_map(|m| rmp_serde::from_slice::<Announcement>(&m.payload).ok())
        .collect())
}

/// The created announcements in `WM_CHECKPOINTS`, oldest first.
async fn created(bus: &Bus) -> Result<Vec<Announcement>> {
    let mut all = announcements(bus).await?;
    all.retain(|a| a.event == CheckpointEvent::Created);
    Ok(all)
}

pub async fn failover(options: &FailoverOptions) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let result = run(options, dir.path()).await;
    // A failed run says what the nodes said last.
    result.with_context(|| {
        ["a", "b"]
            .iter()
            .filter_map(|id| {
                std::fs::read_to_string(dir.path().join(format!("{id}.log")))
                    .ok()
                    .map(|log| (id, log))
            })
            .map(|(id, log)| {
                format!(
                    "node {id}'s last words:\n{}",
                    log.lines()
                        .rev()
                        .take(LOG_LINES)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    })
}

async fn run(options: &FailoverOptions, dir: &Path) -> Result<Value> {
    let ttl = options.lease_ttl_secs;
    let mut cluster = LocalCluster::start(&options.nats_server, 3)?;
    let mut config = Config::load(None)?;
    config.nats.url = cluster.url();
    config.nats.replicas = 3;
    let bus = Bus::connect(&config).await?;
    wait_for("the cluster's JetStream", || async { bus.migrate().await.ok() }).await?;
    let shared = bus.shared().await?;
    let mut nodes = start_nodes(&bus, &shared, &config.nats.url, ttl, dir).await?;

    let acks = Arc::new(Mutex::new(Acks::default()));
    let stop = CancellationToken::new();
    let publisher = tokio::spawn(publish(bus.clone(), options.rate, acks.clone(), stop.clone()));
    wait_for("node a's second version", || async {
        (shared.active().await.ok()??.0.version >= 2).then_some(())
    })
    .await?;

    let stream_failover_s = kill_stream_leader(&mut cluster, &bus, &acks).await?;
    let trainer = kill_leading_trainer(&mut nodes, &bus, &shared).await?;

    // Step 3: every acked frame has exactly one latent.
    stop.cancel();
    publisher.await?;
    let (acked_ids, failed): (HashSet<String>, u64) = {
        let acks = acks.lock().unwrap();
        (acks.stored.iter().map(|(i, _)| latent_id(*i)).collect(), acks.failed)
    };
    let LatentsCounted { lost, duplicates, .. } = latents_lost_and_duplicated(&bus, &acked_ids).await?;
    let lost = lost.len();
    let exited_cleanly = nodes.terminate(trainer.standby)?;

    Ok(json!({
        "bench": "failover",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "servers": 3,
        "rate": options.rate,
        "lease_ttl_secs": ttl,
        "checkpoint_every_steps": CHECKPOINT_EVERY_STEPS,
        "stream_failover_s": stream_failover_s,
        "trainer_failover_s": (trainer.stepped - trainer.killed).as_secs_f64(),
        "trainer_failover_checkpoint_s": (trainer.announced - trainer.killed).as_secs_f64(),
        "steps_lost": trainer.steps_lost,
        "acked_frames": acked_ids.len(),
        "publishes_failed": failed,
        "acked_frames_lost": lost,
        "duplicate_latents": duplicates,
        "standby_exited_cleanly": exited_cleanly,
    }))
}

/// Nodes `a` (leading once started) and `b` (serving, standing by).
async fn start_nodes(bus: &Bus, shared: &Shared, url: &str, ttl: u64, dir: &Path) -> Result<Nodes> {
    let env = [
        ("WMVAE_NODE__LEASE_TTL_SECS", ttl.to_string()),
        ("WMVAE_NATS__REPLICAS", "3".to_string()),
        ("WMVAE_TRAIN__MIN_FRAMES", MIN_FRAMES.to_string()),
        (
            "WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS",
            CHECKPOINT_EVERY_STEPS.to_string(),
        ),
        ("WMVAE_INGEST__ACK_WAIT_SECS", ACK_WAIT_SECS.to_string()),
    ];
    let mut nodes = Nodes::new();
    nodes.start("a", url, dir, &env)?;
    wait_for("node a to lead", || async {
        (shared.holder().await.ok()?.as_deref() == Some("a")).then_some(())
    })
    .await?;
    nodes.start("b", url, dir, &env)?;
    wait_for("node b to serve", || async {
        bus.service_nodes()
            .await
            .ok()?
            .iter()
            .any(|n| n.id == "b")
            .then_some(())
    })
    .await?;
    Ok(nodes)
}

/// Step 1: the server leading WM_FRAMES SIGKILLed; seconds to the next
/// publish acked; the server restarted on its port and store.
async fn kill_stream_leader(cluster: &mut LocalCluster, bus: &Bus, acks: &Mutex<Acks>) -> Result<f64> {
    let leader = wait_for("WM_FRAMES's leader", || async {
        bus.stream_leader("WM_FRAMES").await.ok()?
    })
    .await?;
    let server = cluster
        .named(&leader)
        .with_context(|| format!("no server named {leader}"))?;
    server.kill();
    let killed = Instant::now();
    let acked = wait_for("a publish acked after the kill", || async {
        acks.lock()
            .unwrap()
            .stored
            .last()
            .map(|(_, at)| *at)
            .filter(|at| *at > killed)
    })
    .await?;
    server.restart()?;
    wait_for("WM_FRAMES's leader after the restart", || async {
        bus.stream_leader("WM_FRAMES").await.ok()?
    })
    .await?;
    Ok((acked - killed).as_secs_f64())
}

/// What the leading trainer node's SIGKILL cost.
struct TrainerFailover {
    standby: &'static str,
    killed: Instant,
    /// The standby's first training step past the active version's.
    stepped: Instant,
    /// The standby's first announced version.
    announced: Instant,
    steps_lost: i64,
}

/// Step 2: the leading trainer node SIGKILLed (a lease lost during step 1
/// may have moved it), then the standby's first step and first version.
async fn kill_leading_trainer(nodes: &mut Nodes, bus: &Bus, shared: &Shared) -> Result<TrainerFailover> {
    // The holder is read again on each try: a lease that lapsed while its
    // status was asked moves to the other node, which is the one to kill then.
    let (leader, before) = wait_for("the leader's status", || async {
        let holder = shared.holder().await.ok()??;
        let status = node_status(bus, &holder)
            .await
            .filter(|s| s.lease == Some(LeaseRole::Leader))?;
        Some((holder, status))
    })
    .await?;
    nodes.kill(&leader)?;
    let killed = Instant::now();
    let standby = if leader == "a" { "b" } else { "a" };
    let old_epoch = before.epoch.context("the leader reports no epoch")?;
    let resumed_step = wait_for("the active version's step", || async {
        let (active, _) = shared.active().await.ok()??;
        created(bus)
            .await
            .ok()?
            .iter()
            .find(|a| a.metadata.version == active.version)
            .map(|a| a.metadata.step)
    })
    .await?;
    let stepped = wait_for("the standby's first training step", || async {
        node_status(bus, standby)
            .await
            .filter(|s| s.lease == Some(LeaseRole::Leader) && s.step > resumed_step as i64)
            .map(|_| Instant::now())
    })
    .await?;
    let announced = wait_for("the standby's first version", || async {
        created(bus)
            .await
            .ok()?
            .iter()
            .any(|a| a.epoch > old_epoch)
            .then(Instant::now)
    })
    .await?;
    Ok(TrainerFailover {
        standby,
        killed,
        stepped,
        announced,
        steps_lost: (before.step - resumed_step as i64).max(0),
    })
}

/// What WM_LATENTS holds against the acked frames.
pub(super) struct LatentsCounted {
    /// Acked frames without a latent (their latent ids).
    pub(super) lost: Vec<String>,
    /// Latents stored more than once (copies past the first).
    pub(super) duplicates: usize,
    /// A few of those: the id, then each copy's stream sequence and the
    /// version that encoded it, to tell a late re-encode from a lost dedupe.
    pub(super) duplicate_examples: Vec<String>,
}

/// How many duplicate latents [`LatentsCounted`] describes.
const DUPLICATE_EXAMPLES: usize = 5;

/// Counts WM_LATENTS against `acked_ids` once every acked frame has a
/// latent or the patience ran out.
pub(super) async fn latents_lost_and_duplicated(bus: &Bus, acked_ids: &HashSet<String>) -> Result<LatentsCounted> {
    // Frames the killed node held unacked come back after the ack wait.
    let patience = Duration::from_secs(ACK_WAIT_SECS + 60);
    let latent_ids = || async {
        bus.stream_messages("WM_LATENTS")
            .await
            .map(|messages| messages.into_iter().filter_map(|m| m.id).collect::<Vec<String>>())
    };
    // Lost ones are counted below, after the wait gave up.
    let _ = wait_at_most(patience, "a latent for every acked frame", || async {
        let ids = latent_ids().await.ok()?;
        let unique: HashSet<&String> = ids.iter().collect();
        acked_ids.iter().all(|id| unique.contains(id)).then_some(())
    })
    .await;
    let stored = bus.stream_messages("WM_LATENTS").await?;
    let mut copies: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for message in &stored {
        if let Some(id) = &message.id {
            let version = rmp_serde::from_slice::<LatentMessage>(&message.payload)
                .map(|l| format!("v{}", l.model_version))
                .unwrap_or_else(|_| "unreadable".to_string());
            copies
                .entry(id)
                .or_default()
                .push(format!("sequence {} ({version})", message.sequence));
        }
    }
    let duplicate_examples = copies
        .iter()
        .filter(|(_, c)| c.len() > 1)
        .take(DUPLICATE_EXAMPLES)
        .map(|(id, c)| format!("{id}: {}", c.join(", ")))
        .collect();
    Ok(LatentsCounted {
        lost: acked_ids
            .iter()
            .filter(|id| !copies.contains_key(id.as_str()))
            .cloned()
            .collect(),
        duplicates: copies.values().map(|c| c.len() - 1).sum(),
        duplicate_examples,
    })
}

/// The latent id of frame `i`: `<source>/<episode>/<step>`.
pub(super) fn latent_id(i: u64) -> String {
    let (episode, step) = frame_name(i);
    format!("{SOURCE}/{episode}/{step}")
}
