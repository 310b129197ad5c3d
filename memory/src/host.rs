//! Host memory arenas: page-aligned regions for the host tier and the simulated device.
//!
//! The host tier's arenas are announced to hooks as they come and go: the CUDA module
//! page-locks them (so copies to the GPU are truly asynchronous and the CPU optimizer can still
//! read them at full speed, unlike write-combined memory), and the io_uring engine registers
//! them as fixed buffers.

use std::alloc::Layout;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::pool::ArenaBackend;
use crate::tier::Tier;

/// Something that wants to know about host arenas (page-locking, I/O buffer registration).
pub(crate) trait HostArenaHook: Send + Sync {
    /// A new arena at `ptr` of `len` bytes. An error fails the arena's allocation.
    fn arena_added(&self, ptr: *mut u8, len: usize) -> Result<()>;
    /// The arena is about to be freed.
    fn arena_removed(&self, ptr: *mut u8, len: usize);
}

/// Page-aligned, zero-initialised host memory.
pub(crate) struct HostArenas {
    tier: Tier,
    align: usize,
    hooks: Vec<Arc<dyn HostArenaHook>>,
}

impl HostArenas {
    /// `align` is rounded up to the page size (and to a power of two).
    pub(crate) fn new(tier: Tier, align: usize, hooks: Vec<Arc<dyn HostArenaHook>>) -> Self {
        let align = align.max(page_size()).next_power_of_two();
        HostArenas { tier, align, hooks }
    }

    fn layout(&self, bytes: usize) -> Result<Layout> {
        Layout::from_size_align(bytes, self.align).map_err(|e| Error::Alloc {
            tier: self.tier,
            bytes: bytes as u64,
            reason: e.to_string(),
        })
    }
}

impl HostArenas {
    /// Anonymous mappings are page-aligned and zero-filled, and unmapping gives the pages back to
    /// the system at once, whatever their size (the allocator keeps freed blocks below its mmap
    /// threshold in its heap, where they still count as resident).
    fn mapped(&self) -> bool {
        self.align <= page_size()
    }
}

impl ArenaBackend for HostArenas {
    fn alloc_arena(&self, _id: u32, bytes: usize) -> Result<u64> {
        let ptr = if self.mapped() {
            // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
            let p = unsafe {
                libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
            };
            if p == libc::MAP_FAILED {
                return Err(Error::Alloc {
                    tier: self.tier,
                    bytes: bytes as u64,
                    reason: format!("mmap: {}", std::io::Error::last_os_error()),
                });
            }
            p as *mut u8
        } else {
            let layout = self.layout(bytes)?;
            // SAFETY: `layout` has a non-zero size (pools never ask for empty arenas).
            let p = unsafe { std::alloc::alloc_zeroed(layout) };
            if p.is_null() {
                return Err(Error::Alloc {
                    tier: self.tier,
                    bytes: bytes as u64,
                    reason: "the system allocator refused".into(),
                });
            }
            p
        };
        for (i, hook) in self.hooks.iter().enumerate() {
            if let Err(e) = hook.arena_added(ptr, bytes) {
                for h in &self.hooks[..i] {
                    h.arena_removed(ptr, bytes);
                }
                self.release(ptr, bytes);
                return Err(e);
            }
        }
        Ok(ptr as u64)
    }

    fn free_arena(&self, _id: u32, base: u64, bytes: usize) {
        let ptr = base as *mut u8;
        for h in self.hooks.iter().rev() {
            h.arena_removed(ptr, bytes);
        }
        self.release(ptr, bytes);
    }

    fn host_addressable(&self) -> bool {
        true
    }
}

impl HostArenas {
    /// Gives back a region obtained by `alloc_arena`.
    fn release(&self, ptr: *mut u8, bytes: usize) {
        if self.mapped() {
            // SAFETY: `ptr` is a mapping of `bytes` made by `alloc_arena`, and the pool frees an
            // arena only when none of its slots is held, so nothing refers to it any more.
            unsafe { libc::munmap(ptr.cast(), bytes) };
        } else {
            let layout = self.layout(bytes).expect("the layout was valid when allocated");
            // SAFETY: `ptr` came from `alloc_zeroed` with this layout, and nothing refers to it
            // any more (as above).
            unsafe { std::alloc::dealloc(ptr, layout) };
        }
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
