//! `stowage`: the command-line entry point.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use stowage_harness::ckpt::CkptPaths;
use stowage_harness::data::{save_jsonl, PromptExample};
use stowage_harness::engine::{torch_device, Engine, ModelSpec, Naive, TrainOpts};
use stowage_harness::generate::{generate, Sampler};
use stowage_harness::ppo::{run_pipeline, run_ppo, PipelineArgs, PpoArgs};
use stowage_harness::tokenizer::Tokenizer;
use stowage_harness::train::{run_rm, run_sft, PairArgs, RmLoss, TrainArgs};
use stowage_harness::{info, HarnessError};
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
        #[arg(long, value_enum, default_value_t = Engine_::Uring)]
        engine: Engine_,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Supervised fine-tuning: loss on completion tokens, held-out exact match.
    Sft {
        #[command(flatten)]
        args: TrainArgs,
    },
    /// Reward model on preference pairs: pairwise loss, held-out accuracy.
    Rm {
        #[command(flatten)]
        args: TrainArgs,
        #[arg(long, value_enum, default_value_t = RmLoss::LogSig)]
        loss: RmLoss,
        #[command(flatten)]
        pairs: PairArgs,
    },
    /// PPO from an SFT checkpoint (actor, reference) and a reward-model checkpoint (reward,
    /// critic); `--steps` counts PPO iterations of `--batch-size` prompts.
    // The actor's learning rate: SFT's 1e-3 takes a tuned policy apart in a few iterations;
    // 1e-4 is the pipeline's PPO default too.
    #[command(mut_arg("lr", |a| a.default_value("0.0001")))]
    Ppo {
        #[command(flatten)]
        args: TrainArgs,
        #[command(flatten)]
        ppo: PpoArgs,
    },
    /// SFT -> reward model -> PPO on a built-in task (or user JSONL per stage).
    Pipeline {
        #[command(flatten)]
        args: TrainArgs,
        #[command(flatten)]
        stages: PipelineArgs,
        #[command(flatten)]
        ppo: PpoArgs,
    },
    /// Write a built-in task's data as JSON Lines (the formats --data reads).
    Data {
        #[arg(long, value_enum)]
        task: stowage_harness::tasks::Task,
        #[arg(long, value_enum, default_value_t = DataKind::Sft)]
        kind: DataKind,
        #[arg(long, default_value_t = 1000)]
        size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The held-out side of the split instead of the training side.
        #[arg(long)]
        heldout: bool,
        /// Fraction of corrupted demonstrations (sft) or swapped labels (prefs).
        #[arg(long, default_value_t = 0.0)]
        noise: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: BenchCommand,
    },
    /// One run of `stowage bench capacity`, in its child process.
    #[command(hide = true)]
    BenchRun {
        #[command(flatten)]
        args: stowage_harness::bench::RunArgs,
    },
    /// Continue prompts with a trained checkpoint.
    Generate {
        /// A checkpoint directory (e.g. OUT/checkpoint of `stowage sft`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Prompts (one or more).
        #[arg(long, required = true)]
        prompt: Vec<String>,
        #[arg(long, default_value_t = 32)]
        max_new: usize,
        /// 0: greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        #[arg(long, default_value_t = 0)]
        top_k: i64,
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The largest model each strategy trains under a memory budget (each run in a child
    /// process; resident memory on a CPU-only machine, GPU memory held down by a ballast on a
    /// GPU), with step time, tokens/s, FLOP/s and bytes moved per link.
    Capacity {
        #[command(flatten)]
        args: stowage_harness::bench::CapacityArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DataKind {
    Sft,
    Prefs,
    Prompts,
}

#[derive(Clone, Copy, ValueEnum)]
enum Engine_ {
    Uring,
    Psync,
    Mmap,
}

impl From<Engine_> for EngineKind {
    fn from(e: Engine_) -> Self {
        match e {
            Engine_::Uring => EngineKind::Uring,
            Engine_::Psync => EngineKind::Psync,
            Engine_::Mmap => EngineKind::Mmap,
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_generate(checkpoint: PathBuf, prompts: Vec<String>, max_new: usize, temperature: f64, top_k: i64, top_p: f64, seed: u64) -> Result<(), HarnessError> {
    let p = CkptPaths::new(&checkpoint);
    let (c, w) = p.read_merged()?;
    let tok = Tokenizer::new(c.tokenizer)?;
    let (device, note) = torch_device();
    if let Some(n) = note {
        eprintln!("note: {n}");
    }
    let mut e = Naive::new(ModelSpec::new(c.model, c.head), device, TrainOpts::default(), 0)?;
    e.import(&w)?;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    let ids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|x| {
            let mut v = vec![tok.bos()];
            v.extend(tok.encode(x));
            v
        })
        .collect();
    let s = if temperature > 0.0 { Sampler::Sample { temperature, top_k, top_p } } else { Sampler::Greedy };
    for (prompt, g) in prompts.iter().zip(generate(&mut e, &ids, max_new, tok.eos(), tok.pad(), s, &mut rng)?) {
        println!("{}", serde_json::json!({"prompt": prompt, "response": tok.decode(&g.tokens), "ended_with_eos": g.ended}));
    }
    Ok(())
}

/// Fixes glibc's mmap threshold at 4 MiB unless the environment sets it.
///
/// glibc raises the threshold (up to 32 MiB) each time a mapped block is freed, after which
/// tensors of a few MiB come from the heap, which fragments and is rarely given back: in a PPO
/// run under a 4 GiB budget resident memory crept from 3.70 to 4.21 GiB over five steps of the
/// same work, against 3.42 GiB in every step with the threshold fixed (docs/capacity-cpu.md).
/// Applies to every strategy alike; `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES` override it.
fn fix_mmap_threshold() {
    let set_by_env = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some_and(|v| v.to_string_lossy().contains("mmap_threshold"));
    if set_by_env {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning parameters, and it runs first thing
    // in main, before this program or libtorch starts any thread.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) } != 1 {
        log::warn!("glibc refused an mmap threshold of 4 MiB; resident memory may creep up over long runs");
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    fix_mmap_threshold();
    let cli = Cli::parse();
    let r: Result<(), HarnessError> = match cli.command {
        Command::Info { nvme_dir, engine, json } => info::run(nvme_dir.as_deref(), engine.into(), json).map_err(HarnessError::from),
        Command::Sft { args } => run_sft(&args).map(|s| println!("{}", serde_json::json!({"sft": s}))),
        Command::Rm { args, loss, pairs } => run_rm(&args, loss, &pairs).map(|s| println!("{}", serde_json::json!({"rm": s}))),
        Command::Ppo { args, ppo } => run_ppo(&args, &ppo).map(|s| println!("{}", serde_json::json!({"ppo": s}))),
        Command::Pipeline { args, stages, ppo } => run_pipeline(&args, &stages, &ppo).map(|s| println!("{s}")),
        Command::Data { task, kind, size, seed, heldout, noise, out } => match kind {
            DataKind::Sft => save_jsonl(&out, &task.sft(size, seed, heldout, noise)),
            DataKind::Prefs => save_jsonl(&out, &task.preferences(size, seed, heldout, noise)),
            DataKind::Prompts => save_jsonl(
                &out,
                &task.prompts(size, seed, heldout).into_iter().map(|prompt| PromptExample { prompt }).collect::<Vec<_>>(),
            ),
        },
        Command::Bench {
            which: BenchCommand::Capacity { args },
        } => stowage_harness::bench::run_capacity(&args).map(|_| ()),
        Command::BenchRun { args } => stowage_harness::bench::run_child(&args).map(|_| ()),
        Command::Generate {
            checkpoint,
            prompt,
            max_new,
            temperature,
            top_k,
            top_p,
            seed,
        } => run_generate(checkpoint, prompt, max_new, temperature, top_k, top_p, seed),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
