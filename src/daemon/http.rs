//! The daemon's HTTP face for operators' usual tools, on `[http] addr`
//! (loopback by default): `/metrics` (Prometheus text format), `/healthz`
//! (200 only when NATS is connected and the store answers), `/` (a status
//! page: loss curves, validation frames over their reconstructions by the
//! active version, version history) and `/recon.png` (that grid).
//!
//! A deliberately small HTTP/1.1 server: GET only, one request per
//! connection, bounded request size. It reads the status board, the store
//! and the bus; it changes nothing.

use crate::bus::Bus;
use crate::config::Config;
use crate::daemon::status::{CurvePoint, StatusBoard, LATENCY_BUCKETS};
use crate::store::Store;
use anyhow::{Context, Result};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Longest request head accepted: GETs only, so 8 KiB is plenty.
const MAX_REQUEST_BYTES: usize = 8192;
/// A client gets this long to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The reconstruction grid is recomputed at most this often.
const GRID_MAX_AGE: Duration = Duration::from_secs(30);

/// What the pages read.
/// (version, made at, PNG) of the last grid drawn.
type CachedGrid = (u64, Instant, Arc<Vec<u8>>);

#[derive(Clone)]
pub struct HttpContext {
    pub status: StatusBoard,
    pub store: Store,
    pub bus: Bus,
    pub config: Config,
    grid: Arc<Mutex<Option<CachedGrid>>>,
}

impl HttpContext {
    pub fn new(status: StatusBoard, store: Store, bus: Bus, config: Config) -> HttpContext {
        HttpContext { status, store, bus, config, grid: Arc::default() }
    }
}

struct Response {
    code: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
}

fn text(code: &'static str, body: impl Into<String>) -> Response {
    Response { code, content_type: "text/plain; charset=utf-8", body: body.into().into_bytes() }
}

/// Binds the listener (at start-up, so a taken port fails the daemon at once).
pub async fn bind(addr: &str) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding HTTP on {addr} ([http] addr)"))?;
    tracing::info!(addr = %listener.local_addr()?, "HTTP: /metrics /healthz /");
    Ok(listener)
}

