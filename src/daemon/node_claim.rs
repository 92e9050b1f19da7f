//! A trainer node's claim on its `[node] id`, held by the server: a KV
//! `create` of the id's key in the lease bucket (so it lapses with the
//! lease's TTL unless renewed), renewed every third of the TTL, deleted on a
//! clean stop. A second process with the same id (or a second single node
//! without one) finds the key taken and, once it has waited out the TTL
//! (an earlier process of its own that crashed leaves a claim that lapses
//! by then), is refused at start, whether it started a second or a
//! millisecond after the first: the server decides, not a discovery ping.
//!
//! It does not decide leadership (that is `lease`'s), and it does not stop
//! a twin that was started while this node's claim had lapsed: this node
//! then finds its id taken at its next renewal and stops, saying so.

use super::lease::TTL_READ_LIMIT;
use super::supervisor::Supervisor;
use crate::bus::kv::Shared;
use crate::bus::Error;
use anyhow::{anyhow, bail, Result};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Past the TTL, how much longer a start waits for a claim to lapse: the
/// server expires a key a moment after its max age.
const LAPSE_MARGIN: Duration = Duration::from_secs(2);
/// Between looks at a taken id while waiting, and between tries of a
/// renewal that failed without a refusal (NATS away).
const RETRY: Duration = Duration::from_millis(250);

/// This process's claim on its node id, renewed by a supervised task.
pub(super) struct NodeClaim {
    task: JoinHandle<Result<()>>,
    stop: CancellationToken,
}

impl NodeClaim {
    /// Claims node id `id` for this process, waiting out a lapsing claim of
    /// an earlier one; refused when a live process holds it. The renewals
    /// run under `supervisor` until [`NodeClaim::release`].
    pub(super) async fn take(shared: &Shared, id: &str, supervisor: &Supervisor) -> Result<NodeClaim> {
        let holder = holder();
        let ttl = shared.lease_ttl().await?;
        let since = Instant::now();
        let mut said = false;
        let revision = loop {
            match shared.claim_node(id, &holder).await {
                Ok(Ok(revision)) => break revision,
                Err(e) if since.elapsed() > ttl + LAPSE_MARGIN => return Err(e),
                Err(e) => {
                    tracing::warn!("node id claim: {e:#}; trying again in {RETRY:?}");
                    tokio::time::sleep(RETRY).await;
                }
                Ok(Err(other)) if since.elapsed() > ttl + LAPSE_MARGIN => bail!(
                    "another trainer node {} already runs on this NATS ({other}); give each trainer node its own \
                    [node] id (WMVAE_NODE__ID)",
                    named(id)
                ),
                Ok(Err(other)) => {
                    if !std::mem::replace(&mut said, true) {
                        tracing::info!(
                            "node id claimed by {other}: waiting up to the lease TTL ({ttl:?}) for it to lapse \
                            (an earlier process of this node that did not stop cleanly)"
                        );
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let stop = CancellationToken::new();
        let renewing = renew(shared.clone(), id.to_string(), holder, revision, stop.clone());
        let task = supervisor.spawn("node id claim", renewing);
        Ok(NodeClaim { task, stop })
    }

    /// Stops renewing and gives the id up (a clean stop: a restart of this
    /// node takes it at once); waited for until `deadline` at most.
    pub(super) async fn release(self, deadline: tokio::time::Instant) {
        self.stop.cancel();
        super::until(deadline, "node id claim", "the id's claim lapses by itself", self.task).await;
    }
}

/// What this process writes in its claim: readable (host and pid, for the
/// message a twin gets) and its own (the start's time, so a process of
/// another container with the same host name and pid is not taken for it).
fn holder() -> String {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "{} pid {} since {}.{:03}",
        crate::config::hostname(),
        std::process::id(),
        since.as_secs(),
        since.subsec_millis()
    )
}

/// "with [node] id ..." or "without a [node] id", for messages.
fn named(id: &str) -> String {
    match id {
        "" => "without a [node] id".to_string(),
        id => format!("with [node] id {id:?}"),
    }
}

/// Renews the claim every third of the cluster's lease TTL until `stop`,
/// then deletes it. A claim that lapsed (NATS away past the TTL, this
/// process paused) is taken again when nobody else took it meanwhile; when
/// another process did, this one fails: two processes must not share an id.
async fn renew(shared: Shared, id: String, holder: String, mut revision: u64, stop: CancellationToken) -> Result<()> {
    let mut ttl = shared.lease_ttl().await?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(ttl / 3) => {}
        }
        ttl = match tokio::time::timeout(TTL_READ_LIMIT, shared.lease_ttl()).await {
            Ok(Ok(now)) => now,
            _ => ttl,
        };
        let mut warned = false;
        revision = loop {
            match shared.renew_node(&id, &holder, revision).await {
                Ok(renewed) => break renewed,
                // Lapsed, or renewed by a write of ours applied late.
                Err(Error::Conflict(_)) => match shared.claim_node(&id, &holder).await {
                    Ok(Ok(claimed)) => break claimed,
                    Ok(Err(other)) => {
                        return Err(anyhow!(
                            "this node's claim on its id lapsed and {other} claimed it: another trainer node {} \
                            runs on this NATS",
                            named(&id)
                        ))
                    }
                    Err(e) => {
                        tracing::warn!("node id claim: {e:#}; trying again in {RETRY:?}");
                        tokio::time::sleep(RETRY).await;
                    }
                },
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::warn!("node id claim: not renewed ({e:#}); trying again every {RETRY:?}");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        };
    }
    match shared.release_node(&id, revision).await {
        Ok(()) => tracing::info!("node id claim: released"),
        Err(e) => tracing::warn!("node id claim: not released ({e:#}); it lapses by itself"),
    }
    Ok(())
}
