//! The chunk store: where each chunk's copies are, which are valid, and the moves between tiers.
//!
//! A chunk may have a copy in each tier. `valid[t]` says the copy in tier `t` holds the latest
//! data; a write on the device makes the lower copies stale, and only then does an eviction
//! need a write-back (a clean copy below lets the device copy simply be dropped). At most one
//! move per chunk is in flight; while it is, the chunk is neither evicted nor moved again.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::policy::{Candidate, Policy};
use super::trace::{link_name, ManagerStats, Tracer};
use crate::error::{Error, Result};
use crate::pool::Slot;
use crate::tier::{ChunkId, Tier};
use crate::tiers::Tiers;
use crate::transfer::{Failed, Transfer};

pub(crate) fn ti(t: Tier) -> usize {
    match t {
        Tier::Device => 0,
        Tier::Host => 1,
        Tier::Nvme => 2,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MoveKind {
    /// Bringing a chunk up for an access that waits for it.
    Fetch,
    /// Bringing a chunk up ahead of its use.
    Prefetch,
    /// Writing a changed chunk down before dropping its upper copy.
    Evict,
}

pub(crate) struct Moving {
    /// `None` while a waiter has taken it to wait outside the lock.
    pub transfer: Option<Transfer>,
    pub from: Tier,
    pub to: Tier,
    pub kind: MoveKind,
    pub started: Instant,
}

impl Moving {
    /// Whether the move holds a slot in `t` (a device<->NVMe move holds a host staging slot).
    pub(crate) fn touches(&self, t: Tier) -> bool {
        let staged = matches!((self.from, self.to), (Tier::Device, Tier::Nvme) | (Tier::Nvme, Tier::Device));
        self.from == t || self.to == t || (staged && t == Tier::Host)
    }
}

pub(crate) struct Chunk {
    pub id: ChunkId,
    pub bytes: usize,
    pub copies: [Option<Slot>; 3],
    pub valid: [bool; 3],
    pub moving: Option<Moving>,
    /// Held by an access guard: pinned on the device.
    pub compute: bool,
    pub last_use: u64,
    /// The last move's failure, for the access waiting on it.
    pub error: Option<Error>,
}

impl Chunk {
    pub(crate) fn new(id: ChunkId, bytes: usize) -> Self {
        Chunk {
            id,
            bytes,
            copies: [None, None, None],
            valid: [false; 3],
            moving: None,
            compute: false,
            last_use: 0,
            error: None,
        }
    }

    pub(crate) fn on(&self, t: Tier) -> bool {
        self.copies[ti(t)].is_some() && self.valid[ti(t)]
    }

    fn has_data(&self) -> bool {
        self.valid.iter().any(|&v| v) || self.moving.is_some()
    }
}

/// Everything behind the manager's lock.
pub(crate) struct Store {
    pub chunks: Vec<Chunk>,
    pub by_id: HashMap<ChunkId, usize>,
    pub policy: Box<dyn Policy>,
    pub clock: u64,
    /// Non-model bytes the trainer reported on the device.
    pub non_model: u64,
    pub stats: ManagerStats,
    pub tracer: Option<Tracer>,
    pub prefetch_depth: usize,
    /// The last failed eviction's error, for the next caller making room.
    pub evict_error: Option<Error>,
}

/// What `wait_one` found.
pub(crate) enum Waited {
    /// A transfer was taken to wait on outside the lock.
    Take(usize, Transfer),
    /// Another thread waits on it; wait for the condition variable.
    Elsewhere,
    Nothing,
}

impl Store {
    /// Bytes chunks may use in `t` now (on the device: less what non-model data needs).
    pub(crate) fn limit(&self, tiers: &Tiers, t: Tier) -> u64 {
        let cap = tiers.stats(t).map_or(0, |s| s.limit);
        if t == Tier::Device {
            cap.saturating_sub(self.policy.non_model_reserve().max(self.non_model))
        } else {
            cap
        }
    }

    /// Folds completed moves into the store.
    pub(crate) fn reap(&mut self) {
        for i in 0..self.chunks.len() {
            let done = matches!(&self.chunks[i].moving, Some(Moving { transfer: Some(t), .. }) if t.is_complete());
            if done {
                let tr = self.chunks[i].moving.as_mut().and_then(|m| m.transfer.take()).expect("checked");
                self.finish(i, tr.wait_timed());
            }
        }
    }

    /// Records the outcome of chunk `i`'s move.
    pub(crate) fn finish(&mut self, i: usize, r: std::result::Result<(Slot, Slot, Duration), Failed>) {
        let m = self.chunks[i].moving.take().expect("a move was in flight");
        let c = &mut self.chunks[i];
        match r {
            Ok((src, dst, took)) => {
                c.copies[ti(m.from)] = Some(src);
                c.copies[ti(m.to)] = Some(dst);
                c.valid[ti(m.to)] = true;
                if m.kind == MoveKind::Evict {
                    c.copies[ti(m.from)] = None;
                    c.valid[ti(m.from)] = false;
                }
                let link = self.stats.links.entry(link_name(m.from, m.to)).or_default();
                link.bytes += c.bytes as u64;
                link.moves += 1;
                link.busy_us += took.as_micros() as u64;
                if let Some(t) = self.tracer.as_mut() {
                    t.span(&link_name(m.from, m.to), format!("{:?} {}", m.kind, c.id), m.started, took);
                }
            }
            Err(f) => {
                // The source still holds the data; the destination is released. A failed fetch
                // fails the access waiting for it; a failed eviction fails whoever is making
                // room; a failed prefetch only costs the prefetch (the access will fetch again).
                c.copies[ti(m.from)] = Some(f.src);
                log::warn!("moving chunk {} {}->{} failed: {}", c.id, m.from, m.to, f.error);
                match m.kind {
                    MoveKind::Fetch => c.error = Some(f.error),
                    MoveKind::Evict => self.evict_error = Some(f.error),
                    MoveKind::Prefetch => {}
                }
            }
        }
    }

    /// Finds an in-flight move to wait for: chunk `only`'s, or any.
    pub(crate) fn wait_one(&mut self, only: Option<usize>) -> Waited {
        let mut elsewhere = false;
        for (i, c) in self.chunks.iter_mut().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let Some(m) = c.moving.as_mut() else { continue };
            match m.transfer.take() {
                Some(t) => return Waited::Take(i, t),
                None => elsewhere = true,
            }
        }
        if elsewhere {
            Waited::Elsewhere
        } else {
            Waited::Nothing
        }
    }

    /// Starts moving chunk `i` from `from` to `to`, into a slot of `to` (an existing stale one
    /// is reused).
    pub(crate) fn start(&mut self, tiers: &Tiers, i: usize, from: Tier, to: Tier, kind: MoveKind) -> Result<()> {
        let c = &mut self.chunks[i];
        debug_assert!(c.moving.is_none(), "one move per chunk");
        let dst = match c.copies[ti(to)].take() {
            Some(s) => s,
            None => tiers.alloc(to, c.bytes)?,
        };
        c.valid[ti(to)] = false;
        let src = c.copies[ti(from)].take().expect("moving from a tier the chunk is in");
        let transfer = tiers.copy(c.id, src, dst);
        c.moving = Some(Moving {
            transfer: Some(transfer),
            from,
            to,
            kind,
            started: Instant::now(),
        });
        if kind == MoveKind::Prefetch {
            self.stats.prefetches += 1;
        }
        Ok(())
    }

    /// The tier a fetch of chunk `i` to the device reads from: the host if it holds valid data,
    /// else NVMe. `None` when the chunk has no data anywhere (never written).
    pub(crate) fn source(&self, i: usize) -> Option<Tier> {
        let c = &self.chunks[i];
        [Tier::Host, Tier::Nvme].into_iter().find(|&t| c.on(t))
    }

    /// Whether chunk `i` holds data somewhere (false: never written, or discarded).
    pub(crate) fn has_data(&self, i: usize) -> bool {
        self.chunks[i].has_data()
    }

    /// Gives a chunk without data its first copy as zeros on a CPU-addressable device (the
    /// simulated one): nothing to read or copy. False while the device has no room yet.
    pub(crate) fn materialise_on_device(&mut self, tiers: &Tiers, i: usize, pinned: &[usize]) -> Result<bool> {
        let bytes = self.chunks[i].bytes;
        if !self.room(tiers, Tier::Device, bytes as u64, pinned)? {
            return Ok(false);
        }
        let mut s = tiers.alloc(Tier::Device, bytes)?;
        s.bytes_mut().ok_or_else(|| Error::InvalidState("a CPU-addressable device slot has no bytes".into()))?.fill(0);
        let c = &mut self.chunks[i];
        c.copies[ti(Tier::Device)] = Some(s);
        c.valid[ti(Tier::Device)] = true;
        Ok(true)
    }

    /// Gives a never-written chunk its first copy: zeros in a host slot.
    pub(crate) fn materialise(&mut self, tiers: &Tiers, i: usize) -> Result<Option<()>> {
        if self.chunks[i].has_data() {
            return Ok(Some(()));
        }
        if !self.room(tiers, Tier::Host, self.chunks[i].bytes as u64, &[i])? {
            return Ok(None);
        }
        let c = &mut self.chunks[i];
        let mut s = tiers.alloc(Tier::Host, c.bytes)?;
        s.bytes_mut().expect("host slots are CPU-addressable").fill(0);
        c.copies[ti(Tier::Host)] = Some(s);
        c.valid[ti(Tier::Host)] = true;
        Ok(Some(()))
    }

    /// Evictable chunks with a copy in `t`; `keep_pins`: leave the policy's pinned chunks alone.
    fn candidates(&self, t: Tier, exclude: &[usize], keep_pins: bool) -> Vec<Candidate> {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(i, c)| {
                c.copies[ti(t)].is_some()
                    // A chunk in use is pinned on the device; its lower copies may still go.
                    && !(c.compute && t == Tier::Device)
                    && c.moving.is_none()
                    // Chunks of the current access keep their copy here only while it is their
                    // only valid one (a copy on another tier makes this one expendable).
                    && !(exclude.contains(i) && (t == Tier::Device || !Tier::ALL.iter().any(|&x| x != t && c.on(x))))
                    && !(keep_pins && t == Tier::Device && self.policy.pinned(c.id) && c.valid[ti(t)])
            })
            .map(|(_, c)| Candidate {
                id: c.id,
                bytes: c.bytes as u64,
                last_use: c.last_use,
                dirty: c.valid[ti(t)] && !c.valid.iter().enumerate().any(|(k, &v)| k != ti(t) && v),
            })
            .collect()
    }

    /// One step towards `bytes` of room in `t`: `Ok(true)` if there is room now, `Ok(false)` if
    /// something was started or must be waited for (call again after reaping/waiting), or an
    /// error when nothing can make room.
    pub(crate) fn room(&mut self, tiers: &Tiers, t: Tier, bytes: u64, exclude: &[usize]) -> Result<bool> {
        if let Some(e) = self.evict_error.take() {
            return Err(e);
        }
        let used = tiers.stats(t).map_or(0, |s| s.used);
        let limit = self.limit(tiers, t);
        if used + bytes <= limit && tiers.can_alloc(t, bytes as usize) {
            return Ok(true);
        }
        if bytes > limit {
            return Err(Error::OverBudget {
                tier: t,
                requested: bytes,
                capacity: limit,
                in_use: used,
            });
        }
        // Stale copies are free to drop.
        if let Some(i) = self
            .chunks
            .iter()
            .position(|c| c.copies[ti(t)].is_some() && !c.valid[ti(t)] && c.moving.is_none())
        {
            self.chunks[i].copies[ti(t)] = None;
            return Ok(false);
        }
        if let Some(id) = self.victim(t, exclude, used + bytes <= limit) {
            self.evict(tiers, self.by_id[&id], t, exclude)?;
            return Ok(false);
        }
        if self.chunks.iter().any(|c| c.moving.as_ref().is_some_and(|m| m.touches(t))) {
            return Ok(false);
        }
        Err(Error::OverBudget {
            tier: t,
            requested: bytes,
            capacity: limit,
            in_use: used,
        })
    }

    /// The chunk to evict from `t`: pinned chunks stay unless nothing else can go or `fragmented`
    /// (the bytes are free but not in one piece).
    pub(crate) fn victim(&self, t: Tier, exclude: &[usize], fragmented: bool) -> Option<ChunkId> {
        let mut cands = self.candidates(t, exclude, true);
        if cands.is_empty() || fragmented {
            cands = self.candidates(t, exclude, false);
        }
        if t == Tier::Device {
            // A policy may refuse its pinned chunks; when only those are left they go, oldest first.
            self.policy.victim(&cands).or_else(|| cands.iter().min_by_key(|c| c.last_use).map(|c| c.id))
        } else {
            // Lower tiers: the same rule when the policy knows the future, else LRU.
            cands
                .iter()
                .max_by_key(|c| (self.policy.next_use(c.id), std::cmp::Reverse(c.last_use)))
                .map(|c| c.id)
        }
    }

    /// Removes chunk `i`'s copy from `t`: dropped if another tier holds a valid copy, else
    /// written down first.
    pub(crate) fn evict(&mut self, tiers: &Tiers, i: usize, t: Tier, exclude: &[usize]) -> Result<()> {
        self.evict_to(tiers, i, t, exclude, false)
    }

    /// `evict`; `lowest`: write changed data to the lowest tier (NVMe, through a host staging
    /// slot) rather than the first one with room, to give memory back rather than make room.
    pub(crate) fn evict_to(&mut self, tiers: &Tiers, i: usize, t: Tier, exclude: &[usize], lowest: bool) -> Result<()> {
        let mut below: Vec<Tier> = Tier::ALL.into_iter().filter(|&x| ti(x) > ti(t) && tiers.has(x)).collect();
        if lowest && below.len() > 1 {
            below.drain(..below.len() - 1);
        }
        let c = &mut self.chunks[i];
        if !c.valid[ti(t)] || Tier::ALL.iter().any(|&x| x != t && c.on(x)) {
            c.copies[ti(t)] = None;
            c.valid[ti(t)] = false;
            self.stats.clean_drops += 1;
            return Ok(());
        }
        let bytes = c.bytes as u64;
        for &dest in &below {
            // Device -> NVMe goes through a host staging slot: it needs host room as well.
            let staged = t == Tier::Device && dest == Tier::Nvme;
            if staged && !self.room(tiers, Tier::Host, bytes, exclude).unwrap_or(false) {
                continue;
            }
            match self.room(tiers, dest, bytes, &[i]) {
                Ok(true) => {
                    self.start(tiers, i, t, dest, MoveKind::Evict)?;
                    self.stats.write_backs += 1;
                    return Ok(());
                }
                // Room is being made below; the caller retries after waiting.
                Ok(false) => return Ok(()),
                Err(_) => continue,
            }
        }
        Err(Error::OverBudget {
            tier: t,
            requested: bytes,
            capacity: self.limit(tiers, t),
            in_use: tiers.stats(t).map_or(0, |s| s.used),
        })
    }

    /// Starts prefetches along the policy's view of the future: to the device while there is
    /// room (or a clean chunk needed later than the prefetched one can go), and from NVMe to the
    /// host further ahead, so a later fetch crosses only the last link.
    pub(crate) fn prefetch(&mut self, tiers: &Tiers) {
        let upcoming = self.policy.upcoming(self.prefetch_depth);
        let mut device_open = true;
        let mut seen = std::collections::HashSet::new();
        for id in upcoming {
            if !seen.insert(id) {
                continue;
            }
            let Some(&i) = self.by_id.get(&id) else { continue };
            let c = &self.chunks[i];
            if c.moving.is_some() || c.on(Tier::Device) || !c.has_data() {
                continue;
            }
            let bytes = c.bytes as u64;
            if device_open {
                match self.device_room_for(tiers, i, bytes) {
                    true => {
                        if let Some(src) = self.source(i) {
                            let staged = src == Tier::Nvme;
                            let host_ok = !staged || self.fits(tiers, Tier::Host, bytes);
                            if host_ok && self.start(tiers, i, src, Tier::Device, MoveKind::Prefetch).is_ok() {
                                continue;
                            }
                        }
                        device_open = false;
                    }
                    false => device_open = false,
                }
            }
            // Beyond the device's reach: stage NVMe-only chunks in host memory.
            let c = &self.chunks[i];
            if tiers.has(Tier::Nvme) && c.on(Tier::Nvme) && !c.on(Tier::Host) && c.copies[ti(Tier::Host)].is_none() {
                if !self.fits(tiers, Tier::Host, 2 * bytes) {
                    break;
                }
                let _ = self.start(tiers, i, Tier::Nvme, Tier::Host, MoveKind::Prefetch);
            }
        }
    }

    fn fits(&self, tiers: &Tiers, t: Tier, bytes: u64) -> bool {
        tiers.stats(t).is_some_and(|s| s.used + bytes <= self.limit(tiers, t)) && tiers.can_alloc(t, bytes as usize)
    }

    /// Whether chunk `i` can come to the device now without evicting anything needed sooner
    /// than it. Clean chunks needed later are dropped to make the room; a changed one is
    /// written back (and the prefetch waits for a later call, when the write-back is done).
    fn device_room_for(&mut self, tiers: &Tiers, i: usize, bytes: u64) -> bool {
        let need = self.policy.next_use(self.chunks[i].id).unwrap_or(u64::MAX);
        loop {
            if self.fits(tiers, Tier::Device, bytes) {
                return true;
            }
            let cands = self.candidates(Tier::Device, &[i], true);
            let victim = cands
                .iter()
                .filter_map(|c| Some((self.policy.next_use(c.id)?, !c.dirty, c.id)))
                .filter(|&(n, _, _)| n > need)
                .max();
            let Some((_, clean, id)) = victim else { return false };
            let v = self.by_id[&id];
            if clean {
                self.chunks[v].copies[0] = None;
                self.chunks[v].valid[0] = false;
                self.stats.clean_drops += 1;
            } else {
                let _ = self.evict(tiers, v, Tier::Device, &[i]);
                return false;
            }
        }
    }
}
