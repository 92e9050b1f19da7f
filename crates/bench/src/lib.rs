//! wmvae's benches and the local nats-server launcher, out of the library:
//! the library is the daemon, this crate measures it from outside.
//!
//! * [`bench`]          `wmvae bench train|encode|ingest` (encode: and decode)
//! * [`bench_series`]   `wmvae bench series`: `wmvae series` beside batch-256 encoding
//! * [`bench_quality`]  `wmvae bench quality`: held-out loss against steps and seconds
//! * [`bench_daemon`]   `wmvae bench latency|pipeline`: the whole daemon in this process
//! * [`bench_idle`]     `wmvae bench idle`: the resident memory of an idle daemon
//! * [`bench_encoders`] `wmvae bench encoders`: encoder processes side by side
//! * [`bench_failover`] `wmvae bench failover`: a 3-node cluster, servers and nodes SIGKILLed
//! * [`bench_chaos`]    `wmvae bench chaos`: faults and malformed frames, then the books
//! * [`bench_nemesis`]  `wmvae bench nemesis`: seeded faults on a 3-node cluster, then the split-brain checks
//! * [`nats_server`]    local nats-server children, one or a cluster (benches and tests)
//! * [`netns`]          network namespaces that let one server of a cluster be cut from the others
//!
//! The binary `wmvae-bench` (`src/main.rs`) parses the benches' flags;
//! `wmvae bench ...` runs it (it sits beside `wmvae` in `target/*/`). The
//! benches that start daemon processes run the `wmvae` beside it
//! ([`wmvae_binary`]).

use anyhow::{bail, Result};
use std::path::PathBuf;
use std::process::Child;

pub mod bench;
pub mod bench_chaos;
pub mod bench_daemon;
pub mod bench_encoders;
pub mod bench_failover;
pub mod bench_idle;
pub mod bench_nemesis;
pub mod bench_quality;
pub mod bench_series;
pub mod nats_server;
pub mod netns;

/// Child processes (daemons the benches start), killed when dropped.
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `wmvae` binary beside this executable (both are built into the same
/// `target/*/` by a workspace build), for the benches that start daemons.
pub fn wmvae_binary() -> Result<PathBuf> {
    let here = std::env::current_exe()?;
    let wmvae = here.with_file_name("wmvae");
    if !wmvae.is_file() {
        bail!(
            "no wmvae beside {} (build both: cargo build --release --workspace)",
            here.display()
        );
    }
    Ok(wmvae)
}
