//! The CLI's side of talking to wmvae: [`backend`] decides where a command
//! goes (the running daemon over NATS, else the store) and gives the same
//! answers either way; [`render`] prints them as tables or `--json`.
//!
//! Argument parsing lives in `src/main.rs`; this folder never parses flags.

pub mod backend;
pub mod render;
