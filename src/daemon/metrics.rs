//! `/metrics`: the daemon's Prometheus series, through prometheus-client's
//! registry and text format. Most figures live elsewhere already (the
//! store's counters, the status board, the bus's connection), so a
//! [`Collector`] reads them at each scrape; the one series measured here is
//! the receive-to-latent latency histogram, which the encoder feeds.
//! Series names are pinned (dashboards depend on them). Reads only.

use super::status::{Status, StatusBoard};
use crate::bus::Bus;
use crate::store::Store;
use crate::vae::learner::LossValues;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// The registry behind `/metrics`.
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(status: StatusBoard, store: Option<Store>, bus: Bus) -> Metrics {
        let mut registry = Registry::with_prefix("wmvae");
        registry.register(
            "latent_latency_seconds",
            "From frame received to its latent published.",
            status.latent_latency().0.clone(),
        );
        registry.register_collector(Box::new(Figures { status, store, bus }));
        Metrics { registry }
    }

    /// The Prometheus text format (0.0.4); an error when a figure can't be read.
    pub fn render(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The figures read at scrape time.
#[derive(Clone)]
struct Figures {
    status: StatusBoard,
    /// The replay buffer, on a trainer node: its series only there.
    store: Option<Store>,
    bus: Bus,
}

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Figures")
    }
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: f64) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A gauge with a `kind` label per loss (total, recon, kl); nothing before the first value.
fn losses(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    losses: Option<LossValues>,
) -> Result<(), std::fmt::Error> {
    let Some(l) = losses else { return Ok(()) };
    let mut family = encoder.encode_descriptor(name, help, None, ConstGauge::new(0.0).metric_type())?;
    for (kind, value) in [("total", l.total), ("recon", l.recon), ("kl", l.kl)] {
        ConstGauge::new(value).encode(family.encode_family(&[("kind", kind)])?)?;
    }
    Ok(())
}

/// The active version's `active_units`, from its stored metadata; None
/// when it has none (older, initial or imported weights) or the store
/// can't say (logged: one series less, not a failed scrape).
fn active_units(store: &Store) -> Option<u32> {
    let registry = store.registry();
    let metadata = registry
        .active_version()
        .and_then(|active| active.map(|v| registry.metadata(v)).transpose());
    match metadata {
        Ok(metadata) => metadata.flatten().and_then(|m| m.active_units),
        Err(e) => {
            tracing::warn!("/metrics: reading the active version's metadata: {e:#}");
            None
        }
    }
}

impl Collector for Figures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.status.snapshot();
        let e = &mut encoder;
        if let Some(store) = &self.store {
            store_series(e, store)?;
        }
        training_series(e, &s)?;
        health_series(e, &s)?;
        self.bus_series(e)
    }
}

impl Figures {
    /// The bus's series: connected now, and disconnections so far.
    fn bus_series(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            e,
            "nats_connected",
            "1 while connected to NATS.",
            if self.bus.is_connected() { 1.0 } else { 0.0 },
        )?;
        counter(
            e,
            "nats_reconnects",
            "Disconnections from NATS (each followed by a reconnect).",
            self.bus.disconnects(),
        )
    }
}

/// The replay buffer's series, on a trainer node: frames in, duplicates, rejections, fill and size.
fn store_series(e: &mut DescriptorEncoder, store: &Store) -> Result<(), std::fmt::Error> {
    let stats = store.stats().map_err(|e| {
        tracing::warn!("/metrics: reading the store: {e:#}");
        std::fmt::Error
    })?;
    counter(
        e,
        "frames_ingested",
        "Frames made durable in the replay buffer.",
        stats.frames_ingested,
    )?;
    counter(
        e,
        "frames_duplicate",
        "Frames already stored, acked without storing.",
        stats.duplicates,
    )?;
    let mut rejected = e.encode_descriptor(
        "frames_rejected",
        "Frames dead-lettered, by reason.",
        None,
        ConstCounter::new(0u64).metric_type(),
    )?;
    for (reason, n) in &stats.rejected {
        ConstCounter::new(*n).encode(rejected.encode_family(&[("reason", reason.as_str())])?)?;
    }
    gauge(
        e,
        "buffer_frames",
        "Frames held in the replay buffer.",
        stats.frames as f64,
    )?;
    gauge(
        e,
        "buffer_capacity_frames",
        "Replay buffer capacity.",
        stats.capacity as f64,
    )?;
    gauge(
        e,
        "buffer_bytes",
        "Bytes on disk of the sled store.",
        stats.bytes_on_disk as f64,
    )?;
    if let Some(units) = active_units(store) {
        gauge(
            e,
            "active_units",
            "Latent dimensions the active version uses: posterior-mean variance over 0.01 across \
            held-out frames, measured when it was made.",
            f64::from(units),
        )?;
    }
    Ok(())
}

/// The status board's training series: steps, throughput, losses, skips and rollbacks, latents out.
fn training_series(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    counter(e, "train_steps", "Optimizer steps taken.", s.step.max(0) as u64)?;
    gauge(
        e,
        "train_images_per_second",
        "Training throughput over the last log window.",
        s.images_per_s,
    )?;
    losses(
        e,
        "train_loss",
        "Mean training loss of the last log window.",
        s.last_losses,
    )?;
    losses(e, "eval_loss", "Last eval loss on the validation split.", s.eval)?;
    counter(
        e,
        "train_skipped_steps",
        "Steps skipped by the divergence guard.",
        s.skipped_steps,
    )?;
    counter(
        e,
        "auto_rollbacks",
        "Automatic rollbacks after divergence.",
        s.auto_rollbacks,
    )?;
    counter(e, "latents_published", "Latents published.", s.latents_published)?;
    Ok(())
}

/// The status board's health series: failed store writes, and the versions in use.
fn health_series(e: &mut DescriptorEncoder, s: &Status) -> Result<(), std::fmt::Error> {
    counter(
        e,
        "store_write_errors",
        "Writes to the store (frame commits, checkpoints) that failed.",
        s.store_write_errors,
    )?;
    counter(
        e,
        "checkpoint_write_errors",
        "Checkpoints that could not be written to the store (no room on its \
        disk, or a write error); training goes on and the next checkpoint tries \
        again.",
        s.checkpoint_write_errors,
    )?;
    gauge(
        e,
        "store_writable",
        "1 while the store's last write succeeded, 0 while it fails (a full disk).",
        f64::from(u8::from(s.store_error.is_none())),
    )?;
    gauge(
        e,
        "active_version",
        "The active checkpoint version.",
        s.active_version.unwrap_or(0) as f64,
    )?;
    if let Some(version) = s.encoder_version {
        gauge(
            e,
            "encoder_version",
            "The version this node's latents name now.",
            version as f64,
        )?;
    }
    Ok(())
}
