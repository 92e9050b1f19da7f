//! `wmvae bench series`: `wmvae series`'s frames/s beside `bench encode`'s
//! batch-256 encoding, on the same device and threads, round after round in
//! one run (this box is shared: only side-by-side figures compare). A
//! temporary store of CarRacing-like episodes; each round writes a whole series offline, by the code
//! `wmvae series --offline` runs (`cli::backend::SeriesPages`,
//! `tools::series::write`), and is compared with the encoder timed on a
//! prepared batch just before and just after it.

use super::bench::{apply_threads, encode_rate, threads};
use anyhow::Result;
use serde_json::{json, Value};
use std::time::Instant;
use wmvae::cli::backend::SeriesPages;
use wmvae::frames::preprocess::{preprocess, Policy};
use wmvae::frames::synthetic::{render, SIDE};
use wmvae::frames::Frame;
use wmvae::store::{compress_frames, BufferConfig, Scope, Store};
use wmvae::vae::device::{describe, DeviceChoice};
use wmvae::vae::learner::Network;
use wmvae::vae::model::VaeConfig;

/// Frames committed to the bench's store at once.
const COMMIT_FRAMES: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct SeriesOptions {
    pub frames: u64,
    pub episode_frames: u64,
    pub rounds: usize,
    /// Timed batches of the encoder's measurement.
    pub steps: usize,
    pub device: DeviceChoice,
    pub threads: usize,
}

/// A store holding `frames` frames in episodes of `episode_frames`.
fn store_of(dir: &std::path::Path, options: &SeriesOptions) -> Result<Store> {
    let store = Store::open(
        dir,
        BufferConfig {
            capacity: options.frames.max(1),
            validation_fraction: 0.1,
        },
    )?;
    let all: Vec<u64> = (0..options.frames).collect();
    for chunk in all.chunks(COMMIT_FRAMES) {
        let frames = chunk
            .iter()
            .map(|&i| {
                let (episode, step) = (i / options.episode_frames.max(1), i % options.episode_frames.max(1));
                let pixels = preprocess(render(episode, step).into(), SIDE, SIDE, Policy::WorldModels)?;
                Ok(Frame {
                    source: "bench".into(),
                    episode: format!("e{episode:06}"),
                    step,
                    pixels,
                    action: Some(vec![0.0, 1.0, 0.0]),
                    reward: Some(0.1),
                    done: Some(step + 1 == options.episode_frames),
                })
            })
            .collect::<Result<Vec<Frame>>>()?;
        store.commit(&frames, compress_frames(&frames), &[])?;
    }
    Ok(store)
}

/// Frames/s of reading the whole store in order, pixels decompressed, on
/// one thread: what series' reader thread does besides the encoder.
fn read_rate(store: &Store) -> Result<f64> {
    let start = Instant::now();
    let mut frames = 0u64;
    for frame in store.frames_in(Scope::default(), true) {
        frame?;
        frames += 1;
    }
    Ok(frames as f64 / start.elapsed().as_secs_f64())
}

/// Frames/s of `Network::encode_frames` on batches of 256 uint8 frames:
/// the encoder with series' conversions (bytes to a float tensor, the
/// latents back to vectors), without the store.
fn encode_bytes_rate(net: &Network, steps: usize) -> Result<f64> {
    let bytes: Vec<u8> = (0..256 * wmvae::frames::BYTES).map(|i| (i % 251) as u8).collect();
    net.encode_frames(&bytes)?; // warm-up
    let start = Instant::now();
    for _ in 0..steps {
        net.encode_frames(&bytes)?;
    }
    Ok((256 * steps) as f64 / start.elapsed().as_secs_f64())
}

pub async fn series(options: SeriesOptions) -> Result<Value> {
    apply_threads(options.threads);
    let device = options.device.resolve()?;
    let dir = tempfile::tempdir()?;
    let store = store_of(&dir.path().join("store"), &options)?;
    let encoder = Network::new(device, VaeConfig::default());
    let pages = SeriesPages::Offline {
        store: &store,
        net: Box::new(Network::new(device, VaeConfig::default())),
        version: 1,
        sha256: "bench".into(),
    };
    let mut rounds = Vec::new();
    let mut encode = encode_rate(&encoder, device, 256, options.steps)?;
    for round in 0..options.rounds {
        let start = Instant::now();
        let out = dir.path().join(format!("series-{round}"));
        let report = wmvae::tools::series::write(&pages, &Scope::default(), &out).await?;
        let series = report.frames as f64 / start.elapsed().as_secs_f64();
        // The encoder measured just before and just after: load that drifts
        // during the round weighs on both sides alike.
        let after = encode_rate(&encoder, device, 256, options.steps)?;
        let beside = (encode + after) / 2.0;
        rounds.push(json!({
            "encode_batch_256_frames_per_s": beside,
            "series_frames_per_s": series,
            "ratio": series / beside,
        }));
        encode = after;
    }
    let floors = json!({
        "store_read_frames_per_s": read_rate(&store)?,
        "encode_from_bytes_frames_per_s": encode_bytes_rate(&encoder, options.steps)?,
    });
    let mut ratios: Vec<f64> = rounds.iter().filter_map(|r| r["ratio"].as_f64()).collect();
    ratios.sort_by(f64::total_cmp);
    let median = match ratios.len() {
        0 => None,
        n if n % 2 == 1 => Some(ratios[n / 2]),
        n => Some((ratios[n / 2 - 1] + ratios[n / 2]) / 2.0),
    };
    Ok(json!({
        "bench": "series",
        "device": describe(device),
        "threads": threads(),
        "frames": options.frames,
        "episode_frames": options.episode_frames,
        "rounds": rounds,
        "floors": floors,
        "ratio_median": median,
    }))
}
