//! wmvae: a streaming trainer for the vision model (V) of World Models
//! (Ha & Schmidhuber, 2018) on libtorch.
//!
//! Frames come in over NATS, are made durable in a replay buffer in sled,
//! train the VAE continuously, and go out as latents and versioned
//! checkpoints. One folder per role (ARCHITECTURE.md has the code map and
//! each folder's rules):
//!
//! * [`config`]   the one configuration: defaults, file, environment (figment), each section checking itself
//! * [`backoff`]  the one retry pause (doubling, bounded), for whatever waits out a fault
//! * [`frames`]   the frame wire contract, preprocessing, frame files and pictures (no I/O to services)
//! * [`vae`]      the model, our Adam, the learner, weights and checkpoint envelopes (the only tch user)
//! * [`store`]    the durable, bounded replay buffer and the version registry (the only sled user)
//! * [`bus`]      streams, consumers, objects, announcements, the control service (the only NATS user)
//! * [`versions`] what operators do to versions (list, show, import, rollback), shared by daemon and CLI
//! * [`series`]   a version's series of the buffer, a page at a time, shared by daemon and CLI
//! * [`daemon`]   `wmvae serve`: ingest, trainer, latents, control, status, HTTP, and their wiring
//! * [`cli`]      the CLI's side: where a command goes (daemon or store) and how answers print
//! * [`tools`]    `encode`, `decode`, `publish`, `buffer export`, progress bars (the benches: crates/bench)
//!
//! The binary (`src/main.rs`) only parses arguments (`cli::commands`) and calls into these.

/// A place where tests/failpoints.rs crashes the daemon: with the
/// `failpoints` feature and `FAILPOINTS=<name>=return` the process aborts
/// there (no destructor, no flush: as a SIGKILL would), with `=panic` the
/// thread panics. Compiled out without the feature.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| std::process::abort())
    };
}

pub mod backoff;
pub mod bus;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod frames;
pub mod series;
pub mod store;
pub mod tools;
pub mod vae;
pub mod versions;
