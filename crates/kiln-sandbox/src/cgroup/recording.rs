//! The fake cgroup tree unit tests (and other crates' tests) use.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use super::files::check_path;
use super::{
    cpu_quota, CgroupError, CgroupLimits, CgroupOps, CgroupStats, CgroupVersion, ClaimLimits,
    SwapControl,
};

/// One call the fake saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupCall {
    Freeze(String),
    Thaw(String),
    SetCpuQuota { path: String, quota_us: i64 },
    Remove(String),
    Create { path: String, limits: CgroupLimits },
    AddProcess { path: String, pid: u32 },
    SetLimits { path: String, limits: ClaimLimits },
}

#[derive(Debug, Clone, Default)]
struct FakeCgroup {
    quota: Option<i64>,
    weight: u64,
    stats: CgroupStats,
    procs: Vec<u32>,
}

/// A fake cgroup tree: cgroups exist once the code under test creates them
/// ([`CgroupOps::create`]) or a test, standing in for runc, says runc did
/// ([`RecordingCgroups::created_by_runc`]).
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
    pub fn created_by_runc(&self, path: &str, weight: u64, quota: Option<i64>) {
        self.groups.lock().expect("lock").insert(
            path.to_owned(),
            FakeCgroup {
                quota,
                weight,
                ..FakeCgroup::default()
            },
        );
    }

    /// The processes moved into the cgroup (empty when it does not exist).
    pub fn procs(&self, path: &str) -> Vec<u32> {
        self.groups
            .lock()
            .expect("lock")
            .get(path)
            .map(|g| g.procs.clone())
            .unwrap_or_default()
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

    fn swap_control(&self) -> SwapControl {
        SwapControl::Accounted
    }

    fn create(&self, path: &str, limits: &CgroupLimits) -> Result<(), CgroupError> {
        check_path(path)?;
        self.record(CgroupCall::Create {
            path: path.to_owned(),
            limits: *limits,
        });
        let quota = cpu_quota(limits.cpu_milli);
        let mut groups = self.groups.lock().expect("lock");
        let g = groups.entry(path.to_owned()).or_default();
        g.quota = Some(quota);
        g.stats.memory_limit_bytes = Some(limits.memory_bytes);
        Ok(())
    }

    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError> {
        self.record(CgroupCall::AddProcess {
            path: path.to_owned(),
            pid,
        });
        self.with(path, |g| g.procs.push(pid))
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

    fn set_limits(&self, path: &str, limits: &ClaimLimits) -> Result<(), CgroupError> {
        self.record(CgroupCall::SetLimits {
            path: path.to_owned(),
            limits: *limits,
        });
        self.with(path, |g| {
            g.quota = (limits.quota_us >= 0).then_some(limits.quota_us);
            g.weight = limits.cpu_shares;
            g.stats.memory_limit_bytes = Some(limits.memory_bytes);
        })
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

    #[test]
    fn the_fake_tracks_freezing_and_quota() {
        let cg = RecordingCgroups::new();
        cg.created_by_runc("/kt/a", 358, Some(35_000));
        cg.freeze("/kt/a").unwrap();
        assert!(cg.stats("/kt/a").unwrap().frozen);
        cg.set_cpu_quota("/kt/a", 100_000, 100_000).unwrap();
        assert_eq!(cg.cpu_quota("/kt/a").unwrap(), Some(100_000));
        assert!(cg.freeze("/kt/b").is_err());
        cg.remove("/kt/a").unwrap();
        assert!(!cg.exists("/kt/a"));
    }

    #[test]
    fn the_fake_creates_with_limits_and_holds_processes() {
        let cg = RecordingCgroups::new();
        let limits = CgroupLimits {
            memory_bytes: 256 << 20,
            cpu_milli: 500,
        };
        cg.create("/kp/vm-0", &limits).unwrap();
        cg.add_process("/kp/vm-0", 42).unwrap();
        assert_eq!(cg.procs("/kp/vm-0"), [42]);
        assert_eq!(cg.cpu_quota("/kp/vm-0").unwrap(), Some(50_000));
        assert_eq!(
            cg.stats("/kp/vm-0").unwrap().memory_limit_bytes,
            Some(256 << 20)
        );
        assert!(cg.add_process("/kp/vm-1", 43).is_err());
        assert_eq!(cg.paths(), ["/kp/vm-0"]);
    }
}
