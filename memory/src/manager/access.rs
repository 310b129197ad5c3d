//! The access guard: chunks held on the device for an operation, their addresses and the
//! tensors in them; dropping it releases the chunks.

use std::time::Instant;

use super::layout::{DType, Role};
use super::{ChunkRef, Manager, Mode, TensorId};
use crate::tier::Tier;
use crate::error::{Error, Result};

/// Chunks held on the device for an operation. Dropping it releases them.
pub struct Access<'m> {
    pub(super) mgr: &'m Manager,
    pub(super) refs: Vec<ChunkRef>,
    pub(super) idx: Vec<usize>,
    /// (address, bytes, CPU-addressable) per chunk.
    pub(super) addrs: Vec<(u64, usize, bool)>,
    pub(super) mode: Mode,
    pub(super) after_backward: bool,
    pub(super) started: Instant,
}

impl Access<'_> {
    /// The tier the chunks are on (always the compute device).
    pub fn tier(&self) -> Tier {
        Tier::Device
    }

    /// Address (device or host pointer) and length of the `k`-th chunk of this access.
    pub fn chunk(&self, k: usize) -> (u64, usize) {
        (self.addrs[k].0, self.addrs[k].1)
    }

    fn locate(&self, tensor: TensorId, role: Role) -> Result<(usize, usize, usize)> {
        let l = &self.mgr.layouts[tensor.group];
        let p = l.tensors[tensor.index].placement;
        let k = self
            .refs
            .iter()
            .position(|r| r.group == tensor.group && r.index == p.chunk && r.role == role)
            .ok_or_else(|| Error::InvalidState(format!("tensor {} ({role:?}) is not in this access", l.tensors[tensor.index].name)))?;
        let size = l.dtype(role).expect("role registered").size();
        Ok((k, p.offset * size, p.numel * size))
    }

    /// Device address of a tensor in this access.
    pub fn tensor_addr(&self, tensor: TensorId, role: Role) -> Result<u64> {
        let (k, off, _) = self.locate(tensor, role)?;
        Ok(self.addrs[k].0 + off as u64)
    }

    /// Device address, element count and element type of a tensor in this access.
    pub fn tensor_info(&self, tensor: TensorId, role: Role) -> Result<(u64, usize, DType)> {
        let (k, off, len) = self.locate(tensor, role)?;
        let dtype = self.mgr.layouts[tensor.group].dtype(role).ok_or_else(|| Error::InvalidState(format!("role {role:?} is not registered")))?;
        Ok((self.addrs[k].0 + off as u64, len / dtype.size(), dtype))
    }

    /// A tensor's bytes as (pointer, length), when the device is CPU-addressable.
    fn cpu_bytes(&self, tensor: TensorId, role: Role) -> Result<(*mut u8, usize)> {
        let (k, off, len) = self.locate(tensor, role)?;
        let (addr, _, cpu) = self.addrs[k];
        if !cpu {
            return Err(Error::unsupported("a CPU slice of GPU memory", "use tensor_addr with a GPU kernel"));
        }
        Ok(((addr + off as u64) as *mut u8, len))
    }

    /// A tensor's elements, when the device is CPU-addressable (the simulated device).
    pub fn slice<T: bytemuck::Pod>(&self, tensor: TensorId, role: Role) -> Result<&[T]> {
        let (ptr, len) = self.cpu_bytes(tensor, role)?;
        // SAFETY: the chunk is pinned on the device while this guard lives (compute flag), the
        // range lies inside its slot, and the slot's memory is CPU-addressable.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        bytemuck::try_cast_slice(bytes).map_err(|e| Error::unsupported("viewing the tensor with this element type", e.to_string()))
    }

    /// A tensor's elements for writing (the access must be `Mode::Write`).
    pub fn slice_mut<T: bytemuck::Pod>(&mut self, tensor: TensorId, role: Role) -> Result<&mut [T]> {
        if self.mode != Mode::Write {
            return Err(Error::InvalidState("writing through a read access".into()));
        }
        let (ptr, len) = self.cpu_bytes(tensor, role)?;
        // SAFETY: as in `slice`; `&mut self` and the chunk's exclusive compute flag (no other
        // access may hold it) make this the only view.
        let bytes = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        bytemuck::try_cast_slice_mut(bytes).map_err(|e| Error::unsupported("viewing the tensor with this element type", e.to_string()))
    }

    /// Whether the access may write its chunks.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether the chunks' memory is CPU-addressable (the simulated device) rather than GPU
    /// memory.
    pub fn cpu_addressable(&self) -> bool {
        self.addrs.iter().all(|a| a.2)
    }

    /// Every chunk of this access as bytes for writing, in access order (a parameter chunk with
    /// its gradient, master and moments for the optimizer); cast with `bytemuck`. Slots are
    /// aligned far beyond any element type.
    pub fn chunks_bytes_mut(&mut self) -> Result<Vec<&mut [u8]>> {
        if self.mode != Mode::Write {
            return Err(Error::InvalidState("writing through a read access".into()));
        }
        if !self.cpu_addressable() {
            return Err(Error::unsupported("a CPU slice of GPU memory", "use chunk() with a GPU kernel"));
        }
        Ok(self
            .addrs
            .iter()
            .map(|&(addr, len, _)| {
                // SAFETY: the chunks of one access are distinct slots (checked by `access`),
                // pinned on the device while this guard lives and CPU-addressable; `&mut self`
                // makes these the only views.
                unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
            })
            .collect())
    }

    /// Releases with the tensors in `HoldAfterBwd` (their gradients were produced).
    pub fn release_after_backward(mut self) {
        self.after_backward = true;
    }
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        self.mgr.release(self);
    }
}

