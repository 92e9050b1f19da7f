//! Hostile identities in the middle of a stream: a frame whose episode
//! holds a CR or an LF once made async-nats panic in a tokio worker when its
//! latent's `Nats-Msg-Id` was built from it, and no frame after it got a
//! latent while the daemon looked healthy; a `/` in a source or an episode
//! let two frames share one latent id, so JetStream dropped one latent as a
//! duplicate. Now: the first are dead-lettered with `bad_episode`, the others
//! each get a latent under their own id, and every valid frame after them
//! has its latent.

mod common;

use common::nats::{stream_messages, wait_for_consumer, Daemon, NatsServer};
use std::collections::HashMap;
use std::time::Duration;
use wmvae::bus::messages::LatentMessage;
use wmvae::frames::wire::FrameMessage;

/// Publishes one 64x64 frame on `wm.frames.<source>` with the plain id
/// `id` (this client is async-nats too: the hostile identity stays out of
/// its headers) and waits until JetStream stored it.
async fn publish(js: &async_nats::jetstream::Context, source: &str, episode: &str, step: u64, id: &str) {
    let pixels = common::frames(1, 64, 64);
    let payload = FrameMessage::rgb(episode, step, 64, 64, pixels).to_msgpack();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(format!("wm.frames.{source}"), headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_frame_leaves_every_later_frame_its_latent() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), common::FAST);
    let js = async_nats::jetstream::new(nats.client().await);
    wait_for_consumer(&js, "wmvae-encode").await;

    for step in 0..20 {
        publish(&js, "car", "e", step, &format!("car/e/{step}")).await;
    }
    let hostile = [("car", "a\nb"), ("car", "\r"), ("car", "x\0y")];
    for (i, (source, episode)) in hostile.iter().enumerate() {
        publish(&js, source, episode, 20, &format!("hostile-{i}")).await;
    }
    // Frames whose ids joined their parts with `/` unescaped would collide.
    let odd = [("s.a", "b/1"), ("s", "a/1"), ("s/a", "1"), ("s", "x y%z")];
    for (i, (source, episode)) in odd.iter().enumerate() {
        publish(&js, source, episode, 5, &format!("odd-{i}")).await;
    }
    for step in 20..120 {
        publish(&js, "car", "e", step, &format!("car/e/{step}")).await;
    }

    let expected = 120 + odd.len();
    daemon
        .wait_until(Duration::from_secs(180), "a latent for every valid frame", || async {
            stream_messages(&js, "WM_LATENTS").await.len() >= expected
        })
        .await;
    let latents = stream_messages(&js, "WM_LATENTS").await;
    let mut by_id = HashMap::new();
    for message in &latents {
        let latent: LatentMessage = rmp_serde::from_slice(&message.payload).unwrap();
        let id = message.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap();
        assert!(
            by_id
                .insert(
                    id.clone(),
                    (message.subject.to_string(), latent.episode.clone(), latent.step)
                )
                .is_none(),
            "two latents under {id}"
        );
    }
    for step in 0..120 {
        assert_eq!(
            by_id.get(&format!("car/e/{step}")).map(|l| l.2),
            Some(step),
            "frame car/e/{step} has no latent"
        );
    }
    for (source, episode) in odd {
        let id = wmvae::frames::identity::message_id(source, episode, 5);
        let (subject, got_episode, _) = by_id
            .get(&id)
            .unwrap_or_else(|| panic!("({source}, {episode}) has no latent under {id}"));
        assert_eq!(
            (subject.as_str(), got_episode.as_str()),
            (format!("wm.latents.{source}").as_str(), episode)
        );
    }
    assert_eq!(latents.len(), expected, "a latent for each valid frame, no more");

    let letters = stream_messages(&js, "WM_DLQ").await;
    let reasons: Vec<String> = letters
        .iter()
        .filter_map(|m| m.headers.get("Wmvae-Reason").map(|v| v.to_string()))
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| r.starts_with("bad_episode: episode holds the control character"))
            .count(),
        hostile.len(),
        "letters: {reasons:?}"
    );
    assert!(daemon.terminate().success());
}

