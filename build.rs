//! Link-time fixes for libtorch from PyPI (see ../shared/NOTES.md and ARCHITECTURE.md).
//!
//! * An rpath to libtorch's `lib/` so `target/*/wmvae` and the test binaries run
//!   without `LD_LIBRARY_PATH` (which still wins, so a GPU machine can point at
//!   its own libtorch).
//!
//! libtorch_cuda is deliberately not linked: `vae::device` loads it at run time
//! where an NVIDIA driver exists (the rpath finds it), so CPU machines don't map
//! ~210 MB of CUDA libraries.
//!
//! The libtorch directory comes from `LIBTORCH` (set in `.cargo/config.toml`).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set; run scripts/setup (no rpath)");
        return;
    };
    let lib_dir = PathBuf::from(libtorch).join("lib");
    let lib_dir = lib_dir.canonicalize().unwrap_or(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
}
