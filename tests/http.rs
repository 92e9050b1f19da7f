//! The daemon's HTTP face: /healthz follows the NATS connection, /metrics
//! speaks Prometheus, and the status page renders its loss curves and the
//! reconstruction grid in headless Chromium.

mod common;

use async_nats::jetstream;
use common::nats::{wait_for_ingest_consumer, wait_until, Daemon, NatsServer};
use common::{frames, http_get as get};
use std::time::Duration;
use wmvae::frames::wire::FrameMessage;

/// Headless Chromium's DOM of `url` after the page's images have loaded.
/// The virtual-time budget must end before the page's `<meta refresh>`
/// fires: a dump taken mid-navigation is empty.
fn chromium_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("running chromium (scripts/test installs Debian's chromium)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!dom.is_empty(), "Chromium dumped no DOM: {}", String::from_utf8_lossy(&out.stderr));
    dom
}

/// Frames in, training on: /healthz 200, /metrics with the pinned series,
/// the page's curves and grid rendered by Chromium; NATS gone: /healthz 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_status_page() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [
        ("WMVAE_HTTP__ADDR", addr.as_str()),
        // Far past chromium_dom's 5 s virtual-time budget.
        ("WMVAE_HTTP__REFRESH_SECS", "60"),
        ("WMVAE_TRAIN__MIN_FRAMES", "50"),
        ("WMVAE_TRAIN__BATCH_SIZE", "16"),
        ("WMVAE_TRAIN__LOG_EVERY_STEPS", "2"),
        ("WMVAE_TRAIN__EVAL_EVERY_STEPS", "4"),
        ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "8"),
        ("WMVAE_TRAIN__SAMPLES_PER_INSERT", "0"),
        ("WMVAE_TRAIN__THREADS", "1"),
        ("WMVAE_BUFFER__VALIDATION_FRACTION", "0.3"),
    ];
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    for (i, px) in frames(120, 64, 64).chunks(12288).enumerate() {
        let msg = FrameMessage::rgb(format!("e{}", i / 12), (i % 12) as u64, 64, 64, px.to_vec());
        js.publish("wm.frames.car", msg.to_msgpack().into()).await.unwrap().await.unwrap();
    }
    js.publish("wm.frames.car", b"\xc1".to_vec().into()).await.unwrap().await.unwrap();
    // Step 10: train points at 2..10, eval points at 4 and 8, v2 at step 8.
    wait_until(Duration::from_secs(120), "10 training steps", || async {
        let (_, m) = get(port, "/metrics");
        let steps = m.lines().find_map(|l| l.strip_prefix("wmvae_train_steps_total ")).and_then(|v| v.parse::<f64>().ok());
        steps.is_some_and(|s| s >= 10.0)
    })
    .await;

    assert_eq!(get(port, "/healthz").0, 200);
    let (code, metrics) = get(port, "/metrics");
    assert_eq!(code, 200);
    for series in [
        "wmvae_frames_ingested_total 120",
        "wmvae_frames_rejected_total{reason=\"malformed_msgpack\"} 1",
        "wmvae_buffer_frames 120",
        "wmvae_buffer_bytes ",
        "wmvae_train_steps_total ",
        "wmvae_train_loss{kind=\"recon\"} ",
        "wmvae_train_images_per_second ",
        "wmvae_latents_published_total 120",
        "wmvae_latent_latency_seconds_bucket{le=\"+Inf\"} 120",
        "wmvae_active_version ",
        "wmvae_nats_reconnects_total ",
    ] {
        assert!(metrics.contains(series), "missing {series:?} in\n{metrics}");
    }
    assert_eq!(get(port, "/nope").0, 404);

    let dom = chromium_dom(&format!("http://{addr}/"));
    let curves: Vec<&str> = dom.split("class=\"curve\"").skip(1).collect();
    assert_eq!(curves.len(), 2, "train and eval curves: {dom}");
    for curve in curves {
        let points = curve.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert!(points.split(' ').count() >= 2, "a curve with fewer than 2 points: {points:?}");
    }
    assert!(dom.contains("data-loaded=\"yes\""), "the reconstruction grid did not load: {dom}");
    assert!(dom.contains("<td>initial</td>"), "version history missing");
    assert!(dom.contains(r#"<meta http-equiv="refresh" content="60">"#), "the page does not refresh itself: {dom}");

    drop(nats);
    wait_until(Duration::from_secs(30), "healthz to fail without NATS", || async { get(port, "/healthz").0 == 503 }).await;
    drop(daemon);
}

/// `[http] max_connections` counts requests being served, not connections:
/// with as many idle connections open, the status page is still answered.
/// Concurrent /recon.png requests draw the grid once (single flight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_no_cap_and_the_grid_is_drawn_once() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    // No training: version 1 stays active, so every grid is of it. The cap
    // admits the six grid requests below at once.
    let env = [("WMVAE_HTTP__ADDR", addr.as_str()), ("WMVAE_HTTP__MAX_CONNECTIONS", "6"), ("WMVAE_TRAIN__MIN_FRAMES", "1000000"), ("WMVAE_BUFFER__VALIDATION_FRACTION", "0.5")];
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    for (i, px) in frames(40, 64, 64).chunks(12288).enumerate() {
        let msg = FrameMessage::rgb(format!("e{}", i / 4), (i % 4) as u64, 64, 64, px.to_vec());
        js.publish("wm.frames.car", msg.to_msgpack().into()).await.unwrap().await.unwrap();
    }
    daemon.wait_until(Duration::from_secs(60), "frames committed", || async { get(port, "/healthz").1.contains("last commit") }).await;
    daemon.wait_until(Duration::from_secs(60), "version 1 active", || async { get(port, "/metrics").1.contains("wmvae_active_version 1") }).await;

    let idle: Vec<std::net::TcpStream> = (0..6).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    assert_eq!(get(port, "/").0, 200, "the status page beside 6 idle connections, 6 allowed");
    drop(idle);

    let drawn = || daemon.logs().matches("reconstruction grid drawn").count();
    let before = drawn();
    let requests: Vec<_> = (0..6).map(|_| std::thread::spawn(move || get(port, "/recon.png"))).collect();
    for request in requests {
        let (code, body) = request.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(drawn() - before, 1, "six concurrent requests drew the grid {} times", drawn() - before);
    assert!(daemon.terminate().success());
}
