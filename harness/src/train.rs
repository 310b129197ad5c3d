//! Supervised fine-tuning and reward-model training: options, the engine they run on, data,
//! the loops with progress bar, JSONL metrics, held-out evaluation, checkpoints and report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use stowage_memory::optim::AdamConfig;
use stowage_memory::{DType, DeviceChoice, NvmeConfig, PolicyKind, TiersConfig};
use tch::{Kind, Tensor};

use crate::ckpt::CkptPaths;
use crate::data::{load_jsonl, SftExample};
use crate::engine::{torch_device, Chunked, ChunkedOpts, Engine, ModelSpec, Naive, TrainOpts};
use crate::error::{HarnessError, Result};
use crate::generate::{generate, Sampler};
use crate::model::{GptConfig, HeadKind};
use crate::tasks::Task;
use crate::tokenizer::{Tokenizer, TokenizerKind};
// Re-exported: the run records were part of this module, and callers name them from here.
pub use crate::record::{draw_charts, memory_json, merged_trace, peak_rss_bytes, trace_overlap, update_report, write_trace, Run};
pub use crate::rm::{eval_pairwise, policy_pairs, run_rm, PairArgs};
pub use crate::weights::{load_weights, recover_checkpoint, resume_engine, save_checkpoint, save_merged, write_checkpoint_files};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    Naive,
    Chunked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Placement {
    /// Half the parameter bytes and none of the optimizer state pinned on the device.
    Static,
    Auto,
    Optimal,
    Lru,
}

/// When the NVMe swap files are made (see `stowage_memory::SwapFiles`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SwapFilesArg {
    /// As chunks first go down (a file made under load stalls the disk's other requests).
    OnDemand,
    /// Reserved for every chunk at start, not written (first writes then convert blocks).
    Reserved,
    /// Reserved for every chunk at start and written through once: training only rewrites.
    Written,
    /// Reserved at start, then written through while the disk is idle, ahead of the chunks.
    #[default]
    Background,
}

impl From<SwapFilesArg> for stowage_memory::SwapFiles {
    fn from(a: SwapFilesArg) -> Self {
        match a {
            SwapFilesArg::OnDemand => stowage_memory::SwapFiles::OnDemand,
            SwapFilesArg::Reserved => stowage_memory::SwapFiles::Reserved,
            SwapFilesArg::Written => stowage_memory::SwapFiles::Written,
            SwapFilesArg::Background => stowage_memory::SwapFiles::Background,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceArg {
    /// CUDA when usable, else the simulated device.
    Auto,
    Cuda,
    Sim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RmLoss {
    /// -log sigmoid(r_chosen - r_rejected)
    LogSig,
    /// log(1 + exp(r_rejected - r_chosen))
    LogExp,
}

/// Parses `512M`, `4G`, `1.5GiB`, `65536` (bytes).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        Some('g') => (&t[..t.len() - 1], 1 << 30),
        Some('t') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a size: use bytes or a K, M, G or T suffix (e.g. 512M)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("`{s}` is not a size"));
    }
    Ok((v * mult as f64) as u64)
}

/// How PPO's chunked models divide the budgets (`--budget-split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BudgetSplit {
    Auto,
    Turns,
    Fixed,
}

impl BudgetSplit {
    /// Whether models take turns: `actor_param_bytes` against the actor's fixed share (a third)
    /// of `budgets` (device and host together).
    pub fn turns(self, actor_param_bytes: u64, budgets: u64) -> bool {
        match self {
            BudgetSplit::Turns => true,
            BudgetSplit::Fixed => false,
            BudgetSplit::Auto => actor_param_bytes > budgets / 3,
        }
    }
}

