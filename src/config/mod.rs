//! The one configuration: `config/default.toml` compiled in as the defaults,
//! an optional file on top, then environment variables
//! `WMVAE_<SECTION>__<KEY>` (e.g. `WMVAE_TRAIN__BATCH_SIZE=64`) on top of
//! that. Unknown keys are errors, so a typo never silently does nothing. Each section's type checks its own bounds beside it
//! ([`nats`], [`serve`], [`pipeline`], [`train`]; `[buffer]` is
//! `store::BufferConfig`, `[model]` `vae::model::VaeConfig`);
//! [`Config::validate`] runs them all. This module parses and validates; it
//! opens no connections.

mod nats;
mod pipeline;
mod serve;
mod train;

pub use nats::{NatsConfig, Secret};
pub use pipeline::{IngestConfig, LatentsConfig, StoreConfig, MAX_INGEST_BATCH, MAX_LATENT_BATCH};
pub use serve::{HttpConfig, NodeConfig, Roles, ServeConfig};
pub use train::{TrainConfig, MAX_BATCH_SIZE};

use crate::store::BufferConfig;
use crate::vae::adam::AdamConfig;
use crate::vae::model::VaeConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The documented defaults, shipped in the binary so it runs without files.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");
/// Prefix of overriding environment variables.
const ENV_PREFIX: &str = "WMVAE_";

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
        let mut merged: toml::Table = DEFAULT_TOML.parse().context("built-in config/default.toml")?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
            let table: toml::Table = text.parse().with_context(|| format!("parsing config {}", path.display()))?;
            merge(&mut merged, table, path)?;
        }
        for (key, value) in env {
            let Some(rest) = key.strip_prefix(ENV_PREFIX) else { continue };
            let Some((section, field)) = rest.split_once("__") else { continue };
            let (section, field) = (section.to_lowercase(), field.to_lowercase());
            let Some(toml::Value::Table(table)) = merged.get_mut(&section) else {
                bail!("{key}: no config section [{section}]");
            };
            if !table.contains_key(&field) {
                bail!("{key}: no key {field:?} in config section [{section}]");
            }
            // A key whose default is a string stays a string ("1234" as a password).
            let value = match table.get(&field) {
                Some(toml::Value::String(_)) => toml::Value::String(value),
                _ => parse_env_value(&value),
            };
            table.insert(field, value);
        }
        let config: Config = toml::Value::Table(merged).try_into().context("invalid configuration")?;
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

/// `500` is an integer, `1e-4` a float, `true` a bool, anything else a string.
fn parse_env_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Overlays `top` on `base`, section by section; unknown sections are errors.
fn merge(base: &mut toml::Table, top: toml::Table, origin: &Path) -> Result<()> {
    for (section, value) in top {
        let Some(toml::Value::Table(base_section)) = base.get_mut(&section) else {
            bail!("{}: unknown config section [{section}]", origin.display());
        };
        let toml::Value::Table(fields) = value else {
            bail!("{}: [{section}] must be a table", origin.display());
        };
        base_section.extend(fields);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
