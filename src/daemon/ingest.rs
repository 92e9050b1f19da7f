//! The ingest loop: batches of frame deliveries from the bus are decoded,
//! made durable in the store by one group commit, and only then acked; bad
//! frames are dead-lettered with their reason and terminated.
//!
//! Backpressure is structural: a fixed number of batches is in flight, the
//! consumer's `max_ack_pending` caps what the server hands out, so a slow
//! disk slows pulling instead of growing memory. Nothing here decodes
//! MessagePack itself (`wire`) or touches sled or NATS directly.

use super::status::{Heart, StatusBoard, IDLE_TICK};
use super::supervisor::Supervisor;
use super::undeliverable::{self, Failures};
use crate::backoff::Backoff;
use crate::bus::{Bus, Delivery, FrameConsumer, FrameFeed};
use crate::config::IngestConfig;
use crate::frames::preprocess::Policy;
use crate::frames::wire::{self, Reason, Rejection};
use crate::frames::Frame;
use crate::store::{compress_frames, Committed, Compressed, Store};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{Receiver, Sender};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often one reason may be logged: bad publishers must not flood logs.
const REJECTION_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// How often the loop reports its throughput.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// A batch the store could not write (a full disk) is held and its commit
/// tried again after this pause, doubled at each failure in a row up to
/// [`STORE_RETRY_LONGEST`]; meanwhile its frames are marked in progress so
/// the server neither redelivers them nor counts a delivery towards
/// `max_deliver` (a full disk is not the frames' fault). A disk with room
/// again is noticed within the longest pause.
const STORE_RETRY_FIRST: Duration = Duration::from_secs(1);
const STORE_RETRY_LONGEST: Duration = Duration::from_secs(15);

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
                tracing::warn!(
                    subject,
                    reason = rejection.reason.code(),
                    suppressed,
                    "frame dead-lettered: {}",
                    rejection.detail
                );
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

/// Batches fetched ahead of the one being prepared: fetching overlaps the
/// rest, and memory stays bounded (see [`run`]).
const PIPELINE_DEPTH: usize = 1;

/// One batch decoded and compressed, waiting for its commit.
struct Prepared {
    batch: Vec<Delivery>,
    /// Per delivery: why it was rejected, if it was.
    rejections: Vec<Option<Rejection>>,
    frames: Vec<Frame>,
    compressed: Compressed,
}

/// Runs until `shutdown`; returns after the batches in flight are committed
/// and acked. Three stages, each its own task, joined by bounded channels:
/// fetch (the bus), prepare (decode and compress, off the runtime), commit
/// (the store's group commit, then acks). The next batch is prepared while
/// the current one commits; at most `PIPELINE_DEPTH + 3` batches are in
/// memory (queued, preparing, prepared, committing).
/// Frames come through this node's own consumer (`node_id`'s). A batch the
/// store can't write is held and retried while its disk is full (the
/// status board says so, for /healthz); once the disk takes writes again
/// and the store still can't, ingest ends with the reason. Frames the
/// consumer gives up on (`max_deliver`) are dead-lettered with the last
/// error seen (`undeliverable`).
/// Its stages run under `supervisor`; an idle feed sends an empty batch
/// through them every [`IDLE_TICK`], so ingest's heartbeat shows the whole
/// pipeline going round.
pub async fn run(
    bus: Bus,
    store: Store,
    config: IngestConfig,
    node_id: String,
    status: StatusBoard,
    supervisor: Supervisor,
) -> Result<()> {
    let shutdown = supervisor.shutdown().clone();
    let consumer = FrameConsumer::ingest(&node_id);
    let feed = bus.frame_feed(consumer.clone()).await?;
    let failures = Failures::default();
    let forwarder = supervisor.spawn(
        "ingest's dead letters",
        undeliverable::forward(bus.clone(), consumer, failures.clone(), shutdown.clone()),
    );
    let (fetcher, preparer, mut prepared) = spawn_stages(&supervisor, feed, &config, &shutdown);
    let mut log = RejectionLog::default();
    let mut progress = Progress::new();
    // In-progress marks must come well within ack_wait, or the held frames come back.
    let longest = STORE_RETRY_LONGEST.min(Duration::from_secs(config.ack_wait_secs) / 2);
    let mut store_pause = Backoff::new(STORE_RETRY_FIRST.min(longest), longest);
    while let Some(Prepared {
        batch,
        rejections,
        frames,
        compressed,
    }) = prepared.recv().await
    {
        status.beat(Heart::Ingest);
        if batch.is_empty() {
            continue; // an idle tick
        }
        let reasons: Vec<Reason> = rejections.iter().flatten().map(|r: &Rejection| r.reason).collect();
        let Some(committed) = commit_holding(
            &store,
            &batch,
            frames,
            compressed,
            reasons,
            &status,
            &mut store_pause,
            &shutdown,
        )
        .await?
        else {
            break; // shutdown while the disk was full: the batch comes back
        };
        crash_point!("ingest-before-ack");
        let settled = settle(&bus, &batch, rejections, &mut log).await;
        progress.record(&committed, settled, &batch, &failures);
        progress.log_when_due(&store);
    }
    drop(prepared);
    // Their failures are the supervisor's to report; here only their end is awaited.
    let _ = tokio::join!(fetcher, preparer, forwarder);
    tracing::info!("ingest stopped");
    Ok(())
}

