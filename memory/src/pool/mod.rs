//! Slot pools: slots carved from a few large allocations (arenas) under a byte budget.
//!
//! A pool belongs to one tier and owns its arenas; what an arena *is* (host memory, GPU memory,
//! a preallocated file) is the [`ArenaBackend`]'s business. Chunks of one size tile an arena
//! exactly, so a pool of equal slots never fragments; the rare larger chunk (a tensor bigger
//! than the chunk size) takes a contiguous range by first fit, freed ranges coalesce, and
//! arenas that fall wholly idle are given back when the budget needs the room. The budget caps
//! the bytes obtained from the system (`reserved`), so the process never holds more than the
//! budget whatever the stats say.

mod shared;
mod slot;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

pub use shared::SharedBudget;
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
    /// Free byte ranges: offset -> length, coalesced (no two adjacent).
    free: BTreeMap<usize, usize>,
    free_bytes: usize,
    /// No slot has been taken from it yet, so no byte of it holds data.
    fresh: bool,
    /// Prepared by [`Pool::finish_preparing`] (for NVMe: written through with zeros).
    prepared: bool,
}

impl Arena {
    fn idle(&self) -> bool {
        self.free_bytes == self.bytes
    }

    /// First fit: the lowest free range that holds `len` bytes.
    fn take(&mut self, len: usize) -> Option<usize> {
        let (&off, &have) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&off);
        if have > len {
            self.free.insert(off + len, have - len);
        }
        self.free_bytes -= len;
        Some(off)
    }

    /// Returns a range, merging it with free neighbours.
    fn give(&mut self, off: usize, len: usize) {
        self.free_bytes += len;
        let (mut start, mut end) = (off, off + len);
        if let Some((&p, &pl)) = self.free.range(..off).next_back() {
            if p + pl == off {
                self.free.remove(&p);
                start = p;
            }
        }
        if let Some(nl) = self.free.remove(&end) {
            end += nl;
        }
        self.free.insert(start, end - start);
    }
}

#[derive(Default)]
struct State {
    /// Indexed by arena id; `None` once given back. Ids are never reused.
    arenas: Vec<Option<Arena>>,
    used: u64,
    peak: u64,
    reserved: u64,
    arena_count: u64,
    /// Set when the backend refused memory the budget allowed (a driver out of memory): the
    /// most this pool can hold from then on, which the manager's eviction works within.
    ceiling: Option<u64>,
    /// Set by [`Pool::lease`]: bytes set aside for this pool alone, charged to the shared
    /// budget in full whatever it holds, and the most it may reserve meanwhile.
    lease: Option<u64>,
    /// The fresh arena being prepared in the background ([`Pool::claim_fresh`]): no slot is
    /// taken from it, nor is it given back, until the preparer lets go of it.
    preparing: Option<u32>,
    /// Set when an allocation or a shrink needs the arena being prepared.
    stop_preparing: bool,
}

impl State {
    /// The bytes this pool may reserve: its budget, or less once the backend has refused more.
    fn capacity(&self, budget: u64) -> u64 {
        self.ceiling.map_or(budget, |c| c.min(budget))
    }
}

/// A pool of slots for one tier.
pub(crate) struct Pool {
    tier: Tier,
    budget: u64,
    arena_target: usize,
    /// A budget shared with other pools, charged for every arena on top of this pool's own.
    shared: Option<SharedBudget>,
    backend: Box<dyn ArenaBackend>,
    state: Mutex<State>,
    /// Signalled when the preparer lets go of its arena.
    prepared: Condvar,
    in_flight: AtomicU64,
    staging: AtomicU64,
}

