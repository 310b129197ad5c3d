//! The PPO loop as commands: `stowage ppo` (checkpoints, resume, metrics, report, charts) and
//! `stowage pipeline` (SFT, reward model, PPO).

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use super::algo::{self, KlController};
use super::{build_models, collect, gold_eval, mean, std, update_epochs, MbStats, Models, PpoArgs, PtxBatch};
use crate::data::{load_jsonl, PromptExample, SftExample};
use crate::error::{HarnessError, Result};
use crate::model::HeadKind;
use crate::tokenizer::Tokenizer;
use crate::train::{batch_indices, encode_pair, lm_batch, lr_at, memory_json, update_report, Run, TrainArgs};

/// Stage lengths of `stowage pipeline`.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    #[arg(long, default_value_t = 400)]
    pub sft_steps: u64,
    #[arg(long, default_value_t = 400)]
    pub rm_steps: u64,
    #[arg(long, default_value_t = 40)]
    pub ppo_steps: u64,
    /// PPO actor learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub ppo_lr: f32,
    /// SFT data for user runs (`--data` then holds PPO prompts): `{"prompt","completion"}`.
    #[arg(long)]
    pub sft_data: Option<PathBuf>,
    /// Preference data for user runs: `{"prompt","chosen","rejected"}`.
    #[arg(long)]
    pub rm_data: Option<PathBuf>,
    /// Built-in tasks: train the reward model on synthetic pairs (the answer against edits of
    /// it) instead of pairs sampled from the SFT model and ranked by the gold reward.
    #[arg(long)]
    pub synthetic_pairs: bool,
    /// Built-in tasks: prompts whose SFT samples make the reward model's training pairs.
    #[arg(long, default_value_t = 4096)]
    pub pairs_prompts: usize,
    /// The reward model's (and so the critic's) size, when it differs from the policy's
    /// `--model` (InstructGPT paired a 6B reward model with its policies).
    #[arg(long)]
    pub rm_model: Option<String>,
    /// Where the reward model starts: `sft`, the SFT model's weights with a new score head (as
    /// InstructGPT's did: it knows the task before it learns to judge), or `random`. A reward
    /// model of another size (`--rm-model`) starts at random.
    #[arg(long, value_enum, default_value_t = RmInit::Sft)]
    pub rm_init: RmInit,
    /// The reward model's learning rate. Default: 3e-4 when it starts from the SFT model (a
    /// fine-tune: larger rates wash out what it knows), --lr when it starts at random.
    #[arg(long)]
    pub rm_lr: Option<f32>,
}

/// The reward model's starting weights in `stowage pipeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RmInit {
    Sft,
    Random,
}

