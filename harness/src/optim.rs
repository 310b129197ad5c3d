//! AdamW as libtorch ops on tensors: the naive strategy's optimizer, and the update of chunks
//! whose optimizer state sits on a GPU (views over device chunks). Same op sequence as
//! `torch.optim.AdamW` with `foreach=False` (PyTorch's default for CPU tensors), with the
//! scalars of the memory crate's [`StepScalars`] so both paths agree with the CPU kernel.

use stowage_memory::optim::StepScalars;
use tch::{Kind, Tensor};

/// One AdamW step in place. `master`, `m`, `v` are fp32; `grad` any float kind (converted);
/// `out`, when given, receives the new parameters in its own kind.
pub fn adamw_(master: &mut Tensor, m: &mut Tensor, v: &mut Tensor, grad: &Tensor, out: Option<&mut Tensor>, s: &StepScalars) {
    tch::no_grad(|| {
        let mut g = grad.to_kind(Kind::Float);
        if s.grad_mult != 1.0 {
            g = g.g_mul_scalar(s.grad_mult as f64); // not in place: `g` may alias the gradient
        }
        if s.l2 != 0.0 {
            g = g.g_add(&(&*master * s.l2 as f64));
        }
        let _ = m.g_mul_scalar_(s.beta1 as f64);
        let _ = m.g_add_(&(&g * s.om_beta1 as f64));
        let _ = v.g_mul_scalar_(s.beta2 as f64);
        let _ = v.addcmul_(&g, &(&g * s.om_beta2 as f64));
        let denom = v.sqrt() * s.inv_sqrt_bc2 as f64 + s.eps as f64;
        let mut step = m.g_div(&denom) * s.step_size as f64;
        if s.lr_wd != 0.0 {
            step = step.g_add(&(&*master * s.lr_wd as f64));
        }
        let _ = master.g_sub_(&step);
        if let Some(o) = out {
            o.copy_(master);
        }
    });
}

/// Squared L2 norm of a gradient, accumulated in f64.
pub fn sq_norm(g: &Tensor) -> f64 {
    tch::no_grad(|| g.to_kind(Kind::Double).square().sum(Kind::Double).double_value(&[]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_memory::optim::{AdamConfig, CpuAdam, Grads, ParamsOut};

    /// The libtorch-op update agrees with the memory crate's CPU kernel.
    #[test]
    fn torch_ops_match_the_cpu_kernel() {
        tch::manual_seed(7);
        let n = 1000usize;
        let cfg = AdamConfig {
            lr: 1e-2,
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        let adam = CpuAdam::new(cfg, Some(1)).unwrap();
        let p0 = Tensor::randn([n as i64], (Kind::Float, tch::Device::Cpu));
        let mut tp = p0.copy();
        let mut tm = Tensor::zeros([n as i64], (Kind::Float, tch::Device::Cpu));
        let mut tv = tm.copy();
        let mut cp: Vec<f32> = Vec::<f32>::try_from(&p0).unwrap();
        let mut cm = vec![0f32; n];
        let mut cv = vec![0f32; n];
        for step in 1..=20u64 {
            let g = Tensor::randn([n as i64], (Kind::Float, tch::Device::Cpu));
            let gv: Vec<f32> = Vec::<f32>::try_from(&g).unwrap();
            let s = StepScalars::new(&cfg, step, 0.5);
            adamw_(&mut tp, &mut tm, &mut tv, &g, None, &s);
            adam.update(step, 0.5, &mut cp, &mut cm, &mut cv, Grads::F32(&gv), ParamsOut::None).unwrap();
        }
        let tpv: Vec<f32> = Vec::<f32>::try_from(&tp).unwrap();
        for (a, b) in tpv.iter().zip(&cp) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }
}
