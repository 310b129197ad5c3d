//! PPO for RLHF: an actor and a critic trained against a frozen reference (the SFT model) and a
//! frozen reward model, with the implementation details that make it work: sampling with a key/
//! value cache, per-token KL penalty with the clipped score added at the last response token,
//! GAE computed backwards, advantage whitening, the clipped surrogate and clipped value loss, and
//! a fixed or adaptive KL coefficient.

pub mod algo;
mod run;

pub use run::{run_pipeline, run_ppo, PipelineArgs, RmInit};

use std::cell::RefCell;
use std::path::PathBuf;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::ckpt::CkptPaths;
use crate::engine::turns::Turns;
use crate::engine::{Engine, ModelSpec, TrainOpts};
use crate::error::{HarnessError, Result};
use crate::generate::{filter_logits, generate, Sampler};
use crate::model::HeadKind;
use crate::tasks::Task;
use crate::tokenizer::Tokenizer;
use crate::train::{build_engine, gather_last, TrainArgs};
use algo::{gae, whiten};

/// PPO options on top of the shared training options (`--steps` counts PPO iterations).
#[derive(Debug, Clone, clap::Args)]
pub struct PpoArgs {
    /// The SFT checkpoint directory: actor and reference (`stowage ppo` needs it).
    #[arg(long)]
    pub actor: Option<PathBuf>,
    /// The reward-model checkpoint directory, also the critic's start unless --critic
    /// (`stowage ppo` needs it).
    #[arg(long)]
    pub reward_model: Option<PathBuf>,
    #[arg(long)]
    pub critic: Option<PathBuf>,
    /// Longest response (tokens).
    #[arg(long, default_value_t = 48)]
    pub max_new: usize,
    /// Sampling temperature (also applied when recomputing log-probabilities).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub top_k: i64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Optimisation epochs over each batch of experience.
    #[arg(long, default_value_t = 2)]
    pub ppo_epochs: usize,
    /// Minibatches per epoch.
    #[arg(long, default_value_t = 2)]
    pub minibatches: usize,
    /// Initial KL coefficient beta.
    #[arg(long, default_value_t = 0.05)]
    pub kl_coef: f64,
    /// Adaptive KL: target per-sequence KL (0: fixed beta).
    #[arg(long, default_value_t = 0.0)]
    pub kl_target: f64,
    #[arg(long, default_value_t = 10000.0)]
    pub kl_horizon: f64,
    #[arg(long, default_value_t = 0.2)]
    pub clip_eps: f64,
    #[arg(long, default_value_t = 0.2)]
    pub value_clip: f64,
    #[arg(long, default_value_t = 1.0)]
    pub gamma: f64,
    #[arg(long, default_value_t = 0.95)]
    pub lam: f64,
    /// Reward-model scores are clipped to +-this (after normalisation).
    #[arg(long, default_value_t = 5.0)]
    pub reward_clip: f64,
    /// Subtracted from the (normalised) score of a response that hit the length limit without
    /// EOS (TRL's `missing_eos_penalty`; 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub missing_eos_penalty: f64,
    /// Normalise reward-model scores by the running mean and std of all scores seen (`false`:
    /// raw scores).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub reward_norm: bool,
    /// Critic learning rate (the actor uses --lr).
    #[arg(long, default_value_t = 5e-4)]
    pub critic_lr: f32,
    /// Iterations at the start in which only the critic learns (the actor and its optimizer
    /// state stay as they are): a fresh value head's errors would otherwise be the first
    /// advantages, which whitening turns into full-size policy steps in random directions.
    #[arg(long, default_value_t = 0)]
    pub critic_warmup: u64,
    /// Samples per held-out prompt when measuring the gold reward.
    #[arg(long, default_value_t = 2)]
    pub eval_samples: usize,
    /// Pretraining mix (InstructGPT's PPO-ptx): adds this times the language-model loss on
    /// demonstrations to the policy loss, one demonstration minibatch per PPO minibatch (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub ptx_coef: f64,
    /// Demonstrations for the ptx loss, `{"prompt","completion"}` JSON Lines (default with a
    /// task: the task's SFT set; in `stowage pipeline`: --sft-data).
    #[arg(long)]
    pub ptx_data: Option<PathBuf>,
    /// Score responses with the built-in task's gold reward instead of the reward model: the
    /// ceiling a perfect reward model would give (an ablation; built-in tasks only).
    #[arg(long)]
    pub oracle_reward: bool,
    /// The task whose gold reward `--oracle-reward` uses (set by `run_ppo`).
    #[arg(skip)]
    pub oracle_task: Option<Task>,
    /// Scores responses with `f(prompt, response, ended)` instead of the reward model (for
    /// embedding code and tests; takes precedence over `oracle_task`).
    #[arg(skip)]
    pub reward_fn: Option<fn(&str, &str, bool) -> f64>,
}

