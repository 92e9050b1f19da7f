//! A full checkpoint as bytes: weights + optimizer state + metadata.
//!
//! The envelope is a MessagePack map `{format, format_version, metadata,
//! weights, optimizer}` whose `weights` and `optimizer` are safetensors
//! bytes (PyTorch-loadable weights; our Adam's moments and step). The
//! `sha256` in the metadata is over the weights bytes, so the object-store
//! copy of a version can be checked against its announcement; from format
//! version 2 the envelope's own `sha256` covers all of it (metadata,
//! weights and optimizer state), checked on every read. An envelope that
//! says format version 1 is read only when its bytes are exactly what the
//! version 1 writer made of what it holds (no `sha256`, the five fields in
//! their order): else a version 2 envelope with that byte changed would
//! skip the whole-envelope check. This module does the format only: where
//! checkpoints live is the store's and the bus's business.

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
    /// Latent dimensions in use on held-out frames (`vae::properties::Diagnostics`).
    /// Absent where none were computed: versions made before wmvae computed
    /// them, initial and imported weights, checkpoints without held-out
    /// frames. Absent fields are not serialised, so the envelope of an older
    /// checkpoint re-serialises to its own bytes and still verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_units: Option<u32>,
    /// Mean KL(q(z_j | x) || N(0, 1)) per latent dimension on held-out
    /// frames, nats (`z_size` numbers); absent as `active_units` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kl_per_dim: Option<Vec<f64>>,
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
    /// Whether `bytes` (this envelope's) are exactly what the format
    /// version 1 writer made of its fields: a version 1 envelope has no
    /// whole-envelope sha256, so only its exact shape vouches for it.
    fn written_by_version_1(&self, bytes: &[u8]) -> Result<bool> {
        if self.format_version != 1 || !self.sha256.is_empty() {
            return Ok(false);
        }
        let v1 = EnvelopeV1 {
            format: &self.format,
            format_version: 1,
            metadata: &self.metadata,
            weights: &self.weights,
            optimizer: &self.optimizer,
        };
        Ok(rmp_serde::to_vec_named(&v1).context("serialising checkpoint")? == bytes)
    }

    /// The sha256 this envelope should carry.
    fn digest(&mut self) -> Result<String> {
        let carried = std::mem::take(&mut self.sha256);
        let bytes = rmp_serde::to_vec_named(self).context("serialising checkpoint");
        self.sha256 = carried;
        Ok(sha256_hex(&bytes?))
    }
}

