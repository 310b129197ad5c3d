//! Fault injection for the NVMe tier: fails chosen requests with a chosen errno before they
//! reach the disk. Used by tests to prove that faults give the documented error, never wrong data.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{EngineCounters, EngineKind, IoEngine, IoKind, IoRequest};

/// One planned fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Which requests it applies to.
    pub kind: IoKind,
    /// The errno the request fails with (e.g. `libc::ENOSPC`, `libc::EIO`).
    pub errno: i32,
    /// How many more matching requests fail; `None`: all of them until cleared.
    pub remaining: Option<u64>,
}

/// A handle on the faults an NVMe tier injects; clone it, give one to the tier's config and
/// keep the other to arm faults.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    faults: Arc<Mutex<Vec<Fault>>>,
    injected: Arc<AtomicU64>,
}

impl FaultInjector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The next `count` requests of `kind` fail with `errno`.
    pub fn fail_next(&self, kind: IoKind, errno: i32, count: u64) {
        self.lock().push(Fault {
            kind,
            errno,
            remaining: Some(count),
        });
    }

    /// Every request of `kind` fails with `errno` until [`FaultInjector::clear`].
    pub fn fail_all(&self, kind: IoKind, errno: i32) {
        self.lock().push(Fault {
            kind,
            errno,
            remaining: None,
        });
    }

    /// Removes every planned fault.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many requests were failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Fault>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The errno to fail this request with, if any, consuming one planned fault.
    fn take(&self, kind: IoKind) -> Option<i32> {
        let mut faults = self.lock();
        let i = faults.iter().position(|f| f.kind == kind)?;
        let errno = faults[i].errno;
        if let Some(n) = faults[i].remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                faults.remove(i);
            }
        }
        self.injected.fetch_add(1, Ordering::Relaxed);
        Some(errno)
    }
}

/// Wraps an engine, failing the requests the injector says.
pub(crate) struct FaultyEngine {
    inner: Arc<dyn IoEngine>,
    faults: FaultInjector,
}

impl FaultyEngine {
    pub(crate) fn new(inner: Arc<dyn IoEngine>, faults: FaultInjector) -> Self {
        FaultyEngine { inner, faults }
    }
}

impl IoEngine for FaultyEngine {
    fn kind(&self) -> EngineKind {
        self.inner.kind()
    }

    fn submit(&self, reqs: Vec<IoRequest>) {
        let mut pass = Vec::with_capacity(reqs.len());
        for r in reqs {
            match self.faults.take(r.kind) {
                Some(errno) => (r.done)(Err(io::Error::from_raw_os_error(errno))),
                None => pass.push(r),
            }
        }
        if !pass.is_empty() {
            self.inner.submit(pass);
        }
    }

    fn register_buffer(&self, ptr: *mut u8, len: usize) {
        self.inner.register_buffer(ptr, len)
    }

    fn unregister_buffer(&self, ptr: *mut u8, len: usize) {
        self.inner.unregister_buffer(ptr, len)
    }

    fn counters(&self) -> EngineCounters {
        self.inner.counters()
    }
}
