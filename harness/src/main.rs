//! `stowage`: the command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use stowage_harness::info;
use stowage_memory::EngineKind;

#[derive(Parser)]
#[command(name = "stowage", version, about = "Train models larger than GPU memory on one card")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect the memory tiers: GPU (or simulated device), pinned host memory, NVMe.
    Info {
        /// Directory for NVMe swap files; probed for O_DIRECT and io_uring when given.
        #[arg(long)]
        nvme_dir: Option<PathBuf>,
        /// NVMe I/O engine to try.
        #[arg(long, value_enum, default_value_t = Engine::Uring)]
        engine: Engine,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Engine {
    Uring,
    Psync,
    Mmap,
}

impl From<Engine> for EngineKind {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Uring => EngineKind::Uring,
            Engine::Psync => EngineKind::Psync,
            Engine::Mmap => EngineKind::Mmap,
        }
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Info { nvme_dir, engine, json } => match info::run(nvme_dir.as_deref(), engine.into(), json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

