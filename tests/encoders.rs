//! The encoder role against a real nats-server and real `wmvae serve`
//! processes: two encoder replicas and a trainer share the work with exactly
//! one latent per frame, one replica SIGKILLed mid-stream, latents that name
//! only announced versions and reproduce in PyTorch, a CLI rollback followed;
//! an encoder started before any version waits, then catches up; and
//! `examples/latents_to_series.py` turns the latents into episodes.

mod common;

use async_nats::jetstream;
use common::nats::{stream_messages, wait_for_consumer, wait_until, Daemon, NatsServer};
use common::{frames, free_port, http_get, repo_root, torch_reference, venv_python, wmvae};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use wmvae::bus::messages::{Announcement, CheckpointEvent, LatentMessage};
use wmvae::frames::wire::FrameMessage;
use wmvae::vae::checkpoint::sha256_hex;

/// A trainer that makes versions quickly on a 2-core box.
const TRAINER: &[(&str, &str)] = &[
    ("WMVAE_SERVE__ROLES", "trainer"),
    ("WMVAE_TRAIN__MIN_FRAMES", "50"),
    ("WMVAE_TRAIN__BATCH_SIZE", "16"),
    ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "10"),
    ("WMVAE_TRAIN__EVAL_EVERY_STEPS", "10"),
    ("WMVAE_TRAIN__KEEP_LAST", "1000"),
    ("WMVAE_TRAIN__SAMPLES_PER_INSERT", "2"),
    ("WMVAE_TRAIN__THREADS", "1"),
    ("WMVAE_BUFFER__VALIDATION_FRACTION", "0.3"),
];

/// An encoder replica named `id`, its metrics on `port`.
fn encoder(nats: &NatsServer, dir: &std::path::Path, id: &str, port: u16) -> Daemon {
    let addr = format!("127.0.0.1:{port}");
    Daemon::start(
        &nats.url,
        &dir.join(id),
        &[
            ("WMVAE_SERVE__ROLES", "encoder"),
            ("WMVAE_NODE__ID", id),
            ("WMVAE_TRAIN__THREADS", "1"),
            ("WMVAE_HTTP__ADDR", &addr),
        ],
    )
}

/// A metric's value from `/metrics` on `port`, if it is there.
fn metric(port: u16, name: &str) -> Option<f64> {
    http_get(port, "/metrics")
        .1
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
}

/// Publishes `episodes` x `steps` 64x64 frames from `first_episode` on, with
/// a transition each (the last step of an episode is `done`), `pause`
/// between frames; returns the pixels by (episode, step).
async fn publish(
    js: &jetstream::Context,
    first_episode: u64,
    episodes: u64,
    steps: u64,
    pause: Duration,
) -> HashMap<(String, u64), Vec<u8>> {
    let mut sent = HashMap::new();
    for (i, px) in frames((episodes * steps) as usize, 64, 64).chunks(12288).enumerate() {
        let (episode, step) = (format!("e{}", first_episode + i as u64 / steps), i as u64 % steps);
        let msg = FrameMessage::rgb(episode.clone(), step, 64, 64, px).with_transition(
            vec![step as f32, 0.5, 0.0],
            0.1 * step as f64,
            step + 1 == steps,
        );
        js.publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
        sent.insert((episode, step), px.to_vec());
        tokio::time::sleep(pause).await;
    }
    sent
}

async fn latents(js: &jetstream::Context) -> Vec<(LatentMessage, time::OffsetDateTime)> {
    stream_messages(js, "WM_LATENTS")
        .await
        .iter()
        .map(|m| (rmp_serde::from_slice(&m.payload).unwrap(), m.time))
        .collect()
}

async fn announcements(js: &jetstream::Context) -> Vec<(Announcement, time::OffsetDateTime)> {
    common::nats::announcement_messages(js)
        .await
        .iter()
        .map(|m| (rmp_serde::from_slice(&m.payload).unwrap(), m.time))
        .collect()
}

