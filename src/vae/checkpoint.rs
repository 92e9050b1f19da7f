//! A full checkpoint as bytes: weights + optimizer state + metadata.
//!
//! The envelope is a MessagePack map `{format, format_version, metadata,
//! weights, optimizer}` whose `weights` and `optimizer` are safetensors
//! bytes (PyTorch-loadable weights; our Adam's moments and step). The
//! `sha256` in the metadata is over the weights bytes, so the object-store
//! copy of a version can be checked against its announcement; from format
//! version 2 the envelope's own `sha256` covers all of it (metadata,
//! weights and optimizer state), checked on every read. This module
//! does the format only: where checkpoints live is the store's and the bus's
//! business.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Written in every envelope, checked on every read.
pub const FORMAT: &str = "wmvae-checkpoint";
/// The newest envelope layout this build writes and reads. 2: the
/// envelope's `sha256` over everything in it (1 had none).
pub const FORMAT_VERSION: u32 = 2;

/// What a checkpoint says about itself (pinned names: downstream reads them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub version: u64,
    pub parent: Option<u64>,
    pub step: u64,
    pub frames_seen: u64,
    pub train_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub eval_recon: Option<f64>,
    pub eval_kl: Option<f64>,
    /// RFC 3339, UTC.
    pub created_at: String,
    /// Hex sha256 of the weights' safetensors bytes.
    pub sha256: String,
    /// The configuration it trained with.
    pub config: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub metadata: Metadata,
    /// PyTorch-loadable safetensors of the model.
    pub weights: Vec<u8>,
    /// Safetensors of our Adam's state.
    pub optimizer: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    format: String,
    format_version: u32,
    metadata: Metadata,
    #[serde(with = "serde_bytes")]
    weights: Vec<u8>,
    #[serde(with = "serde_bytes")]
    optimizer: Vec<u8>,
    /// Hex sha256 of this envelope serialised with this field empty
    /// (format version 2; empty in version 1).
    #[serde(default)]
    sha256: String,
}

impl Envelope {
    /// The sha256 this envelope should carry.
    fn digest(&mut self) -> Result<String> {
        let carried = std::mem::take(&mut self.sha256);
        let bytes = rmp_serde::to_vec_named(self).context("serialising checkpoint");
        self.sha256 = carried;
        Ok(sha256_hex(&bytes?))
    }
}

/// Only the fields needed to refuse an envelope we can't read.
#[derive(Deserialize)]
struct EnvelopeHead {
    format: String,
    format_version: u32,
}

/// Lower-case hex sha256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl Checkpoint {
    /// Builds a checkpoint, filling in `metadata.sha256` from `weights`.
    pub fn new(mut metadata: Metadata, weights: Vec<u8>, optimizer: Vec<u8>) -> Checkpoint {
        metadata.sha256 = sha256_hex(&weights);
        Checkpoint { metadata, weights, optimizer }
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut envelope = Envelope {
            format: FORMAT.to_string(),
            format_version: FORMAT_VERSION,
            metadata: self.metadata.clone(),
            weights: self.weights.clone(),
            optimizer: self.optimizer.clone(),
            sha256: String::new(),
        };
        envelope.sha256 = envelope.digest()?;
        rmp_serde::to_vec_named(&envelope).context("serialising checkpoint")
    }

    /// Parses and verifies; an envelope from a newer wmvae is refused by
    /// name, never misread.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        let head: EnvelopeHead = rmp_serde::from_slice(bytes).context("not a wmvae checkpoint (unreadable envelope)")?;
        if head.format != FORMAT {
            bail!("not a wmvae checkpoint (format {:?})", head.format);
        }
        if head.format_version > FORMAT_VERSION {
            bail!(
                "checkpoint format version {} was written by a newer wmvae; this build reads up to {FORMAT_VERSION}",
                head.format_version
            );
        }
        let mut envelope: Envelope = rmp_serde::from_slice(bytes).context("corrupt wmvae checkpoint")?;
        if head.format_version >= 2 && envelope.digest()? != envelope.sha256 {
            bail!("checkpoint v{}: the envelope does not match its sha256 (metadata, weights or optimizer state damaged); refusing to load", envelope.metadata.version);
        }
        let checkpoint = Checkpoint { metadata: envelope.metadata, weights: envelope.weights, optimizer: envelope.optimizer };
        checkpoint.verify()?;
        Ok(checkpoint)
    }

    /// Checks the weights against the recorded sha256.
    pub fn verify(&self) -> Result<()> {
        let actual = sha256_hex(&self.weights);
        if actual != self.metadata.sha256 {
            bail!(
                "checkpoint v{}: weights sha256 {actual} does not match the recorded {}; refusing to load",
                self.metadata.version,
                self.metadata.sha256
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let metadata = Metadata { version: 3, parent: Some(2), step: 100, created_at: now_rfc3339(), ..Default::default() };
        Checkpoint::new(metadata, b"weights".to_vec(), b"optimizer".to_vec())
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(Checkpoint::from_bytes(&c.to_bytes().unwrap()).unwrap(), c);
        assert_eq!(c.metadata.sha256.len(), 64);
    }

    #[test]
    fn tampered_weights_are_refused() {
        let mut c = sample();
        c.weights[0] ^= 1;
        let err = Checkpoint::from_bytes(&c.to_bytes().unwrap()).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn damage_anywhere_in_the_envelope_is_refused() {
        let bytes = sample().to_bytes().unwrap();
        // The optimizer's bytes (its value, after its key), and a metadata field's (step 100 -> 101).
        let optimizer = bytes.windows(9).rposition(|w| w == b"optimizer").unwrap();
        let mut damaged = bytes.clone();
        damaged[optimizer + 2] ^= 1;
        let err = Checkpoint::from_bytes(&damaged).unwrap_err().to_string();
        assert!(err.contains("does not match its sha256"), "{err}");
        let step = bytes.windows(5).position(|w| w == b"step\x64").unwrap();
        let mut damaged = bytes;
        damaged[step + 4] = 101;
        let err = Checkpoint::from_bytes(&damaged).unwrap_err().to_string();
        assert!(err.contains("does not match its sha256"), "{err}");
    }

    #[test]
    fn version_1_envelopes_are_still_read() {
        #[derive(Serialize)]
        struct V1<'a> {
            format: &'static str,
            format_version: u32,
            metadata: &'a Metadata,
            #[serde(with = "serde_bytes")]
            weights: &'a [u8],
            #[serde(with = "serde_bytes")]
            optimizer: &'a [u8],
        }
        let c = sample();
        let bytes = rmp_serde::to_vec_named(&V1 { format: FORMAT, format_version: 1, metadata: &c.metadata, weights: &c.weights, optimizer: &c.optimizer }).unwrap();
        assert_eq!(Checkpoint::from_bytes(&bytes).unwrap(), c);
    }

    #[test]
    fn newer_and_foreign_envelopes_are_refused() {
        #[derive(Serialize)]
        struct Future {
            format: &'static str,
            format_version: u32,
        }
        let bytes = rmp_serde::to_vec_named(&Future { format: FORMAT, format_version: 99 }).unwrap();
        let err = Checkpoint::from_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("newer wmvae"), "{err}");
        let bytes = rmp_serde::to_vec_named(&Future { format: "other", format_version: 1 }).unwrap();
        assert!(Checkpoint::from_bytes(&bytes).unwrap_err().to_string().contains("not a wmvae checkpoint"));
        assert!(Checkpoint::from_bytes(b"\xc1garbage").is_err());
    }
}
