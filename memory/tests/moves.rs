//! Moves between tiers: every path and engine round-trips, random move sequences end
//! byte-exact, and many concurrent moves stay correct.

mod common;

use std::collections::HashMap;

use common::*;
use proptest::prelude::*;
use stowage_memory::{ChunkId, EngineKind, NvmeConfig, Slot, SwapFiles, Tier, Tiers};

const ENGINES: [EngineKind; 3] = [EngineKind::Uring, EngineKind::Psync, EngineKind::Mmap];

#[test]
fn every_path_round_trips_on_every_engine() {
    for engine in ENGINES {
        let dir = scratch();
        let t = tiers(dir.path(), engine, 32);
        for (i, &(a, b)) in [
            (Tier::Host, Tier::Device),
            (Tier::Device, Tier::Host),
            (Tier::Host, Tier::Nvme),
            (Tier::Nvme, Tier::Host),
            (Tier::Device, Tier::Nvme),
            (Tier::Nvme, Tier::Device),
            (Tier::Nvme, Tier::Nvme),
            (Tier::Device, Tier::Device),
            (Tier::Host, Tier::Host),
        ]
        .iter()
        .enumerate()
        {
            let chunk = ChunkId(i as u64);
            let data = pattern(i as u64 + 1, SLOT);
            let src = place(&t, chunk, a, &data);
            let dst = t.alloc(b, SLOT).unwrap();
            let (src, dst) = t.copy(chunk, src, dst).wait().unwrap_or_else(|f| panic!("{engine} {a}->{b}: {f}"));
            let (got, _) = read_back(&t, chunk, dst).unwrap();
            assert!(got == data, "{engine}: {a} -> {b} changed the bytes");
            let (got_src, _) = read_back(&t, chunk, src).unwrap();
            assert!(got_src == data, "{engine}: {a} -> {b} changed the source");
        }
        for tier in Tier::ALL {
            let st = t.stats(tier).unwrap();
            assert_eq!(st.used, 0, "{engine}: {tier} holds nothing after the slots are dropped");
            assert_eq!(st.in_flight, 0, "{engine}: {tier} has nothing in flight");
            assert_eq!(st.staging, 0, "{engine}: {tier} has no staging left");
        }
    }
}

#[test]
fn staged_moves_charge_the_host_tier_and_fail_cleanly_when_it_is_full() {
    let dir = scratch();
    let t = tiers(dir.path(), EngineKind::Uring, 4);
    let data = pattern(9, SLOT);
    let dev = place(&t, ChunkId(1), Tier::Device, &data);
    let hold: Vec<Slot> = (0..4).map(|_| t.alloc(Tier::Host, SLOT).unwrap()).collect();
    let disk = t.alloc(Tier::Nvme, SLOT).unwrap();
    let failed = t.copy(ChunkId(1), dev, disk).wait().unwrap_err();
    assert!(failed.error.is_retryable(), "{}", failed.error);
    assert!(matches!(failed.error, stowage_memory::Error::OverBudget { tier: Tier::Host, .. }));
    assert_eq!(t.stats(Tier::Host).unwrap().used, 4 * SLOT as u64);
    drop(hold);
    let (dev, disk) = t.copy(ChunkId(1), failed.src, failed.dst).wait().unwrap();
    assert_eq!(t.stats(Tier::Host).unwrap().peak, 4 * SLOT as u64);
    assert_eq!(read_back(&t, ChunkId(1), disk).unwrap().0, data);
    assert_eq!(read_back(&t, ChunkId(1), dev).unwrap().0, data);
}

#[test]
fn mismatched_slot_sizes_are_refused() {
    let dir = scratch();
    let t = tiers(dir.path(), EngineKind::Psync, 8);
    let a = t.alloc(Tier::Host, SLOT).unwrap();
    let b = t.alloc(Tier::Device, 2 * SLOT).unwrap();
    let f = t.copy(ChunkId(0), a, b).wait().unwrap_err();
    assert!(matches!(f.error, stowage_memory::Error::Unsupported { .. }), "{}", f.error);
    assert!(t.alloc(Tier::Host, 1000).is_err(), "unaligned slot sizes are refused");
}