async fn latent_count(js: &jetstream::Context) -> u64 {
    match js.get_stream("WM_LATENTS").await {
        Ok(mut stream) => stream.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Two encoder replicas and a trainer: each frame gets exactly one latent,
/// both replicas work, one SIGKILLed mid-stream leaves its frames to the
/// other; each latent names a version announced before it whose weights
/// (sha256 checked) reproduce it in PyTorch; after a CLI rollback, latents
/// name the rollback's lineage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_frames_survive_a_kill_and_follow_a_rollback() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let trainer = Daemon::start(&nats.url, &dir.path().join("trainer"), TRAINER);
    let (port_a, port_b) = (free_port(), free_port());
    let encoder_a = encoder(&nats, dir.path(), "enc-a", port_a);
    let encoder_b = encoder(&nats, dir.path(), "enc-b", port_b);
    let js = jetstream::new(nats.client().await);
    wait_for_consumer(&js, "wmvae-encode").await;
    wait_until(Duration::from_secs(60), "both encoders to load version 1", || async {
        metric(port_a, "wmvae_encoder_version").is_some() && metric(port_b, "wmvae_encoder_version").is_some()
    })
    .await;

    let mut sent = publish(&js, 0, 6, 25, Duration::from_millis(10)).await;
    wait_until(Duration::from_secs(120), "150 latents", || async {
        latent_count(&js).await >= 150
    })
    .await;
    let (done_a, done_b) = (
        metric(port_a, "wmvae_latents_published_total").unwrap(),
        metric(port_b, "wmvae_latents_published_total").unwrap(),
    );
    assert!(
        done_a > 0.0 && done_b > 0.0,
        "both replicas encode: {done_a} and {done_b}"
    );
    assert_eq!(done_a + done_b, 150.0);

    // One replica SIGKILLed while frames stream in: the other takes its frames over.
    let streaming = {
        let js = js.clone();
        tokio::spawn(async move { publish(&js, 100, 6, 25, Duration::from_millis(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    encoder_a.kill();
    sent.extend(streaming.await.unwrap());
    wait_until(Duration::from_secs(120), "300 latents", || async {
        latent_count(&js).await >= 300
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // past ack_wait: any redelivery has happened
    let all = latents(&js).await;
    let keys: HashSet<(String, u64)> = all.iter().map(|(l, _)| (l.episode.clone(), l.step)).collect();
    assert_eq!((all.len(), keys.len()), (300, 300), "exactly one latent per frame");
    assert!(
        all.iter()
            .all(|(l, _)| l.action.is_some() && l.reward.is_some() && l.done.is_some()),
        "latents carry the transition"
    );

    // Each latent's version was announced before it, and its weights reproduce it.
    let announced: BTreeMap<u64, (Announcement, time::OffsetDateTime)> = announcements(&js)
        .await
        .into_iter()
        .filter(|(a, _)| a.event == CheckpointEvent::Created)
        .map(|(a, at)| (a.metadata.version, (a, at)))
        .collect();
    for (latent, at) in &all {
        let (_, announced_at) = announced
            .get(&latent.model_version)
            .unwrap_or_else(|| panic!("latent names unannounced v{}", latent.model_version));
        assert!(
            announced_at <= at,
            "v{} named before it was announced",
            latent.model_version
        );
    }
    let mut by_version: BTreeMap<u64, Vec<&LatentMessage>> = BTreeMap::new();
    for (latent, _) in &all {
        by_version.entry(latent.model_version).or_default().push(latent);
    }
    let (&version, checked) = by_version.iter().max_by_key(|(_, l)| l.len()).unwrap();
    let checked: Vec<&LatentMessage> = checked.iter().take(8).copied().collect();
    let bucket = js.get_object_store("wm-checkpoints").await.unwrap();
    let mut weights = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(
        &mut bucket.get(format!("vae/v{version}.safetensors")).await.unwrap(),
        &mut weights,
    )
    .await
    .unwrap();
    assert_eq!(sha256_hex(&weights), announced[&version].0.metadata.sha256);
    let d = dir.path();
    std::fs::write(d.join("w.safetensors"), &weights).unwrap();
    let pixels: Vec<u8> = checked
        .iter()
        .flat_map(|l| sent[&(l.episode.clone(), l.step)].clone())
        .collect();
    wmvae::frames::npy::write_frames(&d.join("f.npy"), &pixels, 64, 64).unwrap();
    torch_reference(&[
        "parity",
        "--weights",
        d.join("w.safetensors").to_str().unwrap(),
        "--frames",
        d.join("f.npy").to_str().unwrap(),
        "--out",
        d.join("t.npz").to_str().unwrap(),
    ]);
    let theirs: Vec<f32> = Vec::try_from(
        tch::Tensor::read_npz(d.join("t.npz"))
            .unwrap()
            .iter()
            .find(|(n, _)| n == "mu")
            .unwrap()
            .1
            .flatten(0, -1),
    )
    .unwrap();
    let ours: Vec<f32> = checked.iter().flat_map(|l| l.mu.clone()).collect();
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst < 1e-4,
        "PyTorch on v{version}'s weights differs from the latents by {worst}"
    );

    // A rollback through the CLI: once the replica holds it, latents name its lineage.
    let newest = *announced.keys().last().unwrap();
    let out = wmvae()
        .args([
            "checkpoint",
            "--online",
            "--nats-url",
            &nats.url,
            "rollback",
            "1",
            "--reason",
            "test",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(
        Duration::from_secs(60),
        "the replica to switch to v1's lineage",
        || async { metric(port_b, "wmvae_encoder_version").is_some_and(|v| v == 1.0 || v > newest as f64) },
    )
    .await;
    publish(&js, 200, 2, 10, Duration::ZERO).await;
    wait_until(
        Duration::from_secs(60),
        "latents of the frames after the rollback",
        || async { latent_count(&js).await >= 320 },
    )
    .await;
    let after: Vec<u64> = latents(&js)
        .await
        .iter()
        .filter(|(l, _)| l.episode == "e200" || l.episode == "e201")
        .map(|(l, _)| l.model_version)
        .collect();
    assert_eq!(after.len(), 20);
    assert!(
        after.iter().all(|&v| v == 1 || v > newest),
        "latents after the rollback name {after:?}"
    );
    assert!(encoder_b.terminate().success());
    assert!(trainer.terminate().success());
}

/// An encoder started before any version exists waits with its consumer
/// idle, says so, then catches up with every frame once the trainer made
/// version 1; `examples/latents_to_series.py` writes the episodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoder_started_first_waits_then_catches_up() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let encoder = Daemon::start(
        &nats.url,
        &dir.path().join("enc"),
        &[("WMVAE_SERVE__ROLES", "encoder"), ("WMVAE_TRAIN__THREADS", "1")],
    );
    wait_for_consumer(&js, "wmvae-encode").await;
    let status = || async {
        match client.request("wm.ctl.status", "".into()).await {
            Ok(reply) => serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap_or_default(),
            Err(_) => serde_json::Value::Null,
        }
    };
    wait_until(Duration::from_secs(30), "the encoder's status", || async {
        !status().await.is_null()
    })
    .await;
    let s = status().await;
    assert_eq!(s["encoder_state"], "waiting for a version", "{s}");
    assert_eq!(
        (s["roles"].clone(), s["state"].clone()),
        (serde_json::json!(["encoder"]), serde_json::Value::Null)
    );
    assert!(!s["hostname"].as_str().unwrap_or("").is_empty());

    let sent = publish(&js, 0, 3, 20, Duration::ZERO).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut consumer = js
        .get_stream("WM_FRAMES")
        .await
        .unwrap()
        .get_consumer::<jetstream::consumer::pull::Config>("wmvae-encode")
        .await
        .unwrap();
    assert_eq!(
        consumer.info().await.unwrap().delivered.stream_sequence,
        0,
        "the consumer stays idle without a version"
    );
    assert_eq!(latent_count(&js).await, 0);

    let trainer = Daemon::start(
        &nats.url,
        &dir.path().join("trainer"),
        &[("WMVAE_SERVE__ROLES", "trainer"), ("WMVAE_TRAIN__MIN_FRAMES", "100000")],
    );
    wait_until(Duration::from_secs(120), "a latent for every frame", || async {
        latent_count(&js).await >= 60
    })
    .await;
    let all = latents(&js).await;
    assert_eq!(all.len(), 60);
    assert!(all.iter().all(|(l, _)| l.model_version == 1), "v1 is the only version");

    // The memory model's input: one .npz per finished episode, in step order.
    let out_dir = dir.path().join("series");
    let run = std::process::Command::new(venv_python())
        .arg(repo_root().join("examples/latents_to_series.py"))
        .args(["--out", out_dir.to_str().unwrap(), &nats.url])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("3 episodes written"),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    let check = "import json, sys, numpy as np\n\
                 z = np.load(sys.argv[1])\n\
                 print(json.dumps({k: z[k].tolist() for k in ['step', 'action', 'reward', 'done']} | {'mu_shape': list(z['mu'].shape), 'logvar_shape': list(z['logvar'].shape), 'mu0': z['mu'][0].tolist()}))";
    let episode = std::process::Command::new(venv_python())
        .args(["-c", check])
        .arg(out_dir.join("car__e1.npz"))
        .output()
        .unwrap();
    assert!(episode.status.success(), "{}", String::from_utf8_lossy(&episode.stderr));
    let e: serde_json::Value = serde_json::from_slice(&episode.stdout).unwrap();
    assert_eq!(e["step"], serde_json::json!((0..20).collect::<Vec<u64>>()));
    assert_eq!(
        (e["mu_shape"].clone(), e["logvar_shape"].clone()),
        (serde_json::json!([20, 32]), serde_json::json!([20, 32]))
    );
    assert_eq!(e["action"][7], serde_json::json!([7.0, 0.5, 0.0]));
    assert!((e["reward"][7].as_f64().unwrap() - 0.7).abs() < 1e-6);
    assert_eq!(
        e["done"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d.as_bool() == Some(true))
            .count(),
        1
    );
    assert_eq!(e["done"][19], true);
    let latent_e1_0 = all.iter().find(|(l, _)| l.episode == "e1" && l.step == 0).unwrap();
    let mu0: Vec<f32> = serde_json::from_value(e["mu0"].clone()).unwrap();
    assert_eq!(mu0, latent_e1_0.0.mu, "the episode file holds the stream's latents");
    assert!(sent.contains_key(&("e1".to_string(), 19)));
    assert!(encoder.terminate().success());
    assert!(trainer.terminate().success());
}

/// `wm.ctl.decode` turns latents into frames with the active version or a
/// pinned one, and `wm.ctl.encode` takes a pinned version too (a
/// controller evaluated against a fixed V while training goes on); bad
/// requests are refused with 400, an unknown version with 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_and_encode_on_the_active_or_a_pinned_version() {
    use wmvae::bus::messages::DecodeReply;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), common::FAST);
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    wait_for_consumer(&js, "wmvae-encode").await;
    // Six episodes: a few land in the validation split, enough in training.
    publish(&js, 0, 6, 40, Duration::ZERO).await;
    let active = || async {
        let reply = client.request("wm.ctl.status", "".into()).await.ok()?;
        serde_json::from_slice::<serde_json::Value>(&reply.payload).ok()?["encoder_version"].as_u64()
    };
    daemon
        .wait_until(
            Duration::from_secs(120),
            "the encoder on a version after v1",
            || async { active().await.is_some_and(|v| v > 1) },
        )
        .await;
    let request = |body: serde_json::Value| {
        let client = client.clone();
        async move {
            client
                .request("wm.ctl.decode", rmp_serde::to_vec_named(&body).unwrap().into())
                .await
                .unwrap()
        }
    };
    let error_code = |reply: &async_nats::Message| {
        reply
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error-Code"))
            .map(|c| c.to_string())
    };
    let z: Vec<Vec<f32>> = wmvae::vae::properties::prior_draws(32)
        .chunks(32)
        .map(<[f32]>::to_vec)
        .collect();
    let on_active: DecodeReply = rmp_serde::from_slice(&request(serde_json::json!({ "z": z })).await.payload).unwrap();
    assert!(on_active.version > 1);
    assert_eq!(on_active.frames.len(), z.len() * 64 * 64 * 3);
    let on_v1: DecodeReply =
        rmp_serde::from_slice(&request(serde_json::json!({ "z": z, "version": 1 })).await.payload).unwrap();
    assert_eq!(on_v1.version, 1);
    assert_ne!(on_v1.frames, on_active.frames, "v1's decoder is not the trained one");
    let grid: DecodeReply =
        rmp_serde::from_slice(&request(serde_json::json!({ "z": z, "format": "png" })).await.payload).unwrap();
    assert!(grid.frames.is_empty() && grid.png.is_some_and(|png| png.starts_with(b"\x89PNG")));
    assert_eq!(
        error_code(&request(serde_json::json!({ "z": vec![vec![0.0f32; 31]] })).await).as_deref(),
        Some("400")
    );
    assert_eq!(
        error_code(&request(serde_json::json!({ "z": vec![vec![0.0f32; 32]; 300] })).await).as_deref(),
        Some("400")
    );
    assert_eq!(
        error_code(&request(serde_json::json!({ "z": z, "version": 999 })).await).as_deref(),
        Some("404")
    );

    // encode, pinned to v1: the frame message carries "version".
    #[derive(serde::Serialize)]
    struct Pinned<'a> {
        #[serde(flatten)]
        frame: FrameMessage<'a>,
        version: u64,
    }
    let pixels = frames(1, 64, 64);
    let pinned = Pinned {
        frame: FrameMessage::rgb("x", 0, 64, 64, pixels.as_slice()),
        version: 1,
    };
    let reply = client
        .request("wm.ctl.encode", rmp_serde::to_vec_named(&pinned).unwrap().into())
        .await
        .unwrap();
    let latent: LatentMessage = rmp_serde::from_slice(&reply.payload).unwrap();
    assert_eq!(latent.model_version, 1);
    let reply = client
        .request(
            "wm.ctl.encode",
            FrameMessage::rgb("x", 0, 64, 64, pixels.as_slice()).to_msgpack().into(),
        )
        .await
        .unwrap();
    let latent: LatentMessage = rmp_serde::from_slice(&reply.payload).unwrap();
    assert!(latent.model_version > 1, "without a version: the active one");
    assert!(daemon.terminate().success());
}
