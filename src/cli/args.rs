//! The flags every config-reading command takes, shared by the two binaries
//! (`wmvae` and `wmvae-bench`) so that `--config`, `--nats-url` and
//! `--data-dir` mean the same in both.

use crate::config::Config;
use anyhow::{Context, Result};
use std::path::PathBuf;

/// Where the config comes from, and the overrides every daemon-facing command takes.
#[derive(clap::Args, Clone)]
pub struct ConfigArgs {
    /// Config file overlaid on config/default.toml.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// NATS server URL (overrides nats.url).
    #[arg(long, global = true)]
    pub nats_url: Option<String>,
    /// Store directory (overrides store.data_dir).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    pub fn load(&self) -> Result<Config> {
        self.load_with(|_| {})
    }

    /// The config with these flags and `more` applied, then checked again.
    pub fn load_with(&self, more: impl FnOnce(&mut Config)) -> Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(url) = &self.nats_url {
            config.nats.url = url.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.store.data_dir = dir.clone();
        }
        more(&mut config);
        config.validate().context("after the command-line overrides")?;
        Ok(config)
    }
}
