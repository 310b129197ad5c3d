//! Writing reserved swap files through with zeros while the disks are idle
//! ([`super::SwapFiles::Background`]).
//!
//! On ext4 a file reserved with fallocate holds unwritten extents, and the first direct write
//! into each converts it: in the PPO capacity run such first writes took 2-5 times as long as
//! rewrites of the same chunks, and they all fall in the first optimizer updates, beside the
//! reads those depend on. Writing the files through at start costs a pass over the whole swap
//! space before the first step; this does it in the disk's idle time instead (a model's
//! experience phase leaves it idle most of the time), one block at a time, lowest file first,
//! ahead of the chunks that will first land there.
//!
//! The pool keeps the arena being written out of every allocation ([`Pool::claim_fresh`]);
//! an allocation that finds no other room takes it back, waiting at most for the block in
//! flight. Only arenas no slot was ever taken from are written, so no chunk's bytes are touched.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::engine;
use super::file::AlignedBuf;
use super::Nvme;
use crate::pool::Pool;

/// The size of one write: short, so that a request arriving meanwhile waits little.
const BLOCK: usize = 2 << 20;
/// How long the process must have had no NVMe request outstanding before a block is written.
const QUIET: Duration = Duration::from_millis(20);

/// One block in flight for the whole process, whatever the number of managers filling.
static GATE: Mutex<()> = Mutex::new(());

/// Starts writing through, in the background, the arenas of `pool` no slot was ever taken
/// from. Needs direct I/O: buffered writes would go through the page cache.
pub(crate) fn spawn(nvme: &Arc<Nvme>, pool: &Arc<Pool>) {
    if !nvme.is_direct() {
        log::info!("nvme: swap files are not written through in the background without direct I/O");
        return;
    }
    let (nvme, pool) = (Arc::downgrade(nvme), Arc::downgrade(pool));
    if let Err(e) = std::thread::Builder::new()
        .name("stowage-swap-fill".into())
        .spawn(move || run(nvme, pool))
    {
        log::warn!("nvme: could not start the thread writing swap files through ({e}); first writes convert reserved blocks");
    }
}

fn run(nvme: Weak<Nvme>, pool: Weak<Pool>) {
    let Some(align) = nvme.upgrade().map(|n| n.align()) else { return };
    let zeros = match AlignedBuf::new(BLOCK, align.max(4096)) {
        Ok(z) => z,
        Err(e) => {
            log::warn!("nvme: no buffer to write swap files through ({e}); first writes convert reserved blocks");
            return;
        }
    };
    let (t0, mut written, mut files) = (Instant::now(), 0u64, 0u32);
    'arenas: loop {
        let Some(mut claim) = Claim::next(&pool) else { break };
        let Some(file) = nvme.upgrade().and_then(|n| n.file(claim.id)) else { break };
        let mut off = 0;
        while off < claim.bytes {
            if !wait_quiet(&pool) {
                return;
            }
            match pool.upgrade() {
                Some(p) if p.keep_preparing(claim.id) => {}
                Some(_) => continue 'arenas,
                None => return,
            }
            let n = BLOCK.min(claim.bytes - off);
            let gate = GATE.lock().unwrap_or_else(|e| e.into_inner());
            let r = file.write_zeros(&zeros, off, claim.bytes);
            drop(gate);
            if let Err(e) = r {
                log::warn!("nvme: writing swap files through stopped: {e}; first writes into the rest convert reserved blocks");
                break 'arenas;
            }
            off += n;
            written += n as u64;
        }
        claim.done = true;
        files += 1;
    }
    log::info!("nvme: {files} swap files ({written} bytes) written through while the disks were idle, over {:.1} s", t0.elapsed().as_secs_f64());
}

/// An arena claimed from the pool for writing through; let go of when dropped (on every way
/// out of [`run`], a panic included, so an allocation never waits for a claim nobody holds).
struct Claim {
    pool: Weak<Pool>,
    id: u32,
    bytes: usize,
    done: bool,
}

impl Claim {
    fn next(pool: &Weak<Pool>) -> Option<Self> {
        let (id, bytes) = pool.upgrade()?.claim_fresh()?;
        Some(Claim { pool: pool.clone(), id, bytes, done: false })
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(p) = self.pool.upgrade() {
            p.finish_preparing(self.id, self.done);
        }
    }
}

/// Waits until the process has had no NVMe request outstanding for [`QUIET`]. False when the
/// pool is gone meanwhile.
fn wait_quiet(pool: &Weak<Pool>) -> bool {
    loop {
        let idle = engine::idle_for();
        if idle >= QUIET {
            return true;
        }
        if pool.strong_count() == 0 {
            return false;
        }
        std::thread::sleep((QUIET - idle).max(Duration::from_millis(1)));
    }
}
