//! `stowage bench capacity`: the largest model each strategy trains under a memory budget.
//!
//! Every (strategy, model) pair runs in a child process (`stowage bench-run`, hidden) for a few
//! steps of SFT, reward-model or PPO training on random tokens, so one run's memory never leaks
//! into the next and an out-of-memory ends the child, not the benchmark. The budget is real:
//! - on a CPU-only machine it applies to the child's resident memory as the OS reports it
//!   (VmRSS, polled every few milliseconds, and VmHWM at the end): the parent kills a child that
//!   goes over. The chunked strategy sizes its chunk budgets to what is left after libtorch's own
//!   footprint and an estimate of the activations, and spills the rest to `--nvme-dir`;
//! - on a GPU the rest of the card is taken by a ballast allocation, so going over is a real
//!   CUDA out-of-memory (a 24 GiB consumer card emulated on a larger one).
//!
//! Output: a markdown table (stdout and `OUT/capacity.md`), one JSON object per run (`--json`),
//! and `OUT/capacity.png` (parameters against peak memory per strategy, with the budget line).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

mod child;

pub use child::{activation_bytes, run_child};

use crate::engine::ModelSpec;
use crate::error::{HarnessError, Result};
use crate::model::{GptConfig, HeadKind};
use crate::ppo::PpoArgs;
use crate::tokenizer::Tokenizer;
use crate::train::{parse_size, BudgetSplit, DeviceArg, Precision, Strategy, TrainArgs};

/// The training job each run performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// One model with an LM head, next-token loss.
    Sft,
    /// One model with a score head, pairwise loss on (chosen, rejected) rows.
    Rm,
    /// Actor, critic, reference and reward model of the same size: generation, experience and
    /// one update of actor and critic per step.
    Ppo,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Sft => "sft",
            Workload::Rm => "rm",
            Workload::Ppo => "ppo",
        }
    }
}

/// `stowage bench capacity`.
#[derive(Debug, Clone, clap::Args)]
pub struct CapacityArgs {
    #[arg(long, value_enum, default_value_t = Workload::Ppo)]
    pub task: Workload,
    /// Memory budget: resident memory on a CPU-only machine, device memory on a GPU.
    #[arg(long, value_parser = parse_size)]
    pub budget: u64,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "naive,chunked")]
    pub strategies: Vec<Strategy>,
    /// Named configs or LAYERSxWIDTHxHEADS, comma-separated; run smallest first.
    #[arg(long, value_delimiter = ',', default_value = "tiny,s,m,l,xl")]
    pub models: Vec<String>,
    /// Steps per run; the first is warm-up and not timed when there are more.
    #[arg(long, default_value_t = 3)]
    pub steps: u64,
    /// Write the runs as a JSON array here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// NVMe directory for the chunked strategy's spill (each run uses its own subdirectory,
    /// removed afterwards).
    #[arg(long)]
    pub nvme_dir: Option<PathBuf>,
    /// When the chunked strategy's swap files are made (see `stowage ppo --help`).
    #[arg(long, value_enum, default_value_t = crate::train::SwapFilesArg::default())]
    pub swap_files: crate::train::SwapFilesArg,
    /// Directory for capacity.md, capacity.png and each run's log.
    #[arg(long, default_value = "runs/capacity")]
    pub out: PathBuf,
    /// Sequences per step (PPO: prompts).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Sequence length (PPO: prompt plus response).
    #[arg(long, default_value_t = 64)]
    pub ctx: usize,
    /// PPO: tokens generated per prompt (the prompt fills the rest of --ctx).
    #[arg(long, default_value_t = 16)]
    pub max_new: usize,
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub dtype: Precision,
    /// Precision of the copy of the weights that decoding reads, for every strategy (see
    /// `stowage ppo --help`); default: --dtype.
    #[arg(long, value_enum)]
    pub gen_dtype: Option<Precision>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// A run taking longer than this is stopped and reported as not fitting in time.
    #[arg(long, default_value_t = 3600)]
    pub timeout_s: u64,
    /// Keep trying larger models after one did not fit (default: stop that strategy there).
    #[arg(long)]
    pub keep_going: bool,
    /// Also run every strategy with LoRA adapters of this rank over a frozen base (rows
    /// `naive+lora`, `chunked+lora`; PPO: actor and critic). 0: no LoRA rows.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// With --lora-rank: run the LoRA rows only.
    #[arg(long)]
    pub lora_only: bool,
    /// PPO, chunked: how the models divide the budget (see `stowage ppo --help`).
    #[arg(long, value_enum, default_value_t = BudgetSplit::Auto)]
    pub budget_split: BudgetSplit,
    /// Run nothing: redraw the table and chart from an earlier run's `--json` file (give the
    /// same --task, --budget, --batch-size, --ctx and --max-new for the table's heading).
    #[arg(long)]
    pub from_json: Option<PathBuf>,
    #[arg(long)]
    pub quiet: bool,
}

