//! Host-side mounts of an instance (the read-only runtime root and the
//! `/code` overlay) behind a trait, with a recording fake.
//!
//! The agent runs in its own private mount namespace, so these mounts are
//! invisible to the rest of the host and vanish with the agent.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Why a mount operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("Cannot mount {target}")]
    Mount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Cannot unmount {target}")]
    Unmount {
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Path {0} cannot be used in overlay options (',', ':' or '\\\\' in it)")]
    OverlayPath(PathBuf),
    #[error("Cannot read the mount table")]
    MountInfo(#[source] std::io::Error),
}

pub trait Mounter: Send + Sync + 'static {
    /// Bind `source` at `target`, read-only.
    fn bind_readonly(&self, source: &Path, target: &Path) -> Result<(), MountError>;
    /// Mount an overlay of `lower` (read-only) and `upper` at `target`.
    fn overlay(
        &self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), MountError>;
    /// Mount an overlay of several read-only `lowers` (the first on top:
    /// it wins where two hold the same path) and `upper` at `target`.
    /// Backends that only stack one lower refuse more.
    fn overlay_lowers(
        &self,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), MountError> {
        match lowers {
            [one] => self.overlay(one, upper, work, target),
            _ => Err(MountError::Mount {
                target: target.to_owned(),
                source: nix::Error::EINVAL,
            }),
        }
    }
    /// Make directory `dir` a mount point of its own (bound onto itself)
    /// with shared propagation: a container that binds it (as a slave)
    /// sees what is mounted on `dir` later, while it runs.
    fn shared_mount_point(&self, dir: &Path) -> Result<(), MountError>;
    /// Unmount `target`; falls back to a lazy detach when it is busy.
    fn unmount(&self, target: &Path) -> Result<(), MountError>;
    /// Mount points at or below `dir`, deepest first.
    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, MountError>;
}

/// Unmount everything at or below `dir`, then check nothing is left.
pub fn unmount_all_under(m: &dyn Mounter, dir: &Path) -> Result<(), MountError> {
    for target in m.mounts_under(dir)? {
        m.unmount(&target)?;
    }
    // Stacked mounts show up again once the top one is gone.
    for target in m.mounts_under(dir)? {
        m.unmount(&target)?;
    }
    match m.mounts_under(dir)?.into_iter().next() {
        None => Ok(()),
        Some(target) => Err(MountError::Unmount {
            target,
            source: nix::Error::EBUSY,
        }),
    }
}

/// Mounts made with mount(2) in the current mount namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMounter;

fn overlay_safe(p: &Path) -> Result<&str, MountError> {
    let s = p
        .to_str()
        .ok_or_else(|| MountError::OverlayPath(p.to_owned()))?;
    if s.contains([',', ':', '\\']) {
        return Err(MountError::OverlayPath(p.to_owned()));
    }
    Ok(s)
}

impl Mounter for HostMounter {
    fn bind_readonly(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        let err = |source| MountError::Mount {
            target: target.to_owned(),
            source,
        };
        mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err)?;
        let ro = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(err(e));
        }
        Ok(())
    }

    fn overlay(
        &self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), MountError> {
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            overlay_safe(lower)?,
            overlay_safe(upper)?,
            overlay_safe(work)?
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|source| MountError::Mount {
            target: target.to_owned(),
            source,
        })
    }

    fn overlay_lowers(
        &self,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), MountError> {
        let lower = lowers
            .iter()
            .map(|l| overlay_safe(l))
            .collect::<Result<Vec<_>, _>>()?
            .join(":");
        if lower.is_empty() {
            return Err(MountError::Mount {
                target: target.to_owned(),
                source: nix::Error::EINVAL,
            });
        }
        let data = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            overlay_safe(upper)?,
            overlay_safe(work)?
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(data.as_str()),
        )
        .map_err(|source| MountError::Mount {
            target: target.to_owned(),
            source,
        })
    }

    fn shared_mount_point(&self, dir: &Path) -> Result<(), MountError> {
        let err = |source| MountError::Mount {
            target: dir.to_owned(),
            source,
        };
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(err)?;
        if let Err(e) = mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        ) {
            let _ = umount2(dir, MntFlags::MNT_DETACH);
            return Err(err(e));
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        match umount2(target, MntFlags::empty()) {
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => Ok(()),
            Err(nix::Error::EBUSY) => {
                tracing::warn!(target = %target.display(), "mount busy, detaching lazily");
                umount2(target, MntFlags::MNT_DETACH).map_err(|source| MountError::Unmount {
                    target: target.to_owned(),
                    source,
                })
            }
            Err(source) => Err(MountError::Unmount {
                target: target.to_owned(),
                source,
            }),
        }
    }

    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, MountError> {
        let text =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(MountError::MountInfo)?;
        Ok(mount_points_under(&text, dir))
    }
}

