//! Pre-made sandboxes: containers created and started ahead of demand, per
//! runtime, so a cold start only hands one its function (issue 20).
//!
//! A pre-made sandbox is everything a container instance is before its
//! function runs: the runtime's read-only root filesystem, the user, PID,
//! mount, IPC, UTS, cgroup and network namespaces, seccomp and capabilities,
//! a network slot (whose veth the isolation table drops until it is
//! attached), the writable disk with an empty `/tmp`, and an empty `/code`.
//! Its PID 1 is `kiln-init` (`init/main.rs`, built static by `build.rs`
//! and embedded here), blocked opening the assignment FIFO bound at
//! `/dev/.kiln/assign`. It holds no tenant data and its cgroup caps its
//! memory at `sandbox_mb`, which is what it is charged against the pool's
//! budget.
//!
//! Layout: `state_dir/premade/<key>/` is an instance directory (see
//! [`InstancePaths`]) plus `kiln/` (the init binary, hard-linked, and the
//! FIFO, bound read-only at `/dev/.kiln`) and, once it can be claimed, an
//! empty `ready` file. `code/` is bound onto itself
//! with shared propagation and the bundle binds it at `/code` as a slave,
//! so the code overlay mounted on it at the claim appears in the running
//! container. The container id is `<name_prefix>-<key>`, its cgroup
//! `/<cgroup_parent>/<container id>`, its netns `<name_prefix>-<slot>`:
//! the driver's startup cleanup removes all of them after a crash.
//!
//! A claim (in [`ContainerDriver::create`]) moves the directory to
//! `instances/<instance id>` (leaving a symlink at the old path, where
//! runc's state names the bundle, so `runc exec` finds the rewritten
//! `config.json`), sets the function's cgroup limits and attaches its
//! egress rules, mounts its code, and only then writes the assignment
//! (command, environment, working directory) to the FIFO; `kiln-init`
//! execs the command as PID 1. From there the instance is like any other,
//! and its release destroys it: a pre-made sandbox serves one instance of
//! one function, never two, and never two accounts.
//!
//! Functions with layers or a disk size other than the default are not
//! served from the pool (they take the ordinary path).
//!
//! How big each runtime's pool is and when it is refilled is
//! [`crate::pool_policy`], shared with the microVM backend's pool of
//! paused VMs: a container is charged `sandbox_mb`, every built runtime
//! keeps at least one.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

use crate::cgroup::SwapControl;
use crate::container::bundle::{self, BundleParams};
use crate::container::disk_pool::DiskPool;
use crate::container::instance::InstancePaths;
use crate::container::instance_files::make_dirs;
use crate::container::oci_runtime::OciRuntime;
use crate::driver::SandboxError;
use crate::mounts::{unmount_all_under, Mounter};
use crate::net::{NetPool, NetSlot};
use crate::pool_policy::{
    self, Demand, Limits, Meminfo, OrdinaryStart, Pacer, Want, IDLE_CHECK, RETRY_DELAY,
};
use crate::rootfs::{is_complete, rootfs_path};

use super::errors::{fs_err, net_err};

/// The static `kiln-init` executable (see `build.rs`).
pub const INIT_BINARY: &[u8] = include_bytes!(env!("KILN_INIT_PATH"));
/// Where the sandbox sees its `kiln/` directory (on runc's `/dev` tmpfs:
/// the root filesystem is read-only and has no mount point of its own).
pub const KILN_DIR_IN_SANDBOX: &str = "/dev/.kiln";
/// The init, as runc starts it.
pub const INIT_IN_SANDBOX: &str = "/dev/.kiln/init";
const ASSIGNMENT_HEADER: &str = "kiln-assign-v1";

/// Why a `[sandbox.premade]` section cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PremadeConfigError {
    #[error("sandbox_mb must be between 16 and 1024, got {0}")]
    SandboxMb(u32),
    #[error("budget_mb {budget} holds no sandbox of sandbox_mb {sandbox}: raise it or set enabled = false")]
    Budget { budget: u32, sandbox: u32 },
    #[error("max_per_runtime must be between 1 and 256, got {0}")]
    MaxPerRuntime(usize),
    #[error("demand_window_s must be between 10 and 86400, got {0}")]
    Window(u64),
}

