//! Kiln's scheduling service.
#![forbid(unsafe_code)]

pub mod config;
pub mod placement;
