//! The hostile frames of `wmvae bench chaos`: every malformed kind, each
//! with the reason it must be dead-lettered with, and valid frames of odd
//! identity, each of which must get its own latent; and whether each met
//! its fate.

use serde::Serialize;
use std::collections::BTreeMap;
use wmvae::bus::messages::LatentMessage;
use wmvae::bus::StoredMessage;
use wmvae::frames::identity::{message_id, MAX_EPISODE_BYTES};
use wmvae::frames::wire::{FrameMessage, MAX_ACTION_LEN, MAX_SIDE, MAX_STEP};

/// The source malformed frames come from (good ones come from `bench`).
const BAD_SOURCE: &str = "chaos";

/// A MessagePack value for building malformed frames field by field.
#[derive(Serialize, Clone)]
#[serde(untagged)]
enum V {
    U(u64),
    I(i64),
    F(f64),
    S(String),
    B(#[serde(with = "serde_bytes")] Vec<u8>),
    A(Vec<V>),
}

fn pack(map: &BTreeMap<&str, V>) -> Vec<u8> {
    rmp_serde::to_vec_named(map).expect("a map of plain values serialises")
}

/// A valid 64x64 raw frame's fields.
fn good_fields() -> BTreeMap<&'static str, V> {
    BTreeMap::from([
        ("episode", V::S("bad".into())),
        ("step", V::U(1)),
        ("height", V::U(64)),
        ("width", V::U(64)),
        ("channels", V::U(3)),
        ("pixels", V::B(vec![7; 64 * 64 * 3])),
    ])
}

/// `good_fields` with `changes` applied (None removes the field).
fn with(changes: &[(&'static str, Option<V>)]) -> Vec<u8> {
    let mut map = good_fields();
    for (key, value) in changes {
        match value {
            Some(v) => map.insert(key, v.clone()),
            None => map.remove(key),
        };
    }
    pack(&map)
}

/// What must become of a hostile frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Fate {
    /// Dead-lettered with a reason starting with this code.
    DeadLetter(&'static str),
    /// Valid, however odd its identity: stored, and a latent for it under
    /// its own id (two such frames must not share one).
    Encoded,
}

/// A hostile frame: where it is published, its bytes, and its fate.
pub(super) struct Hostile {
    pub(super) source: String,
    pub(super) payload: Vec<u8>,
    pub(super) fate: Fate,
}

/// Every kind of malformed frame tried, each with the reason it must be
/// dead-lettered with.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    [not_frames(), bad_fields(), bad_values(), bad_images()].concat()
}

/// `good_fields` with `episode` as the episode.
fn with_episode(episode: &str) -> Vec<u8> {
    with(&[("episode", Some(V::S(episode.into())))])
}

/// Bytes that are no frame: cut or invalid MessagePack, values that are no map, maps missing a field.
fn not_frames() -> Vec<(&'static str, Vec<u8>)> {
    let valid = with(&[]);
    let mut kinds: Vec<(&'static str, Vec<u8>)> = vec![
        ("malformed_msgpack", vec![]),
        ("malformed_msgpack", vec![0xc1]),
        ("malformed_msgpack", valid[..5].to_vec()),
        ("malformed_msgpack", valid[..valid.len() / 2].to_vec()),
        ("malformed_msgpack", valid[..valid.len() - 1].to_vec()),
        // Valid MessagePack, but no frame map: JSON's `{` is the integer 123.
        ("invalid_field", b"{\"episode\": \"json\"}".to_vec()),
        ("invalid_field", vec![0x93, 1, 2, 3]),
        ("invalid_field", vec![0x2a]),
        ("invalid_field", vec![0xff; 64]),
        ("invalid_field", vec![0x00; 64]),
    ];
    for field in ["episode", "step", "height", "width", "channels", "pixels"] {
        kinds.push(("invalid_field", with(&[(field, None)])));
    }
    kinds
}

/// Frames with a field of the wrong type, or an episode or step out of bounds.
fn bad_fields() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("invalid_field", with(&[("step", Some(V::S("one".into())))])),
        ("invalid_field", with(&[("height", Some(V::I(-1)))])),
        // A string where bytes belong is read as its bytes: too few of them.
        ("size_mismatch", with(&[("pixels", Some(V::S("pixels".into())))])),
        ("invalid_field", with(&[("episode", Some(V::U(5)))])),
        ("bad_episode", with_episode("")),
        ("bad_episode", with_episode(&"e".repeat(MAX_EPISODE_BYTES + 1))),
        // Identities that once reached a header unchecked (a CR or LF made
        // async-nats panic in a worker: no latent after them).
        ("bad_episode", with_episode("a\nb")),
        ("bad_episode", with_episode("a\rb")),
        ("bad_episode", with_episode("a\0b")),
        ("bad_episode", with_episode("tab\there")),
        ("bad_episode", with_episode("c1\u{85}")),
        ("bad_step", with(&[("step", Some(V::U(MAX_STEP + 1)))])),
    ]
}