/// `stowage pipeline`: SFT, then the reward model, then PPO, each in `OUT/<stage>`, the report
/// in `OUT/report.json`.
pub fn run_pipeline(a: &TrainArgs, l: &PipelineArgs, p: &PpoArgs) -> Result<Value> {
    if a.task.is_none() && (l.sft_data.is_none() || l.rm_data.is_none() || a.data.is_none()) {
        return Err(HarnessError::Config("give --task NAME, or --sft-data, --rm-data and --data (PPO prompts)".into()));
    }
    let stage = |name: &str, steps: u64, data: Option<PathBuf>| {
        let mut x = a.clone();
        x.out = a.out.join(name);
        x.steps = steps;
        x.trace = a.trace.as_ref().map(|t| {
            let stem = t.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "trace".into());
            t.with_file_name(format!("{stem}-{name}.json"))
        });
        if a.task.is_none() {
            x.data = data;
            x.eval_data = None;
        }
        x
    };
    let mut sft = stage("sft", l.sft_steps, l.sft_data.clone());
    sft.eval_every = 0;
    let s = crate::train::run_sft(&sft)?;
    let mut rm = stage("rm", l.rm_steps, l.rm_data.clone());
    rm.eval_every = 0;
    rm.corrupt = 0.0;
    if let Some(m) = &l.rm_model {
        rm.model = m.clone();
    }
    // The same size however it is spelt (`tiny` or `4x128x4`).
    let same_size = rm.model == a.model || {
        let vocab = Tokenizer::new(a.tokenizer)?.vocab();
        let dims = |m: &str| crate::model::GptConfig::parse(m, vocab, a.ctx).ok().map(|c| (c.n_layer, c.n_embd, c.n_head));
        dims(&rm.model).is_some() && dims(&rm.model) == dims(&a.model)
    };
    if l.rm_init == RmInit::Sft && !same_size {
        eprintln!("note: the reward model ({}) is not the policy's size ({}): it starts from random weights", rm.model, a.model);
    }
    let from_sft = l.rm_init == RmInit::Sft && same_size;
    rm.init = from_sft.then(|| sft.out.join("checkpoint"));
    rm.lr = l.rm_lr.unwrap_or(if from_sft { 3e-4 } else { a.lr });
    // The reward model learns from the SFT model's own samples ranked by the gold reward (the
    // distribution PPO starts from, sampled as PPO samples), unless told otherwise.
    let pairs = crate::train::PairArgs {
        pairs_from: (a.task.is_some() && !l.synthetic_pairs).then(|| sft.out.join("checkpoint")),
        pairs_prompts: l.pairs_prompts,
        pairs_temperature: p.temperature,
        pairs_max_new: p.max_new,
        ..Default::default()
    };
    let r = crate::train::run_rm(&rm, crate::train::RmLoss::LogSig, &pairs)?;
    let mut ppo = stage("ppo", l.ppo_steps, a.data.clone());
    ppo.lr = l.ppo_lr;
    ppo.eval_every = 0;
    let mut pp = p.clone();
    pp.actor = Some(sft.out.join("checkpoint"));
    pp.reward_model = Some(rm.out.join("checkpoint"));
    if pp.ptx_data.is_none() && a.task.is_none() {
        pp.ptx_data = l.sft_data.clone();
    }
    let o = run_ppo(&ppo, &pp)?;
    let mem: Value = std::fs::read_to_string(ppo.out.join("report.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|v| v["memory"].clone())
        .unwrap_or(Value::Null);
    for (k, v) in [("sft", &s), ("rm", &r), ("ppo", &o)] {
        update_report(&a.out, k, v.clone(), mem.clone())?;
    }
    std::fs::copy(ppo.out.join("samples.jsonl"), a.out.join("samples.jsonl")).map_err(|e| HarnessError::io("copying samples to", a.out.join("samples.jsonl"), e))?;
    // The stages' metrics in one file (each line names its stage), and charts of all three.
    let mut all = Vec::new();
    for d in [&sft.out, &rm.out, &ppo.out] {
        let f = d.join("metrics.jsonl");
        all.extend(std::fs::read(&f).map_err(|e| HarnessError::io("reading", &f, e))?);
    }
    crate::ckpt::write_atomic(&a.out.join("metrics.jsonl"), &all)?;
    crate::train::draw_charts(&a.out);
    Ok(json!({"sft": s, "rm": r, "ppo": o}))
}

/// The encoded demonstrations of the ptx loss; empty when it is off.
fn ptx_demonstrations(a: &TrainArgs, p: &PpoArgs, tok: &Tokenizer, ctx: usize) -> Result<Vec<(Vec<i64>, usize)>> {
    if p.ptx_coef == 0.0 {
        return Ok(Vec::new());
    }
    if !p.ptx_coef.is_finite() || p.ptx_coef < 0.0 {
        return Err(HarnessError::Config(format!("--ptx-coef {} must be a finite number >= 0", p.ptx_coef)));
    }
    let demos: Vec<SftExample> = match (&p.ptx_data, a.task) {
        (Some(f), _) => load_jsonl(f)?,
        (None, Some(t)) => t.sft(a.train_size, a.seed, false, a.corrupt),
        (None, None) => return Err(HarnessError::Config("--ptx-coef needs demonstrations: give --ptx-data FILE ({\"prompt\",\"completion\"} JSON Lines)".into())),
    };
    if demos.is_empty() {
        return Err(HarnessError::Config("--ptx-coef: the demonstration set is empty".into()));
    }
    Ok(demos.iter().map(|x| encode_pair(tok, &x.prompt, &x.completion, ctx)).collect())
}

/// What a PPO run needs beyond the actor's and critic's checkpoints to carry on exactly where it
/// stopped (`checkpoint/ppo_state.json`; iteration-keyed seeds cover the rest).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PpoState {
    /// Iterations done.
    iteration: u64,
    /// The KL coefficient (moved by the adaptive controller).
    beta: f64,
    /// The running moments that normalise reward-model scores.
    reward_moments: algo::RunningMoments,
    last_kl: f64,
    gold_before: Option<f64>,
}

