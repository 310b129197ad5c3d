//! Static placement: fixed fractions of parameter and optimizer bytes pinned on the device.
//!
//! Counted per chunk (Gemini sums per parameter, counting a chunk once for each parameter in
//! it) and assigned in access order (Gemini walks chunks in hash order), so the chunks needed
//! first are the ones that stay.

use std::collections::HashSet;

use super::{Candidate, Policy, PolicyKind};
use crate::tier::ChunkId;

pub struct StaticPolicy {
    param_frac: f64,
    optim_frac: f64,
    pinned: HashSet<ChunkId>,
}

impl StaticPolicy {
    /// `chunks`: every chunk in first-use order as (id, bytes, is optimizer state).
    pub fn new(param_frac: f64, optim_frac: f64, chunks: &[(ChunkId, u64, bool)]) -> Self {
        let total = |optim: bool| chunks.iter().filter(|c| c.2 == optim).map(|c| c.1).sum::<u64>() as f64;
        let quota = [total(false) * param_frac.clamp(0.0, 1.0), total(true) * optim_frac.clamp(0.0, 1.0)];
        let mut taken = [0.0f64; 2];
        let mut pinned = HashSet::new();
        for &(id, bytes, optim) in chunks {
            let k = optim as usize;
            if taken[k] + bytes as f64 <= quota[k] {
                taken[k] += bytes as f64;
                pinned.insert(id);
            }
        }
        StaticPolicy {
            param_frac,
            optim_frac,
            pinned,
        }
    }

    pub fn pinned_count(&self) -> usize {
        self.pinned.len()
    }
}

impl Policy for StaticPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Static {
            param_frac: self.param_frac,
            optim_frac: self.optim_frac,
        }
    }

    fn on_access(&mut self, _id: ChunkId) {}

    fn victim(&self, candidates: &[Candidate]) -> Option<ChunkId> {
        candidates
            .iter()
            .filter(|c| !self.pinned.contains(&c.id))
            .min_by_key(|c| c.last_use)
            .map(|c| c.id)
    }

    fn pinned(&self, id: ChunkId) -> bool {
        self.pinned.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_counted_per_chunk_in_access_order() {
        let chunks: Vec<(ChunkId, u64, bool)> =
            (0..10).map(|i| (ChunkId(i), 100, i >= 6)).collect(); // 600 param bytes, 400 optim bytes
        let p = StaticPolicy::new(0.5, 0.5, &chunks);
        let pinned: Vec<u64> = (0..10).filter(|&i| p.pinned(ChunkId(i))).collect();
        assert_eq!(pinned, vec![0, 1, 2, 6, 7]);
    }
}
