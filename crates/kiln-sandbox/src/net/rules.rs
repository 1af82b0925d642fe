//! The nftables scripts of the agent's table (fed to `nft -f -`). The base
//! table holds the hooks and the dispatch maps; every instance gets two
//! chains of its own (`e-<iface>` for what it sends, `i-<iface>` for what
//! is forwarded to it) and map elements pointing at them, so adding or
//! removing an instance touches only its own rules. Nothing outside the
//! table `inet <prefix>` is ever read or changed.
//!
//! "Internet" means the public internet: an instance with internet access
//! goes through the table's `allow` set (operator exceptions) and then its
//! `deny` set (private, CGNAT, link-local, loopback, multicast and the
//! operator's own entries) before anything leaves; its own VPC is matched
//! before either, by its security group. IPv4 only: every other protocol
//! family from an instance is dropped first.

use std::fmt::Write;
use std::net::Ipv4Addr;

use super::config::{Ipv4Net, SgProtocol, SgRule};
use super::names::Names;

/// What one instance may do, as the rules need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRules {
    pub iface: String,
    pub instance_addr: Ipv4Addr,
    pub internet: bool,
    pub vpc: Option<VpcRules>,
}

/// The VPC side of an instance: its gateway interface, the VPC's CIDR,
/// the instance's VPC address and its security group's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcRules {
    pub gateway_iface: String,
    pub vpc_cidr: String,
    pub vpc_addr: Ipv4Addr,
    pub ingress: Vec<SgRule>,
    pub egress: Vec<SgRule>,
}

fn set_elements(nets: &[Ipv4Net]) -> String {
    if nets.is_empty() {
        return String::new();
    }
    let list: Vec<String> = nets.iter().map(ToString::to_string).collect();
    format!("\n    elements = {{ {} }}", list.join(", "))
}

/// The base table. `uplink`: where internet traffic may leave; `deny` and
/// `allow`: what instances with internet access may not reach, and the
/// exceptions (overlaps are merged by nft).
/// `public_ports`: the node's internet-facing TCP ports, open to
/// instances with internet access (the `internet` set of interfaces).
pub fn base_table(
    names: &Names,
    uplink: Option<&str>,
    deny: &[Ipv4Net],
    allow: &[Ipv4Net],
    public_ports: &[u16],
) -> String {
    let t = names.table();
    let inst = names.instance_wildcard();
    let vpc = names.vpc_wildcard();
    let masq = match uplink {
        Some(u) => format!("iifname \"{inst}\" oifname \"{u}\" masquerade"),
        None => format!("iifname \"{inst}\" oifname != \"{inst}\" oifname != \"{vpc}\" masquerade"),
    };
    format!(
        "table inet {t} {{
  map egress {{ type ifname : verdict; }}
  map ingress {{ type ifname : verdict; }}
  map vpc_dnat {{ type ipv4_addr : ipv4_addr; }}
  map vpc_snat {{ type ipv4_addr : ipv4_addr; }}
  set deny {{
    type ipv4_addr; flags interval; auto-merge;{deny}
  }}
  set allow {{
    type ipv4_addr; flags interval; auto-merge;{allow}
  }}
  set internet {{ type ifname; }}
  set public_ports {{
    type inet_service;{ports}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"{inst}\" ct state established,related accept
    iifname @internet meta nfproto ipv4 meta l4proto tcp th dport @public_ports accept
    iifname \"{inst}\" drop
    iifname \"{vpc}\" ct state established,related accept
    iifname \"{vpc}\" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname vmap @egress
    iifname \"{inst}\" drop
    oifname vmap @ingress
    oifname \"{inst}\" drop
    iifname \"{vpc}\" drop
    oifname \"{vpc}\" drop
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    dnat ip to ip daddr map @vpc_dnat
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{vpc}\" snat ip to ip saddr map @vpc_snat
    {masq}
  }}
}}
",
        deny = set_elements(deny),
        allow = set_elements(allow),
        ports = if public_ports.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = public_ports.iter().map(ToString::to_string).collect();
            format!("\n    elements = {{ {} }}", list.join(", "))
        },
    )
}