/// Serves until `shutdown`.
pub async fn serve(listener: tokio::net::TcpListener, ctx: HttpContext, shutdown: CancellationToken) -> Result<()> {
    loop {
        let (mut socket, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let response = match tokio::time::timeout(REQUEST_TIMEOUT, read_path(&mut socket)).await {
                Ok(Ok(path)) => route(&ctx, &path).await,
                _ => text("400 Bad Request", "bad request\n"),
            };
            let head = format!(
                "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                response.code,
                response.content_type,
                response.body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(&response.body).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Reads a request head and returns the GET path.
async fn read_path(socket: &mut tokio::net::TcpStream) -> Result<String> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await?;
        anyhow::ensure!(n > 0 && head.len() + n <= MAX_REQUEST_BYTES, "request too long or cut short");
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_string();
    let mut parts = line.split(' ');
    anyhow::ensure!(parts.next() == Some("GET"), "only GET");
    Ok(parts.next().unwrap_or("/").split('?').next().unwrap_or("/").to_string())
}

async fn route(ctx: &HttpContext, path: &str) -> Response {
    match path {
        "/metrics" => match metrics(ctx) {
            Ok(body) => Response { code: "200 OK", content_type: "text/plain; version=0.0.4; charset=utf-8", body: body.into_bytes() },
            Err(e) => text("500 Internal Server Error", format!("{e:#}\n")),
        },
        "/healthz" => {
            let store_ok = ctx.store.registry().active_version().is_ok();
            match (ctx.bus.is_connected(), store_ok) {
                (true, true) => text("200 OK", "ok\n"),
                (nats, store) => text("503 Service Unavailable", format!("nats connected: {nats}, store open: {store}\n")),
            }
        }
        "/" => match page(ctx) {
            Ok(html) => Response { code: "200 OK", content_type: "text/html; charset=utf-8", body: html.into_bytes() },
            Err(e) => text("500 Internal Server Error", format!("{e:#}\n")),
        },
        "/recon.png" => match recon(ctx).await {
            Ok(png) => Response { code: "200 OK", content_type: "image/png", body: png.to_vec() },
            Err(e) => text("503 Service Unavailable", format!("{e:#}\n")),
        },
        _ => text("404 Not Found", "not found\n"),
    }
}

/// The active version's grid, cached for [`GRID_MAX_AGE`].
async fn recon(ctx: &HttpContext) -> Result<Arc<Vec<u8>>> {
    let version = ctx.store.registry().active_version()?.context("no active version yet")?;
    if let Some((v, at, png)) = ctx.grid.lock().unwrap().clone() {
        if v == version && at.elapsed() < GRID_MAX_AGE {
            return Ok(png);
        }
    }
    let (store, config) = (ctx.store.clone(), ctx.config.clone());
    let png = Arc::new(tokio::task::spawn_blocking(move || crate::versions::recon_png(&store, version, &config)).await??);
    *ctx.grid.lock().unwrap() = Some((version, Instant::now(), png.clone()));
    Ok(png)
}

fn metrics(ctx: &HttpContext) -> Result<String> {
    let s = ctx.status.snapshot();
    let stats = ctx.store.stats()?;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP wmvae_{name} {help}\n# TYPE wmvae_{name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "wmvae_{name}{labels} {value}");
        }
    };
    let one = |v: f64| vec![(String::new(), v)];
    metric("frames_ingested_total", "counter", "Frames made durable in the replay buffer.", &one(stats.frames_ingested as f64));
    metric("frames_duplicate_total", "counter", "Frames already stored, acked without storing.", &one(stats.duplicates as f64));
    let rejected: Vec<(String, f64)> = stats.rejected.iter().map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64)).collect();
    metric("frames_rejected_total", "counter", "Frames dead-lettered, by reason.", &rejected);
    metric("buffer_frames", "gauge", "Frames held in the replay buffer.", &one(stats.frames as f64));
    metric("buffer_capacity_frames", "gauge", "Replay buffer capacity.", &one(stats.capacity as f64));
    metric("buffer_bytes", "gauge", "Bytes on disk of the sled store.", &one(stats.bytes_on_disk as f64));
    metric("train_steps_total", "counter", "Optimizer steps taken.", &one(s.step as f64));
    metric("train_images_per_second", "gauge", "Training throughput over the last log window.", &one(s.images_per_s));
    let losses = |l: Option<crate::vae::learner::LossValues>| -> Vec<(String, f64)> {
        l.map(|l| vec![("{kind=\"total\"}".into(), l.total), ("{kind=\"recon\"}".into(), l.recon), ("{kind=\"kl\"}".into(), l.kl)]).unwrap_or_default()
    };
    metric("train_loss", "gauge", "Mean training loss of the last log window.", &losses(s.last_losses));
    metric("eval_loss", "gauge", "Last eval loss on the validation split.", &losses(s.eval));
    metric("train_skipped_steps_total", "counter", "Steps skipped by the divergence guard.", &one(s.skipped_steps as f64));
    metric("auto_rollbacks_total", "counter", "Automatic rollbacks after divergence.", &one(s.auto_rollbacks as f64));
    metric("latents_published_total", "counter", "Latents published.", &one(s.latents_published as f64));
    metric("active_version", "gauge", "The active checkpoint version.", &one(s.active_version.unwrap_or(0) as f64));
    metric("nats_connected", "gauge", "1 while connected to NATS.", &one(ctx.bus.is_connected() as u8 as f64));
    metric("nats_reconnects_total", "counter", "Disconnections from NATS (each followed by a reconnect).", &one(ctx.bus.disconnects() as f64));
    let h = &s.latent_latency;
    let mut buckets: Vec<(String, f64)> = LATENCY_BUCKETS.iter().zip(h.counts).map(|(b, c)| (format!("_bucket{{le=\"{b}\"}}"), c as f64)).collect();
    buckets.push(("_bucket{le=\"+Inf\"}".into(), h.count as f64));
    buckets.push(("_sum".into(), h.sum));
    buckets.push(("_count".into(), h.count as f64));
    metric("latent_latency_seconds", "histogram", "From frame received to its latent published.", &buckets);
    Ok(out)
}

