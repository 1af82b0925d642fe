//! `[sandbox.microvm]` in the agent's configuration: where the VMM and the
//! guest image are, how VMs are named, addressed, confined and pooled.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::Ipv4Cidr;

/// Why a microVM configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MicroVmConfigError {
    #[error("Invalid microvm.name_prefix {0:?}: use 1 to 8 lower-case letters or digits, starting with a letter")]
    NamePrefix(String),
    #[error("microvm.{0} must be an absolute path, got {1:?}")]
    NotAbsolute(&'static str, PathBuf),
    #[error("microvm.{0} must be between {1} and {2}, got {3}")]
    OutOfRange(&'static str, u64, u64, u64),
    #[error("Invalid microvm.cgroup_parent {0:?}: use letters, digits, '-', '_', '.' and '/' separated path segments")]
    CgroupParent(String),
    #[error("Invalid microvm.prewarm entry {0}: {1}")]
    Prewarm(usize, String),
    #[error("microvm.pool_size = {0} is replaced by [sandbox.microvm.premade] (paused VMs per runtime and size from recent demand, within a memory budget, as [sandbox.premade] does for containers): remove pool_size and set enabled = true, budget_mb (each paused VM is charged its memory size) and max_per_runtime = {0}")]
    PoolSize(usize),
    #[error("Invalid [sandbox.microvm.premade]: {0}")]
    Premade(String),
    #[error("microvm.vmm_uid must not be 0 (the VMM runs unprivileged); leave it out to keep the agent's user")]
    RootUid,
    #[error("microvm.vmm_uid and microvm.vmm_gid are for VMMs run without the jail; with the jail each VMM gets its own uid and gid from microvm.jail.uid_base (remove them, or set microvm.jail.insecure_disabled = true on a dedicated development node)")]
    UidWithJail,
    #[error("microvm.jail.uid_base must be at least 1000 and microvm.jail.uid_base + microvm.jail.uid_count at most 4294967294 (got uid_base = {0}, uid_count = {1}); use a range no user or service of the host has")]
    UidRange(u32, u32),
}

/// `[sandbox.microvm.jail]`: how every cloud-hypervisor process is jailed
/// (see [`super::jail`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JailConfig {
    /// The VMM in slot N (its tap and directory `<prefix>-<N in hex>`)
    /// runs as uid and gid `uid_base + N`. The range must belong to this
    /// agent alone: no other user, service or agent on the host may use
    /// any uid or gid in it.
    pub uid_base: u32,
    /// How many uids the range has: at most this many VMs run at once.
    pub uid_count: u32,
    /// Run VMMs without the jail (as `vmm_uid`, or as the agent's user),
    /// with a warning at start. Refused on a multi-tenant node; for a
    /// dedicated development node only.
    pub insecure_disabled: bool,
}

impl Default for JailConfig {
    fn default() -> Self {
        Self {
            uid_base: 2_000_000,
            uid_count: 4096,
            insecure_disabled: false,
        }
    }
}

impl JailConfig {
    pub fn enabled(&self) -> bool {
        !self.insecure_disabled
    }

    pub fn uid_range(&self) -> super::jail::UidRange {
        super::jail::UidRange {
            base: self.uid_base,
            count: self.uid_count,
        }
    }
}

/// Configuration of the microVM backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MicroVmConfig {
    /// The `cloud-hypervisor` binary; default: found on PATH.
    pub cloud_hypervisor_path: Option<PathBuf>,
    /// Guest kernel and initramfs (built by `images/guest/build.sh`).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Extra kernel command line, after Kiln's own.
    pub extra_cmdline: String,
    /// Prefix of every tap, VM directory and cgroup the driver creates.
    pub name_prefix: String,
    /// Carved into one /30 per VM (host tap .1, guest .2).
    pub instance_subnet: Ipv4Cidr,
    /// Cgroup (relative to the hierarchy root) under which each VMM goes.
    pub cgroup_parent: String,
    /// Without the jail only: run each VMM as this uid/gid (the gid should
    /// give access to /dev/kvm); unset: the agent's own user.
    pub vmm_uid: Option<u32>,
    pub vmm_gid: Option<u32>,
    /// Where runtime root filesystems are found (as the container backend
    /// builds them); default `<state>/rootfs`.
    pub rootfs_dir: Option<PathBuf>,
    /// How long one API call may take.
    pub api_timeout_ms: u64,
    /// How long a booted (or restored) guest has to report ready.
    pub boot_timeout_ms: u64,
    /// Replaced by `premade` (see [`MicroVmConfigError::PoolSize`]):
    /// accepted only as 0, so an old configuration is told what to write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_size: Option<usize>,
    /// `[sandbox.microvm.premade]`: booted, paused VMs kept per (runtime,
    /// memory, vCPUs), sized from demand within a memory budget.
    pub premade: VmPremadeConfig,
    /// Boot one guest per (runtime, memory size), snapshot it, and fill the
    /// pool by restoring that snapshot instead of booting kernels.
    pub snapshots: bool,
    /// Memory the VMM itself may use above the guest's, in MiB (cgroup).
    pub vmm_overhead_mb: u32,
    /// Sizes whose pool is kept at least one paused VM (within the
    /// budget), filled from the agent's start, before any function of that
    /// size was seen. Needs `premade.enabled`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub prewarm: Vec<PrewarmSize>,
    /// `[sandbox.microvm.jail]`.
    pub jail: JailConfig,
}

