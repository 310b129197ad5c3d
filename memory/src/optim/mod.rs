//! The CPU optimizer: AdamW over the flat slices of paired chunks (fp32 master and moments,
//! gradients in fp32, bf16 or fp16), multi-threaded, with loss scaling and global-norm
//! clipping folded into one multiplier so the update is a single sweep.
//!
//! A step: gradients land chunk by chunk and [`grad_sq_sum`] runs on each (overflow shows as a
//! non-finite sum); once all are in, [`CpuAdam::plan`] turns the total into a decision (skip on
//! overflow, leaving every byte of state untouched) and the gradient multiplier; then
//! [`CpuAdam::update`] sweeps each chunk once.

mod adam;
pub mod convert;
mod scaler;
mod stream;

use rayon::prelude::*;

pub use adam::{detect_isa, AdamConfig, Grads, Isa, ParamsOut, StepScalars};
pub use scaler::{grad_multiplier, grad_sq_sum, LossScaler, ScalerConfig};
pub use stream::{update_streamed, NvmeState};

use crate::error::{Error, Result};

/// The fewest elements per parallel task (a multiple of 64 keeps every task's start cache-line
/// aligned).
const TASK: usize = 1 << 16;

/// The most elements per parallel task: 1 MiB of each fp32 stream.
const TASK_MAX: usize = 1 << 18;

/// Elements per parallel task for a sweep over `n`: about four tasks per thread, so a thread
/// slowed by a neighbour is helped by the others, between `TASK` and `TASK_MAX`. The sweep is
/// memory-bound and short tasks cost bandwidth, since each switch restarts the hardware
/// prefetchers' seven streams: with 2 threads on 64M parameters, 64K-element tasks ran ~8%
/// slower than 256K-element ones.
fn task_len(n: usize, threads: usize) -> usize {
    n.div_ceil(threads.max(1) * 4).div_ceil(64).saturating_mul(64).clamp(TASK, TASK_MAX)
}

/// What a step will do.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepPlan {
    /// Apply the update with this gradient multiplier (unscale x clip).
    Apply { grad_mult: f32, grad_norm: f32 },
    /// Gradients overflowed: skip; state must stay untouched.
    Skip,
}

/// AdamW on the CPU over chunk slices.
pub struct CpuAdam {
    pub cfg: AdamConfig,
    isa: Isa,
    pool: rayon::ThreadPool,
}

