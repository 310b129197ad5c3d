//! Training strategies behind one interface: `naive` (everything on the compute device, plain
//! autograd, AdamW as libtorch ops: what a PyTorch user writes) and `chunked` (parameters and
//! optimizer state in Stowage chunks, blocks executed one at a time with recompute).

pub mod chunked;
mod footprint;
pub mod naive;
pub mod turns;
mod update;

use std::collections::BTreeMap;

use serde::Serialize;
use stowage_memory::optim::{AdamConfig, LossScaler, ScalerConfig};
use stowage_memory::DType;
use tch::{Device, Tensor};

use crate::error::Result;
use crate::model::{lora_specs, param_specs, units, GptConfig, HeadKind, KvCache, LoraConfig, ParamSpec, Units};

/// A model's shape, head and parameter list.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub cfg: GptConfig,
    pub head: HeadKind,
    /// Low-rank adapters over a frozen base (`params` then holds both).
    pub lora: Option<LoraConfig>,
    pub params: Vec<ParamSpec>,
    pub units: Units,
}

impl ModelSpec {
    pub fn new(cfg: GptConfig, head: HeadKind) -> Self {
        Self::with_lora(cfg, head, None)
    }

    /// The model with adapters on a frozen base when `lora` is given.
    pub fn with_lora(cfg: GptConfig, head: HeadKind, lora: Option<LoraConfig>) -> Self {
        let mut params = param_specs(&cfg, head);
        if let Some(l) = lora {
            params = lora_specs(params, l);
        }
        let units = units(&params, cfg.n_layer);
        ModelSpec { cfg, head, lora, params, units }
    }

    pub fn numel(&self) -> u64 {
        self.params.iter().map(|p| p.numel() as u64).sum()
    }

    /// Parameters that train (all of them without LoRA).
    pub fn trainable_numel(&self) -> u64 {
        self.params.iter().filter(|p| p.trainable).map(|p| p.numel() as u64).sum()
    }

    /// The adapters' output multiplier (0 without adapters).
    pub fn lora_scale(&self) -> f64 {
        self.lora.map_or(0.0, |l| l.scale())
    }

    /// The multiplier with the adapters switched `on` or off.
    pub(crate) fn lora_scale_if(&self, on: bool) -> f64 {
        if on {
            self.lora_scale()
        } else {
            0.0
        }
    }
}

/// Optimisation settings shared by both strategies.
#[derive(Debug, Clone, Copy)]
pub struct TrainOpts {
    /// Compute precision of the parameters.
    pub dtype: DType,
    pub adam: AdamConfig,
    /// Global gradient-norm clipping.
    pub max_norm: Option<f32>,
    /// False for inference-only models (a PPO reference or reward model): no gradients, no
    /// optimizer state; their chunks are only ever read.
    pub trainable: bool,
    /// Precision of a copy of the weights made for decoding (see [`Engine::claim_parameters`]);
    /// None: decoding reads the parameters themselves.
    pub gen_dtype: Option<DType>,
}

impl Default for TrainOpts {
    fn default() -> Self {
        TrainOpts {
            dtype: DType::F32,
            adam: AdamConfig::default(),
            max_norm: Some(1.0),
            trainable: true,
            gen_dtype: None,
        }
    }
}

impl TrainOpts {
    /// Settings of an inference-only model in `dtype`.
    pub fn frozen(dtype: DType) -> Self {
        TrainOpts {
            dtype,
            trainable: false,
            ..TrainOpts::default()
        }
    }
}

impl TrainOpts {
    /// fp16 needs dynamic loss scaling; fp32 and bf16 do not.
    pub fn scaler(&self) -> Option<LossScaler> {
        (self.dtype == DType::F16).then(|| LossScaler::new(ScalerConfig::default()))
    }
}

/// What one optimisation step did.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepStats {
    pub loss: f64,
    pub grad_norm: f64,
    /// The step was skipped (fp16 overflow).
    pub skipped: bool,
}

/// Memory figures of an engine.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryReport {
    /// Peak bytes on the compute device (chunks plus, on CUDA, libtorch's allocations).
    pub device_peak_bytes: u64,
    /// Bytes moved per link (`host->device`, ...).
    pub bytes_moved: BTreeMap<String, u64>,
    /// Per tier: used / peak / capacity.
    pub tiers: BTreeMap<String, serde_json::Value>,
}

