//! The VMM jail, as Firecracker's jailer builds one: what a jailed
//! cloud-hypervisor may see and be. [`JailPlan`] says it (uid, gid, the
//! chroot and what is mounted into it); [`JailPlan::prepare`] builds the
//! chroot directory; [`super::launch`] applies the plan in the new process
//! before it executes the VMM.
//!
//! A jailed VMM
//! - runs as its own uid and gid, `uid_base + slot` (see [`UidRange`]), with
//!   only the group of `/dev/kvm` besides its own;
//! - is PID 1 of its own PID namespace and has its own mount namespace,
//!   whose mounts are private (nothing propagates back to the host);
//! - is chrooted into `vms/<name>/root`, which holds only its API and vsock
//!   sockets, serial console, scratch disk, hard links of its read-only disk
//!   images, the kernel and initramfs, the VMM binary (and, for a dynamically
//!   linked binary, its loader and libraries), `/dev/kvm` and `/dev/net/tun`;
//!   everything not on the host's state filesystem is a read-only bind mount
//!   made inside the VMM's mount namespace only;
//! - has every capability set empty (bounding and ambient too) and
//!   `no_new_privs`, is in its own cgroup before its first instruction, and
//!   gets `--seccomp true` and, from cloud-hypervisor [`LANDLOCK_SINCE`],
//!   `--landlock` limited to the chroot's files.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The first cloud-hypervisor release with `--landlock` (and
/// `--landlock-rules`): v39.0.
pub const LANDLOCK_SINCE: (u32, u32) = (39, 0);

/// Where the binary is inside the chroot.
pub const JAIL_BINARY: &str = "cloud-hypervisor";
pub const JAIL_KERNEL: &str = "vmlinuz";
pub const JAIL_INITRAMFS: &str = "initramfs";
/// Devices bind-mounted into every jail, when the host has them.
pub const JAIL_DEVICES: [&str; 2] = ["/dev/kvm", "/dev/net/tun"];

/// cloud-hypervisor's version, from `cloud-hypervisor --version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmVersion {
    pub major: u32,
    pub minor: u32,
    /// The line it printed.
    pub text: String,
}

impl VmmVersion {
    /// `cloud-hypervisor v39.0.0` (or `v54.0-dirty`, `v41.0-12-gabc`).
    pub fn parse(output: &str) -> Option<Self> {
        let line = output.lines().find(|l| !l.trim().is_empty())?.trim();
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix('v'))
            .filter(|v| v.starts_with(|c: char| c.is_ascii_digit()))?;
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next().and_then(|m| m.parse().ok()).unwrap_or(0);
        Some(Self {
            major,
            minor,
            text: line.to_owned(),
        })
    }

    pub fn supports_landlock(&self) -> bool {
        (self.major, self.minor) >= LANDLOCK_SINCE
    }
}

/// Run `binary --version` (with `env`, as the VMM gets it).
pub async fn probe_version(binary: &Path, env: &[(String, String)]) -> Result<VmmVersion, String> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| format!("`{} --version` did not finish", binary.display()))?
        .map_err(|e| format!("cannot run `{} --version`: {e}", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "`{} --version` failed ({}): {}",
            binary.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    VmmVersion::parse(&text).ok_or_else(|| {
        format!(
            "`{} --version` printed {:?}, not `cloud-hypervisor vMAJOR.MINOR`",
            binary.display(),
            text.trim()
        )
    })
}

/// The uids (and gids, the same numbers) jailed VMMs run as: the VM in
/// slot N runs as `base + N`. A slot is a VM's tap, directory and cgroup
/// name, so a uid always belongs to exactly one VM directory; the driver
/// also refuses a slot whose uid still runs a process (a VMM a previous
/// agent left that its cleanup could not kill).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub base: u32,
    pub count: u32,
}

impl UidRange {
    pub fn of_slot(&self, slot: u32) -> Option<u32> {
        (slot < self.count).then(|| self.base + slot)
    }

    pub fn contains(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }
}

/// The processes whose real, effective, saved or filesystem uid is `uid`.
pub fn processes_of_uid(uid: u32) -> Vec<u32> {
    processes_where(|pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        Some(
            line.split_whitespace()
                .skip(1)
                .any(|u| u.parse() == Ok(uid)),
        )
    })
}

/// The processes whose root directory is `root` or below it (jailed VMMs
/// of that directory), as `/proc/<pid>/root` names it.
pub fn processes_rooted_under(root: &Path) -> Vec<u32> {
    processes_where(|pid| {
        let link = std::fs::read_link(format!("/proc/{pid}/root")).ok()?;
        Some(link.starts_with(root) && link != Path::new("/"))
    })
}