/// `[sandbox.premade]`: pools of pre-made container sandboxes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PremadeConfig {
    pub enabled: bool,
    /// Memory all pre-made sandboxes of the node may take together: each
    /// is charged (and limited by its cgroup to) `sandbox_mb` until it is
    /// claimed.
    pub budget_mb: u32,
    /// The memory limit of a sandbox waiting in the pool.
    pub sandbox_mb: u32,
    /// The most sandboxes ready for one runtime.
    pub max_per_runtime: usize,
    /// How far back the demand that sizes a runtime's pool is looked at:
    /// each pool aims at the most cold starts its runtime had within 10 s
    /// over this window (at least one once the runtime is built).
    pub demand_window_s: u64,
}

impl Default for PremadeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            budget_mb: 1024,
            sandbox_mb: 32,
            max_per_runtime: 16,
            demand_window_s: 300,
        }
    }
}

impl PremadeConfig {
    pub fn validate(&self) -> Result<(), PremadeConfigError> {
        if !(16..=1024).contains(&self.sandbox_mb) {
            return Err(PremadeConfigError::SandboxMb(self.sandbox_mb));
        }
        if self.enabled && self.budget_mb < self.sandbox_mb {
            return Err(PremadeConfigError::Budget {
                budget: self.budget_mb,
                sandbox: self.sandbox_mb,
            });
        }
        if !(1..=256).contains(&self.max_per_runtime) {
            return Err(PremadeConfigError::MaxPerRuntime(self.max_per_runtime));
        }
        if !(10..=86_400).contains(&self.demand_window_s) {
            return Err(PremadeConfigError::Window(self.demand_window_s));
        }
        Ok(())
    }

    /// How many sandboxes the budget holds in all.
    pub fn capacity(&self) -> usize {
        (self.budget_mb / self.sandbox_mb.max(1)) as usize
    }

    /// The pool policy's limits: the budget in MiB, each sandbox charged
    /// `sandbox_mb`.
    pub fn limits(&self) -> Limits {
        Limits {
            budget_mb: u64::from(self.budget_mb),
            max_per_key: self.max_per_runtime,
        }
    }
}

/// The assignment `kiln-init` reads (see `init/main.rs` for the format).
pub fn encode_assignment(cwd: &str, args: &[String], env: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |s: &str| {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    };
    push(ASSIGNMENT_HEADER);
    push(cwd);
    push(&args.len().to_string());
    for a in args {
        push(a);
    }
    push(&env.len().to_string());
    for e in env {
        push(e);
    }
    out
}

/// How many sandboxes each runtime's pool aims at: its recent demand
/// (at least one), at most `max_per_runtime`, all of them within the
/// budget's capacity (the busiest runtimes first), none under pressure
/// (see [`pool_policy::plan`]).
pub fn plan(
    config: &PremadeConfig,
    demand: &[(RuntimeName, usize)],
    under_pressure: bool,
) -> HashMap<RuntimeName, usize> {
    let mut wants: Vec<Want<RuntimeName>> = demand
        .iter()
        .map(|(r, d)| Want {
            key: *r,
            demand: *d,
            floor: 1,
            cost_mb: u64::from(config.sandbox_mb),
        })
        .collect();
    // Equal demand: by name.
    wants.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
    pool_policy::plan(&config.limits(), &wants, under_pressure)
}

/// One sandbox waiting in the pool.
#[derive(Debug, Clone)]
pub(super) struct Pooled {
    pub(super) key: String,
    pub(super) runtime: RuntimeName,
    pub(super) container_id: String,
    pub(super) paths: InstancePaths,
    pub(super) slot: NetSlot,
    pub(super) pid: u32,
    pub(super) pid_start: Option<u64>,
}

