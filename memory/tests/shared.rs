//! Managers drawing from one shared device and host budget, taking turns by offloading the idle
//! ones (the four models of RLHF on one card): against an oracle, every read equals the last
//! write, the shared budget is never exceeded, and an offloaded manager holds no fast memory.

mod common;

use std::collections::HashMap;

use common::scratch;
use proptest::prelude::*;
use stowage_memory::{
    ChunkRef, ChunkSize, DType, DeviceChoice, Error, Manager, ManagerConfig, Mode, NvmeConfig, PolicyKind, Role, SharedBudget, Tier,
    TensorId, TiersConfig,
};

const CHUNK: usize = 4096;
const CB: u64 = (CHUNK * 4) as u64;

fn manager(dir: &std::path::Path, tensors: usize, device: &SharedBudget, host: &SharedBudget, policy: PolicyKind) -> Manager {
    let tiers = TiersConfig::default()
        .with_device(DeviceChoice::Simulated, device.limit())
        .with_host_budget(host.limit())
        .with_arena_bytes(CB as usize)
        .with_shared(Some(device.clone()), Some(host.clone()))
        .with_nvme(NvmeConfig::new(dir).with_budget(1 << 30).with_segment_bytes(8192));
    let cfg = ManagerConfig {
        tiers,
        policy,
        chunk_size: ChunkSize::Fixed(CHUNK),
        prefetch_depth: 8,
        trace: false,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("model", &[(Role::Param, DType::F32)]);
    for i in 0..tensors {
        b.tensor(g, &format!("t{i}"), &[CHUNK]);
    }
    b.build().expect("manager")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn managers_taking_turns_with_a_shared_budget_lose_nothing(
        ops in prop::collection::vec((0usize..3, 0usize..6, prop::option::of(any::<u32>())), 1..60),
        policy in prop_oneof![Just(PolicyKind::Auto), Just(PolicyKind::Lru), Just(PolicyKind::Optimal)],
        partial in any::<bool>(),
    ) {
        common::within(60, move || {
            let dir = scratch();
            // Each manager's six chunks would fill the device and host budgets alone.
            let (device, host) = (SharedBudget::new(4 * CB), SharedBudget::new(3 * CB));
            // Partial: the idle managers keep one chunk on each tier (the active one still has
            // two device slots and one host staging slot).
            let keep = if partial { CB } else { 0 };
            let ms: Vec<Manager> = (0..3).map(|k| manager(&dir.path().join(k.to_string()), 6, &device, &host, policy)).collect();
            let mut oracle: HashMap<(usize, usize), u32> = HashMap::new();
            let mut active = None;
            for (k, t, write) in ops {
                if active != Some(k) {
                    // Host memory first, the entering one's too: the device's write-backs to
                    // NVMe stage through it.
                    for m in &ms {
                        m.give_back(u64::MAX, keep).unwrap();
                    }
                    for (j, m) in ms.iter().enumerate() {
                        if j != k {
                            m.give_back(keep, keep).unwrap();
                            for t in [Tier::Device, Tier::Host] {
                                let st = m.tiers().stats(t).unwrap();
                                assert!(st.reserved <= keep, "{t} holds {} > {keep} after giving back", st.reserved);
                            }
                        }
                    }
                    active = Some(k);
                }
                let id = TensorId { group: 0, index: t };
                let r: ChunkRef = ms[k].chunk_of(id, Role::Param);
                let mut a = ms[k].access(&[r], if write.is_some() { Mode::Write } else { Mode::Read }).unwrap();
                let want = oracle.get(&(k, t)).copied().unwrap_or(0);
                let got = a.slice::<u32>(id, Role::Param).unwrap();
                assert!(got.iter().all(|&x| x == want), "manager {k} tensor {t}: expected {want}, found {}", got[0]);
                if let Some(v) = write {
                    a.slice_mut::<u32>(id, Role::Param).unwrap().fill(v);
                    oracle.insert((k, t), v);
                }
                drop(a);
                assert!(device.reserved() <= device.limit() && host.reserved() <= host.limit());
                let held: u64 = ms.iter().filter_map(|m| m.tiers().stats(Tier::Device)).map(|s| s.reserved).sum();
                assert_eq!(held, device.reserved(), "the shared charge is what the pools hold");
            }
            // Everything reads back, each manager in turn.
            for (k, m) in ms.iter().enumerate() {
                for other in &ms {
                    other.give_back(u64::MAX, 0).unwrap();
                }
                for (j, other) in ms.iter().enumerate() {
                    if j != k {
                        other.give_back(0, 0).unwrap();
                    }
                }
                for t in 0..6 {
                    let id = TensorId { group: 0, index: t };
                    let a = m.access(&[m.chunk_of(id, Role::Param)], Mode::Read).unwrap();
                    let want = oracle.get(&(k, t)).copied().unwrap_or(0);
                    assert!(a.slice::<u32>(id, Role::Param).unwrap().iter().all(|&x| x == want), "final check, manager {k} tensor {t}");
                }
            }
        });
    }
}

#[test]
fn a_manager_cannot_take_what_another_holds_and_says_so() {
    let dir = scratch();
    let (device, host) = (SharedBudget::new(4 * CB), SharedBudget::new(4 * CB));
    let a = manager(&dir.path().join("a"), 6, &device, &host, PolicyKind::Auto);
    let b = manager(&dir.path().join("b"), 6, &device, &host, PolicyKind::Auto);
    let id = TensorId { group: 0, index: 0 };
    for t in 0..6 {
        let id = TensorId { group: 0, index: t };
        drop(a.access(&[a.chunk_of(id, Role::Param)], Mode::Write).unwrap());
    }
    a.quiesce();
    assert_eq!(device.free(), 0, "a fills the shared device budget");
    let e = b.access(&[b.chunk_of(id, Role::Param)], Mode::Read).map(|_| ()).unwrap_err();
    assert!(matches!(e, Error::OverBudget { tier: Tier::Device, .. }), "{e}");
    let held = a.access(&[a.chunk_of(id, Role::Param)], Mode::Read).unwrap();
    let refused = a.offload().unwrap_err();
    assert!(matches!(refused, Error::InvalidState(_)), "{refused}");
    drop(held);
    assert!(a.offload().unwrap() > 0);
    assert_eq!(device.reserved(), 0);
    drop(b.access(&[b.chunk_of(id, Role::Param)], Mode::Read).unwrap());
}

#[test]
fn giving_back_device_memory_needs_a_host_staging_slot_and_says_so() {
    let dir = scratch();
    let (device, host) = (SharedBudget::new(4 * CB), SharedBudget::new(2 * CB));
    let a = manager(&dir.path().join("a"), 6, &device, &host, PolicyKind::Lru);
    let b = manager(&dir.path().join("b"), 6, &device, &host, PolicyKind::Lru);
    let write = |m: &Manager, t: usize, v: u32| {
        let id = TensorId { group: 0, index: t };
        let mut acc = m.access(&[m.chunk_of(id, Role::Param)], Mode::Write).unwrap();
        acc.slice_mut::<u32>(id, Role::Param).unwrap().fill(v);
    };
    // a's two changed chunks live only on the device; its host holds nothing.
    for t in 0..2 {
        write(&a, t, 7);
    }
    a.give_back(u64::MAX, 0).unwrap();
    assert_eq!(a.tiers().stats(Tier::Host).unwrap().reserved, 0);
    // b fills the rest of the device and all of the shared host budget.
    for t in 0..4 {
        write(&b, t, 9);
    }
    b.quiesce();
    assert_eq!(host.free(), 0);
    let e = a.give_back(0, u64::MAX).unwrap_err();
    assert!(matches!(e, Error::OverBudget { tier: Tier::Host, .. }), "{e}");
    // Once b gives back host memory, a can write its chunks down, and nothing was lost.
    b.give_back(u64::MAX, 0).unwrap();
    a.give_back(0, 0).unwrap();
    assert_eq!(a.tiers().stats(Tier::Device).unwrap().reserved, 0);
    let id = TensorId { group: 0, index: 1 };
    let r = a.access(&[a.chunk_of(id, Role::Param)], Mode::Read).unwrap();
    assert!(r.slice::<u32>(id, Role::Param).unwrap().iter().all(|&x| x == 7));
}