/// One batch of experience.
pub struct Experience {
    /// `[B, T]` sequences `[BOS] prompt response pad...`.
    pub ids: Tensor,
    /// `[B, T-1]`: 1 where position t predicts a response token.
    pub mask: Tensor,
    pub old_logp: Tensor,
    pub old_values: Tensor,
    pub advantages: Tensor,
    pub returns: Tensor,
    /// Per sequence: reward-model score, KL to the reference, response length, ended with EOS.
    pub scores: Vec<f64>,
    pub kl: Vec<f64>,
    pub lens: Vec<usize>,
    pub ended: Vec<bool>,
    pub texts: Vec<(String, String)>,
}

/// Log-probabilities of the next tokens `[B, T-1]` under `logits` `[B, T, V]` at `temperature`.
pub fn token_logp(logits: &Tensor, ids: &Tensor, temperature: f64) -> Tensor {
    let t = logits.size()[1];
    let lp = (logits.narrow(1, 0, t - 1) / temperature).log_softmax(-1, Kind::Float);
    lp.gather(2, &ids.narrow(1, 1, t - 1).unsqueeze(-1), false).squeeze_dim(-1)
}

/// The four models of a PPO run.
pub struct Models {
    pub actor: Box<dyn Engine>,
    pub critic: Box<dyn Engine>,
    /// None when the actor has LoRA adapters: the reference is then the actor with its
    /// adapters switched off (its frozen base is the SFT model), as peft-based trainers do, so
    /// no second copy of the weights is held.
    pub reference: Option<Box<dyn Engine>>,
    pub reward: Box<dyn Engine>,
    /// The budgets the chunked models take turns with, if they share them.
    pub turns: Option<Turns>,
}

