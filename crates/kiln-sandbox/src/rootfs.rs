//! Runtime root filesystems, built once per node into `rootfs_dir/<runtime>`.
//!
//! A build goes to `<runtime>.tmp` and is renamed into place when complete,
//! under an exclusive `flock` on `<runtime>.lock`, so concurrent agents or
//! tests never build the same runtime twice and never see half a tree.
//! Tests share one cache through `KILN_ROOTFS_CACHE` (see the crate docs).
//!
//! A tree is named by [`RuntimeName::rootfs`]: the built-in runtimes
//! (`python3.11`, `nodejs18`) share `debian12-builtin`, Debian 12 with
//! python3 and nodejs plus Kiln's bootstraps ([`BOOTSTRAPS`]) under
//! `/usr/lib/kiln/runtime`; `python3.13` and `nodejs20` share
//! `debian13-builtin`, the same from Debian 13 (trixie), from the same
//! mirror. The bootstraps are this build's: a cached tree
//! whose copies differ (an older Kiln's) gets them rewritten, each
//! replaced atomically, before the runtime is used.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use kiln_core::RuntimeName;
use nix::fcntl::{Flock, FlockArg};
use tokio::process::Command;

use crate::mounts::{unmount_all_under, Mounter};

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";

/// Why a runtime root filesystem cannot be provided.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("Cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Runtime {0} has no root filesystem of its own: it runs the function's image")]
    NoTree(RuntimeName),
    #[error("debootstrap failed ({status}); see {log}")]
    Debootstrap { status: String, log: PathBuf },
    #[error("Cannot run debootstrap (install the debootstrap package)")]
    DebootstrapMissing(#[source] std::io::Error),
    #[error("A stale build at {path} still has mounts below it")]
    StaleMounts {
        path: PathBuf,
        #[source]
        source: crate::mounts::MountError,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Where `runtime`'s tree lives (complete once it exists).
pub fn rootfs_path(rootfs_dir: &Path, runtime: RuntimeName) -> PathBuf {
    rootfs_dir.join(runtime.rootfs())
}

/// Kiln's runtime bootstraps (FC's event handler model over the custom
/// runtime's HTTP contract), as files of the built-in runtimes' tree: the
/// absolute path in the tree and the content.
pub const BOOTSTRAPS: [(&str, &str); 2] = [
    (
        kiln_core::PYTHON_BOOTSTRAP,
        include_str!("../runtimes/python/bootstrap.py"),
    ),
    (
        kiln_core::NODEJS_BOOTSTRAP,
        include_str!("../runtimes/nodejs/bootstrap.js"),
    ),
];

/// A tag of this build's bootstraps, for names of what is made from the
/// tree (the microVM's erofs image of it): a changed bootstrap means a new
/// name, so an image of an older tree is never reused.
pub fn bootstraps_tag() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    BOOTSTRAPS.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// The Debian packages debootstrap adds to `minbase` for a tree.
fn packages(runtime: RuntimeName) -> &'static str {
    if runtime.handler_language().is_some() {
        "python3,nodejs"
    } else {
        "python3"
    }
}

/// Whether `tree` holds this build's bootstraps.
fn bootstraps_current(tree: &Path) -> bool {
    BOOTSTRAPS.iter().all(|(path, content)| {
        std::fs::read(tree.join(path.trim_start_matches('/')))
            .is_ok_and(|c| c == content.as_bytes())
    })
}

/// Write this build's bootstraps into `tree`, each through a temporary
/// file renamed over the old one (instances running on the tree see the
/// old file or the new, never half of one).
fn install_bootstraps(tree: &Path) -> Result<(), RootfsError> {
    for (path, content) in BOOTSTRAPS {
        let dest = tree.join(path.trim_start_matches('/'));
        if std::fs::read(&dest).is_ok_and(|c| c == content.as_bytes()) {
            continue;
        }
        let dir = dest.parent().expect("a bootstrap path has a parent");
        ensure_dir(dir, 0o755)?;
        let tmp = dest.with_extension("tmp");
        std::fs::write(&tmp, content).map_err(io(&tmp))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    }
    Ok(())
}

/// Whether `runtime`'s tree is there and ready to run.
fn is_ready(tree: &Path, runtime: RuntimeName) -> bool {
    is_complete(tree) && (runtime.handler_language().is_none() || bootstraps_current(tree))
}

/// Whether a tree has the mount points the driver binds over: `/code`,
/// `/opt` (layers) and `/etc/hosts` (the root is read-only, runc cannot
/// create them).
pub fn is_complete(tree: &Path) -> bool {
    tree.join("code").is_dir() && tree.join("opt").is_dir() && tree.join("etc/hosts").is_file()
}

const DEFAULT_HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost\n";

/// Add the mount points of [`is_complete`] to a tree that lacks them.
fn add_mount_points(tree: &Path) -> Result<(), RootfsError> {
    ensure_dir(&tree.join("code"), 0o755)?;
    if !tree.join("opt").is_dir() {
        ensure_dir(&tree.join("opt"), 0o755)?;
    }
    let hosts = tree.join("etc/hosts");
    if !hosts.is_file() {
        ensure_dir(&tree.join("etc"), 0o755)?;
        std::fs::write(&hosts, DEFAULT_HOSTS).map_err(io(&hosts))?;
    }
    Ok(())
}

/// The Debian mirror of the host's apt sources (deb822 `debian.sources`
/// first, then the one-line `sources.list`), skipping security mirrors.
pub fn mirror_from_sources(deb822: Option<&str>, list: Option<&str>) -> Option<String> {
    if let Some(text) = deb822 {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    l.strip_prefix(name)
                        .and_then(|r| r.strip_prefix(':'))
                        .map(str::trim)
                })
            };
            let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
                continue;
            };
            if suites.split_whitespace().any(|s| s == SUITE) {
                if let Some(uri) = uris.split_whitespace().next() {
                    return Some(uri.to_owned());
                }
            }
        }
    }
    if let Some(text) = list {
        for line in text.lines() {
            let mut words = line.split_whitespace().filter(|w| !w.starts_with('['));
            if words.next() != Some("deb") {
                continue;
            }
            if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
                if suite == SUITE {
                    return Some(uri.to_owned());
                }
            }
        }
    }
    None
}