/// Undo mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
            {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points (field 5 of /proc/self/mountinfo) at or below `dir`,
/// deepest first and later mounts before earlier ones at the same depth.
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|f| PathBuf::from(unescape(f)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountCall {
    BindReadonly {
        source: PathBuf,
        target: PathBuf,
    },
    Overlay {
        lower: PathBuf,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
    OverlayLowers {
        lowers: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
        target: PathBuf,
    },
    SharedMountPoint(PathBuf),
    Unmount(PathBuf),
}

/// Fake mounter for unit tests: records calls and tracks what is mounted.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    calls: Mutex<Vec<MountCall>>,
    mounted: Mutex<BTreeSet<PathBuf>>,
}

impl RecordingMounter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<MountCall> {
        self.calls.lock().expect("lock").clone()
    }

    pub fn mounted(&self) -> BTreeSet<PathBuf> {
        self.mounted.lock().expect("lock").clone()
    }
}

impl Mounter for RecordingMounter {
    fn bind_readonly(&self, source: &Path, target: &Path) -> Result<(), MountError> {
        self.calls
            .lock()
            .expect("lock")
            .push(MountCall::BindReadonly {
                source: source.to_owned(),
                target: target.to_owned(),
            });
        self.mounted.lock().expect("lock").insert(target.to_owned());
        Ok(())
    }

    fn overlay(
        &self,
        lower: &Path,
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), MountError> {
        overlay_safe(lower)?;
        self.calls.lock().expect("lock").push(MountCall::Overlay {
            lower: lower.to_owned(),
            upper: upper.to_owned(),
            work: work.to_owned(),
            target: target.to_owned(),
        });
        self.mounted.lock().expect("lock").insert(target.to_owned());
        Ok(())
    }

    fn overlay_lowers(
        &self,
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<(), MountError> {
        for l in lowers {
            overlay_safe(l)?;
        }
        self.calls
            .lock()
            .expect("lock")
            .push(MountCall::OverlayLowers {
                lowers: lowers.to_vec(),
                upper: upper.to_owned(),
                work: work.to_owned(),
                target: target.to_owned(),
            });
        self.mounted.lock().expect("lock").insert(target.to_owned());
        Ok(())
    }

    fn shared_mount_point(&self, dir: &Path) -> Result<(), MountError> {
        self.calls
            .lock()
            .expect("lock")
            .push(MountCall::SharedMountPoint(dir.to_owned()));
        self.mounted.lock().expect("lock").insert(dir.to_owned());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), MountError> {
        self.calls
            .lock()
            .expect("lock")
            .push(MountCall::Unmount(target.to_owned()));
        self.mounted.lock().expect("lock").remove(target);
        Ok(())
    }

    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>, MountError> {
        let mut v: Vec<PathBuf> = self
            .mounted()
            .into_iter()
            .filter(|p| p.starts_with(dir))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_deepest_first() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
40 22 0:40 / /state/instances/i-1/bundle/rootfs ro - ext4 /dev/sda1 ro
41 22 0:41 / /state/instances/i-1/code rw - overlay overlay rw
42 41 0:42 / /state/instances/i-1/code/sub\\040dir rw - tmpfs tmpfs rw
43 22 0:43 / /state/instances/i-10 rw - tmpfs tmpfs rw
";
        let got = mount_points_under(info, Path::new("/state/instances/i-1"));
        assert_eq!(
            got,
            [
                PathBuf::from("/state/instances/i-1/code/sub dir"),
                PathBuf::from("/state/instances/i-1/bundle/rootfs"),
                PathBuf::from("/state/instances/i-1/code"),
            ]
        );
    }

    #[test]
    fn overlay_refuses_paths_that_break_its_options() {
        let m = RecordingMounter::new();
        let err = m
            .overlay(
                Path::new("/a,b"),
                Path::new("/u"),
                Path::new("/w"),
                Path::new("/t"),
            )
            .unwrap_err();
        assert!(matches!(err, MountError::OverlayPath(_)));
        assert!(m.mounted().is_empty());
    }

    #[test]
    fn unmount_all_under_leaves_nothing() {
        let m = RecordingMounter::new();
        m.bind_readonly(Path::new("/r"), Path::new("/s/i/bundle/rootfs"))
            .unwrap();
        m.overlay(
            Path::new("/c"),
            Path::new("/s/i/upper"),
            Path::new("/s/i/work"),
            Path::new("/s/i/code"),
        )
        .unwrap();
        m.bind_readonly(Path::new("/r"), Path::new("/s/other"))
            .unwrap();
        unmount_all_under(&m, Path::new("/s/i")).unwrap();
        assert_eq!(m.mounted(), [PathBuf::from("/s/other")].into());
    }
}
