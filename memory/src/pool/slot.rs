//! The slot handle: owns one slot of a pool until dropped.

use std::sync::Arc;

use super::Pool;
use crate::tier::Tier;

/// One fixed-size slot in a tier. The handle owns the slot: the bytes are this handle's alone,
/// and dropping it returns the slot to its pool. A slot taking part in a move is owned by the
/// move until the move's completion is reaped, so its bytes cannot be touched or reused early.
pub struct Slot {
    pool: Arc<Pool>,
    arena: u32,
    offset: u64,
    addr: u64,
    len: usize,
    staging: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("tier", &self.pool.tier())
            .field("arena", &self.arena)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl Slot {
    pub(super) fn new(pool: Arc<Pool>, arena: u32, offset: u64, addr: u64, len: usize, staging: bool) -> Self {
        Slot {
            pool,
            arena,
            offset,
            addr,
            len,
            staging,
        }
    }

    /// The tier this slot lives in.
    pub fn tier(&self) -> Tier {
        self.pool.tier()
    }

    /// The slot's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Slots are never empty; provided for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The arena this slot was carved from.
    pub fn arena(&self) -> u32 {
        self.arena
    }

    /// The slot's address: a host or device pointer for memory tiers, a byte offset in the
    /// arena's file for NVMe.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The slot's bytes, when the tier is CPU-addressable (host and simulated device).
    pub fn bytes(&self) -> Option<&[u8]> {
        if !self.pool.backend().host_addressable() {
            return None;
        }
        // SAFETY: the backend says `addr` is a host pointer to `len` bytes inside a live arena;
        // the arena lives as long as the pool, which this handle keeps alive, and this handle is
        // the slot's only owner, so no one writes these bytes while the borrow lasts.
        Some(unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) })
    }

    /// The slot's bytes for writing, when the tier is CPU-addressable.
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        if !self.pool.backend().host_addressable() {
            return None;
        }
        // SAFETY: as in `bytes`, and `&mut self` makes this borrow exclusive.
        Some(unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) })
    }

    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool
            .release(self.arena, self.offset, self.addr, self.len, self.staging);
    }
}