impl Models {
    /// The models that exist, by role.
    pub fn named(&self) -> Vec<(&'static str, &dyn Engine)> {
        let mut v: Vec<(&'static str, &dyn Engine)> = vec![("actor", self.actor.as_ref()), ("critic", self.critic.as_ref())];
        if let Some(r) = &self.reference {
            v.push(("reference", r.as_ref()));
        }
        v.push(("reward", self.reward.as_ref()));
        v
    }

    /// The reference policy's output for `ids`.
    fn reference_forward(&mut self, ids: &Tensor) -> Result<Tensor> {
        match &mut self.reference {
            Some(r) => r.forward(ids),
            None => {
                self.actor.set_adapters(false)?;
                let out = self.actor.forward(ids);
                self.actor.set_adapters(true)?;
                out
            }
        }
    }
}

/// Builds and loads the four models from their checkpoints.
pub fn build_models(a: &TrainArgs, p: &PpoArgs, notes: &mut Vec<String>) -> Result<(Models, Tokenizer)> {
    let need = |x: &Option<PathBuf>, what: &str| x.clone().ok_or_else(|| HarnessError::Config(format!("give --{what} DIR (a checkpoint directory)")));
    let (actor_dir, rm_path) = (need(&p.actor, "actor")?, need(&p.reward_model, "reward-model")?);
    let actor_cfg = CkptPaths::new(&actor_dir).read_config()?;
    let rm_dir = p.critic.clone().unwrap_or_else(|| rm_path.clone());
    let rm_cfg = CkptPaths::new(&rm_path).read_config()?;
    let critic_cfg = CkptPaths::new(&rm_dir).read_config()?;
    if rm_cfg.tokenizer != actor_cfg.tokenizer {
        return Err(HarnessError::Config("the reward model and the actor use different tokenizers".into()));
    }
    let tok = Tokenizer::new(actor_cfg.tokenizer)?;
    let mut m = new_models(a, p.critic_lr, [&actor_cfg.model, &critic_cfg.model, &rm_cfg.model], notes)?;
    crate::train::load_weights(m.actor.as_mut(), &actor_dir, actor_cfg.head)?;
    crate::train::load_weights(m.critic.as_mut(), &rm_dir, critic_cfg.head)?;
    if let Some(r) = m.reference.as_mut() {
        crate::train::load_weights(r.as_mut(), &actor_dir, actor_cfg.head)?;
    }
    crate::train::load_weights(m.reward.as_mut(), &rm_path, rm_cfg.head)?;
    Ok((m, tok))
}

/// The four models, freshly initialised, with shapes `[actor and reference, critic, reward]`.
/// Chunked models given budgets divide them as `--budget-split` says: taking turns with all of
/// them (`Turns`: the one at work uses the memory the idle ones give back), or each its fixed
/// share (the trainable ones twice the frozen ones').
pub fn new_models(a: &TrainArgs, critic_lr: f32, cfgs: [&crate::model::GptConfig; 3], notes: &mut Vec<String>) -> Result<Models> {
    let given = a.device_budget.unwrap_or(0) + a.host_budget.unwrap_or(0);
    let actor_params = ModelSpec::new(cfgs[0].clone(), HeadKind::Lm).numel() * a.compute_dtype().size() as u64;
    let take_turns = a.strategy == crate::train::Strategy::Chunked && given > 0 && a.budget_split.turns(actor_params, given);
    // A budget not given is not shared (each model takes its state's worth, as alone).
    let turns = take_turns.then(|| Turns::new(a.device_budget.unwrap_or(u64::MAX / 4), a.host_budget.unwrap_or(u64::MAX / 4)));
    let share = |frac: f64, b: Option<u64>| b.map(|x| if take_turns { x } else { (x as f64 * frac) as u64 });
    let args = |frac: f64| {
        let mut x = a.clone();
        x.device_budget = share(frac, a.device_budget);
        x.host_budget = share(frac, a.host_budget);
        x.turns = turns.clone();
        x.init = None;
        x.resume = false;
        x
    };
    let (ta, tf) = (1.0 / 3.0, 1.0 / 6.0);
    let [actor_cfg, critic_cfg, rm_cfg] = cfgs;
    // A LoRA actor is also the reference (adapters off): it takes the reference's share too.
    let lora = a.lora().is_some();
    let actor = build_engine(&args(if lora { ta + tf } else { ta }), actor_cfg.clone(), HeadKind::Lm, notes)?;
    let mut ca = args(ta);
    ca.lr = critic_lr;
    let critic = build_engine(&ca, critic_cfg.clone(), HeadKind::Value, notes)?;
    let frozen = |x: TrainArgs, cfg: &crate::model::GptConfig, head: HeadKind, notes: &mut Vec<String>| -> Result<Box<dyn Engine>> {
        crate::train::build_engine_with(&x, ModelSpec::new(cfg.clone(), head), TrainOpts::frozen(x.compute_dtype()), notes)
    };
    let reference = if lora { None } else { Some(frozen(args(tf), actor_cfg, HeadKind::Lm, notes)?) };
    let reward = frozen(args(tf), rm_cfg, HeadKind::Score, notes)?;
    Ok(Models { actor, critic, reference, reward, turns })
}

fn pad_rows(rows: &[Vec<i64>], pad: i64) -> Tensor {
    let t = rows.iter().map(Vec::len).max().unwrap_or(1);
    let mut ids = vec![pad; rows.len() * t];
    for (r, s) in rows.iter().enumerate() {
        ids[r * t..r * t + s.len()].copy_from_slice(s);
    }
    Tensor::from_slice(&ids).reshape([rows.len() as i64, t as i64])
}

/// The reward model's input for `seq` (`[BOS] prompt response`): as is when the response ended
/// with EOS, else with EOS appended (in place of the last token when the context is full).
pub fn reward_input(seq: &[i64], ended: bool, eos: i64, n_ctx: usize) -> Vec<i64> {
    let mut s = seq.to_vec();
    if !ended {
        if s.len() < n_ctx {
            s.push(eos);
        } else if let Some(l) = s.last_mut() {
            *l = eos;
        }
    }
    s
}

/// Collects one batch of experience for `prompts`.
pub fn collect(m: &mut Models, tok: &Tokenizer, p: &PpoArgs, prompts: &[String], beta: f64, norm: &mut algo::RunningMoments, rng: &mut impl rand::Rng) -> Result<Experience> {
    let device = m.actor.device();
    let pids: Vec<Vec<i64>> = prompts
        .iter()
        .map(|x| {
            let mut v = vec![tok.bos()];
            v.extend(tok.encode(x));
            v
        })
        .collect();
    let sampler = Sampler::Sample {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
    };
    let resp: Vec<(Vec<i64>, bool)> = generate(m.actor.as_mut(), &pids, p.max_new, tok.eos(), tok.pad(), sampler, rng)?.into_iter().map(|g| (g.tokens, g.ended)).collect();
    let seqs: Vec<Vec<i64>> = pids.iter().zip(&resp).map(|(a, (r, _))| [a.clone(), r.clone()].concat()).collect();
    let ids = pad_rows(&seqs, tok.pad()).to_device(device);
    let (b, t) = (seqs.len(), ids.size()[1] as usize);
    let mut mask = vec![0f32; b * (t - 1)];
    for (r, (pi, (ri, _))) in pids.iter().zip(&resp).enumerate() {
        for k in 0..ri.len() {
            mask[r * (t - 1) + pi.len() - 1 + k] = 1.0;
        }
    }
    let mask = Tensor::from_slice(&mask).reshape([b as i64, (t - 1) as i64]).to_device(device);
    let old_logp = token_logp(&m.actor.forward(&ids)?, &ids, p.temperature) * &mask;
    let ref_logp = token_logp(&m.reference_forward(&ids)?, &ids, p.temperature) * &mask;
    let values = m.critic.forward(&ids)?.narrow(1, 0, (t - 1) as i64) * &mask;
    // The reward model reads each sequence at its last token. It learnt from answers ending in
    // EOS, so a response cut off by the length limit is scored as an answer ending there (EOS
    // appended, or in place of the last token at the context limit, as OpenRLHF does), never at
    // a position it was not trained to score: PPO finds such blind spots and pumps them.
    let rm_seqs: Vec<Vec<i64>> = seqs.iter().zip(&resp).map(|(s, (_, ended))| reward_input(s, *ended, tok.eos(), m.reward.spec().cfg.n_ctx)).collect();
    let last: Vec<i64> = rm_seqs.iter().map(|s| s.len() as i64 - 1).collect();
    let rm_ids = pad_rows(&rm_seqs, tok.pad()).to_device(device);
    let scores = gather_last(&m.reward.forward(&rm_ids)?, &Tensor::from_slice(&last));
    let mut scores: Vec<f64> = Vec::<f64>::try_from(&scores.to_kind(Kind::Double).to_device(tch::Device::Cpu))?;
    if let Some(f) = p.reward_fn {
        scores = prompts.iter().zip(&resp).map(|(pr, (r, e))| f(pr, &tok.decode(r), *e)).collect();
    } else if let Some(t) = p.oracle_task {
        scores = prompts.iter().zip(&resp).map(|(pr, (r, e))| t.reward(pr, &tok.decode(r), *e)).collect();
    }
    if p.reward_norm {
        norm.update(&scores);
    }
    let lp: Vec<f32> = Vec::<f32>::try_from(&old_logp.to_device(tch::Device::Cpu).reshape([-1]))?;
    let rl: Vec<f32> = Vec::<f32>::try_from(&ref_logp.to_device(tch::Device::Cpu).reshape([-1]))?;
    let vals: Vec<f32> = Vec::<f32>::try_from(&values.to_device(tch::Device::Cpu).reshape([-1]))?;
    let mut adv = vec![0f64; b * (t - 1)];
    let mut ret = vec![0f64; b * (t - 1)];
    let mut kl = Vec::with_capacity(b);
    for r in 0..b {
        let start = pids[r].len() - 1;
        let n = resp[r].0.len();
        let row = |v: &[f32]| -> Vec<f64> { (start..start + n).map(|i| v[r * (t - 1) + i] as f64).collect() };
        let (lpr, rlr, vr) = (row(&lp), row(&rl), row(&vals));
        let mut rewards: Vec<f64> = lpr.iter().zip(&rlr).map(|(a, b)| -beta * (a - b)).collect();
        kl.push(lpr.iter().zip(&rlr).map(|(a, b)| a - b).sum());
        if let Some(x) = rewards.last_mut() {
            let s = if p.reward_norm { norm.normalize(scores[r]) } else { scores[r] };
            let s = if resp[r].1 { s } else { s - p.missing_eos_penalty };
            *x += s.clamp(-p.reward_clip, p.reward_clip);
        }
        let (a, rt) = gae(&rewards, &vr, p.gamma, p.lam);
        for k in 0..n {
            adv[r * (t - 1) + start + k] = a[k];
            ret[r * (t - 1) + start + k] = rt[k];
        }
    }
    let m_cpu: Vec<f32> = Vec::<f32>::try_from(&mask.to_device(tch::Device::Cpu).reshape([-1]))?;
    let adv = whiten(&adv, &m_cpu);
    let shape = [b as i64, (t - 1) as i64];
    let to_t = |v: &[f64]| Tensor::from_slice(&v.iter().map(|&x| x as f32).collect::<Vec<_>>()).reshape(shape).to_device(device);
    let texts = prompts.iter().zip(&resp).map(|(pr, (r, _))| (pr.clone(), tok.decode(r))).collect();
    Ok(Experience {
        advantages: to_t(&adv),
        returns: to_t(&ret),
        ids,
        mask,
        old_logp,
        old_values: values,
        scores,
        kl,
        lens: resp.iter().map(|(r, _)| r.len()).collect(),
        ended: resp.iter().map(|(_, e)| *e).collect(),
        texts,
    })
}

/// Statistics of one minibatch update, filled inside the loss closures.
#[derive(Default, Clone, Copy)]
pub(crate) struct MbStats {
    policy_loss: f64,
    value_loss: f64,
    approx_kl: f64,
    clipfrac: f64,
    entropy: f64,
    ratio_mean: f64,
    ptx_loss: f64,
}

/// A demonstration minibatch for the ptx loss: `[N, T]` inputs and targets (-100 where no loss).
pub struct PtxBatch {
    pub ids: Tensor,
    pub targets: Tensor,
}

/// Right-pads `[N, T]` to `[N, t]` with `value`.
fn pad_to(x: &Tensor, t: i64, value: i64) -> Tensor {
    let have = x.size()[1];
    if have == t {
        return x.shallow_clone();
    }
    let n = x.size()[0];
    Tensor::cat(&[x.shallow_clone(), Tensor::full([n, t - have], value, (x.kind(), x.device()))], 1)
}

fn masked_mean(x: &Tensor, m: &Tensor) -> Tensor {
    (x * m).sum(Kind::Float) / m.sum(Kind::Float).clamp_min(1.0)
}

/// PPO losses on one minibatch of rows (and the ptx loss on `ptx`, whose rows join the actor's
/// batch: causal attention keeps rows independent, right padding leaves earlier positions
/// alone); returns statistics.
fn update_minibatch(m: &mut Models, x: &Experience, rows: &Tensor, p: &PpoArgs, ptx: Option<&PtxBatch>, train_actor: bool) -> Result<MbStats> {
    let ids = x.ids.index_select(0, rows);
    let mask = x.mask.index_select(0, rows);
    let old_lp = x.old_logp.index_select(0, rows);
    let adv = x.advantages.index_select(0, rows);
    let ret = x.returns.index_select(0, rows);
    let old_v = x.old_values.index_select(0, rows);
    let stats = RefCell::new(MbStats::default());
    let eps = p.clip_eps;
    let temp = p.temperature;
    let (b, t_ppo) = (ids.size()[0], ids.size()[1]);
    let actor_ids = match ptx {
        Some(d) => {
            let t = t_ppo.max(d.ids.size()[1]);
            Tensor::cat(&[pad_to(&ids, t, 0), pad_to(&d.ids.to_device(ids.device()), t, 0)], 0)
        }
        None => ids.shallow_clone(),
    };
    let ptx_coef = p.ptx_coef;
    let actor_loss = |all: &Tensor| {
        let logits = &all.narrow(0, 0, b).narrow(1, 0, t_ppo);
        let lp = token_logp(logits, &ids, temp);
        let ratio = (&lp - &old_lp).exp();
        let pg1 = -&adv * &ratio;
        let pg2 = -&adv * ratio.clamp(1.0 - eps, 1.0 + eps);
        let loss = masked_mean(&pg1.max_other(&pg2), &mask);
        tch::no_grad(|| {
            let mut s = stats.borrow_mut();
            let logr = &lp - &old_lp;
            s.approx_kl = masked_mean(&((logr.exp() - 1.0) - &logr), &mask).double_value(&[]);
            s.clipfrac = masked_mean(&(&ratio - 1.0).abs().gt(eps).to_kind(Kind::Float), &mask).double_value(&[]);
            s.ratio_mean = masked_mean(&ratio, &mask).double_value(&[]);
            let t = logits.size()[1];
            let l = filter_logits(&(logits.narrow(1, 0, t - 1) / temp).reshape([-1, logits.size()[2]]), 0, 1.0).log_softmax(-1, Kind::Float);
            let ent = -(l.exp() * &l).sum_dim_intlist(-1, false, Kind::Float).reshape(mask.size());
            s.entropy = masked_mean(&ent, &mask).double_value(&[]);
            s.policy_loss = loss.double_value(&[]);
        });
        match ptx {
            Some(d) => {
                let (n, t) = (d.ids.size()[0], d.ids.size()[1]);
                let lm = crate::train::lm_loss(&all.narrow(0, b, n).narrow(1, 0, t), &d.targets.to_device(all.device()));
                stats.borrow_mut().ptx_loss = tch::no_grad(|| lm.double_value(&[]));
                loss + lm * ptx_coef
            }
            None => loss,
        }
    };
    if train_actor {
        m.actor.step(&actor_ids, &actor_loss)?;
    }
    let vc = p.value_clip;
    m.critic.step(&ids, &|values: &Tensor| {
        let t = values.size()[1];
        let v = values.narrow(1, 0, t - 1);
        let v_clip = &old_v + (&v - &old_v).clamp(-vc, vc);
        let l1 = (&v - &ret).square();
        let l2 = (&v_clip - &ret).square();
        let loss = masked_mean(&l1.max_other(&l2), &mask) * 0.5;
        stats.borrow_mut().value_loss = tch::no_grad(|| loss.double_value(&[]));
        loss
    })?;
    Ok(stats.into_inner())
}

/// The update of one iteration: `p.ppo_epochs` passes over the experience in `p.minibatches`
/// shuffled minibatches; `ptx(k, n)` gives the k-th minibatch's demonstrations for the ptx loss
/// (`n` rows; None: no ptx loss).
pub(crate) fn update_epochs(m: &mut Models, x: &Experience, p: &PpoArgs, rng_rows: &mut impl rand::Rng, ptx: &mut dyn FnMut(usize, usize) -> Option<PtxBatch>, train_actor: bool) -> Result<Vec<MbStats>> {
    let b = x.ids.size()[0] as usize;
    let mut agg = Vec::new();
    for _ in 0..p.ppo_epochs {
        let perm = algo::permutation(b, rng_rows);
        for part in perm.chunks(b.div_ceil(p.minibatches.max(1))) {
            let rows = Tensor::from_slice(&part.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(x.ids.device());
            let d = ptx(agg.len(), part.len());
            agg.push(update_minibatch(m, x, &rows, p, d.as_ref(), train_actor)?);
        }
    }
    Ok(agg)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn std(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// Mean gold reward of sampled responses to held-out prompts, and the samples.
pub fn gold_eval(m: &mut Models, tok: &Tokenizer, p: &PpoArgs, task: Task, prompts: &[String], seed: u64) -> Result<(f64, Vec<Value>)> {
    // The same draws before and after training: the comparison sees the policy change alone.
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0xe7a1);
    let mut rewards = Vec::new();
    let mut samples = Vec::new();
    let pids: Vec<Vec<i64>> = prompts
        .iter()
        .flat_map(|x| {
            let mut v = vec![tok.bos()];
            v.extend(tok.encode(x));
            std::iter::repeat_n(v, p.eval_samples.max(1))
        })
        .collect();
    let s = Sampler::Sample {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
    };
    let out = generate(m.actor.as_mut(), &pids, p.max_new, tok.eos(), tok.pad(), s, &mut rng)?;
    for (i, g) in out.iter().enumerate() {
        let (r, ended) = (&g.tokens, &g.ended);
        let prompt = &prompts[i / p.eval_samples.max(1)];
        let text = tok.decode(r);
        let g = task.reward(prompt, &text, *ended);
        rewards.push(g);
        samples.push(json!({"prompt": prompt, "response": text, "gold_reward": g}));
    }
    Ok((mean(&rewards), samples))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Naive;
    use crate::model::GptConfig;
    use crate::tokenizer::TokenizerKind;
    use crate::train::{encode_pair, lm_batch};

    fn models(seed: u64) -> (Models, Tokenizer) {
        let tok = Tokenizer::new(TokenizerKind::Byte).unwrap();
        let cfg = GptConfig::parse("2x32x4", tok.vocab(), 48).unwrap();
        let dev = tch::Device::Cpu;
        let mk = |head, opts: TrainOpts, s| -> Box<dyn Engine> { Box::new(Naive::new(ModelSpec::new(cfg.clone(), head), dev, opts, s).unwrap()) };
        let train = TrainOpts::default();
        let frozen = TrainOpts::frozen(stowage_memory::DType::F32);
        let m = Models {
            actor: mk(HeadKind::Lm, train, seed),
            reference: Some(mk(HeadKind::Lm, frozen, seed)),
            critic: mk(HeadKind::Value, train, seed + 1),
            reward: mk(HeadKind::Score, frozen, seed + 2),
            turns: None,
        };
        (m, tok)
    }

    fn args() -> PpoArgs {
        PpoArgs {
            actor: None,
            reward_model: None,
            critic: None,
            max_new: 6,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            ppo_epochs: 1,
            minibatches: 2,
            kl_coef: 0.1,
            kl_target: 0.0,
            kl_horizon: 10000.0,
            clip_eps: 0.2,
            value_clip: 0.2,
            gamma: 1.0,
            lam: 0.95,
            reward_clip: 5.0,
            reward_norm: false,
            missing_eos_penalty: 0.0,
            critic_lr: 1e-3,
            critic_warmup: 0,
            eval_samples: 1,
            ptx_coef: 0.0,
            ptx_data: None,
            oracle_reward: false,
            oracle_task: None,
            reward_fn: None,
        }
    }

    fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed)
    }

    fn prompts() -> Vec<String> {
        ["sort 31:", "sort 4412:", "add 10+31:", "sort 9:"].iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_oracle_reward_is_the_tasks_gold_reward_of_each_response() {
        let (mut m, tok) = models(4);
        let mut p = args();
        p.reward_norm = false;
        p.reward_clip = 10.0;
        p.oracle_task = Some(Task::Sort);
        let x = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(3)).unwrap();
        let gold: Vec<f64> = x.texts.iter().zip(&x.ended).map(|((pr, r), e)| Task::Sort.reward(pr, r, *e)).collect();
        assert_eq!(x.scores, gold);
        // Without the oracle the reward model scores them (an untrained one: not the gold).
        p.oracle_task = None;
        let y = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(3)).unwrap();
        assert_eq!(y.texts, x.texts, "same draws");
        assert_ne!(y.scores, gold);
    }

