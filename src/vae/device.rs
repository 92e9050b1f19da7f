//! Which libtorch device to run on: `auto` (CUDA when present), `cpu`, `cuda`,
//! and how many CPU threads libtorch uses. The rest of the crate names a
//! device through [`Device`] here and never calls libtorch itself.

use anyhow::{bail, Result};
/// libtorch's device, re-exported so callers outside `vae` hold one
/// without depending on tch.
pub use tch::Device;

/// The user's choice, from the CLI or the config's `device` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// The device to use; asking for CUDA where there is none is an error,
    /// not a silent fall-back to the CPU.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceChoice::Cuda => bail!("device cuda requested but libtorch sees no CUDA device (cuda available: false)"),
        }
    }
}

/// Sets libtorch's intra-op threads; 0 keeps its default (one per core).
pub fn set_threads(threads: usize) {
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }
}

/// A short human name: "cpu" or "cuda:0".
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    }
}
