//! The child side of `stowage bench capacity` (`stowage bench-run`, hidden): sizes the chunk
//! budgets from what the budget leaves after libtorch and the activations, builds the models,
//! runs the steps on random tokens and writes the run's JSON (times, tokens, bytes moved, the
//! share of transfer time hidden under compute).

use std::time::Instant;

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use super::{check_lengths, median, rss_of, status_field, step_flops, RunArgs, StepTokens, Workload};
use crate::engine::{Engine, ModelSpec};
use crate::error::{HarnessError, Result};
use crate::model::{GptConfig, HeadKind};
use crate::ppo::Models;
use crate::tokenizer::Tokenizer;
use crate::train::{DeviceArg, Strategy, TrainArgs};

/// Bytes of activations a step keeps alive at its peak, estimated for fp32 (Megatron-LM's
/// per-layer count doubled for 4-byte values): all layers for the naive strategy, one layer
/// plus every layer's input for the chunked one; logits and their gradient on top, and the
/// generation's key/value cache for PPO.
pub fn activation_bytes(cfg: &GptConfig, w: Workload, strategy: Strategy, batch: usize) -> u64 {
    let (l, d, h, t, v) = (cfg.n_layer as u64, cfg.n_embd as u64, cfg.n_head as u64, cfg.n_ctx as u64, cfg.vocab as u64);
    let rows = match w {
        Workload::Rm => 2 * batch as u64,
        _ => batch as u64,
    };
    let n = rows * t;
    let layer = 2 * n * (34 * d + 5 * h * t);
    let logits = 3 * 4 * n * v;
    let body = match strategy {
        Strategy::Naive => l * layer,
        Strategy::Chunked => layer + 4 * l * n * d,
    };
    let kv = if w == Workload::Ppo { 2 * 4 * l * n * d } else { 0 };
    // The chunked strategy's backward pass also holds one block's parameter gradients as
    // autograd returns them, before they are copied into their chunks.
    let grads = match strategy {
        Strategy::Naive => 0,
        Strategy::Chunked => 4 * (12 * d * d + 13 * d),
    };
    body + logits + kv + grads
}

fn random_tokens(rows: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    tch::manual_seed(seed as i64);
    Tensor::randint_low(3, vocab as i64, [rows as i64, t as i64], (Kind::Int64, tch::Device::Cpu))
}

/// The engines of one run.
enum Job {
    One(Box<dyn Engine>),
    Ppo(Box<Models>),
}

impl Job {
    fn engines(&self) -> Vec<&dyn Engine> {
        match self {
            Job::One(e) => vec![e.as_ref()],
            Job::Ppo(m) => m.named().into_iter().map(|(_, e)| e).collect(),
        }
    }
}

/// Whether libtorch computes on CUDA for these options.
fn on_cuda(a: &TrainArgs) -> bool {
    a.device != DeviceArg::Sim && tch::Cuda::is_available()
}

/// Takes all of GPU 0 but `budget` bytes (and what libtorch needs to start): the returned
/// tensor must live as long as the run.
fn ballast(budget: u64) -> Result<(Tensor, u64)> {
    // Start libtorch's CUDA context first, so its own footprint is already gone from `free`.
    let _ = Tensor::zeros([1], (Kind::Uint8, tch::Device::Cuda(0)));
    let (free, total) = stowage_memory::device::cuda_memory(0)?;
    if free <= budget {
        return Err(HarnessError::Config(format!(
            "--budget {}: the GPU has only {} free of {}",
            crate::engine::chunked::human(budget),
            crate::engine::chunked::human(free),
            crate::engine::chunked::human(total)
        )));
    }
    let n = free - budget;
    let t = Tensor::empty([n as i64], (Kind::Uint8, tch::Device::Cuda(0)));
    Ok((t, total))
}

