//! The CLI's tools that are not the daemon: `wmvae encode` ([`encode`]),
//! `wmvae decode` ([`decode`]),
//! `wmvae publish` ([`publish`]), `wmvae buffer export` ([`export`]),
//! `wmvae series` ([`series`]: the files; the pages are `crate::series`') and
//! progress bars ([`progress`]). The benches and the local nats-server
//! launcher are a crate of their own (crates/bench, `wmvae bench ...`).
//!
//! Each is a thin driver over the library's rooms; none holds logic the
//! daemon needs.

pub mod decode;
pub mod encode;
pub mod export;
pub mod progress;
pub mod publish;
pub mod series;
