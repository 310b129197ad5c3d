//! Follows a declared schedule: Belady's rule for eviction, the schedule for prefetch.

use super::{furthest, Candidate, Future, Policy, PolicyKind};
use crate::tier::ChunkId;

pub struct OptimalPolicy {
    future: Future,
}

impl OptimalPolicy {
    pub fn new() -> Self {
        OptimalPolicy { future: Future::default() }
    }
}

impl Default for OptimalPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for OptimalPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Optimal
    }

    fn on_access(&mut self, id: ChunkId) {
        self.future.advance(id);
    }

    fn on_iteration_end(&mut self) {
        self.future.reset();
    }

    fn victim(&self, candidates: &[Candidate]) -> Option<ChunkId> {
        if self.future.is_empty() {
            // No schedule declared: least recently used.
            return candidates.iter().min_by_key(|c| c.last_use).map(|c| c.id);
        }
        furthest(candidates, |id| self.future.next_use(id))
    }

    fn next_use(&self, id: ChunkId) -> Option<u64> {
        (!self.future.is_empty()).then(|| self.future.next_use(id))
    }

    fn upcoming(&self, n: usize) -> Vec<ChunkId> {
        self.future.upcoming(n)
    }

    fn set_schedule(&mut self, schedule: Vec<ChunkId>, cyclic: bool) {
        self.future = Future::new(schedule, cyclic);
    }
}
