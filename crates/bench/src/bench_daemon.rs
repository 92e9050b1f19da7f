//! `wmvae bench latency|pipeline`: the whole daemon, in this process,
//! against a local nats-server, measured from outside through NATS as a
//! rollout worker and a downstream subscriber would see it.

use crate::nats_server::LocalNats;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wmvae::bus::messages::LatentMessage;
use wmvae::bus::Bus;
use wmvae::config::Config;
use wmvae::daemon::status::Status;
use wmvae::daemon::status::TrainerState;
use wmvae::frames::wire::FrameMessage;

/// Distinct 96x96 frames cycled through by the publishers.
const FRAME_POOL: u64 = 200;

/// A daemon running in this process until dropped or stopped.
struct BenchDaemon {
    _server: LocalNats,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
    bus: Bus,
}

impl BenchDaemon {
    /// Starts nats-server and `serve` with `change` applied to the default config.
    async fn start(nats_server: &Path, change: impl FnOnce(&mut Config)) -> Result<BenchDaemon> {
        let server = LocalNats::start(nats_server)?;
        let dir = tempfile::tempdir()?;
        let mut config = Config::load(None)?;
        config.nats.url = server.url.clone();
        config.store.data_dir = dir.path().join("store");
        config.http.addr = String::new();
        change(&mut config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(wmvae::daemon::run(config.clone(), shutdown.clone()));
        let bus = Bus::connect(&config).await?;
        let daemon = BenchDaemon {
            _server: server,
            _dir: dir,
            shutdown,
            task,
            bus,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while daemon.status().await.is_err() {
            if daemon.task.is_finished() || Instant::now() > deadline {
                bail!("the daemon did not come up");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(daemon)
    }

    async fn status(&self) -> Result<Status> {
        status(&self.bus).await
    }

    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await.context("daemon task")?
    }
}

pub(super) fn frame(i: u64) -> FrameMessage<'static> {
    let side = wmvae::frames::synthetic::SIDE as u32;
    let pixels = wmvae::frames::synthetic::render(i / FRAME_POOL % 7, i % FRAME_POOL);
    let (episode, step) = frame_name(i);
    FrameMessage::rgb(episode, step, side, side, pixels).with_transition(vec![0.0, 1.0, 0.0], 0.1, false)
}

/// Frame `i`'s episode and step: `bench-{i / FRAME_POOL}`, `i % FRAME_POOL`
/// ([`frame_index`] reads them back).
pub(super) fn frame_name(i: u64) -> (String, u64) {
    (format!("bench-{}", i / FRAME_POOL), i % FRAME_POOL)
}

/// The status of whichever node answers `wm.ctl.status`.
pub(super) async fn status(bus: &Bus) -> Result<Status> {
    let bytes = bus
        .control_request(wmvae::bus::service::Endpoint::Status, Vec::new())
        .await?;
    serde_json::from_slice(&bytes).context("reading the daemon's status")
}

/// Publishes `count` frames at `rate` frames/s from `start_index`; returns
/// each frame's send time, in order. Frame `i` is episode `bench-{i / FRAME_POOL}`,
/// step `i % FRAME_POOL`.
async fn publish_paced(bus: &Bus, start_index: u64, count: u64, rate: f64) -> Result<Vec<Instant>> {
    let pool: Vec<FrameMessage> = (0..FRAME_POOL).map(frame).collect();
    let start = tokio::time::Instant::now();
    let mut sent = Vec::with_capacity(count as usize);
    for k in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
        let i = start_index + k;
        let mut msg = pool[(i % FRAME_POOL) as usize].clone();
        msg.episode = format!("bench-{}", i / FRAME_POOL);
        sent.push(Instant::now());
        bus.publish_frame_core("bench", &msg).await?;
    }
    bus.flush().await?;
    Ok(sent)
}

/// The index of the frame `publish_paced` sent as (episode, step).
fn frame_index(episode: &str, step: u64) -> Option<usize> {
    let n: u64 = episode.strip_prefix("bench-")?.parse().ok()?;
    Some((n * FRAME_POOL + step) as usize)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds from each send to its receipt, sorted.
fn latencies_ms(sent: &[Instant], received: &[(usize, Instant)]) -> Vec<f64> {
    let mut ms: Vec<f64> = received
        .iter()
        .filter_map(|(i, at)| sent.get(*i).map(|t0| (*at - *t0).as_secs_f64() * 1000.0))
        .collect();
    ms.sort_by(f64::total_cmp);
    ms
}

/// Frames published this close to a version switch (either side) count
/// as the switch's: its p99 is the tail a switch costs.
const SWITCH_WINDOW: Duration = Duration::from_secs(1);

/// When each frame's latent and its relayed copy arrived, as (frame
/// index, instant), and when the latents' version changed.
#[derive(Default)]
struct Receipts {
    latents: Vec<(usize, Instant)>,
    relayed: Vec<(usize, Instant)>,
    /// When the first latent of each new version came (not the first's).
    switches: Vec<Instant>,
    /// The version of the latest latent.
    version: Option<u64>,
}

impl Receipts {
    /// Notes `latent`, come now.
    fn latent(&mut self, latent: &LatentMessage) {
        let now = Instant::now();
        if self.version.is_some_and(|v| v != latent.model_version) {
            self.switches.push(now);
        }
        self.version = Some(latent.model_version);
        self.latents
            .extend(frame_index(&latent.episode, latent.step).map(|i| (i, now)));
    }
}

/// Frames published one at a time, this far apart, until the first latent
/// comes: the daemon's start (v1 written and loaded) then leaves a backlog
/// of a few frames, not of a second's worth at the measured rate.
const WARMUP_EVERY: Duration = Duration::from_millis(100);
/// The longest the daemon may take to its first latent.
const FIRST_LATENT_PATIENCE: Duration = Duration::from_secs(120);

/// Publishes frames 0, 1, ... every [`WARMUP_EVERY`] until the first latent
/// comes, then waits (as long again at most) for the latents of the rest;
/// each frame's send time, and the latents in `got`.
async fn warm_up(
    bus: &Bus,
    latents: &mut (impl futures::Stream<Item = LatentMessage> + Unpin),
    got: &mut Receipts,
) -> Result<Vec<Instant>> {
    let mut sent = Vec::new();
    let start = Instant::now();
    let mut tick = tokio::time::interval(WARMUP_EVERY);
    while got.latents.is_empty() {
        if start.elapsed() > FIRST_LATENT_PATIENCE {
            bail!("no latent {FIRST_LATENT_PATIENCE:?} after the first frame");
        }
        tokio::select! {
            _ = tick.tick() => {
                let i = sent.len() as u64;
                sent.push(Instant::now());
                bus.publish_frame_core("bench", &frame(i)).await?;
            }
            latent = latents.next() => got.latent(&latent.context("the latents' subscription ended")?),
        }
    }
    let drained = tokio::time::Instant::now() + start.elapsed();
    while got.latents.len() < sent.len() {
        match tokio::time::timeout_at(drained, latents.next()).await {
            Ok(Some(latent)) => got.latent(&latent),
            _ => bail!("{} of {} warm-up frames had a latent", got.latents.len(), sent.len()),
        }
    }
    Ok(sent)
}

/// Adds to `got` the receipts of frames up to `count` in all (or as many as
/// came by `deadline`).
async fn receipts(
    mut latents: impl futures::Stream<Item = LatentMessage> + Unpin,
    mut relayed: impl futures::Stream<Item = u64> + Unpin,
    mut got: Receipts,
    count: u64,
    deadline: tokio::time::Instant,
) -> Receipts {
    while (got.latents.len() as u64) < count || (got.relayed.len() as u64) < count {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            latent = latents.next() => match latent {
                Some(latent) => got.latent(&latent),
                None => break,
            },
            sequence = relayed.next() => match sequence {
                // WM_FRAMES holds only these frames: sequence k + 1 is frame k.
                Some(sequence) => got.relayed.push((sequence as usize - 1, Instant::now())),
                None => break,
            },
        }
    }
    got
}

/// The receipts of the frames `counted` keeps (by the time each was sent).
fn kept(receipts: &[(usize, Instant)], sent: &[Instant], counted: impl Fn(Instant) -> bool) -> Vec<(usize, Instant)> {
    receipts
        .iter()
        .copied()
        .filter(|(i, _)| sent.get(*i).is_some_and(|t| counted(*t)))
        .collect()
}

/// Publish → latent receipt, at `rate` frames/s for `seconds`, with the
/// daemon in its default configuration but for `[train] threads = 1` (so it
/// trains once min_frames is in, unless `train` is false). Beside it, on the
/// same nats-server and the same frames, the floor: a bare relay
/// (`Bus::relay`) that consumes, publishes 300 bytes and acks.
///
/// First a warm-up ([`warm_up`]): frames one at a time until the first
/// latent comes (the daemon's start, writing and loading v1, is
/// `first_latent_ms`) and the few sent meanwhile have theirs; then the
/// measured frames at `rate`, which the percentiles count. With
/// `include_warmup` there is no warm-up: the frames at `rate` start with
/// the daemon and all count, its start's backlog too. `switches` counts the version changes seen in
/// the latents, and `latent_p99_at_switch_ms` is the p99 of the frames
/// published within [`SWITCH_WINDOW`] of one.
pub async fn latency(rate: f64, seconds: f64, train: bool, include_warmup: bool, nats_server: &Path) -> Result<Value> {
    let daemon = BenchDaemon::start(nats_server, |c| {
        c.train.threads = 1;
        if !train {
            c.train.min_frames = u64::MAX;
        }
    })
    .await?;
    let config = Config::load(None)?.latents;
    let relay_stop = CancellationToken::new();
    let relay = {
        let (bus, stop) = (daemon.bus.clone(), relay_stop.clone());
        tokio::spawn(async move {
            bus.relay(config.max_batch, Duration::from_millis(config.max_wait_ms), stop)
                .await
        })
    };
    let mut latents = Box::pin(daemon.bus.subscribe_latents("bench").await?);
    let relayed = daemon.bus.subscribe_relayed().await?;
    let mut got = Receipts::default();
    let mut sent = match include_warmup {
        true => Vec::new(),
        false => warm_up(&daemon.bus, &mut latents, &mut got).await?,
    };
    let warmup = sent.len();
    let count = (rate * seconds) as u64;
    let bus = daemon.bus.clone();
    let publisher = tokio::spawn(async move { publish_paced(&bus, warmup as u64, count, rate).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(seconds + 30.0);
    let got = receipts(latents, relayed, got, warmup as u64 + count, deadline).await;
    sent.extend(publisher.await??);
    relay_stop.cancel();
    relay.await.context("relay task")??;
    let step = daemon.status().await?.step;
    daemon.stop().await?;
    let mut figures = latency_figures(&sent, &got, warmup)?;
    let run = json!({
        "bench": "latency",
        "rate": rate,
        "seconds": seconds,
        "frames": count,
        "training": train,
        "include_warmup": include_warmup,
        "train_threads": 1,
        "train_steps_during": step,
    });
    figures
        .as_object_mut()
        .context("figures are an object")?
        .extend(run.as_object().cloned().unwrap_or_default());
    Ok(figures)
}

/// The latency figures of a run: the percentiles of the frames published
/// after the `warmup` first ones, the time to the first latent, and the
/// tail near the version switches.
fn latency_figures(sent: &[Instant], got: &Receipts, warmup: usize) -> Result<Value> {
    let first = got
        .latents
        .iter()
        .map(|(_, at)| *at)
        .min()
        .context("no latent received")?;
    let measured = *sent.get(warmup).context("no frame published after the warm-up")?;
    let counted = |t: Instant| t >= measured;
    let (latent_ms, relay_ms) = (
        latencies_ms(sent, &kept(&got.latents, sent, counted)),
        latencies_ms(sent, &kept(&got.relayed, sent, counted)),
    );
    let near_switch = |t: Instant| {
        got.switches
            .iter()
            .any(|s| t + SWITCH_WINDOW >= *s && t <= *s + SWITCH_WINDOW)
    };
    let at_switch_ms = latencies_ms(sent, &kept(&got.latents, sent, near_switch));
    if latent_ms.is_empty() || relay_ms.is_empty() {
        bail!(
            "no latents ({}) or no relayed frames ({}) received",
            latent_ms.len(),
            relay_ms.len()
        );
    }
    Ok(json!({
        "latents": latent_ms.len(),
        "relayed": relay_ms.len(),
        "warmup_frames": warmup,
        "first_latent_ms": (first - sent[0]).as_secs_f64() * 1000.0,
        "switches": got.switches.len(),
        "latent_p99_at_switch_ms": (!at_switch_ms.is_empty()).then(|| percentile(&at_switch_ms, 0.99)),
        "latent_p50_ms": percentile(&latent_ms, 0.50),
        "latent_p99_ms": percentile(&latent_ms, 0.99),
        "latent_max_ms": latent_ms[latent_ms.len() - 1],
        "relay_p50_ms": percentile(&relay_ms, 0.50),
        "relay_p99_ms": percentile(&relay_ms, 0.99),
        "relay_max_ms": relay_ms[relay_ms.len() - 1],
        "latent_p99_over_relay_ms": percentile(&latent_ms, 0.99) - percentile(&relay_ms, 0.99),
    }))
}

/// Training images/s measured from the status endpoint's step count over `window`.
async fn training_rate(daemon: &BenchDaemon, batch: usize, window: Duration) -> Result<f64> {
    let (s0, t0) = (daemon.status().await?.step, Instant::now());
    tokio::time::sleep(window).await;
    let (s1, t1) = (daemon.status().await?.step, Instant::now());
    Ok((s1 - s0) as f64 * batch as f64 / (t1 - t0).as_secs_f64())
}

/// Training throughput idle, then while frames stream in at `rate`.
pub async fn pipeline(
    rate: f64,
    seconds: f64,
    device: wmvae::vae::device::DeviceChoice,
    nats_server: &Path,
) -> Result<Value> {
    let daemon = BenchDaemon::start(nats_server, |c| {
        c.train.samples_per_insert = 0.0;
        c.train.min_frames = 1000;
        c.train.device = device;
    })
    .await?;
    let batch = wmvae::config::Config::load(None)?.train.batch_size;
    publish_paced(&daemon.bus, 0, 2000, 2000.0).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while daemon.status().await?.state != Some(TrainerState::Training) {
        if Instant::now() > deadline {
            bail!("training did not start");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // warm-up
    let idle = training_rate(&daemon, batch, Duration::from_secs_f64(seconds)).await?;
    let bus = daemon.bus.clone();
    let count = (rate * (seconds + 4.0)) as u64;
    let publisher = tokio::spawn(async move { publish_paced(&bus, 1_000_000, count, rate).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ingesting = training_rate(&daemon, batch, Duration::from_secs_f64(seconds)).await?;
    publisher.await??;
    daemon.stop().await?;
    Ok(json!({
        "bench": "pipeline",
        "device": format!("{device:?}").to_lowercase(),
        "batch": batch,
        "ingest_rate": rate,
        "seconds": seconds,
        "train_images_per_s_idle": idle,
        "train_images_per_s_ingesting": ingesting,
        "ingesting_vs_idle": ingesting / idle,
    }))
}
