//! The instance subnet and the /30 each instance gets of it, with the
//! names derived from the slot's index.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An IPv4 network in CIDR notation (`10.213.0.0/16`), host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Ipv4Cidr {
    /// How many /30 networks fit.
    pub fn slots(&self) -> u32 {
        1u32 << (30 - u32::from(self.prefix_len))
    }

    /// The network address of the `index`th /30.
    pub fn slot_base(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) + index * 4)
    }
}

impl FromStr for Ipv4Cidr {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, &'static str> {
        let (addr, len) = s.split_once('/').ok_or("expected ADDRESS/PREFIX")?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| "not an IPv4 address")?;
        let prefix_len: u8 = len.parse().map_err(|_| "prefix is not a number")?;
        if !(8..=28).contains(&prefix_len) {
            return Err("prefix length must be between 8 and 28");
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(addr) & !mask != 0 {
            return Err("host bits must be zero");
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl Serialize for Ipv4Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| serde::de::Error::custom(format!("invalid instance_subnet {s:?}: {e}")))
    }
}

/// One /30 of the instance subnet with the names derived from its index:
/// the netns and the host-side veth are both `<prefix>-<index hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetSlot {
    pub index: u32,
    pub name: String,
    pub host_addr: Ipv4Addr,
    pub instance_addr: Ipv4Addr,
}

impl NetSlot {
    pub fn new(prefix: &str, subnet: &Ipv4Cidr, index: u32) -> Self {
        let base = u32::from(subnet.slot_base(index));
        Self {
            index,
            name: format!("{prefix}-{index:x}"),
            host_addr: Ipv4Addr::from(base + 1),
            instance_addr: Ipv4Addr::from(base + 2),
        }
    }

    /// Where `ip netns add` binds the namespace.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.name)
    }
}

/// Where `ip netns add` binds the namespace `name`.
pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Whether `name` is one of the names a driver with `prefix` creates.
pub fn is_own_name(prefix: &str, name: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn slots_carve_the_subnet_into_30s() {
        let subnet: Ipv4Cidr = "10.213.0.0/16".parse().unwrap();
        let s = NetSlot::new("kiln", &subnet, 0);
        assert_eq!(s.name, "kiln-0");
        assert_eq!(s.host_addr, Ipv4Addr::new(10, 213, 0, 1));
        assert_eq!(s.instance_addr, Ipv4Addr::new(10, 213, 0, 2));
        let s = NetSlot::new("kiln", &subnet, 0x3fff);
        assert_eq!(s.name, "kiln-3fff");
        assert_eq!(s.instance_addr, Ipv4Addr::new(10, 213, 255, 254));
        assert_eq!(s.netns_path(), PathBuf::from("/run/netns/kiln-3fff"));
    }

    #[test]
    fn own_names_are_exactly_prefix_dash_hex() {
        assert!(is_own_name("kt", "kt-1f"));
        assert!(!is_own_name("kt", "kt-"));
        assert!(!is_own_name("kt", "ktab-1"));
        assert!(!is_own_name("kt", "kt-1g"));
        assert!(!is_own_name("kt", "eth0"));
    }
}
