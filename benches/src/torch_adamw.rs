//! libtorch's fused AdamW (`at::_fused_adamw_`, the kernel behind
//! `torch.optim.AdamW(fused=True)`), called in-process on tensors tch owns, for the optimizer
//! benchmark's comparison. tch 0.24 binds no `_fused_adamw_`; `csrc/fused_adamw.cpp` is the
//! shim, compiled by the build script against the same libtorch.

use std::ffi::{c_char, c_int, c_void, CStr};

use tch::{Kind, Tensor};

extern "C" {
    fn stowage_fused_adamw(
        param: *mut c_void,
        grad: *mut c_void,
        exp_avg: *mut c_void,
        exp_avg_sq: *mut c_void,
        step: *mut c_void,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// AdamW hyperparameters, as torch names them.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl From<&stowage_memory::optim::AdamConfig> for Hyper {
    /// The same hyperparameters as our AdamW's (decoupled decay, as AdamW).
    fn from(c: &stowage_memory::optim::AdamConfig) -> Self {
        Hyper {
            lr: c.lr as f64,
            beta1: c.beta1 as f64,
            beta2: c.beta2 as f64,
            eps: c.eps as f64,
            weight_decay: c.weight_decay as f64,
        }
    }
}

/// One parameter tensor with its gradient and moments, stepped by libtorch's fused AdamW.
pub struct FusedAdamW {
    pub param: Tensor,
    pub grad: Tensor,
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
    /// The step count as torch keeps it: an fp32 scalar tensor, incremented before each step
    /// (as `torch.optim.AdamW` does before calling the kernel).
    step: Tensor,
    hyper: Hyper,
}

impl FusedAdamW {
    /// fp32 CPU tensors copied from the given values; moments start at zero.
    pub fn new(param: &[f32], grad: &[f32], hyper: Hyper) -> Self {
        FusedAdamW {
            param: Tensor::from_slice(param),
            grad: Tensor::from_slice(grad),
            exp_avg: Tensor::zeros([param.len() as i64], (Kind::Float, tch::Device::Cpu)),
            exp_avg_sq: Tensor::zeros([param.len() as i64], (Kind::Float, tch::Device::Cpu)),
            step: Tensor::zeros([], (Kind::Float, tch::Device::Cpu)),
            hyper,
        }
    }

    /// One fused AdamW step; an error when the tensors do not match (the kernel itself does not
    /// check sizes: a short gradient would be read past its end) or libtorch refuses.
    pub fn step(&mut self) -> Result<(), String> {
        let want = self.param.size();
        for (name, t) in [("grad", &self.grad), ("exp_avg", &self.exp_avg), ("exp_avg_sq", &self.exp_avg_sq)] {
            if t.size() != want || t.kind() != self.param.kind() || t.device() != self.param.device() {
                return Err(format!(
                    "fused AdamW: {name} is {:?} {:?} on {:?}, the parameter {:?} {:?} on {:?}",
                    t.size(),
                    t.kind(),
                    t.device(),
                    want,
                    self.param.kind(),
                    self.param.device()
                ));
            }
        }
        let _ = self.step.f_add_scalar_(1.0).map_err(|e| e.to_string())?;
        let mut err = [0 as c_char; 512];
        let h = self.hyper;
        // SAFETY: every pointer is an `at::Tensor*` owned by a live tch `Tensor` in `self`,
        // borrowed mutably for the call (the shim keeps no reference); sizes, dtypes and devices
        // were checked equal above, so the kernel reads and writes within each tensor; libtorch
        // exceptions become a message in `err` (NUL-terminated by snprintf within `err.len()`).
        let rc = unsafe {
            stowage_fused_adamw(
                self.param.as_mut_ptr().cast(),
                self.grad.as_mut_ptr().cast(),
                self.exp_avg.as_mut_ptr().cast(),
                self.exp_avg_sq.as_mut_ptr().cast(),
                self.step.as_mut_ptr().cast(),
                h.lr,
                h.beta1,
                h.beta2,
                h.weight_decay,
                h.eps,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: the shim wrote a NUL-terminated string into `err` before returning non-zero.
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
        Err(format!("libtorch _fused_adamw_: {}", msg.to_string_lossy()))
    }

    /// The parameter's current values.
    pub fn param_values(&self) -> Vec<f32> {
        Vec::<f32>::try_from(&self.param).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_memory::optim::{AdamConfig, CpuAdam, Grads, ParamsOut};

    /// The comparison is only fair if both sides compute the same thing: three steps of
    /// libtorch's fused AdamW equal ours within 1e-6 relative (an error-free shim call, the
    /// same hyperparameters, the same bias correction and decoupled decay).
    #[test]
    fn fused_adamw_matches_ours() {
        let n = 10_007;
        let p0: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let g: Vec<f32> = (0..n).map(|i| ((i * 104_729) % 997) as f32 / 498.5 - 1.0).collect();
        let cfg = AdamConfig::default();
        let hyper = Hyper::from(&cfg);
        let mut torch = FusedAdamW::new(&p0, &g, hyper);
        let ours_opt = CpuAdam::new(cfg, Some(1)).unwrap();
        let mut p = p0.clone();
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        for step in 1..=3u64 {
            torch.step().unwrap();
            ours_opt.update(step, 1.0, &mut p, &mut m, &mut v, Grads::F32(&g), ParamsOut::None).unwrap();
        }
        let t = torch.param_values();
        assert_eq!(t.len(), n);
        let moved = p.iter().zip(&p0).filter(|(a, b)| a != b).count();
        assert!(moved > n / 2, "the steps moved only {moved} of {n} parameters");
        for (i, (a, b)) in p.iter().zip(&t).enumerate() {
            assert!((a - b).abs() <= 1e-6 * a.abs().max(1e-3), "param {i}: ours {a}, torch {b}");
        }
    }

    #[test]
    fn a_mismatched_call_is_an_error_not_a_crash() {
        let hyper = Hyper { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut t = FusedAdamW::new(&[1.0; 8], &[0.5; 8], hyper);
        t.grad = Tensor::from_slice(&[0.5f32; 5]);
        let e = t.step().unwrap_err();
        assert!(e.contains("grad is [5]") && e.contains("parameter [8]"), "{e}");
        // The parameter was not touched.
        assert_eq!(t.param_values(), vec![1.0; 8]);
        // Matching tensors of a kind the kernel does not take: libtorch's own error comes back.
        for x in [&mut t.param, &mut t.grad, &mut t.exp_avg, &mut t.exp_avg_sq] {
            *x = Tensor::from_slice(&[1i64; 8]);
        }
        let e = t.step().unwrap_err();
        assert!(e.starts_with("libtorch _fused_adamw_: ") && e.len() > 30, "{e}");
    }
}
