//! The policy simulator: replays access traces against a device budget with no I/O, counting the
//! bytes each policy fetches into the device and writes back, next to Belady's minimum.
//!
//! The model is demand paging of whole chunks: an access to a chunk not on the device fetches
//! it, evicting chunks the policy picks until it fits; evicting a chunk written since its fetch
//! costs a write-back. Belady's rule (evict what is used furthest in the future, with the whole
//! trace known) gives the reference.

use std::collections::HashMap;

use serde::Serialize;

use super::policy::{self, Candidate, Future, PolicyKind};
use crate::error::{Error, Result};
use crate::tier::ChunkId;

/// One access in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub id: ChunkId,
    /// The access modifies the chunk (gradients, optimizer updates).
    pub write: bool,
}

/// A named trace: chunk sizes and the accesses of each iteration.
#[derive(Debug, Clone)]
pub struct Trace {
    pub name: String,
    /// Every chunk in first-use order: (id, bytes, is optimizer state).
    pub chunks: Vec<(ChunkId, u64, bool)>,
    pub iterations: Vec<Vec<Access>>,
}

impl Trace {
    pub fn model_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.1).sum()
    }

    fn flat(&self) -> Vec<ChunkId> {
        self.iterations.iter().flatten().map(|a| a.id).collect()
    }
}

/// What a replay cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SimResult {
    pub bytes_fetched: u64,
    pub bytes_written_back: u64,
}

struct Resident {
    bytes: u64,
    last_use: u64,
    dirty: bool,
}

/// Replays `trace` with `capacity` bytes of device. `choose` picks a victim among candidates.
fn replay(
    trace: &Trace,
    capacity: u64,
    mut on_access: impl FnMut(ChunkId),
    mut on_iteration_end: impl FnMut(),
    choose: impl Fn(&[Candidate]) -> Option<ChunkId>,
    pinned: impl Fn(ChunkId) -> bool,
) -> Result<SimResult> {
    let size: HashMap<ChunkId, u64> = trace.chunks.iter().map(|c| (c.0, c.1)).collect();
    let mut on_dev: HashMap<ChunkId, Resident> = HashMap::new();
    let mut used = 0u64;
    let mut clock = 0u64;
    let mut out = SimResult::default();
    for iteration in &trace.iterations {
        for a in iteration {
            clock += 1;
            on_access(a.id);
            if !on_dev.contains_key(&a.id) {
                let bytes = *size.get(&a.id).ok_or_else(|| Error::InvalidState(format!("trace uses unknown chunk {}", a.id)))?;
                while used + bytes > capacity {
                    let cands: Vec<Candidate> = on_dev
                        .iter()
                        .filter(|(id, _)| !pinned(**id))
                        .map(|(&id, r)| Candidate {
                            id,
                            bytes: r.bytes,
                            last_use: r.last_use,
                            dirty: r.dirty,
                        })
                        .collect();
                    let victim = choose(&cands).ok_or(Error::OverBudget {
                        tier: crate::tier::Tier::Device,
                        requested: bytes,
                        capacity,
                        in_use: used,
                    })?;
                    let r = on_dev.remove(&victim).expect("victims are resident");
                    used -= r.bytes;
                    if r.dirty {
                        out.bytes_written_back += r.bytes;
                    }
                }
                used += bytes;
                out.bytes_fetched += bytes;
                on_dev.insert(
                    a.id,
                    Resident {
                        bytes,
                        last_use: clock,
                        dirty: false,
                    },
                );
            }
            let r = on_dev.get_mut(&a.id).expect("just made resident");
            r.last_use = clock;
            r.dirty |= a.write;
        }
        on_iteration_end();
    }
    Ok(out)
}

/// Belady's rule with the whole trace known: the reference every policy is compared with.
pub fn belady(trace: &Trace, capacity: u64) -> Result<SimResult> {
    let future = std::cell::RefCell::new(Future::new(trace.flat(), false));
    replay(
        trace,
        capacity,
        |id| {
            future.borrow_mut().advance(id);
        },
        || {},
        |c| policy::furthest(c, |id| future.borrow().next_use(id)),
        |_| false,
    )
}

