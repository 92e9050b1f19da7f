//! The `wmvae` binary: argument parsing and dispatch only; the work is in
//! the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wmvae::bench::{self, BenchOptions};
use wmvae::config::Config;
use wmvae::device::DeviceChoice;

#[derive(Parser)]
#[command(name = "wmvae", version, about = "Streaming trainer for the World Models VAE")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the config comes from, and the overrides every daemon-facing command takes.
#[derive(clap::Args, Clone)]
struct ConfigArgs {
    /// Config file overlaid on config/default.toml.
    #[arg(long)]
    config: Option<PathBuf>,
    /// NATS server URL (overrides nats.url).
    #[arg(long)]
    nats_url: Option<String>,
    /// Store directory (overrides store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(url) = &self.nats_url {
            config.nats.url = url.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.store.data_dir = dir.clone();
        }
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: ingest frames from NATS into the replay buffer.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// Validate the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Apply the streams, consumers and store schema of migrations/ (idempotent).
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Inspect or export the replay buffer (opens the store: no daemon may hold it).
    Buffer {
        #[command(subcommand)]
        which: BufferCommand,
    },
    /// Publish frames by the wire contract (PROTOCOL.md).
    Publish {
        #[command(flatten)]
        config: ConfigArgs,
        /// The frames' source: they go to <prefix>.frames.<source>.
        #[arg(long)]
        source: String,
        /// uint8 frames (N, H, W, 3).
        #[arg(long, conflicts_with = "synthetic", required_unless_present = "synthetic")]
        npy: Option<PathBuf>,
        /// CarRacing-like 96x96 scenes rendered here.
        #[arg(long)]
        synthetic: bool,
        /// Frames per second (default: as fast as JetStream acks).
        #[arg(long)]
        rate: Option<f64>,
        /// Stop after N frames (default: the whole file; forever for --synthetic).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Encode frames (uint8 .npy, N x H x W x 3) to latents (mu, logvar) in an .npz.
    Encode {
        /// PyTorch-layout weights (.safetensors).
        #[arg(long)]
        weights: PathBuf,
        /// uint8 frames, N x 64 x 64 x 3 or N x 96 x 96 x 3 (CarRacing, preprocessed).
        #[arg(long)]
        input: PathBuf,
        /// Output .npz with float32 arrays `mu` and `logvar` (N x z).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Config file (for the model's z_size).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Measure performance (figures for BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Frames, capacity, episodes, sources, bytes on disk, rejected by reason.
    Stats {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        json: bool,
    },
    /// The stored frames in (source, episode, step) order as an .npz.
    Export {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long)]
        out: PathBuf,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
    },
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
    },
    /// Encoding images/s at batch 1 and batch 256.
    Encode {
        #[command(flatten)]
        args: BenchArgs,
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
        BenchOptions { device: self.device, steps: self.steps, threads: self.threads }
    }
}

fn print_bench(result: serde_json::Value, json: bool) {
    if json {
        println!("{result}");
    } else {
        let fields: Vec<String> = result.as_object().into_iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
        println!("{}", fields.join(" "));
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn print_stats(stats: &wmvae::store::Stats, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(stats)?);
    } else {
        println!("frames      {} of {} ({} train, {} validation)", stats.frames, stats.capacity, stats.train_frames, stats.validation_frames);
        println!("episodes    {}", stats.episodes);
        println!("sources     {}", stats.sources);
        println!("ingested    {} (duplicates {}, evicted {})", stats.frames_ingested, stats.duplicates, stats.evicted);
        println!("disk bytes  {}", stats.bytes_on_disk);
        for (reason, n) in &stats.rejected {
            println!("rejected    {reason}: {n}");
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config, check_config } => {
            let config = config.load()?;
            if check_config {
                print!("{}", toml::to_string(&config)?);
                return Ok(());
            }
            runtime()?.block_on(async {
                let shutdown = wmvae::serve::shutdown_on_signals()?;
                wmvae::serve::run(config, shutdown).await
            })?;
        }
        Command::Migrate { config } => {
            let config = config.load()?;
            let report = runtime()?.block_on(async { wmvae::bus::Bus::connect(&config.nats, config.bus_limits()).await?.migrate().await })?;
            println!("NATS: migration {} applied (streams {:?}, consumers {:?})", report.version, report.streams, report.consumers);
            match wmvae::store::Store::open(&config.store.data_dir, config.buffer) {
                Ok(_) => println!("store {}: schema {}", config.store.data_dir.display(), wmvae::store::SCHEMA_VERSION),
                Err(e) => println!("store {}: not migrated here: {e:#}", config.store.data_dir.display()),
            }
        }
        Command::Buffer { which: BufferCommand::Stats { config, json } } => {
            let config = config.load()?;
            let store = wmvae::store::Store::open(&config.store.data_dir, config.buffer)?;
            print_stats(&store.stats()?, json)?;
        }
        Command::Buffer { which: BufferCommand::Export { config, out, source } } => {
            let config = config.load()?;
            let store = wmvae::store::Store::open(&config.store.data_dir, config.buffer)?;
            let summary = wmvae::export::export(&store, source.as_deref(), &out)?;
            eprintln!("exported {} frames to {}", summary.frames, out.display());
        }
        Command::Publish { config, source, npy, synthetic: _, rate, count } => {
            let config = config.load()?;
            let input = match npy {
                Some(path) => wmvae::publish::Input::Npy(path),
                None => wmvae::publish::Input::Synthetic,
            };
            let options = wmvae::publish::PublishOptions { source, input, rate, count };
            let sent = runtime()?.block_on(async {
                let bus = wmvae::bus::Bus::connect(&config.nats, config.bus_limits()).await?;
                wmvae::publish::run(&bus, &options).await
            })?;
            eprintln!("published {sent} frames");
        }
        Command::Encode { weights, input, output, device, config } => {
            let config = Config::load(config.as_deref())?;
            let net = wmvae::encode::net_from_weights(&weights, device, config.vae())?;
            let report = wmvae::encode::encode_file(&net, &input, &output)?;
            eprintln!(
                "encoded {} frames of {}x{} to {}",
                report.frames,
                report.input_height,
                report.input_width,
                output.display()
            );
        }
        Command::Bench { which: BenchCommand::Train { args, batch } } => {
            print_bench(bench::train(args.options(), batch)?, args.json);
        }
        Command::Bench { which: BenchCommand::Encode { args } } => {
            print_bench(bench::encode(args.options())?, args.json);
        }
        Command::Bench { which: BenchCommand::Latency { rate, seconds, no_train, nats_server, json } } => {
            let binary = nats_server.unwrap_or_else(wmvae::nats_server::default_binary);
            print_bench(runtime()?.block_on(wmvae::bench_daemon::latency(rate, seconds, !no_train, &binary))?, json);
        }
        Command::Bench { which: BenchCommand::Pipeline { rate, seconds, device, nats_server, json } } => {
            let binary = nats_server.unwrap_or_else(wmvae::nats_server::default_binary);
            print_bench(runtime()?.block_on(wmvae::bench_daemon::pipeline(rate, seconds, device, &binary))?, json);
        }
        Command::Bench { which: BenchCommand::Ingest { frames, nats_server, json } } => {
            let binary = nats_server.unwrap_or_else(wmvae::nats_server::default_binary);
            print_bench(runtime()?.block_on(bench::ingest(frames, &binary))?, json);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