/// One step of a random schedule: move chunk `chunk % n` to `tier`, or rewrite its bytes.
#[derive(Debug, Clone)]
enum Step {
    Move { chunk: usize, tier: Tier },
    Rewrite { chunk: usize, seed: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..64, prop_oneof![Just(Tier::Device), Just(Tier::Host), Just(Tier::Nvme)])
            .prop_map(|(chunk, tier)| Step::Move { chunk, tier }),
        1 => (0usize..64, any::<u64>()).prop_map(|(chunk, seed)| Step::Rewrite { chunk, seed }),
    ]
}

fn run_schedule(t: &Tiers, seeds: &[u64], steps: &[Step]) {
    let n = seeds.len();
    let mut oracle: HashMap<usize, Vec<u8>> = HashMap::new();
    let mut slots: Vec<Option<Slot>> = Vec::new();
    for (i, &s) in seeds.iter().enumerate() {
        let data = pattern(s, SLOT);
        slots.push(Some(place(t, ChunkId(i as u64), Tier::Host, &data)));
        oracle.insert(i, data);
    }
    for st in steps {
        match *st {
            Step::Move { chunk, tier } => {
                let c = chunk % n;
                let src = slots[c].take().unwrap();
                let dst = t.alloc(tier, SLOT).unwrap();
                let (_, dst) = t.copy(ChunkId(c as u64), src, dst).wait().unwrap();
                slots[c] = Some(dst);
            }
            Step::Rewrite { chunk, seed } => {
                let c = chunk % n;
                let data = pattern(seed, SLOT);
                slots[c] = Some(place(t, ChunkId(c as u64), slots[c].as_ref().unwrap().tier(), &data));
                oracle.insert(c, data);
            }
        }
    }
    for (c, slot) in slots.into_iter().enumerate() {
        let (got, _) = read_back(t, ChunkId(c as u64), slot.unwrap()).unwrap();
        assert!(got == oracle[&c], "chunk {c} differs from the oracle");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn random_moves_among_all_tiers_end_byte_exact(
        seeds in prop::collection::vec(any::<u64>(), 1..6),
        steps in prop::collection::vec(step(), 1..40),
        engine in prop_oneof![Just(EngineKind::Uring), Just(EngineKind::Psync), Just(EngineKind::Mmap)],
    ) {
        let dir = scratch();
        // Room for every chunk in every tier plus staging.
        let t = tiers(dir.path(), engine, 24);
        run_schedule(&t, &seeds, &steps);
    }
}

#[test]
fn concurrent_moves_from_many_threads_stay_correct() {
    let dir = scratch();
    let t = tiers(dir.path(), EngineKind::Uring, 256);
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for th in 0..8u64 {
            let t = &t;
            s.spawn(move || {
                let tiers = [Tier::Device, Tier::Host, Tier::Nvme];
                let mut held = Vec::new();
                for c in 0..4u64 {
                    let id = ChunkId(th * 100 + c);
                    let data = pattern(id.0, SLOT);
                    held.push((id, place(t, id, Tier::Host, &data), data));
                }
                for round in 0..60usize {
                    // Start a move of every chunk at once, then collect them.
                    let pending: Vec<_> = held
                        .drain(..)
                        .map(|(id, slot, data)| {
                            let tier = tiers[(round + id.0 as usize) % 3];
                            let dst = t.alloc(tier, SLOT).unwrap();
                            (id, t.copy(id, slot, dst), data)
                        })
                        .collect();
                    for (id, tr, data) in pending {
                        let (_, dst) = tr.wait().unwrap();
                        held.push((id, dst, data));
                    }
                }
                for (id, slot, data) in held {
                    let (got, _) = read_back(t, id, slot).unwrap();
                    assert!(got == data, "chunk {id} corrupted under concurrency");
                }
            });
        }
    });
    assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
    for tier in Tier::ALL {
        assert_eq!(t.stats(tier).unwrap().used, 0);
    }
}

#[test]
fn the_engine_in_use_is_reported_and_fallbacks_are_explained() {
    let dir = scratch();
    for engine in ENGINES {
        let t = tiers(dir.path(), engine, 4);
        let (used, direct, path) = t.nvme_engine().unwrap();
        assert_eq!(path, dir.path());
        if used != engine {
            assert!(t.notes().iter().any(|n| n.contains("falling back")), "{engine} -> {used}: {:?}", t.notes());
        }
        if engine == EngineKind::Mmap {
            assert!(!direct, "the mmap engine goes through the page cache");
        } else if !direct {
            assert!(t.notes().iter().any(|n| n.contains("O_DIRECT")), "{:?}", t.notes());
        }
        eprintln!("asked {engine}: using {used}, O_DIRECT {direct}");
    }
}

