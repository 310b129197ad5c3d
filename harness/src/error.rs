//! Errors of the harness: each names the problem and, where there is one, the fix.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A bad option or model spec.
    #[error("{0}")]
    Config(String),
    /// A malformed dataset line.
    #[error("{file}:{line}: {msg}")]
    Data { file: PathBuf, line: usize, msg: String },
    /// The model cannot be placed even with offload.
    #[error("the model does not fit: {0}")]
    DoesNotFit(String),
    #[error(transparent)]
    Memory(#[from] stowage_memory::Error),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, HarnessError>;

impl HarnessError {
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HarnessError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
