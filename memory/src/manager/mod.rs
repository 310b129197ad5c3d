//! The chunk manager: the API trainers embed.
//!
//! Register tensors in first-use order (`ManagerBuilder`), then `access` the chunks an operation
//! needs: the returned [`Access`] guard keeps them on the compute tier (the device) until it is
//! dropped and exposes their addresses and typed slices. Behind it, a placement policy decides
//! what to evict and what to prefetch, and the tiers' engines move chunks asynchronously so
//! prefetches overlap compute. Thread-safe: one lock guards the store; waits happen outside it.

mod access;
mod fit;
pub mod layout;
pub mod policy;
pub mod sim;
pub mod state;
mod store;
pub mod trace;

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use access::Access;

use crate::error::{Error, Result};
use crate::nvme::SwapFiles;
use crate::tier::{ChunkId, Tier};
use crate::tiers::{Tiers, TiersConfig};
use layout::{ChunkSize, DType, GroupLayout, Role};
use policy::PolicyKind;
use state::TensorState;
use fit::{check_fits, preallocate};
use store::{ti, Chunk, MoveKind, Store, Waited};
use trace::{ManagerStats, Tracer};

/// Settings of a manager.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManagerConfig {
    pub tiers: TiersConfig,
    /// Default: `Auto`.
    pub policy: PolicyKind,
    /// Default: search 1M..64M elements in 1M steps.
    pub chunk_size: ChunkSize,
    /// Accesses ahead the prefetcher looks (bounded further by the budget). 0 disables
    /// prefetching. Default: 256.
    pub prefetch_depth: usize,
    /// Record a timeline for `chrome_trace`. Default: false.
    pub trace: bool,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            tiers: TiersConfig::default(),
            policy: PolicyKind::Auto,
            chunk_size: ChunkSize::Search {
                min: 1 << 20,
                max: 64 << 20,
                step: 1 << 20,
            },
            prefetch_depth: 256,
            trace: false,
        }
    }
}

/// A registered tensor: group and index within the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorId {
    pub group: usize,
    pub index: usize,
}

/// One chunk: a group's chunk index in one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkRef {
    pub group: usize,
    pub index: usize,
    pub role: Role,
}

impl ChunkRef {
    /// The chunk's id (in errors, traces and schedules).
    pub fn id(self) -> ChunkId {
        ChunkId(((self.group as u64) << 40) | ((self.index as u64) << 8) | self.role.index() as u64)
    }
}

/// What an access will do to the chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Read,
    /// The chunks change: lower copies become stale and are written back on eviction.
    Write,
}

struct GroupSpec {
    name: String,
    roles: Vec<(Role, DType)>,
    tensors: Vec<(String, Vec<usize>)>,
}

/// Registers groups and tensors, then builds the manager.
pub struct ManagerBuilder {
    cfg: ManagerConfig,
    groups: Vec<GroupSpec>,
}

impl ManagerBuilder {
    /// A group of tensors sharing one layout across `roles` (a model: its parameters, and
    /// optionally gradients, masters and moments).
    pub fn group(&mut self, name: &str, roles: &[(Role, DType)]) -> usize {
        self.groups.push(GroupSpec {
            name: name.into(),
            roles: roles.to_vec(),
            tensors: Vec::new(),
        });
        self.groups.len() - 1
    }

    /// Registers a tensor; call in first-use order.
    pub fn tensor(&mut self, group: usize, name: &str, shape: &[usize]) -> TensorId {
        let g = &mut self.groups[group];
        g.tensors.push((name.into(), shape.to_vec()));
        TensorId {
            group,
            index: g.tensors.len() - 1,
        }
    }

