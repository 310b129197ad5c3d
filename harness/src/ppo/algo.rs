//! The numeric pieces of PPO, free of models so they can be checked by hand.

use rand::Rng;
use tch::{Kind, Tensor};

/// Generalised advantage estimation over one response: `rewards[t]` and `values[t]` per action,
/// the episode ending after the last one. Returns (advantages, returns = advantages + values).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut next_adv = 0.0;
    for t in (0..n).rev() {
        let next_v = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_v - values[t];
        next_adv = delta + gamma * lam * next_adv;
        adv[t] = next_adv;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Whitens `x` over the entries where `mask` is 1 (mean 0, std 1); others become 0.
pub fn whiten(x: &[f64], mask: &[f32]) -> Vec<f64> {
    let sel: Vec<f64> = x.iter().zip(mask).filter(|(_, &m)| m > 0.0).map(|(v, _)| *v).collect();
    let n = sel.len().max(1) as f64;
    let mean = sel.iter().sum::<f64>() / n;
    let var = sel.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let inv = 1.0 / (var.sqrt() + 1e-8);
    x.iter().zip(mask).map(|(v, &m)| if m > 0.0 { (v - mean) * inv } else { 0.0 }).collect()
}

/// A fixed KL coefficient, or the adaptive controller of Ziegler et al.: move beta so that the
/// observed KL approaches `target`, at most 20% of the error per horizon.
#[derive(Debug, Clone)]
pub struct KlController {
    pub beta: f64,
    target: f64,
    horizon: f64,
}

impl KlController {
    /// `target` 0: fixed.
    pub fn new(beta: f64, target: f64, horizon: f64) -> Self {
        KlController { beta, target, horizon }
    }

    pub fn update(&mut self, kl: f64, n_steps: u64) {
        if self.target <= 0.0 {
            return;
        }
        let err = (kl / self.target - 1.0).clamp(-0.2, 0.2);
        self.beta *= 1.0 + err * n_steps as f64 / self.horizon;
    }
}

/// A random permutation of `0..n`.
pub fn permutation(n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.gen_range(0..=i));
    }
    v
}

/// 1 - Var(returns - values) / Var(returns) over the masked entries.
pub fn explained_variance(values: &Tensor, returns: &Tensor, mask: &Tensor) -> f64 {
    tch::no_grad(|| {
        let n = mask.sum(Kind::Double).double_value(&[]).max(1.0);
        let var = |x: &Tensor| {
            let m = (x * mask).sum(Kind::Double) / n;
            (((x - m).square()) * mask).sum(Kind::Double).double_value(&[]) / n
        };
        let vr = var(returns);
        if vr <= 0.0 {
            return 0.0;
        }
        1.0 - var(&(returns - values)) / vr
    })
}

/// Running mean and variance of every reward-model score seen (Chan et al.'s merge of batch
/// moments). A reward model's pairwise loss fixes differences only: its offset and scale are
/// arbitrary, and a score far from zero is clipped flat. Normalising by the running moments
/// (OpenRLHF's `normalize_reward`) puts the scores where clipping and the KL coefficient mean
/// the same thing for every reward model.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct RunningMoments {
    pub count: f64,
    pub mean: f64,
    #[serde(default)]
    m2: f64,
}

impl RunningMoments {
    pub fn update(&mut self, xs: &[f64]) {
        if xs.is_empty() {
            return;
        }
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        let m2: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
        let total = self.count + n;
        let d = m - self.mean;
        self.mean += d * n / total;
        self.m2 += m2 + d * d * self.count * n / total;
        self.count = total;
    }

    /// Population standard deviation.
    pub fn std(&self) -> f64 {
        if self.count > 0.0 {
            (self.m2 / self.count).sqrt()
        } else {
            0.0
        }
    }

    /// `(x - mean) / std`; the shift alone while the spread is zero.
    pub fn normalize(&self, x: f64) -> f64 {
        let s = self.std();
        if s > 1e-8 {
            (x - self.mean) / s
        } else {
            x - self.mean
        }
    }
}

