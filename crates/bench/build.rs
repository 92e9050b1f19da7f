//! An rpath to libtorch's `lib/` so `target/*/wmvae-bench` runs without
//! `LD_LIBRARY_PATH`, as the root package's build.rs does for `wmvae`.

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
