//! One unit at a time: the forward computation of a unit over views of its parameter chunks,
//! and the backward pass (recompute or keep the unit's graph, run autograd, write the
//! gradients into their chunks, take each tensor's squared norm as it becomes final).

use stowage_memory::{Mode, Role};
use tch::{Kind, Tensor};

use super::{Chunked, UnitGraph};
use crate::bridge::{view_mut, view_on};
use crate::error::{HarnessError, Result};
use crate::model::{block, embed, head, KvCache};
use crate::optim::sq_norm;

impl Chunked {
    /// The unit's computation over its parameters `p` (in `unit_tensors` order); `pos` and
    /// `cache` for incremental decoding.
    pub(super) fn unit_fn(&self, u: usize, p: &[Tensor], x: &Tensor) -> Tensor {
        self.unit_fn_at(u, p, x, 0, None)
    }

    pub(super) fn unit_fn_at(&self, u: usize, p: &[Tensor], x: &Tensor, pos: i64, cache: Option<&mut KvCache>) -> Tensor {
        let l = self.spec.cfg.n_layer;
        if u == 0 {
            embed(&p[0], &p[1], x, pos)
        } else if u <= l {
            block(p, x, self.spec.cfg.n_head, self.spec.lora_scale_if(self.adapters_on), cache)
        } else {
            let own = self.spec.units.head.len();
            head(self.spec.head, &p[..own], p.get(own), x).to_kind(Kind::Float)
        }
    }

    /// Runs unit `u` without gradients.
    pub(super) fn unit_forward(&self, u: usize, x: &Tensor) -> Result<Tensor> {
        self.unit_forward_at(u, x, 0, None)
    }

    pub(super) fn unit_forward_at(&self, u: usize, x: &Tensor, pos: i64, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let a = self.access(&self.refs(&self.unit_chunks[u], Role::Param), Mode::Read)?;
        let out = {
            let p = self.unit_tensors[u]
                .iter()
                .map(|&t| Ok(view_on(&a, self.tids[t], Role::Param, &self.spec.params[t].shape_i64(), self.ordinal)?.shallow_clone()))
                .collect::<Result<Vec<Tensor>>>()?;
            tch::no_grad(|| self.unit_fn_at(u, &p, x, pos, cache))
        };
        self.sync();
        drop(a);
        Ok(out)
    }