fn match_rule(r: &SgRule, peer: &str) -> String {
    let mut m = format!("ip {peer} {}", r.cidr);
    match r.protocol {
        SgProtocol::Tcp | SgProtocol::Udp => {
            let p = if r.protocol == SgProtocol::Tcp {
                "tcp"
            } else {
                "udp"
            };
            let _ = write!(m, " meta l4proto {p}");
            // Validated with the configuration.
            if let Ok(Some((a, b))) = r.ports() {
                if a == b {
                    let _ = write!(m, " th dport {a}");
                } else {
                    let _ = write!(m, " th dport {a}-{b}");
                }
            }
        }
        SgProtocol::Icmp => m.push_str(" meta l4proto icmp"),
        SgProtocol::All => {}
    }
    m
}

/// Chains and map elements of one instance.
pub fn add_instance(names: &Names, r: &InstanceRules) -> String {
    let t = names.table();
    let inst = names.instance_wildcard();
    let vpc_wild = names.vpc_wildcard();
    let (e, i) = (names.egress_chain(&r.iface), names.ingress_chain(&r.iface));
    let ip = r.instance_addr;
    let mut s = String::new();
    let _ = writeln!(s, "add chain inet {t} {e}");
    let _ = writeln!(s, "add chain inet {t} {i}");
    // What it sends: IPv4 from its own address only, never to another
    // instance, to its VPC as its security group allows, to the public
    // internet when it has internet access; nothing else.
    let _ = writeln!(s, "add rule inet {t} {e} meta nfproto != ipv4 drop");
    let _ = writeln!(s, "add rule inet {t} {e} ip saddr != {ip} drop");
    let _ = writeln!(s, "add rule inet {t} {e} oifname \"{inst}\" drop");
    if let Some(v) = &r.vpc {
        let gw = &v.gateway_iface;
        let base = format!("oifname \"{gw}\" ip daddr {}", v.vpc_cidr);
        if v.egress.is_empty() {
            let _ = writeln!(s, "add rule inet {t} {e} {base} accept");
        }
        for rule in &v.egress {
            let _ = writeln!(
                s,
                "add rule inet {t} {e} {base} {} accept",
                match_rule(rule, "daddr")
            );
        }
    }
    let _ = writeln!(s, "add rule inet {t} {e} oifname \"{vpc_wild}\" drop");
    if r.internet {
        let _ = writeln!(s, "add rule inet {t} {e} ip daddr @allow accept");
        let _ = writeln!(s, "add rule inet {t} {e} ip daddr @deny drop");
        let _ = writeln!(s, "add rule inet {t} {e} accept");
    }
    let _ = writeln!(s, "add rule inet {t} {e} drop");
    // What is forwarded to it: replies, and from its VPC what its security
    // group's ingress rules allow.
    let _ = writeln!(
        s,
        "add rule inet {t} {i} ct state established,related accept"
    );
    if let Some(v) = &r.vpc {
        for rule in &v.ingress {
            let _ = writeln!(
                s,
                "add rule inet {t} {i} iifname \"{}\" ip daddr {ip} {} accept",
                v.gateway_iface,
                match_rule(rule, "saddr")
            );
        }
    }
    let _ = writeln!(s, "add rule inet {t} {i} drop");
    let _ = writeln!(
        s,
        "add element inet {t} egress {{ \"{}\" : jump {e} }}",
        r.iface
    );
    if r.internet {
        let _ = writeln!(s, "add element inet {t} internet {{ \"{}\" }}", r.iface);
    }
    let _ = writeln!(
        s,
        "add element inet {t} ingress {{ \"{}\" : jump {i} }}",
        r.iface
    );
    if let Some(v) = &r.vpc {
        let _ = writeln!(
            s,
            "add element inet {t} vpc_dnat {{ {} : {ip} }}",
            v.vpc_addr
        );
        let _ = writeln!(
            s,
            "add element inet {t} vpc_snat {{ {ip} : {} }}",
            v.vpc_addr
        );
    }
    s
}

