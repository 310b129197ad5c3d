//! Placement policies: pure decisions over a snapshot (what to evict, what comes next), no I/O,
//! so the same code runs in the manager and in the simulator. One file per policy.

mod auto;
mod future;
mod lru;
mod optimal;
mod static_;

use serde::{Deserialize, Serialize};

pub use auto::AutoPolicy;
pub use future::Future;
pub use lru::LruPolicy;
pub use optimal::OptimalPolicy;
pub use static_::StaticPolicy;

use crate::tier::ChunkId;

/// Which policy a manager uses.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum PolicyKind {
    /// Fractions of parameter and optimizer bytes pinned on the device (in access order); the
    /// rest streams through the remaining device room, least recently used out first.
    Static { param_frac: f64, optim_frac: f64 },
    /// Traces the first iteration's accesses and non-model memory, then evicts the chunk used
    /// furthest in the future of that trace and prefetches along it; re-traces on change. Until
    /// then it goes by the declared schedule, if any, else by the registration order.
    Auto,
    /// Follows a declared schedule: evicts the chunk needed furthest in the future, prefetches
    /// ahead as far as the budget allows.
    Optimal,
    /// Least recently used; no prefetch. A baseline.
    Lru,
}

impl PolicyKind {
    pub fn name(&self) -> &'static str {
        match self {
            PolicyKind::Static { .. } => "static",
            PolicyKind::Auto => "auto",
            PolicyKind::Optimal => "optimal",
            PolicyKind::Lru => "lru",
        }
    }
}

/// A chunk on a tier that may be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: ChunkId,
    pub bytes: u64,
    /// Access clock of its last use.
    pub last_use: u64,
    /// Evicting it costs a write-back.
    pub dirty: bool,
}

/// What every policy decides.
pub trait Policy: Send {
    fn kind(&self) -> PolicyKind;
    /// Observes one access, in order.
    fn on_access(&mut self, id: ChunkId);
    /// An iteration (one pass over the schedule) ended.
    fn on_iteration_end(&mut self) {}
    /// Bytes of non-model data in use on the device right now (activations, workspace).
    fn on_non_model(&mut self, _bytes: u64) {}
    /// Device bytes withheld from chunks for non-model data.
    fn non_model_reserve(&self) -> u64 {
        0
    }
    /// The candidate to evict, or `None` when none may go.
    fn victim(&self, candidates: &[Candidate]) -> Option<ChunkId>;
    /// Accesses until `id` is next used (`None`: unknown; `u64::MAX`: never).
    fn next_use(&self, _id: ChunkId) -> Option<u64> {
        None
    }
    /// The next `n` accesses expected, nearest first (empty: no knowledge, no prefetch).
    fn upcoming(&self, _n: usize) -> Vec<ChunkId> {
        Vec::new()
    }
    /// Chunks that stay on the device once there.
    fn pinned(&self, _id: ChunkId) -> bool {
        false
    }
    /// Replaces the declared schedule (policies that use one).
    fn set_schedule(&mut self, _schedule: Vec<ChunkId>, _cyclic: bool) {}
}

/// Evicts the candidate whose next use is furthest away (Belady's rule); among equals, a clean
/// one (no write-back) first, then the least recently used.
pub(crate) fn furthest(candidates: &[Candidate], next_use: impl Fn(ChunkId) -> u64) -> Option<ChunkId> {
    candidates
        .iter()
        .max_by_key(|c| (next_use(c.id), !c.dirty, std::cmp::Reverse(c.last_use)))
        .map(|c| c.id)
}

/// Builds a policy. `chunks` lists every chunk in first-use order as (id, bytes, is optimizer
/// state); `static` needs it.
pub fn build(kind: PolicyKind, chunks: &[(ChunkId, u64, bool)]) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Static { param_frac, optim_frac } => Box::new(StaticPolicy::new(param_frac, optim_frac, chunks)),
        PolicyKind::Auto => Box::new(AutoPolicy::new(chunks.iter().map(|c| c.0).collect())),
        PolicyKind::Optimal => Box::new(OptimalPolicy::new()),
        PolicyKind::Lru => Box::new(LruPolicy),
    }
}