    pub fn build(self) -> Result<Manager> {
        let tiers = Tiers::new(self.cfg.tiers.clone())?;
        let mut layouts = Vec::new();
        let mut chunks = Vec::new();
        let mut refs = Vec::new();
        let mut order = Vec::new();
        for (g, spec) in self.groups.iter().enumerate() {
            let l = layout::plan(&spec.tensors, &spec.roles, self.cfg.chunk_size, tiers.slot_align())?;
            for index in 0..l.chunk_sizes.len() {
                for &(role, _) in &spec.roles {
                    let r = ChunkRef { group: g, index, role };
                    let bytes = l.chunk_bytes(index, role).expect("role of the group");
                    order.push((r.id(), bytes as u64, role.is_optimizer_state()));
                    chunks.push(Chunk::new(r.id(), bytes));
                    refs.push(r);
                }
            }
            layouts.push(l);
        }
        check_fits(&tiers, &order)?;
        match self.cfg.tiers.nvme.as_ref().map(|n| n.swap_files) {
            Some(SwapFiles::Reserved) => preallocate(&tiers, &order, false),
            Some(SwapFiles::Written) => preallocate(&tiers, &order, true),
            Some(SwapFiles::Background) => {
                preallocate(&tiers, &order, false);
                tiers.fill_when_idle();
            }
            Some(SwapFiles::OnDemand) | None => {}
        }
        let by_id = chunks.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        let states = layouts
            .iter()
            .map(|l| vec![[TensorState::Free; 5]; l.tensors.len()])
            .collect();
        let store = Store {
            chunks,
            by_id,
            policy: policy::build(self.cfg.policy, &order),
            clock: 0,
            non_model: 0,
            stats: ManagerStats::default(),
            tracer: self.cfg.trace.then(Tracer::new),
            prefetch_depth: self.cfg.prefetch_depth,
            evict_error: None,
        };
        Ok(Manager {
            tiers,
            layouts,
            names: self.groups.into_iter().map(|g| g.name).collect(),
            refs,
            inner: Mutex::new(Inner { store, states }),
            cv: Condvar::new(),
        })
    }
}

struct Inner {
    store: Store,
    /// Per group, per tensor, per role.
    states: Vec<Vec<[TensorState; 5]>>,
}

