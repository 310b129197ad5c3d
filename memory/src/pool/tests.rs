use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::host::HostArenas;

/// Host arenas that count how many regions were obtained and given back.
struct Counting {
    inner: HostArenas,
    allocs: Arc<AtomicUsize>,
    frees: Arc<AtomicUsize>,
}

impl ArenaBackend for Counting {
    fn alloc_arena(&self, id: u32, bytes: usize) -> Result<u64> {
        self.allocs.fetch_add(1, Ordering::SeqCst);
        self.inner.alloc_arena(id, bytes)
    }
    fn free_arena(&self, id: u32, base: u64, bytes: usize) {
        self.frees.fetch_add(1, Ordering::SeqCst);
        self.inner.free_arena(id, base, bytes)
    }
    fn host_addressable(&self) -> bool {
        true
    }
}

const SLOT: usize = 4096;

fn pool(budget_slots: u64, arena_slots: usize) -> (Arc<Pool>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let allocs = Arc::new(AtomicUsize::new(0));
    let frees = Arc::new(AtomicUsize::new(0));
    let backend = Counting {
        inner: HostArenas::new(Tier::Host, 4096, Vec::new()),
        allocs: allocs.clone(),
        frees: frees.clone(),
    };
    let p = Pool::new(Tier::Host, budget_slots * SLOT as u64, arena_slots * SLOT, None, Box::new(backend));
    (p, allocs, frees)
}

#[test]
fn capped_pool_errors_instead_of_growing() {
    let (p, _, _) = pool(4, 2);
    let held: Vec<Slot> = (0..4).map(|_| p.alloc(SLOT, false).unwrap()).collect();
    let before = p.stats();
    match p.alloc(SLOT, false) {
        Err(Error::OverBudget {
            tier,
            requested,
            capacity,
            in_use,
        }) => {
            assert_eq!(tier, Tier::Host);
            assert_eq!(requested, SLOT as u64);
            assert_eq!(capacity, 4 * SLOT as u64);
            assert_eq!(in_use, 4 * SLOT as u64);
        }
        other => panic!("expected OverBudget, got {other:?}"),
    }
    assert_eq!(p.stats(), before, "a refused allocation leaves no partial state");
    drop(held);
    assert_eq!(p.stats().used, 0);
    assert!(p.alloc(SLOT, false).is_ok(), "freed slots are usable again");
}

#[test]
fn slots_come_from_few_large_arenas() {
    let (p, allocs, _) = pool(64, 16);
    let held: Vec<Slot> = (0..64).map(|_| p.alloc(SLOT, false).unwrap()).collect();
    assert_eq!(allocs.load(Ordering::SeqCst), 4, "64 slots from arenas of 16");
    let mut addrs: Vec<u64> = held.iter().map(|s| s.addr()).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), 64, "no two slots share an address");
    drop(held);
    let again: Vec<Slot> = (0..64).map(|_| p.alloc(SLOT, false).unwrap()).collect();
    assert_eq!(allocs.load(Ordering::SeqCst), 4, "reuse does not allocate");
    assert_eq!(p.stats().peak, 64 * SLOT as u64);
    drop(again);
}

#[test]
fn slot_bytes_are_private_to_their_owner() {
    let (p, _, _) = pool(8, 8);
    let mut a = p.alloc(SLOT, false).unwrap();
    let mut b = p.alloc(SLOT, false).unwrap();
    a.bytes_mut().unwrap().fill(1);
    b.bytes_mut().unwrap().fill(2);
    assert!(a.bytes().unwrap().iter().all(|&x| x == 1));
    assert!(b.bytes().unwrap().iter().all(|&x| x == 2));
}