/// An SVG line chart of one or two curves.
fn chart(title: &str, curves: &[(&str, &[CurvePoint])]) -> String {
    let (w, h, pad) = (560.0, 220.0, 36.0);
    let points: Vec<&CurvePoint> = curves.iter().flat_map(|(_, c)| c.iter()).filter(|p| p.loss.is_finite()).collect();
    let mut svg = format!(r#"<figure><figcaption>{title}</figcaption><svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#);
    if points.is_empty() {
        svg += r#"<text x="20" y="110">no data yet</text></svg></figure>"#;
        return svg;
    }
    let (x0, x1) = points.iter().fold((i64::MAX, i64::MIN), |(a, b), p| (a.min(p.step), b.max(p.step)));
    let (y0, y1) = points.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.loss), b.max(p.loss)));
    let sx = |x: i64| pad + (x - x0) as f64 / ((x1 - x0).max(1) as f64) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0).max(1e-9) * (h - 2.0 * pad);
    let _ = write!(svg, r##"<rect x="{pad}" y="{pad}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##, w - 2.0 * pad, h - 2.0 * pad);
    let _ = write!(svg, r#"<text x="2" y="{}" font-size="11">{y1:.1}</text><text x="2" y="{}" font-size="11">{y0:.1}</text>"#, pad, h - pad);
    let _ = write!(svg, r#"<text x="{pad}" y="{}" font-size="11">step {x0}</text><text x="{}" y="{}" font-size="11">{x1}</text>"#, h - 8.0, w - pad - 30.0, h - 8.0);
    for (i, (name, curve)) in curves.iter().enumerate() {
        let colour = ["#1f77b4", "#d62728"][i % 2];
        let pts: Vec<String> = curve.iter().filter(|p| p.loss.is_finite()).map(|p| format!("{:.1},{:.1}", sx(p.step), sy(p.loss))).collect();
        let _ = write!(svg, r#"<polyline class="curve" data-name="{name}" fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#, pts.join(" "));
        let _ = write!(svg, r#"<text x="{}" y="{}" fill="{colour}" font-size="12">{name}</text>"#, w - pad - 80.0, pad + 14.0 + 14.0 * i as f64);
    }
    svg + "</svg></figure>"
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn page(ctx: &HttpContext) -> Result<String> {
    let s = ctx.status.snapshot();
    let train: Vec<CurvePoint> = s.train_curve.iter().copied().collect();
    let eval: Vec<CurvePoint> = s.eval_curve.iter().copied().collect();
    let mut history = String::new();
    for h in ctx.store.registry().history()?.iter().rev().take(20) {
        let from = h.from.map_or("-".to_string(), |v| format!("v{v}"));
        let _ = write!(
            history,
            "<tr><td>{}</td><td>{from}</td><td>v{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&h.at),
            h.to,
            h.why.as_str(),
            escape(&h.by),
            escape(h.reason.as_deref().unwrap_or(""))
        );
    }
    let loss = |l: Option<crate::vae::learner::LossValues>| l.map_or("-".into(), |l| format!("{:.1} (recon {:.1}, KL {:.2})", l.total, l.recon, l.kl));
    Ok(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>wmvae</title>
<style>body{{font-family:sans-serif;margin:24px}} td,th{{padding:2px 10px;text-align:left}} img{{image-rendering:pixelated;width:1024px}}</style></head><body>
<h1>wmvae: World Models VAE</h1>
<p>state <b>{state}</b> · step {step} · active <b>v{version}</b> · {ips:.0} images/s · buffer {frames} frames · device {device}</p>
<p>train loss {train_loss} · eval loss {eval_loss} · latents published {latents} · auto rollbacks {rollbacks}</p>
{train_chart}{eval_chart}
<h2>Validation frames (top) and their reconstructions by v{version} (bottom)</h2>
<img id="grid" alt="reconstructions" src="/recon.png" onload="this.dataset.loaded='yes'" onerror="this.dataset.loaded='no'">
<h2>Active version history</h2>
<table><tr><th>at</th><th>from</th><th>to</th><th>why</th><th>by</th><th>reason</th></tr>{history}</table>
</body></html>"#,
        state = s.state.as_str(),
        step = s.step,
        version = s.active_version.unwrap_or(0),
        ips = s.images_per_s,
        frames = s.buffer_frames,
        device = escape(&s.device),
        train_loss = loss(s.last_losses),
        eval_loss = loss(s.eval),
        latents = s.latents_published,
        rollbacks = s.auto_rollbacks,
        train_chart = chart("Train loss", &[("train", &train)]),
        eval_chart = chart("Eval loss (validation split)", &[("eval", &eval)]),
    ))
}
