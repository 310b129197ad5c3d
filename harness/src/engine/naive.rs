//! The plain-PyTorch baseline: every parameter, gradient and moment on the compute device as
//! ordinary libtorch tensors, one autograd graph over the whole model, AdamW as libtorch ops.
//! Parameters are fp32 (masters); bf16/fp16 compute runs under libtorch's autocast on CUDA, as
//! `torch.autocast` users do. On the CPU it computes in fp32.

use std::collections::BTreeMap;

use stowage_memory::optim::{LossScaler, StepScalars};
use stowage_memory::DType;
use tch::{Device, Kind, Tensor};

use super::{frozen_error, plan, Engine, MemoryReport, ModelSpec, StepStats, TrainOpts};
use crate::error::{HarnessError, Result};
use crate::model::{block, embed, forward_all, head, init_tensor, KvCache};
use crate::optim::{adamw_, sq_norm};

pub struct Naive {
    spec: ModelSpec,
    device: Device,
    opts: TrainOpts,
    params: Vec<Tensor>,
    /// Indices of the parameters that train, and their moments (parallel).
    train: Vec<usize>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    scaler: Option<LossScaler>,
    autocast: bool,
    /// LoRA adapters applied (see `Engine::set_adapters`).
    adapters_on: bool,
    /// During generation with a decoding precision: the parameters in it (see
    /// `Engine::claim_parameters`).
    gen: Option<Vec<Tensor>>,
    notes: Vec<String>,
}

impl Naive {
    /// Initialises the parameters from `seed`.
    pub fn new(spec: ModelSpec, device: Device, opts: TrainOpts, seed: u64) -> Result<Self> {
        let mut params = Vec::with_capacity(spec.params.len());
        let mut train = Vec::new();
        let mut m = Vec::new();
        let mut v = Vec::new();
        let autocast = opts.trainable && opts.dtype != DType::F32 && device.is_cuda();
        for (i, p) in spec.params.iter().enumerate() {
            let t = init_tensor(p, seed, p.stream).f_to_device(device)?;
            if opts.trainable && p.trainable {
                m.push(t.f_zeros_like()?);
                v.push(t.f_zeros_like()?);
                train.push(i);
                params.push(t.set_requires_grad(true));
            } else if !opts.trainable || autocast {
                // Inference-only (or a LoRA model's frozen base under autocast): stored in the
                // compute dtype, like the chunked strategy, as a peft user loads the base in it.
                params.push(t.f_to_kind(crate::bridge::kind_of(opts.dtype))?);
            } else {
                params.push(t);
            }
        }
        let mut notes = Vec::new();
        if opts.trainable && opts.dtype != DType::F32 && !autocast {
            notes.push(format!("naive: {:?} autocast needs CUDA; computing in fp32", opts.dtype));
        }
        Ok(Naive {
            spec,
            device,
            scaler: if autocast { opts.scaler() } else { None },
            opts,
            params,
            train,
            m,
            v,
            step: 0,
            autocast,
            adapters_on: true,
            gen: None,
            notes,
        })
    }

    fn run(&self, ids: &Tensor) -> Tensor {
        let f = || forward_all(&self.spec.cfg, self.spec.head, &self.spec.units, &self.params, self.spec.lora_scale_if(self.adapters_on), ids).to_kind(Kind::Float);
        if self.autocast {
            tch::autocast(true, f)
        } else {
            f()
        }
    }
}

impl Engine for Naive {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn device(&self) -> Device {
        self.device
    }

    fn forward(&mut self, ids: &Tensor) -> Result<Tensor> {
        Ok(tch::no_grad(|| self.run(ids)))
    }

    fn forward_cached(&mut self, ids: &Tensor, cache: &mut [KvCache], pos: i64) -> Result<Tensor> {
        // Single tokens decode through the copy; a prompt reads the parameters.
        let p = match &self.gen {
            Some(g) if ids.size().get(1) == Some(&1) => g,
            _ => &self.params,
        };
        let (u, c) = (&self.spec.units, &self.spec.cfg);
        let scale = self.spec.lora_scale_if(self.adapters_on);
        Ok(tch::no_grad(|| {
            let mut x = embed(&p[0], &p[1], ids, pos);
            for (r, kv) in u.blocks.iter().zip(cache.iter_mut()) {
                x = block(&p[r.clone()], &x, c.n_head, scale, Some(kv));
            }
            head(self.spec.head, &p[u.head.clone()], Some(&p[0]), &x).to_kind(Kind::Float)
        }))
    }

