//! The `[sandbox]` section of the agent's configuration: how the container
//! backend names, addresses and confines its instances.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::net::Ipv4Cidr;

/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Why a container configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerConfigError {
    #[error("Invalid name_prefix {0:?}: use 1 to 8 lower-case letters or digits, starting with a letter")]
    NamePrefix(String),
    #[error("Invalid instance_subnet {0:?}: {1}")]
    Subnet(String, &'static str),
    #[error("Invalid cgroup_parent {0:?}: use letters, digits, '-', '_', '.' and '/' separated path segments")]
    CgroupParent(String),
    #[error("uid_base {0} is invalid: it must be above 0 and leave room for 65536 ids")]
    UidBase(u32),
    #[error("tmp_size_mb must be between 1 and 1048576, got {0}")]
    TmpSize(u32),
    #[error("cold_start_boost_ms must be at most 600000 (10 minutes), got {0}")]
    BoostWindow(u64),
    #[error("cold_start_cpu_milli must be between 50 and 64000, got {0}")]
    BoostCpu(u32),
    #[error("netns_pool must be at most 256, got {0}")]
    NetnsPool(usize),
    #[error("disk_pool must be at most 16, got {0}")]
    DiskPool(usize),
    #[error("oci_runtime_path must be absolute, got {0:?}")]
    RuntimePath(PathBuf),
    #[error("rootfs_dir must be absolute, got {0:?}")]
    RootfsDir(PathBuf),
    #[error("debootstrap_mirror must be an http:// or https:// URL, got {0:?}")]
    Mirror(String),
    #[error("Invalid [sandbox.network] section: {0}")]
    Network(#[from] crate::net::NetworkConfigError),
    #[error("Invalid [sandbox.premade] section: {0}")]
    Premade(#[from] crate::container::premade::PremadeConfigError),
    #[error("[sandbox.network] and sandbox.insecure_network_isolation_disabled = true contradict each other: remove the insecure setting")]
    IsolationBoth,
}

/// Which runc-compatible CLI runs the bundles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OciRuntimeKind {
    #[default]
    Runc,
    Crun,
}

impl OciRuntimeKind {
    pub fn binary_name(self) -> &'static str {
        match self {
            Self::Runc => "runc",
            Self::Crun => "crun",
        }
    }
}

/// Configuration of the container backend (`[sandbox]` in the agent's TOML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerConfig {
    pub oci_runtime: OciRuntimeKind,
    /// Absolute path of the runtime binary; default: `oci_runtime` on PATH.
    pub oci_runtime_path: Option<PathBuf>,
    /// Prefix of every netns, veth, runc container id and cgroup the driver
    /// creates; everything carrying it is the driver's to clean up.
    pub name_prefix: String,
    /// Carved into one /30 per instance (host side .1, instance .2).
    pub instance_subnet: Ipv4Cidr,
    /// Cgroup (relative to the hierarchy root) under which instances go.
    pub cgroup_parent: String,
    /// Host uid/gid that container root maps to (65536 ids from here).
    pub uid_base: u32,
    /// Where runtime root filesystems are built; default `<state>/rootfs`.
    pub rootfs_dir: Option<PathBuf>,
    pub tmp_size_mb: u32,
    /// Network namespaces kept ready so a cold start does not wait for one.
    pub netns_pool: usize,
    /// Writable-space images of the default size formatted ahead of time
    /// so a cold start only renames and mounts one; 0 turns this off.
    pub disk_pool: usize,
    /// Debian mirror for debootstrap; default: the host's apt source.
    pub debootstrap_mirror: Option<String>,
    /// How long a new instance runs with extra CPU (FC: up to 20 s of a
    /// cold start); 0 turns the boost off.
    pub cold_start_boost_ms: u64,
    /// The CPU quota (thousandths of a CPU) during the boost; instances
    /// with more CPU of their own keep theirs.
    pub cold_start_cpu_milli: u32,
    /// `[sandbox.network]`: per-instance egress isolation (FC's egress
    /// modes in an nftables table, VPC bridges, tc shaping). Required:
    /// the agent refuses to start without it unless
    /// `insecure_network_isolation_disabled` is set.
    pub network: Option<crate::net::NetworkConfig>,
    /// Run without `[sandbox.network]` on a dedicated development node:
    /// instances then reach whatever the host routes for them (the node's
    /// own ports, the private network, the metadata address). Only FC's
    /// default egress mode (internet) runs; functions asking for less
    /// (`internetAccess: false`, a VPC) are refused. Refused on
    /// multi-tenant nodes, logged at warn on every start.
    pub insecure_network_isolation_disabled: bool,
    /// `[sandbox.premade]`: containers made ahead of demand per runtime, so
    /// a cold start only hands one its function (off by default).
    pub premade: crate::container::premade::PremadeConfig,
}