#[test]
fn sizes_share_arenas_and_freed_neighbours_coalesce() {
    let (p, allocs, frees) = pool(4, 4);
    let small: Vec<Slot> = (0..4).map(|_| p.alloc(SLOT, false).unwrap()).collect();
    assert!(matches!(p.alloc(2 * SLOT, false), Err(Error::OverBudget { .. })));
    let mut small = small.into_iter();
    let (a, b) = (small.next().unwrap(), small.next().unwrap());
    drop(b);
    assert!(!p.can_alloc(2 * SLOT), "one free slot is not two");
    drop(a);
    let big = p.alloc(2 * SLOT, false).expect("two adjacent free slots coalesce");
    assert_eq!(allocs.load(Ordering::SeqCst), 1, "served from the same arena");
    let st = p.stats();
    assert!(st.reserved <= st.capacity, "reserved {} within budget {}", st.reserved, st.capacity);
    assert_eq!(st.used, 4 * SLOT as u64);
    drop((big, small));
    assert_eq!(p.shrink(), 4 * SLOT as u64);
    assert_eq!(frees.load(Ordering::SeqCst), 1);
    assert_eq!(p.stats().reserved, 0);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    #[test]
    fn live_slots_never_overlap_and_accounting_adds_up(
        steps in proptest::collection::vec((1usize..4, proptest::prelude::any::<bool>(), 0usize..16), 1..120),
    ) {
        let (p, _, _) = pool(16, 6);
        let mut live: Vec<Slot> = Vec::new();
        for (units, free, pick) in steps {
            if free && !live.is_empty() {
                live.swap_remove(pick % live.len());
            } else {
                match p.alloc(units * SLOT, false) {
                    Ok(s) => live.push(s),
                    Err(e) => proptest::prop_assert!(e.is_retryable() || units * SLOT > 16 * SLOT),
                }
            }
            let mut spans: Vec<(u32, u64, u64)> = live.iter().map(|s| (s.arena(), s.addr(), s.addr() + s.len() as u64)).collect();
            spans.sort();
            for w in spans.windows(2) {
                proptest::prop_assert!(w[0].0 != w[1].0 || w[0].2 <= w[1].1, "overlap: {:?}", w);
            }
            let st = p.stats();
            proptest::prop_assert_eq!(st.used, live.iter().map(|s| s.len() as u64).sum::<u64>());
            proptest::prop_assert!(st.reserved <= st.capacity);
        }
        drop(live);
        p.shrink();
        proptest::prop_assert_eq!(p.stats().reserved, 0);
    }
}

#[test]
fn a_slot_larger_than_the_budget_is_not_retryable() {
    let (p, _, _) = pool(2, 2);
    let e = p.alloc(4 * SLOT, false).unwrap_err();
    assert!(!e.is_retryable(), "{e}");
    let (p, _, _) = pool(2, 2);
    let _held = (p.alloc(SLOT, false).unwrap(), p.alloc(SLOT, false).unwrap());
    assert!(p.alloc(SLOT, false).unwrap_err().is_retryable());
}

#[test]
fn staging_slots_are_counted() {
    let (p, _, _) = pool(4, 4);
    let s = p.alloc(SLOT, true).unwrap();
    assert_eq!(p.stats().staging, SLOT as u64);
    assert_eq!(p.stats().used, SLOT as u64);
    drop(s);
    assert_eq!(p.stats().staging, 0);
}

fn shared_pool(own_slots: u64, arena_slots: usize, shared: &SharedBudget) -> Arc<Pool> {
    let backend = HostArenas::new(Tier::Host, 4096, Vec::new());
    Pool::new(Tier::Host, own_slots * SLOT as u64, arena_slots * SLOT, Some(shared.clone()), Box::new(backend))
}

