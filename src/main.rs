//! The `wmvae` binary: argument parsing and dispatch only; the work is in
//! the library (printing in `cli::render`, where commands go in
//! `cli::backend`). Over 400 lines because every command's flags and help
//! live here, in one place, as clap derives.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use wmvae::cli::{backend, render};
use wmvae::config::Config;
use wmvae::store::{Change, Provenance};
use wmvae::tools::bench::{self, BenchOptions};
use wmvae::vae::device::DeviceChoice;

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
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// NATS server URL (overrides nats.url).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// Store directory (overrides store.data_dir).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config> {
        self.load_with(|_| {})
    }

    /// The config with these flags and `more` applied, then checked again.
    fn load_with(&self, more: impl FnOnce(&mut Config)) -> Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(url) = &self.nats_url {
            config.nats.url = url.clone();
        }
        if let Some(dir) = &self.data_dir {
            config.store.data_dir = dir.clone();
        }
        more(&mut config);
        config.validate().context("after the command-line overrides")?;
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: ingest frames from NATS into the replay buffer.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// What this process does: trainer, encoder, or trainer,encoder (overrides serve.roles).
        #[arg(long)]
        role: Option<wmvae::config::Roles>,
        /// Validate the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Apply the streams, consumers and store schema of migrations/ (idempotent).
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Inspect the replay buffer (live or offline) or export it (opens the store: no daemon may hold it).
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
        #[arg(long, required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
        weights: Option<PathBuf>,
        /// A checkpoint version, from the running daemon or the store.
        #[arg(long)]
        checkpoint: Option<u64>,
        #[command(flatten)]
        place: PlaceArgs,
        /// uint8 frames, N x 64 x 64 x 3 or N x 96 x 96 x 3 (CarRacing, preprocessed).
        #[arg(long)]
        input: PathBuf,
        /// Output .npz with float32 arrays `mu` and `logvar` (N x z).
        #[arg(long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Decode latents (float32 N x z in an .npz) to uint8 frames (N, 64, 64, 3) in an .npy.
    Decode {
        /// A checkpoint version, from the running daemon or the store.
        #[arg(long)]
        checkpoint: u64,
        #[command(flatten)]
        place: PlaceArgs,
        /// The .npz holding the latents.
        #[arg(long)]
        input: PathBuf,
        /// Its array to decode (a series' `mu`, an encode's `mu`, ...).
        #[arg(long, default_value = "z")]
        key: String,
        /// Output .npy: uint8 (N, 64, 64, 3).
        #[arg(long)]
        output: PathBuf,
        /// Also a PNG grid of the frames.
        #[arg(long)]
        grid: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Encode every stored episode (or those named) with one version: one .npz per
    /// episode and index.json in --out (PROTOCOL.md, "Series"). Through the running
    /// daemon (its trainer encodes) or on the store; resumable: a rerun into the same
    /// --out skips the episodes its index.json lists.
    Series {
        /// A version number, or `active`.
        #[arg(long, value_parser = parse_version)]
        version: VersionArg,
        /// The series directory (created; refused if it holds another version's series).
        #[arg(long)]
        out: PathBuf,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Episodes whose name is in [FROM, UNTIL), by string order; either end may be
        /// left empty (`ep-10..`, `..ep-20`). The first `..` splits the two.
        #[arg(long, value_name = "FROM..UNTIL")]
        episodes: Option<String>,
        #[command(flatten)]
        place: PlaceArgs,
        /// Where an offline run encodes (a live one: on the daemon's [train] device).
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// List, inspect, export, import, pin and roll back checkpoints, live or offline.
    Checkpoint {
        #[command(flatten)]
        place: PlaceArgs,
        #[command(subcommand)]
        which: CheckpointCommand,
    },
    /// Measure performance (figures for BENCHMARKS.md).
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
}

/// `--version`: a number or the active one.
#[derive(Clone, Copy)]
enum VersionArg {
    Active,
    Number(u64),
}

fn parse_version(text: &str) -> Result<VersionArg, String> {
    match text {
        "active" => Ok(VersionArg::Active),
        _ => text
            .parse()
            .map(VersionArg::Number)
            .map_err(|_| format!("{text:?} is neither a version number nor `active`")),
    }
}

/// Where checkpoint and buffer-stats commands go: the running daemon (over
/// NATS) or the store.
#[derive(clap::Args, Clone)]
struct PlaceArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Only through a running daemon.
    #[arg(long, global = true, conflicts_with = "offline")]
    online: bool,
    /// Only on the store (no daemon may hold it).
    #[arg(long, global = true)]
    offline: bool,
}