    /// Backward of the unit at backward position `j`: returns the input's gradient (none for
    /// the embedding) and, for the head, the loss. Adds final tensors' squared gradient norms
    /// to `sq`.
    /// `kept`: the unit's graph from the forward pass (keep mode); None: recompute it here.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn unit_backward(&self, j: usize, input: &Tensor, kept: Option<UnitGraph>, dy: Option<&Tensor>, loss: &dyn Fn(&Tensor) -> Tensor, sq: &mut f64) -> Result<(Option<Tensor>, Option<f64>)> {
        let l = self.spec.cfg.n_layer;
        let u = l + 1 - j;
        let pa = match kept {
            Some(_) => None,
            None => Some(self.access(&self.refs(&self.unit_chunks[u], Role::Param), Mode::Read)?),
        };
        let grad_refs = self.refs(&self.unit_chunks[u], Role::Grad);
        let ga = if grad_refs.is_empty() { None } else { Some(self.access(&grad_refs, Mode::Write)?) };
        let (dx, loss_value) = {
            let UnitGraph { leaves, x, out } = match (kept, &pa) {
                (Some(g), _) => g,
                (None, Some(pa)) => {
                    let leaves = self.unit_tensors[u].iter().map(|&t| self.leaf(pa, t)).collect::<Result<Vec<Tensor>>>()?;
                    self.unit_graph(u, leaves, input)
                }
                (None, None) => unreachable!("a recomputed unit holds its parameter access"),
            };
            let (objective, loss_value) = match dy {
                None => {
                    let lt = loss(&out);
                    let v = lt.f_double_value(&[])?;
                    let scale = self.scaler.as_ref().map_or(1.0, |s| s.scale as f64);
                    (if scale != 1.0 { lt * scale } else { lt }, Some(v))
                }
                Some(dy) => ((&out * dy).sum(Kind::Float), None),
            };
            let trained: Vec<usize> = self.unit_tensors[u].iter().copied().filter(|&t| self.trainable(t)).collect();
            let mut inputs: Vec<&Tensor> = self.unit_tensors[u].iter().zip(&leaves).filter(|(&t, _)| self.trainable(t)).map(|(_, l)| l).collect();
            if u != 0 {
                inputs.push(&x);
            }
            // A unit with nothing to train and no input gradient to pass back (the embedding
            // of a LoRA model) needs no backward pass.
            let grads = if inputs.is_empty() { Vec::new() } else { Tensor::f_run_backward(&[&objective], &inputs, false, false)? };
            for (k, &t) in trained.iter().enumerate() {
                let ga = ga.as_ref().ok_or_else(|| HarnessError::Config(format!("unit {u}: trainable tensors without gradient chunks")))?;
                let gv = view_mut(ga, self.tids[t], Role::Grad, &self.spec.params[t].shape_i64(), self.ordinal)?;
                let mut dst = gv.shallow_clone();
                tch::no_grad(|| if self.first_write[t] == j { dst.f_copy_(&grads[k]) } else { dst.f_add_(&grads[k]).map(|_| ()) })?;
                if self.final_at[t] == j {
                    *sq += sq_norm(&gv);
                }
            }
            ((u != 0).then(|| grads[grads.len() - 1].shallow_clone()), loss_value)
        };
        self.sync();
        if let Some(pa) = pa {
            pa.release_after_backward();
        }
        drop(ga);
        Ok((dx, loss_value))
    }

    /// The parameter tensor `t` from an access: a leaf autograd tracks when it trains, a plain
    /// view otherwise.
    pub(super) fn leaf(&self, a: &stowage_memory::Access<'_>, t: usize) -> Result<Tensor> {
        let v = view_on(a, self.tids[t], Role::Param, &self.spec.params[t].shape_i64(), self.ordinal)?;
        Ok(if self.trainable(t) { v.tracked() } else { v.shallow_clone() })
    }

    /// Unit `u` with autograd over the tracked parameter `leaves`; the input is cut from the
    /// previous unit's graph (a leaf whose gradient is passed back by hand).
    pub(super) fn unit_graph(&self, u: usize, leaves: Vec<Tensor>, input: &Tensor) -> UnitGraph {
        let x = if u == 0 { input.shallow_clone() } else { input.detach().set_requires_grad(true) };
        let out = self.unit_fn(u, &leaves, &x);
        UnitGraph { leaves, x, out }
    }

    /// Forward and backward; chunks whose gradients are final go to `ready` as they become so.
    pub(super) fn forward_backward(&self, ids: &Tensor, loss: &dyn Fn(&Tensor) -> Tensor, ready: Option<&crossbeam_channel::Sender<usize>>) -> Result<(f64, f64)> {
        let l = self.spec.cfg.n_layer;
        let mut inputs: Vec<Tensor> = Vec::with_capacity(l + 2);
        inputs.push(ids.shallow_clone());
        // Keep mode: every parameter chunk is held on the device for the whole pass and each
        // unit's graph is kept from the forward pass, so the backward pass recomputes nothing
        // (what the naive strategy does, with the same activation memory).
        let all = if self.keep_graph {
            Some(self.access(&self.refs(&self.all_chunks(), Role::Param), Mode::Read)?)
        } else {
            None
        };
        let mut graphs: Vec<Option<UnitGraph>> = Vec::with_capacity(l + 2);
        if let Some(pa) = &all {
            let leaves = (0..self.tids.len()).map(|t| self.leaf(pa, t)).collect::<Result<Vec<Tensor>>>()?;
            for u in 0..l + 2 {
                let g = self.unit_graph(u, self.unit_tensors[u].iter().map(|&t| leaves[t].shallow_clone()).collect(), &inputs[u]);
                if u <= l {
                    inputs.push(g.out.detach());
                }
                graphs.push(Some(g));
            }
        } else {
            for u in 0..=l {
                let y = self.unit_forward(u, &inputs[u])?;
                inputs.push(y);
            }
            graphs.resize_with(l + 2, || None);
        }
        let mut sq = 0.0;
        let mut dy: Option<Tensor> = None;
        let mut loss_value = f64::NAN;
        for j in 0..l + 2 {
            let u = l + 1 - j;
            let kept = graphs[u].take();
            let (dx, lv) = self.unit_backward(j, &inputs[u], kept, dy.as_ref(), loss, &mut sq)?;
            inputs.truncate(u);
            if let Some(v) = lv {
                loss_value = v;
            }
            dy = dx;
            if let Some(tx) = ready {
                for &c in &self.chunks_final[j] {
                    // A closed channel means the updater failed; its error is reported on join.
                    let _ = tx.send(c);
                }
            }
        }
        if let Some(pa) = all {
            self.sync();
            pa.release_after_backward();
        }
        Ok((loss_value, sq))
    }
}