/// Options shared by the training commands.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// A built-in task (sort, reverse, add, sentiment); or give --data.
    #[arg(long, value_enum)]
    pub task: Option<Task>,
    /// Training data, JSON Lines.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data, JSON Lines (default with --data: the last 10% of --data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// tiny, s, m, l, xl, 2.7b, 6.7b, 13b, 30b, 66b, 175b, or LAYERSxWIDTHxHEADS.
    #[arg(long, default_value = "tiny")]
    pub model: String,
    #[arg(long, value_enum, default_value_t = TokenizerKind::Byte)]
    pub tokenizer: TokenizerKind,
    /// Context length.
    #[arg(long, default_value_t = 64)]
    pub ctx: usize,
    #[arg(long, value_enum, default_value_t = Strategy::Chunked)]
    pub strategy: Strategy,
    /// Chunk placement policy (chunked strategy).
    #[arg(long, value_enum, default_value_t = Placement::Auto)]
    pub placement: Placement,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Device budget for chunks (default: the whole model state).
    #[arg(long, value_parser = parse_size)]
    pub device_budget: Option<u64>,
    /// Host (pinned DRAM) budget for chunks (default: the whole model state).
    #[arg(long, value_parser = parse_size)]
    pub host_budget: Option<u64>,
    /// Directory for NVMe swap files: chunks spill there past the host budget.
    #[arg(long)]
    pub nvme_dir: Option<PathBuf>,
    /// When the NVMe swap files are made: `reserved` reserves every chunk's room at start (a
    /// file made during training stalls the disk's requests in flight for up to a second),
    /// `background` (default) then writes them through while the disk is idle (first writes
    /// into reserved blocks are slower than rewrites), `written` writes them through once
    /// before training (a pass over the disk at start), `on-demand` makes them as chunks first
    /// go down.
    #[arg(long, value_enum, default_value_t = SwapFilesArg::default())]
    pub swap_files: SwapFilesArg,
    /// ppo, pipeline: how the chunked models divide --device-budget and --host-budget.
    /// `fixed`: a third to the actor and to the critic, a sixth to the reference and to the
    /// reward model; `turns`: the model at work takes room from the idle ones (the actor all it
    /// can while generating); `auto`: turns when the actor's parameters do not fit in its
    /// fixed share (generation would stream them once per token), else fixed.
    #[arg(long, value_enum, default_value_t = BudgetSplit::Auto)]
    pub budget_split: BudgetSplit,
    /// Budgets shared with other models (set by ppo, not a flag).
    #[arg(skip)]
    pub turns: Option<crate::engine::turns::Turns>,
    /// Elements per chunk (default: searched for least waste).
    #[arg(long)]
    pub chunk_elems: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    pub steps: u64,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (linear warm-up, cosine decay to 10%).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f32,
    /// Global gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub dtype: Precision,
    /// Precision of the weights decoding reads (generation, after the prompt): a 16-bit copy
    /// made while the prompt is read and dropped when generation ends, so every generated
    /// token reads half the bytes (the prompt and every training pass keep --dtype). Default:
    /// --dtype (no copy).
    #[arg(long, value_enum)]
    pub gen_dtype: Option<Precision>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: metrics.jsonl, report.json, checkpoint/.
    #[arg(long, default_value = "runs/latest")]
    pub out: PathBuf,
    /// Examples generated for built-in tasks (training side).
    #[arg(long, default_value_t = 20000)]
    pub train_size: usize,
    /// Held-out examples evaluated.
    #[arg(long, default_value_t = 200)]
    pub eval_size: usize,
    /// Evaluate every N steps (and at the end).
    #[arg(long, default_value_t = 250)]
    pub eval_every: u64,
    /// Fraction of SFT demonstrations corrupted (built-in tasks).
    #[arg(long, default_value_t = 0.0)]
    pub corrupt: f64,
    /// Probability a preference pair's labels are swapped (built-in tasks).
    #[arg(long, default_value_t = 0.0)]
    pub label_noise: f64,
    /// Resume from OUT/checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start from this checkpoint directory's weights (a new head is initialised if its kind
    /// differs, e.g. a reward model from an SFT model).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Stop after this step, saving a checkpoint (continue later with --resume).
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Save a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// No progress bar (logs stay).
    #[arg(long)]
    pub quiet: bool,
    /// Chunked strategy: always recompute each unit in the backward pass (one unit's
    /// activations live at a time). By default a model whose parameter chunks all fit on the
    /// device keeps the forward pass's graphs instead, as the naive strategy does.
    #[arg(long)]
    pub recompute: bool,
    /// Chunked strategy: finish each optimizer update before the step returns. By default an
    /// update that needs the global gradient norm (clipping, loss scaling) and streams state
    /// from NVMe or to a GPU runs after the backward pass in the background, while other work
    /// (another model's turn) computes; the numbers are the same either way.
    #[arg(long)]
    pub update_in_place: bool,
    /// Train low-rank adapters of this rank on every block's linears (attention and MLP) over
    /// frozen base weights, whose chunks are read-only (no gradients, masters or moments; they
    /// may stream from NVMe). A scalar head (reward model, critic) trains in full. 0: train
    /// every weight. The checkpoint keeps base and adapters apart; `OUT/merged/` holds the
    /// merged model.
    #[arg(long, default_value_t = 0)]
    pub lora_rank: usize,
    /// LoRA scaling numerator: the adapters' output is multiplied by alpha / rank (default:
    /// the rank, a multiplier of 1).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Write a Chrome trace (opens in Perfetto) of the chunked strategy's compute spans and
    /// transfers, one track per link, one process per model; the summary prints the share of
    /// transfer time hidden under compute (`stowage pipeline`: one file per stage,
    /// FILE-sft.json, FILE-rm.json, FILE-ppo.json).
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

