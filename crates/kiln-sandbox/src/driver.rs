//! The contract between the agent and a sandbox backend.

use std::net::SocketAddr;
use std::path::PathBuf;

use kiln_core::{InstanceId, InstanceSpec, SandboxKind};

/// Why a sandbox operation failed. Messages say what failed and what an
/// operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Runtime root filesystem {runtime} is not available: {reason}")]
    RuntimeUnavailable { runtime: String, reason: String },
    #[error("Cannot prepare the instance's network: {0}")]
    Network(String),
    #[error("Cannot prepare the instance's files: {0}")]
    Filesystem(String),
    #[error("The OCI runtime failed: {0}")]
    OciRuntime(String),
    #[error("Node is out of {0}")]
    Exhausted(String),
    #[error("The microVM failed: {0}")]
    Vmm(String),
    #[error("Instance {0} is not known to this sandbox driver")]
    NotFound(InstanceId),
    #[error("The instance's cgroup failed: {0}")]
    Cgroup(String),
    /// Running a command in the instance failed (InstanceExec).
    #[error("Cannot run the command in the instance: {0}")]
    Exec(String),
}

/// What the agent asks a driver to start.
#[derive(Debug, Clone)]
pub struct SandboxRequest {
    pub instance_id: InstanceId,
    pub spec: InstanceSpec,
    /// The function's code, extracted once per node, immutable; the driver
    /// presents it at `/code` through a per-instance writable layer.
    pub code_dir: PathBuf,
}

/// A started sandbox.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub instance_id: InstanceId,
    /// Where the agent reaches the function's runtime port.
    pub endpoint: SocketAddr,
    /// The sandbox's main process on the host, when the backend has one.
    pub pid: Option<u32>,
    /// Where the sandbox's stdout and stderr go.
    pub log_path: PathBuf,
}

/// What a sandbox has used, as its backend measures it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxStats {
    /// CPU time consumed, in microseconds.
    pub cpu_usage_us: u64,
    /// Time its CPU quota held it back, in microseconds.
    pub cpu_throttled_us: u64,
    pub memory_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    /// Processes killed for exceeding the memory limit.
    pub oom_kills: u64,
    /// Processes and threads.
    pub pids: u64,
    /// Bytes received and sent on its network interface, when known.
    pub net_rx_bytes: Option<u64>,
    pub net_tx_bytes: Option<u64>,
    pub frozen: bool,
}

/// One sandbox backend (container or microVM).
#[async_trait::async_trait]
pub trait SandboxDriver: Send + Sync + 'static {
    fn kind(&self) -> SandboxKind;

    /// Create and start a sandbox running `spec.command`. Returns once the
    /// process has been started; the caller waits for its port.
    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, SandboxError>;

    /// Whether the sandbox's main process still runs.
    async fn is_running(&self, id: &InstanceId) -> Result<bool, SandboxError>;

    /// Stop every process of the sandbox in place (cgroup freezer for
    /// containers, `vm.pause` for microVMs); returns once they are stopped.
    /// Freezing a frozen sandbox succeeds.
    async fn freeze(&self, id: &InstanceId) -> Result<(), SandboxError>;

    /// Let a frozen sandbox run again; returns once it runs. Thawing a
    /// sandbox that is not frozen succeeds.
    async fn thaw(&self, id: &InstanceId) -> Result<(), SandboxError>;

    /// What the sandbox has used so far; None when the backend cannot say.
    async fn stats(&self, id: &InstanceId) -> Result<Option<SandboxStats>, SandboxError> {
        let _ = id;
        Ok(None)
    }

    /// Stop the sandbox and remove everything it had: processes, network,
    /// mounts, cgroup, writable files. Idempotent: destroying an unknown or
    /// half-created instance succeeds.
    async fn destroy(&self, id: &InstanceId) -> Result<(), SandboxError>;

    /// Run a command inside the live instance `id` with the function's own
    /// user, namespaces, seccomp filter and cgroup (FC's InstanceExec). The
    /// container backend runs `runc exec`; the microVM backend asks its
    /// guest. Backends without it say so.
    async fn exec(
        &self,
        id: &InstanceId,
        req: &crate::exec::ExecRequest,
    ) -> Result<crate::exec::ExecProcess, SandboxError> {
        let _ = req;
        Err(SandboxError::Exec(format!(
            "the {:?} backend cannot run commands in instance {id}",
            self.kind()
        )))
    }

    /// The instances this driver has on the node (after an agent restart,
    /// for reconciliation with the scheduler).
    async fn list(&self) -> Result<Vec<InstanceId>, SandboxError>;
}
