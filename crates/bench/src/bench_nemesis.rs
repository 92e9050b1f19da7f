//! `wmvae bench nemesis`: faults drawn from a seed against a 3-node
//! JetStream cluster on this host, then the checks that say the cluster
//! never split. Two trainer nodes (`t1`, `t2`, one lease), two encoders
//! (`e1`, `e2`), a publisher streaming frames with msg ids, each awaited
//! until stored. Every few seconds (drawn) one fault, healed before the
//! next:
//!
//! * `trainer_kill`, `encoder_kill`, `server_kill`: SIGKILL, then a restart
//!   (same data dir, same port and store);
//! * `trainer_pause`: the lease holder SIGSTOPped past the lease's TTL, then
//!   SIGCONTinued (a node that believes it still leads);
//! * `trainer_other_ttl`: a trainer restarted with another
//!   `[node] lease_ttl_secs` than the cluster's (it must not change it);
//! * `partition`: one server cut from the other two past the lease's TTL,
//!   its clients still connected to it (the minority side of a split),
//!   then joined again. Each server runs in its own network namespace for
//!   that (`netns`); where this host allows none (not root, no
//!   `CAP_NET_ADMIN`), the kind is left out of an all-kinds run and named
//!   in `faults_unavailable`, and asking for it is an error.
//!
//! Recorded: every ack (the publisher), every change of `wm-lease/trainer`
//! and `wm-meta/active` seen by a watch, every latent seen live, and at the
//! end every announcement and latent the streams hold. Checked: every
//! acked frame has exactly one latent; no version announced as created
//! twice, nor after a higher one; no epoch wrote (announced or moved `active`) after a newer epoch
//! had (two writers at once); `active` moves only forward in epoch; the
//! lease TTL is the cluster's still; after the last heal, one leader (the
//! lease's holder, and no other node saying it leads) training and
//! latents flowing within TTL + 10 s. A violation is listed
//! and the history printed; the binary then exits non-zero.

use super::bench_failover::{
    announcements, latent_id, latents_lost_and_duplicated, publish, wait_at_most, Acks, Nodes,
};
use super::nats_server::LocalCluster;
use anyhow::{bail, Result};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wmvae::bus::kv::{ActiveChange, LeaseEvent, Shared};
use wmvae::bus::messages::{Announcement, CheckpointEvent};
use wmvae::bus::Bus;
use wmvae::config::Config;
use wmvae::daemon::status::{LeaseRole, Status};

/// The cluster's lease TTL (the bucket's max age, set by the bench's own
/// migration): short, so a pause past it fits between two faults.
const TTL_SECS: u64 = 5;
/// The `lease_ttl_secs` of a misconfigured trainer (`trainer_other_ttl`).
const OTHER_TTL_SECS: u64 = 3;
/// Frames published per second: a steady stream this 2-core box carries
/// beside seven processes.
const RATE: f64 = 20.0;
/// Seconds between two faults, drawn from this range.
const FAULT_GAP_SECS: std::ops::RangeInclusive<u64> = 3..=6;
/// How long a killed process stays down before its restart.
const DOWN: Duration = Duration::from_secs(1);
/// Convergence within TTL + this after the last heal (the bound).
const CONVERGE_MARGIN_SECS: u64 = 10;
/// The longest the bench waits for convergence before it calls it a violation.
const CONVERGE_PATIENCE: Duration = Duration::from_secs(120);
/// Redelivery of frames a killed or paused node held unacked.
const ACK_WAIT_SECS: u64 = 5;
/// The longest the start (cluster, four nodes, version 2) may take.
const START_TIMEOUT: Duration = Duration::from_secs(180);
const TRAINERS: [&str; 2] = ["t1", "t2"];
const ENCODERS: [&str; 2] = ["e1", "e2"];