impl TrainArgs {
    /// The compute precision asked for.
    pub fn compute_dtype(&self) -> DType {
        self.dtype()
    }

    /// The adapters asked for (None without --lora-rank).
    pub fn lora(&self) -> Option<crate::model::LoraConfig> {
        (self.lora_rank > 0).then(|| crate::model::LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(self.lora_rank as f64),
        })
    }

    fn dtype(&self) -> DType {
        self.dtype.dtype()
    }

    /// The decoding copy's precision, None where it would equal the parameters'.
    pub fn gen_dtype(&self) -> Option<DType> {
        self.gen_dtype.map(Precision::dtype).filter(|&d| d != self.dtype())
    }
}

/// A warning for adapters over a randomly initialised base (no `--init`): they can learn
/// little there; LoRA is meant for a trained model.
pub(crate) fn lora_note(a: &TrainArgs) -> Option<String> {
    (a.lora().is_some() && a.init.is_none() && !a.resume)
        .then(|| "--lora-rank without --init: the adapters train over a randomly initialised, frozen base (give --init DIR, a trained checkpoint, to adapt a model)".into())
}

/// Builds the engine for `head` as the options ask.
pub fn build_engine(a: &TrainArgs, cfg: GptConfig, head: HeadKind, notes: &mut Vec<String>) -> Result<Box<dyn Engine>> {
    let opts = TrainOpts {
        dtype: a.dtype(),
        adam: AdamConfig {
            lr: a.lr,
            weight_decay: a.weight_decay,
            ..AdamConfig::default()
        },
        max_norm: (a.clip > 0.0).then_some(a.clip),
        trainable: true,
        // Only a language model generates.
        gen_dtype: a.gen_dtype().filter(|_| head == HeadKind::Lm),
    };
    if let Some(alpha) = a.lora_alpha {
        if a.lora_rank == 0 || !alpha.is_finite() || alpha <= 0.0 {
            return Err(HarnessError::Config(format!("--lora-alpha {alpha}: give a positive alpha together with --lora-rank R (R > 0)")));
        }
    }
    build_engine_with(a, ModelSpec::with_lora(cfg, head, a.lora()), opts, notes)
}

