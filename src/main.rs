//! The `wmvae` binary: dispatch only; the work is in the library (the
//! command line in `cli::commands`, printing in `cli::render`, where
//! commands go in `cli::backend`). `wmvae bench ...` runs `wmvae-bench`
//! (the benches' crate, crates/bench) from beside this binary.

use anyhow::{Context, Result};
use clap::Parser;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use wmvae::cli::args::ConfigArgs;
use wmvae::cli::commands::{
    BufferCommand, CheckpointCommand, Cli, ClusterCommand, ClusterSetting, Command, PlaceArgs, VersionArg,
};
use wmvae::cli::{backend, render};
use wmvae::config::Config;
use wmvae::store::{Change, Provenance};
use wmvae::tools::publish::{Input, PublishOptions};
use wmvae::vae::device::DeviceChoice;

/// A CLI command's error: the store's kept typed (an unknown version is exit code 2).
type CliResult<T> = std::result::Result<T, wmvae::cli::Error>;

/// How long the exit waits for the runtime's blocking tasks after the
/// daemon stopped: they only finish what the daemon already gave up on.
const RUNTIME_EXIT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// `wmvae checkpoint show`: the version's metadata, and a PNG of its
/// reconstructions when asked.
async fn show(backend: &backend::Backend, version: u64, recon: Option<PathBuf>, json: bool) -> CliResult<()> {
    render::shown(backend.show(version).await?, json)?;
    if let Some(path) = recon {
        std::fs::write(&path, backend.recon(version).await?).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "wrote {} (top: validation frames, bottom: reconstructions by v{version})",
            path.display()
        );
    }
    Ok(())
}

