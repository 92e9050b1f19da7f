//! Watches the store's writes in flight: one that has not returned for
//! `[store] write_timeout_secs` ends the daemon non-zero with the reason.
//! sled 0.34 can leave a write waiting for ever after one met a full disk
//! (another program filled it between a write's claim on its room and the
//! write); the store can't be reopened in this process then (the stuck
//! write holds it), so the way out is a new process, which recovers sled's
//! log: the supervisor (systemd, compose) restarts it. `/healthz` says so
//! sooner (`status.rs`). It does not touch sled itself.

use super::supervisor::Supervisor;
use crate::config::Config;
use crate::store::Store;
use anyhow::{bail, Result};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often the writes in flight are looked at.
const POLL: Duration = Duration::from_secs(1);

/// [`watch`] for `store` under `supervisor`, with `[store] write_timeout_secs`.
pub(super) fn start(store: &Store, config: &Config, supervisor: &Supervisor) -> JoinHandle<Result<()>> {
    let limit = Duration::from_secs(config.store.write_timeout_secs);
    let shutdown = supervisor.shutdown().clone();
    supervisor.spawn("store writes", watch(store.clone(), limit, shutdown))
}

/// Until `shutdown`; an error (the daemon's reason to end) once a store
/// write has been in flight for `limit`.
async fn watch(store: Store, limit: Duration, shutdown: CancellationToken) -> Result<()> {
    let mut tick = tokio::time::interval(POLL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Some(stuck) = store.oldest_write().filter(|age| *age >= limit) {
            bail!(
                "a store write has not returned for {:.0} s ([store] write_timeout_secs): sled is stuck, as after \
                a write that met a full disk; exiting, for a new process to reopen the store (nothing acked is lost)",
                stuck.as_secs_f64()
            );
        }
    }
}
