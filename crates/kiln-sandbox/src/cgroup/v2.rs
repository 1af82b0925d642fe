//! cgroup v2: the unified hierarchy at the root.

use std::path::{Path, PathBuf};

use super::files::{
    check_path, keyed, mkdir_all, parse_u64, read, read_u64, rmdir_if_present, wait_until, write,
    write_if_present,
};
use super::{
    cpu_quota, shares_to_weight, CgroupError, CgroupLimits, CgroupOps, CgroupStats, CgroupVersion,
    ClaimLimits, SwapControl, CPU_PERIOD_US,
};

/// `cpu.max`: `QUOTA PERIOD`, or `max PERIOD` when unlimited.
fn cpu_max(quota_us: i64, period_us: u64) -> String {
    if quota_us < 0 {
        format!("max {period_us}")
    } else {
        format!("{quota_us} {period_us}")
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

    fn swap_control(&self) -> SwapControl {
        SwapControl::Accounted
    }

    fn create(&self, path: &str, limits: &CgroupLimits) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        mkdir_all(&dir)?;
        // The files exist when the parent enables the controller.
        write_if_present(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        // Absent when the kernel has no swap accounting (then no swap
        // either is possible beyond memory.max).
        write_if_present(&dir.join("memory.swap.max"), "0")?;
        write_if_present(
            &dir.join("cpu.max"),
            &cpu_max(cpu_quota(limits.cpu_milli), CPU_PERIOD_US),
        )
    }

    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError> {
        write(&self.dir(path)?.join("cgroup.procs"), &pid.to_string())
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
        write(
            &self.dir(path)?.join("cpu.max"),
            &cpu_max(quota_us, period_us),
        )
    }

    fn set_limits(&self, path: &str, limits: &ClaimLimits) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        write_if_present(&dir.join("memory.swap.max"), "0")?;
        write(
            &dir.join("cpu.weight"),
            &shares_to_weight(limits.cpu_shares).to_string(),
        )?;
        write(
            &dir.join("cpu.max"),
            &cpu_max(limits.quota_us, CPU_PERIOD_US),
        )
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn v2_creates_with_the_limits_its_controllers_offer() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("kp/vm-0");
        std::fs::create_dir_all(&dir).unwrap();
        // memory is enabled for the parent, cpu is not.
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        let cg = CgroupV2::new(tmp.path());
        let limits = CgroupLimits {
            memory_bytes: 256 << 20,
            cpu_milli: 500,
        };
        cg.create("/kp/vm-0", &limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            (256u64 << 20).to_string()
        );
        assert!(!dir.join("cpu.max").exists());
        std::fs::write(dir.join("cpu.max"), "max 100000\n").unwrap();
        cg.create("/kp/vm-0", &limits).unwrap();
        assert_eq!(cg.cpu_quota("/kp/vm-0").unwrap(), Some(50_000));
        cg.add_process("/kp/vm-0", 42).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "42"
        );
    }
}
