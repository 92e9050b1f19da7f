//! The messages wmvae sends (PROTOCOL.md): a latent per frame on
//! `wm.latents.<source>` and checkpoint announcements on `wm.checkpoints`,
//! with the object names of the `wm-checkpoints` bucket, and the body of a
//! `checkpoints.*` control request. Schemas only: the
//! sending is [`super::Bus`]'s.

use crate::frames::Frame;
use crate::vae::checkpoint::Metadata;
use serde::{Deserialize, Serialize};

/// A latent on `wm.latents.<source>` (field names pinned by the contract).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentMessage {
    pub episode: String,
    pub step: u64,
    /// The checkpoint whose weights encoded it (always fetchable by version).
    pub model_version: u64,
    pub mu: Vec<f32>,
    pub logvar: Vec<f32>,
    /// The frame's transition, as published with it (nil when absent), so
    /// the memory model trains from WM_LATENTS alone.
    #[serde(default)]
    pub action: Option<Vec<f32>>,
    #[serde(default)]
    pub reward: Option<f64>,
    #[serde(default)]
    pub done: Option<bool>,
}

impl LatentMessage {
    /// The latent of `frame`, encoded by `model_version` as (`mu`, `logvar`).
    pub fn of(frame: &Frame, model_version: u64, mu: Vec<f32>, logvar: Vec<f32>) -> LatentMessage {
        LatentMessage {
            episode: frame.episode.clone(),
            step: frame.step,
            model_version,
            mu,
            logvar,
            action: frame.action.clone(),
            reward: frame.reward,
            done: frame.done,
        }
    }

    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a LatentMessage always serialises")
    }
}

/// What happened to a checkpoint, announced on `wm.checkpoints`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointEvent {
    Created,
    Rollback,
    Deleted,
}

/// A checkpoint announcement: `event`, the version's metadata (flattened:
/// `version`, `parent`, `step`, ..., `sha256`, `config`), its object name
/// and size; rollbacks add `from`, `to` and `reason`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    pub event: CheckpointEvent,
    #[serde(flatten)]
    pub metadata: Metadata,
    /// Object name in the `wm-checkpoints` bucket: `vae/v{version}.safetensors`.
    pub object: String,
    /// Size of that object (the weights' safetensors bytes).
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The lease epoch of the leader that made the change (0 before leases).
    #[serde(default)]
    pub epoch: u64,
}

impl Announcement {
    /// An announcement of `event` for the version `metadata` describes,
    /// whose weights object is `bytes` long (0 when there is none).
    pub fn new(event: CheckpointEvent, metadata: &Metadata, bytes: u64) -> Announcement {
        Announcement {
            event,
            metadata: metadata.clone(),
            object: weights_object(metadata.version),
            bytes,
            from: None,
            to: None,
            reason: None,
            epoch: 0,
        }
    }

    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an Announcement always serialises")
    }
}

/// A leader's fence on `<prefix>.checkpoints.fence` (stream WM_CHECKPOINTS):
/// the epoch under which its announcements go out, each conditioned on this
/// fence still being the last ([`crate::bus::Bus::fence_announcements`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub epoch: u64,
}

impl Fence {
    pub fn to_msgpack(self) -> Vec<u8> {
        rmp_serde::to_vec_named(&self).expect("a Fence (one number) always serialises")
    }
}

/// Object-store name of a version's full checkpoint (the envelope: weights,
/// optimizer state, metadata), from which another node resumes.
pub fn checkpoint_envelope_object(version: u64) -> String {
    format!("vae/v{version}.checkpoint")
}

/// Object-store name of a version's weights.
pub fn weights_object(version: u64) -> String {
    format!("vae/v{version}.safetensors")
}

/// Where uploads to import go; `checkpoints.import` takes no other name.
pub const IMPORTS_PREFIX: &str = "imports/";

/// Object-store name of an upload to import, `tag` naming the uploader's try.
pub fn import_object(tag: &str) -> String {
    format!("{IMPORTS_PREFIX}{tag}.safetensors")
}

/// The `wm.ctl.decode` request: latents (each `z_size` numbers) to decode,
/// on the active version or a pinned one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeRequest {
    pub z: Vec<Vec<f32>>,
    #[serde(default)]
    pub version: Option<u64>,
    /// `"png"`: the frames as one PNG grid (`png`) instead of raw bytes.
    #[serde(default)]
    pub format: Option<String>,
}

/// The `wm.ctl.decode` reply: the version that decoded, and its frames,
/// N x 64 x 64 x 3 uint8 HWC (`frames`), or a PNG grid of them (`png`)
/// when the request asked for `"format": "png"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DecodeReply {
    pub version: u64,
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Vec::is_empty")]
    pub frames: Vec<u8>,
    #[serde(default, with = "serde_bytes", skip_serializing_if = "Option::is_none")]
    pub png: Option<Vec<u8>>,
}

/// The one field `wm.ctl.encode` reads besides the frame message: a
/// version to encode with instead of the active one.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct PinnedVersion {
    #[serde(default)]
    pub version: Option<u64>,
}

/// The body of every `checkpoints.*` request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckpointRequest {
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Who asks: a NATS user or user@host.
    #[serde(default)]
    pub by: Option<String>,
    /// `checkpoints.import`: the uploaded weights' object name in the bucket.
    #[serde(default)]
    pub object: Option<String>,
    /// `checkpoints.history`: the page of entries before this sequence
    /// number (a reply's `next_before`); with `limit`, the reply is a page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
    /// `checkpoints.history`: entries in the page at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}
