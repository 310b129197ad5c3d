//! Chunk payloads as libtorch tensors, in place (`Tensor::from_blob`, no copy).
//!
//! A [`View`] borrows the [`Access`] guard that keeps its chunk resident, so the borrow checker
//! refuses any use after the guard is gone:
//!
//! ```compile_fail
//! # use stowage_harness::bridge::view;
//! # fn f(m: &stowage_memory::Manager, c: stowage_memory::ChunkRef, t: stowage_memory::TensorId) {
//! let a = m.access(&[c], stowage_memory::Mode::Read).unwrap();
//! let v = view(&a, t, stowage_memory::Role::Param, &[4]).unwrap();
//! drop(a); // error: `a` is borrowed by `v`
//! let _ = v.sum(tch::Kind::Float);
//! # }
//! ```
//!
//! Tensors *computed* from a view own new memory and may outlive it. Aliasing results (a
//! `shallow_clone`, `view`, `narrow`, or tensors autograd saved for backward) share the chunk's
//! memory: the executor keeps them inside the guard's scope and drops autograd graphs before
//! releasing.

use std::marker::PhantomData;
use std::ops::Deref;

use stowage_memory::{Access, DType, Mode, Role, TensorId};
use tch::{Device, Kind, Tensor};

use crate::error::{HarnessError, Result};

/// A tensor over chunk memory, valid while the access it borrows lives.
pub struct View<'a> {
    t: Tensor,
    _guard: PhantomData<&'a ()>,
}

impl Deref for View<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.t
    }
}

impl View<'_> {
    /// A leaf that autograd tracks (gradients computed through `run_backward`).
    pub fn tracked(&self) -> Tensor {
        self.t.detach().set_requires_grad(true)
    }
}

pub fn kind_of(d: DType) -> Kind {
    match d {
        DType::F32 => Kind::Float,
        DType::BF16 => Kind::BFloat16,
        DType::F16 => Kind::Half,
    }
}

/// The device libtorch must use for an access's memory.
pub fn device_of(a: &Access<'_>, cuda_ordinal: usize) -> Device {
    if a.cpu_addressable() {
        Device::Cpu
    } else {
        Device::Cuda(cuda_ordinal)
    }
}

fn make<'a>(addr: u64, shape: &[i64], kind: Kind, device: Device) -> View<'a> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    // SAFETY: `addr` is the start of a tensor of `shape` elements of `kind` inside a chunk that
    // the borrowed access keeps resident (pinned on the device tier) for the view's lifetime;
    // the memory is on `device` (CPU-addressable for the simulated device, CUDA otherwise).
    // The view never resizes (from_blob memory is not owned).
    let t = unsafe { Tensor::from_blob(addr as *const u8, shape, &strides, kind, device) };
    View { t, _guard: PhantomData }
}

/// A view of `tensor`'s `role` copy with `shape` (its registered element count).
pub fn view<'a>(a: &'a Access<'_>, tensor: TensorId, role: Role, shape: &[i64]) -> Result<View<'a>> {
    view_on(a, tensor, role, shape, 0)
}

/// As [`view`], for a CUDA device other than ordinal 0.
pub fn view_on<'a>(a: &'a Access<'_>, tensor: TensorId, role: Role, shape: &[i64], ordinal: usize) -> Result<View<'a>> {
    let (addr, numel, dtype) = a.tensor_info(tensor, role)?;
    let want: i64 = shape.iter().product();
    if want as usize != numel {
        return Err(HarnessError::Config(format!("a view of {numel} elements cannot have shape {shape:?}")));
    }
    Ok(make(addr, shape, kind_of(dtype), device_of(a, ordinal)))
}

/// A writable view: the access must be `Mode::Write` (so the manager knows the chunk changed).
pub fn view_mut<'a>(a: &'a Access<'_>, tensor: TensorId, role: Role, shape: &[i64], ordinal: usize) -> Result<View<'a>> {
    if a.mode() != Mode::Write {
        return Err(HarnessError::Config("writing through a read access".into()));
    }
    view_on(a, tensor, role, shape, ordinal)
}

/// The whole `k`-th chunk of an access as a flat tensor of `dtype` (padding included).
pub fn chunk_view<'a>(a: &'a Access<'_>, k: usize, dtype: DType, ordinal: usize) -> View<'a> {
    let (addr, bytes) = a.chunk(k);
    make(addr, &[(bytes / dtype.size()) as i64], kind_of(dtype), device_of(a, ordinal))
}
