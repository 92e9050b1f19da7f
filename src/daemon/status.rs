//! What this node is doing, as the `status` endpoint reports it: a small
//! board the trainer and the encoder write and the control service, the
//! metrics and the page read. No I/O beyond the store's counters.

use crate::config::Roles;
use crate::store::{Split, Store};
use crate::vae::learner::LossValues;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Upper bounds (seconds) of the receive-to-latent latency histogram.
const LATENCY_BUCKETS: [f64; 12] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0];

/// Frame received to latent published: observed by the encoder,
/// exported here. Clones share one histogram.
#[derive(Clone, Debug)]
pub struct LatentLatency(pub(super) Histogram);

impl Default for LatentLatency {
    fn default() -> LatentLatency {
        LatentLatency(Histogram::new(LATENCY_BUCKETS))
    }
}

impl LatentLatency {
    pub fn observe(&self, latency: Duration) {
        self.0.observe(latency.as_secs_f64());
    }
}

/// What the trainer is doing (the status JSON's `state`, strings pinned).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainerState {
    #[default]
    #[serde(rename = "starting")]
    Starting,
    #[serde(rename = "waiting for frames")]
    WaitingForFrames,
    #[serde(rename = "throttled")]
    Throttled,
    #[serde(rename = "training")]
    Training,
    #[serde(rename = "stopping")]
    Stopping,
    /// Another trainer node holds the lease: this one keeps its buffer
    /// current and waits to take over.
    #[serde(rename = "standby")]
    Standby,
}

impl TrainerState {
    pub fn as_str(self) -> &'static str {
        match self {
            TrainerState::Starting => "starting",
            TrainerState::WaitingForFrames => "waiting for frames",
            TrainerState::Throttled => "throttled",
            TrainerState::Training => "training",
            TrainerState::Stopping => "stopping",
            TrainerState::Standby => "standby",
        }
    }
}

/// What the encoder is doing (the status JSON's `encoder_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EncoderState {
    /// No version announced yet: the frame consumer stays idle.
    #[serde(rename = "waiting for a version")]
    WaitingForVersion,
    #[serde(rename = "encoding")]
    Encoding,
}

/// A trainer node's part in the lease (the status JSON's `lease`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseRole {
    /// Holds the training lease: trains, checkpoints, announces.
    Leader,
    /// Waits to take over.
    Standby,
}

/// Points kept per loss curve (oldest dropped): enough for the page.
const MAX_CURVE_POINTS: usize = 1000;
/// A point of a loss curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CurvePoint {
    pub step: i64,
    pub loss: f64,
}

fn push_bounded(curve: &mut VecDeque<CurvePoint>, point: CurvePoint) {
    if curve.len() == MAX_CURVE_POINTS {
        curve.pop_front();
    }
    curve.push_back(point);
}

/// A role's loop that must keep going round: each beats at every round,
/// idle or not, and `/healthz` fails when one has not beaten for
/// `[serve] heartbeat_max_age_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Heart {
    /// The training loop: a step, a standby's look at the lease, an idle pause.
    Trainer,
    /// Ingest's commit stage: a batch committed, or an idle tick through the pipeline.
    Ingest,
    /// The encoder's worker thread: a micro-batch, or an idle tick through its queue.
    Encoder,
}

/// How often an idle loop beats (an empty round through it): well within
/// the shortest `heartbeat_max_age_secs` allowed, and cheap (a wakeup).
pub const IDLE_TICK: Duration = Duration::from_secs(1);

impl Heart {
    fn as_str(self) -> &'static str {
        match self {
            Heart::Trainer => "the trainer loop",
            Heart::Ingest => "ingest",
            Heart::Encoder => "the encoder",
        }
    }
}

/// The `status` endpoint's JSON (keys pinned); read back by the benches.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    /// What this node runs: "trainer", "encoder" or both.
    pub roles: Vec<String>,
    /// `[node] id` ("" for a single node).
    pub node_id: String,
    pub hostname: String,
    /// The trainer's state; null on a node without the trainer role.
    pub state: Option<TrainerState>,
    /// The encoder's state; null on a node without the encoder role.
    pub encoder_state: Option<EncoderState>,
    /// The version the encoder's latents name now.
    pub encoder_version: Option<u64>,
    /// A trainer node: whether it holds the training lease ("leader") or
    /// waits ("standby"); null elsewhere.
    pub lease: Option<LeaseRole>,
    /// The lease epoch this node trains under (leaders only).
    pub epoch: Option<u64>,
    pub step: i64,
    pub active_version: Option<u64>,
    pub buffer_frames: u64,
    pub train_frames: u64,
    pub validation_frames: u64,
    pub images_per_s: f64,
    pub last_losses: Option<LossValues>,
    pub eval: Option<LossValues>,
    pub device: String,
    pub skipped_steps: u64,
    pub auto_rollbacks: u64,
    pub latents_published: u64,
    /// Writes to the store (frame commits, checkpoints) that failed.
    pub store_write_errors: u64,
    /// Why the store's last write failed, until one succeeds (a full disk).
    pub store_error: Option<String>,
    /// Checkpoints that could not be written (also in `store_write_errors`).
    pub checkpoint_write_errors: u64,
    /// Why the last checkpoint could not be written, until one is: training
    /// goes on from memory and the next checkpoint tries again.
    pub checkpoint_error: Option<String>,
    /// When each role's loop last went round.
    #[serde(skip)]
    pub beats: std::collections::BTreeMap<Heart, Instant>,
    /// When frames were last committed to the store.
    #[serde(skip)]
    pub last_commit: Option<Instant>,
    /// Train loss (mean of each log window) over steps, for the page.
    #[serde(skip)]
    pub train_curve: VecDeque<CurvePoint>,
    /// Eval loss over steps.
    #[serde(skip)]
    pub eval_curve: VecDeque<CurvePoint>,
}

