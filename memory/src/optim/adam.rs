//! AdamW (and Adam) over flat slices: the fp32 master, both fp32 moments, gradients in fp32,
//! bf16 or fp16, and optionally the compute-precision copy of the parameters, all updated in
//! one sweep. The loop body is plain Rust compiled several times with different target features
//! (AVX-512, AVX2+FMA, portable) and picked at run time; the compiler vectorises it.

use super::convert::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Decoupled weight decay (AdamW); otherwise L2 added to the gradient (Adam).
    pub decoupled: bool,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decoupled: true,
        }
    }
}

/// Gradients in their stored precision (bf16/fp16 as raw bits).
#[derive(Debug, Clone, Copy)]
pub enum Grads<'a> {
    F32(&'a [f32]),
    BF16(&'a [u16]),
    F16(&'a [u16]),
}

impl Grads<'_> {
    pub fn len(&self) -> usize {
        match self {
            Grads::F32(g) => g.len(),
            Grads::BF16(g) | Grads::F16(g) => g.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The sub-range `[a, b)`.
    pub fn slice(&self, a: usize, b: usize) -> Self {
        match self {
            Grads::F32(g) => Grads::F32(&g[a..b]),
            Grads::BF16(g) => Grads::BF16(&g[a..b]),
            Grads::F16(g) => Grads::F16(&g[a..b]),
        }
    }
}

/// Where the updated parameters' compute-precision copy goes.
#[derive(Debug)]
pub enum ParamsOut<'a> {
    None,
    F32(&'a mut [f32]),
    BF16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

/// Per-step scalars, computed once (in f64, rounded once). A GPU-side update of chunks whose
/// state sits on the device uses the same ones, so both paths agree:
/// `g' = g * grad_mult + l2 * p; m = beta1 m + om_beta1 g'; v = beta2 v + om_beta2 g'^2;
///  p -= lr_wd * p + step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepScalars {
    /// Multiplies every gradient: loss-scale unscaling and clipping folded together.
    pub grad_mult: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// 1 - beta1 and 1 - beta2, rounded once from f64.
    pub om_beta1: f32,
    pub om_beta2: f32,
    /// lr / (1 - beta1^t)
    pub step_size: f32,
    /// 1 / sqrt(1 - beta2^t)
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
    /// lr * wd for decoupled decay (0 otherwise); subtracted as `lr_wd * p`, since multiplying
    /// by an f32 `1 - lr * wd` would drift by its rounding every step.
    pub lr_wd: f32,
    /// wd for coupled (L2) decay (0 otherwise).
    pub l2: f32,
}

impl StepScalars {
    /// The scalars of step `step` (from 1) with gradient multiplier `grad_mult`.
    pub fn new(c: &AdamConfig, step: u64, grad_mult: f32) -> Self {
        let t = step.max(1) as i32;
        let bc1 = 1.0 - (c.beta1 as f64).powi(t);
        let bc2 = 1.0 - (c.beta2 as f64).powi(t);
        StepScalars {
            grad_mult,
            beta1: c.beta1,
            beta2: c.beta2,
            om_beta1: (1.0 - c.beta1 as f64) as f32,
            om_beta2: (1.0 - c.beta2 as f64) as f32,
            step_size: (c.lr as f64 / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: c.eps,
            lr_wd: if c.decoupled { (c.lr as f64 * c.weight_decay as f64) as f32 } else { 0.0 },
            l2: if c.decoupled { 0.0 } else { c.weight_decay },
        }
    }
}

#[inline(always)]
fn update(s: &StepScalars, p: &mut f32, m: &mut f32, v: &mut f32, g: f32) -> f32 {
    let g = g * s.grad_mult + s.l2 * *p;
    let mi = s.beta1 * *m + s.om_beta1 * g;
    let vi = s.beta2 * *v + s.om_beta2 * g * g;
    let denom = vi.sqrt() * s.inv_sqrt_bc2 + s.eps;
    let pi = *p - (s.lr_wd * *p + s.step_size * mi / denom);
    *m = mi;
    *v = vi;
    *p = pi;
    pi
}

/// An output slice and the conversion that fills it.
type Out<'a, O> = Option<(&'a mut [O], fn(f32) -> O)>;

/// The loop over one chunk: zipped iterators (no bounds checks), one loop per gradient and
/// output type so the body is branch-free and the compiler vectorises it.
#[inline(always)]
fn sweep_typed<G: Copy, O>(s: &StepScalars, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[G], conv: impl Fn(G) -> f32, out: Out<'_, O>) {
    match out {
        Some((o, store)) => {
            for ((((p, m), v), &g), o) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g).zip(o.iter_mut()) {
                *o = store(update(s, p, m, v, conv(g)));
            }
        }
        None => {
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                update(s, p, m, v, conv(g));
            }
        }
    }
}

#[inline(always)]
fn identity(x: f32) -> f32 {
    x
}

macro_rules! sweep_body {
    ($s:expr, $p:expr, $m:expr, $v:expr, $g:expr, $out:expr) => {{
        let (s, p, m, v) = ($s, $p, $m, $v);
        macro_rules! with_out {
            ($gs:expr, $conv:expr) => {
                match $out {
                    ParamsOut::None => sweep_typed::<_, f32>(s, p, m, v, $gs, $conv, None),
                    ParamsOut::F32(o) => sweep_typed(s, p, m, v, $gs, $conv, Some((&mut **o, identity as fn(f32) -> f32))),
                    ParamsOut::BF16(o) => sweep_typed(s, p, m, v, $gs, $conv, Some((&mut **o, f32_to_bf16 as fn(f32) -> u16))),
                    ParamsOut::F16(o) => sweep_typed(s, p, m, v, $gs, $conv, Some((&mut **o, f32_to_f16 as fn(f32) -> u16))),
                }
            };
        }
        match $g {
            Grads::F32(g) => with_out!(g, identity),
            Grads::BF16(g) => with_out!(g, bf16_to_f32),
            Grads::F16(g) => with_out!(g, f16_to_f32),
        }
    }};
}

fn sweep_portable(s: &StepScalars, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads<'_>, out: &mut ParamsOut<'_>) {
    sweep_body!(s, p, m, v, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn sweep_avx2(s: &StepScalars, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads<'_>, out: &mut ParamsOut<'_>) {
    sweep_body!(s, p, m, v, g, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
fn sweep_avx512(s: &StepScalars, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads<'_>, out: &mut ParamsOut<'_>) {
    sweep_body!(s, p, m, v, g, out)
}

/// The instruction set the sweep uses on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

/// Detects the best instruction set once.
pub fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            return Isa::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// One sweep over equal-length slices with the given instruction set.
pub(crate) fn sweep(isa: Isa, s: &StepScalars, p: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads<'_>, out: &mut ParamsOut<'_>) {
    assert!(m.len() == p.len() && v.len() == p.len() && g.len() == p.len(), "slices of one chunk differ in length");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx512` is only produced by `detect_isa` after checking these features.
        Isa::Avx512 => unsafe { sweep_avx512(s, p, m, v, g, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2` is only produced by `detect_isa` after checking avx2 and fma.
        Isa::Avx2 => unsafe { sweep_avx2(s, p, m, v, g, out) },
        _ => sweep_portable(s, p, m, v, g, out),
    }
}
