//! The wire contract (PROTOCOL.md): a MessagePack map per frame on
//! `wm.frames.<source>`, decoded and checked into a preprocessed [`Frame`](super::Frame),
//! or a [`Rejection`] with a stable reason code for the dead-letter header.
//! The messages wmvae sends (latents, announcements) are the bus's.
//!
//! Pure decoding: no NATS, no sled. Every check runs before any large
//! allocation, so a hostile message costs at most its own size.

use super::identity::{check_episode, check_source};
use super::preprocess::{self, Policy};
use super::Frame;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// Largest accepted frame side. CarRacing is 96; 1,024 leaves room for other
/// environments while bounding the memory a single message can ask for.
pub const MAX_SIDE: u32 = 1024;
/// Largest `step`: 2^53 - 1, so JSON and float64 readers (the exports,
/// Python) see every step exactly.
pub const MAX_STEP: u64 = (1 << 53) - 1;
/// Longest `action`: CarRacing's is 3, MuJoCo's tens; the cap bounds what
/// one frame adds to every row of `buffer export` (padded to the widest).
pub const MAX_ACTION_LEN: usize = 64;
/// Decoded PNG bytes allowed: a 1,024 x 1,024 RGB image plus slack.
const MAX_PNG_DECODED_BYTES: usize = 4 * 1024 * 1024;

/// One frame as publishers send it (field names pinned by the contract).
/// Decoding borrows `pixels` from the payload: a raw 64x64 frame is never
/// copied on its way into the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameMessage<'a> {
    pub episode: String,
    pub step: u64,
    pub height: u32,
    pub width: u32,
    pub channels: u32,
    #[serde(borrow, with = "serde_bytes")]
    pub pixels: Cow<'a, [u8]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Vec<f32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<bool>,
}

impl<'a> FrameMessage<'a> {
    /// A raw RGB frame with no optional fields.
    pub fn rgb(
        episode: impl Into<String>,
        step: u64,
        height: u32,
        width: u32,
        pixels: impl Into<Cow<'a, [u8]>>,
    ) -> FrameMessage<'a> {
        FrameMessage {
            episode: episode.into(),
            step,
            height,
            width,
            channels: 3,
            pixels: pixels.into(),
            encoding: None,
            action: None,
            reward: None,
            done: None,
        }
    }

    /// The same frame with the transition's optional fields: the action
    /// taken on it, the reward received and whether the episode ended.
    pub fn with_transition(self, action: Vec<f32>, reward: f64, done: bool) -> FrameMessage<'a> {
        FrameMessage {
            action: Some(action),
            reward: Some(reward),
            done: Some(done),
            ..self
        }
    }

    /// MessagePack map bytes, as the contract says.
    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("a FrameMessage always serialises")
    }
}

/// Why a message was dead-lettered. The codes are stable: counters and the
/// `Wmvae-Reason` header use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not MessagePack, or truncated.
    MalformedMsgpack,
    /// MessagePack, but a field is missing or has the wrong type.
    InvalidField,
    /// Zero, or larger than [`MAX_SIDE`].
    BadDimensions,
    /// `channels` is not 3, or a PNG is not 8-bit RGB.
    WrongChannels,
    /// `pixels` is not height*width*channels bytes.
    SizeMismatch,
    /// `encoding` is neither "raw" nor "png".
    UnknownEncoding,
    /// The PNG can't be decoded or disagrees with height/width.
    BadPng,
    /// Not 64x64 nor 96x96, and the config doesn't say `preprocess = "resize"`.
    UnsupportedSize,
    /// The source (the subject after the prefix) is empty, too long, holds
    /// a control character or a wildcard token (`identity::check_source`).
    BadSubject,
    /// `episode` is empty, longer than `identity::MAX_EPISODE_BYTES` or holds a
    /// control character (`identity::check_episode`).
    BadEpisode,
    /// `step` is past [`MAX_STEP`].
    BadStep,
    /// `action` is longer than [`MAX_ACTION_LEN`] or not finite, or
    /// `reward` is not finite.
    BadTransition,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::MalformedMsgpack,
        Reason::InvalidField,
        Reason::BadDimensions,
        Reason::WrongChannels,
        Reason::SizeMismatch,
        Reason::UnknownEncoding,
        Reason::BadPng,
        Reason::UnsupportedSize,
        Reason::BadSubject,
        Reason::BadEpisode,
        Reason::BadStep,
        Reason::BadTransition,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Reason::MalformedMsgpack => "malformed_msgpack",
            Reason::InvalidField => "invalid_field",
            Reason::BadDimensions => "bad_dimensions",
            Reason::WrongChannels => "wrong_channels",
            Reason::SizeMismatch => "size_mismatch",
            Reason::UnknownEncoding => "unknown_encoding",
            Reason::BadPng => "bad_png",
            Reason::UnsupportedSize => "unsupported_size",
            Reason::BadSubject => "bad_subject",
            Reason::BadEpisode => "bad_episode",
            Reason::BadStep => "bad_step",
            Reason::BadTransition => "bad_transition",
        }
    }
}

