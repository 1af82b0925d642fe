//! Sandboxes: one [`SandboxDriver`] trait, one implementation per backend.
//!
//! The agent drives every backend the same way: `create` starts the
//! function's command in a fresh, isolated sandbox and says where its
//! runtime port can be reached; the agent then waits for that port,
//! forwards invocations to it, and calls `destroy` when the instance goes,
//! after which nothing the instance wrote is left on the node.
//!
//! # The container backend
//!
//! [`ContainerDriver`] keeps, per instance, `state_dir/instances/<id>/`:
//! `bundle/config.json` and `bundle/rootfs` (the runtime's root filesystem
//! bound read-only), `code` (an overlay of the shared, immutable code dir
//! with the instance's own `upper`/`work`, bound at `/code`), `hosts`
//! (bound read-only at `/etc/hosts`, naming the instance), `console.log`
//! (the process's stdout and stderr) and `instance.json` (what teardown
//! needs). Containers run under `runc --root state_dir/runc` with ids
//! `<name_prefix>-<instance id>`; each gets a netns and host veth named
//! `<name_prefix>-<slot>` and a /30 of `instance_subnet` (host .1,
//! instance .2), taken from a pool of ready namespaces.
//!
//! The driver mounts on the host side: the agent must run it inside its own
//! private mount namespace. [`ContainerDriver::new`] removes everything a
//! previous run with the same `name_prefix` left (containers under its runc
//! root, instance dirs, netns and veths): instances do not outlive the
//! driver that started them.
//!
//! # Tests and the root filesystem cache
//!
//! Building `custom.debian12` runs debootstrap (minutes). The integration
//! tests build it once into `$KILN_ROOTFS_CACHE` (default
//! `/var/cache/kiln-test/rootfs`) and reuse it; builds are guarded by a lock
//! file, so parallel test runs and agents wait for one another.
#![forbid(unsafe_code)]

pub mod bundle;
pub mod cgroup;
pub mod config;
pub mod container;
pub mod disk;
pub mod disk_pool;
pub mod driver;
pub mod exec;
pub mod instance;
pub mod layers;
pub mod microvm;
pub mod mounts;
pub mod net;
pub mod oci_runtime;
pub mod rootfs;
pub mod seccomp;

pub use config::{ContainerConfig, ContainerConfigError, OciRuntimeKind};
pub use container::ContainerDriver;
pub use driver::{Sandbox, SandboxDriver, SandboxError, SandboxRequest};
pub use exec::{ExecChild, ExecProcess, ExecRequest};
pub use microvm::{MicroVmConfig, MicroVmDriver};
pub use net::Ipv4Cidr;
pub use rootfs::rootfs_path;