#[test]
fn pools_sharing_a_budget_take_turns_with_it() {
    let shared = SharedBudget::new(4 * SLOT as u64);
    let (a, b) = (shared_pool(4, 1, &shared), shared_pool(4, 1, &shared));
    let held: Vec<Slot> = (0..3).map(|_| a.alloc(SLOT, false).unwrap()).collect();
    assert_eq!(b.stats().limit, SLOT as u64, "b may grow into what a does not hold");
    let one = b.alloc(SLOT, false).unwrap();
    assert!(matches!(b.alloc(SLOT, false), Err(Error::OverBudget { capacity, .. }) if capacity == SLOT as u64));
    drop(held);
    assert!(b.alloc(SLOT, false).is_err(), "a still holds its idle arenas");
    assert_eq!(a.shrink(), 3 * SLOT as u64);
    let more: Vec<Slot> = (0..3).map(|_| b.alloc(SLOT, false).unwrap()).collect();
    assert_eq!(shared.reserved(), 4 * SLOT as u64);
    assert_eq!(b.stats().capacity, 4 * SLOT as u64, "capacity is the pool's own budget");
    drop((one, more));
    drop(b);
    assert_eq!(shared.reserved(), 0, "a dropped pool gives its arenas back to the shared budget");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

    /// Against an oracle: the shared budget's charge is the sum of the pools' reserved bytes,
    /// never above its limit, and an allocation fails only when no pool could have made room.
    #[test]
    fn a_shared_budget_is_the_sum_of_its_pools(
        steps in proptest::collection::vec((0usize..3, 1usize..3, 0u8..4, 0usize..16), 1..150),
    ) {
        let shared = SharedBudget::new(10 * SLOT as u64);
        let pools: Vec<Arc<Pool>> = (0..3).map(|k| shared_pool(6 + k as u64, 2, &shared)).collect();
        let mut live: Vec<Vec<Slot>> = vec![Vec::new(), Vec::new(), Vec::new()];
        for (p, units, op, pick) in steps {
            match op {
                0 if !live[p].is_empty() => {
                    let n = live[p].len();
                    live[p].swap_remove(pick % n);
                }
                1 => {
                    pools[p].shrink();
                }
                _ => {
                    let before: u64 = pools.iter().map(|q| q.stats().reserved).sum();
                    match pools[p].alloc(units * SLOT, false) {
                        Ok(s) => live[p].push(s),
                        Err(e) => {
                            proptest::prop_assert!(matches!(e, Error::OverBudget { .. }), "{e}");
                            let st = pools[p].stats();
                            // Refused: neither the pool's own budget nor the shared one had room.
                            proptest::prop_assert!(
                                st.reserved + (units * SLOT) as u64 > st.capacity
                                    || before + (units * SLOT) as u64 > shared.limit()
                                    || st.reserved > st.used,
                                "refused with room: {:?}, shared {}", st, shared.reserved()
                            );
                        }
                    }
                }
            }
            let sum: u64 = pools.iter().map(|q| q.stats().reserved).sum();
            proptest::prop_assert_eq!(shared.reserved(), sum);
            proptest::prop_assert!(sum <= shared.limit());
            for (q, l) in pools.iter().zip(&live) {
                let st = q.stats();
                proptest::prop_assert_eq!(st.used, l.iter().map(|s| s.len() as u64).sum::<u64>());
                proptest::prop_assert!(st.reserved <= st.capacity);
                proptest::prop_assert!(st.limit <= st.capacity);
            }
        }
        drop(live);
        drop(pools);
        proptest::prop_assert_eq!(shared.reserved(), 0);
    }
}

