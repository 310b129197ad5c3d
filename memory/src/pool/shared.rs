//! A byte budget several pools draw from: the device (or host) memory of models that take
//! turns, such as the four models of RLHF, each with its own chunk manager.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One budget shared by the pools of several [`crate::Tiers`]: each pool's arenas are charged to
/// it, so together they never reserve more than `limit` bytes, while any one of them may grow
/// into what the others have given back. A manager not in use gives its memory back with
/// [`crate::Manager::offload`]. Clone it to hand it to another configuration.
#[derive(Debug, Clone)]
pub struct SharedBudget(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    limit: u64,
    reserved: AtomicU64,
}

impl SharedBudget {
    pub fn new(limit: u64) -> Self {
        SharedBudget(Arc::new(Inner {
            limit,
            reserved: AtomicU64::new(0),
        }))
    }

    /// The budget in bytes.
    pub fn limit(&self) -> u64 {
        self.0.limit
    }

    /// Bytes the pools drawing from it hold now.
    pub fn reserved(&self) -> u64 {
        self.0.reserved.load(Ordering::Acquire)
    }

    /// Bytes no pool holds.
    pub fn free(&self) -> u64 {
        self.0.limit.saturating_sub(self.reserved())
    }

    /// Charges `bytes` if they fit under the limit; false (nothing charged) otherwise.
    pub(crate) fn take(&self, bytes: u64) -> bool {
        self.0
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_add(bytes).filter(|&n| n <= self.0.limit))
            .is_ok()
    }

    /// Returns bytes charged by `take`.
    pub(crate) fn give(&self, bytes: u64) {
        let prev = self.0.reserved.fetch_sub(bytes, Ordering::AcqRel);
        debug_assert!(prev >= bytes, "gave back more than was taken");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_only_what_fits_and_gives_back() {
        let b = SharedBudget::new(100);
        assert!(b.take(60));
        assert!(!b.take(41), "60 + 41 > 100");
        assert_eq!(b.reserved(), 60, "a refused take charges nothing");
        assert!(b.clone().take(40), "clones share the budget");
        assert_eq!(b.free(), 0);
        b.give(60);
        assert_eq!((b.reserved(), b.free()), (40, 60));
    }
}
