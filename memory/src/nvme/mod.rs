//! The NVMe tier: slots in preallocated swap files under a directory the user names.
//!
//! Each arena is one file. A slot write is split into segments handed to the I/O engine and
//! records a checksum of the slot's bytes; every read verifies it, so a corrupted disk yields
//! [`Error::ChecksumMismatch`], never wrong data. A write in progress or failed leaves the slot
//! unreadable; the chunk's previous copy (always in another slot) is untouched.

pub(crate) mod engine;
mod file;
pub(crate) mod fill;
pub(crate) mod probe;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::{Error, IoOp, Result};
use crate::lane::{Done, SendPtr};
use crate::pool::ArenaBackend;
use crate::tier::ChunkId;
use engine::{EngineKind, FaultInjector, FaultyEngine, IoEngine, IoKind, IoRequest};
use file::SlotFile;

/// Settings of the NVMe tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NvmeConfig {
    /// Directory for the swap files (created if missing). Use a local disk: tmpfs works only
    /// without O_DIRECT.
    pub dir: PathBuf,
    /// Byte budget of the tier. Default: 64 GiB.
    pub budget: u64,
    /// The I/O engine. Default: `uring`, falling back to `psync` where io_uring is refused.
    pub engine: EngineKind,
    /// Requests in flight in the io_uring engine. Default: 32.
    pub queue_depth: u32,
    /// Threads of the psync and mmap engines. Default: 4.
    pub threads: usize,
    /// Slot reads and writes are split into requests of at most this size. Default: 4 MiB.
    pub segment_bytes: usize,
    /// Use O_DIRECT where the file system allows it. Default: true.
    pub direct: bool,
    /// When the swap files are made: see [`SwapFiles`]. Default: background.
    #[serde(default)]
    pub swap_files: SwapFiles,
    /// Faults to inject (tests only). Default: none.
    #[serde(skip)]
    pub faults: Option<FaultInjector>,
}

/// When the NVMe tier's swap files are made, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwapFiles {
    /// As chunks first go down. A file made while requests are in flight stalls the disk's
    /// other requests on ext4: 0.6-1 s each, measured under load, and a large model makes one
    /// every few seconds of its first steps.
    OnDemand,
    /// Room for every chunk of the model (up to the budget), reserved with fallocate when the
    /// manager is built: a few milliseconds per file, before any request is in flight.
    Reserved,
    /// Reserved, then written through once with zeros when the manager is built, so that no
    /// write in training is the first into its blocks (ext4 converts reserved blocks on their
    /// first write, which measured 241 against 403 MB/s for rewrites beside reads in one test
    /// and no different in another). Costs one pass over the swap space at start: minutes for
    /// the 37 GB of the PPO capacity run on this machine's disk.
    Written,
    /// Reserved, then written through with zeros in the background while the disks are idle
    /// (no NVMe request of the process outstanding for 20 ms), a 2 MiB block at a time, lowest
    /// file first, ahead of the chunks: the passes of a model that leave the disk idle pay for
    /// it instead of the first optimizer updates. A file a chunk needs meanwhile is handed over
    /// at once (it then stays reserved only). Needs direct I/O; without it, as `Reserved`.
    /// The default: in the PPO capacity run it took the first writes' cost off the first
    /// updates (75.9-76.2% of transfer time hidden over three steps against 72.4% with `Reserved`).
    #[default]
    Background,
}

impl NvmeConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        NvmeConfig {
            dir: dir.into(),
            budget: 64 << 30,
            engine: EngineKind::Uring,
            queue_depth: 32,
            threads: 4,
            segment_bytes: 4 << 20,
            direct: true,
            swap_files: SwapFiles::default(),
            faults: None,
        }
    }
    pub fn with_budget(mut self, bytes: u64) -> Self {
        self.budget = bytes;
        self
    }
    pub fn with_engine(mut self, engine: EngineKind) -> Self {
        self.engine = engine;
        self
    }
    pub fn with_queue_depth(mut self, depth: u32) -> Self {
        self.queue_depth = depth;
        self
    }
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }
    pub fn with_segment_bytes(mut self, bytes: usize) -> Self {
        self.segment_bytes = bytes;
        self
    }
    pub fn with_direct(mut self, direct: bool) -> Self {
        self.direct = direct;
        self
    }
    pub fn with_swap_files(mut self, when: SwapFiles) -> Self {
        self.swap_files = when;
        self
    }
    pub fn with_faults(mut self, faults: FaultInjector) -> Self {
        self.faults = Some(faults);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// A write is in flight: the slot may hold a mix of old and new bytes.
    Writing,
    Valid(u64),
}

