//! io_uring engine: one reactor thread owns the ring, keeps up to `depth` requests in flight,
//! and is woken for new work through an eventfd read that stays armed in the ring.
//!
//! Host arenas are registered as fixed buffers (READ_FIXED/WRITE_FIXED) when the kernel and the
//! memlock limit allow; otherwise requests use plain READ/WRITE, with the reason logged once.
//!
//! Background requests (an optimizer update beside other work) wait in a queue of their own:
//! while any foreground request of the process is outstanding, one of them is in flight at a
//! time, else a quarter of the depth. A model's fetch then waits behind at most one background
//! segment instead of behind the other model's whole queue, and background work always
//! progresses. The disk's own scheduler cannot do this: it sees few enough requests that it
//! dispatches them all at once.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{opcode, types, IoUring};

use super::{EngineCounters, EngineKind, IoEngine, IoKind, IoRequest};
use crate::lane::SendPtr;
use crate::util::join_unless_self;

/// Fixed-buffer table size (a host pool rarely has more arenas than this).
const FIXED_SLOTS: u32 = 256;
/// The kernel's limit on one registered buffer.
const FIXED_MAX_LEN: usize = 1 << 30;
const WAKE: u64 = u64::MAX;

enum Msg {
    Io(IoRequest),
    Register(SendPtr, usize),
    Unregister(SendPtr),
}

pub(crate) struct UringEngine {
    tx: Option<Sender<Msg>>,
    wake: OwnedFd,
    reactor: Option<JoinHandle<()>>,
    counts: Arc<Counts>,
}

/// Submissions by buffer kind, written by the reactor.
#[derive(Default)]
struct Counts {
    fixed: AtomicU64,
    plain: AtomicU64,
    /// The most background requests seen in flight while foreground ones were outstanding.
    #[cfg(test)]
    background_peak_beside_foreground: std::sync::atomic::AtomicUsize,
}

impl UringEngine {
    /// Sets up a ring for `depth` requests in flight. Fails where io_uring is unavailable
    /// (old kernel, seccomp), so the caller can fall back.
    pub(crate) fn new(depth: u32) -> io::Result<Self> {
        let depth = depth.clamp(1, 4096);
        let ring: IoUring = IoUring::builder().build((depth + 1).next_power_of_two())?;
        let fixed = match ring.submitter().register_buffers_sparse(FIXED_SLOTS) {
            Ok(()) => true,
            Err(e) => {
                log::info!("io_uring: no registered buffers ({e}); using plain reads and writes");
                false
            }
        };
        // SAFETY: eventfd has no memory preconditions; the fd is owned below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake_fd = wake.as_raw_fd();
        let counts = Arc::new(Counts::default());
        let reactor_counts = counts.clone();
        let reactor = std::thread::Builder::new()
            .name("stowage-uring".into())
            .spawn(move || Reactor::new(ring, rx, wake_fd, depth as usize, fixed, reactor_counts).run())?;
        Ok(UringEngine {
            tx: Some(tx),
            wake,
            reactor: Some(reactor),
            counts,
        })
    }

    fn send(&self, msgs: impl IntoIterator<Item = Msg>) {
        let tx = self.tx.as_ref().expect("sender lives until drop");
        for m in msgs {
            // The reactor exits only after the sender is dropped.
            let _ = tx.send(m);
        }
        self.kick();
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }
}

impl IoEngine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn submit(&self, reqs: Vec<IoRequest>) {
        self.send(reqs.into_iter().map(Msg::Io));
    }

    fn register_buffer(&self, ptr: *mut u8, len: usize) {
        self.send([Msg::Register(SendPtr(ptr), len)]);
    }

    fn unregister_buffer(&self, ptr: *mut u8, _len: usize) {
        self.send([Msg::Unregister(SendPtr(ptr))]);
    }

    fn counters(&self) -> EngineCounters {
        EngineCounters {
            fixed: self.counts.fixed.load(Ordering::Relaxed),
            plain: self.counts.plain.load(Ordering::Relaxed),
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        drop(self.tx.take());
        self.kick();
        if let Some(r) = self.reactor.take() {
            join_unless_self(r);
        }
    }
}

struct InFlight {
    req: IoRequest,
    /// Bytes already transferred (a short read or write is resubmitted for the rest).
    done: usize,
}

struct Reactor {
    ring: IoUring,
    rx: Receiver<Msg>,
    wake_fd: i32,
    /// The eventfd counter is read into this; boxed so its address is stable.
    wake_buf: Box<[u8; 8]>,
    wake_armed: bool,
    depth: usize,
    fixed_ok: bool,
    /// Registered regions: (start, len, index).
    fixed: Vec<(usize, usize, u16)>,
    slab: Vec<Option<InFlight>>,
    free_ids: Vec<usize>,
    in_flight: usize,
    pending: VecDeque<InFlight>,
    /// Background requests not yet submitted.
    held: VecDeque<InFlight>,
    /// Background requests in flight, and the most there may be while the foreground is idle.
    background_in_flight: usize,
    background_depth: usize,
    closing: bool,
    counts: Arc<Counts>,
}

