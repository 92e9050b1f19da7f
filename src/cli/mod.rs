//! The CLI's side of talking to wmvae: [`backend`] decides where a command
//! goes (the running daemon over NATS, else the store) and gives the same
//! answers either way; [`render`] prints them as tables or `--json`;
//! [`args`] holds the config flags both binaries (`wmvae`, `wmvae-bench`)
//! take.
//!
//! Every other flag is parsed in the binaries (`src/main.rs`,
//! `crates/bench/src/main.rs`).

pub mod args;
pub mod backend;
pub mod render;
