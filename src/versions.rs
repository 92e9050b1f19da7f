//! What operators do to versions, over the store: the one implementation
//! behind `wmvae checkpoint ...`, used by the daemon when it runs (through
//! the control service and the trainer) and by the CLI when it does not, so
//! both give the same answers.
//!
//! No NATS and no tensors here: the model work (reconstructions, building a
//! checkpoint from foreign weights) is `vae`'s, and the trainer adds what
//! only a live daemon can do (switching the weights it trains and encodes with).

use crate::config::Config;
use crate::store::{best_by_eval, Change, HistoryEntry, Split, Store, UnknownVersion};
use crate::vae::checkpoint::{now_rfc3339, Checkpoint, Metadata};
use crate::vae::device::Device;
use crate::vae::learner::{Inference, Learner};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Frames shown by `checkpoint show --recon`: one row of originals over
/// one row of reconstructions.
pub const RECON_FRAMES: usize = 8;

/// One row of `checkpoint list` (JSON keys pinned).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Listed {
    pub version: u64,
    pub parent: Option<u64>,
    pub step: u64,
    pub created_at: String,
    pub eval_loss: Option<f64>,
    pub active: bool,
    pub pinned: bool,
    pub best: bool,
}

/// `checkpoint show`: the metadata and the marks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shown {
    #[serde(flatten)]
    pub metadata: Metadata,
    pub active: bool,
    pub pinned: bool,
    pub best: bool,
}

/// Every version with its marks, oldest first.
pub fn list(store: &Store) -> Result<Vec<Listed>> {
    let registry = store.registry();
    let all = registry.list()?;
    let active = registry.active_version()?;
    let pinned = registry.pinned()?;
    let best = best_by_eval(&all);
    Ok(all
        .into_iter()
        .map(|m| Listed {
            active: Some(m.version) == active,
            pinned: pinned.contains(&m.version),
            best: Some(m.version) == best,
            version: m.version,
            parent: m.parent,
            step: m.step,
            created_at: m.created_at,
            eval_loss: m.eval_loss,
        })
        .collect())
}

pub fn show(store: &Store, version: u64) -> Result<Shown> {
    let row = list(store)?.into_iter().find(|l| l.version == version).ok_or(UnknownVersion(version))?;
    let metadata = store.registry().metadata(version)?.ok_or(UnknownVersion(version))?;
    Ok(Shown { metadata, active: row.active, pinned: row.pinned, best: row.best })
}

pub fn history(store: &Store) -> Result<Vec<HistoryEntry>> {
    store.registry().history()
}

/// A stored version, verified, or UnknownVersion.
pub fn checkpoint(store: &Store, version: u64) -> Result<Checkpoint> {
    store.registry().get(version)?.ok_or_else(|| UnknownVersion(version).into())
}

/// A PNG of up to [`RECON_FRAMES`] validation frames (training frames if
/// the validation split is empty) over their reconstructions by `version`.
pub fn recon_png(store: &Store, version: u64, config: &Config) -> Result<Vec<u8>> {
    let mut net = Inference::new(Device::Cpu, config.vae());
    net.load_checkpoint_weights(&checkpoint(store, version)?)?;
    let split = if store.len(Split::Validation) > 0 { Split::Validation } else { Split::Train };
    let frames = store
        .sample(split, RECON_FRAMES, &mut rand::thread_rng())?
        .context("the replay buffer holds no frames to reconstruct")?;
    net.recon_png(&frames)
}

/// `by` when none is given: user@host.
pub fn default_actor() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    format!("{user}@{host}")
}

/// Builds and stores a new active version from foreign weights (strict
/// names and shapes: a bad file changes nothing), with fresh Adam state.
pub fn import(store: &Store, weights_bytes: &[u8], origin: &str, config: &Config, by: &str, reason: Option<&str>) -> Result<Checkpoint> {
    let mut learner = Learner::new(Device::Cpu, config.vae(), config.adam());
    learner.load_safetensors(weights_bytes, origin)?;
    let parent = store.registry().active_version()?;
    let metadata = Metadata { parent, created_at: now_rfc3339(), config: serde_json::to_value(config)?, ..Default::default() };
    store.registry().add(|version| learner.snapshot(Metadata { version, ..metadata }), Change::Import, by, reason)
}

/// Checks that safetensors `bytes` fit the model (strict names, shapes and
/// dtypes), so a bad file is refused before anything changes.
pub fn check_weights(bytes: &[u8], origin: &str, config: &Config) -> Result<()> {
    Inference::from_safetensors(Device::Cpu, config.vae(), bytes, origin).map(drop)
}

/// Makes `version` active (offline; the daemon does more, see `trainer`).
pub fn rollback(store: &Store, version: u64, by: &str, reason: Option<&str>) -> Result<Option<u64>> {
    store.registry().activate(version, Change::Rollback, by, reason)
}
