//! The `[network]` section of the agent's configuration: uplink, bandwidth
//! and the VPCs this node can attach instances to (Kiln's stand-in for the
//! VPC control plane: each VPC's vSwitch CIDRs and security groups).

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a network configuration cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkConfigError {
    #[error("Invalid uplink_interface {0:?}: use 1 to 15 letters, digits, '-', '_' or '.'")]
    Uplink(String),
    #[error("Bandwidth must be between 1 and 100000 Mbit/s, got {0}")]
    Bandwidth(u32),
    #[error("performance_bandwidth_mbit ({perf}) is below standard_bandwidth_mbit ({standard})")]
    BandwidthOrder { standard: u32, perf: u32 },
    #[error("Invalid VPC: {0}")]
    Vpc(String),
    #[error("ovs_netns must be a namespace name or a pid, got {0:?}")]
    OvsNetns(String),
    #[error("Invalid {0} list: {1}")]
    Filter(&'static str, String),
}

/// What an instance with internet access may never reach, whatever the
/// operator configures: "internet mode is the internet". Private
/// (RFC 1918), CGNAT (100.64/10), link-local (169.254/16: the cloud
/// metadata address), loopback, "this network" (0/8), multicast and the
/// reserved range up to the limited broadcast address. The function's
/// own VPC is reached before this list applies (by its security group),
/// and `allow` names exceptions.
pub const ALWAYS_DENIED: [&str; 9] = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The most entries `deny` and `allow` may each hold.
pub const FILTER_MAX: usize = 1024;

/// The shortest prefix an `allow` entry may have: exceptions are for
/// specific hosts or networks (a DNS resolver), not for undoing the list.
pub const ALLOW_MIN_PREFIX: u8 = 8;

/// An IPv4 network (`192.168.0.0/16`, `0.0.0.0/0`, `10.0.0.5/32`), host
/// bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Net {
    fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr)
    }

    /// Whether `other` lies entirely inside this network.
    pub fn covers(&self, other: &Ipv4Net) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.addr)
    }

    /// Usable host addresses (without network and broadcast for < /31).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.addr);
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        let (first, last) = if size <= 2 {
            (base as u64, base as u64 + size - 1)
        } else {
            (base as u64 + 1, base as u64 + size - 2)
        };
        (first..=last).map(|a| Ipv4Addr::from(a as u32))
    }
}

impl FromStr for Ipv4Net {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, &'static str> {
        let (addr, len) = s.split_once('/').ok_or("expected ADDRESS/PREFIX")?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| "not an IPv4 address")?;
        let prefix_len: u8 = len.parse().map_err(|_| "prefix is not a number")?;
        if prefix_len > 32 {
            return Err("prefix length must be at most 32");
        }
        let net = Self { addr, prefix_len };
        if u32::from(addr) & !net.mask() != 0 {
            return Err("host bits must be zero");
        }
        Ok(net)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Ipv4Net {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("invalid network {s:?}: {e}")))
    }
}

/// A security-group rule's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SgProtocol {
    Tcp,
    Udp,
    Icmp,
    All,
}

/// One allow rule of a security group, in the style of a VPC's: protocol,
/// an optional port range (`"80/80"`, `"1/65535"`; TCP and UDP only) and
/// the peer network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SgRule {
    pub protocol: SgProtocol,
    #[serde(default)]
    pub port_range: Option<String>,
    pub cidr: Ipv4Net,
}

impl SgRule {
    /// The port range as (first, last), validated.
    pub fn ports(&self) -> Result<Option<(u16, u16)>, String> {
        let Some(r) = &self.port_range else {
            return Ok(None);
        };
        if !matches!(self.protocol, SgProtocol::Tcp | SgProtocol::Udp) {
            return Err(format!("port_range {r:?} needs protocol tcp or udp"));
        }
        let (a, b) = r
            .split_once('/')
            .ok_or_else(|| format!("port_range {r:?} must be FIRST/LAST"))?;
        let a: u16 = a.parse().map_err(|_| format!("bad port in {r:?}"))?;
        let b: u16 = b.parse().map_err(|_| format!("bad port in {r:?}"))?;
        if a == 0 || a > b {
            return Err(format!(
                "port_range {r:?} must be 1..=65535 with FIRST <= LAST"
            ));
        }
        Ok(Some((a, b)))
    }
}

