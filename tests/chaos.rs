//! Faults against real processes: the nats-server SIGKILLed and restarted
//! on the same port, with its store and without it, while frames stream in
//! and the daemon trains; the store's disk full (a tmpfs, or the
//! `store-write` failpoint without root); and `wmvae bench chaos`
//! (random daemon and server kills, every kind of malformed frame).
//! After each: every acked frame stored exactly once, every version the
//! store made announced (in order, numbers only growing), the cluster's
//! active version the store's, and the daemon exits 0 on SIGTERM.

mod common;

use async_nats::jetstream;
use common::disk::FullDisk;
use common::nats::{announcements, publish_stored, wait_until, Daemon, NatsServer};
use common::{created, short_lease};
use std::collections::HashSet;
use std::time::Duration;
use wmvae::bus::kv::Active;
use wmvae::bus::messages::CheckpointEvent;
use wmvae::store::{BufferConfig, Store};

/// Frames published (and acked by JetStream) before the server is killed,
/// and again after it is back.
const FRAMES_EACH_SIDE: u64 = 150;

/// A daemon on a short lease that has taken the first side's frames and
/// announced version 2.
async fn trained() -> (NatsServer, tempfile::TempDir, Daemon) {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &short_lease());
    let js = jetstream::new(nats.client().await);
    common::nats::wait_for_ingest_consumer(&js).await;
    publish_stored(&js, 0, FRAMES_EACH_SIDE).await;
    wait_until(Duration::from_secs(120), "version 2", || async {
        created(&announcements(&js).await).contains(&2)
    })
    .await;
    (nats, dir, daemon)
}

/// The nats-server SIGKILLed mid-training for a few seconds (past the
/// lease's renewals), then restarted on its port and store: the daemon
/// reconnects and trains on; what it made while NATS was away is announced;
/// nothing acked is lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_server_killed_and_restarted_mid_training() {
    let (mut nats, dir, daemon) = trained().await;

    // Down past the lease's trust (2 s of a 3 s TTL): training stops, the lease is lost.
    nats.kill();
    wait_until(Duration::from_secs(30), "the daemon to stop leading", || async {
        daemon.logs().contains("not leading")
    })
    .await;
    nats.restart();
    let js = jetstream::new(nats.client().await);
    publish_stored(&js, FRAMES_EACH_SIDE, 2 * FRAMES_EACH_SIDE).await;
    let before = *created(&announcements(&js).await).iter().max().unwrap();
    wait_until(
        Duration::from_secs(180),
        "a version announced after the restart",
        || async { created(&announcements(&js).await).iter().any(|v| *v > before + 1) },
    )
    .await;
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");

    // Every frame acked by JetStream stored exactly once.
    let store = Store::open(
        &dir.path().join("store"),
        BufferConfig {
            capacity: 1_000_000,
            validation_fraction: 0.3,
        },
    )
    .unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(
        stats.frames_ingested,
        2 * FRAMES_EACH_SIDE,
        "frames stored: {}: {logs}",
        stats.frames_ingested
    );
    let distinct: HashSet<u64> = store.frames_in_order(None, false).map(|f| f.unwrap().step).collect();
    assert_eq!(distinct.len() as u64, 2 * FRAMES_EACH_SIDE);

    // Every version the store holds was announced, in growing order; the
    // shutdown's last one too (it had NATS).
    let all = announcements(&js).await;
    let versions = created(&all);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions announced out of order: {versions:?}"
    );
    let registry = store.registry();
    for metadata in registry.list().unwrap() {
        assert!(
            versions.contains(&metadata.version),
            "v{} is in the store but was never announced ({versions:?}): {logs}",
            metadata.version
        );
    }
    assert!(
        registry.unannounced_history().unwrap().is_empty(),
        "{:?}",
        registry.unannounced_history().unwrap()
    );
    let meta = js.get_key_value("wm-meta").await.unwrap();
    let active: Active = serde_json::from_slice(&meta.get("active").await.unwrap().unwrap()).unwrap();
    assert_eq!(
        Some(active.version),
        registry.active_version().unwrap(),
        "the cluster's active version is not the store's"
    );
}

