//! Slot pools: fixed-size slots carved from a few large allocations (arenas) under a byte budget.
//!
//! A pool belongs to one tier and owns its arenas; what an arena *is* (host memory, GPU memory,
//! a preallocated file) is the [`ArenaBackend`]'s business. Slots of several sizes may share one
//! pool and one budget: each size has its own free list, and arenas that fall wholly free are
//! given back when another size needs the room. The budget caps the bytes obtained from the
//! system (`reserved`), so the process never holds more than the budget whatever the stats say.

mod slot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use slot::Slot;

use crate::error::{Error, Result};
use crate::tier::{Tier, TierStats};

/// What a pool needs from its tier: large regions, obtained and given back.
pub(crate) trait ArenaBackend: Send + Sync + 'static {
    /// Obtains a region of `bytes` for arena `id` and returns its base: a pointer for tiers whose
    /// memory is addressable, 0 for file-backed tiers (slots are then offsets in the arena's file).
    fn alloc_arena(&self, id: u32, bytes: usize) -> Result<u64>;
    /// Gives back a region obtained by `alloc_arena`. Called only when none of its slots is held.
    fn free_arena(&self, id: u32, base: u64, bytes: usize);
    /// Called when a slot returns to the free list (for per-slot metadata such as checksums).
    fn slot_released(&self, _arena: u32, _addr: u64) {}
    /// True when a slot's base is a host pointer the CPU may read and write.
    fn host_addressable(&self) -> bool;
}

struct Arena {
    base: u64,
    bytes: usize,
    slot_bytes: usize,
    free_slots: usize,
}

#[derive(Default)]
struct State {
    /// Indexed by arena id; `None` once given back. Ids are never reused.
    arenas: Vec<Option<Arena>>,
    /// Free slots per slot size: (arena id, slot index).
    free: HashMap<usize, Vec<(u32, u32)>>,
    used: u64,
    peak: u64,
    reserved: u64,
    arena_count: u64,
}

/// A pool of fixed-size slots for one tier.
pub(crate) struct Pool {
    tier: Tier,
    budget: u64,
    arena_target: usize,
    backend: Box<dyn ArenaBackend>,
    state: Mutex<State>,
    in_flight: AtomicU64,
    staging: AtomicU64,
}

impl Pool {
    /// `arena_target` is the preferred size of one arena; a slot larger than it gets an arena of
    /// its own, and no arena exceeds what is left of the budget.
    pub(crate) fn new(tier: Tier, budget: u64, arena_target: usize, backend: Box<dyn ArenaBackend>) -> Arc<Self> {
        Arc::new(Pool {
            tier,
            budget,
            arena_target: arena_target.max(1),
            backend,
            state: Mutex::new(State::default()),
            in_flight: AtomicU64::new(0),
            staging: AtomicU64::new(0),
        })
    }

    pub(crate) fn tier(&self) -> Tier {
        self.tier
    }

