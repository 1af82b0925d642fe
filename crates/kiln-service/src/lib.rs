//! The scaffold every Kiln service binary runs in, so each `main.rs` is a
//! few lines: parse `--config` and `--log-format`, start tracing, load and
//! validate the config, start the service, wait for SIGTERM or SIGINT, stop
//! it gracefully, and map the outcome to an exit code with the error's
//! whole chain printed once.
//!
//! ```text
//! fn main() -> ExitCode {
//!     let args = Args::parse();
//!     kiln_service::Service::new("kiln-gateway", &args.config, &args.log)
//!         .run(GatewayConfig::load, kiln_gateway::start, |h| h.shutdown())
//! }
//! ```
#![forbid(unsafe_code)]

pub mod logging;
mod run;
pub mod signals;

pub use logging::{LogArgs, LogFormat, Output};
pub use run::{exit, Service};