impl Reactor {
    fn new(ring: IoUring, rx: Receiver<Msg>, wake_fd: i32, depth: usize, fixed_ok: bool, counts: Arc<Counts>) -> Self {
        Reactor {
            ring,
            rx,
            wake_fd,
            wake_buf: Box::new([0; 8]),
            wake_armed: false,
            depth,
            fixed_ok,
            fixed: Vec::new(),
            slab: Vec::new(),
            free_ids: Vec::new(),
            in_flight: 0,
            pending: VecDeque::new(),
            held: VecDeque::new(),
            background_in_flight: 0,
            background_depth: (depth / 4).max(1),
            closing: false,
            counts,
        }
    }

    fn run(mut self) {
        loop {
            self.drain_messages();
            self.fill();
            if !self.wake_armed && !self.closing {
                self.arm_wake();
            }
            // Held requests never wait for nothing: while any is held, one of them is in flight
            // (see `next`), and its completion wakes the reactor.
            if self.closing && self.in_flight == 0 && self.pending.is_empty() && self.held.is_empty() && !self.wake_armed {
                return;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)) => {}
                Err(e) => {
                    log::error!("io_uring submit failed: {e}; failing queued requests");
                    self.fail_everything(e);
                    return;
                }
            }
            self.reap();
        }
    }

    fn drain_messages(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Io(req)) if req.background => self.held.push_back(InFlight { req, done: 0 }),
                Ok(Msg::Io(req)) => self.pending.push_back(InFlight { req, done: 0 }),
                Ok(Msg::Register(ptr, len)) => self.register(ptr.0 as usize, len),
                Ok(Msg::Unregister(ptr)) => self.unregister(ptr.0 as usize),
                Err(TryRecvError::Empty) => return,
                Err(TryRecvError::Disconnected) => {
                    self.closing = true;
                    return;
                }
            }
        }
    }

    fn register(&mut self, start: usize, len: usize) {
        if !self.fixed_ok || len > FIXED_MAX_LEN {
            return;
        }
        let used: Vec<u16> = self.fixed.iter().map(|f| f.2).collect();
        let Some(index) = (0..FIXED_SLOTS as u16).find(|i| !used.contains(i)) else {
            return;
        };
        let iov = libc::iovec {
            iov_base: start as *mut libc::c_void,
            iov_len: len,
        };
        // SAFETY: the region is a live host arena; the host pool sends Unregister (processed in
        // order, before any later reuse of the address) before it frees the arena.
        match unsafe { self.ring.submitter().register_buffers_update(index as u32, &[iov], None) } {
            Ok(()) => self.fixed.push((start, len, index)),
            Err(e) => {
                log::info!("io_uring: registering a {len}-byte buffer failed ({e}); using plain reads and writes");
                self.fixed_ok = false;
            }
        }
    }

    fn unregister(&mut self, start: usize) {
        if let Some(pos) = self.fixed.iter().position(|f| f.0 == start) {
            let (_, _, index) = self.fixed.swap_remove(pos);
            let iov = libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            };
            // SAFETY: an empty entry clears the table slot; no buffer is referenced.
            let _ = unsafe { self.ring.submitter().register_buffers_update(index as u32, &[iov], None) };
        }
    }

    fn fixed_index(&self, ptr: usize, len: usize) -> Option<u16> {
        self.fixed
            .iter()
            .find(|&&(s, l, _)| ptr >= s && ptr + len <= s + l)
            .map(|f| f.2)
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(types::Fd(self.wake_fd), self.wake_buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: the eventfd and `wake_buf` live as long as the reactor, and the reactor does
        // not return while this read is armed (see `run`).
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            self.wake_armed = true;
        }
    }

    /// The next request to submit: foreground ones first, then a background one while fewer
    /// than its limit are in flight (one while the process has foreground requests outstanding).
    fn next(&mut self) -> Option<InFlight> {
        if let Some(op) = self.pending.pop_front() {
            return Some(op);
        }
        let foreground = super::foreground() > 0;
        let limit = if foreground && !self.closing { 1 } else { self.background_depth };
        if self.held.is_empty() || self.background_in_flight >= limit {
            return None;
        }
        #[cfg(test)]
        if foreground {
            self.counts.background_peak_beside_foreground.fetch_max(self.background_in_flight + 1, Ordering::Relaxed);
        }
        self.held.pop_front()
    }

    /// Moves pending requests into the ring up to the queue depth.
    fn fill(&mut self) {
        while self.in_flight < self.depth {
            let Some(op) = self.next() else { return };
            let fd = types::Fd(op.req.file.raw_fd());
            // SAFETY: `done < len`, so the pointer stays inside the request's buffer.
            let ptr = unsafe { op.req.buf.0.add(op.done) };
            let len = (op.req.len - op.done) as u32;
            let offset = op.req.offset + op.done as u64;
            let fixed = self.fixed_index(ptr as usize, len as usize);
            let entry = match (op.req.kind, fixed) {
                (IoKind::Read, Some(i)) => opcode::ReadFixed::new(fd, ptr, len, i).offset(offset).build(),
                (IoKind::Read, None) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
                (IoKind::Write, Some(i)) => opcode::WriteFixed::new(fd, ptr, len, i).offset(offset).build(),
                (IoKind::Write, None) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
            };
            let id = self.free_ids.pop().unwrap_or_else(|| {
                self.slab.push(None);
                self.slab.len() - 1
            });
            let entry = entry.user_data(id as u64);
            // SAFETY: the request (its file and the operation owning its buffer) is kept in the
            // slab until its completion is reaped, so fd and buffer outlive the kernel's use.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                // The ring is full (cannot happen: entries exceed depth + 1); retry later.
                self.free_ids.push(id);
                if op.req.background {
                    self.held.push_front(op);
                } else {
                    self.pending.push_front(op);
                }
                return;
            }
            self.background_in_flight += op.req.background as usize;
            self.slab[id] = Some(op);
            self.in_flight += 1;
            let counter = if fixed.is_some() { &self.counts.fixed } else { &self.counts.plain };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reap(&mut self) {
        let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (id, res) in cqes {
            if id == WAKE {
                self.wake_armed = false;
                continue;
            }
            let Some(mut op) = self.slab[id as usize].take() else { continue };
            self.free_ids.push(id as usize);
            self.in_flight -= 1;
            self.background_in_flight -= op.req.background as usize;
            if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                if matches!(-res, libc::EINTR | libc::EAGAIN) {
                    self.pending.push_front(op);
                } else {
                    (op.req.done)(Err(e));
                }
                continue;
            }
            if res == 0 {
                let e = match op.req.kind {
                    IoKind::Read => io::Error::new(io::ErrorKind::UnexpectedEof, "short read: end of swap file"),
                    IoKind::Write => io::Error::new(io::ErrorKind::WriteZero, "write made no progress"),
                };
                (op.req.done)(Err(e));
                continue;
            }
            op.done += res as usize;
            if op.done < op.req.len {
                self.pending.push_front(op);
            } else {
                (op.req.done)(Ok(()));
            }
        }
    }

    fn fail_everything(&mut self, e: io::Error) {
        // Requests still in the kernel cannot be failed safely (their buffers are in use); only
        // queued ones are. This path is reached only when the ring itself is broken.
        for op in self.pending.drain(..).chain(self.held.drain(..)) {
            (op.req.done)(Err(io::Error::new(e.kind(), e.to_string())));
        }
        // Keep in-flight requests (and their buffers) alive for the rest of the process.
        std::mem::forget(std::mem::take(&mut self.slab));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::file::SlotFile;
    use std::time::Duration;

    fn scratch() -> tempfile::TempDir {
        let base = std::env::var("STOWAGE_SCRATCH").unwrap_or_else(|_| "/var/tmp".into());
        tempfile::Builder::new().prefix("stowage-uring").tempdir_in(base).unwrap()
    }

    /// A 4 KiB write of `buf` at `offset`, reporting its completion on `tx`.
    fn write(file: &Arc<SlotFile>, buf: &mut [u8], offset: u64, background: bool, tx: crossbeam_channel::Sender<io::Result<()>>) -> IoRequest {
        IoRequest {
            kind: IoKind::Write,
            file: file.clone(),
            offset,
            buf: SendPtr(buf.as_mut_ptr()),
            len: buf.len(),
            background,
            done: Box::new(move |r| {
                let _ = tx.send(r);
            }),
        }
    }

    #[test]
    fn background_requests_go_one_at_a_time_beside_foreground_ones_and_all_complete() {
        let dir = scratch();
        let file = Arc::new(SlotFile::create(&dir.path().join("f"), 1 << 20, false).unwrap());
        let engine = UringEngine::new(8).unwrap();
        let mut bufs: Vec<Vec<u8>> = (0..9).map(|i| vec![i as u8 + 1; 4096]).collect();
        let (tx, rx) = crossbeam_channel::unbounded();
        let peak = || engine.counts.background_peak_beside_foreground.load(Ordering::Relaxed);

        // A foreground request of the process is outstanding (counted as `Nvme` counts one):
        // eight background writes go through one at a time, and all of them complete.
        super::super::begin_foreground(1);
        let reqs = bufs[..8].iter_mut().enumerate().map(|(i, b)| write(&file, b, 4096 * i as u64, true, tx.clone())).collect();
        engine.submit(reqs);
        for _ in 0..8 {
            rx.recv_timeout(Duration::from_secs(10)).expect("background writes progress beside the foreground").unwrap();
        }
        assert_eq!(peak(), 1, "one background request in flight at a time beside the foreground");
        super::super::end_foreground();
        // Foreground requests are not held back.
        engine.submit(vec![write(&file, &mut bufs[8], 8 * 4096, false, tx.clone())]);
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        let mut back = vec![0u8; 9 * 4096];
        std::os::unix::fs::FileExt::read_exact_at(file.file(), &mut back, 0).unwrap();
        assert!(back.chunks(4096).enumerate().all(|(i, c)| c.iter().all(|&b| b == i as u8 + 1)), "every write landed");
    }
}