/// Builds an engine for `spec` with `opts` under the options' strategy, device and budgets.
pub fn build_engine_with(a: &TrainArgs, spec: ModelSpec, opts: TrainOpts, notes: &mut Vec<String>) -> Result<Box<dyn Engine>> {
    let e: Box<dyn Engine> = match a.strategy {
        Strategy::Naive => {
            let (device, note) = match a.device {
                DeviceArg::Sim => (tch::Device::Cpu, None),
                DeviceArg::Cuda if !tch::Cuda::is_available() => {
                    return Err(HarnessError::Config("--device cuda: libtorch sees no CUDA device (check the driver and scripts/setup.sh)".into()))
                }
                _ => torch_device(),
            };
            notes.extend(note);
            Box::new(Naive::new(spec, device, opts, a.seed)?)
        }
        Strategy::Chunked => {
            // 16 bytes per trainable parameter in fp32 (param, grad, two moments) and in
            // bf16/fp16 (2 + 2 + 4-byte master + moments), the dtype's size for a frozen one;
            // packing wastes a little: allow a quarter more.
            let trained = if opts.trainable { spec.trainable_numel() } else { 0 };
            let decode_copy = opts.gen_dtype.map_or(0, |d| spec.numel() * d.size() as u64);
            let state_bytes = trained * 16 + (spec.numel() - trained) * opts.dtype.size() as u64 + decode_copy;
            let per_param = state_bytes / spec.numel().max(1);
            let state = state_bytes * 5 / 4 + (64 << 20);
            let choice = match a.device {
                DeviceArg::Auto => DeviceChoice::Auto,
                DeviceArg::Cuda => DeviceChoice::Cuda,
                DeviceArg::Sim => DeviceChoice::Simulated,
            };
            // Pools grow by arenas (the NVMe one by preallocated file extents): a quarter of the
            // state each, between 16 and 256 MiB, so a small model does not reserve a 256 MiB
            // swap file per model for a few MiB of spill.
            let arena = (spec.numel() * per_param / 4).clamp(16 << 20, 256 << 20) as usize;
            let mut tiers = TiersConfig::default()
                .with_device(choice, a.device_budget.unwrap_or(state))
                .with_host_budget(a.host_budget.unwrap_or(state))
                .with_arena_bytes(arena);
            if let Some(d) = &a.nvme_dir {
                tiers = tiers.with_nvme(NvmeConfig::new(d).with_swap_files(a.swap_files.into()));
            }
            let policy = match a.placement {
                Placement::Static => PolicyKind::Static { param_frac: 0.5, optim_frac: 0.0 },
                Placement::Auto => PolicyKind::Auto,
                Placement::Optimal => PolicyKind::Optimal,
                Placement::Lru => PolicyKind::Lru,
            };
            let copts = ChunkedOpts {
                tiers,
                policy,
                chunk_elems: a.chunk_elems,
                trace: a.trace.is_some(),
                keep_graph: !a.recompute,
                defer_update: !a.update_in_place,
                turns: a.turns.clone(),
                ..ChunkedOpts::default()
            };
            Box::new(Chunked::new(spec, opts, copts, a.seed)?)
        }
    };
    notes.extend(e.notes());
    Ok(e)
}

/// Learning rate at `step` (from 0): linear warm-up over 5% of the steps, cosine to 10%.
pub fn lr_at(peak: f32, step: u64, total: u64) -> f32 {
    let warm = (total / 20).max(1);
    if step < warm {
        return peak * (step + 1) as f32 / warm as f32;
    }
    let p = (step - warm) as f32 / (total.saturating_sub(warm)).max(1) as f32;
    peak * (0.1 + 0.9 * 0.5 * (1.0 + (std::f32::consts::PI * p.min(1.0)).cos()))
}

/// A one-line summary of tier usage for the progress bar.
fn tiers_line(e: &dyn Engine) -> String {
    let m = e.memory();
    m.tiers
        .iter()
        .map(|(k, v)| format!("{k} {:.0}M", v.get("used").and_then(Value::as_u64).unwrap_or(0) as f64 / 1048576.0))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The batch at `step`: indices drawn from a stream keyed by seed and step, so resuming at a
/// step sees exactly the batches an uninterrupted run would.
pub fn batch_indices(seed: u64, step: u64, n: usize, b: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_ba7c);
    rng.set_stream(step);
    (0..b).map(|_| rng.gen_range(0..n)).collect()
}

