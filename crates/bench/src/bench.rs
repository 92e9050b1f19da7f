//! `wmvae bench train|encode|ingest`: measured figures, never asserted by tests.
//!
//! Each bench warms up, then times whole steps and reports images/s as one
//! JSON object (`--json`) or a line of text. Inputs are random frames: speed
//! does not depend on pixel content. BENCHMARKS.md records the figures.

use anyhow::Result;
use serde_json::{json, Value};
use std::time::Instant;
use tch::Tensor;
use wmvae::vae::adam::AdamConfig;
use wmvae::vae::device::{describe, DeviceChoice};
use wmvae::vae::learner::{frames_to_tensor, Learner, Network};
use wmvae::vae::model::{Precision, VaeConfig};

/// Untimed steps first: libtorch picks kernels and allocates on the first few.
const WARMUP_STEPS: usize = 3;

/// Common knobs of the benches.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub device: DeviceChoice,
    pub steps: usize,
    /// libtorch intra-op threads; 0 keeps libtorch's default.
    pub threads: usize,
}

fn random_frames(batch: usize, device: tch::Device) -> Result<Tensor> {
    let bytes: Vec<u8> = (0..batch * wmvae::frames::BYTES)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    frames_to_tensor(&bytes, device)
}

pub(crate) fn apply_threads(threads: usize) {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
}

/// libtorch's intra-op threads now.
pub(crate) fn threads() -> i32 {
    tch::get_num_threads()
}

/// Images per second of `step`, run `steps` times after the warm-up. Each
/// step must end by reading a value back, which synchronises CUDA.
fn images_per_s(batch: usize, steps: usize, mut step: impl FnMut()) -> f64 {
    let mut progress =
        wmvae::tools::progress::Progress::new(format!("bench (batch {batch})"), (WARMUP_STEPS + steps) as u64);
    for _ in 0..WARMUP_STEPS {
        step();
        progress.advance(1);
    }
    let start = Instant::now();
    for _ in 0..steps {
        step();
        progress.advance(1);
    }
    (batch * steps) as f64 / start.elapsed().as_secs_f64()
}

/// Full training steps (forward, loss, backward, Adam) at batch `batch`,
/// in `precision`.
pub fn train(options: BenchOptions, batch: usize, precision: Precision) -> Result<Value> {
    apply_threads(options.threads);
    let device = options.device.resolve()?;
    let mut learner = Learner::new(device, VaeConfig::default(), AdamConfig::default(), precision);
    let xs = random_frames(batch, device)?;
    let first_loss = learner.train_step(&xs).total;
    let mut last_loss = first_loss;
    let rate = images_per_s(batch, options.steps, || {
        last_loss = learner.train_step(&xs).total;
    });
    Ok(json!({
        "bench": "train",
        "device": describe(device),
        "batch": batch,
        "precision": precision,
        "steps": options.steps,
        "threads": tch::get_num_threads(),
        "train_images_per_s": rate,
        // A smoke check for new devices: the loss must fall on a fixed batch.
        "first_loss": first_loss,
        "last_loss": last_loss,
    }))
}

/// Encoding (mu, logvar) without gradient, at batch 1 and batch 256.
pub fn encode(options: BenchOptions) -> Result<Value> {
    apply_threads(options.threads);
    let device = options.device.resolve()?;
    let learner = Learner::new(device, VaeConfig::default(), AdamConfig::default(), Precision::Fp32);
    let mut rates = serde_json::Map::new();
    for batch in [1usize, 256] {
        rates.insert(
            batch.to_string(),
            json!(encode_rate(learner.net(), device, batch, options.steps)?),
        );
    }
    Ok(json!({
        "bench": "encode",
        "device": describe(device),
        "steps": options.steps,
        "threads": tch::get_num_threads(),
        "encode_images_per_s": rates,
        "decode_images_per_s": decode_rates(learner.net(), options.steps)?,
    }))
}

/// Timed steps at `batch`: batch 1 is latency-bound, so it gets as many
/// images as batch 256 gets in `steps`.
fn steps_at(batch: usize, steps: usize) -> usize {
    if batch == 1 {
        steps * 256
    } else {
        steps
    }
}

/// Encoding images/s of a prepared batch of `batch` frames on `device`.
pub(crate) fn encode_rate(net: &Network, device: tch::Device, batch: usize, steps: usize) -> Result<f64> {
    let xs = random_frames(batch, device)?;
    Ok(images_per_s(batch, steps_at(batch, steps), || {
        let (mu, _) = net.encode(&xs);
        mu.sum(tch::Kind::Float).double_value(&[]);
    }))
}

/// Decoding latents to uint8 frames (`wmvae decode`, `wm.ctl.decode`: z in,
/// 64x64x3 bytes on the CPU out), images/s at batch 1 and batch 256.
fn decode_rates(net: &Network, steps: usize) -> Result<Value> {
    let z_size = net.model().config().z_size as usize;
    let mut rates = serde_json::Map::new();
    for batch in [1usize, 256] {
        let z: Vec<f32> = (0..batch * z_size).map(|i| ((i % 17) as f32 - 8.0) / 4.0).collect();
        let mut failed = None;
        let rate = images_per_s(batch, steps_at(batch, steps), || {
            if let Err(e) = net.decode_frames(&z) {
                failed.get_or_insert(e);
            }
        });
        if let Some(e) = failed {
            return Err(e);
        }
        rates.insert(batch.to_string(), json!(rate));
    }
    Ok(Value::Object(rates))
}

