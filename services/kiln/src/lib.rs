//! The `kiln` CLI: `kiln dev` brings up a one-machine cluster; the other
//! commands drive Kiln's public FC API with signed requests.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod cluster;
pub mod commands;
pub mod credentials;
pub mod dev_config;
pub mod loadgen;
pub mod output;
pub mod project;
pub mod registry;
pub mod serve;
pub mod service_runtime;
pub mod signing;
pub mod zipdir;