/// The nats-server comes back without its JetStream state (a lost volume):
/// the daemon applies the migrations again, makes its consumer again, takes
/// the lease again, republishes the versions its store holds and trains on;
/// frames published to the new server are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_server_comes_back_without_its_state() {
    let (mut nats, dir, daemon) = trained().await;
    let leading = |logs: &str| logs.matches("leading training").count();
    let led_before = leading(&daemon.logs());

    nats.restart_empty();
    let js = jetstream::new(nats.client().await);
    daemon
        .wait_until(Duration::from_secs(60), "WM_FRAMES made again", || async {
            js.get_stream("WM_FRAMES").await.is_ok()
        })
        .await;
    publish_stored(&js, FRAMES_EACH_SIDE, 2 * FRAMES_EACH_SIDE).await;
    // The store's versions reach the new server when the daemon leads on it
    // (its lease is gone with the state): a version trained after the loss
    // can be announced before that (it was, once), so both are waited for.
    daemon
        .wait_until(
            Duration::from_secs(120),
            "a version trained after the state was lost, and leading on the new server",
            || async {
                leading(&daemon.logs()) > led_before && created(&announcements(&js).await).iter().any(|v| *v > 2)
            },
        )
        .await;
    let logs = daemon.logs();
    assert!(
        logs.contains("NATS reconnected: streams, buckets and consumers in place"),
        "{logs}"
    );
    assert!(daemon.terminate().success(), "{logs}");

    let store = Store::open(
        &dir.path().join("store"),
        BufferConfig {
            capacity: 1_000_000,
            validation_fraction: 0.3,
        },
    )
    .unwrap();
    assert_eq!(store.stats().unwrap().frames_ingested, 2 * FRAMES_EACH_SIDE, "{logs}");
    // The new server has every version the store holds, from the store.
    let versions = created(&announcements(&js).await);
    for metadata in store.registry().list().unwrap() {
        assert!(
            versions.contains(&metadata.version),
            "v{} is in the store but not on the new server ({versions:?}): {logs}",
            metadata.version
        );
    }
}

/// Damages, as bit rot would, the stored envelope of the store's active
/// version (a byte in its last chunk: the optimizer state) and version 1's
/// listing metadata, in the sled database of a stopped daemon's store.
/// Returns the active version.
fn damage(store_dir: &std::path::Path) -> u64 {
    let db = sled::open(store_dir.join("sled")).unwrap();
    let tree = db.open_tree("checkpoints").unwrap();
    let active = u64::from_be_bytes(tree.get(b"Mactive").unwrap().unwrap().as_ref().try_into().unwrap());
    let prefix = [&[b'V'][..], &active.to_be_bytes()].concat();
    let (chunk, bytes) = tree.scan_prefix(&prefix).last().unwrap().unwrap();
    let mut damaged = bytes.to_vec();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x5a;
    tree.insert(chunk, damaged).unwrap();
    tree.insert([&[b'D'][..], &1u64.to_be_bytes()].concat(), &b"\xc1rot"[..])
        .unwrap();
    db.flush().unwrap();
    active
}