/// `stowage bench-run` (hidden): one run, in the child process.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    #[arg(long, value_enum)]
    pub workload: Workload,
    #[arg(long, value_parser = parse_size)]
    pub budget: u64,
    /// Where the run's JSON goes.
    #[arg(long)]
    pub result: PathBuf,
    #[command(flatten)]
    pub train: TrainArgs,
    #[command(flatten)]
    pub ppo: PpoArgs,
}

/// One run's outcome, as the JSON holds it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunRecord {
    pub strategy: String,
    pub model: String,
    /// Parameters of one model (PPO runs four of this size).
    pub params: u64,
    /// Parameters of all the run's models.
    pub params_total: u64,
    pub fits: bool,
    /// Why not, when it did not fit.
    pub reason: Option<String>,
    pub peak_bytes: u64,
    pub step_s: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub flops_per_s: Option<f64>,
    pub bytes_moved: Value,
    /// Share of chunk-transfer time hidden under compute (chunked runs with transfers).
    pub transfer_hidden_share: Option<f64>,
    /// The same in the steady state: the steps after the first, less what the last one leaves
    /// running after it (a longer run would overlap it with its next step).
    pub steady_hidden_share: Option<f64>,
    /// PPO: transfer seconds and hidden share per phase (experience, update).
    pub hidden_by_phase: Value,
    pub budget_bytes: u64,
    pub wall_s: f64,
}

/// Resident memory of process `pid` (VmRSS), bytes; None once it has gone.
fn rss_of(pid: u32) -> Option<u64> {
    status_field(&format!("/proc/{pid}/status"), "VmRSS:")
}

fn status_field(path: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(path).ok()?;
    s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()).map(|k| k * 1024)
}

/// Model FLOPs per step (attention's sequence-quadratic terms left out, as in the usual
/// 6·N·tokens estimate): 6·N per trained token, 2·N per forward-only token.
pub fn step_flops(w: Workload, n: u64, tokens: &StepTokens) -> f64 {
    let n = n as f64;
    match w {
        Workload::Sft | Workload::Rm => 6.0 * n * tokens.trained as f64,
        // Generation (prefill and decode) on the actor; a forward of the whole sequences on
        // actor, reference, critic and reward model; forward and backward of actor and critic.
        Workload::Ppo => 2.0 * n * tokens.generated as f64 + 4.0 * 2.0 * n * tokens.trained as f64 + 2.0 * 6.0 * n * tokens.trained as f64,
    }
}

/// The FLOP formula as printed with the table.
pub fn flops_formula(w: Workload) -> &'static str {
    match w {
        Workload::Sft | Workload::Rm => "FLOP/step = 6 N T (N parameters, T tokens trained; attention's T^2 terms left out)",
        Workload::Ppo => "FLOP/step = 2 N G + 8 N T + 12 N T (N parameters per model, G tokens through generation, T sequence tokens: 4 forward-only passes, actor and critic trained)",
    }
}

/// Tokens one step processed.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTokens {
    /// Tokens through a training pass (PPO: per trained model).
    pub trained: u64,
    /// Tokens through generation (prompt prefill plus decoded positions).
    pub generated: u64,
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

