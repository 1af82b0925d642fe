//! Per-instance cgroups after runc created them: freeze and thaw, CPU quota
//! changes (the cold-start boost), usage statistics, and removal of the
//! parent the driver names. Two layouts: the unified cgroup v2 hierarchy
//! (NixOS hosts) and the per-controller v1 hierarchies (with or without an
//! empty v2 mount beside them, as on these build machines). [`RecordingCgroups`]
//! is the fake unit tests use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a freeze may take before it is reported as failed.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup file {path} has unexpected contents {contents:?}")]
    Parse { path: PathBuf, contents: String },
    #[error("cgroup {0} did not reach the frozen state within 5 s")]
    FreezeTimeout(String),
    #[error("invalid cgroup path {0:?}: it must be absolute, without '..'")]
    InvalidPath(String),
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// What one instance's cgroup has used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time consumed, in microseconds.
    pub cpu_usage_us: u64,
    /// Time the CFS quota held the instance back, in microseconds.
    pub cpu_throttled_us: u64,
    pub memory_bytes: u64,
    /// The memory limit (None: unlimited).
    pub memory_limit_bytes: Option<u64>,
    /// Processes killed by the OOM killer in this cgroup.
    pub oom_kills: u64,
    pub pids: u64,
    pub frozen: bool,
}

/// The cgroup operations the container driver needs after `runc run`.
/// `path` is the container's `cgroupsPath` (`/<parent>/<container id>`).
pub trait CgroupOps: Send + Sync + 'static {
    fn version(&self) -> CgroupVersion;
    /// Freeze every process in the cgroup; returns once they are frozen.
    fn freeze(&self, path: &str) -> Result<(), CgroupError>;
    fn thaw(&self, path: &str) -> Result<(), CgroupError>;
    /// Set the CFS quota (µs per `period_us`).
    fn set_cpu_quota(&self, path: &str, quota_us: i64, period_us: u64) -> Result<(), CgroupError>;
    /// The current quota (µs per period), None when unlimited.
    fn cpu_quota(&self, path: &str) -> Result<Option<i64>, CgroupError>;
    /// The instance's relative CPU weight as the kernel has it
    /// (`cpu.shares` on v1, `cpu.weight` on v2).
    fn cpu_weight(&self, path: &str) -> Result<u64, CgroupError>;
    fn stats(&self, path: &str) -> Result<CgroupStats, CgroupError>;
    /// Whether the cgroup exists (in any controller).
    fn exists(&self, path: &str) -> bool;
    /// Remove the cgroup if it exists and is empty (rmdir, never recursive).
    fn remove(&self, path: &str) -> Result<(), CgroupError>;
}

fn check_path(path: &str) -> Result<&str, CgroupError> {
    let rel = path.strip_prefix('/').unwrap_or("");
    if rel.is_empty()
        || rel
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(CgroupError::InvalidPath(path.to_owned()));
    }
    Ok(rel)
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_u64(path: &Path, s: &str) -> Result<u64, CgroupError> {
    s.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_owned(),
        contents: s.to_owned(),
    })
}

fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    parse_u64(path, &read(path)?)
}

/// `key value` lines (cpu.stat, memory.events, memory.oom_control).
fn keyed(path: &Path, key: &str) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            return it.next().map(|v| parse_u64(path, v)).transpose();
        }
    }
    Ok(None)
}

fn rmdir_if_present(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

fn wait_until(
    path: &str,
    mut done: impl FnMut() -> Result<bool, CgroupError>,
) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut pause = Duration::from_micros(50);
    loop {
        if done()? {
            return Ok(());
        }
        if start.elapsed() > FREEZE_TIMEOUT {
            return Err(CgroupError::FreezeTimeout(path.to_owned()));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// Detect the host's layout: v2 when `root` itself is a cgroup2 mount.
pub fn detect(root: &Path) -> CgroupVersion {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let root = root.display().to_string();
    let v2 = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, target, kind) = (f.next(), f.next(), f.next());
        target == Some(root.as_str()) && kind == Some("cgroup2")
    });
    if v2 {
        CgroupVersion::V2
    } else {
        CgroupVersion::V1
    }
}

