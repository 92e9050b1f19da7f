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
        js.publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(120), "a trained version", || async {
        daemon.logs().contains("checkpoint version=2")
    })
    .await;
    nats.kill();
    (daemon, nats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_without_nats_exits_0_within_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([
            ("WMVAE_SERVE__SHUTDOWN_GRACE_SECS", "5"),
            ("WMVAE_NODE__LEASE_TTL_SECS", "3"),
        ])
        .collect();
    let (mut daemon, mut nats) = stranded(dir.path(), &env).await;
    let asked = Instant::now();
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(60));
    let took = asked.elapsed();
    let logs = daemon.logs();
    assert!(status.success(), "{status}: {logs}");
    // 5 s of grace, plus the last checkpoint and the bounded NATS flush.
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}: {logs}");
    assert!(
        logs.contains("store flushed") && logs.contains("kept in the store as pending"),
        "{logs}"
    );
    let step = wmvae::store::Store::open(
        &dir.path().join("store"),
        wmvae::store::BufferConfig {
            capacity: 1_000_000,
            validation_fraction: 0.3,
        },
    )
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
        .wait_until(Duration::from_secs(60), "the pending checkpoint announced", || async {
            announcements(&js).await.iter().any(|a| a.metadata.step == step)
        })
        .await;
    let logs = daemon.logs();
    assert!(logs.contains("the last shutdown's pending checkpoint is v"), "{logs}");
    assert!(daemon.terminate().success(), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([("WMVAE_SERVE__SHUTDOWN_GRACE_SECS", "600")])
        .collect();
    let (mut daemon, _nats) = stranded(dir.path(), &env).await;
    daemon.signal("TERM");
    wait_until(Duration::from_secs(10), "the first signal to be seen", || async {
        daemon.logs().contains("SIGTERM: shutting down")
    })
    .await;
    daemon.signal("TERM");
    let status = daemon.wait(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{status}");
}

/// How the nats-server goes away.
#[derive(Debug, Clone, Copy)]
enum ServerStop {
    /// SIGTERM: it shuts down cleanly.
    Term,
    /// SIGKILL: it is gone at once.
    Kill,
}

/// When, against the daemon's SIGTERM.
#[derive(Debug, Clone, Copy)]
enum Order {
    ServerFirst,
    Together,
    DaemonFirst,
}

/// The shutdown grace of these daemons: the exit must come within it and 5 s.
const GRACE_SECS: u64 = 5;

/// A daemon busy at everything (frames streaming in: ingest and encoding;
/// training with a checkpoint every few steps: uploads and announcements)
/// gets SIGTERM, and its nats-server goes away (`stop`) in `order` with it.
/// Seen before: a node asleep 16 minutes later, another burning CPU for 6.
async fn stops_in_time(stop: ServerStop, order: Order) {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let grace = GRACE_SECS.to_string();
    let env: Vec<(&str, &str)> = FAST
        .iter()
        .copied()
        .chain([
            ("WMVAE_SERVE__SHUTDOWN_GRACE_SECS", grace.as_str()),
            ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "4"),
            ("WMVAE_NODE__LEASE_TTL_SECS", "3"),
        ])
        .collect();
    let mut daemon = Daemon::start(&nats.url, dir.path(), &env);
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    wait_for_ingest_consumer(&js).await;
    // Frames keep coming (core NATS: the publisher never waits on a server that is going).
    let publishing = tokio::spawn(async move {
        for (i, px) in frames(100_000, 64, 64)
            .chunks(12288)
            .enumerate()
            .map(|(i, px)| (i as u64, px.to_vec()))
        {
            let msg = FrameMessage::rgb("e", i, 64, 64, px);
            if client.publish("wm.frames.car", msg.to_msgpack().into()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    daemon
        .wait_until(Duration::from_secs(120), "versions trained and announced", || async {
            daemon.logs().contains("checkpoint version=4")
        })
        .await;
    let server_goes = |nats: &mut NatsServer| match stop {
        ServerStop::Term => nats.terminate(),
        ServerStop::Kill => nats.kill(),
    };
    let asked = match order {
        Order::ServerFirst => {
            server_goes(&mut nats);
            tokio::time::sleep(Duration::from_millis(300)).await;
            daemon.signal("TERM");
            Instant::now()
        }
        Order::Together => {
            daemon.signal("TERM");
            let asked = Instant::now();
            server_goes(&mut nats);
            asked
        }
        Order::DaemonFirst => {
            daemon.signal("TERM");
            let asked = Instant::now();
            tokio::time::sleep(Duration::from_millis(300)).await;
            server_goes(&mut nats);
            asked
        }
    };
    let status = daemon.wait(Duration::from_secs(120));
    let took = asked.elapsed();
    publishing.abort();
    let logs = daemon.logs();
    assert!(
        took <= Duration::from_secs(GRACE_SECS + 5),
        "{stop:?} {order:?}: the daemon took {took:?} to exit: {logs}"
    );
    assert!(status.success(), "{stop:?} {order:?}: {status}: {logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_bounded_whenever_the_server_is_terminated() {
    for order in [Order::ServerFirst, Order::Together, Order::DaemonFirst] {
        stops_in_time(ServerStop::Term, order).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_bounded_whenever_the_server_is_killed() {
    for order in [Order::ServerFirst, Order::Together, Order::DaemonFirst] {
        stops_in_time(ServerStop::Kill, order).await;
    }
}
