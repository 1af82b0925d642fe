//! The contract between the agent and a sandbox backend.

use std::net::SocketAddr;
use std::path::PathBuf;

use kiln_core::{InstanceId, InstanceSpec, SandboxKind};

/// The error a sandbox operation failed on, from whichever part (a host
/// tool, the OCI runtime, the VMM's API, the filesystem) it came.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a sandbox operation failed: what failed, with the error it failed
/// on as its source (`kiln_core::error_chain` prints both). `source` is
/// None when the driver itself found the problem (a missing binary, an
/// exhausted pool). Messages say what an operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("Runtime root filesystem {runtime} is not available: {reason}")]
    RuntimeUnavailable {
        runtime: String,
        reason: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("Cannot prepare the instance's network: {what}")]
    Network {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("Cannot prepare the instance's files: {what}")]
    Filesystem {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("The OCI runtime failed: {what}")]
    OciRuntime {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("Node is out of {0}")]
    Exhausted(String),
    #[error("The microVM failed: {what}")]
    Vmm {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    #[error("Instance {0} is not known to this sandbox driver")]
    NotFound(InstanceId),
    #[error("The instance's cgroup failed: {what}")]
    Cgroup {
        what: String,
        #[source]
        source: Cause,
    },
    /// Running a command in the instance failed (InstanceExec).
    #[error("Cannot run the command in the instance: {what}")]
    Exec {
        what: String,
        #[source]
        source: Option<Cause>,
    },
    /// The node cannot enforce the function's network configuration (no
    /// isolation, a VPC it does not serve): nothing was started.
    #[error("This node cannot enforce the function's network configuration: {0}")]
    Unenforceable(String),
}

fn cause(e: impl std::error::Error + Send + Sync + 'static) -> Option<Cause> {
    Some(Box::new(e))
}

impl SandboxError {
    /// Preparing the network (`what`: the step) failed on `source`.
    pub fn network(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Network {
            what: what.into(),
            source: cause(source),
        }
    }

    /// A file operation on `what` (a path or a part) failed on `source`.
    pub fn filesystem(
        what: impl std::fmt::Display,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Filesystem {
            what: what.to_string(),
            source: cause(source),
        }
    }

    /// The OCI runtime failed `what` on `source`.
    pub fn oci_runtime(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::OciRuntime {
            what: what.into(),
            source: cause(source),
        }
    }

    /// The VMM failed `what` on `source`.
    pub fn vmm(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Vmm {
            what: what.into(),
            source: cause(source),
        }
    }

    /// Running a command failed `what` on `source`.
    pub fn exec(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Exec {
            what: what.into(),
            source: cause(source),
        }
    }

    /// The cgroup operation `what` failed on `source`.
    pub fn cgroup(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Cgroup {
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// The instance spec cannot be run (`source` says why).
    pub fn invalid_spec(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::oci_runtime("Invalid instance spec", source)
    }

    /// The runtime `runtime`'s root filesystem could not be made ready.
    pub fn runtime_unavailable(
        runtime: impl std::fmt::Display,
        reason: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::RuntimeUnavailable {
            runtime: runtime.to_string(),
            reason: reason.into(),
            source: cause(source),
        }
    }
}

/// What the agent asks a driver to start.
#[derive(Debug, Clone)]
pub struct SandboxRequest {
    pub instance_id: InstanceId,
    pub spec: InstanceSpec,
    /// The function's code, extracted once per node, immutable; the driver
    /// presents it at `/code` through a per-instance writable layer.
    pub code_dir: PathBuf,
    /// A custom-container function's image, pulled and unpacked by the
    /// agent: its root filesystem instead of the runtime's tree, and no
    /// `/code`. The spec's command and environment are then the image's
    /// resolved ones.
    pub image: Option<ImageRootfs>,
}

/// What a custom-container instance runs on, resolved from its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRootfs {
    /// The image's unpacked layers, the top one first (overlayfs' lower
    /// order); immutable and shared by every instance of the image.
    pub layers: Vec<PathBuf>,
    /// The image's `WorkingDir` (absolute; `/` when the image sets none).
    pub cwd: String,
    /// The image's `User`, as ids inside the sandbox's user namespace.
    pub uid: u32,
    pub gid: u32,
}

impl SandboxRequest {
    /// The extracted directories of the spec's layers, in the spec's order.
    pub fn layer_dirs(&self) -> Vec<PathBuf> {
        let cache = self.code_dir.parent().unwrap_or(std::path::Path::new("/"));
        self.spec.layers.iter().map(|d| cache.join(d)).collect()
    }
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

    /// The network namespace (a `/run/netns/<name>` file) from whose
    /// loopback the sandbox's endpoint is reached without crossing its
    /// interface, when the backend has one: the agent dials the runtime
    /// from there ([`crate::net::dial`]). None: dial the endpoint as is.
    fn dial_netns(&self, id: &InstanceId) -> Option<PathBuf> {
        let _ = id;
        None
    }

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
        Err(SandboxError::Exec {
            what: format!(
                "the {:?} backend cannot run commands in instance {id}",
                self.kind()
            ),
            source: None,
        })
    }

    /// The instances this driver has on the node (after an agent restart,
    /// for reconciliation with the scheduler).
    async fn list(&self) -> Result<Vec<InstanceId>, SandboxError>;
}
