//! The three tiers together: configuration, slot allocation, and moves between any two tiers.
//!
//! Moves take whole slots of equal size. Direct paths: device<->host (the CUDA copy streams, or
//! the simulated device's copy lanes), host<->NVMe (the I/O engine). Every other pair goes
//! through a staging slot taken from the host pool, which is charged to the host budget for the
//! move's duration.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::device::cuda::{Cuda, CudaArenas, CudaPinner};
use crate::device::CudaInfo;
use crate::error::{Error, Result};
use crate::host::{page_size, HostArenaHook, HostArenas};
use crate::lane::{Done, Lane};
use crate::nvme::engine::{EngineCounters, EngineKind, RegisterHook};
use crate::nvme::{Nvme, NvmeArenas, NvmeConfig};
use crate::pool::{ArenaBackend, Pool, SharedBudget, Slot};
use crate::tier::{ChunkId, DeviceKind, Tier, TierStats};
use crate::transfer::{Op, Transfer};

/// Which device backs the device tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is usable, the simulated device otherwise (the reason is logged).
    Auto,
    /// CUDA or an error.
    Cuda,
    /// The simulated device, even where a GPU exists.
    Simulated,
    /// No device tier.
    None,
}

/// Settings of the device tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Default: `Auto`.
    pub choice: DeviceChoice,
    /// Byte budget. Default: 1 GiB.
    pub budget: u64,
    /// CUDA device ordinal. Default: 0.
    pub ordinal: usize,
    /// Simulated device only: pace host<->device copies to this many bytes per second in each
    /// direction. Default: none (memcpy speed).
    pub sim_bytes_per_s: Option<f64>,
    /// Out-of-memory faults to inject into device allocations (tests only). Default: none.
    #[serde(skip)]
    pub alloc_faults: Option<AllocFaults>,
}

/// A handle on injected device out-of-memory faults: the next `n` device arena allocations
/// fail as a driver out-of-memory would. Clone it, give one to the config, arm the other.
#[derive(Debug, Clone, Default)]
pub struct AllocFaults {
    pending: Arc<std::sync::atomic::AtomicU64>,
    injected: Arc<std::sync::atomic::AtomicU64>,
}

impl AllocFaults {
    pub fn new() -> Self {
        Self::default()
    }
    /// The next `n` device arena allocations fail.
    pub fn fail_next(&self, n: u64) {
        self.pending.store(n, std::sync::atomic::Ordering::SeqCst);
    }
    /// How many allocations were failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn take(&self) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        let hit = self.pending.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
        if hit {
            self.injected.fetch_add(1, SeqCst);
        }
        hit
    }
}

/// A device arena backend that fails the allocations `AllocFaults` says.
struct FaultyArenas {
    inner: Box<dyn ArenaBackend>,
    faults: AllocFaults,
}

impl ArenaBackend for FaultyArenas {
    fn alloc_arena(&self, id: u32, bytes: usize) -> Result<u64> {
        if self.faults.take() {
            return Err(Error::Alloc {
                tier: Tier::Device,
                bytes: bytes as u64,
                reason: "out of memory (injected)".into(),
            });
        }
        self.inner.alloc_arena(id, bytes)
    }
    fn free_arena(&self, id: u32, base: u64, bytes: usize) {
        self.inner.free_arena(id, base, bytes)
    }
    fn slot_released(&self, arena: u32, addr: u64) {
        self.inner.slot_released(arena, addr)
    }
    fn host_addressable(&self) -> bool {
        self.inner.host_addressable()
    }
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            choice: DeviceChoice::Auto,
            budget: 1 << 30,
            ordinal: 0,
            sim_bytes_per_s: None,
            alloc_faults: None,
        }
    }
}

/// Settings of all tiers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TiersConfig {
    pub device: DeviceConfig,
    /// Host tier byte budget. Default: 4 GiB.
    pub host_budget: u64,
    /// Page-lock host arenas when CUDA is in use. Default: true.
    pub pin_host: bool,
    /// The NVMe tier, if any. Default: none.
    pub nvme: Option<NvmeConfig>,
    /// Preferred size of one host or NVMe arena (the unit in which those tiers grow). The device
    /// tier is one arena of its whole budget, obtained at its first use, so chunks of different
    /// sizes can always be placed by evicting; with a shared device budget it grows by arenas of
    /// this size too, so what one manager gives back another can take. Default: 256 MiB.
    pub arena_bytes: usize,
    /// A device budget shared with other managers' tiers (see [`SharedBudget`]). Default: none.
    #[serde(skip)]
    pub shared_device: Option<SharedBudget>,
    /// A host budget shared with other managers' tiers. Default: none.
    #[serde(skip)]
    pub shared_host: Option<SharedBudget>,
}