/// Remove exactly what [`add_instance`] added.
pub fn delete_instance(names: &Names, r: &InstanceRules) -> String {
    let t = names.table();
    let (e, i) = (names.egress_chain(&r.iface), names.ingress_chain(&r.iface));
    let mut s = String::new();
    let _ = writeln!(s, "delete element inet {t} egress {{ \"{}\" }}", r.iface);
    let _ = writeln!(s, "delete element inet {t} ingress {{ \"{}\" }}", r.iface);
    if r.internet {
        let _ = writeln!(s, "delete element inet {t} internet {{ \"{}\" }}", r.iface);
    }
    if let Some(v) = &r.vpc {
        let _ = writeln!(s, "delete element inet {t} vpc_dnat {{ {} }}", v.vpc_addr);
        let _ = writeln!(
            s,
            "delete element inet {t} vpc_snat {{ {} }}",
            r.instance_addr
        );
    }
    for c in [&e, &i] {
        let _ = writeln!(s, "flush chain inet {t} {c}");
        let _ = writeln!(s, "delete chain inet {t} {c}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Names {
        Names::new("kt")
    }

    fn vpc_rules() -> InstanceRules {
        InstanceRules {
            iface: "kt-1f".into(),
            instance_addr: "10.77.0.126".parse().unwrap(),
            internet: false,
            vpc: Some(VpcRules {
                gateway_iface: "ktv0g".into(),
                vpc_cidr: "192.168.0.0/16".into(),
                vpc_addr: "192.168.50.129".parse().unwrap(),
                ingress: vec![SgRule {
                    protocol: SgProtocol::Tcp,
                    port_range: Some("8000/8100".into()),
                    cidr: "192.168.50.0/24".parse().unwrap(),
                }],
                egress: vec![],
            }),
        }
    }

    #[test]
    fn the_base_table_confines_instances_by_interface() {
        let s = base_table(&names(), Some("eth0"), &[], &[], &[]);
        assert!(s.starts_with("table inet kt {"));
        assert!(s.contains("set deny {\n    type ipv4_addr; flags interval; auto-merge;\n  }"));
        // Only replies from the node, and its public ports for instances
        // with internet access; nothing else.
        assert!(s.contains(
            "iifname \"kt-*\" ct state established,related accept\n    iifname @internet meta nfproto ipv4 meta l4proto tcp th dport @public_ports accept\n    iifname \"kt-*\" drop"
        ));
        assert!(s.contains("iifname \"kt-*\" oifname \"eth0\" masquerade"));
        assert!(s.contains("oifname \"ktv*\" snat ip to ip saddr map @vpc_snat"));
        // A VPC's hosts reach the node's ports through its gateway address
        // in the VPC as little as instances do...
        assert!(s.contains(
            "    iifname \"kt-*\" drop\n    iifname \"ktv*\" ct state established,related accept\n    iifname \"ktv*\" drop\n  }"
        ));
        // ...and the node routes nothing into or out of a VPC but its
        // instances' traffic (their chains decide first): not from one VPC
        // to another, nor between a VPC and the node's other networks.
        assert!(s.contains(
            "    oifname vmap @ingress\n    oifname \"kt-*\" drop\n    iifname \"ktv*\" drop\n    oifname \"ktv*\" drop\n  }"
        ));
        let s = base_table(&names(), None, &[], &[], &[]);
        assert!(s.contains("oifname != \"kt-*\" oifname != \"ktv*\" masquerade"));
    }

    #[test]
    fn the_base_table_holds_the_deny_and_allow_sets() {
        let config = crate::net::NetworkConfig {
            deny: vec!["203.0.113.0/24".parse().unwrap()],
            allow: vec!["10.0.0.53/32".parse().unwrap()],
            ..Default::default()
        };
        let s = base_table(&names(), None, &config.denied(), &config.allow, &[8443]);
        // The node's own ports: only its public ones, only for instances
        // with internet access, before the instances' drop.
        assert!(
            s.contains(
                "  set public_ports {\n    type inet_service;\n    elements = { 8443 }\n  }"
            ),
            "{s}"
        );
        assert!(s.contains("iifname @internet meta nfproto ipv4 meta l4proto tcp th dport @public_ports accept\n    iifname \"kt-*\" drop"), "{s}");
        assert!(
            s.contains(
                "set deny {\n    type ipv4_addr; flags interval; auto-merge;\n    elements = { 0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4, 203.0.113.0/24 }\n  }"
            ),
            "{s}"
        );
        assert!(s.contains("set allow {\n    type ipv4_addr; flags interval; auto-merge;\n    elements = { 10.0.0.53/32 }\n  }"), "{s}");
    }

    #[test]
    fn internet_means_the_public_internet_in_both_internet_modes() {
        let mut r = vpc_rules();
        for (internet, vpc) in [(true, false), (true, true), (false, true), (false, false)] {
            r.internet = internet;
            let mut r = r.clone();
            if !vpc {
                r.vpc = None;
            }
            let s = add_instance(&names(), &r);
            let pos = |needle: &str| s.find(needle);
            let (allow, deny, accept) = (
                pos("e-kt-1f ip daddr @allow accept\n"),
                pos("e-kt-1f ip daddr @deny drop\n"),
                pos("e-kt-1f accept\n"),
            );
            let public = pos("add element inet kt internet { \"kt-1f\" }");
            let undo = delete_instance(&names(), &r);
            let unpublic = undo.contains("delete element inet kt internet { \"kt-1f\" }");
            if !internet {
                assert_eq!(
                    (allow, deny, accept, public),
                    (None, None, None, None),
                    "{s}"
                );
                assert!(!unpublic, "{undo}");
                continue;
            }
            assert!(public.is_some() && unpublic, "{s}\n{undo}");
            let (allow, deny, accept) = (allow.unwrap(), deny.unwrap(), accept.unwrap());
            // Exceptions, then the deny list, then the internet.
            assert!(allow < deny && deny < accept, "{s}");
            // Non-IPv4 is dropped before anything is accepted.
            assert!(pos("meta nfproto != ipv4 drop").unwrap() < allow);
            if vpc {
                // Its own VPC (private addresses) is reached by its
                // security group before the deny list applies.
                assert!(pos("oifname \"ktv0g\" ip daddr 192.168.0.0/16 accept").unwrap() < deny);
                // Other VPCs' gateways never.
                assert!(pos("oifname \"ktv*\" drop").unwrap() < allow);
            }
        }
    }

    #[test]
    fn instance_rules_follow_the_egress_mode() {
        let mut r = vpc_rules();
        let s = add_instance(&names(), &r);
        assert!(s.contains("add rule inet kt e-kt-1f ip saddr != 10.77.0.126 drop\n"));
        assert!(s.contains(
            "add rule inet kt e-kt-1f oifname \"ktv0g\" ip daddr 192.168.0.0/16 accept\n"
        ));
        assert!(s.contains("add rule inet kt i-kt-1f iifname \"ktv0g\" ip daddr 10.77.0.126 ip saddr 192.168.50.0/24 meta l4proto tcp th dport 8000-8100 accept\n"));
        assert!(s.contains("vpc_dnat { 192.168.50.129 : 10.77.0.126 }"));
        assert!(!s.contains("e-kt-1f accept\n"), "no internet: {s}");
        r.internet = true;
        r.vpc = None;
        let s = add_instance(&names(), &r);
        assert!(s.contains("add rule inet kt e-kt-1f accept\n"));
        assert!(s.contains("add rule inet kt e-kt-1f ip daddr @deny drop\n"));
        assert!(!s.contains("vpc_"));
        // The anti-spoof and inter-instance drops come before any accept.
        let spoof = s.find("ip saddr !=").unwrap();
        let inter = s.find("oifname \"kt-*\" drop").unwrap();
        let accept = s.find("e-kt-1f accept").unwrap();
        assert!(spoof < accept && inter < accept);
    }

    #[test]
    fn delete_removes_exactly_what_add_added() {
        let r = vpc_rules();
        let s = delete_instance(&names(), &r);
        for needle in [
            "delete element inet kt egress { \"kt-1f\" }",
            "delete element inet kt vpc_dnat { 192.168.50.129 }",
            "delete element inet kt vpc_snat { 10.77.0.126 }",
            "delete chain inet kt e-kt-1f",
            "delete chain inet kt i-kt-1f",
        ] {
            assert!(s.contains(needle), "{needle} in {s}");
        }
        assert!(!s.contains("table inet kt\n"), "never the whole table");
    }
}
