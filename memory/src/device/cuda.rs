//! The CUDA device tier: GPU memory arenas, page-locking of host arenas, and asynchronous
//! copies on dedicated non-blocking streams (one per direction, so both copy engines work at
//! once) that complete through events.
//!
//! libcuda is loaded at run time. [`Cuda::probe`] checks that the library exists before the
//! first driver call, so a machine without CUDA gets [`Error::NoCuda`], never a panic.

use std::ffi::c_void;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use cudarc::driver::{result, sys};

use crate::error::{Error, Result};
use crate::host::HostArenaHook;
use crate::lane::Done;
use crate::pool::ArenaBackend;
use crate::tier::Tier;
use crate::util::join_unless_self;

fn cuda_err(call: &'static str, e: result::DriverError) -> Error {
    Error::Cuda {
        call,
        reason: format!("{e:?}"),
    }
}

/// Facts about the GPU in use.
#[derive(Debug, Clone)]
pub struct CudaInfo {
    pub ordinal: usize,
    pub name: String,
    pub total_bytes: u64,
}

struct Event(sys::CUevent);
// SAFETY: a CUDA event handle may be used from any thread once its context is current there.
unsafe impl Send for Event {}

struct CopyStream {
    stream: sys::CUstream,
    tx: Option<Sender<(Event, Done)>>,
    poller: Option<JoinHandle<()>>,
}

struct Inner {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    info: CudaInfo,
    h2d: CopyStream,
    d2h: CopyStream,
}

// SAFETY: CUDA driver handles (context, streams) are process-wide and thread-safe; every call
// through them first makes the context current on the calling thread.
unsafe impl Send for Inner {}
// SAFETY: as above; `Inner` has no interior mutability of its own.
unsafe impl Sync for Inner {}

/// A handle on one GPU, shared by the device pool, the host pinning hook and the copy paths.
#[derive(Clone)]
pub(crate) struct Cuda(Arc<Inner>);

impl Cuda {
    /// Opens GPU `ordinal`, or says why it cannot.
    pub(crate) fn probe(ordinal: usize) -> Result<Self> {
        // SAFETY: only tries to load the library; makes no driver call.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::NoCuda {
                reason: "libcuda.so (the NVIDIA driver library) was not found".into(),
            });
        }
        result::init().map_err(|e| Error::NoCuda {
            reason: format!("cuInit failed: {e:?}"),
        })?;
        let count = result::device::get_count().map_err(|e| cuda_err("cuDeviceGetCount", e))?;
        if count <= 0 {
            return Err(Error::NoCuda {
                reason: "the driver reports no CUDA device".into(),
            });
        }
        if ordinal >= count as usize {
            return Err(Error::NoCuda {
                reason: format!("device {ordinal} requested but only {count} present"),
            });
        }
        let dev = result::device::get(ordinal as i32).map_err(|e| cuda_err("cuDeviceGet", e))?;
        // SAFETY: `dev` was returned by cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| cuda_err("cuDevicePrimaryCtxRetain", e))?;
        // SAFETY: `ctx` is a live primary context.
        unsafe { result::ctx::set_current(ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))?;
        let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: `dev` was returned by cuDeviceGet.
        let total = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
        let h2d = CopyStream::new(ctx, "h2d")?;
        let d2h = CopyStream::new(ctx, "d2h")?;
        Ok(Cuda(Arc::new(Inner {
            dev,
            ctx,
            info: CudaInfo {
                ordinal,
                name,
                total_bytes: total as u64,
            },
            h2d,
            d2h,
        })))
    }

    pub(crate) fn info(&self) -> &CudaInfo {
        &self.0.info
    }

    /// Free and total bytes of the GPU as the driver reports them now.
    pub(crate) fn mem_info(&self) -> Result<(u64, u64)> {
        self.bind()?;
        let (free, total) = result::mem_get_info().map_err(|e| cuda_err("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context lives as long as `self`.
        unsafe { result::ctx::set_current(self.0.ctx) }.map_err(|e| cuda_err("cuCtxSetCurrent", e))
    }

    /// Host to device copy.
    ///
    /// # Safety
    /// `src` must be page-locked host memory valid for `len` bytes and `dst` device memory valid
    /// for `len` bytes; both stay reserved for this copy until `done` runs.
    pub(crate) unsafe fn copy_h2d(&self, src: *const u8, dst: u64, len: usize, done: Done) {
        let r = self.bind().and_then(|()| {
            // SAFETY: the caller's contract covers both buffers.
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, len, self.0.h2d.stream) }
                .result()
                .map_err(|e| cuda_err("cuMemcpyHtoDAsync", e))
        });
        self.0.h2d.complete(r, done);
    }

    /// Device to host copy.
    ///
    /// # Safety
    /// As for [`Cuda::copy_h2d`], with the directions swapped.
    pub(crate) unsafe fn copy_d2h(&self, src: u64, dst: *mut u8, len: usize, done: Done) {
        let r = self.bind().and_then(|()| {
            // SAFETY: the caller's contract covers both buffers.
            unsafe { sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, self.0.d2h.stream) }
                .result()
                .map_err(|e| cuda_err("cuMemcpyDtoHAsync", e))
        });
        self.0.d2h.complete(r, done);
    }

    /// Device to device copy.
    ///
    /// # Safety
    /// Both must be device allocations valid for `len` bytes, reserved until `done` runs.
    pub(crate) unsafe fn copy_d2d(&self, src: u64, dst: u64, len: usize, done: Done) {
        let r = self.bind().and_then(|()| {
            // SAFETY: the caller's contract covers both buffers.
            unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, len, self.0.h2d.stream) }
                .result()
                .map_err(|e| cuda_err("cuMemcpyDtoDAsync", e))
        });
        self.0.h2d.complete(r, done);
    }
}

