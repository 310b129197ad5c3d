//! Faults give the documented error and never wrong data: corrupted swap files, a full disk,
//! budgets, and handles dropped while their moves are in flight.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use stowage_memory::{ChunkId, EngineKind, Error, FaultInjector, IoKind, NvmeConfig, Slot, Tier};

#[test]
fn a_flipped_byte_on_disk_fails_that_chunk_with_a_checksum_error_only() {
    for engine in [EngineKind::Uring, EngineKind::Psync, EngineKind::Mmap] {
        let dir = scratch();
        let t = tiers(dir.path(), engine, 16);
        let (a, b) = (pattern(1, SLOT), pattern(2, SLOT));
        let disk_a = place(&t, ChunkId(1), Tier::Nvme, &a);
        let disk_b = place(&t, ChunkId(2), Tier::Nvme, &b);
        let path = t.nvme_path(&disk_a).expect("an NVMe slot has a file");
        let at = disk_a.addr() + 12345;
        {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            let mut byte = [0u8];
            f.read_exact_at(&mut byte, at).unwrap();
            byte[0] ^= 0x40;
            f.write_all_at(&byte, at).unwrap();
            f.sync_all().unwrap();
        }
        match read_back(&t, ChunkId(1), disk_a) {
            Err(Error::ChecksumMismatch { chunk, path: p, offset }) => {
                assert_eq!(chunk, ChunkId(1));
                assert_eq!(p, path);
                assert_eq!(offset, at - 12345);
            }
            Err(e) => panic!("{engine}: expected a checksum mismatch, got {e}"),
            Ok(_) => panic!("{engine}: a corrupted chunk was returned as valid"),
        }
        let (got, _) = read_back(&t, ChunkId(2), disk_b).unwrap();
        assert!(got == b, "{engine}: the other chunk still reads correctly");
    }
}

#[test]
fn disk_full_fails_the_write_and_keeps_the_previous_copy() {
    let dir = scratch();
    let faults = FaultInjector::new();
    let t = tiers_with(dir.path(), NvmeConfig::new(dir.path()).with_faults(faults.clone()), 16);
    let old = pattern(10, SLOT);
    let other = pattern(11, SLOT);
    let disk_old = place(&t, ChunkId(7), Tier::Nvme, &old);
    let disk_other = place(&t, ChunkId(8), Tier::Nvme, &other);
    let before = t.stats(Tier::Nvme).unwrap();

    faults.fail_all(IoKind::Write, libc::ENOSPC);
    let new = host_with(&t, &pattern(12, SLOT));
    let dst = t.alloc(Tier::Nvme, SLOT).unwrap();
    let failed = t.copy(ChunkId(7), new, dst).wait().unwrap_err();
    assert!(matches!(failed.error, Error::NoSpace { .. }), "got {}", failed.error);
    assert!(failed.error.to_string().contains("no space"), "{}", failed.error);
    // The failed slot must not be readable as if it held data.
    assert!(read_back(&t, ChunkId(7), failed.dst).is_err());
    faults.clear();

    let (got, _) = read_back(&t, ChunkId(7), disk_old).unwrap();
    assert!(got == old, "the previous copy stays readable");
    let (got, _) = read_back(&t, ChunkId(8), disk_other).unwrap();
    assert!(got == other, "other chunks are undisturbed");
    let after = t.stats(Tier::Nvme).unwrap();
    assert_eq!(after.in_flight, 0);
    assert_eq!(after.used, before.used - 2 * SLOT as u64, "only the two read-back slots were freed");
    assert!(faults.injected() > 0);
}

#[test]
fn a_read_error_is_reported_with_path_and_offset() {
    let dir = scratch();
    let faults = FaultInjector::new();
    let t = tiers_with(dir.path(), NvmeConfig::new(dir.path()).with_faults(faults.clone()), 16);
    let data = pattern(3, SLOT);
    let disk = place(&t, ChunkId(3), Tier::Nvme, &data);
    faults.fail_next(IoKind::Read, libc::EIO, 1);
    let host = t.alloc(Tier::Host, SLOT).unwrap();
    let failed = t.copy(ChunkId(3), disk, host).wait().unwrap_err();
    match &failed.error {
        Error::Io { path, offset, .. } => {
            assert!(path.starts_with(dir.path()));
            assert!(*offset >= failed.src.addr() && *offset < failed.src.addr() + SLOT as u64);
        }
        e => panic!("expected an I/O error, got {e}"),
    }
    // A retry succeeds and returns the right bytes.
    let (got, _) = read_back(&t, ChunkId(3), failed.src).unwrap();
    assert!(got == data);
}

