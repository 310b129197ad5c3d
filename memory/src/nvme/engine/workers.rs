//! A pool of threads running blocking I/O calls: the shared body of the psync and mmap engines.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Sender;

use super::{EngineCounters, IoRequest};
use crate::util::join_unless_self;

/// A blocking implementation of one request.
pub(crate) trait BlockingIo: Send + Sync + 'static {
    fn run(&self, req: &IoRequest) -> io::Result<()>;
}

pub(crate) struct Workers {
    tx: Option<Sender<IoRequest>>,
    threads: Vec<JoinHandle<()>>,
    submitted: AtomicU64,
}

impl Workers {
    pub(crate) fn new(name: &str, threads: usize, io: Arc<dyn BlockingIo>) -> io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<IoRequest>();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let io = io.clone();
            handles.push(
                std::thread::Builder::new()
                    .name(format!("stowage-{name}-{i}"))
                    .spawn(move || {
                        for req in rx {
                            let r = io.run(&req);
                            (req.done)(r);
                        }
                    })?,
            );
        }
        Ok(Workers {
            tx: Some(tx),
            threads: handles,
            submitted: AtomicU64::new(0),
        })
    }

    pub(crate) fn submit(&self, reqs: Vec<IoRequest>) {
        let tx = self.tx.as_ref().expect("sender lives until drop");
        self.submitted.fetch_add(reqs.len() as u64, Ordering::Relaxed);
        for r in reqs {
            // Workers exit only after the sender is dropped, so this cannot fail.
            let _ = tx.send(r);
        }
    }
}

impl Workers {
    pub(crate) fn counters(&self) -> EngineCounters {
        EngineCounters {
            fixed: 0,
            plain: self.submitted.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        drop(self.tx.take());
        for t in self.threads.drain(..) {
            join_unless_self(t);
        }
    }
}
