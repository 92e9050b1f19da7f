//! An rpath to libtorch's `lib/` so `target/*/wmvae-bench` runs without
//! `LD_LIBRARY_PATH`: the root package's build step, one copy.

include!("../../build_rpath.rs");