/// The child: builds the models, runs the steps, writes the result JSON.
pub fn run_child(c: &RunArgs) -> Result<Value> {
    let mut a = c.train.clone();
    check_lengths(c.workload, a.ctx, a.batch_size)?;
    let tok = Tokenizer::new(a.tokenizer)?;
    let cfg = GptConfig::parse(&a.model, tok.vocab(), a.ctx)?;
    let cuda = on_cuda(&a);
    // libtorch starts before the baseline is read.
    let _ = Tensor::zeros([1], (Kind::Float, tch::Device::Cpu));
    let held = if cuda { Some(ballast(c.budget)?) } else { None };
    let baseline = rss_of(std::process::id()).unwrap_or(0);
    let mut act = activation_bytes(&cfg, c.workload, a.strategy, a.batch_size);
    if a.strategy == Strategy::Chunked && a.device_budget.is_none() {
        // Allocator slack, partly filled arenas, libtorch's temporaries: measured at 0.5-0.9
        // GiB over the chunk budgets and activations on a 4 GiB PPO run, and growing with the
        // activations (half of them on top: with 16 prompts a 31x1536 PPO went over 4 GiB
        // without, and peaked at 3.99 GiB with a quarter).
        let margin = c.budget / 8 + (64 << 20) + act / 2;
        let base = if cuda { 0 } else { baseline };
        // On a CPU the device and host tiers share the budget half and half. Keep mode (no
        // recompute) needs every parameter chunk of a trainable model on the device and the
        // naive strategy's activations: take it where both fit, else recompute.
        let dev_share = |chunks: u64| if cuda { chunks } else { chunks / 2 };
        // PPO's models have a third of the budget each, unless they take turns with all of it.
        let actor_params = ModelSpec::new(cfg.clone(), HeadKind::Lm).numel() * a.compute_dtype().size() as u64;
        let fixed = !a.budget_split.turns(actor_params, c.budget.saturating_sub(base + margin));
        let trainable_share = if c.workload == Workload::Ppo && fixed { 1.0 / 3.0 } else { 1.0 };
        let act_keep = activation_bytes(&cfg, c.workload, Strategy::Naive, a.batch_size);
        let dsize = a.compute_dtype().size() as u64;
        let block = 12 * (cfg.n_embd as u64).pow(2) + 13 * cfg.n_embd as u64;
        let keep_needs = (ModelSpec::new(cfg.clone(), HeadKind::Lm).numel() * dsize + 2 * block * dsize) * 5 / 4;
        let keep_room = c.budget.saturating_sub(base + act_keep + margin);
        let keep = !a.recompute && (dev_share(keep_room) as f64 * trainable_share) as u64 >= keep_needs;
        if keep {
            act = act_keep;
        } else {
            a.recompute = true;
        }
        let chunks = c.budget.checked_sub(base + act + margin).filter(|&x| x > 0).ok_or_else(|| no_room(c.budget, base, act, margin))?;
        a.device_budget = Some(dev_share(chunks));
        if !cuda {
            a.host_budget = Some(chunks - chunks / 2);
        }
    }
    if a.strategy == Strategy::Chunked {
        // The timeline gives the share of transfer time hidden under compute.
        a.trace = Some(a.out.join("trace.json"));
    }
    let mut notes = Vec::new();
    let mut job = match c.workload {
        Workload::Sft => Job::One(crate::train::build_engine(&a, cfg.clone(), HeadKind::Lm, &mut notes)?),
        Workload::Rm => Job::One(crate::train::build_engine(&a, cfg.clone(), HeadKind::Score, &mut notes)?),
        Workload::Ppo => Job::Ppo(Box::new(crate::ppo::new_models(&a, c.ppo.critic_lr, [&cfg, &cfg, &cfg], &mut notes)?)),
    };
    eprintln!("models built: resident {}; {}", rss_line(), tiers_line(&job));
    // The timeline (and the hidden share) covers the training steps, not initialisation.
    for e in job.engines() {
        e.reset_trace();
    }
    let params: u64 = ModelSpec::new(cfg.clone(), HeadKind::Lm).numel();
    let params_total: u64 = job.engines().iter().map(|e| e.spec().numel()).sum();
    let mut times = Vec::new();
    let mut tokens = StepTokens::default();
    let mut norm = crate::ppo::algo::RunningMoments::default();
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(a.seed);
    let mut gpu_peak = 0u64;
    // PPO phases in the trace's time base: experience (generation and the four models'
    // forward passes) and update.
    let mut windows: Vec<(&'static str, f64, f64)> = Vec::new();
    // The steady state, in the same time base: from the second step on (the first, with one),
    // to the end of the last step's own work.
    let mut steady = (0.0, 0.0);
    for s in 0..a.steps {
        if s == 1.min(a.steps - 1) {
            steady.0 = stowage_memory::manager::trace::now_us();
        }
        let t0 = Instant::now();
        tokens = step(&mut job, c, &a, &tok, s, &mut norm, &mut rng, &mut windows)?;
        if s + 1 == a.steps {
            steady.1 = stowage_memory::manager::trace::now_us();
            // The last step's time includes the updates it left running in the background
            // (an earlier step's run on under the next step's work).
            for e in job.engines() {
                e.settle()?;
            }
        }
        times.push(t0.elapsed().as_secs_f64());
        if let Some((_, total)) = &held {
            let (free, _) = stowage_memory::device::cuda_memory(0)?;
            gpu_peak = gpu_peak.max(total - free);
        }
        eprintln!("step {} of {}: {:.2} s; resident {}; {}", s + 1, a.steps, times[times.len() - 1], rss_line(), tiers_line(&job));
    }
    let timed: Vec<f64> = if times.len() > 1 { times[1..].to_vec() } else { times.clone() };
    let step_s = median(&timed);
    let mut moved = std::collections::BTreeMap::<String, u64>::new();
    for e in job.engines() {
        for (k, v) in e.memory().bytes_moved {
            *moved.entry(k).or_default() += v;
        }
    }
    let named: Vec<(&str, &dyn Engine)> = match &job {
        Job::Ppo(m) => m.named(),
        Job::One(e) => vec![(c.workload.name(), e.as_ref())],
    };
    let mut phases = serde_json::Map::new();
    let mut steady_share = None;
    let hidden = match (crate::train::merged_trace(&named), &a.trace) {
        (Some((t, o)), Some(path)) => {
            let events = t["traceEvents"].as_array().cloned().unwrap_or_default();
            for phase in ["experience", "update"] {
                let mut sum = stowage_memory::manager::trace::Overlap::default();
                for &(_, from, to) in windows.iter().filter(|w| w.0 == phase) {
                    sum = sum + crate::train::trace_overlap(&events, from, to);
                }
                if sum.transfer_us > 0.0 {
                    phases.insert(phase.into(), json!({"transfer_s": sum.transfer_us / 1e6, "hidden_share": sum.share()}));
                }
            }
            steady_share = crate::train::trace_overlap(&events, steady.0, steady.1).share();
            std::fs::create_dir_all(&a.out).map_err(|e| HarnessError::io("creating", &a.out, e))?;
            crate::ckpt::write_atomic(path, &serde_json::to_vec(&t).map_err(|e| HarnessError::Config(e.to_string()))?)?;
            o.share()
        }
        _ => None,
    };
    let peak = match &held {
        Some((b, _)) => gpu_peak.saturating_sub(b.numel() as u64),
        None => crate::train::peak_rss_bytes(),
    };
    let tok_per_step = (tokens.trained + tokens.generated) as f64;
    let out = json!({
        "params": params,
        "params_total": params_total,
        "peak_bytes": peak,
        "baseline_rss_bytes": baseline,
        "activation_estimate_bytes": act,
        "recompute": a.recompute,
        "device_budget": a.device_budget,
        "host_budget": a.host_budget,
        "step_s": step_s,
        "steps_s": times,
        "tokens_per_s": tok_per_step / step_s.max(1e-12),
        "flops_per_s": step_flops(c.workload, params, &tokens) / step_s.max(1e-12),
        "bytes_moved": moved,
        "transfer_hidden_share": hidden,
        "steady_hidden_share": steady_share,
        "hidden_by_phase": phases,
        "notes": notes,
    });
    crate::ckpt::write_atomic(&c.result, out.to_string().as_bytes())?;
    Ok(out)
}

fn rss_line() -> String {
    let me = "/proc/self/status";
    let g = |k| status_field(me, k).map_or("?".into(), crate::engine::chunked::human);
    format!("{} (peak {})", g("VmRSS:"), g("VmHWM:"))
}

/// Chunk bytes in use per tier over the run's models.
fn tiers_line(job: &Job) -> String {
    let mut used = std::collections::BTreeMap::<String, u64>::new();
    for e in job.engines() {
        for (k, v) in e.memory().tiers {
            *used.entry(k).or_default() += v["used"].as_u64().unwrap_or(0);
        }
    }
    used.iter().map(|(k, v)| format!("{k} {}", crate::engine::chunked::human(*v))).collect::<Vec<_>>().join(", ")
}

fn no_room(budget: u64, baseline: u64, act: u64, margin: u64) -> HarnessError {
    use crate::engine::chunked::human;
    HarnessError::Config(format!(
        "budget {}: libtorch's own footprint ({}), the activations ({}, estimated) and a margin ({}) leave nothing for chunks; use a larger --budget or a smaller --batch-size/--ctx",
        human(budget),
        human(baseline),
        human(act),
        human(margin)
    ))
}

/// One step of the workload on random tokens.
#[allow(clippy::too_many_arguments)]
fn step(job: &mut Job, c: &RunArgs, a: &TrainArgs, tok: &Tokenizer, s: u64, norm: &mut crate::ppo::algo::RunningMoments, rng: &mut rand_chacha::ChaCha8Rng, windows: &mut Vec<(&'static str, f64, f64)>) -> Result<StepTokens> {
    let (b, t) = (a.batch_size, a.ctx);
    let vocab = tok.vocab();
    match job {
        Job::One(e) => {
            let dev = e.device();
            if c.workload == Workload::Sft {
                let ids = random_tokens(b, t, vocab, a.seed + s);
                let tg = Tensor::cat(&[ids.narrow(1, 1, t as i64 - 1), Tensor::full([b as i64, 1], -100, (Kind::Int64, tch::Device::Cpu))], 1).to_device(dev);
                e.step(&ids, &|out: &Tensor| crate::train::lm_loss(out, &tg))?;
                Ok(StepTokens { trained: (b * t) as u64, generated: 0 })
            } else {
                let ids = random_tokens(2 * b, t, vocab, a.seed + s);
                let last = Tensor::full([2 * b as i64], t as i64 - 1, (Kind::Int64, tch::Device::Cpu));
                e.step(&ids, &|out: &Tensor| crate::train::rm_loss(&crate::train::gather_last(out, &last), crate::train::RmLoss::LogSig))?;
                Ok(StepTokens { trained: (2 * b * t) as u64, generated: 0 })
            }
        }
        Job::Ppo(m) => {
            use rand::Rng;
            let new = c.ppo.max_new.min(t.saturating_sub(2)).max(1);
            let plen = t - new - 1;
            let prompts: Vec<String> = (0..b).map(|_| (0..plen).map(|_| char::from(b'a' + rng.gen_range(0..26u8))).collect()).collect();
            let t0 = stowage_memory::manager::trace::now_us();
            let x = crate::ppo::collect(m, tok, &c.ppo, &prompts, c.ppo.kl_coef, norm, rng)?;
            let t1 = stowage_memory::manager::trace::now_us();
            crate::ppo::update_epochs(m, &x, &c.ppo, rng, &mut |_, _| None, true)?;
            windows.push(("experience", t0, t1));
            windows.push(("update", t1, stowage_memory::manager::trace::now_us()));
            let seq = x.ids.size()[1] as u64;
            let passes = (c.ppo.ppo_epochs.max(1)) as u64;
            Ok(StepTokens {
                trained: b as u64 * seq * passes,
                generated: b as u64 * (plen as u64 + 1) + x.lens.iter().sum::<usize>() as u64,
            })
        }
    }
}
