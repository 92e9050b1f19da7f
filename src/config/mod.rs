//! The one configuration: `config/default.toml` compiled in as the defaults,
//! an optional file on top, then environment variables
//! `WMVAE_<SECTION>__<KEY>` (e.g. `WMVAE_TRAIN__BATCH_SIZE=64`) on top of
//! that, layered by figment ([`sources`]). Unknown sections and keys are
//! errors naming the key and where it came from, so a typo never silently
//! does nothing. Each section's type checks its own bounds beside it
//! ([`nats`], [`serve`], [`pipeline`], [`train`]; `[buffer]` is
//! `store::BufferConfig`, `[model]` `vae::model::VaeConfig`);
//! [`Config::validate`] runs them all. This module parses and validates; it
//! opens no connections.

mod nats;
mod pipeline;
mod serve;
mod sources;
mod train;

pub use nats::{NatsConfig, Secret};
pub use pipeline::{IngestConfig, LatentsConfig, StoreConfig, MAX_INGEST_BATCH, MAX_LATENT_BATCH};
pub use serve::{check_lease_ttl, HttpConfig, NodeConfig, Roles, ServeConfig};
pub use train::{TrainConfig, MAX_BATCH_SIZE};

use crate::store::BufferConfig;
use crate::vae::adam::AdamConfig;
use crate::vae::model::VaeConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The documented defaults, shipped in the binary so it runs without files.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub serve: ServeConfig,
    pub node: NodeConfig,
    pub store: StoreConfig,
    pub buffer: BufferConfig,
    pub ingest: IngestConfig,
    pub latents: LatentsConfig,
    pub http: HttpConfig,
    pub model: VaeConfig,
    pub train: TrainConfig,
}

impl Config {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment passed in (for tests).
    pub fn load_with_env(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Config> {
        let figment = sources::layers(DEFAULT_TOML, file, env)?;
        let config: Config = figment.extract().map_err(|error| sources::explain(error, &figment))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every bound, section by section (each beside its type); `load`
    /// calls it, and so must whoever changes a loaded config. No bound yet
    /// spans two sections.
    pub fn validate(&self) -> Result<()> {
        self.nats.validate()?;
        self.http.validate()?;
        self.node.validate()?;
        self.serve.validate()?;
        self.store.validate()?;
        self.buffer.validate()?;
        self.ingest.validate()?;
        self.model.validate()?;
        self.train.validate()?;
        self.latents.validate()
    }

    /// The `[model]` section (a copy).
    pub fn vae(&self) -> VaeConfig {
        self.model
    }

    /// The optimizer of the `[train]` section.
    pub fn adam(&self) -> AdamConfig {
        self.train.adam()
    }
}

/// This machine's name (the kernel's), for status replies and for who
/// made a change; "localhost" if it can't be read.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests;
