//! cgroup v1: one hierarchy per controller under the root.

use std::path::PathBuf;

use super::files::{
    check_path, keyed, mkdir_all, read, read_u64, rmdir_if_present, wait_until, write,
    write_if_present,
};
use super::{
    cpu_quota, CgroupError, CgroupLimits, CgroupOps, CgroupStats, CgroupVersion, ClaimLimits,
    SwapControl, CPU_PERIOD_US,
};

/// The controllers [`CgroupOps::create`] makes a cgroup in (runc makes a
/// container's in all of them).
const CREATED_CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

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

    /// The directories of `path` in the controllers a cgroup this module
    /// creates gets, for those the host has mounted.
    fn created_dirs(&self, path: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let rel = check_path(path)?;
        Ok(CREATED_CONTROLLERS
            .iter()
            .map(|c| self.root.join(c))
            .filter(|h| h.is_dir())
            .map(|h| h.join(rel))
            .collect())
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

    fn swap_control(&self) -> SwapControl {
        // The memsw files exist with swap accounting on (`swapaccount=1`).
        if self
            .root
            .join("memory/memory.memsw.limit_in_bytes")
            .exists()
        {
            SwapControl::Accounted
        } else {
            SwapControl::SwappinessOnly
        }
    }

    fn create(&self, path: &str, limits: &CgroupLimits) -> Result<(), CgroupError> {
        for dir in self.created_dirs(path)? {
            mkdir_all(&dir)?;
        }
        let memory = self.dir("memory", path)?;
        write_if_present(
            &memory.join("memory.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        )?;
        // No swap: memory plus swap capped at the memory limit where swap
        // is accounted, and never swapped out where it is not.
        write_if_present(
            &memory.join("memory.memsw.limit_in_bytes"),
            &limits.memory_bytes.to_string(),
        )?;
        write_if_present(&memory.join("memory.swappiness"), "0")?;
        if self.dir("cpu", path)?.is_dir() {
            self.set_cpu_quota(path, cpu_quota(limits.cpu_milli), CPU_PERIOD_US)?;
        }
        Ok(())
    }

    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError> {
        for dir in self.created_dirs(path)? {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
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

    fn set_limits(&self, path: &str, limits: &ClaimLimits) -> Result<(), CgroupError> {
        let memory = self.dir("memory", path)?;
        let limit = memory.join("memory.limit_in_bytes");
        let memsw = memory.join("memory.memsw.limit_in_bytes");
        let new = limits.memory_bytes.to_string();
        // memory plus swap may never be below memory: raise it first when
        // growing, lower it last when shrinking.
        if read_u64(&limit)? < limits.memory_bytes {
            write_if_present(&memsw, &new)?;
            write(&limit, &new)?;
        } else {
            write(&limit, &new)?;
            write_if_present(&memsw, &new)?;
        }
        let cpu = self.dir("cpu", path)?;
        write(&cpu.join("cpu.shares"), &limits.cpu_shares.to_string())?;
        self.set_cpu_quota(path, limits.quota_us, CPU_PERIOD_US)
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

#[cfg(test)]
mod tests {
    use std::path::Path;

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
    fn v1_creates_in_the_mounted_controllers_with_limits() {
        let tmp = tempfile::tempdir().unwrap();
        for c in ["memory", "cpu", "pids", "freezer"] {
            std::fs::create_dir(tmp.path().join(c)).unwrap();
        }
        // The kernel makes the limit file with the directory.
        let mem = tmp.path().join("memory/kp/vm-0");
        std::fs::create_dir_all(&mem).unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let cg = CgroupV1::new(tmp.path());
        let limits = CgroupLimits {
            memory_bytes: 256 << 20,
            cpu_milli: 500,
        };
        cg.create("/kp/vm-0", &limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(mem.join("memory.limit_in_bytes")).unwrap(),
            (256u64 << 20).to_string()
        );
        assert_eq!(cg.cpu_quota("/kp/vm-0").unwrap(), Some(50_000));
        assert!(tmp.path().join("pids/kp/vm-0").is_dir());
        assert!(!tmp.path().join("freezer/kp/vm-0").exists());
        cg.add_process("/kp/vm-0", 42).unwrap();
        for c in ["memory", "cpu", "pids"] {
            let procs = tmp.path().join(c).join("kp/vm-0/cgroup.procs");
            assert_eq!(std::fs::read_to_string(procs).unwrap(), "42", "{c}");
        }
    }
}
