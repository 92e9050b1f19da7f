//! `wmvae publish`: frames by the wire contract, from a uint8 `.npy` or
//! rendered synthetically, at a set rate, for demos, tests and benchmarks
//! that need no Python. Builds messages; the bus sends them.

use crate::bus::Bus;
use crate::frames::npy::FrameReader;
use crate::frames::synthetic;
use crate::frames::wire::FrameMessage;
use anyhow::Result;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Steps per synthetic episode.
const SYNTHETIC_EPISODE_STEPS: u64 = 500;
/// Frames read from an `.npy` at a time.
const NPY_CHUNK_FRAMES: usize = 256;

/// Where frames come from.
#[derive(Debug, Clone)]
pub enum Input {
    /// uint8 (N, H, W, 3); episode = the file's stem, step = the index.
    Npy(PathBuf),
    /// CarRacing-like 96x96 scenes; a fresh episode id per run.
    Synthetic,
}

#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub source: String,
    pub input: Input,
    /// Frames per second; None publishes as fast as JetStream acks.
    pub rate: Option<f64>,
    /// Stop after this many frames (the whole file for `--npy` by default;
    /// required for `--synthetic`... or it runs until interrupted).
    pub count: Option<u64>,
}

/// Paces publishing at `rate` frames/s without drift.
struct Pacer {
    start: Instant,
    interval: Option<Duration>,
}

impl Pacer {
    async fn wait(&self, sent: u64) {
        if let Some(interval) = self.interval {
            tokio::time::sleep_until(self.start + interval * sent as u32).await;
        }
    }
}

/// Publishes frames; returns how many were stored by JetStream.
pub async fn run(bus: &Bus, options: &PublishOptions) -> Result<u64> {
    let mut publisher = bus.frame_publisher(&options.source);
    let pacer = Pacer {
        start: Instant::now(),
        interval: options.rate.map(|r| Duration::from_secs_f64(1.0 / r)),
    };
    let limit = options.count.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    match &options.input {
        Input::Npy(path) => {
            let mut reader = FrameReader::open(path)?;
            let episode = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (height, width) = (reader.height as u32, reader.width as u32);
            'file: loop {
                let chunk = reader.read_chunk(NPY_CHUNK_FRAMES)?;
                if chunk.is_empty() {
                    break;
                }
                for pixels in chunk.chunks_exact(reader.frame_bytes()) {
                    if sent >= limit {
                        break 'file;
                    }
                    pacer.wait(sent).await;
                    publisher
                        .send(&FrameMessage::rgb(episode.clone(), sent, height, width, pixels))
                        .await?;
                    sent += 1;
                }
            }
        }
        Input::Synthetic => {
            let run_id = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            while sent < limit {
                pacer.wait(sent).await;
                let (episode, step) = (sent / SYNTHETIC_EPISODE_STEPS, sent % SYNTHETIC_EPISODE_STEPS);
                let steer = ((step as f32) * 0.05).sin();
                let side = synthetic::SIDE as u32;
                let frame = FrameMessage::rgb(
                    format!("synthetic-{run_id}-{episode}"),
                    step,
                    side,
                    side,
                    synthetic::render(episode, step),
                )
                .with_transition(vec![steer, 0.5, 0.0], 0.1, step + 1 == SYNTHETIC_EPISODE_STEPS);
                publisher.send(&frame).await?;
                sent += 1;
            }
        }
    }
    publisher.finish().await?;
    Ok(sent)
}