impl Pooled {
    /// The host side of the sandbox's `/dev/.kiln`.
    pub(super) fn kiln_dir(paths: &InstancePaths) -> PathBuf {
        paths.dir.join("kiln")
    }

    /// `ready`: the sandbox is in the pool (a file, empty).
    pub fn ready_marker(paths: &InstancePaths) -> PathBuf {
        paths.dir.join("ready")
    }

    pub(super) fn fifo(paths: &InstancePaths) -> PathBuf {
        Self::kiln_dir(paths).join("assign")
    }
}

/// What making and removing pre-made sandboxes needs of the driver.
pub(super) struct PremadeDeps {
    pub(super) name_prefix: String,
    pub(super) cgroup_parent: String,
    pub(super) uid: u32,
    pub(super) tmp_size_mb: u32,
    pub(super) rootfs_dir: PathBuf,
    pub(super) swap: SwapControl,
    pub(super) oci: Arc<dyn OciRuntime>,
    pub(super) mounter: Arc<dyn Mounter>,
    pub(super) disk_pool: Arc<DiskPool>,
    pub(super) net: Arc<NetPool>,
}

/// The pools of one driver.
pub(super) struct Premade {
    config: PremadeConfig,
    dir: PathBuf,
    init: PathBuf,
    deps: PremadeDeps,
    ready: Mutex<HashMap<RuntimeName, VecDeque<Pooled>>>,
    demand: Mutex<Demand<RuntimeName>>,
    seq: AtomicU64,
    refill: Mutex<Option<JoinHandle<()>>>,
    /// Set by `shutdown`: the refill ends after the sandbox it is making.
    stopping: std::sync::atomic::AtomicBool,
    /// Cold starts (claims and ordinary ones) and the refill's wake-ups.
    pacer: Arc<Pacer>,
    meminfo: Meminfo,
}

/// `state_dir/premade`.
pub(super) fn premade_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("premade")
}

/// Remove whatever a previous run left in `dir` (moved-away sandboxes'
/// symlinks, sandboxes with their mounts). Their containers, netns and
/// cgroups go with the driver's other leftovers.
pub(super) fn remove_leftovers(mounter: &dyn Mounter, dir: &Path) -> Result<(), SandboxError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_link = entry.file_type().map(|t| t.is_symlink()).unwrap_or(false);
        if is_link || !path.is_dir() {
            std::fs::remove_file(&path).map_err(|e| fs_err(path.display(), e))?;
            continue;
        }
        tracing::info!(dir = %path.display(), "removing leftover pre-made sandbox directory");
        unmount_all_under(mounter, &path).map_err(|e| fs_err(path.display(), e))?;
        std::fs::remove_dir_all(&path).map_err(|e| fs_err(path.display(), e))?;
    }
    Ok(())
}

/// The bundle of an instance; for a pre-made sandbox before its claim,
/// `spec` is a placeholder and its process is `kiln-init`.
pub(super) struct BundleInputs<'a> {
    pub(super) instance_id: &'a InstanceId,
    pub(super) spec: &'a InstanceSpec,
    pub(super) paths: &'a InstancePaths,
    pub(super) slot: &'a NetSlot,
    pub(super) cgroups_path: String,
    pub(super) boost_cpu_milli: Option<u32>,
    pub(super) region: Option<&'a str>,
}

