//! The Stowage harness: GPT models whose parameters live in Stowage chunks, bridged to libtorch
//! with tch; the naive and chunked training strategies; data, tokenizers, SFT and reward-model
//! training; the command line's subcommands as a library, so they can be tested and embedded.

pub mod bridge;
pub mod engine;
pub mod error;
pub mod info;
pub mod model;
pub mod optim;

pub use error::{HarnessError, Result};
