//! `wmvae serve`: opens the store, connects to NATS, applies the
//! migrations, and runs the ingest loop until the shutdown signal; then
//! finishes the batch in flight, flushes sled and returns.
//!
//! Wiring only: each part's behaviour lives in its own module.

use crate::bus::Bus;
use crate::config::Config;
use crate::ingest;
use crate::store::Store;
use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

/// One token cancelled by SIGTERM or Ctrl-C, passed down to every task.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: shutting down"),
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let store = Store::open(&config.store.data_dir, config.buffer)?;
    let stats = store.stats()?;
    tracing::info!(
        data_dir = %config.store.data_dir.display(),
        frames = stats.frames,
        capacity = stats.capacity,
        "replay buffer open"
    );
    let bus = Bus::connect(&config.nats).await?.with_tuning(config.ingest.consumer_tuning());
    let report = bus.migrate().await?;
    tracing::info!(url = %config.nats.url, migration = report.version, streams = ?report.streams, "NATS ready");
    let ingest = tokio::spawn(ingest::run(bus.clone(), store.clone(), config.ingest.clone(), shutdown.clone()));
    let result = ingest.await.context("ingest task")?;
    store.flush()?;
    tracing::info!("store flushed; bye");
    result
}