/// `[BOS] prompt completion [EOS]`, and the length of `[BOS] prompt`. Prompts too long for the
/// context lose their oldest tokens; completions are cut to fit.
pub fn encode_pair(tok: &Tokenizer, prompt: &str, completion: &str, ctx: usize) -> (Vec<i64>, usize) {
    let mut p = vec![tok.bos()];
    p.extend(tok.encode(prompt));
    let mut c = tok.encode(completion);
    c.push(tok.eos());
    let max = ctx + 1; // inputs are the sequence without its last token
    if p.len() + c.len() > max {
        let keep_c = c.len().min(max / 2).max(max.saturating_sub(p.len()));
        c.truncate(keep_c.min(max - 1));
        let room = max - c.len();
        if p.len() > room {
            let cut = p.len() - room;
            p.drain(1..1 + cut);
        }
    }
    let plen = p.len();
    p.extend(c);
    (p, plen)
}

/// Inputs `[B, T]` and next-token targets `[B, T]` (-100 on prompt and padding).
pub fn lm_batch(seqs: &[(Vec<i64>, usize)], pad: i64) -> (Tensor, Tensor) {
    let t = seqs.iter().map(|s| s.0.len() - 1).max().unwrap_or(1);
    let mut ids = vec![pad; seqs.len() * t];
    let mut tg = vec![-100i64; seqs.len() * t];
    for (r, (s, plen)) in seqs.iter().enumerate() {
        for i in 0..s.len() - 1 {
            ids[r * t + i] = s[i];
            if i + 1 >= *plen {
                tg[r * t + i] = s[i + 1];
            }
        }
    }
    let shape = [seqs.len() as i64, t as i64];
    (Tensor::from_slice(&ids).reshape(shape), Tensor::from_slice(&tg).reshape(shape))
}

/// Mean cross-entropy over the non-masked targets.
pub fn lm_loss(logits: &Tensor, targets: &Tensor) -> Tensor {
    let v = logits.size()[2];
    logits.reshape([-1, v]).cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, tch::Reduction::Mean, -100, 0.0)
}

/// Full sequences `[BOS] prompt response [EOS]` padded into `[N, T]`, and each one's last
/// token index (where the reward model's score is read).
pub fn score_batch(seqs: &[Vec<i64>], pad: i64) -> (Tensor, Tensor) {
    let t = seqs.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = vec![pad; seqs.len() * t];
    for (r, s) in seqs.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
    }
    let last: Vec<i64> = seqs.iter().map(|s| s.len() as i64 - 1).collect();
    (Tensor::from_slice(&ids).reshape([seqs.len() as i64, t as i64]), Tensor::from_slice(&last))
}

/// Scores `[N, T]` read at `last` `[N]`.
pub fn gather_last(scores: &Tensor, last: &Tensor) -> Tensor {
    scores.gather(1, &last.to_device(scores.device()).unsqueeze(1), false).squeeze_dim(1)
}

/// The pairwise ranking loss over chosen (first half) and rejected (second half) rewards.
pub fn rm_loss(r: &Tensor, kind: RmLoss) -> Tensor {
    let b = r.size()[0] / 2;
    let (c, j) = (r.narrow(0, 0, b), r.narrow(0, b, b));
    match kind {
        RmLoss::LogSig => -(c - j).log_sigmoid().mean(Kind::Float),
        RmLoss::LogExp => ((j - c).exp() + 1.0).log().mean(Kind::Float),
    }
}

pub(crate) fn model_config(a: &TrainArgs, tok: &Tokenizer) -> Result<GptConfig> {
    if let Some(init) = &a.init {
        let c = CkptPaths::new(init).read_config()?;
        if c.tokenizer != tok.kind() {
            return Err(HarnessError::Config(format!("--init {}: trained with the {:?} tokenizer, this run uses {:?}", init.display(), c.tokenizer, tok.kind())));
        }
        return Ok(c.model);
    }
    GptConfig::parse(&a.model, tok.vocab(), a.ctx)
}