impl Default for TiersConfig {
    fn default() -> Self {
        TiersConfig {
            device: DeviceConfig::default(),
            host_budget: 4 << 30,
            pin_host: true,
            nvme: None,
            arena_bytes: 256 << 20,
            shared_device: None,
            shared_host: None,
        }
    }
}

impl TiersConfig {
    pub fn with_device(mut self, choice: DeviceChoice, budget: u64) -> Self {
        self.device.choice = choice;
        self.device.budget = budget;
        self
    }
    pub fn with_sim_bandwidth(mut self, bytes_per_s: f64) -> Self {
        self.device.sim_bytes_per_s = Some(bytes_per_s);
        self
    }
    pub fn with_host_budget(mut self, bytes: u64) -> Self {
        self.host_budget = bytes;
        self
    }
    pub fn with_nvme(mut self, nvme: NvmeConfig) -> Self {
        self.nvme = Some(nvme);
        self
    }
    pub fn with_arena_bytes(mut self, bytes: usize) -> Self {
        self.arena_bytes = bytes;
        self
    }
    /// Draws the device and host tiers' memory from budgets shared with other managers (each
    /// tier stays under its own budget too).
    pub fn with_shared(mut self, device: Option<SharedBudget>, host: Option<SharedBudget>) -> Self {
        self.shared_device = device;
        self.shared_host = host;
        self
    }
}

/// The engines that carry out moves; shared with in-flight callbacks (staged moves start their
/// second hop from the first hop's completion).
struct Movers {
    host: Arc<Pool>,
    cuda: Option<Cuda>,
    nvme: Option<Arc<Nvme>>,
    /// Simulated device: host to device, device to host, and everything else host-side.
    h2d: Lane,
    d2h: Lane,
    local: Lane,
}

/// Where a slot's bytes are, as a move sees them.
#[derive(Clone, Copy)]
enum Loc {
    /// CPU-addressable memory of the host tier.
    Host(*mut u8),
    /// CPU-addressable memory of the simulated device.
    SimDevice(*mut u8),
    Cuda(u64),
    Nvme { arena: u32, offset: u64 },
}

// SAFETY: a Loc is only used by the move that owns the slot it points into.
unsafe impl Send for Loc {}

/// The tiers of one process: pools, engines and moves.
pub struct Tiers {
    device: Option<Arc<Pool>>,
    device_kind: Option<DeviceKind>,
    nvme_pool: Option<Arc<Pool>>,
    movers: Arc<Movers>,
    align: usize,
    notes: Vec<String>,
}

