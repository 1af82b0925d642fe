//! [`MicroVmDriver`]: one cloud-hypervisor process per instance.
//!
//! Per VM, `state_dir/microvm/vms/<prefix>-<slot>/` holds `vmm.log` (the
//! VMM's own output), `function.log` and `vm.json` (what cleanup after a
//! crash needs), and the VMM's own files: `api.sock` (the VMM's API),
//! `vsock.sock` (hybrid vsock to kiln-guest), `console.log` (the guest's
//! serial console) and `scratch.img` (the instance's writable disk). With
//! the jail (see [`super::jail`], the default) those are in the VM
//! directory's `root/`, the VMM's chroot, beside hard links of its disk
//! images (`disk-<id>.img`), its kernel, initramfs and binary; the VMM
//! names them from `/`. Without it they are in the VM directory itself.
//! The tap and the VMM's cgroup carry the VM's name.
//! Read-only disk images live in `state_dir/microvm/images/`, built once per
//! runtime, per code digest and per layer digest; snapshots in
//! `state_dir/microvm/snapshots/`.
//!
//! A VM is booted (or restored) as a *base*: kernel, initramfs, runtime
//! disk, tap, vsock, serial, and kiln-guest reporting Ready. A base that
//! waits in the pool is paused.
//!
//! # The pool and the claim protocol
//!
//! With `[sandbox.microvm.premade]` the driver keeps paused bases per
//! (runtime, memory, vCPUs) — a VM's size is fixed at boot — sized and
//! refilled by the policy the container backend's pre-made sandboxes
//! follow ([`crate::pool_policy`]): demand per size over
//! `demand_window_s`, at least one for a `prewarm` size, at most
//! `max_per_runtime`, all within `budget_mb` with each paused VM charged
//! its guest memory size, nothing under memory pressure; one background
//! task removes surplus VMs and makes missing ones, deferring to ordinary
//! cold starts. A base holds no tenant data: runtime disk only, its tap in
//! no egress map (the isolation table drops what it sends), no function
//! configuration.
//!
//! Giving a base to an instance (a *claim*; the same protocol as a
//! container's, with the guest channel in place of `kiln-init`'s FIFO):
//!
//! 1. the function's policy: its tap is attached to the network isolation
//!    with the function's egress mode, VPC and bandwidth class; its limits
//!    are the VM's size and the VMM's cgroup, which the pool key matches
//!    to the function's memory and vCPUs;
//! 2. the VM is resumed and the guest connection checked;
//! 3. code and disks: the function's layers (read-only, in the function's
//!    order), the code (read-only) and scratch, by `vm.add-disk`;
//! 4. the guest configuration (`GuestConfig`: disks, network, command,
//!    environment) over vsock, on which kiln-guest mounts the disks and
//!    only then starts the function's process.
//!
//! A cold boot (no pooled VM) keeps the same order: the tap is attached
//! before `vm.create`, whose config carries the same disks in the same
//! order, so the guest sees the same devices either way. Either way the
//! instance's relay (see [`super::relay`]) then starts; its loopback
//! address is the sandbox endpoint. A claimed base serves one instance of
//! one function: it leaves the pool at the claim and is destroyed with the
//! instance (never returned), so two accounts never share one. Pooled VMs
//! are named like every other VM (`<prefix>-<slot>`), so a killed agent's
//! next start removes them with its other leftovers.
//!
//! With `[sandbox.network]` ([`MicroVmDriver::with_net_isolation`]) each
//! tap `<prefix>-<hex>` is an instance interface of [`crate::net`]: the
//! host end holds `.1` of the VM's /30, the guest is given `.2` with `.1`
//! as its gateway, and that `.2` is the address the isolation's
//! anti-spoofing rule accepts from the tap.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use kiln_core::{InstanceId, RuntimeName, SandboxKind};
use kiln_guest_proto::vsock::{connect_hybrid_vsock_retry, GUEST_VSOCK_PORT};
use kiln_guest_proto::{
    Disk, DiskConfig as GuestDisks, FsType, GuestClient, GuestConfig, NetworkConfig, ProcessConfig,
};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::api::{
    ConsoleConfig, ConsoleMode, CpusConfig, DiskConfig, MemoryConfig, NetConfig, PayloadConfig,
    VmConfig, VsockConfig,
};
use super::client::{VmmApiError, VmmClient};
use super::config::MicroVmConfig;
use super::host::{build_erofs, CommandTaps, HostError, TapOps, TapSpec};
use super::jail::{self, JailPlan, VmmVersion};
use super::launch::{VmmCommand, VmmProcess};
use super::relay::Relay;
use crate::cgroup::{CgroupLimits, CgroupOps};
use crate::driver::{Sandbox, SandboxDriver, SandboxError, SandboxRequest, SandboxStats};
use crate::net::{
    BandwidthClass, HostCommands, HostInterface, NetIsolation, NetIsolationError,
    NetworkConfig as IsolationConfig,
};
use crate::pool_policy::{self, Demand, Meminfo, Pacer, Want};
use crate::process;
use crate::rootfs::rootfs_path;

/// The guest's CID (any value >= 3; every VM has its own vsock device).
const GUEST_CID: u64 = 3;
/// How long a VMM has to exit after `vmm.shutdown` before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

fn vmm_err(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> SandboxError {
    SandboxError::vmm(what, e)
}

/// A VMM failure the driver found itself (no error to carry).
fn vmm_fail(what: String) -> SandboxError {
    SandboxError::Vmm { what, source: None }
}

fn fs_err(
    what: impl std::fmt::Display,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SandboxError {
    SandboxError::filesystem(what, e)
}

/// A file problem the driver found itself (no error to carry).
fn fs_fail(what: String) -> SandboxError {
    SandboxError::Filesystem { what, source: None }
}

fn isolation_err(e: NetIsolationError) -> SandboxError {
    crate::net::isolation::attach_error(e)
}

fn host_err(e: HostError) -> SandboxError {
    match e {
        HostError::Io { .. } => SandboxError::filesystem("VMM files", e),
        other => SandboxError::network("tap", other),
    }
}

/// Find `name` on PATH.
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// VMs in the pool are interchangeable when these match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub runtime: RuntimeName,
    pub memory_mb: u32,
    pub vcpus: u32,
}

impl PoolKey {
    pub fn new(runtime: RuntimeName, memory_mb: u32, cpu_milli: u32) -> Self {
        Self {
            runtime,
            memory_mb,
            vcpus: cpu_milli.div_ceil(1000).clamp(1, 16),
        }
    }

    fn dir_name(&self) -> String {
        format!("{}-{}m-{}c", self.runtime, self.memory_mb, self.vcpus)
    }

    /// What a paused VM of this size is charged against the pool's
    /// budget: its guest memory.
    pub fn cost_mb(&self) -> u64 {
        u64::from(self.memory_mb)
    }

    /// The order pools of equal demand are served in.
    fn order(&self, other: &Self) -> std::cmp::Ordering {
        (self.runtime.as_str(), self.memory_mb, self.vcpus).cmp(&(
            other.runtime.as_str(),
            other.memory_mb,
            other.vcpus,
        ))
    }
}

/// A cold boot for an instance: its read-only disks (layers, code), the
/// size of its scratch disk, and the function whose policy is attached.
struct ColdBootFor<'a> {
    readonly: &'a [(PathBuf, String)],
    disk_mb: u32,
    spec: &'a kiln_core::InstanceSpec,
}

/// The paused VMs of the pool and those being made, per size.
#[derive(Default)]
struct PoolState {
    ready: HashMap<PoolKey, VecDeque<Vm>>,
    making: HashMap<PoolKey, usize>,
}

impl PoolState {
    /// Ready and being made.
    fn have(&self, key: &PoolKey) -> usize {
        self.ready.get(key).map_or(0, VecDeque::len) + self.making.get(key).copied().unwrap_or(0)
    }

    /// What the ready and the VMs being made are charged, in MiB.
    fn charged_mb(&self) -> u64 {
        let ready = self.ready.iter().map(|(k, q)| k.cost_mb() * q.len() as u64);
        let making = self.making.iter().map(|(k, n)| k.cost_mb() * *n as u64);
        ready.chain(making).sum()
    }

    /// Count one VM of `key` as being made.
    fn reserve(&mut self, key: PoolKey) {
        *self.making.entry(key).or_default() += 1;
    }

    fn made(&mut self, key: PoolKey) {
        if let Some(n) = self.making.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.making.remove(&key);
            }
        }
    }
}

/// `vm.json`: what cleanup after an agent crash needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmRecord {
    pid: Option<u32>,
    instance_id: Option<InstanceId>,
}

/// One VMM process and everything it holds on the host.
struct Vm {
    name: String,
    slot: u32,
    dir: PathBuf,
    /// Where the VMM's own files are on the host: `dir/root` (its chroot)
    /// when jailed, else `dir`.
    root: PathBuf,
    jailed: bool,
    /// The uid and gid the VMM runs as (None: the agent's).
    uid: Option<u32>,
    gid: Option<u32>,
    /// The runtime's disk image as the VMM names it.
    runtime_disk: Option<String>,
    key: PoolKey,
    host_addr: Ipv4Addr,
    guest_addr: Ipv4Addr,
    /// Whether the network isolation holds rules and shaping for the tap.
    attached: bool,
    child: Mutex<Option<VmmProcess>>,
    pid: Option<u32>,
    client: VmmClient,
    guest: Option<GuestClient>,
    /// Disks attached so far (the guest sees them as vda, vdb, ...).
    disks: usize,
}