/// The chunk manager.
pub struct Manager {
    tiers: Tiers,
    layouts: Vec<GroupLayout>,
    names: Vec<String>,
    refs: Vec<ChunkRef>,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl Manager {
    pub fn builder(cfg: ManagerConfig) -> ManagerBuilder {
        ManagerBuilder { cfg, groups: Vec::new() }
    }

    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    pub fn layout(&self, group: usize) -> &GroupLayout {
        &self.layouts[group]
    }

    pub fn group_name(&self, group: usize) -> &str {
        &self.names[group]
    }

    /// The chunk holding `tensor` in `role`.
    pub fn chunk_of(&self, tensor: TensorId, role: Role) -> ChunkRef {
        ChunkRef {
            group: tensor.group,
            index: self.layouts[tensor.group].tensors[tensor.index].placement.chunk,
            role,
        }
    }

    /// Every chunk of a group in `role`, in first-use order.
    pub fn chunks(&self, group: usize, role: Role) -> Vec<ChunkRef> {
        (0..self.layouts[group].chunk_sizes.len()).map(|index| ChunkRef { group, index, role }).collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn index(&self, inner: &Inner, r: ChunkRef) -> Result<usize> {
        inner
            .store
            .by_id
            .get(&r.id())
            .copied()
            .ok_or_else(|| Error::InvalidState(format!("no chunk {r:?} (is the role registered for this group?)")))
    }

    /// Declares the access order of one iteration; it repeats. The `optimal` policy follows it;
    /// `auto` uses it until it has traced an iteration.
    pub fn set_schedule(&self, schedule: &[ChunkRef]) {
        let mut g = self.lock();
        g.store.policy.set_schedule(schedule.iter().map(|r| r.id()).collect(), true);
    }

    /// The chunks' contents are no longer needed (a gradient the optimizer has consumed): every
    /// copy is dropped, in every tier, without a write-back, their tensors become
    /// [`TensorState::Free`], and the next access finds zeros without reading anything. Waits for
    /// a move of theirs in flight; an error, changing nothing, while an access holds one of them.
    pub fn discard(&self, chunks: &[ChunkRef]) -> Result<()> {
        let mut g = self.lock();
        let idx: Vec<usize> = chunks.iter().map(|&r| self.index(&g, r)).collect::<Result<_>>()?;
        loop {
            if let Some(k) = idx.iter().position(|&i| g.store.chunks[i].compute) {
                return Err(Error::InvalidState(format!("chunk {:?} is being accessed: it cannot be discarded", chunks[k])));
            }
            g.store.reap();
            match idx.iter().find(|&&i| g.store.chunks[i].moving.is_some()) {
                Some(&i) => g = self.wait(g, Some(i)),
                None => break,
            }
        }
        // Tensors without data stay as they are; the others must be at rest (not awaiting an
        // update).
        for r in chunks {
            for (t, info) in self.layouts[r.group].tensors_in(r.index) {
                let from = g.states[r.group][t][r.role.index()];
                if from != TensorState::Free {
                    from.transition(TensorState::Free, &info.name)?;
                }
            }
        }
        for r in chunks {
            for (t, _) in self.layouts[r.group].tensors_in(r.index) {
                g.states[r.group][t][r.role.index()] = TensorState::Free;
            }
        }
        for &i in &idx {
            let c = &mut g.store.chunks[i];
            c.copies = [None, None, None];
            c.valid = [false; 3];
            c.error = None;
        }
        drop(g);
        self.cv.notify_all();
        Ok(())
    }

    /// Marks the end of an iteration (one pass over the schedule).
    pub fn end_iteration(&self) {
        self.lock().store.policy.on_iteration_end();
    }

    /// Reports the non-model bytes (activations, workspace) now in use on the device; chunks
    /// get the device budget minus this (and, under `auto`, minus the traced peak).
    pub fn set_non_model_bytes(&self, bytes: u64) {
        let mut g = self.lock();
        let s = &mut g.store;
        s.non_model = bytes;
        s.policy.on_non_model(bytes);
        s.stats.device_non_model_bytes = bytes;
        s.stats.device_non_model_peak = s.stats.device_non_model_peak.max(bytes);
    }

    /// Starts moving `chunks` towards the device without waiting (a hint; silently skips what
    /// does not fit without evicting).
    pub fn prefetch(&self, chunks: &[ChunkRef]) {
        let mut g = self.lock();
        g.store.reap();
        for &r in chunks {
            let Ok(i) = self.index(&g, r) else { continue };
            let s = &mut g.store;
            let c = &s.chunks[i];
            if c.moving.is_some() || c.on(Tier::Device) {
                continue;
            }
            let bytes = c.bytes as u64;
            let fits = self.tiers.stats(Tier::Device).is_some_and(|st| st.used + bytes <= s.limit(&self.tiers, Tier::Device))
                && self.tiers.can_alloc(Tier::Device, bytes as usize);
            if let (true, Some(src)) = (fits, s.source(i)) {
                let _ = s.start(&self.tiers, i, src, Tier::Device, MoveKind::Prefetch);
            }
        }
    }

    /// Brings `chunks` to the device and keeps them there until the guard is dropped.
    pub fn access(&self, chunks: &[ChunkRef], mode: Mode) -> Result<Access<'_>> {
        let mut g = self.lock();
        let idx: Vec<usize> = chunks.iter().map(|&r| self.index(&g, r)).collect::<Result<_>>()?;
        for (k, &i) in idx.iter().enumerate() {
            if g.store.chunks[i].compute || idx[..k].contains(&i) {
                return Err(Error::InvalidState(format!("chunk {:?} is already being accessed", chunks[k])));
            }
        }
        let total: u64 = idx.iter().map(|&i| g.store.chunks[i].bytes as u64).sum();
        let limit = g.store.limit(&self.tiers, Tier::Device);
        if total > limit {
            return Err(Error::OverBudget {
                tier: Tier::Device,
                requested: total,
                capacity: limit,
                in_use: self.tiers.stats(Tier::Device).map_or(0, |s| s.used),
            });
        }
        let before = self.states_of(&g, chunks);
        self.set_states(&mut g, chunks, TensorState::Compute)?;
        for &i in &idx {
            let s = &mut g.store;
            s.clock += 1;
            let id = s.chunks[i].id;
            s.policy.on_access(id);
            s.chunks[i].last_use = s.clock;
            s.chunks[i].compute = true;
        }
        g.store.stats.accesses += 1;
        let t0 = Instant::now();
        let mut stalled = false;
        let (mut g, r) = self.bring_up(g, &idx, &mut stalled);
        if let Err(e) = r {
            for &i in &idx {
                g.store.chunks[i].compute = false;
            }
            self.restore_states(&mut g, chunks, &before);
            self.cv.notify_all();
            return Err(e);
        }
        let waited = t0.elapsed();
        if stalled {
            g.store.stats.stall_us += waited.as_micros() as u64;
            if let Some(t) = g.store.tracer.as_mut() {
                t.span("stall", "stall".into(), t0, waited);
            }
        } else {
            g.store.stats.hits += 1;
        }
        g.store.prefetch(&self.tiers);
        let addrs = idx
            .iter()
            .map(|&i| {
                let slot = g.store.chunks[i].copies[0].as_ref().expect("brought up");
                (slot.addr(), slot.len(), slot.bytes().is_some())
            })
            .collect();
        Ok(Access {
            mgr: self,
            refs: chunks.to_vec(),
            idx,
            addrs,
            mode,
            after_backward: false,
            started: Instant::now(),
        })
    }

    /// Makes every chunk in `idx` valid on the device, waiting outside the lock. Every fetch
    /// that can start does before any is waited for, so an access to several chunks (an
    /// optimizer step's parameters, gradients and moments) reads them together rather than one
    /// after another.
    fn bring_up<'a>(&'a self, mut g: MutexGuard<'a, Inner>, idx: &[usize], stalled: &mut bool) -> (MutexGuard<'a, Inner>, Result<()>) {
        // Largest first, so smaller chunks fill the gaps the larger ones leave.
        let by_size = |g: &Inner| {
            let mut v: Vec<usize> = idx.to_vec();
            v.sort_by_key(|&i| std::cmp::Reverse(g.store.chunks[i].bytes));
            v
        };
        let mut pending = by_size(&g);
        let mut relocations = 0;
        'rounds: loop {
            g.store.reap();
            for &i in &pending {
                if let Some(e) = g.store.chunks[i].error.take() {
                    return (g, Err(e));
                }
            }
            pending.retain(|&i| {
                let c = &g.store.chunks[i];
                !(c.on(Tier::Device) && c.moving.is_none())
            });
            if pending.is_empty() {
                return (g, Ok(()));
            }
            *stalled = true;
            for k in 0..pending.len() {
                let i = pending[k];
                if g.store.chunks[i].moving.is_some() {
                    continue;
                }
                match self.start_fetch(&mut g.store, i, idx) {
                    Ok(true) => {}
                    // Room is being made: wait for a move below.
                    Ok(false) => break,
                    Err(Error::OverBudget { tier: Tier::Device, .. }) if relocations < 4 && self.fragmented(&g.store, idx) => {
                        relocations += 1;
                        // The bytes fit but not in one piece: clear the device of everything no
                        // other access holds (this access's chunks included) and bring this
                        // access's chunks up largest first, which packs them without holes.
                        // Its fetches in flight land first, so they can move too.
                        while let Some(i) = idx.iter().copied().find(|&i| g.store.chunks[i].moving.is_some()) {
                            g = self.wait(g, Some(i));
                            g.store.reap();
                        }
                        let mut progressed = false;
                        for j in 0..g.store.chunks.len() {
                            let c = &g.store.chunks[j];
                            let ours = idx.contains(&j);
                            if c.copies[0].is_none() || c.moving.is_some() || (c.compute && !ours) {
                                continue;
                            }
                            g.store.chunks[j].compute = false;
                            let r = g.store.evict(&self.tiers, j, Tier::Device, &[]);
                            g.store.chunks[j].compute = ours;
                            if let Err(e) = r {
                                return (g, Err(e));
                            }
                            progressed |= g.store.chunks[j].copies[0].is_none() || g.store.chunks[j].moving.is_some();
                        }
                        // Write-backs may wait for room below; the relocation count bounds retries.
                        if !progressed && g.store.chunks.iter().any(|c| c.moving.is_some()) {
                            g = self.wait(g, None);
                        }
                        pending = by_size(&g);
                        continue 'rounds;
                    }
                    Err(e) => return (g, Err(e)),
                }
            }
            // One of this access's moves, the first in line, else any (one making room).
            let ours = pending.iter().copied().find(|&i| g.store.chunks[i].moving.is_some());
            g = self.wait(g, ours);
        }
    }

    /// Whether the chunks of an access would fit on the device by bytes alone.
    fn fragmented(&self, s: &Store, idx: &[usize]) -> bool {
        let total: u64 = idx.iter().map(|&i| s.chunks[i].bytes as u64).sum();
        total <= s.limit(&self.tiers, Tier::Device)
    }

    /// One step towards fetching chunk `i`: `Ok(true)` once its move has started, `Ok(false)`
    /// when room is still being made (wait for a move, then call again).
    fn start_fetch(&self, s: &mut Store, i: usize, pinned: &[usize]) -> Result<bool> {
        if !s.has_data(i) && self.tiers.host_addressable(Tier::Device) {
            // Zeros straight on the device (false: wait for room there).
            return s.materialise_on_device(&self.tiers, i, pinned);
        }
        if s.materialise(&self.tiers, i)?.is_none() {
            return Ok(false);
        }
        let Some(src) = s.source(i) else { return Ok(false) };
        let bytes = s.chunks[i].bytes as u64;
        if !s.room(&self.tiers, Tier::Device, bytes, pinned)? {
            return Ok(false);
        }
        if src == Tier::Nvme && !s.room(&self.tiers, Tier::Host, bytes, pinned)? {
            return Ok(false);
        }
        s.start(&self.tiers, i, src, Tier::Device, MoveKind::Fetch)?;
        Ok(true)
    }

    /// Waits for one in-flight move (chunk `only`'s, or any) outside the lock.
    fn wait<'a>(&'a self, mut g: MutexGuard<'a, Inner>, only: Option<usize>) -> MutexGuard<'a, Inner> {
        match g.store.wait_one(only) {
            Waited::Take(i, t) => {
                drop(g);
                let r = t.wait_timed();
                let mut g = self.lock();
                g.store.finish(i, r);
                self.cv.notify_all();
                g
            }
            // Another thread waits on it and will notify; the timeout bounds a missed wake-up.
            Waited::Elsewhere => self
                .cv
                .wait_timeout(g, std::time::Duration::from_millis(5))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0),
            Waited::Nothing => g,
        }
    }

    fn states_of(&self, g: &Inner, chunks: &[ChunkRef]) -> Vec<TensorState> {
        chunks
            .iter()
            .flat_map(|r| self.layouts[r.group].tensors_in(r.index).map(move |(t, _)| g.states[r.group][t][r.role.index()]))
            .collect()
    }

    fn restore_states(&self, g: &mut Inner, chunks: &[ChunkRef], saved: &[TensorState]) {
        let mut it = saved.iter();
        for r in chunks {
            for (t, _) in self.layouts[r.group].tensors_in(r.index) {
                g.states[r.group][t][r.role.index()] = *it.next().expect("saved per tensor");
            }
        }
    }

    fn set_states(&self, g: &mut Inner, chunks: &[ChunkRef], to: TensorState) -> Result<()> {
        // Check every transition first so a refused access changes nothing.
        for r in chunks {
            for (t, info) in self.layouts[r.group].tensors_in(r.index) {
                let from = g.states[r.group][t][r.role.index()];
                from.transition(to, &info.name)?;
            }
        }
        for r in chunks {
            for (t, _) in self.layouts[r.group].tensors_in(r.index) {
                g.states[r.group][t][r.role.index()] = to;
            }
        }
        Ok(())
    }

    /// The state of a tensor in a role.
    pub fn tensor_state(&self, tensor: TensorId, role: Role) -> TensorState {
        self.lock().states[tensor.group][tensor.index][role.index()]
    }

    /// Moves a tensor to a new state (e.g. `ReadyForUpdate` once its gradients are final).
    pub fn transition(&self, tensor: TensorId, role: Role, to: TensorState) -> Result<()> {
        let mut g = self.lock();
        let name = &self.layouts[tensor.group].tensors[tensor.index].name;
        let s = &mut g.states[tensor.group][tensor.index][role.index()];
        *s = s.transition(to, name)?;
        Ok(())
    }

    fn release(&self, a: &Access<'_>) {
        let mut g = self.lock();
        let to = if a.after_backward {
            TensorState::HoldAfterBwd
        } else {
            TensorState::Hold
        };
        if let Err(e) = self.set_states(&mut g, &a.refs, to) {
            log::error!("releasing an access: {e}");
        }
        for &i in &a.idx {
            let c = &mut g.store.chunks[i];
            c.compute = false;
            if a.mode == Mode::Write {
                c.valid = [true, false, false];
            }
        }
        if let Some(t) = g.store.tracer.as_mut() {
            t.span("compute", format!("{} chunks", a.idx.len()), a.started, a.started.elapsed());
        }
        g.store.reap();
        g.store.prefetch(&self.tiers);
        drop(g);
        self.cv.notify_all();
    }

    /// Counters, per-tier accounting included.
    pub fn stats(&self) -> ManagerStats {
        let mut g = self.lock();
        g.store.reap();
        let mut s = g.store.stats.clone();
        s.device_model_bytes = g.store.chunks.iter().filter(|c| c.copies[0].is_some()).map(|c| c.bytes as u64).sum();
        for t in Tier::ALL {
            if let Some(st) = self.tiers.stats(t) {
                s.tiers.insert(t.name().into(), st);
            }
        }
        s
    }

    /// The recorded timeline as Chrome trace JSON (None unless `trace` was set).
    pub fn chrome_trace(&self) -> Option<serde_json::Value> {
        let mut g = self.lock();
        g.store.reap();
        g.store.tracer.as_ref().map(|t| t.to_json())
    }

    /// Starts the timeline afresh (e.g. after initialisation, so it shows training alone);
    /// moves in flight now are waited for first, so none straddles the cut.
    pub fn reset_trace(&self) {
        self.quiesce();
        let mut g = self.lock();
        if let Some(t) = g.store.tracer.as_mut() {
            t.clear();
        }
    }

    /// Transfer time recorded so far and the part of it hidden under compute (None unless
    /// `trace` was set).
    pub fn trace_overlap(&self) -> Option<trace::Overlap> {
        let mut g = self.lock();
        g.store.reap();
        g.store.tracer.as_ref().map(|t| t.overlap())
    }

    /// Waits for every in-flight move (prefetches included) to finish.
    pub fn quiesce(&self) {
        let mut g = self.lock();
        loop {
            g.store.reap();
            if g.store.chunks.iter().all(|c| c.moving.is_none()) {
                return;
            }
            g = self.wait(g, None);
        }
    }

    /// Moves every chunk off the device and, when there is an NVMe tier, out of host memory
    /// (changed data is written down first, clean copies are dropped), then gives the emptied
    /// arenas back. A model not in use then holds no fast memory, and managers drawing from a
    /// [`crate::SharedBudget`] can take turns with it: the next access brings chunks back as
    /// usual. Refused while an access is alive. Returns the bytes given back.
    pub fn offload(&self) -> Result<u64> {
        self.give_back(0, 0)
    }

    /// Gives memory back until this manager holds at most `device_keep` bytes of device arenas
    /// and `host_keep` of host arenas, or nothing more can go (the host only when there is an
    /// NVMe tier; without one it is where every chunk lives). The chunks the policy needs
    /// furthest in the future go first; clean copies are dropped, changed data is written to
    /// the lowest tier (from the device to NVMe through a host staging slot, so some host room
    /// is needed: an error names the host tier when there is none). Arenas are returned as they
    /// empty, so for a pool that shares its budget (one slot per arena) the bytes reach the
    /// other managers at once. Refused while an access is alive. Returns the bytes given back.
    pub fn give_back(&self, device_keep: u64, host_keep: u64) -> Result<u64> {
        let held = |t: Tier| self.tiers.stats(t).map_or(0, |s| s.reserved);
        let before = held(Tier::Device) + held(Tier::Host);
        let t0 = Instant::now();
        let mut g = self.lock();
        if let Some(i) = g.store.chunks.iter().position(|c| c.compute) {
            return Err(Error::InvalidState(format!("cannot release memory: chunk {:?} is being accessed", self.refs[i])));
        }
        // The host first: the device's write-backs to NVMe stage through it.
        let mut levels = vec![(Tier::Device, device_keep)];
        if self.tiers.has(Tier::Nvme) {
            levels.insert(0, (Tier::Host, host_keep));
        }
        let progress = |s: &Store| {
            let copies: usize = s.chunks.iter().map(|c| c.copies.iter().flatten().count()).sum();
            (copies, s.chunks.iter().filter(|c| c.moving.is_some()).count())
        };
        for (t, keep) in levels {
            if !self.tiers.has(t) {
                continue;
            }
            loop {
                g.store.reap();
                if let Some(e) = g.store.evict_error.take() {
                    return Err(e);
                }
                self.tiers.shrink_tier(t);
                let moving = |s: &Store| s.chunks.iter().any(|c| c.moving.as_ref().is_some_and(|m| m.touches(t)));
                // Write-backs from `t` still hold their source slots.
                let leaving: u64 = g
                    .store
                    .chunks
                    .iter()
                    .filter(|c| c.moving.as_ref().is_some_and(|m| m.from == t && m.kind == MoveKind::Evict))
                    .map(|c| c.bytes as u64)
                    .sum();
                if held(t).saturating_sub(leaving) <= keep {
                    if !moving(&g.store) {
                        break;
                    }
                    g = self.wait(g, None);
                    continue;
                }
                let was = progress(&g.store);
                if let Some(i) = g.store.chunks.iter().position(|c| c.copies[ti(t)].is_some() && !c.valid[ti(t)] && c.moving.is_none()) {
                    g.store.chunks[i].copies[ti(t)] = None;
                    continue;
                }
                match g.store.victim(t, &[], true) {
                    Some(id) => {
                        let i = g.store.by_id[&id];
                        match g.store.evict_to(&self.tiers, i, t, &[], true) {
                            // No room below now: wait for moves in flight, or report below.
                            Ok(()) | Err(Error::OverBudget { .. }) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    // Only chunks in flight are left.
                    None if g.store.chunks.iter().any(|c| c.moving.is_some()) => {}
                    None => break,
                }
                if progress(&g.store) == was {
                    if g.store.chunks.iter().all(|c| c.moving.is_none()) {
                        // Nothing dropped, nothing in flight: the tier below has no room (from
                        // the device to NVMe: no host staging slot, the host being held by
                        // others sharing its budget; they must give back host memory first).
                        let below = if t == Tier::Device { Tier::Host } else { Tier::Nvme };
                        return Err(Error::OverBudget {
                            tier: below,
                            requested: held(t).saturating_sub(keep),
                            capacity: g.store.limit(&self.tiers, below),
                            in_use: self.tiers.stats(below).map_or(0, |s| s.used),
                        });
                    }
                    g = self.wait(g, None);
                }
            }
        }
        self.tiers.shrink_tier(Tier::Device);
        self.tiers.shrink_tier(Tier::Host);
        let gave = before.saturating_sub(held(Tier::Device) + held(Tier::Host));
        if let Some(tr) = g.store.tracer.as_mut() {
            tr.span("give back", format!("gave back {gave} bytes"), t0, t0.elapsed());
        }
        drop(g);
        self.cv.notify_all();
        Ok(gave)
    }

    /// Which tiers hold a valid copy of `chunk` (for tests and diagnostics).
    pub fn residency(&self, chunk: ChunkRef) -> Vec<Tier> {
        let mut g = self.lock();
        g.store.reap();
        let Ok(i) = self.index(&g, chunk) else { return Vec::new() };
        let c = &g.store.chunks[i];
        Tier::ALL.into_iter().filter(|&t| c.on(t)).collect()
    }

    /// All chunks, in first-use order.
    pub fn all_chunks(&self) -> &[ChunkRef] {
        &self.refs
    }
}
