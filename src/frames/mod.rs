//! Frames as the outside world sends them and the model sees them: the wire
//! contract ([`wire`]: decode and check, reasons for dead letters), a
//! frame's identity and its message id ([`identity`]), World
//! Models preprocessing ([`preprocess`]), uint8 `.npy` frame files ([`npy`]),
//! CarRacing-like frames without a simulator ([`synthetic`]) and PNG grids
//! ([`grid`]).
//!
//! Pure computation and files: no NATS, no sled, no tensors. The frame
//! geometry the whole crate uses is defined here, once.

pub mod grid;
pub mod identity;
pub mod npy;
pub mod preprocess;
pub mod synthetic;
pub mod wire;

/// Side of the square frames the model sees (World Models: 64x64).
pub const SIDE: usize = 64;
/// RGB.
pub const CHANNELS: usize = 3;
/// Bytes of one preprocessed frame (64 x 64 x 3, row-major HWC).
pub const BYTES: usize = SIDE * SIDE * CHANNELS;

/// A checked, preprocessed frame, ready for the replay buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub source: String,
    pub episode: String,
    pub step: u64,
    /// 64 x 64 x 3 uint8, HWC; for a raw 64x64 frame, a slice of the
    /// message it came in.
    pub pixels: bytes::Bytes,
    pub action: Option<Vec<f32>>,
    pub reward: Option<f64>,
    pub done: Option<bool>,
}