impl Vm {
    /// The host path of the VMM's file `rel`.
    fn host_path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    /// The path the VMM uses for its file `rel`: from its chroot's `/`
    /// when jailed.
    fn vmm_path(&self, rel: &str) -> String {
        if self.jailed {
            JailPlan::inside(rel)
        } else {
            self.root.join(rel).display().to_string()
        }
    }
    fn vsock_socket(&self) -> PathBuf {
        self.host_path("vsock.sock")
    }
    /// Give the VMM's user `path` (a file or directory the VMM writes).
    fn chown(&self, path: &Path) -> Result<(), SandboxError> {
        if self.uid.is_some() {
            std::os::unix::fs::chown(path, self.uid, self.gid)
                .map_err(|e| fs_err(path.display(), e))?;
        }
        Ok(())
    }
    /// The tap as the network isolation sees it: the guest's address is
    /// the one source it accepts from it.
    fn interface(&self) -> HostInterface {
        HostInterface {
            name: self.name.clone(),
            instance_addr: self.guest_addr,
        }
    }
    fn exited(&self) -> Option<String> {
        let child = self.child.lock().expect("lock");
        match child.as_ref().map(VmmProcess::try_wait) {
            None => Some("the VMM was not started".into()),
            Some(None) => None,
            Some(Some(status)) => Some(format!("the VMM exited ({status})")),
        }
    }
    fn console_tail(&self) -> String {
        let mut tail = String::new();
        for (file, path) in [
            ("vmm.log", self.dir.join("vmm.log")),
            ("console.log", self.host_path("console.log")),
        ] {
            if let Ok(text) = std::fs::read_to_string(path) {
                let lines: Vec<&str> = text.lines().rev().take(5).collect();
                if !lines.is_empty() {
                    let joined: Vec<&str> = lines.into_iter().rev().collect();
                    tail.push_str(&format!("; {file}: {}", joined.join(" | ")));
                }
            }
        }
        tail
    }
}

struct Instance {
    vm: Vm,
    _relay: Relay,
    /// Copies the function's output from the guest into `function.log`.
    logs: Option<tokio::task::JoinHandle<()>>,
}

/// Append the function's output lines (stdout and stderr, as the guest
/// sends them) to `path`, the sandbox's log; kiln-guest's own lines go to
/// the agent's log.
fn spawn_log_writer(
    guest: &GuestClient,
    path: PathBuf,
    vm: String,
) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::io::AsyncWriteExt;
    let mut lines = guest.take_logs()?;
    Some(tokio::spawn(async move {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await;
        let mut file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(vm = %vm, error = %kiln_core::error_chain(&e), "cannot open the function's log");
                return;
            }
        };
        while let Some(l) = lines.recv().await {
            if l.stream == kiln_guest_proto::LogStream::Guest {
                tracing::info!(vm = %vm, line = %l.line, "kiln-guest");
                continue;
            }
            let mut bytes = l.line.into_bytes();
            bytes.push(b'\n');
            if file.write_all(&bytes).await.is_err() {
                return;
            }
            let _ = file.flush().await;
        }
    }))
}

/// Runs instances as cloud-hypervisor microVMs. See the module docs.
pub struct MicroVmDriver {
    inner: Arc<Inner>,
}

struct Inner {
    config: MicroVmConfig,
    binary: PathBuf,
    mkfs_erofs: PathBuf,
    mkfs_ext4: PathBuf,
    vms_dir: PathBuf,
    images_dir: PathBuf,
    snapshots_dir: PathBuf,
    rootfs_dir: PathBuf,
    region: Option<String>,
    vmm_env: Vec<(String, String)>,
    /// With the jail: what cloud-hypervisor --version said, and the
    /// loader and libraries of a dynamically linked binary.
    version: Option<VmmVersion>,
    libraries: Vec<PathBuf>,
    taps: Arc<dyn TapOps>,
    cgroups: Arc<dyn CgroupOps>,
    /// `[sandbox.network]`: set once, before the first instance.
    isolation: OnceLock<Arc<NetIsolation>>,
    slots: Mutex<BTreeSet<u32>>,
    instances: Mutex<HashMap<InstanceId, Arc<Instance>>>,
    pool: Mutex<PoolState>,
    /// Cold starts per size, which size the pools.
    demand: Mutex<Demand<PoolKey>>,
    /// Sizes kept at least one paused VM (`prewarm`, [`MicroVmDriver::prewarm`]).
    floors: Mutex<HashSet<PoolKey>>,
    pacer: Arc<Pacer>,
    meminfo: Mutex<Meminfo>,
    refill: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Set by `shutdown`: the refill ends and makes nothing more.
    stopping: AtomicBool,
    images_lock: tokio::sync::Mutex<()>,
    snapshot_lock: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for MicroVmDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVmDriver")
            .field("name_prefix", &self.inner.config.name_prefix)
            .field("vms_dir", &self.inner.vms_dir)
            .finish_non_exhaustive()
    }
}

/// What [`MicroVmDriver::with_backends`] takes besides the configuration.
pub struct MicroVmBackends {
    pub taps: Arc<dyn TapOps>,
    /// The VMMs' cgroups, `/<cgroup_parent>/<vm name>`.
    pub cgroups: Arc<dyn CgroupOps>,
    /// Extra environment for every VMM (the fake VMM's switches in tests).
    pub vmm_env: Vec<(String, String)>,
}

impl MicroVmDriver {
    /// The real driver: taps through `ip`, cgroups under /sys/fs/cgroup.
    pub async fn new(config: MicroVmConfig, state_dir: &Path) -> Result<Self, SandboxError> {
        let cgroups = crate::cgroup::host();
        Self::with_backends(
            config,
            state_dir,
            MicroVmBackends {
                taps: Arc::new(CommandTaps::new(Arc::new(crate::net::SystemCommands))),
                cgroups,
                vmm_env: vec![],
            },
        )
        .await
    }

