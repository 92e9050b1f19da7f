//! The daemon crashed at injected points (the `failpoints` feature: cargo
//! runs this file only with it, as `scripts/test` does). Aborted, as a
//! SIGKILL would, between a batch's group commit and its acks, between
//! latents stored in WM_LATENTS and their frames' acks, and between a
//! version written to the store and its upload and announcement; each next
//! start picks up from there: every acked frame stored once, one latent per
//! frame, versions only grow and every stored one is announced, and the
//! last daemon exits 0 on SIGTERM. A role thread that panics ends the
//! daemon non-zero, saying so with the panic's message. An import is
//! answered only once its version is published.

mod common;

use async_nats::jetstream;
use common::nats::{announcements, publish_stored, stream_messages, Daemon, NatsServer};
use common::FAST;
use std::collections::HashSet;
use std::time::Duration;
use wmvae::bus::messages::CheckpointEvent;
use wmvae::store::{BufferConfig, Store};

/// The crash points, in the order the rounds hit them (names as in the code's `crash_point!`).
const CRASH_POINTS: [&str; 3] = ["ingest-before-ack", "encoder-before-ack", "checkpoint-before-announce"];
/// Frames published in each round (enough to train past a checkpoint).
const FRAMES_PER_ROUND: u64 = 100;
/// SIGABRT: what `crash_point!` ends the process with.
const SIGABRT: i32 = 6;

fn env(failpoints: Option<&str>) -> Vec<(&str, &str)> {
    let node = [("WMVAE_NODE__LEASE_TTL_SECS", "3")];
    FAST.iter()
        .copied()
        .chain(node)
        .chain(failpoints.map(|f| ("FAILPOINTS", f)))
        .collect()
}

fn open_store(dir: &std::path::Path) -> Store {
    Store::open(
        &dir.join("store"),
        BufferConfig {
            capacity: 1_000_000,
            validation_fraction: 0.3,
        },
    )
    .unwrap()
}

async fn created(js: &jetstream::Context) -> Vec<u64> {
    announcements(js)
        .await
        .iter()
        .filter(|a| a.event == CheckpointEvent::Created)
        .map(|a| a.metadata.version)
        .collect()
}