/// A child being watched.
struct Watched {
    child: Child,
    peak_rss: u64,
    killed: Option<String>,
}

/// A row's strategy name: `naive`, `chunked`, or either with `+lora`.
fn row_name(s: Strategy, lora: bool) -> String {
    let n = value_name(s);
    if lora {
        format!("{n}+lora")
    } else {
        n
    }
}

/// Runs one (strategy, model) child under the budget; returns its record.
fn run_one(a: &CapacityArgs, (strategy, lora): (Strategy, bool), model: &str, params: u64, idx: usize, bar: &indicatif::ProgressBar) -> Result<RunRecord> {
    let sname = value_name(strategy);
    let sname = sname.as_str();
    let row = row_name(strategy, lora);
    let tag = format!("{idx:02}-{}-{model}", row.replace('+', "-"));
    let result = a.out.join(format!("{tag}.json"));
    let log = a.out.join(format!("{tag}.log"));
    let _ = std::fs::remove_file(&result);
    let exe = std::env::current_exe().map_err(|e| HarnessError::io("finding the stowage binary", "/proc/self/exe", e))?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench-run")
        .args(["--workload", a.task.name()])
        .args(["--budget", &a.budget.to_string()])
        .arg("--result")
        .arg(&result)
        .args(["--model", model, "--strategy", sname])
        .args(["--steps", &a.steps.to_string(), "--batch-size", &a.batch_size.to_string(), "--ctx", &a.ctx.to_string()])
        .args(["--max-new", &a.max_new.to_string(), "--ppo-epochs", "1", "--minibatches", "1"])
        .args(["--dtype", &value_name(a.dtype), "--device", &value_name(a.device)])
        .args(a.gen_dtype.iter().flat_map(|d| ["--gen-dtype".to_string(), value_name(*d)]))
        .arg("--quiet")
        .arg("--out")
        .arg(a.out.join(&tag));
    if lora {
        cmd.args(["--lora-rank", &a.lora_rank.to_string()]);
    }
    cmd.args(["--budget-split", &value_name(a.budget_split)]);
    let nvme = match (&a.nvme_dir, strategy) {
        (Some(d), Strategy::Chunked) => {
            let sub = d.join(format!("stowage-bench-{}-{tag}", std::process::id()));
            std::fs::create_dir_all(&sub).map_err(|e| HarnessError::io("creating", &sub, e))?;
            cmd.arg("--nvme-dir").arg(&sub).args(["--swap-files", &value_name(a.swap_files)]);
            Some(sub)
        }
        _ => None,
    };
    let logf = std::fs::File::create(&log).map_err(|e| HarnessError::io("creating", &log, e))?;
    cmd.stdout(Stdio::null()).stderr(logf);
    let start = Instant::now();
    let child = cmd.spawn().map_err(|e| HarnessError::io("starting the benchmark child", "stowage bench-run", e))?;
    let mut w = Watched { child, peak_rss: 0, killed: None };
    let cpu_budget = !(a.device != DeviceArg::Sim && tch::Cuda::is_available());
    let status = loop {
        if let Some(st) = w.child.try_wait().map_err(|e| HarnessError::io("waiting for", "the benchmark child", e))? {
            break st;
        }
        if let Some(r) = rss_of(w.child.id()) {
            w.peak_rss = w.peak_rss.max(r);
            if cpu_budget && r > a.budget && w.killed.is_none() {
                w.killed = Some(format!(
                    "resident memory reached {} > budget {} after {:.1} s",
                    crate::engine::chunked::human(r),
                    crate::engine::chunked::human(a.budget),
                    start.elapsed().as_secs_f64()
                ));
                let _ = w.child.kill();
            }
        }
        if start.elapsed() > Duration::from_secs(a.timeout_s) && w.killed.is_none() {
            w.killed = Some(format!("did not finish {} steps within --timeout-s {}", a.steps, a.timeout_s));
            let _ = w.child.kill();
        }
        bar.set_message(format!(
            "{row} {model}: {:.0} s, resident {}",
            start.elapsed().as_secs_f64(),
            crate::engine::chunked::human(w.peak_rss)
        ));
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall_s = start.elapsed().as_secs_f64();
    if let Some(d) = &nvme {
        let _ = std::fs::remove_dir_all(d);
    }
    let res: Option<Value> = std::fs::read_to_string(&result).ok().and_then(|s| serde_json::from_str(&s).ok());
    let mut rec = RunRecord {
        peak_bytes: w.peak_rss,
        wall_s,
        ..RunRecord::not_run(a, &row, model, params, None)
    };
    match (w.killed, res) {
        (Some(why), _) => rec.reason = Some(why),
        (None, Some(r)) if status.success() => {
            let peak = r["peak_bytes"].as_u64().unwrap_or(0);
            rec.peak_bytes = if cpu_budget { peak.max(w.peak_rss) } else { peak };
            rec.params_total = r["params_total"].as_u64().unwrap_or(rec.params_total);
            rec.step_s = r["step_s"].as_f64();
            rec.tokens_per_s = r["tokens_per_s"].as_f64();
            rec.flops_per_s = r["flops_per_s"].as_f64();
            rec.bytes_moved = r["bytes_moved"].clone();
            rec.transfer_hidden_share = r["transfer_hidden_share"].as_f64();
            rec.steady_hidden_share = r["steady_hidden_share"].as_f64();
            rec.hidden_by_phase = r["hidden_by_phase"].clone();
            rec.fits = rec.peak_bytes <= a.budget;
            if !rec.fits {
                rec.reason = Some(format!("peak {} > budget", crate::engine::chunked::human(rec.peak_bytes)));
            }
        }
        (None, _) => {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text.lines().rev().find(|l| l.starts_with("error:")).or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()));
            rec.reason = Some(match last {
                Some(l) => l.trim_start_matches("error: ").to_string(),
                None => format!("the child exited with {status}"),
            });
        }
    }
    Ok(rec)
}

