//! Auto placement: trace one iteration, then use the trace as the future.
//!
//! Until a trace exists, the chunks' registration order (which is their first-use order) stands
//! in for it, so the warm-up iteration already evicts what a forward sweep needs last.
//! The first iteration records the access sequence and the peak non-model memory; afterwards
//! chunks get the device's capacity minus that peak, eviction takes the chunk used furthest in
//! the future of the trace, and prefetch follows it. When an iteration's accesses differ from
//! the trace (RLHF generation lengths vary), the cursor resynchronises on the fly and the new
//! sequence replaces the trace at the iteration's end, where Gemini keeps a stale one.

use super::{furthest, Candidate, Future, Policy, PolicyKind};
use crate::tier::ChunkId;

pub struct AutoPolicy {
    trace: Future,
    /// Registration order, cyclic: the guess used before the first trace.
    prior: Future,
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
            prior: Future::new(order, true),
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
}
