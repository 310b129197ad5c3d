//! The chunked strategy's optimizer update of one chunk set, and an update left running in the
//! background while other work computes (see `chunked.rs`).

use std::sync::{Arc, Mutex};

use stowage_memory::optim::{AdamConfig, CpuAdam, Grads, ParamsOut, StepScalars};
use stowage_memory::{ChunkRef, DType, Manager, Mode, Role};
use tch::{Device, Tensor};

use super::frozen_error;
use super::turns::Turns;
use crate::bridge::chunk_view;
use crate::error::{HarnessError, Result};
use crate::optim::adamw_;

fn f32s(b: &mut [u8]) -> Result<&mut [f32]> {
    bytemuck::try_cast_slice_mut(b).map_err(|e| HarnessError::Config(format!("chunk is not f32: {e}")))
}

fn u16s(b: &mut [u8]) -> Result<&mut [u16]> {
    bytemuck::try_cast_slice_mut(b).map_err(|e| HarnessError::Config(format!("chunk is not 16-bit: {e}")))
}

/// What a chunk's optimizer update needs, shared with the thread that runs it in the
/// background.
pub(super) struct Updater {
    pub(super) mgr: Arc<Manager>,
    /// The trainable group, if any.
    pub(super) group: Option<usize>,
    pub(super) roles: Vec<(Role, DType)>,
    pub(super) dtype: DType,
    pub(super) adam: CpuAdam,
    pub(super) device: Device,
    pub(super) ordinal: usize,
}

impl Updater {
    /// Every role of chunk `c`.
    pub(super) fn refs(&self, c: usize) -> Result<Vec<ChunkRef>> {
        let group = self.group.ok_or_else(frozen_error)?;
        Ok(self.roles.iter().map(|&(role, _)| ChunkRef { group, index: c, role }).collect())
    }

    /// Discards chunk `c`'s gradient once the update has consumed it: it need not be written
    /// back, nor read before the next backward pass writes it.
    pub(super) fn discard_grad(&self, c: usize) -> Result<()> {
        let group = self.group.ok_or_else(frozen_error)?;
        Ok(self.mgr.discard(&[ChunkRef { group, index: c, role: Role::Grad }])?)
    }

    /// Updates the chunk set accessed in `a` (every role of one chunk, in `roles` order).
    pub(super) fn apply(&self, mut a: stowage_memory::Access<'_>, step: u64, mult: f32, cfg: &AdamConfig) -> Result<()> {
        let dtype = self.dtype;
        if a.cpu_addressable() {
            let mut bufs = a.chunks_bytes_mut()?.into_iter();
            let mut next = || bufs.next().ok_or_else(|| HarnessError::Config("optimizer chunk set is incomplete".into()));
            let (p, g) = (next()?, next()?);
            if dtype == DType::F32 {
                let (m, v) = (next()?, next()?);
                self.adam.update_with(cfg, step, mult, f32s(p)?, f32s(m)?, f32s(v)?, Grads::F32(f32s(g)?), ParamsOut::None)?;
            } else {
                let (master, m, v) = (next()?, next()?, next()?);
                let (g, out) = if dtype == DType::BF16 {
                    (Grads::BF16(u16s(g)?), ParamsOut::BF16(u16s(p)?))
                } else {
                    (Grads::F16(u16s(g)?), ParamsOut::F16(u16s(p)?))
                };
                self.adam.update_with(cfg, step, mult, f32s(master)?, f32s(m)?, f32s(v)?, g, out)?;
            }
        } else {
            let s = StepScalars::new(cfg, step, mult);
            let views: Vec<Tensor> = self.roles.iter().enumerate().map(|(k, &(_, d))| chunk_view(&a, k, d, self.ordinal).shallow_clone()).collect();
            let (mut p, g) = (views[0].shallow_clone(), views[1].shallow_clone());
            if dtype == DType::F32 {
                let (mut m, mut v) = (views[2].shallow_clone(), views[3].shallow_clone());
                adamw_(&mut p, &mut m, &mut v, &g, None, &s);
            } else {
                let (mut master, mut m, mut v) = (views[2].shallow_clone(), views[3].shallow_clone(), views[4].shallow_clone());
                adamw_(&mut master, &mut m, &mut v, &g, Some(&mut p), &s);
            }
            drop(views);
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
        }
        Ok(())
    }
}

/// The update running in the background, and the error of one that failed.
#[derive(Default)]
pub(super) struct Background {
    running: Option<std::thread::JoinHandle<Result<()>>>,
    failed: Option<String>,
}

/// Lifts a model's background standing with the budgets it shares when its update ends (or
/// its thread unwinds).
pub(super) struct Done(pub(super) Option<(Turns, usize)>);

impl Drop for Done {
    fn drop(&mut self) {
        if let Some((t, k)) = &self.0 {
            t.done(*k);
        }
    }
}

impl Background {
    /// Waits for the update running in the background, if any. Its error is returned here,
    /// and a note that the state is partly updated by every later call.
    pub(super) fn settle(b: &Mutex<Background>) -> Result<()> {
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = b.running.take() {
            let r = h.join().unwrap_or_else(|_| Err(HarnessError::Config("the background optimizer update panicked".into())));
            if let Err(e) = r {
                b.failed = Some(e.to_string());
                return Err(e);
            }
        }
        match &b.failed {
            Some(e) => Err(HarnessError::Config(format!(
                "an earlier optimizer update failed ({e}), leaving the model's state partly updated: restart from the last checkpoint"
            ))),
            None => Ok(()),
        }
    }

    /// Whether an update was started and not yet waited for.
    pub(super) fn running(b: &Mutex<Background>) -> bool {
        b.lock().unwrap_or_else(|e| e.into_inner()).running.is_some()
    }

    /// Updates the chunks in `order` on a thread of its own (step `step`, gradient multiplier
    /// `mult`, hyperparameters `cfg` as issued); `done` is dropped when it ends.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start(b: &Mutex<Background>, up: Arc<Updater>, order: Vec<usize>, step: u64, mult: f32, cfg: AdamConfig, done: Done) -> Result<()> {
        let h = std::thread::Builder::new()
            .name("stowage-update".into())
            .spawn(move || -> Result<()> {
                let _done = done;
                let r = order.iter().try_for_each(|&c| {
                    up.apply(up.mgr.access(&up.refs(c)?, Mode::Write)?, step, mult, &cfg)?;
                    up.discard_grad(c)
                });
                up.mgr.end_iteration();
                r
            })
            .map_err(|e| HarnessError::Config(format!("starting the optimizer update's thread: {e}")))?;
        b.lock().unwrap_or_else(|e| e.into_inner()).running = Some(h);
        Ok(())
    }
}
