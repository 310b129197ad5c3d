//! Small helpers shared by the worker threads.

use std::thread::JoinHandle;

/// Joins a worker thread, unless called from that very thread (which happens when the last
/// reference to an engine is dropped inside one of its own completion callbacks); the thread
/// then finishes on its own once its channel is drained.
pub(crate) fn join_unless_self(handle: JoinHandle<()>) {
    if handle.thread().id() != std::thread::current().id() {
        let _ = handle.join();
    }
}