    pub(crate) fn backend(&self) -> &dyn ArenaBackend {
        &*self.backend
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state half-updated in a way that
        // matters more than losing the process, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a free slot of `slot_bytes`, growing the pool by one arena when needed.
    pub(crate) fn alloc(self: &Arc<Self>, slot_bytes: usize, staging: bool) -> Result<Slot> {
        if slot_bytes == 0 {
            return Err(Error::unsupported("a zero-byte slot", "slots hold at least one byte"));
        }
        let mut st = self.lock();
        let (arena, index) = match st.free.get_mut(&slot_bytes).and_then(Vec::pop) {
            Some(found) => found,
            None => {
                self.grow(&mut st, slot_bytes)?;
                st.free
                    .get_mut(&slot_bytes)
                    .and_then(Vec::pop)
                    .expect("grow added at least one free slot of this size")
            }
        };
        let a = st.arenas[arena as usize].as_mut().expect("free slot in a live arena");
        a.free_slots -= 1;
        let addr = a.base + index as u64 * slot_bytes as u64;
        st.used += slot_bytes as u64;
        st.peak = st.peak.max(st.used);
        drop(st);
        if staging {
            self.staging.fetch_add(slot_bytes as u64, Ordering::Relaxed);
        }
        Ok(Slot::new(self.clone(), arena, index, addr, slot_bytes, staging))
    }

    fn grow(&self, st: &mut State, slot_bytes: usize) -> Result<()> {
        let room = |st: &State| (self.budget - st.reserved) / slot_bytes as u64;
        if room(st) == 0 {
            self.trim(st, Some(slot_bytes));
        }
        let room = room(st);
        if room == 0 {
            return Err(Error::OverBudget {
                tier: self.tier,
                requested: slot_bytes as u64,
                capacity: self.budget,
                in_use: st.used,
            });
        }
        let wanted = (self.arena_target / slot_bytes).max(1) as u64;
        let slots = wanted.min(room) as usize;
        let bytes = slots * slot_bytes;
        let id = u32::try_from(st.arenas.len())
            .map_err(|_| Error::unsupported("more than 4 billion arenas", "use larger arenas"))?;
        let base = self.backend.alloc_arena(id, bytes)?;
        st.arenas.push(Some(Arena {
            base,
            bytes,
            slot_bytes,
            free_slots: slots,
        }));
        st.reserved += bytes as u64;
        st.arena_count += 1;
        // Hand out low addresses first: pop() takes from the end.
        st.free
            .entry(slot_bytes)
            .or_default()
            .extend((0..slots as u32).rev().map(|i| (id, i)));
        Ok(())
    }

    /// Gives back every arena none of whose slots is held, except those of `keep` size.
    fn trim(&self, st: &mut State, keep: Option<usize>) {
        for id in 0..st.arenas.len() {
            let idle = matches!(&st.arenas[id], Some(a)
                if a.free_slots * a.slot_bytes == a.bytes && Some(a.slot_bytes) != keep);
            if !idle {
                continue;
            }
            let a = st.arenas[id].take().expect("checked above");
            if let Some(list) = st.free.get_mut(&a.slot_bytes) {
                list.retain(|&(arena, _)| arena as usize != id);
            }
            st.reserved -= a.bytes as u64;
            self.backend.free_arena(id as u32, a.base, a.bytes);
        }
    }

    /// Whether `alloc(slot_bytes)` would succeed now: a free slot of that size, room left in the
    /// budget, or room that giving back wholly idle arenas of other sizes would make.
    pub(crate) fn can_alloc(&self, slot_bytes: usize) -> bool {
        let st = self.lock();
        if st.free.get(&slot_bytes).is_some_and(|f| !f.is_empty()) {
            return true;
        }
        let idle: u64 = st
            .arenas
            .iter()
            .flatten()
            .filter(|a| a.slot_bytes != slot_bytes && a.free_slots * a.slot_bytes == a.bytes)
            .map(|a| a.bytes as u64)
            .sum();
        self.budget - st.reserved + idle >= slot_bytes as u64
    }

    /// Gives back every arena with no slot in use. Returns the bytes released.
    pub(crate) fn shrink(&self) -> u64 {
        let mut st = self.lock();
        let before = st.reserved;
        self.trim(&mut st, None);
        before - st.reserved
    }

    fn release(&self, arena: u32, index: u32, addr: u64, slot_bytes: usize, staging: bool) {
        self.backend.slot_released(arena, addr);
        let mut st = self.lock();
        if let Some(a) = st.arenas[arena as usize].as_mut() {
            a.free_slots += 1;
        }
        st.used -= slot_bytes as u64;
        st.free.entry(slot_bytes).or_default().push((arena, index));
        drop(st);
        if staging {
            self.staging.fetch_sub(slot_bytes as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn mark_in_flight(&self, bytes: usize, on: bool) {
        if on {
            self.in_flight.fetch_add(bytes as u64, Ordering::Relaxed);
        } else {
            self.in_flight.fetch_sub(bytes as u64, Ordering::Relaxed);
        }
    }

    pub(crate) fn stats(&self) -> TierStats {
        let st = self.lock();
        TierStats {
            capacity: self.budget,
            used: st.used,
            peak: st.peak,
            reserved: st.reserved,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            staging: self.staging.load(Ordering::Relaxed),
            arenas: st.arena_count,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Every slot holds an Arc to the pool, so none is left: give every arena back.
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (id, a) in st.arenas.iter_mut().enumerate() {
            if let Some(a) = a.take() {
                self.backend.free_arena(id as u32, a.base, a.bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests;