impl PremadeDeps {
    /// `config.json` of a pre-made sandbox: the instance's own bundle with
    /// `/code` a slave of its shared host mount point and `kiln/` bound
    /// read-only at [`KILN_DIR_IN_SANDBOX`].
    pub(super) fn config(&self, b: &BundleInputs<'_>) -> Result<Value, SandboxError> {
        let code = b.paths.code();
        let hosts = b.paths.hosts();
        let tmp = b.paths.tmp();
        let mut config = bundle::build_config(&BundleParams {
            instance_id: b.instance_id,
            spec: b.spec,
            region: b.region,
            hostname: &b.slot.name,
            uid_base: self.uid,
            netns_path: b.slot.netns_path(),
            cgroups_path: b.cgroups_path.clone(),
            code_source: &code,
            hosts_file: &hosts,
            tmp_size_mb: self.tmp_size_mb,
            tmp_source: Some(&tmp),
            boost_cpu_milli: b.boost_cpu_milli,
            swap: self.swap,
        })
        .map_err(SandboxError::invalid_spec)?;
        config["annotations"]["io.kiln.runtime"] = json!(b.spec.runtime.as_str());
        if let Some(mounts) = config["mounts"].as_array_mut() {
            for m in mounts.iter_mut() {
                if m["destination"] == crate::process::CODE_MOUNT {
                    if let Some(options) = m["options"].as_array_mut() {
                        options.push(json!("rslave"));
                    }
                }
            }
            mounts.push(json!({
                "destination": KILN_DIR_IN_SANDBOX,
                "type": "none",
                "source": Pooled::kiln_dir(b.paths).display().to_string(),
                "options": ["bind", "ro", "nosuid", "nodev"],
            }));
        }
        Ok(config)
    }

    fn placeholder_spec(&self, runtime: RuntimeName, memory_mb: u32) -> InstanceSpec {
        InstanceSpec {
            account_id: "0".parse().expect("a valid account id"),
            function_name: "kiln-premade".parse().expect("a valid function name"),
            revision: String::new(),
            version: None,
            runtime,
            handler: String::new(),
            command: vec![INIT_IN_SANDBOX.to_owned()],
            args: Vec::new(),
            port: 9000,
            environment: Default::default(),
            memory_mb,
            // A whole CPU while runc sets the sandbox up.
            cpu_milli: 1000,
            disk_mb: crate::container::disk::DEFAULT_DISK_MB,
            timeout_s: 1,
            concurrency: 1,
            code_digest: String::new(),
            code_size: 0,
            initializer: None,
            pre_stop: None,
            layers: Vec::new(),
            role: None,
            network: None,
            image: None,
        }
    }
}

impl Premade {
    /// Write the init binary and start refilling. `dir` must be empty
    /// (the driver's startup cleanup has run).
    pub(super) fn start(
        config: PremadeConfig,
        dir: PathBuf,
        deps: PremadeDeps,
    ) -> Result<Arc<Self>, SandboxError> {
        std::fs::create_dir_all(&dir).map_err(|e| fs_err(dir.display(), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| fs_err(dir.display(), e))?;
        let init = dir.join(".kiln-init");
        let tmp = dir.join(".kiln-init.tmp");
        std::fs::write(&tmp, INIT_BINARY).map_err(|e| fs_err(tmp.display(), e))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| fs_err(tmp.display(), e))?;
        std::fs::rename(&tmp, &init).map_err(|e| fs_err(init.display(), e))?;
        let premade = Arc::new(Self {
            config,
            dir,
            init,
            deps,
            ready: Mutex::new(HashMap::new()),
            demand: Mutex::new(Demand::default()),
            seq: AtomicU64::new(0),
            refill: Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
            pacer: Arc::new(Pacer::default()),
            meminfo: Meminfo::default(),
        });
        let task = tokio::spawn(premade.clone().refill_loop());
        *premade.refill.lock().expect("lock") = Some(task);
        Ok(premade)
    }

    pub(super) fn deps(&self) -> &PremadeDeps {
        &self.deps
    }

    /// Ready sandboxes per runtime.
    pub(super) fn ready_counts(&self) -> HashMap<RuntimeName, usize> {
        self.ready
            .lock()
            .expect("lock")
            .iter()
            .map(|(r, q)| (*r, q.len()))
            .collect()
    }

    /// A ready sandbox of `runtime`, counted as demand either way.
    pub(super) fn take(&self, runtime: RuntimeName) -> Option<Pooled> {
        let now = Instant::now();
        self.demand.lock().expect("lock").record(runtime, now);
        self.pacer.started(now);
        let taken = self
            .ready
            .lock()
            .expect("lock")
            .get_mut(&runtime)
            .and_then(VecDeque::pop_front);
        self.pacer.wake();
        taken
    }