/// Saves the actor, the critic (weights and optimizer state each) and the loop state as one
/// checkpoint directory, committed together or not at all.
fn save_ppo(m: &mut Models, dir: &std::path::Path, st: &PpoState, tok: crate::tokenizer::TokenizerKind, seed: u64) -> Result<()> {
    let state = serde_json::to_vec_pretty(st).map_err(|e| HarnessError::Config(format!("serialising the PPO state: {e}")))?;
    crate::ckpt::commit_dir(dir, |tmp| {
        for (name, e) in [("actor", &mut m.actor), ("critic", &mut m.critic)] {
            let d = tmp.join(name);
            std::fs::create_dir(&d).map_err(|err| HarnessError::io("creating", &d, err))?;
            crate::train::write_checkpoint_files(e.as_mut(), &d, tok, seed)?;
        }
        crate::ckpt::write_atomic(&tmp.join("ppo_state.json"), &state)
    })
}

/// Loads a PPO checkpoint saved by `save_ppo` into the models; returns the loop state.
fn resume_ppo(m: &mut Models, dir: &std::path::Path) -> Result<PpoState> {
    crate::train::recover_checkpoint(dir)?;
    let path = dir.join("ppo_state.json");
    let bytes = std::fs::read(&path).map_err(|e| HarnessError::io("--resume: reading", &path, e))?;
    let st: PpoState = serde_json::from_slice(&bytes).map_err(|e| HarnessError::Checkpoint {
        path: path.clone(),
        msg: format!("not a PPO state ({e})"),
    })?;
    crate::train::resume_engine(m.actor.as_mut(), &dir.join("actor"), HeadKind::Lm)?;
    crate::train::resume_engine(m.critic.as_mut(), &dir.join("critic"), HeadKind::Value)?;
    Ok(st)
}

