//! The `microvm` sandbox backend: one cloud-hypervisor microVM per
//! instance, driven through cloud-hypervisor's REST API on a unix socket.
//!
//! - [`api`]: request/response types of the API (`cloud-hypervisor-openapi.yaml`).
//! - [`client`]: [`VmmClient`], a thin typed client over the API socket.
//! - `schema` (feature `testing`): checks JSON bodies against the OpenAPI
//!   component schemas.
//! - [`driver`]: [`MicroVmDriver`], the [`crate::SandboxDriver`] (pool,
//!   snapshot/restore, freeze = `vm.pause`, thaw = `vm.resume`).
//! - [`relay`]: the per-instance loopback HTTP listener that carries the
//!   agent's calls to kiln-guest over vsock.
//! - [`host`]: taps (through `ip` or the network isolation's
//!   [`crate::net::HostCommands`]) and erofs images.
//! - [`jail`]: the VMM jail (own uid/gid, mount and PID namespaces, chroot,
//!   no capabilities), as a [`jail::JailPlan`] the tests can inspect.
//! - [`launch`]: starting the VMM process (jailed or not) in its cgroup.
//! - `fake` (feature `testing`): the fake cloud-hypervisor the tests run
//!   (`fake-cloud-hypervisor`).
//! - [`config`]: the `sandbox.microvm` section of the agent's configuration.

pub mod api;
pub mod client;
pub mod config;
pub mod driver;
#[cfg(feature = "testing")]
pub mod fake;
pub mod host;
pub mod jail;
#[allow(unsafe_code)]
pub mod launch;
pub mod relay;
#[cfg(feature = "testing")]
pub mod schema;

pub use client::{VmmApiError, VmmClient};
pub use config::{JailConfig, MicroVmConfig, MicroVmConfigError, PrewarmSize, VmPremadeConfig};
pub use driver::{MicroVmBackends, MicroVmDriver, PoolKey};