/// Frames still to be acked by `consumer` (pending or delivered, unacked).
async fn unsettled(js: &jetstream::Context, consumer: &str) -> Option<u64> {
    let stream = js.get_stream("WM_FRAMES").await.ok()?;
    let info = stream
        .get_consumer::<jetstream::consumer::pull::Config>(consumer)
        .await
        .ok()?
        .info()
        .await
        .ok()?
        .clone();
    Some(info.num_pending + info.num_ack_pending as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_at_each_point_the_next_start_loses_and_repeats_nothing() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    for (round, point) in CRASH_POINTS.iter().enumerate() {
        let failpoints = format!("{point}=return");
        let mut daemon = Daemon::start(&nats.url, dir.path(), &env(Some(&failpoints)));
        let from = round as u64 * FRAMES_PER_ROUND;
        publish_stored(&js, from, from + FRAMES_PER_ROUND).await;
        let status = daemon.wait(Duration::from_secs(180));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(SIGABRT),
            "{point}: {status}: {}",
            daemon.logs()
        );
    }
    // The last crash left a version in the store that NATS never heard of.
    let unannounced = open_store(dir.path())
        .registry()
        .list()
        .unwrap()
        .last()
        .unwrap()
        .version;
    assert!(!created(&js).await.contains(&unannounced));

    let total = CRASH_POINTS.len() as u64 * FRAMES_PER_ROUND;
    let daemon = Daemon::start(&nats.url, dir.path(), &env(None));
    daemon
        .wait_until(
            Duration::from_secs(180),
            "every frame stored and encoded, and a version trained after the crashes",
            || async {
                let settled =
                    unsettled(&js, "wmvae-ingest").await == Some(0) && unsettled(&js, "wmvae-encode").await == Some(0);
                settled && created(&js).await.iter().any(|v| *v > unannounced)
            },
        )
        .await;
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");

    let store = open_store(dir.path());
    assert_eq!(store.stats().unwrap().frames_ingested, total, "{logs}");
    let steps: HashSet<u64> = store.frames_in_order(None, false).map(|f| f.unwrap().step).collect();
    assert_eq!(steps.len() as u64, total);
    // One latent per frame: the frames redelivered after the encoder's crash
    // were encoded again, and JetStream kept one.
    let latents = stream_messages(&js, "WM_LATENTS").await;
    let ids: HashSet<String> = latents
        .iter()
        .filter_map(|m| m.headers.get("Nats-Msg-Id").map(|id| id.to_string()))
        .collect();
    assert_eq!((latents.len() as u64, ids.len() as u64), (total, total), "{logs}");
    // Versions only grew, and every one the store holds was announced.
    let versions = created(&js).await;
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions announced out of order: {versions:?}"
    );
    for metadata in store.registry().list().unwrap() {
        assert!(
            versions.contains(&metadata.version),
            "v{} is in the store but was never announced ({versions:?}): {logs}",
            metadata.version
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_thread_that_panics_ends_the_daemon_saying_why() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let mut daemon = Daemon::start(&nats.url, dir.path(), &env(Some("trainer-after-step=panic")));
    publish_stored(&js, 0, FRAMES_PER_ROUND).await;
    let status = daemon.wait(Duration::from_secs(180));
    let logs = daemon.logs();
    assert!(!status.success() && status.code().is_some(), "{status}: {logs}");
    assert!(
        logs.contains("the trainer thread panicked: failpoint trainer-after-step panic"),
        "{logs}"
    );
}

/// A frame that fails every time it is delivered (here: one no encoder can
/// encode) leaves the consumer after `max_deliver` deliveries: it is copied
/// to WM_DLQ with the reason `undeliverable` and its last error, and every
/// frame after it gets its latent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_keeps_failing_is_dead_lettered_and_the_consumer_moves_on() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let mut env = env(Some("encoder-poison=return(poison)"));
    env.push(("WMVAE_INGEST__MAX_DELIVER", "3"));
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    common::nats::wait_for_consumer(&js, "wmvae-encode").await;
    let poison = wmvae::frames::wire::FrameMessage::rgb("poison", 0, 64, 64, common::frames(1, 64, 64)).to_msgpack();
    js.publish("wm.frames.car", poison.clone().into())
        .await
        .unwrap()
        .await
        .unwrap();
    daemon
        .wait_until(
            Duration::from_secs(120),
            "the poison frame dead-lettered as undeliverable",
            || async { stream_messages(&js, "WM_DLQ").await.iter().any(|m| m.payload == poison) },
        )
        .await;
    let letter = stream_messages(&js, "WM_DLQ")
        .await
        .into_iter()
        .find(|m| m.payload == poison)
        .unwrap();
    let reason = letter
        .headers
        .get("Wmvae-Reason")
        .map(|v| v.to_string())
        .unwrap_or_default();
    assert!(
        reason.starts_with("undeliverable: delivered 3 times on wmvae-encode"),
        "{reason}"
    );
    assert!(
        reason.contains("failpoint encoder-poison"),
        "the last error is in the letter: {reason}"
    );

    publish_stored(&js, 0, 20).await;
    daemon
        .wait_until(
            Duration::from_secs(120),
            "a latent for each frame after the poison one",
            || async { stream_messages(&js, "WM_LATENTS").await.len() == 20 },
        )
        .await;
    assert_eq!(unsettled(&js, "wmvae-encode").await, Some(0), "the consumer moved on");
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");
}

/// Every part runs under one supervisor: a panic in an async task (ingest's
/// commit stage, the encoder's latent publisher) or in a sampler thread ends
/// the daemon non-zero, saying which part and why (a worker that died once
/// went unnoticed: the process stayed up, /healthz said 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_or_sampler_that_panics_ends_the_daemon_saying_which() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    let cases = [
        (
            "ingest-before-ack=panic",
            "ingest: the ingest panicked: failpoint ingest-before-ack panic",
        ),
        (
            "encoder-before-ack=panic",
            "encoder's latent publisher: the encoder's latent publisher panicked: failpoint encoder-before-ack panic",
        ),
        (
            "sampler-draw=panic",
            "sampler 0: the sampler 0 panicked: failpoint sampler-draw panic",
        ),
    ];
    for (round, (failpoint, says)) in cases.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut daemon = Daemon::start(&nats.url, dir.path(), &env(Some(failpoint)));
        let from = round as u64 * FRAMES_PER_ROUND;
        publish_stored(&js, from, from + FRAMES_PER_ROUND).await;
        let status = daemon.wait(Duration::from_secs(180));
        let logs = daemon.logs();
        assert!(
            !status.success() && status.code().is_some(),
            "{failpoint}: {status}: {logs}"
        );
        assert!(logs.contains(says), "{failpoint}: {logs}");
    }
}