/// Replays `trace` through a policy of `kind`. `optimal` is given the whole trace as its
/// declared schedule; the others learn what they can.
pub fn simulate(trace: &Trace, kind: PolicyKind, capacity: u64) -> Result<SimResult> {
    let p = std::cell::RefCell::new(policy::build(kind, &trace.chunks));
    if kind == PolicyKind::Optimal {
        p.borrow_mut().set_schedule(trace.flat(), false);
    }
    let pinned_bytes: u64 = trace.chunks.iter().filter(|c| p.borrow().pinned(c.0)).map(|c| c.1).sum();
    if pinned_bytes > capacity {
        return Err(Error::OverBudget {
            tier: crate::tier::Tier::Device,
            requested: pinned_bytes,
            capacity,
            in_use: 0,
        });
    }
    replay(
        trace,
        capacity,
        |id| p.borrow_mut().on_access(id),
        || p.borrow_mut().on_iteration_end(),
        |c| p.borrow().victim(c),
        |id| p.borrow().pinned(id),
    )
}

/// Chunk id of (model, chunk index, role index).
fn cid(model: u64, chunk: u64, role: u64) -> ChunkId {
    ChunkId((model << 40) | (chunk << 8) | role)
}

const PARAM: u64 = 0;
const GRAD: u64 = 1;
const MASTER: u64 = 2;
const M1: u64 = 3;
const M2: u64 = 4;

/// Chunks of one trainable model of `blocks` blocks with `per_block` chunks each, plus one
/// embedding chunk: bf16 params and grads of `chunk` bytes, fp32 master and moments of twice that.
fn model_chunks(model: u64, blocks: u64, per_block: u64, chunk: u64, trainable: bool) -> Vec<(ChunkId, u64, bool)> {
    let mut v = Vec::new();
    for c in 0..=blocks * per_block {
        v.push((cid(model, c, PARAM), chunk, false));
        if trainable {
            v.push((cid(model, c, GRAD), chunk, false));
            for r in [MASTER, M1, M2] {
                v.push((cid(model, c, r), 2 * chunk, true));
            }
        }
    }
    v
}

/// Chunk indices of block `b` (chunk 0 is the embedding).
fn block(b: u64, per_block: u64) -> impl Iterator<Item = u64> {
    1 + b * per_block..1 + (b + 1) * per_block
}

fn forward(out: &mut Vec<Access>, model: u64, blocks: u64, per_block: u64) {
    out.push(Access { id: cid(model, 0, PARAM), write: false });
    for b in 0..blocks {
        out.extend(block(b, per_block).map(|c| Access { id: cid(model, c, PARAM), write: false }));
    }
}

fn train_step(out: &mut Vec<Access>, model: u64, blocks: u64, per_block: u64) {
    forward(out, model, blocks, per_block);
    for b in (0..blocks).rev() {
        for c in block(b, per_block) {
            out.push(Access { id: cid(model, c, PARAM), write: false });
            out.push(Access { id: cid(model, c, GRAD), write: true });
        }
    }
    out.push(Access { id: cid(model, 0, GRAD), write: true });
    for c in 0..=blocks * per_block {
        out.push(Access { id: cid(model, c, GRAD), write: false });
        for r in [MASTER, M1, M2, PARAM] {
            out.push(Access { id: cid(model, c, r), write: true });
        }
    }
}

/// A transformer training step repeated `iterations` times: forward blocks 0..L, backward
/// L..0 (parameters read, gradients written), then an optimizer pass over every chunk.
pub fn transformer_trace(blocks: u64, per_block: u64, chunk: u64, iterations: usize) -> Trace {
    let chunks = model_chunks(0, blocks, per_block, chunk, true);
    let mut it = Vec::new();
    train_step(&mut it, 0, blocks, per_block);
    Trace {
        name: format!("transformer-{blocks}x{per_block}"),
        chunks,
        iterations: vec![it; iterations],
    }
}

