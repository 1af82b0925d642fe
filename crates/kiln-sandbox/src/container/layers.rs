//! FC's layers under `/opt`: a function's layer zips, each extracted once
//! per node and immutable, merged read-only in the function's order (the
//! first layer listed wins where two hold the same path, as FC documents)
//! with a per-instance writable upper on the instance's size-limited disk,
//! so what an instance changes under
//! `/opt` stays in that instance and a new instance starts clean, as with
//! `/code`.
//!
//! The agent keeps one content-addressed cache of extracted zips (code and
//! layers alike, by sha256): a layer's directory sits beside the code
//! directory under its digest ([`SandboxRequest::layer_dirs`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::container::instance::InstancePaths;
use crate::driver::{SandboxError, SandboxRequest};
use crate::mounts::Mounter;

/// Where layers appear inside the sandbox.
pub const OPT_MOUNT: &str = "/opt";

fn fs_err(
    what: impl std::fmt::Display,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SandboxError {
    SandboxError::filesystem(what, e)
}

/// Host side of the instance's merged `/opt`.
pub fn opt_dir(paths: &InstancePaths) -> PathBuf {
    paths.dir.join("opt")
}

/// The instance's changes under `/opt`: on its size-limited writable
/// filesystem (see [`crate::container::disk`]), beside `/code`'s upper, so they count
/// against the instance's disk.
fn opt_upper(paths: &InstancePaths) -> PathBuf {
    paths.disk().join("opt-upper")
}

fn opt_work(paths: &InstancePaths) -> PathBuf {
    paths.disk().join("opt-work")
}

/// Every layer directory must exist (before anything is created).
pub fn check_layer_dirs(req: &SandboxRequest) -> Result<(), SandboxError> {
    for d in req.layer_dirs() {
        if !d.is_dir() {
            return Err(SandboxError::Filesystem {
                what: format!("layer directory {} is not a directory", d.display()),
                source: None,
            });
        }
    }
    Ok(())
}

/// Mount the instance's `/opt` overlay when the function has layers;
/// returns its host path. `rootfs` must have an `/opt` mount point and the
/// instance's writable filesystem must be mounted at `paths.disk()`.
pub fn mount_opt(
    mounter: &dyn Mounter,
    req: &SandboxRequest,
    paths: &InstancePaths,
    rootfs: &Path,
    uid: u32,
) -> Result<Option<PathBuf>, SandboxError> {
    let lowers = req.layer_dirs();
    if lowers.is_empty() {
        return Ok(None);
    }
    if !rootfs.join("opt").is_dir() {
        return Err(SandboxError::RuntimeUnavailable {
            runtime: req.spec.runtime.to_string(),
            reason: "its root filesystem has no /opt mount point for layers".into(),
            source: None,
        });
    }
    for (dir, mode, owned) in [
        (opt_dir(paths), 0o755, false),
        (opt_upper(paths), 0o755, true),
        (opt_work(paths), 0o700, true),
    ] {
        std::fs::create_dir(&dir).map_err(|e| fs_err(dir.display(), e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fs_err(dir.display(), e))?;
        if owned {
            std::os::unix::fs::chown(&dir, Some(uid), Some(uid))
                .map_err(|e| fs_err(dir.display(), e))?;
        }
    }
    let target = opt_dir(paths);
    mounter
        .overlay_lowers(&lowers, &opt_upper(paths), &opt_work(paths), &target)
        .map_err(|e| fs_err("/opt overlay", e))?;
    Ok(Some(target))
}

/// Add the `/opt` bind of `source` to a bundle's `config.json`.
pub fn add_opt_mount(config: &mut Value, source: &Path) {
    if let Some(mounts) = config["mounts"].as_array_mut() {
        mounts.push(json!({
            "destination": OPT_MOUNT,
            "type": "none",
            "source": source.display().to_string(),
            "options": ["rbind", "nosuid", "nodev", "rw"],
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::{MountCall, RecordingMounter};
    use kiln_core::InstanceId;

    fn request(code_dir: PathBuf, layers: &[&str]) -> SandboxRequest {
        let mut spec = crate::process::tests::sample_spec();
        spec.layers = layers.iter().map(|s| (*s).to_owned()).collect();
        SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir,
            image: None,
        }
    }

    #[test]
    fn layers_are_stacked_in_the_functions_order_first_on_top() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("code");
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        for d in ["c".repeat(64), a.clone(), b.clone()] {
            std::fs::create_dir_all(cache.join(d)).unwrap();
        }
        let req = request(cache.join("c".repeat(64)), &[&b, &a]);
        assert_eq!(req.layer_dirs(), vec![cache.join(&b), cache.join(&a)]);
        check_layer_dirs(&req).unwrap();
        let paths = InstancePaths {
            dir: tmp.path().join("inst"),
        };
        std::fs::create_dir_all(paths.disk()).unwrap();
        let rootfs = tmp.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("opt")).unwrap();
        let m = RecordingMounter::new();
        let uid = nix::unistd::getuid().as_raw();
        let target = mount_opt(&m, &req, &paths, &rootfs, uid).unwrap().unwrap();
        assert_eq!(
            m.calls(),
            vec![MountCall::OverlayLowers {
                lowers: vec![cache.join(&b), cache.join(&a)],
                upper: paths.disk().join("opt-upper"),
                work: paths.disk().join("opt-work"),
                target: target.clone(),
            }]
        );
        let mut config = json!({"mounts": [{"destination": "/code"}]});
        add_opt_mount(&mut config, &target);
        assert_eq!(config["mounts"][1]["destination"], "/opt");
        assert_eq!(config["mounts"][1]["source"], target.display().to_string());
    }

    #[test]
    fn no_layers_no_opt_and_missing_layers_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let req = request(tmp.path().join("code/x"), &[]);
        let paths = InstancePaths {
            dir: tmp.path().join("inst"),
        };
        let m = RecordingMounter::new();
        assert!(mount_opt(&m, &req, &paths, tmp.path(), 0)
            .unwrap()
            .is_none());
        assert!(m.calls().is_empty());
        let req = request(tmp.path().join("code/x"), &[&"d".repeat(64)]);
        assert!(matches!(
            check_layer_dirs(&req),
            Err(SandboxError::Filesystem { .. })
        ));
    }

    /// The real overlay: the first layer wins, writes land in the
    /// instance's upper only, and the layers stay untouched.
    #[test]
    fn host_overlay_stacks_the_first_layer_on_top() {
        if !nix::unistd::geteuid().is_root() {
            return kiln_test_support::skip(
                kiln_test_support::Category::Root,
                "needs root for mount(2)",
            );
        }
        let tmp = tempfile::tempdir().unwrap();
        let (first, second) = (tmp.path().join("first"), tmp.path().join("second"));
        std::fs::create_dir_all(first.join("lib")).unwrap();
        std::fs::create_dir_all(second.join("lib")).unwrap();
        std::fs::write(first.join("lib/same.txt"), "first").unwrap();
        std::fs::write(second.join("lib/same.txt"), "second").unwrap();
        std::fs::write(second.join("only-second.txt"), "2").unwrap();
        let (upper, work, target) = (
            tmp.path().join("upper"),
            tmp.path().join("work"),
            tmp.path().join("opt"),
        );
        for d in [&upper, &work, &target] {
            std::fs::create_dir(d).unwrap();
        }
        let m = crate::mounts::HostMounter;
        m.overlay_lowers(&[first.clone(), second.clone()], &upper, &work, &target)
            .unwrap();
        let checks = (|| {
            let same = std::fs::read_to_string(target.join("lib/same.txt"))?;
            let only = std::fs::read_to_string(target.join("only-second.txt"))?;
            std::fs::write(target.join("lib/same.txt"), "changed")?;
            Ok::<_, std::io::Error>((same, only))
        })();
        crate::mounts::unmount_all_under(&m, tmp.path()).unwrap();
        let (same, only) = checks.unwrap();
        assert_eq!((same.as_str(), only.as_str()), ("first", "2"));
        assert_eq!(
            std::fs::read_to_string(upper.join("lib/same.txt")).unwrap(),
            "changed"
        );
        assert_eq!(
            std::fs::read_to_string(first.join("lib/same.txt")).unwrap(),
            "first"
        );
    }
}
