//! Kiln's internal APIs: HTTP/2 over mutual TLS, versioned paths, JSON
//! control messages and raw streamed invocation bodies.
//!
//! Every internal endpoint answers errors as an [`kiln_core::FcError`] in
//! JSON with the FC status code, so an error raised deep inside (an agent's
//! `FunctionNotStarted`) reaches the public caller unchanged.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod authz;
pub mod client;
pub mod endpoints;
pub mod inline;
pub mod invoke;
pub mod invoke_client;
pub mod keys;
pub mod limits;
pub mod messages;
pub mod revoking;
pub mod router;
pub mod server;
pub mod trust;

pub use client::{InternalClient, InternalClientError};
pub use endpoints::Endpoints;
pub use invoke::{InvokeFailure, InvokeOutcome};
pub use invoke_client::InvokeClient;
pub use messages::*;
pub use trust::*;
