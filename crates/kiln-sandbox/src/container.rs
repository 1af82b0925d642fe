//! The container backend: one OCI bundle per instance, run by runc/crun in
//! its own user, PID, mount, IPC, UTS, cgroup and network namespaces.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_core::{InstanceId, RuntimeName, SandboxKind};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::bundle::{self, BundleParams};
use crate::cgroup::{CgroupError, CgroupOps};
use crate::config::ContainerConfig;
use crate::disk::{DiskOps, LoopExt4, RecordingDisk};
use crate::disk_pool::{DiskPool, DiskPoolConfig, DEFAULT_REFILL_DELAY, DEFAULT_RETRY_DELAY};
use crate::driver::{Sandbox, SandboxDriver, SandboxError, SandboxRequest, SandboxStats};
use crate::instance::{InstancePaths, InstanceRecord};
use crate::mounts::{unmount_all_under, HostMounter, Mounter};
use crate::net::NetPool;
use crate::net::{BandwidthClass, HostInterface, NetIsolation, NetIsolationError, SystemCommands};
use crate::net::{IpCommand, NetSlot, NetworkError, NetworkOps};
use crate::oci_runtime::{ContainerStatus, OciRuntime, RuncCli};
use crate::rootfs::{rootfs_path, RootfsBuilder};

fn fs_err(
    what: impl std::fmt::Display,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SandboxError {
    SandboxError::filesystem(what, e)
}

fn cg_err<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
) -> impl FnOnce(E) -> SandboxError {
    move |e| SandboxError::cgroup(what, e)
}

fn net_err(e: NetworkError) -> SandboxError {
    match e {
        NetworkError::Exhausted(_) => SandboxError::Exhausted(e.to_string()),
        other => SandboxError::network("network namespace", other),
    }
}

fn isolation_err(e: NetIsolationError) -> SandboxError {
    match e {
        NetIsolationError::VpcAddressesExhausted(_) => SandboxError::Exhausted(e.to_string()),
        other => SandboxError::network("isolation", other),
    }
}

/// Find `name` on PATH (an explicit path is taken as is).
fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Runs instances as OCI containers. See the crate docs for the layout.
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
}

impl std::fmt::Debug for ContainerDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerDriver")
            .field("name_prefix", &self.config.name_prefix)
            .field("instances_dir", &self.instances_dir)
            .finish_non_exhaustive()
    }
}

impl ContainerDriver {
    /// The real driver: runc/crun, `ip`, mount(2). Cleans up whatever a
    /// previous run with the same `name_prefix` left behind, then starts
    /// filling the network namespace pool in the background.
    pub async fn new(config: ContainerConfig, state_dir: &Path) -> Result<Self, SandboxError> {
        config
            .validate()
            .map_err(|e| SandboxError::oci_runtime("invalid [sandbox] configuration", e))?;
        let name = config.oci_runtime.binary_name();
        let binary = match &config.oci_runtime_path {
            Some(p) if p.is_file() => p.clone(),
            Some(p) => {
                return Err(SandboxError::OciRuntime {
                    what: format!(
                        "{} does not exist; fix oci_runtime_path in [sandbox]",
                        p.display()
                    ),
                    source: None,
                })
            }
            None => find_binary(name).ok_or_else(|| {
                SandboxError::OciRuntime {
                    what: format!("{name} is not installed (not found on PATH); install it or set oci_runtime_path"),
                    source: None,
                }
            })?,
        };
        let oci = Arc::new(RuncCli::new(binary, state_dir.join("runc")));
        let network = config.network.clone();
        let driver = Self::with_backends(
            config,
            state_dir,
            oci,
            Arc::new(IpCommand::default()),
            Arc::new(HostMounter),
        )
        .await?
        .with_disk(Arc::new(LoopExt4));
        match network {
            Some(network) => {
                let started = NetIsolation::start(
                    &driver.config.name_prefix,
                    network,
                    Arc::new(SystemCommands),
                )
                .await;
                match started {
                    Ok(isolation) => Ok(driver.with_net_isolation(Arc::new(isolation))),
                    Err(e) => {
                        // Stop the pool refill and drop its namespaces.
                        if let Err(drain) = driver.shutdown().await {
                            tracing::warn!(error = %drain, "cannot drain the namespace pool");
                        }
                        Err(isolation_err(e))
                    }
                }
            }
            None => Ok(driver),
        }
    }

