//! Cgroups for both backends: a container's (created by runc, then frozen,
//! thawed, re-quota'd for the cold-start boost, measured and removed here)
//! and a microVM's VMM (created with its limits, given the VMM's pid and
//! removed here).
//!
//! One [`detect`]ion of the host's layout picks one of two implementations
//! of [`CgroupOps`]: [`CgroupV2`], the unified hierarchy (NixOS hosts), and
//! [`CgroupV1`], the per-controller hierarchies (with or without an empty
//! v2 mount beside them, as on these build machines). Each writes limits in
//! one place. [`RecordingCgroups`] is the fake unit tests use.
//!
//! Paths are absolute within the hierarchy: `/<parent>/<name>`.

mod files;
pub mod recording;
pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use recording::{CgroupCall, RecordingCgroups};
pub use v1::CgroupV1;
pub use v2::CgroupV2;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The CFS period every CPU quota is expressed in (100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;

/// CFS quota per [`CPU_PERIOD_US`] for `cpu_milli` thousandths of a CPU.
pub fn cpu_quota(cpu_milli: u32) -> i64 {
    (i64::from(cpu_milli) * CPU_PERIOD_US as i64 / 1000).max(1000)
}

/// Why a cgroup operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("Cannot access cgroup file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cgroup file {path} has unexpected contents {contents:?}")]
    Parse { path: PathBuf, contents: String },
    #[error("Cgroup {0} did not reach the frozen state within 5 s")]
    FreezeTimeout(String),
    #[error("Invalid cgroup path {0:?}: it must be absolute, without '..'")]
    InvalidPath(String),
}

/// Which cgroup layout the host has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// How the host keeps an instance's memory out of swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapControl {
    /// The kernel accounts swap per cgroup (v2's `memory.swap.max`, v1's
    /// `memory.memsw.limit_in_bytes` with swap accounting on): memory plus
    /// swap is capped at the memory limit, so no swap at all.
    Accounted,
    /// cgroup v1 without swap accounting (`swapaccount=0`): the cgroup's
    /// `memory.swappiness` is 0, so reclaim never swaps its anonymous
    /// memory out.
    SwappinessOnly,
}

/// What one cgroup has used.
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

/// The limits [`CgroupOps::create`] gives a new cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_bytes: u64,
    /// Thousandths of a CPU, as a CFS quota per [`CPU_PERIOD_US`].
    pub cpu_milli: u32,
}

/// What [`CgroupOps::set_limits`] gives an existing cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimits {
    pub memory_bytes: u64,
    /// v1 `cpu.shares` (converted to `cpu.weight` on v2 as runc does).
    pub cpu_shares: u64,
    /// CFS quota per [`CPU_PERIOD_US`]; negative: unlimited.
    pub quota_us: i64,
}

/// `cpu.weight` (1-10000) for v1 `cpu.shares` (2-262144), runc's mapping.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

/// The cgroup operations of both backends. `path` is `/<parent>/<name>`
/// (for a container its `cgroupsPath`).
pub trait CgroupOps: Send + Sync + 'static {
    fn version(&self) -> CgroupVersion;
    /// How [`CgroupOps::create`] (and runc, told by the bundle) keeps a
    /// cgroup out of swap on this host.
    fn swap_control(&self) -> SwapControl;
    /// Create the cgroup (and its parents) with `limits` and no swap (what
    /// runc does for a container, done here for a VMM). Controllers the
    /// host lacks are left out.
    fn create(&self, path: &str, limits: &CgroupLimits) -> Result<(), CgroupError>;
    /// Move process `pid` into the cgroup.
    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError>;
    /// Freeze every process in the cgroup; returns once they are frozen.
    fn freeze(&self, path: &str) -> Result<(), CgroupError>;
    fn thaw(&self, path: &str) -> Result<(), CgroupError>;
    /// Set the CFS quota (µs per `period_us`; negative: unlimited).
    fn set_cpu_quota(&self, path: &str, quota_us: i64, period_us: u64) -> Result<(), CgroupError>;
    /// Change an existing cgroup's memory limit (and no swap beyond it),
    /// relative CPU weight (given as v1 `cpu.shares`) and CFS quota: a
    /// pre-made sandbox takes its function's limits when it is claimed.
    fn set_limits(&self, path: &str, limits: &ClaimLimits) -> Result<(), CgroupError>;
    /// The current quota (µs per period), None when unlimited.
    fn cpu_quota(&self, path: &str) -> Result<Option<i64>, CgroupError>;
    /// The relative CPU weight as the kernel has it (`cpu.shares` on v1,
    /// `cpu.weight` on v2).
    fn cpu_weight(&self, path: &str) -> Result<u64, CgroupError>;
    fn stats(&self, path: &str) -> Result<CgroupStats, CgroupError>;
    /// Whether the cgroup exists (in any controller).
    fn exists(&self, path: &str) -> bool;
    /// Remove the cgroup if it exists and is empty (rmdir, never
    /// recursive). Succeeds when it does not exist.
    fn remove(&self, path: &str) -> Result<(), CgroupError>;
}

/// The host's layout: v2 when `root` itself is a cgroup2 mount (an empty
/// v2 mount below a v1 `root` is the hybrid layout, v1 here).
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
pub fn host() -> Arc<dyn CgroupOps> {
    let root = Path::new(CGROUP_ROOT);
    match detect(root) {
        CgroupVersion::V2 => Arc::new(CgroupV2::new(root)),
        CgroupVersion::V1 => Arc::new(CgroupV1::new(root)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotas_scale_with_cpu_and_have_a_floor() {
        assert_eq!(cpu_quota(2000), 200_000);
        assert_eq!(cpu_quota(350), 35_000);
        assert_eq!(cpu_quota(1), 1000);
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
    fn this_host_layout_is_detected() {
        let v = detect(Path::new(CGROUP_ROOT));
        let is_v2 = std::fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(CGROUP_ROOT) && l.contains(" cgroup2 "));
        assert_eq!(v == CgroupVersion::V2, is_v2);
    }
}