/// `[sandbox.microvm.premade]`: the microVM counterpart of
/// `[sandbox.premade]` (the same keys but `sandbox_mb`: a paused VM is
/// charged its guest memory size), under the same policy
/// ([`crate::pool_policy`]). A pool is per (runtime, memory, vCPUs): a
/// VM's size is fixed when it boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmPremadeConfig {
    pub enabled: bool,
    /// Memory all paused VMs of the node may take together, in MiB; each
    /// is charged its guest memory size until it is claimed.
    pub budget_mb: u32,
    /// The most paused VMs for one runtime at one size.
    pub max_per_runtime: usize,
    /// How far back the demand that sizes a pool is looked at: each pool
    /// aims at the most cold starts of its size within 10 s over this
    /// window (at least one for a `prewarm` size).
    pub demand_window_s: u64,
}

impl Default for VmPremadeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            budget_mb: 2048,
            max_per_runtime: 8,
            demand_window_s: 300,
        }
    }
}

impl VmPremadeConfig {
    pub fn validate(&self) -> Result<(), MicroVmConfigError> {
        use kiln_core::limits::MEMORY_MIN_MB;
        let bad = |m: String| Err(MicroVmConfigError::Premade(m));
        if self.enabled && self.budget_mb < MEMORY_MIN_MB {
            return bad(format!(
                "budget_mb {} holds no VM (the smallest has {MEMORY_MIN_MB} MiB): raise it or set enabled = false",
                self.budget_mb
            ));
        }
        if !(1..=64).contains(&self.max_per_runtime) {
            return bad(format!(
                "max_per_runtime must be between 1 and 64, got {}",
                self.max_per_runtime
            ));
        }
        if !(10..=86_400).contains(&self.demand_window_s) {
            return bad(format!(
                "demand_window_s must be between 10 and 86400, got {}",
                self.demand_window_s
            ));
        }
        Ok(())
    }

    /// The pool policy's limits.
    pub fn limits(&self) -> crate::pool_policy::Limits {
        crate::pool_policy::Limits {
            budget_mb: u64::from(self.budget_mb),
            max_per_key: self.max_per_runtime,
        }
    }
}

/// One size of `prewarm`: `{ runtime = "python3.10", memory_mb = 512 }`;
/// `cpu_milli` defaults to FC's share for the memory size, as a function
/// without its own CPU setting gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrewarmSize {
    pub runtime: kiln_core::RuntimeName,
    pub memory_mb: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_milli: Option<u32>,
}

impl PrewarmSize {
    /// The CPU an instance of this size gets.
    pub fn cpu_milli(&self) -> u32 {
        self.cpu_milli
            .unwrap_or_else(|| kiln_core::limits::default_cpu_milli(self.memory_mb))
    }
}

impl Default for MicroVmConfig {
    fn default() -> Self {
        Self {
            cloud_hypervisor_path: None,
            kernel: PathBuf::from("/var/cache/kiln/guest/vmlinuz"),
            initramfs: PathBuf::from("/var/cache/kiln/guest/initramfs.cpio.gz"),
            extra_cmdline: String::new(),
            name_prefix: "kvm".into(),
            instance_subnet: Ipv4Cidr {
                addr: std::net::Ipv4Addr::new(10, 214, 0, 0),
                prefix_len: 16,
            },
            cgroup_parent: "kiln-vm".into(),
            vmm_uid: None,
            vmm_gid: None,
            rootfs_dir: None,
            api_timeout_ms: 5_000,
            boot_timeout_ms: 20_000,
            pool_size: None,
            premade: VmPremadeConfig::default(),
            snapshots: false,
            vmm_overhead_mb: 64,
            prewarm: Vec::new(),
            jail: JailConfig::default(),
        }
    }
}

