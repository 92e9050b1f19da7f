//! The daemon's HTTP face: /healthz follows the NATS connection, /metrics
//! speaks Prometheus, and the status page renders its loss curves, the
//! reconstruction grid, the prior samples across versions, the
//! interpolation and the latent diagnostics in headless Chromium.

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
    assert!(
        !dom.is_empty(),
        "Chromium dumped no DOM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The `<img id="{id}" ...>` tag of `dom`, as Chromium left it.
fn img<'a>(dom: &'a str, id: &str) -> &'a str {
    let at = dom
        .find(&format!(r#"<img id="{id}""#))
        .unwrap_or_else(|| panic!("no image {id}: {dom}"));
    dom[at..].split('>').next().unwrap()
}

/// Frames in, training on: /healthz 200, /metrics with the pinned series,
/// the page's curves, grid and World Models' properties (prior samples of
/// every version, interpolation, diagnostics) rendered by Chromium once two
/// versions are trained; NATS gone: /healthz 503.
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
        js.publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    js.publish("wm.frames.car", b"\xc1".to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    // Step 17: train points at 2..16, eval points at 4, 8, ..., v2 at step 8 and v3 at 16.
    wait_until(Duration::from_secs(180), "17 training steps", || async {
        let (_, m) = get(port, "/metrics");
        let steps = m
            .lines()
            .find_map(|l| l.strip_prefix("wmvae_train_steps_total "))
            .and_then(|v| v.parse::<f64>().ok());
        steps.is_some_and(|s| s >= 17.0)
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
        "wmvae_active_units ",
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
        assert!(
            points.split(' ').count() >= 2,
            "a curve with fewer than 2 points: {points:?}"
        );
    }
    for id in ["grid", "prior", "interpolation"] {
        assert!(
            img(&dom, id).contains(r#"data-loaded="yes""#),
            "the picture {id} did not load: {dom}"
        );
    }
    // Training goes on meanwhile: v3 or later is the newest row.
    let newest = dom
        .split(" (top) to v")
        .nth(1)
        .and_then(|rest| rest.split(' ').next()?.parse::<u64>().ok());
    assert!(newest.is_some_and(|v| v >= 3), "the prior strip's rows: {dom}");
    let rows: Vec<&str> = dom.split("<tr data-version=").skip(1).collect();
    assert!(rows.len() >= 3, "a diagnostics row per version: {dom}");
    // Every trained version's (v1 is the initial weights: none).
    for row in rows.iter().filter(|row| !row.starts_with(r#""1""#)) {
        let units = row
            .split(r#"class="active-units">"#)
            .nth(1)
            .unwrap()
            .split('<')
            .next()
            .unwrap();
        assert!(
            units.parse::<u32>().is_ok_and(|u| u <= 32),
            "active units {units:?} in {row}"
        );
        assert_eq!(row.matches(r#"<rect class="kl""#).count(), 32, "32 KL bars in {row}");
    }
    assert!(dom.contains("<td>initial</td>"), "version history missing");
    assert!(
        dom.contains(r#"<meta http-equiv="refresh" content="60">"#),
        "the page does not refresh itself: {dom}"
    );

    drop(nats);
    wait_until(Duration::from_secs(30), "healthz to fail without NATS", || async {
        get(port, "/healthz").0 == 503
    })
    .await;
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
    let env = [
        ("WMVAE_HTTP__ADDR", addr.as_str()),
        ("WMVAE_HTTP__MAX_CONNECTIONS", "6"),
        ("WMVAE_TRAIN__MIN_FRAMES", "1000000"),
        ("WMVAE_BUFFER__VALIDATION_FRACTION", "0.5"),
    ];
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    let js = jetstream::new(nats.client().await);
    wait_for_ingest_consumer(&js).await;
    for (i, px) in frames(40, 64, 64).chunks(12288).enumerate() {
        let msg = FrameMessage::rgb(format!("e{}", i / 4), (i % 4) as u64, 64, 64, px.to_vec());
        js.publish("wm.frames.car", msg.to_msgpack().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    daemon
        .wait_until(Duration::from_secs(60), "frames committed", || async {
            get(port, "/healthz").1.contains("last commit")
        })
        .await;
    daemon
        .wait_until(Duration::from_secs(60), "version 1 active", || async {
            get(port, "/metrics").1.contains("wmvae_active_version 1")
        })
        .await;

    let idle: Vec<std::net::TcpStream> = (0..6)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    assert_eq!(
        get(port, "/").0,
        200,
        "the status page beside 6 idle connections, 6 allowed"
    );
    drop(idle);

    let drawn = || daemon.logs().matches("reconstruction grid drawn").count();
    let before = drawn();
    let requests: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(port, "/recon.png")))
        .collect();
    for request in requests {
        let (code, body) = request.join().unwrap();
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(
        drawn() - before,
        1,
        "six concurrent requests drew the grid {} times",
        drawn() - before
    );
    assert!(daemon.terminate().success());
}

/// GET `path` on a fresh connection, answered (status line, body, close)
/// within `within`: the status code, or why not.
async fn get_within(port: u16, path: &str, within: Duration) -> Result<u16, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = tokio::time::timeout(within, async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let response = String::from_utf8_lossy(&response).to_string();
        response
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or(format!("not an HTTP response: {response:?}"))
    });
    answer
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {within:?}")))
}

/// Waits until the server closes `stream` (EOF or reset, after whatever it
/// sends), at most until `deadline`: what it sent, or None if it is still open.
async fn closed_by_server(stream: &mut tokio::net::TcpStream, deadline: tokio::time::Instant) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut sent = Vec::new();
    match tokio::time::timeout_at(deadline, stream.read_to_end(&mut sent)).await {
        Ok(_) => Some(String::from_utf8_lossy(&sent).to_string()),
        Err(_) => None,
    }
}

/// This process's open-file limit raised to `at_least` (or the hard limit),
/// for a thousand sockets on a box whose default is 1,024.
fn raise_open_files(at_least: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0, "getrlimit");
        if limit.rlim_cur < at_least {
            limit.rlim_cur = at_least.min(limit.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0, "setrlimit");
        }
    }
}

/// Issue #24: 1,000 sockets opened to the status port and left silent don't
/// starve /healthz (each probe answered within the issue's 1 s) or
/// /metrics; the server closes the silent sockets once the header-read
/// timeout (5 s) has passed, and a client that trickles a request head
/// byte by byte (slowloris) is closed by that timeout too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_starve_healthz() {
    use tokio::io::AsyncWriteExt;
    const SILENT: usize = 1000;
    // Wide of the header-read timeout (5 s), for a loaded box.
    const CLOSED_WITHIN: Duration = Duration::from_secs(30);
    raise_open_files(SILENT as u64 + 1024);
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let env = [
        ("WMVAE_HTTP__ADDR", addr.as_str()),
        ("WMVAE_TRAIN__MIN_FRAMES", "1000000"),
        ("WMVAE_TRAIN__THREADS", "1"),
    ];
    let daemon = Daemon::start(&nats.url, dir.path(), &env);
    daemon
        .wait_until(Duration::from_secs(60), "/healthz to answer 200", || async {
            get(port, "/healthz").0 == 200
        })
        .await;

    // Opened until one is not accepted (the listener's backlog full) within 5 s.
    let mut silent = Vec::with_capacity(SILENT);
    while silent.len() < SILENT {
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        {
            Ok(Ok(stream)) => silent.push(stream),
            _ => break,
        }
    }
    let opened = silent.len();
    for probe in 0..3 {
        let asked = std::time::Instant::now();
        let answer = get_within(port, "/healthz", Duration::from_secs(1)).await;
        assert_eq!(
            answer,
            Ok(200),
            "/healthz probe {probe} beside {opened} silent sockets; the daemon's logs:\n{}",
            daemon.logs()
        );
        eprintln!(
            "/healthz probe {probe} answered in {:?} beside {opened} silent sockets",
            asked.elapsed()
        );
    }
    assert_eq!(opened, SILENT, "only {opened} of {SILENT} sockets connected");
    assert_eq!(
        get_within(port, "/metrics", Duration::from_secs(10)).await,
        Ok(200),
        "/metrics beside {SILENT} silent sockets"
    );

    // A slowloris: a request head started and never finished, a byte at a time.
    let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let trickle = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + CLOSED_WITHIN;
        let (mut read, mut write) = slow.into_split();
        let reader = tokio::spawn(async move {
            let mut sent = Vec::new();
            let read =
                tokio::time::timeout_at(deadline, tokio::io::AsyncReadExt::read_to_end(&mut read, &mut sent)).await;
            read.ok().map(|_| String::from_utf8_lossy(&sent).to_string())
        });
        while !reader.is_finished() && tokio::time::Instant::now() < deadline {
            if write.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        reader.await.unwrap()
    });

    let deadline = tokio::time::Instant::now() + CLOSED_WITHIN;
    for (i, stream) in silent.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, deadline).await.is_some(),
            "silent socket {i} still open {CLOSED_WITHIN:?} on"
        );
    }
    match trickle.await.unwrap() {
        Some(sent) => assert!(!sent.starts_with("HTTP/1.1 200"), "the slowloris was answered: {sent}"),
        None => panic!("the slowloris socket still open {CLOSED_WITHIN:?} on"),
    }
    assert_eq!(get_within(port, "/healthz", Duration::from_secs(1)).await, Ok(200));
    assert!(daemon.terminate().success());
}
