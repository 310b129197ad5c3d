//! Chunked models that share one device and host budget take turns with it, as the four models
//! of RLHF share one GPU: before a model touches its chunks, the others give memory back until
//! it has room for its working set (one unit's chunks and NVMe staging), those needed furthest
//! in the future first. A phase that reads the parameters many times over (generation: once
//! per token) claims room for all of them ([`Turns::claim`]).
//!
//! Without this each model gets a fixed share of the budgets, and the actor generating alone
//! streams its weights from NVMe once per token through a third of the memory while the rest
//! sits idle. Taking memory costs the writes of the changed chunks given back, so a model
//! claims no more than the phase re-reads: one forward pass or one update reads each chunk
//! once or twice, and streams through its working set as well as through more.

use std::sync::{Arc, Mutex};

use stowage_memory::{Manager, SharedBudget, Tier};

use crate::error::Result;

/// The shared budgets and the models drawing from them. Clones share the same state.
#[derive(Clone, Debug)]
pub struct Turns {
    pub device: SharedBudget,
    pub host: SharedBudget,
    inner: Arc<Mutex<Inner>>,
}

struct Member {
    mgr: Arc<Manager>,
    /// Bytes it needs in fast memory while at work (a unit's chunks).
    want: u64,
    /// Bytes it would like besides at its turn: the next unit's chunks, so they arrive while
    /// the current one computes (a turn with `want` alone fetches each unit on demand).
    ahead: u64,
    /// Bytes of all its parameter chunks, for a claim.
    params: u64,
    /// Host bytes its moves to and from NVMe stage through.
    staging: u64,
    /// Device bytes it needs working in the background (its update: one chunk's optimizer set
    /// and the next one's).
    sweep: u64,
    last_turn: u64,
    /// Working in the background (see [`Turns::background`]): its pools hold leases of `sweep`
    /// and `staging`, and the others' turns leave its memory alone.
    busy: bool,
}

#[derive(Default)]
struct Inner {
    members: Vec<Member>,
    current: Option<usize>,
    /// The room the member with the turn asked for: what it needs (its working set, or all its
    /// parameters besides for a claim) and what it would like for prefetching.
    room: (u64, u64),
    clock: u64,
    /// Members in the order they took turns (the latest few hundred).
    history: Vec<usize>,
    releases: u64,
    /// Updates run in the background while others took turns.
    backgrounds: u64,
}

const HISTORY: usize = 256;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turns").field("members", &self.members.len()).field("current", &self.current).finish()
    }
}