#[derive(Debug, Clone)]
pub struct NemesisOptions {
    /// How long faults are injected.
    pub seconds: u64,
    /// Draws the faults, their targets and the gaps between them.
    pub seed: u64,
    /// The kinds drawn from (every kind when empty).
    pub faults: Vec<Fault>,
    pub nats_server: PathBuf,
}

/// The faults the nemesis injects (flags and JSON: their snake_case names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Fault {
    TrainerKill,
    EncoderKill,
    ServerKill,
    TrainerPause,
    TrainerOtherTtl,
    Partition,
}

const FAULTS: [Fault; 6] = [
    Fault::TrainerKill,
    Fault::EncoderKill,
    Fault::ServerKill,
    Fault::TrainerPause,
    Fault::TrainerOtherTtl,
    Fault::Partition,
];

/// The kinds to draw from: `asked`, or every kind this host can inject
/// (and why a kind it cannot was left out).
fn kinds(asked: &[Fault]) -> Result<(Vec<Fault>, BTreeMap<Fault, String>)> {
    let namespaces = crate::netns::available();
    if asked.contains(&Fault::Partition) {
        namespaces.as_ref().map_err(|e| anyhow::anyhow!("partition: {e:#}"))?;
    }
    if !asked.is_empty() {
        return Ok((asked.to_vec(), BTreeMap::new()));
    }
    match namespaces {
        Ok(()) => Ok((FAULTS.to_vec(), BTreeMap::new())),
        Err(e) => {
            eprintln!("nemesis: partition left out: {e:#}");
            let kinds = FAULTS.iter().copied().filter(|f| *f != Fault::Partition).collect();
            Ok((kinds, BTreeMap::from([(Fault::Partition, format!("{e:#}"))])))
        }
    }
}

/// What happened, in order: faults, lease and active changes, as the
/// bench saw them (seconds since the start).
#[derive(Default)]
struct History {
    lines: Vec<(f64, String)>,
    /// `wm-meta/active`'s epochs in the order the watch saw them.
    active_epochs: Vec<(u64, u64)>,
}

/// The history, written by the watches and the fault loop.
type Recorded = Arc<Mutex<History>>;

pub async fn nemesis(options: &NemesisOptions) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let started = Instant::now();
    let history: Recorded = Arc::default();
    let result = run(options, dir.path(), started, &history).await;
    let violations = match &result {
        Ok(figures) => figures["violations"].as_array().cloned().unwrap_or_default(),
        Err(e) => vec![json!(format!("{e:#}"))],
    };
    if !violations.is_empty() {
        print_history(&history.lock().unwrap(), dir.path());
        for violation in violations {
            eprintln!("violation: {}", violation.as_str().unwrap_or_default());
        }
    }
    result
}

async fn run(options: &NemesisOptions, dir: &Path, started: Instant, history: &Recorded) -> Result<Value> {
    let (kinds, unavailable) = kinds(&options.faults)?;
    let mut cluster = if kinds.contains(&Fault::Partition) {
        LocalCluster::start_partitionable(&options.nats_server, 3)?
    } else {
        LocalCluster::start(&options.nats_server, 3)?
    };
    let mut config = Config::load(None)?;
    config.nats.url = cluster.url();
    config.nats.replicas = 3;
    config.node.lease_ttl_secs = TTL_SECS;
    let bus = Bus::connect(&config).await?;
    wait_at_most(START_TIMEOUT, "the cluster's JetStream", || async {
        bus.migrate().await.ok()
    })
    .await?;
    let shared = bus.shared().await?;
    let stop = CancellationToken::new();
    record(&bus, &shared, started, history, &stop);
    let mut nodes = Nodes::new();
    for id in TRAINERS.iter().chain(&ENCODERS) {
        nodes.start(id, &config.nats.url, dir, &node_env(id, TTL_SECS))?;
    }
    let acks = Arc::new(Mutex::new(Acks::default()));
    let publishing = stop.child_token();
    let publisher = tokio::spawn(publish(bus.clone(), RATE, acks.clone(), publishing.clone()));
    wait_at_most(START_TIMEOUT, "version 2", || async {
        (shared.active().await.ok()??.0.version >= 2).then_some(())
    })
    .await?;

    let mut world = World {
        cluster: &mut cluster,
        nodes: &mut nodes,
        shared: &shared,
        url: &config.nats.url,
        dir,
        started,
        history,
    };
    let faults = inject(options, &kinds, &mut world).await?;
    let converged = converge(&bus, &shared, Instant::now()).await;

    publishing.cancel();
    publisher.await?;
    let acks = std::mem::take(&mut *acks.lock().unwrap());
    // The watches go on while the checks wait for the last latents.
    let figures = check(&bus, &shared, &acks, history, converged).await;
    stop.cancel();
    let mut figures = figures?;
    figures["seconds"] = json!(options.seconds);
    figures["seed"] = json!(options.seed);
    figures["faults"] = json!(faults);
    figures["faults_unavailable"] = json!(unavailable);
    Ok(figures)
}