    /// Count a cold start on the ordinary path until the guard drops (see
    /// [`Pacer::ordinary_start`]).
    pub(super) fn ordinary_start(&self) -> OrdinaryStart {
        self.pacer.ordinary_start()
    }

    /// A cold start the pool did not serve (layers, a larger disk): still
    /// demand for its runtime.
    pub(super) fn record_miss(&self, runtime: RuntimeName) {
        self.demand
            .lock()
            .expect("lock")
            .record(runtime, Instant::now());
        self.pacer.wake();
    }

    fn targets(&self) -> HashMap<RuntimeName, usize> {
        let window = Duration::from_secs(self.config.demand_window_s);
        let now = Instant::now();
        let built: Vec<RuntimeName> = RuntimeName::ALL
            .into_iter()
            .filter(|r| is_complete(&rootfs_path(&self.deps.rootfs_dir, *r)))
            .collect();
        let demand: Vec<(RuntimeName, usize)> = {
            let mut d = self.demand.lock().expect("lock");
            built
                .iter()
                .map(|r| (*r, d.peak(*r, window, now)))
                .collect()
        };
        plan(&self.config, &demand, self.meminfo.under_pressure())
    }

    async fn refill_loop(self: Arc<Self>) {
        let mut last_made = Instant::now();
        while !self.stopping.load(Ordering::Acquire) {
            let targets = self.targets();
            // Shrink first: pools above their target (pressure, less
            // demand, a smaller budget share) give sandboxes back.
            let surplus: Vec<Pooled> = {
                let mut ready = self.ready.lock().expect("lock");
                let mut out = Vec::new();
                for (runtime, q) in ready.iter_mut() {
                    let target = targets.get(runtime).copied().unwrap_or(0);
                    while q.len() > target {
                        out.extend(q.pop_back());
                    }
                }
                out
            };
            for p in surplus {
                tracing::info!(sandbox = %p.key, runtime = %p.runtime, "pre-made sandbox removed (pool above its target)");
                if let Err(e) = self.destroy(&p).await {
                    tracing::warn!(error = %kiln_core::error_chain(&e), "cannot remove a pre-made sandbox");
                }
            }
            let next = {
                let ready = self.ready.lock().expect("lock");
                let len = |r: &RuntimeName| ready.get(r).map_or(0, VecDeque::len);
                let total: usize = ready.values().map(VecDeque::len).sum();
                let cost = u64::from(self.config.sandbox_mb);
                // The emptiest pool (relative to its target) first.
                pool_policy::next_to_make(
                    &targets,
                    len,
                    |_| cost,
                    total as u64 * cost,
                    u64::from(self.config.budget_mb),
                    |a, b| a.as_str().cmp(b.as_str()),
                )
            };
            if next.is_some() && self.pacer.defer(Instant::now(), last_made) {
                self.pacer.sleep(pool_policy::REFILL_QUIET).await;
                continue;
            }
            let Some(runtime) = next else {
                self.pacer.sleep(IDLE_CHECK).await;
                continue;
            };
            let started = Instant::now();
            let made = self.make(runtime).await;
            last_made = Instant::now();
            match made {
                Ok(p) => {
                    tracing::debug!(sandbox = %p.key, %runtime, ms = started.elapsed().as_millis() as u64, "pre-made sandbox ready");
                    let marker = Pooled::ready_marker(&p.paths);
                    let mut ready = self.ready.lock().expect("lock");
                    ready.entry(runtime).or_default().push_back(p);
                    // Written once it can be claimed (for operators, tests
                    // and `kiln bench`); it moves with a claimed sandbox.
                    if let Err(e) = std::fs::write(&marker, b"") {
                        tracing::debug!(error = %e, "cannot mark a pre-made sandbox ready");
                    }
                }
                Err(e) => {
                    tracing::warn!(%runtime, error = %kiln_core::error_chain(&e), "cannot make a pre-made sandbox; retrying");
                    tokio::time::sleep(RETRY_DELAY).await;
                }
            }
        }
    }