/// The command-line spelling of a value (`fp32`, `chunked`, `sim`, ...).
fn value_name(v: impl clap::ValueEnum) -> String {
    v.to_possible_value().map_or_else(String::new, |p| p.get_name().to_string())
}

/// Sequences must hold a token to train on (PPO: a prompt token and a generated one).
fn check_lengths(w: Workload, ctx: usize, batch: usize) -> Result<()> {
    let min = if w == Workload::Ppo { 4 } else { 2 };
    if ctx < min || batch == 0 {
        return Err(HarnessError::Config(format!("--ctx {ctx} --batch-size {batch}: the {} benchmark needs --ctx >= {min} and --batch-size >= 1", w.name())));
    }
    Ok(())
}

/// `stowage bench capacity`: runs every (strategy, model), writes the table, JSON and chart.
pub fn run_capacity(a: &CapacityArgs) -> Result<Vec<RunRecord>> {
    if a.steps == 0 {
        return Err(HarnessError::Config("--steps must be at least 1".into()));
    }
    check_lengths(a.task, a.ctx, a.batch_size)?;
    std::fs::create_dir_all(&a.out).map_err(|e| HarnessError::io("creating", &a.out, e))?;
    if let Some(f) = &a.from_json {
        let text = std::fs::read_to_string(f).map_err(|e| HarnessError::io("reading", f, e))?;
        let runs: Vec<RunRecord> = serde_json::from_str(&text).map_err(|e| HarnessError::Config(format!("{}: not a capacity JSON file: {e}", f.display())))?;
        return report(a, runs);
    }
    let tok = Tokenizer::new(crate::tokenizer::TokenizerKind::Byte)?;
    let mut models: Vec<(String, u64)> = Vec::new();
    for m in &a.models {
        let cfg = GptConfig::parse(m, tok.vocab(), a.ctx)?;
        models.push((m.clone(), ModelSpec::new(cfg, HeadKind::Lm).numel()));
    }
    models.sort_by_key(|m| m.1);
    if a.lora_only && a.lora_rank == 0 {
        return Err(HarnessError::Config("--lora-only needs --lora-rank R (R > 0)".into()));
    }
    let mut variants: Vec<(Strategy, bool)> = if a.lora_only { Vec::new() } else { a.strategies.iter().map(|&s| (s, false)).collect() };
    if a.lora_rank > 0 {
        variants.extend(a.strategies.iter().map(|&s| (s, true)));
    }
    let total = (models.len() * variants.len()) as u64;
    let bar = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total) };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} runs {elapsed} {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let mut runs = Vec::new();
    let mut idx = 0;
    for &v in &variants {
        let mut stopped: Option<String> = None;
        for (m, params) in &models {
            idx += 1;
            let rec = match &stopped {
                Some(smaller) => RunRecord::not_run(a, &row_name(v.0, v.1), m, *params, Some(format!("not run: the smaller {smaller} did not fit (--keep-going runs it)"))),
                None => run_one(a, v, m, *params, idx, &bar)?,
            };
            bar.println(format!(
                "{:<13} {:<14} {:>12} params: {}",
                rec.strategy,
                rec.model,
                rec.params,
                if rec.fits { format!("fits, peak {}", crate::engine::chunked::human(rec.peak_bytes)) } else { format!("does not fit: {}", rec.reason.clone().unwrap_or_default()) }
            ));
            if !rec.fits && stopped.is_none() && !a.keep_going {
                stopped = Some(m.clone());
            }
            runs.push(rec);
            bar.inc(1);
            if let Some(j) = &a.json {
                write_json(j, &runs)?;
            }
        }
    }
    bar.finish_and_clear();
    report(a, runs)
}

