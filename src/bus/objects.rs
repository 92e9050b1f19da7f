//! The `wm-checkpoints` object bucket: a version's weights as
//! `vae/v{N}.safetensors`, uploads to import under `imports/`. Whole objects
//! in and out; what they mean is the daemon's and the CLI's business.

use super::messages::{weights_object, Announcement, CheckpointEvent};
use super::{Bus, Error};
use crate::vae::checkpoint::sha256_hex;
use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream;
use futures::StreamExt;

/// The checkpoint weights bucket (migration 0002).
pub const CHECKPOINT_BUCKET: &str = "wm-checkpoints";
/// The largest object read from the bucket: a full checkpoint of the
/// default model (weights and Adam's two moments) is ~52 MB; this leaves
/// room for models ten times larger, and bounds what an object whose
/// metadata claims any size can make a reader hold.
pub const MAX_OBJECT_BYTES: u64 = 512 << 20;
/// Announcements read back at most when looking for a version's: one a
/// checkpoint, so months of them.
const ANNOUNCEMENTS_SCANNED: u64 = 10_000;
/// The stream of checkpoint announcements (migration 0002).
pub(super) const CHECKPOINTS_STREAM: &str = "WM_CHECKPOINTS";
/// Bytes reserved before reading an object, at most: the rest grows as
/// bytes actually arrive, never from what the object's metadata claims.
const PREALLOCATE_BYTES: u64 = 64 << 20;

impl Bus {
    async fn checkpoint_bucket(&self) -> Result<jetstream::object_store::ObjectStore> {
        self.js
            .get_object_store(CHECKPOINT_BUCKET)
            .await
            .with_context(|| format!("object store {CHECKPOINT_BUCKET} (run wmvae migrate)"))
    }

    /// Puts an object in the `wm-checkpoints` bucket (`vae/v{version}.safetensors`
    /// for a version's weights; `imports/...` for uploads to import).
    pub async fn put_object(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let bucket = self.checkpoint_bucket().await?;
        bucket
            .put(name, &mut std::io::Cursor::new(bytes))
            .await
            .with_context(|| format!("putting {name}"))?;
        Ok(())
    }

    /// An object's bytes, if it is there, refusing ([`Error::TooLarge`]) one over
    /// [`MAX_OBJECT_BYTES`].
    pub async fn get_object(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        self.get_object_at_most(name, MAX_OBJECT_BYTES).await
    }

    /// As [`Bus::get_object`], refusing ([`Error::TooLarge`]) an object over
    /// `max` bytes (by its metadata before reading it, by what arrives
    /// while reading), for names a request chose.
    pub async fn get_object_at_most(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, Error> {
        let max = max.min(MAX_OBJECT_BYTES);
        let bucket = self.checkpoint_bucket().await?;
        let object = match bucket.get(name).await {
            Ok(object) => object,
            Err(e) if e.kind() == jetstream::object_store::GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!("getting {name}: {e}").into()),
        };
        let size = object.info.size as u64;
        if size > max {
            return Err(Error::TooLarge {
                name: name.to_string(),
                size,
                max,
            });
        }
        let mut bytes = Vec::with_capacity(size.min(PREALLOCATE_BYTES) as usize);
        // At most one byte past `max`, whatever the object's info said.
        tokio::io::AsyncReadExt::read_to_end(
            &mut tokio::io::AsyncReadExt::take(object, max.saturating_add(1)),
            &mut bytes,
        )
        .await
        .with_context(|| format!("reading {name}"))?;
        if bytes.len() as u64 > max {
            return Err(Error::TooLarge {
                name: name.to_string(),
                size: bytes.len() as u64,
                max,
            });
        }
        Ok(Some(bytes))
    }

    /// Version `version`'s weights, checked against the sha256 its newest
    /// `created` or `rollback` announcement names (None: no weights in the
    /// bucket). A version whose announcement WM_CHECKPOINTS no longer
    /// holds (its limits dropped it) is vouched for by the object store's
    /// own digest, which every read checks.
    pub async fn announced_weights(&self, version: u64) -> Result<Option<Vec<u8>>> {
        let Some(weights) = self.get_object(&weights_object(version)).await? else {
            return Ok(None);
        };
        if let Some(sha256) = self.announced_sha256(version).await? {
            if sha256_hex(&weights) != sha256 {
                bail!("v{version}'s weights in the object store do not match the sha256 it was announced with");
            }
        }
        Ok(Some(weights))
    }

    /// The sha256 of `version` as its newest `created` or `rollback`
    /// announcement says, reading WM_CHECKPOINTS from its end (at most
    /// [`ANNOUNCEMENTS_SCANNED`] messages).
    async fn announced_sha256(&self, version: u64) -> Result<Option<String>> {
        let mut stream = self
            .js
            .get_stream(CHECKPOINTS_STREAM)
            .await
            .with_context(|| format!("stream {CHECKPOINTS_STREAM}"))?;
        let state = stream
            .info()
            .await
            .with_context(|| format!("reading stream {CHECKPOINTS_STREAM}"))?
            .state
            .clone();
        let oldest = state
            .first_sequence
            .max(state.last_sequence.saturating_sub(ANNOUNCEMENTS_SCANNED));
        for sequence in (oldest..=state.last_sequence).rev().filter(|s| *s > 0) {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            let Ok(announcement) = rmp_serde::from_slice::<Announcement>(&message.payload) else {
                continue;
            };
            if announcement.metadata.version == version && announcement.event != CheckpointEvent::Deleted {
                return Ok(Some(announcement.metadata.sha256));
            }
        }
        Ok(None)
    }

    /// Removes an object (absent is fine).
    pub async fn delete_object(&self, name: &str) -> Result<()> {
        let bucket = self.checkpoint_bucket().await?;
        match bucket.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == jetstream::object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!("deleting {name}: {e}")),
        }
    }

    /// Versions whose full checkpoint is in the bucket (uploaded after the
    /// weights, so both are there): a version whose upload stopped between
    /// the two is not one of them, and is uploaded again.
    pub async fn object_versions(&self) -> Result<Vec<u64>> {
        let bucket = self.checkpoint_bucket().await?;
        let mut list = bucket
            .list()
            .await
            .map_err(|e| anyhow!("listing {CHECKPOINT_BUCKET}: {e}"))?;
        let mut versions = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| anyhow!("listing {CHECKPOINT_BUCKET}: {e}"))?;
            if info.deleted {
                continue;
            }
            if let Some(v) = info
                .name
                .strip_prefix("vae/v")
                .and_then(|r| r.strip_suffix(".checkpoint"))
                .and_then(|v| v.parse().ok())
            {
                versions.push(v);
            }
        }
        Ok(versions)
    }
}