impl PlaceArgs {
    fn mode(&self) -> backend::Mode {
        match (self.online, self.offline) {
            (true, _) => backend::Mode::Online,
            (_, true) => backend::Mode::Offline,
            _ => backend::Mode::Auto,
        }
    }
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Every version: parent, step, created, eval loss; active, pinned, best marked.
    List {
        #[arg(long)]
        json: bool,
    },
    /// All metadata of one version.
    Show {
        version: u64,
        /// Write a PNG of validation frames over their reconstructions by this version.
        #[arg(long)]
        recon: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Make VERSION active: training weights, Adam state and the latent encoder switch to it.
    Rollback {
        version: u64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Keep VERSION whatever retention says.
    Pin { version: u64 },
    /// Let retention delete VERSION again.
    Unpin { version: u64 },
    /// Delete VERSION (never the active one).
    Delete { version: u64 },
    /// Write VERSION's weights as PyTorch-loadable safetensors.
    Export {
        version: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// A new active version from weights trained elsewhere (fresh Adam state).
    Import {
        file: PathBuf,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Every change of the active version, oldest first.
    History {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Frames, capacity, episodes, sources, bytes on disk, rejected by reason
    /// (from the running daemon when one answers, else from the store).
    Stats {
        #[command(flatten)]
        place: PlaceArgs,
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
        /// The step's arithmetic ([train] precision).
        #[arg(long, value_enum, default_value = "fp32")]
        precision: wmvae::vae::model::Precision,
    },
    /// Encoding images/s at batch 1 and batch 256.
    Encode {
        #[command(flatten)]
        args: BenchArgs,
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

/// How long the exit waits for the runtime's blocking tasks after the
/// daemon stopped: they only finish what the daemon already gave up on.
const RUNTIME_EXIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn checkpoint_command(config: &Config, mode: backend::Mode, which: CheckpointCommand) -> Result<()> {
    let backend = backend::connect(config, mode).await?;
    let by = wmvae::versions::default_actor();
    match which {
        CheckpointCommand::List { json } => render::list(backend.list().await?, json)?,
        CheckpointCommand::Show { version, recon, json } => {
            render::shown(backend.show(version).await?, json)?;
            if let Some(path) = recon {
                std::fs::write(&path, backend.recon(version).await?)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!(
                    "wrote {} (top: validation frames, bottom: reconstructions by v{version})",
                    path.display()
                );
            }
        }
        CheckpointCommand::Rollback { version, reason } => {
            let from = backend
                .rollback(version, &Provenance::operator(Change::Rollback, by, reason))
                .await?;
            let when = if backend.is_live() {
                "now"
            } else {
                "when the daemon next starts"
            };
            println!(
                "active version: v{} -> v{version} (takes effect {when})",
                render::version_or_dash(from)
            );
        }
        CheckpointCommand::Pin { version } => {
            backend.set_pinned(version, true).await?;
            println!("v{version} pinned");
        }
        CheckpointCommand::Unpin { version } => {
            backend.set_pinned(version, false).await?;
            println!("v{version} unpinned");
        }
        CheckpointCommand::Delete { version } => {
            backend.delete(version).await?;
            println!("v{version} deleted");
        }
        CheckpointCommand::Export { version, out } => {
            std::fs::write(&out, backend.export(version).await?)
                .with_context(|| format!("writing {}", out.display()))?;
            println!("v{version} written to {}", out.display());
        }
        CheckpointCommand::Import { file, reason } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let metadata = backend
                .import(
                    &bytes,
                    &file.display().to_string(),
                    config,
                    &Provenance::operator(Change::Import, by, reason),
                )
                .await?;
            println!("imported {} as v{} (active)", file.display(), metadata.version);
        }
        CheckpointCommand::History { json } => render::history(backend.history().await?, json)?,
    }
    Ok(())
}

/// `wmvae series`: resolves the version, then writes the directory.
async fn series_command(
    config: &Config,
    mode: backend::Mode,
    version: VersionArg,
    scope: wmvae::store::Scope,
    out: &std::path::Path,
    device: DeviceChoice,
) -> Result<()> {
    let backend = backend::connect(config, mode).await?;
    let version = match version {
        VersionArg::Number(v) => v,
        VersionArg::Active => backend.active_version().await?,
    };
    let pages = backend.series(version, device, config).await?;
    let started = std::time::Instant::now();
    let report = wmvae::tools::series::write(&pages, &scope, out).await?;
    eprintln!(
        "series of v{version} in {}: {} episodes written ({} frames, {:.0} frames/s), {} already there",
        out.display(),
        report.written,
        report.frames,
        report.frames as f64 / started.elapsed().as_secs_f64(),
        report.skipped
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            config,
            role,
            check_config,
        } => {
            let config = config.load_with(|c| c.serve.roles = role.unwrap_or(c.serve.roles))?;
            if check_config {
                print!("{}", toml::to_string(&config)?);
                return Ok(());
            }
            let runtime = runtime()?;
            let served = runtime.block_on(async {
                let shutdown = wmvae::daemon::shutdown_on_signals()?;
                wmvae::daemon::run(config, shutdown).await
            });
            // The daemon said what it left; a blocking call still running
            // (a read from a server gone mid-request) must not hold the exit,
            // as dropping the runtime would.
            runtime.shutdown_timeout(RUNTIME_EXIT_PATIENCE);
            served?;
        }
        Command::Migrate { config } => {
            let config = config.load()?;
            let report =
                runtime()?.block_on(async { wmvae::bus::Bus::connect_once(&config).await?.migrate().await })?;
            println!(
                "NATS: migration {} applied (streams {:?}, consumers {:?})",
                report.version, report.streams, report.consumers
            );
            match wmvae::store::Store::open(&config.store.data_dir, config.buffer) {
                Ok(_) => println!(
                    "store {}: schema {}",
                    config.store.data_dir.display(),
                    wmvae::store::SCHEMA_VERSION
                ),
                Err(e) => println!("store {}: not migrated here: {e:#}", config.store.data_dir.display()),
            }
        }
        Command::Buffer {
            which: BufferCommand::Stats { place, json },
        } => {
            let config = place.config.load()?;
            let stats =
                runtime()?.block_on(async { backend::connect(&config, place.mode()).await?.buffer_stats().await })?;
            render::stats(&stats, json)?;
        }
        Command::Buffer {
            which: BufferCommand::Export { config, out, source },
        } => {
            let config = config.load()?;
            let store = wmvae::store::Store::open(&config.store.data_dir, config.buffer)?;
            let summary = wmvae::tools::export::export(&store, source.as_deref(), &out)?;
            eprintln!("exported {} frames to {}", summary.frames, out.display());
        }
        Command::Publish {
            config,
            source,
            npy,
            synthetic: _,
            rate,
            count,
        } => {
            let config = config.load()?;
            let input = match npy {
                Some(path) => wmvae::tools::publish::Input::Npy(path),
                None => wmvae::tools::publish::Input::Synthetic,
            };
            let options = wmvae::tools::publish::PublishOptions {
                source,
                input,
                rate,
                count,
            };
            let sent = runtime()?.block_on(async {
                let bus = wmvae::bus::Bus::connect(&config).await?;
                wmvae::tools::publish::run(&bus, &options).await
            })?;
            eprintln!("published {sent} frames");
        }
        Command::Encode {
            weights,
            checkpoint,
            place,
            input,
            output,
            device,
        } => {
            let config = place.config.load()?;
            let net = match (weights, checkpoint) {
                (Some(path), _) => wmvae::tools::encode::net_from_weights(&path, device, config.vae())?,
                (None, Some(version)) => runtime()?.block_on(async {
                    backend::connect(&config, place.mode())
                        .await?
                        .network(version, device, &config)
                        .await
                })?,
                (None, None) => unreachable!("clap requires --weights or --checkpoint"),
            };
            let report = wmvae::tools::encode::encode_file(&net, &input, &output)?;
            eprintln!(
                "encoded {} frames of {}x{} to {}",
                report.frames,
                report.input_height,
                report.input_width,
                output.display()
            );
        }
        Command::Decode {
            checkpoint,
            place,
            input,
            key,
            output,
            grid,
            device,
        } => {
            let config = place.config.load()?;
            let net = runtime()?.block_on(async {
                backend::connect(&config, place.mode())
                    .await?
                    .network(checkpoint, device, &config)
                    .await
            })?;
            let n = wmvae::tools::decode::decode_file(&net, &input, &key, &output, grid.as_deref())?;
            eprintln!("decoded {n} latents with v{checkpoint} to {}", output.display());
        }
        Command::Series {
            version,
            out,
            source,
            episodes,
            place,
            device,
        } => {
            let config = place.config.load()?;
            let (episodes_from, episodes_until) = match episodes {
                Some(range) => wmvae::tools::series::parse_episode_range(&range)?,
                None => (None, None),
            };
            let scope = wmvae::store::Scope {
                source,
                episodes_from,
                episodes_until,
                after: None,
            };
            runtime()?.block_on(series_command(&config, place.mode(), version, scope, &out, device))?;
        }
        Command::Checkpoint { place, which } => {
            let config = place.config.load()?;
            runtime()?.block_on(checkpoint_command(&config, place.mode(), which))?;
        }
        Command::Bench {
            which: BenchCommand::Train { args, batch, precision },
        } => {
            render::bench(bench::train(args.options(), batch, precision)?, args.json);
        }
        Command::Bench {
            which: BenchCommand::Encode { args },
        } => {
            render::bench(bench::encode(args.options())?, args.json);
        }
        Command::Bench {
            which:
                BenchCommand::Quality {
                    config,
                    frames,
                    heldout,
                    steps,
                    target_recon,
                    json,
                },
        } => {
            let options = wmvae::tools::bench_quality::QualityOptions {
                frames,
                heldout,
                steps,
                target_recon,
            };
            render::bench(wmvae::tools::bench_quality::quality(&config.load()?, &options)?, json);
        }
        Command::Bench {
            which:
                BenchCommand::Latency {
                    rate,
                    seconds,
                    no_train,
                    nats_server,
                    json,
                },
        } => {
            let binary = nats_server.unwrap_or_else(wmvae::tools::nats_server::default_binary);
            render::bench(
                runtime()?.block_on(wmvae::tools::bench_daemon::latency(rate, seconds, !no_train, &binary))?,
                json,
            );
        }
        Command::Bench {
            which:
                BenchCommand::Pipeline {
                    rate,
                    seconds,
                    device,
                    nats_server,
                    json,
                },
        } => {
            let binary = nats_server.unwrap_or_else(wmvae::tools::nats_server::default_binary);
            render::bench(
                runtime()?.block_on(wmvae::tools::bench_daemon::pipeline(rate, seconds, device, &binary))?,
                json,
            );
        }
        Command::Bench {
            which:
                BenchCommand::Encoders {
                    replicas,
                    frames,
                    nats_server,
                    json,
                },
        } => {
            let binary = nats_server.unwrap_or_else(wmvae::tools::nats_server::default_binary);
            render::bench(
                runtime()?.block_on(wmvae::tools::bench_encoders::encoders(&replicas, frames, &binary))?,
                json,
            );
        }
        Command::Bench {
            which:
                BenchCommand::Failover {
                    rate,
                    lease_ttl_secs,
                    nats_server,
                    json,
                },
        } => {
            let nats_server = nats_server.unwrap_or_else(wmvae::tools::nats_server::default_binary);
            let options = wmvae::tools::bench_failover::FailoverOptions {
                rate,
                lease_ttl_secs,
                nats_server,
            };
            render::bench(
                runtime()?.block_on(wmvae::tools::bench_failover::failover(&options))?,
                json,
            );
        }
        Command::Bench {
            which:
                BenchCommand::Chaos {
                    seconds,
                    rate,
                    nats_server,
                    json,
                },
        } => {
            let nats_server = nats_server.unwrap_or_else(wmvae::tools::nats_server::default_binary);
            let options = wmvae::tools::bench_chaos::ChaosOptions {
                seconds,
                rate,
                nats_server,
            };
            render::bench(runtime()?.block_on(wmvae::tools::bench_chaos::chaos(&options))?, json);
        }
        Command::Bench {
            which:
                BenchCommand::Ingest {
                    frames,
                    nats_server,
                    json,
                },
        } => {
            let binary = nats_server.unwrap_or_else(wmvae::tools::nats_server::default_binary);
            render::bench(runtime()?.block_on(bench::ingest(frames, &binary))?, json);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // FAILPOINTS (tests/failpoints.rs) is read only by a build for those tests.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // Unknown versions are usage errors, like clap's: exit 2.
            if err
                .chain()
                .any(|e| e.downcast_ref::<wmvae::store::UnknownVersion>().is_some())
            {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
