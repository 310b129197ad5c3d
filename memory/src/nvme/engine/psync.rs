//! pread/pwrite on a pool of threads.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::workers::{BlockingIo, Workers};
use super::{EngineCounters, EngineKind, IoEngine, IoKind, IoRequest};

struct Psync;

impl BlockingIo for Psync {
    fn run(&self, req: &IoRequest) -> io::Result<()> {
        let file = req.file.file();
        match req.kind {
            IoKind::Write => {
                // SAFETY: the submitter keeps `buf` valid and unaliased for `len` bytes until
                // `done` runs, which is after this call.
                let buf = unsafe { std::slice::from_raw_parts(req.buf.0 as *const u8, req.len) };
                file.write_all_at(buf, req.offset)
            }
            IoKind::Read => {
                // SAFETY: as above, and the buffer is reserved for this read alone.
                let buf = unsafe { std::slice::from_raw_parts_mut(req.buf.0, req.len) };
                file.read_exact_at(buf, req.offset)
            }
        }
    }
}

pub(crate) struct PsyncEngine(Workers);

impl PsyncEngine {
    pub(crate) fn new(threads: usize) -> io::Result<Self> {
        Ok(PsyncEngine(Workers::new("psync", threads, Arc::new(Psync))?))
    }
}

impl IoEngine for PsyncEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Psync
    }
    fn submit(&self, reqs: Vec<IoRequest>) {
        self.0.submit(reqs)
    }
    fn counters(&self) -> EngineCounters {
        self.0.counters()
    }
}
