//! `wmvae checkpoint ...` against a running daemon (through the control
//! service) and against the store alone, with real NATS, sled and PyTorch.

mod common;

use async_nats::jetstream;
use common::nats::{announcements, wait_for_ingest_consumer, wait_until, Daemon, NatsServer};
use common::{frames, torch_reference, wmvae, FAST};
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use wmvae::bus::messages::{Announcement, CheckpointEvent, LatentMessage};
use wmvae::frames::wire::FrameMessage;

fn cli(nats_url: &str, data_dir: &Path, args: &[&str]) -> Output {
    eprintln!("wmvae checkpoint {args:?}");
    wmvae()
        .arg("checkpoint")
        .args(args)
        .args(["--nats-url", nats_url, "--data-dir"])
        .arg(data_dir.join("store"))
        .env("WMVAE_TRAIN__DEVICE", "cpu")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(out: Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).unwrap()
}

/// Publishes episodes of 64x64 frames, `pace` apart.
async fn publish_paced(js: &jetstream::Context, first_episode: u64, episodes: u64, steps: u64, pace: Duration) {
    let raw = frames((episodes * steps) as usize, 64, 64);
    for (i, px) in raw.chunks(12288).enumerate() {
        let msg = FrameMessage::rgb(
            format!("e{}", first_episode + i as u64 / steps),
            i as u64 % steps,
            64,
            64,
            px.to_vec(),
        );
        js.publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
        tokio::time::sleep(pace).await;
    }
}

async fn publish(js: &jetstream::Context, first_episode: u64, episodes: u64, steps: u64) {
    publish_paced(js, first_episode, episodes, steps, Duration::ZERO).await
}

async fn stream_payloads(js: &jetstream::Context, name: &str) -> Vec<bytes::Bytes> {
    let Ok(mut stream) = js.get_stream(name).await else {
        return Vec::new();
    };
    let state = stream.info().await.unwrap().state.clone();
    let mut out = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push(m.payload);
        }
    }
    out
}

async fn created(js: &jetstream::Context) -> Vec<u64> {
    announcements(js)
        .await
        .iter()
        .filter(|a| a.event == CheckpointEvent::Created)
        .map(|a| a.metadata.version)
        .collect()
}

