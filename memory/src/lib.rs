//! # stowage-memory
//!
//! Chunked tensor memory for training models larger than the GPU: fixed-size chunks live in
//! slots of three tiers (GPU or simulated device memory, page-locked host DRAM, NVMe swap files)
//! and move between them asynchronously, never losing or corrupting a byte.
//!
//! Layers, bottom up: tier storage (`host`, `device`, `nvme`), slot pools (`pool`), moves
//! ([`Tiers::copy`], [`Transfer`]). No libtorch: any trainer can embed it.
//!
//! ```no_run
//! use stowage_memory::{ChunkId, NvmeConfig, Tier, Tiers, TiersConfig};
//! let tiers = Tiers::new(TiersConfig::default().with_nvme(NvmeConfig::new("/var/tmp/stowage")))?;
//! let mut host = tiers.alloc(Tier::Host, 4 << 20)?;
//! host.bytes_mut().unwrap().fill(7);
//! let disk = tiers.alloc(Tier::Nvme, 4 << 20)?;
//! let (host, disk) = tiers.copy(ChunkId(0), host, disk).wait()?;
//! # Ok::<(), stowage_memory::Error>(())
//! ```

pub mod device;
pub mod error;
mod host;
mod lane;
pub mod manager;
pub mod nvme;
pub mod optim;
mod pool;
pub mod tier;
mod tiers;
mod transfer;
mod util;

pub use error::{Error, IoOp, Result};
pub use host::page_size;
pub use nvme::engine::{EngineCounters, EngineKind, Fault, FaultInjector, IoKind};
pub use nvme::{NvmeConfig, SwapFiles};
pub use pool::{SharedBudget, Slot};
pub use tier::{ChunkId, DeviceKind, Tier, TierStats};
pub use tiers::{AllocFaults, DeviceChoice, DeviceConfig, Tiers, TiersConfig};
pub use transfer::{Failed, Transfer};
pub use manager::layout::{ChunkSize, DType, Role};
pub use manager::policy::PolicyKind;
pub use manager::state::TensorState;
pub use manager::{Access, ChunkRef, Manager, ManagerBuilder, ManagerConfig, Mode, TensorId};
