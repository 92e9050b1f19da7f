//! Ingest end to end: a real nats-server, the real `wmvae serve` binary, a
//! real sled store. Valid frames become durable exactly once, bad ones land
//! in the dead-letter stream with their reason, and a daemon killed
//! mid-stream loses nothing.

mod common;

use async_nats::jetstream::{self, consumer::pull};
use common::nats::{wait_for_ingest_consumer, wait_until, Daemon, NatsServer};
use common::{frames, wmvae};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use wmvae::frames::preprocess::{preprocess, Policy};
use wmvae::frames::wire::FrameMessage;
use wmvae::store::{BufferConfig, Store};

fn frame(episode: &str, step: u64, height: u32, width: u32, pixels: Vec<u8>) -> FrameMessage<'static> {
    FrameMessage {
        episode: episode.into(),
        step,
        height,
        width,
        channels: 3,
        pixels: pixels.into(),
        encoding: None,
        action: Some(vec![step as f32, 0.5, -0.5]),
        reward: Some(step as f64 * 0.1),
        done: Some(step == 9),
    }
}

fn png(pixels: &[u8], side: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side, side);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(pixels).unwrap();
    }
    out
}

async fn publish(js: &jetstream::Context, source: &str, payload: Vec<u8>, msg_id: Option<&str>) {
    let subject = format!("wm.frames.{source}");
    let ack = match msg_id {
        Some(id) => {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            js.publish_with_headers(subject, headers, payload.into()).await
        }
        None => js.publish(subject, payload.into()).await,
    };
    ack.unwrap().await.unwrap();
}

/// Waits until the daemon has created its consumer and the consumer has
/// nothing pending or unacked.
async fn wait_drained(js: &jetstream::Context, timeout: Duration) {
    wait_until(timeout, "the ingest consumer to drain", || async {
        let Ok(stream) = js.get_stream("WM_FRAMES").await else {
            return false;
        };
        let Ok(mut consumer) = stream.get_consumer::<pull::Config>("wmvae-ingest").await else {
            return false;
        };
        let Ok(info) = consumer.info().await else { return false };
        info.num_pending == 0 && info.num_ack_pending == 0 && info.delivered.stream_sequence > 0
    })
    .await;
}

fn open_store(daemon_dir: &std::path::Path) -> Store {
    Store::open(
        &daemon_dir.join("store"),
        BufferConfig {
            capacity: 1_000_000,
            validation_fraction: 0.05,
        },
    )
    .unwrap()
}