/// Prints and saves the table, writes the JSON and the chart.
fn report(a: &CapacityArgs, runs: Vec<RunRecord>) -> Result<Vec<RunRecord>> {
    let md = table(a, &runs);
    print!("{md}");
    crate::ckpt::write_atomic(&a.out.join("capacity.md"), md.as_bytes())?;
    if let Some(j) = &a.json {
        write_json(j, &runs)?;
    }
    if let Err(e) = crate::plot::capacity_chart(&a.out.join("capacity.png"), &runs, a.budget) {
        eprintln!("warning: capacity chart not drawn: {e}");
    }
    Ok(runs)
}

impl RunRecord {
    /// A run that produced nothing (yet): no figures, `reason` as given.
    fn not_run(a: &CapacityArgs, strategy: &str, model: &str, params: u64, reason: Option<String>) -> Self {
        RunRecord {
            strategy: strategy.into(),
            model: model.into(),
            params,
            params_total: if a.task == Workload::Ppo { 4 * params } else { params },
            fits: false,
            reason,
            peak_bytes: 0,
            step_s: None,
            tokens_per_s: None,
            flops_per_s: None,
            bytes_moved: json!({}),
            transfer_hidden_share: None,
            steady_hidden_share: None,
            hidden_by_phase: json!({}),
            budget_bytes: a.budget,
            wall_s: 0.0,
        }
    }
}

fn write_json(path: &Path, runs: &[RunRecord]) -> Result<()> {
    let body = serde_json::to_vec_pretty(runs).map_err(|e| HarnessError::Config(e.to_string()))?;
    crate::ckpt::write_atomic(path, &body)
}

/// The largest fitting model's parameters per strategy.
pub fn capacity(runs: &[RunRecord], strategy: &str) -> Option<u64> {
    runs.iter().filter(|r| r.strategy == strategy && r.fits).map(|r| r.params).max()
}

