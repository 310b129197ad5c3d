//! Auto placement: trace one iteration, then use the trace as the future.
//!
//! Until a trace exists, a declared schedule ([`Policy::set_schedule`]) stands in for it, with the
//! chunks it leaves out after it in registration order; without one, the registration order
//! (which is the first-use order) alone, so the warm-up iteration already evicts what a forward
//! sweep needs last. A model that never ends an iteration (one that only runs forward passes)
//! keeps the stand-in for good: the schedule, which lists a chunk shared by two units twice,
//! keeps it for the second, where the registration order would evict it as used.
//! The first iteration records the access sequence and the peak non-model memory; afterwards
//! chunks get the device's capacity minus that peak, eviction takes the chunk used furthest in
//! the future of the trace, and prefetch follows it. When an iteration's accesses differ from
//! the trace (RLHF generation lengths vary), the cursor resynchronises on the fly and the new
//! sequence replaces the trace at the iteration's end, where Gemini keeps a stale one.

use super::{furthest, Candidate, Future, Policy, PolicyKind};
use crate::tier::ChunkId;

pub struct AutoPolicy {
    trace: Future,
    /// The guess used before the first trace (cyclic): the declared schedule, then the chunks
    /// it leaves out; or the registration order.
    prior: Future,
    /// Every chunk in registration order.
    order: Vec<ChunkId>,
    recording: Vec<ChunkId>,
    /// Whether the current iteration has deviated from the trace.
    changed: bool,
    non_model_peak: u64,
    traced_non_model_peak: u64,
    retraces: u64,
}

impl AutoPolicy {
    /// `order`: every chunk in registration (first-use) order.
    pub fn new(order: Vec<ChunkId>) -> Self {
        AutoPolicy {
            trace: Future::default(),
            prior: Future::new(order.clone(), true),
            order,
            recording: Vec::new(),
            changed: false,
            non_model_peak: 0,
            traced_non_model_peak: 0,
            retraces: 0,
        }
    }

    fn future(&self) -> &Future {
        if self.trace.is_empty() {
            &self.prior
        } else {
            &self.trace
        }
    }

    /// How many times the trace was replaced after the first.
    pub fn retraces(&self) -> u64 {
        self.retraces
    }
}

impl Policy for AutoPolicy {
    fn kind(&self) -> PolicyKind {
        PolicyKind::Auto
    }

    fn on_access(&mut self, id: ChunkId) {
        self.recording.push(id);
        self.prior.advance(id);
        if !self.trace.is_empty() && !self.trace.advance(id) {
            self.changed = true;
        }
    }

    fn on_iteration_end(&mut self) {
        let recorded = std::mem::take(&mut self.recording);
        let first = self.trace.is_empty();
        if first || self.changed || recorded.len() != self.trace.len() {
            if !first {
                self.retraces += 1;
            }
            self.trace = Future::new(recorded, true);
            self.traced_non_model_peak = self.non_model_peak;
        }
        self.trace.reset();
        self.changed = false;
        self.non_model_peak = 0;
    }

    fn on_non_model(&mut self, bytes: u64) {
        self.non_model_peak = self.non_model_peak.max(bytes);
    }

    fn non_model_reserve(&self) -> u64 {
        self.traced_non_model_peak.max(self.non_model_peak)
    }

    fn victim(&self, candidates: &[Candidate]) -> Option<ChunkId> {
        furthest(candidates, |id| self.future().next_use(id))
    }

    fn next_use(&self, id: ChunkId) -> Option<u64> {
        Some(self.future().next_use(id))
    }

    fn upcoming(&self, n: usize) -> Vec<ChunkId> {
        self.future().upcoming(n)
    }

    fn set_schedule(&mut self, schedule: Vec<ChunkId>, _cyclic: bool) {
        if schedule.is_empty() {
            return;
        }
        let listed: std::collections::HashSet<ChunkId> = schedule.iter().copied().collect();
        let mut prior = schedule;
        prior.extend(self.order.iter().filter(|id| !listed.contains(id)));
        // Iterations repeat: the stand-in is cyclic like the trace.
        self.prior = Future::new(prior, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[u64]) -> Vec<ChunkId> {
        v.iter().map(|&x| ChunkId(x)).collect()
    }

    fn candidates(v: &[u64]) -> Vec<Candidate> {
        v.iter().map(|&x| Candidate { id: ChunkId(x), bytes: 1, last_use: 0, dirty: false }).collect()
    }

    #[test]
    fn before_a_trace_the_declared_schedule_keeps_a_chunk_two_units_share() {
        // Units [0 1] [1 2] [2 3]: chunks 1 and 2 are shared by two units each.
        let schedule = ids(&[0, 1, 1, 2, 2, 3]);
        let mut by_order = AutoPolicy::new(ids(&[0, 1, 2, 3, 9]));
        let mut declared = AutoPolicy::new(ids(&[0, 1, 2, 3, 9]));
        declared.set_schedule(schedule, true);
        for p in [&mut by_order, &mut declared] {
            p.on_access(ChunkId(0));
            p.on_access(ChunkId(1));
        }
        // The first unit is done; the second needs chunk 1 again, then 2.
        assert_eq!(declared.next_use(ChunkId(1)), Some(0));
        assert_eq!(declared.victim(&candidates(&[0, 1])), Some(ChunkId(0)));
        assert_eq!(declared.upcoming(3), ids(&[1, 2, 2]));
        // The registration order takes chunk 1 for used until the next iteration.
        assert_eq!(by_order.victim(&candidates(&[0, 1])), Some(ChunkId(1)));
        // A chunk the schedule leaves out comes after it, in registration order.
        assert_eq!(declared.next_use(ChunkId(9)), Some(4));
        // A trace, once recorded, replaces the stand-in.
        for id in [1, 2, 2, 3] {
            declared.on_access(ChunkId(id));
        }
        declared.on_iteration_end();
        declared.on_access(ChunkId(0));
        assert_eq!(declared.upcoming(2), ids(&[1, 1]));
    }
}
