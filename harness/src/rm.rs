//! `stowage rm`: the reward model, trained on preference pairs (a task's synthetic pairs, pairs
//! ranked from a policy's own samples, or a JSON Lines file) with the shared training loop.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::ckpt::CkptPaths;

use crate::data::{load_jsonl, PrefExample};
use crate::engine::{Engine, ModelSpec, TrainOpts};
use crate::error::{HarnessError, Result};
use crate::generate::{generate, Sampler};
use crate::model::HeadKind;
use crate::tasks::Task;
use crate::tokenizer::Tokenizer;
use crate::train::*;

/// Where a reward model's preference pairs come from on a built-in task.
#[derive(Debug, Clone, clap::Args)]
pub struct PairArgs {
    /// Sample the pairs from this policy checkpoint (e.g. the SFT model's) and rank them by the
    /// task's gold reward, as InstructGPT's labellers ranked the SFT model's outputs: the reward
    /// model learns the distinctions its policy's samples need. Default: synthetic pairs (the
    /// answer against edits of it).
    #[arg(long)]
    pub pairs_from: Option<PathBuf>,
    /// Responses sampled per prompt; every two of them with different gold rewards make a pair
    /// (a synthetic pair where all tie).
    #[arg(long, default_value_t = 4)]
    pub pairs_samples: usize,
    /// Prompts sampled for training pairs (at most --train-size).
    #[arg(long, default_value_t = 4096)]
    pub pairs_prompts: usize,
    /// Sampling temperature and response length for the pairs (PPO's, in `stowage pipeline`).
    #[arg(long, default_value_t = 1.0)]
    pub pairs_temperature: f64,
    #[arg(long, default_value_t = 48)]
    pub pairs_max_new: usize,
}

impl Default for PairArgs {
    fn default() -> Self {
        PairArgs {
            pairs_from: None,
            pairs_samples: 4,
            pairs_prompts: 4096,
            pairs_temperature: 1.0,
            pairs_max_new: 48,
        }
    }
}

/// Preference pairs from a policy's samples for `prompts`, ranked by `task`'s gold reward: at
/// least one per prompt, in prompt order.
#[allow(clippy::too_many_arguments)]
pub fn policy_pairs(e: &mut dyn Engine, tok: &Tokenizer, task: Task, prompts: &[String], pa: &PairArgs, seed: u64, noise: f64, bar: &indicatif::ProgressBar) -> Result<Vec<PrefExample>> {
    let k = pa.pairs_samples.max(2);
    let mut rng = <ChaCha8Rng as SeedableRng>::seed_from_u64(seed ^ 0x0009_a1e5);
    let sampler = Sampler::Sample {
        temperature: pa.pairs_temperature,
        top_k: 0,
        top_p: 1.0,
    };
    let mut out = Vec::with_capacity(prompts.len());
    for (c, part) in prompts.chunks(256).enumerate() {
        let ids: Vec<Vec<i64>> = part
            .iter()
            .flat_map(|p| {
                let mut v = vec![tok.bos()];
                v.extend(tok.encode(p));
                std::iter::repeat_n(v, k)
            })
            .collect();
        let gen = generate(e, &ids, pa.pairs_max_new, tok.eos(), tok.pad(), sampler, &mut rng)?;
        for (i, prompt) in part.iter().enumerate() {
            let mut scored: Vec<(f64, String)> = gen[i * k..(i + 1) * k]
                .iter()
                .map(|g| {
                    let text = tok.decode(&g.tokens);
                    (task.reward(prompt, &text, g.ended), text)
                })
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            scored.dedup_by(|a, b| a.1 == b.1);
            // Every comparison the ranking implies (InstructGPT trains on all K-choose-2 pairs
            // of a ranking), a synthetic pair where all samples tie.
            let before = out.len();
            for (x, hi) in scored.iter().enumerate() {
                for lo in &scored[x + 1..] {
                    if hi.0 > lo.0 {
                        out.push(PrefExample {
                            prompt: prompt.clone(),
                            chosen: hi.1.clone(),
                            rejected: lo.1.clone(),
                        });
                    }
                }
            }
            if out.len() == before {
                out.push(task.pair_for(prompt, &mut rng));
            }
            for p in &mut out[before..] {
                if rng.gen_bool(noise.clamp(0.0, 1.0)) {
                    std::mem::swap(&mut p.chosen, &mut p.rejected);
                }
            }
        }
        bar.set_message(format!("sampling preference pairs: {} of {} prompts, {} pairs", (c * 256 + part.len()), prompts.len(), out.len()));
    }
    Ok(out)
}