/// /healthz follows each role's heartbeat: an idle daemon keeps beating
/// (200 long past the configured age), a trainer loop stuck in one step
/// shows within it (503, saying which loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_a_loop_stops_going_round() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    let port = common::free_port().to_string();
    let addr = format!("127.0.0.1:{port}");
    let port: u16 = port.parse().unwrap();
    let mut env = env(Some("trainer-after-step=sleep(600000)"));
    env.extend([
        ("WMVAE_HTTP__ADDR", addr.as_str()),
        ("WMVAE_SERVE__HEARTBEAT_MAX_AGE_SECS", "5"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    daemon
        .wait_until(Duration::from_secs(60), "/healthz to answer", || async {
            common::http_get(port, "/healthz").0 == 200
        })
        .await;
    // Idle (no frames, so no step to stall in) for twice the age: still healthy.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (code, body) = common::http_get(port, "/healthz");
    assert_eq!(code, 200, "idle loops beat: {body}");
    // Frames: the first step sleeps in the failpoint, and the loop stops going round.
    publish_stored(&js, 0, FRAMES_PER_ROUND).await;
    daemon
        .wait_unhealthy(port, "the trainer loop has not gone round", Duration::from_secs(120))
        .await;
}

/// The value of the series `name` in the daemon's /metrics (0 before it is there).
fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = common::http_get(port, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Issue #24: the store's disk has room for frames (and the daemon's 1 MiB
/// write probe) but not for a checkpoint (the `store-write` failpoint says
/// 40 MB are free; a ~51 MB checkpoint needs ~170 MB in sled). Each
/// checkpoint is then an error with its reason, counted
/// (`wmvae_checkpoint_write_errors_total`, the status's
/// `checkpoint_error`), while every frame is stored and training goes on
/// from memory: no reopen of the store, no resume from the old active
/// version. With room again, the next checkpoint is written, numbered
/// next after the last one written (a refused one's number is given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_without_room_is_an_error_while_ingest_and_training_go_on() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let flag = dir.path().join("disk-full");
    let failpoint = format!("store-write=return({})", flag.display());
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let daemon_env: Vec<(&str, &str)> = env(Some(&failpoint))
        .into_iter()
        .chain([("WMVAE_HTTP__ADDR", addr.as_str())])
        .collect();
    let daemon = Daemon::start(&nats.url, &dir.path().join("daemon"), &daemon_env);
    common::nats::wait_for_ingest_consumer(&js).await;
    publish_stored(&js, 0, FRAMES_PER_ROUND).await;
    daemon
        .wait_until(Duration::from_secs(180), "version 2", || async {
            created(&js).await.contains(&2)
        })
        .await;

    std::fs::write(&flag, "40000000").unwrap();
    publish_stored(&js, FRAMES_PER_ROUND, 2 * FRAMES_PER_ROUND).await;
    daemon
        .wait_until(
            Duration::from_secs(180),
            "two checkpoints refused and every frame stored",
            || async {
                metric(port, "wmvae_checkpoint_write_errors_total") >= 2.0
                    && unsettled(&js, "wmvae-ingest").await == Some(0)
            },
        )
        .await;
    let before = *created(&js).await.iter().max().unwrap();
    let status: serde_json::Value = serde_json::from_slice(
        &nats
            .client()
            .await
            .request("wm.ctl.status", "".into())
            .await
            .unwrap()
            .payload,
    )
    .unwrap();
    let error = status["checkpoint_error"].as_str().unwrap_or_default();
    assert!(error.contains("no room on the store's disk for checkpoint"), "{status}");
    assert!(status["checkpoint_write_errors"].as_u64() >= Some(2), "{status}");
    assert_eq!(
        common::http_get(port, "/healthz").0,
        200,
        "frames still go in: {}",
        daemon.logs()
    );
    // No version written once the first was refused (one the trainer wrote
    // just before the flag may still be announced meanwhile: the trainer's
    // own log lines are in order).
    let logs = daemon.logs();
    let refused_from = logs.find("not written (no room on the store's disk").unwrap();
    assert!(
        !logs[refused_from..].contains("checkpoint version="),
        "a version while the disk has no room: {logs}"
    );

    std::fs::remove_file(&flag).unwrap();
    daemon
        .wait_until(Duration::from_secs(180), "a version once there is room", || async {
            created(&js).await.iter().any(|v| *v > before)
        })
        .await;
    let logs = daemon.logs();
    // The refused checkpoints' numbers were given back, not burned: the versions go on in a row.
    let mut after: Vec<u64> = created(&js).await.into_iter().filter(|v| *v > before).collect();
    after.sort_unstable();
    assert_eq!(
        after,
        (before + 1..before + 1 + after.len() as u64).collect::<Vec<_>>(),
        "{logs}"
    );
    assert!(daemon.terminate().success(), "{logs}");
    assert!(
        logs.contains("not written (no room on the store's disk") && logs.contains("training goes on from memory"),
        "{logs}"
    );
    assert!(
        !logs.contains("reopening the store") && logs.matches("replay buffer open").count() == 1,
        "the store was reopened: {logs}"
    );
    assert!(
        !logs.contains("resumed from the active checkpoint"),
        "training resumed from the old active version: {logs}"
    );
    let store = open_store(&dir.path().join("daemon"));
    assert_eq!(store.stats().unwrap().frames_ingested, 2 * FRAMES_PER_ROUND, "{logs}");
    let newest = store.registry().list().unwrap().last().unwrap().clone();
    assert!(
        newest.version > before && newest.step >= 30,
        "v{} at step {}: training went on meanwhile",
        newest.version,
        newest.step
    );
}

/// A group commit fails while the disk takes writes (the `store-commit`
/// failpoint, once), as when sled keeps a write error: the daemon stops its
/// parts, reopens the store in the same process and goes on; the batch
/// comes back from JetStream, every frame is stored once, and the daemon
/// exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_error_the_store_keeps_reopens_it_in_process() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let js = jetstream::new(nats.client().await);
    let daemon = Daemon::start(&nats.url, dir.path(), &env(Some("store-commit=1*return")));
    common::nats::wait_for_ingest_consumer(&js).await;
    publish_stored(&js, 0, FRAMES_PER_ROUND).await;
    daemon
        .wait_until(
            Duration::from_secs(180),
            "the store reopened and every frame acked",
            || async {
                daemon.logs().matches("replay buffer open").count() == 2
                    && unsettled(&js, "wmvae-ingest").await == Some(0)
            },
        )
        .await;
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");
    assert!(
        logs.contains("the store-commit failpoint") && logs.contains("reopening the store"),
        "{logs}"
    );
    let store = open_store(dir.path());
    assert_eq!(store.stats().unwrap().frames_ingested, FRAMES_PER_ROUND, "{logs}");
}

/// An import through the running daemon is answered once the new version
/// is published (the `publish-created` failpoint makes every upload take 3 s
/// more): the export that follows at once finds it in the object store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_is_answered_once_its_version_is_published() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &env(Some("publish-created=sleep(3000)")));
    daemon.wait_for_log("leading training", Duration::from_secs(120)).await;
    let weights = dir.path().join("torch.safetensors");
    common::torch_reference(&["save-weights", "--out", weights.to_str().unwrap(), "--seed", "5"]);
    let checkpoint = |args: &[&str]| {
        let out = common::wmvae()
            .arg("checkpoint")
            .args(args)
            .args(["--nats-url", &nats.url, "--data-dir"])
            .arg(dir.path().join("store"))
            .env("WMVAE_TRAIN__DEVICE", "cpu")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{args:?}: {stderr}\n{}", daemon.logs());
        String::from_utf8(out.stdout).unwrap()
    };
    let imported = checkpoint(&["import", weights.to_str().unwrap()]);
    let version = imported
        .split(" as v")
        .nth(1)
        .and_then(|v| v.split(' ').next())
        .unwrap();
    // Export checks the object's sha256 against the version's.
    let out = dir.path().join("out.safetensors");
    checkpoint(&["export", version, "--out", out.to_str().unwrap()]);
    assert!(std::fs::metadata(&out).unwrap().len() > 0);
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");
}

