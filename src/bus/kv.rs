//! The KV buckets several nodes agree through: `wm-lease` (the training
//! lease: key `trainer`, value the holder; each trainer node's claim on its
//! id: `node.<id>`) and `wm-meta` (`active`: the
//! active version, moved only by compare-and-set; `next_version`: version
//! numbers unique across nodes). Compare-and-set is JetStream's (a KV
//! `update` with the revision last seen); who may do what is the daemon's
//! decision, not this module's.

use super::{Bus, Error};
use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

pub(super) const LEASE_BUCKET: &str = "wm-lease";
const LEASE_KEY: &str = "trainer";
const META_BUCKET: &str = "wm-meta";
const ACTIVE_KEY: &str = "active";
const NEXT_VERSION_KEY: &str = "next_version";

/// The lease bucket's key of trainer node id `id` (checked by the config:
/// letters, digits, `-`, `_`); `node` for the single node without one.
fn node_key(id: &str) -> String {
    match id {
        "" => "node".to_string(),
        id => format!("node.{id}"),
    }
}

/// The value of `wm-meta`'s `active`: what every node encodes with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Active {
    pub version: u64,
    /// The weights' sha256 (hex), as announced.
    pub sha256: String,
    /// The lease revision of the leader that set it.
    pub epoch: u64,
}

/// One change of `active` as a watch saw it.
#[derive(Debug, Clone)]
pub struct ActiveChange {
    pub active: Active,
    /// Its revision in `wm-meta`: later changes have higher ones.
    pub revision: u64,
    /// How many later changes are already stored (a follower that fell
    /// behind skips to the newest).
    pub newer_behind: u64,
}

/// What a watcher of the lease sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Held by this holder.
    Held(String),
    /// Released, expired or purged: free to take.
    Free,
}

/// The lease and meta buckets (after `migrate`).
#[derive(Clone)]
pub struct Shared {
    lease: kv::Store,
    meta: kv::Store,
}

impl Bus {
    pub async fn shared(&self) -> Result<Shared> {
        let lease = self
            .js
            .get_key_value(LEASE_BUCKET)
            .await
            .with_context(|| format!("KV bucket {LEASE_BUCKET} (run wmvae migrate)"))?;
        let meta = self
            .js
            .get_key_value(META_BUCKET)
            .await
            .with_context(|| format!("KV bucket {META_BUCKET} (run wmvae migrate)"))?;
        Ok(Shared { lease, meta })
    }
}