fn pref_data(a: &TrainArgs, pa: &PairArgs, bar: &indicatif::ProgressBar) -> Result<(Vec<PrefExample>, Vec<PrefExample>)> {
    match (&a.task, &a.data) {
        (Some(t), None) if pa.pairs_from.is_some() => {
            let dir = pa.pairs_from.as_deref().unwrap_or(Path::new(""));
            let c = CkptPaths::new(dir).read_config()?;
            if c.tokenizer != a.tokenizer {
                return Err(HarnessError::Config(format!("--pairs-from {}: its tokenizer differs from --tokenizer", dir.display())));
            }
            let mut notes = Vec::new();
            let mut policy = build_engine_with(a, ModelSpec::new(c.model.clone(), HeadKind::Lm), TrainOpts::frozen(a.compute_dtype()), &mut notes)?;
            load_weights(policy.as_mut(), dir, c.head)?;
            let train = t.prompts(pa.pairs_prompts.min(a.train_size), a.seed, false);
            let eval = t.prompts(a.eval_size, a.seed, true);
            let tok = Tokenizer::new(a.tokenizer)?;
            Ok((
                policy_pairs(policy.as_mut(), &tok, *t, &train, pa, a.seed, a.label_noise, bar)?,
                policy_pairs(policy.as_mut(), &tok, *t, &eval, pa, a.seed ^ 1, 0.0, bar)?,
            ))
        }
        (None, Some(_)) if pa.pairs_from.is_some() => Err(HarnessError::Config("--pairs-from needs --task (the gold reward ranks the samples); with --data the file holds the pairs".into())),
        (Some(t), None) => Ok((t.preferences(a.train_size, a.seed, false, a.label_noise), t.preferences(a.eval_size, a.seed, true, 0.0))),
        (None, Some(d)) => {
            let mut train: Vec<PrefExample> = load_jsonl(d)?;
            let eval = match &a.eval_data {
                Some(e) => load_jsonl(e)?,
                None => split_tail(&mut train, d)?,
            };
            Ok((train, eval))
        }
        _ => Err(HarnessError::Config("give exactly one of --task NAME and --data FILE".into())),
    }
}

fn pair_seqs(tok: &Tokenizer, pairs: &[&PrefExample], ctx: usize) -> Vec<Vec<i64>> {
    let mut v: Vec<Vec<i64>> = pairs.iter().map(|p| encode_pair(tok, &p.prompt, &p.chosen, ctx - 1).0).collect();
    v.extend(pairs.iter().map(|p| encode_pair(tok, &p.prompt, &p.rejected, ctx - 1).0));
    v
}

/// Held-out pairwise accuracy: the share of pairs scored chosen above rejected.
pub fn eval_pairwise(e: &mut dyn Engine, tok: &Tokenizer, eval: &[PrefExample], batch: usize) -> Result<f64> {
    let ctx = e.spec().cfg.n_ctx;
    let mut right = 0usize;
    for part in eval.chunks(batch.max(1)) {
        let refs: Vec<&PrefExample> = part.iter().collect();
        let (ids, last) = score_batch(&pair_seqs(tok, &refs, ctx), tok.pad());
        let out = e.forward(&ids.to_device(e.device()))?;
        let r = gather_last(&out, &last);
        let b = part.len() as i64;
        let better = r.narrow(0, 0, b).gt_tensor(&r.narrow(0, b, b));
        right += better.sum(Kind::Int64).int64_value(&[]) as usize;
    }
    Ok(right as f64 / eval.len().max(1) as f64)
}