/// `stowage ppo`: returns the report section.
pub fn run_ppo(a: &TrainArgs, p: &PpoArgs) -> Result<Value> {
    let mut notes = Vec::new();
    let (mut m, tok) = build_models(a, p, &mut notes)?;
    let (train_prompts, eval_prompts): (Vec<String>, Vec<String>) = match (&a.task, &a.data) {
        (Some(t), None) => (t.prompts(a.train_size, a.seed, false), t.prompts(a.eval_size, a.seed, true)),
        (None, Some(d)) => {
            let v: Vec<PromptExample> = load_jsonl(d)?;
            let e: Vec<PromptExample> = match &a.eval_data {
                Some(e) => load_jsonl(e)?,
                None => Vec::new(),
            };
            (v.into_iter().map(|x| x.prompt).collect(), e.into_iter().map(|x| x.prompt).collect())
        }
        _ => return Err(HarnessError::Config("give exactly one of --task NAME and --data PROMPTS.jsonl".into())),
    };
    let ptx_set = ptx_demonstrations(a, p, &tok, m.actor.spec().cfg.n_ctx)?;
    let mut oracle_args;
    let p = if p.oracle_reward {
        let t = a.task.ok_or_else(|| HarnessError::Config("--oracle-reward needs a built-in --task (its gold reward replaces the reward model)".into()))?;
        oracle_args = p.clone();
        oracle_args.oracle_task = Some(t);
        &oracle_args
    } else {
        p
    };
    let mut run = Run::open(&a.out, a.steps, a.quiet, "ppo")?;
    for n in &notes {
        run.say(format!("note: {n}"));
    }
    let ckpt_dir = a.out.join("checkpoint");
    let mut kl_ctl = KlController::new(p.kl_coef, p.kl_target, p.kl_horizon);
    let mut st = if a.resume {
        let st = resume_ppo(&mut m, &ckpt_dir)?;
        kl_ctl.beta = st.beta;
        run.bar.set_position(st.iteration);
        st
    } else {
        let gold_before = match a.task {
            Some(t) => Some(gold_eval(&mut m, &tok, p, t, &eval_prompts, a.seed)?.0),
            None => None,
        };
        if let Some(g) = gold_before {
            run.log(json!({"stage": "ppo", "step": 0, "gold_reward_heldout": g}))?;
        }
        PpoState {
            iteration: 0,
            beta: kl_ctl.beta,
            reward_moments: algo::RunningMoments::default(),
            last_kl: 0.0,
            gold_before,
        }
    };
    let end = a.stop_at.map_or(a.steps, |s| s.min(a.steps));
    for it in st.iteration..end {
        // Minibatch order keyed by (seed, iteration), so a resumed run draws what it would have.
        let mut rng_rows = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(a.seed ^ 0x9907);
        rng_rows.set_stream(it);
        let t0 = Instant::now();
        let idx = batch_indices(a.seed, it, train_prompts.len(), a.batch_size);
        let prompts: Vec<String> = idx.iter().map(|&i| train_prompts[i].clone()).collect();
        let beta = kl_ctl.beta;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(a.seed ^ 0x5a3b1e);
        rng.set_stream(it);
        let x = collect(&mut m, &tok, p, &prompts, beta, &mut st.reward_moments, &mut rng)?;
        let gen_s = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let lr = lr_at(a.lr, it, a.steps);
        m.actor.set_lr(lr);
        m.critic.set_lr(lr_at(p.critic_lr, it, a.steps));
        let b = x.ids.size()[0];
        let mut ptx = |k: usize, n: usize| {
            // One demonstration minibatch of the same size per PPO minibatch, keyed by
            // (seed, update) so a rerun draws the same ones.
            (!ptx_set.is_empty()).then(|| {
                let idx = batch_indices(a.seed ^ 0x0070_7478, (it << 16) + k as u64, ptx_set.len(), n);
                let seqs: Vec<(Vec<i64>, usize)> = idx.iter().map(|&i| ptx_set[i].clone()).collect();
                let (ids, targets) = lm_batch(&seqs, tok.pad());
                PtxBatch { ids, targets }
            })
        };
        let train_actor = it >= p.critic_warmup;
        let agg = update_epochs(&mut m, &x, p, &mut rng_rows, &mut ptx, train_actor)?;
        let train_s = t1.elapsed().as_secs_f64();
        let kl_mean = mean(&x.kl);
        st.last_kl = kl_mean;
        kl_ctl.update(kl_mean, b as u64);
        let gold: Vec<f64> = match a.task {
            Some(t) => x.texts.iter().zip(&x.ended).map(|((pr, r), e)| t.reward(pr, r, *e)).collect(),
            None => Vec::new(),
        };
        let ev = algo::explained_variance(&x.old_values, &x.returns, &x.mask);
        let avg = |f: fn(&MbStats) -> f64| agg.iter().map(f).sum::<f64>() / agg.len().max(1) as f64;
        let tokens: usize = x.lens.iter().sum::<usize>() + x.ids.numel();
        let mut line = json!({
            "stage": "ppo", "step": it + 1,
            "reward_mean": mean(&x.scores), "reward_std": std(&x.scores),
            "kl": kl_mean, "beta": beta,
            "entropy": avg(|s| s.entropy), "approx_kl": avg(|s| s.approx_kl), "clipfrac": avg(|s| s.clipfrac),
            "policy_loss": avg(|s| s.policy_loss), "value_loss": avg(|s| s.value_loss),
            "ratio_mean": avg(|s| s.ratio_mean),
            "actor_trained": train_actor,
            "explained_variance": ev,
            "response_length": mean(&x.lens.iter().map(|&l| l as f64).collect::<Vec<_>>()),
            "eos_rate": mean(&x.ended.iter().map(|&e| e as u8 as f64).collect::<Vec<_>>()),
            "generation_s": gen_s, "training_s": train_s,
            "tokens_per_s": tokens as f64 / (gen_s + train_s).max(1e-9),
            "memory": {"actor": m.actor.memory().tiers, "critic": m.critic.memory().tiers},
        });
        if !gold.is_empty() {
            line["gold_reward_train"] = json!(mean(&gold));
            line["rm_gold_correlation"] = json!(algo::correlation(&x.scores, &gold));
        }
        if !ptx_set.is_empty() {
            line["ptx_loss"] = json!(avg(|s| s.ptx_loss));
        }
        run.log(line)?;
        run.bar.set_message(format!("reward {:.3} | kl {:.3} | gold {:.3}", mean(&x.scores), kl_mean, mean(&gold)));
        run.bar.inc(1);
        if let Some(t) = a.task {
            if a.eval_every > 0 && (it + 1) % a.eval_every == 0 && it + 1 != a.steps {
                let (g, _) = gold_eval(&mut m, &tok, p, t, &eval_prompts, a.seed)?;
                run.log(json!({"stage": "ppo", "step": it + 1, "gold_reward_heldout": g}))?;
            }
        }
        st.iteration = it + 1;
        st.beta = kl_ctl.beta;
        if (a.save_every > 0 && (it + 1) % a.save_every == 0) || (it + 1 == end && end < a.steps) {
            save_ppo(&mut m, &ckpt_dir, &st, tok.kind(), a.seed)?;
        }
    }
    let gold_before = st.gold_before;
    let last_kl = st.last_kl;
    if st.iteration < a.steps {
        // Stopped early (--stop-at): the checkpoint is saved; `--resume` carries on.
        run.bar.finish_and_clear();
        for (_, e) in m.named() {
            e.settle()?;
        }
        let section = json!({"stopped_at": st.iteration, "steps": a.steps, "gold_reward_before": gold_before, "kl_final": last_kl, "checkpoint": ckpt_dir});
        update_report(&a.out, "ppo", section.clone(), memory_json(m.actor.as_ref()))?;
        return Ok(section);
    }
    let (gold_after, samples) = match a.task {
        Some(t) => {
            let (g, s) = gold_eval(&mut m, &tok, p, t, &eval_prompts, a.seed)?;
            (Some(g), s)
        }
        None => (None, Vec::new()),
    };
    if let Some(g) = gold_after {
        run.log(json!({"stage": "ppo", "step": a.steps, "gold_reward_heldout": g}))?;
    }
    crate::data::save_jsonl(&a.out.join("samples.jsonl"), &samples)?;
    crate::train::save_checkpoint(m.actor.as_mut(), &a.out.join("actor"), tok.kind(), a.seed)?;
    crate::train::save_merged(m.actor.as_mut(), &a.out.join("merged"), tok.kind(), a.seed)?;
    run.bar.finish_and_clear();
    let section = json!({
        "gold_reward_before": gold_before, "gold_reward_after": gold_after, "kl_final": last_kl,
        "steps": a.steps, "seconds": run.started.elapsed().as_secs_f64(),
    });
    for (_, e) in m.named() {
        e.settle()?;
    }
    let mut mem = memory_json(m.actor.as_ref());
    let mut moved: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut dev_peak = 0;
    for (_, e) in m.named() {
        let r = e.memory();
        dev_peak += r.device_peak_bytes;
        for (k, v) in r.bytes_moved {
            *moved.entry(k).or_default() += v;
        }
    }
    mem["bytes_moved"] = json!(moved);
    mem["device_peak_bytes"] = json!(dev_peak);
    if let Some(t) = &m.turns {
        // How often a model gave memory back for another (budgets shared, not split).
        mem["budget_turns"] = json!({"releases": t.releases(), "background_updates": t.backgrounds()});
    }
    mem["transfer_hidden_share"] = json!(crate::train::write_trace(a, &m.named(), &run)?);
    update_report(&a.out, "ppo", section.clone(), mem)?;
    run.charts();
    Ok(section)
}