    fn step(&mut self, ids: &Tensor, loss: &dyn Fn(&Tensor) -> Tensor) -> Result<StepStats> {
        if !self.opts.trainable {
            return Err(frozen_error());
        }
        self.gen = None;
        let l = loss(&self.run(ids));
        let value = l.f_double_value(&[])?;
        let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale as f64);
        let scaled = if scale != 1.0 { &l * scale } else { l };
        let leaves: Vec<&Tensor> = self.train.iter().map(|&i| &self.params[i]).collect();
        let grads = Tensor::f_run_backward(&[&scaled], &leaves, false, false)?;
        let sq: f64 = grads.iter().map(sq_norm).sum();
        let (mult, grad_norm) = plan(sq, self.scaler.as_mut(), self.opts.max_norm);
        let Some(mult) = mult else {
            return Ok(StepStats {
                loss: value,
                grad_norm,
                skipped: true,
            });
        };
        self.step += 1;
        let s = StepScalars::new(&self.opts.adam, self.step, mult);
        for (((&i, m), v), g) in self.train.iter().zip(&mut self.m).zip(&mut self.v).zip(&grads) {
            adamw_(&mut self.params[i], m, v, g, None, &s);
        }
        Ok(StepStats {
            loss: value,
            grad_norm,
            skipped: false,
        })
    }

    fn export(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (s, p) in self.spec.params.iter().zip(&self.params) {
            out.push((s.name.clone(), p.detach().f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?.copy()));
        }
        Ok(out)
    }

    fn import(&mut self, named: &BTreeMap<String, Tensor>) -> Result<()> {
        self.gen = None;
        for (s, p) in self.spec.params.iter().zip(&mut self.params) {
            if let Some(t) = named.get(&s.name) {
                check_shape(&s.name, &s.shape_i64(), t)?;
                tch::no_grad(|| p.f_copy_(t)).map_err(HarnessError::from)?;
            }
        }
        Ok(())
    }

    fn export_optimizer(&mut self) -> Result<(u64, Vec<(String, Tensor)>)> {
        if !self.opts.trainable {
            return Err(frozen_error());
        }
        let mut out = Vec::new();
        for ((&i, m), v) in self.train.iter().zip(&self.m).zip(&self.v) {
            let s = &self.spec.params[i];
            out.push((format!("{}.exp_avg", s.name), m.to_device(Device::Cpu).copy()));
            out.push((format!("{}.exp_avg_sq", s.name), v.to_device(Device::Cpu).copy()));
        }
        Ok((self.step, out))
    }

    fn import_optimizer(&mut self, step: u64, named: &BTreeMap<String, Tensor>) -> Result<()> {
        if !self.opts.trainable {
            return Err(frozen_error());
        }
        for ((&i, m), v) in self.train.iter().zip(&mut self.m).zip(&mut self.v) {
            let s = &self.spec.params[i];
            for (suffix, dst) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let name = format!("{}.{suffix}", s.name);
                let t = named.get(&name).ok_or_else(|| HarnessError::Config(format!("optimizer state lacks {name}")))?;
                check_shape(&name, &s.shape_i64(), t)?;
                dst.f_copy_(t)?;
            }
        }
        self.step = step;
        Ok(())
    }

    fn memory(&self) -> MemoryReport {
        MemoryReport::default()
    }

    fn steps(&self) -> u64 {
        self.step
    }

    fn scaler_state(&self) -> Option<crate::ckpt::ScalerState> {
        super::scaler_state(self.scaler.as_ref())
    }

    fn set_scaler_state(&mut self, st: crate::ckpt::ScalerState) {
        super::set_scaler_state(self.scaler.as_mut(), st);
    }

    fn set_lr(&mut self, lr: f32) {
        self.opts.adam.lr = lr;
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }

    fn claim_parameters(&mut self) -> Result<()> {
        let Some(d) = self.opts.gen_dtype else { return Ok(()) };
        let linear = self.spec.units.linear_weights();
        let kind = crate::bridge::kind_of(d);
        self.gen = Some(tch::no_grad(|| {
            self.params.iter().enumerate().map(|(i, p)| decode_copy(p, linear.contains(&i), kind)).collect::<Result<Vec<Tensor>>>()
        })?);
        Ok(())
    }

    fn end_generation(&mut self) -> Result<()> {
        self.gen = None;
        Ok(())
    }

    fn set_adapters(&mut self, on: bool) -> Result<()> {
        if self.spec.lora.is_none() {
            return Err(super::no_adapters_error());
        }
        self.adapters_on = on;
        Ok(())
    }
}

/// `p` in `kind` for decoding; a linear weight (`[in, out]`, applied as `x W`) is stored
/// transposed and returned as a transposed view, the layout libtorch's 16-bit CPU kernels take
/// their fast path on (tens of times faster than `[in, out]` at a handful of rows).
pub(crate) fn decode_copy(p: &Tensor, linear: bool, kind: Kind) -> Result<Tensor> {
    Ok(if linear { p.tr().f_to_kind(kind)?.f_contiguous()?.tr() } else { p.f_to_kind(kind)? })
}

/// A loaded tensor must have the parameter's shape.
pub(crate) fn check_shape(name: &str, want: &[i64], t: &Tensor) -> Result<()> {
    if t.size() != want {
        return Err(HarnessError::Config(format!("{name}: the checkpoint has shape {:?}, the model needs {want:?}", t.size())));
    }
    Ok(())
}