/// Loads `--init` weights (body; the head too when its kind matches), or resumes.
pub(crate) fn load_start(a: &TrainArgs, e: &mut dyn Engine, head: HeadKind, run: &Path) -> Result<u64> {
    if a.resume {
        let dir = run.join("checkpoint");
        recover_checkpoint(&dir)?;
        return resume_engine(e, &dir, head);
    }
    if let Some(init) = &a.init {
        let p = CkptPaths::new(init);
        let (c, mut w) = p.read_merged()?;
        if c.head != head {
            w.retain(|k, _| !k.starts_with("v_head.") && !k.starts_with("score."));
        }
        // Adapters start fresh (B = 0: the model computes what --init does).
        let body: Vec<&str> = e
            .spec()
            .params
            .iter()
            .filter(|s| (s.unit != crate::model::Unit::Head || s.name.starts_with("ln_f")) && !crate::model::is_adapter(&s.name))
            .map(|s| s.name.as_str())
            .collect();
        if let Some(missing) = body.iter().find(|n| !w.contains_key(**n)) {
            return Err(HarnessError::Checkpoint {
                path: p.model(),
                msg: format!("lacks {missing}"),
            });
        }
        e.import(&w)?;
    }
    Ok(0)
}

fn sft_data(a: &TrainArgs) -> Result<(Vec<SftExample>, Vec<SftExample>, Option<Task>)> {
    match (&a.task, &a.data) {
        (Some(t), None) => Ok((t.sft(a.train_size, a.seed, false, a.corrupt), t.sft(a.eval_size, a.seed, true, 0.0), Some(*t))),
        (None, Some(d)) => {
            let mut train: Vec<SftExample> = load_jsonl(d)?;
            let eval = match &a.eval_data {
                Some(e) => load_jsonl(e)?,
                None => split_tail(&mut train, d)?,
            };
            Ok((train, eval, None))
        }
        _ => Err(HarnessError::Config("give exactly one of --task NAME and --data FILE".into())),
    }
}

pub(crate) fn split_tail<T>(train: &mut Vec<T>, d: &Path) -> Result<Vec<T>> {
    let n = train.len() / 10;
    if n == 0 {
        return Err(HarnessError::Config(format!("{}: too few records to hold out 10%; give --eval-data", d.display())));
    }
    Ok(train.split_off(train.len() - n))
}

/// Exact-match rate of greedy completions, and the samples.
pub fn eval_exact_match(e: &mut dyn Engine, tok: &Tokenizer, eval: &[SftExample], task: Option<Task>) -> Result<(f64, Vec<Value>)> {
    let ctx = e.spec().cfg.n_ctx;
    let prompts: Vec<Vec<i64>> = eval.iter().map(|x| encode_pair(tok, &x.prompt, "", ctx).0[..].split_last().map(|(_, p)| p.to_vec()).unwrap_or_default()).collect();
    let max_new = eval.iter().map(|x| tok.encode(&x.completion).len() + 1).max().unwrap_or(1) + 2;
    let mut rng = <ChaCha8Rng as SeedableRng>::seed_from_u64(0);
    let gen = generate(e, &prompts, max_new, tok.eos(), tok.pad(), Sampler::Greedy, &mut rng)?;
    let mut hits = 0usize;
    let mut samples = Vec::new();
    for (x, g) in eval.iter().zip(&gen) {
        let text = tok.decode(&g.tokens);
        if g.ended && text == x.completion {
            hits += 1;
        }
        let mut s = json!({"prompt": x.prompt, "response": text, "expected": x.completion});
        if let Some(t) = task {
            s["gold_reward"] = json!(t.reward(&x.prompt, &text, g.ended));
        }
        samples.push(s);
    }
    Ok((hits as f64 / eval.len().max(1) as f64, samples))
}

/// A training batch: inputs on the engine's device and the loss over the model's output.
pub(crate) type Batch = (Tensor, Box<dyn Fn(&Tensor) -> Tensor>);

/// Measures a stage's held-out metric (told whether this is the final evaluation).
pub(crate) type Measure<'a> = Box<dyn FnMut(&mut dyn Engine, bool) -> Result<f64> + 'a>;

/// What the shared loop needs from a stage: its name in the log, the training set's size, how
/// to build a batch from example indices, and its held-out metric's key, label and measure.
pub(crate) struct Stage<'a> {
    pub name: &'static str,
    pub n: usize,
    pub batch: &'a dyn Fn(&[usize]) -> Batch,
    pub key: &'static str,
    pub label: &'static str,
    pub measure: Measure<'a>,
}

