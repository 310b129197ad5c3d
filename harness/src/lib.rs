//! The Stowage harness: the command line's subcommands as a library, so they can be tested
//! and embedded. Until the training pipeline lands it reports the memory tiers.

pub mod info;