/// A PPO-like trace: per iteration, generation of a varying number of tokens through the actor
/// (each token passes every actor block), forward passes of the reference, reward and critic
/// models, then a training step of the actor and of the critic. Lengths come from `seed`.
pub fn ppo_trace(blocks: u64, per_block: u64, chunk: u64, iterations: usize, seed: u64) -> Trace {
    let (actor, critic, reference, reward) = (0, 1, 2, 3);
    let mut chunks = model_chunks(actor, blocks, per_block, chunk, true);
    chunks.extend(model_chunks(critic, blocks, per_block, chunk, true));
    chunks.extend(model_chunks(reference, blocks, per_block, chunk, false));
    chunks.extend(model_chunks(reward, blocks, per_block, chunk, false));
    let mut x = seed | 1;
    let mut iterations_v = Vec::new();
    for _ in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let tokens = 2 + x % 5;
        let mut it = Vec::new();
        for _ in 0..tokens {
            forward(&mut it, actor, blocks, per_block);
        }
        for m in [reference, reward, critic] {
            forward(&mut it, m, blocks, per_block);
        }
        train_step(&mut it, actor, blocks, per_block);
        train_step(&mut it, critic, blocks, per_block);
        iterations_v.push(it);
    }
    Trace {
        name: format!("ppo-{blocks}x{per_block}"),
        chunks,
        iterations: iterations_v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_room_for_everything_each_chunk_is_fetched_once() {
        let t = transformer_trace(4, 2, 1 << 20, 3);
        let all = t.model_bytes();
        for kind in [PolicyKind::Lru, PolicyKind::Auto, PolicyKind::Optimal] {
            let r = simulate(&t, kind, all).unwrap();
            assert_eq!(r.bytes_fetched, all, "{kind:?}");
        }
        assert_eq!(belady(&t, all).unwrap().bytes_fetched, all);
    }

    #[test]
    fn optimal_matches_belady_and_beats_lru_under_pressure() {
        for t in [transformer_trace(6, 2, 1 << 20, 3), ppo_trace(3, 2, 1 << 20, 4, 7)] {
            for frac in [0.25, 0.5, 0.75] {
                let cap = (t.model_bytes() as f64 * frac) as u64;
                let min = belady(&t, cap).unwrap();
                let opt = simulate(&t, PolicyKind::Optimal, cap).unwrap();
                let lru = simulate(&t, PolicyKind::Lru, cap).unwrap();
                assert_eq!(opt.bytes_fetched, min.bytes_fetched, "{} at {frac}", t.name);
                assert!(lru.bytes_fetched >= min.bytes_fetched, "nothing beats the minimum");
            }
        }
    }

    #[test]
    fn auto_stays_within_ten_percent_of_the_minimum() {
        for t in [transformer_trace(8, 2, 1 << 20, 4), ppo_trace(6, 2, 1 << 20, 4, 3)] {
            for frac in [0.25, 0.5, 0.75] {
                let cap = (t.model_bytes() as f64 * frac) as u64;
                let min = belady(&t, cap).unwrap().bytes_fetched as f64;
                let auto = simulate(&t, PolicyKind::Auto, cap).unwrap().bytes_fetched as f64;
                assert!(auto / min <= 1.10, "{} at {frac}: auto {:.3} of the minimum", t.name, auto / min);
            }
        }
    }

    #[test]
    fn a_budget_smaller_than_the_pinned_set_is_refused() {
        let t = transformer_trace(2, 1, 1 << 20, 1);
        let kind = PolicyKind::Static { param_frac: 1.0, optim_frac: 1.0 };
        assert!(matches!(simulate(&t, kind, 1 << 20), Err(Error::OverBudget { .. })));
    }
}