/// Whether a give-back went ahead: a model in the middle of an access (another thread) keeps
/// its memory this time; other errors are real.
fn gave(r: std::result::Result<u64, stowage_memory::Error>) -> Result<bool> {
    match r {
        Ok(_) => Ok(true),
        Err(stowage_memory::Error::InvalidState(_)) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn held(m: &Manager, t: Tier) -> u64 {
    m.tiers().stats(t).map_or(0, |s| s.reserved)
}

/// The members other than `k`, the one whose next turn is furthest first: after `k`'s previous
/// turn in `history`, which came next and when (training loops repeat, so the last round
/// predicts the next); members that did not come after it go first, least recently used
/// (`last_turn`) first.
fn order(history: &[usize], last_turn: &[u64], k: usize) -> Vec<usize> {
    let prev = history.iter().rposition(|&m| m == k);
    let distance = |j: usize| prev.and_then(|p| history[p + 1..].iter().position(|&m| m == j)).map_or(usize::MAX, |d| d + 1);
    let mut others: Vec<usize> = (0..last_turn.len()).filter(|&j| j != k).collect();
    others.sort_by_key(|&j| (std::cmp::Reverse(distance(j)), last_turn[j]));
    others
}

impl Turns {
    pub fn new(device_budget: u64, host_budget: u64) -> Self {
        Turns {
            device: SharedBudget::new(device_budget),
            host: SharedBudget::new(host_budget),
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a model's manager: `want`, the bytes it needs in fast memory while at work;
    /// `params`, the bytes of its parameter chunks; `staging`, the host bytes its NVMe moves
    /// stage through; `sweep`, the device bytes it needs working in the background. Returns its
    /// member id. See [`Turns::ahead`] for the prefetch room of its turns.
    pub fn join(&self, mgr: Arc<Manager>, want: u64, params: u64, staging: u64, sweep: u64) -> usize {
        let mut g = self.lock();
        g.members.push(Member {
            mgr,
            want,
            ahead: 0,
            params,
            staging,
            sweep,
            last_turn: 0,
            busy: false,
        });
        g.members.len() - 1
    }

    /// Member `k`'s turns also make room for `bytes` of prefetching (the next unit's chunks)
    /// where the budgets allow, beyond its working set. A background update's feasibility
    /// still counts the working set alone: prefetch room is a preference, not a need.
    pub fn ahead(&self, k: usize, bytes: u64) {
        self.lock().members[k].ahead = bytes;
    }

    /// Gives member `k` the turn: the others give back memory, those needed furthest in the
    /// future first, until `k` has room for its working set and its prefetching. A no-op while
    /// `k` has the turn.
    pub fn enter(&self, k: usize) -> Result<()> {
        let mut g = self.lock();
        if g.current == Some(k) {
            g.clock += 1;
            g.members[k].last_turn = g.clock;
            return Ok(());
        }
        let room = (g.members[k].want, g.members[k].ahead);
        g.room = room;
        self.make_room(&mut g, k, room)
    }

    /// Gives member `k` the turn with room for all its parameters besides its working set
    /// (the device first, the rest in host memory where the others can go to NVMe): for a
    /// phase that reads them many times over.
    pub fn claim(&self, k: usize) -> Result<()> {
        let mut g = self.lock();
        let room = (g.members[k].want + g.members[k].params, 0);
        g.room = room;
        self.make_room(&mut g, k, room)
    }

    /// Member `k` goes on working in the background (its optimizer update) while the others
    /// take turns: it gives back memory down to what that needs (`sweep` bytes of the device,
    /// its staging of the host) and keeps exactly that, leased from the shared budgets, until
    /// [`Turns::done`]; the others' turns leave it alone. Returns false (it should then finish
    /// its work first, as its turn) without NVMe to give back to, when the budgets cannot hold
    /// its working set next to the largest of the others', or when the lease cannot be had.
    pub fn background(&self, k: usize) -> Result<bool> {
        let mut g = self.lock();
        let me = &g.members[k];
        if !me.mgr.tiers().has(Tier::Nvme) {
            return Ok(false);
        }
        // Busy members hold their working sets; the largest idle one must fit beside them.
        let (mut dev, mut host) = (me.sweep, me.staging);
        let (mut idle_dev, mut idle_host) = (0, 0);
        for (j, m) in g.members.iter().enumerate() {
            if j == k {
                continue;
            }
            if m.busy {
                dev += m.sweep;
                host += m.staging;
            } else {
                idle_dev = idle_dev.max(m.want);
                idle_host = idle_host.max(m.staging);
            }
        }
        if dev + idle_dev > self.device.limit() || host + idle_host > self.host.limit() {
            return Ok(false);
        }
        // Room for its working set (from the idle ones), and no more than that.
        let sweep = me.sweep;
        self.make_room(&mut g, k, (sweep, 0))?;
        let me = &g.members[k];
        if !gave(me.mgr.give_back(me.sweep, me.staging))? {
            return Ok(false);
        }
        let tiers = me.mgr.tiers();
        if !tiers.lease(Tier::Device, Some(me.sweep)) {
            return Ok(false);
        }
        if !tiers.lease(Tier::Host, Some(me.staging)) {
            tiers.lease(Tier::Device, None);
            return Ok(false);
        }
        // Its NVMe traffic yields to the others' from now on: their fetches wait for data
        // their compute needs, its update only for itself.
        tiers.set_background_io(true);
        g.members[k].busy = true;
        g.backgrounds += 1;
        if g.current == Some(k) {
            g.current = None;
        }
        Ok(true)
    }

    /// Member `k`'s background work is now waited for, with nothing else at work: the idle
    /// members give back device room for up to `k`'s working set again (its next chunk sets,
    /// which its update then prefetches, and reads together rather than one chunk after another
    /// as room frees), and its device lease grows by what that made free; its host lease grows
    /// by as much of what is free there, for the staging of those reads and of its write-backs.
    /// A failed give-back leaves the lease as it was.
    pub fn hurry(&self, k: usize) -> Result<()> {
        let g = self.lock();
        let me = &g.members[k];
        if !me.busy {
            return Ok(());
        }
        let extra = me.sweep;
        let order: Vec<usize> = order(&g.history, &g.members.iter().map(|m| m.last_turn).collect::<Vec<_>>(), k)
            .into_iter()
            .filter(|&j| !g.members[j].busy)
            .collect();
        for &j in &order {
            let free = self.device.free();
            if free >= extra {
                break;
            }
            let m = &g.members[j].mgr;
            let hd = held(m, Tier::Device);
            // Device chunks go to host memory, or to NVMe through it: only where that has room.
            if hd > 0 && m.tiers().has(Tier::Nvme) && self.host.free() >= g.members[j].staging / 2 {
                gave(m.give_back(hd.saturating_sub(extra - free), u64::MAX))?;
            }
        }
        let tiers = me.mgr.tiers();
        for (tier, budget) in [(Tier::Device, &self.device), (Tier::Host, &self.host)] {
            let grow = extra.min(budget.free());
            if grow > 0 {
                let now = tiers.stats(tier).map_or(0, |s| s.limit);
                tiers.lease(tier, Some(now + grow));
            }
        }
        Ok(())
    }

    /// Member `k`'s background work is over: its leases end (what it does not hold goes back to
    /// the shared budgets), and the member with the turn gets the room it asked for, which the
    /// lease may have cut short (a generating actor would otherwise re-read what did not fit
    /// for every token while `k`'s chunks sat idle in memory).
    pub fn done(&self, k: usize) {
        let mut g = self.lock();
        let m = &mut g.members[k];
        if !m.busy {
            return;
        }
        m.mgr.tiers().lease(Tier::Device, None);
        m.mgr.tiers().lease(Tier::Host, None);
        m.mgr.tiers().set_background_io(false);
        m.busy = false;
        if let Some(c) = g.current.filter(|&c| c != k) {
            let room = g.room;
            // A failed give-back leaves the data where it was: the turn goes on with less room.
            if let Err(e) = self.make_room(&mut g, c, room) {
                log::warn!("after a background update, making room for the model at work: {e}");
            }
        }
    }

    /// Makes room for member `k`: `want` bytes it needs (on the device, the rest in host memory
    /// where there is NVMe below) and `ahead` bytes more on the device where the budgets allow.
    fn make_room(&self, g: &mut Inner, k: usize, (want, ahead): (u64, u64)) -> Result<()> {
        g.clock += 1;
        let now = g.clock;
        g.members[k].last_turn = now;
        let order: Vec<usize> = order(&g.history, &g.members.iter().map(|m| m.last_turn).collect::<Vec<_>>(), k)
            .into_iter()
            .filter(|&j| !g.members[j].busy)
            .collect();
        if g.current != Some(k) {
            g.history.push(k);
            if g.history.len() > HISTORY {
                g.history.remove(0);
            }
            g.current = Some(k);
        }
        let me = &g.members[k];
        let nvme = me.mgr.tiers().has(Tier::Nvme);
        // Busy members' leases are not `k`'s to take.
        let (dev_leased, host_leased): (u64, u64) = g.members.iter().filter(|m| m.busy).map(|m| (m.sweep, m.staging)).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        let dev_room = self.device.limit().saturating_sub(dev_leased);
        let need_dev = want.min(dev_room);
        let want_dev = (want + ahead).min(dev_room);
        let want_host = if nvme { (want - need_dev + me.staging).min(self.host.limit().saturating_sub(host_leased)) } else { 0 };
        let short = |t: Tier, want: u64, b: &SharedBudget| want.saturating_sub(b.free() + held(&me.mgr, t));
        let mut released = 0;
        // Host memory first: the others' device write-backs to NVMe stage through it, so it
        // must have room for that too (`want_host` includes `k`'s staging).
        for &j in &order {
            let host = short(Tier::Host, want_host, &self.host);
            if host == 0 {
                break;
            }
            let m = &g.members[j].mgr;
            let hh = held(m, Tier::Host);
            if hh > 0 && m.tiers().has(Tier::Nvme) && gave(m.give_back(u64::MAX, hh.saturating_sub(host)))? {
                released += 1;
            }
        }
        for &j in &order {
            let dev = short(Tier::Device, want_dev, &self.device);
            if dev == 0 {
                break;
            }
            let m = &g.members[j].mgr;
            let hd = held(m, Tier::Device);
            if hd == 0 {
                continue;
            }
            // Its write-backs to NVMe stage through a host slot: free one if none is (the
            // entering model's own host memory last).
            let slot = g.members[j].staging / 2;
            if m.tiers().has(Tier::Nvme) && self.host.free() < slot {
                for &i in order.iter().filter(|&&i| i != j).chain(std::iter::once(&k)) {
                    let free = self.host.free();
                    let o = &g.members[i].mgr;
                    let hh = held(o, Tier::Host);
                    if free >= slot {
                        break;
                    }
                    if hh > 0 && o.tiers().has(Tier::Nvme) && gave(o.give_back(u64::MAX, hh.saturating_sub(slot - free)))? {
                        released += 1;
                    }
                }
            }
            if gave(m.give_back(hd.saturating_sub(dev), u64::MAX))? {
                released += 1;
            }
        }
        g.releases += released;
        Ok(())
    }

    /// How many times a model gave memory back for another.
    pub fn releases(&self) -> u64 {
        self.lock().releases
    }

    /// How many times a model worked in the background next to the others' turns.
    pub fn backgrounds(&self) -> u64 {
        self.lock().backgrounds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_memory::{ChunkSize, DType, DeviceChoice, ManagerConfig, Mode, PolicyKind, Role, TensorId, TiersConfig};

    const CB: u64 = 4096 * 4;

    /// A member's manager and its index in the turns.
    type Member = (Arc<Manager>, usize);

    fn member(turns: &Turns, tensors: usize) -> Member {
        member_on(turns, tensors, None, tensors as u64 * CB, 0)
    }

    /// A member with `tensors` one-chunk tensors, NVMe under `nvme` if given, needing `want`
    /// bytes at work and `staging` host bytes for its NVMe moves.
    fn member_on(turns: &Turns, tensors: usize, nvme: Option<&std::path::Path>, want: u64, staging: u64) -> Member {
        member_claiming(turns, tensors, nvme, want, 0, staging)
    }

    /// Room for six chunks on each tier, two members of six chunks wanting two each, and a's
    /// chunks written (10.0 + index).
    fn two_members_a_filled(nvme: &std::path::Path) -> (Turns, Member, Member) {
        let turns = Turns::new(6 * CB, 6 * CB);
        let a = member_on(&turns, 6, Some(nvme), 2 * CB, 2 * CB);
        let b = member_on(&turns, 6, Some(nvme), 2 * CB, 2 * CB);
        fill(&turns, a.1, &a.0, 6, 10.0);
        (turns, a, b)
    }

    /// `member_on` with `params` bytes of parameters to claim room for.
    fn member_claiming(turns: &Turns, tensors: usize, nvme: Option<&std::path::Path>, want: u64, params: u64, staging: u64) -> Member {
        let mut tiers = TiersConfig::default()
            .with_device(DeviceChoice::Simulated, turns.device.limit())
            .with_host_budget(turns.host.limit())
            .with_arena_bytes(CB as usize)
            .with_shared(Some(turns.device.clone()), Some(turns.host.clone()));
        if let Some(d) = nvme {
            tiers = tiers.with_nvme(stowage_memory::NvmeConfig::new(d));
        }
        let cfg = ManagerConfig {
            tiers,
            policy: PolicyKind::Auto,
            chunk_size: ChunkSize::Fixed(4096),
            prefetch_depth: 4,
            trace: false,
        };
        let mut b = Manager::builder(cfg);
        let g = b.group("m", &[(Role::Param, DType::F32)]);
        for i in 0..tensors {
            b.tensor(g, &format!("t{i}"), &[4096]);
        }
        let m = Arc::new(b.build().unwrap());
        let k = turns.join(m.clone(), want, params, staging, want);
        (m, k)
    }

    fn scratch() -> tempfile::TempDir {
        let base = std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into());
        tempfile::Builder::new().prefix("stowage-turns").tempdir_in(base).unwrap()
    }

    /// Writes `tag + index` into every chunk of `m`, taking `k`'s turn first.
    fn fill(turns: &Turns, k: usize, m: &Manager, n: usize, tag: f32) {
        for index in 0..n {
            fill_one(turns, k, m, index, tag);
        }
    }

    fn fill_one(turns: &Turns, k: usize, m: &Manager, index: usize, tag: f32) {
        turns.enter(k).unwrap();
        let t = TensorId { group: 0, index };
        let mut a = m.access(&[m.chunk_of(t, Role::Param)], Mode::Write).unwrap();
        a.slice_mut::<f32>(t, Role::Param).unwrap().fill(tag + index as f32);
    }

    fn check(m: &Manager, n: usize, tag: f32) {
        for index in 0..n {
            let t = TensorId { group: 0, index };
            let a = m.access(&[m.chunk_of(t, Role::Param)], Mode::Read).unwrap();
            assert!(a.slice::<f32>(t, Role::Param).unwrap().iter().all(|&x| x == tag + index as f32), "chunk {index} lost its data");
        }
    }

    #[test]
    fn a_model_working_in_the_background_keeps_its_working_set_and_grows_no_further() {
        let dir = scratch();
        let (turns, (a, ka), (b, kb)) = two_members_a_filled(dir.path());
        let limit = |m: &Manager, t: Tier| m.tiers().stats(t).unwrap().limit;
        assert!(turns.background(ka).unwrap(), "two working sets of 2 chunks fit in 6");
        assert!(held(&a, Tier::Device) <= 2 * CB && held(&a, Tier::Host) <= 2 * CB, "a gave back down to its working set");
        assert_eq!((limit(&a, Tier::Device), limit(&a, Tier::Host)), (2 * CB, 2 * CB), "and keeps that much, no more");
        // b works meanwhile, a's accesses interleaving (as from the thread of a's update): b
        // takes everything but a's lease, and a reads and writes within it.
        let before = turns.releases();
        for index in 0..6 {
            fill_one(&turns, kb, &b, index, 20.0);
            let t = TensorId { group: 0, index };
            let mut x = a.access(&[a.chunk_of(t, Role::Param)], Mode::Write).unwrap();
            let s = x.slice_mut::<f32>(t, Role::Param).unwrap();
            assert!(s.iter().all(|&v| v == 10.0 + index as f32), "a's chunk {index}");
            s.fill(10.0 + index as f32);
        }
        check(&b, 6, 20.0);
        assert_eq!(turns.releases(), before, "b's turns took nothing from a");
        check(&a, 6, 10.0);
        assert!(held(&a, Tier::Device) <= 2 * CB, "a's work stayed within its lease");
        b.offload().unwrap();
        assert_eq!(limit(&a, Tier::Device), 2 * CB, "leased while busy, however much is free");
        turns.done(ka);
        assert_eq!(limit(&a, Tier::Device), 6 * CB, "done ends the lease");
        turns.enter(ka).unwrap();
        check(&a, 6, 10.0);
        turns.enter(kb).unwrap();
        check(&b, 6, 20.0);

        // Working sets that cannot sit side by side: the update runs in the foreground.
        let small = Turns::new(3 * CB, 6 * CB);
        let (c, kc) = member_on(&small, 2, Some(dir.path()), 2 * CB, CB);
        let _d = member_on(&small, 2, Some(dir.path()), 2 * CB, CB);
        fill(&small, kc, &c, 2, 1.0);
        let held_before = held(&c, Tier::Device);
        assert!(!small.background(kc).unwrap(), "2 + 2 chunks do not fit in 3");
        assert_eq!(held(&c, Tier::Device), held_before, "a refusal changes nothing");
        assert!(limit(&c, Tier::Device) > 2 * CB);
    }

    #[test]
    fn a_background_update_waited_for_takes_device_room_from_the_idle_models() {
        let dir = scratch();
        let (turns, (a, ka), (b, kb)) = two_members_a_filled(dir.path());
        assert!(turns.background(ka).unwrap());
        // b takes its turn and fills the device beside a's lease.
        fill(&turns, kb, &b, 6, 20.0);
        let limit = |m: &Manager| m.tiers().stats(Tier::Device).unwrap().limit;
        assert_eq!(limit(&a), 2 * CB);
        assert!(held(&b, Tier::Device) >= 3 * CB, "b holds the rest of the device: {}", held(&b, Tier::Device));
        // Now a's update is what everyone waits for: b gives back room for another working set.
        assert!(turns.host.free() > 0, "host memory to spare");
        turns.hurry(ka).unwrap();
        assert_eq!(limit(&a), 4 * CB, "a's lease grew by its working set");
        let host_limit = a.tiers().stats(Tier::Host).unwrap().limit;
        assert!(host_limit > 2 * CB && host_limit <= 4 * CB, "and its host lease by what was free there: {host_limit}");
        assert!(held(&b, Tier::Device) <= 2 * CB, "taken from b: {}", held(&b, Tier::Device));
        for index in 0..6 {
            let t = TensorId { group: 0, index };
            let mut x = a.access(&[a.chunk_of(t, Role::Param)], Mode::Write).unwrap();
            let v = x.slice_mut::<f32>(t, Role::Param).unwrap();
            assert!(v.iter().all(|&y| y == 10.0 + index as f32), "a's chunk {index}");
        }
        assert!(held(&a, Tier::Device) <= 4 * CB, "a stays within the grown lease");
        turns.done(ka);
        let open = 6 * CB - held(&b, Tier::Device);
        assert_eq!(limit(&a), open, "done ends the lease: the budget less what b holds");
        turns.hurry(ka).unwrap();
        assert_eq!(limit(&a), open, "not busy: nothing to hurry");
        check(&b, 6, 20.0);
        check(&a, 6, 10.0);
    }

    #[test]
    fn when_a_background_update_ends_the_model_at_work_gets_the_room_it_claimed() {
        let dir = scratch();
        let turns = Turns::new(6 * CB, 6 * CB);
        let (a, ka) = member_on(&turns, 6, Some(dir.path()), 2 * CB, 2 * CB);
        let (b, kb) = member_claiming(&turns, 6, Some(dir.path()), 2 * CB, 6 * CB, 2 * CB);
        fill(&turns, ka, &a, 6, 10.0);
        assert!(turns.background(ka).unwrap());
        // b claims room for all its parameters (a generating actor); a's lease cuts it to 4.
        turns.claim(kb).unwrap();
        fill(&turns, kb, &b, 6, 20.0);
        assert!(held(&b, Tier::Device) <= 4 * CB);
        // a's update works within its lease, then ends.
        touch_all(&a, 2);
        assert!(held(&a, Tier::Device) > 0);
        turns.done(ka);
        assert_eq!(held(&a, Tier::Device), 0, "a's idle chunks make way for b's claim");
        // b now keeps all six on the device (they are accessed over and over while generating).
        touch_all(&b, 6);
        touch_all(&b, 6);
        assert_eq!(held(&b, Tier::Device), 6 * CB, "b grows into the room a left");
        turns.enter(ka).unwrap();
        check(&a, 6, 10.0);
        turns.enter(kb).unwrap();
        check(&b, 6, 20.0);
    }

    #[test]
    fn a_turn_makes_room_to_prefetch_the_next_unit_where_the_budget_allows() {
        let dir = scratch();
        let turns = Turns::new(8 * CB, 8 * CB);
        let (a, ka) = member_on(&turns, 8, Some(dir.path()), 2 * CB, 2 * CB);
        let (b, kb) = member_on(&turns, 8, Some(dir.path()), 2 * CB, 2 * CB);
        turns.enter(kb).unwrap();
        touch_all(&b, 8);
        assert_eq!(held(&b, Tier::Device), 8 * CB, "b alone takes the whole device");
        // Without prefetch room a gets its working set and no more.
        turns.enter(ka).unwrap();
        assert_eq!(held(&b, Tier::Device), 6 * CB);
        turns.enter(kb).unwrap();
        touch_all(&b, 8);
        turns.ahead(ka, 2 * CB);
        turns.enter(ka).unwrap();
        assert_eq!(held(&b, Tier::Device), 4 * CB, "room for a's working set and the next unit");
        // a streams through its chunks within that room.
        touch_all(&a, 8);
        assert!(held(&a, Tier::Device) <= 4 * CB);
        // Prefetch room is a preference: a's update goes to the background where its working
        // set fits beside b's, though not beside b's prefetch room too.
        let small = Turns::new(5 * CB, 8 * CB);
        let (c, kc) = member_on(&small, 2, Some(dir.path()), 2 * CB, CB);
        let (_d, kd) = member_on(&small, 2, Some(dir.path()), 2 * CB, CB);
        small.ahead(kc, 2 * CB);
        small.ahead(kd, 2 * CB);
        fill(&small, kc, &c, 2, 1.0);
        assert!(small.background(kc).unwrap(), "2 + 2 chunks fit in 5; the prefetch room is not owed");
        small.done(kc);
        check(&c, 2, 1.0);
    }

    fn touch_all(m: &Manager, n: usize) {
        for index in 0..n {
            drop(m.access(&[m.chunk_of(TensorId { group: 0, index }, Role::Param)], Mode::Write).unwrap());
        }
    }

    #[test]
    fn a_model_that_fits_next_to_the_others_takes_nothing_from_them() {
        // Without NVMe the host is the floor: offloading moves chunks from the device to it.
        let turns = Turns::new(6 * CB, 12 * CB);
        let (a, ka) = member(&turns, 2);
        let (b, kb) = member(&turns, 2);
        turns.enter(ka).unwrap();
        touch_all(&a, 2);
        turns.enter(kb).unwrap();
        touch_all(&b, 2);
        assert_eq!(turns.releases(), 0, "both fit: no turn-taking cost");
        let (c, kc) = member(&turns, 4);
        turns.enter(kc).unwrap();
        assert_eq!(turns.releases(), 1, "c needs device room a holds, and then has enough");
        assert_eq!(a.tiers().stats(Tier::Device).unwrap().reserved, 0, "a, least recently used, went first");
        assert!(b.tiers().stats(Tier::Device).unwrap().reserved > 0, "b keeps its device memory");
        touch_all(&c, 4);
    }

    #[test]
    fn the_member_needed_furthest_in_the_future_gives_back_first() {
        let history = [0, 1, 2, 3, 0, 2];
        // After 1's last turn came 2 (next), 3, then 0: 0 is needed furthest ahead.
        assert_eq!(order(&history, &[5, 2, 6, 4], 1), vec![0, 3, 2]);
        // After 3 came 0, then 2; 1 did not come again: it goes first.
        assert_eq!(order(&history, &[5, 2, 6, 4], 3), vec![1, 2, 0]);
        // No turn yet: least recently used first.
        assert_eq!(order(&history, &[5, 2, 6, 4, 0], 4), vec![1, 3, 0, 2]);
        // Only 1 came after 2: the rest go first, least recently used first.
        assert_eq!(order(&[0, 2, 1], &[1, 3, 2, 0, 0], 2), vec![3, 4, 0, 1]);
    }
}
