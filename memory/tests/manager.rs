//! The chunk manager against an oracle: every read equals the last write, budgets hold, nothing
//! deadlocks, under every policy; plus write-back, prefetch and error behaviour.

mod common;

use std::collections::HashMap;

use common::{scratch, unwritten_bytes};
use proptest::prelude::*;
use stowage_memory::{
    ChunkRef, ChunkSize, DType, DeviceChoice, Error, Manager, ManagerConfig, Mode, NvmeConfig, PolicyKind, Role, SwapFiles,
    TensorId, TensorState, Tier, TiersConfig,
};

const ROLES: [(Role, DType); 2] = [(Role::Param, DType::F32), (Role::Master, DType::F32)];
/// Elements per chunk: 4096 f32 = 16 KiB.
const CHUNK: usize = 4096;

fn policies() -> [PolicyKind; 4] {
    [
        PolicyKind::Lru,
        PolicyKind::Auto,
        PolicyKind::Optimal,
        PolicyKind::Static { param_frac: 0.3, optim_frac: 0.0 },
    ]
}

/// A manager over one group with tensors of `sizes` elements and a device of `device_chunks`.
fn manager(dir: &std::path::Path, sizes: &[usize], policy: PolicyKind, device_chunks: u64, nvme: bool, host_chunks: u64) -> Manager {
    let cb = (CHUNK * 4) as u64;
    let mut tiers = TiersConfig::default()
        .with_device(DeviceChoice::Simulated, device_chunks * cb)
        .with_host_budget(host_chunks * cb)
        // One host arena: with budgets of a handful of chunks of mixed sizes, several arenas
        // could not hold a chunk that fits the budget (real budgets hold many arenas' worth).
        .with_arena_bytes((host_chunks * cb) as usize);
    if nvme {
        tiers = tiers.with_nvme(NvmeConfig::new(dir).with_budget(1 << 30).with_segment_bytes(8192));
    }
    let cfg = ManagerConfig {
        tiers,
        policy,
        chunk_size: ChunkSize::Fixed(CHUNK),
        prefetch_depth: 16,
        trace: true,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("model", &ROLES);
    for (i, &n) in sizes.iter().enumerate() {
        b.tensor(g, &format!("t{i}"), &[n]);
    }
    b.build().expect("manager")
}

#[derive(Debug, Clone)]
struct Op {
    tensors: Vec<usize>,
    role: Role,
    write: Option<u32>,
    /// Discard the tensors' chunks instead of accessing them: every tensor in them reads zeros.
    discard: bool,
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    (
        prop::collection::vec(0..n, 1..3),
        prop_oneof![Just(Role::Param), Just(Role::Master)],
        prop::option::of(any::<u32>()),
        prop::bool::weighted(0.15),
    )
        .prop_map(|(tensors, role, write, discard)| Op { tensors, role, write, discard })
}

/// Runs `ops`; checks every read against the oracle; returns the manager for further checks.
fn run(m: &Manager, ops: &[Op], n: usize) {
    let ids: Vec<TensorId> = (0..n).map(|index| TensorId { group: 0, index }).collect();
    let mut oracle: HashMap<(usize, Role), u32> = HashMap::new();
    let schedule: Vec<ChunkRef> = ops
        .iter()
        .flat_map(|o| {
            let mut v: Vec<ChunkRef> = o.tensors.iter().map(|&t| m.chunk_of(ids[t], o.role)).collect();
            v.dedup();
            v
        })
        .collect();
    m.set_schedule(&schedule);
    for o in ops {
        let mut refs: Vec<ChunkRef> = o.tensors.iter().map(|&t| m.chunk_of(ids[t], o.role)).collect();
        refs.sort_by_key(|r| r.index);
        refs.dedup();
        if o.discard {
            m.discard(&refs).unwrap_or_else(|e| panic!("discard {refs:?}: {e}"));
            for (t, &id) in ids.iter().enumerate() {
                if refs.contains(&m.chunk_of(id, o.role)) {
                    oracle.insert((t, o.role), 0);
                }
            }
            continue;
        }
        let mode = if o.write.is_some() { Mode::Write } else { Mode::Read };
        let mut a = m.access(&refs, mode).unwrap_or_else(|e| panic!("access {refs:?}: {e}"));
        for &t in &o.tensors {
            let want = oracle.get(&(t, o.role)).copied().unwrap_or(0);
            let got = a.slice::<u32>(ids[t], o.role).unwrap();
            assert!(got.iter().all(|&x| x == want), "tensor {t} {:?}: expected {want}, found {}", o.role, got[0]);
        }
        if let Some(v) = o.write {
            for &t in &o.tensors {
                a.slice_mut::<u32>(ids[t], o.role).unwrap().fill(v);
                oracle.insert((t, o.role), v);
            }
        }
        drop(a);
        let st = m.stats();
        for (name, t) in &st.tiers {
            assert!(t.used <= t.capacity && t.peak <= t.capacity, "{name} over budget: {t:?}");
        }
    }
    m.end_iteration();
    // Everything still reads back after the moves settle.
    m.quiesce();
    for (t, &id) in ids.iter().enumerate() {
        for role in [Role::Param, Role::Master] {
            let a = m.access(&[m.chunk_of(id, role)], Mode::Read).unwrap();
            let want = oracle.get(&(t, role)).copied().unwrap_or(0);
            assert!(a.slice::<u32>(id, role).unwrap().iter().all(|&x| x == want), "final check of tensor {t}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn every_read_equals_the_last_write_under_every_policy(
        sizes in prop::collection::vec(1usize..6000, 2..10),
        ops in prop::collection::vec(op(10), 1..40),
        device_chunks in 3u64..8,
        use_nvme in any::<bool>(),
    ) {
        let n = sizes.len();
        let ops: Vec<Op> = ops.into_iter().map(|mut o| { o.tensors.iter_mut().for_each(|t| *t %= n); o }).collect();
        for policy in policies() {
            let (sizes, ops) = (sizes.clone(), ops.clone());
            common::within(60, move || {
                let dir = scratch();
                // Without NVMe the host must hold everything; with it, the host is tight too.
                let host = if use_nvme { 4 } else { 64 };
                let m = manager(dir.path(), &sizes, policy, device_chunks, use_nvme, host);
                run(&m, &ops, n);
            });
        }
    }
}

#[test]
fn concurrent_accesses_from_many_threads_neither_corrupt_nor_deadlock() {
    common::within(120, concurrent_body);
}

fn concurrent_body() {
    let dir = scratch();
    let sizes = vec![3000; 16];
    let m = manager(dir.path(), &sizes, PolicyKind::Lru, 8, true, 8);
    std::thread::scope(|s| {
        for th in 0..4usize {
            let m = &m;
            s.spawn(move || {
                // Each thread owns four tensors (and so its own chunks).
                let mine: Vec<TensorId> = (0..4).map(|k| TensorId { group: 0, index: th * 4 + k }).collect();
                for round in 0..40u32 {
                    for &t in &mine {
                        let r = m.chunk_of(t, Role::Param);
                        let mut a = loop {
                            match m.access(&[r], Mode::Write) {
                                Ok(a) => break a,
                                Err(e) if e.is_retryable() => std::thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                        };
                        let v = a.slice_mut::<u32>(t, Role::Param).unwrap();
                        if round > 0 {
                            assert!(v.iter().all(|&x| x == round - 1 + t.index as u32 * 1000), "thread {th} saw a stale value");
                        }
                        v.fill(round + t.index as u32 * 1000);
                    }
                }
            });
        }
    });
}

#[test]
fn read_only_passes_never_write_back() {
    let dir = scratch();
    let sizes = vec![4000; 12];
    let m = manager(dir.path(), &sizes, PolicyKind::Lru, 3, true, 64);
    let all: Vec<ChunkRef> = m.chunks(0, Role::Param);
    for pass in 0..3 {
        for &r in &all {
            drop(m.access(&[r], if pass == 0 { Mode::Write } else { Mode::Read }).unwrap());
        }
        if pass == 0 {
            m.quiesce();
        }
    }
    let before = m.stats();
    let written = |s: &stowage_memory::manager::trace::ManagerStats| s.links.get("device->host").map_or(0, |l| l.bytes);
    for &r in &all {
        drop(m.access(&[r], Mode::Read).unwrap());
    }
    let after = m.stats();
    assert_eq!(written(&after), written(&before), "clean chunks are dropped, not written back");
    assert!(after.clean_drops > before.clean_drops);
}

#[test]
fn a_discarded_chunk_is_neither_written_back_nor_read_again() {
    let dir = scratch();
    // Device room for 3 chunks, host for 4: most of the 12 go to NVMe.
    let sizes = vec![4000; 12];
    let m = manager(dir.path(), &sizes, PolicyKind::Lru, 3, true, 4);
    let all: Vec<ChunkRef> = m.chunks(0, Role::Param);
    let ids: Vec<TensorId> = (0..sizes.len()).map(|index| TensorId { group: 0, index }).collect();
    let write_all = |v: u32| {
        for (t, &id) in ids.iter().enumerate() {
            let mut a = m.access(&[m.chunk_of(id, Role::Param)], Mode::Write).unwrap();
            a.slice_mut::<u32>(id, Role::Param).unwrap().fill(v + t as u32);
        }
    };
    write_all(1);
    // Held by an access: refused, nothing changes.
    {
        let _a = m.access(&all[..1], Mode::Read).unwrap();
        let e = m.discard(&all[..1]).unwrap_err();
        assert!(e.to_string().contains("being accessed"), "{e}");
    }
    m.quiesce();
    let moved = |s: &stowage_memory::manager::trace::ManagerStats, to: &str| s.links.iter().filter(|(k, _)| k.ends_with(to)).map(|(_, l)| l.bytes).sum::<u64>();
    // Overwrite everything twice: the second time every chunk must first be read back...
    let before = m.stats();
    write_all(2);
    m.quiesce();
    let kept = m.stats();
    assert!(moved(&kept, "->device") > moved(&before, "->device"), "chunks below the device are read back before a write");
    // ...unless it was discarded: no copy is written back (the device held changed ones), every
    // copy is gone, and nothing is read.
    let before = m.stats();
    m.discard(&all).unwrap();
    m.quiesce();
    let gone = m.stats();
    assert_eq!(moved(&gone, "->nvme") + moved(&gone, "->host"), moved(&before, "->nvme") + moved(&before, "->host"), "discarding writes nothing back");
    assert_eq!(gone.device_model_bytes, 0);
    assert!(gone.tiers.values().all(|t| t.used == 0), "copies freed in every tier: {:?}", gone.tiers);
    let before = m.stats();
    for (t, &id) in ids.iter().enumerate() {
        let mut a = m.access(&[m.chunk_of(id, Role::Param)], Mode::Write).unwrap();
        let s = a.slice_mut::<u32>(id, Role::Param).unwrap();
        assert!(s.iter().all(|&x| x == 0), "tensor {t}: a discarded chunk reads zeros");
        s.fill(3 + t as u32);
    }
    let after = m.stats();
    assert_eq!(moved(&after, "->device"), moved(&before, "->device"), "a discarded chunk is not read back");
    // The new data reads back after all the moves.
    m.quiesce();
    for (t, &id) in ids.iter().enumerate() {
        let a = m.access(&[m.chunk_of(id, Role::Param)], Mode::Read).unwrap();
        assert!(a.slice::<u32>(id, Role::Param).unwrap().iter().all(|&x| x == 3 + t as u32), "tensor {t}");
    }
}

#[test]
fn with_a_schedule_prefetch_turns_stalls_into_hits() {
    let sizes = [4000; 16];
    let run = |depth: usize| {
        let cfg = ManagerConfig {
            tiers: TiersConfig::default()
                .with_device(DeviceChoice::Simulated, 6 * 16384)
                .with_host_budget(64 * 16384)
                .with_sim_bandwidth(64.0 * 1024.0 * 1024.0),
            policy: PolicyKind::Optimal,
            chunk_size: ChunkSize::Fixed(CHUNK),
            prefetch_depth: depth,
            trace: false,
        };
        let mut b = Manager::builder(cfg);
        let g = b.group("m", &[(Role::Param, DType::F32)]);
        for (i, &n) in sizes.iter().enumerate() {
            b.tensor(g, &format!("t{i}"), &[n]);
        }
        let m = b.build().unwrap();
        let all = m.chunks(0, Role::Param);
        m.set_schedule(&all);
        for _ in 0..3 {
            for &r in &all {
                let a = m.access(&[r], Mode::Read).unwrap();
                // Compute long enough for the next chunk's copy (16 KiB at 64 MiB/s: 0.25 ms).
                std::thread::sleep(std::time::Duration::from_millis(2));
                drop(a);
            }
            m.end_iteration();
        }
        m.stats()
    };
    let without = run(0);
    let with = run(8);
    assert_eq!(without.prefetches, 0);
    assert!(with.prefetches > 0);
    // The first pass touches never-written chunks (nothing to prefetch); the next two should hit.
    assert!(with.hits >= 30, "prefetch should make the later passes hits: {} of 48", with.hits);
    assert!(with.hits > without.hits + 15, "{} vs {}", with.hits, without.hits);
}

/// A manager of two roles over `tensors` one-chunk tensors of `chunk` f32 elements, with a device
/// and host of `fast` chunks each and `nvme` below.
fn nvme_manager(tensors: usize, chunk: usize, fast: u64, nvme: NvmeConfig) -> Manager {
    let cb = (chunk * 4) as u64;
    let cfg = ManagerConfig {
        tiers: TiersConfig::default()
            .with_device(DeviceChoice::Simulated, fast * cb)
            .with_host_budget(fast * cb)
            .with_arena_bytes(cb as usize)
            .with_nvme(nvme),
        policy: PolicyKind::Lru,
        chunk_size: ChunkSize::Fixed(chunk),
        prefetch_depth: 0,
        trace: true,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("m", &ROLES);
    for i in 0..tensors {
        b.tensor(g, &format!("t{i}"), &[chunk]);
    }
    b.build().expect("manager")
}

#[test]
fn an_access_to_several_chunks_on_nvme_reads_them_together() {
    let dir = scratch();
    // 1 MiB chunks, so one read outlasts the time it takes to start the others.
    let chunk = 1 << 18;
    let m = nvme_manager(2, chunk, 4, NvmeConfig::new(dir.path()).with_budget(64 << 20));
    let refs: Vec<ChunkRef> = (0..2).flat_map(|i| ROLES.map(|(role, _)| m.chunk_of(TensorId { group: 0, index: i }, role))).collect();
    {
        let mut a = m.access(&refs, Mode::Write).unwrap();
        for (k, r) in refs.iter().enumerate() {
            a.slice_mut::<u32>(TensorId { group: 0, index: r.index }, r.role).unwrap().fill(k as u32 + 7);
        }
    }
    m.offload().unwrap();
    assert!(refs.iter().all(|&r| m.residency(r) == vec![Tier::Nvme]), "everything went down to NVMe");
    m.reset_trace();
    {
        let a = m.access(&refs, Mode::Read).unwrap();
        for (k, r) in refs.iter().enumerate() {
            assert!(a.slice::<u32>(TensorId { group: 0, index: r.index }, r.role).unwrap().iter().all(|&x| x == k as u32 + 7));
        }
    }
    let t = m.chrome_trace().unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let track = events
        .iter()
        .find(|e| e["ph"] == "M" && e["args"]["name"] == "nvme->device")
        .map(|e| e["tid"].clone())
        .expect("an nvme->device track");
    let reads: Vec<(f64, f64)> = events
        .iter()
        .filter(|e| e["ph"] == "X" && e["tid"] == track)
        .map(|e| (e["ts"].as_f64().unwrap(), e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap()))
        .collect();
    assert_eq!(reads.len(), 4, "{reads:?}");
    let last_start = reads.iter().map(|r| r.0).fold(f64::MIN, f64::max);
    let first_end = reads.iter().map(|r| r.1).fold(f64::MAX, f64::min);
    assert!(last_start < first_end, "the four reads were in flight together: {reads:?}");
}

#[test]
fn swap_files_are_made_when_the_manager_is_built_and_not_in_its_work() {
    for swap in [SwapFiles::Written, SwapFiles::Reserved, SwapFiles::OnDemand] {
        let preallocate = swap != SwapFiles::OnDemand;
        let dir = scratch();
        let chunk = 4096;
        let m = nvme_manager(8, chunk, 2, NvmeConfig::new(dir.path()).with_budget(1 << 30).with_swap_files(swap));
        let arenas = || m.tiers().stats(Tier::Nvme).unwrap().arenas;
        let files = || std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "slots")).count();
        let made = (arenas(), files());
        let need = 8 * 2 * (chunk * 4) as u64;
        if preallocate {
            assert!(m.tiers().stats(Tier::Nvme).unwrap().reserved >= need, "room for every chunk up front");
            assert!(made.0 > 0 && made.0 as usize == made.1, "{made:?}");
            // Written through: no block left for a first write to convert (where the file
            // system says; a reservation alone leaves them unwritten on ext4 and xfs).
            let unwritten: Option<u64> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "slots"))
                .map(|p| unwritten_bytes(&p))
                .sum();
            if swap == SwapFiles::Written {
                assert!(unwritten.is_none_or(|u| u == 0), "written swap files have {unwritten:?} unwritten bytes");
            } else {
                eprintln!("reserved swap files: {unwritten:?} bytes unwritten");
            }
        } else {
            assert_eq!(made, (0, 0));
        }
        // Every chunk written and sent down to NVMe: with the files made up front, no more.
        for i in 0..8 {
            let t = TensorId { group: 0, index: i };
            let mut a = m.access(&[m.chunk_of(t, Role::Param), m.chunk_of(t, Role::Master)], Mode::Write).unwrap();
            a.slice_mut::<u32>(t, Role::Param).unwrap().fill(i as u32);
        }
        m.offload().unwrap();
        if preallocate {
            assert_eq!((arenas(), files()), made, "no swap file made in the work");
        } else {
            assert!(arenas() > 0, "without preallocation the files come as chunks go down");
        }
    }
}

#[test]
fn a_chrome_trace_has_a_compute_track_and_one_per_link() {
    let dir = scratch();
    let m = manager(dir.path(), &[4000; 8], PolicyKind::Lru, 3, true, 4);
    for r in m.chunks(0, Role::Param) {
        let mut a = m.access(&[r], Mode::Write).unwrap();
        a.slice_mut::<u32>(TensorId { group: 0, index: r.index }, Role::Param).ok();
    }
    m.quiesce();
    let t = m.chrome_trace().unwrap();
    let events = t["traceEvents"].as_array().unwrap();
    let tracks: Vec<&str> = events.iter().filter(|e| e["ph"] == "M").filter_map(|e| e["args"]["name"].as_str()).collect();
    assert!(tracks.contains(&"compute"), "{tracks:?}");
    assert!(tracks.iter().any(|t| t.contains("->")), "{tracks:?}");
    assert!(events.iter().any(|e| e["ph"] == "X" && e["dur"].as_f64().is_some()));
}

#[test]
fn invalid_uses_are_errors_that_change_nothing() {
    let dir = scratch();
    let m = manager(dir.path(), &[4000; 4], PolicyKind::Auto, 3, false, 64);
    let t0 = TensorId { group: 0, index: 0 };
    let r = m.chunk_of(t0, Role::Param);
    let a = m.access(&[r], Mode::Read).unwrap();
    assert!(matches!(m.access(&[r], Mode::Read), Err(Error::InvalidState(_))), "a chunk in use cannot be accessed twice");
    assert!(a.slice::<u32>(TensorId { group: 0, index: 3 }, Role::Param).is_err(), "a tensor outside the access");
    drop(a);
    assert_eq!(m.tensor_state(t0, Role::Param), TensorState::Hold);
    assert!(m.transition(t0, Role::Param, TensorState::ReadyForUpdate).is_err(), "Hold -> ReadyForUpdate skips the backward");
    assert_eq!(m.tensor_state(t0, Role::Param), TensorState::Hold);
    let too_many: Vec<ChunkRef> = m.chunks(0, Role::Param).into_iter().chain(m.chunks(0, Role::Master)).collect();
    assert!(matches!(m.access(&too_many, Mode::Read), Err(Error::OverBudget { tier: Tier::Device, .. })));
    assert_eq!(m.tensor_state(TensorId { group: 0, index: 1 }, Role::Param), TensorState::Free, "a refused access leaves states alone");
}

#[test]
fn a_model_that_cannot_fit_is_refused_with_the_budgets() {
    let dir = scratch();
    let cfg = ManagerConfig {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, 1 << 20).with_host_budget(1 << 20),
        chunk_size: ChunkSize::Fixed(CHUNK),
        ..ManagerConfig::default()
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("big", &ROLES);
    b.tensor(g, "w", &[1 << 20]);
    let e = b.build().err().expect("does not fit");
    let msg = e.to_string();
    assert!(msg.contains("device 1048576") && msg.contains("host 1048576"), "{msg}");
    let _ = dir;
}

#[test]
fn a_full_disk_fails_the_access_that_needs_room_and_loses_nothing() {
    use stowage_memory::{FaultInjector, IoKind};
    let dir = scratch();
    let faults = FaultInjector::new();
    let cb = (CHUNK * 4) as u64;
    let cfg = ManagerConfig {
        tiers: TiersConfig::default()
            .with_device(DeviceChoice::Simulated, 2 * cb)
            .with_host_budget(3 * cb)
            .with_arena_bytes(3 * cb as usize)
            .with_nvme(NvmeConfig::new(dir.path()).with_budget(64 * cb).with_faults(faults.clone())),
        policy: PolicyKind::Lru,
        chunk_size: ChunkSize::Fixed(CHUNK),
        prefetch_depth: 0,
        trace: false,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("m", &[(Role::Param, DType::F32)]);
    let ids: Vec<TensorId> = (0..8).map(|i| b.tensor(g, &format!("t{i}"), &[CHUNK])).collect();
    let m = b.build().unwrap();
    let write = |t: TensorId, v: u32| -> Result<(), Error> {
        let mut a = m.access(&[m.chunk_of(t, Role::Param)], Mode::Write)?;
        a.slice_mut::<u32>(t, Role::Param)?.fill(v);
        Ok(())
    };
    for (k, &t) in ids.iter().enumerate().take(4) {
        write(t, k as u32 + 1).unwrap();
    }
    faults.fail_all(IoKind::Write, libc::ENOSPC);
    // Writing more chunks needs room below, which needs NVMe: it must fail cleanly, not hang.
    let mut failed = None;
    for (k, &t) in ids.iter().enumerate().skip(4) {
        if let Err(e) = write(t, k as u32 + 1) {
            failed = Some(e);
            break;
        }
    }
    assert!(matches!(failed, Some(Error::NoSpace { .. })), "{failed:?}");
    faults.clear();
    m.quiesce();
    for (k, &t) in ids.iter().enumerate().take(4) {
        let a = m.access(&[m.chunk_of(t, Role::Param)], Mode::Read).unwrap();
        assert!(a.slice::<u32>(t, Role::Param).unwrap().iter().all(|&x| x == k as u32 + 1), "chunk {k} survived the full disk");
    }
}

/// Six one-chunk tensors, a simulated device of four chunks whose allocations the returned
/// handle can fail, a host of eight.
fn oom_manager() -> (Manager, Vec<TensorId>, stowage_memory::AllocFaults) {
    let faults = stowage_memory::AllocFaults::new();
    let cb = (CHUNK * 4) as u64;
    let mut tiers = TiersConfig::default().with_device(DeviceChoice::Simulated, 4 * cb).with_host_budget(8 * cb);
    tiers.device.alloc_faults = Some(faults.clone());
    let cfg = ManagerConfig {
        tiers,
        policy: PolicyKind::Lru,
        chunk_size: ChunkSize::Fixed(CHUNK),
        prefetch_depth: 0,
        trace: false,
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("m", &[(Role::Param, DType::F32)]);
    let ids: Vec<TensorId> = (0..6).map(|i| b.tensor(g, &format!("t{i}"), &[CHUNK])).collect();
    (b.build().unwrap(), ids, faults)
}

fn write_u32(m: &Manager, t: TensorId, v: u32) -> Result<(), Error> {
    let mut a = m.access(&[m.chunk_of(t, Role::Param)], Mode::Write)?;
    a.slice_mut::<u32>(t, Role::Param)?.fill(v);
    Ok(())
}

#[test]
fn a_device_with_no_memory_to_give_fails_the_access_cleanly_and_recovers() {
    use stowage_memory::Tier;
    let (m, ids, faults) = oom_manager();
    let cb = (CHUNK * 4) as u64;
    let write = |t: TensorId, v: u32| write_u32(&m, t, v);
    let device_capacity = || m.stats().tiers["device"].capacity;

    // No device memory at all (every request refused, down to one chunk): the access fails with
    // an allocation error naming the tier and the bytes, and the write does not land.
    faults.fail_next(u64::MAX);
    match write(ids[0], 7) {
        Err(Error::Alloc { tier, bytes, reason }) => {
            assert_eq!(tier, Tier::Device);
            assert!(bytes >= cb && reason.contains("out of memory"), "{bytes} {reason}");
        }
        r => panic!("expected an allocation error, got {r:?}"),
    }
    // Whole budget, half, one chunk: three refusals.
    assert_eq!(faults.injected(), 3);
    faults.fail_next(0);
    {
        let a = m.access(&[m.chunk_of(ids[0], Role::Param)], Mode::Read).unwrap();
        assert!(a.slice::<u32>(ids[0], Role::Param).unwrap().iter().all(|&x| x == 0), "the failed write must not land");
    }
    m.quiesce();
    assert_eq!(device_capacity(), 4 * cb, "memory came back: the device holds its budget");
}

#[test]
fn a_device_out_of_memory_below_the_budget_evicts_within_what_the_driver_gave() {
    let (m, ids, faults) = oom_manager();
    let cb = (CHUNK * 4) as u64;
    let write = |t: TensorId, v: u32| write_u32(&m, t, v);
    // The driver refuses the whole budget (4 chunks) and gives half: the device holds 2 chunks
    // from then on, and the manager evicts to the host within them.
    faults.fail_next(1);
    for (k, &t) in ids.iter().enumerate() {
        write(t, k as u32 + 1).unwrap();
    }
    assert_eq!(faults.injected(), 1);
    let st = m.stats();
    let dev = &st.tiers["device"];
    assert_eq!(dev.capacity, 2 * cb, "{dev:?}");
    assert!(dev.peak <= 2 * cb, "{dev:?}");
    assert!(st.write_backs >= 4, "six chunks through two device slots: {st:?}");
    // Every byte written reads back: nothing was lost to the out-of-memory.
    for _ in 0..2 {
        for (k, &t) in ids.iter().enumerate() {
            let a = m.access(&[m.chunk_of(t, Role::Param)], Mode::Read).unwrap();
            assert!(a.slice::<u32>(t, Role::Param).unwrap().iter().all(|&x| x == k as u32 + 1), "chunk {k}");
        }
    }
    // An access needing more chunks at once than the device now holds is refused, naming it.
    let three: Vec<_> = ids[..3].iter().map(|&t| m.chunk_of(t, Role::Param)).collect();
    let r = m.access(&three, Mode::Read).map(|_| ());
    match r {
        Err(e @ Error::OverBudget { .. }) => assert!(e.to_string().contains("device"), "{e}"),
        Err(e) => panic!("expected over budget, got {e}"),
        Ok(()) => panic!("three chunks cannot be on a two-chunk device at once"),
    }
}