    /// The driver over any backends (the fakes in unit tests).
    pub async fn with_backends(
        config: ContainerConfig,
        state_dir: &Path,
        oci: Arc<dyn OciRuntime>,
        net: Arc<dyn NetworkOps>,
        mounter: Arc<dyn Mounter>,
    ) -> Result<Self, SandboxError> {
        config
            .validate()
            .map_err(|e| SandboxError::oci_runtime("invalid [sandbox] configuration", e))?;
        let instances_dir = state_dir.join("instances");
        prepare_state_dirs(state_dir, &instances_dir)?;
        let rootfs_dir = config
            .rootfs_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("rootfs"));
        let disk_pool_dir = state_dir.join("disk-pool");
        // The fake formats nothing ahead of time; `with_disk` starts the
        // real pool. Either removes a previous run's pool images.
        let disk: Arc<dyn DiskOps> = Arc::new(RecordingDisk::new());
        let disk_pool = DiskPool::start(disk_pool_config(&config, &disk_pool_dir, 0), disk.clone())
            .map_err(|e| fs_err(disk_pool_dir.display(), e))?;
        let pool = Arc::new(NetPool::new(
            net.clone(),
            &config.name_prefix,
            config.instance_subnet,
            config.netns_pool,
        ));
        let driver = Self {
            config,
            instances_dir,
            rootfs_dir,
            region: None,
            oci,
            net,
            mounter,
            cgroups: crate::cgroup::host(),
            // Mounts nothing: unit tests over fakes never mount on the
            // host. `new` uses loop-mounted ext4.
            disk,
            disk_pool: Arc::new(disk_pool),
            disk_pool_dir,
            boosts: Mutex::new(HashMap::new()),
            pool,
            isolation: None,
            refill: Mutex::new(None),
            instances: Mutex::new(HashMap::new()),
        };
        driver.clean_leftovers().await?;
        if driver.config.netns_pool > 0 {
            *driver.refill.lock().expect("lock") = Some(driver.pool.spawn_refill());
        }
        Ok(driver)
    }

    /// The region the functions see in `FC_REGION`.
    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Use these cgroup operations instead of the host's (the fake in
    /// unit tests).
    pub fn with_cgroups(mut self, cgroups: Arc<dyn CgroupOps>) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// Use this writable-filesystem maker instead of loop-mounted ext4
    /// (the fake in unit tests).
    /// Also (re)starts the pool of pre-formatted images with it.
    pub fn with_disk(mut self, disk: Arc<dyn DiskOps>) -> Self {
        self.disk_pool.shutdown();
        let config = disk_pool_config(&self.config, &self.disk_pool_dir, self.config.disk_pool);
        match DiskPool::start(config, disk.clone()) {
            Ok(pool) => self.disk_pool = Arc::new(pool),
            Err(e) => {
                tracing::warn!(error = %kiln_core::error_chain(&e), "no pool of pre-formatted disk images");
                let off = disk_pool_config(&self.config, &self.disk_pool_dir, 0);
                if let Ok(pool) = DiskPool::start(off, disk.clone()) {
                    self.disk_pool = Arc::new(pool);
                }
            }
        }
        self.disk = disk;
        self
    }

    /// How many pre-formatted disk images are ready.
    pub fn pooled_disks(&self) -> usize {
        self.disk_pool.ready_len()
    }

    /// Isolate every instance's network with `isolation` (started with
    /// this driver's `name_prefix`): attached after an instance gets its
    /// namespace, detached before the namespace goes back to the pool.
    pub fn with_net_isolation(mut self, isolation: Arc<NetIsolation>) -> Self {
        self.isolation = Some(isolation);
        self
    }

    pub fn net_isolation(&self) -> Option<&Arc<NetIsolation>> {
        self.isolation.as_ref()
    }

    /// The cgroup operations the driver uses.
    pub fn cgroups(&self) -> &Arc<dyn CgroupOps> {
        &self.cgroups
    }

    /// The instance's cgroup path (`/<cgroup_parent>/<container id>`).
    pub fn cgroup_of(&self, id: &InstanceId) -> String {
        self.cgroups_path(id)
    }

    /// The CPU an instance starts with, when it is more than its own.
    fn boost_cpu_milli(&self, spec: &kiln_core::InstanceSpec) -> Option<u32> {
        let boost = self.config.cold_start_cpu_milli;
        (self.config.cold_start_boost_ms > 0 && boost > bundle::instance_cpu_milli(spec))
            .then_some(boost)
    }

    /// After the cold-start window, drop the instance to its steady quota.
    fn end_boost_later(&self, id: &InstanceId, cpu_milli: u32) {
        let cgroups = self.cgroups.clone();
        let path = self.cgroups_path(id);
        let window = std::time::Duration::from_millis(self.config.cold_start_boost_ms);
        let span = tracing::debug_span!("cold_start_boost", instance_id = %id);
        let task = tokio::spawn(
            async move {
                tokio::time::sleep(window).await;
                let quota = crate::cgroup::cpu_quota(cpu_milli);
                match cgroups.set_cpu_quota(&path, quota, crate::cgroup::CPU_PERIOD_US) {
                    Ok(()) => tracing::debug!(quota, "cold-start boost over"),
                    Err(e) => tracing::warn!(error = %kiln_core::error_chain(&e), "cannot end the cold-start boost"),
                }
            }
            .instrument(span),
        );
        if let Some(old) = self.boosts.lock().expect("lock").insert(id.clone(), task) {
            old.abort();
        }
    }

    /// Run a (blocking, polling) cgroup operation on a known instance.
    async fn on_cgroup(
        &self,
        id: &InstanceId,
        what: &'static str,
        op: fn(&dyn CgroupOps, &str) -> Result<(), CgroupError>,
    ) -> Result<(), SandboxError> {
        if !self.instances.lock().expect("lock").contains_key(id) {
            return Err(SandboxError::NotFound(id.clone()));
        }
        let cgroups = self.cgroups.clone();
        let path = self.cgroups_path(id);
        tokio::task::spawn_blocking(move || op(cgroups.as_ref(), &path))
            .await
            .map_err(cg_err(what))?
            .map_err(cg_err(what))
    }

    pub fn config(&self) -> &ContainerConfig {
        &self.config
    }

    pub fn rootfs_dir(&self) -> &Path {
        &self.rootfs_dir
    }

    /// How many ready network namespaces the pool holds.
    pub fn pooled_namespaces(&self) -> usize {
        self.pool.ready_len()
    }

    /// Build the runtime's root filesystem unless it is cached. Building
    /// `custom.debian12` runs debootstrap and takes minutes: call this when
    /// the agent starts, not on a request path.
    pub async fn ensure_runtime(&self, runtime: RuntimeName) -> Result<(), SandboxError> {
        let builder = RootfsBuilder {
            dir: &self.rootfs_dir,
            mirror: self.config.debootstrap_mirror.as_deref(),
            mounter: self.mounter.as_ref(),
        };
        builder
            .ensure(runtime)
            .await
            .map(|_| ())
            .map_err(|e| SandboxError::runtime_unavailable(runtime, "building it failed", e))
    }

    /// Stop refilling the pool and delete the pooled namespaces, and the
    /// network isolation when no instance is left. Instances are left to
    /// the caller (`destroy` each first).
    pub async fn shutdown(&self) -> Result<(), SandboxError> {
        if let Some(task) = self.refill.lock().expect("lock").take() {
            task.abort();
        }
        self.pool.drain().await.map_err(net_err)?;
        let disk_pool = self.disk_pool.clone();
        tokio::task::spawn_blocking(move || disk_pool.shutdown())
            .await
            .map_err(|e| fs_err("disk pool", e))?;
        if let Some(isolation) = &self.isolation {
            let running = self.instances.lock().expect("lock").len();
            if running == 0 {
                isolation.shutdown().await.map_err(isolation_err)?;
            } else {
                // Instances left running stay confined by their rules; the
                // next start removes both them and the table.
                tracing::info!(
                    running,
                    table = isolation.table(),
                    "network isolation kept for the instances left running"
                );
            }
        }
        self.remove_cgroup_parent();
        Ok(())
    }

    /// Remove the (empty) cgroup parent this driver's containers were
    /// created under, deepest segment first. A parent that still holds
    /// anything (another agent's instances) stays.
    fn remove_cgroup_parent(&self) {
        let parent = format!("/{}", self.config.cgroup_parent);
        let mut path = parent.as_str();
        loop {
            if self.cgroups.exists(path) {
                if let Err(e) = self.cgroups.remove(path) {
                    tracing::debug!(cgroup = path, error = %kiln_core::error_chain(&e), "cgroup parent kept");
                    return;
                }
            }
            match path.rfind('/') {
                Some(i) if i > 0 => path = &path[..i],
                _ => return,
            }
        }
    }

    fn container_id(&self, id: &InstanceId) -> String {
        format!("{}-{}", self.config.name_prefix, id)
    }

    fn cgroups_path(&self, id: &InstanceId) -> String {
        format!("/{}/{}", self.config.cgroup_parent, self.container_id(id))
    }

    /// Remove what a previous run with this prefix left: containers under
    /// our runc root, instance dirs (after unmounting), netns and veths.
    async fn clean_leftovers(&self) -> Result<(), SandboxError> {
        let prefix = format!("{}-", self.config.name_prefix);
        let containers = self
            .oci
            .list()
            .await
            .map_err(|e| SandboxError::oci_runtime("listing containers", e))?;
        for c in containers.iter().filter(|c| c.id.starts_with(&prefix)) {
            tracing::info!(container = %c.id, "removing leftover container");
            let _ = self.oci.kill(&c.id, "KILL").await;
            self.oci.delete_force(&c.id).await.map_err(|e| {
                SandboxError::oci_runtime(format!("removing leftover container {}", c.id), e)
            })?;
        }
        let entries = std::fs::read_dir(&self.instances_dir)
            .map_err(|e| fs_err(self.instances_dir.display(), e))?;
        for entry in entries.flatten() {
            let dir = entry.path();
            tracing::info!(dir = %dir.display(), "removing leftover instance directory");
            unmount_all_under(self.mounter.as_ref(), &dir).map_err(|e| fs_err(dir.display(), e))?;
            std::fs::remove_dir_all(&dir).map_err(|e| fs_err(dir.display(), e))?;
        }
        let names = self
            .net
            .list(&self.config.name_prefix)
            .await
            .map_err(net_err)?;
        for name in names {
            tracing::info!(netns = %name, "removing leftover network namespace");
            self.net.delete(&name).await.map_err(net_err)?;
        }
        Ok(())
    }

    async fn create_inner(
        &self,
        req: &SandboxRequest,
        paths: &InstancePaths,
        record: &mut Option<InstanceRecord>,
    ) -> Result<Sandbox, SandboxError> {
        let spec = &req.spec;
        let rootfs = rootfs_path(&self.rootfs_dir, spec.runtime);
        let slot: NetSlot = self.pool.take().await.map_err(net_err)?;
        let endpoint = SocketAddr::new(slot.instance_addr.into(), spec.port);
        let rec = record.insert(InstanceRecord {
            slot_index: slot.index,
            netns: slot.name.clone(),
            endpoint,
            pid: None,
            pid_start: None,
        });
        paths
            .write_record(rec)
            .map_err(|e| fs_err(paths.record().display(), e))?;
        // The network (nft, ip, tc: host processes) is attached while the
        // file systems are made: neither needs the other, and both are on
        // every cold start's path.
        let started = std::time::Instant::now();
        let attach = async {
            if let Some(isolation) = &self.isolation {
                isolation
                    .attach(
                        &HostInterface::from(&slot),
                        spec.network.as_ref(),
                        BandwidthClass::of(spec),
                    )
                    .await
                    .map_err(isolation_err)?;
            }
            Ok::<_, SandboxError>(started.elapsed())
        };
        // Directories, the writable disk, mounts and the bundle: blocking
        // syscalls (and mkfs on a pool miss), kept off the async workers.
        let files = InstanceFiles {
            uid: self.config.uid_base,
            rootfs,
            paths: paths.clone(),
            req: req.clone(),
            slot: slot.clone(),
            disk_pool: self.disk_pool.clone(),
            mounter: self.mounter.clone(),
            region: self.region.clone(),
            cgroups_path: self.cgroups_path(&req.instance_id),
            tmp_size_mb: self.config.tmp_size_mb,
            boost_cpu_milli: self.boost_cpu_milli(spec),
        };
        let prepare = async {
            tokio::task::spawn_blocking(move || files.make())
                .await
                .map_err(|e| fs_err("instance files", e))??;
            Ok::<_, SandboxError>(started.elapsed())
        };
        let (net, files) = tokio::join!(attach, prepare);
        let (net, files) = (net?, files?);
        let log_path = paths.console_log();
        let pid = self
            .oci
            .run_detached(
                &self.container_id(&req.instance_id),
                &paths.bundle(),
                &log_path,
            )
            .await
            .map_err(|e| SandboxError::oci_runtime("starting the container", e))?;
        rec.pid = Some(pid);
        rec.pid_start = self.oci.init_started(pid);
        paths
            .write_record(rec)
            .map_err(|e| fs_err(paths.record().display(), e))?;
        tracing::debug!(
            net_ms = net.as_millis() as u64,
            files_ms = files.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "sandbox steps"
        );
        if self.boost_cpu_milli(spec).is_some() {
            self.end_boost_later(&req.instance_id, bundle::instance_cpu_milli(spec));
        }
        Ok(Sandbox {
            instance_id: req.instance_id.clone(),
            endpoint,
            pid: Some(pid),
            log_path,
        })
    }

    /// Remove everything of one instance; the first failure is returned
    /// after every step has been tried, except that the directory is kept
    /// while anything below it is still mounted.
    async fn teardown(
        &self,
        id: &InstanceId,
        paths: &InstancePaths,
        record: Option<&InstanceRecord>,
    ) -> Result<(), SandboxError> {
        let cid = self.container_id(id);
        let mut first: Option<SandboxError> = None;
        // A frozen process does not die of SIGKILL until it is thawed.
        let path = self.cgroups_path(id);
        if self.cgroups.exists(&path) {
            if let Err(e) = self.cgroups.thaw(&path) {
                tracing::debug!(error = %kiln_core::error_chain(&e), "thaw before kill failed");
            }
        }
        if let Err(e) = self.oci.kill(&cid, "KILL").await {
            tracing::debug!(error = %kiln_core::error_chain(&e), "kill before delete failed");
        }
        if let Some(task) = self.boosts.lock().expect("lock").remove(id) {
            task.abort();
        }
        if let Err(e) = self.oci.delete_force(&cid).await {
            first.get_or_insert(SandboxError::oci_runtime("removing the container", e));
        }
        // runc removes the cgroup; one a crashed runc left is removed here.
        if let Err(e) = self.cgroups.remove(&path) {
            first.get_or_insert(SandboxError::cgroup("removing it", e));
        }
        if paths.dir.exists() {
            match unmount_all_under(self.mounter.as_ref(), &paths.dir) {
                Ok(()) => {
                    if let Err(e) = std::fs::remove_dir_all(&paths.dir) {
                        first.get_or_insert(fs_err(paths.dir.display(), e));
                    }
                }
                Err(e) => {
                    first.get_or_insert(fs_err(paths.dir.display(), e));
                }
            }
        }
        if let Some(rec) = record {
            if let Some(isolation) = &self.isolation {
                if let Err(e) = isolation.detach(&rec.netns).await {
                    first.get_or_insert(isolation_err(e));
                }
            }
            if let Err(e) = self.pool.release_name(rec.slot_index, &rec.netns).await {
                first.get_or_insert(net_err(e));
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Bytes received and sent by the host side of an instance's veth (named
/// like its netns), when the interface exists in this network namespace.
fn host_veth_bytes(name: &str) -> (Option<u64>, Option<u64>) {
    let read = |what: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{name}/statistics/{what}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return (None, None);
    }
    (read("rx_bytes"), read("tx_bytes"))
}

/// The pool of images of the default disk size owned by `uid_base`.
fn disk_pool_config(config: &ContainerConfig, dir: &Path, capacity: usize) -> DiskPoolConfig {
    DiskPoolConfig {
        dir: dir.to_owned(),
        prefix: config.name_prefix.clone(),
        size_mb: crate::disk::DEFAULT_DISK_MB,
        owner: config.uid_base,
        capacity,
        retry_delay: DEFAULT_RETRY_DELAY,
        refill_delay: DEFAULT_REFILL_DELAY,
    }
}

fn prepare_state_dirs(state_dir: &Path, instances_dir: &Path) -> Result<(), SandboxError> {
    for dir in [state_dir, instances_dir] {
        std::fs::create_dir_all(dir).map_err(|e| fs_err(dir.display(), e))?;
    }
    // runc sets up mounts as the instance's mapped root, which must be able
    // to walk down to the bundle: traversal (not listing) for others.
    let meta = std::fs::metadata(state_dir).map_err(|e| fs_err(state_dir.display(), e))?;
    let mode = meta.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(mode | 0o011))
            .map_err(|e| fs_err(state_dir.display(), e))?;
    }
    std::fs::set_permissions(instances_dir, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| fs_err(instances_dir.display(), e))?;
    for ancestor in state_dir.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(ancestor) {
            if m.permissions().mode() & 0o001 == 0 {
                tracing::warn!(
                    dir = %ancestor.display(),
                    "directory above the sandbox state is not traversable by others; \
                     containers in user namespaces will fail to start"
                );
            }
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl SandboxDriver for ContainerDriver {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Container
    }

    async fn create(&self, req: &SandboxRequest) -> Result<Sandbox, SandboxError> {
        let span = tracing::info_span!("sandbox_create", instance_id = %req.instance_id,
            function = %req.spec.function_name, runtime = %req.spec.runtime);
        async move {
            let spec = &req.spec;
            bundle::check_spec(spec)
                .map_err(SandboxError::invalid_spec)?;
            bundle::process_env(&req.instance_id, spec, None)
                .map_err(SandboxError::invalid_spec)?;
            if !req.code_dir.is_dir() {
                return Err(SandboxError::Filesystem {
                    what: format!("code directory {} is not a directory", req.code_dir.display()),
                    source: None,
                });
            }
            crate::layers::check_layer_dirs(req)?;
            crate::disk::disk_mb(spec.disk_mb)
                .map_err(SandboxError::invalid_spec)?;
            if spec.runtime == RuntimeName::Custom {
                self.ensure_runtime(RuntimeName::Custom).await?;
            }
            let rootfs = rootfs_path(&self.rootfs_dir, spec.runtime);
            if !crate::rootfs::is_complete(&rootfs) {
                return Err(SandboxError::RuntimeUnavailable {
                    runtime: spec.runtime.to_string(),
                    reason: "it has not been built on this node yet (ensure_runtime)".into(),
                    source: None,
                });
            }
            let paths = InstancePaths::new(&self.instances_dir, &req.instance_id);
            if self
                .instances
                .lock()
                .expect("lock")
                .contains_key(&req.instance_id)
                || paths.dir.exists()
            {
                return Err(SandboxError::Filesystem {
                    what: format!("instance directory: instance {} already exists", req.instance_id),
                    source: None,
                });
            }
            std::fs::create_dir(&paths.dir).map_err(|e| fs_err(paths.dir.display(), e))?;
            std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o711))
                .map_err(|e| fs_err(paths.dir.display(), e))?;

            let mut record = None;
            match self.create_inner(req, &paths, &mut record).await {
                Ok(sandbox) => {
                    let rec = record.expect("record set on success");
                    tracing::info!(endpoint = %sandbox.endpoint, pid = ?sandbox.pid, "instance started");
                    self.instances
                        .lock()
                        .expect("lock")
                        .insert(req.instance_id.clone(), rec);
                    Ok(sandbox)
                }
                Err(e) => {
                    tracing::warn!(error = %kiln_core::error_chain(&e), "instance did not start; cleaning up");
                    if let Err(cleanup) =
                        self.teardown(&req.instance_id, &paths, record.as_ref()).await
                    {
                        tracing::error!(error = %cleanup, "cleanup after a failed start failed");
                    }
                    Err(e)
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn is_running(&self, id: &InstanceId) -> Result<bool, SandboxError> {
        let paths = InstancePaths::new(&self.instances_dir, id);
        let init = self
            .instances
            .lock()
            .expect("lock")
            .get(id)
            .map(|r| r.pid.zip(r.pid_start));
        if init.is_none() && !paths.dir.exists() {
            return Err(SandboxError::NotFound(id.clone()));
        }
        // Asked every 25 ms while a cold start waits for the port: answered
        // from /proc when the init process's start time is known.
        if let Some(Some((pid, start))) = init {
            return Ok(self.oci.init_started(pid) == Some(start));
        }
        let state = self
            .oci
            .state(&self.container_id(id))
            .await
            .map_err(|e| SandboxError::oci_runtime("reading the container's state", e))?;
        // A frozen instance still runs (runc reports it paused).
        Ok(state.is_some_and(|s| {
            matches!(s.status, ContainerStatus::Running | ContainerStatus::Paused)
        }))
    }

    async fn stats(&self, id: &InstanceId) -> Result<Option<SandboxStats>, SandboxError> {
        let netns = match self.instances.lock().expect("lock").get(id) {
            Some(rec) => rec.netns.clone(),
            None => return Err(SandboxError::NotFound(id.clone())),
        };
        let cgroups = self.cgroups.clone();
        let path = self.cgroups_path(id);
        let (cg, (rx, tx)) =
            tokio::task::spawn_blocking(move || (cgroups.stats(&path), host_veth_bytes(&netns)))
                .await
                .map_err(cg_err("reading its statistics"))?;
        let cg = cg.map_err(cg_err("reading its statistics"))?;
        Ok(Some(SandboxStats {
            cpu_usage_us: cg.cpu_usage_us,
            cpu_throttled_us: cg.cpu_throttled_us,
            memory_bytes: cg.memory_bytes,
            memory_limit_bytes: cg.memory_limit_bytes,
            oom_kills: cg.oom_kills,
            pids: cg.pids,
            // The host side's receive is the instance's transmit.
            net_rx_bytes: tx,
            net_tx_bytes: rx,
            frozen: cg.frozen,
        }))
    }

    async fn freeze(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let span = tracing::debug_span!("sandbox_freeze", instance_id = %id);
        self.on_cgroup(id, "freezing", |c, p| c.freeze(p))
            .instrument(span)
            .await
    }

    async fn thaw(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let span = tracing::debug_span!("sandbox_thaw", instance_id = %id);
        self.on_cgroup(id, "thawing", |c, p| c.thaw(p))
            .instrument(span)
            .await
    }

    async fn destroy(&self, id: &InstanceId) -> Result<(), SandboxError> {
        let span = tracing::info_span!("sandbox_destroy", instance_id = %id);
        async move {
            let paths = InstancePaths::new(&self.instances_dir, id);
            let record = self
                .instances
                .lock()
                .expect("lock")
                .remove(id)
                .or_else(|| paths.read_record());
            let result = self.teardown(id, &paths, record.as_ref()).await;
            match &result {
                Ok(()) => tracing::info!("instance destroyed"),
                Err(e) => {
                    tracing::warn!(error = %kiln_core::error_chain(&e), "instance not fully destroyed");
                    if let Some(rec) = record {
                        self.instances.lock().expect("lock").insert(id.clone(), rec);
                    }
                }
            }
            result
        }
        .instrument(span)
        .await
    }

    async fn exec(
        &self,
        id: &InstanceId,
        req: &crate::exec::ExecRequest,
    ) -> Result<crate::exec::ExecProcess, SandboxError> {
        req.validate()?;
        if !self.instances.lock().expect("lock").contains_key(id) {
            return Err(SandboxError::NotFound(id.clone()));
        }
        tracing::info!(instance_id = %id, tty = req.tty, "exec in instance");
        self.oci
            .exec(&self.container_id(id), req)
            .await
            .map_err(|e| SandboxError::exec("runc exec", e))
    }

    async fn list(&self) -> Result<Vec<InstanceId>, SandboxError> {
        let entries = std::fs::read_dir(&self.instances_dir)
            .map_err(|e| fs_err(self.instances_dir.display(), e))?;
        let mut ids: Vec<InstanceId> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        ids.sort();
        Ok(ids)
    }
}

/// Create each directory with its mode and, when given, its owner.
fn make_dirs(dirs: &[(PathBuf, u32, Option<u32>)]) -> Result<(), SandboxError> {
    for (dir, mode, owner) in dirs {
        std::fs::create_dir(dir).map_err(|e| fs_err(dir.display(), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| fs_err(dir.display(), e))?;
        if let Some(id) = owner {
            std::os::unix::fs::chown(dir, Some(*id), Some(*id))
                .map_err(|e| fs_err(dir.display(), e))?;
        }
    }
    Ok(())
}

/// What one container instance needs on disk before the runtime starts it.
struct InstanceFiles {
    uid: u32,
    rootfs: PathBuf,
    paths: InstancePaths,
    req: SandboxRequest,
    slot: NetSlot,
    disk_pool: Arc<DiskPool>,
    mounter: Arc<dyn Mounter>,
    region: Option<String>,
    cgroups_path: String,
    tmp_size_mb: u32,
    boost_cpu_milli: Option<u32>,
}

impl InstanceFiles {
    /// Directories, the writable disk (mkfs on a pool miss, loop mount),
    /// the read-only runtime root, the /code overlay, layers and the OCI
    /// bundle. Blocking: run it on the blocking pool.
    fn make(self) -> Result<(), SandboxError> {
        let (uid, paths, req, spec) = (self.uid, &self.paths, &self.req, &self.req.spec);
        make_dirs(&[
            (paths.bundle(), 0o711, None),
            (paths.rootfs(), 0o755, None),
            (paths.code(), 0o755, None),
            (paths.disk(), 0o711, None),
        ])?;
        let disk_mb = crate::disk::disk_mb(spec.disk_mb).map_err(|e| fs_err("disk", e))?;
        self.disk_pool
            .provide(&paths.disk_image(), disk_mb, &paths.disk(), uid)
            .map_err(|e| fs_err("writable filesystem", e))?;
        // On the instance's own disk, owned by its user.
        make_dirs(&[
            (paths.upper(), 0o755, Some(uid)),
            (paths.work(), 0o700, Some(uid)),
            (paths.tmp(), 0o1777, Some(uid)),
        ])?;
        self.mounter
            .bind_readonly(&self.rootfs, &paths.rootfs())
            .map_err(|e| fs_err("runtime root filesystem", e))?;
        self.mounter
            .overlay(&req.code_dir, &paths.upper(), &paths.work(), &paths.code())
            .map_err(|e| fs_err("/code overlay", e))?;
        let opt = crate::layers::mount_opt(self.mounter.as_ref(), req, paths, &self.rootfs, uid)?;

        let code = paths.code();
        let hosts = paths.hosts();
        std::fs::write(
            &hosts,
            bundle::hosts_file(&self.slot.name, self.slot.instance_addr),
        )
        .map_err(|e| fs_err(hosts.display(), e))?;
        let mut config = bundle::build_config(&BundleParams {
            instance_id: &req.instance_id,
            spec,
            region: self.region.as_deref(),
            hostname: &self.slot.name,
            uid_base: uid,
            netns_path: self.slot.netns_path(),
            cgroups_path: self.cgroups_path.clone(),
            code_source: &code,
            hosts_file: &hosts,
            tmp_size_mb: self.tmp_size_mb,
            tmp_source: Some(&paths.tmp()),
            boost_cpu_milli: self.boost_cpu_milli,
        })
        .map_err(SandboxError::invalid_spec)?;
        if let Some(opt) = &opt {
            crate::layers::add_opt_mount(&mut config, opt);
        }
        let bytes = serde_json::to_vec_pretty(&config).expect("config serialises");
        std::fs::write(paths.config(), bytes).map_err(|e| fs_err(paths.config().display(), e))?;

        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::bundle::tests::sample_spec;
    use crate::cgroup::{CgroupCall, RecordingCgroups};
    use crate::disk::RecordingDisk;
    use crate::mounts::{MountCall, RecordingMounter};
    use crate::net::netns::{NetCall, RecordingNetwork};
    use crate::oci_runtime::{OciCall, RecordingOciRuntime};

    struct Harness {
        _tmp: tempfile::TempDir,
        state: PathBuf,
        code: PathBuf,
        oci: Arc<RecordingOciRuntime>,
        net: Arc<RecordingNetwork>,
        mounter: Arc<RecordingMounter>,
        cgroups: Arc<RecordingCgroups>,
        disk: Arc<RecordingDisk>,
        driver: ContainerDriver,
    }

    fn test_config(rootfs_dir: &Path) -> ContainerConfig {
        let euid = nix::unistd::geteuid().as_raw();
        ContainerConfig {
            name_prefix: "kt".into(),
            instance_subnet: "10.77.0.0/24".parse().unwrap(),
            cgroup_parent: "kt".into(),
            // Without root, chown only works to one's own uid.
            uid_base: if euid == 0 { 100_000 } else { euid },
            rootfs_dir: Some(rootfs_dir.to_owned()),
            tmp_size_mb: 64,
            netns_pool: 0,
            disk_pool: 0,
            ..ContainerConfig::default()
        }
    }

    async fn harness_with(
        prepare: impl FnOnce(&RecordingOciRuntime, &RecordingNetwork, &Path),
    ) -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let code = tmp.path().join("code");
        std::fs::create_dir_all(&code).unwrap();
        std::fs::write(code.join("server.py"), "print('hi')").unwrap();
        let oci = Arc::new(RecordingOciRuntime::new());
        let net = Arc::new(RecordingNetwork::new());
        let mounter = Arc::new(RecordingMounter::new());
        let cgroups = Arc::new(RecordingCgroups::new());
        let disk = Arc::new(RecordingDisk::new());
        prepare(&oci, &net, &state);
        let driver = ContainerDriver::with_backends(
            test_config(&tmp.path().join("rootfs")),
            &state,
            oci.clone(),
            net.clone(),
            mounter.clone(),
        )
        .await
        .unwrap()
        .with_region("cn-hangzhou")
        .with_cgroups(cgroups.clone())
        .with_disk(disk.clone());
        Harness {
            _tmp: tmp,
            state,
            code,
            oci,
            net,
            mounter,
            cgroups,
            disk,
            driver,
        }
    }

    async fn harness() -> Harness {
        harness_with(|_, _, _| {}).await
    }

    fn request(h: &Harness, runtime: RuntimeName) -> SandboxRequest {
        let mut spec = sample_spec();
        spec.runtime = runtime;
        SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir: h.code.clone(),
        }
    }

    #[tokio::test]
    async fn create_builds_the_bundle_and_starts_it() {
        let h = harness().await;
        let req = request(&h, RuntimeName::Custom);
        let sb = h.driver.create(&req).await.unwrap();
        assert_eq!(sb.endpoint, "10.77.0.2:9000".parse().unwrap());
        let dir = h.state.join("instances").join(req.instance_id.as_str());
        assert_eq!(sb.log_path, dir.join("console.log"));
        assert_eq!(h.net.existing(), ["kt-0".to_owned()].into());

        let cid = format!("kt-{}", req.instance_id);
        assert!(h.oci.calls().contains(&OciCall::Run {
            id: cid.clone(),
            bundle: dir.join("bundle"),
        }));
        let config = h.oci.config_of(&cid).unwrap();
        assert_eq!(config["root"]["readonly"], true);
        assert_eq!(config["linux"]["cgroupsPath"], format!("/kt/{cid}"));
        let ns = config["linux"]["namespaces"].as_array().unwrap();
        assert!(ns
            .iter()
            .any(|n| n["type"] == "network" && n["path"] == "/run/netns/kt-0"));
        assert_eq!(ns.len(), 7);
        assert_eq!(
            config["linux"]["uidMappings"][0]["hostID"],
            h.driver.config().uid_base
        );
        let env: Vec<&str> = config["process"]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert!(env.contains(&"FC_REGION=cn-hangzhou"));
        assert!(env.contains(&format!("FC_INSTANCE_ID={}", req.instance_id).as_str()));
        let code_mount = config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/code")
            .unwrap();
        assert_eq!(code_mount["source"], dir.join("code").display().to_string());

        let calls = h.mounter.calls();
        assert!(calls.contains(&MountCall::BindReadonly {
            source: h.driver.rootfs_dir().join("custom"),
            target: dir.join("bundle/rootfs"),
        }));
        assert!(calls.contains(&MountCall::Overlay {
            lower: h.code.clone(),
            upper: dir.join("disk/upper"),
            work: dir.join("disk/work"),
            target: dir.join("code"),
        }));
        let uid = h.driver.config().uid_base;
        assert_eq!(
            std::fs::metadata(dir.join("disk/upper")).unwrap().uid(),
            uid
        );
        assert_eq!(std::fs::metadata(dir.join("disk/work")).unwrap().gid(), uid);
        assert_eq!(std::fs::metadata(dir.join("disk/tmp")).unwrap().uid(), uid);
        assert_eq!(
            h.disk.calls(),
            [crate::disk::DiskCall {
                image: dir.join("disk.img"),
                size_mb: 512,
                target: dir.join("disk"),
                owner: uid,
            }]
        );
        let tmp_mount = config["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/tmp")
            .unwrap();
        assert_eq!(
            tmp_mount["source"],
            dir.join("disk/tmp").display().to_string()
        );
        assert_eq!(
            config["linux"]["seccomp"]["defaultAction"],
            "SCMP_ACT_ERRNO"
        );

        assert_eq!(
            h.driver.list().await.unwrap(),
            vec![req.instance_id.clone()]
        );
        assert!(h.driver.is_running(&req.instance_id).await.unwrap());
        h.oci.stop(&cid);
        assert!(!h.driver.is_running(&req.instance_id).await.unwrap());

        // A second create with the same id changes nothing.
        let err = h.driver.create(&req).await.unwrap_err();
        assert!(matches!(err, SandboxError::Filesystem { .. }), "{err}");
        assert!(dir.join("instance.json").exists());
        assert_eq!(h.net.existing().len(), 1);
    }

    #[tokio::test]
    async fn liveness_comes_from_the_init_process_start_time_not_a_runtime_call() {
        let h = harness().await;
        let req = request(&h, RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        let cid = format!("kt-{}", req.instance_id);
        let record = InstancePaths::new(&h.state.join("instances"), &req.instance_id)
            .read_record()
            .expect("the record on disk");
        assert_eq!(record.pid_start, Some(1), "kept with the pid");
        let states = |h: &Harness| {
            h.oci
                .calls()
                .iter()
                .filter(|c| matches!(c, OciCall::State(_)))
                .count()
        };

        assert!(h.driver.is_running(&req.instance_id).await.unwrap());
        h.oci.pause(&cid);
        assert!(h.driver.is_running(&req.instance_id).await.unwrap());
        assert_eq!(states(&h), 0, "no runtime process per check");
        // Another process under the same pid is not the instance.
        h.oci.replace_init_process(&cid);
        assert!(!h.driver.is_running(&req.instance_id).await.unwrap());

        // A record from before start times were kept: the runtime is asked.
        let other = request(&h, RuntimeName::Custom);
        h.driver.create(&other).await.unwrap();
        h.driver
            .instances
            .lock()
            .unwrap()
            .get_mut(&other.instance_id)
            .unwrap()
            .pid_start = None;
        assert!(h.driver.is_running(&other.instance_id).await.unwrap());
        assert_eq!(states(&h), 1);
    }

    #[tokio::test]
    async fn destroy_removes_everything_and_is_idempotent() {
        let h = harness().await;
        let req = request(&h, RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        let cid = format!("kt-{}", req.instance_id);
        let dir = h.state.join("instances").join(req.instance_id.as_str());

        h.driver.destroy(&req.instance_id).await.unwrap();
        let calls = h.oci.calls();
        assert!(calls.contains(&OciCall::Kill {
            id: cid.clone(),
            signal: "KILL".into()
        }));
        assert!(calls.contains(&OciCall::Delete(cid.clone())));
        assert!(h.mounter.mounted().is_empty());
        assert!(!dir.exists());
        assert!(h.net.existing().is_empty());
        assert!(h.net.calls().contains(&NetCall::Delete("kt-0".into())));
        assert!(h.driver.list().await.unwrap().is_empty());
        assert!(matches!(
            h.driver.is_running(&req.instance_id).await,
            Err(SandboxError::NotFound(_))
        ));

        h.driver.destroy(&req.instance_id).await.unwrap();
        h.driver.destroy(&InstanceId::generate()).await.unwrap();

        // The namespace is never reused: the next instance gets a new one.
        let next = h
            .driver
            .create(&request(&h, RuntimeName::Custom))
            .await
            .unwrap();
        assert_eq!(next.endpoint, "10.77.0.6:9000".parse().unwrap());
    }

    #[tokio::test]
    async fn a_failed_start_leaves_nothing_behind() {
        let h = harness().await;
        h.oci
            .fail_next_run("exec: \"python3\": executable file not found");
        let req = request(&h, RuntimeName::Custom);
        let err = h.driver.create(&req).await.unwrap_err();
        assert!(
            matches!(&err, SandboxError::OciRuntime { .. })
                && kiln_core::error_chain(&err).contains("python3"),
            "{err}"
        );
        assert!(h.mounter.mounted().is_empty());
        assert!(h.net.existing().is_empty());
        assert!(h.driver.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_requests_change_nothing() {
        let h = harness().await;
        let mut req = request(&h, RuntimeName::Custom);
        req.spec.command.clear();
        let err = h.driver.create(&req).await.unwrap_err();
        assert!(
            kiln_core::error_chain(&err).contains("no command"),
            "{err:?}"
        );

        let mut req = request(&h, RuntimeName::Custom);
        req.spec.environment.insert("BAD NAME".into(), "x".into());
        assert!(h.driver.create(&req).await.is_err());

        let mut req = request(&h, RuntimeName::Custom);
        req.code_dir = h.state.join("missing");
        assert!(matches!(
            h.driver.create(&req).await,
            Err(SandboxError::Filesystem { .. })
        ));

        // custom.debian12 has not been built in this rootfs dir.
        let req = request(&h, RuntimeName::CustomDebian12);
        assert!(matches!(
            h.driver.create(&req).await,
            Err(SandboxError::RuntimeUnavailable { .. })
        ));

        assert!(h.net.calls().is_empty() || h.net.calls() == [NetCall::List]);
        assert!(h.mounter.calls().is_empty());
        assert!(h.driver.list().await.unwrap().is_empty());
        assert!(!h
            .oci
            .calls()
            .iter()
            .any(|c| matches!(c, OciCall::Run { .. })));
    }

    #[tokio::test]
    async fn subnet_exhaustion_is_reported_as_such() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = test_config(&tmp.path().join("rootfs"));
        config.instance_subnet = "10.77.0.0/28".parse().unwrap();
        let h = harness().await;
        let driver = ContainerDriver::with_backends(
            config,
            &tmp.path().join("state"),
            Arc::new(RecordingOciRuntime::new()),
            Arc::new(RecordingNetwork::new()),
            Arc::new(RecordingMounter::new()),
        )
        .await
        .unwrap();
        for _ in 0..4 {
            driver
                .create(&request(&h, RuntimeName::Custom))
                .await
                .unwrap();
        }
        let err = driver
            .create(&request(&h, RuntimeName::Custom))
            .await
            .unwrap_err();
        assert!(matches!(err, SandboxError::Exhausted(_)), "{err}");
    }

    #[tokio::test]
    async fn start_removes_leftovers_with_its_prefix_only() {
        let h = harness_with(|oci, net, state| {
            oci.insert_leftover("kt-i-0123");
            oci.insert_leftover("other-i-0123");
            net.insert_leftover("kt-1f");
            net.insert_leftover("ktx-1");
            std::fs::create_dir_all(state.join("instances/i-old/upper")).unwrap();
        })
        .await;
        let calls = h.oci.calls();
        assert!(calls.contains(&OciCall::Delete("kt-i-0123".into())));
        assert!(!calls.contains(&OciCall::Delete("other-i-0123".into())));
        assert_eq!(h.net.existing(), ["ktx-1".to_owned()].into());
        assert!(!h.state.join("instances/i-old").exists());
    }

    #[tokio::test]
    async fn the_pool_is_filled_in_the_background_and_drained_on_shutdown() {
        let tmp = tempfile::tempdir().unwrap();
        let mut config = test_config(&tmp.path().join("rootfs"));
        config.netns_pool = 3;
        let net = Arc::new(RecordingNetwork::new());
        let driver = ContainerDriver::with_backends(
            config,
            &tmp.path().join("state"),
            Arc::new(RecordingOciRuntime::new()),
            net.clone(),
            Arc::new(RecordingMounter::new()),
        )
        .await
        .unwrap();
        for _ in 0..200 {
            if driver.pooled_namespaces() == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(driver.pooled_namespaces(), 3);
        driver.shutdown().await.unwrap();
        assert!(net.existing().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_cold_start_boost_ends_after_its_window() {
        let h = harness().await;
        let req = request(&h, RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        let cid = format!("kt-{}", req.instance_id);
        let path = format!("/kt/{cid}");
        // sample_spec has 0.35 CPU; the boost is the configured 2 CPUs.
        let config = h.oci.config_of(&cid).unwrap();
        assert_eq!(config["linux"]["resources"]["cpu"]["quota"], 200_000);
        assert_eq!(config["linux"]["resources"]["cpu"]["shares"], 358);
        h.cgroups.created_by_runc(&path, 358, Some(200_000));
        tokio::time::sleep(std::time::Duration::from_millis(19_900)).await;
        assert_eq!(h.cgroups.cpu_quota(&path).unwrap(), Some(200_000));
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert_eq!(h.cgroups.cpu_quota(&path).unwrap(), Some(35_000));
        assert_eq!(
            h.cgroups.calls(),
            [CgroupCall::SetCpuQuota {
                path: path.clone(),
                quota_us: 35_000
            }]
        );
    }

    #[tokio::test]
    async fn big_instances_need_no_boost_and_bad_disk_sizes_are_refused() {
        let h = harness().await;
        let mut req = request(&h, RuntimeName::Custom);
        req.spec.cpu_milli = 4000;
        req.spec.memory_mb = 8192;
        h.driver.create(&req).await.unwrap();
        let config = h.oci.config_of(&format!("kt-{}", req.instance_id)).unwrap();
        assert_eq!(config["linux"]["resources"]["cpu"]["quota"], 400_000);
        assert_eq!(config["linux"]["resources"]["cpu"]["shares"], 4096);

        let mut req = request(&h, RuntimeName::Custom);
        req.spec.disk_mb = 20_480;
        let err = h.driver.create(&req).await.unwrap_err();
        assert!(kiln_core::error_chain(&err).contains("10240"), "{err:?}");
        assert_eq!(h.disk.calls().len(), 1);
        assert_eq!(h.driver.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn default_disks_come_from_the_pool_and_others_are_formatted() {
        let h = harness().await;
        let mut config = h.driver.config().clone();
        config.disk_pool = 1;
        let disk = Arc::new(RecordingDisk::new());
        let driver = ContainerDriver::with_backends(
            config,
            &h.state.join("pooled"),
            h.oci.clone(),
            h.net.clone(),
            h.mounter.clone(),
        )
        .await
        .unwrap()
        .with_cgroups(h.cgroups.clone())
        .with_disk(disk.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while driver.pooled_disks() < 1 {
            assert!(std::time::Instant::now() < deadline, "pool never filled");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let req = request(&h, RuntimeName::Custom);
        driver.create(&req).await.unwrap();
        let dir = h
            .state
            .join("pooled/instances")
            .join(req.instance_id.as_str());
        // The pooled image was renamed into the instance dir and mounted.
        assert!(dir.join("disk.img").is_file());
        assert_eq!(disk.mounts(), [(dir.join("disk.img"), dir.join("disk"))]);
        assert!(disk.calls().is_empty());

        let mut req = request(&h, RuntimeName::Custom);
        req.spec.disk_mb = 1024;
        driver.create(&req).await.unwrap();
        assert_eq!(disk.calls().len(), 1);
        assert_eq!(disk.calls()[0].size_mb, 1024);

        for id in driver.list().await.unwrap() {
            driver.destroy(&id).await.unwrap();
        }
        driver.shutdown().await.unwrap();
        assert_eq!(driver.pooled_disks(), 0);
        assert_eq!(
            std::fs::read_dir(h.state.join("pooled/disk-pool"))
                .unwrap()
                .count(),
            0
        );
    }

    #[tokio::test]
    async fn freeze_and_thaw_use_the_instance_cgroup_and_destroy_removes_it() {
        let h = harness().await;
        let req = request(&h, RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        let path = h.driver.cgroup_of(&req.instance_id);
        assert_eq!(path, format!("/kt/kt-{}", req.instance_id));
        h.cgroups.created_by_runc(&path, 358, Some(35_000));
        h.cgroups.created_by_runc("/kt", 1024, None);
        h.cgroups.set_stats(
            &path,
            crate::cgroup::CgroupStats {
                cpu_usage_us: 1_500_000,
                memory_bytes: 42 << 20,
                memory_limit_bytes: Some(512 << 20),
                oom_kills: 1,
                pids: 3,
                ..Default::default()
            },
        );
        let st = h.driver.stats(&req.instance_id).await.unwrap().unwrap();
        assert_eq!(st.cpu_usage_us, 1_500_000);
        assert_eq!(st.memory_bytes, 42 << 20);
        assert_eq!(st.memory_limit_bytes, Some(512 << 20));
        assert_eq!((st.oom_kills, st.pids, st.frozen), (1, 3, false));
        h.driver.freeze(&req.instance_id).await.unwrap();
        assert!(
            h.driver
                .stats(&req.instance_id)
                .await
                .unwrap()
                .unwrap()
                .frozen
        );
        assert!(h.cgroups.stats(&path).unwrap().frozen);
        h.oci.pause(&format!("kt-{}", req.instance_id));
        assert!(h.driver.is_running(&req.instance_id).await.unwrap());
        h.driver.thaw(&req.instance_id).await.unwrap();
        assert!(!h.cgroups.stats(&path).unwrap().frozen);

        let unknown = InstanceId::generate();
        assert!(matches!(
            h.driver.freeze(&unknown).await,
            Err(SandboxError::NotFound(_))
        ));

        h.driver.freeze(&req.instance_id).await.unwrap();
        h.driver.destroy(&req.instance_id).await.unwrap();
        let calls = h.cgroups.calls();
        let thaw = calls
            .iter()
            .rposition(|c| *c == CgroupCall::Thaw(path.clone()))
            .unwrap();
        let remove = calls
            .iter()
            .position(|c| *c == CgroupCall::Remove(path.clone()))
            .unwrap();
        assert!(thaw < remove, "{calls:?}");
        assert!(!h.cgroups.exists(&path));

        h.driver.shutdown().await.unwrap();
        assert!(!h.cgroups.exists("/kt"));
    }

    async fn isolated_harness() -> (Harness, Arc<crate::net::RecordingCommands>) {
        let h = harness().await;
        let cmd = Arc::new(crate::net::RecordingCommands::new());
        let config: crate::net::NetworkConfig = serde_json::from_value(serde_json::json!({
            "standard_bandwidth_mbit": 100,
            "performance_bandwidth_mbit": 500,
            "vpcs": [{"id": "vpc-a", "cidr": "192.168.0.0/16",
                "vswitches": [{"id": "vsw-a", "cidr": "192.168.50.0/24",
                    "gateway": "192.168.50.1", "instance_pool": "192.168.50.128/30"}],
                "security_groups": [{"id": "sg-a"}]}]
        }))
        .unwrap();
        let isolation = NetIsolation::start("kt", config, cmd.clone())
            .await
            .unwrap();
        let Harness {
            _tmp,
            state,
            code,
            oci,
            net,
            mounter,
            cgroups,
            disk,
            driver,
        } = h;
        let driver = driver.with_net_isolation(Arc::new(isolation));
        cmd.clear();
        let h = Harness {
            _tmp,
            state,
            code,
            oci,
            net,
            mounter,
            cgroups,
            disk,
            driver,
        };
        (h, cmd)
    }

    fn cmd_lines(cmd: &crate::net::RecordingCommands) -> Vec<String> {
        cmd.calls()
            .iter()
            .map(|c| format!("{} {}", c.line(), c.stdin.as_deref().unwrap_or("")))
            .collect()
    }

    #[tokio::test]
    async fn instances_are_attached_to_the_isolation_and_detached_on_destroy() {
        let (h, cmd) = isolated_harness().await;
        let iso = h.driver.net_isolation().unwrap().clone();
        let req = request(&h, RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        assert_eq!(iso.attached(), ["kt-0".to_owned()]);
        let lines = cmd_lines(&cmd);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("tbf") && l.contains("100mbit")),
            "standard instances get the standard rate: {lines:?}"
        );

        // A performance instance (10 GB disk) gets the performance rate.
        let mut spec = sample_spec();
        spec.runtime = RuntimeName::Custom;
        spec.disk_mb = 10_240;
        let big = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir: h.code.clone(),
        };
        cmd.clear();
        h.driver.create(&big).await.unwrap();
        assert!(cmd_lines(&cmd)
            .iter()
            .any(|l| l.contains("tbf") && l.contains("500mbit")));
        assert_eq!(iso.attached(), ["kt-0".to_owned(), "kt-1".to_owned()]);

        h.driver.destroy(&req.instance_id).await.unwrap();
        assert_eq!(iso.attached(), ["kt-1".to_owned()]);
        h.driver.destroy(&big.instance_id).await.unwrap();
        assert!(iso.attached().is_empty());
        cmd.clear();
        h.driver.shutdown().await.unwrap();
        assert!(cmd_lines(&cmd)
            .iter()
            .any(|l| l.contains("delete table inet kt")));
    }

    #[tokio::test]
    async fn an_instance_whose_network_cannot_be_isolated_does_not_start() {
        let (h, _cmd) = isolated_harness().await;
        let iso = h.driver.net_isolation().unwrap().clone();
        let mut spec = sample_spec();
        spec.runtime = RuntimeName::Custom;
        spec.network = Some(kiln_core::NetworkSpec {
            internet_access: false,
            vpc: Some(kiln_core::VpcAttachment {
                vpc_id: "vpc-unknown".into(),
                vswitch_ids: vec!["vsw-a".into()],
                security_group_id: "sg-a".into(),
            }),
        });
        let req = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir: h.code.clone(),
        };
        let err = h.driver.create(&req).await.unwrap_err();
        assert!(
            matches!(&err, SandboxError::Network { .. })
                && kiln_core::error_chain(&err).contains("vpc-unknown"),
            "{err}"
        );
        assert!(iso.attached().is_empty());
        assert!(h.net.existing().is_empty());
        assert!(h.mounter.mounted().is_empty());
        assert!(h
            .oci
            .calls()
            .iter()
            .all(|c| !matches!(c, OciCall::Run { .. })));
        assert!(h.driver.list().await.unwrap().is_empty());
    }
}