/// A format version 1 envelope as its writer made it (wmvae before the
/// envelope's `sha256`): the same map less that field.
#[derive(Serialize)]
struct EnvelopeV1<'a> {
    format: &'a str,
    format_version: u32,
    metadata: &'a Metadata,
    #[serde(with = "serde_bytes")]
    weights: &'a [u8],
    #[serde(with = "serde_bytes")]
    optimizer: &'a [u8],
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
        Checkpoint {
            metadata,
            weights,
            optimizer,
        }
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
        let head: EnvelopeHead =
            rmp_serde::from_slice(bytes).context("not a wmvae checkpoint (unreadable envelope)")?;
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
            bail!(
                "checkpoint v{}: the envelope does not match its sha256 (metadata, weights or optimizer state \
                damaged); refusing to load",
                envelope.metadata.version
            );
        }
        if head.format_version < 2 && !envelope.written_by_version_1(bytes)? {
            bail!(
                "checkpoint v{}: the envelope says format version {} but is not what that version wrote (damaged, or \
                another version's with its number changed); refusing to \
                load",
                envelope.metadata.version,
                head.format_version
            );
        }
        let checkpoint = Checkpoint {
            metadata: envelope.metadata,
            weights: envelope.weights,
            optimizer: envelope.optimizer,
        };
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
        let metadata = Metadata {
            version: 3,
            parent: Some(2),
            step: 100,
            created_at: now_rfc3339(),
            ..Default::default()
        };
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

    /// What the format version 1 writer made (its `Envelope` then: these
    /// five fields, serialised by `to_vec_named`; git 3e65e9c..4ca64a2).
    fn written_by_version_1(c: &Checkpoint) -> Vec<u8> {
        #[derive(Serialize)]
        struct Envelope {
            format: String,
            format_version: u32,
            metadata: Metadata,
            #[serde(with = "serde_bytes")]
            weights: Vec<u8>,
            #[serde(with = "serde_bytes")]
            optimizer: Vec<u8>,
        }
        let envelope = Envelope {
            format: FORMAT.into(),
            format_version: 1,
            metadata: c.metadata.clone(),
            weights: c.weights.clone(),
            optimizer: c.optimizer.clone(),
        };
        rmp_serde::to_vec_named(&envelope).unwrap()
    }

    #[test]
    fn version_1_envelopes_are_still_read() {
        let c = sample();
        assert_eq!(Checkpoint::from_bytes(&written_by_version_1(&c)).unwrap(), c);
    }

    /// A version 2 envelope whose version byte says 1, damaged or not, is
    /// refused: it would skip the whole-envelope sha256. So is a version 1
    /// envelope changed where only that sha256 would have seen it.
    #[test]
    fn only_what_version_1_wrote_is_read_as_version_1() {
        let bytes = sample().to_bytes().unwrap();
        let at = bytes.windows(15).position(|w| w == b"format_version\x02").unwrap() + 14;
        let mut flipped = bytes.clone();
        flipped[at] = 1;
        let err = Checkpoint::from_bytes(&flipped).unwrap_err().to_string();
        assert!(err.contains("not what that version wrote"), "{err}");
        let optimizer = flipped.windows(9).rposition(|w| w == b"optimizer").unwrap();
        flipped[optimizer + 2] ^= 1;
        assert!(
            Checkpoint::from_bytes(&flipped).is_err(),
            "damage past the flipped byte too"
        );
        // A genuine version 1 envelope with its optimizer state changed
        // still reads (version 1 had nothing to catch that) ...
        let v1 = written_by_version_1(&sample());
        let optimizer = v1.windows(9).rposition(|w| w == b"optimizer").unwrap();
        let mut changed = v1.clone();
        changed[optimizer + 2] ^= 1;
        assert!(Checkpoint::from_bytes(&changed).is_ok());
        // ... but not one given an extra field, or with its fields in another order.
        #[derive(Serialize)]
        struct Reordered<'a> {
            format_version: u32,
            format: &'a str,
            metadata: &'a Metadata,
            #[serde(with = "serde_bytes")]
            weights: &'a [u8],
            #[serde(with = "serde_bytes")]
            optimizer: &'a [u8],
        }
        let c = sample();
        let reordered = rmp_serde::to_vec_named(&Reordered {
            format_version: 1,
            format: FORMAT,
            metadata: &c.metadata,
            weights: &c.weights,
            optimizer: &c.optimizer,
        })
        .unwrap();
        assert!(Checkpoint::from_bytes(&reordered)
            .unwrap_err()
            .to_string()
            .contains("not what that version wrote"));
        let mut with_sha = Envelope {
            format: FORMAT.into(),
            format_version: 1,
            metadata: c.metadata.clone(),
            weights: c.weights.clone(),
            optimizer: c.optimizer.clone(),
            sha256: String::new(),
        };
        with_sha.sha256 = with_sha.digest().unwrap();
        let err = Checkpoint::from_bytes(&rmp_serde::to_vec_named(&with_sha).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not what that version wrote"), "{err}");
    }

    /// The metadata as wmvae wrote it before `active_units` and
    /// `kl_per_dim` (git bc251e8): a version 2 envelope of it, its sha256
    /// over those fields only, still verifies and reads with both absent.
    #[test]
    fn envelopes_from_before_the_diagnostics_still_verify() {
        #[derive(Serialize)]
        struct OldMetadata {
            version: u64,
            parent: Option<u64>,
            step: u64,
            frames_seen: u64,
            train_loss: Option<f64>,
            eval_loss: Option<f64>,
            eval_recon: Option<f64>,
            eval_kl: Option<f64>,
            created_at: String,
            sha256: String,
            config: serde_json::Value,
        }
        #[derive(Serialize)]
        struct OldEnvelope<'a> {
            format: &'a str,
            format_version: u32,
            metadata: OldMetadata,
            #[serde(with = "serde_bytes")]
            weights: &'a [u8],
            #[serde(with = "serde_bytes")]
            optimizer: &'a [u8],
            sha256: String,
        }
        let c = sample();
        let m = c.metadata.clone();
        let mut old = OldEnvelope {
            format: FORMAT,
            format_version: 2,
            metadata: OldMetadata {
                version: m.version,
                parent: m.parent,
                step: m.step,
                frames_seen: m.frames_seen,
                train_loss: Some(1.5),
                eval_loss: m.eval_loss,
                eval_recon: m.eval_recon,
                eval_kl: m.eval_kl,
                created_at: m.created_at,
                sha256: m.sha256,
                config: serde_json::json!({"train": {"batch_size": 100}}),
            },
            weights: &c.weights,
            optimizer: &c.optimizer,
            sha256: String::new(),
        };
        old.sha256 = sha256_hex(&rmp_serde::to_vec_named(&old).unwrap());
        let read = Checkpoint::from_bytes(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        assert_eq!((read.metadata.active_units, read.metadata.kl_per_dim), (None, None));
        assert_eq!((read.metadata.step, read.metadata.train_loss), (100, Some(1.5)));
        // And the new fields round-trip, under the envelope's sha256.
        let mut new = sample();
        (new.metadata.active_units, new.metadata.kl_per_dim) = (Some(7), Some(vec![0.25; 32]));
        assert_eq!(Checkpoint::from_bytes(&new.to_bytes().unwrap()).unwrap(), new);
    }

    #[test]
    fn newer_and_foreign_envelopes_are_refused() {
        #[derive(Serialize)]
        struct Future {
            format: &'static str,
            format_version: u32,
        }
        let bytes = rmp_serde::to_vec_named(&Future {
            format: FORMAT,
            format_version: 99,
        })
        .unwrap();
        let err = Checkpoint::from_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("newer wmvae"), "{err}");
        let bytes = rmp_serde::to_vec_named(&Future {
            format: "other",
            format_version: 1,
        })
        .unwrap();
        assert!(Checkpoint::from_bytes(&bytes)
            .unwrap_err()
            .to_string()
            .contains("not a wmvae checkpoint"));
        assert!(Checkpoint::from_bytes(b"\xc1garbage").is_err());
    }
}