    /// PPO's machinery as a whole optimises: on a bandit with a known optimum (responses of
    /// bytes close to 'm', scored per response), the mean reward of a random policy rises well
    /// above where it started while the KL penalty holds it to the reference.
    #[test]
    fn ppo_climbs_a_bandit_with_a_known_optimum() {
        fn close_to_m(_: &str, r: &str, _: bool) -> f64 {
            let b = r.as_bytes();
            if b.is_empty() {
                return 0.0;
            }
            b.iter().map(|&x| 1.0 - (x as f64 - b'm' as f64).abs() / 128.0).sum::<f64>() / b.len() as f64
        }
        let (mut m, tok) = models(9);
        m.actor.set_lr(3e-3);
        m.critic.set_lr(3e-3);
        let mut p = args();
        p.max_new = 3;
        p.kl_coef = 0.01;
        p.reward_fn = Some(close_to_m);
        p.ppo_epochs = 2;
        let prompts: Vec<String> = (0..32).map(|i| format!("go {}:", i % 4)).collect();
        let mut norm = algo::RunningMoments::default();
        let mut means = Vec::new();
        for it in 0..30 {
            let x = collect(&mut m, &tok, &p, &prompts, p.kl_coef, &mut norm, &mut rng(100 + it)).unwrap();
            means.push(mean(&x.scores));
            update_epochs(&mut m, &x, &p, &mut rng(200 + it), &mut |_, _| None, true).unwrap();
        }
        let (first, last) = (mean(&means[..3]), mean(&means[means.len() - 3..]));
        assert!(last > first + 0.15 && last > 0.8, "mean reward {first:.3} -> {last:.3}: {means:?}");
    }

