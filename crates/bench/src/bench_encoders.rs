//! `wmvae bench encoders`: latents/s with 1, 2, ... `wmvae serve --role
//! encoder` processes sharing one nats-server. Each count gets a fresh
//! local nats-server holding a version (weights in the bucket, announced
//! and made active as a trainer would) and the same backlog of CarRacing-like 96x96 frames;
//! the rate is measured from the first latent stored to the last. libtorch
//! threads are split between the replicas (cores / replicas each).

use super::bench_daemon::frame;
use super::nats_server::LocalNats;
use crate::Children;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use wmvae::bus::kv::Active;
use wmvae::bus::messages::{weights_object, Announcement, CheckpointEvent};
use wmvae::bus::Bus;
use wmvae::config::Config;
use wmvae::vae::checkpoint::{now_rfc3339, sha256_hex, Metadata};
use wmvae::vae::device::Device;
use wmvae::vae::learner::Network;

/// The longest one count may take before the bench gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the stored latents are counted.
const POLL: Duration = Duration::from_millis(20);

pub async fn encoders(replicas: &[usize], frames: u64, nats_server: &Path) -> Result<Value> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut result = json!({ "bench": "encoders", "frames": frames, "cores": cores });
    for &count in replicas {
        let rate = latents_per_s(count, frames, cores, nats_server)
            .await
            .with_context(|| format!("{count} encoders"))?;
        result[format!("latents_per_s_{count}")] = json!(rate);
    }
    Ok(result)
}

async fn latents_per_s(count: usize, frames: u64, cores: usize, nats_server: &Path) -> Result<f64> {
    let server = LocalNats::start(nats_server)?;
    let mut config = Config::load(None)?;
    config.nats.url = server.url.clone();
    let bus = Bus::connect(&config).await?;
    bus.migrate().await?;
    // Version 1, as a trainer publishes it.
    publish_version(&bus, &config).await?;
    publish_backlog(&bus, frames).await?;
    let _replicas = start_replicas(count, cores, &server.url)?;
    rate(&bus, frames).await
}

/// Publishes version 1's weights, announces it and makes it active, as a trainer would.
async fn publish_version(bus: &Bus, config: &Config) -> Result<()> {
    let weights = Network::new(Device::Cpu, config.vae()).weights_bytes()?;
    bus.put_object(&weights_object(1), &weights).await?;
    let metadata = Metadata {
        version: 1,
        sha256: sha256_hex(&weights),
        created_at: now_rfc3339(),
        ..Default::default()
    };
    let fence = bus.fence_announcements(0).await?;
    bus.announce(
        &Announcement::new(CheckpointEvent::Created, &metadata, weights.len() as u64),
        fence,
    )
    .await?;
    bus.shared()
        .await?
        .set_active(
            &Active {
                version: 1,
                sha256: metadata.sha256.clone(),
                epoch: 0,
            },
            None,
        )
        .await?;
    Ok(())
}

/// Publishes the backlog of `frames` frames for the encoders.
async fn publish_backlog(bus: &Bus, frames: u64) -> Result<()> {
    let mut publisher = bus.frame_publisher("bench");
    for i in 0..frames {
        publisher.send(&frame(i)).await?;
    }
    publisher.finish().await?;
    Ok(())
}

/// Starts `count` encoder processes on the server at `url`, the cores split between them.
fn start_replicas(count: usize, cores: usize, url: &str) -> Result<Children> {
    let exe = crate::wmvae_binary()?;
    let threads = (cores / count).max(1).to_string();
    let children = (0..count)
        .map(|k| {
            Command::new(&exe)
                .args(["serve", "--role", "encoder", "--nats-url", url])
                .env("WMVAE_TRAIN__THREADS", &threads)
                .env("WMVAE_TRAIN__DEVICE", "cpu")
                .env("WMVAE_HTTP__ADDR", "")
                .env("WMVAE_NODE__ID", format!("bench-{k}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting an encoder")
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Children(children))
}

/// Latents stored per second, from the first stored to the last of `frames`.
async fn rate(bus: &Bus, frames: u64) -> Result<f64> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let stored = bus.stream_len("WM_LATENTS").await?;
        let now = Instant::now();
        if stored > 0 && first.is_none() {
            first = Some((now, stored));
        }
        if stored >= frames {
            let (t0, n0) = first.unwrap_or((now, stored));
            let seconds = (now - t0).as_secs_f64();
            if seconds <= 0.0 {
                bail!("all {frames} latents were stored before the first count: use more frames");
            }
            return Ok((stored - n0) as f64 / seconds);
        }
        if now > deadline {
            bail!("only {stored} of {frames} latents after {RUN_TIMEOUT:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}
