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

include!("build_rpath.rs");