struct SlotMeta {
    chunk: ChunkId,
    state: SlotState,
}

/// Bytes and requests through the engine.
#[derive(Debug, Default)]
struct Counters {
    bytes_written: AtomicU64,
    bytes_read: AtomicU64,
}

/// The NVMe tier's files, engine and checksums. Shared by its pool (as the arena backend) and
/// the move paths.
pub(crate) struct Nvme {
    dir: PathBuf,
    prefix: String,
    direct: Option<probe::DirectIo>,
    engine: Arc<dyn IoEngine>,
    segment_bytes: usize,
    files: RwLock<Vec<Option<Arc<SlotFile>>>>,
    meta: Mutex<HashMap<(u32, u64), SlotMeta>>,
    counters: Counters,
    notes: Vec<String>,
    /// New requests are background traffic (see [`Nvme::set_background`]).
    background: std::sync::atomic::AtomicBool,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

/// The process id in a swap file's name (`stowage-PID-INSTANCE-ARENA.slots`).
fn swap_file_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("stowage-")?.strip_suffix(".slots")?;
    let mut parts = rest.split('-');
    let pid = parts.next()?.parse().ok()?;
    let numeric = parts.by_ref().take(2).filter(|p| p.parse::<u64>().is_ok()).count() == 2;
    (numeric && parts.next().is_none()).then_some(pid)
}

/// Removes swap files in `dir` whose process is gone (killed before it could remove them):
/// swap files are scratch, so a crash must not leak the disk. Returns (files, bytes) removed.
fn sweep_stale(dir: &Path) -> (usize, u64) {
    let (mut n, mut bytes) = (0, 0);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = swap_file_pid(&name) else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        // Only plain files: never follow or remove a symlink planted under that name.
        let Ok(m) = e.path().symlink_metadata() else { continue };
        if m.is_file() && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
            bytes += m.len();
        }
    }
    (n, bytes)
}

