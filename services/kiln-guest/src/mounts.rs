//! Filesystems: the early mounts of PID 1 and the function's root (the
//! runtime disk under a writable overlay, the code disk at /code, layers at
//! /opt). Planned as data, applied through [`MountOps`] so the plan is
//! tested without root and the real calls stay in one place.

use std::path::{Path, PathBuf};

use kiln_guest_proto::{Disk, DiskConfig, FsType};
use nix::mount::MsFlags;

/// Where the function's root is assembled before the switch.
pub const NEW_ROOT: &str = "/mnt/root";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountOp {
    Mkdir(PathBuf),
    Mount {
        source: String,
        target: PathBuf,
        fstype: String,
        readonly: bool,
        data: Option<String>,
    },
    Write {
        path: PathBuf,
        contents: String,
    },
    /// Make `NEW_ROOT` the root: move it onto `/` and chroot into it.
    SwitchRoot(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("Creating {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Mounting {source_name} ({fstype}) on {target}")]
    Mount {
        source_name: String,
        fstype: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Switching the root to {path}")]
    SwitchRoot {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The side effects a plan needs.
pub trait MountOps: Send + Sync {
    fn apply(&self, op: &MountOp) -> Result<(), MountError>;
}

pub fn apply_all(ops: &dyn MountOps, plan: &[MountOp]) -> Result<(), MountError> {
    for op in plan {
        tracing::debug!(?op, "mount step");
        ops.apply(op)?;
    }
    Ok(())
}

fn mkdir(p: impl Into<PathBuf>) -> MountOp {
    MountOp::Mkdir(p.into())
}

fn mount(
    source: &str,
    target: impl Into<PathBuf>,
    fstype: &str,
    readonly: bool,
    data: Option<&str>,
) -> MountOp {
    MountOp::Mount {
        source: source.into(),
        target: target.into(),
        fstype: fstype.into(),
        readonly,
        data: data.map(Into::into),
    }
}

fn disk(d: &Disk, target: impl Into<PathBuf>, readonly: bool) -> MountOp {
    mount(
        &d.device,
        target,
        d.fs.as_str(),
        readonly || d.fs != FsType::Ext4,
        None,
    )
}

/// What PID 1 mounts before anything else.
pub fn early_plan() -> Vec<MountOp> {
    vec![
        mkdir("/proc"),
        mount("proc", "/proc", "proc", false, None),
        mkdir("/sys"),
        mount("sysfs", "/sys", "sysfs", false, None),
        mkdir("/dev"),
        mount("devtmpfs", "/dev", "devtmpfs", false, None),
        mkdir("/tmp"),
        mount("tmpfs", "/tmp", "tmpfs", false, Some("mode=1777")),
        mkdir("/run"),
        mount("tmpfs", "/run", "tmpfs", false, Some("mode=0755")),
    ]
}

/// The function's root: overlay(runtime, scratch) + /code + /opt layers,
/// /proc /sys /dev /tmp inside, resolv.conf and hosts, then the switch.
pub fn root_plan(disks: &DiskConfig, hostname: &str, dns: &[std::net::IpAddr]) -> Vec<MountOp> {
    let root = Path::new(NEW_ROOT);
    let mut plan = vec![mkdir("/mnt/runtime"), mkdir("/mnt/scratch"), mkdir(root)];
    match &disks.runtime {
        Some(d) => plan.push(disk(d, "/mnt/runtime", true)),
        // The `custom` runtime: an empty root.
        None => plan.push(mount(
            "tmpfs",
            "/mnt/runtime",
            "tmpfs",
            true,
            Some("mode=0755"),
        )),
    }
    match &disks.scratch {
        Some(d) => plan.push(disk(d, "/mnt/scratch", false)),
        None => plan.push(mount(
            "tmpfs",
            "/mnt/scratch",
            "tmpfs",
            false,
            Some("mode=0755"),
        )),
    }
    plan.push(mkdir("/mnt/scratch/upper"));
    plan.push(mkdir("/mnt/scratch/work"));
    plan.push(mount(
        "overlay",
        root,
        "overlay",
        false,
        Some("lowerdir=/mnt/runtime,upperdir=/mnt/scratch/upper,workdir=/mnt/scratch/work"),
    ));
    if let Some(code) = &disks.code {
        plan.push(mkdir(root.join("code")));
        plan.push(disk(code, root.join("code"), true));
    }
    match disks.layers.as_slice() {
        [] => {}
        // One layer is mounted at /opt as it is.
        [layer] => {
            plan.push(mkdir(root.join("opt")));
            plan.push(disk(layer, root.join("opt"), true));
        }
        // Several merge read-only, the first on top.
        layers => {
            let mut lowers = Vec::new();
            for (i, layer) in layers.iter().enumerate() {
                let dir = format!("/mnt/layer{i}");
                plan.push(mkdir(&dir));
                plan.push(disk(layer, &dir, true));
                lowers.push(dir);
            }
            plan.push(mkdir(root.join("opt")));
            let data = format!("lowerdir={}", lowers.join(":"));
            plan.push(mount(
                "overlay",
                root.join("opt"),
                "overlay",
                true,
                Some(&data),
            ));
        }
    }
    for (dir, fstype, data) in [
        ("proc", "proc", None),
        ("sys", "sysfs", None),
        ("dev", "devtmpfs", None),
        ("tmp", "tmpfs", Some("mode=1777")),
    ] {
        plan.push(mkdir(root.join(dir)));
        plan.push(mount(fstype, root.join(dir), fstype, false, data));
    }
    plan.push(mkdir(root.join("etc")));
    let resolv: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    plan.push(MountOp::Write {
        path: root.join("etc/resolv.conf"),
        contents: resolv,
    });
    plan.push(MountOp::Write {
        path: root.join("etc/hosts"),
        contents: format!("127.0.0.1 localhost {hostname}\n::1 localhost\n"),
    });
    plan.push(MountOp::SwitchRoot(root.into()));
    plan
}

/// The real thing (PID 1 in the guest only).
pub struct RealMounts;

impl MountOps for RealMounts {
    fn apply(&self, op: &MountOp) -> Result<(), MountError> {
        match op {
            MountOp::Mkdir(path) => {
                std::fs::create_dir_all(path).map_err(|source| MountError::Mkdir {
                    path: path.clone(),
                    source,
                })
            }
            MountOp::Mount {
                source,
                target,
                fstype,
                readonly,
                data,
            } => {
                let mut flags = MsFlags::MS_NOSUID;
                if *readonly {
                    flags |= MsFlags::MS_RDONLY;
                }
                if fstype != "devtmpfs"
                    && fstype != "proc"
                    && fstype != "sysfs"
                    && fstype != "overlay"
                {
                    flags |= MsFlags::MS_NODEV;
                }
                nix::mount::mount(
                    Some(source.as_str()),
                    target,
                    Some(fstype.as_str()),
                    flags,
                    data.as_deref(),
                )
                .map_err(|e| MountError::Mount {
                    source_name: source.clone(),
                    fstype: fstype.clone(),
                    target: target.clone(),
                    source: e,
                })
            }
            MountOp::Write { path, contents } => {
                std::fs::write(path, contents).map_err(|source| MountError::Write {
                    path: path.clone(),
                    source,
                })
            }
            MountOp::SwitchRoot(path) => {
                switch_root(path).map_err(|source| MountError::SwitchRoot {
                    path: path.clone(),
                    source,
                })
            }
        }
    }
}

/// What switch_root(8) does: the initramfs cannot be pivoted away, so move
/// the new root over `/` and chroot into it.
fn switch_root(path: &Path) -> Result<(), nix::Error> {
    nix::unistd::chdir(path)?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erofs(dev: &str) -> Disk {
        Disk {
            device: dev.into(),
            fs: FsType::Erofs,
        }
    }

    #[test]
    fn custom_runtime_gets_an_empty_overlaid_root() {
        let disks = DiskConfig {
            runtime: None,
            code: Some(erofs("/dev/vdb")),
            scratch: None,
            layers: vec![],
        };
        let plan = root_plan(&disks, "i-1", &["10.0.2.3".parse().unwrap()]);
        assert!(plan.contains(&mount(
            "tmpfs",
            "/mnt/runtime",
            "tmpfs",
            true,
            Some("mode=0755")
        )));
        assert!(plan.contains(&mount("/dev/vdb", "/mnt/root/code", "erofs", true, None)));
        assert!(plan.contains(&MountOp::Write {
            path: "/mnt/root/etc/resolv.conf".into(),
            contents: "nameserver 10.0.2.3\n".into()
        }));
        // The overlay comes before anything mounted inside it, the switch last.
        let pos = |op: &MountOp| plan.iter().position(|o| o == op).unwrap();
        let overlay = plan
            .iter()
            .position(|o| matches!(o, MountOp::Mount { fstype, .. } if fstype == "overlay"))
            .unwrap();
        assert!(overlay < pos(&mount("/dev/vdb", "/mnt/root/code", "erofs", true, None)));
        assert_eq!(plan.last(), Some(&MountOp::SwitchRoot("/mnt/root".into())));
    }

    #[test]
    fn runtime_scratch_and_layers() {
        let disks = DiskConfig {
            runtime: Some(Disk {
                device: "/dev/vda".into(),
                fs: FsType::Squashfs,
            }),
            code: Some(erofs("/dev/vdb")),
            scratch: Some(Disk {
                device: "/dev/vdc".into(),
                fs: FsType::Ext4,
            }),
            layers: vec![erofs("/dev/vdd"), erofs("/dev/vde")],
        };
        let plan = root_plan(&disks, "h", &[]);
        assert!(plan.contains(&mount("/dev/vda", "/mnt/runtime", "squashfs", true, None)));
        assert!(plan.contains(&mount("/dev/vdc", "/mnt/scratch", "ext4", false, None)));
        assert!(plan.contains(&mount("/dev/vdd", "/mnt/layer0", "erofs", true, None)));
        assert!(plan.contains(&mount(
            "overlay",
            "/mnt/root/opt",
            "overlay",
            true,
            Some("lowerdir=/mnt/layer0:/mnt/layer1")
        )));
    }

    #[test]
    fn apply_stops_at_the_first_failure() {
        struct FailOn(&'static str, std::sync::Mutex<Vec<MountOp>>);
        impl MountOps for FailOn {
            fn apply(&self, op: &MountOp) -> Result<(), MountError> {
                if let MountOp::Mount { target, .. } = op {
                    if target == Path::new(self.0) {
                        return Err(MountError::Mount {
                            source_name: "x".into(),
                            fstype: "x".into(),
                            target: target.clone(),
                            source: nix::errno::Errno::ENODEV,
                        });
                    }
                }
                self.1.lock().unwrap().push(op.clone());
                Ok(())
            }
        }
        let f = FailOn("/sys", Default::default());
        assert!(apply_all(&f, &early_plan()).is_err());
        assert_eq!(f.1.lock().unwrap().len(), 3);
    }
}