/// The host's cgroups at [`CGROUP_ROOT`], whichever layout it has.
pub fn host() -> Box<dyn CgroupOps> {
    let root = Path::new(CGROUP_ROOT);
    match detect(root) {
        CgroupVersion::V2 => Box::new(CgroupV2::new(root)),
        CgroupVersion::V1 => Box::new(CgroupV1::new(root)),
    }
}

/// cgroup v1: one hierarchy per controller under `root`.
#[derive(Debug, Clone)]
pub struct CgroupV1 {
    root: PathBuf,
}

impl CgroupV1 {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, controller: &str, path: &str) -> Result<PathBuf, CgroupError> {
        Ok(self.root.join(controller).join(check_path(path)?))
    }

    fn freezer_state(&self, path: &str) -> Result<String, CgroupError> {
        Ok(read(&self.dir("freezer", path)?.join("freezer.state"))?
            .trim()
            .to_owned())
    }

    /// The mounted controller hierarchies (named ones and the v2 mount
    /// runc also uses in the hybrid layout).
    fn hierarchies(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        dirs.retain(|d| d.is_dir() && !d.is_symlink());
        dirs.sort();
        dirs
    }
}

impl CgroupOps for CgroupV1 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V1
    }

    fn freeze(&self, path: &str) -> Result<(), CgroupError> {
        let file = self.dir("freezer", path)?.join("freezer.state");
        write(&file, "FROZEN")?;
        // FREEZING until every task has stopped; rewriting retries stragglers.
        wait_until(path, || {
            let state = self.freezer_state(path)?;
            if state == "FREEZING" {
                write(&file, "FROZEN")?;
            }
            Ok(state == "FROZEN")
        })
    }

    fn thaw(&self, path: &str) -> Result<(), CgroupError> {
        let file = self.dir("freezer", path)?.join("freezer.state");
        write(&file, "THAWED")?;
        wait_until(path, || Ok(self.freezer_state(path)? == "THAWED"))
    }

    fn set_cpu_quota(&self, path: &str, quota_us: i64, period_us: u64) -> Result<(), CgroupError> {
        let dir = self.dir("cpu", path)?;
        write(&dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
        write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())
    }

    fn cpu_quota(&self, path: &str) -> Result<Option<i64>, CgroupError> {
        let file = self.dir("cpu", path)?.join("cpu.cfs_quota_us");
        let text = read(&file)?;
        let q: i64 = text.trim().parse().map_err(|_| CgroupError::Parse {
            path: file.clone(),
            contents: text.clone(),
        })?;
        Ok((q >= 0).then_some(q))
    }

    fn cpu_weight(&self, path: &str) -> Result<u64, CgroupError> {
        read_u64(&self.dir("cpu", path)?.join("cpu.shares"))
    }

    fn stats(&self, path: &str) -> Result<CgroupStats, CgroupError> {
        let mem = self.dir("memory", path)?;
        let limit = read_u64(&mem.join("memory.limit_in_bytes"))?;
        Ok(CgroupStats {
            cpu_usage_us: read_u64(&self.dir("cpuacct", path)?.join("cpuacct.usage"))? / 1000,
            cpu_throttled_us: keyed(&self.dir("cpu", path)?.join("cpu.stat"), "throttled_time")?
                .unwrap_or(0)
                / 1000,
            memory_bytes: read_u64(&mem.join("memory.usage_in_bytes"))?,
            // The kernel's "unlimited" is the largest page-aligned i64.
            memory_limit_bytes: (limit < (i64::MAX as u64) & !0xfff).then_some(limit),
            oom_kills: keyed(&mem.join("memory.oom_control"), "oom_kill")?.unwrap_or(0),
            pids: read_u64(&self.dir("pids", path)?.join("pids.current"))?,
            frozen: self.freezer_state(path)? != "THAWED",
        })
    }

    fn exists(&self, path: &str) -> bool {
        let Ok(rel) = check_path(path) else {
            return false;
        };
        self.hierarchies().iter().any(|h| h.join(rel).is_dir())
    }

    fn remove(&self, path: &str) -> Result<(), CgroupError> {
        let rel = check_path(path)?;
        let mut first = None;
        for h in self.hierarchies() {
            if let Err(e) = rmdir_if_present(&h.join(rel)) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// cgroup v2: the unified hierarchy at `root`.
#[derive(Debug, Clone)]
pub struct CgroupV2 {
    root: PathBuf,
}

impl CgroupV2 {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn dir(&self, path: &str) -> Result<PathBuf, CgroupError> {
        Ok(self.root.join(check_path(path)?))
    }

    fn is_frozen(&self, dir: &Path) -> Result<bool, CgroupError> {
        Ok(keyed(&dir.join("cgroup.events"), "frozen")? == Some(1))
    }
}

impl CgroupOps for CgroupV2 {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn freeze(&self, path: &str) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        write(&dir.join("cgroup.freeze"), "1")?;
        wait_until(path, || self.is_frozen(&dir))
    }

    fn thaw(&self, path: &str) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        write(&dir.join("cgroup.freeze"), "0")?;
        wait_until(path, || Ok(!self.is_frozen(&dir)?))
    }

    fn set_cpu_quota(&self, path: &str, quota_us: i64, period_us: u64) -> Result<(), CgroupError> {
        let value = if quota_us < 0 {
            format!("max {period_us}")
        } else {
            format!("{quota_us} {period_us}")
        };
        write(&self.dir(path)?.join("cpu.max"), &value)
    }

    fn cpu_quota(&self, path: &str) -> Result<Option<i64>, CgroupError> {
        let file = self.dir(path)?.join("cpu.max");
        let text = read(&file)?;
        match text.split_whitespace().next() {
            Some("max") => Ok(None),
            Some(q) => q.parse().map(Some).map_err(|_| CgroupError::Parse {
                path: file.clone(),
                contents: text.clone(),
            }),
            None => Err(CgroupError::Parse {
                path: file,
                contents: text,
            }),
        }
    }

    fn cpu_weight(&self, path: &str) -> Result<u64, CgroupError> {
        read_u64(&self.dir(path)?.join("cpu.weight"))
    }

    fn stats(&self, path: &str) -> Result<CgroupStats, CgroupError> {
        let dir = self.dir(path)?;
        let cpu = dir.join("cpu.stat");
        let max = read(&dir.join("memory.max"))?;
        Ok(CgroupStats {
            cpu_usage_us: keyed(&cpu, "usage_usec")?.unwrap_or(0),
            cpu_throttled_us: keyed(&cpu, "throttled_usec")?.unwrap_or(0),
            memory_bytes: read_u64(&dir.join("memory.current"))?,
            memory_limit_bytes: match max.trim() {
                "max" => None,
                v => Some(parse_u64(&dir.join("memory.max"), v)?),
            },
            oom_kills: keyed(&dir.join("memory.events"), "oom_kill")?.unwrap_or(0),
            pids: read_u64(&dir.join("pids.current"))?,
            frozen: self.is_frozen(&dir)?,
        })
    }

    fn exists(&self, path: &str) -> bool {
        self.dir(path).is_ok_and(|d| d.is_dir())
    }

    fn remove(&self, path: &str) -> Result<(), CgroupError> {
        rmdir_if_present(&self.dir(path)?)
    }
}