#[test]
fn io_uring_uses_registered_host_buffers_where_allowed() {
    let dir = scratch();
    let t = tiers(dir.path(), EngineKind::Uring, 8);
    if t.nvme_engine().unwrap().0 != EngineKind::Uring {
        eprintln!("skipping: io_uring unavailable here: {:?}", t.notes());
        return;
    }
    let disk = place(&t, ChunkId(1), Tier::Nvme, &pattern(1, SLOT));
    let (got, _) = read_back(&t, ChunkId(1), disk).unwrap();
    assert!(got == pattern(1, SLOT));
    let c = t.nvme_engine_counters().unwrap();
    assert!(c.fixed + c.plain >= 2, "{c:?}");
    // Registration needs memlock headroom (or CAP_IPC_LOCK); without it plain I/O is used.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we pass.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root || limit.rlim_cur >= (8 * SLOT) as u64 {
        assert!(c.fixed > 0 && c.plain == 0, "host arenas should be registered: {c:?}");
    } else {
        eprintln!("memlock limit {} too small to register buffers: {c:?}", limit.rlim_cur);
    }
}

#[test]
fn the_simulated_device_paces_copies_to_its_bandwidth() {
    let bw = 32.0 * 1024.0 * 1024.0; // 32 MiB/s: a 64 KiB slot takes about 2 ms.
    let t = Tiers::new(
        stowage_memory::TiersConfig::default()
            .with_device(stowage_memory::DeviceChoice::Simulated, 16 * SLOT as u64)
            .with_sim_bandwidth(bw)
            .with_host_budget(16 * SLOT as u64),
    )
    .unwrap();
    let n = 8;
    let start = std::time::Instant::now();
    let moves: Vec<_> = (0..n)
        .map(|i| t.copy(ChunkId(i), host_with(&t, &pattern(i, SLOT)), t.alloc(Tier::Device, SLOT).unwrap()))
        .collect();
    for (i, m) in moves.into_iter().enumerate() {
        let (_, dev) = m.wait().unwrap();
        assert!(read_back(&t, ChunkId(i as u64), dev).unwrap().0 == pattern(i as u64, SLOT));
    }
    let floor = (n as usize * SLOT) as f64 / bw;
    let took = start.elapsed().as_secs_f64();
    assert!(took >= 0.9 * floor, "{n} paced copies took {took:.4}s, less than the {floor:.4}s the bandwidth allows");
}

#[test]
fn swap_files_written_through_in_the_background_never_touch_a_chunk() {
    let dir = scratch();
    let files = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "slots")).collect()
    };
    // 64 slots in arenas of 8: eight swap files, reserved (unwritten) up front.
    let t = tiers_with(dir.path(), NvmeConfig::new(dir.path()).with_swap_files(SwapFiles::Background), 64);
    assert_eq!(t.reserve(Tier::Nvme, 64 * SLOT as u64, SLOT, false).unwrap(), 64 * SLOT as u64);
    assert_eq!(files().len(), 8);
    let (_, direct, _) = t.nvme_engine().unwrap();
    assert!(direct, "the test directory {} must take O_DIRECT (set STOWAGE_TEST_DIR to a disk)", dir.path().display());
    let unwritten = || files().iter().map(|p| unwritten_bytes(p)).sum::<Option<u64>>();
    let Some(before) = unwritten() else {
        eprintln!("the file system does not report unwritten extents; nothing to check");
        return;
    };
    assert!(before > 0, "reserved files start unwritten");
    t.fill_when_idle();
    // Chunks written down while the fill runs: three arenas' worth, wherever it is.
    let chunks: Vec<(ChunkId, Vec<u8>, Slot)> = (0..24u64)
        .map(|i| {
            let data = pattern(100 + i, SLOT);
            let slot = place(&t, ChunkId(i), Tier::Nvme, &data);
            (ChunkId(i), data, slot)
        })
        .collect();
    // Every byte is written in the end: the chunks' slots by their writes, the rest by the fill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while unwritten() != Some(0) {
        assert!(std::time::Instant::now() < deadline, "still {:?} bytes unwritten after 60 s", unwritten());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for (chunk, data, slot) in chunks {
        let (got, _) = read_back(&t, chunk, slot).unwrap_or_else(|e| panic!("{chunk}: {e}"));
        assert!(got == data, "{chunk}: the fill changed its bytes");
    }
}
