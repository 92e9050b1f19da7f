//! The `wmvae-bench` binary, which `wmvae bench ...` runs: the benches'
//! flags and dispatch; the work is in this crate's library. Its usage reads
//! `wmvae bench`, the command people type.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wmvae::cli::args::ConfigArgs;
use wmvae::cli::render;
use wmvae::vae::device::DeviceChoice;
use wmvae_bench::bench::{self, BenchOptions};
use wmvae_bench::nats_server::default_binary;
use wmvae_bench::{
    bench_chaos, bench_daemon, bench_encoders, bench_failover, bench_idle, bench_nemesis, bench_quality, bench_series,
};

/// Measure performance (figures for BENCHMARKS.md).
#[derive(Parser)]
#[command(name = "wmvae bench", bin_name = "wmvae bench", version)]
struct Cli {
    #[command(subcommand)]
    which: BenchCommand,
}

#[derive(clap::Args, Clone, Copy)]
struct BenchArgs {
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Timed steps after the warm-up.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// libtorch intra-op threads (0: libtorch's default).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training images/s of the full step: forward, loss, backward, Adam.
    Train {
        #[command(flatten)]
        args: BenchArgs,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// The step's arithmetic ([train] precision).
        #[arg(long, value_enum, default_value = "fp32")]
        precision: wmvae::vae::model::Precision,
    },
    /// Encoding and decoding images/s at batch 1 and batch 256.
    Encode {
        #[command(flatten)]
        args: BenchArgs,
    },
    /// `wmvae series` frames/s (offline, a store of synthetic episodes)
    /// beside encoding prepared batches of 256, round after round.
    Series {
        #[command(flatten)]
        args: BenchArgs,
        /// Frames in the store.
        #[arg(long, default_value_t = 20_480)]
        frames: u64,
        /// Frames per episode (CarRacing's rollouts run to ~1,000 steps).
        #[arg(long, default_value_t = 465)]
        episode_frames: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// How fast a fresh VAE learns with the config's [train] recipe: held-out
    /// reconstruction loss and KL every tenth of the run, with wall time.
    Quality {
        #[command(flatten)]
        config: ConfigArgs,
        /// Training frames: uint8 .npy (N, H, W, 3), 64x64 or 96x96 (preprocessed).
        #[arg(long)]
        frames: PathBuf,
        /// Held-out frames (other episodes), the same way.
        #[arg(long)]
        heldout: PathBuf,
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Report the first measured step whose held-out recon is at or under this.
        #[arg(long)]
        target_recon: Option<f64>,
        /// Print one JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Publish-to-latent latency through the whole daemon (in this process).
    Latency {
        /// Frames per second published.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Keep the trainer idle (min_frames never reached) to see ingest and encode alone.
        #[arg(long)]
        no_train: bool,
        /// Publish at the rate from the daemon's start and count every frame;
        /// by default frames go one at a time until the first latent (the
        /// daemon's start), and the percentiles count the frames after.
        #[arg(long)]
        include_warmup: bool,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Training images/s idle and while frames stream in (whole daemon, in this process).
    Pipeline {
        /// Frames per second streamed in during the second measurement.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Length of each measurement window.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Latents/s with 1, 2, ... encoder processes on one local nats-server.
    Encoders {
        /// Encoder process counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        replicas: Vec<usize>,
        /// Frames in the backlog each count encodes.
        #[arg(long, default_value_t = 3000)]
        frames: u64,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The resident memory of an idle `wmvae serve` (both roles) once v1 is
    /// written and has encoded a frame.
    Idle {
        /// How long it is left idle before its memory is read.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What a crash costs on a 3-node JetStream cluster on this host: the
    /// WM_FRAMES leader's server, then the leading trainer node SIGKILLed.
    Failover {
        /// Frames published per second, each awaited until stored.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// The trainer nodes' lease TTL (`[node] lease_ttl_secs`).
        #[arg(long, default_value_t = 10)]
        lease_ttl_secs: u64,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Faults while frames stream in (the daemon or the nats-server
    /// SIGKILLed every few seconds, malformed frames of every kind), then
    /// the books: acked frames lost or stored twice, kinds dead-lettered.
    Chaos {
        /// How long faults are injected.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Good frames published per second, each awaited until stored.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Faults drawn from a seed on a 3-node cluster (trainers and encoders
    /// SIGKILLed, servers SIGKILLed, the leader paused past its lease, a
    /// trainer with another lease TTL, a server partitioned from the
    /// others), then the checks that it never
    /// split: acked frames lost, latents and versions twice, epochs with two
    /// writers, convergence after the last heal. Exits non-zero on a
    /// violation, with the history on stderr.
    Nemesis {
        /// How long faults are injected.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Draws the faults, their targets and the gaps between them.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only these kinds, comma-separated (default: every kind this host
        /// can inject; `partition` needs network namespaces).
        #[arg(long, value_enum, value_delimiter = ',')]
        faults: Vec<bench_nemesis::Fault>,
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Frames/s made durable end to end (NATS -> sled flush -> ack) against a
    /// local nats-server, beside a bare consume+ack baseline.
    Ingest {
        #[arg(long, default_value_t = 20_000)]
        frames: u64,
        /// The nats-server binary (default: .venv/bin/nats-server, else PATH).
        #[arg(long)]
        nats_server: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

impl BenchArgs {
    fn options(&self) -> BenchOptions {
        BenchOptions {
            device: self.device,
            steps: self.steps,
            threads: self.threads,
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// The benches of one process's models, no NATS: train, encode, series, quality.
fn models(which: BenchCommand) -> Result<()> {
    match which {
        BenchCommand::Train { args, batch, precision } => {
            render::bench(bench::train(args.options(), batch, precision)?, args.json)
        }
        BenchCommand::Encode { args } => render::bench(bench::encode(args.options())?, args.json),
        BenchCommand::Series {
            args,
            frames,
            episode_frames,
            rounds,
        } => {
            let options = bench_series::SeriesOptions {
                frames,
                episode_frames,
                rounds,
                steps: args.steps,
                device: args.device,
                threads: args.threads,
            };
            let figures = tokio::runtime::Builder::new_current_thread()
                .build()?
                .block_on(bench_series::series(options))?;
            render::bench(figures, args.json)
        }
        BenchCommand::Quality {
            config,
            frames,
            heldout,
            steps,
            target_recon,
            json,
        } => {
            let options = bench_quality::QualityOptions {
                frames,
                heldout,
                steps,
                target_recon,
            };
            render::bench(bench_quality::quality(&config.load()?, &options)?, json);
        }
        _ => unreachable!("run() sends only these here"),
    }
    Ok(())
}

/// The nats-server binary given, or the default one.
fn server(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(default_binary)
}

/// The benches of the daemon in this process against a local nats-server:
/// latency, pipeline, ingest.
fn in_process(which: BenchCommand) -> Result<()> {
    let rt = runtime()?;
    let (figures, json) = match which {
        BenchCommand::Latency {
            rate,
            seconds,
            no_train,
            include_warmup,
            nats_server,
            json,
        } => (
            rt.block_on(bench_daemon::latency(
                rate,
                seconds,
                !no_train,
                include_warmup,
                &server(nats_server),
            ))?,
            json,
        ),
        BenchCommand::Pipeline {
            rate,
            seconds,
            device,
            nats_server,
            json,
        } => (
            rt.block_on(bench_daemon::pipeline(rate, seconds, device, &server(nats_server)))?,
            json,
        ),
        BenchCommand::Ingest {
            frames,
            nats_server,
            json,
        } => (rt.block_on(bench::ingest(frames, &server(nats_server)))?, json),
        _ => unreachable!("run() sends only these here"),
    };
    render::bench(figures, json);
    Ok(())
}

/// The benches of `wmvae serve` processes (the `wmvae` beside this binary)
/// against local nats-servers: encoders, idle, failover, chaos.
fn processes(which: BenchCommand) -> Result<()> {
    let rt = runtime()?;
    let (figures, json) = match which {
        BenchCommand::Encoders {
            replicas,
            frames,
            nats_server,
            json,
        } => (
            rt.block_on(bench_encoders::encoders(&replicas, frames, &server(nats_server)))?,
            json,
        ),
        BenchCommand::Idle {
            seconds,
            nats_server,
            json,
        } => (rt.block_on(bench_idle::idle(seconds, &server(nats_server)))?, json),
        BenchCommand::Failover {
            rate,
            lease_ttl_secs,
            nats_server,
            json,
        } => {
            let options = bench_failover::FailoverOptions {
                rate,
                lease_ttl_secs,
                nats_server: server(nats_server),
            };
            (rt.block_on(bench_failover::failover(&options))?, json)
        }
        BenchCommand::Chaos {
            seconds,
            rate,
            nats_server,
            json,
        } => {
            let options = bench_chaos::ChaosOptions {
                seconds,
                rate,
                nats_server: server(nats_server),
            };
            (rt.block_on(bench_chaos::chaos(&options))?, json)
        }
        _ => unreachable!("run() sends only these here"),
    };
    render::bench(figures, json);
    Ok(())
}

/// `wmvae bench nemesis`: its figures, then a failure when it found a violation.
fn nemesis(options: bench_nemesis::NemesisOptions, json: bool) -> Result<()> {
    let figures = runtime()?.block_on(bench_nemesis::nemesis(&options))?;
    let violations = figures["violations"].as_array().map_or(0, Vec::len);
    render::bench(figures, json);
    if violations > 0 {
        bail!("{violations} violations (the history is above)");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.which {
        which @ (BenchCommand::Train { .. }
        | BenchCommand::Encode { .. }
        | BenchCommand::Series { .. }
        | BenchCommand::Quality { .. }) => models(which),
        which @ (BenchCommand::Latency { .. } | BenchCommand::Pipeline { .. } | BenchCommand::Ingest { .. }) => {
            in_process(which)
        }
        BenchCommand::Nemesis {
            seconds,
            seed,
            faults,
            nats_server,
            json,
        } => {
            let options = bench_nemesis::NemesisOptions {
                seconds,
                seed,
                faults,
                nats_server: server(nats_server),
            };
            nemesis(options, json)
        }
        which => processes(which),
    }
}

fn main() -> ExitCode {
    wmvae::cli::main_of(|| run(Cli::parse()), |_| ExitCode::FAILURE)
}