impl Tiers {
    pub fn new(cfg: TiersConfig) -> Result<Self> {
        let mut notes = Vec::new();
        let cuda = match cfg.device.choice {
            DeviceChoice::Cuda => Some(Cuda::probe(cfg.device.ordinal)?),
            DeviceChoice::Auto => match Cuda::probe(cfg.device.ordinal) {
                Ok(c) => Some(c),
                Err(e) => {
                    notes.push(format!("{e}; using the simulated device"));
                    None
                }
            },
            DeviceChoice::Simulated | DeviceChoice::None => None,
        };
        let nvme = cfg.nvme.as_ref().map(Nvme::open).transpose()?;
        if let Some(n) = &nvme {
            notes.extend(n.notes().iter().cloned());
        }
        let align = page_size().max(nvme.as_ref().map_or(1, |n| n.align()));
        let mut hooks: Vec<Arc<dyn HostArenaHook>> = Vec::new();
        if let (Some(c), true) = (&cuda, cfg.pin_host) {
            hooks.push(Arc::new(CudaPinner(c.clone())));
        }
        if let Some(n) = &nvme {
            hooks.push(Arc::new(RegisterHook(n.engine().clone())));
        }
        let host = Pool::new(
            Tier::Host,
            cfg.host_budget,
            cfg.arena_bytes,
            cfg.shared_host.clone(),
            Box::new(HostArenas::new(Tier::Host, align, hooks)),
        );
        let device_arena = match cfg.shared_device {
            Some(_) => cfg.arena_bytes,
            None => usize::try_from(cfg.device.budget).unwrap_or(usize::MAX),
        };
        let shared_device = cfg.shared_device.clone();
        let faulty = |b: Box<dyn ArenaBackend>| -> Box<dyn ArenaBackend> {
            match &cfg.device.alloc_faults {
                Some(f) => Box::new(FaultyArenas { inner: b, faults: f.clone() }),
                None => b,
            }
        };
        let (device, device_kind) = match (&cuda, cfg.device.choice) {
            (_, DeviceChoice::None) => (None, None),
            (Some(c), _) => (
                Some(Pool::new(Tier::Device, cfg.device.budget, device_arena, shared_device, faulty(Box::new(CudaArenas(c.clone()))))),
                Some(DeviceKind::Cuda),
            ),
            (None, _) => (
                Some(Pool::new(
                    Tier::Device,
                    cfg.device.budget,
                    device_arena,
                    shared_device,
                    faulty(Box::new(HostArenas::new(Tier::Device, align, Vec::new()))),
                )),
                Some(DeviceKind::Simulated),
            ),
        };
        let nvme_pool = nvme.as_ref().map(|n| {
            let budget = cfg.nvme.as_ref().map_or(0, |c| c.budget);
            Pool::new(Tier::Nvme, budget, cfg.arena_bytes, None, Box::new(NvmeArenas(n.clone())))
        });
        let bw = cfg.device.sim_bytes_per_s;
        let movers = Arc::new(Movers {
            host,
            cuda,
            nvme,
            h2d: Lane::new("sim-h2d", bw),
            d2h: Lane::new("sim-d2h", bw),
            local: Lane::new("memcpy", None),
        });
        Ok(Tiers {
            device,
            device_kind,
            nvme_pool,
            movers,
            align,
            notes,
        })
    }

    /// Slot sizes must be multiples of this (the page size, or the disk's direct-I/O alignment
    /// if larger).
    pub fn slot_align(&self) -> usize {
        self.align
    }

    /// What backs the device tier, if there is one.
    pub fn device_kind(&self) -> Option<DeviceKind> {
        self.device_kind
    }

    /// The GPU in use, if any.
    pub fn cuda_info(&self) -> Option<CudaInfo> {
        self.movers.cuda.as_ref().map(|c| c.info().clone())
    }

    /// The NVMe engine in use (after any fallback), whether it uses O_DIRECT, and its directory.
    pub fn nvme_engine(&self) -> Option<(EngineKind, bool, PathBuf)> {
        self.movers
            .nvme
            .as_ref()
            .map(|n| (n.engine_kind(), n.is_direct(), n.dir().to_owned()))
    }

    /// Requests the NVMe engine has submitted, by buffer kind (registered or not).
    pub fn nvme_engine_counters(&self) -> Option<EngineCounters> {
        self.movers.nvme.as_ref().map(|n| n.engine().counters())
    }

    /// Marks this set's NVMe traffic from now on as background (an optimizer update beside
    /// other work), which yields to the process's foreground NVMe traffic; `false` ends that.
    /// Without an NVMe tier, a no-op.
    pub fn set_background_io(&self, on: bool) {
        if let Some(n) = &self.movers.nvme {
            n.set_background(on);
        }
    }

    /// Bytes written to and read from NVMe so far (completed and verified).
    pub fn nvme_bytes_moved(&self) -> (u64, u64) {
        self.movers.nvme.as_ref().map_or((0, 0), |n| n.bytes_moved())
    }

    /// Fallbacks taken while setting up, with their reasons.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Whether `tier` exists in this configuration.
    pub fn has(&self, tier: Tier) -> bool {
        self.pool(tier).is_some()
    }

    /// Whether `tier` exists and the CPU may read and write its slots (host memory, the
    /// simulated device).
    pub fn host_addressable(&self, tier: Tier) -> bool {
        self.pool(tier).is_some_and(|p| p.backend().host_addressable())
    }

    fn pool(&self, tier: Tier) -> Option<&Arc<Pool>> {
        match tier {
            Tier::Device => self.device.as_ref(),
            Tier::Host => Some(&self.movers.host),
            Tier::Nvme => self.nvme_pool.as_ref(),
        }
    }

    fn pool_or_err(&self, tier: Tier) -> Result<&Arc<Pool>> {
        self.pool(tier)
            .ok_or_else(|| Error::unsupported(format!("the {tier} tier"), "it is not configured"))
    }

    /// Takes a slot of `bytes` (a multiple of [`Tiers::slot_align`]) in `tier`.
    pub fn alloc(&self, tier: Tier, bytes: usize) -> Result<Slot> {
        self.check_slot(bytes)?;
        self.pool_or_err(tier)?.alloc(bytes, false)
    }

