//! Copy lanes: a worker thread that copies between CPU-addressable buffers in submission order,
//! optionally paced to a bandwidth. The simulated device uses one lane per direction, as a GPU
//! uses one copy engine per direction.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::error::Result;

/// Called once when an asynchronous operation finishes.
pub(crate) type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// A raw pointer that may cross threads; whoever builds one vouches for the buffer's lifetime.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SendPtr(pub *mut u8);
// SAFETY: a SendPtr is only built for buffers owned by an in-flight operation, which keeps them
// alive and untouched by anyone else until the operation's completion runs.
unsafe impl Send for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the whole `SendPtr`, not its field).
    pub(crate) fn get(self) -> *mut u8 {
        self.0
    }
}

struct Job {
    src: SendPtr,
    dst: SendPtr,
    len: usize,
    done: Done,
}

/// One copy worker.
pub(crate) struct Lane {
    tx: Option<Sender<Job>>,
    worker: Option<JoinHandle<()>>,
}

impl Lane {
    /// `bytes_per_s`: pace copies to this bandwidth (None: as fast as memcpy goes).
    pub(crate) fn new(name: &str, bytes_per_s: Option<f64>) -> Self {
        let (tx, rx) = crossbeam_channel::unbounded();
        let worker = std::thread::Builder::new()
            .name(format!("stowage-{name}"))
            .spawn(move || run(rx, bytes_per_s))
            .expect("spawning a copy lane thread");
        Lane {
            tx: Some(tx),
            worker: Some(worker),
        }
    }

    /// Copies `len` bytes from `src` to `dst`, then calls `done`.
    ///
    /// # Safety
    /// Both buffers must be valid for `len` bytes, must not overlap, and must stay alive and
    /// untouched by anyone else until `done` has been called.
    pub(crate) unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize, done: Done) {
        let job = Job {
            src: SendPtr(src as *mut u8),
            dst: SendPtr(dst),
            len,
            done,
        };
        if let Some(tx) = &self.tx {
            // The worker only exits after the sender is dropped, in Drop.
            let _ = tx.send(job);
        }
    }
}

fn run(rx: Receiver<Job>, bytes_per_s: Option<f64>) {
    for job in rx {
        let start = Instant::now();
        // SAFETY: `Lane::copy`'s contract: both buffers valid, disjoint, and reserved for this
        // job until `done` runs below.
        unsafe { std::ptr::copy_nonoverlapping(job.src.0 as *const u8, job.dst.0, job.len) };
        if let Some(bw) = bytes_per_s {
            let due = Duration::from_secs_f64(job.len as f64 / bw);
            let spent = start.elapsed();
            if due > spent {
                std::thread::sleep(due - spent);
            }
        }
        (job.done)(Ok(()));
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            crate::util::join_unless_self(w);
        }
    }
}
