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

#[derive(Subcommand)]
enum Command {
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

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Encode { weights, input, output, device, config } => {
            let config = Config::load(config.as_deref())?;
            let learner = wmvae::encode::learner_from_weights(&weights, device, config.vae())?;
            let report = wmvae::encode::encode_file(&learner, &input, &output)?;
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
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