/// A trainable model under one strategy. Loss functions receive the head's output: logits
/// `[B, T, V]` (fp32) for the LM head, one value per token `[B, T]` otherwise.
pub trait Engine {
    fn spec(&self) -> &ModelSpec;
    /// Where inputs must live.
    fn device(&self) -> Device;
    /// The head's output for `ids` `[B, T]`, without gradients, as fp32.
    fn forward(&mut self, ids: &Tensor) -> Result<Tensor>;
    /// Incremental decoding: the head's output for the new positions `ids` `[B, t]` starting
    /// at position `pos`, reading and extending one key/value cache per block.
    fn forward_cached(&mut self, ids: &Tensor, cache: &mut [KvCache], pos: i64) -> Result<Tensor>;
    /// One optimisation step on `loss(head output)`.
    fn step(&mut self, ids: &Tensor, loss: &dyn Fn(&Tensor) -> Tensor) -> Result<StepStats>;
    /// Waits for work `step` left running in the background (the chunked strategy's optimizer
    /// update); every other call waits for it too. Its error, if it failed.
    fn settle(&self) -> Result<()> {
        Ok(())
    }
    /// Every parameter as a CPU fp32 tensor, by HF name, in spec order.
    fn export(&mut self) -> Result<Vec<(String, Tensor)>>;
    /// Sets parameters from CPU tensors (missing names keep their values; the caller checks
    /// completeness).
    fn import(&mut self, named: &BTreeMap<String, Tensor>) -> Result<()>;
    /// Optimizer moments as `NAME.exp_avg` / `NAME.exp_avg_sq` fp32 CPU tensors, plus the step.
    fn export_optimizer(&mut self) -> Result<(u64, Vec<(String, Tensor)>)>;
    fn import_optimizer(&mut self, step: u64, named: &BTreeMap<String, Tensor>) -> Result<()>;
    /// The memory figures so far. A snapshot: work left running in the background counts as far
    /// as it has gone; call [`Engine::settle`] first for final figures.
    fn memory(&self) -> MemoryReport;
    /// Steps taken so far.
    fn steps(&self) -> u64;
    /// Sets the learning rate of the next steps (schedules).
    fn set_lr(&mut self, lr: f32);
    /// The fp16 loss scaler's state (None without one), for checkpoints.
    fn scaler_state(&self) -> Option<crate::ckpt::ScalerState>;
    /// Restores the loss scaler's state from a checkpoint (ignored without a scaler).
    fn set_scaler_state(&mut self, s: crate::ckpt::ScalerState);
    /// A notice for the user (fallbacks taken), if any.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// The recorded timeline (Chrome trace JSON), when the engine records one.
    fn trace(&self) -> Option<serde_json::Value> {
        None
    }
    /// Starts the recorded timeline afresh (no-op without one).
    fn reset_trace(&self) {}
    /// Switches a LoRA model's adapters off (the model computes its frozen base alone: a PPO
    /// reference without a copy of the weights) or back on. A model without adapters refuses.
    fn set_adapters(&mut self, on: bool) -> Result<()>;
    /// About to read the parameters many times over (generation): where budgets are shared
    /// with other models, take room for all of them. With a decoding precision
    /// ([`TrainOpts::gen_dtype`]), calls of `forward_cached` until [`Engine::end_generation`]
    /// read the prompt through the parameters, making the 16-bit copy as they go, and decode
    /// single tokens through the copy.
    fn claim_parameters(&mut self) -> Result<()> {
        Ok(())
    }
    /// Generation is over: the decoding copy, if any, is dropped (never written anywhere).
    fn end_generation(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The error of `set_adapters` on a model without adapters.
pub(crate) fn no_adapters_error() -> crate::error::HarnessError {
    crate::error::HarnessError::Config("this model has no LoRA adapters to switch".into())
}

/// The step's gradient multiplier, or None to skip (non-finite gradients). `sq` is the summed
/// squared norm of the (scaled) gradients.
pub(crate) fn plan(sq: f64, scaler: Option<&mut LossScaler>, max_norm: Option<f32>) -> (Option<f32>, f64) {
    let scale = scaler.as_ref().map_or(1.0, |s| s.scale);
    let overflow = !sq.is_finite();
    let apply = match scaler {
        Some(s) => s.update(overflow),
        None => !overflow,
    };
    let norm = sq.sqrt() / scale as f64;
    if !apply {
        return (None, norm);
    }
    (Some(stowage_memory::optim::grad_multiplier(sq, scale, max_norm)), norm)
}

pub(crate) fn scaler_state(s: Option<&LossScaler>) -> Option<crate::ckpt::ScalerState> {
    s.map(|s| crate::ckpt::ScalerState {
        scale: s.scale,
        clean_steps: s.clean_steps,
        hysteresis_left: s.hysteresis_left,
    })
}

pub(crate) fn set_scaler_state(s: Option<&mut LossScaler>, st: crate::ckpt::ScalerState) {
    if let Some(s) = s {
        s.scale = st.scale;
        s.clean_steps = st.clean_steps;
        s.hysteresis_left = st.hysteresis_left;
    }
}

/// The error of a training call on an inference-only model.
pub(crate) fn frozen_error() -> crate::error::HarnessError {
    crate::error::HarnessError::Config("this model is inference-only (frozen): it has no gradients or optimizer state".into())
}

/// Picks the libtorch device for a strategy: CUDA when libtorch sees one, else CPU (with a
/// notice).
pub fn torch_device() -> (Device, Option<String>) {
    if tch::Cuda::is_available() {
        (Device::Cuda(0), None)
    } else {
        (Device::Cpu, Some("no CUDA device visible to libtorch: computing on the CPU".into()))
    }
}

pub use chunked::{Chunked, ChunkedOpts};
pub use naive::Naive;

#[cfg(test)]
mod tests;
