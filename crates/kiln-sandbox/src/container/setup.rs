//! Starting and stopping the driver: its backends, state directories and
//! pools, the leftovers of a previous run, shutdown, and its accessors.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use kiln_core::{InstanceId, RuntimeName};

use crate::cgroup::CgroupOps;
use crate::container::config::ContainerConfig;
use crate::container::disk::{DiskOps, LoopExt4, RecordingDisk};
use crate::container::disk_pool::{
    DiskPool, DiskPoolConfig, DEFAULT_REFILL_DELAY, DEFAULT_RETRY_DELAY,
};
use crate::container::oci_runtime::{OciRuntime, RuncCli};
use crate::driver::SandboxError;
use crate::mounts::{unmount_all_under, HostMounter, Mounter};
use crate::net::{IpCommand, NetIsolation, NetPool, NetworkOps, SystemCommands};
use crate::rootfs::RootfsBuilder;

use super::errors::{fs_err, isolation_err, net_err};
use super::ContainerDriver;

/// Find `name` on PATH (an explicit path is taken as is).
pub(super) fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Build `runtime`'s root filesystem where a driver made from `config`
/// and `state_dir` will look for it, unless it is there already, before
/// any driver exists. The first build (debootstrap) takes minutes; made
/// first, it is the only thing a start stopped meanwhile leaves (a
/// half-built tree, removed by the next build), where a driver would
/// already have made namespaces, its nftables table, cgroups and
/// pre-made sandboxes.
pub async fn prepare_runtime(
    config: &ContainerConfig,
    state_dir: &Path,
    runtime: RuntimeName,
) -> Result<(), SandboxError> {
    ensure_rootfs(
        &rootfs_dir_of(config, state_dir),
        config.debootstrap_mirror.as_deref(),
        &HostMounter,
        runtime,
    )
    .await
}

/// Where a driver keeps its runtimes' root filesystems.
fn rootfs_dir_of(config: &ContainerConfig, state_dir: &Path) -> PathBuf {
    config
        .rootfs_dir
        .clone()
        .unwrap_or_else(|| state_dir.join("rootfs"))
}