/// A security group: what may reach an attached instance from the VPC
/// (`ingress`) and what it may reach in the VPC (`egress`; empty means the
/// whole VPC, as a VPC's default group allows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityGroupDef {
    pub id: String,
    #[serde(default)]
    pub ingress: Vec<SgRule>,
    #[serde(default)]
    pub egress: Vec<SgRule>,
}

/// A vSwitch of a VPC as seen from this node: its CIDR, the node's own
/// address on it (the instances' next hop into the VPC) and the range this
/// node hands instance addresses out of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VSwitchDef {
    pub id: String,
    pub cidr: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub instance_pool: Ipv4Net,
}

/// A VPC this node can attach instances to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VpcDef {
    pub id: String,
    pub cidr: Ipv4Net,
    pub vswitches: Vec<VSwitchDef>,
    #[serde(default)]
    pub security_groups: Vec<SecurityGroupDef>,
    /// The accounts whose functions may attach to this VPC; the agent
    /// refuses any other account's instance (none when empty).
    #[serde(default)]
    pub owners: Vec<kiln_core::AccountId>,
    /// Interfaces in ovs-vswitchd's namespace that lead to the VPC's
    /// network (a NIC or VLAN interface on the VPC's uplink, a tunnel
    /// port): the agent adds them to the VPC's bridge whenever it makes
    /// it, so that attached instances reach the VPC's hosts. Without
    /// one, instances reach only what else the operator puts on the
    /// bridge.
    #[serde(default)]
    pub ports: Vec<String>,
}

/// `[network]`: per-instance isolation of the agent's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// Interface internet traffic leaves by (masqueraded); default: any
    /// interface that is neither an instance's nor a VPC's.
    pub uplink_interface: Option<String>,
    /// Per-instance rate, each direction, for standard instances.
    pub standard_bandwidth_mbit: u32,
    /// Per-instance rate, each direction, for performance instances.
    pub performance_bandwidth_mbit: u32,
    /// The network namespace (a name under /run/netns or a pid) that
    /// ovs-vswitchd runs in, when the agent runs in another one.
    pub ovs_netns: Option<String>,
    pub vpcs: Vec<VpcDef>,
    /// Networks instances with internet access may not reach, on top of
    /// [`ALWAYS_DENIED`]: other cluster hosts' public addresses (their
    /// control ports), the provider's internal services.
    pub deny: Vec<Ipv4Net>,
    /// Exceptions to the deny lists for instances with internet access
    /// (a DNS resolver in a private range). Checked first.
    pub allow: Vec<Ipv4Net>,
    /// TCP ports of this node's internet-facing services (the public
    /// gateway of a `kiln dev` node) that instances with internet access
    /// may reach on the node's addresses, as anyone on the internet may.
    /// Every other port of the node stays closed to every instance.
    pub public_ports: Vec<u16>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        Self {
            uplink_interface: None,
            standard_bandwidth_mbit: 1000,
            performance_bandwidth_mbit: 5000,
            ovs_netns: None,
            vpcs: Vec::new(),
            deny: Vec::new(),
            allow: Vec::new(),
            public_ports: Vec::new(),
        }
    }
}