impl CpuAdam {
    /// `threads`: worker threads (None: one per core).
    pub fn new(cfg: AdamConfig, threads: Option<usize>) -> Result<Self> {
        let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("stowage-adam-{i}"));
        if let Some(t) = threads {
            b = b.num_threads(t.max(1));
        }
        let pool = b
            .build()
            .map_err(|e| Error::unsupported("starting the optimizer's threads", e.to_string()))?;
        Ok(CpuAdam {
            cfg,
            isa: detect_isa(),
            pool,
        })
    }

    /// Uses a lower instruction set than detected (for comparisons); refuses a higher one.
    pub fn with_isa(mut self, isa: Isa) -> Result<Self> {
        let rank = |i: Isa| match i {
            Isa::Portable => 0,
            Isa::Avx2 => 1,
            Isa::Avx512 => 2,
        };
        if rank(isa) > rank(detect_isa()) {
            return Err(Error::unsupported(format!("the {isa:?} kernel"), format!("this CPU supports up to {:?}", detect_isa())));
        }
        self.isa = isa;
        Ok(self)
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Turns the summed squared norms of all (scaled) gradients into the step's decision,
    /// updating the scaler. `scaler`: None for bf16/fp32 training (no scaling).
    pub fn plan(&self, grad_sq_sum: f64, scaler: Option<&mut LossScaler>, max_norm: Option<f32>) -> StepPlan {
        let overflow = !grad_sq_sum.is_finite();
        let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
        if let Some(s) = scaler {
            if !s.update(overflow) {
                return StepPlan::Skip;
            }
        } else if overflow {
            return StepPlan::Skip;
        }
        StepPlan::Apply {
            grad_mult: grad_multiplier(grad_sq_sum, scale, max_norm),
            grad_norm: (grad_sq_sum.sqrt() / scale as f64) as f32,
        }
    }

    /// Updates one chunk's worth of state: `master`, `m`, `v` and the gradients have equal
    /// lengths; `out` (if any) receives the new parameters in compute precision. `step` counts
    /// from 1.
    #[allow(clippy::too_many_arguments)]
    pub fn update(&self, step: u64, grad_mult: f32, master: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads<'_>, out: ParamsOut<'_>) -> Result<()> {
        self.update_with(&self.cfg, step, grad_mult, master, m, v, g, out)
    }

    /// [`CpuAdam::update`] with the hyperparameters `cfg` instead of `self.cfg` (a step that
    /// runs in the background keeps the learning rate it was issued with).
    #[allow(clippy::too_many_arguments)]
    pub fn update_with(&self, cfg: &AdamConfig, step: u64, grad_mult: f32, master: &mut [f32], m: &mut [f32], v: &mut [f32], g: Grads<'_>, out: ParamsOut<'_>) -> Result<()> {
        let n = master.len();
        let out_len = match &out {
            ParamsOut::None => n,
            ParamsOut::F32(o) => o.len(),
            ParamsOut::BF16(o) | ParamsOut::F16(o) => o.len(),
        };
        if m.len() != n || v.len() != n || g.len() != n || out_len != n {
            return Err(Error::InvalidState(format!(
                "optimizer slices differ in length: master {n}, m {}, v {}, grads {}, out {out_len}",
                m.len(),
                v.len(),
                g.len()
            )));
        }
        let s = StepScalars::new(cfg, step, grad_mult);
        let isa = self.isa;
        let task = task_len(n, self.threads());
        let run = |p: &mut [f32], m: &mut [f32], v: &mut [f32], k: usize, mut o: ParamsOut<'_>| {
            let a = k * task;
            adam::sweep(isa, &s, p, m, v, g.slice(a, a + p.len()), &mut o);
        };
        self.pool.install(|| {
            let base = master.par_chunks_mut(task).zip(m.par_chunks_mut(task)).zip(v.par_chunks_mut(task)).enumerate();
            match out {
                ParamsOut::None => base.for_each(|(k, ((p, m), v))| run(p, m, v, k, ParamsOut::None)),
                ParamsOut::F32(o) => base.zip(o.par_chunks_mut(task)).for_each(|((k, ((p, m), v)), o)| run(p, m, v, k, ParamsOut::F32(o))),
                ParamsOut::BF16(o) => base.zip(o.par_chunks_mut(task)).for_each(|((k, ((p, m), v)), o)| run(p, m, v, k, ParamsOut::BF16(o))),
                ParamsOut::F16(o) => base.zip(o.par_chunks_mut(task)).for_each(|((k, ((p, m), v)), o)| run(p, m, v, k, ParamsOut::F16(o))),
            }
        });
        Ok(())
    }

    /// The squared-norm sum of a gradient slice, in parallel.
    pub fn grad_sq_sum(&self, g: Grads<'_>) -> f64 {
        let n = g.len();
        self.pool.install(|| {
            (0..n.div_ceil(TASK))
                .into_par_iter()
                .map(|k| grad_sq_sum(g.slice(k * TASK, ((k + 1) * TASK).min(n))))
                .sum()
        })
    }
}

/// Plain SGD with momentum (`buf = momentum * buf + g * grad_mult; p -= lr * buf`), for tests
/// and as a simple baseline. Single-threaded.
pub fn sgd_momentum(p: &mut [f32], buf: &mut [f32], g: Grads<'_>, lr: f32, momentum: f32, grad_mult: f32) -> Result<()> {
    if buf.len() != p.len() || g.len() != p.len() {
        return Err(Error::InvalidState(format!(
            "SGD slices differ in length: params {}, momentum {}, grads {}",
            p.len(),
            buf.len(),
            g.len()
        )));
    }
    let conv = |i: usize| match g {
        Grads::F32(g) => g[i],
        Grads::BF16(g) => convert::bf16_to_f32(g[i]),
        Grads::F16(g) => convert::f16_to_f32(g[i]),
    };
    for (i, (p, b)) in p.iter_mut().zip(buf.iter_mut()).enumerate() {
        *b = momentum * *b + conv(i) * grad_mult;
        *p -= lr * *b;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