/// Spawns the fetch and prepare stages under `supervisor`; prepared batches come out of the receiver.
fn spawn_stages(
    supervisor: &Supervisor,
    feed: FrameFeed,
    config: &IngestConfig,
    shutdown: &CancellationToken,
) -> (JoinHandle<Result<()>>, JoinHandle<Result<()>>, Receiver<Prepared>) {
    let (batches, incoming) = tokio::sync::mpsc::channel::<Vec<Delivery>>(PIPELINE_DEPTH);
    let (ready, prepared) = tokio::sync::mpsc::channel::<Prepared>(1);
    let max_wait = Duration::from_millis(config.batch_max_wait_ms);
    let max_frames = config.batch_max_frames;
    let fetcher = supervisor.spawn(
        "ingest's fetch",
        fetch_stage(feed, batches, max_frames, max_wait, shutdown.clone()),
    );
    let preparer = supervisor.spawn("ingest's prepare", prepare_stage(incoming, ready, config.preprocess));
    (fetcher, preparer, prepared)
}

/// The fetch stage: batches from the bus into `batches` until `shutdown`.
async fn fetch_stage(
    mut feed: FrameFeed,
    batches: Sender<Vec<Delivery>>,
    max_frames: usize,
    max_wait: Duration,
    shutdown: CancellationToken,
) -> Result<()> {
    while !shutdown.is_cancelled() {
        // Empty when idle: a tick through the pipeline.
        let batch = feed.next_batch(max_frames, max_wait, IDLE_TICK, &shutdown).await?;
        if (batch.is_empty() && shutdown.is_cancelled()) || batches.send(batch).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The prepare stage: each fetched batch decoded and compressed off the runtime, then passed on to commit.
async fn prepare_stage(mut incoming: Receiver<Vec<Delivery>>, ready: Sender<Prepared>, policy: Policy) -> Result<()> {
    while let Some(batch) = incoming.recv().await {
        let prepared = tokio::task::spawn_blocking(move || prepare(batch, policy))
            .await
            .context("ingest prepare worker")?;
        if ready.send(prepared).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// What ingest has done since its last progress line.
struct Progress {
    since_log: BatchOutcome,
    last_log: Instant,
}

impl Progress {
    /// Nothing counted yet; the first line comes one interval from now.
    fn new() -> Progress {
        Progress {
            since_log: BatchOutcome::default(),
            last_log: Instant::now(),
        }
    }

    /// Counts a committed batch once settled; one not all acked has its frames' error kept for the dead letters.
    fn record(&mut self, committed: &Committed, settled: Result<u64>, batch: &[Delivery], failures: &Failures) {
        match settled {
            Ok(rejected) => {
                self.since_log.stored += committed.stored();
                self.since_log.duplicates += committed.duplicates;
                self.since_log.rejected += rejected;
            }
            Err(e) => {
                let size = batch.len();
                tracing::error!(
                    "ingest: a committed batch of {size} was not all acked ({e:#}); its frames come back \
                    and are found stored"
                );
                batch.iter().for_each(|d| failures.record(d.stream_sequence, &e));
            }
        }
    }

    /// Logs the throughput once [`PROGRESS_LOG_INTERVAL`] has passed, then counts afresh.
    fn log_when_due(&mut self, store: &Store) {
        if self.last_log.elapsed() >= PROGRESS_LOG_INTERVAL {
            let secs = self.last_log.elapsed().as_secs_f64();
            let since_log = &self.since_log;
            tracing::info!(
                stored = since_log.stored,
                duplicates = since_log.duplicates,
                rejected = since_log.rejected,
                frames_per_s = (since_log.stored as f64 / secs).round(),
                buffer_frames = store.stats().map(|s| s.frames).unwrap_or(0),
                "ingest"
            );
            (self.since_log, self.last_log) = (BatchOutcome::default(), Instant::now());
        }
    }
}

/// Commits a prepared batch; while the store can't write (a full disk) the
/// batch is held, its frames marked in progress, and the commit tried again
/// after `pause` (the status board says why, for /healthz). Ok(None) on
/// `shutdown` meanwhile; an error once the disk takes writes again but the
/// store still can't ([`crate::store::Error::NeedsReopen`]).
#[allow(clippy::too_many_arguments)]
async fn commit_holding(
    store: &Store,
    batch: &[Delivery],
    frames: Vec<Frame>,
    compressed: Compressed,
    reasons: Vec<Reason>,
    status: &StatusBoard,
    pause: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<Option<Committed>> {
    let (mut frames, mut compressed, mut reasons) = (frames, Some(compressed), reasons);
    loop {
        let store_for_commit = store.clone();
        // Compressed once; a retry (rare: a full disk) compresses again.
        let pixels = compressed.take().unwrap_or_else(|| compress_frames(&frames));
        // The flush blocks: off the runtime.
        let (back, back_reasons, committed) = tokio::task::spawn_blocking(move || {
            let committed = store_for_commit.commit(&frames, pixels, &reasons);
            (frames, reasons, committed)
        })
        .await
        .context("ingest commit worker")?;
        (frames, reasons) = (back, back_reasons);
        let e = match committed {
            Ok(committed) => {
                status.committed();
                pause.reset();
                return Ok(Some(committed));
            }
            Err(e) => e,
        };
        status.store_failed(&e);
        status.beat(Heart::Ingest);
        store.check_write_failure(&e)?;
        tracing::error!(
            "ingest: the store can't write ({e:#}); a batch of {} held, its commit tried again in {:?}",
            batch.len(),
            pause.next
        );
        for delivery in batch {
            if let Err(e) = delivery.in_progress().await {
                tracing::warn!("ingest: {e:#}; the frame may come back after ack_wait");
            }
        }
        if !pause.wait(shutdown).await {
            return Ok(None);
        }
    }
}

/// Decodes (PNG, resize) and compresses one batch: blocking CPU work.
fn prepare(batch: Vec<Delivery>, policy: Policy) -> Prepared {
    let mut frames = Vec::with_capacity(batch.len());
    let mut rejections = Vec::with_capacity(batch.len());
    for delivery in &batch {
        match wire::decode_frame(&delivery.source, &delivery.payload, policy) {
            Ok(frame) => {
                frames.push(frame);
                rejections.push(None);
            }
            Err(rejection) => rejections.push(Some(rejection)),
        }
    }
    let compressed = compress_frames(&frames);
    Prepared {
        batch,
        rejections,
        frames,
        compressed,
    }
}

/// After its commit: acks each valid delivery, dead-letters and
/// terminates each rejected one. Returns how many were rejected.
async fn settle(
    bus: &Bus,
    batch: &[Delivery],
    rejections: Vec<Option<Rejection>>,
    log: &mut RejectionLog,
) -> Result<u64> {
    let mut rejected = 0;
    for (delivery, rejection) in batch.iter().zip(rejections) {
        match rejection {
            None => delivery.ack().await?,
            Some(rejection) => {
                bus.dead_letter(delivery, &rejection.to_string()).await?;
                delivery.terminate().await?;
                log.record(&rejection, &delivery.subject);
                rejected += 1;
            }
        }
    }
    Ok(rejected)
}