/// A reason code and a human detail ("pixels has 100 bytes, expected 12288").
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.code(), self.detail)
    }
}

fn reject<T>(reason: Reason, detail: impl Into<String>) -> Result<T, Rejection> {
    Err(Rejection {
        reason,
        detail: detail.into(),
    })
}

fn decode_png(bytes: &[u8], height: u32, width: u32) -> Result<Vec<u8>, Rejection> {
    let limits = png::Limits {
        bytes: MAX_PNG_DECODED_BYTES,
    };
    let decoder = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
    let mut reader = decoder
        .read_info()
        .or_else(|e| reject(Reason::BadPng, format!("undecodable PNG: {e}")))?;
    let info = reader.info();
    if (info.width, info.height) != (width, height) {
        return reject(
            Reason::BadPng,
            format!("PNG is {}x{}, message says {height}x{width}", info.height, info.width),
        );
    }
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return reject(
            Reason::WrongChannels,
            format!("PNG is {:?} {:?}, expected 8-bit RGB", info.color_type, info.bit_depth),
        );
    }
    let size = reader.output_buffer_size().ok_or_else(|| Rejection {
        reason: Reason::BadPng,
        detail: "PNG too large".into(),
    })?;
    let mut buf = vec![0u8; size];
    reader
        .next_frame(&mut buf)
        .or_else(|e| reject(Reason::BadPng, format!("undecodable PNG: {e}")))?;
    buf.truncate((height * width * 3) as usize);
    Ok(buf)
}

fn classify(err: rmp_serde::decode::Error) -> Rejection {
    use rmp_serde::decode::Error as E;
    match err {
        E::Syntax(detail) | E::Uncategorized(detail) => Rejection {
            reason: Reason::InvalidField,
            detail,
        },
        E::TypeMismatch(rmp::Marker::Reserved) => Rejection {
            reason: Reason::MalformedMsgpack,
            detail: "byte 0xc1 is never used in MessagePack".into(),
        },
        E::TypeMismatch(marker) => Rejection {
            reason: Reason::InvalidField,
            detail: format!("unexpected {marker:?}"),
        },
        E::OutOfRange => Rejection {
            reason: Reason::InvalidField,
            detail: "number out of range".into(),
        },
        other => Rejection {
            reason: Reason::MalformedMsgpack,
            detail: other.to_string(),
        },
    }
}

/// Decodes, checks and preprocesses one message from `source`.
pub fn decode_frame(source: &str, payload: &Bytes, policy: Policy) -> Result<Frame, Rejection> {
    check_source(source).or_else(|why| reject(Reason::BadSubject, why))?;
    let msg: FrameMessage = rmp_serde::from_slice(payload).map_err(classify)?;
    let FrameMessage {
        episode,
        step,
        height,
        width,
        channels,
        pixels,
        encoding,
        action,
        reward,
        done,
    } = msg;
    check_episode(&episode).or_else(|why| reject(Reason::BadEpisode, why))?;
    if step > MAX_STEP {
        return reject(Reason::BadStep, format!("step {step} is past {MAX_STEP}"));
    }
    check_transition(action.as_deref(), reward)?;
    check_shape(height, width, channels)?;
    let rgb = rgb_pixels(payload, pixels, encoding.as_deref(), height, width, channels)?;
    let pixels = preprocess::preprocess(rgb, height as usize, width as usize, policy)
        .or_else(|e| reject(Reason::UnsupportedSize, e.to_string()))?;
    Ok(Frame {
        source: source.to_string(),
        episode,
        step,
        pixels,
        action,
        reward,
        done,
    })
}

/// Checks the action's length and that action and reward are finite numbers.
fn check_transition(action: Option<&[f32]>, reward: Option<f64>) -> Result<(), Rejection> {
    if let Some(action) = action {
        if action.len() > MAX_ACTION_LEN {
            return reject(
                Reason::BadTransition,
                format!("action has {} values, at most {MAX_ACTION_LEN}", action.len()),
            );
        }
        if !action.iter().all(|a| a.is_finite()) {
            return reject(Reason::BadTransition, "action holds NaN or infinity");
        }
    }
    if reward.is_some_and(|r| !r.is_finite()) {
        return reject(Reason::BadTransition, "reward is NaN or infinity");
    }
    Ok(())
}

