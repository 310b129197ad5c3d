// The oracle is written index by index on purpose: it should read like the formula.
#![allow(clippy::needless_range_loop)]

use super::convert::{bf16_to_f32, f32_to_bf16, f32_to_f16};
use super::*;

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Plain f64 AdamW, the oracle. `scale_*` hold, per element, the sum of the magnitudes of the
/// terms that made the last result: the yardstick of "relative" for a sum whose terms cancel
/// (a moment that crosses zero is tiny next to its terms, and no float sum can be exact
/// relative to it).
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    scale_p: Vec<f64>,
    scale_m: Vec<f64>,
    scale_v: Vec<f64>,
}

impl Reference {
    fn new(p: Vec<f64>, m: Vec<f64>, v: Vec<f64>) -> Self {
        let n = p.len();
        Reference { p, m, v, scale_p: vec![0.0; n], scale_m: vec![0.0; n], scale_v: vec![0.0; n] }
    }

    fn step(&mut self, c: &AdamConfig, t: u64, g: &[f64]) {
        let (b1, b2) = (c.beta1 as f64, c.beta2 as f64);
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        for i in 0..self.p.len() {
            let mut gi = g[i];
            let p0 = self.p[i].abs();
            let mut g_scale = gi.abs();
            if c.decoupled {
                self.p[i] *= 1.0 - c.lr as f64 * c.weight_decay as f64;
            } else {
                gi += c.weight_decay as f64 * self.p[i];
                g_scale += c.weight_decay as f64 * p0;
            }
            self.scale_m[i] = b1 * self.m[i].abs() + (1.0 - b1) * g_scale;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * gi;
            self.scale_v[i] = b2 * self.v[i] + (1.0 - b2) * g_scale * g_scale;
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * gi * gi;
            let denom = (self.v[i] / bc2).sqrt() + c.eps as f64;
            let u = c.lr as f64 * (self.m[i] / bc1) / denom;
            self.p[i] -= u;
            // The update inherits the moment's error, so its yardstick is the moment's.
            self.scale_p[i] = p0 + c.lr as f64 * (self.scale_m[i] / bc1) / denom;
        }
    }
}

/// Two checks against the f64 oracle over 100 random steps:
/// - every step, the oracle steps from our exact f32 state, and our new master and moments are
///   within 1e-6 relative of its result, element by element (the kernel's own error);
/// - after 100 steps, an oracle that kept its whole state in f64 is within 1e-6 relative of our
///   master in norm (f32 storage rounds each step, so single elements wander by a few 1e-7).
fn run_against_reference(isa: Isa, threads: usize, decoupled: bool, bf16: bool) {
    let cfg = AdamConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        decoupled,
        ..AdamConfig::default()
    };
    let opt = CpuAdam::new(cfg, Some(threads)).unwrap().with_isa(isa).unwrap();
    let mut rng = Rng(0xabcdef ^ threads as u64);
    // Odd lengths, tails not a multiple of any vector width, and a multi-task size.
    for &n in &[1usize, 7, 33, 1000, 4097, 70_001] {
        let init: Vec<f32> = (0..n).map(|_| rng.f()).collect();
        let mut p = init.clone();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut out = vec![0u16; n];
        let wide = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
        let mut long = Reference::new(wide(&init), vec![0.0; n], vec![0.0; n]);
        for t in 1..=100u64 {
            let g32: Vec<f32> = (0..n).map(|_| rng.f() * 0.1).collect();
            let (grads, g64): (Vec<u16>, Vec<f64>) = if bf16 {
                let gb: Vec<u16> = g32.iter().map(|&x| f32_to_bf16(x)).collect();
                let g64 = gb.iter().map(|&x| bf16_to_f32(x) as f64).collect();
                (gb, g64)
            } else {
                (Vec::new(), wide(&g32))
            };
            let mut step = Reference::new(wide(&p), wide(&m), wide(&v));
            step.step(&cfg, t, &g64);
            long.step(&cfg, t, &g64);
            let g = if bf16 { Grads::BF16(&grads) } else { Grads::F32(&g32) };
            opt.update(t, 1.0, &mut p, &mut m, &mut v, g, ParamsOut::BF16(&mut out)).unwrap();
            for (name, ours, theirs, scale) in [
                ("master", &p, &step.p, &step.scale_p),
                ("m", &m, &step.m, &step.scale_m),
                ("v", &v, &step.v, &step.scale_v),
            ] {
                for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
                    let e = (a as f64 - b).abs() / scale[i].max(1e-30);
                    assert!(e <= 1e-6, "{isa:?} x{threads} n={n} bf16={bf16} step {t}: {name}[{i}] {a} vs {b} ({e:e})");
                }
            }
        }
        let diff: f64 = p.iter().zip(&long.p).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = long.p.iter().map(|b| b * b).sum::<f64>().sqrt();
        assert!(diff / norm <= 1e-6, "{isa:?} x{threads} n={n}: 100-step drift {:e}", diff / norm);
        for i in 0..n {
            assert_eq!(out[i], f32_to_bf16(p[i]), "the bf16 copy is the rounded master");
        }
    }
}

#[test]
fn fp32_adamw_matches_an_f64_reference_on_every_isa() {
    for isa in [Isa::Portable, detect_isa()] {
        run_against_reference(isa, 1, true, false);
        run_against_reference(isa, 3, true, false);
    }
    run_against_reference(detect_isa(), 2, false, false);
}

