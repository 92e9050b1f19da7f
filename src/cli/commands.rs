//! The `wmvae` command line as clap derives: every command, its flags and
//! their help (the binary, `src/main.rs`, dispatches them; `wmvae bench`'s
//! flags are the bench crate's). Parsing only: no command runs here.

use super::args::ConfigArgs;
use super::backend;
use crate::config::Roles;
use crate::vae::device::DeviceChoice;
use clap::{Parser, Subcommand};
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "wmvae", version, about = "Streaming trainer for the World Models VAE")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon: ingest frames from NATS into the replay buffer.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// What this process does: trainer, encoder, or trainer,encoder (overrides serve.roles).
        #[arg(long)]
        role: Option<Roles>,
        /// Validate the configuration, print it, and exit.
        #[arg(long)]
        check_config: bool,
    },
    /// Apply the streams, consumers and store schema of migrations/ (idempotent).
    Migrate {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// The cluster's own settings, kept in NATS for every node.
    Cluster {
        #[command(subcommand)]
        which: ClusterCommand,
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
    ///
    /// Runs wmvae-bench, beside this binary, with the rest of the line
    /// (`wmvae bench --help` lists the benches).
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

/// `--version`: a number or the active one.
#[derive(Clone, Copy)]
pub enum VersionArg {
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
pub struct PlaceArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Only through a running daemon.
    #[arg(long, global = true, conflicts_with = "offline")]
    pub online: bool,
    /// Only on the store (no daemon may hold it).
    #[arg(long, global = true)]
    pub offline: bool,
}

impl PlaceArgs {
    pub fn mode(&self) -> backend::Mode {
        match (self.online, self.offline) {
            (true, _) => backend::Mode::Online,
            (_, true) => backend::Mode::Offline,
            _ => backend::Mode::Auto,
        }
    }
}

#[derive(Subcommand)]
pub enum CheckpointCommand {
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
pub enum ClusterCommand {
    /// Change a cluster setting.
    Set {
        #[command(subcommand)]
        setting: ClusterSetting,
    },
}

#[derive(Subcommand)]
pub enum ClusterSetting {
    /// The training lease's TTL, in seconds (at least 3): the lease bucket's max age, which
    /// every trainer node follows within a second (a node's own `[node] lease_ttl_secs`
    /// only sets it when the bucket is made).
    LeaseTtl {
        seconds: u64,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand)]
pub enum BufferCommand {
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
