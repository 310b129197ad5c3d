//! The decoding copy: with `TrainOpts::gen_dtype`, generation reads the prompt through the
//! parameter chunks and, as it goes, writes a 16-bit copy of every weight into a chunk group
//! of its own; single generated tokens then read the copy alone. An fp32 model whose weights
//! do not fit in memory re-reads the part that does not from NVMe for every token; at half the
//! bytes, the copy of a model up to twice the room can stay resident for the whole generation
//! (how much does is the policy's choice; docs/capacity-cpu.md measures it). The
//! copy's chunks are charged to the tiers like any other (they spill when they must) and are
//! discarded, never written back, when generation ends; a weight change (a step, an import)
//! before then drops them too, so a stale copy is never read.

use stowage_memory::{ChunkRef, DType, ManagerBuilder, Mode, Role, TensorId};
use tch::Tensor;

use super::Chunked;
use crate::bridge::{view_mut, view_on};
use crate::error::Result;
use crate::model::KvCache;

/// The copy's group and what is known of it.
pub(super) struct DecodeCopy {
    group: usize,
    /// Per spec tensor: its id in the copy's group.
    tids: Vec<TensorId>,
    /// Per unit: the copy's chunk indices.
    unit_chunks: Vec<Vec<usize>>,
    /// Per spec tensor: stored transposed (a linear weight, see `naive::decode_copy`).
    transposed: Vec<bool>,
    /// Between `claim_parameters` and `end_generation`.
    active: bool,
    /// Per spec tensor: copied since the generation began.
    fresh: Vec<bool>,
}

impl DecodeCopy {
    /// Registers a group `name` holding every tensor of `shapes` in `dtype`.
    pub(super) fn register(b: &mut ManagerBuilder, name: &str, dtype: DType, shapes: &[(String, Vec<usize>)], linear: &[usize]) -> (usize, Vec<TensorId>, Vec<bool>) {
        let g = b.group(name, &[(Role::Param, dtype)]);
        let tids = shapes.iter().map(|(n, s)| b.tensor(g, n, s)).collect();
        let mut transposed = vec![false; shapes.len()];
        for &t in linear {
            transposed[t] = true;
        }
        (g, tids, transposed)
    }

    pub(super) fn new(group: usize, tids: Vec<TensorId>, transposed: Vec<bool>, unit_chunks: Vec<Vec<usize>>) -> Self {
        let n = tids.len();
        DecodeCopy {
            group,
            tids,
            unit_chunks,
            transposed,
            active: false,
            fresh: vec![false; n],
        }
    }

    pub(super) fn group(&self) -> usize {
        self.group
    }

    fn refs(&self, chunks: impl IntoIterator<Item = usize>) -> Vec<ChunkRef> {
        chunks.into_iter().map(|index| ChunkRef { group: self.group, index, role: Role::Param }).collect()
    }
}

impl Chunked {
    /// Starts a generation: the copy, if any, is made afresh as the prompt is read.
    pub(super) fn begin_decode(&mut self) -> Result<()> {
        self.drop_decode()?;
        if let Some(d) = &mut self.decode {
            d.active = true;
        }
        Ok(())
    }

    /// Drops the copy (its chunks discarded in every tier, nothing written).
    pub(super) fn drop_decode(&mut self) -> Result<()> {
        let Some(d) = &mut self.decode else { return Ok(()) };
        d.active = false;
        d.fresh.iter_mut().for_each(|f| *f = false);
        let all = d.refs(0..self.mgr.layout(d.group).chunk_sizes.len());
        Ok(self.mgr.discard(&all)?)
    }

    /// Unit `u` of a cached forward pass: a single token (`decode`) through the copy, a prompt
    /// through the parameters; either way the unit's stale copies are made first.
    pub(super) fn unit_cached(&mut self, u: usize, x: &Tensor, pos: i64, cache: Option<&mut KvCache>, decode: bool) -> Result<Tensor> {
        let Some(d) = self.decode.as_ref().filter(|d| d.active) else {
            return self.unit_forward_at(u, x, pos, cache);
        };
        let stale: Vec<usize> = self.unit_tensors[u].iter().copied().filter(|&t| !d.fresh[t]).collect();
        if stale.is_empty() && !decode {
            return self.unit_forward_at(u, x, pos, cache);
        }
        let copy_refs = d.refs(d.unit_chunks[u].iter().copied());
        let shape = |t: usize| {
            let mut s = self.spec.params[t].shape_i64();
            if d.transposed[t] {
                s.reverse();
            }
            s
        };
        let out = {
            let pa = if stale.is_empty() { None } else { Some(self.access(&self.refs(&self.unit_chunks[u], Role::Param), Mode::Read)?) };
            let ca = self.access(&copy_refs, if stale.is_empty() { Mode::Read } else { Mode::Write })?;
            if let Some(pa) = &pa {
                for &t in &stale {
                    let src = view_on(pa, self.tids[t], Role::Param, &self.spec.params[t].shape_i64(), self.ordinal)?;
                    let mut dst = view_mut(&ca, d.tids[t], Role::Param, &shape(t), self.ordinal)?.shallow_clone();
                    tch::no_grad(|| dst.f_copy_(&if d.transposed[t] { src.tr() } else { src.shallow_clone() }))?;
                }
            }
            let p = self.unit_tensors[u]
                .iter()
                .map(|&t| {
                    Ok(match (&pa, decode) {
                        (Some(pa), false) => view_on(pa, self.tids[t], Role::Param, &self.spec.params[t].shape_i64(), self.ordinal)?.shallow_clone(),
                        _ => {
                            let v = view_on(&ca, d.tids[t], Role::Param, &shape(t), self.ordinal)?;
                            if d.transposed[t] {
                                v.tr()
                            } else {
                                v.shallow_clone()
                            }
                        }
                    })
                })
                .collect::<Result<Vec<Tensor>>>()?;
            let out = tch::no_grad(|| self.unit_fn_at(u, &p, x, pos, cache));
            self.sync();
            out
        };
        if let Some(d) = &mut self.decode {
            for t in stale {
                d.fresh[t] = true;
            }
        }
        Ok(out)
    }
}
