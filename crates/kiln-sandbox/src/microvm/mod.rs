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
//!   [`crate::net::HostCommands`]), erofs images, the VMM process (its
//!   cgroup is [`crate::cgroup`]'s).
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
pub mod relay;
#[cfg(feature = "testing")]
pub mod schema;

pub use client::{VmmApiError, VmmClient};
pub use config::{MicroVmConfig, MicroVmConfigError, PrewarmSize};
pub use driver::{MicroVmBackends, MicroVmDriver, PoolKey};
