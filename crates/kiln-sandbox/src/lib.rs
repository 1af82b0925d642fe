//! Sandboxes: one [`SandboxDriver`] trait, one implementation per backend.
//!
//! The agent drives every backend the same way: `create` starts the
//! function's command in a fresh, isolated sandbox and says where its
//! runtime port can be reached; the agent then waits for that port,
//! forwards invocations to it, and calls `destroy` when the instance goes,
//! after which nothing the instance wrote is left on the node.
#![forbid(unsafe_code)]

pub mod driver;

pub use driver::{Sandbox, SandboxDriver, SandboxError, SandboxRequest};
