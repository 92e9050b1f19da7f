//! The operator's side of `wmvae checkpoint ...`, `wmvae buffer stats`,
//! `wmvae encode --checkpoint` and `wmvae series`: through the running daemon's control service when one
//! answers, else on the store directly (sled lets one process hold it).
//! Either way the answers are the same types, from `versions` and `store`.
//! No rendering here (`render.rs`), and no flag parsing (`main.rs`).

use super::Error;
use crate::bus::messages::{import_object, weights_object, CheckpointRequest};
use crate::bus::service::{Endpoint, ServiceError};
use crate::bus::{self, Bus};
use crate::config::Config;
use crate::series::{self, Budget, EpisodesPage, Page, PageRequest, Pages};
use crate::store;
use crate::store::{Cursor, EpisodeCount, HistoryEntry, HistoryPage, Provenance, Scope, Stats, Store};
use crate::vae::checkpoint::{sha256_hex, Metadata};
use crate::vae::device::DeviceChoice;
use crate::vae::learner::Network;
use crate::versions::{self, Listed, Shown};
use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use std::time::Duration;

/// How long the CLI waits for a daemon to answer before going offline.
const DAEMON_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--online`, `--offline`, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Online,
    Offline,
}

/// Where operations go.
pub enum Backend {
    Live(Box<Bus>),
    Offline(Store, Box<Config>),
}

async fn live(config: &Config) -> Result<Backend> {
    let bus = Bus::connect_once(config).await?;
    match tokio::time::timeout(DAEMON_PROBE_TIMEOUT, bus.control_request(Endpoint::Status, Vec::new())).await {
        Ok(Ok(_)) => Ok(Backend::Live(Box::new(bus))),
        Ok(Err(e)) => bail!("no wmvae daemon answers on {}: {e:#}", config.nats.url),
        Err(_) => bail!(
            "no wmvae daemon answered on {} within {DAEMON_PROBE_TIMEOUT:?}",
            config.nats.url
        ),
    }
}

fn offline(config: &Config) -> Result<Backend> {
    Ok(Backend::Offline(
        Store::open(&config.store.data_dir, config.buffer)?,
        Box::new(config.clone()),
    ))
}

/// Picks the backend. With neither flag: the daemon if it answers, else the
/// store; if both fail, one line says which is locked and which unreachable.
pub async fn connect(config: &Config, mode: Mode) -> Result<Backend> {
    match mode {
        Mode::Online => live(config).await,
        Mode::Offline => offline(config),
        Mode::Auto => match live(config).await {
            Ok(backend) => Ok(backend),
            Err(live_error) => offline(config)
                .map_err(|store_error| anyhow::anyhow!("no daemon and no store: {live_error:#}; and {store_error:#}")),
        },
    }
}

/// A request to a `checkpoints.*` endpoint; 404 answers become [`store::Error::UnknownVersion`].
async fn request(bus: &Bus, endpoint: Endpoint, request: &CheckpointRequest) -> Result<bytes::Bytes, Error> {
    bus.control_request(endpoint, serde_json::to_vec(request).map_err(anyhow::Error::from)?)
        .await
        .map_err(|e| match (e, request.version) {
            (bus::Error::Service(ServiceError { code: 404, .. }), Some(v)) => store::Error::UnknownVersion(v).into(),
            (e, _) => anyhow::Error::from(e).into(),
        })
}

/// [`request`] with a JSON reply.
async fn ask<T: DeserializeOwned>(bus: &Bus, endpoint: Endpoint, body: &CheckpointRequest) -> Result<T, Error> {
    let reply = request(bus, endpoint, body).await?;
    Ok(serde_json::from_slice(&reply).with_context(|| format!("reading the daemon's {} reply", endpoint.name()))?)
}

/// A `checkpoints.history` reply: a page, or (from a daemon that
/// predates pages) every entry at once.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum HistoryReply {
    Page(HistoryPage),
    All(Vec<HistoryEntry>),
}

/// Every kept history entry from the daemon, oldest first, read a page at
/// a time from the newest back: a reply must stay under NATS's payload limit.
async fn live_history(bus: &Bus) -> Result<Vec<HistoryEntry>> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let request = CheckpointRequest {
            before,
            limit: Some(versions::HISTORY_PAGE),
            ..Default::default()
        };
        match ask(bus, Endpoint::History, &request).await? {
            HistoryReply::Page(page) => {
                pages.push(page.entries);
                match page.next_before {
                    Some(next) if page.more && before.is_none_or(|b| next < b) => before = Some(next),
                    Some(_) if page.more => bail!("the daemon's history pages do not move back (before {before:?})"),
                    _ => break,
                }
            }
            HistoryReply::All(entries) => {
                pages.push(entries);
                break;
            }
        }
    }
    pages.reverse();
    Ok(pages.concat())
}

fn version_request(version: u64) -> CheckpointRequest {
    CheckpointRequest {
        version: Some(version),
        ..Default::default()
    }
}

impl Backend {
    pub fn is_live(&self) -> bool {
        matches!(self, Backend::Live(_))
    }

    /// The replay buffer's figures (`wmvae buffer stats`).
    pub async fn buffer_stats(&self) -> Result<Stats> {
        match self {
            Backend::Live(bus) => {
                let reply = bus.control_request(Endpoint::BufferStats, Vec::new()).await?;
                serde_json::from_slice(&reply).context("reading the daemon's buffer.stats reply")
            }
            Backend::Offline(store, _) => store.stats(),
        }
    }

    pub async fn list(&self) -> Result<Vec<Listed>> {
        match self {
            Backend::Live(bus) => Ok(ask(bus, Endpoint::List, &CheckpointRequest::default()).await?),
            Backend::Offline(store, _) => versions::list(store),
        }
    }

    pub async fn show(&self, version: u64) -> Result<Shown, Error> {
        match self {
            Backend::Live(bus) => ask(bus, Endpoint::Show, &version_request(version)).await,
            Backend::Offline(store, _) => Ok(versions::show(store, version)?),
        }
    }

    /// Every kept change of the active version, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        match self {
            Backend::Live(bus) => live_history(bus).await,
            Backend::Offline(store, _) => versions::history(store),
        }
    }

    /// PNG of validation frames over their reconstructions by `version`.
    pub async fn recon(&self, version: u64) -> Result<Vec<u8>, Error> {
        match self {
            Backend::Live(bus) => Ok(request(bus, Endpoint::Recon, &version_request(version)).await?.to_vec()),
            Backend::Offline(store, config) => Ok(versions::recon_png(store, version, config)?),
        }
    }

    /// Returns the previously active version.
    pub async fn rollback(&self, version: u64, provenance: &Provenance) -> Result<Option<u64>, Error> {
        match self {
            Backend::Live(bus) => {
                let request = CheckpointRequest {
                    version: Some(version),
                    by: Some(provenance.by.name().into()),
                    reason: provenance.reason.clone(),
                    ..Default::default()
                };
                let reply: serde_json::Value = ask(bus, Endpoint::Rollback, &request).await?;
                Ok(reply["from"].as_u64())
            }
            Backend::Offline(store, _) => Ok(versions::rollback(store, version, provenance)?),
        }
    }

    pub async fn set_pinned(&self, version: u64, pinned: bool) -> Result<(), Error> {
        match self {
            Backend::Live(bus) => ask::<serde_json::Value>(
                bus,
                if pinned { Endpoint::Pin } else { Endpoint::Unpin },
                &version_request(version),
            )
            .await
            .map(drop),
            Backend::Offline(store, _) => Ok(store.registry().set_pinned(version, pinned)?),
        }
    }

    pub async fn delete(&self, version: u64) -> Result<Metadata, Error> {
        match self {
            Backend::Live(bus) => ask(bus, Endpoint::Delete, &version_request(version)).await,
            Backend::Offline(store, _) => Ok(store.registry().delete(version)?),
        }
    }

    /// A version's weights (PyTorch-loadable safetensors), sha256 checked.
    pub async fn export(&self, version: u64) -> Result<Vec<u8>, Error> {
        let expected = self.show(version).await?.metadata.sha256;
        let weights = match self {
            Backend::Live(bus) => bus
                .get_object(&weights_object(version))
                .await
                .map_err(anyhow::Error::from)?
                .with_context(|| format!("v{version} is not in the object store"))?,
            Backend::Offline(store, _) => versions::checkpoint(store, version)?.weights,
        };
        if sha256_hex(&weights) != expected {
            let refused =
                anyhow!("v{version}: weights sha256 does not match the recorded {expected}; refusing to use them");
            return Err(refused.into());
        }
        Ok(weights)
    }

    /// A new active version from foreign weights. The file is checked here
    /// first, so errors name it and its tensors; nothing changes on error.
    pub async fn import(
        &self,
        bytes: &[u8],
        origin: &str,
        config: &Config,
        provenance: &Provenance,
    ) -> Result<Metadata> {
        versions::check_weights(bytes, origin, config)?;
        match self {
            Backend::Live(bus) => {
                let object = import_object(&format!("{}-{}", std::process::id(), sha256_hex(bytes)));
                bus.put_object(&object, bytes).await?;
                let request = CheckpointRequest {
                    by: Some(provenance.by.name().into()),
                    reason: provenance.reason.clone(),
                    object: Some(object.clone()),
                    ..Default::default()
                };
                let imported = ask(bus, Endpoint::Import, &request).await;
                if imported.is_err() {
                    // Refused: the daemon keeps the upload; it is this command's to remove.
                    let _ = bus.delete_object(&object).await;
                }
                Ok(imported?)
            }
            Backend::Offline(store, _) => {
                Ok(versions::import(store, None, bytes, origin, config, provenance)?.metadata)
            }
        }
    }

    /// The network holding a version's weights (sha256 checked), for
    /// `wmvae encode --checkpoint` and `wmvae decode`.
    pub async fn network(&self, version: u64, device: DeviceChoice, config: &Config) -> Result<Network, Error> {
        let weights = self.export(version).await?;
        Ok(Network::from_safetensors(
            device.resolve()?,
            config.vae(),
            &weights,
            &format!("checkpoint v{version}"),
        )?)
    }

    /// The active version (`--version active`).
    pub async fn active_version(&self) -> Result<u64> {
        let active = match self {
            Backend::Live(bus) => {
                let reply = bus.control_request(Endpoint::Status, Vec::new()).await?;
                let status: serde_json::Value =
                    serde_json::from_slice(&reply).context("reading the daemon's status")?;
                status["active_version"].as_u64()
            }
            Backend::Offline(store, _) => store.registry().active_version()?,
        };
        active.context("there is no active version yet")
    }

    /// Where `wmvae series` gets a version's pages: the leading trainer
    /// encodes them, or the store is read and encoded here on `device`.
    pub async fn series(&self, version: u64, device: DeviceChoice, config: &Config) -> Result<SeriesPages<'_>, Error> {
        let sha256 = self.show(version).await?.metadata.sha256;
        Ok(match self {
            Backend::Live(bus) => SeriesPages::Live { bus, version, sha256 },
            Backend::Offline(store, _) => SeriesPages::Offline {
                store,
                net: Box::new(self.network(version, device, config).await?),
                version,
                sha256,
            },
        })
    }
}

/// A version's series, a page at a time, from a [`Backend`].
pub enum SeriesPages<'a> {
    Live {
        bus: &'a Bus,
        version: u64,
        sha256: String,
    },
    Offline {
        store: &'a Store,
        net: Box<Network>,
        version: u64,
        sha256: String,
    },
}

/// Frames of a page read offline: enough to keep the encoder busy, one
/// episode's worth held at a time.
const OFFLINE_PAGE_FRAMES: usize = 4096;

impl Pages for SeriesPages<'_> {
    type Error = Error;

    fn version(&self) -> (u64, &str) {
        match self {
            SeriesPages::Live { version, sha256, .. } | SeriesPages::Offline { version, sha256, .. } => {
                (*version, sha256)
            }
        }
    }

    async fn episodes(&self, scope: &Scope) -> Result<Vec<EpisodeCount>, Error> {
        let bus = match self {
            SeriesPages::Offline { store, .. } => return Ok(series::episodes(store, scope)?),
            SeriesPages::Live { bus, .. } => bus,
        };
        let (mut all, mut scope) = (Vec::new(), scope.clone());
        loop {
            let payload = serde_json::to_vec(&scope).map_err(anyhow::Error::from)?;
            let reply = bus
                .control_request(Endpoint::SeriesEpisodes, payload)
                .await
                .map_err(anyhow::Error::from)?;
            let page: EpisodesPage =
                serde_json::from_slice(&reply).context("reading the daemon's series.episodes reply")?;
            let last = page.episodes.last().map(|e| Cursor {
                source: e.source.clone(),
                episode: e.episode.clone(),
                step: 0,
            });
            all.extend(page.episodes);
            match last {
                Some(last) if page.more => scope.after = Some(last),
                _ => return Ok(all),
            }
        }
    }

    async fn page(&self, scope: Scope) -> Result<Page, Error> {
        match self {
            SeriesPages::Offline {
                store, net, version, ..
            } => {
                let budget = Budget {
                    frames: OFFLINE_PAGE_FRAMES,
                    bytes: usize::MAX,
                };
                Ok(series::page(store, net, *version, scope, budget)?)
            }
            SeriesPages::Live { bus, version, .. } => {
                let request = PageRequest {
                    version: *version,
                    scope,
                    limit: None,
                };
                let payload = serde_json::to_vec(&request).map_err(anyhow::Error::from)?;
                let reply = bus
                    .control_request(Endpoint::SeriesPage, payload)
                    .await
                    .map_err(|e| match e {
                        bus::Error::Service(ServiceError { code: 404, .. }) => {
                            Error::from(store::Error::UnknownVersion(*version))
                        }
                        e => anyhow::Error::from(e).into(),
                    })?;
                Ok(rmp_serde::from_slice(&reply).context("reading the daemon's series.page reply")?)
            }
        }
    }
}
