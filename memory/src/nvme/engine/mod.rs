//! I/O engines for the NVMe tier, behind one small trait, chosen by [`EngineKind`].
//!
//! An engine receives segment-sized requests and completes each exactly once through its
//! callback. The buffer of a request stays owned by the operation that submitted it until that
//! callback has run, whatever happens to the handles above.

mod faulty;
mod mmap;
mod psync;
mod uring;
mod workers;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use faulty::{Fault, FaultInjector};
pub(crate) use faulty::FaultyEngine;
pub(crate) use mmap::MmapEngine;
pub(crate) use psync::PsyncEngine;
pub(crate) use uring::UringEngine;

use super::file::SlotFile;
use crate::lane::SendPtr;

/// Which I/O engine moves chunks to and from NVMe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// io_uring: batched submission with a queue depth, registered buffers where allowed.
    Uring,
    /// pread/pwrite on a pool of threads.
    Psync,
    /// A shared memory mapping of each swap file, flushed with msync on write.
    Mmap,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Uring => "uring",
            EngineKind::Psync => "psync",
            EngineKind::Mmap => "mmap",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoKind {
    Read,
    Write,
}

pub(crate) type IoDone = Box<dyn FnOnce(io::Result<()>) + Send>;

/// One contiguous read or write.
pub(crate) struct IoRequest {
    pub kind: IoKind,
    pub file: Arc<SlotFile>,
    pub offset: u64,
    /// Valid for `len` bytes until `done` has run (the submitter's operation owns it).
    pub buf: SendPtr,
    pub len: usize,
    /// Background traffic (an optimizer update running beside other work): the io_uring
    /// engine keeps one such request in flight at a time while foreground requests are
    /// outstanding (see [`foreground`]); the other engines treat it like any other.
    pub background: bool,
    pub done: IoDone,
}

/// Foreground requests outstanding in this process, queued or in flight in any engine. The
/// managers of one process share its disks, so one model's background update yields to
/// another's fetches wherever their swap files are (a process with swap files on two disks
/// yields more than it needs to).
static FOREGROUND: AtomicUsize = AtomicUsize::new(0);

/// Counts `n` foreground requests as outstanding; each must be ended by
/// [`end_foreground`] once, when it completes.
pub(crate) fn begin_foreground(n: usize) {
    FOREGROUND.fetch_add(n, Ordering::AcqRel);
}

pub(crate) fn end_foreground() {
    // Saturating: a count can never go below zero, whatever the order of completions.
    let _ = FOREGROUND.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
}

/// Foreground requests outstanding now.
pub(crate) fn foreground() -> usize {
    FOREGROUND.load(Ordering::Acquire)
}

/// Requests of any kind outstanding in this process, and when one last began or ended (in
/// microseconds since [`epoch`]): what tells a swap file's background fill that the disks are
/// idle (see [`idle_for`]).
static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);
static LAST_ACTIVE_US: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn touch() {
    LAST_ACTIVE_US.fetch_max(epoch().elapsed().as_micros() as u64, Ordering::AcqRel);
}

/// Counts `n` requests (foreground or background) as outstanding; each ends with
/// [`end_request`].
pub(crate) fn begin_request(n: usize) {
    OUTSTANDING.fetch_add(n, Ordering::AcqRel);
    touch();
}

pub(crate) fn end_request() {
    let _ = OUTSTANDING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
    touch();
}

/// How long no request has been outstanding in this process: zero while one is.
pub(crate) fn idle_for() -> Duration {
    if OUTSTANDING.load(Ordering::Acquire) > 0 {
        return Duration::ZERO;
    }
    let last = LAST_ACTIVE_US.load(Ordering::Acquire);
    epoch().elapsed().saturating_sub(Duration::from_micros(last))
}

/// Requests an engine has submitted, by kind of buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineCounters {
    /// Requests using a registered (fixed) buffer.
    pub fixed: u64,
    /// Requests using an ordinary buffer.
    pub plain: u64,
}

/// What every engine provides.
pub(crate) trait IoEngine: Send + Sync {
    fn kind(&self) -> EngineKind;
    /// Queues the requests; each completes exactly once through its `done`.
    fn submit(&self, reqs: Vec<IoRequest>);
    /// A host region that future requests may use as their buffer (registration is optional).
    fn register_buffer(&self, _ptr: *mut u8, _len: usize) {}
    /// The region is about to be freed.
    fn unregister_buffer(&self, _ptr: *mut u8, _len: usize) {}
    /// Requests submitted so far.
    fn counters(&self) -> EngineCounters;
}

/// Adapts an engine to the host pool's arena notifications, for buffer registration.
pub(crate) struct RegisterHook(pub(crate) Arc<dyn IoEngine>);

impl crate::host::HostArenaHook for RegisterHook {
    fn arena_added(&self, ptr: *mut u8, len: usize) -> crate::Result<()> {
        self.0.register_buffer(ptr, len);
        Ok(())
    }
    fn arena_removed(&self, ptr: *mut u8, len: usize) {
        self.0.unregister_buffer(ptr, len);
    }
}