    /// Make and start one sandbox of `runtime`.
    async fn make(&self, runtime: RuntimeName) -> Result<Pooled, SandboxError> {
        let key = format!("p{}", self.seq.fetch_add(1, Ordering::Relaxed));
        let container_id = format!("{}-{key}", self.deps.name_prefix);
        let paths = InstancePaths {
            dir: self.dir.join(&key),
        };
        std::fs::create_dir(&paths.dir).map_err(|e| fs_err(paths.dir.display(), e))?;
        std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| fs_err(paths.dir.display(), e))?;
        let slot = match self.deps.net.take().await {
            Ok(slot) => slot,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&paths.dir);
                return Err(net_err(e));
            }
        };
        let mut pooled = Pooled {
            key,
            runtime,
            container_id,
            paths,
            slot,
            pid: 0,
            pid_start: None,
        };
        match self.make_inner(&mut pooled).await {
            Ok(()) => Ok(pooled),
            Err(e) => {
                if let Err(cleanup) = self.destroy(&pooled).await {
                    tracing::error!(error = %cleanup, "cleanup after a failed pre-made sandbox failed");
                }
                Err(e)
            }
        }
    }

    async fn make_inner(&self, p: &mut Pooled) -> Result<(), SandboxError> {
        let rootfs = rootfs_path(&self.deps.rootfs_dir, p.runtime);
        let spec = self
            .deps
            .placeholder_spec(p.runtime, self.config.sandbox_mb);
        let placeholder_id = InstanceId::generate();
        let config = self.deps.config(&BundleInputs {
            instance_id: &placeholder_id,
            spec: &spec,
            paths: &p.paths,
            slot: &p.slot,
            cgroups_path: format!("/{}/{}", self.deps.cgroup_parent, p.container_id),
            boost_cpu_milli: None,
            region: None,
        })?;
        let (paths, slot) = (p.paths.clone(), p.slot.clone());
        let (uid, init) = (self.deps.uid, self.init.clone());
        let (disk_pool, mounter) = (self.deps.disk_pool.clone(), self.deps.mounter.clone());
        tokio::task::spawn_blocking(move || {
            make_files(
                &paths,
                &slot,
                &rootfs,
                &init,
                uid,
                &disk_pool,
                mounter.as_ref(),
                &config,
            )
        })
        .await
        .map_err(|e| fs_err("pre-made sandbox files", e))??;
        let pid = self
            .deps
            .oci
            .run_detached(&p.container_id, &p.paths.bundle(), &p.paths.console_log())
            .await
            .map_err(|e| SandboxError::oci_runtime("starting a pre-made sandbox", e))?;
        p.pid = pid;
        p.pid_start = self.deps.oci.init_started(pid);
        Ok(())
    }

    /// Remove a sandbox that was never claimed: container (and with it
    /// its cgroup), mounts, directory, network slot.
    pub(super) async fn destroy(&self, p: &Pooled) -> Result<(), SandboxError> {
        let mut first: Option<SandboxError> = None;
        let _ = self.deps.oci.kill(&p.container_id, "KILL").await;
        if let Err(e) = self.deps.oci.delete_force(&p.container_id).await {
            first.get_or_insert(SandboxError::oci_runtime("removing a pre-made sandbox", e));
        }
        if p.paths.dir.exists() {
            match unmount_all_under(self.deps.mounter.as_ref(), &p.paths.dir) {
                Ok(()) => {
                    if let Err(e) = std::fs::remove_dir_all(&p.paths.dir) {
                        first.get_or_insert(fs_err(p.paths.dir.display(), e));
                    }
                }
                Err(e) => {
                    first.get_or_insert(fs_err(p.paths.dir.display(), e));
                }
            }
        }
        if let Err(e) = self.deps.net.release(&p.slot).await {
            first.get_or_insert(net_err(e));
        }
        first.map_or(Ok(()), Err)
    }

    /// Where the sandbox moved away from is kept as a symlink to its new
    /// place (runc's state names the bundle by its old path).
    pub(super) fn link_path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// Stop refilling and remove every ready sandbox.
    pub(super) async fn shutdown(&self) -> Result<(), SandboxError> {
        // Let a sandbox being made finish (and join the pool, drained
        // below) rather than abandon it half made.
        self.stopping.store(true, Ordering::Release);
        self.pacer.wake();
        let task = self.refill.lock().expect("lock").take();
        if let Some(mut task) = task {
            if tokio::time::timeout(Duration::from_secs(60), &mut task)
                .await
                .is_err()
            {
                tracing::warn!("the pre-made sandbox refill did not stop within 60 s");
                task.abort();
            }
        }
        let all: Vec<Pooled> = self
            .ready
            .lock()
            .expect("lock")
            .drain()
            .flat_map(|(_, q)| q)
            .collect();
        let mut first = None;
        for p in all {
            if let Err(e) = self.destroy(&p).await {
                first.get_or_insert(e);
            }
        }
        let _ = std::fs::remove_file(&self.init);
        first.map_or(Ok(()), Err)
    }
}