    fn check_slot(&self, bytes: usize) -> Result<()> {
        if bytes == 0 || bytes % self.align != 0 {
            return Err(Error::unsupported(
                format!("a slot of {bytes} bytes"),
                format!("slot sizes must be non-zero multiples of {} bytes (round the chunk size up)", self.align),
            ));
        }
        Ok(())
    }

    /// Whether a slot of `bytes` in `tier` can be allocated now without evicting anything
    /// (slots of other sizes can hold arenas the budget would need).
    pub fn can_alloc(&self, tier: Tier, bytes: usize) -> bool {
        self.pool(tier).is_some_and(|p| p.can_alloc(bytes))
    }

    /// Accounting of `tier`, if it exists.
    pub fn stats(&self, tier: Tier) -> Option<TierStats> {
        self.pool(tier).map(|p| p.stats())
    }

    /// Sets aside `bytes` of `tier` for this configuration's pool alone while it works next to
    /// others sharing its budget ([`crate::SharedBudget`]): what it holds counts towards them,
    /// the shared budget is charged for all of them at once (so the others cannot take what it
    /// gives back meanwhile), and it reserves no more (the manager evicts within them). False,
    /// changing nothing, when the shared budget has not the room. None ends the lease, returning
    /// what the pool does not hold. Without a shared budget it only caps the pool.
    /// [`TierStats::limit`] shows the lease.
    pub fn lease(&self, tier: Tier, bytes: Option<u64>) -> bool {
        self.pool(tier).is_none_or(|p| p.lease(bytes))
    }

    /// Obtains room in `tier` for `bytes` (at most its budget) before it is needed, in arenas
    /// sized for slots of `slot_bytes`; returns the bytes the tier then holds. For NVMe this
    /// makes the swap files up front, and with `write` writes the new ones through once (see
    /// [`crate::SwapFiles`]); the manager does it when built.
    pub fn reserve(&self, tier: Tier, bytes: u64, slot_bytes: usize, write: bool) -> Result<u64> {
        self.check_slot(slot_bytes)?;
        let pool = self.pool_or_err(tier)?;
        let fill = self.movers.nvme.as_ref().filter(|_| write && tier == Tier::Nvme);
        let first = fill.map_or(0, |n| n.file_count());
        let reserved = pool.reserve(bytes, slot_bytes)?;
        if let Some(n) = fill {
            n.write_through(first)?;
        }
        Ok(reserved)
    }

    /// Starts writing the NVMe tier's reserved swap files through with zeros while the disks are
    /// idle (see [`crate::SwapFiles::Background`]); files no chunk has used yet only. Nothing
    /// without an NVMe tier.
    pub fn fill_when_idle(&self) {
        if let (Some(n), Some(p)) = (&self.movers.nvme, &self.nvme_pool) {
            crate::nvme::fill::spawn(n, p);
        }
    }

    /// Gives back every arena of every tier that has no slot in use; returns the bytes freed.
    pub fn shrink(&self) -> u64 {
        Tier::ALL.iter().map(|&t| self.shrink_tier(t)).sum()
    }

    /// Gives back every arena of `tier` that has no slot in use; returns the bytes freed.
    pub fn shrink_tier(&self, tier: Tier) -> u64 {
        self.pool(tier).map_or(0, |p| p.shrink())
    }

    /// Path of the swap file behind an NVMe slot (for diagnostics and tests).
    pub fn nvme_path(&self, slot: &Slot) -> Option<PathBuf> {
        if slot.tier() != Tier::Nvme {
            return None;
        }
        self.movers.nvme.as_ref()?.path_of(slot.arena())
    }

    /// Copies `src` into `dst` asynchronously. Both slots belong to the move until its
    /// completion; `wait` hands them back (`src` unchanged, `dst` holding the data). `chunk`
    /// names the data in checksums and errors.
    pub fn copy(&self, chunk: ChunkId, src: Slot, dst: Slot) -> Transfer {
        let (op, transfer) = Op::new(chunk, src, dst);
        if let Err(e) = self.check(&op) {
            op.finish(Err(e));
            return transfer;
        }
        self.movers.clone().start(op);
        transfer
    }