/// Pearson correlation of two samples; 0 when either is constant. Between the reward model's
/// scores and the gold rewards of one batch it measures how far the policy can trust its reward:
/// a falling value while the score rises is reward hacking.
pub fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    if n < 2 {
        return 0.0;
    }
    let (ma, mb) = (a[..n].iter().sum::<f64>() / n as f64, b[..n].iter().sum::<f64>() / n as f64);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (a[i] - ma, b[i] - mb);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return 0.0;
    }
    sab / (saa * sbb).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-7, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn gae_by_hand() {
        let r = [0.0, 0.0, 1.0];
        let v = [0.5, 0.2, 0.4];
        // lambda = 1, gamma = 1: advantages are return-to-go minus value.
        let (a, ret) = gae(&r, &v, 1.0, 1.0);
        close(&a, &[0.5, 0.8, 0.6]);
        close(&ret, &[1.0, 1.0, 1.0]);
        // lambda = 0.95: deltas d2 = 1 - 0.4 = 0.6, d1 = 0 + 0.4 - 0.2 = 0.2, d0 = 0.2 - 0.5 = -0.3;
        // A2 = 0.6, A1 = 0.2 + 0.95 * 0.6 = 0.77, A0 = -0.3 + 0.95 * 0.77 = 0.4315.
        let (a, ret) = gae(&r, &v, 1.0, 0.95);
        close(&a, &[0.4315, 0.77, 0.6]);
        close(&ret, &[0.9315, 0.97, 1.0]);
    }

    #[test]
    fn whitening_ignores_masked_entries() {
        let w = whiten(&[1.0, 2.0, 3.0, 100.0], &[1.0, 1.0, 1.0, 0.0]);
        let sd = (2.0f64 / 3.0).sqrt();
        close(&w, &[-1.0 / sd, 0.0, 1.0 / sd, 0.0]);
    }

    #[test]
    fn adaptive_kl_moves_beta_towards_the_target() {
        let mut k = KlController::new(0.1, 6.0, 10000.0);
        k.update(12.0, 100); // KL twice the target: error clipped to +0.2
        assert!((k.beta - 0.1 * (1.0 + 0.2 * 100.0 / 10000.0)).abs() < 1e-12);
        let b = k.beta;
        k.update(3.0, 100); // half the target: error -0.2... clipped from -0.5
        assert!((k.beta - b * (1.0 - 0.2 * 0.01)).abs() < 1e-12);
        let mut f = KlController::new(0.1, 0.0, 10000.0);
        f.update(100.0, 100);
        assert_eq!(f.beta, 0.1);
    }

    #[test]
    fn explained_variance_is_one_for_perfect_values() {
        let r = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 9.0]).reshape([1, 4]);
        let m = Tensor::from_slice(&[1.0f32, 1.0, 1.0, 0.0]).reshape([1, 4]);
        assert!((explained_variance(&r, &r, &m) - 1.0).abs() < 1e-9);
        assert!(explained_variance(&(&r * 0.0), &r, &m).abs() < 1e-9);
    }

    #[test]
    fn correlation_by_hand() {
        assert!((correlation(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5]) - 0.997_948_7).abs() < 1e-6);
        assert!((correlation(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        assert_eq!(correlation(&[1.0, 1.0], &[0.0, 5.0]), 0.0);
        assert_eq!(correlation(&[1.0], &[2.0]), 0.0);
    }

    #[test]
    fn running_moments_match_two_passes_over_all_batches() {
        let batches = [vec![1.0, 2.0, 4.0], vec![-3.0], vec![10.0, 0.5, 0.25, 7.0]];
        let mut r = RunningMoments::default();
        let mut all = Vec::new();
        for b in &batches {
            r.update(b);
            all.extend_from_slice(b);
            let n = all.len() as f64;
            let m = all.iter().sum::<f64>() / n;
            let v = all.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
            assert!((r.mean - m).abs() < 1e-12 && (r.std() - v.sqrt()).abs() < 1e-12);
        }
        assert!((r.normalize(r.mean + 2.0 * r.std()) - 2.0).abs() < 1e-12);
        let mut flat = RunningMoments::default();
        flat.update(&[3.0, 3.0]);
        assert_eq!(flat.normalize(4.0), 1.0);
    }
}