impl Nvme {
    pub(crate) fn open(cfg: &NvmeConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| Error::io(IoOp::Open, &cfg.dir, 0, e))?;
        let meta = std::fs::symlink_metadata(&cfg.dir).map_err(|e| Error::io(IoOp::Open, &cfg.dir, 0, e))?;
        if !meta.is_dir() {
            return Err(Error::unsupported(
                format!("NVMe directory {}", cfg.dir.display()),
                "it is not a directory (symlinks are not followed): name a real directory",
            ));
        }
        let mut notes = Vec::new();
        let (n, bytes) = sweep_stale(&cfg.dir);
        if n > 0 {
            notes.push(format!("removed {n} swap files ({bytes} bytes) left in {} by processes that no longer run", cfg.dir.display()));
        }
        let direct = if cfg.direct && cfg.engine != EngineKind::Mmap {
            match probe::probe_direct(&cfg.dir).map_err(|e| Error::io(IoOp::Probe, &cfg.dir, 0, e))? {
                Ok(d) => Some(d),
                Err(why) => {
                    notes.push(format!("{why}; using buffered I/O"));
                    None
                }
            }
        } else {
            None
        };
        let (engine, note) = build_engine(cfg).map_err(|e| Error::io(IoOp::Open, "io engine threads", 0, e))?;
        notes.extend(note);
        let engine: Arc<dyn IoEngine> = match &cfg.faults {
            Some(f) => Arc::new(FaultyEngine::new(engine, f.clone())),
            None => engine,
        };
        for n in &notes {
            log::warn!("nvme tier: {n}");
        }
        let align = direct.map_or(1, |d| d.align);
        let segment_bytes = (cfg.segment_bytes.max(align) / align * align).min(1 << 30);
        Ok(Arc::new(Nvme {
            dir: cfg.dir.clone(),
            prefix: format!(
                "stowage-{}-{}",
                std::process::id(),
                INSTANCE.fetch_add(1, Ordering::Relaxed)
            ),
            direct,
            engine,
            segment_bytes,
            files: RwLock::new(Vec::new()),
            meta: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            notes,
            background: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Alignment that slot sizes and host buffers must respect (1 without O_DIRECT).
    pub(crate) fn align(&self) -> usize {
        self.direct.map_or(1, |d| d.align)
    }

    pub(crate) fn engine(&self) -> &Arc<dyn IoEngine> {
        &self.engine
    }

    pub(crate) fn engine_kind(&self) -> EngineKind {
        self.engine.kind()
    }

    pub(crate) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    pub(crate) fn notes(&self) -> &[String] {
        &self.notes
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn bytes_moved(&self) -> (u64, u64) {
        (
            self.counters.bytes_written.load(Ordering::Relaxed),
            self.counters.bytes_read.load(Ordering::Relaxed),
        )
    }

    /// Swap files made so far (arena ids below this are taken).
    pub(crate) fn file_count(&self) -> usize {
        self.files.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Writes zeros through the swap files of arenas `first..`, made since [`Nvme::file_count`]
    /// returned `first` and holding no data yet (see [`SwapFiles::Written`]).
    pub(crate) fn write_through(&self, first: usize) -> Result<()> {
        let files: Vec<Arc<SlotFile>> = self.files.read().unwrap_or_else(|e| e.into_inner()).iter().skip(first).flatten().cloned().collect();
        for f in files {
            let len = f.file().metadata().map_err(|e| Error::io(IoOp::Allocate, f.path(), 0, e))?.len();
            f.fill_zeros(len as usize, self.align())?;
        }
        Ok(())
    }

    fn file(&self, arena: u32) -> Option<Arc<SlotFile>> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        files.get(arena as usize).cloned().flatten()
    }

    fn meta(&self) -> std::sync::MutexGuard<'_, HashMap<(u32, u64), SlotMeta>> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Path of the file holding `arena`, for error messages and tests.
    pub(crate) fn path_of(&self, arena: u32) -> Option<PathBuf> {
        self.file(arena).map(|f| f.path().to_owned())
    }

    /// Writes `len` bytes at `src` into the slot at (`arena`, `offset`), recording `chunk` and
    /// the bytes' checksum; `done` runs when every segment is on disk.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes, suitably aligned for direct I/O, and unchanged by
    /// anyone until `done` runs.
    pub(crate) unsafe fn write(self: &Arc<Self>, chunk: ChunkId, src: *const u8, len: usize, arena: u32, offset: u64, done: Done) {
        let Some(file) = self.file(arena) else {
            return done(Err(Error::InvalidState(format!("NVMe arena {arena} does not exist"))));
        };
        // SAFETY: the caller's contract: `src` is valid and unchanged for `len` bytes.
        let checksum = xxh3_64(unsafe { std::slice::from_raw_parts(src, len) });
        self.meta().insert(
            (arena, offset),
            SlotMeta {
                chunk,
                state: SlotState::Writing,
            },
        );
        let me = self.clone();
        let finish: Done = Box::new(move |r: Result<()>| {
            let mut meta = me.meta();
            match &r {
                Ok(()) => {
                    if let Some(m) = meta.get_mut(&(arena, offset)) {
                        m.state = SlotState::Valid(checksum);
                    }
                    me.counters.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                }
                Err(_) => {
                    meta.remove(&(arena, offset));
                }
            }
            drop(meta);
            done(r);
        });
        self.submit_segments(IoKind::Write, file, src as *mut u8, len, offset, finish);
    }

    /// Reads the slot at (`arena`, `offset`) into `dst` and verifies it holds `chunk` with the
    /// checksum recorded at its write.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes, suitably aligned for direct I/O, and reserved for
    /// this read until `done` runs.
    pub(crate) unsafe fn read(self: &Arc<Self>, chunk: ChunkId, arena: u32, offset: u64, dst: *mut u8, len: usize, done: Done) {
        let Some(file) = self.file(arena) else {
            return done(Err(Error::InvalidState(format!("NVMe arena {arena} does not exist"))));
        };
        let expected = match self.meta().get(&(arena, offset)) {
            Some(SlotMeta {
                chunk: c,
                state: SlotState::Valid(sum),
            }) if *c == chunk => *sum,
            Some(m) => {
                return done(Err(Error::InvalidState(format!(
                    "NVMe slot at {} offset {offset} holds chunk {} ({:?}), not chunk {chunk}",
                    file.path().display(),
                    m.chunk,
                    m.state
                ))))
            }
            None => {
                return done(Err(Error::InvalidState(format!(
                    "NVMe slot at {} offset {offset} holds no completed write of chunk {chunk}",
                    file.path().display()
                ))))
            }
        };
        let me = self.clone();
        let path = file.path().to_owned();
        let dst_addr = SendPtr(dst);
        let verify: Done = Box::new(move |r: Result<()>| {
            let r = r.and_then(|()| {
                // SAFETY: the read completed into `dst`, which the caller keeps reserved until
                // `done` (called just below) runs.
                let got = xxh3_64(unsafe { std::slice::from_raw_parts(dst_addr.get() as *const u8, len) });
                if got == expected {
                    me.counters.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    Ok(())
                } else {
                    Err(Error::ChecksumMismatch { chunk, path, offset })
                }
            });
            done(r);
        });
        self.submit_segments(IoKind::Read, file, dst, len, offset, verify);
    }

    /// Marks the requests submitted from now on as background traffic, which yields to the
    /// process's foreground requests (or, with `false`, as foreground again).
    pub(crate) fn set_background(&self, on: bool) {
        self.background.store(on, Ordering::Release);
    }

    fn submit_segments(&self, kind: IoKind, file: Arc<SlotFile>, buf: *mut u8, len: usize, offset: u64, done: Done) {
        let seg = self.segment_bytes;
        let count = len.div_ceil(seg).max(1);
        let background = self.background.load(Ordering::Acquire);
        if !background {
            engine::begin_foreground(count);
        }
        engine::begin_request(count);
        let batch = Arc::new(Batch {
            remaining: AtomicU64::new(count as u64),
            state: Mutex::new((None, Some(done))),
        });
        let op = match kind {
            IoKind::Read => IoOp::Read,
            IoKind::Write => IoOp::Write,
        };
        let reqs = (0..count)
            .map(|i| {
                let at = i * seg;
                let n = seg.min(len - at);
                let b = batch.clone();
                let path = file.path().to_owned();
                let seg_offset = offset + at as u64;
                IoRequest {
                    kind,
                    file: file.clone(),
                    offset: seg_offset,
                    // SAFETY: `at < len`, inside the caller's buffer.
                    buf: SendPtr(unsafe { buf.add(at) }),
                    len: n,
                    background,
                    done: Box::new(move |r| {
                        if !background {
                            engine::end_foreground();
                        }
                        engine::end_request();
                        b.segment_done(r.map_err(|e| Error::io(op, path, seg_offset, e)))
                    }),
                }
            })
            .collect();
        self.engine.submit(reqs);
    }
}

/// Gathers the segments of one slot read or write into one completion.
struct Batch {
    remaining: AtomicU64,
    state: Mutex<(Option<Error>, Option<Done>)>,
}

impl Batch {
    fn segment_done(&self, r: Result<()>) {
        if let Err(e) = r {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.0.get_or_insert(e);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let err = st.0.take();
            let done = st.1.take().expect("the last segment completes once");
            drop(st);
            done(err.map_or(Ok(()), Err));
        }
    }
}

type BuiltEngine = (Arc<dyn IoEngine>, Option<String>);

fn build_engine(cfg: &NvmeConfig) -> std::io::Result<BuiltEngine> {
    let psync = || -> std::io::Result<Arc<dyn IoEngine>> { Ok(Arc::new(engine::PsyncEngine::new(cfg.threads)?)) };
    Ok(match cfg.engine {
        EngineKind::Uring => match engine::UringEngine::new(cfg.queue_depth) {
            Ok(e) => (Arc::new(e), None),
            Err(e) => (psync()?, Some(format!("io_uring unavailable ({e}); falling back to the psync engine"))),
        },
        EngineKind::Psync => (psync()?, None),
        EngineKind::Mmap => (Arc::new(engine::MmapEngine::new(cfg.threads)?), None),
    })
}

/// The NVMe pool's arena backend: one swap file per arena.
pub(crate) struct NvmeArenas(pub(crate) Arc<Nvme>);

impl ArenaBackend for NvmeArenas {
    fn alloc_arena(&self, id: u32, bytes: usize) -> Result<u64> {
        let nvme = &self.0;
        let path = nvme.dir.join(format!("{}-{id}.slots", nvme.prefix));
        let file = SlotFile::create(&path, bytes, nvme.direct.is_some())?;
        let mut files = nvme.files.write().unwrap_or_else(|e| e.into_inner());
        if files.len() <= id as usize {
            files.resize(id as usize + 1, None);
        }
        files[id as usize] = Some(Arc::new(file));
        Ok(0)
    }

    fn free_arena(&self, id: u32, _base: u64, _bytes: usize) {
        let mut files = self.0.files.write().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = files.get_mut(id as usize) {
            // The file is removed when the last in-flight request lets go of it.
            f.take();
        }
    }

    fn slot_released(&self, arena: u32, addr: u64) {
        self.0.meta().remove(&(arena, addr));
    }

    fn host_addressable(&self) -> bool {
        false
    }
}