async fn ensure_rootfs(
    dir: &Path,
    mirror: Option<&str>,
    mounter: &dyn Mounter,
    runtime: RuntimeName,
) -> Result<(), SandboxError> {
    if runtime.is_container_image() {
        // Its root filesystem is each function's image, pulled by the
        // agent on demand.
        return Ok(());
    }
    RootfsBuilder {
        dir,
        mirror,
        mounter,
    }
    .ensure(runtime)
    .await
    .map(|_| ())
    .map_err(|e| SandboxError::runtime_unavailable(runtime, "building it failed", e))
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
        let driver = match network {
            Some(network) => {
                let started = NetIsolation::start(
                    &driver.config.name_prefix,
                    network,
                    Arc::new(SystemCommands),
                )
                .await;
                match started {
                    Ok(isolation) => driver.with_net_isolation(Arc::new(isolation)),
                    Err(e) => {
                        // Stop the pool refill and drop its namespaces.
                        if let Err(drain) = driver.shutdown().await {
                            tracing::warn!(error = %drain, "cannot drain the namespace pool");
                        }
                        return Err(isolation_err(e));
                    }
                }
            }
            None => driver,
        };
        let mut driver = driver;
        if let Err(e) = driver.start_premade() {
            if let Err(drain) = driver.shutdown().await {
                tracing::warn!(error = %drain, "cannot drain the pools");
            }
            return Err(e);
        }
        Ok(driver)
    }

    /// Start the pools of pre-made sandboxes when `[sandbox.premade]` is
    /// on (the real driver only: they run real containers).
    fn start_premade(&mut self) -> Result<(), SandboxError> {
        if !self.config.premade.enabled {
            return Ok(());
        }
        let deps = super::premade::PremadeDeps {
            name_prefix: self.config.name_prefix.clone(),
            cgroup_parent: self.config.cgroup_parent.clone(),
            uid: self.config.uid_base,
            tmp_size_mb: self.config.tmp_size_mb,
            rootfs_dir: self.rootfs_dir.clone(),
            swap: self.cgroups.swap_control(),
            oci: self.oci.clone(),
            mounter: self.mounter.clone(),
            disk_pool: self.disk_pool.clone(),
            net: self.pool.clone(),
        };
        let premade = super::premade::Premade::start(
            self.config.premade.clone(),
            self.premade_dir.clone(),
            deps,
        )?;
        tracing::info!(
            budget_mb = self.config.premade.budget_mb,
            sandbox_mb = self.config.premade.sandbox_mb,
            max_per_runtime = self.config.premade.max_per_runtime,
            "pre-made sandboxes on"
        );
        self.premade = Some(premade);
        Ok(())
    }

    /// Ready pre-made sandboxes per runtime (empty when the pools are off).
    pub fn premade_ready(&self) -> HashMap<RuntimeName, usize> {
        self.premade
            .as_ref()
            .map(|p| p.ready_counts())
            .unwrap_or_default()
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
        let rootfs_dir = rootfs_dir_of(&config, state_dir);
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
            premade_dir: super::premade::premade_dir(state_dir),
            premade: None,
            aliases: Mutex::new(HashMap::new()),
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
        ensure_rootfs(
            &self.rootfs_dir,
            self.config.debootstrap_mirror.as_deref(),
            self.mounter.as_ref(),
            runtime,
        )
        .await
    }

    /// Stop refilling the pool and delete the pooled namespaces, and the
    /// network isolation when no instance is left. Instances are left to
    /// the caller (`destroy` each first).
    pub async fn shutdown(&self) -> Result<(), SandboxError> {
        // Pre-made sandboxes first: they hold network slots and disks. A
        // failure there is reported after the rest is shut down.
        let premade = match &self.premade {
            Some(premade) => premade.shutdown().await,
            None => Ok(()),
        };
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
        premade
    }

    /// Remove the (empty) cgroup parent this driver's containers were
    /// created under, deepest segment first. A parent that still holds
    /// anything (another agent's instances) stays.
    pub(super) fn remove_cgroup_parent(&self) {
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

    pub(super) fn container_id(&self, id: &InstanceId) -> String {
        if let Some(cid) = self.aliases.lock().expect("lock").get(id) {
            return cid.clone();
        }
        format!("{}-{}", self.config.name_prefix, id)
    }

    pub(super) fn cgroups_path(&self, id: &InstanceId) -> String {
        format!("/{}/{}", self.config.cgroup_parent, self.container_id(id))
    }

    /// Remove what a previous run with this prefix left: containers under
    /// our runc root, instance dirs (after unmounting), netns and veths.
    pub(super) async fn clean_leftovers(&self) -> Result<(), SandboxError> {
        if let Some(state_dir) = self.instances_dir.parent() {
            wait_for_orphaned_runtime_commands(&state_dir.join("runc")).await;
        }
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
        super::premade::remove_leftovers(self.mounter.as_ref(), &self.premade_dir)?;
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
}

/// Wait (up to 30 s) for runtime commands under `root` that a previous
/// run started: a killed agent's `runc run` goes on as an orphan and
/// would create its container after the cleanup looked for containers.
async fn wait_for_orphaned_runtime_commands(root: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let running = runtime_commands_under(root);
        if running.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            tracing::warn!(?running, root = %root.display(), "runtime commands of a previous run still running; cleaning up anyway");
            return;
        }
        tracing::info!(
            ?running,
            "waiting for a previous run's runtime commands to finish"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Pids of processes whose command line has `--root <root>`.
fn runtime_commands_under(root: &Path) -> Vec<u32> {
    let Some(root) = root.to_str() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.windows(2)
                    .any(|w| w[0] == b"--root" && w[1] == root.as_bytes())
            })
        })
        .collect()
}

/// The pool of images of the default disk size owned by `uid_base`.
pub(super) fn disk_pool_config(
    config: &ContainerConfig,
    dir: &Path,
    capacity: usize,
) -> DiskPoolConfig {
    DiskPoolConfig {
        dir: dir.to_owned(),
        prefix: config.name_prefix.clone(),
        size_mb: crate::container::disk::DEFAULT_DISK_MB,
        owner: config.uid_base,
        capacity,
        retry_delay: DEFAULT_RETRY_DELAY,
        refill_delay: DEFAULT_REFILL_DELAY,
    }
}

pub(super) fn prepare_state_dirs(
    state_dir: &Path,
    instances_dir: &Path,
) -> Result<(), SandboxError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_commands_are_found_by_their_root() {
        let root = tempfile::tempdir().unwrap();
        let root_arg = root.path().to_str().unwrap().to_owned();
        // `sh -c 'read _' sh ARG...`: one process (`read` is a builtin, so
        // nothing forks), the words only its argv. Not `python3`: on a
        // machine with pyenv that is a bash shim whose forked subshells
        // carry the same argv for a moment (CI saw two pids once).
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read _", "sh", "--root", &root_arg, "run"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // The child shows its argv once it has exec'd python3: until then
        // /proc holds the forked test binary's.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let found = loop {
            let found = runtime_commands_under(root.path());
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let other = runtime_commands_under(&root.path().join("other"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(found, vec![child.id()]);
        assert!(other.is_empty());
        // Gone once reaped; /proc may lag the reaping under load, so the
        // check waits a little (CI saw it once), and still fails if the
        // process stays.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let left = loop {
            let left = runtime_commands_under(root.path());
            if left.is_empty() || std::time::Instant::now() > deadline {
                break left;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(left.is_empty(), "still under the root: {left:?}");
    }
}
