//! The status page's pictures of what World Models asks of V (issue #27):
//! reconstructions by the active version (`/recon.png`), the same fixed
//! draws from the prior decoded by each of the newest versions, one row per
//! version so one sees learning (`/prior.png`), an interpolation between two
//! held-out frames by the active version (`/interpolation.png`), and each
//! version's latent diagnostics (active units, KL per dimension) as HTML.
//!
//! Each picture is drawn by one request at a time, off the runtime, and
//! kept while it still shows the same versions. What it does not do: the
//! model work (`versions`, `vae::properties`), computing the diagnostics
//! (the trainer, at each checkpoint: here they are read from the metadata),
//! or the server and its limits (`http/`).

use super::http::{failed, HttpContext};
use crate::config::Config;
use crate::store::Store;
use crate::vae::checkpoint::Metadata;
use crate::vae::properties::{INTERPOLATION_STEPS, PRIOR_DRAWS};
use crate::versions;
use anyhow::{ensure, Context, Result};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Versions on the page, the newest: rows of the prior strip and of the
/// diagnostics table. Eight rows of 64-pixel frames fit a screen, and
/// drawing them loads eight checkpoints, once per new version.
const SHOWN_VERSIONS: usize = 8;
/// Pictures of randomly drawn frames (reconstructions, interpolation) are
/// redrawn at most this often; the prior strip (fixed noise) only when the
/// versions shown change.
const RANDOM_FRAMES_MAX_AGE: Duration = Duration::from_secs(30);

/// (the versions it shows, made at, PNG).
type Cached = (Vec<u64>, Instant, Arc<Vec<u8>>);

/// One picture: held while it is drawn, so concurrent requests wait for
/// that one (single flight) instead of each running the model.
#[derive(Clone, Default)]
struct Drawn(Arc<tokio::sync::Mutex<Option<Cached>>>);

impl Drawn {
    /// The picture of `shows`, drawn by `draw` unless one of the same
    /// versions younger than `max_age` (None: any age) is kept.
    async fn get_or_draw(
        &self,
        shows: Vec<u64>,
        max_age: Option<Duration>,
        what: &str,
        draw: impl FnOnce() -> Result<Vec<u8>> + Send + 'static,
    ) -> Result<Arc<Vec<u8>>> {
        let mut cached = self.0.lock().await;
        if let Some((kept, at, png)) = cached.as_ref() {
            if *kept == shows && max_age.is_none_or(|age| at.elapsed() < age) {
                return Ok(png.clone());
            }
        }
        let png = Arc::new(tokio::task::spawn_blocking(draw).await??);
        tracing::info!(versions = ?shows, "status page: {what} drawn");
        *cached = Some((shows, Instant::now(), png.clone()));
        Ok(png)
    }
}

/// The page's pictures, each cached on its own.
#[derive(Clone, Default)]
pub struct Pictures {
    recon: Drawn,
    prior: Drawn,
    interpolation: Drawn,
}

fn store(ctx: &HttpContext) -> Result<Store> {
    ctx.store
        .clone()
        .context("this node has no trainer role, so no replay buffer to draw from")
}

/// The newest [`SHOWN_VERSIONS`] versions' metadata, oldest first.
fn shown(store: &Store) -> Result<Vec<Metadata>> {
    let mut all = store.registry().list()?;
    Ok(all.split_off(all.len().saturating_sub(SHOWN_VERSIONS)))
}

fn png(picture: Result<Arc<Vec<u8>>>) -> Response {
    match picture {
        Ok(png) => ([(header::CONTENT_TYPE, "image/png")], png.to_vec()).into_response(),
        Err(e) => failed(StatusCode::SERVICE_UNAVAILABLE, &e),
    }
}

/// A picture of the active version by `draw`, of frames drawn at random.
async fn of_active(
    ctx: &HttpContext,
    picture: &Drawn,
    what: &str,
    draw: fn(&Store, u64, &Config) -> Result<Vec<u8>>,
) -> Result<Arc<Vec<u8>>> {
    let store = store(ctx)?;
    let version = store.registry().active_version()?.context("no active version yet")?;
    let config = ctx.config.clone();
    let draw = move || draw(&store, version, &config);
    picture
        .get_or_draw(vec![version], Some(RANDOM_FRAMES_MAX_AGE), what, draw)
        .await
}