async fn checkpoint_command(config: &Config, mode: backend::Mode, which: CheckpointCommand) -> CliResult<()> {
    let backend = backend::connect(config, mode).await?;
    let by = wmvae::versions::default_actor();
    match which {
        CheckpointCommand::List { json } => render::list(backend.list().await?, json)?,
        CheckpointCommand::Show { version, recon, json } => show(&backend, version, recon, json).await?,
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

/// `wmvae serve`: the daemon until a signal or a failure.
fn serve(config: ConfigArgs, role: Option<wmvae::config::Roles>, check_config: bool) -> Result<()> {
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
    served
}

/// `wmvae migrate`: NATS's streams and consumers, then the store's schema.
fn migrate(config: ConfigArgs) -> Result<()> {
    let config = config.load()?;
    let report = runtime()?.block_on(async { wmvae::bus::Bus::connect_once(&config).await?.migrate().await })?;
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
    Ok(())
}

/// `wmvae cluster set ...`.
fn cluster(which: ClusterCommand) -> Result<()> {
    let ClusterCommand::Set {
        setting: ClusterSetting::LeaseTtl { seconds, config },
    } = which;
    let config = config.load()?;
    let ttl = std::time::Duration::from_secs(seconds);
    wmvae::config::check_lease_ttl(seconds)?;
    let before =
        runtime()?.block_on(async { wmvae::bus::Bus::connect_once(&config).await?.set_lease_ttl(ttl).await })?;
    println!("lease TTL: {ttl:?} (was {before:?}); every trainer node follows it within a second");
    Ok(())
}

/// `wmvae buffer stats|export`.
fn buffer(which: BufferCommand) -> Result<()> {
    match which {
        BufferCommand::Stats { place, json } => {
            let config = place.config.load()?;
            let stats =
                runtime()?.block_on(async { backend::connect(&config, place.mode()).await?.buffer_stats().await })?;
            render::stats(&stats, json)?;
        }
        BufferCommand::Export { config, out, source } => {
            let config = config.load()?;
            let store = wmvae::store::Store::open(&config.store.data_dir, config.buffer)?;
            let summary = wmvae::tools::export::export(&store, source.as_deref(), &out)?;
            eprintln!("exported {} frames to {}", summary.frames, out.display());
        }
    }
    Ok(())
}

/// `wmvae publish`: frames from a file or rendered here, by the wire contract.
fn publish(config: ConfigArgs, options: PublishOptions) -> Result<()> {
    let config = config.load()?;
    let sent = runtime()?.block_on(async {
        let bus = wmvae::bus::Bus::connect(&config).await?;
        wmvae::tools::publish::run(&bus, &options).await
    })?;
    eprintln!("published {sent} frames");
    Ok(())
}

/// The network of checkpoint `version`, from the running daemon or the store.
fn network(
    place: &PlaceArgs,
    config: &Config,
    version: u64,
    device: DeviceChoice,
) -> CliResult<wmvae::vae::learner::Network> {
    runtime()?.block_on(async {
        backend::connect(config, place.mode())
            .await?
            .network(version, device, config)
            .await
    })
}

/// `wmvae encode`: the weights from a file or a checkpoint, then frames to latents.
fn encode(
    weights: Option<PathBuf>,
    checkpoint: Option<u64>,
    place: &PlaceArgs,
    device: DeviceChoice,
    input: &std::path::Path,
    output: &std::path::Path,
) -> CliResult<()> {
    let config = place.config.load()?;
    let net = match (weights, checkpoint) {
        (Some(path), _) => wmvae::tools::encode::net_from_weights(&path, device, config.vae())?,
        (None, Some(version)) => network(place, &config, version, device)?,
        (None, None) => unreachable!("clap requires --weights or --checkpoint"),
    };
    let report = wmvae::tools::encode::encode_file(&net, input, output)?;
    eprintln!(
        "encoded {} frames of {}x{} to {}",
        report.frames,
        report.input_height,
        report.input_width,
        output.display()
    );
    Ok(())
}

/// `wmvae series`: the scope from the flags, the version resolved, then the directory written.
fn series(
    place: &PlaceArgs,
    version: VersionArg,
    (source, episodes): (Option<String>, Option<String>),
    out: &std::path::Path,
    device: DeviceChoice,
) -> CliResult<()> {
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
    runtime()?.block_on(async {
        let backend = backend::connect(&config, place.mode()).await?;
        let version = match version {
            VersionArg::Number(v) => v,
            VersionArg::Active => backend.active_version().await?,
        };
        let pages = backend.series(version, device, &config).await?;
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
        CliResult::Ok(())
    })
}

/// `wmvae decode`: the latents under `key` in `input` decoded by `checkpoint`.
fn decode(
    place: &PlaceArgs,
    checkpoint: u64,
    device: DeviceChoice,
    (input, key): (&std::path::Path, &str),
    output: &std::path::Path,
    grid: Option<&std::path::Path>,
) -> Result<()> {
    let net = network(place, &place.config.load()?, checkpoint, device)?;
    let n = wmvae::tools::decode::decode_file(&net, input, key, output, grid)?;
    eprintln!("decoded {n} latents with v{checkpoint} to {}", output.display());
    Ok(())
}

fn run(cli: Cli) -> CliResult<()> {
    match cli.command {
        Command::Serve {
            config,
            role,
            check_config,
        } => serve(config, role, check_config)?,
        Command::Migrate { config } => migrate(config)?,
        Command::Cluster { which } => cluster(which)?,
        Command::Buffer { which } => buffer(which)?,
        Command::Publish {
            config,
            source,
            npy,
            synthetic: _,
            rate,
            count,
        } => {
            let input = npy.map_or(Input::Synthetic, Input::Npy);
            let options = PublishOptions {
                source,
                input,
                rate,
                count,
            };
            publish(config, options)?;
        }
        Command::Encode {
            weights,
            checkpoint,
            place,
            input,
            output,
            device,
        } => encode(weights, checkpoint, &place, device, &input, &output)?,
        Command::Decode {
            checkpoint,
            place,
            input,
            key,
            output,
            grid,
            device,
        } => decode(&place, checkpoint, device, (&input, &key), &output, grid.as_deref())?,
        Command::Series {
            version,
            out,
            source,
            episodes,
            place,
            device,
        } => series(&place, version, (source, episodes), &out, device)?,
        Command::Checkpoint { place, which } => {
            runtime()?.block_on(checkpoint_command(&place.config.load()?, place.mode(), which))?
        }
        Command::Bench { args } => return Err(bench(args).into()),
    }
    Ok(())
}

/// Runs `wmvae-bench` from beside this binary in this process's place
/// (same arguments after `bench`, stdio, exit status and signals); returns
/// only when it could not.
fn bench(args: Vec<OsString>) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let bench = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name("wmvae-bench"),
        Err(e) => return anyhow::Error::new(e).context("locating this binary"),
    };
    if !bench.is_file() {
        return anyhow::anyhow!(
            "`wmvae bench` runs {}, which is not there: build it (cargo build --release --workspace)",
            bench.display()
        );
    }
    let err = std::process::Command::new(&bench).args(args).exec();
    anyhow::Error::new(err).context(format!("running {}", bench.display()))
}

fn main() -> ExitCode {
    wmvae::cli::main_of(
        || run(Cli::parse()),
        // Unknown versions are usage errors, like clap's: exit 2.
        |err| match err {
            wmvae::cli::Error::Store(wmvae::store::Error::UnknownVersion(_)) => ExitCode::from(2),
            _ => ExitCode::FAILURE,
        },
    )
}