impl CopyStream {
    fn new(ctx: sys::CUcontext, name: &str) -> Result<Self> {
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking)
            .map_err(|e| cuda_err("cuStreamCreate", e))?;
        let (tx, rx) = crossbeam_channel::unbounded::<(Event, Done)>();
        let ctx_addr = ctx as usize;
        let poller = std::thread::Builder::new()
            .name(format!("stowage-cuda-{name}"))
            .spawn(move || {
                let ctx = ctx_addr as sys::CUcontext;
                // SAFETY: the context outlives this thread: Inner joins it before releasing.
                let bound = unsafe { result::ctx::set_current(ctx) };
                // Events complete in stream order, so waiting on each in turn loses nothing.
                for (ev, done) in rx {
                    let r = bound
                        // SAFETY: `ev` was created and recorded by `complete` and is destroyed
                        // only here, after the wait.
                        .and_then(|()| unsafe { result::event::synchronize(ev.0) })
                        .map_err(|e| cuda_err("cuEventSynchronize", e));
                    // SAFETY: as above; no one else holds this event.
                    let _ = unsafe { result::event::destroy(ev.0) };
                    done(r);
                }
            })
            .map_err(|e| Error::unsupported("starting a CUDA copy thread", e.to_string()))?;
        Ok(CopyStream {
            stream,
            tx: Some(tx),
            poller: Some(poller),
        })
    }

    /// Records an event after the enqueued copy and hands it to the poller; on an enqueue
    /// error, completes at once.
    fn complete(&self, enqueued: Result<()>, done: Done) {
        let ev = enqueued.and_then(|()| {
            let ev = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| cuda_err("cuEventCreate", e))?;
            // SAFETY: `ev` and the stream are live handles of the current context.
            match unsafe { result::event::record(ev, self.stream) } {
                Ok(()) => Ok(ev),
                Err(e) => {
                    // SAFETY: `ev` was just created and is not shared.
                    let _ = unsafe { result::event::destroy(ev) };
                    Err(cuda_err("cuEventRecord", e))
                }
            }
        });
        match (ev, &self.tx) {
            (Ok(ev), Some(tx)) => {
                if let Err(crossbeam_channel::SendError((ev, done))) = tx.send((Event(ev), done)) {
                    // The poller is gone only while shutting down; wait here instead.
                    // SAFETY: the event is live and owned here.
                    let r = unsafe { result::event::synchronize(ev.0) }.map_err(|e| cuda_err("cuEventSynchronize", e));
                    // SAFETY: owned here, waited on above.
                    let _ = unsafe { result::event::destroy(ev.0) };
                    done(r);
                }
            }
            (Ok(_), None) => unreachable!("the sender lives until drop"),
            (Err(e), _) => done(Err(e)),
        }
    }

    fn shutdown(&mut self) {
        drop(self.tx.take());
        if let Some(p) = self.poller.take() {
            join_unless_self(p);
        }
        // SAFETY: the stream is no longer used: its poller has drained every event.
        let _ = unsafe { result::stream::destroy(self.stream) };
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: the context is still retained here.
        let _ = unsafe { result::ctx::set_current(self.ctx) };
        self.h2d.shutdown();
        self.d2h.shutdown();
        // SAFETY: `dev` came from cuDeviceGet and we hold one retain on its primary context.
        let _ = unsafe { result::primary_ctx::release(self.dev) };
    }
}

/// GPU memory arenas.
pub(crate) struct CudaArenas(pub(crate) Cuda);

impl ArenaBackend for CudaArenas {
    fn alloc_arena(&self, _id: u32, bytes: usize) -> Result<u64> {
        self.0.bind()?;
        // SAFETY: the context is current; the allocation is freed in `free_arena`.
        unsafe { result::malloc_sync(bytes) }.map_err(|e| Error::Alloc {
            tier: Tier::Device,
            bytes: bytes as u64,
            reason: format!("cuMemAlloc: {e:?}"),
        })
    }

    fn free_arena(&self, _id: u32, base: u64, _bytes: usize) {
        if self.0.bind().is_ok() {
            // SAFETY: `base` came from cuMemAlloc and no slot of it is held any more, so no copy
            // refers to it.
            let _ = unsafe { result::free_sync(base) };
        }
    }

    fn host_addressable(&self) -> bool {
        false
    }
}

/// Page-locks host arenas (cuMemHostRegister: ordinary cached memory, fast for the CPU to
/// read, unlike the write-combined memory of cuMemHostAlloc's default in some wrappers).
pub(crate) struct CudaPinner(pub(crate) Cuda);

impl HostArenaHook for CudaPinner {
    fn arena_added(&self, ptr: *mut u8, len: usize) -> Result<()> {
        self.0.bind()?;
        // SAFETY: `ptr..ptr+len` is a live page-aligned allocation that is unregistered in
        // `arena_removed` before it is freed.
        unsafe { sys::cuMemHostRegister_v2(ptr as *mut c_void, len, sys::CU_MEMHOSTREGISTER_PORTABLE) }
            .result()
            .map_err(|e| Error::Alloc {
                tier: Tier::Host,
                bytes: len as u64,
                reason: format!("cuMemHostRegister (page-locking) failed: {e:?}"),
            })
    }

    fn arena_removed(&self, ptr: *mut u8, _len: usize) {
        if self.0.bind().is_ok() {
            // SAFETY: registered in `arena_added`; no copy uses it (no slot of it is held).
            let _ = unsafe { sys::cuMemHostUnregister(ptr as *mut c_void) };
        }
    }
}