impl MicroVmConfig {
    pub fn validate(&self) -> Result<(), MicroVmConfigError> {
        let p = &self.name_prefix;
        let prefix_ok = (1..=8).contains(&p.len())
            && p.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            return Err(MicroVmConfigError::NamePrefix(p.clone()));
        }
        for (name, path) in [
            ("kernel", Some(&self.kernel)),
            ("initramfs", Some(&self.initramfs)),
            ("cloud_hypervisor_path", self.cloud_hypervisor_path.as_ref()),
            ("rootfs_dir", self.rootfs_dir.as_ref()),
        ] {
            if let Some(path) = path {
                if !path.is_absolute() {
                    return Err(MicroVmConfigError::NotAbsolute(name, path.clone()));
                }
            }
        }
        let cg = &self.cgroup_parent;
        let cg_ok = !cg.is_empty()
            && cg.len() <= 128
            && cg.split('/').all(|seg| {
                !seg.is_empty()
                    && seg != "."
                    && seg != ".."
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            });
        if !cg_ok {
            return Err(MicroVmConfigError::CgroupParent(cg.clone()));
        }
        if self.vmm_uid == Some(0) {
            return Err(MicroVmConfigError::RootUid);
        }
        let j = &self.jail;
        if j.enabled() {
            if self.vmm_uid.is_some() || self.vmm_gid.is_some() {
                return Err(MicroVmConfigError::UidWithJail);
            }
            let end = u64::from(j.uid_base) + u64::from(j.uid_count);
            if j.uid_base < 1000 || j.uid_count == 0 || end > u64::from(u32::MAX - 1) {
                return Err(MicroVmConfigError::UidRange(j.uid_base, j.uid_count));
            }
        }
        for (name, v, lo, hi) in [
            ("api_timeout_ms", self.api_timeout_ms, 100, 600_000),
            ("boot_timeout_ms", self.boot_timeout_ms, 100, 600_000),
            ("vmm_overhead_mb", u64::from(self.vmm_overhead_mb), 16, 4096),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(MicroVmConfigError::OutOfRange(name, lo, hi, v));
            }
        }
        use kiln_core::limits::{MEMORY_MAX_MB, MEMORY_MIN_MB, MEMORY_STEP_MB};
        if let Some(n) = self.pool_size.filter(|n| *n > 0) {
            return Err(MicroVmConfigError::PoolSize(n));
        }
        self.premade.validate()?;
        if !self.prewarm.is_empty() && !self.premade.enabled {
            return Err(MicroVmConfigError::Prewarm(
                0,
                "prewarm needs [sandbox.microvm.premade] enabled = true".into(),
            ));
        }
        if self.prewarm.len() > 16 {
            return Err(MicroVmConfigError::Prewarm(
                16,
                format!("at most 16 sizes, got {}", self.prewarm.len()),
            ));
        }
        for (i, p) in self.prewarm.iter().enumerate() {
            if !(MEMORY_MIN_MB..=MEMORY_MAX_MB).contains(&p.memory_mb)
                || p.memory_mb % MEMORY_STEP_MB != 0
            {
                return Err(MicroVmConfigError::Prewarm(
                    i,
                    format!(
                        "memory_mb must be a multiple of {MEMORY_STEP_MB} between {MEMORY_MIN_MB} and {MEMORY_MAX_MB}, got {}",
                        p.memory_mb
                    ),
                ));
            }
            if p.memory_mb > self.premade.budget_mb {
                return Err(MicroVmConfigError::Prewarm(
                    i,
                    format!(
                        "memory_mb {} does not fit premade.budget_mb {}",
                        p.memory_mb, self.premade.budget_mb
                    ),
                ));
            }
            if p.cpu_milli.is_some_and(|c| !(50..=16_000).contains(&c)) {
                return Err(MicroVmConfigError::Prewarm(
                    i,
                    format!(
                        "cpu_milli must be between 50 and 16000, got {}",
                        p.cpu_milli.unwrap_or(0)
                    ),
                ));
            }
        }
        if self.extra_cmdline.len() > 1024 || self.extra_cmdline.contains(['\n', '\0']) {
            return Err(MicroVmConfigError::OutOfRange(
                "extra_cmdline length",
                0,
                1024,
                self.extra_cmdline.len() as u64,
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_fields_refused() {
        MicroVmConfig::default().validate().unwrap();
        assert!(MicroVmConfig::default().jail.enabled(), "jailed by default");
        let c: MicroVmConfig =
            serde_json::from_str(r#"{"jail": {"uid_base": 300000, "uid_count": 64}}"#).unwrap();
        assert_eq!(c.jail.uid_range().of_slot(63), Some(300_063));
        assert!(!c.jail.insecure_disabled);
        assert!(serde_json::from_str::<MicroVmConfig>(r#"{"jail": {"insecure": true}}"#).is_err());
        // pool_size is refused with what to write instead; 0 (off) is
        // still accepted.
        let c: MicroVmConfig = serde_json::from_str(r#"{"pool_size": 2}"#).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e, MicroVmConfigError::PoolSize(2));
        assert!(e.to_string().contains("[sandbox.microvm.premade]"), "{e}");
        assert!(e.to_string().contains("max_per_runtime = 2"), "{e}");
        let c: MicroVmConfig = serde_json::from_str(r#"{"pool_size": 0}"#).unwrap();
        c.validate().unwrap();
        assert!(serde_json::from_str::<MicroVmConfig>(r#"{"pool": 2}"#).is_err());
        assert!(
            serde_json::from_str::<MicroVmConfig>(r#"{"premade": {"sandbox_mb": 2}}"#).is_err(),
            "a paused VM is charged its own size"
        );
        let c: MicroVmConfig = serde_json::from_str(
            r#"{"premade": {"enabled": true}, "prewarm": [{"runtime": "custom", "memory_mb": 512}]}"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.prewarm[0].cpu_milli(),
            kiln_core::limits::default_cpu_milli(512)
        );
        assert!(serde_json::from_str::<MicroVmConfig>(
            r#"{"prewarm": [{"runtime": "custom", "memory": 512}]}"#
        )
        .is_err());
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let bad = |f: fn(&mut MicroVmConfig)| {
            let mut c = MicroVmConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|c| c.name_prefix = "K".into()),
            MicroVmConfigError::NamePrefix(_)
        ));
        assert!(matches!(
            bad(|c| c.kernel = "vmlinuz".into()),
            MicroVmConfigError::NotAbsolute("kernel", _)
        ));
        assert!(matches!(
            bad(|c| {
                c.jail.insecure_disabled = true;
                c.vmm_uid = Some(0)
            }),
            MicroVmConfigError::RootUid
        ));
        let e = bad(|c| c.vmm_uid = Some(65534));
        assert!(matches!(e, MicroVmConfigError::UidWithJail));
        assert!(e.to_string().contains("microvm.jail.insecure_disabled"));
        assert!(matches!(
            bad(|c| c.jail.uid_base = 0),
            MicroVmConfigError::UidRange(0, _)
        ));
        assert!(matches!(
            bad(|c| c.jail.uid_base = u32::MAX - 10),
            MicroVmConfigError::UidRange(..)
        ));
        assert!(matches!(
            bad(|c| c.jail.uid_count = 0),
            MicroVmConfigError::UidRange(..)
        ));
        assert!(matches!(
            bad(|c| c.api_timeout_ms = 5),
            MicroVmConfigError::OutOfRange("api_timeout_ms", ..)
        ));
        assert!(matches!(
            bad(|c| c.pool_size = Some(1000)),
            MicroVmConfigError::PoolSize(1000)
        ));
        assert!(matches!(
            bad(|c| c.premade.max_per_runtime = 0),
            MicroVmConfigError::Premade(m) if m.contains("max_per_runtime")
        ));
        assert!(matches!(
            bad(|c| {
                c.premade.enabled = true;
                c.premade.budget_mb = 64;
            }),
            MicroVmConfigError::Premade(m) if m.contains("budget_mb")
        ));
        fn size(memory_mb: u32) -> PrewarmSize {
            PrewarmSize {
                runtime: kiln_core::RuntimeName::Custom,
                memory_mb,
                cpu_milli: None,
            }
        }
        assert!(matches!(
            bad(|c| c.prewarm = vec![size(512)]),
            MicroVmConfigError::Prewarm(0, m) if m.contains("enabled")
        ));
        assert!(matches!(
            bad(|c| {
                c.premade.enabled = true;
                c.prewarm = vec![size(512), size(100)];
            }),
            MicroVmConfigError::Prewarm(1, m) if m.contains("memory_mb")
        ));
        assert!(matches!(
            bad(|c| {
                c.premade.enabled = true;
                c.premade.budget_mb = 1024;
                c.prewarm = vec![size(2048)];
            }),
            MicroVmConfigError::Prewarm(0, m) if m.contains("budget_mb")
        ));
        assert!(matches!(
            bad(|c| c.cgroup_parent = "a/../b".into()),
            MicroVmConfigError::CgroupParent(_)
        ));
    }
}