/// One call the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupCall {
    Freeze(String),
    Thaw(String),
    SetCpuQuota { path: String, quota_us: i64 },
    Remove(String),
}

#[derive(Debug, Clone, Default)]
struct FakeCgroup {
    quota: Option<i64>,
    weight: u64,
    stats: CgroupStats,
}

/// A fake cgroup tree: cgroups exist once a test (standing in for runc)
/// [`RecordingCgroups::create`]s them.
#[derive(Debug, Default)]
pub struct RecordingCgroups {
    calls: Mutex<Vec<CgroupCall>>,
    groups: Mutex<HashMap<String, FakeCgroup>>,
}

impl RecordingCgroups {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<CgroupCall> {
        self.calls.lock().expect("lock").clone()
    }

    /// What runc would have created for a container.
    pub fn create(&self, path: &str, weight: u64, quota: Option<i64>) {
        self.groups.lock().expect("lock").insert(
            path.to_owned(),
            FakeCgroup {
                quota,
                weight,
                stats: CgroupStats::default(),
            },
        );
    }

    /// Make the cgroup report `stats` (frozen state is kept).
    pub fn set_stats(&self, path: &str, stats: CgroupStats) {
        if let Some(g) = self.groups.lock().expect("lock").get_mut(path) {
            let frozen = g.stats.frozen;
            g.stats = CgroupStats { frozen, ..stats };
        }
    }