/// Checks the dimensions are within bounds and the channels are RGB.
fn check_shape(height: u32, width: u32, channels: u32) -> Result<(), Rejection> {
    if height == 0 || width == 0 || height > MAX_SIDE || width > MAX_SIDE {
        return reject(
            Reason::BadDimensions,
            format!("{height}x{width} outside 1..={MAX_SIDE}"),
        );
    }
    if channels != 3 {
        return reject(
            Reason::WrongChannels,
            format!("channels is {channels}, expected 3 (RGB)"),
        );
    }
    Ok(())
}

/// The frame's RGB bytes: raw pixels as given (sliced from `payload` where borrowed from it), or a PNG decoded.
fn rgb_pixels(
    payload: &Bytes,
    pixels: Cow<[u8]>,
    encoding: Option<&str>,
    height: u32,
    width: u32,
    channels: u32,
) -> Result<Bytes, Rejection> {
    let rgb = match encoding.unwrap_or("raw") {
        "raw" => {
            let expected = (height * width * channels) as usize;
            if pixels.len() != expected {
                return reject(
                    Reason::SizeMismatch,
                    format!("pixels has {} bytes, {height}x{width}x3 needs {expected}", pixels.len()),
                );
            }
            match pixels {
                // Borrowed by `from_slice` from `payload` itself, and non-empty (checked
                // above), so `slice_ref` always finds it inside.
                Cow::Borrowed(borrowed) => payload.slice_ref(borrowed),
                Cow::Owned(owned) => Bytes::from(owned),
            }
        }
        "png" => Bytes::from(decode_png(&pixels, height, width)?),
        other => {
            return reject(
                Reason::UnknownEncoding,
                format!("encoding {other:?} is neither \"raw\" nor \"png\""),
            )
        }
    };
    Ok(rgb)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::identity::MAX_EPISODE_BYTES;

    fn message(height: u32, width: u32) -> FrameMessage<'static> {
        FrameMessage {
            episode: "ep-1".into(),
            step: 7,
            height,
            width,
            channels: 3,
            pixels: vec![100; (height * width * 3) as usize].into(),
            encoding: None,
            action: Some(vec![0.5, -1.0, 0.0]),
            reward: Some(1.5),
            done: Some(false),
        }
    }

    fn decode(payload: &[u8], policy: Policy) -> Result<Frame, Rejection> {
        decode_frame("car", &Bytes::copy_from_slice(payload), policy)
    }

    fn reason(payload: &[u8]) -> Reason {
        decode(payload, Policy::WorldModels).unwrap_err().reason
    }

    #[test]
    fn valid_frames_keep_their_fields() {
        let f = decode(&message(96, 96).to_msgpack(), Policy::WorldModels).unwrap();
        assert_eq!((f.source.as_str(), f.episode.as_str(), f.step), ("car", "ep-1", 7));
        assert_eq!(f.pixels.len(), 64 * 64 * 3);
        assert_eq!(f.action, Some(vec![0.5, -1.0, 0.0]));
        assert_eq!((f.reward, f.done), (Some(1.5), Some(false)));
    }

    #[test]
    fn raw_64x64_pixels_are_a_slice_of_the_payload() {
        let payload = Bytes::from(message(64, 64).to_msgpack());
        let f = decode_frame("car", &payload, Policy::WorldModels).unwrap();
        let range = payload.as_ptr() as usize..payload.as_ptr() as usize + payload.len();
        assert!(
            range.contains(&(f.pixels.as_ptr() as usize)),
            "pixels were copied out of the payload"
        );
        assert_eq!(f.pixels, vec![100u8; 64 * 64 * 3]);
    }

    #[test]
    fn pixels_sent_as_an_array_of_integers_still_decode() {
        // Some MessagePack writers send a byte list as an array, not `bin`.
        #[derive(Serialize)]
        struct ArrayPixels {
            episode: String,
            step: u64,
            height: u32,
            width: u32,
            channels: u32,
            pixels: Vec<u8>,
        }
        let msg = ArrayPixels {
            episode: "e".into(),
            step: 1,
            height: 64,
            width: 64,
            channels: 3,
            pixels: vec![7; 64 * 64 * 3],
        };
        let f = decode(&rmp_serde::to_vec_named(&msg).unwrap(), Policy::WorldModels).unwrap();
        assert_eq!(f.pixels, vec![7u8; 64 * 64 * 3]);
    }

    #[test]
    fn png_frames_decode_to_the_same_pixels() {
        let raw = message(64, 64);
        let mut png_bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut png_bytes, 64, 64);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.write_header().unwrap().write_image_data(&raw.pixels).unwrap();
        }
        let png_msg = FrameMessage {
            pixels: png_bytes.into(),
            encoding: Some("png".into()),
            ..raw.clone()
        };
        let a = decode(&raw.to_msgpack(), Policy::WorldModels).unwrap();
        let b = decode(&png_msg.to_msgpack(), Policy::WorldModels).unwrap();
        assert_eq!(a, b);
        let broken = FrameMessage {
            pixels: b"\x89PNG garbage".to_vec().into(),
            ..png_msg
        };
        assert_eq!(reason(&broken.to_msgpack()), Reason::BadPng);
    }

    #[test]
    fn every_kind_of_bad_input_has_its_reason() {
        assert_eq!(reason(b"\xc1\xc1"), Reason::MalformedMsgpack);
        assert_eq!(reason(b"\xc1\xc1\xc1"), Reason::MalformedMsgpack);
        let full = message(64, 64).to_msgpack();
        assert_eq!(reason(&full[..full.len() / 2]), Reason::MalformedMsgpack);
        assert_eq!(
            reason(&rmp_serde::to_vec_named(&("a", 1)).unwrap()),
            Reason::InvalidField
        );
        #[derive(Serialize)]
        struct Partial {
            episode: String,
        }
        assert_eq!(
            reason(&rmp_serde::to_vec_named(&Partial { episode: "e".into() }).unwrap()),
            Reason::InvalidField
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    height: 0,
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadDimensions
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    width: 100_000,
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadDimensions
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    channels: 4,
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::WrongChannels
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    pixels: vec![0; 10].into(),
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::SizeMismatch
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    encoding: Some("jpeg".into()),
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::UnknownEncoding
        );
        assert_eq!(reason(&message(32, 48).to_msgpack()), Reason::UnsupportedSize);
        assert!(decode(&message(32, 48).to_msgpack(), Policy::Resize).is_ok());
        assert_eq!(
            decode_frame("", &Bytes::from(full.clone()), Policy::WorldModels)
                .unwrap_err()
                .reason,
            Reason::BadSubject
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    episode: String::new(),
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadEpisode
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    episode: "e".repeat(MAX_EPISODE_BYTES + 1),
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadEpisode
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    episode: "a\nb".into(),
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadEpisode
        );
        assert_eq!(
            reason(
                &FrameMessage {
                    episode: "a\rb".into(),
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadEpisode
        );
        assert_eq!(
            decode_frame("a\nb", &Bytes::from(full.clone()), Policy::WorldModels)
                .unwrap_err()
                .reason,
            Reason::BadSubject
        );
        assert_eq!(
            decode_frame("a.*", &Bytes::from(full.clone()), Policy::WorldModels)
                .unwrap_err()
                .reason,
            Reason::BadSubject
        );
        assert!(decode(
            &FrameMessage {
                episode: "runs/a b".into(),
                ..message(64, 64)
            }
            .to_msgpack(),
            Policy::WorldModels
        )
        .is_ok());
        assert_eq!(
            reason(
                &FrameMessage {
                    step: MAX_STEP + 1,
                    ..message(64, 64)
                }
                .to_msgpack()
            ),
            Reason::BadStep
        );
        let transition =
            |action: Vec<f32>, reward: f64| message(64, 64).with_transition(action, reward, false).to_msgpack();
        assert_eq!(
            reason(&transition(vec![0.0; MAX_ACTION_LEN + 1], 0.0)),
            Reason::BadTransition
        );
        assert_eq!(
            reason(&transition(vec![0.0, f32::NAN, 0.0], 0.0)),
            Reason::BadTransition
        );
        assert_eq!(
            reason(&transition(vec![0.0, f32::INFINITY, 0.0], 0.0)),
            Reason::BadTransition
        );
        assert_eq!(
            reason(&transition(vec![0.0, 1.0, 0.0], f64::NAN)),
            Reason::BadTransition
        );
        assert_eq!(
            reason(&transition(vec![0.0, 1.0, 0.0], f64::NEG_INFINITY)),
            Reason::BadTransition
        );
        assert!(decode(
            &FrameMessage {
                episode: "e".repeat(MAX_EPISODE_BYTES),
                step: MAX_STEP,
                ..message(64, 64)
            }
            .to_msgpack(),
            Policy::WorldModels
        )
        .is_ok());
        assert!(decode(&transition(vec![0.0; MAX_ACTION_LEN], -1.0), Policy::WorldModels).is_ok());
    }
}
