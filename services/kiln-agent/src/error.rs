//! What can stop the agent from starting or running.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::config::ConfigError;

/// Why the agent could not start (or keep running).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    #[error("Cannot load the agent's TLS material")]
    Pki(#[from] kiln_pki::PkiError),
    #[error("The agent's certificate does not name its node")]
    Identity(#[from] crate::registration::NodeIdentityError),
    #[error("Cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("Cannot use the agent's state at {path}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot join the cluster with the bootstrap token: {0}")]
    Bootstrap(String),
    #[error("The sandbox backend failed")]
    Sandbox(#[from] kiln_sandbox::SandboxError),
    #[error("Cannot enter a private mount namespace ({step})")]
    MountNamespace {
        step: &'static str,
        #[source]
        source: nix::Error,
    },
}
