//! What the daemon is doing, as the `status` endpoint reports it: a small
//! board the trainer and the latent worker write and the control service
//! reads. No I/O beyond the store's counters.

use crate::learner::LossValues;
use crate::store::{Split, Store};
use serde::Serialize;
use std::sync::{Arc, Mutex};

/// Losses as JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Losses {
    pub total: f64,
    pub recon: f64,
    pub kl: f64,
}

impl From<LossValues> for Losses {
    fn from(v: LossValues) -> Losses {
        Losses { total: v.total, recon: v.recon, kl: v.kl }
    }
}

/// The `status` endpoint's JSON (keys pinned).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// "starting", "waiting for frames", "training", "throttled", "stopping".
    pub state: String,
    pub step: i64,
    pub active_version: Option<u64>,
    pub buffer_frames: u64,
    pub train_frames: u64,
    pub validation_frames: u64,
    pub images_per_s: f64,
    pub last_losses: Option<Losses>,
    pub eval: Option<Losses>,
    pub device: String,
    pub skipped_steps: u64,
    pub auto_rollbacks: u64,
    pub latents_published: u64,
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct StatusBoard {
    status: Arc<Mutex<Status>>,
    store: Store,
}

impl StatusBoard {
    pub fn new(store: Store, device: String) -> StatusBoard {
        let status = Status { state: "starting".into(), device, ..Default::default() };
        StatusBoard { status: Arc::new(Mutex::new(status)), store }
    }

    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.status.lock().unwrap());
    }

    /// The status now, with the buffer's sizes read live.
    pub fn snapshot(&self) -> Status {
        let mut status = self.status.lock().unwrap().clone();
        status.train_frames = self.store.len(Split::Train);
        status.validation_frames = self.store.len(Split::Validation);
        status.buffer_frames = status.train_frames + status.validation_frames;
        status
    }
}