/// The checks once the faults are over and the publisher stopped, with
/// the figures: every acked frame's latent, the announcements and the
/// active version's epochs, the lease TTL, the convergence.
async fn check(bus: &Bus, shared: &Shared, acks: &Acks, history: &Recorded, converged: Result<f64>) -> Result<Value> {
    let acked: HashSet<String> = acks.stored.iter().map(|(i, _)| latent_id(*i)).collect();
    let latents = latents_lost_and_duplicated(bus, &acked).await?;
    let (lost, duplicates) = (latents.lost.len(), latents.duplicates);
    let announcements = announcements(bus).await?;
    let ttl = shared.lease_ttl().await?;
    let verdict = judge(&announcements, &history.lock().unwrap().active_epochs);
    let mut violations = verdict.violations;
    if lost > 0 || duplicates > 0 {
        violations.push(format!(
            "{lost} acked frames without a latent ({}), {duplicates} latents stored twice (e.g. {})",
            frames_of(bus, &latents.lost).await,
            latents.duplicate_examples.join("; ")
        ));
    }
    if ttl != Duration::from_secs(TTL_SECS) {
        violations.push(format!("the lease TTL is {ttl:?}, not the cluster's {TTL_SECS} s"));
    }
    let converged_s = match converged {
        Ok(s) if s <= (TTL_SECS + CONVERGE_MARGIN_SECS) as f64 => Some(s),
        Ok(s) => {
            violations.push(format!(
                "converged {s:.1} s after the last heal, past TTL + {CONVERGE_MARGIN_SECS} s"
            ));
            Some(s)
        }
        Err(e) => {
            violations.push(format!("{e:#}"));
            None
        }
    };
    Ok(json!({
        "bench": "nemesis",
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "servers": 3,
        "lease_ttl_secs": TTL_SECS,
        "acked_frames": acked.len(),
        "publishes_failed": acks.failed,
        "acked_frames_lost": lost,
        "duplicate_latents": duplicates,
        "versions_announced": verdict.versions,
        "duplicate_versions": verdict.duplicate_versions,
        "versions_out_of_order": verdict.versions_out_of_order,
        "epochs": verdict.epochs,
        "epochs_with_two_writers": verdict.epochs_with_two_writers,
        "converged_s": converged_s,
        "violations": violations,
    }))
}

/// Whether the frames of latent ids `lost` are in WM_FRAMES still: the
/// encoders never took them (a consumer that skipped them), or the stream
/// itself lost publishes it had acked.
async fn frames_of(bus: &Bus, lost: &[String]) -> String {
    if lost.is_empty() {
        return "none".to_string();
    }
    match bus.stream_messages("WM_FRAMES").await {
        Ok(frames) => {
            let stored: HashSet<String> = frames.into_iter().filter_map(|m| m.id).collect();
            let gone = lost.iter().filter(|id| !stored.contains(*id)).count();
            format!("{gone} of them not in WM_FRAMES either")
        }
        Err(e) => format!("WM_FRAMES unreadable: {e:#}"),
    }
}

