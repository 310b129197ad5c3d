//! End to end across the crates: the harness's tier report agrees with what the memory crate
//! actually does when moving a chunk through every tier it reports.

use stowage_memory::{ChunkId, EngineKind, Tier};

#[test]
fn the_reported_tiers_move_a_chunk_end_to_end() {
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let (tiers, report) = stowage_harness::info::report(Some(dir.path()), EngineKind::Uring).unwrap();
    let engine = report["nvme"]["engine"].as_str().unwrap();
    assert_eq!(Some(engine), tiers.nvme_engine().map(|e| e.0.name()));
    let len = tiers.slot_align() * 4;
    let mut host = tiers.alloc(Tier::Host, len).unwrap();
    for (i, b) in host.bytes_mut().unwrap().iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    let want = host.bytes().unwrap().to_vec();
    let mut slot = host;
    for tier in [Tier::Nvme, Tier::Device, Tier::Nvme, Tier::Host] {
        let dst = tiers.alloc(tier, len).unwrap();
        slot = tiers.copy(ChunkId(1), slot, dst).wait().unwrap().1;
    }
    assert_eq!(slot.bytes().unwrap(), &want[..]);
    let (written, read) = tiers.nvme_bytes_moved();
    assert_eq!((written, read), (2 * len as u64, 2 * len as u64), "two writes and two verified reads");
}
