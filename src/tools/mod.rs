//! The CLI's tools that are not the daemon: `wmvae encode` ([`encode`]),
//! `wmvae decode` ([`decode`]),
//! `wmvae publish` ([`publish`]), `wmvae buffer export` ([`export`]),
//! `wmvae series` ([`series`]: the files; the pages are `crate::series`'), the
//! benches ([`bench`], [`bench_daemon`], [`bench_encoders`],
//! [`bench_failover`]), a local nats-server child for
//! benches and tests ([`nats_server`]) and progress bars ([`progress`]).
//!
//! Each is a thin driver over the library's rooms; none holds logic the
//! daemon needs.

pub mod bench;
pub mod bench_chaos;
pub mod bench_daemon;
pub mod bench_encoders;
pub mod bench_failover;
pub mod bench_quality;
pub mod decode;
pub mod encode;
pub mod export;
pub mod nats_server;
pub mod progress;
pub mod publish;
pub mod series;