/// A trainer's or an encoder's settings: roles by name, the lease TTL it
/// is started with, redeliveries early, and small steps with a version
/// every 10, so leaders write often (each write a chance to split).
fn node_env(id: &str, ttl: u64) -> Vec<(&'static str, String)> {
    let role = if id.starts_with('t') { "trainer" } else { "encoder" };
    vec![
        ("WMVAE_SERVE__ROLES", role.to_string()),
        ("WMVAE_NODE__LEASE_TTL_SECS", ttl.to_string()),
        ("WMVAE_NATS__REPLICAS", "3".to_string()),
        ("WMVAE_TRAIN__MIN_FRAMES", "100".to_string()),
        ("WMVAE_TRAIN__BATCH_SIZE", "16".to_string()),
        ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "10".to_string()),
        ("WMVAE_TRAIN__EVAL_EVERY_STEPS", "10".to_string()),
        ("WMVAE_TRAIN__SAMPLES_PER_INSERT", "0".to_string()),
        ("WMVAE_TRAIN__THREADS", "1".to_string()),
        ("WMVAE_INGEST__ACK_WAIT_SECS", ACK_WAIT_SECS.to_string()),
    ]
}

/// The streams whose replicas the history follows: a stream that stops
/// taking publishes (no leader, a replica behind) shows there.
const WATCHED_STREAMS: [&str; 3] = ["WM_FRAMES", "WM_LATENTS", "KV_wm-lease"];
/// The encoders' shared consumer of WM_FRAMES, followed beside them.
const ENCODERS_CONSUMER: &str = "wmvae-encode";
/// How often their replicas are read.
const REPLICAS_EVERY: Duration = Duration::from_secs(2);

/// Watches `wm-lease/trainer`, `wm-meta/active`, the latents live and how
/// the [`WATCHED_STREAMS`]' replicas stand until `stop`, into `history`.
fn record(bus: &Bus, shared: &Shared, started: Instant, history: &Recorded, stop: &CancellationToken) {
    let at = move || started.elapsed().as_secs_f64();
    let (s, h) = (shared.clone(), history.clone());
    follow(
        move || {
            let s = s.clone();
            async move { s.watch_lease().await }
        },
        stop,
        move |event| {
            let line = match event {
                Ok(LeaseEvent::Held(holder)) => format!("lease: held by {holder}"),
                Ok(LeaseEvent::Free) => "lease: free".to_string(),
                Err(e) => format!("lease watch: {e:#}"),
            };
            h.lock().unwrap().lines.push((at(), line));
        },
    );
    let (s, h) = (shared.clone(), history.clone());
    follow(
        move || {
            let s = s.clone();
            async move { s.watch_active().await }
        },
        stop,
        move |change| {
            let mut h = h.lock().unwrap();
            match change {
                Ok(ActiveChange { active, .. }) => {
                    h.lines.push((
                        at(),
                        format!("active: v{} under epoch {}", active.version, active.epoch),
                    ));
                    h.active_epochs.push((active.version, active.epoch));
                }
                Err(e) => h.lines.push((at(), format!("active watch: {e:#}"))),
            }
        },
    );
    follow_replicas(bus, history, stop, at);
}