#[test]
fn allocation_past_the_budget_fails_and_leaves_no_partial_state() {
    let dir = scratch();
    let t = tiers(dir.path(), EngineKind::Uring, 4);
    for tier in Tier::ALL {
        let held: Vec<Slot> = (0..4).map(|_| t.alloc(tier, SLOT).unwrap()).collect();
        let before = t.stats(tier).unwrap();
        let e = t.alloc(tier, SLOT).unwrap_err();
        match e {
            Error::OverBudget {
                tier: et,
                requested,
                capacity,
                in_use,
            } => {
                assert_eq!((et, requested, capacity, in_use), (tier, SLOT as u64, 4 * SLOT as u64, 4 * SLOT as u64));
            }
            e => panic!("{tier}: expected OverBudget, got {e}"),
        }
        assert_eq!(t.stats(tier).unwrap(), before, "{tier}: no partial state");
        drop(held);
    }
}

#[test]
fn dropping_every_in_flight_handle_then_reusing_the_slots_reads_correct_data() {
    for engine in [EngineKind::Uring, EngineKind::Psync, EngineKind::Mmap] {
        let dir = scratch();
        let t = tiers(dir.path(), engine, 64);
        // Chunks on NVMe to read back, and host chunks to write out and to the device.
        let on_disk: Vec<Slot> = (0..8).map(|i| place(&t, ChunkId(i), Tier::Nvme, &pattern(i, SLOT))).collect();
        let mut handles = Vec::new();
        for (i, d) in on_disk.into_iter().enumerate() {
            handles.push(t.copy(ChunkId(i as u64), d, t.alloc(Tier::Host, SLOT).unwrap()));
        }
        for i in 8..16u64 {
            let h = host_with(&t, &pattern(i, SLOT));
            let tier = if i % 2 == 0 { Tier::Nvme } else { Tier::Device };
            handles.push(t.copy(ChunkId(i), h, t.alloc(tier, SLOT).unwrap()));
        }
        drop(handles);
        // Reuse: the pools hand out slots as the moves release them; fresh data must survive.
        for round in 0..3u64 {
            let mut live = Vec::new();
            for i in 0..16u64 {
                let id = ChunkId(100 + round * 16 + i);
                let tier = Tier::ALL[(i % 3) as usize];
                live.push((id, place(&t, id, tier, &pattern(id.0, SLOT))));
            }
            for (id, slot) in live {
                let (got, _) = read_back(&t, id, slot).unwrap();
                assert!(got == pattern(id.0, SLOT), "{engine}: reused slot returned wrong data");
            }
        }
        // Everything the dropped moves held comes back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while Tier::ALL.iter().any(|&x| t.stats(x).unwrap().used != 0) {
            assert!(std::time::Instant::now() < deadline, "{engine}: slots of dropped moves never came back");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

#[test]
fn a_slot_is_read_only_as_the_chunk_written_into_it() {
    let dir = scratch();
    let t = tiers(dir.path(), EngineKind::Psync, 8);
    let disk = place(&t, ChunkId(1), Tier::Nvme, &pattern(1, SLOT));
    let f = t.copy(ChunkId(2), disk, t.alloc(Tier::Host, SLOT).unwrap()).wait().unwrap_err();
    assert!(matches!(f.error, Error::InvalidState(_)), "{}", f.error);
    let never_written = t.alloc(Tier::Nvme, SLOT).unwrap();
    assert!(read_back(&t, ChunkId(3), never_written).is_err());
}

/// A 1 MiB tmpfs, unmounted on drop; `None` (with the reason printed) where mounting is not
/// permitted.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount() -> Option<Self> {
        let dir = scratch();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallFs(dir)),
            Ok(o) => {
                eprintln!("skipping the real full-disk test: mount refused: {}", String::from_utf8_lossy(&o.stderr).trim());
                None
            }
            Err(e) => {
                eprintln!("skipping the real full-disk test: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_really_full_disk_refuses_new_swap_space_with_no_space() {
    let Some(fs) = SmallFs::mount() else { return };
    let dir = fs.0.path();
    let t = stowage_memory::Tiers::new(
        stowage_memory::TiersConfig::default()
            .with_device(stowage_memory::DeviceChoice::Simulated, 64 * SLOT as u64)
            .with_host_budget(64 * SLOT as u64)
            .with_arena_bytes(12 * SLOT)
            .with_nvme(NvmeConfig::new(dir).with_budget(64 * SLOT as u64)),
    )
    .unwrap();
    let kept: Vec<(u64, Slot)> = (0..12u64).map(|i| (i, place(&t, ChunkId(i), Tier::Nvme, &pattern(i, SLOT)))).collect();
    let before = t.stats(Tier::Nvme).unwrap();
    let e = t.alloc(Tier::Nvme, SLOT).unwrap_err();
    match &e {
        Error::NoSpace { path } => assert!(path.starts_with(dir), "names the file: {}", path.display()),
        e => panic!("expected NoSpace, got {e}"),
    }
    assert_eq!(t.stats(Tier::Nvme).unwrap(), before, "nothing else disturbed");
    let leftovers = std::fs::read_dir(dir).unwrap().count();
    assert_eq!(leftovers, 1, "the half-made swap file was removed");
    for (i, slot) in kept {
        let (got, _) = read_back(&t, ChunkId(i), slot).unwrap();
        assert!(got == pattern(i, SLOT), "chunk {i} still reads correctly");
    }
}

#[test]
fn swap_files_of_a_killed_process_are_removed_when_the_tier_opens() {
    let dir = scratch();
    // A process killed with SIGKILL never removes its swap files. Pids above the kernel's
    // maximum (4194304) never run.
    let stale = dir.path().join("stowage-999999999-0-0.slots");
    std::fs::write(&stale, vec![7u8; 8192]).unwrap();
    // A live process's files (this test's parent), unrelated files and look-alikes stay.
    let live = dir.path().join(format!("stowage-{}-0-0.slots", std::os::unix::process::parent_id()));
    let keep = [live, dir.path().join("notes.txt"), dir.path().join("stowage-999999999-x-0.slots")];
    for k in &keep {
        std::fs::write(k, b"keep").unwrap();
    }
    let t = tiers(dir.path(), EngineKind::Psync, 4);
    assert!(!stale.exists(), "the dead process's swap file is removed");
    for k in &keep {
        assert!(k.exists(), "{} must stay", k.display());
    }
    assert!(t.notes().iter().any(|n| n.contains("removed 1 swap files (8192 bytes)")), "{:?}", t.notes());
}

#[test]
fn a_truncated_swap_file_gives_a_read_error_never_short_data() {
    // A short read (the file ends inside the slot) is retried for the rest and then fails with
    // end-of-file; the data read so far is never handed out.
    // (Not the mmap engine: touching a mapping past the end of a file raises SIGBUS, which is
    // why that engine insists on preallocated files it alone resizes.)
    for engine in [EngineKind::Uring, EngineKind::Psync] {
        let dir = scratch();
        let t = tiers(dir.path(), engine, 16);
        let a = pattern(3, SLOT);
        let disk = place(&t, ChunkId(3), Tier::Nvme, &a);
        let path = t.nvme_path(&disk).expect("an NVMe slot has a file");
        let cut = disk.addr() + (SLOT as u64) / 2;
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
        match read_back(&t, ChunkId(3), disk) {
            Err(e) => {
                let msg = e.to_string();
                eprintln!("{engine}: {msg}");
                assert!(msg.contains(&path.display().to_string()), "{engine}: the error names the file: {msg}");
            }
            Ok(_) => panic!("{engine}: a truncated slot was returned as valid"),
        }
    }
}
