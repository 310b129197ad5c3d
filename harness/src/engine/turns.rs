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
    /// Bytes of all its parameter chunks, for a claim.
    params: u64,
    /// Host bytes its moves to and from NVMe stage through.
    staging: u64,
    last_turn: u64,
}

#[derive(Default)]
struct Inner {
    members: Vec<Member>,
    current: Option<usize>,
    clock: u64,
    /// Members in the order they took turns (the latest few hundred).
    history: Vec<usize>,
    releases: u64,
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
    /// stage through. Returns its member id.
    pub fn join(&self, mgr: Arc<Manager>, want: u64, params: u64, staging: u64) -> usize {
        let mut g = self.lock();
        g.members.push(Member { mgr, want, params, staging, last_turn: 0 });
        g.members.len() - 1
    }

    /// Gives member `k` the turn: the others give back memory, those needed furthest in the
    /// future first, until `k` has room for its working set. A no-op while `k` has the turn.
    pub fn enter(&self, k: usize) -> Result<()> {
        let mut g = self.lock();
        if g.current == Some(k) {
            g.clock += 1;
            g.members[k].last_turn = g.clock;
            return Ok(());
        }
        let want = g.members[k].want;
        self.make_room(&mut g, k, want)
    }

    /// Gives member `k` the turn with room for all its parameters besides its working set
    /// (the device first, the rest in host memory where the others can go to NVMe): for a
    /// phase that reads them many times over.
    pub fn claim(&self, k: usize) -> Result<()> {
        let mut g = self.lock();
        let want = g.members[k].want + g.members[k].params;
        self.make_room(&mut g, k, want)
    }

    fn make_room(&self, g: &mut Inner, k: usize, want: u64) -> Result<()> {
        g.clock += 1;
        let now = g.clock;
        g.members[k].last_turn = now;
        let order = order(&g.history, &g.members.iter().map(|m| m.last_turn).collect::<Vec<_>>(), k);
        if g.current != Some(k) {
            g.history.push(k);
            if g.history.len() > HISTORY {
                g.history.remove(0);
            }
            g.current = Some(k);
        }
        let me = &g.members[k];
        let nvme = me.mgr.tiers().has(Tier::Nvme);
        let want_dev = want.min(self.device.limit());
        let want_host = if nvme { (want - want_dev + me.staging).min(self.host.limit()) } else { 0 };
        let short = |t: Tier, want: u64, b: &SharedBudget| want.saturating_sub(b.free() + held(&me.mgr, t));
        let mut released = 0;
        // Host memory first: the others' device write-backs to NVMe stage through it, so it
        // must have room for that too.
        let host_need = if nvme { want_host.max(me.staging) } else { 0 };
        for &j in &order {
            let host = short(Tier::Host, host_need, &self.host);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use stowage_memory::{ChunkSize, DType, DeviceChoice, ManagerConfig, Mode, PolicyKind, Role, TensorId, TiersConfig};

    const CB: u64 = 4096 * 4;

    fn member(turns: &Turns, tensors: usize) -> (Arc<Manager>, usize) {
        let tiers = TiersConfig::default()
            .with_device(DeviceChoice::Simulated, turns.device.limit())
            .with_host_budget(turns.host.limit())
            .with_arena_bytes(CB as usize)
            .with_shared(Some(turns.device.clone()), Some(turns.host.clone()));
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
        let k = turns.join(m.clone(), tensors as u64 * CB, 0, 0);
        (m, k)
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
