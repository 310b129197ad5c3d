//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use stowage_memory::{ChunkId, DeviceChoice, EngineKind, NvmeConfig, Slot, Tier, Tiers, TiersConfig};

pub const SLOT: usize = 64 * 1024;

/// A directory on a real disk (O_DIRECT needs one; tmpfs refuses it). `STOWAGE_TEST_DIR`
/// overrides the default under the system temp directory.
pub fn scratch() -> tempfile::TempDir {
    let base = std::env::var_os("STOWAGE_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).unwrap();
    tempfile::Builder::new().prefix("stowage-test").tempdir_in(base).unwrap()
}

/// Tiers with a simulated device, a host tier and an NVMe tier, each with room for `slots`.
pub fn tiers(dir: &std::path::Path, engine: EngineKind, slots: u64) -> Tiers {
    tiers_with(dir, NvmeConfig::new(dir).with_engine(engine), slots)
}

pub fn tiers_with(dir: &std::path::Path, nvme: NvmeConfig, slots: u64) -> Tiers {
    let _ = dir;
    let bytes = slots * SLOT as u64;
    Tiers::new(
        TiersConfig::default()
            .with_device(DeviceChoice::Simulated, bytes)
            .with_host_budget(bytes)
            .with_arena_bytes(8 * SLOT)
            .with_nvme(nvme.with_budget(bytes).with_segment_bytes(16 * 1024)),
    )
    .expect("tiers")
}

/// Deterministic pseudo-random bytes for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A host slot holding `data`.
pub fn host_with(tiers: &Tiers, data: &[u8]) -> Slot {
    let mut s = tiers.alloc(Tier::Host, data.len()).unwrap();
    s.bytes_mut().unwrap().copy_from_slice(data);
    s
}

/// Places `data` in a new slot of `tier`.
pub fn place(tiers: &Tiers, chunk: ChunkId, tier: Tier, data: &[u8]) -> Slot {
    let src = host_with(tiers, data);
    if tier == Tier::Host {
        return src;
    }
    let dst = tiers.alloc(tier, data.len()).unwrap();
    let (_, dst) = tiers.copy(chunk, src, dst).wait().expect("placing a chunk");
    dst
}

/// Reads a slot's bytes back through the host tier; hands the slot back.
pub fn read_back(tiers: &Tiers, chunk: ChunkId, slot: Slot) -> stowage_memory::Result<(Vec<u8>, Slot)> {
    if let Some(b) = slot.bytes() {
        if slot.tier() == Tier::Host {
            return Ok((b.to_vec(), slot));
        }
    }
    let host = tiers.alloc(Tier::Host, slot.len())?;
    let (slot, host) = tiers.copy(chunk, slot, host).wait()?;
    Ok((host.bytes().unwrap().to_vec(), slot))
}

/// Runs `f` on its own thread and fails the test if it has not finished within `secs`: a hang
/// (a deadlock or a livelock) becomes a failure instead of a stuck test run.
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = handle.join();
            v
        }
        // The sender was dropped without a value: the closure panicked; show its message.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => unreachable!("a value is sent before the thread ends"),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("no progress within {secs} s: deadlock or livelock"),
    }
}

/// Bytes of `path` in extents the file system marks unwritten (reserved, never written), by
/// FIEMAP; None where the file system does not say (tmpfs).
pub fn unwritten_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
    const EXTENT_UNWRITTEN: u32 = 0x800;
    const EXTENTS: usize = 64;
    // struct fiemap (32 bytes) then EXTENTS struct fiemap_extent (56 bytes each), as u64 words.
    let mut buf = vec![0u64; (32 + 56 * EXTENTS) / 8];
    buf[1] = u64::MAX; // fm_length
    buf[2] = 1; // fm_flags = SYNC, fm_mapped_extents = 0
    buf[3] = EXTENTS as u64; // fm_extent_count, fm_reserved = 0
    let f = std::fs::File::open(path).ok()?;
    // SAFETY: `buf` is a zeroed, 8-byte aligned fiemap with room for EXTENTS extents, as the
    // request's header says; the kernel writes no further.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    let mapped = (buf[2] >> 32) as usize;
    let mut unwritten = 0;
    for e in 0..mapped.min(EXTENTS) {
        let w = 4 + e * 7; // fe_logical, fe_physical, fe_length, 2 reserved, then flags
        let flags = buf[w + 5] as u32;
        if flags & EXTENT_UNWRITTEN != 0 {
            unwritten += buf[w + 2];
        }
    }
    Some(unwritten)
}
