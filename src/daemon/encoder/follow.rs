//! The encoder's follower: watches the cluster's active version (`wm-meta`
//! `active`), fetches each newly active version's weights, checks them
//! against its sha256, builds and warms the network off the runtime and
//! hands it to the worker. It never encodes, and never follows an
//! announcement alone (a former leader's can't move the encoders).

use super::Work;
use crate::backoff::Backoff;
use crate::bus::kv::{Active, ActiveChange, Shared};
use crate::bus::messages::weights_object;
use crate::bus::Bus;
use crate::vae::checkpoint::sha256_hex;
use crate::vae::device::Device;
use crate::vae::learner::Network;
use crate::vae::model::VaeConfig;
use anyhow::Result;
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Follows the cluster's active version (`wm-meta` `active`, moved by the
/// leader after it announced the version): each newly active version's
/// weights (the newest, when several came meanwhile), fetched and checked
/// against the sha256 `active` names, go to the worker; `loaded` turns true
/// after the first. An announcement alone moves nothing: a former leader's
/// can't reach the encoders. NATS failing under it (an election, a lost
/// server) is waited out: the watch is made again and a fetch retried, with
/// the current weights kept meanwhile.
pub(super) async fn follow(
    bus: Bus,
    queue: mpsc::Sender<Work>,
    model: (VaeConfig, Device),
    loaded: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> Result<()> {
    let shared = bus.shared().await?;
    let mut pause = Backoff::default();
    let mut current: Option<(u64, String)> = None;
    let mut seen = 0;
    let failed = |e: &anyhow::Error, next| tracing::warn!("encoder: {e:#}; watching again in {next:?}");
    while let Some(updates) = pause.retry(&shutdown, || shared.watch_active(), failed).await {
        let mut updates = Box::pin(updates);
        while let Some(active) = next_active(&mut updates, &shared, seen, &shutdown).await {
            seen = active.revision;
            let active = active.active;
            if current.as_ref() == Some(&(active.version, active.sha256.clone())) {
                continue;
            }
            let Some(net) = load_active(&bus, &active, model, &mut pause, &shutdown).await? else {
                continue;
            };
            let version = active.version;
            if queue
                .send(Work::Switch {
                    version,
                    net: Box::new(net),
                })
                .await
                .is_err()
            {
                return Ok(());
            }
            current = Some((version, active.sha256));
            loaded.send_replace(true);
        }
        pause.wait(&shutdown).await;
    }
    Ok(())
}

/// How often the follower reads `active` itself, beside the watch: a
/// watch served from a replica that fell behind (a partition healed under
/// it) delivers nothing new and says nothing; an encoder stayed on v2 for
/// minutes while v14 was active (`bench nemesis`, partition).
const ACTIVE_RECHECK: Duration = Duration::from_secs(15);

/// The next change of `active` past revision `seen`: from the watch (an
/// update with newer ones behind it is skipped), or from a read of its own
/// every [`ACTIVE_RECHECK`]. None when the watch failed or ended (said so:
/// it is made again) or the shutdown came.
async fn next_active(
    updates: &mut (impl futures::Stream<Item = Result<ActiveChange>> + Unpin),
    shared: &Shared,
    seen: u64,
    shutdown: &CancellationToken,
) -> Option<ActiveChange> {
    let mut recheck = tokio::time::interval_at(tokio::time::Instant::now() + ACTIVE_RECHECK, ACTIVE_RECHECK);
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = recheck.tick() => match shared.active().await {
                Ok(Some((active, revision))) if revision > seen => {
                    tracing::info!(version = active.version, "encoder: active moved and the watch did not say so");
                    return Some(ActiveChange { active, revision, newer_behind: 0 });
                }
                _ => continue,
            },
            next = updates.next() => next,
        };
        match next {
            Some(Ok(change)) if change.newer_behind == 0 && change.revision > seen => return Some(change),
            Some(Ok(_older_or_newer_behind)) => {}
            Some(Err(e)) => {
                tracing::warn!("encoder: {e:#}; watching again");
                return None;
            }
            None => {
                tracing::warn!("encoder: the watch of the active version ended; watching again");
                return None;
            }
        }
    }
}

/// The `active` version's network: its weights from the object store
/// (fetched again while NATS fails), checked against the sha256 `active`
/// names, built and warmed off the runtime. None (said why) when they
/// can't be had, don't match or don't load: the current weights stay.
async fn load_active(
    bus: &Bus,
    active: &Active,
    (vae, device): (VaeConfig, Device),
    pause: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<Option<Network>> {
    let version = active.version;
    let fetch = || async {
        match bus.get_object(&weights_object(version)).await {
            Err(e @ crate::bus::Error::TooLarge { .. }) => {
                tracing::error!(version, "encoder: the active version's weights are refused: {e:#}");
                Ok(None)
            }
            fetched => fetched.map_err(anyhow::Error::from),
        }
    };
    let failed = |e: &anyhow::Error, next| {
        tracing::warn!(
            version,
            "encoder: fetching the active version's weights: {e:#}; trying again in {next:?}"
        )
    };
    let Some(fetched) = pause.retry(shutdown, fetch, failed).await else {
        return Ok(None);
    };
    let Some(weights) = fetched else {
        tracing::warn!(
            version,
            "the active version's weights can't be had from the object store; keeping the current ones"
        );
        return Ok(None);
    };
    if sha256_hex(&weights) != active.sha256 {
        tracing::error!(
            version,
            "the object store's weights do not match the active version's sha256; keeping the current ones"
        );
        return Ok(None);
    }
    let loaded = tokio::task::spawn_blocking(move || warmed(device, vae, version, &weights)).await?;
    // The fetched bytes and the warm-up's activations are freed by now.
    crate::daemon::memory::release_freed_later();
    match loaded {
        Ok(net) => Ok(Some(net)),
        Err(e) => {
            tracing::error!(
                version,
                "encoder: the active version's weights do not load: {e:#}; keeping the current ones"
            );
            Ok(None)
        }
    }
}

/// A network holding `version`'s `weights`, its kernels warmed by one
/// encode, so the switch to it costs the worker nothing.
pub(super) fn warmed(device: Device, vae: VaeConfig, version: u64, weights: &[u8]) -> Result<Network> {
    let net = Network::from_safetensors(device, vae, weights, &format!("v{version} from the object store"))?;
    net.encode_frames(&[0u8; crate::frames::BYTES])?;
    Ok(net)
}