#[test]
fn bf16_gradients_match_the_reference_fed_the_same_gradients() {
    run_against_reference(detect_isa(), 2, true, true);
    run_against_reference(Isa::Portable, 1, true, true);
}

#[test]
fn an_overflowing_step_is_skipped_and_leaves_every_byte_alone() {
    let opt = CpuAdam::new(AdamConfig::default(), Some(2)).unwrap();
    let mut scaler = LossScaler::new(ScalerConfig::default());
    let n = 5000;
    let mut rng = Rng(7);
    let mut p: Vec<f32> = (0..n).map(|_| rng.f()).collect();
    let (mut m, mut v) = (vec![0.1f32; n], vec![0.2f32; n]);
    let mut out = vec![0u16; n];
    let mut g: Vec<u16> = (0..n).map(|_| f32_to_f16(rng.f() * 100.0)).collect();
    g[1234] = 0x7c00; // +inf in fp16
    let before = (p.clone(), m.clone(), v.clone(), out.clone());
    let sq = opt.grad_sq_sum(Grads::F16(&g));
    let plan = opt.plan(sq, Some(&mut scaler), Some(1.0));
    assert_eq!(plan, StepPlan::Skip);
    if let StepPlan::Apply { grad_mult, .. } = plan {
        opt.update(1, grad_mult, &mut p, &mut m, &mut v, Grads::F16(&g), ParamsOut::F16(&mut out)).unwrap();
    }
    assert_eq!((p, m, v, out), before);
    assert_eq!(scaler.skipped, 1);
}

#[test]
fn fused_clipping_matches_unscale_then_clip_then_step() {
    let cfg = AdamConfig::default();
    let opt = CpuAdam::new(cfg, Some(2)).unwrap();
    let scale = 1024.0f32;
    let max_norm = 0.5f32;
    let mut rng = Rng(99);
    let n = 30_011;
    let init: Vec<f32> = (0..n).map(|_| rng.f()).collect();
    let scaled: Vec<f32> = (0..n).map(|_| rng.f() * scale).collect();
    // Unfused reference: unscale, global norm, clip, then a plain step.
    let unscaled: Vec<f64> = scaled.iter().map(|&g| g as f64 / scale as f64).collect();
    let norm = unscaled.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!(norm > max_norm as f64, "the test must clip");
    let clip = max_norm as f64 / (norm + 1e-6);
    let clipped: Vec<f64> = unscaled.iter().map(|g| g * clip).collect();
    let mut r = Reference::new(init.iter().map(|&x| x as f64).collect(), vec![0.0; n], vec![0.0; n]);
    r.step(&cfg, 1, &clipped);
    // Fused: one multiplier.
    let mut scaler = LossScaler::new(ScalerConfig {
        initial: scale,
        ..ScalerConfig::default()
    });
    let sq = opt.grad_sq_sum(Grads::F32(&scaled));
    let StepPlan::Apply { grad_mult, grad_norm } = opt.plan(sq, Some(&mut scaler), Some(max_norm)) else {
        panic!("finite gradients must not be skipped");
    };
    assert!(((grad_norm as f64) - norm).abs() / norm < 1e-6, "{grad_norm} vs {norm}");
    let mut p = init.clone();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    opt.update(1, grad_mult, &mut p, &mut m, &mut v, Grads::F32(&scaled), ParamsOut::None).unwrap();
    let worst = p.iter().zip(&r.p).zip(&r.scale_p).map(|((&a, &b), &s)| (a as f64 - b).abs() / s).fold(0.0, f64::max);
    assert!(worst <= 1e-6, "relative error {worst:e}");
}

#[test]
fn mismatched_slices_are_an_error_not_a_panic() {
    let opt = CpuAdam::new(AdamConfig::default(), Some(1)).unwrap();
    let (mut p, mut m, mut v) = (vec![0f32; 10], vec![0f32; 10], vec![0f32; 9]);
    let g = vec![0f32; 10];
    assert!(opt.update(1, 1.0, &mut p, &mut m, &mut v, Grads::F32(&g), ParamsOut::None).is_err());
}

#[test]
fn sgd_with_momentum_matches_its_formula() {
    let mut rng = Rng(5);
    let n = 1001;
    let mut p: Vec<f32> = (0..n).map(|_| rng.f()).collect();
    let mut buf = vec![0f32; n];
    let mut rp: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let mut rb = vec![0f64; n];
    for _ in 0..50 {
        let g: Vec<f32> = (0..n).map(|_| rng.f()).collect();
        sgd_momentum(&mut p, &mut buf, Grads::F32(&g), 0.01, 0.9, 0.5).unwrap();
        for i in 0..n {
            rb[i] = 0.9 * rb[i] + g[i] as f64 * 0.5;
            rp[i] -= 0.01 * rb[i];
        }
    }
    let diff: f64 = p.iter().zip(&rp).map(|(&a, &b)| (a as f64 - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = rp.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(diff / norm < 1e-6, "{:e}", diff / norm);
    assert!(sgd_momentum(&mut p, &mut buf[..10], Grads::F32(&[0.0; 1001]), 0.1, 0.9, 1.0).is_err());
}
