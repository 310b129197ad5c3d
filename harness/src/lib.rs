//! The Stowage harness: GPT models whose parameters live in Stowage chunks, bridged to libtorch
//! with tch; the naive and chunked training strategies; tokenizers, datasets and built-in tasks;
//! SFT and reward-model training; the command line's subcommands as a library, so they can be
//! tested and embedded.

pub mod bench;
pub mod bridge;
pub mod ckpt;
pub mod data;
pub mod engine;
pub mod error;
pub mod generate;
pub mod info;
pub mod model;
pub mod optim;
pub mod plot;
pub mod ppo;
pub mod rm;
pub mod record;
pub mod tasks;
pub mod tokenizer;
pub mod train;
pub mod weights;

pub use error::{HarnessError, Result};