    pub fn paths(&self) -> Vec<String> {
        let mut p: Vec<String> = self.groups.lock().expect("lock").keys().cloned().collect();
        p.sort();
        p
    }

    fn with<T>(&self, path: &str, f: impl FnOnce(&mut FakeCgroup) -> T) -> Result<T, CgroupError> {
        check_path(path)?;
        let mut groups = self.groups.lock().expect("lock");
        let g = groups.get_mut(path).ok_or_else(|| CgroupError::Io {
            path: PathBuf::from(path),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        Ok(f(g))
    }

    fn record(&self, call: CgroupCall) {
        self.calls.lock().expect("lock").push(call);
    }
}

impl CgroupOps for RecordingCgroups {
    fn version(&self) -> CgroupVersion {
        CgroupVersion::V2
    }

    fn freeze(&self, path: &str) -> Result<(), CgroupError> {
        self.record(CgroupCall::Freeze(path.to_owned()));
        self.with(path, |g| g.stats.frozen = true)
    }

    fn thaw(&self, path: &str) -> Result<(), CgroupError> {
        self.record(CgroupCall::Thaw(path.to_owned()));
        self.with(path, |g| g.stats.frozen = false)
    }

    fn set_cpu_quota(&self, path: &str, quota_us: i64, _period_us: u64) -> Result<(), CgroupError> {
        self.record(CgroupCall::SetCpuQuota {
            path: path.to_owned(),
            quota_us,
        });
        self.with(path, |g| g.quota = (quota_us >= 0).then_some(quota_us))
    }

    fn cpu_quota(&self, path: &str) -> Result<Option<i64>, CgroupError> {
        self.with(path, |g| g.quota)
    }

    fn cpu_weight(&self, path: &str) -> Result<u64, CgroupError> {
        self.with(path, |g| g.weight)
    }

    fn stats(&self, path: &str) -> Result<CgroupStats, CgroupError> {
        self.with(path, |g| g.stats.clone())
    }

    fn exists(&self, path: &str) -> bool {
        self.groups.lock().expect("lock").contains_key(path)
    }

    fn remove(&self, path: &str) -> Result<(), CgroupError> {
        check_path(path)?;
        self.record(CgroupCall::Remove(path.to_owned()));
        self.groups.lock().expect("lock").remove(path);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v1_tree(root: &Path, path: &str) {
        for (ctrl, files) in [
            ("freezer", vec![("freezer.state", "THAWED\n")]),
            (
                "cpu",
                vec![
                    ("cpu.shares", "358\n"),
                    ("cpu.cfs_quota_us", "35000\n"),
                    ("cpu.cfs_period_us", "100000\n"),
                    (
                        "cpu.stat",
                        "nr_periods 5\nnr_throttled 2\nthrottled_time 7000000\n",
                    ),
                ],
            ),
            ("cpuacct", vec![("cpuacct.usage", "2500000000\n")]),
            (
                "memory",
                vec![
                    ("memory.usage_in_bytes", "1048576\n"),
                    ("memory.limit_in_bytes", "536870912\n"),
                    (
                        "memory.oom_control",
                        "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
                    ),
                ],
            ),
            ("pids", vec![("pids.current", "4\n")]),
        ] {
            let dir = root.join(ctrl).join(path.trim_start_matches('/'));
            std::fs::create_dir_all(&dir).unwrap();
            for (f, v) in files {
                std::fs::write(dir.join(f), v).unwrap();
            }
        }
    }

    #[test]
    fn v1_reads_stats_and_writes_the_freezer_and_quota() {
        let tmp = tempfile::tempdir().unwrap();
        let cg = CgroupV1::new(tmp.path());
        v1_tree(tmp.path(), "/kt/kt-i-1");
        let s = cg.stats("/kt/kt-i-1").unwrap();
        assert_eq!(
            s,
            CgroupStats {
                cpu_usage_us: 2_500_000,
                cpu_throttled_us: 7000,
                memory_bytes: 1_048_576,
                memory_limit_bytes: Some(536_870_912),
                oom_kills: 3,
                pids: 4,
                frozen: false,
            }
        );
        assert_eq!(cg.cpu_weight("/kt/kt-i-1").unwrap(), 358);
        assert_eq!(cg.cpu_quota("/kt/kt-i-1").unwrap(), Some(35_000));
        // A plain file reads back what was written: the fake freezer is
        // FROZEN at once.
        cg.freeze("/kt/kt-i-1").unwrap();
        assert!(cg.stats("/kt/kt-i-1").unwrap().frozen);
        cg.thaw("/kt/kt-i-1").unwrap();
        assert!(!cg.stats("/kt/kt-i-1").unwrap().frozen);
        cg.set_cpu_quota("/kt/kt-i-1", 200_000, 100_000).unwrap();
        assert_eq!(cg.cpu_quota("/kt/kt-i-1").unwrap(), Some(200_000));
        std::fs::write(tmp.path().join("cpu/kt/kt-i-1/cpu.cfs_quota_us"), "-1").unwrap();
        assert_eq!(cg.cpu_quota("/kt/kt-i-1").unwrap(), None);
        assert!(cg.exists("/kt/kt-i-1"));
        assert!(!cg.exists("/kt/kt-i-2"));
    }

    #[test]
    fn v2_reads_stats_and_writes_freeze_and_cpu_max() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kt/kt-i-1");
        std::fs::create_dir_all(&dir).unwrap();
        for (f, v) in [
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nthrottled_usec 20\n",
            ),
            ("cpu.max", "35000 100000\n"),
            ("cpu.weight", "14\n"),
            ("memory.current", "4096\n"),
            ("memory.max", "max\n"),
            ("memory.events", "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\n"),
            ("pids.current", "2\n"),
            ("cgroup.events", "populated 1\nfrozen 1\n"),
        ] {
            std::fs::write(dir.join(f), v).unwrap();
        }
        let cg = CgroupV2::new(tmp.path());
        let s = cg.stats("/kt/kt-i-1").unwrap();
        assert_eq!(s.cpu_usage_us, 1500);
        assert_eq!(s.cpu_throttled_us, 20);
        assert_eq!(s.memory_limit_bytes, None);
        assert_eq!(s.oom_kills, 1);
        assert!(s.frozen);
        assert_eq!(cg.cpu_weight("/kt/kt-i-1").unwrap(), 14);
        cg.freeze("/kt/kt-i-1").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "1"
        );
        cg.set_cpu_quota("/kt/kt-i-1", 70_000, 100_000).unwrap();
        assert_eq!(cg.cpu_quota("/kt/kt-i-1").unwrap(), Some(70_000));
        cg.set_cpu_quota("/kt/kt-i-1", -1, 100_000).unwrap();
        assert_eq!(cg.cpu_quota("/kt/kt-i-1").unwrap(), None);
    }

