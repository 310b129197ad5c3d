//! Least recently used: the baseline.

use super::{Candidate, Policy, PolicyKind};
use crate::tier::ChunkId;

pub struct LruPolicy;

impl Policy for LruPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Lru
    }

    fn on_access(&mut self, _id: ChunkId) {}

    fn victim(&self, candidates: &[Candidate]) -> Option<ChunkId> {
        candidates.iter().min_by_key(|c| (c.last_use, c.dirty)).map(|c| c.id)
    }
}