fn encode_mu(args: &[&str], input: &Path, out: &Path, nats_url: &str, data_dir: &Path) -> Vec<f32> {
    let o = wmvae()
        .args(["encode", "--device", "cpu"])
        .args(args)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(out)
        .args(["--nats-url", nats_url, "--data-dir"])
        .arg(data_dir.join("store"))
        .output()
        .unwrap();
    ok(o);
    let npz = tch::Tensor::read_npz(out).unwrap();
    Vec::try_from(npz.iter().find(|(n, _)| n == "mu").unwrap().1.flatten(0, -1)).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Live: list/show/pin/delete/history, a rollback while frames stream in
/// (latents switch version once and never go back; the next version's parent
/// is the target), export to PyTorch, import from PyTorch, and clean errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_commands_through_the_daemon() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    // samples_per_insert 3.2 x 150 frames = 30 steps of 16: v2, v3, v4, then
    // the trainer waits for frames, so the active version holds still.
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([("WMVAE_TRAIN__SAMPLES_PER_INSERT", "3.2")])
        .collect();
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    publish(&js, 0, 6, 25).await;
    wait_until(Duration::from_secs(120), "version 4", || async {
        created(&js).await.len() >= 4
    })
    .await;
    let url = nats.url.as_str();
    let d = dir.path();

    let list = json(cli(url, d, &["list", "--json", "--online"]));
    let rows = list.as_array().unwrap();
    assert!(rows.len() >= 3);
    assert_eq!(rows.iter().filter(|r| r["active"] == true).count(), 1);
    let active = rows.iter().find(|r| r["active"] == true).unwrap()["version"]
        .as_u64()
        .unwrap();
    let shown = json(cli(url, d, &["show", "2", "--json"]));
    assert_eq!(shown["parent"], 1);
    // Its latent diagnostics on held-out frames (issue #27's pinned names).
    assert!(shown["active_units"].as_u64().is_some_and(|u| u <= 32), "{shown}");
    let kl = shown["kl_per_dim"].as_array().unwrap();
    assert!(
        kl.len() == 32 && kl.iter().all(|k| k.as_f64().is_some_and(|k| k >= 0.0)),
        "{shown}"
    );
    assert_eq!(cli(url, d, &["show", "999"]).status.code(), Some(2));
    ok(cli(url, d, &["pin", "2"]));
    assert!(json(cli(url, d, &["list", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["version"] == 2 && r["pinned"] == true));
    ok(cli(url, d, &["unpin", "2"]));
    let refused = cli(url, d, &["delete", &active.to_string()]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("active"));
    assert_eq!(cli(url, d, &["rollback", "4242"]).status.code(), Some(2));

    // Roll back to v1 while frames keep coming.
    let streaming = {
        let js = js.clone();
        tokio::spawn(async move { publish_paced(&js, 100, 4, 25, Duration::from_millis(20)).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(cli(url, d, &["rollback", "1", "--reason", "bad run"]));
    streaming.await.unwrap();
    // The encoder follows the cluster's active version, moved once the
    // rollback is announced: frames sent after it switched must have
    // latents past the switch.
    let client = nats.client().await;
    wait_until(Duration::from_secs(60), "the encoder to switch to v1", || async {
        let Ok(reply) = client.request("wm.ctl.status", "".into()).await else {
            return false;
        };
        serde_json::from_slice::<serde_json::Value>(&reply.payload).is_ok_and(|s| s["encoder_version"] == 1)
    })
    .await;
    publish(&js, 200, 1, 25).await;
    wait_until(Duration::from_secs(120), "a version after the rollback", || async {
        announcements(&js)
            .await
            .iter()
            .skip_while(|a| a.event != CheckpointEvent::Rollback)
            .any(|a| a.event == CheckpointEvent::Created)
    })
    .await;
    let events = announcements(&js).await;
    let rollback = events.iter().find(|a| a.event == CheckpointEvent::Rollback).unwrap();
    // The frames streaming in let training go on, so a version newer than
    // `active` may have been created before the rollback landed: the
    // rollback starts from the newest version announced before it.
    let newest_before = events
        .iter()
        .take_while(|a| a.event != CheckpointEvent::Rollback)
        .filter(|a| a.event == CheckpointEvent::Created)
        .map(|a| a.metadata.version)
        .max();
    assert!(newest_before >= Some(active));
    assert_eq!(
        (rollback.from, rollback.to, rollback.reason.as_deref()),
        (newest_before, Some(1), Some("bad run"))
    );
    let after: Vec<&Announcement> = events
        .iter()
        .skip_while(|a| a.event != CheckpointEvent::Rollback)
        .filter(|a| a.event == CheckpointEvent::Created)
        .collect();
    assert_eq!(
        after[0].metadata.parent,
        Some(1),
        "training goes on from the rollback target"
    );
    // Latents in stream order: v1 (initial weights), then the old lineage
    // 2..=old, then from the switch on only v1 or versions newer than old.
    let old = rollback.from.unwrap();
    let new_lineage = |v: u64| v == 1 || v > old;
    wait_until(
        Duration::from_secs(60),
        "latents of the frames sent after the rollback",
        || async { stream_payloads(&js, "WM_LATENTS").await.len() >= 275 },
    )
    .await;
    let versions: Vec<u64> = stream_payloads(&js, "WM_LATENTS")
        .await
        .iter()
        .map(|p| rmp_serde::from_slice::<LatentMessage>(p).unwrap().model_version)
        .collect();
    let first_old = versions
        .iter()
        .position(|&v| !new_lineage(v))
        .expect("latents from trained versions");
    let switch = first_old
        + versions[first_old..]
            .iter()
            .position(|&v| new_lineage(v))
            .expect("latents switched after the rollback");
    assert!(
        versions[switch..].iter().all(|&v| new_lineage(v)),
        "a latent went back to an old version: {:?}",
        &versions[switch..]
    );
    assert!(
        versions[first_old..switch].windows(2).all(|w| w[0] <= w[1]),
        "versions before the switch only grow"
    );
    let history = json(cli(url, d, &["history", "--json"]));
    let entry = history
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["why"] == "rollback")
        .unwrap();
    assert_eq!(
        (entry["to"].as_u64(), entry["reason"].as_str()),
        (Some(1), Some("bad run"))
    );
    assert!(entry["by"].as_str().unwrap().contains('@'));

    // Export -> PyTorch gives the same mu as `wmvae encode --checkpoint`.
    let frames_path = d.join("f.npy");
    wmvae::frames::npy::write_frames(&frames_path, &frames(4, 64, 64), 64, 64).unwrap();
    let exported = d.join("v2.safetensors");
    ok(cli(url, d, &["export", "2", "--out", exported.to_str().unwrap()]));
    let torch_out = d.join("torch.npz");
    torch_reference(&[
        "parity",
        "--weights",
        exported.to_str().unwrap(),
        "--frames",
        frames_path.to_str().unwrap(),
        "--out",
        torch_out.to_str().unwrap(),
    ]);
    let theirs: Vec<f32> = Vec::try_from(
        tch::Tensor::read_npz(&torch_out)
            .unwrap()
            .iter()
            .find(|(n, _)| n == "mu")
            .unwrap()
            .1
            .flatten(0, -1),
    )
    .unwrap();
    let ours = encode_mu(&["--checkpoint", "2"], &frames_path, &d.join("z.npz"), url, d);
    assert!(max_diff(&ours, &theirs) < 1e-5);

    // Import PyTorch weights: a new active version that encodes like the file.
    let foreign = d.join("torch.safetensors");
    torch_reference(&["save-weights", "--out", foreign.to_str().unwrap(), "--seed", "5"]);
    let imported = ok(cli(
        url,
        d,
        &["import", foreign.to_str().unwrap(), "--reason", "from pytorch"],
    ));
    let version: u64 = imported
        .split(" as v")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let from_file = encode_mu(
        &["--weights", foreign.to_str().unwrap()],
        &frames_path,
        &d.join("a.npz"),
        url,
        d,
    );
    let from_version = encode_mu(
        &["--checkpoint", &version.to_string()],
        &frames_path,
        &d.join("b.npz"),
        url,
        d,
    );
    assert!(max_diff(&from_file, &from_version) < 1e-6);
    assert!(json(cli(url, d, &["history", "--json"]))
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["why"] == "import" && h["to"] == version));

    // A bad file: a clear error naming the tensor, and nothing changes.
    let imports = |history: serde_json::Value| {
        history
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["why"] == "import")
            .count()
    };
    let before = imports(json(cli(url, d, &["history", "--json"])));
    let mut named = wmvae::vae::weights::read_file(&foreign).unwrap();
    named.retain(|(n, _)| n != "decoder.deconv4.bias");
    let bad = d.join("bad.safetensors");
    std::fs::write(&bad, wmvae::vae::weights::to_safetensors_bytes(&named).unwrap()).unwrap();
    let out = cli(url, d, &["import", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("decoder.deconv4.bias"));
    assert_eq!(
        imports(json(cli(url, d, &["history", "--json"]))),
        before,
        "a bad import changed the history"
    );

    // An import naming a published version's weights: refused, nothing deleted.
    let reply = client
        .request(
            "wm.ctl.checkpoints.import",
            br#"{"object": "vae/v2.safetensors"}"#.as_slice().into(),
        )
        .await
        .unwrap();
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    assert_eq!(code.as_deref(), Some("400"), "{:?}", reply.headers);
    let bucket = js.get_object_store("wm-checkpoints").await.unwrap();
    assert!(
        bucket.get("vae/v2.safetensors").await.is_ok(),
        "a refused import deleted a published version's weights"
    );
    assert_eq!(imports(json(cli(url, d, &["history", "--json"]))), before);
    assert!(daemon.terminate().success());
}

/// Offline: the same commands on the store; a rollback made offline is
/// picked up and announced when the daemon starts, and training goes on
/// from it. With the store locked and no daemon, one clear line says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_commands_and_pickup_at_start() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), FAST);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    publish(&js, 0, 6, 25).await;
    wait_until(Duration::from_secs(120), "version 3", || async {
        created(&js).await.len() >= 3
    })
    .await;
    assert!(daemon.terminate().success());
    let d = dir.path();
    let url = nats.url.as_str();

    let rows = json(cli(url, d, &["list", "--json", "--offline"]));
    let newest = rows.as_array().unwrap().last().unwrap()["version"].as_u64().unwrap();
    assert_eq!(cli(url, d, &["show", "999", "--offline"]).status.code(), Some(2));
    ok(cli(url, d, &["pin", "1", "--offline"]));
    let recon = d.join("recon.png");
    ok(cli(
        url,
        d,
        &["show", "2", "--offline", "--recon", recon.to_str().unwrap()],
    ));
    assert!(std::fs::read(&recon).unwrap().starts_with(b"\x89PNG"));
    ok(cli(url, d, &["unpin", "1", "--offline"]));
    assert!(json(cli(url, d, &["list", "--json", "--offline"]))
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["pinned"] == false));
    // Export offline equals what the daemon published for that version.
    let exported = d.join("v3.safetensors");
    ok(cli(
        url,
        d,
        &["export", "3", "--offline", "--out", exported.to_str().unwrap()],
    ));
    let bucket = js.get_object_store("wm-checkpoints").await.unwrap();
    let mut object = bucket.get("vae/v3.safetensors").await.unwrap();
    let mut published = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut object, &mut published)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&exported).unwrap(), published);
    // Import offline: a new version, active, encoding like the file.
    let foreign = d.join("torch.safetensors");
    torch_reference(&["save-weights", "--out", foreign.to_str().unwrap(), "--seed", "9"]);
    let imported = ok(cli(url, d, &["import", foreign.to_str().unwrap(), "--offline"]));
    let imported: u64 = imported
        .split(" as v")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(imported, newest + 1);
    let frames_path = d.join("f.npy");
    wmvae::frames::npy::write_frames(&frames_path, &frames(2, 64, 64), 64, 64).unwrap();
    let from_file = encode_mu(
        &["--weights", foreign.to_str().unwrap()],
        &frames_path,
        &d.join("a.npz"),
        url,
        d,
    );
    let from_version = encode_mu(
        &["--checkpoint", &imported.to_string(), "--offline"],
        &frames_path,
        &d.join("b.npz"),
        url,
        d,
    );
    assert!(max_diff(&from_file, &from_version) < 1e-6);
    // Delete offline: not the active one; another one goes.
    assert_eq!(
        cli(url, d, &["delete", &imported.to_string(), "--offline"])
            .status
            .code(),
        Some(1)
    );
    ok(cli(url, d, &["delete", "3", "--offline"]));
    assert_eq!(cli(url, d, &["show", "3", "--offline"]).status.code(), Some(2));
    ok(cli(url, d, &["rollback", "2", "--offline", "--reason", "offline fix"]));
    assert_eq!(cli(url, d, &["rollback", "77", "--offline"]).status.code(), Some(2));
    // Through the default mode too: no daemon answers, so the store is used.
    let history = json(cli(url, d, &["history", "--json"]));
    assert_eq!(history.as_array().unwrap().last().unwrap()["to"], 2);

    // Store held, daemon unreachable: one clear line.
    {
        let _held = wmvae::store::Store::open(
            &d.join("store"),
            wmvae::store::BufferConfig {
                capacity: 10,
                validation_fraction: 0.0,
            },
        )
        .unwrap();
        let out = cli("nats://127.0.0.1:1", d, &["list"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr.contains("locked") && stderr.contains("no daemon"), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }

    // The daemon starts: it publishes the offline import, announces the
    // offline rollback, and trains on from v2. It deletes no object: start-up
    // only adds what the bucket lacks (the bucket may hold another node's).
    let daemon = Daemon::start(&nats.url, d, FAST);
    publish(&js, 50, 2, 25).await;
    wait_until(
        Duration::from_secs(120),
        "the offline changes announced and a trained version",
        || async {
            let a = announcements(&js).await;
            a.iter().any(|a| a.event == CheckpointEvent::Rollback)
                && a.iter()
                    .any(|a| a.event == CheckpointEvent::Created && a.metadata.version > imported)
        },
    )
    .await;
    let events = announcements(&js).await;
    let rollback = events.iter().find(|a| a.event == CheckpointEvent::Rollback).unwrap();
    assert_eq!(
        (rollback.to, rollback.reason.as_deref()),
        (Some(2), Some("offline fix"))
    );
    assert!(!events
        .iter()
        .any(|a| a.event == CheckpointEvent::Deleted && a.metadata.version == 3));
    assert!(events
        .iter()
        .any(|a| a.event == CheckpointEvent::Created && a.metadata.version == imported));
    assert!(
        bucket.get("vae/v3.safetensors").await.is_ok(),
        "start-up deletes no object"
    );
    let next = events
        .iter()
        .find(|a| a.event == CheckpointEvent::Created && a.metadata.version > imported)
        .unwrap();
    assert_eq!(next.metadata.parent, Some(2));
    assert!(daemon.terminate().success());
}

/// Writes `n` history entries (rollbacks v1 -> v1, reason "r<i>") into the
/// store of a stopped daemon after the ones it holds, all announced, as a
/// store that made a checkpoint every few minutes for months would hold.
fn a_long_history(store_dir: &Path, n: u64) {
    let db = sled::open(store_dir.join("sled")).unwrap();
    let tree = db.open_tree("checkpoints").unwrap();
    let counter = |name: &str| {
        tree.get(format!("M{name}"))
            .unwrap()
            .map_or(0, |v| u64::from_be_bytes(v.as_ref().try_into().unwrap()))
    };
    let first = counter("history_next");
    let mut batch = sled::Batch::default();
    for i in 0..n {
        let entry = wmvae::store::HistoryEntry {
            at: "2026-12-07T00:00:00Z".into(),
            from: Some(1),
            to: 1,
            why: wmvae::store::Change::Rollback,
            by: "ops@host".into(),
            reason: Some(format!("r{i}")),
        };
        batch.insert(
            [&b"H"[..], &(first + i).to_be_bytes()].concat(),
            rmp_serde::to_vec_named(&entry).unwrap(),
        );
    }
    batch.insert("Mhistory_next", &(first + n).to_be_bytes());
    batch.insert("Mhistory_announced", &(first + n).to_be_bytes());
    tree.apply_batch(batch).unwrap();
    db.flush().unwrap();
}

/// The daemon's `checkpoints.history` reply to `body`, once it serves the
/// endpoint (a daemon starting has none yet).
async fn history_request(client: &async_nats::Client, body: &str) -> bytes::Bytes {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match client
            .request("wm.ctl.checkpoints.history", body.to_string().into())
            .await
        {
            Ok(reply)
                if reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error"))
                    .is_none() =>
            {
                return reply.payload
            }
            other => assert!(
                std::time::Instant::now() < deadline,
                "no history from the daemon: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The "r<i>" reasons of history entries, as numbers, in order.
fn numbered(history: &serde_json::Value) -> Vec<u64> {
    history
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["reason"].as_str()?.strip_prefix('r')?.parse().ok())
        .collect()
}

/// Issue #24: a history of thousands of entries. `checkpoints.history`
/// answers the request of older clients (empty) with the newest page as a
/// bare list, far under NATS's 1 MB; a request with `limit` gets a page
/// saying whether more are kept and where the next one begins;
/// `checkpoint history --json` pages through all of it, live and offline.
/// The daemon prunes entries past `[train] keep_history` at its next
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_history_is_paged_and_pruned() {
    const ENTRIES: u64 = 6000;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (url, d) = (nats.url.as_str(), dir.path());
    let daemon = Daemon::start(url, d, FAST);
    let js = jetstream::new(nats.client().await);
    wait_until(Duration::from_secs(120), "version 1", || async {
        created(&js).await.contains(&1)
    })
    .await;
    assert!(daemon.terminate().success());
    a_long_history(&d.join("store"), ENTRIES);

    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([("WMVAE_TRAIN__KEEP_HISTORY", "1000")])
        .collect();
    let daemon = Daemon::start(url, d, &env);
    let client = nats.client().await;
    let legacy = history_request(&client, "").await;
    assert!(legacy.len() < 256 << 10, "{} bytes", legacy.len());
    let legacy: serde_json::Value = serde_json::from_slice(&legacy).unwrap();
    assert_eq!(
        numbered(&legacy),
        (ENTRIES - 500..ENTRIES).collect::<Vec<_>>(),
        "the newest 500, oldest first"
    );
    let page: serde_json::Value = serde_json::from_slice(&history_request(&client, r#"{"limit": 100}"#).await).unwrap();
    assert_eq!(
        (numbered(&page["entries"]).len(), &page["more"]),
        (100, &serde_json::Value::Bool(true))
    );
    let before = page["next_before"].as_u64().unwrap();
    let older: serde_json::Value =
        serde_json::from_slice(&history_request(&client, &format!(r#"{{"before": {before}, "limit": 100}}"#)).await)
            .unwrap();
    assert_eq!(
        numbered(&older["entries"]),
        (ENTRIES - 200..ENTRIES - 100).collect::<Vec<_>>()
    );
    let all = json(cli(url, d, &["history", "--json", "--online"]));
    assert_eq!(
        numbered(&all),
        (0..ENTRIES).collect::<Vec<_>>(),
        "every entry, in order"
    );
    assert_eq!(all.as_array().unwrap().first().unwrap()["why"], "initial");

    // A checkpoint prunes the history to the newest 1000.
    publish(&js, 0, 6, 25).await;
    wait_until(Duration::from_secs(120), "version 2", || async {
        created(&js).await.contains(&2)
    })
    .await;
    wait_until(Duration::from_secs(60), "the history pruned", || async {
        json(cli(url, d, &["history", "--json", "--online"]))
            .as_array()
            .unwrap()
            .len()
            <= 1000
    })
    .await;
    assert!(daemon.terminate().success());
    let kept = json(cli(url, d, &["history", "--json", "--offline"]));
    let kept_rows = kept.as_array().unwrap();
    assert!(kept_rows.len() <= 1000 && kept_rows.len() > 990, "{}", kept_rows.len());
    assert!(kept_rows.last().unwrap()["why"] == "trained" && numbered(&kept).windows(2).all(|w| w[1] == w[0] + 1));
}