fn host_mirror() -> String {
    let deb822 = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").ok();
    let list = std::fs::read_to_string("/etc/apt/sources.list").ok();
    mirror_from_sources(deb822.as_deref(), list.as_deref())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned())
}

/// Builds and caches runtime root filesystems.
pub struct RootfsBuilder<'a> {
    pub dir: &'a Path,
    pub mirror: Option<&'a str>,
    pub mounter: &'a dyn Mounter,
}

impl RootfsBuilder<'_> {
    /// The runtime's tree, building it first if it is not there yet.
    pub async fn ensure(&self, runtime: RuntimeName) -> Result<PathBuf, RootfsError> {
        if runtime.is_container_image() {
            return Err(RootfsError::NoTree(runtime));
        }
        let target = rootfs_path(self.dir, runtime);
        if is_ready(&target, runtime) {
            return Ok(target);
        }
        std::fs::create_dir_all(self.dir).map_err(io(self.dir))?;
        let lock_path = self.dir.join(format!("{}.lock", runtime.rootfs()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let lp = lock_path.clone();
        let lock = tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive)
                .map_err(|(_, source)| RootfsError::Lock { path: lp, source })
        })
        .await
        .map_err(|e| RootfsError::Io {
            path: lock_path.clone(),
            source: std::io::Error::other(e),
        })??;
        let result = self.build_locked(runtime, &target).await;
        drop(lock);
        result.map(|()| target)
    }

    async fn build_locked(&self, runtime: RuntimeName, target: &Path) -> Result<(), RootfsError> {
        if target.is_dir() {
            // Built by someone else meanwhile, or by an older version that
            // did not add every mount point or had other bootstraps.
            add_mount_points(target)?;
            if runtime.handler_language().is_some() {
                install_bootstraps(target)?;
            }
            return Ok(());
        }
        let tmp = self.dir.join(format!("{}.tmp", runtime.rootfs()));
        if tmp.exists() {
            // An interrupted build; debootstrap may have left /proc mounted.
            unmount_all_under(self.mounter, &tmp).map_err(|source| RootfsError::StaleMounts {
                path: tmp.clone(),
                source,
            })?;
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        tracing::info!(%runtime, path = %target.display(), "building runtime root filesystem");
        match runtime {
            RuntimeName::Custom => build_minimal(&tmp)?,
            RuntimeName::CustomDebian12 => self.debootstrap(runtime, &tmp).await?,
            RuntimeName::Python311
            | RuntimeName::Nodejs18
            | RuntimeName::Python313
            | RuntimeName::Nodejs20 => {
                self.debootstrap(runtime, &tmp).await?;
                install_bootstraps(&tmp)?;
            }
            RuntimeName::CustomContainer => return Err(RootfsError::NoTree(runtime)),
        }
        std::fs::rename(&tmp, target).map_err(io(target))?;
        tracing::info!(%runtime, "runtime root filesystem ready");
        Ok(())
    }

    async fn debootstrap(&self, runtime: RuntimeName, tmp: &Path) -> Result<(), RootfsError> {
        let mirror = self.mirror.map(str::to_owned).unwrap_or_else(host_mirror);
        let log = self.dir.join(format!("{}.log", runtime.rootfs()));
        let mut command = Command::new("debootstrap");
        command
            .arg("--variant=minbase")
            .arg(format!("--include={}", packages(runtime)))
            .arg(runtime.debian_suite())
            .arg(tmp)
            .arg(&mirror);
        let status = run_logged(command, &log, runtime).await?;
        if !status.success() {
            return Err(RootfsError::Debootstrap {
                status: status.to_string(),
                log,
            });
        }
        // Downloaded packages are not part of the runtime.
        let archives = tmp.join("var/cache/apt/archives");
        if let Ok(entries) = std::fs::read_dir(&archives) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "deb") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        add_mount_points(tmp)
    }
}

