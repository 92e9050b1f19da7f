//! Shutdown is bounded, against a real daemon whose nats-server went away:
//! SIGTERM writes the last checkpoint to the store (pending: NATS gives no
//! version number), flushes it and exits 0 within the shutdown grace; the
//! next start, NATS back, makes it the next version and announces it. A
//! second SIGTERM exits at once.

mod common;

use async_nats::jetstream;
use common::nats::{announcements, wait_for_ingest_consumer, wait_until, Daemon, NatsServer};
use common::{frames, FAST};
use std::time::{Duration, Instant};
use wmvae::frames::wire::FrameMessage;


/// A daemon that has trained (so it has versions to announce) and whose
/// nats-server was then SIGKILLed (kept, to be restarted).
async fn stranded(dir: &std::path::Path, env: &[(&str, &str)]) -> (Daemon, NatsServer) {
    let mut nats = NatsServer::start();
    let daemon = Daemon::start(&nats.url, dir, env);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    for (i, px) in frames(100, 64, 64).chunks(12288).enumerate() {
        let msg = FrameMessage::rgb("e", i as u64, 64, 64, px);
        js.publish("wm.frames.car", msg.to_msgpack().into()).await.unwrap().await.unwrap();
    }
    wait_until(Duration::from_secs(120), "a trained version", || async { daemon.logs().contains("checkpoint version=2") }).await;
    nats.kill();
    (daemon, nats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_nats_exits_0_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = FAST.iter().copied().chain([("WMVAE_SERVE__SHUTDOWN_GRACE_SECS", "5"), ("WMVAE_NODE__LEASE_TTL_SECS", "3")]).collect();
    let (mut daemon, mut nats) = stranded(dir.path(), &env).await;
    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(60));
    let took = asked.elapsed();
    let logs = daemon.logs();
    assert!(status.success(), "{status}: {logs}");
    // 5 s of grace, plus the last checkpoint and the bounded NATS flush.
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}: {logs}");
    assert!(logs.contains("store flushed") && logs.contains("kept in the store as pending"), "{logs}");
    let step = wmvae::store::Store::open(&dir.path().join("store"), wmvae::store::BufferConfig { capacity: 1_000_000, validation_fraction: 0.3 })
        .unwrap()
        .registry()
        .pending()
        .unwrap()
        .expect("a pending checkpoint")
        .metadata
        .step;

    // NATS back: the pending checkpoint is the next version, announced.
    nats.restart();
    let js = jetstream::new(nats.client().await);
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    daemon
        .wait_until(Duration::from_secs(60), "the pending checkpoint announced", || async { announcements(&js).await.iter().any(|a| a.metadata.step == step) })
        .await;
    let logs = daemon.logs();
    assert!(logs.contains("the last shutdown's pending checkpoint is v"), "{logs}");
    assert!(daemon.terminate().success(), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = FAST.iter().copied().chain([("WMVAE_SERVE__SHUTDOWN_GRACE_SECS", "600")]).collect();
    let (mut daemon, _nats) = stranded(dir.path(), &env).await;
    daemon.signal("TERM");
    wait_until(Duration::from_secs(10), "the first signal to be seen", || async { daemon.logs().contains("SIGTERM: shutting down") }).await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
}
