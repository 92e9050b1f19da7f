//! The daemon's HTTP face for operators' usual tools, on `[http] addr`
//! (loopback by default): `/metrics` (Prometheus text format,
//! `metrics.rs`), `/healthz` (200 only when NATS is connected, the store
//! answers and writes, and the trainer loop and encoder are not stalled;
//! 503 with each reason, and the last commit's age), `/` (a status page:
//! loss curves, validation frames over their reconstructions by the active
//! version, samples from the prior across versions, an interpolation,
//! latent diagnostics, version history) and its pictures `/recon.png`,
//! `/prior.png` and `/interpolation.png` (`showcase.rs`; the page itself,
//! `page.rs`). It reads the
//! status board, the store and the bus; it changes nothing.
//!
//! The routes are an axum `Router` (here), served by our own accept loop
//! over hyper's HTTP/1 connection (`server.rs`) (axum's `serve` runs hyper without a timer,
//! so hyper's header-read timeout never fires there: tokio-rs/axum#2741).
//! Its limits, so that no client can starve `/healthz` (issue #24):
//! - the loop never waits before accepting (no permit, no cap), so the
//!   kernel's backlog never holds a health probe behind other clients;
//! - a connection that has not yet sent a whole request head is idle; at
//!   most [`MAX_IDLE`] are kept, and accepting one more closes the oldest:
//!   a flood of silent sockets only ever evicts its own;
//! - a request head must arrive within [`HEADER_READ_TIMEOUT`] (silent
//!   and slowloris sockets are closed), a request is answered within
//!   [`REQUEST_TIMEOUT`] (else 408), and no connection outlives
//!   [`CONNECTION_DEADLINE`];
//! - at most `[http] max_connections` requests are served at once; more
//!   get 503 at once, except `/healthz` and `/metrics` ([`UNCAPPED`]),
//!   which are always answered;
//! - GET only, one request per connection (`Connection: close`), HTTP/1
//!   only, `Cache-Control: no-store`; each picture drawn by one request
//!   at a time.
//!
//! What it does not do: it can't keep a client that sends whole requests
//! as fast as it can from taking CPU; a probe is evicted only if
//! [`MAX_IDLE`] connections are accepted between its own and the arrival
//! of its head (microseconds on loopback); and it does not serve TLS
//! (loopback by default; put a proxy in front to expose it).

mod page;
mod server;

use super::metrics::Metrics;
use super::showcase::{self, Pictures};
use super::status::StatusBoard;
use crate::bus::Bus;
use crate::config::Config;
use crate::store::Store;
use anyhow::Result;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
pub use server::bind;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the pages read.
#[derive(Clone)]
pub struct HttpContext {
    status: StatusBoard,
    /// The replay buffer and registry, on a trainer node.
    pub(super) store: Option<Store>,
    bus: Bus,
    pub(super) config: Config,
    metrics: Arc<Metrics>,
    pub(super) pictures: Pictures,
}

impl HttpContext {
    pub fn new(status: StatusBoard, store: Option<Store>, bus: Bus, config: Config) -> HttpContext {
        let metrics = Arc::new(Metrics::new(status.clone(), store.clone(), bus.clone()));
        HttpContext {
            status,
            store,
            bus,
            config,
            metrics,
            pictures: Pictures::default(),
        }
    }
}

/// The routes.
fn router(ctx: HttpContext) -> Router {
    Router::new()
        .route("/", get(page::page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/recon.png", get(showcase::recon))
        .route("/prior.png", get(showcase::prior))
        .route("/interpolation.png", get(showcase::interpolation))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(ctx)
}

/// Serves until `shutdown`, then lets the requests in flight finish and
/// returns once every connection is closed. Accept errors (out of
/// descriptors) are logged and retried: once bound, it does not fail.
pub async fn serve(listener: TcpListener, ctx: HttpContext, shutdown: CancellationToken) -> Result<()> {
    let max_connections = ctx.config.http.max_connections;
    server::serve(listener, router(ctx), max_connections, shutdown).await;
    Ok(())
}

/// An error's answer: `code` and the error's chain as text.
pub(super) fn failed(code: StatusCode, e: &anyhow::Error) -> Response {
    (code, format!("{e:#}\n")).into_response()
}

async fn metrics(State(ctx): State<HttpContext>) -> Response {
    match ctx.metrics.render() {
        Ok(body) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "metrics could not be read (see the daemon's log)\n",
        )
            .into_response(),
    }
}

async fn healthz(State(ctx): State<HttpContext>) -> Response {
    let mut problems = ctx
        .status
        .problems(Duration::from_secs(ctx.config.serve.heartbeat_max_age_secs));
    if !ctx.bus.is_connected() {
        problems.push("NATS is not connected".into());
    }
    // A node without a store (an encoder) has none to fail.
    if let Some(Err(e)) = ctx.store.as_ref().map(|store| store.registry().active_version()) {
        problems.push(format!("the store can't be read: {e:#}"));
    }
    let commit = ctx
        .status
        .last_commit()
        .map_or("no frames committed yet".to_string(), |at| {
            format!("last commit {:.1} s ago", at.elapsed().as_secs_f64())
        });
    match problems.is_empty() {
        true => format!("ok ({commit})\n").into_response(),
        false => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n({commit})\n", problems.join("\n")),
        )
            .into_response(),
    }
}
