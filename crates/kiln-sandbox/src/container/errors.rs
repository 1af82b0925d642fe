//! How the container backend's parts' errors become [`SandboxError`]s.

use crate::driver::SandboxError;
use crate::net::{NetIsolationError, NetworkError};

pub(super) fn fs_err(
    what: impl std::fmt::Display,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SandboxError {
    SandboxError::filesystem(what, e)
}

pub(super) fn cg_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> SandboxError {
    move |e| SandboxError::cgroup(what, e)
}

pub(super) fn net_err(e: NetworkError) -> SandboxError {
    match e {
        NetworkError::Exhausted(_) => SandboxError::Exhausted(e.to_string()),
        other => SandboxError::network("network namespace", other),
    }
}

pub(super) fn isolation_err(e: NetIsolationError) -> SandboxError {
    crate::net::isolation::attach_error(e)
}
