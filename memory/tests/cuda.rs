//! The CUDA device tier. On a machine without a GPU these tests check that nothing panics and
//! print why the GPU part is skipped; with a GPU they run the same round trips through it.

mod common;

use common::*;
use stowage_memory::{ChunkId, DeviceChoice, DeviceKind, EngineKind, Error, NvmeConfig, Tier, Tiers, TiersConfig};

fn cuda_tiers(dir: &std::path::Path) -> Option<Tiers> {
    let cfg = TiersConfig::default()
        .with_device(DeviceChoice::Cuda, 64 * SLOT as u64)
        .with_host_budget(64 * SLOT as u64)
        .with_arena_bytes(8 * SLOT)
        .with_nvme(NvmeConfig::new(dir).with_budget(64 * SLOT as u64));
    match Tiers::new(cfg) {
        Ok(t) => Some(t),
        Err(Error::NoCuda { reason }) => {
            eprintln!("skipping the CUDA part: {reason}");
            None
        }
        Err(e) => panic!("CUDA present but unusable: {e}"),
    }
}

#[test]
fn asking_for_cuda_without_a_gpu_is_an_error_not_a_panic() {
    let dir = scratch();
    let auto = Tiers::new(TiersConfig::default().with_device(DeviceChoice::Auto, 1 << 20)).unwrap();
    match auto.device_kind() {
        Some(DeviceKind::Cuda) => eprintln!("a GPU is present: {:?}", auto.cuda_info()),
        Some(DeviceKind::Simulated) => {
            assert!(auto.notes().iter().any(|n| n.contains("simulated")), "the fallback is explained: {:?}", auto.notes());
        }
        None => panic!("Auto always gives a device tier"),
    }
    let _ = cuda_tiers(dir.path());
}

#[test]
fn cuda_round_trips_through_device_host_and_nvme() {
    let dir = scratch();
    let Some(t) = cuda_tiers(dir.path()) else { return };
    assert_eq!(t.device_kind(), Some(DeviceKind::Cuda));
    for (i, &(a, b)) in [
        (Tier::Host, Tier::Device),
        (Tier::Device, Tier::Host),
        (Tier::Device, Tier::Nvme),
        (Tier::Nvme, Tier::Device),
        (Tier::Device, Tier::Device),
    ]
    .iter()
    .enumerate()
    {
        let chunk = ChunkId(i as u64);
        let data = pattern(i as u64 + 40, SLOT);
        let src = place(&t, chunk, a, &data);
        let dst = t.alloc(b, SLOT).unwrap();
        let (_, dst) = t.copy(chunk, src, dst).wait().unwrap();
        let (got, _) = read_back(&t, chunk, dst).unwrap();
        assert!(got == data, "{a} -> {b} through CUDA changed the bytes");
    }
    let _ = EngineKind::Uring;
}