/// A Linux interface name: 1 to 15 letters, digits, '-', '_' or '.'.
fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl NetworkConfig {
    pub fn validate(&self) -> Result<(), NetworkConfigError> {
        if let Some(u) = &self.uplink_interface {
            if !valid_ifname(u) {
                return Err(NetworkConfigError::Uplink(u.clone()));
            }
        }
        for rate in [
            self.standard_bandwidth_mbit,
            self.performance_bandwidth_mbit,
        ] {
            if !(1..=100_000).contains(&rate) {
                return Err(NetworkConfigError::Bandwidth(rate));
            }
        }
        if self.performance_bandwidth_mbit < self.standard_bandwidth_mbit {
            return Err(NetworkConfigError::BandwidthOrder {
                standard: self.standard_bandwidth_mbit,
                perf: self.performance_bandwidth_mbit,
            });
        }
        if let Some(ns) = &self.ovs_netns {
            let ok = !ns.is_empty()
                && ns.len() <= 64
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(NetworkConfigError::OvsNetns(ns.clone()));
            }
        }
        for (name, list) in [("deny", &self.deny), ("allow", &self.allow)] {
            if list.len() > FILTER_MAX {
                return Err(NetworkConfigError::Filter(
                    name,
                    format!("at most {FILTER_MAX} networks, got {}", list.len()),
                ));
            }
        }
        if self.public_ports.len() > 64 || self.public_ports.contains(&0) {
            return Err(NetworkConfigError::Filter(
                "public_ports",
                "at most 64 ports, each 1 to 65535".into(),
            ));
        }
        if let Some(wide) = self.allow.iter().find(|n| n.prefix_len < ALLOW_MIN_PREFIX) {
            return Err(NetworkConfigError::Filter(
                "allow",
                format!(
                    "{wide} is wider than /{ALLOW_MIN_PREFIX}: allow names specific exceptions (a DNS resolver); an instance that needs a private network belongs in a VPC"
                ),
            ));
        }
        if self.vpcs.len() > 100 {
            return Err(NetworkConfigError::Vpc("at most 100 VPCs per node".into()));
        }
        let bad = |m: String| Err(NetworkConfigError::Vpc(m));
        let mut vpc_ids = std::collections::BTreeSet::new();
        let mut vsw_ids = std::collections::BTreeSet::new();
        let mut ports = std::collections::BTreeSet::new();
        for v in &self.vpcs {
            if !valid_id(&v.id) || !vpc_ids.insert(&v.id) {
                return bad(format!("VPC id {:?} is invalid or repeated", v.id));
            }
            for p in &v.ports {
                if !valid_ifname(p) || !ports.insert(p) {
                    return bad(format!(
                        "VPC {}: port {p:?} is not an interface name (1 to 15 letters, digits, '-', '_' or '.') or belongs to another VPC too",
                        v.id
                    ));
                }
                if self.uplink_interface.as_deref() == Some(p.as_str()) {
                    return bad(format!(
                        "VPC {}: port {p} is the uplink_interface; a VPC's network needs an interface of its own",
                        v.id
                    ));
                }
            }
            if v.vswitches.is_empty() {
                return bad(format!("VPC {} has no vswitches", v.id));
            }
            for s in &v.vswitches {
                if !valid_id(&s.id) || !vsw_ids.insert(&s.id) {
                    return bad(format!("vSwitch id {:?} is invalid or repeated", s.id));
                }
                if !v.cidr.covers(&s.cidr) {
                    return bad(format!(
                        "vSwitch {} ({}) is outside VPC {} ({})",
                        s.id, s.cidr, v.id, v.cidr
                    ));
                }
                if !s.cidr.covers(&s.instance_pool) || s.cidr.prefix_len > 30 {
                    return bad(format!(
                        "vSwitch {}: instance_pool {} must lie inside {} (at most /30)",
                        s.id, s.instance_pool, s.cidr
                    ));
                }
                if !s.cidr.hosts().any(|h| h == s.gateway) || s.instance_pool.contains(s.gateway) {
                    return bad(format!(
                        "vSwitch {}: gateway {} must be a host of {} outside instance_pool",
                        s.id, s.gateway, s.cidr
                    ));
                }
            }
            let mut sg_ids = std::collections::BTreeSet::new();
            for g in &v.security_groups {
                if !valid_id(&g.id) || !sg_ids.insert(&g.id) {
                    return bad(format!(
                        "security group id {:?} is invalid or repeated",
                        g.id
                    ));
                }
                for r in g.ingress.iter().chain(&g.egress) {
                    r.ports().map_err(|m| {
                        NetworkConfigError::Vpc(format!("security group {}: {m}", g.id))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Every network internet-mode instances may not reach:
    /// [`ALWAYS_DENIED`] and then `deny`.
    pub fn denied(&self) -> Vec<Ipv4Net> {
        let mut all: Vec<Ipv4Net> = ALWAYS_DENIED
            .iter()
            .map(|n| n.parse().expect("a valid built-in network"))
            .collect();
        all.extend(self.deny.iter().copied());
        all
    }

    pub fn vpc(&self, id: &str) -> Option<(usize, &VpcDef)> {
        self.vpcs.iter().enumerate().find(|(_, v)| v.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> NetworkConfig {
        serde_json::from_value(serde_json::json!({
            "uplink_interface": "eth0",
            "vpcs": [{
                "id": "vpc-a",
                "cidr": "192.168.0.0/16",
                "vswitches": [{"id": "vsw-a", "cidr": "192.168.50.0/24",
                    "gateway": "192.168.50.1", "instance_pool": "192.168.50.128/25"}],
                "security_groups": [{"id": "sg-a",
                    "ingress": [{"protocol": "tcp", "port_range": "8000/8100", "cidr": "192.168.50.0/24"}],
                    "egress": []}]
            }]
        }))
        .unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let n: Ipv4Net = "192.168.50.128/25".parse().unwrap();
        assert!(n.contains("192.168.50.200".parse().unwrap()));
        assert!(!n.contains("192.168.50.1".parse().unwrap()));
        assert_eq!(n.hosts().next(), Some("192.168.50.129".parse().unwrap()));
        assert_eq!(n.hosts().count(), 126);
        let all: Ipv4Net = "0.0.0.0/0".parse().unwrap();
        assert!(all.covers(&n));
        assert_eq!("10.0.0.5/32".parse::<Ipv4Net>().unwrap().hosts().count(), 1);
        assert!("10.0.0.1/24".parse::<Ipv4Net>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Net>().is_err());
    }

    #[test]
    fn defaults_and_sample_are_valid() {
        NetworkConfig::default().validate().unwrap();
        let c = sample();
        c.validate().unwrap();
        assert_eq!(c.standard_bandwidth_mbit, 1000);
        assert_eq!(c.performance_bandwidth_mbit, 5000);
        assert_eq!(c.vpc("vpc-a").unwrap().0, 0);
        assert!(serde_json::from_str::<NetworkConfig>(r#"{"vpc":[]}"#).is_err());
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let bad = |f: fn(&mut NetworkConfig)| {
            let mut c = sample();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(|c| c.uplink_interface = Some("a b".into())).contains("uplink"));
        assert!(bad(|c| c.standard_bandwidth_mbit = 0).contains("Bandwidth"));
        assert!(bad(|c| c.performance_bandwidth_mbit = 10).contains("below"));
        assert!(
            bad(|c| c.vpcs[0].vswitches[0].cidr = "10.0.0.0/24".parse().unwrap())
                .contains("outside VPC")
        );
        assert!(
            bad(|c| c.vpcs[0].vswitches[0].gateway = "192.168.50.130".parse().unwrap())
                .contains("gateway")
        );
        assert!(
            bad(|c| c.vpcs[0].security_groups[0].ingress[0].port_range = Some("9/1".into()))
                .contains("port_range")
        );
        assert!(bad(|c| c.vpcs.push(c.vpcs[0].clone())).contains("repeated"));
        assert!(bad(|c| c.vpcs[0].ports = vec!["a b".into()]).contains("port"));
        assert!(
            bad(|c| c.vpcs[0].ports = vec!["eth1".into(), "eth1".into()]).contains("another VPC")
        );
        assert!(bad(|c| c.vpcs[0].ports = vec!["eth0".into()]).contains("uplink_interface"));
        assert!(bad(|c| c.ovs_netns = Some("../x".into())).contains("ovs_netns"));
        assert!(bad(|c| c.allow = vec!["0.0.0.0/0".parse().unwrap()]).contains("allow"));
        assert!(bad(|c| c.public_ports = vec![0]).contains("public_ports"));
        assert!(bad(|c| c.allow = vec!["8.0.0.0/7".parse().unwrap()]).contains("wider than /8"));
        assert!(
            bad(|c| c.deny = vec!["203.0.113.7/32".parse().unwrap(); FILTER_MAX + 1])
                .contains("at most")
        );
    }

    #[test]
    fn deny_and_allow_parse_as_networks() {
        let c: NetworkConfig = serde_json::from_value(serde_json::json!({
            "deny": ["203.0.113.7/32"], "allow": ["10.0.0.53/32"]
        }))
        .unwrap();
        c.validate().unwrap();
        let denied = c.denied();
        assert_eq!(denied.len(), ALWAYS_DENIED.len() + 1);
        for ip in [
            "10.1.2.3",
            "172.31.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "127.0.0.1",
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "203.0.113.7",
        ] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(denied.iter().any(|n| n.contains(ip)), "{ip} is denied");
        }
        for ip in ["198.51.100.2", "8.8.8.8", "100.128.0.1", "172.32.0.1"] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            assert!(!denied.iter().any(|n| n.contains(ip)), "{ip} is not denied");
        }
        // Bad networks are refused when the file is read.
        let e =
            serde_json::from_value::<NetworkConfig>(serde_json::json!({"deny": ["10.0.0.1/8"]}))
                .unwrap_err()
                .to_string();
        assert!(e.contains("host bits"), "{e}");
    }
}