impl Status {
    pub fn record_train(&mut self, step: i64, loss: f64) {
        push_bounded(&mut self.train_curve, CurvePoint { step, loss });
    }

    pub fn record_eval(&mut self, step: i64, loss: f64) {
        push_bounded(&mut self.eval_curve, CurvePoint { step, loss });
    }
}

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct StatusBoard {
    status: Arc<Mutex<Status>>,
    /// The replay buffer, on a trainer node.
    store: Option<Store>,
    latent_latency: LatentLatency,
}

impl StatusBoard {
    pub fn new(roles: Roles, node_id: &str, store: Option<Store>, device: String) -> StatusBoard {
        let status = Status {
            roles: roles.to_string().split(',').map(str::to_string).collect(),
            node_id: node_id.to_string(),
            hostname: crate::config::hostname(),
            state: roles.trainer.then_some(TrainerState::Starting),
            device,
            ..Default::default()
        };
        StatusBoard {
            status: Arc::new(Mutex::new(status)),
            store,
            latent_latency: LatentLatency::default(),
        }
    }

    pub fn update(&self, change: impl FnOnce(&mut Status)) {
        change(&mut self.status.lock().unwrap());
    }

    /// Frame received to latent published (the encoder observes it).
    pub fn latent_latency(&self) -> &LatentLatency {
        &self.latent_latency
    }

    /// A write to the store failed (`error`).
    pub fn store_failed(&self, error: &crate::store::Error) {
        self.update(|s| (s.store_write_errors, s.store_error) = (s.store_write_errors + 1, Some(format!("{error:#}"))));
    }

    /// `heart`'s loop went round.
    pub fn beat(&self, heart: Heart) {
        self.update(|s| {
            s.beats.insert(heart, Instant::now());
        });
    }

    /// A checkpoint could not be written (`error`): counted and kept for
    /// the status, not a store that can't write (frames may still go in).
    pub fn checkpoint_failed(&self, error: &crate::store::Error) {
        self.update(|s| {
            (s.store_write_errors, s.checkpoint_write_errors) =
                (s.store_write_errors + 1, s.checkpoint_write_errors + 1);
            s.checkpoint_error = Some(format!("{error:#}"));
        });
    }

    /// A checkpoint was written.
    pub fn checkpoint_written(&self) {
        self.update(|s| s.checkpoint_error = None);
    }

    /// A write to the store succeeded (not frames: [`StatusBoard::committed`]).
    pub fn store_writes(&self) {
        self.update(|s| s.store_error = None);
    }

    /// Frames were committed: the store writes.
    pub fn committed(&self) {
        self.update(|s| (s.store_error, s.last_commit) = (None, Some(Instant::now())));
    }

    /// When frames were last committed to the store.
    pub fn last_commit(&self) -> Option<Instant> {
        self.status.lock().unwrap().last_commit
    }

    /// What makes this node unhealthy now, besides NATS: a store that
    /// can't write or a write to it in flight for longer than `max_age`, a
    /// role's loop that has not gone round for `max_age`.
    pub fn problems(&self, max_age: Duration) -> Vec<String> {
        let s = self.status.lock().unwrap();
        let mut problems = Vec::new();
        if let Some(error) = &s.store_error {
            problems.push(format!("the store can't write: {error}"));
        }
        if let Some(stuck) = self
            .store
            .as_ref()
            .and_then(Store::oldest_write)
            .filter(|a| *a > max_age)
        {
            problems.push(format!(
                "a store write has not returned for {:.0} s",
                stuck.as_secs_f64()
            ));
        }
        for (heart, beat) in s.beats.iter().filter(|(_, b)| b.elapsed() > max_age) {
            problems.push(format!(
                "{} has not gone round for {:.0} s",
                heart.as_str(),
                beat.elapsed().as_secs_f64()
            ));
        }
        problems
    }

    /// The status now, with the buffer's sizes read live.
    pub fn snapshot(&self) -> Status {
        let mut status = self.status.lock().unwrap().clone();
        if let Some(store) = &self.store {
            status.train_frames = store.len(Split::Train);
            status.validation_frames = store.len(Split::Validation);
            status.buffer_frames = status.train_frames + status.validation_frames;
        }
        status
    }
}