/// `/recon.png`: validation frames over their reconstructions.
pub(super) async fn recon(State(ctx): State<HttpContext>) -> Response {
    let draw = |store: &Store, version, config: &Config| Ok(versions::recon_png(store, version, config)?);
    png(of_active(&ctx, &ctx.pictures.recon, "reconstruction grid", draw).await)
}

/// `/interpolation.png`: two validation frames and the path between them.
pub(super) async fn interpolation(State(ctx): State<HttpContext>) -> Response {
    png(of_active(
        &ctx,
        &ctx.pictures.interpolation,
        "interpolation",
        versions::interpolation_png,
    )
    .await)
}

/// `/prior.png`: the fixed draws decoded by each shown version, oldest on top.
pub(super) async fn prior(State(ctx): State<HttpContext>) -> Response {
    png(prior_strip(&ctx).await)
}

async fn prior_strip(ctx: &HttpContext) -> Result<Arc<Vec<u8>>> {
    let store = store(ctx)?;
    let shows: Vec<u64> = shown(&store)?.iter().map(|m| m.version).collect();
    ensure!(!shows.is_empty(), "no version yet");
    let (config, rows) = (ctx.config.clone(), shows.clone());
    let draw = move || versions::prior_strip_png(&store, &rows, &config);
    ctx.pictures.prior.get_or_draw(shows, None, "prior strip", draw).await
}

/// The page's section after the reconstructions: the prior strip, the
/// interpolation and the diagnostics table (empty on a node without a store).
pub(super) fn section(ctx: &HttpContext, active: u64) -> Result<String> {
    let Some(store) = &ctx.store else {
        return Ok(String::new());
    };
    let shown = shown(store)?;
    let (first, last) = match (shown.first(), shown.last()) {
        (Some(first), Some(last)) => (first.version, last.version),
        _ => return Ok(String::new()),
    };
    let loaded = r#"onload="this.dataset.loaded='yes'" onerror="this.dataset.loaded='no'""#;
    Ok(format!(
        r#"<h2>Samples from the prior: the same {PRIOR_DRAWS} draws decoded by v{first} (top) to v{last} (bottom)</h2>
<img id="prior" alt="samples from the prior" src="/prior.png" {loaded}>
<h2>Interpolation by v{active}: two validation frames (left, right) and {INTERPOLATION_STEPS} steps between their latents</h2>
<img id="interpolation" alt="interpolation" src="/interpolation.png" {loaded}>
<h2>Latent diagnostics on held-out frames, at each checkpoint</h2>
<table id="diagnostics"><tr><th>version</th><th>step</th><th>active units</th><th>KL per dimension</th><th>KL total (nats)</th></tr>{rows}</table>
"#,
        rows = diagnostics_rows(&shown),
    ))
}

/// One table row per version: its active units and a bar per latent
/// dimension's KL, on one scale across the rows so growth shows.
fn diagnostics_rows(shown: &[Metadata]) -> String {
    let (bar, height) = (6.0, 40.0);
    let top = shown
        .iter()
        .flat_map(|m| m.kl_per_dim.iter().flatten())
        .fold(1e-9_f64, |a, &b| a.max(b));
    let mut rows = String::new();
    for m in shown {
        let units = m.active_units.map_or("-".into(), |u| u.to_string());
        let (mut bars, mut total) = (String::new(), String::new());
        if let Some(kl) = &m.kl_per_dim {
            let _ = write!(
                bars,
                r#"<svg class="kl-per-dim" width="{}" height="{height}">"#,
                bar * kl.len() as f64
            );
            for (j, k) in kl.iter().enumerate() {
                let h = (k / top * height).clamp(0.0, height);
                let _ = write!(
                    bars,
                    r##"<rect class="kl" x="{}" y="{}" width="{}" height="{h:.1}" fill="#1f77b4"><title>z{j}: {k:.3}</title></rect>"##,
                    bar * j as f64,
                    height - h,
                    bar - 1.0
                );
            }
            bars += "</svg>";
            total = format!("{:.2}", kl.iter().sum::<f64>());
        }
        let _ = write!(
            rows,
            r#"<tr data-version="{v}"><td>v{v}</td><td>{step}</td><td class="active-units">{units}</td><td>{bars}</td><td>{total}</td></tr>"#,
            v = m.version,
            step = m.step,
        );
    }
    rows
}