fn processes_where(mut keep: impl FnMut(u32) -> Option<bool>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| keep(pid).unwrap_or(false))
        .collect()
}

/// Mount points the agent's own mount namespace has at `dir` or below it
/// (from /proc/self/mountinfo). A jail's mounts live in the VMM's mount
/// namespace only, so this is empty unless something went wrong; the
/// driver never removes a directory that has any.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p.starts_with(dir))
        .collect()
}

fn unescape_mountinfo(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// What a bind mount carries; decides its mount flags (all are read-only
/// and nosuid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    /// The VMM binary, its loader and libraries: executable, no devices.
    Executable,
    /// Kernel, initramfs: neither executable nor devices.
    Data,
    /// A device node (`/dev/kvm`): usable as a device, not executable.
    Device,
}

/// `source` (a host path) mounted read-only at `target` (relative to the
/// chroot), inside the VMM's mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: PathBuf,
    pub target: PathBuf,
    pub kind: BindKind,
}

/// Everything the launcher does to jail one VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailPlan {
    /// The chroot, a host path: `vms/<name>/root`.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the owner group of /dev/kvm).
    pub groups: Vec<u32>,
    pub binds: Vec<BindMount>,
}

/// Why a jail could not be planned or built.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("Cannot prepare the jail at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unusable(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> JailError + '_ {
    move |source| JailError::Io {
        path: path.to_owned(),
        source,
    }
}

impl JailPlan {
    /// The plan for a VMM in slot with `uid` (used as its gid too) whose
    /// chroot is `root`: the binary (and `libraries`), kernel, initramfs
    /// and the host's VM devices bind-mounted.
    pub fn new(
        root: PathBuf,
        uid: u32,
        binary: &Path,
        libraries: &[PathBuf],
        kernel: &Path,
        initramfs: &Path,
    ) -> Self {
        let mut binds = vec![
            BindMount {
                source: binary.to_owned(),
                target: JAIL_BINARY.into(),
                kind: BindKind::Executable,
            },
            BindMount {
                source: kernel.to_owned(),
                target: JAIL_KERNEL.into(),
                kind: BindKind::Data,
            },
            BindMount {
                source: initramfs.to_owned(),
                target: JAIL_INITRAMFS.into(),
                kind: BindKind::Data,
            },
        ];
        for lib in libraries {
            binds.push(BindMount {
                source: lib.clone(),
                target: lib.strip_prefix("/").unwrap_or(lib).to_owned(),
                kind: BindKind::Executable,
            });
        }
        let mut groups = vec![];
        for dev in JAIL_DEVICES {
            let Ok(meta) = std::fs::metadata(dev) else {
                continue;
            };
            if dev == "/dev/kvm" && meta.gid() != 0 {
                groups.push(meta.gid());
            }
            binds.push(BindMount {
                source: dev.into(),
                target: dev.trim_start_matches('/').into(),
                kind: BindKind::Device,
            });
        }
        Self {
            root,
            uid,
            gid: uid,
            groups,
            binds,
        }
    }

    /// The chroot-relative path the VMM uses for `rel`.
    pub fn inside(rel: &str) -> String {
        format!("/{}", rel.trim_start_matches('/'))
    }

    /// Create the chroot: the directory (the VMM's own, 0700, for its
    /// sockets and console) and an empty root-owned file or directory for
    /// every bind mount to cover. Fails if the directory exists.
    pub fn prepare(&self) -> Result<(), JailError> {
        let root = &self.root;
        std::fs::create_dir(root).map_err(io_err(root))?;
        for bind in &self.binds {
            let target = root.join(&bind.target);
            let mut dir = target.parent();
            let mut missing = vec![];
            while let Some(d) = dir.filter(|d| *d != root.as_path() && !d.exists()) {
                missing.push(d.to_owned());
                dir = d.parent();
            }
            for d in missing.iter().rev() {
                std::fs::create_dir(d).map_err(io_err(d))?;
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                    .map_err(io_err(d))?;
            }
            let source_is_dir = std::fs::metadata(&bind.source)
                .map_err(|e| {
                    JailError::Unusable(format!(
                        "{} (to be mounted into the jail) cannot be used: {e}",
                        bind.source.display()
                    ))
                })?
                .is_dir();
            if source_is_dir {
                std::fs::create_dir(&target).map_err(io_err(&target))?;
            } else {
                std::fs::File::create(&target).map_err(io_err(&target))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o444))
                    .map_err(io_err(&target))?;
            }
        }
        std::os::unix::fs::chown(root, Some(self.uid), Some(self.gid)).map_err(io_err(root))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(root))?;
        Ok(())
    }

    /// What [`Self::prepare`] puts into the chroot, relative paths of files
    /// and directories: what a test expects to find there before the VMM
    /// and the driver add sockets, console and disks.
    pub fn prepared_entries(&self) -> BTreeSet<PathBuf> {
        let mut out = BTreeSet::new();
        for bind in &self.binds {
            let mut p = Some(bind.target.as_path());
            while let Some(x) = p.filter(|x| !x.as_os_str().is_empty()) {
                out.insert(x.to_owned());
                p = x.parent();
            }
        }
        out
    }
}

