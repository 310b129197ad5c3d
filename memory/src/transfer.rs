//! Completion handles for asynchronous moves.
//!
//! A move owns its source and destination slots from submission until its completion runs.
//! The caller's [`Transfer`] handle only observes: dropping it does not cancel anything, and
//! the slots go back to their pools after the move completes, never before.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::pool::Slot;
use crate::tier::ChunkId;

/// A move that failed, with both slots handed back: the source still holds its data.
#[derive(Debug)]
pub struct Failed {
    pub error: Error,
    pub src: Slot,
    pub dst: Slot,
}

impl From<Failed> for Error {
    fn from(f: Failed) -> Error {
        f.error
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

struct Outcome {
    src: Slot,
    dst: Slot,
    result: Result<()>,
    elapsed: Duration,
}

#[derive(Default)]
struct Shared {
    outcome: Mutex<Option<Outcome>>,
    ready: Condvar,
}

/// The completion handle of one move.
pub struct Transfer {
    chunk: ChunkId,
    shared: Arc<Shared>,
}

impl Transfer {
    /// The chunk being moved.
    pub fn chunk(&self) -> ChunkId {
        self.chunk
    }

    /// True once the move has finished (successfully or not); `wait` will not block.
    pub fn is_complete(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Outcome>> {
        self.shared.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks until the move finishes; returns `(src, dst)`, with `dst` holding the data.
    // The error hands both slots back, which is the point; it is returned once per move.
    #[allow(clippy::result_large_err)]
    pub fn wait(self) -> Result<(Slot, Slot), Failed> {
        self.wait_timed().map(|(s, d, _)| (s, d))
    }

    /// As [`Transfer::wait`], also returning how long the move took from submission.
    #[allow(clippy::result_large_err)]
    pub fn wait_timed(self) -> Result<(Slot, Slot, Duration), Failed> {
        let mut g = self.lock();
        while g.is_none() {
            g = self.shared.ready.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        let o = g.take().expect("checked above");
        drop(g);
        match o.result {
            Ok(()) => Ok((o.src, o.dst, o.elapsed)),
            Err(error) => Err(Failed {
                error,
                src: o.src,
                dst: o.dst,
            }),
        }
    }
}

/// The in-flight side of a move: owns the slots until `finish`. If dropped unfinished (an
/// engine shut down under it), it finishes with an error rather than leaving a waiter hanging.
pub(crate) struct Op {
    inner: Option<(Slot, Slot)>,
    shared: Arc<Shared>,
    chunk: ChunkId,
    started: Instant,
}

impl Op {
    pub(crate) fn new(chunk: ChunkId, src: Slot, dst: Slot) -> (Op, Transfer) {
        for s in [&src, &dst] {
            s.pool().mark_in_flight(s.len(), true);
        }
        let shared = Arc::new(Shared::default());
        let op = Op {
            inner: Some((src, dst)),
            shared: shared.clone(),
            chunk,
            started: Instant::now(),
        };
        (op, Transfer { chunk, shared })
    }

    pub(crate) fn chunk(&self) -> ChunkId {
        self.chunk
    }

    pub(crate) fn slots(&self) -> (&Slot, &Slot) {
        let (s, d) = self.inner.as_ref().expect("slots live until finish");
        (s, d)
    }

    pub(crate) fn finish(mut self, result: Result<()>) {
        self.complete(result);
    }

    fn complete(&mut self, result: Result<()>) {
        let Some((src, dst)) = self.inner.take() else { return };
        for s in [&src, &dst] {
            s.pool().mark_in_flight(s.len(), false);
        }
        let mut g = self.shared.outcome.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(Outcome {
            src,
            dst,
            result,
            elapsed: self.started.elapsed(),
        });
        drop(g);
        self.shared.ready.notify_all();
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        self.complete(Err(Error::InvalidState(format!(
            "the move of chunk {} was abandoned before completing",
            self.chunk
        ))));
    }
}