/// The active version damaged in the store of a stopped daemon, and an
/// older version's listing: the next start repairs the active version from
/// the object store's copy and rebuilds the listing, and trains on. Damaged
/// again with the object store's copy gone, the next start rolls back to
/// the newest intact version (history: "recovery from a damaged version",
/// announced as a rollback) and trains on. Versions only grow; each daemon
/// exits 0 on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_checkpoint_is_repaired_or_rolled_back_past() {
    let (nats, dir, daemon) = trained().await;
    let js = jetstream::new(nats.client().await);
    assert!(daemon.terminate().success());
    let store_dir = dir.path().join("store");
    let open = || {
        Store::open(
            &store_dir,
            BufferConfig {
                capacity: 1_000_000,
                validation_fraction: 0.3,
            },
        )
        .unwrap()
    };

    // Repaired from the object store.
    let active = damage(&store_dir);
    let newest = *created(&announcements(&js).await).iter().max().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &short_lease());
    daemon
        .wait_until(
            Duration::from_secs(120),
            "a version trained after the repair",
            || async { created(&announcements(&js).await).iter().any(|v| *v > newest) },
        )
        .await;
    let logs = daemon.logs();
    assert!(
        logs.contains(&format!("v{active} repaired from the object store's copy"))
            && logs.contains("listing metadata was damaged; rebuilt"),
        "{logs}"
    );
    assert!(daemon.terminate().success(), "{logs}");
    let store = open();
    assert_eq!(store.registry().get(active).unwrap().unwrap().metadata.version, active);
    assert_eq!(store.registry().list().unwrap().first().map(|m| m.version), Some(1));
    drop(store);

    // No copy anywhere: rolled back past it.
    let active = damage(&store_dir);
    let objects = js.get_object_store("wm-checkpoints").await.unwrap();
    objects
        .delete(wmvae::bus::messages::checkpoint_envelope_object(active).as_str())
        .await
        .unwrap();
    let newest = *created(&announcements(&js).await).iter().max().unwrap();
    let daemon = Daemon::start(&nats.url, dir.path(), &short_lease());
    daemon
        .wait_until(
            Duration::from_secs(120),
            "a version trained after the recovery",
            || async { created(&announcements(&js).await).iter().any(|v| *v > newest) },
        )
        .await;
    let logs = daemon.logs();
    assert!(daemon.terminate().success(), "{logs}");
    let all = announcements(&js).await;
    let rollback = all
        .iter()
        .find(|a| a.event == CheckpointEvent::Rollback && a.from == Some(active))
        .unwrap_or_else(|| panic!("no rollback from v{active} announced: {logs}"));
    let versions = created(&all);
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions announced out of order: {versions:?}"
    );
    let history = open().registry().history().unwrap();
    let recovery = history
        .iter()
        .find(|h| h.why == wmvae::store::Change::Recovery)
        .unwrap();
    assert_eq!(
        (recovery.from, Some(recovery.to)),
        (Some(active), rollback.to),
        "{history:?}"
    );
    assert!(recovery.to < active);
}

/// The store's disk full while frames stream in: nothing is acked that is
/// not durable (frames are nak'ed and wait in JetStream), /healthz says 503
/// with the reason and /metrics `wmvae_store_writable 0`, the daemon stays
/// up; once space is back the frames go in, and every frame is stored
/// exactly once. The disk is a real tmpfs where one can be mounted (root),
/// else the store's `store-write` failpoint fills it (a build with
/// `--features failpoints`, as `scripts/test` makes): the store refuses a
/// write it has no room for before sled sees it, by the same check either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_frames_back_and_loses_none() {
    let mut rounds = 0;
    for kind in FullDisk::KINDS {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("daemon");
        if let Some(disk) = FullDisk::new(kind, dir.path(), &data, "256m") {
            eprintln!("the store's disk: {}", disk.kind());
            a_full_disk_round(&disk, &data).await;
            rounds += 1;
        }
    }
    if rounds == 0 {
        eprintln!(
            "SKIPPED: mounting a tmpfs needs root, and this build has no store-write failpoint (--features failpoints)"
        );
    }
}