/// Run a build `command` with its output to `log`, saying every
/// [`PROGRESS_EVERY`] where it is. Dropped before it ends (a start
/// stopped), the command and everything it started are killed.
async fn run_logged(
    mut command: Command,
    log: &Path,
    runtime: RuntimeName,
) -> Result<std::process::ExitStatus, RootfsError> {
    let log_file = std::fs::File::create(log).map_err(io(log))?;
    let log_err = log_file.try_clone().map_err(io(log))?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        // Its own process group, so that a build dropped before it ends
        // ends apt, dpkg and the rest with it.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(RootfsError::DebootstrapMissing)?;
    let mut group = GroupKill(child.id().map(|id| nix::unistd::Pid::from_raw(id as i32)));
    // A few minutes on a first start: say what it is doing meanwhile.
    let started = std::time::Instant::now();
    let mut every = tokio::time::interval(PROGRESS_EVERY);
    every.tick().await;
    loop {
        tokio::select! {
            status = child.wait() => {
                group.0 = None;
                return status.map_err(RootfsError::DebootstrapMissing);
            }
            _ = every.tick() => {
                let text = std::fs::read_to_string(log).unwrap_or_default();
                tracing::info!(
                    %runtime,
                    elapsed_s = started.elapsed().as_secs(),
                    step = last_step(&text).unwrap_or("starting"),
                    log = %log.display(),
                    "still building the runtime root filesystem (first start only)"
                );
            }
        }
    }
}

/// Kills a build's process group when dropped while armed: debootstrap
/// is a shell script whose children (wget, dpkg, chroot) would otherwise
/// outlive it, writing into a tree the next build removes.
struct GroupKill(Option<nix::unistd::Pid>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(group) = self.0.take() {
            // The group is debootstrap's own (process_group(0) above).
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// How often a build in progress says where it is.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// debootstrap's last step in its log (its `I: ...` lines).
fn last_step(log: &str) -> Option<&str> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix("I: "))
        .map(str::trim)
}