    #[test]
    fn during_critic_warmup_only_the_critic_learns() {
        let (mut m, tok) = models(5);
        let p = args();
        let x = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(5)).unwrap();
        let (actor0, critic0) = (m.actor.export().unwrap(), m.critic.export().unwrap());
        update_epochs(&mut m, &x, &p, &mut rng(6), &mut |_, _| None, false).unwrap();
        let (actor1, critic1) = (m.actor.export().unwrap(), m.critic.export().unwrap());
        assert!(actor0.iter().zip(&actor1).all(|(a, b)| a.1.equal(&b.1)), "the actor moved during warm-up");
        assert_eq!(m.actor.steps(), 0);
        assert!(critic0.iter().zip(&critic1).any(|(a, b)| !a.1.equal(&b.1)), "the critic did not learn");
        update_epochs(&mut m, &x, &p, &mut rng(6), &mut |_, _| None, true).unwrap();
        assert!(m.actor.steps() > 0);
    }

    #[test]
    fn identical_policy_and_reference_give_zero_kl_and_unit_ratio() {
        let (mut m, tok) = models(1);
        let p = args();
        let x = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(0)).unwrap();
        assert!(x.kl.iter().all(|&k| k == 0.0), "KL {:?}", x.kl);
        let rows = Tensor::from_slice(&[0i64, 1]);
        let s = update_minibatch(&mut m, &x, &rows, &p, None, true).unwrap();
        assert_eq!(s.ratio_mean, 1.0);
        assert_eq!(s.approx_kl, 0.0);
        assert_eq!(s.clipfrac, 0.0);
    }

    #[test]
    fn a_lora_actor_is_its_own_reference_with_the_adapters_off() {
        let (mut m, tok) = models(1);
        let cfg = m.actor.spec().cfg.clone();
        let lora = Some(crate::model::LoraConfig { rank: 4, alpha: 8.0 });
        m.actor = Box::new(Naive::new(ModelSpec::with_lora(cfg.clone(), HeadKind::Lm, lora), tch::Device::Cpu, TrainOpts::default(), 1).unwrap());
        m.reference = None;
        assert_eq!(m.named().iter().map(|e| e.0).collect::<Vec<_>>(), ["actor", "critic", "reward"]);
        let p = args();
        let x = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(0)).unwrap();
        assert!(x.kl.iter().all(|&k| k == 0.0), "B = 0: the adapted actor is the base, KL {:?}", x.kl);
        for _ in 0..3 {
            update_minibatch(&mut m, &x, &Tensor::from_slice(&[0i64, 1]), &p, None, true).unwrap();
        }
        // The reference is the frozen base: the plain model with the same seed.
        let mut base = Naive::new(ModelSpec::new(cfg, HeadKind::Lm), tch::Device::Cpu, TrainOpts::frozen(stowage_memory::DType::F32), 1).unwrap();
        let want = base.forward(&x.ids).unwrap();
        assert!(m.reference_forward(&x.ids).unwrap().equal(&want), "adapters off must give the base model");
        let actor = m.actor.forward(&x.ids).unwrap();
        assert!((&actor - &want).abs().max().double_value(&[]) > 1e-4, "the adapters trained and are back on");
        let y = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(0)).unwrap();
        assert!(y.kl.iter().any(|&k| k != 0.0), "the trained actor departs from its reference");
        assert!(base.set_adapters(false).is_err(), "a model without adapters refuses");
    }

    #[test]
    fn the_score_is_read_at_each_sequence_s_last_token() {
        let (mut m, tok) = models(2);
        let p = args();
        let x = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(1)).unwrap();
        for r in 0..prompts().len() {
            // The unpadded sequence alone: its last position's score.
            let len = (x.ids.size()[1] - 1) as usize;
            let resp = x.lens[r];
            let plen = 1 + tok.encode(&prompts()[r]).len();
            let seq: Vec<i64> = Vec::<i64>::try_from(&x.ids.get(r as i64).narrow(0, 0, (plen + resp) as i64)).unwrap();
            // A response cut off by the length limit is scored with EOS appended.
            let seq = reward_input(&seq, x.ended[r], tok.eos(), 48);
            assert_eq!(seq.len(), plen + resp + !x.ended[r] as usize);
            assert_eq!(seq.last(), Some(&tok.eos()), "scored at EOS");
            let alone = m.reward.forward(&Tensor::from_slice(&seq).unsqueeze(0)).unwrap().get(0).get(seq.len() as i64 - 1).double_value(&[]);
            assert!((alone - x.scores[r]).abs() < 1e-5, "row {r}: {alone} vs {} (T {len})", x.scores[r]);
            // Rewards and values after the response are zero: the mask ends with it.
            let mask: Vec<f32> = Vec::<f32>::try_from(&x.mask.get(r as i64)).unwrap();
            assert_eq!(mask.iter().filter(|&&v| v > 0.0).count(), resp);
            let outside: Tensor = x.mask.get(r as i64).neg() + 1.0;
            let after = (x.advantages.get(r as i64) * outside).abs().sum(Kind::Double).double_value(&[]);
            assert_eq!(after, 0.0);
        }
    }

    #[test]
    fn the_ptx_loss_is_the_demonstrations_lm_loss_and_leaves_the_ppo_terms_alone() {
        let mut p = args();
        let (mut m, tok) = models(4);
        let x = collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(2)).unwrap();
        // One demonstration longer than the PPO sequences, one shorter: both paddings run.
        let seqs: Vec<_> = [("sort 3:", "3"), ("reverse abcdefghijklmnop:", "ponmlkjihgfedcba")].iter().map(|(a, b)| encode_pair(&tok, a, b, 48)).collect();
        let (ids, targets) = lm_batch(&seqs, tok.pad());
        assert!(ids.size()[1] > x.ids.size()[1] && seqs[0].0.len() < x.ids.size()[1] as usize);
        let expect = crate::train::lm_loss(&m.actor.forward(&ids).unwrap(), &targets).double_value(&[]);
        let rows = Tensor::from_slice(&[0i64, 1]);
        let export = |e: &mut Box<dyn Engine>| -> std::collections::BTreeMap<String, Tensor> { e.export().unwrap().into_iter().collect() };
        let before = export(&mut m.actor);
        p.ptx_coef = 0.5;
        let d = PtxBatch { ids, targets };
        let s = update_minibatch(&mut m, &x, &rows, &p, Some(&d), true).unwrap();
        assert!((s.ptx_loss - expect).abs() < 1e-5 * expect, "{} vs {expect}", s.ptx_loss);
        assert!((s.ratio_mean - 1.0).abs() < 1e-6 && s.approx_kl.abs() < 1e-7, "{} {}", s.ratio_mean, s.approx_kl);
        // The same update without ptx moves the weights differently: the LM gradient was applied.
        let (mut m2, _) = models(4);
        let x2 = collect(&mut m2, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(2)).unwrap();
        assert!(x2.ids.equal(&x.ids));
        update_minibatch(&mut m2, &x2, &rows, &p, None, true).unwrap();
        let (a, b) = (export(&mut m.actor), export(&mut m2.actor));
        let w = "wte.weight";
        let moved = |t: &Tensor| (t - &before[w]).abs().sum(Kind::Double).double_value(&[]);
        assert!(moved(&a[w]) > 0.0 && moved(&b[w]) > 0.0);
        assert!((&a[w] - &b[w]).abs().max().double_value(&[]) > 1e-6, "ptx changed nothing");
    }

    #[test]
    fn cut_off_responses_are_scored_as_ending_there() {
        assert_eq!(reward_input(&[1, 2, 3], true, 9, 8), [1, 2, 3]);
        assert_eq!(reward_input(&[1, 2, 3], false, 9, 8), [1, 2, 3, 9]);
        assert_eq!(reward_input(&[1, 2, 3], false, 9, 3), [1, 2, 9], "at the context limit");
    }

    #[test]
    fn experience_is_deterministic_for_a_seed() {
        let p = args();
        let run = |seed: u64| {
            let (mut m, tok) = models(3);
            collect(&mut m, &tok, &p, &prompts(), 0.1, &mut Default::default(), &mut rng(seed)).unwrap()
        };
        let (a, b, c) = (run(5), run(5), run(6));
        assert!(a.ids.equal(&b.ids) && a.advantages.equal(&b.advantages));
        assert_eq!(a.scores, b.scores);
        assert!(!a.ids.equal(&c.ids) || a.scores != c.scores, "another seed samples differently");
    }
}
