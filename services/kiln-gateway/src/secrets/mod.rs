//! Secrets at rest in the gateway's store: which rows hold sealed values
//! and the pass that seals plaintext rows once ([`rows`]). The sealing
//! itself (AES-256-GCM bound to the row, key files, rotation) is
//! [`kiln_store::seal`], shared with the scheduler's store.

pub mod rows;
#[cfg(test)]
mod store_tests;

pub use kiln_store::seal::*;
