//! The vision model and everything that touches its tensors: the World
//! Models ConvVAE ([`model`]), our saveable Adam ([`adam`]), model + optimizer
//! on one device ([`learner`]), PyTorch-compatible safetensors ([`weights`]),
//! the checkpoint envelope ([`checkpoint`]), the device choice ([`device`])
//! and what a version shows of itself: decoding, prior samples,
//! interpolation, latent diagnostics ([`properties`]).
//!
//! The only folder that uses tch (besides the benches): the rest of the
//! crate hands it frames as bytes and gets back numbers, bytes and PNGs.
//! It does no I/O to services; files are the callers' business.

pub mod adam;
pub mod checkpoint;
pub mod device;
pub mod learner;
pub mod model;
pub mod properties;
pub mod weights;
