//! The ingest loop: batches of frame deliveries from the bus are decoded,
//! made durable in the store by one group commit, and only then acked; bad
//! frames are dead-lettered with their reason and terminated.
//!
//! Backpressure is structural: one batch is in flight at a time, the
//! consumer's `max_ack_pending` caps what the server hands out, so a slow
//! disk slows pulling instead of growing memory. Nothing here decodes
//! MessagePack itself (`wire`) or touches sled or NATS directly.

use crate::bus::{Bus, Delivery};
use crate::config::IngestConfig;
use crate::latents::LatentWorker;
use crate::store::Store;
use crate::wire::{self, Frame, Reason, Rejection};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often one reason may be logged: bad publishers must not flood logs.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How often the loop reports its throughput.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Pause after a failed commit before pulling again (the batch is redelivered).
const COMMIT_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Logs each rejection reason at most once per interval, with a count of
/// what was suppressed meanwhile.
#[derive(Default)]
struct RejectionLog {
    last: HashMap<Reason, (Instant, u64)>,
}

impl RejectionLog {
    fn record(&mut self, rejection: &Rejection, subject: &str) {
        let now = Instant::now();
        match self.last.get_mut(&rejection.reason) {
            Some((at, suppressed)) if now.duration_since(*at) < REJECTION_LOG_INTERVAL => *suppressed += 1,
            entry => {
                let suppressed = entry.map(|(_, n)| *n).unwrap_or(0);
                tracing::warn!(subject, reason = rejection.reason.code(), suppressed, "frame dead-lettered: {}", rejection.detail);
                self.last.insert(rejection.reason, (now, 0));
            }
        }
    }
}

/// Counts of one processed batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct BatchOutcome {
    pub stored: u64,
    pub duplicates: u64,
    pub rejected: u64,
}

/// Batches fetched ahead of the one being committed: fetching overlaps the
/// commit, and memory stays at (1 + this) batches.
const PIPELINE_DEPTH: usize = 2;

/// Runs until `shutdown`; returns after the batches in flight are committed
/// and acked. A fetch task fills a bounded channel; this loop drains it.
/// Newly stored frames go to `latents` (when given) for their latents.
pub async fn run(bus: Bus, store: Store, config: IngestConfig, latents: Option<LatentWorker>, shutdown: CancellationToken) -> Result<()> {
    let mut feed = bus.frame_feed().await?;
    let (batches, mut incoming) = tokio::sync::mpsc::channel::<Vec<Delivery>>(PIPELINE_DEPTH);
    let max_wait = Duration::from_millis(config.batch_max_wait_ms);
    let max_frames = config.batch_max_frames;
    let fetch_shutdown = shutdown.clone();
    let fetcher = tokio::spawn(async move {
        while !fetch_shutdown.is_cancelled() {
            let batch = feed.next_batch(max_frames, max_wait, &fetch_shutdown).await?;
            if batch.is_empty() || batches.send(batch).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    let mut log = RejectionLog::default();
    let mut since_log = BatchOutcome::default();
    let mut last_log = Instant::now();
    while let Some(batch) = incoming.recv().await {
        match process(&bus, &store, &config, &batch, latents.as_ref(), &mut log).await {
            Ok(done) => {
                since_log.stored += done.stored;
                since_log.duplicates += done.duplicates;
                since_log.rejected += done.rejected;
            }
            Err(e) => {
                tracing::error!("ingest batch of {} failed, it will be redelivered: {e:#}", batch.len());
                tokio::time::sleep(COMMIT_RETRY_DELAY).await;
            }
        }
        if last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
            let secs = last_log.elapsed().as_secs_f64();
            tracing::info!(
                stored = since_log.stored,
                duplicates = since_log.duplicates,
                rejected = since_log.rejected,
                frames_per_s = (since_log.stored as f64 / secs).round(),
                buffer_frames = store.stats().map(|s| s.frames).unwrap_or(0),
                "ingest"
            );
            (since_log, last_log) = (BatchOutcome::default(), Instant::now());
        }
    }
    fetcher.await.context("ingest fetch task")??;
    tracing::info!("ingest stopped");
    Ok(())
}

/// Decode, commit, then ack or dead-letter each delivery of one batch.
async fn process(
    bus: &Bus,
    store: &Store,
    config: &IngestConfig,
    batch: &[Delivery],
    latents: Option<&LatentWorker>,
    log: &mut RejectionLog,
) -> Result<BatchOutcome> {
    let inputs: Vec<(String, bytes::Bytes, std::time::Instant)> = batch.iter().map(|d| (d.source.clone(), d.payload.clone(), d.received_at)).collect();
    let policy = config.preprocess;
    let store = store.clone();
    // Decoding (PNG, resize) and the flush are blocking work: off the runtime.
    let (rejections, committed, mut frames) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut frames = Vec::with_capacity(inputs.len());
        let mut rejections = Vec::with_capacity(inputs.len());
        for (source, payload, received_at) in &inputs {
            match wire::decode_frame(source, payload, policy) {
                Ok(frame) => {
                    frames.push(Frame { received_at: Some(*received_at), ..frame });
                    rejections.push(None);
                }
                Err(rejection) => rejections.push(Some(rejection)),
            }
        }
        let reasons: Vec<Reason> = rejections.iter().flatten().map(|r: &Rejection| r.reason).collect();
        let committed = store.commit(&frames, &reasons)?;
        Ok((rejections, committed, frames))
    })
    .await
    .context("ingest worker")??;
    let mut outcome = BatchOutcome { stored: committed.stored(), duplicates: committed.duplicates, rejected: 0 };
    for (delivery, rejection) in batch.iter().zip(rejections) {
        match rejection {
            None => delivery.ack().await?,
            Some(rejection) => {
                bus.dead_letter(delivery, &rejection.to_string()).await?;
                delivery.terminate().await?;
                log.record(&rejection, &delivery.subject);
                outcome.rejected += 1;
            }
        }
    }
    if let Some(latents) = latents {
        // Highest index first, so each swap_remove leaves lower indices in place.
        let mut stored: Vec<Frame> = committed.stored_indices.iter().rev().map(|&i| frames.swap_remove(i)).collect();
        stored.reverse();
        latents.submit(stored).await?;
    }
    Ok(outcome)
}
