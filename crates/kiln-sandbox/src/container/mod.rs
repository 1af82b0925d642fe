//! The container backend: one OCI bundle per instance, run by runc/crun in
//! its own user, PID, mount, IPC, UTS, cgroup and network namespaces.
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
//!
//! Its parts:
//!
//! - [`config`]: the `[sandbox]` section of the agent's configuration.
//! - [`oci_runtime`]: runc/crun behind [`oci_runtime::OciRuntime`].
//! - [`bundle`]: the instance's OCI `config.json`; [`seccomp`] its filter.
//! - [`instance`]: where an instance's files are and the record teardown
//!   needs; `instance_files` makes them.
//! - [`disk`] and [`disk_pool`]: the instance's writable filesystem (a
//!   loop-mounted ext4 image), formatted ahead of time.
//! - [`layers`]: the function's layers as an overlay at `/opt`.
//! - [`image`]: a custom-container function's image as the root.
//! - [`premade`]: pools of sandboxes made ahead of demand, claimed by a
//!   cold start.
//! - `setup`, `lifecycle`, `boost`: [`ContainerDriver`]'s construction and
//!   shutdown, an instance's life, and the cold-start CPU boost.

pub mod bundle;
pub mod config;
pub mod disk;
pub mod disk_pool;
pub mod image;
pub mod instance;
pub mod layers;
pub mod oci_runtime;
pub mod premade;
pub mod seccomp;

mod boost;
mod errors;
mod instance_files;
mod lifecycle;
mod setup;
#[cfg(test)]
mod tests;

pub use setup::prepare_runtime;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kiln_core::InstanceId;
use tokio::task::JoinHandle;

use crate::cgroup::CgroupOps;
use crate::mounts::Mounter;
use crate::net::{NetIsolation, NetPool, NetworkOps};
use config::ContainerConfig;
use disk::DiskOps;
use disk_pool::DiskPool;
use instance::InstanceRecord;
use oci_runtime::OciRuntime;

/// Runs instances as OCI containers. See the module docs for the layout.
pub struct ContainerDriver {
    config: ContainerConfig,
    instances_dir: PathBuf,
    rootfs_dir: PathBuf,
    region: Option<String>,
    oci: Arc<dyn OciRuntime>,
    net: Arc<dyn NetworkOps>,
    mounter: Arc<dyn Mounter>,
    cgroups: Arc<dyn CgroupOps>,
    disk: Arc<dyn DiskOps>,
    /// Pre-formatted images of the default disk size, owned by `uid_base`.
    disk_pool: Arc<DiskPool>,
    disk_pool_dir: PathBuf,
    /// Per instance, the task that ends its cold-start CPU boost.
    boosts: Mutex<HashMap<InstanceId, JoinHandle<()>>>,
    pool: Arc<NetPool>,
    /// Egress modes, VPC attachment and shaping per instance, when the
    /// configuration has a `network` section.
    isolation: Option<Arc<NetIsolation>>,
    refill: Mutex<Option<JoinHandle<()>>>,
    instances: Mutex<HashMap<InstanceId, InstanceRecord>>,
    /// `state_dir/premade`: the pre-made sandboxes' directories.
    premade_dir: PathBuf,
    /// The pools of pre-made sandboxes, when `[sandbox.premade]` is on.
    premade: Option<Arc<premade::Premade>>,
    /// Container ids of instances that run in a claimed pre-made sandbox.
    aliases: Mutex<HashMap<InstanceId, String>>,
}

impl std::fmt::Debug for ContainerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerDriver")
            .field("name_prefix", &self.config.name_prefix)
            .field("instances_dir", &self.instances_dir)
            .finish_non_exhaustive()
    }
}