#[test]
fn a_lease_keeps_room_for_its_pool_alone() {
    let shared = SharedBudget::new(6 * SLOT as u64);
    let mk = || Pool::new(Tier::Host, 6 * SLOT as u64, SLOT, Some(shared.clone()), Box::new(HostArenas::new(Tier::Host, 4096, Vec::new())));
    let (a, b) = (mk(), mk());
    let held: Vec<Slot> = (0..3).map(|_| a.alloc(SLOT, false).unwrap()).collect();
    assert!(a.lease(Some(4 * SLOT as u64)));
    assert_eq!(shared.reserved(), 4 * SLOT as u64, "the lease is charged in full: 3 held, 1 set aside");
    assert_eq!(a.stats().limit, 4 * SLOT as u64);
    // b takes everything else; a's room stays.
    let bs: Vec<Slot> = (0..2).map(|_| b.alloc(SLOT, false).unwrap()).collect();
    assert!(matches!(b.alloc(SLOT, false), Err(Error::OverBudget { .. })), "b cannot take a's lease");
    // a gives arenas back (a different slot size needs them): they stay a's.
    drop(held);
    assert_eq!(a.shrink(), 3 * SLOT as u64);
    assert_eq!(shared.reserved(), 6 * SLOT as u64, "trimmed arenas return to the lease, not the budget");
    assert!(matches!(b.alloc(SLOT, false), Err(Error::OverBudget { .. })));
    let big = a.alloc(2 * SLOT, false).expect("a's lease has room for a larger slot");
    let more: Vec<Slot> = (0..2).map(|_| a.alloc(SLOT, false).unwrap()).collect();
    assert!(matches!(a.alloc(SLOT, false), Err(Error::OverBudget { .. })), "no more than the lease");
    drop((big, more));
    assert!(a.lease(None));
    assert_eq!(shared.reserved(), 4 * SLOT as u64 + 2 * SLOT as u64, "ending the lease returns only what a does not hold");
    assert_eq!(a.shrink(), 4 * SLOT as u64);
    assert_eq!(shared.reserved(), 2 * SLOT as u64);
    // A lease the budget cannot hold is refused and changes nothing.
    assert!(!a.lease(Some(5 * SLOT as u64)));
    assert_eq!((shared.reserved(), a.stats().limit), (2 * SLOT as u64, 4 * SLOT as u64));
    drop(bs);
    drop(b);
    assert!(a.lease(Some(5 * SLOT as u64)));
    drop(a);
    assert_eq!(shared.reserved(), 0, "a dropped pool returns its lease");
}

#[test]
fn an_arena_being_prepared_is_passed_over_and_handed_back_when_it_is_the_only_room() {
    let (p, _, _) = pool(4, 2);
    assert_eq!(p.reserve(4 * SLOT as u64, SLOT).unwrap(), 4 * SLOT as u64);
    assert_eq!(p.claim_fresh(), Some((0, 2 * SLOT)), "the lowest fresh arena");
    assert_eq!(p.claim_fresh(), None, "one claim at a time");
    let a = p.alloc(SLOT, false).unwrap();
    let b = p.alloc(SLOT, false).unwrap();
    assert_eq!((a.arena(), b.arena()), (1, 1), "allocations pass the arena being prepared over");
    // The only room left is the claimed arena: the allocation stops the preparer and waits.
    let preparer = {
        let p = p.clone();
        std::thread::spawn(move || {
            let mut rounds = 0;
            while p.keep_preparing(0) {
                rounds += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            rounds
        })
    };
    let c = p.alloc(SLOT, false).unwrap();
    assert_eq!(c.arena(), 0);
    preparer.join().unwrap();
    assert!(!p.keep_preparing(0), "the claim is gone");
    assert_eq!(p.claim_fresh(), None, "no arena is fresh any more");
    drop((a, b, c));
}

#[test]
fn a_prepared_arena_is_not_claimed_again_and_a_shrink_takes_back_the_one_being_prepared() {
    let (p, allocs, frees) = pool(4, 2);
    p.reserve(4 * SLOT as u64, SLOT).unwrap();
    assert_eq!(p.claim_fresh(), Some((0, 2 * SLOT)));
    p.finish_preparing(0, true);
    assert_eq!(p.claim_fresh(), Some((1, 2 * SLOT)), "a prepared arena is done");
    p.finish_preparing(1, false);
    assert_eq!(p.claim_fresh(), Some((1, 2 * SLOT)), "an arena given up unprepared can be claimed again");
    let preparer = {
        let p = p.clone();
        std::thread::spawn(move || while p.keep_preparing(1) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        })
    };
    assert_eq!(p.shrink(), 4 * SLOT as u64, "both idle arenas go, the claimed one too");
    preparer.join().unwrap();
    assert_eq!((allocs.load(Ordering::SeqCst), frees.load(Ordering::SeqCst)), (2, 2));
    assert_eq!(p.claim_fresh(), None);
}