/// The sandbox's directories, writable disk, mounts, FIFO and bundle.
/// Blocking.
#[allow(clippy::too_many_arguments)]
fn make_files(
    paths: &InstancePaths,
    slot: &NetSlot,
    rootfs: &Path,
    init: &Path,
    uid: u32,
    disk_pool: &DiskPool,
    mounter: &dyn Mounter,
    config: &Value,
) -> Result<(), SandboxError> {
    let kiln = Pooled::kiln_dir(paths);
    make_dirs(&[
        (paths.bundle(), 0o711, None),
        (paths.rootfs(), 0o755, None),
        (paths.code(), 0o755, None),
        (paths.disk(), 0o711, None),
        (kiln.clone(), 0o755, None),
    ])?;
    disk_pool
        .provide(
            &paths.disk_image(),
            crate::container::disk::DEFAULT_DISK_MB,
            &paths.disk(),
            uid,
        )
        .map_err(|e| fs_err("writable filesystem", e))?;
    make_dirs(&[
        (paths.upper(), 0o755, Some(uid)),
        (paths.work(), 0o700, Some(uid)),
        (paths.tmp(), 0o1777, Some(uid)),
    ])?;
    let init_link = kiln.join("init");
    std::fs::hard_link(init, &init_link).map_err(|e| fs_err(init_link.display(), e))?;
    let fifo = Pooled::fifo(paths);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600))
        .map_err(|e| fs_err(fifo.display(), std::io::Error::from(e)))?;
    std::os::unix::fs::chown(&fifo, Some(uid), Some(uid)).map_err(|e| fs_err(fifo.display(), e))?;
    mounter
        .bind_readonly(rootfs, &paths.rootfs())
        .map_err(|e| fs_err("runtime root filesystem", e))?;
    mounter
        .shared_mount_point(&paths.code())
        .map_err(|e| fs_err("/code mount point", e))?;
    let hosts = paths.hosts();
    std::fs::write(&hosts, bundle::hosts_file(&slot.name, slot.instance_addr))
        .map_err(|e| fs_err(hosts.display(), e))?;
    write_config(paths, config)
}

pub(super) fn write_config(paths: &InstancePaths, config: &Value) -> Result<(), SandboxError> {
    let bytes = serde_json::to_vec_pretty(config).expect("config serialises");
    let tmp = paths.bundle().join("config.json.tmp");
    std::fs::write(&tmp, bytes).map_err(|e| fs_err(tmp.display(), e))?;
    std::fs::rename(&tmp, paths.config()).map_err(|e| fs_err(paths.config().display(), e))
}

