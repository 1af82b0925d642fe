//! An instance's life: create (files, network, `runc run`), liveness,
//! statistics, freeze and thaw, exec, and teardown.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;

use kiln_core::{InstanceId, RuntimeName, SandboxKind};
use tracing::Instrument;

use crate::cgroup::{CgroupError, CgroupOps};
use crate::container::instance::{InstancePaths, InstanceRecord};
use crate::container::oci_runtime::ContainerStatus;
use crate::driver::{Sandbox, SandboxDriver, SandboxError, SandboxRequest, SandboxStats};
use crate::mounts::unmount_all_under;
use crate::net::{BandwidthClass, HostInterface, NetSlot};
use crate::rootfs::rootfs_path;

use super::errors::{cg_err, fs_err, isolation_err, net_err};
use super::instance_files::InstanceFiles;
use super::ContainerDriver;

impl ContainerDriver {
    /// Run a (blocking, polling) cgroup operation on a known instance.
    pub(super) async fn on_cgroup(
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

    pub(super) async fn create_inner(
        &self,
        req: &SandboxRequest,
        paths: &InstancePaths,
        record: &mut Option<InstanceRecord>,
    ) -> Result<Sandbox, SandboxError> {
        let spec = &req.spec;
        // Never silently ignore a function's egress mode: without
        // isolation only FC's default (internet) may run, and only because
        // the operator turned isolation off explicitly (the agent checks).
        if self.isolation.is_none() {
            if let Some(why) = crate::net::isolation::unisolated_refusal(spec.network.as_ref()) {
                return Err(SandboxError::Unenforceable(why));
            }
        }
        let rootfs = rootfs_path(&self.rootfs_dir, spec.runtime);
        let slot: NetSlot = self.pool.take().await.map_err(net_err)?;
        let endpoint = SocketAddr::new(slot.instance_addr.into(), spec.port);
        let rec = record.insert(InstanceRecord {
            slot_index: slot.index,
            netns: slot.name.clone(),
            endpoint,
            pid: None,
            pid_start: None,
            container: None,
            premade_link: None,
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
            swap: self.cgroups.swap_control(),
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
            self.end_boost_later(&req.instance_id, crate::process::instance_cpu_milli(spec));
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
    pub(super) async fn teardown(
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
        if let Some(link) = record.and_then(|r| r.premade_link.as_ref()) {
            match std::fs::remove_file(link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    first.get_or_insert(fs_err(link.display(), e));
                }
            }
        }
        match first {
            None => {
                self.aliases.lock().expect("lock").remove(id);
                Ok(())
            }
            Some(e) => Err(e),
        }
    }

    /// Serve `req` from a pre-made sandbox when the pools are on, one of
    /// its runtime is ready and the function fits one (no layers, the
    /// default disk). `None`: take the ordinary path (a failed claim has
    /// been cleaned up; nothing of the function ran).
    async fn try_premade(
        &self,
        req: &SandboxRequest,
        paths: &InstancePaths,
    ) -> Result<Option<Sandbox>, SandboxError> {
        let Some(premade) = self.premade.clone() else {
            return Ok(None);
        };
        let spec = &req.spec;
        if self.isolation.is_none() {
            if let Some(why) = crate::net::isolation::unisolated_refusal(spec.network.as_ref()) {
                return Err(SandboxError::Unenforceable(why));
            }
        }
        let fits = spec.layers.is_empty()
            && req.image.is_none()
            && crate::container::disk::disk_mb(spec.disk_mb).ok()
                == Some(crate::container::disk::DEFAULT_DISK_MB);
        if !fits {
            premade.record_miss(spec.runtime);
            return Ok(None);
        }
        let Some(pooled) = premade.take(spec.runtime) else {
            tracing::debug!(runtime = %spec.runtime, "no pre-made sandbox ready");
            return Ok(None);
        };
        let key = pooled.key.clone();
        // Move the sandbox to the instance's place; runc's state keeps
        // naming the bundle by the old path, which becomes a symlink.
        if let Err(e) = std::fs::rename(&pooled.paths.dir, &paths.dir) {
            tracing::warn!(sandbox = %key, error = %e, "cannot claim a pre-made sandbox; removing it");
            if let Err(e) = premade.destroy(&pooled).await {
                tracing::warn!(error = %kiln_core::error_chain(&e), "cannot remove a pre-made sandbox");
            }
            return Ok(None);
        }
        self.aliases
            .lock()
            .expect("lock")
            .insert(req.instance_id.clone(), pooled.container_id.clone());
        let mut record = Some(InstanceRecord {
            slot_index: pooled.slot.index,
            netns: pooled.slot.name.clone(),
            endpoint: SocketAddr::new(pooled.slot.instance_addr.into(), spec.port),
            pid: Some(pooled.pid),
            pid_start: pooled.pid_start,
            container: Some(pooled.container_id.clone()),
            premade_link: Some(premade.link_path(&key)),
        });
        match self
            .claim(&premade, req, paths, &pooled, record.as_ref().expect("set"))
            .await
        {
            Ok(sandbox) => {
                tracing::info!(sandbox = %key, endpoint = %sandbox.endpoint, pid = ?sandbox.pid,
                    "instance started in a pre-made sandbox");
                self.instances
                    .lock()
                    .expect("lock")
                    .insert(req.instance_id.clone(), record.take().expect("set"));
                Ok(Some(sandbox))
            }
            Err(e) => {
                tracing::warn!(sandbox = %key, error = %kiln_core::error_chain(&e),
                    "claiming a pre-made sandbox failed; removing it and starting the ordinary way");
                if let Err(cleanup) = self
                    .teardown(&req.instance_id, paths, record.as_ref())
                    .await
                {
                    tracing::error!(error = %cleanup, "cleanup after a failed claim failed");
                    return Err(e);
                }
                Ok(None)
            }
        }
    }

    /// Give a moved pre-made sandbox its function: limits and egress
    /// rules, code and bundle, and only then the assignment its init waits
    /// for.
    async fn claim(
        &self,
        premade: &super::premade::Premade,
        req: &SandboxRequest,
        paths: &InstancePaths,
        pooled: &super::premade::Pooled,
        rec: &InstanceRecord,
    ) -> Result<Sandbox, SandboxError> {
        use super::premade::{
            encode_assignment, send_assignment, write_config, BundleInputs, Pooled,
        };
        let started = std::time::Instant::now();
        let spec = &req.spec;
        let link = rec
            .premade_link
            .clone()
            .expect("a claimed sandbox has a link");
        std::os::unix::fs::symlink(&paths.dir, &link).map_err(|e| fs_err(link.display(), e))?;
        paths
            .write_record(rec)
            .map_err(|e| fs_err(paths.record().display(), e))?;
        let env = crate::process::process_env(&req.instance_id, spec, self.region.as_deref())
            .map_err(SandboxError::invalid_spec)?;
        let args: Vec<String> = spec
            .command
            .iter()
            .chain(spec.args.iter())
            .cloned()
            .collect();
        let cpu = crate::process::instance_cpu_milli(spec);
        let boost = self.boost_cpu_milli(spec);
        let cgroups_path = self.cgroups_path(&req.instance_id);
        let config = premade.deps().config(&BundleInputs {
            instance_id: &req.instance_id,
            spec,
            paths,
            slot: &pooled.slot,
            cgroups_path: cgroups_path.clone(),
            boost_cpu_milli: boost,
            region: self.region.as_deref(),
        })?;
        let limits = crate::cgroup::ClaimLimits {
            memory_bytes: u64::from(spec.memory_mb) * 1024 * 1024,
            cpu_shares: super::bundle::cpu_shares(cpu),
            quota_us: crate::cgroup::cpu_quota(boost.map_or(cpu, |b| b.max(cpu))),
        };
        let attach = async {
            if let Some(isolation) = &self.isolation {
                isolation
                    .attach(
                        &HostInterface::from(&pooled.slot),
                        spec.network.as_ref(),
                        BandwidthClass::of(spec),
                    )
                    .await
                    .map_err(isolation_err)?;
            }
            Ok::<_, SandboxError>(())
        };
        let (cgroups, mounter) = (self.cgroups.clone(), self.mounter.clone());
        let (code_dir, p) = (req.code_dir.clone(), paths.clone());
        let prepare = async move {
            tokio::task::spawn_blocking(move || {
                cgroups
                    .set_limits(&cgroups_path, &limits)
                    .map_err(|e| SandboxError::cgroup("setting the function's limits", e))?;
                mounter
                    .overlay(&code_dir, &p.upper(), &p.work(), &p.code())
                    .map_err(|e| fs_err("/code overlay", e))?;
                write_config(&p, &config)
            })
            .await
            .map_err(|e| fs_err("claiming a pre-made sandbox", e))?
        };
        let (net, files) = tokio::join!(attach, prepare);
        net?;
        files?;
        // Everything the function is confined by is in place: let it run.
        let assignment = encode_assignment(crate::process::CODE_MOUNT, &args, &env);
        let fifo = Pooled::fifo(paths);
        tokio::task::spawn_blocking(move || send_assignment(&fifo, &assignment))
            .await
            .map_err(|e| fs_err("assignment", e))?
            .map_err(|e| fs_err("the sandbox's init (assignment FIFO)", e))?;
        tracing::debug!(
            total_ms = started.elapsed().as_millis() as u64,
            "pre-made sandbox claimed"
        );
        if boost.is_some() {
            self.end_boost_later(&req.instance_id, cpu);
        }
        Ok(Sandbox {
            instance_id: req.instance_id.clone(),
            endpoint: rec.endpoint,
            pid: rec.pid,
            log_path: paths.console_log(),
        })
    }
}

/// Bytes received and sent by the host side of an instance's veth (named
/// like its netns), when the interface exists in this network namespace.
pub(super) fn host_veth_bytes(name: &str) -> (Option<u64>, Option<u64>) {
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
            crate::process::check_spec(spec)
                .map_err(SandboxError::invalid_spec)?;
            crate::process::process_env(&req.instance_id, spec, None)
                .map_err(SandboxError::invalid_spec)?;
            match (&req.image, spec.runtime.is_container_image()) {
                (Some(image), true) => crate::container::image::check_image_layers(image)?,
                (None, false) => {}
                _ => {
                    return Err(SandboxError::invalid_spec(std::io::Error::other(
                        "an image is given exactly for runtime custom-container",
                    )))
                }
            }
            if req.image.is_none() && !req.code_dir.is_dir() {
                return Err(SandboxError::Filesystem {
                    what: format!("code directory {} is not a directory", req.code_dir.display()),
                    source: None,
                });
            }
            crate::container::layers::check_layer_dirs(req)?;
            crate::container::disk::disk_mb(spec.disk_mb)
                .map_err(SandboxError::invalid_spec)?;
            if spec.runtime == RuntimeName::Custom {
                self.ensure_runtime(RuntimeName::Custom).await?;
            }
            let rootfs = rootfs_path(&self.rootfs_dir, spec.runtime);
            if req.image.is_none() && !crate::rootfs::is_complete(&rootfs) {
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
            if let Some(sandbox) = self.try_premade(req, &paths).await? {
                return Ok(sandbox);
            }
            // The pools do not refill while ordinary starts run: they would
            // compete for the same CPU, disk images and namespaces.
            let _ordinary = self.premade.as_ref().map(|p| p.ordinary_start());
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

    fn dial_netns(&self, id: &InstanceId) -> Option<std::path::PathBuf> {
        // An instance adopted after an agent restart is known by its record.
        let netns = match self.instances.lock().expect("lock").get(id) {
            Some(rec) => rec.netns.clone(),
            None => {
                InstancePaths::new(&self.instances_dir, id)
                    .read_record()?
                    .netns
            }
        };
        Some(crate::net::subnet::netns_path(&netns))
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
            if let Some(cid) = record.as_ref().and_then(|r| r.container.clone()) {
                self.aliases.lock().expect("lock").insert(id.clone(), cid);
            }
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
