//! A custom-container instance's root filesystem: the image's unpacked
//! layers (shared, immutable, in the agent's content-addressed cache)
//! merged by overlayfs with a per-instance upper on the instance's own
//! size-limited disk (holding only the mount points runc needs), bound
//! read-only as the container's root. `/tmp`, `/etc/hosts`, the namespaces, seccomp, capabilities
//! and limits are those of every other instance; `/code` is absent (the
//! image is the code); the process runs as the image's user and in its
//! working directory, inside the sandbox's user namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::container::instance::InstancePaths;
use crate::driver::{ImageRootfs, SandboxError};
use crate::mounts::Mounter;
use crate::process::CODE_MOUNT;

fn fs_err(
    what: impl std::fmt::Display,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SandboxError {
    SandboxError::filesystem(what, e)
}

/// The root filesystem's writable upper, on the instance's disk.
fn rootfs_upper(paths: &InstancePaths) -> PathBuf {
    paths.disk().join("rootfs-upper")
}

fn rootfs_work(paths: &InstancePaths) -> PathBuf {
    paths.disk().join("rootfs-work")
}

/// Every layer directory must exist (before anything is created).
pub fn check_image_layers(image: &ImageRootfs) -> Result<(), SandboxError> {
    if image.layers.is_empty() {
        return Err(SandboxError::Filesystem {
            what: "the image has no layers".into(),
            source: None,
        });
    }
    for d in &image.layers {
        if !d.is_dir() {
            return Err(SandboxError::Filesystem {
                what: format!("image layer {} is not a directory", d.display()),
                source: None,
            });
        }
    }
    Ok(())
}

/// Mount the image's layers at the bundle's `rootfs` (an empty directory),
/// with the instance's upper and work directories on its disk (mounted at
/// `paths.disk()`), owned by the sandbox's root `uid`.
pub fn mount_image_rootfs(
    mounter: &dyn Mounter,
    image: &ImageRootfs,
    paths: &InstancePaths,
    uid: u32,
) -> Result<(), SandboxError> {
    check_image_layers(image)?;
    for (dir, mode) in [(rootfs_upper(paths), 0o755), (rootfs_work(paths), 0o700)] {
        std::fs::create_dir(&dir).map_err(|e| fs_err(dir.display(), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fs_err(dir.display(), e))?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(uid))
            .map_err(|e| fs_err(dir.display(), e))?;
    }
    // The mount points runc binds over, made here so that the root can be
    // read-only from the start (an image may lack any of them).
    let upper = rootfs_upper(paths);
    for (dir, mode) in [
        ("proc", 0o555),
        ("dev", 0o755),
        ("sys", 0o555),
        ("tmp", 0o1777),
        ("etc", 0o755),
    ] {
        let d = upper.join(dir);
        std::fs::create_dir(&d).map_err(|e| fs_err(d.display(), e))?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fs_err(d.display(), e))?;
        std::os::unix::fs::chown(&d, Some(uid), Some(uid)).map_err(|e| fs_err(d.display(), e))?;
    }
    let hosts = upper.join("etc/hosts");
    std::fs::write(&hosts, b"").map_err(|e| fs_err(hosts.display(), e))?;
    std::os::unix::fs::chown(&hosts, Some(uid), Some(uid))
        .map_err(|e| fs_err(hosts.display(), e))?;
    let merged = merged_dir(paths);
    std::fs::create_dir(&merged).map_err(|e| fs_err(merged.display(), e))?;
    mounter
        .overlay_lowers(&image.layers, &upper, &rootfs_work(paths), &merged)
        .map_err(|e| fs_err("image root filesystem overlay", e))?;
    // Read-only as every runtime's root: nothing of the image changes.
    mounter
        .bind_readonly(&merged, &paths.rootfs())
        .map_err(|e| fs_err("image root filesystem", e))
}

/// Where the image's layers are merged on the host, before the read-only
/// bind at the bundle's root.
fn merged_dir(paths: &InstancePaths) -> PathBuf {
    paths.dir.join("image-root")
}

/// Turn a bundle's `config.json` into an image instance's: no `/code`,
/// the image's working directory and user.
pub fn apply_to_config(config: &mut Value, image: &ImageRootfs) {
    if let Some(mounts) = config["mounts"].as_array_mut() {
        mounts.retain(|m| m["destination"] != CODE_MOUNT);
    }
    config["process"]["cwd"] = json!(image.cwd);
    config["process"]["user"] = json!({ "uid": image.uid, "gid": image.gid });
    if let Some(env) = config["process"]["env"].as_array_mut() {
        // The image is the code: FC's code path names its working directory.
        for e in env.iter_mut() {
            if e.as_str()
                .is_some_and(|s| s.starts_with("FC_FUNC_CODE_PATH="))
            {
                *e = json!(format!("FC_FUNC_CODE_PATH={}", image.cwd));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::{MountCall, RecordingMounter};
    use kiln_core::InstanceId;

    fn image(layers: Vec<PathBuf>) -> ImageRootfs {
        ImageRootfs {
            layers,
            cwd: "/app".into(),
            uid: 1000,
            gid: 1000,
        }
    }

    #[test]
    fn the_config_loses_code_and_takes_the_images_user_and_directory() {
        let mut c = json!({
            "process": {"cwd": "/code", "user": {"uid": 0, "gid": 0},
                        "env": ["FC_FUNC_CODE_PATH=/code", "A=b"]},
            "mounts": [{"destination": "/tmp"}, {"destination": "/code"}],
        });
        apply_to_config(&mut c, &image(vec![]));
        assert_eq!(c["process"]["cwd"], "/app");
        assert_eq!(c["process"]["user"], json!({"uid": 1000, "gid": 1000}));
        assert_eq!(c["mounts"], json!([{"destination": "/tmp"}]));
        assert_eq!(
            c["process"]["env"],
            json!(["FC_FUNC_CODE_PATH=/app", "A=b"])
        );
    }

    #[test]
    fn layers_are_merged_at_the_bundle_root_with_an_upper_on_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let id = InstanceId::generate();
        let paths = InstancePaths::new(tmp.path(), &id);
        std::fs::create_dir_all(paths.disk()).unwrap();
        let (top, base) = (tmp.path().join("top"), tmp.path().join("base"));
        let mounter = RecordingMounter::new();
        // Missing layers are refused before anything is made.
        assert!(mount_image_rootfs(&mounter, &image(vec![top.clone()]), &paths, 0).is_err());
        std::fs::create_dir(&top).unwrap();
        std::fs::create_dir(&base).unwrap();
        let uid = nix::unistd::getuid().as_raw();
        mount_image_rootfs(
            &mounter,
            &image(vec![top.clone(), base.clone()]),
            &paths,
            uid,
        )
        .unwrap();
        let calls = mounter.calls();
        assert!(
            calls.iter().any(
                |c| matches!(c, MountCall::OverlayLowers { lowers, target, .. }
                if lowers == &vec![top.clone(), base.clone()] && target == &merged_dir(&paths))
            ),
            "{calls:?}"
        );
        assert!(
            calls
                .iter()
                .any(|c| matches!(c, MountCall::BindReadonly { source, target }
                if source == &merged_dir(&paths) && target == &paths.rootfs())),
            "{calls:?}"
        );
        // runc's mount points exist before the root is bound read-only.
        for p in ["proc", "dev", "sys", "tmp", "etc/hosts"] {
            assert!(paths.disk().join("rootfs-upper").join(p).exists(), "{p}");
        }
    }
}
