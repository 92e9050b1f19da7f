//! Real data end to end: CarRacing-v3 frames from the example publisher
//! (gymnasium, headless) through NATS into a running daemon, which learns
//! them: a later version reconstructs the validation episodes with less than
//! half the error of version 1, and its KL has not collapsed under the
//! free-bits floor.

mod common;

use common::nats::{wait_for_ingest_consumer, wait_until, Daemon, NatsServer};
use common::{repo_root, venv_python};
use std::process::Command;
use std::time::Duration;
use wmvae::frames;
use wmvae::store::{Split, Store};
use wmvae::vae::learner::{frames_to_tensor, Network};

/// Episodes per env and frames per episode the publisher sends: 2 x 4 x 200
/// frames, enough for a few validation episodes at a 25 % split.
const ENVS: &str = "2";
const EPISODES: &str = "4";
const MAX_STEPS: &str = "200";
const VALIDATION_FRACTION: &str = "0.25";
/// Training steps (batch 32) after which the active version is judged.
const STEPS: u64 = 600;

/// CarRacing frames in, a learned VAE out: eval recon < half of v1's, KL above the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn learns_real_carracing_frames() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &server.url,
        dir.path(),
        &[
            ("WMVAE_TRAIN__MIN_FRAMES", "300"),
            ("WMVAE_TRAIN__BATCH_SIZE", "32"),
            ("WMVAE_TRAIN__SAMPLES_PER_INSERT", "0"),
            ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "200"),
            ("WMVAE_TRAIN__EVAL_EVERY_STEPS", "200"),
            ("WMVAE_TRAIN__KEEP_LAST", "1000"),
            ("WMVAE_BUFFER__VALIDATION_FRACTION", VALIDATION_FRACTION),
        ],
    );
    let client = server.client().await;
    wait_for_ingest_consumer(&async_nats::jetstream::new(client.clone())).await;

    let publisher = Command::new(venv_python())
        .arg(repo_root().join("examples/carracing_publisher.py"))
        .args([
            "--nats-url",
            &server.url,
            "--envs",
            ENVS,
            "--episodes",
            EPISODES,
            "--max-steps",
            MAX_STEPS,
            "--seed",
            "7",
        ])
        .output()
        .expect("the venv's python (scripts/setup installs gymnasium[box2d])");
    assert!(
        publisher.status.success(),
        "CarRacing publisher failed: {}",
        String::from_utf8_lossy(&publisher.stderr)
    );

    let status = || async {
        match client.request("wm.ctl.status", "".into()).await {
            Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap(),
            Err(_) => serde_json::Value::Null,
        }
    };
    wait_until(
        Duration::from_secs(600),
        "training steps on the real frames",
        || async { status().await["step"].as_u64() >= Some(STEPS) },
    )
    .await;
    assert!(daemon.terminate().success());

    // Judge version 1 and the last version on every validation frame, afresh.
    let config = wmvae::config::Config::load_with_env(
        None,
        [("WMVAE_BUFFER__VALIDATION_FRACTION".into(), VALIDATION_FRACTION.into())],
    )
    .unwrap();
    let store = Store::open(&dir.path().join("store"), config.buffer).unwrap();
    let pixels: Vec<u8> = store
        .frames_in_order(None, true)
        .map(Result::unwrap)
        .filter(|f| config.buffer.split_of(&f.source, &f.episode) == Split::Validation)
        .flat_map(|f| f.pixels)
        .collect();
    let validation_frames = pixels.len() / frames::BYTES;
    assert!(validation_frames >= 100, "only {validation_frames} validation frames");
    assert_eq!(store.len(Split::Validation), validation_frames as u64);
    let xs = frames_to_tensor(&pixels, tch::Device::Cpu).unwrap();
    let last = store.registry().active_version().unwrap().unwrap();
    let judge = |version: u64| {
        let mut net = Network::new(tch::Device::Cpu, config.vae());
        net.load_checkpoint_weights(&store.registry().get(version).unwrap().unwrap())
            .unwrap();
        net.evaluate(&xs)
    };
    let (first, later) = (judge(1), judge(last));
    eprintln!("{validation_frames} validation frames; v1: {first:?}; v{last}: {later:?}");
    assert!(last > 1);
    assert!(
        later.recon < first.recon / 2.0,
        "v{last} recon {} is not below half of v1's {}",
        later.recon,
        first.recon
    );
    // Free bits (World Models: KL loss = max(KL, 0.5 x 32)) stop the KL term
    // pulling under the floor, so a learning VAE's KL settles at it: held out,
    // it hovers within a few percent either side (15.6-17.5 nats measured
    // with the default schedule, BENCHMARKS.md issue #19). Posterior collapse
    // is the KL falling far under it, towards 0.
    let floor = config.vae().kl_tolerance * config.vae().z_size as f64;
    assert!(
        later.kl > 0.9 * floor,
        "v{last} KL {} far under the free-bits floor {floor}: posterior collapse",
        later.kl
    );
}
