//! Shared helpers for the integration tests: paths into the project's venv
//! and small deterministic inputs.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;
use std::process::Command;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's Python (scripts/setup installs torch, safetensors, PIL there).
pub fn venv_python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

/// Runs `scripts/torch_reference.py` with `args`; panics with its stderr on failure.
pub fn torch_reference(args: &[&str]) {
    let out = Command::new(venv_python())
        .arg(repo_root().join("scripts/torch_reference.py"))
        .args(args)
        .output()
        .expect("running the venv's python (did scripts/setup run?)");
    assert!(out.status.success(), "torch_reference.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Deterministic, image-like uint8 frames (smooth gradients plus a pattern).
pub fn frames(n: usize, height: usize, width: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * height * width * 3);
    for i in 0..n {
        for y in 0..height {
            for x in 0..width {
                for c in 0..3 {
                    let v = (x * 3 + y * 2 + c * 60 + i * 17 + ((x * y + i) % 7) * 9) % 256;
                    out.push(v as u8);
                }
            }
        }
    }
    out
}

/// The `wmvae` binary built for these tests.
pub fn wmvae() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wmvae"))
}

pub mod nats;
