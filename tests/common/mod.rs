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
    assert!(
        out.status.success(),
        "torch_reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A plain HTTP/1.1 GET on 127.0.0.1:`port`: (status code, body); (0, "")
/// when nothing listens.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).to_string();
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        code,
        response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default(),
    )
}

/// A free TCP port on 127.0.0.1 (free when asked; tests bind it soon after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Small, fast training for a 2-core CI box: `wmvae serve` environment.
pub const FAST: &[(&str, &str)] = &[
    ("WMVAE_TRAIN__MIN_FRAMES", "50"),
    ("WMVAE_TRAIN__BATCH_SIZE", "16"),
    ("WMVAE_TRAIN__CHECKPOINT_EVERY_STEPS", "10"),
    ("WMVAE_TRAIN__EVAL_EVERY_STEPS", "10"),
    ("WMVAE_TRAIN__LOG_EVERY_STEPS", "10"),
    ("WMVAE_TRAIN__KEEP_LAST", "1000"),
    ("WMVAE_TRAIN__SAMPLES_PER_INSERT", "0"),
    ("WMVAE_TRAIN__THREADS", "1"),
    ("WMVAE_BUFFER__VALIDATION_FRACTION", "0.3"),
];

/// [`FAST`], on a short lease (3 s).
pub fn short_lease() -> Vec<(&'static str, &'static str)> {
    FAST.iter()
        .copied()
        .chain([("WMVAE_NODE__LEASE_TTL_SECS", "3")])
        .collect()
}

/// The versions of the `created` announcements among `all`, in order.
pub fn created(all: &[wmvae::bus::messages::Announcement]) -> Vec<u64> {
    all.iter()
        .filter(|a| a.event == wmvae::bus::messages::CheckpointEvent::Created)
        .map(|a| a.metadata.version)
        .collect()
}

pub mod disk;
pub mod nats;