/// Every [`REPLICAS_EVERY`] until `stop`, how the [`WATCHED_STREAMS`]'
/// replicas and the encoders' consumer stand, into `history` when changed.
fn follow_replicas(bus: &Bus, history: &Recorded, stop: &CancellationToken, at: impl Fn() -> f64 + Send + 'static) {
    let (b, h, stop) = (bus.clone(), history.clone(), stop.clone());
    tokio::spawn(async move {
        let mut said: BTreeMap<&str, String> = BTreeMap::new();
        let mut note = move |name: &'static str, now: Result<String>| {
            let now = now.unwrap_or_else(|e| format!("unreadable: {e:#}"));
            if said.get(name) != Some(&now) {
                h.lock().unwrap().lines.push((at(), format!("{name}: {now}")));
                said.insert(name, now);
            }
        };
        while !stop.is_cancelled() {
            for stream in WATCHED_STREAMS {
                note(stream, b.stream_replicas(stream).await);
            }
            note(
                ENCODERS_CONSUMER,
                b.consumer_state("WM_FRAMES", ENCODERS_CONSUMER).await,
            );
            tokio::time::sleep(REPLICAS_EVERY).await;
        }
    });
}

/// Runs `on` for each item of the stream `open` makes, until `stop`; the
/// stream is opened again after it breaks (a server killed under it), so
/// a change made meanwhile may go unseen.
fn follow<S, O, Fut>(open: O, stop: &CancellationToken, mut on: impl FnMut(S::Item) + Send + 'static)
where
    O: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<S>> + Send,
    S: futures::Stream + Send,
{
    let stop = stop.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            if let Ok(stream) = open().await {
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = tokio::select! { i = stream.next() => i, _ = stop.cancelled() => None } {
                    on(item);
                }
            }
            tokio::time::sleep(DOWN).await;
        }
    });
}

/// What the faults act on.
struct World<'a> {
    cluster: &'a mut LocalCluster,
    nodes: &'a mut Nodes,
    shared: &'a Shared,
    url: &'a str,
    dir: &'a Path,
    started: Instant,
    history: &'a Recorded,
}

impl World<'_> {
    fn note(&self, line: String) {
        tracing::info!("nemesis: {line}");
        self.history
            .lock()
            .unwrap()
            .lines
            .push((self.started.elapsed().as_secs_f64(), line));
    }

    /// Kills `id` and starts it again after [`DOWN`] with lease TTL `ttl`.
    async fn restart(&mut self, id: &str, ttl: u64) -> Result<()> {
        self.nodes.kill(id)?;
        tokio::time::sleep(DOWN).await;
        self.nodes.start(id, self.url, self.dir, &node_env(id, ttl))
    }

    /// One fault, healed before it returns.
    async fn inject(&mut self, fault: Fault, rng: &mut StdRng) -> Result<()> {
        let trainer = TRAINERS[rng.gen_range(0..TRAINERS.len())];
        match fault {
            Fault::TrainerKill => {
                self.note(format!("fault: trainer_kill {trainer}"));
                self.restart(trainer, TTL_SECS).await?;
            }
            Fault::EncoderKill => {
                let encoder = ENCODERS[rng.gen_range(0..ENCODERS.len())];
                self.note(format!("fault: encoder_kill {encoder}"));
                self.restart(encoder, TTL_SECS).await?;
            }
            Fault::ServerKill => {
                let server = rng.gen_range(0..self.cluster.servers.len());
                self.note(format!("fault: server_kill n{}", server + 1));
                self.cluster.servers[server].kill();
                tokio::time::sleep(DOWN).await;
                self.cluster.servers[server].restart()?;
            }
            Fault::TrainerPause => {
                // The holder if there is one: the node that believes it leads.
                let holder = self.shared.holder().await.ok().flatten();
                let id = holder
                    .as_deref()
                    .filter(|h| TRAINERS.contains(h))
                    .unwrap_or(trainer)
                    .to_string();
                self.note(format!("fault: trainer_pause {id} for {} s", TTL_SECS + 2));
                self.nodes.signal(&id, "-STOP")?;
                tokio::time::sleep(Duration::from_secs(TTL_SECS + 2)).await;
                self.nodes.signal(&id, "-CONT")?;
            }
            Fault::TrainerOtherTtl => {
                self.note(format!("fault: trainer_other_ttl {trainer} ({OTHER_TTL_SECS} s)"));
                self.restart(trainer, OTHER_TTL_SECS).await?;
            }
            Fault::Partition => {
                let server = rng.gen_range(0..self.cluster.servers.len());
                self.note(format!(
                    "fault: partition n{} from the others for {} s",
                    server + 1,
                    TTL_SECS + 2
                ));
                self.cluster.partition(server, true)?;
                tokio::time::sleep(Duration::from_secs(TTL_SECS + 2)).await;
                self.cluster.partition(server, false)?;
            }
        }
        self.note("healed".to_string());
        Ok(())
    }
}