/// The loop SFT and the reward model share: batches keyed by (seed, step) so `--resume` replays
/// exactly, the LR schedule, metrics and progress, evaluation every `--eval-every` steps and at
/// the end, checkpoints every `--save-every` steps and where the run stops. A run with nothing
/// left to train evaluates once and saves its checkpoint if it has none (`--steps 0` exports the
/// initial model). Returns the last loss and the last evaluation.
pub(crate) fn train_loop(a: &TrainArgs, e: &mut dyn Engine, tok: &Tokenizer, run: &mut Run, start: u64, mut st: Stage<'_>) -> Result<(f64, Option<f64>)> {
    let mut last_loss = f64::NAN;
    let mut metric = None;
    run.bar.set_position(start);
    let mut tokens = 0u64;
    let t0 = Instant::now();
    let end = a.stop_at.map_or(a.steps, |s| s.min(a.steps));
    for step in start..end {
        let (ids, loss) = (st.batch)(&batch_indices(a.seed, step, st.n, a.batch_size));
        tokens += ids.numel() as u64;
        let lr = lr_at(a.lr, step, a.steps);
        e.set_lr(lr);
        let stats = e.step(&ids.to_device(e.device()), &*loss)?;
        last_loss = stats.loss;
        let tps = tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        run.log(json!({"stage": st.name, "step": step + 1, "loss": stats.loss, "grad_norm": stats.grad_norm, "skipped": stats.skipped, "lr": lr, "tokens_per_s": tps, "elapsed_s": run.started.elapsed().as_secs_f64()}))?;
        run.bar.set_message(format!("loss {:.4} | {:.0} tok/s | {}", stats.loss, tps, tiers_line(e)));
        run.bar.inc(1);
        let done = step + 1 == a.steps;
        if (a.eval_every > 0 && (step + 1) % a.eval_every == 0) || done {
            let r = (st.measure)(e, done)?;
            run.log(json!({"stage": st.name, "step": step + 1, st.key: r}))?;
            run.say(format!("step {}: {} {:.3}", step + 1, st.label, r));
            metric = Some(r);
        }
        if (a.save_every > 0 && (step + 1) % a.save_every == 0) || step + 1 == end {
            save_checkpoint(e, &a.out.join("checkpoint"), tok.kind(), a.seed)?;
        }
    }
    if start >= end {
        metric = Some((st.measure)(e, true)?);
        if !CkptPaths::new(a.out.join("checkpoint")).model().exists() {
            save_checkpoint(e, &a.out.join("checkpoint"), tok.kind(), a.seed)?;
        }
    }
    if end == a.steps {
        save_merged(e, &a.out.join("merged"), tok.kind(), a.seed)?;
    }
    run.bar.finish_and_clear();
    Ok((last_loss, metric))
}

/// The end of an SFT or RM run: its report section (returned), the memory figures and trace,
/// and the charts.
pub(crate) fn finish_stage(a: &TrainArgs, e: &dyn Engine, run: &Run, name: &str, key: &str, loss: f64, metric: Option<f64>) -> Result<Value> {
    let section = json!({"final_loss": loss, key: metric.unwrap_or(0.0), "steps": a.steps, "seconds": run.started.elapsed().as_secs_f64(), "strategy": format!("{:?}", a.strategy).to_lowercase(), "model": e.spec().cfg.name, "params": e.spec().numel(), "trainable_params": e.spec().trainable_numel()});
    e.settle()?;
    let mut mem = memory_json(e);
    mem["transfer_hidden_share"] = json!(write_trace(a, &[(name, e)], run)?);
    update_report(&a.out, name, section.clone(), mem)?;
    run.charts();
    Ok(section)
}