/// `stowage rm`: returns the report section.
pub fn run_rm(a: &TrainArgs, loss_kind: RmLoss, pairs: &PairArgs) -> Result<Value> {
    let tok = Tokenizer::new(a.tokenizer)?;
    let (train, eval) = {
        let spin = if a.quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
        let r = pref_data(a, pairs, &spin)?;
        spin.finish_and_clear();
        r
    };
    let cfg = model_config(a, &tok)?;
    let mut notes: Vec<String> = lora_note(a).into_iter().collect();
    let mut e = build_engine(a, cfg, HeadKind::Score, &mut notes)?;
    let start = load_start(a, e.as_mut(), HeadKind::Score, &a.out)?;
    let mut run = Run::open(&a.out, a.steps, a.quiet, "rm")?;
    for n in &notes {
        run.say(format!("note: {n}"));
    }
    let ctx = e.spec().cfg.n_ctx;
    let batch = |idx: &[usize]| -> Batch {
        let pairs: Vec<&PrefExample> = idx.iter().map(|&i| &train[i]).collect();
        let (ids, last) = score_batch(&pair_seqs(&tok, &pairs, ctx), tok.pad());
        (ids, Box::new(move |out: &Tensor| rm_loss(&gather_last(out, &last), loss_kind)))
    };
    let stage = Stage {
        name: "rm",
        n: train.len(),
        batch: &batch,
        key: "heldout_accuracy",
        label: "held-out pairwise accuracy",
        measure: Box::new(|e: &mut dyn Engine, _| eval_pairwise(e, &tok, &eval, a.batch_size)),
    };
    let (loss, acc) = train_loop(a, e.as_mut(), &tok, &mut run, start, stage)?;
    finish_stage(a, e.as_ref(), &run, "rm", "heldout_accuracy", loss, acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Naive;
    use crate::model::GptConfig;
    use crate::tokenizer::TokenizerKind;
    use stowage_memory::DType;

    #[test]
    fn policy_pairs_rank_the_policy_s_samples_by_gold_reward() {
        let tok = Tokenizer::new(TokenizerKind::Byte).unwrap();
        let cfg = GptConfig::parse("2x32x4", tok.vocab(), 48).unwrap();
        let mut e = Naive::new(ModelSpec::new(cfg, HeadKind::Lm), tch::Device::Cpu, TrainOpts::frozen(DType::F32), 3).unwrap();
        let task = Task::Sort;
        let prompts = task.prompts(12, 0, false);
        let pa = PairArgs {
            pairs_max_new: 6,
            ..Default::default()
        };
        let bar = indicatif::ProgressBar::hidden();
        let pairs = policy_pairs(&mut e, &tok, task, &prompts, &pa, 7, 0.0, &bar).unwrap();
        assert!(pairs.len() >= prompts.len());
        let mut sampled = 0;
        for p in &pairs {
            let x = &p.prompt;
            assert!(prompts.contains(x));
            let (c, r) = (task.reward(x, &p.chosen, true), task.reward(x, &p.rejected, true));
            assert!(c > r, "{p:?}: {c} <= {r}");
            // An untrained policy's samples are not the answer: pairs of them are sampled ones.
            if p.chosen != task.answer(x).unwrap() {
                sampled += 1;
            }
        }
        assert!(sampled > 0, "every pair fell back to a synthetic one");
        assert!(prompts.iter().all(|x| pairs.iter().any(|p| &p.prompt == x)), "a prompt without a pair");
        let again = policy_pairs(&mut e, &tok, task, &prompts, &pa, 7, 0.0, &bar).unwrap();
        assert_eq!(again.iter().map(|p| &p.chosen).collect::<Vec<_>>(), pairs.iter().map(|p| &p.chosen).collect::<Vec<_>>());
        let flipped = policy_pairs(&mut e, &tok, task, &prompts, &pa, 7, 1.0, &bar).unwrap();
        assert!(flipped.iter().all(|p| task.reward(&p.prompt, &p.chosen, true) < task.reward(&p.prompt, &p.rejected, true)));
    }
}
