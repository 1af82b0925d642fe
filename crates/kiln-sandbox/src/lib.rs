//! Sandboxes: one [`SandboxDriver`] trait, one implementation per backend.
//!
//! The agent drives every backend the same way: `create` starts the
//! function's command in a fresh, isolated sandbox and says where its
//! runtime port can be reached; the agent then waits for that port,
//! forwards invocations to it, and calls `destroy` when the instance goes,
//! after which nothing the instance wrote is left on the node.
//!
//! # Layout
//!
//! - [`driver`]: the contract ([`SandboxDriver`], [`SandboxError`]).
//! - [`container`]: the container backend (OCI bundles run by runc/crun).
//! - [`microvm`]: the microVM backend (cloud-hypervisor).
//! - Shared by both: [`pool_policy`] (sizing and refilling the pools of
//!   ready sandboxes), [`net`] (namespaces, taps' isolation, VPCs,
//!   bandwidth), [`cgroup`], [`process`] (the function's process and
//!   environment), [`rootfs`] (runtime root filesystems), [`mounts`],
//!   [`exec`] (InstanceExec sessions).
//!
//! # Tests and the root filesystem cache
//!
//! Building `custom.debian12` runs debootstrap (minutes). The integration
//! tests build it once into `$KILN_ROOTFS_CACHE` (default
//! `/var/cache/kiln-test/rootfs`) and reuse it; builds are guarded by a lock
//! file, so parallel test runs and agents wait for one another.
// No unsafe code, except in `microvm::launch` (clone(2) and the raw
// system calls of the jailed VMM's child, each with its SAFETY note).
#![deny(unsafe_code)]

pub mod cgroup;
pub mod container;
pub mod driver;
pub mod exec;
pub mod microvm;
pub mod mounts;
pub mod net;
pub mod pool_policy;
pub mod process;
pub mod rootfs;

pub use container::config::{ContainerConfig, ContainerConfigError, OciRuntimeKind};
pub use container::ContainerDriver;
pub use driver::{ImageRootfs, Sandbox, SandboxDriver, SandboxError, SandboxRequest};
pub use exec::{ExecChild, ExecProcess, ExecRequest};
pub use microvm::{MicroVmConfig, MicroVmDriver};
pub use net::Ipv4Cidr;
pub use rootfs::rootfs_path;
