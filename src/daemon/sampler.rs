//! A prefetching sampler: a thread that keeps a few uniformly drawn batches
//! ready, so the trainer does not wait on sled when it can be helped. It
//! draws nothing until the split holds `min_frames`, so the first batches
//! come from a buffer as full as training asks. Reads the store; never writes.

use crate::store::{Split, Store};
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Batches kept ready: enough to hide a slow read, few enough to stay fresh.
const PREFETCH_BATCHES: usize = 4;
/// Pause while the split holds too few frames.
const EMPTY_SPLIT_PAUSE: Duration = Duration::from_millis(50);

pub struct Sampler {
    batches: Option<Receiver<Vec<u8>>>,
    /// Set when the trainer is done: the thread stops at its next pause.
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts drawing batches of `batch_size` frames from `split` once it
    /// holds `min_frames`.
    pub fn start(store: Store, split: Split, batch_size: usize, min_frames: u64) -> Result<Sampler> {
        let (ready, batches) = sync_channel(PREFETCH_BATCHES);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("wmvae-sampler".into())
            .spawn(move || {
                let mut rng = rand::thread_rng();
                while !stopped.load(Ordering::Relaxed) {
                    if store.len(split) < min_frames.max(1) {
                        std::thread::sleep(EMPTY_SPLIT_PAUSE);
                        continue;
                    }
                    match store.sample(split, batch_size, &mut rng) {
                        // Err: the trainer dropped its end; stop.
                        Ok(Some(batch)) => {
                            if ready.send(batch).is_err() {
                                break;
                            }
                        }
                        Ok(None) => std::thread::sleep(EMPTY_SPLIT_PAUSE),
                        Err(e) => {
                            tracing::error!("sampler: {e:#}");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })
            .context("spawning the sampler thread")?;
        Ok(Sampler { batches: Some(batches), stop, thread: Some(thread) })
    }

    /// The next batch (64x64x3 frames, concatenated), or None after `wait`.
    pub fn next(&self, wait: Duration) -> Option<Vec<u8>> {
        self.batches.as_ref()?.recv_timeout(wait).ok()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.batches.take()); // unblocks the thread's send
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