    #[test]
    fn bad_paths_are_refused_and_missing_cgroups_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let v1 = CgroupV1::new(tmp.path());
        let v2 = CgroupV2::new(tmp.path());
        for bad in ["", "/", "relative", "/a/../b", "/a//b"] {
            assert!(
                matches!(v1.freeze(bad), Err(CgroupError::InvalidPath(_))),
                "{bad}"
            );
            assert!(
                matches!(v2.remove(bad), Err(CgroupError::InvalidPath(_))),
                "{bad}"
            );
        }
        assert!(matches!(v2.thaw("/kt/none"), Err(CgroupError::Io { .. })));
        assert!(matches!(v1.stats("/kt/none"), Err(CgroupError::Io { .. })));
        // Removing what does not exist succeeds.
        v1.remove("/kt/none").unwrap();
        v2.remove("/kt/none").unwrap();
    }

    #[test]
    fn the_fake_tracks_freezing_and_quota() {
        let cg = RecordingCgroups::new();
        cg.create("/kt/a", 358, Some(35_000));
        cg.freeze("/kt/a").unwrap();
        assert!(cg.stats("/kt/a").unwrap().frozen);
        cg.set_cpu_quota("/kt/a", 100_000, 100_000).unwrap();
        assert_eq!(cg.cpu_quota("/kt/a").unwrap(), Some(100_000));
        assert!(cg.freeze("/kt/b").is_err());
        cg.remove("/kt/a").unwrap();
        assert!(!cg.exists("/kt/a"));
    }

    #[test]
    fn this_host_layout_is_detected() {
        let v = detect(Path::new(CGROUP_ROOT));
        let is_v2 = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(CGROUP_ROOT) && l.contains(" cgroup2 "));
        assert_eq!(v == CgroupVersion::V2, is_v2);
    }
}