impl Pool {
    /// `arena_target` is the preferred size of one arena; a slot larger than it gets an arena of
    /// its own, and no arena exceeds what is left of the budget.
    pub(crate) fn new(tier: Tier, budget: u64, arena_target: usize, shared: Option<SharedBudget>, backend: Box<dyn ArenaBackend>) -> Arc<Self> {
        Arc::new(Pool {
            tier,
            budget,
            arena_target: arena_target.max(1),
            shared,
            backend,
            state: Mutex::new(State::default()),
            prepared: Condvar::new(),
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

    /// Takes a slot of `slot_bytes`, growing the pool by one arena when no free range fits.
    pub(crate) fn alloc(self: &Arc<Self>, slot_bytes: usize, staging: bool) -> Result<Slot> {
        if slot_bytes == 0 {
            return Err(Error::unsupported("a zero-byte slot", "slots hold at least one byte"));
        }
        let mut st = self.lock();
        let mut found = Self::take(&mut st, slot_bytes);
        if found.is_none() && st.preparing.is_some() {
            st = self.stop_preparing(st);
            found = Self::take(&mut st, slot_bytes);
        }
        let (arena, offset) = match found {
            Some(found) => found,
            None => {
                self.grow(&mut st, slot_bytes)?;
                Self::take(&mut st, slot_bytes).expect("grow made a range of this size")
            }
        };
        let a = st.arenas[arena as usize].as_ref().expect("a live arena");
        let addr = a.base + offset as u64;
        st.used += slot_bytes as u64;
        st.peak = st.peak.max(st.used);
        drop(st);
        if staging {
            self.staging.fetch_add(slot_bytes as u64, Ordering::Relaxed);
        }
        Ok(Slot::new(self.clone(), arena, offset as u64, addr, slot_bytes, staging))
    }

    /// First fit over the arenas in id order, past the one being prepared.
    fn take(st: &mut State, len: usize) -> Option<(u32, usize)> {
        let skip = st.preparing;
        st.arenas.iter_mut().enumerate().filter(|(id, _)| Some(*id as u32) != skip).find_map(|(id, a)| {
            let a = a.as_mut()?;
            let off = a.take(len)?;
            a.fresh = false;
            Some((id as u32, off))
        })
    }

    /// Asks the preparer to let go of its arena and waits until it has (at most the one block
    /// it is writing).
    fn stop_preparing<'a>(&'a self, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        st.stop_preparing = true;
        while st.preparing.is_some() {
            st = self.prepared.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.stop_preparing = false;
        st
    }

    /// Claims the lowest arena no slot was ever taken from and not yet prepared, for a
    /// preparer working beside the pool's users (writing an NVMe swap file through); returns
    /// its id and size. None when there is none, or another claim is held. The preparer calls
    /// [`Pool::keep_preparing`] before each piece of work and [`Pool::finish_preparing`] at the end.
    pub(crate) fn claim_fresh(&self) -> Option<(u32, usize)> {
        let mut st = self.lock();
        if st.preparing.is_some() {
            return None;
        }
        let (id, bytes) = st
            .arenas
            .iter()
            .enumerate()
            .find_map(|(id, a)| a.as_ref().filter(|a| a.fresh && !a.prepared).map(|a| (id as u32, a.bytes)))?;
        st.preparing = Some(id);
        Some((id, bytes))
    }

    /// Whether the preparer may go on with arena `id`. False when the pool needs it (an
    /// allocation found no other room, or a shrink): the claim is released, and the arena stays
    /// unprepared.
    pub(crate) fn keep_preparing(&self, id: u32) -> bool {
        let mut st = self.lock();
        if st.preparing != Some(id) {
            return false;
        }
        if st.stop_preparing {
            st.preparing = None;
            self.prepared.notify_all();
            return false;
        }
        true
    }

    /// Ends the claim on arena `id`, marking it prepared when `done`.
    pub(crate) fn finish_preparing(&self, id: u32, done: bool) {
        let mut st = self.lock();
        if st.preparing != Some(id) {
            return;
        }
        if let Some(a) = st.arenas[id as usize].as_mut() {
            a.prepared |= done;
        }
        st.preparing = None;
        self.prepared.notify_all();
    }

    /// The most this pool may hold now: its capacity, less what other pools sharing its budget
    /// hold.
    fn limit(&self, st: &State) -> u64 {
        let cap = st.capacity(self.budget);
        match (&self.shared, st.lease) {
            (_, Some(l)) => cap.min(l),
            (Some(s), None) => cap.min(st.reserved + s.free()),
            (None, None) => cap,
        }
    }

    fn grow(&self, st: &mut State, slot_bytes: usize) -> Result<()> {
        if self.limit(st).saturating_sub(st.reserved) < slot_bytes as u64 {
            self.trim(st);
        }
        let capacity = self.limit(st);
        let room = capacity.saturating_sub(st.reserved);
        if room < slot_bytes as u64 {
            return Err(Error::OverBudget {
                tier: self.tier,
                requested: slot_bytes as u64,
                capacity,
                in_use: st.used,
            });
        }
        // Whole slots of this size, so a pool of one slot size never fragments; the last arena
        // takes whatever the budget has left. A pool sharing its budget takes one slot per
        // arena, so every slot it gives up can go back to the others.
        let target = if self.shared.is_some() { slot_bytes } else { self.arena_target.max(slot_bytes) };
        let wanted = target.div_ceil(slot_bytes) as u64 * slot_bytes as u64;
        let mut bytes = wanted.min(room) as usize;
        let id = u32::try_from(st.arenas.len())
            .map_err(|_| Error::unsupported("more than 4 billion arenas", "use larger arenas"))?;
        // Out of memory below the budget (another user of the GPU, libtorch's cache): ask for
        // half as much, in whole slots, down to one slot. What is obtained becomes the pool's
        // capacity, and the manager evicts to fit within it. When not even one slot can be
        // had, the pool's capacity drops to what it holds (later requests evict within that)
        // and the driver's error is returned: nothing is written, the caller may retry.
        // Charge the shared budget first; another pool may have taken the room meanwhile. A
        // leased pool's room is charged already.
        let shared = self.shared.as_ref().filter(|_| st.lease.is_none());
        if let Some(sh) = shared {
            if !sh.take(bytes as u64) {
                return Err(Error::OverBudget {
                    tier: self.tier,
                    requested: slot_bytes as u64,
                    capacity: self.limit(st),
                    in_use: st.used,
                });
            }
        }
        let charged = bytes as u64;
        let uncharge = |got: u64| {
            if let Some(sh) = shared {
                sh.give(charged - got);
            }
        };
        let base = loop {
            match self.backend.alloc_arena(id, bytes) {
                Ok(base) => {
                    if bytes < wanted.min(room) as usize {
                        st.ceiling = Some(st.reserved + bytes as u64);
                        log::warn!(
                            "{} tier: out of memory below the budget; holding {} bytes instead of {} and evicting within them",
                            self.tier,
                            st.reserved + bytes as u64,
                            self.budget
                        );
                    }
                    break base;
                }
                Err(e @ Error::Alloc { .. }) => {
                    let half = bytes / 2 / slot_bytes * slot_bytes;
                    if half < slot_bytes {
                        if st.reserved > 0 {
                            st.ceiling = Some(st.reserved);
                        }
                        uncharge(0);
                        return Err(e);
                    }
                    bytes = half;
                }
                Err(e) => {
                    uncharge(0);
                    return Err(e);
                }
            }
        };
        uncharge(bytes as u64);
        st.arenas.push(Some(Arena {
            base,
            bytes,
            free: BTreeMap::from([(0, bytes)]),
            free_bytes: bytes,
            fresh: true,
            prepared: false,
        }));
        st.reserved += bytes as u64;
        st.arena_count += 1;
        Ok(())
    }

    /// Gives back every arena none of whose bytes is held.
    fn trim(&self, st: &mut State) {
        for id in 0..st.arenas.len() {
            if st.preparing != Some(id as u32) && st.arenas[id].as_ref().is_some_and(Arena::idle) {
                let a = st.arenas[id].take().expect("checked above");
                st.reserved -= a.bytes as u64;
                self.backend.free_arena(id as u32, a.base, a.bytes);
                // A leased pool's bytes go back to its lease.
                if let Some(sh) = self.shared.as_ref().filter(|_| st.lease.is_none()) {
                    sh.give(a.bytes as u64);
                }
            }
        }
    }

    /// Whether `alloc(slot_bytes)` would succeed now: a free range that fits, room left in the
    /// budget, or room that giving back idle arenas would make.
    pub(crate) fn can_alloc(&self, slot_bytes: usize) -> bool {
        let st = self.lock();
        let fits = st.arenas.iter().flatten().any(|a| a.free.values().any(|&l| l >= slot_bytes));
        let idle: u64 = st.arenas.iter().flatten().filter(|a| a.idle()).map(|a| a.bytes as u64).sum();
        fits || self.limit(&st).saturating_sub(st.reserved) + idle >= slot_bytes as u64
    }

    /// Sets aside `bytes` for this pool alone (what it holds counts towards them): the shared
    /// budget is charged for all of them at once, so other pools cannot take the room the pool
    /// gives back meanwhile, and the pool reserves no more than that. False, changing nothing,
    /// when the shared budget has not the room. None ends the lease, returning what the pool
    /// does not hold. A pool without a shared budget is only capped.
    pub(crate) fn lease(&self, bytes: Option<u64>) -> bool {
        let mut st = self.lock();
        let unused = st.lease.map_or(0, |l| l.saturating_sub(st.reserved));
        match bytes {
            Some(b) => {
                let total = b.max(st.reserved);
                let extra = total - st.reserved;
                if let Some(sh) = &self.shared {
                    if extra > unused && !sh.take(extra - unused) {
                        return false;
                    }
                    if unused > extra {
                        sh.give(unused - extra);
                    }
                }
                st.lease = Some(total);
            }
            None => {
                if let Some(sh) = &self.shared {
                    sh.give(unused);
                }
                st.lease = None;
            }
        }
        true
    }

    /// Obtains arenas, each sized for slots of `slot_bytes`, until the pool holds `bytes` (or its
    /// budget, if less): room made before it is needed, as a file system stalls a disk's other
    /// requests while it allocates. Returns the bytes reserved; arenas obtained before an error
    /// stay. Idle reserved arenas are given back only when the budget needs room, or by
    /// [`Pool::shrink`].
    pub(crate) fn reserve(&self, bytes: u64, slot_bytes: usize) -> Result<u64> {
        let mut st = self.lock();
        let target = bytes.min(self.limit(&st));
        while st.reserved < target && self.limit(&st).saturating_sub(st.reserved) >= slot_bytes as u64 {
            self.grow(&mut st, slot_bytes)?;
        }
        Ok(st.reserved)
    }

    /// Gives back every arena with no slot in use. Returns the bytes released.
    pub(crate) fn shrink(&self) -> u64 {
        let mut st = self.lock();
        if st.preparing.is_some() {
            st = self.stop_preparing(st);
        }
        let before = st.reserved;
        self.trim(&mut st);
        before - st.reserved
    }

    fn release(&self, arena: u32, offset: u64, addr: u64, slot_bytes: usize, staging: bool) {
        self.backend.slot_released(arena, addr);
        let mut st = self.lock();
        if let Some(a) = st.arenas[arena as usize].as_mut() {
            a.give(offset as usize, slot_bytes);
        }
        st.used -= slot_bytes as u64;
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
            capacity: st.capacity(self.budget),
            limit: self.limit(&st),
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
        if let (Some(sh), Some(l)) = (&self.shared, st.lease) {
            sh.give(l.saturating_sub(st.reserved));
        }
        for (id, a) in st.arenas.iter_mut().enumerate() {
            if let Some(a) = a.take() {
                self.backend.free_arena(id as u32, a.base, a.bytes);
                if let Some(sh) = &self.shared {
                    sh.give(a.bytes as u64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