impl Shared {
    /// Takes the lease for `holder` if nobody holds it: Some(its revision).
    pub async fn acquire(&self, holder: &str) -> Result<Option<u64>> {
        match self.lease.create(LEASE_KEY, Bytes::from(holder.to_string())).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(anyhow!("taking the lease: {e}")),
        }
    }

    /// Renews a held lease: its new revision, or [`Error::Conflict`] when it is
    /// not ours any more (expired, taken, deleted).
    pub async fn renew(&self, holder: &str, revision: u64) -> Result<u64, Error> {
        match self
            .lease
            .update(LEASE_KEY, Bytes::from(holder.to_string()), revision)
            .await
        {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(Error::Conflict("the lease")),
            Err(e) => Err(anyhow!("renewing the lease: {e}").into()),
        }
    }

    /// Gives a held lease up, so a standby takes over at once.
    pub async fn release(&self, revision: u64) -> Result<()> {
        self.lease
            .delete_expect_revision(LEASE_KEY, Some(revision))
            .await
            .map_err(|e| anyhow!("releasing the lease: {e}"))
    }

    /// The cluster's lease TTL: the lease bucket's max age (set when the
    /// bucket was made, changed by `wmvae cluster set lease-ttl`).
    pub async fn lease_ttl(&self) -> Result<std::time::Duration> {
        // Asked of the server each time (the bucket's `status` is the info cached when it was opened).
        let info = self
            .lease
            .stream
            .get_info()
            .await
            .map_err(|e| anyhow!("reading {LEASE_BUCKET}'s TTL: {e}"))?;
        match info.config.max_age {
            ttl if ttl.is_zero() => bail!("{LEASE_BUCKET} has no max age: it is no lease bucket (run wmvae migrate)"),
            ttl => Ok(ttl),
        }
    }

    /// Claims trainer node id `id` (key `node.<id>`, `node` for the single
    /// node without one, in the lease bucket: it lapses with the lease's
    /// TTL unless renewed): Ok(Ok(revision)) when taken, or when the live
    /// claim is `holder`'s own already (a write of ours the server applied
    /// after we stopped waiting for its reply: a partition's queued
    /// traffic arrives when it heals); Ok(Err(holder)) with the value of
    /// the live claim when another process holds it. An error is
    /// transient (the server away, a read that missed a racing write).
    pub async fn claim_node(&self, id: &str, holder: &str) -> Result<Result<u64, String>> {
        let key = node_key(id);
        match self.lease.create(&key, Bytes::from(holder.to_string())).await {
            Ok(revision) => Ok(Ok(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {
                let entry = self
                    .lease
                    .entry(&key)
                    .await
                    .map_err(|e| anyhow!("reading {key}: {e}"))?
                    .filter(|e| e.operation == Operation::Put);
                Ok(match entry {
                    Some(e) if e.value == holder.as_bytes() => Ok(e.revision),
                    Some(e) => Err(String::from_utf8_lossy(&e.value).into_owned()),
                    None => bail!("claiming {key}: taken, then gone when read; trying again"),
                })
            }
            Err(e) => Err(anyhow!("claiming {key}: {e}")),
        }
    }

    /// Renews this process's claim on node id `id`: its new revision, or
    /// [`Error::Conflict`] when it lapsed and another process claimed it.
    pub async fn renew_node(&self, id: &str, holder: &str, revision: u64) -> Result<u64, Error> {
        let key = node_key(id);
        match self.lease.update(&key, Bytes::from(holder.to_string()), revision).await {
            Ok(revision) => Ok(revision),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(Error::Conflict("this node's id")),
            Err(e) => Err(anyhow!("renewing {key}: {e}").into()),
        }
    }

    /// Gives the claim on node id `id` up (a clean stop): the id is free at once.
    pub async fn release_node(&self, id: &str, revision: u64) -> Result<()> {
        let key = node_key(id);
        self.lease
            .delete_expect_revision(&key, Some(revision))
            .await
            .map_err(|e| anyhow!("releasing {key}: {e}"))
    }

    /// Who holds the lease now (as this server's replica sees it).
    pub async fn holder(&self) -> Result<Option<String>> {
        let entry = self
            .lease
            .entry(LEASE_KEY)
            .await
            .map_err(|e| anyhow!("reading the lease: {e}"))?;
        Ok(entry
            .filter(|e| e.operation == Operation::Put)
            .map(|e| String::from_utf8_lossy(&e.value).into_owned()))
    }

    /// The lease's changes as they happen, starting with its state now.
    pub async fn watch_lease(&self) -> Result<impl futures::Stream<Item = Result<LeaseEvent>>> {
        let watch = self
            .lease
            .watch_with_history(LEASE_KEY)
            .await
            .map_err(|e| anyhow!("watching the lease: {e}"))?;
        Ok(watch.map(|entry| {
            let entry = entry.map_err(|e| anyhow!("watching the lease: {e}"))?;
            Ok(match entry.operation {
                Operation::Put => LeaseEvent::Held(String::from_utf8_lossy(&entry.value).into_owned()),
                Operation::Delete | Operation::Purge => LeaseEvent::Free,
            })
        }))
    }

    /// The active version and the revision of its key, if one was set.
    pub async fn active(&self) -> Result<Option<(Active, u64)>> {
        let Some(entry) = self
            .meta
            .entry(ACTIVE_KEY)
            .await
            .map_err(|e| anyhow!("reading {ACTIVE_KEY}: {e}"))?
        else {
            return Ok(None);
        };
        if entry.operation != Operation::Put {
            return Ok(None);
        }
        let active = serde_json::from_slice(&entry.value)
            .with_context(|| format!("{META_BUCKET}/{ACTIVE_KEY} does not decode"))?;
        Ok(Some((active, entry.revision)))
    }

    /// The active version as it changes, starting with its value now.
    pub async fn watch_active(&self) -> Result<impl futures::Stream<Item = Result<ActiveChange>>> {
        let watch = self
            .meta
            .watch_with_history(ACTIVE_KEY)
            .await
            .map_err(|e| anyhow!("watching {ACTIVE_KEY}: {e}"))?;
        Ok(watch.filter_map(|entry| async move {
            match entry {
                Err(e) => Some(Err(anyhow!("watching {ACTIVE_KEY}: {e}"))),
                Ok(entry) if entry.operation == Operation::Put => Some(
                    serde_json::from_slice(&entry.value)
                        .map(|active| ActiveChange {
                            active,
                            revision: entry.revision,
                            newer_behind: entry.delta,
                        })
                        .with_context(|| format!("{META_BUCKET}/{ACTIVE_KEY} does not decode")),
                ),
                Ok(_) => None,
            }
        }))
    }

    /// Moves `active` by compare-and-set from `seen` (the revision last
    /// read; None when the key was never set): its new revision, or
    /// [`Error::Conflict`] when another node moved it meanwhile.
    pub async fn set_active(&self, active: &Active, seen: Option<u64>) -> Result<u64, Error> {
        let value = Bytes::from(serde_json::to_vec(active).map_err(anyhow::Error::from)?);
        let written = match seen {
            Some(revision) => self
                .meta
                .update(ACTIVE_KEY, value, revision)
                .await
                .map_err(|e| match e.kind() {
                    UpdateErrorKind::WrongLastRevision => Error::Conflict("the active version"),
                    _ => anyhow!("moving {ACTIVE_KEY}: {e}").into(),
                }),
            None => self.meta.create(ACTIVE_KEY, value).await.map_err(|e| match e.kind() {
                CreateErrorKind::AlreadyExists => Error::Conflict("the active version"),
                _ => anyhow!("setting {ACTIVE_KEY}: {e}").into(),
            }),
        };
        written
    }

    /// A version number no node had or will have: the first free one at
    /// or after `at_least`, taken by compare-and-set on `next_version`.
    pub async fn allocate_version(&self, at_least: u64) -> Result<u64> {
        for _ in 0..100 {
            let entry = self
                .meta
                .entry(NEXT_VERSION_KEY)
                .await
                .map_err(|e| anyhow!("reading {NEXT_VERSION_KEY}: {e}"))?;
            let (next, revision) = match &entry {
                Some(e) if e.operation == Operation::Put => (
                    String::from_utf8_lossy(&e.value)
                        .parse::<u64>()
                        .context("next_version")?,
                    Some(e.revision),
                ),
                _ => (1, None),
            };
            let version = next.max(at_least);
            let value = Bytes::from((version + 1).to_string());
            let taken = match revision {
                Some(revision) => self
                    .meta
                    .update(NEXT_VERSION_KEY, value, revision)
                    .await
                    .map(drop)
                    .map_err(|e| e.kind() == UpdateErrorKind::WrongLastRevision),
                None => self
                    .meta
                    .create(NEXT_VERSION_KEY, value)
                    .await
                    .map(drop)
                    .map_err(|e| e.kind() == CreateErrorKind::AlreadyExists),
            };
            match taken {
                Ok(()) => return Ok(version),
                Err(true) => continue, // another node took one meanwhile: read again
                Err(false) => bail!("allocating a version number in {META_BUCKET}"),
            }
        }
        bail!("could not allocate a version number: {META_BUCKET}/{NEXT_VERSION_KEY} kept changing")
    }
}