/// A daemon on a 300 MB tmpfs whose write of version 1 is held just after
/// its claim on its room (the `store-claimed` failpoint) while another
/// program fills the disk, leaving `leave_mb` MB free, then let go; None
/// where mounting a tmpfs is not allowed.
struct FilledUnderAWrite {
    nats: NatsServer,
    scratch: tempfile::TempDir,
    disk: common::disk::FullDisk,
    port: u16,
    daemon: Daemon,
}

impl FilledUnderAWrite {
    async fn start(leave_mb: u64) -> Option<FilledUnderAWrite> {
        let nats = NatsServer::start();
        let scratch = tempfile::tempdir().unwrap();
        let data = scratch.path().join("daemon");
        let Some(disk) = common::disk::FullDisk::new("tmpfs", scratch.path(), &data, "300m") else {
            eprintln!("SKIPPED: mounting a tmpfs needs root");
            return None;
        };
        let hold = scratch.path().join("hold");
        std::fs::write(&hold, "").unwrap();
        let port = common::free_port();
        let failpoints = format!("store-claimed=return({})", hold.display());
        let daemon = FilledUnderAWrite::daemon(&nats.url, &data, port, Some(&failpoints));
        let reached = scratch.path().join("hold.reached");
        common::nats::wait_until(
            Duration::from_secs(60),
            "version 1's write held after its claim",
            || async { reached.exists() },
        )
        .await;
        disk.fill_leaving(leave_mb << 20);
        std::fs::remove_file(&hold).unwrap();
        Some(FilledUnderAWrite {
            nats,
            scratch,
            disk,
            port,
            daemon,
        })
    }