/// An object whose metadata claims an enormous size (anyone who may write
/// to the bucket can forge one) once made a reader reserve that much memory
/// up front, and the allocation failure aborted the process. Now the claim
/// is refused against a cap before anything is allocated: an encoder told to
/// load such weights says why, keeps running, and stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_claiming_a_huge_size_is_refused_before_allocating() {
    use base64::Engine as _;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut env = common::FAST.to_vec();
    env.push(("WMVAE_SERVE__ROLES", "encoder"));
    let mut daemon = Daemon::start(&nats.url, dir.path(), &env);
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    common::nats::wait_until(Duration::from_secs(60), "the daemon's migrations", || async {
        js.get_object_store("wm-checkpoints").await.is_ok()
    })
    .await;
    // The object store's own metadata record, forged: one chunk, 2^62 bytes.
    let name = "vae/v99.safetensors";
    let info = serde_json::json!({
        "name": name, "bucket": "wm-checkpoints", "nuid": "FORGEDNUID000000000001", "size": 1u64 << 62, "chunks": 1,
        "mtime": "2026-12-07T00:00:00Z", "digest": "SHA-256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", "deleted": false
    });
    let subject = format!(
        "$O.wm-checkpoints.M.{}",
        base64::engine::general_purpose::URL_SAFE.encode(name)
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "sub");
    js.publish_with_headers(subject, headers, serde_json::to_vec(&info).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    common::nats::wait_until(Duration::from_secs(60), "the daemon's migrations", || async {
        js.get_key_value("wm-meta").await.is_ok()
    })
    .await;
    let kv = js.get_key_value("wm-meta").await.unwrap();
    kv.put(
        "active",
        serde_json::to_vec(&serde_json::json!({"version": 99, "sha256": "00", "epoch": 1}))
            .unwrap()
            .into(),
    )
    .await
    .unwrap();
    daemon
        .wait_until(
            Duration::from_secs(60),
            "the encoder refusing the forged object",
            || async { daemon.logs().contains("over the limit") },
        )
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(daemon.try_status().is_none(), "the daemon died: {}", daemon.logs());
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(60));
    assert!(status.success(), "{status}: {}", daemon.logs());
}

/// Peak resident memory of process `pid` (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A flood of ~1 MB requests to a slow endpoint once queued in the
/// daemon's memory without bound (async-nats buffers 65,536 messages per
/// subscription, and an endpoint answers one at a time). Now the control
/// connection queues a few per endpoint and drops the rest: the daemon's
/// peak memory stays bounded, and it still answers afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_control_requests_cannot_grow_memory_without_bound() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), common::FAST);
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    common::nats::publish_stored(&js, 0, 60).await;
    // Version 1 exists and the buffer holds frames to reconstruct: each recon request takes a while.
    daemon
        .wait_until(Duration::from_secs(120), "a reconstruction to be served", || async {
            client
                .request("wm.ctl.checkpoints.recon", br#"{"version": 1}"#.to_vec().into())
                .await
                .is_ok_and(|r| r.headers.is_none())
        })
        .await;
    let before = peak_rss(daemon.pid());
    // {"version": 1} padded with JSON whitespace to ~1 MB, 1,500 times: 1.5 GB.
    let mut request = br#"{"version": 1"#.to_vec();
    request.resize(1_000_000, b' ');
    request.push(b'}');
    let request = bytes::Bytes::from(request);
    for _ in 0..1500 {
        client
            .publish_with_reply("wm.ctl.checkpoints.recon", "flood.replies", request.clone())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = peak_rss(daemon.pid()).saturating_sub(before);
    assert!(
        grown < 400 << 20,
        "the daemon's peak memory grew by {} MB under the flood",
        grown >> 20
    );
    let status = client.request("wm.ctl.status", "".into()).await;
    assert!(status.is_ok(), "no status after the flood: {status:?}");
    assert!(daemon.terminate().success());
}
