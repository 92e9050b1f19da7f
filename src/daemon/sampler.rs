//! A prefetching sampler: threads that keep a few uniformly drawn batches
//! ready, so the trainer does not wait on sled and LZ4 when it can be helped. It
//! draws nothing until the split holds `min_frames`, so the first batches
//! come from a buffer as full as training asks. Reads the store; never writes.

use super::supervisor::Supervisor;
use crate::store::{Split, Store};
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Batches kept ready: enough to hide a slow read, few enough to stay fresh.
const PREFETCH_BATCHES: usize = 4;
/// Threads drawing batches, at most (and at most one per core). One thread
/// draws a batch of 100 in ~3.7 ms here (~27k frames/s, measured on this
/// 2-core box), short of a GPU step's appetite (the bare step takes 17-26k
/// images/s on an H100 and is meant to double); idle ones wait on the full
/// queue, so they cost nothing while the step is the slower side.
const SAMPLER_THREADS: usize = 4;
/// The threads' names, one each.
const SAMPLER_NAMES: [&str; SAMPLER_THREADS] = ["sampler 0", "sampler 1", "sampler 2", "sampler 3"];
/// Pause after a draw that failed.
const SAMPLE_RETRY: Duration = Duration::from_secs(1);
/// Pause while the split holds too few frames.
const EMPTY_SPLIT_PAUSE: Duration = Duration::from_millis(50);

pub struct Sampler {
    batches: Option<Receiver<Vec<u8>>>,
    /// Set when the trainer is done: the threads stop at their next pause.
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<()>>>,
}

impl Sampler {
    /// Starts drawing batches of `batch_size` frames from `split` once it
    /// holds `min_frames`, on threads under `supervisor` (a panic there
    /// stops the daemon, saying why).
    pub fn start(
        store: Store,
        split: Split,
        batch_size: usize,
        min_frames: u64,
        supervisor: &Supervisor,
    ) -> Result<Sampler> {
        let (ready, batches) = sync_channel(PREFETCH_BATCHES);
        let stop = Arc::new(AtomicBool::new(false));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (0..SAMPLER_THREADS.min(cores))
            .map(|i| {
                let (store, ready, stopped) = (store.clone(), ready.clone(), stop.clone());
                supervisor
                    .thread(SAMPLER_NAMES[i], move || {
                        draw(&store, split, batch_size, min_frames, &ready, &stopped);
                        Ok(())
                    })
                    .context("spawning a sampler thread")
            })
            .collect::<Result<Vec<_>>>()
            .inspect_err(|_| stop.store(true, Ordering::Relaxed))?;
        Ok(Sampler {
            batches: Some(batches),
            stop,
            threads,
        })
    }

    /// The next batch (64x64x3 frames, concatenated), or None after `wait`.
    pub fn next(&self, wait: Duration) -> Option<Vec<u8>> {
        self.batches.as_ref()?.recv_timeout(wait).ok()
    }
}

/// One sampler thread's loop: draws batches into `ready` until `stopped`
/// is set or the trainer drops its end.
fn draw(
    store: &Store,
    split: Split,
    batch_size: usize,
    min_frames: u64,
    ready: &SyncSender<Vec<u8>>,
    stopped: &AtomicBool,
) {
    let mut rng = rand::thread_rng();
    while !stopped.load(Ordering::Relaxed) {
        fail::fail_point!("sampler-draw");
        if store.len(split) < min_frames.max(1) {
            std::thread::sleep(EMPTY_SPLIT_PAUSE);
            continue;
        }
        match store.sample(split, batch_size, &mut rng) {
            Ok(Some(batch)) => {
                if ready.send(batch).is_err() {
                    return; // the trainer dropped its end
                }
            }
            Ok(None) => std::thread::sleep(EMPTY_SPLIT_PAUSE),
            // A read that failed (a damaged chunk) is tried again: said, and paused.
            Err(e) => {
                tracing::error!("sampler: {e:#}; drawing again in {SAMPLE_RETRY:?}");
                std::thread::sleep(SAMPLE_RETRY);
            }
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.batches.take()); // unblocks the threads' sends
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}