    /// A daemon serving HTTP on `port`, not training, whose store writes time out after 15 s.
    fn daemon(nats_url: &str, data: &std::path::Path, port: u16, failpoints: Option<&str>) -> Daemon {
        let addr = format!("127.0.0.1:{port}");
        let env: Vec<(&str, &str)> = [
            ("WMVAE_HTTP__ADDR", addr.as_str()),
            ("WMVAE_TRAIN__MIN_FRAMES", "1000000"),
            ("WMVAE_STORE__WRITE_TIMEOUT_SECS", "15"),
        ]
        .into_iter()
        .chain(failpoints.map(|f| ("FAILPOINTS", f)))
        .collect();
        Daemon::start(nats_url, data, &env)
    }

    /// Until the daemon leads with /healthz 200, having reopened its store.
    async fn wait_recovered(&self, daemon: &Daemon, opened: usize) {
        daemon
            .wait_until(
                Duration::from_secs(120),
                "the store reopened, the node leading and /healthz 200",
                || async {
                    let logs = daemon.logs();
                    logs.matches("replay buffer open").count() >= opened
                        && logs.contains("leading training")
                        && common::http_get(self.port, "/healthz").0 == 200
                },
            )
            .await;
    }
}

/// Another program fills the store's disk between a checkpoint's claim on
/// its room and its write: sled meets the full disk and keeps the write
/// error. The takeover fails; /healthz says the store can't write; once the
/// disk is freed the daemon reopens the store in-process, leads, /healthz is
/// 200 again, and SIGTERM ends it with 0. Before, the takeover tried again
/// for ever against sled's kept error while /healthz said ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_under_a_claimed_write_is_reported_then_recovered_from() {
    let Some(held) = FilledUnderAWrite::start(0).await else {
        return;
    };
    let port = held.port;
    held.daemon
        .wait_unhealthy(port, "the store can't write", Duration::from_secs(60))
        .await;
    held.disk.free();
    held.wait_recovered(&held.daemon, 2).await;
    let logs = held.daemon.logs();
    assert!(held.daemon.terminate().success(), "{logs}");
    assert!(logs.contains("reopening the store"), "{logs}");
}

/// The same with room for part of the write (60 MB): sled fails it half
/// way, and a later write, once the disk is freed, can wait for ever inside
/// sled. The daemon recovers in-process or, past `[store]
/// write_timeout_secs` of a write in flight, exits non-zero saying so; a
/// new daemon on the same store then leads with /healthz 200. Before, the
/// daemon waited for ever holding the write's room claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sled_leaves_waiting_ends_the_daemon_and_a_restart_recovers() {
    let Some(mut held) = FilledUnderAWrite::start(60).await else {
        return;
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    held.disk.free();
    let port = held.port;
    let mut exited = None;
    common::nats::wait_until(Duration::from_secs(120), "the daemon leading again, or exiting", || {
        exited = held.daemon.try_status();
        let recovered = exited.is_none()
            && held.daemon.logs().contains("leading training")
            && common::http_get(port, "/healthz").0 == 200;
        async move { recovered || exited.is_some() }
    })
    .await;
    let logs = held.daemon.logs();
    let Some(status) = exited else {
        eprintln!("the daemon recovered in-process");
        assert!(held.daemon.terminate().success(), "{logs}");
        return;
    };
    assert!(!status.success(), "{logs}");
    assert!(logs.contains("a store write has not returned for"), "{logs}");
    let data = held.scratch.path().join("daemon");
    let again = FilledUnderAWrite::daemon(&held.nats.url, &data, port, None);
    held.wait_recovered(&again, 1).await;
    let logs = again.logs();
    assert!(again.terminate().success(), "{logs}");
}

