//! libtorch is linked and usable: tensors compute on the CPU, and a tensor viewed in place over
//! a chunk on the (simulated) device sees the chunk's bytes.

use stowage_memory::{ChunkSize, DType, DeviceChoice, Manager, ManagerConfig, Mode, PolicyKind, Role, TiersConfig};
use tch::{Device, Kind, Tensor};

#[test]
fn libtorch_runs_and_reports_cuda_without_panicking() {
    let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
    assert_eq!((&t * 2).sum(Kind::Float).double_value(&[]), 12.0);
    eprintln!("libtorch CUDA available: {}", tch::Cuda::is_available());
}

#[test]
fn a_tensor_over_a_chunk_sees_its_bytes() {
    let cfg = ManagerConfig {
        tiers: TiersConfig::default().with_device(DeviceChoice::Simulated, 1 << 20).with_host_budget(1 << 20),
        policy: PolicyKind::Lru,
        chunk_size: ChunkSize::Fixed(4096),
        ..ManagerConfig::default()
    };
    let mut b = Manager::builder(cfg);
    let g = b.group("m", &[(Role::Param, DType::F32)]);
    let w = b.tensor(g, "w", &[8, 16]);
    let m = b.build().unwrap();
    let mut a = m.access(&[m.chunk_of(w, Role::Param)], Mode::Write).unwrap();
    for (i, x) in a.slice_mut::<f32>(w, Role::Param).unwrap().iter_mut().enumerate() {
        *x = i as f32;
    }
    let addr = a.tensor_addr(w, Role::Param).unwrap();
    // SAFETY: `addr` points at the 8x16 f32 tensor inside a chunk the access keeps resident and
    // CPU-addressable (simulated device) until `a` is dropped, after the view below.
    let view = unsafe { Tensor::from_blob(addr as *const u8, &[8, 16], &[16, 1], Kind::Float, Device::Cpu) };
    assert_eq!(view.sum(Kind::Double).double_value(&[]), (0..128).sum::<i32>() as f64);
    drop(view);
    drop(a);
}