/// [`a_full_disk_holds_frames_back_and_loses_none`] on one kind of disk,
/// for a daemon whose data directory is `data`.
async fn a_full_disk_round(disk: &FullDisk, data: &std::path::Path) {
    let nats = NatsServer::start();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    // No training: the store holds version 1 (~51 MB with Adam's state) and frames.
    let disk_env = disk.env();
    let env: Vec<(&str, &str)> = [
        ("WMVAE_HTTP__ADDR", addr.as_str()),
        ("WMVAE_TRAIN__MIN_FRAMES", "1000000"),
        ("WMVAE_TRAIN__THREADS", "1"),
    ]
    .into_iter()
    .chain(disk_env.iter().map(|(k, v)| (*k, v.as_str())))
    .collect();
    let daemon = Daemon::start(&nats.url, data, &env);
    let js = jetstream::new(nats.client().await);
    common::nats::wait_for_ingest_consumer(&js).await;
    publish_stored(&js, 0, FRAMES_EACH_SIDE).await;
    // Version 1 written too before the disk fills (the round's premise: the daemon stays up): a fill racing
    // its ~170 MB write meets sled mid-write, after which the daemon reopens its store or, when sled leaves
    // a write waiting, exits saying so (tests/failpoints.rs, the filled-under-a-claimed-write tests).
    daemon
        .wait_until(
            Duration::from_secs(60),
            "the first frames committed and version 1 written",
            || async {
                common::http_get(port, "/healthz").1.contains("last commit")
                    && daemon.logs().contains("leading training")
            },
        )
        .await;

    disk.fill();
    publish_stored(&js, FRAMES_EACH_SIDE, 2 * FRAMES_EACH_SIDE).await;
    daemon
        .wait_unhealthy(port, "the store can't write", Duration::from_secs(60))
        .await;
    assert!(common::http_get(port, "/metrics").1.contains("wmvae_store_writable 0"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !daemon.logs().contains("bye"),
        "the daemon stopped while the disk was full: {}",
        daemon.logs()
    );

    disk.free();
    daemon
        .wait_until(
            Duration::from_secs(90),
            "every frame stored once there is room",
            || async {
                let Ok(stream) = js.get_stream("WM_FRAMES").await else {
                    return false;
                };
                let Ok(mut consumer) = stream
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>("wmvae-ingest")
                    .await
                else {
                    return false;
                };
                consumer
                    .info()
                    .await
                    .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
            },
        )
        .await;
    let logs = daemon.logs();
    assert!(
        logs.contains("no room on the store's disk for a group commit"),
        "{logs}"
    );
    assert_eq!(common::http_get(port, "/healthz").0, 200, "{logs}");
    assert!(daemon.terminate().success(), "{logs}");
    let store = Store::open(
        &data.join("store"),
        BufferConfig {
            capacity: 1_000_000,
            validation_fraction: 0.3,
        },
    )
    .unwrap();
    assert_eq!(store.stats().unwrap().frames_ingested, 2 * FRAMES_EACH_SIDE, "{logs}");
    let distinct: HashSet<u64> = store.frames_in_order(None, false).map(|f| f.unwrap().step).collect();
    assert_eq!(distinct.len() as u64, 2 * FRAMES_EACH_SIDE);
}

/// `wmvae bench chaos` for a few faults: nothing acked lost or stored twice,
/// every malformed kind dead-lettered with its reason, a clean exit.
/// (`scripts/chaos` runs it longer for BENCHMARKS.md.)
#[test]
fn the_chaos_bench_loses_nothing() {
    let out = common::wmvae()
        .args(["bench", "chaos", "--json", "--seconds", "12", "--nats-server"])
        .arg(common::repo_root().join(".venv/bin/nats-server"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(figures["frames_acked"].as_u64().unwrap() > 0, "{figures}");
    assert_eq!(figures["lost"], 0, "{figures}");
    assert_eq!(figures["duplicates"], 0, "{figures}");
    assert!(figures["malformed_kinds"].as_u64().unwrap() >= 45, "{figures}");
    assert!(figures["odd_identities"].as_u64().unwrap() >= 3, "{figures}");
    assert_eq!(
        figures["odd_identities_encoded"], figures["odd_identities"],
        "{figures}: {said}"
    );
    assert_eq!(
        figures["malformed_dead_lettered"], figures["malformed_kinds"],
        "{figures}: {said}"
    );
    assert_eq!(figures["daemon_exited_cleanly"], true, "{figures}");
    assert!(
        figures["daemon_kills"].as_u64().unwrap() + figures["server_kills"].as_u64().unwrap() >= 2,
        "{figures}"
    );
}