/// `stowage sft`: returns the report section.
pub fn run_sft(a: &TrainArgs) -> Result<Value> {
    let tok = Tokenizer::new(a.tokenizer)?;
    let (train, eval, task) = sft_data(a)?;
    let cfg = model_config(a, &tok)?;
    let mut notes: Vec<String> = lora_note(a).into_iter().collect();
    let mut e = build_engine(a, cfg, HeadKind::Lm, &mut notes)?;
    let start = load_start(a, e.as_mut(), HeadKind::Lm, &a.out)?;
    let mut run = Run::open(&a.out, a.steps, a.quiet, "sft")?;
    for n in &notes {
        run.say(format!("note: {n}"));
    }
    let ctx = e.spec().cfg.n_ctx;
    let encoded: Vec<(Vec<i64>, usize)> = train.iter().map(|x| encode_pair(&tok, &x.prompt, &x.completion, ctx)).collect();
    let dev = e.device();
    let batch = |idx: &[usize]| -> Batch {
        let seqs: Vec<(Vec<i64>, usize)> = idx.iter().map(|&i| encoded[i].clone()).collect();
        let (ids, tg) = lm_batch(&seqs, tok.pad());
        let tg = tg.to_device(dev);
        (ids, Box::new(move |out: &Tensor| lm_loss(out, &tg)))
    };
    let samples_path = a.out.join("sft_samples.jsonl");
    let measure = |e: &mut dyn Engine, last: bool| -> Result<f64> {
        let (rate, samples) = eval_exact_match(e, &tok, &eval, task)?;
        if last {
            crate::data::save_jsonl(&samples_path, &samples)?;
        }
        Ok(rate)
    };
    let stage = Stage {
        name: "sft",
        n: encoded.len(),
        batch: &batch,
        key: "heldout_exact_match",
        label: "held-out exact match",
        measure: Box::new(measure),
    };
    let (loss, em) = train_loop(a, e.as_mut(), &tok, &mut run, start, stage)?;
    finish_stage(a, e.as_ref(), &run, "sft", "heldout_exact_match", loss, em)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("lots").unwrap_err().contains("not a size"));
    }

    #[test]
    fn lm_batches_mask_prompts_and_padding() {
        let tok = Tokenizer::new(TokenizerKind::Byte).unwrap();
        let a = encode_pair(&tok, "ab", "c", 64);
        assert_eq!(a, (vec![257, 97, 98, 99, 258], 3));
        let b = encode_pair(&tok, "a", "cd", 64);
        let (ids, tg) = lm_batch(&[a, b], tok.pad());
        assert_eq!(Vec::<i64>::try_from(&ids.reshape([-1])).unwrap(), vec![257, 97, 98, 99, 257, 97, 99, 100]);
        assert_eq!(Vec::<i64>::try_from(&tg.reshape([-1])).unwrap(), vec![-100, -100, 99, 258, -100, 99, 100, 258]);
    }

    #[test]
    fn long_examples_fit_the_context() {
        let tok = Tokenizer::new(TokenizerKind::Byte).unwrap();
        let (s, plen) = encode_pair(&tok, &"p".repeat(100), &"c".repeat(10), 32);
        assert_eq!(s.len(), 33);
        assert_eq!(s[0], tok.bos());
        assert_eq!(*s.last().unwrap(), tok.eos());
        assert_eq!(s.len() - plen, 11, "the completion and EOS survive");
        let (s, _) = encode_pair(&tok, "p", &"c".repeat(100), 32);
        assert_eq!(s.len(), 33);
    }

    #[test]
    fn scores_are_read_at_the_last_real_token() {
        let s = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let (_, last) = score_batch(&[vec![1, 2], vec![1, 2, 3]], 0);
        assert_eq!(Vec::<f32>::try_from(&gather_last(&s, &last)).unwrap(), vec![2.0, 6.0]);
        let r = Tensor::from_slice(&[2.0f32, 0.0]);
        let a = rm_loss(&r, RmLoss::LogSig).double_value(&[]);
        let b = rm_loss(&r, RmLoss::LogExp).double_value(&[]);
        assert!((a - (1.0 + (-2.0f64).exp()).ln()).abs() < 1e-6 && (a - b).abs() < 1e-6);
    }

    #[test]
    fn batches_depend_on_seed_and_step_only() {
        assert_eq!(batch_indices(1, 5, 100, 8), batch_indices(1, 5, 100, 8));
        assert_ne!(batch_indices(1, 5, 100, 8), batch_indices(1, 6, 100, 8));
        assert_ne!(batch_indices(1, 5, 100, 8), batch_indices(2, 5, 100, 8));
    }

}