/// Frames with a bad transition, dimensions, channel count or pixel count.
fn bad_values() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("bad_transition", with(&[("action", Some(V::A(vec![V::F(f64::NAN)])))])),
        (
            "bad_transition",
            with(&[("action", Some(V::A(vec![V::F(f64::INFINITY)])))]),
        ),
        (
            "bad_transition",
            with(&[("action", Some(V::A(vec![V::F(0.0); MAX_ACTION_LEN + 1])))]),
        ),
        ("bad_transition", with(&[("reward", Some(V::F(f64::NAN)))])),
        ("bad_transition", with(&[("reward", Some(V::F(f64::NEG_INFINITY)))])),
        ("bad_dimensions", with(&[("height", Some(V::U(0)))])),
        ("bad_dimensions", with(&[("width", Some(V::U(0)))])),
        (
            "bad_dimensions",
            with(&[("height", Some(V::U(u64::from(MAX_SIDE) + 1)))]),
        ),
        ("wrong_channels", with(&[("channels", Some(V::U(1)))])),
        ("wrong_channels", with(&[("channels", Some(V::U(4)))])),
        (
            "size_mismatch",
            with(&[("pixels", Some(V::B(vec![7; 64 * 64 * 3 - 1])))]),
        ),
        (
            "size_mismatch",
            with(&[("pixels", Some(V::B(vec![7; 64 * 64 * 3 + 1])))]),
        ),
        ("size_mismatch", with(&[("pixels", Some(V::B(Vec::new())))])),
    ]
}

/// Frames whose image can't be read or is of a size the daemon doesn't take.
fn bad_images() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("unknown_encoding", with(&[("encoding", Some(V::S("jpeg".into())))])),
        ("unknown_encoding", with(&[("encoding", Some(V::S(String::new())))])),
        (
            "bad_png",
            with(&[
                ("encoding", Some(V::S("png".into()))),
                ("pixels", Some(V::B(b"\x89PNG not really".to_vec()))),
            ]),
        ),
        (
            "bad_png",
            with(&[
                ("encoding", Some(V::S("png".into()))),
                ("pixels", Some(V::B(vec![0; 100]))),
            ]),
        ),
        (
            "unsupported_size",
            with(&[
                ("height", Some(V::U(32))),
                ("width", Some(V::U(32))),
                ("pixels", Some(V::B(vec![7; 32 * 32 * 3]))),
            ]),
        ),
        (
            "unsupported_size",
            with(&[
                ("height", Some(V::U(100))),
                ("width", Some(V::U(80))),
                ("pixels", Some(V::B(vec![7; 100 * 80 * 3]))),
            ]),
        ),
    ]
}

/// Every hostile frame: the malformed kinds from [`BAD_SOURCE`]; a source
/// with a control character; and valid frames whose identities would have
/// shared one message id (`/` in a source or an episode) or need escaping,
/// which must each get their own latent.
pub(super) fn hostile() -> Vec<Hostile> {
    let mut all: Vec<Hostile> = malformed()
        .into_iter()
        .map(|(code, payload)| Hostile {
            source: BAD_SOURCE.into(),
            payload,
            fate: Fate::DeadLetter(code),
        })
        .collect();
    all.push(Hostile {
        source: format!("{BAD_SOURCE}\u{1}x"),
        payload: with(&[]),
        fate: Fate::DeadLetter("bad_subject"),
    });
    for (source, episode_name) in [
        (format!("{BAD_SOURCE}/a"), "1"),
        (BAD_SOURCE.to_string(), "a/1"),
        (BAD_SOURCE.to_string(), "run 5%/x é"),
    ] {
        all.push(Hostile {
            source,
            payload: with_episode(episode_name),
            fate: Fate::Encoded,
        });
    }
    all
}

/// Whether `kind` met its fate: None while nothing is there yet, Some(false)
/// when something else became of it (a letter with another reason, a
/// latent under another episode), Some(true) when it did.
pub(super) fn settled(
    kind: &Hostile,
    letters: &[StoredMessage],
    latents: &[StoredMessage],
    latent_prefix: String,
) -> Option<bool> {
    match kind.fate {
        Fate::DeadLetter(code) => {
            let letter = letters.iter().find(|m| m.payload.as_ref() == kind.payload.as_slice())?;
            Some(letter.reason.as_deref().is_some_and(|r| r.starts_with(code)))
        }
        Fate::Encoded => {
            let frame: FrameMessage = rmp_serde::from_slice(&kind.payload).ok()?;
            let subject = format!("{latent_prefix}{}", kind.source);
            let of_frame = |m: &&StoredMessage| {
                m.subject == subject
                    && rmp_serde::from_slice::<LatentMessage>(&m.payload)
                        .is_ok_and(|l| l.episode == frame.episode && l.step == frame.step)
            };
            let latent = latents.iter().find(of_frame)?;
            Some(latent.id.as_deref() == Some(message_id(&kind.source, &frame.episode, frame.step).as_str()))
        }
    }
}
