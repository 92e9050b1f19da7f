//! The status page (`/`): loss curves as SVG, the figures of the status
//! board, the pictures' section (`showcase.rs`) and the newest entries of
//! the active version's history, as one HTML document. It reads; it draws
//! no picture and serves nothing itself (`mod.rs`).

use super::{failed, HttpContext};
use crate::daemon::showcase;
use crate::daemon::status::CurvePoint;
use anyhow::Result;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use std::fmt::Write as _;

pub(super) async fn page(State(ctx): State<HttpContext>) -> Response {
    match render_page(&ctx) {
        Ok(html) => Html(html).into_response(),
        Err(e) => failed(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

/// A chart's size and margin, in SVG pixels.
const CHART: (f64, f64, f64) = (560.0, 220.0, 36.0);
/// The curves' colours, in turn.
const COLOURS: [&str; 2] = ["#1f77b4", "#d62728"];

/// Where a chart's data sits: steps `x0..x1` and losses `y0..y1`.
struct Axes {
    x: (i64, i64),
    y: (f64, f64),
}

impl Axes {
    /// The bounds of `points` (finite losses, at least one).
    fn of(points: &[&CurvePoint]) -> Axes {
        Axes {
            x: points
                .iter()
                .fold((i64::MAX, i64::MIN), |(a, b), p| (a.min(p.step), b.max(p.step))),
            y: points
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.loss), b.max(p.loss))),
        }
    }

    /// A point's place in the chart.
    fn place(&self, p: &CurvePoint) -> (f64, f64) {
        let (w, h, pad) = CHART;
        let ((x0, x1), (y0, y1)) = (self.x, self.y);
        (
            pad + (p.step - x0) as f64 / ((x1 - x0).max(1) as f64) * (w - 2.0 * pad),
            h - pad - (p.loss - y0) / (y1 - y0).max(1e-9) * (h - 2.0 * pad),
        )
    }

    /// The frame and the bounds' labels.
    fn draw(&self, svg: &mut String) {
        let (w, h, pad) = CHART;
        let ((x0, x1), (y0, y1)) = (self.x, self.y);
        let _ = write!(
            svg,
            r##"<rect x="{pad}" y="{pad}" width="{}" height="{}" fill="none" stroke="#ccc"/>"##,
            w - 2.0 * pad,
            h - 2.0 * pad
        );
        let _ = write!(
            svg,
            r#"<text x="2" y="{}" font-size="11">{y1:.1}</text><text x="2" y="{}" font-size="11">{y0:.1}</text>"#,
            pad,
            h - pad
        );
        let _ = write!(
            svg,
            r#"<text x="{pad}" y="{}" font-size="11">step {x0}</text><text x="{}" y="{}" font-size="11">{x1}</text>"#,
            h - 8.0,
            w - pad - 30.0,
            h - 8.0
        );
    }
}

/// An SVG line chart of one or two curves.
fn chart(title: &str, curves: &[(&str, &[CurvePoint])]) -> String {
    let (w, h, pad) = CHART;
    let points: Vec<&CurvePoint> = curves
        .iter()
        .flat_map(|(_, c)| c.iter())
        .filter(|p| p.loss.is_finite())
        .collect();
    let mut svg = format!(
        r#"<figure><figcaption>{title}</figcaption><svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}">"#
    );
    if points.is_empty() {
        svg += r#"<text x="20" y="110">no data yet</text></svg></figure>"#;
        return svg;
    }
    let axes = Axes::of(&points);
    axes.draw(&mut svg);
    for (i, (name, curve)) in curves.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<String> = curve
            .iter()
            .filter(|p| p.loss.is_finite())
            .map(|p| {
                let (x, y) = axes.place(p);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        let _ = write!(
            svg,
            r#"<polyline class="curve" data-name="{name}" fill="none" stroke="{colour}" stroke-width="2"
                points="{}"/>"#,
            pts.join(" ")
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" fill="{colour}" font-size="12">{name}</text>"#,
            w - pad - 80.0,
            pad + 14.0 + 14.0 * i as f64
        );
    }
    svg + "</svg></figure>"
}

/// `s` safe inside HTML text.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The table rows of the newest 20 changes of the active version, the
/// newest first (read from the newest back: never the whole history).
fn history_rows(ctx: &HttpContext) -> Result<String> {
    let entries = match &ctx.store {
        Some(store) => crate::versions::history_page(store, None, Some(20))?.entries,
        None => Vec::new(),
    };
    let mut rows = String::new();
    for h in entries.iter().rev() {
        let from = h.from.map_or("-".to_string(), |v| format!("v{v}"));
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{from}</td><td>v{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&h.at),
            h.to,
            h.why.as_str(),
            escape(&h.by),
            escape(h.reason.as_deref().unwrap_or(""))
        );
    }
    Ok(rows)
}

/// The whole page.
fn render_page(ctx: &HttpContext) -> Result<String> {
    let s = ctx.status.snapshot();
    let train: Vec<CurvePoint> = s.train_curve.iter().copied().collect();
    let eval: Vec<CurvePoint> = s.eval_curve.iter().copied().collect();
    let history = history_rows(ctx)?;
    let loss = |l: Option<crate::vae::learner::LossValues>| {
        l.map_or("-".into(), |l| {
            format!("{:.1} (recon {:.1}, KL {:.2})", l.total, l.recon, l.kl)
        })
    };
    Ok(format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>wmvae</title>{refresh}
<style>body{{font-family:sans-serif;margin:24px}} td,th{{padding:2px 10px;text-align:left}}
img{{image-rendering:pixelated;width:1024px}}</style></head><body>
<h1>wmvae: World Models VAE</h1>
<p>state <b>{state}</b> · step {step} · active <b>v{version}</b> · {ips:.0} images/s ·
buffer {frames} frames · device {device}</p>
<p>train loss {train_loss} · eval loss {eval_loss} · latents published {latents} · auto rollbacks {rollbacks}</p>
{train_chart}{eval_chart}
<h2>Validation frames (top) and their reconstructions by v{version} (bottom)</h2>
<img id="grid" alt="reconstructions" src="/recon.png" onload="this.dataset.loaded='yes'"
 onerror="this.dataset.loaded='no'">
{showcase}<h2>Active version history</h2>
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
        showcase = showcase::section(ctx, s.active_version.unwrap_or(0))?,
        refresh = match ctx.config.http.refresh_secs {
            0 => String::new(),
            secs => format!(r#"<meta http-equiv="refresh" content="{secs}">"#),
        },
    ))
}
