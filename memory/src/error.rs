//! The crate's one error type. Each variant tells the caller what it can do about it.

use std::path::PathBuf;

use crate::tier::{ChunkId, Tier};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Which kind of I/O failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Write,
    Open,
    Allocate,
    Probe,
}

impl std::fmt::Display for IoOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Open => "open",
            IoOp::Allocate => "allocate",
            IoOp::Probe => "probe",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong in `stowage-memory`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tier's byte budget has no room for the request. Evict something from this tier and
    /// retry; if `requested > capacity` no eviction can help: raise the budget or use smaller
    /// chunks.
    #[error(
        "{tier} tier over budget: {requested} bytes requested, {in_use} of {capacity} in use \
         (evict a chunk from the {tier} tier and retry, or raise its budget)"
    )]
    OverBudget {
        tier: Tier,
        requested: u64,
        capacity: u64,
        in_use: u64,
    },

    /// The file system holding the NVMe tier is full. Free disk space, point the NVMe tier at a
    /// larger disk, or lower its budget. Data already written stays readable.
    #[error("no space left on the disk holding {path} (free space there or choose another --nvme-dir)")]
    NoSpace { path: PathBuf },

    /// An I/O call failed for another reason.
    #[error("{op} failed on {path} at offset {offset}: {source}")]
    Io {
        op: IoOp,
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    /// A chunk read back from NVMe does not match the checksum stored when it was written: the
    /// bytes on disk were corrupted. The chunk's data there is lost; reload it from a checkpoint.
    #[error(
        "checksum mismatch reading chunk {chunk} from {path} at offset {offset}: the swap file \
         was corrupted on disk; restore the chunk from a checkpoint"
    )]
    ChecksumMismatch {
        chunk: ChunkId,
        path: PathBuf,
        offset: u64,
    },

    /// CUDA was asked for but cannot be used on this machine.
    #[error("CUDA is not available: {reason} (use the simulated device tier on CPU-only machines)")]
    NoCuda { reason: String },

    /// A CUDA driver call failed after CUDA was found.
    #[error("CUDA call {call} failed: {reason}")]
    Cuda { call: &'static str, reason: String },

    /// A tier could not obtain memory from the system (not a budget decision: the machine
    /// itself refused). Lower the tier's budget.
    #[error("{tier} tier could not allocate {bytes} bytes: {reason} (lower the {tier} budget)")]
    Alloc {
        tier: Tier,
        bytes: u64,
        reason: String,
    },

    /// The call is not valid in the current state (a caller bug: reading a slot that holds
    /// another chunk, an invalid tensor state transition, a move abandoned mid-way).
    #[error("invalid state: {0}")]
    InvalidState(String),

    /// The request is not supported by this configuration.
    #[error("unsupported: {what}: {why}")]
    Unsupported { what: String, why: String },
}

impl Error {
    /// True when evicting something from a tier and retrying can make the call succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::OverBudget { requested, capacity, .. } if requested <= capacity)
    }

    pub(crate) fn unsupported(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Unsupported {
            what: what.into(),
            why: why.into(),
        }
    }

    /// Maps an I/O error on a path, turning "disk full" into [`Error::NoSpace`].
    pub(crate) fn io(op: IoOp, path: impl Into<PathBuf>, offset: u64, source: std::io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Error::NoSpace { path },
            _ => Error::Io {
                op,
                path,
                offset,
                source,
            },
        }
    }
}
