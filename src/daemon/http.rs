//! The daemon's HTTP face for operators' usual tools, on `[http] addr`
//! (loopback by default), served by axum: `/metrics` (Prometheus text
//! format, `metrics.rs`), `/healthz` (200 only when NATS is connected, the
//! store answers and writes, and the trainer loop and encoder are not
//! stalled; 503 with each reason, and the last commit's age), `/` (a status page: loss curves, validation frames
//! over their reconstructions by the active version, version history) and
//! `/recon.png` (that grid).
//!
//! GET only, a bounded time per request, one request per connection, at
//! most `[http] max_connections` connections at once; the grid drawn by
//! one request at a time. It
//! reads the status board, the store and the bus; it changes nothing.

use super::metrics::Metrics;
use super::status::{CurvePoint, StatusBoard};
use crate::bus::Bus;
use crate::config::Config;
use crate::store::Store;
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::timeout::TimeoutLayer;

/// A request is answered within this long or gets a 408: a stalled request
/// can't hold a task. Generous, since the first grid of a version runs the
/// model on a CPU that is also training (a few seconds when busy).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The reconstruction grid is recomputed at most this often.
const GRID_MAX_AGE: Duration = Duration::from_secs(30);

/// (version, made at, PNG) of the last grid drawn.
type CachedGrid = (u64, Instant, Arc<Vec<u8>>);

/// What the pages read.
#[derive(Clone)]
pub struct HttpContext {
    status: StatusBoard,
    /// The replay buffer and registry, on a trainer node.
    store: Option<Store>,
    bus: Bus,
    config: Config,
    metrics: Arc<Metrics>,
    /// Held while a grid is drawn: concurrent requests wait for that one
    /// (single flight) instead of each running the model.
    grid: Arc<tokio::sync::Mutex<Option<CachedGrid>>>,
}

impl HttpContext {
    pub fn new(status: StatusBoard, store: Option<Store>, bus: Bus, config: Config) -> HttpContext {
        let metrics = Arc::new(Metrics::new(status.clone(), store.clone(), bus.clone()));
        HttpContext { status, store, bus, config, metrics, grid: Arc::default() }
    }
}

/// A listener that accepts at most `max_connections` connections at a
/// time: the next waits (in the kernel's backlog) until one closes.
pub struct Listener {
    inner: tokio::net::TcpListener,
    permits: Arc<tokio::sync::Semaphore>,
}

/// An accepted connection, holding its place under the cap until dropped.
pub struct Connection {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl axum::serve::Listener for Listener {
    type Io = Connection;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Connection, std::net::SocketAddr) {
        let permit = self.permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (Connection { stream, _permit: permit }, addr)
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>, buf: &[u8]) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Binds the listener (at start-up, so a taken port fails the daemon at once).
pub async fn bind(addr: &str, max_connections: usize) -> Result<Listener> {
    let inner = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding HTTP on {addr} ([http] addr)"))?;
    tracing::info!(addr = %inner.local_addr()?, max_connections, "HTTP: /metrics /healthz /");
    Ok(Listener { inner, permits: Arc::new(tokio::sync::Semaphore::new(max_connections)) })
}

/// The routes, with their limits.
fn router(ctx: HttpContext) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/recon.png", get(recon))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(ctx)
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT))
        .layer(SetResponseHeaderLayer::overriding(header::CACHE_CONTROL, HeaderValue::from_static("no-store")))
        .layer(SetResponseHeaderLayer::overriding(header::CONNECTION, HeaderValue::from_static("close")))
}

/// Serves until `shutdown`.
pub async fn serve(listener: Listener, ctx: HttpContext, shutdown: CancellationToken) -> Result<()> {
    axum::serve(listener, router(ctx)).with_graceful_shutdown(shutdown.cancelled_owned()).await.context("HTTP server")
}

fn failed(code: StatusCode, e: &anyhow::Error) -> Response {
    (code, format!("{e:#}\n")).into_response()
}

async fn metrics(State(ctx): State<HttpContext>) -> Response {
    match ctx.metrics.render() {
        Ok(body) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "metrics could not be read (see the daemon's log)\n").into_response(),
    }
}

async fn healthz(State(ctx): State<HttpContext>) -> Response {
    let mut problems = ctx.status.problems();
    if !ctx.bus.is_connected() {
        problems.push("NATS is not connected".into());
    }
    // A node without a store (an encoder) has none to fail.
    if let Some(Err(e)) = ctx.store.as_ref().map(|store| store.registry().active_version()) {
        problems.push(format!("the store can't be read: {e:#}"));
    }
    let commit = ctx.status.last_commit().map_or("no frames committed yet".to_string(), |at| format!("last commit {:.1} s ago", at.elapsed().as_secs_f64()));
    match problems.is_empty() {
        true => format!("ok ({commit})\n").into_response(),
        false => (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n({commit})\n", problems.join("\n"))).into_response(),
    }
}

async fn page(State(ctx): State<HttpContext>) -> Response {
    match render_page(&ctx) {
        Ok(html) => Html(html).into_response(),
        Err(e) => failed(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn recon(State(ctx): State<HttpContext>) -> Response {
    match recon_grid(&ctx).await {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png.to_vec()).into_response(),
        Err(e) => failed(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

/// The active version's grid, cached for [`GRID_MAX_AGE`]; drawn by one
/// request at a time, the others then served from the cache.
async fn recon_grid(ctx: &HttpContext) -> Result<Arc<Vec<u8>>> {
    let store = ctx.store.clone().context("this node has no trainer role, so no replay buffer to draw from")?;
    let version = store.registry().active_version()?.context("no active version yet")?;
    let mut cached = ctx.grid.lock().await;
    if let Some((v, at, png)) = cached.as_ref() {
        if *v == version && at.elapsed() < GRID_MAX_AGE {
            return Ok(png.clone());
        }
    }
    let config = ctx.config.clone();
    let png = Arc::new(tokio::task::spawn_blocking(move || crate::versions::recon_png(&store, version, &config)).await??);
    tracing::info!(version, "status page: reconstruction grid drawn");
    *cached = Some((version, Instant::now(), png.clone()));
    Ok(png)
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

fn render_page(ctx: &HttpContext) -> Result<String> {
    let s = ctx.status.snapshot();
    let train: Vec<CurvePoint> = s.train_curve.iter().copied().collect();
    let eval: Vec<CurvePoint> = s.eval_curve.iter().copied().collect();
    let mut history = String::new();
    // The newest 20 only, read from the newest back: never the whole history.
    let history_entries = match &ctx.store {
        Some(store) => crate::versions::history_page(store, None, Some(20))?.entries,
        None => Vec::new(),
    };
    for h in history_entries.iter().rev() {
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
        r#"<!doctype html><html><head><meta charset="utf-8"><title>wmvae</title>{refresh}
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
        state = s.state.map_or("no trainer here", |t| t.as_str()),
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
        refresh = match ctx.config.http.refresh_secs {
            0 => String::new(),
            secs => format!(r#"<meta http-equiv="refresh" content="{secs}">"#),
        },
    ))
}
