//! `[sandbox.microvm]` in the agent's configuration: where the VMM and the
//! guest image are, how VMs are named, addressed, confined and pooled.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Ipv4Cidr;

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
    #[error("microvm.vmm_uid must not be 0 (the VMM runs unprivileged); leave it out to keep the agent's user")]
    RootUid,
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
    /// Run each VMM as this uid/gid (the gid should give access to
    /// /dev/kvm); unset: the agent's own user.
    pub vmm_uid: Option<u32>,
    pub vmm_gid: Option<u32>,
    /// Where runtime root filesystems are found (as the container backend
    /// builds them); default `<state>/rootfs`.
    pub rootfs_dir: Option<PathBuf>,
    /// How long one API call may take.
    pub api_timeout_ms: u64,
    /// How long a booted (or restored) guest has to report ready.
    pub boot_timeout_ms: u64,
    /// Pre-booted, paused VMs kept per (runtime, memory size) the node has
    /// seen; 0 disables the pool.
    pub pool_size: usize,
    /// Boot one guest per (runtime, memory size), snapshot it, and fill the
    /// pool by restoring that snapshot instead of booting kernels.
    pub snapshots: bool,
    /// Memory the VMM itself may use above the guest's, in MiB (cgroup).
    pub vmm_overhead_mb: u32,
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
            pool_size: 0,
            snapshots: false,
            vmm_overhead_mb: 64,
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
        for (name, v, lo, hi) in [
            ("api_timeout_ms", self.api_timeout_ms, 100, 600_000),
            ("boot_timeout_ms", self.boot_timeout_ms, 100, 600_000),
            ("pool_size", self.pool_size as u64, 0, 64),
            ("vmm_overhead_mb", u64::from(self.vmm_overhead_mb), 16, 4096),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(MicroVmConfigError::OutOfRange(name, lo, hi, v));
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
        let c: MicroVmConfig = serde_json::from_str(r#"{"pool_size": 2}"#).unwrap();
        assert_eq!(c.pool_size, 2);
        assert!(serde_json::from_str::<MicroVmConfig>(r#"{"pool": 2}"#).is_err());
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
            bad(|c| c.vmm_uid = Some(0)),
            MicroVmConfigError::RootUid
        ));
        assert!(matches!(
            bad(|c| c.api_timeout_ms = 5),
            MicroVmConfigError::OutOfRange("api_timeout_ms", ..)
        ));
        assert!(matches!(
            bad(|c| c.pool_size = 1000),
            MicroVmConfigError::OutOfRange("pool_size", ..)
        ));
        assert!(matches!(
            bad(|c| c.cgroup_parent = "a/../b".into()),
            MicroVmConfigError::CgroupParent(_)
        ));
    }
}