/// Hand the waiting init its assignment. Fails at once (ENXIO) when no
/// init waits on the FIFO (it died): nothing then runs in the sandbox.
pub(super) fn send_assignment(fifo: &Path, assignment: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(fifo)?;
    // Blocking from here: the init reads until end of file.
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) & !OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    f.write_all(assignment)?;
    f.flush()
}

#[cfg(test)]
#[path = "../../init/main.rs"]
#[allow(dead_code)]
mod init_source;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_reads_what_the_driver_writes() {
        let bytes = encode_assignment(
            "/code",
            &["/code/server".into(), "--port=9000".into()],
            &["PATH=/bin".into(), "A=b=c".into(), "EMPTY=".into()],
        );
        let a = init_source::parse(&bytes).unwrap();
        assert_eq!(a.cwd, "/code");
        assert_eq!(a.args, ["/code/server", "--port=9000"]);
        assert_eq!(
            a.env,
            [
                ("PATH".to_owned(), "/bin".to_owned()),
                ("A".to_owned(), "b=c".to_owned()),
                ("EMPTY".to_owned(), String::new()),
            ]
        );
    }

    #[test]
    fn the_embedded_init_is_a_static_executable() {
        let b = INIT_BINARY;
        assert_eq!(&b[..4], b"\x7fELF");
        assert_eq!(b[4], 2, "64-bit");
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
        let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
        let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
        assert!(phnum > 0);
        for i in 0..phnum {
            let at = phoff + i * phentsize;
            let kind = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
            // PT_INTERP: a dynamic loader, which the custom runtime lacks.
            assert_ne!(kind, 3, "kiln-init asks for a program interpreter");
        }
    }

    fn config(budget_mb: u32, max_per_runtime: usize) -> PremadeConfig {
        PremadeConfig {
            enabled: true,
            budget_mb,
            sandbox_mb: 32,
            max_per_runtime,
            demand_window_s: 60,
        }
    }

    #[test]
    fn pools_follow_demand_within_the_budget() {
        let both = |a, b| vec![(RuntimeName::Custom, a), (RuntimeName::CustomDebian12, b)];
        // Idle runtimes keep one each.
        let p = plan(&config(1024, 16), &both(0, 0), false);
        assert_eq!(p[&RuntimeName::Custom], 1);
        assert_eq!(p[&RuntimeName::CustomDebian12], 1);
        // Demand sizes the pool, capped per runtime.
        let p = plan(&config(4096, 16), &both(24, 3), false);
        assert_eq!(p[&RuntimeName::Custom], 16);
        assert_eq!(p[&RuntimeName::CustomDebian12], 3);
        // 256 MB hold 8 sandboxes of 32 MB: shared out, the busiest
        // runtime first, never more than the budget.
        let p = plan(&config(256, 16), &both(24, 3), false);
        assert_eq!(p.values().sum::<usize>(), 8);
        assert_eq!(p[&RuntimeName::CustomDebian12], 3);
        let p = plan(&config(32, 16), &both(24, 3), false);
        assert_eq!(p.values().sum::<usize>(), 1);
        assert_eq!(p[&RuntimeName::Custom], 1);
        // Under memory pressure every pool shrinks to nothing.
        let p = plan(&config(4096, 16), &both(24, 3), true);
        assert_eq!(p.values().sum::<usize>(), 0);
    }

    #[test]
    fn the_configuration_is_checked() {
        assert!(PremadeConfig::default().validate().is_ok());
        let mut c = config(16, 4);
        assert!(matches!(
            c.validate(),
            Err(PremadeConfigError::Budget { .. })
        ));
        c.budget_mb = 64;
        c.sandbox_mb = 8;
        assert_eq!(c.validate(), Err(PremadeConfigError::SandboxMb(8)));
        c.sandbox_mb = 32;
        c.max_per_runtime = 0;
        assert_eq!(c.validate(), Err(PremadeConfigError::MaxPerRuntime(0)));
        c.max_per_runtime = 1;
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.capacity(), 2);
    }
}
