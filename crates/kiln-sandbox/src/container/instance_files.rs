//! What one instance needs on disk before the runtime starts it: its
//! directories, writable filesystem, overlays, hosts file and bundle.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::container::bundle::{self, BundleParams};
use crate::container::disk_pool::DiskPool;
use crate::container::instance::InstancePaths;
use crate::driver::{SandboxError, SandboxRequest};
use crate::mounts::Mounter;
use crate::net::NetSlot;

use super::errors::fs_err;

/// Create each directory with its mode and, when given, its owner.
pub(super) fn make_dirs(dirs: &[(PathBuf, u32, Option<u32>)]) -> Result<(), SandboxError> {
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
pub(super) struct InstanceFiles {
    pub(super) uid: u32,
    pub(super) rootfs: PathBuf,
    pub(super) paths: InstancePaths,
    pub(super) req: SandboxRequest,
    pub(super) slot: NetSlot,
    pub(super) disk_pool: Arc<DiskPool>,
    pub(super) mounter: Arc<dyn Mounter>,
    pub(super) region: Option<String>,
    pub(super) cgroups_path: String,
    pub(super) tmp_size_mb: u32,
    pub(super) boost_cpu_milli: Option<u32>,
    pub(super) swap: crate::cgroup::SwapControl,
}

impl InstanceFiles {
    /// Directories, the writable disk (mkfs on a pool miss, loop mount),
    /// the read-only runtime root, the /code overlay, layers and the OCI
    /// bundle. Blocking: run it on the blocking pool.
    pub(super) fn make(self) -> Result<(), SandboxError> {
        let (uid, paths, req, spec) = (self.uid, &self.paths, &self.req, &self.req.spec);
        make_dirs(&[
            (paths.bundle(), 0o711, None),
            (paths.rootfs(), 0o755, None),
            (paths.code(), 0o755, None),
            (paths.disk(), 0o711, None),
        ])?;
        let disk_mb =
            crate::container::disk::disk_mb(spec.disk_mb).map_err(|e| fs_err("disk", e))?;
        self.disk_pool
            .provide(&paths.disk_image(), disk_mb, &paths.disk(), uid)
            .map_err(|e| fs_err("writable filesystem", e))?;
        // On the instance's own disk, owned by its user.
        make_dirs(&[
            (paths.upper(), 0o755, Some(uid)),
            (paths.work(), 0o700, Some(uid)),
            (paths.tmp(), 0o1777, Some(uid)),
        ])?;
        let opt = match &req.image {
            // A custom-container function: its image is the root, no /code.
            Some(image) => {
                crate::container::image::mount_image_rootfs(
                    self.mounter.as_ref(),
                    image,
                    paths,
                    uid,
                )?;
                None
            }
            None => {
                self.mounter
                    .bind_readonly(&self.rootfs, &paths.rootfs())
                    .map_err(|e| fs_err("runtime root filesystem", e))?;
                self.mounter
                    .overlay(&req.code_dir, &paths.upper(), &paths.work(), &paths.code())
                    .map_err(|e| fs_err("/code overlay", e))?;
                crate::container::layers::mount_opt(
                    self.mounter.as_ref(),
                    req,
                    paths,
                    &self.rootfs,
                    uid,
                )?
            }
        };

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
            swap: self.swap,
        })
        .map_err(SandboxError::invalid_spec)?;
        if let Some(opt) = &opt {
            crate::container::layers::add_opt_mount(&mut config, opt);
        }
        if let Some(image) = &req.image {
            crate::container::image::apply_to_config(&mut config, image);
        }
        let bytes = serde_json::to_vec_pretty(&config).expect("config serialises");
        std::fs::write(paths.config(), bytes).map_err(|e| fs_err(paths.config().display(), e))?;

        Ok(())
    }
}