/// A version its maker never announced (killed while uploading it: the
/// `publish-created` failpoint holds every upload 3 s), left stale by the
/// standby that took over and trained on, is never announced as created
/// when its maker leads again: created versions only grow. (The nemesis
/// saw `created v8` after `created v10` before the catch-up left a former
/// standby's stale versions out of the offline changes.) Versions past the
/// newest 2 are deleted, and each deletion is announced under its leader's
/// epoch (the nemesis saw epoch 0 on them before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_version_is_never_announced_when_its_maker_leads_again() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    let dir = tempfile::tempdir().unwrap();
    let trainer = |id: &'static str, failpoints: Option<&'static str>| {
        let node = [
            ("WMVAE_SERVE__ROLES", "trainer"),
            ("WMVAE_NODE__ID", id),
            ("WMVAE_TRAIN__KEEP_LAST", "2"),
        ];
        let env: Vec<(&str, &str)> = env(failpoints).into_iter().chain(node).collect();
        Daemon::start(&nats.url, &dir.path().join(id), &env)
    };
    let t1 = trainer("t1", Some("publish-created=sleep(3000)"));
    t1.wait_for_log("leading training", Duration::from_secs(120)).await;
    let t2 = trainer("t2", None);
    publish_stored(&js, 0, FRAMES_PER_ROUND).await;
    t1.wait_for_log("checkpoint version=2", Duration::from_secs(120)).await;
    t1.kill();
    assert!(
        !created(&js).await.contains(&2),
        "v2 was announced before its maker was killed"
    );

    // t2 leads from v1 and makes versions of its own, deleting the oldest.
    t2.wait_until(Duration::from_secs(120), "a deletion by t2", || async {
        announcements(&js)
            .await
            .iter()
            .any(|a| a.event == CheckpointEvent::Deleted)
    })
    .await;
    t2.kill();
    let t1 = trainer("t1", None);
    t1.wait_until(Duration::from_secs(120), "t1 to lead again", || async {
        t1.logs().matches("leading training").count() >= 2
    })
    .await;
    let versions = created(&js).await;
    assert!(
        !versions.contains(&2),
        "the stale v2 was announced: {versions:?}\n{}",
        t1.logs()
    );
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "created out of order: {versions:?}"
    );
    let unfenced: Vec<_> = announcements(&js).await.into_iter().filter(|a| a.epoch == 0).collect();
    assert!(unfenced.is_empty(), "announced under no epoch: {unfenced:?}");
    let logs = t1.logs();
    assert!(t1.terminate().success(), "{logs}");
}

/// A version whose upload stopped between its weights and its full
/// checkpoint (the `publish-envelope` failpoint fails the second) is
/// uploaded whole when its node leads again, before `active` names it, so
/// a standby catching up finds it. (The nemesis saw `active` name a
/// version whose checkpoint was never uploaded, and every takeover after
/// that fail with "vae/v101.checkpoint is not in the object store".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_uploaded_halfway_is_uploaded_whole_before_it_is_active() {
    let nats = NatsServer::start();
    let js = jetstream::new(nats.client().await);
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &env(Some("publish-envelope=return")));
    daemon
        .wait_for_log("the publish-envelope failpoint", Duration::from_secs(120))
        .await;
    daemon.kill();
    let bucket = js.get_object_store("wm-checkpoints").await.unwrap();
    assert!(bucket.get("vae/v1.safetensors").await.is_ok(), "the weights went first");
    assert!(bucket.get("vae/v1.checkpoint").await.is_err(), "the checkpoint did not");

    let daemon = Daemon::start(&nats.url, dir.path(), &env(None));
    daemon.wait_for_log("leading training", Duration::from_secs(120)).await;
    assert!(
        bucket.get("vae/v1.checkpoint").await.is_ok(),
        "v1 is active without its checkpoint in the object store:\n{}",
        daemon.logs()
    );
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");
}