/// The markdown report: one row per run, capacities, their ratio and step-time ratios.
pub fn table(a: &CapacityArgs, runs: &[RunRecord]) -> String {
    use crate::engine::chunked::human;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Capacity, task {}, budget {} ({}), batch {}, context {}{}, {:?}{}\n",
        a.task.name(),
        human(a.budget),
        if a.device != DeviceArg::Sim && tch::Cuda::is_available() { "GPU memory" } else { "resident memory" },
        a.batch_size,
        a.ctx,
        if a.task == Workload::Ppo { format!(" ({} generated)", a.max_new) } else { String::new() },
        a.dtype,
        a.gen_dtype.map_or(String::new(), |d| format!(", decoding through a {d:?} copy"))
    );
    let _ = writeln!(s, "| strategy | model | params | fits | peak | step s | tokens/s | GFLOP/s | moved | hidden | steady | note |");
    let _ = writeln!(s, "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in runs {
        let moved: u64 = r.bytes_moved.as_object().map_or(0, |o| o.values().filter_map(Value::as_u64).sum());
        let f = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        let _ = writeln!(
            s,
            "| {} | {} | {:.1}M | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.strategy,
            r.model,
            r.params as f64 / 1e6,
            if r.fits { "yes" } else { "no" },
            if r.peak_bytes > 0 { human(r.peak_bytes) } else { "-".into() },
            f(r.step_s, 2),
            f(r.tokens_per_s, 1),
            f(r.flops_per_s.map(|x| x / 1e9), 1),
            if moved > 0 { human(moved) } else { "-".into() },
            r.transfer_hidden_share.map_or("-".into(), |h| format!("{:.0}%", 100.0 * h)),
            r.steady_hidden_share.map_or("-".into(), |h| format!("{:.0}%", 100.0 * h)),
            r.reason.clone().unwrap_or_default().replace('|', "/")
        );
    }
    let _ = writeln!(s, "\n{}; moved: bytes over every link (device, host, NVMe), initialisation and all steps; hidden: share of transfer time under compute (the time each link has a chunk move in flight, against the compute spans of the run's timeline), over all steps; steady: the same from the second step on, less what the last step leaves running after it (a longer run overlaps that with its next step).\n", flops_formula(a.task));
    for suffix in ["", "+lora"] {
        let (nn, cn) = (format!("naive{suffix}"), format!("chunked{suffix}"));
        let (n, c) = (capacity(runs, &nn), capacity(runs, &cn));
        for (name, cap) in [(&nn, n), (&cn, c)] {
            if let Some(p) = cap {
                let _ = writeln!(s, "- {name} capacity: {:.1}M parameters per model", p as f64 / 1e6);
            }
        }
        if let (Some(n), Some(c)) = (n, c) {
            let _ = writeln!(s, "- {cn} / {nn} capacity: {:.1}x", c as f64 / n as f64);
        }
    }
    for r in runs.iter().filter(|r| r.fits) {
        if let Some(o) = r.hidden_by_phase.as_object().filter(|o| !o.is_empty()) {
            let parts: Vec<String> = o
                .iter()
                .map(|(k, v)| format!("{k} {:.0}% of {:.1} s", 100.0 * v["hidden_share"].as_f64().unwrap_or(0.0), v["transfer_s"].as_f64().unwrap_or(0.0)))
                .collect();
            let _ = writeln!(s, "- {} {}: transfer time hidden per phase: {}", r.strategy, r.model, parts.join(", "));
        }
    }
    for r in runs.iter().filter(|r| r.strategy.starts_with("chunked") && r.fits) {
        let naive = r.strategy.replace("chunked", "naive");
        if let Some(nv) = runs.iter().find(|x| x.strategy == naive && x.model == r.model && x.fits) {
            if let (Some(cs), Some(ns)) = (r.step_s, nv.step_s) {
                let _ = writeln!(s, "- {}: {} step time {:.2}x {naive} ({cs:.2} s vs {ns:.2} s)", r.model, r.strategy, cs / ns);
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(strategy: &str, model: &str, params: u64, fits: bool, step_s: f64) -> RunRecord {
        RunRecord {
            strategy: strategy.into(),
            model: model.into(),
            params,
            params_total: params,
            fits,
            reason: (!fits).then(|| "resident memory reached".into()),
            peak_bytes: params * 20,
            step_s: fits.then_some(step_s),
            tokens_per_s: None,
            flops_per_s: None,
            bytes_moved: json!({"nvme->device": 1 << 20}),
            transfer_hidden_share: fits.then_some(0.9),
            steady_hidden_share: fits.then_some(0.95),
            hidden_by_phase: json!({}),
            budget_bytes: 1 << 30,
            wall_s: 1.0,
        }
    }

    #[test]
    fn activations_of_the_chunked_strategy_are_one_layer_plus_inputs() {
        let c = GptConfig::parse("12x768x12", 256, 64).unwrap();
        let naive = activation_bytes(&c, Workload::Sft, Strategy::Naive, 4);
        let chunked = activation_bytes(&c, Workload::Sft, Strategy::Chunked, 4);
        // One layer of 4 x 64 tokens: 2 * 256 * (34 * 768 + 5 * 12 * 64) bytes.
        let layer = 2 * 256 * (34 * 768 + 5 * 12 * 64);
        let logits = 12 * 256 * 256;
        assert_eq!(naive, 12 * layer + logits);
        assert_eq!(chunked, layer + 4 * 12 * 256 * 768 + logits + 4 * (12 * 768 * 768 + 13 * 768));
        // Reward models see pairs: twice the rows.
        assert!(activation_bytes(&c, Workload::Rm, Strategy::Naive, 4) == 2 * naive);
        assert!(activation_bytes(&c, Workload::Ppo, Strategy::Chunked, 4) > chunked, "the KV cache");
    }

    #[test]
    fn flops_follow_the_printed_formula() {
        let t = StepTokens { trained: 100, generated: 30 };
        assert_eq!(step_flops(Workload::Sft, 1000, &t), 6.0 * 1000.0 * 100.0);
        assert_eq!(step_flops(Workload::Ppo, 1000, &t), 2.0 * 1000.0 * 30.0 + 8.0 * 1000.0 * 100.0 + 12.0 * 1000.0 * 100.0);
    }

    #[test]
    fn the_table_gives_capacities_their_ratio_and_step_time_ratios() {
        let a = CapacityArgs {
            task: Workload::Ppo,
            budget: 1 << 30,
            strategies: vec![Strategy::Naive, Strategy::Chunked],
            models: vec![],
            steps: 2,
            json: None,
            nvme_dir: None,
            out: PathBuf::from("x"),
            batch_size: 4,
            ctx: 64,
            max_new: 16,
            dtype: Precision::Fp32,
            gen_dtype: None,
            swap_files: crate::train::SwapFilesArg::default(),
            device: DeviceArg::Sim,
            timeout_s: 10,
            keep_going: false,
            lora_rank: 8,
            lora_only: false,
            budget_split: BudgetSplit::Auto,
            from_json: None,
            quiet: true,
        };
        let runs = vec![
            rec("naive", "a", 10_000_000, true, 1.0),
            rec("naive", "b", 40_000_000, false, 0.0),
            rec("chunked", "a", 10_000_000, true, 1.1),
            rec("chunked", "b", 40_000_000, true, 3.0),
            rec("chunked", "c", 120_000_000, true, 9.0),
            rec("naive+lora", "a", 10_000_000, true, 0.8),
            rec("naive+lora", "b", 40_000_000, true, 2.0),
            rec("chunked+lora", "b", 40_000_000, true, 2.5),
            rec("chunked+lora", "c", 120_000_000, true, 7.0),
        ];
        assert_eq!(capacity(&runs, "naive"), Some(10_000_000));
        assert_eq!(capacity(&runs, "chunked"), Some(120_000_000));
        let t = table(&a, &runs);
        assert!(t.contains("chunked / naive capacity: 12.0x"), "{t}");
        assert!(t.contains("- a: chunked step time 1.10x naive"), "{t}");
        assert!(!t.contains("- b: chunked step time"), "b did not fit naively: {t}");
        assert_eq!(t.lines().filter(|l| l.starts_with("| naive") || l.starts_with("| chunked")).count(), 9);
        assert!(t.contains("chunked+lora / naive+lora capacity: 3.0x"), "{t}");
        assert!(t.contains("- b: chunked+lora step time 1.25x naive+lora"), "{t}");
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
    }
}
