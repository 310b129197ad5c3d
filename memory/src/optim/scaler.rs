//! Dynamic loss scaling for fp16 training, and the gradient statistics that drive it and
//! clipping.

use super::adam::Grads;
use super::convert::{bf16_to_f32, f16_to_f32};

/// Settings of the dynamic loss scaler. Defaults: initial 2^16, x2 after 1000 clean steps,
/// x0.5 on overflow once `hysteresis` (2) overflows have been seen.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScalerConfig {
    pub initial: f32,
    pub growth: f32,
    pub backoff: f32,
    pub growth_interval: u32,
    pub hysteresis: u32,
    pub min_scale: f32,
}

impl Default for ScalerConfig {
    fn default() -> Self {
        ScalerConfig {
            initial: 65536.0,
            growth: 2.0,
            backoff: 0.5,
            growth_interval: 1000,
            hysteresis: 2,
            min_scale: 1.0,
        }
    }
}

/// The scaler's state (checkpointed with the optimizer).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub cfg: ScalerConfig,
    pub scale: f32,
    pub clean_steps: u32,
    pub hysteresis_left: u32,
    pub skipped: u64,
}

impl LossScaler {
    pub fn new(cfg: ScalerConfig) -> Self {
        LossScaler {
            cfg,
            scale: cfg.initial,
            clean_steps: 0,
            hysteresis_left: cfg.hysteresis.max(1),
            skipped: 0,
        }
    }

    /// Records a step's outcome; returns whether the step may be applied.
    pub fn update(&mut self, overflow: bool) -> bool {
        if overflow {
            self.skipped += 1;
            self.clean_steps = 0;
            self.hysteresis_left = self.hysteresis_left.saturating_sub(1);
            if self.hysteresis_left == 0 {
                self.scale = (self.scale * self.cfg.backoff).max(self.cfg.min_scale);
                self.hysteresis_left = self.cfg.hysteresis.max(1);
            }
            return false;
        }
        self.clean_steps += 1;
        if self.clean_steps >= self.cfg.growth_interval {
            self.scale *= self.cfg.growth;
            self.clean_steps = 0;
            self.hysteresis_left = self.cfg.hysteresis.max(1);
        }
        true
    }
}

/// Sum of squares of a gradient slice (in f64); non-finite when any element is inf or NaN,
/// which is how overflow is detected in the same pass.
pub fn grad_sq_sum(g: Grads<'_>) -> f64 {
    // Blocks summed in f32 (vectorised), blocks accumulated in f64.
    fn blocks<T: Copy>(g: &[T], f: impl Fn(T) -> f32) -> f64 {
        g.chunks(1024)
            .map(|b| {
                let mut acc = [0f32; 8];
                let mut it = b.chunks_exact(8);
                for c in &mut it {
                    for k in 0..8 {
                        let x = f(c[k]);
                        acc[k] += x * x;
                    }
                }
                let tail: f32 = it.remainder().iter().map(|&x| f(x) * f(x)).sum();
                acc.iter().sum::<f32>() as f64 + tail as f64
            })
            .sum()
    }
    match g {
        Grads::F32(g) => blocks(g, |x| x),
        Grads::BF16(g) => blocks(g, bf16_to_f32),
        Grads::F16(g) => blocks(g, f16_to_f32),
    }
}

/// The single multiplier applied to raw (scaled) gradients: unscaling and global-norm clipping
/// folded together. `sq_sum` is the sum of squares of the scaled gradients.
pub fn grad_multiplier(sq_sum: f64, scale: f32, max_norm: Option<f32>) -> f32 {
    let norm = sq_sum.sqrt() / scale as f64;
    let clip = match max_norm {
        Some(max) if norm > max as f64 => max as f64 / (norm + 1e-6),
        _ => 1.0,
    };
    (clip / scale as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_backs_off_after_hysteresis_and_growth_follows_clean_steps() {
        let mut s = LossScaler::new(ScalerConfig::default());
        assert!(!s.update(true));
        assert_eq!(s.scale, 65536.0, "first overflow is absorbed by hysteresis");
        assert!(!s.update(true));
        assert_eq!(s.scale, 32768.0);
        for _ in 0..999 {
            assert!(s.update(false));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(false));
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.skipped, 2);
    }

    #[test]
    fn non_finite_gradients_show_in_the_sum() {
        let mut g = vec![1.0f32; 3000];
        assert_eq!(grad_sq_sum(Grads::F32(&g)), 3000.0);
        g[2999] = f32::INFINITY;
        assert!(!grad_sq_sum(Grads::F32(&g)).is_finite());
        g[2999] = f32::NAN;
        assert!(grad_sq_sum(Grads::F32(&g)).is_nan());
        let h = [0x7c00u16, 0]; // fp16 infinity
        assert!(!grad_sq_sum(Grads::F16(&h)).is_finite());
    }
}