/// The files a dynamically linked `binary` needs to start (its ELF
/// interpreter and shared libraries, from `ldd`); none for a static one
/// (cloud-hypervisor's release binaries are static).
pub async fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, JailError> {
    let header = {
        use std::io::Read;
        let mut buf = vec![0u8; 64 * 1024];
        let mut f = std::fs::File::open(binary).map_err(io_err(binary))?;
        let n = f.read(&mut buf).map_err(io_err(binary))?;
        buf.truncate(n);
        buf
    };
    if !elf_has_interpreter(&header) {
        return Ok(vec![]);
    }
    let out = tokio::process::Command::new("ldd")
        .arg(binary)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            JailError::Unusable(format!(
                "{} is dynamically linked and ldd (to find its libraries for the jail) cannot run: {e}; install ldd or use a static cloud-hypervisor",
                binary.display()
            ))
        })?;
    if !out.status.success() {
        return Err(JailError::Unusable(format!(
            "ldd {} failed: {}",
            binary.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_ldd(&String::from_utf8_lossy(&out.stdout)))
}

/// Absolute paths `ldd` names (`libc.so.6 => /lib/.../libc.so.6 (0x..)`,
/// `/lib64/ld-linux-x86-64.so.2 (0x..)`); the vDSO has none.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a 64-bit little-endian ELF has a PT_INTERP program header.
fn elf_has_interpreter(h: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if h.len() < 64 || &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 {
        // Not an ELF64 LE file (a script, say): let the exec decide.
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(h[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (size, num) = (u16_at(0x36), u16_at(0x38));
    (0..num).any(|i| {
        let at = phoff + i * size;
        h.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == PT_INTERP)
    })
}

/// Hard-link `image` (on the state filesystem) into the chroot as `rel`,
/// replacing what was there. The link shares the image's inode: root's,
/// mode 0644, so the VMM reads it and cannot change it.
pub fn link_into(root: &Path, image: &Path, rel: &str) -> Result<(), JailError> {
    let to = root.join(rel);
    match std::fs::remove_file(&to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&to)(e)),
    }
    std::fs::hard_link(image, &to).map_err(|e| {
        JailError::Unusable(format!(
            "cannot hard-link {} into the jail as {}: {e} (the images and VM directories must be on one filesystem)",
            image.display(),
            to.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_and_landlock_starts_at_v39() {
        let v = VmmVersion::parse("cloud-hypervisor v39.0.0\n").unwrap();
        assert_eq!((v.major, v.minor), (39, 0));
        assert!(v.supports_landlock());
        let old = VmmVersion::parse("cloud-hypervisor v38.1-dirty").unwrap();
        assert_eq!((old.major, old.minor), (38, 1));
        assert!(!old.supports_landlock());
        assert!(VmmVersion::parse("cloud-hypervisor").is_none());
        assert!(VmmVersion::parse("").is_none());
    }

    #[test]
    fn uid_ranges_map_slots_and_refuse_overflow() {
        let r = UidRange {
            base: 100_000,
            count: 4,
        };
        assert_eq!(r.of_slot(0), Some(100_000));
        assert_eq!(r.of_slot(3), Some(100_003));
        assert_eq!(r.of_slot(4), None);
        assert!(r.contains(100_003) && !r.contains(100_004) && !r.contains(99_999));
    }

    #[test]
    fn ldd_output_gives_the_loader_and_libraries() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                "/lib/x86_64-linux-gnu/libgcc_s.so.1".into(),
                "/lib64/ld-linux-x86-64.so.2".into(),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn elf_interpreter_is_found_in_this_test_binary() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // The test binary is dynamically linked (glibc target).
        assert!(elf_has_interpreter(&me[..me.len().min(64 * 1024)]));
        assert!(!elf_has_interpreter(b"#!/bin/sh\necho hi\n"));
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b/c"), PathBuf::from("/a b/c"));
    }
}