fn ensure_dir(path: &Path, mode: u32) -> Result<(), RootfsError> {
    std::fs::create_dir_all(path).map_err(io(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io(path))
}

/// The `custom` runtime: mount points and the few files libc looks for.
fn build_minimal(dir: &Path) -> Result<(), RootfsError> {
    ensure_dir(dir, 0o755)?;
    for d in ["code", "opt", "proc", "dev", "sys", "etc"] {
        ensure_dir(&dir.join(d), 0o755)?;
    }
    ensure_dir(&dir.join("tmp"), 0o1777)?;
    let files = [
        (
            "etc/passwd",
            "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hosts", DEFAULT_HOSTS),
        (
            "etc/resolv.conf",
            "# no resolver is configured for this runtime\n",
        ),
    ];
    for (name, content) in files {
        let p = dir.join(name);
        std::fs::write(&p, content).map_err(io(&p))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::RecordingMounter;

    /// Whether process `pid` still runs (a zombie counts as gone).
    fn running(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                let state = stat
                    .rsplit(')')
                    .next()
                    .and_then(|r| r.split_whitespace().next());
                state != Some("Z") && state != Some("X")
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn a_build_dropped_midway_kills_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        // A build whose own child (as debootstrap's wget and dpkg are)
        // would outlive it if only the build were killed.
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!(
            "sleep 300 & echo $! > {}.tmp && mv {0}.tmp {0}; wait",
            pidfile.display()
        ));
        let log = dir.path().join("build.log");
        let build =
            tokio::spawn(
                async move { run_logged(command, &log, RuntimeName::CustomDebian12).await },
            );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let grandchild: i32 = loop {
            if let Ok(text) = std::fs::read_to_string(&pidfile) {
                break text.trim().parse().unwrap();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the build never started its child"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        assert!(running(grandchild));
        build.abort();
        assert!(build.await.unwrap_err().is_cancelled());
        // SIGKILL is delivered at once; the reaping by init may lag.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while running(grandchild) {
            assert!(
                std::time::Instant::now() < deadline,
                "the build's child {grandchild} outlived the dropped build"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_build_that_ends_reports_its_status() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("build.log");
        let mut command = Command::new("sh");
        command.arg("-c").arg("echo 'I: Extracting base'; exit 3");
        let status = run_logged(command, &log, RuntimeName::CustomDebian12)
            .await
            .unwrap();
        assert_eq!(status.code(), Some(3));
        assert_eq!(
            last_step(&std::fs::read_to_string(&log).unwrap()),
            Some("Extracting base")
        );
    }

    #[test]
    fn progress_names_debootstraps_last_step() {
        let log = "I: Retrieving InRelease \nI: Validating Packages \n\
                   W: a warning\nI: Extracting libc6...\n  some output\n";
        assert_eq!(last_step(log), Some("Extracting libc6..."));
        assert_eq!(last_step(""), None);
        assert_eq!(last_step("W: only warnings\n"), None);
    }

    #[test]
    fn mirror_comes_from_the_bookworm_source() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_sources(Some(deb822), None).as_deref(),
            Some("http://mirror.example/debian")
        );
        let sec_first = "URIs: http://s.example/debian-security\nSuites: bookworm-security\n\nURIs: http://m.example/debian\nSuites: bookworm\n";
        assert_eq!(
            mirror_from_sources(Some(sec_first), None).as_deref(),
            Some("http://m.example/debian")
        );
        let list = "# comment\ndeb http://s.example/debian-security bookworm-security main\ndeb [arch=amd64] http://l.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_sources(None, Some(list)).as_deref(),
            Some("http://l.example/debian")
        );
        assert_eq!(mirror_from_sources(Some(""), Some("")), None);
    }

    #[test]
    fn bootstraps_are_installed_and_refreshed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path();
        add_mount_points(tree).unwrap();
        assert!(!is_ready(tree, RuntimeName::Python311));
        assert!(is_ready(tree, RuntimeName::CustomDebian12));
        install_bootstraps(tree).unwrap();
        assert!(is_ready(tree, RuntimeName::Python311) && is_ready(tree, RuntimeName::Nodejs18));
        let py = tree.join(kiln_core::PYTHON_BOOTSTRAP.trim_start_matches('/'));
        assert!(std::fs::read_to_string(&py)
            .unwrap()
            .contains("class FCContext"));
        assert_eq!(
            std::fs::metadata(&py).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // An older Kiln's bootstrap is replaced; nothing temporary is left.
        std::fs::write(&py, "old").unwrap();
        assert!(!is_ready(tree, RuntimeName::Python311));
        install_bootstraps(tree).unwrap();
        assert!(bootstraps_current(tree));
        let names: Vec<_> = std::fs::read_dir(py.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(packages(RuntimeName::Nodejs18), "python3,nodejs");
        assert_eq!(packages(RuntimeName::CustomDebian12), "python3");
    }

    #[tokio::test]
    async fn custom_is_built_once_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let m = RecordingMounter::new();
        let b = RootfsBuilder {
            dir: dir.path(),
            mirror: None,
            mounter: &m,
        };
        // A stale half build is replaced.
        std::fs::create_dir_all(dir.path().join("custom.tmp/junk")).unwrap();
        let path = b.ensure(RuntimeName::Custom).await.unwrap();
        assert_eq!(path, dir.path().join("custom"));
        for d in ["code", "tmp", "proc", "dev", "sys", "etc"] {
            assert!(path.join(d).is_dir(), "{d}");
        }
        let passwd = std::fs::read_to_string(path.join("etc/passwd")).unwrap();
        assert!(passwd.starts_with("root:x:0:0:"));
        assert!(path.join("etc/resolv.conf").is_file());
        assert!(!dir.path().join("custom.tmp").exists());
        let mode = std::fs::metadata(path.join("tmp"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o1777);
        assert!(is_complete(&path));
        // Present: a second call changes nothing.
        std::fs::write(path.join("etc/marker"), "x").unwrap();
        b.ensure(RuntimeName::Custom).await.unwrap();
        assert!(path.join("etc/marker").exists());
        // A tree from an older build gains the missing mount points.
        std::fs::remove_file(path.join("etc/hosts")).unwrap();
        std::fs::remove_dir(path.join("code")).unwrap();
        assert!(!is_complete(&path));
        b.ensure(RuntimeName::Custom).await.unwrap();
        assert!(is_complete(&path));
        assert!(path.join("etc/marker").exists());
    }
}
