//! Resuming the trainer from its own store, and recovering when the active
//! version there is damaged or missing: the object store's copy, else the
//! newest intact older version ([`Change::Recovery`]). It runs once, before
//! the trainer contends for the lease; what a new leader catches up on
//! from the cluster is `takeover.rs`'s.

use super::takeover;
use super::trainer::Resumed;
use crate::bus::Bus;
use crate::config::Config;
use crate::store::{self, Change, Provenance, Store};
use crate::vae::checkpoint::Checkpoint;
use crate::vae::device::Device;
use crate::vae::learner::Learner;
use anyhow::{bail, Result};

/// The learner resumed from this store's active version, if it has one;
/// else fresh weights (which become version 1 only if this node leads a new
/// cluster: see `takeover.rs`). An active version found damaged, or not in
/// the store (forgotten when it opened: a failed write left it half
/// there), is written back from the object store's copy, or else rolled
/// back past ([`Change::Recovery`]) to the newest intact version.
pub(super) fn resume(config: &Config, store: &Store, bus: &Bus, device: Device) -> Result<Resumed> {
    let mut learner = Learner::new(device, config.vae(), config.adam(), config.train.precision);
    let registry = store.registry();
    let Some(version) = registry.active_version()? else {
        return Ok((learner, None));
    };
    let recovered = match registry.get(version) {
        Ok(Some(checkpoint)) => Some(checkpoint),
        Ok(None) => {
            tracing::error!(version, "the active version v{version} is not in the store");
            recover(store, bus, version)?
        }
        Err(e @ store::Error::Damaged { .. }) => {
            tracing::error!("{e:#}");
            recover(store, bus, version)?
        }
        Err(e) => return Err(e.into()),
    };
    let Some(checkpoint) = recovered else {
        return Ok((learner, None));
    };
    learner.restore(&checkpoint)?;
    tracing::info!(
        version = checkpoint.metadata.version,
        step = learner.steps(),
        "resumed from the active checkpoint"
    );
    Ok((learner, Some(checkpoint.metadata)))
}

/// For an active `version` damaged or missing in the store: the object
/// store's copy (written back to the store), else the newest intact older
/// version, made active; else, when `version` held the initial weights
/// (untrained: a new store's first write, torn by a full disk), None, for
/// fresh weights; an error when there is none of these.
fn recover(store: &Store, bus: &Bus, version: u64) -> Result<Option<Checkpoint>> {
    let registry = store.registry();
    let expected = registry.metadata(version).ok().flatten().map(|m| m.sha256);
    match tokio::runtime::Handle::current().block_on(takeover::object_store_copy(bus, version, expected.as_deref())) {
        Ok(Some(copy)) => {
            registry.repair(&copy)?;
            tracing::warn!(
                version,
                "v{version} repaired from the object store's copy (written back to the store)"
            );
            return Ok(Some(copy));
        }
        Ok(None) => tracing::warn!(version, "the object store has no copy of v{version}"),
        Err(e) => tracing::warn!(version, "no good copy of v{version} from the object store ({e:#})"),
    }
    for older in registry.list()?.iter().rev().filter(|m| m.version < version) {
        match registry.get(older.version) {
            Ok(Some(checkpoint)) => {
                let reason =
                    format!("v{version} is damaged or missing in the store and the object store has no good copy");
                registry.activate(older.version, &Provenance::daemon(Change::Recovery).because(&reason))?;
                tracing::warn!(
                    from = version,
                    to = older.version,
                    "{reason}: rolled back to v{}",
                    older.version
                );
                return Ok(Some(checkpoint));
            }
            Ok(None) => {}
            Err(e) => tracing::error!("{e:#}"),
        }
    }
    if registry
        .history()?
        .iter()
        .any(|h| h.to == version && h.why == Change::Initial)
    {
        tracing::warn!(
            version,
            "v{version} held the initial weights, untrained, and is not whole: fresh weights instead (nothing \
            trained is lost)"
        );
        return Ok(None);
    }
    bail!(
        "the active version v{version} is damaged or missing, the object store has no good copy, and no older \
        version is intact: import weights (wmvae checkpoint import --offline) or move the store aside"
    )
}
