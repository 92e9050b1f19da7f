//! `wmvae bench idle`: the memory an idle `wmvae serve` holds. One daemon
//! process (both roles, the default config) on a fresh local nats-server
//! and an empty store; once it has written version 1 and encoded a first
//! frame with it (so both roles hold their model), it is left alone for
//! `seconds` and its resident set is read from /proc (Linux only).

use super::bench_daemon::frame;
use super::nats_server::LocalNats;
use crate::Children;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use wmvae::bus::Bus;
use wmvae::config::Config;

/// How long the daemon may take to write v1 and encode a first frame.
const START_PATIENCE: Duration = Duration::from_secs(120);

/// The kB figures of `/proc/PID/status` named `keys`, in MB.
fn resident_mb(pid: u32, keys: &[&str]) -> Result<Vec<f64>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).context("reading /proc (Linux only)")?;
    keys.iter()
        .map(|key| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        })
        .collect()
}

pub async fn idle(seconds: u64, nats_server: &Path) -> Result<Value> {
    let server = LocalNats::start(nats_server)?;
    let dir = tempfile::tempdir()?;
    let child = Command::new(crate::wmvae_binary()?)
        .args(["serve", "--nats-url", &server.url, "--data-dir"])
        .arg(dir.path().join("store"))
        .env("WMVAE_HTTP__ADDR", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting wmvae serve")?;
    let daemon = Children(vec![child]);
    let mut config = Config::load(None)?;
    config.nats.url = server.url.clone();
    let bus = Bus::connect(&config).await?;
    let mut latents = bus.subscribe_latents("bench").await?;
    // Published until one latent comes: the stream may not exist yet.
    let first = tokio::time::timeout(START_PATIENCE, async {
        loop {
            let _ = bus.publish_frame_core("bench", &frame(0)).await;
            if let Ok(Some(latent)) = tokio::time::timeout(Duration::from_secs(1), latents.next()).await {
                return latent.model_version;
            }
        }
    })
    .await
    .context("no latent from the daemon within its start patience")?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let pid = daemon.0[0].id();
    let [rss, anon, file] = resident_mb(pid, &["VmRSS", "RssAnon", "RssFile"])?[..] else {
        bail!("three figures asked, three read");
    };
    Ok(json!({
        "bench": "idle",
        "seconds_idle": seconds,
        "version_loaded": first,
        "idle_rss_mb": rss,
        "rss_anon_mb": anon,
        "rss_file_mb": file,
    }))
}
