//! Names shared by every layer: the tiers, chunk identities and per-tier statistics.

use serde::{Deserialize, Serialize};

/// A level of the memory hierarchy a chunk can live in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// The compute device: GPU memory, or simulated device memory on CPU-only machines.
    Device,
    /// Host DRAM, page-locked when CUDA is present.
    Host,
    /// Slots in preallocated files on a local disk.
    Nvme,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Device, Tier::Host, Tier::Nvme];

    pub fn name(self) -> &'static str {
        match self {
            Tier::Device => "device",
            Tier::Host => "host",
            Tier::Nvme => "nvme",
        }
    }
}

impl std::fmt::Display for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What backs the device tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// A CUDA GPU through the driver API.
    Cuda,
    /// Host memory standing in for a device, under a budget and an optional bandwidth limit.
    Simulated,
}

/// Identity of a chunk, carried through moves so errors can name the chunk they concern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub u64);

impl std::fmt::Display for ChunkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A snapshot of one tier's accounting. Every byte the tier holds for any purpose is in `used`,
/// including staging buffers and the slots of moves still in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierStats {
    /// The budget in bytes (less, if the system refused memory below it).
    pub capacity: u64,
    /// The most the tier may hold now: `capacity`, less what other pools sharing its budget
    /// ([`crate::SharedBudget`]) hold.
    pub limit: u64,
    /// Bytes of slots handed out (live data, staging and in-flight slots).
    pub used: u64,
    /// Highest `used` seen.
    pub peak: u64,
    /// Bytes obtained from the system (arenas); at least `used`, at most `capacity`.
    pub reserved: u64,
    /// Bytes of slots currently taking part in a move.
    pub in_flight: u64,
    /// Bytes of slots used as staging buffers for two-hop moves.
    pub staging: u64,
    /// Number of large allocations (arenas) obtained so far.
    pub arenas: u64,
}
