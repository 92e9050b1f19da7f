//! wmvae: a streaming trainer for the vision model (V) of World Models
//! (Ha & Schmidhuber, 2018) on libtorch.
//!
//! Module map:
//!
//! * `model`      the convolutional VAE and its loss (tch only, no I/O)
//! * `adam`       our Adam, whose state saves with the weights
//! * `learner`    model + optimizer on one device: step, eval, encode, snapshot
//! * `weights`    named tensors to and from PyTorch-compatible safetensors
//! * `checkpoint` full checkpoints (weights + optimizer + metadata) as bytes
//! * `preprocess` CarRacing frames to 64x64 (crop, PIL-exact bilinear resize)
//! * `npy`        streaming uint8 frame arrays in numpy's format
//! * `encode`     the offline `wmvae encode` command
//! * `bench`      `wmvae bench ...` measurements
//! * `config`     the one configuration: defaults, file, environment
//! * `device`     cpu / cuda / auto
//!
//! The binary (`src/main.rs`) only parses arguments and calls into these.

pub mod adam;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod device;
pub mod encode;
pub mod learner;
pub mod model;
pub mod npy;
pub mod preprocess;
pub mod weights;
