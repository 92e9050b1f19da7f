//! The CLI's side of talking to wmvae: [`backend`] decides where a command
//! goes (the running daemon over NATS, else the store) and gives the same
//! answers either way; [`render`] prints them as tables or `--json`;
//! [`args`] holds the config flags both binaries (`wmvae`, `wmvae-bench`)
//! take; [`commands`] is `wmvae`'s command line (clap derives), which its
//! binary (`src/main.rs`) dispatches.
//!
//! `wmvae bench`'s flags are parsed in the bench crate
//! (`crates/bench/src/main.rs`).

pub mod args;
pub mod backend;
pub mod commands;
mod error;
pub mod render;

pub use error::Error;

/// Logs to stderr for both binaries: `RUST_LOG` if set, else info (and
/// async-nats's warnings only); colour only on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Both binaries' `main`: logging, the crash points of a build with the
/// `failpoints` feature (`FAILPOINTS`, read only there: tests/failpoints.rs
/// and the in-process daemons of `bench latency` and `bench pipeline`),
/// then `run`; an error is printed and exits with the code `code` gives it.
pub fn main_of<E: std::fmt::Display>(
    run: impl FnOnce() -> Result<(), E>,
    code: impl FnOnce(&E) -> std::process::ExitCode,
) -> std::process::ExitCode {
    init_logging();
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            code(&err)
        }
    }
}
