//! Decoding: greedy or sampled continuation of token prompts through any engine.

use tch::{Kind, Tensor};

use crate::engine::Engine;
use crate::error::Result;
use crate::model::KvCache;

/// How the next token is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    Greedy,
    /// Temperature, top-k (0: off), top-p (1: off).
    Sample { temperature: f64, top_k: i64, top_p: f64 },
}

/// One generated continuation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The new tokens, EOS included when it was produced.
    pub tokens: Vec<i64>,
    /// Whether generation stopped at EOS (rather than the length limit).
    pub ended: bool,
}

/// Restricts `logits` `[N, V]` (already divided by the temperature) to the top-k and nucleus.
pub fn filter_logits(logits: &Tensor, top_k: i64, top_p: f64) -> Tensor {
    let mut l = logits.shallow_clone();
    let v = l.size()[1];
    if top_k > 0 && top_k < v {
        let (vals, _) = l.topk(top_k, -1, true, true);
        let kth = vals.narrow(1, top_k - 1, 1);
        l = l.masked_fill(&l.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if top_p < 1.0 {
        let (sorted, idx) = l.sort(-1, true);
        let probs = sorted.softmax(-1, Kind::Float);
        let cum = probs.cumsum(-1, Kind::Float);
        // Drop tokens once the mass before them already exceeds top_p (the first always stays).
        let drop = (cum - &probs).gt(top_p);
        let sorted = sorted.masked_fill(&drop, f64::NEG_INFINITY);
        l = Tensor::full_like(&l, f64::NEG_INFINITY).scatter(1, &idx, &sorted);
    }
    l
}

/// Picks the next tokens `[N]` from last-position logits `[N, V]`. Sampling draws its
/// uniforms from `rng` (inverse CDF), so it depends on the caller's seed alone, never on
/// libtorch's global generator that other threads share.
pub fn pick(logits: &Tensor, s: Sampler, rng: &mut impl rand::Rng) -> Tensor {
    match s {
        Sampler::Greedy => logits.argmax(-1, false),
        Sampler::Sample { temperature, top_k, top_p } => {
            let l = filter_logits(&(logits / temperature.max(1e-6)), top_k, top_p);
            let cum = l.softmax(-1, Kind::Double).cumsum(-1, Kind::Double);
            let n = cum.size()[0];
            let u: Vec<f64> = (0..n).map(|_| rng.gen::<f64>()).collect();
            let u = Tensor::from_slice(&u).to_device(cum.device()).unsqueeze(1);
            // The first index whose cumulative probability exceeds u.
            let idx = cum.lt_tensor(&u).sum_dim_intlist(-1, false, Kind::Int64);
            idx.clamp_max(cum.size()[1] - 1)
        }
    }
}

/// Continues each prompt by up to `max_new` tokens (fewer near the context limit), batching
/// prompts of equal length and decoding with one key/value cache per block, through either
/// strategy.
pub fn generate(engine: &mut dyn Engine, prompts: &[Vec<i64>], max_new: usize, eos: i64, pad: i64, s: Sampler, rng: &mut impl rand::Rng) -> Result<Vec<Generated>> {
    // Every generated token reads every parameter.
    engine.claim_parameters()?;
    let n_layer = engine.spec().cfg.n_layer;
    let n_ctx = engine.spec().cfg.n_ctx;
    let device = engine.device();
    let mut out: Vec<Option<Generated>> = vec![None; prompts.len()];
    let mut lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    lens.sort_unstable();
    lens.dedup();
    for len in lens {
        let rows: Vec<usize> = (0..prompts.len()).filter(|&i| prompts[i].len() == len).collect();
        let flat: Vec<i64> = rows.iter().flat_map(|&i| prompts[i].iter().copied()).collect();
        let mut cur = Tensor::from_slice(&flat).reshape([rows.len() as i64, len as i64]).to_device(device);
        let mut cache: Vec<KvCache> = (0..n_layer).map(|_| KvCache::default()).collect();
        let mut pos = 0i64;
        let mut done = vec![false; rows.len()];
        let mut gen: Vec<Vec<i64>> = vec![Vec::new(); rows.len()];
        for _ in 0..max_new.min(n_ctx.saturating_sub(len)) {
            let logits = engine.forward_cached(&cur, &mut cache, pos)?;
            pos += cur.size()[1];
            let next = pick(&logits.select(1, -1), s, rng).to_device(tch::Device::Cpu);
            let next: Vec<i64> = Vec::<i64>::try_from(&next)?;
            let mut col = Vec::with_capacity(rows.len());
            for (k, &t) in next.iter().enumerate() {
                if done[k] {
                    col.push(pad);
                } else {
                    gen[k].push(t);
                    done[k] = t == eos;
                    col.push(t);
                }
            }
            if done.iter().all(|&d| d) {
                break;
            }
            cur = Tensor::from_slice(&col).reshape([rows.len() as i64, 1]).to_device(device);
        }
        for (k, &i) in rows.iter().enumerate() {
            out[i] = Some(Generated {
                tokens: std::mem::take(&mut gen[k]),
                ended: done[k],
            });
        }
    }
    engine.end_generation()?;
    Ok(out.into_iter().map(|g| g.expect("every prompt has a length group")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_keep_the_right_tokens() {
        let l = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.0]).reshape([1, 4]);
        let k = filter_logits(&l, 2, 1.0);
        let kept: Vec<bool> = Vec::<bool>::try_from(&k.isfinite().reshape([-1])).unwrap();
        assert_eq!(kept, vec![false, true, true, false]);
        // Probabilities of [1,3,2,0]: 0.087, 0.644, 0.237, 0.032; top-p 0.7 keeps 3 and 2.
        let p = filter_logits(&l, 0, 0.7);
        let kept: Vec<bool> = Vec::<bool>::try_from(&p.isfinite().reshape([-1])).unwrap();
        assert_eq!(kept, vec![false, true, true, false]);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        assert_eq!(pick(&l, Sampler::Greedy, &mut rng).int64_value(&[0]), 1);
        // Sampled frequencies follow the softmax: token 1 about 64% of the time.
        let s = Sampler::Sample { temperature: 1.0, top_k: 0, top_p: 1.0 };
        let many = l.repeat([4000, 1]);
        let picks: Vec<i64> = Vec::<i64>::try_from(&pick(&many, s, &mut rng)).unwrap();
        let ones = picks.iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.644).abs() < 0.03, "{ones}");
        assert!(picks.iter().all(|&t| (0..4).contains(&t)));
    }
}