    pub async fn with_backends(
        config: MicroVmConfig,
        state_dir: &Path,
        backends: MicroVmBackends,
    ) -> Result<Self, SandboxError> {
        config.validate().map_err(|e| vmm_err("configuration", e))?;
        let binary = match &config.cloud_hypervisor_path {
            Some(p) if p.is_file() => p.clone(),
            Some(p) => {
                return Err(vmm_fail(format!(
                    "cloud_hypervisor_path {} does not exist; fix it in [sandbox.microvm]",
                    p.display()
                )))
            }
            None => find_binary("cloud-hypervisor")
                .ok_or_else(|| {
                    vmm_fail(
                        "cloud-hypervisor is not installed (not found on PATH); install it or set cloud_hypervisor_path".into(),
                    )
                })?,
        };
        for (what, p) in [("kernel", &config.kernel), ("initramfs", &config.initramfs)] {
            if !p.is_file() {
                return Err(SandboxError::RuntimeUnavailable {
                    runtime: "guest image".into(),
                    reason: format!(
                        "the guest {what} {} does not exist; build it with images/guest/build.sh",
                        p.display()
                    ),
                    source: None,
                });
            }
        }
        let tool = |name: &str| {
            find_binary(name)
                .ok_or_else(|| fs_fail(format!("{name} is not installed (not found on PATH)")))
        };
        let mkfs_erofs = tool("mkfs.erofs")?;
        let mkfs_ext4 = tool("mkfs.ext4")?;
        let base = state_dir.join("microvm");
        let vms_dir = base.join("vms");
        let images_dir = base.join("images");
        let snapshots_dir = base.join("snapshots");
        for dir in [&base, &vms_dir, &images_dir, &snapshots_dir] {
            std::fs::create_dir_all(dir).map_err(|e| fs_err(dir.display(), e))?;
            // The VMM may run as another user: it must reach its own dir
            // and read the images.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| fs_err(dir.display(), e))?;
        }
        let rootfs_dir = config
            .rootfs_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("rootfs"));
        let (version, libraries) = if config.jail.enabled() {
            let version = jail::probe_version(&binary, &backends.vmm_env)
                .await
                .map_err(|e| vmm_fail(format!("{e}; the jail needs to know the version")))?;
            let libraries = jail::shared_libraries(&binary)
                .await
                .map_err(|e| vmm_err("preparing the VMM jail", e))?;
            tracing::info!(
                version = %version.text,
                landlock = version.supports_landlock(),
                uid_base = config.jail.uid_base,
                uid_count = config.jail.uid_count,
                libraries = libraries.len(),
                "cloud-hypervisor VMMs run jailed"
            );
            if !version.supports_landlock() {
                tracing::warn!(
                    version = %version.text,
                    "cloud-hypervisor before v{}.{} has no --landlock; VMMs run jailed without it",
                    jail::LANDLOCK_SINCE.0,
                    jail::LANDLOCK_SINCE.1
                );
            }
            (Some(version), libraries)
        } else {
            tracing::warn!(
                "sandbox.microvm.jail.insecure_disabled = true: cloud-hypervisor VMMs run WITHOUT the jail (no own uid, namespaces, chroot or capability drop); a VMM escape reaches the whole node. Only for a dedicated development node."
            );
            (None, vec![])
        };
        let floors: HashSet<PoolKey> = config
            .prewarm
            .iter()
            .map(|size| PoolKey::new(size.runtime, size.memory_mb, size.cpu_milli()))
            .collect();
        let inner = Arc::new(Inner {
            config,
            binary,
            mkfs_erofs,
            mkfs_ext4,
            vms_dir,
            images_dir,
            snapshots_dir,
            rootfs_dir,
            region: None,
            vmm_env: backends.vmm_env,
            version,
            libraries,
            taps: backends.taps,
            cgroups: backends.cgroups,
            isolation: OnceLock::new(),
            slots: Mutex::new(BTreeSet::new()),
            instances: Mutex::new(HashMap::new()),
            pool: Mutex::new(PoolState::default()),
            demand: Mutex::new(Demand::default()),
            floors: Mutex::new(floors),
            pacer: Arc::new(Pacer::default()),
            meminfo: Mutex::new(Meminfo::default()),
            refill: Mutex::new(None),
            stopping: AtomicBool::new(false),
            images_lock: tokio::sync::Mutex::new(()),
            snapshot_lock: tokio::sync::Mutex::new(()),
        });
        inner.clean_leftovers().await?;
        Ok(Self { inner })
    }

    /// The region the functions see in `FC_REGION`. Call before use.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.region = Some(region.into());
        }
        self
    }

    pub fn config(&self) -> &MicroVmConfig {
        &self.inner.config
    }

    /// Isolate every instance's tap with `isolation` (started with this
    /// driver's `name_prefix`, so the taps are its instance interfaces):
    /// attached when an instance gets its VM (a cold-booted one or one
    /// from the pool; pooled VMs wait unattached, and the table's base
    /// rules drop whatever an unattached tap sends), detached before the
    /// tap is removed. Call before the first instance.
    pub fn with_net_isolation(self, isolation: Arc<NetIsolation>) -> Self {
        if self.inner.isolation.set(isolation).is_err() {
            tracing::warn!("network isolation was already set; keeping the first");
        }
        self
    }

    /// Start the network isolation for `config` under this driver's
    /// `name_prefix` (removing what a previous run left) and use it.
    pub async fn isolate_network(
        self,
        config: IsolationConfig,
        cmd: Arc<dyn HostCommands>,
    ) -> Result<Self, SandboxError> {
        let isolation = NetIsolation::start(&self.inner.config.name_prefix, config, cmd)
            .await
            .map_err(isolation_err)?;
        Ok(self.with_net_isolation(Arc::new(isolation)))
    }

    pub fn net_isolation(&self) -> Option<&Arc<NetIsolation>> {
        self.inner.isolation.get()
    }

    /// Where memory pressure is read (default `/proc/meminfo`; tests
    /// give a file of the same format). Call before use.
    pub fn with_meminfo(self, path: impl Into<PathBuf>) -> Self {
        *self.inner.meminfo.lock().expect("lock") = Meminfo { path: path.into() };
        self
    }

    /// Start the pools' background refill (`[sandbox.microvm.premade]`;
    /// the agent calls it at start, once the runtimes' images are built):
    /// every `prewarm` size is filled first, before any function of that
    /// size was seen. Without the pools, nothing.
    pub fn start_prewarm(&self) {
        if !self.inner.config.premade.enabled {
            return;
        }
        for size in &self.inner.config.prewarm {
            let key = PoolKey::new(size.runtime, size.memory_mb, size.cpu_milli());
            tracing::info!(?key, "pre-warming the microVM pool");
        }
        Inner::ensure_refill(&self.inner);
    }

    /// Paused VMs waiting in the pool for `key`.
    pub fn pooled(&self, key: PoolKey) -> usize {
        self.inner
            .pool
            .lock()
            .expect("lock")
            .ready
            .get(&key)
            .map_or(0, VecDeque::len)
    }

    /// Keep `key`'s pool (as a `prewarm` size) and fill it to its target
    /// now; returns once it is full. Refused without the pools.
    pub async fn prewarm(&self, key: PoolKey) -> Result<(), SandboxError> {
        if !self.inner.config.premade.enabled {
            return Err(vmm_fail(
                "the microVM pool is off; set [sandbox.microvm.premade] enabled = true".into(),
            ));
        }
        self.inner.floors.lock().expect("lock").insert(key);
        Inner::ensure_refill(&self.inner);
        self.inner.fill_pool(key).await
    }

    /// Build the runtime's root filesystem (as the container backend does:
    /// debootstrap for `custom.debian12`, minutes the first time) unless it
    /// is cached, then its read-only disk image. Call at agent start.
    pub async fn ensure_runtime(&self, runtime: RuntimeName) -> Result<(), SandboxError> {
        if runtime.is_container_image() {
            return Err(SandboxError::RuntimeUnavailable {
                runtime: runtime.to_string(),
                reason: "custom-container functions run on container nodes only".into(),
                source: None,
            });
        }
        if runtime != RuntimeName::Custom {
            let builder = crate::rootfs::RootfsBuilder {
                dir: &self.inner.rootfs_dir,
                mirror: None,
                mounter: &crate::mounts::HostMounter,
            };
            builder
                .ensure(runtime)
                .await
                .map_err(|e| SandboxError::runtime_unavailable(runtime, "building it failed", e))?;
        }
        self.inner.runtime_image(runtime).await.map(|_| ())
    }

    /// Destroy the pooled VMs and, when no instance is left, remove the
    /// network isolation's table and bridges. Instances are left to the
    /// caller (those left running stay confined by their rules; the next
    /// start removes both).
    pub async fn shutdown(&self) -> Result<(), SandboxError> {
        // Let a VM being made finish (and be disposed of below or by the
        // refill) rather than abandon it half made.
        self.inner.stopping.store(true, Ordering::Release);
        self.inner.pacer.wake();
        let task = self.inner.refill.lock().expect("lock").take();
        if let Some(mut task) = task {
            if tokio::time::timeout(Duration::from_secs(60), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("the microVM pool's refill did not stop within 60 s");
                task.abort();
            }
        }
        let vms: Vec<Vm> = self
            .inner
            .pool
            .lock()
            .expect("lock")
            .ready
            .drain()
            .flat_map(|(_, v)| v)
            .collect();
        let mut first = None;
        for vm in vms {
            if let Err(e) = self.inner.dispose(vm).await {
                first.get_or_insert(e);
            }
        }
        if let Some(isolation) = self.inner.isolation.get() {
            let running = self.inner.instances.lock().expect("lock").len();
            if running == 0 {
                if let Err(e) = isolation.shutdown().await {
                    first.get_or_insert(isolation_err(e));
                }
            } else {
                tracing::info!(
                    running,
                    table = isolation.table(),
                    "network isolation kept for the instances left running"
                );
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Inner {
    /// The VMM's cgroup: `/<cgroup_parent>/<vm name>`, the name its tap has.
    fn cgroup_path(&self, vm_name: &str) -> String {
        format!("/{}/{vm_name}", self.config.cgroup_parent)
    }

    fn jailed(&self) -> bool {
        self.config.jail.enabled()
    }

    /// The uid and gid of the VMM in `slot`: its own from the jail's
    /// range, or the configured one without the jail.
    fn uid_gid(&self, slot: u32) -> (Option<u32>, Option<u32>) {
        if self.jailed() {
            let uid = self.config.jail.uid_range().of_slot(slot);
            (uid, uid)
        } else {
            (
                self.config.vmm_uid,
                self.config.vmm_gid.or(self.config.vmm_uid),
            )
        }
    }

    /// A free slot. With the jail a slot is also a uid (`uid_base + slot`):
    /// there are at most `uid_count`, and a slot whose uid still runs a
    /// process (one a previous agent left and could not kill) is skipped,
    /// so no uid is handed out while anything holds it.
    fn alloc_slot(&self) -> Result<u32, SandboxError> {
        let mut slots = self.slots.lock().expect("lock");
        let mut max = self.config.instance_subnet.slots();
        if self.jailed() {
            max = max.min(self.config.jail.uid_count);
        }
        for slot in (0..max).filter(|i| !slots.contains(i)) {
            if self.jailed() {
                let uid = self.config.jail.uid_base + slot;
                let holders = jail::processes_of_uid(uid);
                if !holders.is_empty() {
                    tracing::warn!(
                        slot,
                        uid,
                        ?holders,
                        "skipping a VM slot whose uid still runs processes"
                    );
                    continue;
                }
            }
            slots.insert(slot);
            return Ok(slot);
        }
        Err(SandboxError::Exhausted(format!(
            "microVM slots: all {max} are in use{}",
            if self.jailed() {
                " (the jail's uid range and the instance subnet bound them)"
            } else {
                ""
            }
        )))
    }

    /// Remove a VM directory, unless the agent's mount namespace has
    /// something mounted below it (a jail's mounts live in the VMM's own
    /// namespace; one here would mean a bug, and removing files through a
    /// mount would delete what it shows).
    fn remove_vm_dir(&self, dir: &Path) -> Result<(), SandboxError> {
        let mounts = jail::mounts_under(dir);
        if !mounts.is_empty() {
            return Err(fs_fail(format!(
                "{} is not removed: {} is mounted below it; unmount it and restart the agent",
                dir.display(),
                mounts[0].display()
            )));
        }
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(fs_err(dir.display(), e)),
        }
    }

    /// Remove what a previous run with this prefix left: VMM processes
    /// (only those whose command line names their own VM directory), VM
    /// directories, taps and cgroups.
    async fn clean_leftovers(&self) -> Result<(), SandboxError> {
        let entries =
            std::fs::read_dir(&self.vms_dir).map_err(|e| fs_err(self.vms_dir.display(), e))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            tracing::info!(vm = %name, "removing leftover microVM");
            let record: Option<VmRecord> = std::fs::read(dir.join("vm.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(pid) = record.and_then(|r| r.pid) {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let ours = String::from_utf8_lossy(&cmdline)
                    .contains(&dir.join("api.sock").to_string_lossy().into_owned());
                if ours {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    for _ in 0..50 {
                        if !Path::new(&format!("/proc/{pid}")).exists() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            // A jailed VMM's command line names only paths inside its
            // chroot: it is found by its root directory instead.
            for pid in jail::processes_rooted_under(&dir) {
                tracing::info!(vm = %name, pid, "killing a leftover jailed VMM");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                for _ in 0..50 {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            self.cgroups
                .remove(&self.cgroup_path(&name))
                .map_err(|e| SandboxError::cgroup("removing a leftover VMM's cgroup", e))?;
            self.remove_vm_dir(&dir)?;
        }
        for tap in self
            .taps
            .list(&self.config.name_prefix)
            .await
            .map_err(host_err)?
        {
            tracing::info!(tap = %tap, "removing leftover tap");
            self.taps.delete(&tap).await.map_err(host_err)?;
        }
        Ok(())
    }

    /// The runtime's root filesystem as an erofs image (None for `custom`,
    /// whose root is empty), built once.
    async fn runtime_image(&self, runtime: RuntimeName) -> Result<Option<PathBuf>, SandboxError> {
        if runtime == RuntimeName::Custom {
            return Ok(None);
        }
        let source = rootfs_path(&self.rootfs_dir, runtime);
        // A built-in runtime's image holds Kiln's bootstraps: named for
        // them, so an upgraded agent never boots an older bootstrap.
        let name = match runtime.handler_language() {
            Some(_) => format!(
                "runtime-{runtime}-{}.erofs",
                crate::rootfs::bootstraps_tag()
            ),
            None => format!("runtime-{runtime}.erofs"),
        };
        let dest = self.images_dir.join(name);
        self.image(&source, &dest)
            .await
            .map_err(|e| SandboxError::RuntimeUnavailable {
                runtime: runtime.to_string(),
                reason: "cannot build its erofs image".into(),
                source: Some(Box::new(e)),
            })?;
        Ok(Some(dest))
    }

    /// The code package as an erofs image, built once per digest.
    async fn code_image(&self, code_dir: &Path, digest: &str) -> Result<PathBuf, SandboxError> {
        self.digest_image("code", code_dir, digest).await
    }

    /// The function's layers as read-only disks, in the function's order
    /// (the guest stacks them under `/opt`, the first on top): one erofs
    /// image per layer digest, built once and shared by every function
    /// that uses the layer.
    async fn layer_disks(
        &self,
        req: &SandboxRequest,
    ) -> Result<Vec<(PathBuf, String)>, SandboxError> {
        let mut disks = Vec::with_capacity(req.spec.layers.len());
        for (i, (digest, dir)) in req.spec.layers.iter().zip(req.layer_dirs()).enumerate() {
            let image = self.digest_image("layer", &dir, digest).await?;
            disks.push((image, format!("layer{i}")));
        }
        Ok(disks)
    }

    /// The read-only disk `image` for `vm` as disk `id`: hard-linked into
    /// its chroot (`/disk-<id>.img`) when jailed.
    fn vm_disk(&self, vm: &Vm, image: &Path, id: &str) -> Result<DiskConfig, SandboxError> {
        if !vm.jailed {
            return Ok(readonly_disk(&image.display().to_string(), id));
        }
        let rel = format!("disk-{id}.img");
        jail::link_into(&vm.root, image, &rel).map_err(|e| vmm_err("the VMM jail", e))?;
        Ok(readonly_disk(&vm.vmm_path(&rel), id))
    }

    /// `<what>-<digest>.erofs` from `source`, built once per digest.
    async fn digest_image(
        &self,
        what: &str,
        source: &Path,
        digest: &str,
    ) -> Result<PathBuf, SandboxError> {
        if digest.is_empty() || !digest.bytes().all(|b| b.is_ascii_hexdigit()) || digest.len() > 128
        {
            return Err(fs_fail(format!(
                "{what} digest {digest:?} is not a hex digest"
            )));
        }
        let dest = self.images_dir.join(format!("{what}-{digest}.erofs"));
        self.image(source, &dest).await?;
        Ok(dest)
    }

    async fn image(&self, source: &Path, dest: &Path) -> Result<(), SandboxError> {
        let _guard = self.images_lock.lock().await;
        if dest.is_file() {
            return Ok(());
        }
        if !source.is_dir() {
            return Err(fs_fail(format!(
                "{} does not exist or is not a directory",
                source.display()
            )));
        }
        build_erofs(&self.mkfs_erofs, source, dest)
            .await
            .map_err(|e| fs_err(dest.display(), e))?;
        std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| fs_err(dest.display(), e))?;
        Ok(())
    }

    /// A sparse ext4 file of the instance's disk size.
    async fn scratch_disk(&self, vm: &Vm, size_mb: u32) -> Result<DiskConfig, SandboxError> {
        let path = vm.host_path("scratch.img");
        let f = std::fs::File::create(&path).map_err(|e| fs_err(path.display(), e))?;
        f.set_len(u64::from(size_mb.max(64)) << 20)
            .map_err(|e| fs_err(path.display(), e))?;
        drop(f);
        let out = tokio::process::Command::new(&self.mkfs_ext4)
            .args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                "-L",
                "scratch",
            ])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| fs_err("mkfs.ext4", e))?;
        if !out.status.success() {
            return Err(fs_fail(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| fs_err(path.display(), e))?;
        vm.chown(&path)?;
        Ok(writable_disk(&vm.vmm_path("scratch.img"), "scratch"))
    }

    fn write_record(&self, vm: &Vm, instance: Option<&InstanceId>) -> Result<(), SandboxError> {
        let rec = VmRecord {
            pid: vm.pid,
            instance_id: instance.cloned(),
        };
        let path = vm.dir.join("vm.json");
        let tmp = vm.dir.join("vm.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&rec).expect("record serialises"))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| fs_err(path.display(), e))
    }

    /// Slot, directory, tap, cgroup and a VMM answering its API. On error
    /// the half-made VM is returned for disposal.
    async fn start_vmm(&self, key: PoolKey) -> Result<Vm, (Option<Vm>, SandboxError)> {
        let runtime_image = self
            .runtime_image(key.runtime)
            .await
            .map_err(|e| (None, e))?;
        let slot = self.alloc_slot().map_err(|e| (None, e))?;
        let subnet = &self.config.instance_subnet;
        let base = u32::from(subnet.slot_base(slot));
        let name = format!("{}-{slot:x}", self.config.name_prefix);
        let dir = self.vms_dir.join(&name);
        let jailed = self.jailed();
        let root = if jailed {
            dir.join("root")
        } else {
            dir.clone()
        };
        let (uid, gid) = self.uid_gid(slot);
        let mut vm = Vm {
            client: VmmClient::new(
                root.join("api.sock"),
                Duration::from_millis(self.config.api_timeout_ms),
            ),
            name,
            slot,
            dir,
            root,
            jailed,
            uid,
            gid,
            runtime_disk: None,
            key,
            host_addr: Ipv4Addr::from(base + 1),
            guest_addr: Ipv4Addr::from(base + 2),
            attached: false,
            child: Mutex::new(None),
            pid: None,
            guest: None,
            disks: 0,
        };
        let step = async {
            std::fs::create_dir(&vm.dir).map_err(|e| fs_err(vm.dir.display(), e))?;
            std::fs::set_permissions(&vm.dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| fs_err(vm.dir.display(), e))?;
            let plan = if vm.jailed {
                let uid = vm.uid.expect("a jailed VM has its uid");
                let plan = JailPlan::new(
                    vm.root.clone(),
                    uid,
                    &self.binary,
                    &self.libraries,
                    &self.config.kernel,
                    &self.config.initramfs,
                );
                plan.prepare()
                    .map_err(|e| vmm_err("preparing the VMM jail", e))?;
                Some(plan)
            } else {
                // The unjailed VMM's files are in its own directory.
                vm.chown(&vm.dir)?;
                None
            };
            vm.runtime_disk = match &runtime_image {
                Some(image) => Some(self.vm_disk(&vm, image, "runtime")?.path),
                None => None,
            };
            self.write_record(&vm, None)?;
            // The VMM attaches to the tap by name: the kernel lets the
            // tap's owner do that without CAP_NET_ADMIN (see docs/security.md).
            self.taps
                .create(&TapSpec {
                    name: vm.name.clone(),
                    host_cidr: format!("{}/30", vm.host_addr),
                    owner: vm.uid,
                })
                .await
                .map_err(|e| SandboxError::network("creating the tap", e))?;
            let memory = (u64::from(key.memory_mb) + u64::from(self.config.vmm_overhead_mb)) << 20;
            let limits = CgroupLimits {
                memory_bytes: memory,
                cpu_milli: key.vcpus * 1000,
            };
            self.cgroups
                .create(&self.cgroup_path(&vm.name), &limits)
                .map_err(|e| SandboxError::cgroup("creating the VMM's cgroup", e))?;
            let cmd = VmmCommand {
                binary: match &plan {
                    Some(_) => JailPlan::inside(jail::JAIL_BINARY).into(),
                    None => self.binary.clone(),
                },
                args: self.vmm_args(&vm),
                uid: vm.uid,
                gid: vm.gid,
                log: vm.dir.join("vmm.log"),
                env: self.vmm_env.clone(),
                jail: plan,
            };
            let cgroup = self.cgroup_path(&vm.name);
            let child = super::launch::spawn(&cmd, |pid| {
                self.cgroups
                    .add_process(&cgroup, pid)
                    .map_err(|e| kiln_core::error_chain(&e).to_string())
            })
            .map_err(|e| vmm_err("starting cloud-hypervisor", e))?;
            vm.pid = Some(child.id());
            *vm.child.lock().expect("lock") = Some(child);
            self.write_record(&vm, None)?;
            self.wait_api(&vm).await
        }
        .await;
        match step {
            Ok(()) => Ok(vm),
            Err(e) => Err((Some(vm), e)),
        }
    }

    /// cloud-hypervisor's flags: its API socket, its own seccomp filters
    /// and, jailed and from v39, landlock over its chroot's files (the
    /// hot-plugged disks and snapshot directories included).
    fn vmm_args(&self, vm: &Vm) -> Vec<String> {
        let mut args = vec![
            "--api-socket".into(),
            format!("path={}", vm.vmm_path("api.sock")),
            "--seccomp".into(),
            "true".into(),
        ];
        if vm.jailed
            && self
                .version
                .as_ref()
                .is_some_and(VmmVersion::supports_landlock)
        {
            args.push("--landlock".into());
            args.push("--landlock-rules".into());
            args.push("path=/,access=rw".into());
        }
        args
    }

    /// Ping until the API answers, the VMM exits, or the API timeout.
    async fn wait_api(&self, vm: &Vm) -> Result<(), SandboxError> {
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(self.config.api_timeout_ms);
        loop {
            if let Some(why) = vm.exited() {
                return Err(vmm_fail(format!(
                    "{why} before its API answered{}",
                    vm.console_tail()
                )));
            }
            match vm.client.ping().await {
                Ok(_) => return Ok(()),
                Err(e @ VmmApiError::TimedOut { .. }) => return Err(vmm_err("vmm.ping", e)),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(vmm_err("the VMM's API did not come up in time", e))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    /// A call's result; a failure says what the VMM said, or that it died.
    async fn api<T>(vm: &Vm, op: &str, r: Result<T, VmmApiError>) -> Result<T, SandboxError> {
        match r {
            Ok(v) => Ok(v),
            Err(e) => Err(Self::api_failed(vm, op, e).await),
        }
    }

    /// A failed call: what the VMM said, or that it died. A VMM that
    /// exits closes its API socket a moment before it can be waited for:
    /// after a connection-level failure, give it that moment.
    async fn api_failed(vm: &Vm, op: &str, e: VmmApiError) -> SandboxError {
        if matches!(e, VmmApiError::Connect { .. } | VmmApiError::Http { .. }) {
            for _ in 0..50 {
                if vm.exited().is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        match vm.exited() {
            Some(why) => vmm_fail(format!("{op}: {why}{}", vm.console_tail())),
            None => vmm_err(op, e),
        }
    }

    fn vm_config(&self, vm: &Vm) -> VmConfig {
        let mut cmdline = "console=ttyS0 reboot=k panic=-1 quiet".to_owned();
        if !self.config.extra_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.config.extra_cmdline);
        }
        let s = vm.slot;
        VmConfig {
            payload: PayloadConfig {
                kernel: Some(if vm.jailed {
                    JailPlan::inside(jail::JAIL_KERNEL)
                } else {
                    self.config.kernel.display().to_string()
                }),
                initramfs: Some(if vm.jailed {
                    JailPlan::inside(jail::JAIL_INITRAMFS)
                } else {
                    self.config.initramfs.display().to_string()
                }),
                cmdline: Some(cmdline),
            },
            cpus: Some(CpusConfig {
                boot_vcpus: vm.key.vcpus,
                max_vcpus: vm.key.vcpus,
            }),
            memory: Some(MemoryConfig {
                size: u64::from(vm.key.memory_mb) << 20,
                shared: None,
            }),
            disks: vm
                .runtime_disk
                .as_deref()
                .map(|p| readonly_disk(p, "runtime"))
                .into_iter()
                .collect(),
            net: vec![NetConfig {
                tap: vm.name.clone(),
                mac: Some(format!(
                    "02:6b:6e:{:02x}:{:02x}:{:02x}",
                    (s >> 16) & 0xff,
                    (s >> 8) & 0xff,
                    s & 0xff
                )),
                id: Some("net0".into()),
            }],
            rng: None,
            serial: Some(ConsoleConfig {
                mode: ConsoleMode::File,
                file: Some(vm.vmm_path("console.log")),
            }),
            console: Some(ConsoleConfig {
                mode: ConsoleMode::Off,
                file: None,
            }),
            vsock: Some(VsockConfig {
                cid: GUEST_CID,
                socket: vm.vmm_path("vsock.sock"),
                id: Some("vsock0".into()),
            }),
        }
    }

    /// Connect to kiln-guest and wait for Ready, within the boot timeout.
    async fn connect_guest(&self, vm: &mut Vm) -> Result<(), SandboxError> {
        let timeout = Duration::from_millis(self.config.boot_timeout_ms);
        let started = tokio::time::Instant::now();
        let socket = vm.vsock_socket();
        let connect = connect_hybrid_vsock_retry(&socket, GUEST_VSOCK_PORT, timeout);
        let stream = match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(self.not_ready(vm, e.to_string())),
            Err(_) => return Err(self.not_ready(vm, "no vsock connection".into())),
        };
        let guest = GuestClient::connect(stream);
        let left = timeout.saturating_sub(started.elapsed());
        guest
            .wait_ready(left)
            .await
            .map_err(|e| self.not_ready(vm, e.to_string()))?;
        vm.guest = Some(guest);
        Ok(())
    }

    fn not_ready(&self, vm: &Vm, why: String) -> SandboxError {
        let detail = match vm.exited() {
            Some(exit) => format!("{exit}; {why}"),
            None => why,
        };
        vmm_fail(format!(
            "the guest did not report ready within {} ms: {detail}{}",
            self.config.boot_timeout_ms,
            vm.console_tail()
        ))
    }

    /// Boot a VM from the kernel; for an instance (`disks`: read-only
    /// ones, the size of a scratch disk, the function), its tap is attached
    /// with the function's policy first, then those disks and a scratch
    /// disk are part of its config. Returns it running, with kiln-guest
    /// Ready.
    async fn cold_boot(
        &self,
        key: PoolKey,
        disks: Option<ColdBootFor<'_>>,
    ) -> Result<Vm, SandboxError> {
        let mut vm = match self.start_vmm(key).await {
            Ok(vm) => vm,
            Err((vm, e)) => return Err(self.dispose_after(vm, e).await),
        };
        let result = async {
            let mut config = self.vm_config(&vm);
            if let Some(ColdBootFor {
                readonly,
                disk_mb,
                spec,
            }) = disks
            {
                self.attach(&mut vm, spec).await?;
                for (image, id) in readonly {
                    config.disks.push(self.vm_disk(&vm, image, id)?);
                }
                config.disks.push(self.scratch_disk(&vm, disk_mb).await?);
            }
            Inner::api(&vm, "vm.create", vm.client.create(&config).await).await?;
            vm.disks = config.disks.len();
            Inner::api(&vm, "vm.boot", vm.client.boot().await).await?;
            self.connect_guest(&mut vm).await
        }
        .await;
        match result {
            Ok(()) => Ok(vm),
            Err(e) => Err(self.dispose_after(Some(vm), e).await),
        }
    }

    async fn dispose_after(&self, vm: Option<Vm>, e: SandboxError) -> SandboxError {
        if let Some(vm) = vm {
            if let Err(cleanup) = self.dispose(vm).await {
                tracing::warn!(error = %cleanup, "cleanup after a failed start failed");
            }
        }
        e
    }

    /// Stop the VMM (politely, then by force) and remove its cgroup, tap,
    /// directory and slot. Every step is tried; the first failure returned.
    async fn dispose(&self, mut vm: Vm) -> Result<(), SandboxError> {
        vm.guest = None;
        let alive = vm.exited().is_none();
        if alive {
            let quick = vm
                .client
                .with_timeout(Duration::from_millis(self.config.api_timeout_ms.min(1000)));
            // A hung VMM answers none of these: stop asking at the first timeout.
            let polite = async {
                if let Err(e) = quick.shutdown().await {
                    if matches!(e, VmmApiError::TimedOut { .. }) {
                        return;
                    }
                }
                if let Err(VmmApiError::TimedOut { .. }) = quick.delete().await {
                    return;
                }
                let _ = quick.shutdown_vmm().await;
            };
            polite.await;
        }
        let child = vm.child.lock().expect("lock").take();
        if let Some(child) = child {
            if !child.wait_timeout(EXIT_GRACE).await {
                tracing::warn!(vm = %vm.name, "the VMM did not exit; killing it");
                child.kill();
            }
        }
        let mut first: Option<SandboxError> = None;
        if let Err(e) = self.cgroups.remove(&self.cgroup_path(&vm.name)) {
            first.get_or_insert(SandboxError::cgroup("removing the VMM's cgroup", e));
        }
        if vm.attached {
            if let Some(isolation) = self.isolation.get() {
                if let Err(e) = isolation.detach(&vm.name).await {
                    first.get_or_insert(isolation_err(e));
                }
            }
            vm.attached = false;
        }
        if let Err(e) = self.taps.delete(&vm.name).await {
            first.get_or_insert(SandboxError::network("removing the tap", e));
        }
        // The VMM (and with it its mount namespace) is gone; the agent's
        // namespace never has mounts below the VM directory.
        if let Err(e) = self.remove_vm_dir(&vm.dir) {
            first.get_or_insert(e);
        }
        self.slots.lock().expect("lock").remove(&vm.slot);
        first.map_or(Ok(()), Err)
    }

    /// The snapshot of a booted, Ready, paused base VM for `key`; taken
    /// once (by booting one).
    async fn snapshot(&self, key: PoolKey) -> Result<PathBuf, SandboxError> {
        let _guard = self.snapshot_lock.lock().await;
        let dir = self.snapshots_dir.join(key.dir_name());
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
        let vm = self.cold_boot(key, None).await?;
        let tmp = self.snapshots_dir.join(format!("{}.tmp", key.dir_name()));
        let result = async {
            let _ = std::fs::remove_dir_all(&tmp);
            // The VMM writes the snapshot among its own files; the agent
            // then takes it over (root's, read-only for the VMMs that
            // restore it: it is a base VM's, before any instance's data).
            let out = vm.host_path("snapshot-out");
            std::fs::create_dir(&out).map_err(|e| fs_err(out.display(), e))?;
            vm.chown(&out)?;
            Inner::api(&vm, "vm.pause", vm.client.pause().await).await?;
            Inner::api(
                &vm,
                "vm.snapshot",
                vm.client
                    .with_timeout(Duration::from_millis(self.config.boot_timeout_ms))
                    .snapshot(Path::new(&vm.vmm_path("snapshot-out")))
                    .await,
            )
            .await?;
            std::fs::rename(&out, &tmp).map_err(|e| fs_err(tmp.display(), e))?;
            take_over(&tmp)?;
            std::fs::rename(&tmp, &dir).map_err(|e| fs_err(dir.display(), e))
        }
        .await;
        let disposed = self.dispose(vm).await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result?;
        disposed?;
        Ok(dir)
    }

    /// A paused base VM restored from `key`'s snapshot. The clone gets its
    /// own copy of the snapshot's `config.json` naming its own tap, vsock
    /// socket and console; the memory and device state are hard links.
    async fn restore(&self, key: PoolKey, snapshot: &Path) -> Result<Vm, SandboxError> {
        let vm = match self.start_vmm(key).await {
            Ok(vm) => vm,
            Err((vm, e)) => return Err(self.dispose_after(vm, e).await),
        };
        let result = async {
            let clone = vm.host_path("snapshot");
            std::fs::create_dir(&clone).map_err(|e| fs_err(clone.display(), e))?;
            let text = std::fs::read(snapshot.join("config.json"))
                .map_err(|e| fs_err("snapshot config", e))?;
            let mut config: serde_json::Value =
                serde_json::from_slice(&text).map_err(|e| fs_err("snapshot config", e))?;
            let fresh = serde_json::to_value(self.vm_config(&vm)).expect("config serialises");
            for key in ["net", "vsock", "serial"] {
                config[key] = fresh[key].clone();
            }
            std::fs::write(
                clone.join("config.json"),
                serde_json::to_vec(&config).expect("json"),
            )
            .map_err(|e| fs_err(clone.display(), e))?;
            for entry in std::fs::read_dir(snapshot)
                .map_err(|e| fs_err(snapshot.display(), e))?
                .flatten()
            {
                let name = entry.file_name();
                if name == "config.json" {
                    continue;
                }
                let to = clone.join(&name);
                std::fs::hard_link(entry.path(), &to)
                    .or_else(|_| std::fs::copy(entry.path(), &to).map(|_| ()))
                    .map_err(|e| fs_err(to.display(), e))?;
            }
            vm.chown(&clone)?;
            Inner::api(
                &vm,
                "vm.restore",
                vm.client
                    .with_timeout(Duration::from_millis(self.config.boot_timeout_ms))
                    .restore(Path::new(&vm.vmm_path("snapshot")), false)
                    .await,
            )
            .await?;
            Ok::<usize, SandboxError>(config["disks"].as_array().map_or(0, Vec::len))
        }
        .await;
        match result {
            Ok(disks) => {
                let mut vm = vm;
                vm.disks = disks;
                Ok(vm)
            }
            Err(e) => Err(self.dispose_after(Some(vm), e).await),
        }
    }

    /// One paused base VM for the pool: restored from the snapshot when
    /// snapshots are on, else booted and paused.
    async fn pool_vm(&self, key: PoolKey) -> Result<Vm, SandboxError> {
        if self.config.snapshots {
            let snap = self.snapshot(key).await?;
            return self.restore(key, &snap).await;
        }
        let vm = self.cold_boot(key, None).await?;
        if let Err(e) = vm.client.pause().await {
            let err = Self::api_failed(&vm, "vm.pause", e).await;
            return Err(self.dispose_after(Some(vm), err).await);
        }
        Ok(vm)
    }

    /// How many paused VMs each size's pool aims at (see
    /// [`pool_policy::plan`]): the sizes with demand in the window, the
    /// `prewarm` ones and those with VMs in the pool (which go when their
    /// target is 0).
    fn targets(&self) -> HashMap<PoolKey, usize> {
        let premade = &self.config.premade;
        if !premade.enabled {
            return HashMap::new();
        }
        let window = Duration::from_secs(premade.demand_window_s);
        let demand: HashMap<PoolKey, usize> = self
            .demand
            .lock()
            .expect("lock")
            .peaks(window, Instant::now())
            .into_iter()
            .collect();
        let floors = self.floors.lock().expect("lock").clone();
        let mut keys: Vec<PoolKey> = demand.keys().chain(floors.iter()).copied().collect();
        keys.extend(self.pool.lock().expect("lock").ready.keys().copied());
        keys.sort_by(PoolKey::order);
        keys.dedup();
        let wants: Vec<Want<PoolKey>> = keys
            .into_iter()
            .map(|key| Want {
                key,
                demand: demand.get(&key).copied().unwrap_or(0),
                floor: usize::from(floors.contains(&key)),
                cost_mb: key.cost_mb(),
            })
            .collect();
        let pressure = self.meminfo.lock().expect("lock").under_pressure();
        pool_policy::plan(&premade.limits(), &wants, pressure)
    }

    /// Fill `key`'s pool to its target now.
    async fn fill_pool(self: &Arc<Self>, key: PoolKey) -> Result<(), SandboxError> {
        loop {
            let target = self.targets().get(&key).copied().unwrap_or(0);
            {
                let mut pool = self.pool.lock().expect("lock");
                let fits =
                    pool.charged_mb() + key.cost_mb() <= u64::from(self.config.premade.budget_mb);
                if pool.have(&key) >= target || !fits {
                    return Ok(());
                }
                pool.reserve(key);
            }
            self.make_pooled(key).await?;
        }
    }

    /// Make one paused VM of `key` (reserved in the pool state) and pool it.
    async fn make_pooled(&self, key: PoolKey) -> Result<(), SandboxError> {
        let started = Instant::now();
        let made = self.pool_vm(key).await;
        let late = {
            let mut pool = self.pool.lock().expect("lock");
            pool.made(key);
            let vm = made?;
            if self.stopping.load(Ordering::Acquire) {
                Some(vm)
            } else {
                tracing::debug!(vm = %vm.name, ?key, ms = started.elapsed().as_millis() as u64, "pooled a paused microVM");
                pool.ready.entry(key).or_default().push_back(vm);
                None
            }
        };
        match late {
            // Made while the driver shut down: not pooled.
            Some(vm) => self.dispose(vm).await,
            None => Ok(()),
        }
    }

    /// Start the background refill once (with the pools on).
    fn ensure_refill(self: &Arc<Self>) {
        if !self.config.premade.enabled || self.stopping.load(Ordering::Acquire) {
            return;
        }
        let mut task = self.refill.lock().expect("lock");
        if task.is_none() {
            let weak = Arc::downgrade(self);
            *task = Some(tokio::spawn(
                Self::refill_loop(weak, self.pacer.clone())
                    .instrument(tracing::info_span!("microvm_pool_refill")),
            ));
        }
    }

    /// Shrink pools above their target, then make one VM for the emptiest
    /// pool below it, paced by [`Pacer`]. Ends with the driver (it holds
    /// it only while working) or at `shutdown`.
    async fn refill_loop(weak: Weak<Inner>, pacer: Arc<Pacer>) {
        let mut last_made = Instant::now();
        loop {
            let Some(inner) = weak.upgrade() else { return };
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            let targets = inner.targets();
            let surplus: Vec<Vm> = {
                let mut pool = inner.pool.lock().expect("lock");
                let mut out = Vec::new();
                for (key, q) in pool.ready.iter_mut() {
                    let target = targets.get(key).copied().unwrap_or(0);
                    while q.len() > target {
                        out.extend(q.pop_back());
                    }
                }
                pool.ready.retain(|_, q| !q.is_empty());
                out
            };
            for vm in surplus {
                tracing::info!(vm = %vm.name, key = ?vm.key, "paused microVM removed (pool above its target)");
                if let Err(e) = inner.dispose(vm).await {
                    tracing::warn!(error = %kiln_core::error_chain(&e), "cannot remove a paused microVM");
                }
            }
            let budget = u64::from(inner.config.premade.budget_mb);
            let next = {
                let pool = inner.pool.lock().expect("lock");
                pool_policy::next_to_make(
                    &targets,
                    |k| pool.have(k),
                    PoolKey::cost_mb,
                    pool.charged_mb(),
                    budget,
                    PoolKey::order,
                )
            };
            let Some(key) = next else {
                drop(inner);
                pacer.sleep(pool_policy::IDLE_CHECK).await;
                continue;
            };
            if pacer.defer(Instant::now(), last_made) {
                drop(inner);
                pacer.sleep(pool_policy::REFILL_QUIET).await;
                continue;
            }
            inner.pool.lock().expect("lock").reserve(key);
            let made = inner.make_pooled(key).await;
            last_made = Instant::now();
            if let Err(e) = made {
                tracing::warn!(?key, error = %kiln_core::error_chain(&e), "cannot make a paused microVM; retrying");
                drop(inner);
                tokio::time::sleep(pool_policy::RETRY_DELAY).await;
            }
        }
    }

    /// Claim a pooled VM of `key` for `spec` (steps 1 and 2 of the claim
    /// protocol, see the module docs): attached with the function's
    /// policy, then resumed with its guest connected. Counts as demand
    /// either way. A pooled VM that does not resume is disposed of and the
    /// next one tried; `None` when none is left.
    async fn take_pooled(
        self: &Arc<Self>,
        key: PoolKey,
        spec: &kiln_core::InstanceSpec,
    ) -> Result<Option<Vm>, SandboxError> {
        if !self.config.premade.enabled {
            return Ok(None);
        }
        let now = Instant::now();
        self.demand.lock().expect("lock").record(key, now);
        self.pacer.started(now);
        self.ensure_refill();
        self.pacer.wake();
        loop {
            let taken = self
                .pool
                .lock()
                .expect("lock")
                .ready
                .get_mut(&key)
                .and_then(VecDeque::pop_front);
            let Some(mut vm) = taken else {
                return Ok(None);
            };
            // The function's policy, before anything of it is in the VM.
            if let Err(e) = self.attach(&mut vm, spec).await {
                return Err(self.dispose_after(Some(vm), e).await);
            }
            let resumed = async {
                Inner::api(&vm, "vm.resume", vm.client.resume().await).await?;
                if vm.guest.is_none() {
                    self.connect_guest(&mut vm).await?;
                }
                Ok::<(), SandboxError>(())
            }
            .await;
            match resumed {
                Ok(()) => return Ok(Some(vm)),
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %kiln_core::error_chain(&e), "discarding a pooled microVM");
                    let _ = self.dispose(vm).await;
                }
            }
        }
    }

    /// Attach `vm`'s tap to the network isolation with `spec`'s egress
    /// mode, VPC and bandwidth class (nothing without `[sandbox.network]`).
    async fn attach(
        &self,
        vm: &mut Vm,
        spec: &kiln_core::InstanceSpec,
    ) -> Result<(), SandboxError> {
        if let Some(isolation) = self.isolation.get() {
            isolation
                .attach(
                    &vm.interface(),
                    spec.network.as_ref(),
                    BandwidthClass::of(spec),
                )
                .await
                .map_err(isolation_err)?;
            vm.attached = true;
        }
        Ok(())
    }

    async fn create(self: &Arc<Self>, req: &SandboxRequest) -> Result<Sandbox, SandboxError> {
        let spec = &req.spec;
        if req.image.is_some() || spec.runtime.is_container_image() {
            return Err(SandboxError::RuntimeUnavailable {
                runtime: spec.runtime.to_string(),
                reason: "custom-container functions run on container nodes only".into(),
                source: None,
            });
        }
        process::check_spec(spec).map_err(SandboxError::invalid_spec)?;
        // Never silently ignore a function's egress mode (see the
        // container driver).
        if self.isolation.get().is_none() {
            if let Some(why) = crate::net::isolation::unisolated_refusal(spec.network.as_ref()) {
                return Err(SandboxError::Unenforceable(why));
            }
        }
        let env: BTreeMap<String, String> =
            process::process_env(&req.instance_id, spec, self.region.as_deref())
                .map_err(SandboxError::invalid_spec)?
                .into_iter()
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                })
                .collect();
        if self
            .instances
            .lock()
            .expect("lock")
            .contains_key(&req.instance_id)
        {
            return Err(vmm_fail(format!(
                "instance {} already has a microVM",
                req.instance_id
            )));
        }
        let key = PoolKey::new(spec.runtime, spec.memory_mb, cpu_milli(spec));
        let code = self.code_image(&req.code_dir, &spec.code_digest).await?;
        // The instance's read-only disks, after the base VM's runtime disk
        // and before its scratch disk: the layers in the function's order,
        // then the code.
        let mut readonly = self.layer_disks(req).await?;
        let layers = readonly.len();
        readonly.push((code, "code".into()));

        // A pooled VM comes attached with the function's policy; a cold
        // boot attaches its tap before `vm.create` (see the module docs).
        let taken = self.take_pooled(key, spec).await?;
        // The pools do not refill while ordinary starts run: they would
        // compete for the same CPUs.
        let _ordinary = taken.is_none().then(|| self.pacer.ordinary_start());
        let (mut vm, pooled) = match taken {
            Some(vm) => (vm, true),
            None => (
                self.cold_boot(
                    key,
                    Some(ColdBootFor {
                        readonly: &readonly,
                        disk_mb: spec.disk_mb,
                        spec,
                    }),
                )
                .await?,
                false,
            ),
        };
        let result = async {
            if pooled {
                let mut disks = vec![];
                for (image, id) in &readonly {
                    disks.push(self.vm_disk(&vm, image, id)?);
                }
                disks.push(self.scratch_disk(&vm, spec.disk_mb).await?);
                for disk in disks {
                    Inner::api(&vm, "vm.add-disk", vm.client.add_disk(&disk).await).await?;
                    vm.disks += 1;
                }
            }
            self.write_record(&vm, Some(&req.instance_id))?;
            let has_runtime = key.runtime != RuntimeName::Custom;
            let dev = |i: usize| format!("/dev/vd{}", (b'a' + i as u8) as char);
            // The instance's disks are the last attached: layers, code,
            // scratch; the runtime's comes just before them.
            let first_layer = vm.disks - 2 - layers;
            let first = first_layer - usize::from(has_runtime);
            let disks = GuestDisks {
                runtime: has_runtime.then(|| Disk {
                    device: dev(first),
                    fs: FsType::Erofs,
                }),
                code: Some(Disk {
                    device: dev(vm.disks - 2),
                    fs: FsType::Erofs,
                }),
                scratch: Some(Disk {
                    device: dev(vm.disks - 1),
                    fs: FsType::Ext4,
                }),
                layers: (first_layer..first_layer + layers)
                    .map(|i| Disk {
                        device: dev(i),
                        fs: FsType::Erofs,
                    })
                    .collect(),
            };
            let config = GuestConfig {
                instance_id: req.instance_id.to_string(),
                hostname: Some(vm.name.clone()),
                network: Some(NetworkConfig {
                    interface: "eth0".into(),
                    address: vm.guest_addr,
                    prefix_len: 30,
                    gateway: Some(vm.host_addr),
                    mtu: None,
                    dns: vec![],
                }),
                process: ProcessConfig {
                    command: spec.command.clone(),
                    args: spec.args.clone(),
                    env: env.clone(),
                    port: spec.port,
                    working_dir: "/code".into(),
                    start_timeout_ms: self.config.boot_timeout_ms,
                },
                disks,
            };
            let guest = vm
                .guest
                .clone()
                .ok_or_else(|| vmm_fail("no guest connection".into()))?;
            let log_path = vm.dir.join("function.log");
            std::fs::write(&log_path, b"").map_err(|e| fs_err(log_path.display(), e))?;
            let logs = spawn_log_writer(&guest, log_path, vm.name.clone());
            guest
                .configure(&config, Duration::from_millis(self.config.boot_timeout_ms))
                .await
                .map_err(|e| SandboxError::Vmm {
                    what: format!("the guest cannot start the function{}", vm.console_tail()),
                    source: Some(Box::new(e)),
                })?;
            let relay = Relay::start(guest)
                .await
                .map_err(|e| SandboxError::network("instance relay", e))?;
            Ok::<_, SandboxError>((relay, logs))
        }
        .await;
        let (relay, logs) = match result {
            Ok(r) => r,
            Err(e) => return Err(self.dispose_after(Some(vm), e).await),
        };
        let endpoint: SocketAddr = relay.addr;
        let sandbox = Sandbox {
            instance_id: req.instance_id.clone(),
            endpoint,
            pid: vm.pid,
            log_path: vm.dir.join("function.log"),
        };
        tracing::info!(vm = %vm.name, pooled, %endpoint, "microVM instance started");
        self.instances.lock().expect("lock").insert(
            req.instance_id.clone(),
            Arc::new(Instance {
                vm,
                _relay: relay,
                logs,
            }),
        );
        Ok(sandbox)
    }

    fn instance(&self, id: &InstanceId) -> Result<Arc<Instance>, SandboxError> {
        self.instances
            .lock()
            .expect("lock")
            .get(id)
            .cloned()
            .ok_or_else(|| SandboxError::NotFound(id.clone()))
    }
}

/// The instance's CPU: the spec's, or FC's default for its memory size.
fn cpu_milli(spec: &kiln_core::InstanceSpec) -> u32 {
    if spec.cpu_milli == 0 {
        kiln_core::limits::default_cpu_milli(spec.memory_mb)
    } else {
        spec.cpu_milli
    }
}

/// The exit code of a guest session, once it ends.
struct GuestExecChild {
    exit: Option<tokio::sync::oneshot::Receiver<Result<i32, String>>>,
    pump: tokio::task::JoinHandle<()>,
}

/// A command failure the driver found itself (no error to carry).
fn exec_fail(what: String) -> SandboxError {
    SandboxError::Exec { what, source: None }
}

#[async_trait::async_trait]
impl crate::exec::ExecChild for GuestExecChild {
    async fn wait(&mut self) -> Result<i32, SandboxError> {
        let rx = self
            .exit
            .take()
            .ok_or_else(|| exec_fail("the session was already waited for".into()))?;
        match rx.await {
            Ok(Ok(code)) => Ok(code),
            Ok(Err(e)) => Err(exec_fail(format!("the guest's session failed: {e}"))),
            Err(_) => Err(exec_fail("the session was abandoned".into())),
        }
    }

    fn kill(&mut self) {
        // Dropping the session's output stops reading it; the guest ends
        // the command when its stdin closes.
        self.pump.abort();
    }
}

/// Bridge a guest exec session to pipes: stdin from the agent goes out in
/// ExecStdin frames (EOF closes it), output frames come back as bytes.
fn exec_process(
    session: kiln_guest_proto::ExecSession,
    req: &crate::exec::ExecRequest,
) -> crate::exec::ExecProcess {
    use kiln_guest_proto::ExecEvent;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PIPE: usize = 64 * 1024;
    let kiln_guest_proto::ExecSession { input, mut output } = session;
    let stdin = if req.stdin {
        let (agent_side, mut ours) = tokio::io::duplex(PIPE);
        tokio::spawn(async move {
            let mut buf = vec![0u8; PIPE];
            while let Ok(n) = ours.read(&mut buf).await {
                if n == 0
                    || input
                        .stdin(bytes::Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                {
                    break;
                }
            }
            let _ = input.close_stdin().await;
        });
        Some(Box::new(agent_side) as crate::exec::ExecWriter)
    } else {
        tokio::spawn(async move {
            let _ = input.close_stdin().await;
        });
        None
    };
    let (stdout_agent, mut stdout_ours) = tokio::io::duplex(PIPE);
    let (stderr_agent, mut stderr_ours) = tokio::io::duplex(PIPE);
    let tty = req.tty;
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let pump = tokio::spawn(async move {
        let result = loop {
            match output.next().await {
                Some(ExecEvent::Stdout(b)) => {
                    let _ = stdout_ours.write_all(&b).await;
                }
                Some(ExecEvent::Stderr(b)) if tty => {
                    let _ = stdout_ours.write_all(&b).await;
                }
                Some(ExecEvent::Stderr(b)) => {
                    let _ = stderr_ours.write_all(&b).await;
                }
                Some(ExecEvent::Exit(status)) => {
                    break Ok(status.code.or(status.signal.map(|s| 128 + s)).unwrap_or(-1));
                }
                Some(ExecEvent::Error(e)) => break Err(format!("the guest: {e}")),
                None => break Err("the session ended without an exit status".into()),
            }
        };
        let _ = stdout_ours.shutdown().await;
        let _ = stderr_ours.shutdown().await;
        let _ = exit_tx.send(result);
    });
    crate::exec::ExecProcess {
        stdin,
        stdout: Box::new(stdout_agent),
        stderr: (!tty).then(|| Box::new(stderr_agent) as crate::exec::ExecReader),
        child: Box::new(GuestExecChild {
            exit: Some(exit_rx),
            pump,
        }),
    }
}

/// Make a snapshot the VMM wrote root's: owned by root, read-only (0644
/// files, 0755 directory), so no VMM can change what others restore.
fn take_over(dir: &Path) -> Result<(), SandboxError> {
    let own = |p: &Path, mode: u32| {
        std::os::unix::fs::chown(p, Some(0), Some(0))
            .and_then(|()| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)))
            .map_err(|e| fs_err(p.display(), e))
    };
    own(dir, 0o755)?;
    for entry in std::fs::read_dir(dir)
        .map_err(|e| fs_err(dir.display(), e))?
        .flatten()
    {
        let path = entry.path();
        // Not through a link the VMM made to something else.
        use std::os::unix::fs::MetadataExt;
        let plain = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.nlink() == 1);
        if !plain {
            return Err(fs_fail(format!(
                "the VMM's snapshot has {}, which is not a plain file of its own",
                path.display()
            )));
        }
        own(&path, 0o644)?;
    }
    Ok(())
}

fn readonly_disk(path: &str, id: &str) -> DiskConfig {
    DiskConfig {
        path: path.to_owned(),
        readonly: Some(true),
        id: Some(id.into()),
        serial: Some(format!("kiln-{id}")),
        image_type: Some("Raw".into()),
    }
}

fn writable_disk(path: &str, id: &str) -> DiskConfig {
    DiskConfig {
        readonly: Some(false),
        ..readonly_disk(path, id)
    }
}

/// Whether a failed pause/resume only says the VM is already there.
fn already(e: &VmmApiError) -> bool {
    matches!(e, VmmApiError::Status { status, .. } if *status == http::StatusCode::METHOD_NOT_ALLOWED)
}

#[async_trait::async_trait]
impl SandboxDriver for MicroVmDriver {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Microvm
    }

    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, SandboxError> {
        let span = tracing::info_span!("microvm_create", instance = %req.instance_id, function = %req.spec.function_name);
        self.inner.create(req).instrument(span).await
    }

    async fn is_running(&self, id: &InstanceId) -> Result<bool, SandboxError> {
        let inst = self.inner.instance(id)?;
        Ok(inst.vm.exited().is_none()
            && inst.vm.guest.as_ref().is_some_and(|g| g.closed().is_none()))
    }

    /// What the VMM reports: the tap's traffic (`vm.counters` of `net0`),
    /// the guest's memory and whether the VM is paused.
    async fn stats(&self, id: &InstanceId) -> Result<Option<SandboxStats>, SandboxError> {
        let inst = self.inner.instance(id)?;
        let counters = Inner::api(&inst.vm, "vm.counters", inst.vm.client.counters().await).await?;
        let info = Inner::api(&inst.vm, "vm.info", inst.vm.client.info().await).await?;
        let net = counters.get("net0");
        let configured = u64::from(inst.vm.key.memory_mb) << 20;
        Ok(Some(SandboxStats {
            memory_bytes: info
                .memory_actual_size
                .and_then(|m| u64::try_from(m).ok())
                .unwrap_or(configured),
            memory_limit_bytes: Some(configured),
            net_rx_bytes: net.and_then(|n| n.get("rx_bytes").copied()),
            net_tx_bytes: net.and_then(|n| n.get("tx_bytes").copied()),
            frozen: info.state == super::api::VmState::Paused,
            ..SandboxStats::default()
        }))
    }

    async fn freeze(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let inst = self.inner.instance(id)?;
        match inst.vm.client.pause().await {
            Ok(()) => Ok(()),
            Err(e) if already(&e) => Ok(()),
            Err(e) => Err(Inner::api_failed(&inst.vm, "vm.pause", e).await),
        }
    }

    async fn thaw(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let inst = self.inner.instance(id)?;
        match inst.vm.client.resume().await {
            Ok(()) => Ok(()),
            Err(e) if already(&e) => Ok(()),
            Err(e) => Err(Inner::api_failed(&inst.vm, "vm.resume", e).await),
        }
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let span = tracing::info_span!("microvm_destroy", instance = %id);
        let Some(inst) = self.inner.instances.lock().expect("lock").remove(id) else {
            return Ok(());
        };
        async {
            // Calls in flight hold the instance; wait for them to let go.
            let mut inst = inst;
            let inst = loop {
                match Arc::try_unwrap(inst) {
                    Ok(i) => break i,
                    Err(again) => {
                        inst = again;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            let Instance { vm, _relay, logs } = inst;
            drop(_relay);
            if let Some(task) = logs {
                task.abort();
            }
            self.inner.dispose(vm).await
        }
        .instrument(span)
        .await
    }

    /// FC's InstanceExec: a session of the guest protocol, whose stdin,
    /// stdout and stderr are presented as the byte streams the agent uses
    /// for every backend.
    async fn exec(
        &self,
        id: &InstanceId,
        req: &crate::exec::ExecRequest,
    ) -> Result<crate::exec::ExecProcess, SandboxError> {
        req.validate()?;
        let inst = self.inner.instance(id)?;
        let guest = inst
            .vm
            .guest
            .clone()
            .ok_or_else(|| exec_fail("the guest is not connected".into()))?;
        drop(inst);
        let session = guest
            .exec(kiln_guest_proto::ExecRequest {
                command: req.command.clone(),
                env: BTreeMap::new(),
                tty: req.tty,
                size: None,
                working_dir: None,
            })
            .await
            .map_err(|e| SandboxError::exec("the guest refused the session", e))?;
        Ok(exec_process(session, req))
    }

    async fn list(&self) -> Result<Vec<InstanceId>, SandboxError> {
        Ok(self
            .inner
            .instances
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect())
    }
}