/// Faults of `kinds` drawn from the seed for `options.seconds`; how many of each kind.
async fn inject(options: &NemesisOptions, kinds: &[Fault], world: &mut World<'_>) -> Result<BTreeMap<Fault, u64>> {
    let mut rng = StdRng::seed_from_u64(options.seed);
    let mut counts: BTreeMap<Fault, u64> = kinds.iter().map(|f| (*f, 0)).collect();
    let end = Instant::now() + Duration::from_secs(options.seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(rng.gen_range(FAULT_GAP_SECS))).await;
        let fault = kinds[rng.gen_range(0..kinds.len())];
        world.inject(fault, &mut rng).await?;
        *counts.entry(fault).or_default() += 1;
    }
    Ok(counts)
}

/// Seconds from `healed` until one leader trains (the lease's holder, the
/// only trainer that says it leads, its step growing between two looks)
/// and `WM_LATENTS` stores latents again (more than at its first read
/// after `healed`: stored, not merely seen, for a stream without a working
/// leader still passes latents to live subscribers).
async fn converge(bus: &Bus, shared: &Shared, healed: Instant) -> Result<f64> {
    let mut seen: Option<(String, i64)> = None;
    let mut stored_first: Option<u64> = None;
    while healed.elapsed() < CONVERGE_PATIENCE {
        let stored = bus.stream_len("WM_LATENTS").await.ok();
        if let Some(n) = stored {
            stored_first.get_or_insert(n);
        }
        let latents = matches!((stored, stored_first), (Some(n), Some(first)) if n > first);
        if let Some((holder, step)) = sole_leader(bus, shared).await {
            match &seen {
                Some((h, s)) if *h == holder && step > *s && latents => {
                    return Ok(healed.elapsed().as_secs_f64());
                }
                Some((h, _)) if *h == holder => {}
                _ => seen = Some((holder, step)),
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("no sole leader training with latents stored {CONVERGE_PATIENCE:?} after the last heal")
}

/// The lease's holder and its step, when it says it leads and no other
/// node does.
async fn sole_leader(bus: &Bus, shared: &Shared) -> Option<(String, i64)> {
    let holder = shared.holder().await.ok()??;
    let statuses = bus.node_statuses().await.ok()?;
    let leaders: Vec<Status> = statuses
        .into_iter()
        .filter_map(|s| serde_json::from_value::<Status>(s).ok())
        .filter(|s| s.lease == Some(LeaseRole::Leader))
        .collect();
    match leaders.as_slice() {
        [only] if only.node_id == holder => Some((holder, only.step)),
        _ => None,
    }
}

/// The checks on the announcements (in stream order) and on the active
/// version's epochs (in the order the watch saw them).
struct Verdict {
    versions: usize,
    duplicate_versions: usize,
    versions_out_of_order: usize,
    epochs: usize,
    epochs_with_two_writers: usize,
    violations: Vec<String>,
}

fn judge(announcements: &[Announcement], active_epochs: &[(u64, u64)]) -> Verdict {
    let mut violations = Vec::new();
    let mut created: BTreeMap<u64, usize> = BTreeMap::new();
    for a in announcements.iter().filter(|a| a.event == CheckpointEvent::Created) {
        *created.entry(a.metadata.version).or_default() += 1;
    }
    let twice: Vec<u64> = created.iter().filter(|(_, n)| **n > 1).map(|(v, _)| *v).collect();
    if !twice.is_empty() {
        violations.push(format!("versions announced as created more than once: {twice:?}"));
    }
    // Version numbers come from one counter and a stale version is never
    // announced, so the created ones only grow.
    let mut newest = 0;
    let mut out_of_order = 0;
    for a in announcements.iter().filter(|a| a.event == CheckpointEvent::Created) {
        if a.metadata.version < newest {
            out_of_order += 1;
            violations.push(format!("v{} announced as created after v{newest}", a.metadata.version));
        }
        newest = newest.max(a.metadata.version);
    }
    // An epoch that writes after a newer one wrote was a second writer.
    let mut stale = BTreeSet::new();
    let mut newest = 0;
    for (i, a) in announcements.iter().enumerate() {
        if a.epoch < newest && stale.insert(a.epoch) {
            let around = &announcements[i.saturating_sub(3)..(i + 3).min(announcements.len())];
            let around: Vec<String> = around
                .iter()
                .map(|a| format!("{:?} v{} epoch {}", a.event, a.metadata.version, a.epoch))
                .collect();
            violations.push(format!(
                "epoch {} announced after epoch {newest} had: {}",
                a.epoch,
                around.join("; ")
            ));
        }
        newest = newest.max(a.epoch);
    }
    let mut newest = 0;
    for (version, epoch) in active_epochs {
        if *epoch < newest {
            stale.insert(*epoch);
            violations.push(format!(
                "active moved back to epoch {epoch} (v{version}) after epoch {newest}"
            ));
        }
        newest = newest.max(*epoch);
    }
    Verdict {
        versions: created.len(),
        duplicate_versions: twice.len(),
        versions_out_of_order: out_of_order,
        epochs: announcements.iter().map(|a| a.epoch).collect::<BTreeSet<_>>().len(),
        epochs_with_two_writers: stale.len(),
        violations,
    }
}

/// The history and each node's last log lines, on stderr.
fn print_history(history: &History, dir: &Path) {
    eprintln!("nemesis history (seconds since the start):");
    for (at, line) in &history.lines {
        eprintln!("{at:8.2}  {line}");
    }
    for id in TRAINERS.iter().chain(&ENCODERS) {
        let log = std::fs::read_to_string(dir.join(format!("{id}.log"))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        eprintln!(
            "node {id}'s last words:\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wmvae::vae::checkpoint::Metadata;

    fn announced(event: CheckpointEvent, version: u64, epoch: u64) -> Announcement {
        let metadata = Metadata {
            version,
            ..Metadata::default()
        };
        let mut a = Announcement::new(event, &metadata, 0);
        a.epoch = epoch;
        a
    }

    #[test]
    fn one_writer_at_a_time_passes() {
        let history = [
            announced(CheckpointEvent::Created, 1, 3),
            announced(CheckpointEvent::Created, 2, 3),
            announced(CheckpointEvent::Created, 3, 9),
            announced(CheckpointEvent::Deleted, 1, 9),
        ];
        let verdict = judge(&history, &[(1, 3), (2, 3), (3, 9)]);
        assert!(verdict.violations.is_empty(), "{:?}", verdict.violations);
        assert_eq!((verdict.versions, verdict.epochs), (3, 2));
    }

    #[test]
    fn a_former_leader_writing_late_or_a_version_twice_or_late_is_a_violation() {
        let history = [
            announced(CheckpointEvent::Created, 1, 3),
            announced(CheckpointEvent::Created, 2, 9),
            announced(CheckpointEvent::Created, 2, 3),
            announced(CheckpointEvent::Created, 1, 9),
        ];
        let verdict = judge(&history, &[(1, 3), (2, 9), (2, 3)]);
        assert_eq!(verdict.duplicate_versions, 2);
        assert_eq!(verdict.versions_out_of_order, 1);
        assert_eq!(verdict.epochs_with_two_writers, 1);
        assert_eq!(verdict.violations.len(), 4, "{:?}", verdict.violations);
    }
}