    fn check(&self, op: &Op) -> Result<()> {
        let (src, dst) = op.slots();
        if src.len() != dst.len() {
            return Err(Error::unsupported(
                format!("moving a {}-byte slot into a {}-byte slot", src.len(), dst.len()),
                "source and destination slots must be the same size",
            ));
        }
        for s in [src, dst] {
            let ours = self.pool(s.tier()).is_some_and(|p| Arc::ptr_eq(p, s.pool()));
            if !ours {
                return Err(Error::unsupported(
                    format!("moving a {} slot", s.tier()),
                    "the slot belongs to another Tiers instance",
                ));
            }
        }
        Ok(())
    }
}

impl Movers {
    fn loc(&self, slot: &Slot) -> Loc {
        let ptr = slot.addr() as *mut u8;
        match slot.tier() {
            Tier::Host => Loc::Host(ptr),
            Tier::Device if self.cuda.is_some() => Loc::Cuda(slot.addr()),
            Tier::Device => Loc::SimDevice(ptr),
            Tier::Nvme => Loc::Nvme {
                arena: slot.arena(),
                offset: slot.addr(),
            },
        }
    }

    fn start(self: Arc<Self>, op: Op) {
        let (src, dst) = op.slots();
        let (from, to, len, chunk) = (self.loc(src), self.loc(dst), src.len(), op.chunk());
        if !self.direct(from, to) {
            return self.start_staged(op, from, to, len);
        }
        let done: Done = Box::new(move |r| op.finish(r));
        // SAFETY: `op`, captured by `done`, owns both slots until `done` runs, so both buffers
        // stay valid and untouched by anyone else for the whole hop.
        unsafe { self.hop(chunk, from, to, len, done) };
    }

    fn direct(&self, from: Loc, to: Loc) -> bool {
        use Loc::*;
        matches!(
            (from, to),
            (Host(_) | SimDevice(_), Host(_) | SimDevice(_))
                | (Host(_), Cuda(_))
                | (Cuda(_), Host(_) | Cuda(_))
                | (Host(_), Nvme { .. })
                | (Nvme { .. }, Host(_))
        )
    }

    /// Two hops through a host staging slot, charged to the host budget while the move lasts.
    fn start_staged(self: Arc<Self>, op: Op, from: Loc, to: Loc, len: usize) {
        let staging = match self.host.alloc(len, true) {
            Ok(s) => s,
            Err(e) => return op.finish(Err(e)),
        };
        let mid = Loc::Host(staging.addr() as *mut u8);
        let chunk = op.chunk();
        let me = self.clone();
        let first: Done = Box::new(move |r| match r {
            Err(e) => {
                drop(staging);
                op.finish(Err(e));
            }
            Ok(()) => {
                let second: Done = Box::new(move |r| {
                    drop(staging);
                    op.finish(r);
                });
                // SAFETY: `op` owns the destination and `staging` is owned by the callback,
                // both until `second` runs.
                unsafe { me.hop(chunk, mid, to, len, second) };
            }
        });
        // SAFETY: `op` (owning the source) and `staging` live in `first` until it runs.
        unsafe { self.hop(chunk, from, mid, len, first) };
    }

    /// One direct hop.
    ///
    /// # Safety
    /// Both locations must be valid for `len` bytes and reserved for this hop until `done` runs.
    unsafe fn hop(&self, chunk: ChunkId, from: Loc, to: Loc, len: usize, done: Done) {
        use Loc::*;
        // SAFETY: every arm forwards this function's contract (both locations valid and reserved
        // until `done` runs) to a callee with the same contract.
        unsafe {
            match (from, to, &self.cuda, &self.nvme) {
                (Host(s), SimDevice(d), ..) => self.h2d.copy(s, d, len, done),
                (SimDevice(s), Host(d), ..) => self.d2h.copy(s, d, len, done),
                (Host(s) | SimDevice(s), Host(d) | SimDevice(d), ..) => self.local.copy(s, d, len, done),
                (Host(s), Cuda(d), Some(c), _) => c.copy_h2d(s, d, len, done),
                (Cuda(s), Host(d), Some(c), _) => c.copy_d2h(s, d, len, done),
                (Cuda(s), Cuda(d), Some(c), _) => c.copy_d2d(s, d, len, done),
                (Host(s), Nvme { arena, offset }, _, Some(n)) => n.write(chunk, s, len, arena, offset, done),
                (Nvme { arena, offset }, Host(d), _, Some(n)) => n.read(chunk, arena, offset, d, len, done),
                _ => done(Err(Error::InvalidState("no direct path between these tiers".into()))),
            }
        }
    }
}