/// Frames rendered once and cycled through by the ingest bench.
const INGEST_BENCH_DISTINCT_FRAMES: u64 = 1000;

/// A memory figure of this process from /proc/self/status ("VmHWM:" is
/// the peak resident set, "VmRSS:" the current one), in MB.
fn proc_status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Publishes `frames` 64x64 CarRacing-like frames (a pool of
/// [`INGEST_BENCH_DISTINCT_FRAMES`] cycled) to WM_FRAMES, acks awaited;
/// frames/s.
async fn publish_backlog(bus: &wmvae::bus::Bus, frames: u64) -> Result<f64> {
    use wmvae::frames::wire::FrameMessage;

    let pool: Vec<bytes::Bytes> = (0..INGEST_BENCH_DISTINCT_FRAMES)
        .map(|i| {
            wmvae::frames::preprocess::preprocess(
                wmvae::frames::synthetic::render(i / 100, i % 100).into(),
                96,
                96,
                wmvae::frames::preprocess::Policy::WorldModels,
            )
        })
        .collect::<Result<_>>()?;
    let mut publisher = bus.frame_publisher("bench");
    let publish_start = Instant::now();
    for i in 0..frames {
        let (episode, step) = (
            format!("bench-{}", i / INGEST_BENCH_DISTINCT_FRAMES),
            i % INGEST_BENCH_DISTINCT_FRAMES,
        );
        let side = wmvae::frames::SIDE as u32;
        let frame = FrameMessage::rgb(episode, step, side, side, &pool[step as usize][..]).with_transition(
            vec![0.0, 1.0, 0.0],
            0.1,
            false,
        );
        publisher.send(&frame).await?;
    }
    publisher.finish().await?;
    // The publisher's frames (`pool`, dropped on return) are no part of
    // the daemon's footprint.
    Ok(frames as f64 / publish_start.elapsed().as_secs_f64())
}

/// Starts the real ingest loop on `store`, with a status board of its own, until `shutdown`.
fn start_ingest(
    bus: &wmvae::bus::Bus,
    store: &wmvae::store::Store,
    config: &wmvae::config::Config,
    shutdown: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Result<()>> {
    let status = wmvae::daemon::status::StatusBoard::new(
        wmvae::config::Roles {
            trainer: true,
            encoder: false,
        },
        "",
        Some(store.clone()),
        String::new(),
    );
    tokio::spawn(wmvae::daemon::ingest::run(
        bus.clone(),
        store.clone(),
        config.ingest.clone(),
        String::new(),
        status,
        wmvae::daemon::supervisor::Supervisor::new(shutdown.clone()),
    ))
}

/// Waits until ingest has stored `frames` frames; an error if it stops first.
async fn wait_ingested(
    store: &wmvae::store::Store,
    task: &tokio::task::JoinHandle<Result<()>>,
    frames: u64,
) -> Result<()> {
    // A cheap counter: stats() walks the store's files and would steal CPU from what is measured.
    while store.frames_ingested() < frames {
        if task.is_finished() {
            anyhow::bail!("ingest stopped early");
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Ingest end to end against a local nats-server (`sync_interval: always`):
/// `frames` 64x64 CarRacing-like frames are published to WM_FRAMES first;
/// then a bare pull consumer that only acks reads them all (the baseline),
/// then the real ingest loop makes them durable in a fresh sled store and
/// acks them. Rates are frames/s over the whole batch.
pub async fn ingest(frames: u64, nats_server: &std::path::Path) -> Result<Value> {
    use tokio_util::sync::CancellationToken;
    use wmvae::bus::Bus;
    use wmvae::store::Store;

    // Loading libtorch (and the CUDA libraries linked beside it) is most of
    // the process's resident set before any work: report it apart.
    let baseline_rss_mb = proc_status_mb("VmRSS:");
    let server = crate::nats_server::LocalNats::start(nats_server)?;
    let mut config = wmvae::config::Config::load(None)?;
    config.nats.url = server.url.clone();
    let bus = Bus::connect(&config).await?;
    bus.migrate().await?;

    let publish_rate = publish_backlog(&bus, frames).await?;

    let plain = bus.consume_and_ack_only(frames).await?;
    let plain_rate = frames as f64 / plain.as_secs_f64();

    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), config.buffer)?;
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let task = start_ingest(&bus, &store, &config, &shutdown);
    wait_ingested(&store, &task, frames).await?;
    let ingest_rate = frames as f64 / start.elapsed().as_secs_f64();
    shutdown.cancel();
    task.await??;
    let stats = store.stats()?;
    Ok(json!({
        "bench": "ingest",
        "frames": frames,
        "ingest_frames_per_s": ingest_rate,
        "plain_consume_ack_per_s": plain_rate,
        "ingest_vs_plain": ingest_rate / plain_rate,
        "publish_frames_per_s": publish_rate,
        "disk_bytes_per_frame": stats.bytes_on_disk as f64 / frames as f64,
        "peak_rss_mb": proc_status_mb("VmHWM:"),
        "baseline_rss_mb": baseline_rss_mb,
    }))
}