/// Mixed traffic: valid 64x64, 96x96 and PNG frames, duplicates (server- and
/// store-side), and one of each kind of bad frame. Exactly the valid distinct
/// frames are stored, correctly preprocessed; every bad one is dead-lettered
/// with its reason; stats (live and offline) and export agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_frames_stored_once_bad_frames_dead_lettered() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &[]);
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    wait_for_ingest_consumer(&js).await;

    let raw64 = frames(20, 64, 64);
    let raw96 = frames(10, 96, 96);
    let mut expected: BTreeMap<(String, String, u64), Vec<u8>> = BTreeMap::new();
    for step in 0..20u64 {
        let px = raw64[step as usize * 12288..][..12288].to_vec();
        publish(
            &js,
            "carA",
            frame("e64", step, 64, 64, px.clone()).to_msgpack(),
            Some(&format!("carA:e64:{step}")),
        )
        .await;
        expected.insert(("carA".into(), "e64".into(), step), px);
    }
    for step in 0..10u64 {
        // A plain core-NATS publish: the stream captures the subject.
        let px = raw96[step as usize * 27648..][..27648].to_vec();
        client
            .publish(
                "wm.frames.carB",
                frame("e96", step, 96, 96, px.clone()).to_msgpack().into(),
            )
            .await
            .unwrap();
        expected.insert(
            ("carB".into(), "e96".into(), step),
            preprocess(px.into(), 96, 96, Policy::WorldModels).unwrap().to_vec(),
        );
    }
    client.flush().await.unwrap();
    for step in 0..5u64 {
        let px = raw64[step as usize * 12288..][..12288].to_vec();
        let msg = FrameMessage {
            encoding: Some("png".into()),
            ..frame("epng", step, 64, 64, png(&px, 64))
        };
        publish(&js, "carA", msg.to_msgpack(), None).await;
        expected.insert(("carA".into(), "epng".into(), step), px);
    }
    // Duplicates: same Nats-Msg-Id (dropped by the server), and re-published
    // under new ids (dropped by the store).
    for step in 0..8u64 {
        let px = raw64[step as usize * 12288..][..12288].to_vec();
        let id = if step < 4 {
            format!("carA:e64:{step}")
        } else {
            format!("again-{step}")
        };
        publish(&js, "carA", frame("e64", step, 64, 64, px).to_msgpack(), Some(&id)).await;
    }
    // One of each kind of bad frame.
    let good = frame("bad", 0, 64, 64, vec![1; 12288]);
    #[derive(serde::Serialize)]
    struct Partial {
        episode: String,
        step: u64,
    }
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("malformed_msgpack", b"\xc1\xc1\xc1".to_vec()),
        ("malformed_msgpack", good.to_msgpack()[..5000].to_vec()),
        (
            "invalid_field",
            rmp_serde::to_vec_named(&Partial {
                episode: "x".into(),
                step: 1,
            })
            .unwrap(),
        ),
        (
            "size_mismatch",
            FrameMessage {
                pixels: vec![0; 100].into(),
                ..good.clone()
            }
            .to_msgpack(),
        ),
        (
            "bad_dimensions",
            FrameMessage {
                height: 0,
                ..good.clone()
            }
            .to_msgpack(),
        ),
        (
            "bad_dimensions",
            FrameMessage {
                height: 100_000,
                width: 100_000,
                ..good.clone()
            }
            .to_msgpack(),
        ),
        (
            "wrong_channels",
            FrameMessage {
                channels: 4,
                ..good.clone()
            }
            .to_msgpack(),
        ),
        (
            "bad_png",
            FrameMessage {
                encoding: Some("png".into()),
                pixels: b"\x89PNG\r\n\x1a\nnope".to_vec().into(),
                ..good.clone()
            }
            .to_msgpack(),
        ),
        (
            "unknown_encoding",
            FrameMessage {
                encoding: Some("jpeg".into()),
                ..good.clone()
            }
            .to_msgpack(),
        ),
        (
            "unsupported_size",
            frame("bad", 1, 32, 32, vec![0; 32 * 32 * 3]).to_msgpack(),
        ),
    ];
    for (_, payload) in &bad {
        publish(&js, "carBad", payload.clone(), None).await;
    }
    wait_drained(&js, Duration::from_secs(60)).await;

    // Dead letters: one per bad frame, each with its reason.
    let mut dlq = js.get_stream("WM_DLQ").await.unwrap();
    assert_eq!(dlq.info().await.unwrap().state.messages, bad.len() as u64);
    let mut reasons = Vec::new();
    for seq in 1..=bad.len() as u64 {
        let msg = dlq.get_raw_message(seq).await.unwrap();
        let reason = msg.headers.get("Wmvae-Reason").unwrap().to_string();
        assert_eq!(msg.headers.get("Wmvae-Subject").unwrap().as_str(), "wm.frames.carBad");
        assert_eq!(
            msg.payload,
            bad[seq as usize - 1].1,
            "dead letter {seq} is not the original payload"
        );
        reasons.push(reason);
    }
    for ((code, _), reason) in bad.iter().zip(&reasons) {
        assert!(reason.starts_with(code), "expected {code}, got {reason}");
    }

    // `buffer stats` live through the daemon, then offline on the store: the same figures.
    let buffer_stats = |place: &str| -> serde_json::Value {
        let out = wmvae()
            .args([
                "buffer",
                "stats",
                "--json",
                place,
                "--nats-url",
                &nats.url,
                "--data-dir",
            ])
            .arg(dir.path().join("store"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "buffer stats {place}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut stats: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(stats["bytes_on_disk"].as_u64().unwrap() > 0);
        stats.as_object_mut().unwrap().remove("bytes_on_disk"); // the shutdown writes a checkpoint
        stats
    };
    let live = buffer_stats("--online");
    let status = daemon.terminate();
    assert!(status.success(), "daemon exit {status:?}");
    let stats = buffer_stats("--offline");
    assert_eq!(live, stats);
    assert_eq!(stats["frames"], 35);
    assert_eq!(stats["episodes"], 3);
    assert_eq!(stats["sources"], 2);
    assert_eq!(stats["duplicates"], 4);
    assert_eq!(stats["rejected"]["malformed_msgpack"], 2);
    assert_eq!(stats["rejected"]["bad_dimensions"], 2);
    assert_eq!(
        stats["rejected"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum::<u64>(),
        10
    );

    let export = dir.path().join("export.npz");
    let out = wmvae()
        .args(["buffer", "export", "--out"])
        .arg(&export)
        .arg("--data-dir")
        .arg(dir.path().join("store"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let store = open_store(dir.path());
    let stored: Vec<_> = store.frames_in_order(None, true).map(|f| f.unwrap()).collect();
    let keys: Vec<_> = stored
        .iter()
        .map(|f| (f.source.clone(), f.episode.clone(), f.step))
        .collect();
    assert_eq!(keys, expected.keys().cloned().collect::<Vec<_>>());
    for f in &stored {
        assert_eq!(
            &f.pixels,
            &expected[&(f.source.clone(), f.episode.clone(), f.step)],
            "{} {} {}",
            f.source,
            f.episode,
            f.step
        );
        assert_eq!(f.action, Some(vec![f.step as f32, 0.5, -0.5]));
        assert_eq!((f.reward, f.done), (Some(f.step as f64 * 0.1), Some(f.step == 9)));
    }
    drop(store);

    // The export, read by numpy: same order, same pixels, the side arrays.
    let script = r#"
import hashlib, json, sys, numpy as np
z = np.load(sys.argv[1])
print(json.dumps({
  "files": sorted(z.files),
  "frames": [list(z["frames"].shape), str(z["frames"].dtype)],
  "sha256": hashlib.sha256(z["frames"].tobytes()).hexdigest(),
  "first": [str(z["source"][0]), str(z["episode"][0]), int(z["step"][0])],
  "action": list(z["action"].shape), "reward0": float(z["reward"][1]), "done": int(z["done"].sum()),
}))
"#;
    let py = std::process::Command::new(common::venv_python())
        .args(["-c", script])
        .arg(&export)
        .output()
        .unwrap();
    assert!(py.status.success(), "{}", String::from_utf8_lossy(&py.stderr));
    let seen: serde_json::Value = serde_json::from_slice(&py.stdout).unwrap();
    let all: Vec<u8> = stored.iter().flat_map(|f| f.pixels.clone()).collect();
    assert_eq!(
        seen["files"],
        serde_json::json!(["action", "done", "episode", "frames", "reward", "source", "step"])
    );
    assert_eq!(seen["frames"], serde_json::json!([[35, 64, 64, 3], "uint8"]));
    assert_eq!(seen["sha256"], wmvae::vae::checkpoint::sha256_hex(&all));
    assert_eq!(seen["first"], serde_json::json!(["carA", "e64", 0]));
    assert_eq!(seen["action"], serde_json::json!([35, 3]));
    assert_eq!(seen["reward0"], 0.1);
    assert_eq!(seen["done"], 2); // step 9 of e64 and of e96
}

/// A daemon SIGKILLed while frames stream in, then restarted: every
/// published frame ends up stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_stream_loses_nothing_and_stores_nothing_twice() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &[]);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;

    let total = 3000u64;
    let publisher = wmvae()
        .args([
            "publish",
            "--nats-url",
            &nats.url,
            "--source",
            "car",
            "--synthetic",
            "--rate",
            "1500",
            "--count",
            &total.to_string(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let part of the stream in, then kill the daemon without warning.
    wait_until(Duration::from_secs(30), "some frames to be acked", || async {
        let Ok(stream) = js.get_stream("WM_FRAMES").await else {
            return false;
        };
        let Ok(mut c) = stream.get_consumer::<pull::Config>("wmvae-ingest").await else {
            return false;
        };
        c.info()
            .await
            .map(|i| i.ack_floor.stream_sequence > 300)
            .unwrap_or(false)
    })
    .await;
    daemon.kill();
    let status = publisher.wait_with_output().unwrap().status;
    assert!(status.success());

    let daemon = Daemon::start(&nats.url, dir.path(), &[]);
    wait_drained(&js, Duration::from_secs(90)).await;
    assert!(daemon.terminate().success());

    let store = open_store(dir.path());
    let stats = store.stats().unwrap();
    assert_eq!(stats.frames, total);
    assert_eq!(stats.frames_ingested, total, "a frame was stored twice");
    let distinct: HashSet<(String, u64)> = store
        .frames_in_order(None, false)
        .map(|f| f.unwrap())
        .map(|f| (f.episode, f.step))
        .collect();
    assert_eq!(distinct.len() as u64, total);
}

/// A buffer of capacity 50 fed 120 frames in order keeps the newest 50.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_evicts_oldest_keeps_newest() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &nats.url,
        dir.path(),
        &[
            ("WMVAE_BUFFER__CAPACITY", "50"),
            ("WMVAE_BUFFER__VALIDATION_FRACTION", "0"),
        ],
    );
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    for step in 0..120u64 {
        publish(
            &js,
            "car",
            frame("long", step, 64, 64, vec![(step % 256) as u8; 12288]).to_msgpack(),
            None,
        )
        .await;
    }
    wait_drained(&js, Duration::from_secs(60)).await;
    assert!(daemon.terminate().success());
    let store = Store::open(
        &dir.path().join("store"),
        BufferConfig {
            capacity: 50,
            validation_fraction: 0.0,
        },
    )
    .unwrap();
    let steps: Vec<u64> = store.frames_in_order(None, false).map(|f| f.unwrap().step).collect();
    assert_eq!(steps, (70..120).collect::<Vec<_>>());
    assert_eq!(store.stats().unwrap().evicted, 70);
}
