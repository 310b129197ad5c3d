//! A shared mapping of each swap file. Writes are flushed with msync before they complete, so
//! a completed write is on the disk as with the other engines; reads may be served from the
//! page cache.

use std::io;
use std::sync::Arc;

use super::workers::{BlockingIo, Workers};
use super::{EngineCounters, EngineKind, IoEngine, IoKind, IoRequest};

struct Mmap;

impl BlockingIo for Mmap {
    fn run(&self, req: &IoRequest) -> io::Result<()> {
        let map = req.file.map()?;
        let end = req.offset as usize + req.len;
        if end > map.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "request past the end of the swap file"));
        }
        // SAFETY: the range lies inside the mapping (checked above); the file is never
        // truncated while mapped; `buf` is valid and reserved for this request until `done`.
        unsafe {
            let at = map.as_mut_ptr().add(req.offset as usize);
            match req.kind {
                IoKind::Write => std::ptr::copy_nonoverlapping(req.buf.0 as *const u8, at, req.len),
                IoKind::Read => std::ptr::copy_nonoverlapping(at as *const u8, req.buf.0, req.len),
            }
        }
        if req.kind == IoKind::Write {
            map.flush_range(req.offset as usize, req.len)?;
        }
        Ok(())
    }
}

pub(crate) struct MmapEngine(Workers);

impl MmapEngine {
    pub(crate) fn new(threads: usize) -> io::Result<Self> {
        Ok(MmapEngine(Workers::new("mmap", threads, Arc::new(Mmap))?))
    }
}

impl IoEngine for MmapEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Mmap
    }
    fn submit(&self, reqs: Vec<IoRequest>) {
        self.0.submit(reqs)
    }
    fn counters(&self) -> EngineCounters {
        self.0.counters()
    }
}
