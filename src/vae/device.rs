//! Which libtorch device to run on: `auto` (CUDA when present), `cpu`, `cuda`,
//! and how many CPU threads libtorch uses. The rest of the crate names a
//! device through [`Device`] here and never calls libtorch itself.
//!
//! libtorch's CUDA backend (`libtorch_cuda.so` and the CUDA libraries it
//! pulls in, ~210 MB) is not linked: it is loaded here at run time, once,
//! and only on a machine with an NVIDIA driver, so a CPU machine never maps
//! it. Loading it registers CUDA with libtorch (its static initialisers);
//! nothing here calls into it.

use anyhow::{anyhow, bail, Result};
use std::ffi::{c_int, CStr};
use std::sync::OnceLock;
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
            DeviceChoice::Auto => match cuda() {
                Ok(device) => Ok(device),
                Err(why) => {
                    tracing::debug!("training on the cpu: {why}");
                    Ok(Device::Cpu)
                }
            },
            DeviceChoice::Cuda => {
                cuda().map_err(|why| anyhow!("device cuda requested but {why} (cuda available: false)"))
            }
        }
    }
}

/// The first CUDA device, once the backend is loaded; else why not.
fn cuda() -> Result<Device> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            if !nvidia_driver_present() {
                return Err("there is no NVIDIA driver here (libcuda.so.1)".into());
            }
            load_cuda_backend().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|why| anyhow!(why))?;
    if !tch::Cuda::is_available() {
        bail!("libtorch sees no CUDA device");
    }
    Ok(Device::Cuda(0))
}

/// Whether the NVIDIA driver's user-space library can be loaded.
pub fn nvidia_driver_present() -> bool {
    dlopen(c"libcuda.so.1", libc::RTLD_LAZY | libc::RTLD_LOCAL).is_ok()
}

/// Loads `libtorch_cuda.so` (found through the binary's rpath to libtorch,
/// or `LD_LIBRARY_PATH`), which registers libtorch's CUDA backend. Public
/// so a test on a machine without a driver can check what loading does.
pub fn load_cuda_backend() -> Result<()> {
    dlopen(c"libtorch_cuda.so", libc::RTLD_NOW | libc::RTLD_GLOBAL)
        .map_err(|e| anyhow!("loading libtorch's CUDA backend: {e}"))
}

/// `dlopen`, keeping the library loaded for the life of the process.
fn dlopen(name: &CStr, flags: c_int) -> std::result::Result<(), String> {
    // SAFETY: `name` is a valid C string; the handle is never closed, and
    // dlerror's message is copied before any other dl call.
    unsafe {
        if libc::dlopen(name.as_ptr(), flags).is_null() {
            let error = libc::dlerror();
            return Err(if error.is_null() {
                format!("{name:?} could not be loaded")
            } else {
                CStr::from_ptr(error).to_string_lossy().into_owned()
            });
        }
    }
    Ok(())
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