impl Default for ContainerConfig {
    fn default() -> Self {
        Self {
            oci_runtime: OciRuntimeKind::Runc,
            oci_runtime_path: None,
            name_prefix: "kiln".into(),
            instance_subnet: Ipv4Cidr {
                addr: Ipv4Addr::new(10, 213, 0, 0),
                prefix_len: 16,
            },
            cgroup_parent: "kiln".into(),
            uid_base: 100_000,
            rootfs_dir: None,
            tmp_size_mb: 512,
            netns_pool: 4,
            disk_pool: crate::container::disk_pool::DEFAULT_DISK_POOL,
            debootstrap_mirror: None,
            cold_start_boost_ms: 20_000,
            cold_start_cpu_milli: 2_000,
            network: None,
            insecure_network_isolation_disabled: false,
            premade: Default::default(),
        }
    }
}

/// Hex digits needed to write every slot index of `subnet`.
#[cfg(test)]
fn slot_digits(subnet: &Ipv4Cidr) -> usize {
    format!("{:x}", subnet.slots() - 1).len()
}

impl ContainerConfig {
    pub fn validate(&self) -> Result<(), ContainerConfigError> {
        let p = &self.name_prefix;
        let prefix_ok = (1..=8).contains(&p.len())
            && p.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !prefix_ok {
            return Err(ContainerConfigError::NamePrefix(p.clone()));
        }
        // `<prefix>-<slot hex>` names both the netns and the host veth: at
        // most 8 + 1 + 6 (a /8 has 2^22 /30s) fits IFNAME_MAX.
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
            return Err(ContainerConfigError::CgroupParent(cg.clone()));
        }
        if self.uid_base == 0 || self.uid_base.checked_add(65_536).is_none() {
            return Err(ContainerConfigError::UidBase(self.uid_base));
        }
        if !(1..=1_048_576).contains(&self.tmp_size_mb) {
            return Err(ContainerConfigError::TmpSize(self.tmp_size_mb));
        }
        if self.cold_start_boost_ms > 600_000 {
            return Err(ContainerConfigError::BoostWindow(self.cold_start_boost_ms));
        }
        if !(50..=64_000).contains(&self.cold_start_cpu_milli) {
            return Err(ContainerConfigError::BoostCpu(self.cold_start_cpu_milli));
        }
        if self.netns_pool > 256 {
            return Err(ContainerConfigError::NetnsPool(self.netns_pool));
        }
        if self.disk_pool > 16 {
            return Err(ContainerConfigError::DiskPool(self.disk_pool));
        }
        if let Some(path) = &self.oci_runtime_path {
            if !path.is_absolute() {
                return Err(ContainerConfigError::RuntimePath(path.clone()));
            }
        }
        if let Some(path) = &self.rootfs_dir {
            if !path.is_absolute() {
                return Err(ContainerConfigError::RootfsDir(path.clone()));
            }
        }
        if let Some(m) = &self.debootstrap_mirror {
            let ok = (m.starts_with("http://") || m.starts_with("https://"))
                && !m
                    .bytes()
                    .any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
            if !ok {
                return Err(ContainerConfigError::Mirror(m.clone()));
            }
        }
        if let Some(network) = &self.network {
            network.validate()?;
        }
        self.premade.validate()?;
        if self.network.is_some() && self.insecure_network_isolation_disabled {
            return Err(ContainerConfigError::IsolationBoth);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ContainerConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_are_valid() {
        let c = ContainerConfig::default();
        c.validate().unwrap();
        assert_eq!(c.instance_subnet.slots(), 16_384);
        assert_eq!(slot_digits(&c.instance_subnet), 4);
        assert_eq!(parse("{}").unwrap(), c);
    }

    #[test]
    fn unknown_fields_and_bad_subnets_are_refused() {
        assert!(parse(r#"{"nmae_prefix":"x"}"#).is_err());
        assert!(parse(r#"{"instance_subnet":"10.0.0.1/16"}"#).is_err());
        assert!(parse(r#"{"instance_subnet":"10.0.0.0/30"}"#).is_err());
        assert!(parse(r#"{"instance_subnet":"10.0.0.0"}"#).is_err());
        assert!(parse(r#"{"oci_runtime":"docker"}"#).is_err());
        let c = parse(r#"{"oci_runtime":"crun","instance_subnet":"10.9.0.0/24"}"#).unwrap();
        assert_eq!(c.oci_runtime, OciRuntimeKind::Crun);
        assert_eq!(c.instance_subnet.slot_base(2), Ipv4Addr::new(10, 9, 0, 8));
    }

    #[test]
    fn the_network_section_is_optional_and_parsed() {
        assert_eq!(parse("{}").unwrap().network, None);
        let c = parse(
            r#"{"network":{"uplink_interface":"eth0","standard_bandwidth_mbit":100,
                "performance_bandwidth_mbit":500}}"#,
        )
        .unwrap();
        c.validate().unwrap();
        let n = c.network.unwrap();
        assert_eq!(n.uplink_interface.as_deref(), Some("eth0"));
        assert_eq!(
            (n.standard_bandwidth_mbit, n.performance_bandwidth_mbit),
            (100, 500)
        );
        assert!(parse(r#"{"network":{"uplink":"eth0"}}"#).is_err());
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let bad = |f: fn(&mut ContainerConfig)| {
            let mut c = ContainerConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(
            bad(|c| c.name_prefix = "Kiln".into()),
            ContainerConfigError::NamePrefix(_)
        ));
        assert!(matches!(
            bad(|c| c.name_prefix = "a-b".into()),
            ContainerConfigError::NamePrefix(_)
        ));
        assert!(matches!(
            bad(|c| c.name_prefix = "".into()),
            ContainerConfigError::NamePrefix(_)
        ));
        assert!(matches!(
            bad(|c| c.cgroup_parent = "../x".into()),
            ContainerConfigError::CgroupParent(_)
        ));
        assert!(matches!(
            bad(|c| c.uid_base = 0),
            ContainerConfigError::UidBase(0)
        ));
        assert!(matches!(
            bad(|c| c.tmp_size_mb = 0),
            ContainerConfigError::TmpSize(0)
        ));
        assert!(matches!(
            bad(|c| c.cold_start_boost_ms = 600_001),
            ContainerConfigError::BoostWindow(600_001)
        ));
        assert!(matches!(
            bad(|c| c.cold_start_cpu_milli = 10),
            ContainerConfigError::BoostCpu(10)
        ));
        assert!(matches!(
            bad(|c| c.netns_pool = 10_000),
            ContainerConfigError::NetnsPool(_)
        ));
        assert!(matches!(
            bad(|c| c.disk_pool = 17),
            ContainerConfigError::DiskPool(17)
        ));
        assert!(matches!(
            bad(|c| c.oci_runtime_path = Some("runc".into())),
            ContainerConfigError::RuntimePath(_)
        ));
        assert!(matches!(
            bad(|c| c.debootstrap_mirror = Some("ftp://x".into())),
            ContainerConfigError::Mirror(_)
        ));
        assert!(matches!(
            bad(|c| {
                c.network = Some(crate::net::NetworkConfig {
                    standard_bandwidth_mbit: 0,
                    ..Default::default()
                })
            }),
            ContainerConfigError::Network(crate::net::NetworkConfigError::Bandwidth(0))
        ));
        let ok = ContainerConfig {
            name_prefix: "abcdefgh".into(),
            instance_subnet: "10.0.0.0/8".parse().unwrap(),
            cgroup_parent: "kiln/dev.slice".into(),
            ..ContainerConfig::default()
        };
        let longest = crate::net::NetSlot::new(
            &ok.name_prefix,
            &ok.instance_subnet,
            ok.instance_subnet.slots() - 1,
        );
        assert_eq!(longest.name.len(), IFNAME_MAX);
        assert_eq!(slot_digits(&ok.instance_subnet), 6);
        ok.validate().unwrap();
    }
}
