//! Network isolation against the real kernel: nftables, tc, veths, Open
//! vSwitch (userspace datapath). Everything runs in namespaces this test
//! creates: the agent's side in an "agent" namespace, a fake internet host
//! behind its uplink, a fake VPC host on the VPC's OVS bridge (its link is
//! the VPC's `ports`, which the agent adds to the bridge it makes). Every name
//! carries a per-run prefix and is removed by a drop guard, also when the
//! test fails. No packet leaves the machine: the namespaces have no route
//! to the host's own network.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::{NetworkSpec, VpcAttachment};
use kiln_sandbox::net::NetPool;
use kiln_sandbox::net::{
    BandwidthClass, EgressMode, HostInterface, NetIsolation, NetworkConfig, SystemCommands,
};
use kiln_sandbox::net::{IpCommand, NetSlot};
use kiln_test_support::{skip, Category};

#[path = "support/netns.rs"]
mod netns;
use netns::{in_ns, missing_prerequisite, must, sh, Echo};

/// [`netns::probe`] from an IPv4 source.
fn probe(ns: &str, src: Option<Ipv4Addr>, to: SocketAddr, token: &str) -> bool {
    netns::probe(ns, src.map(Into::into), to, token)
}

const PORT: u16 = 7100;

fn skip_reason() -> Option<(Category, String)> {
    missing_prerequisite(&[
        "ip",
        "nft",
        "tc",
        "ovs-vsctl",
        "ovs-ofctl",
        "ethtool",
        "iperf3",
    ])
}

/// Make sure ovsdb-server and ovs-vswitchd run; returns ovs-vswitchd's pid.
fn ensure_ovs() -> String {
    kiln_test_support::ovs::ensure_ovs()
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string()
}

/// The per-run topology; dropping it removes every namespace, link and
/// bridge of the run.
struct Topology {
    prefix: String,
    agent: String,
    inet: String,
    vpch: String,
    children: Mutex<Vec<Child>>,
}

impl Topology {
    fn new(tag: char) -> Self {
        let nonce = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
        let prefix = format!("n{tag}{:04x}", nonce & 0xffff);
        let t = Self {
            agent: format!("{prefix}agent"),
            inet: format!("{prefix}inet"),
            vpch: format!("{prefix}vpch"),
            prefix,
            children: Mutex::new(Vec::new()),
        };
        for ns in [&t.agent, &t.inet, &t.vpch] {
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        // Uplink: agent `<p>up` 203.0.113.1 <-> internet host 203.0.113.2.
        let up = format!("{}up", t.prefix);
        must(&[
            "ip", "-n", &t.agent, "link", "add", &up, "type", "veth", "peer", "name", "eth0",
            "netns", &t.inet,
        ]);
        must(&[
            "ip",
            "-n",
            &t.agent,
            "addr",
            "add",
            "203.0.113.1/24",
            "dev",
            &up,
        ]);
        must(&["ip", "-n", &t.agent, "link", "set", &up, "up"]);
        must(&[
            "ip",
            "-n",
            &t.inet,
            "addr",
            "add",
            "203.0.113.2/24",
            "dev",
            "eth0",
        ]);
        must(&["ip", "-n", &t.inet, "link", "set", "eth0", "up"]);
        // VPC host: `<p>vh` (host side, later an OVS port) <-> 192.168.50.10.
        let vh = format!("{}vh", t.prefix);
        must(&[
            "ip", "link", "add", &vh, "type", "veth", "peer", "name", "eth0", "netns", &t.vpch,
        ]);
        must(&[
            "ip",
            "-n",
            &t.vpch,
            "addr",
            "add",
            "192.168.50.10/24",
            "dev",
            "eth0",
        ]);
        must(&["ip", "-n", &t.vpch, "link", "set", "eth0", "up"]);
        // A real VPC host's NIC finishes its checksums; a veth leaves them
        // to offload, which the userspace datapath does not do.
        must(&[
            "ip", "netns", "exec", &t.vpch, "ethtool", "-K", "eth0", "tx", "off",
        ]);
        must(&["ip", "link", "set", &vh, "up"]);
        t
    }

    fn config(&self, ovs_pid: &str, rate: u32) -> NetworkConfig {
        serde_json::from_value(serde_json::json!({
            "uplink_interface": format!("{}up", self.prefix),
            "standard_bandwidth_mbit": rate,
            "performance_bandwidth_mbit": rate * 5,
            "ovs_netns": ovs_pid,
            "vpcs": [{
                "id": "vpc-test",
                "cidr": "192.168.0.0/16",
                "vswitches": [{"id": "vsw-test", "cidr": "192.168.50.0/24",
                    "gateway": "192.168.50.1", "instance_pool": "192.168.50.128/25"}],
                "ports": [format!("{}vh", self.prefix)],
                "security_groups": [{"id": "sg-test",
                    "ingress": [{"protocol": "udp", "port_range": format!("{PORT}/{PORT}"), "cidr": "192.168.50.0/24"}]}]
            }]
        }))
        .unwrap()
    }

    fn spawn(&self, args: &[&str]) {
        let child = Command::new(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.lock().unwrap().push(child);
    }

    /// Names of everything of the run that exists: namespaces, links in
    /// the agent's namespace and the host's, OVS bridges.
    fn leftovers(&self, instance_prefix: &str) -> Vec<String> {
        let mut found = Vec::new();
        let netns = must(&["ip", "netns", "list"]);
        found.extend(
            netns
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| n.starts_with(&format!("{instance_prefix}-")))
                .map(str::to_owned),
        );
        for links in [
            must(&["ip", "-n", &self.agent, "-o", "link", "show"]),
            must(&["ip", "-o", "link", "show"]),
        ] {
            for l in links.lines() {
                let name = l
                    .split(": ")
                    .nth(1)
                    .unwrap_or("")
                    .split('@')
                    .next()
                    .unwrap_or("");
                if name.starts_with(instance_prefix)
                    && name != format!("{}up", self.prefix)
                    && name != format!("{}vh", self.prefix)
                {
                    found.push(name.to_owned());
                }
            }
        }
        found.extend(
            must(&["ovs-vsctl", "list-br"])
                .lines()
                .filter(|b| b.starts_with(instance_prefix))
                .map(str::to_owned),
        );
        found
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut c in self.children.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Ok(brs) = sh(&["ovs-vsctl", "list-br"]) {
            for br in brs.lines().filter(|b| b.starts_with(&self.prefix)) {
                let _ = sh(&["ovs-vsctl", "--if-exists", "del-br", br]);
            }
        }
        let _ = sh(&["ip", "link", "delete", &format!("{}vh", self.prefix)]);
        if let Ok(links) = sh(&["ip", "-o", "link", "show"]) {
            for l in links.lines() {
                let name = l
                    .split(": ")
                    .nth(1)
                    .unwrap_or("")
                    .split('@')
                    .next()
                    .unwrap_or("");
                if name.starts_with(&self.prefix) {
                    let _ = sh(&["ip", "link", "delete", name]);
                }
            }
        }
        if let Ok(list) = sh(&["ip", "netns", "list"]) {
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if ns.starts_with(&self.prefix) {
                    let _ = sh(&["ip", "netns", "delete", ns]);
                }
            }
        }
    }
}

fn vpc_attachment() -> VpcAttachment {
    VpcAttachment {
        vpc_id: "vpc-test".into(),
        vswitch_ids: vec!["vsw-test".into()],
        security_group_id: "sg-test".into(),
    }
}

fn spec_for(mode: EgressMode) -> Option<NetworkSpec> {
    match mode {
        EgressMode::Internet => None,
        EgressMode::Vpc => Some(NetworkSpec {
            internet_access: false,
            vpc: Some(vpc_attachment()),
        }),
        EgressMode::InternetAndVpc => Some(NetworkSpec {
            internet_access: true,
            vpc: Some(vpc_attachment()),
        }),
        EgressMode::None => Some(NetworkSpec {
            internet_access: false,
            vpc: None,
        }),
    }
}

type Row = BTreeMap<&'static str, bool>;

#[test]
fn egress_modes_reach_exactly_what_they_should_and_leave_nothing() {
    if let Some((category, why)) = skip_reason() {
        return skip(category, why);
    }
    let ovs_pid = ensure_ovs();
    let topo = Arc::new(Topology::new('e'));
    let ip = topo.prefix.clone();
    let config = topo.config(&ovs_pid, 1000);
    let agent = topo.agent.clone();
    let t2 = topo.clone();
    // Agent side: a pool of instance namespaces and the isolation, all in
    // the agent's namespace.
    let (slots, nets) = in_ns(&agent, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = NetPool::new(
                Arc::new(IpCommand::default()),
                &ip,
                "10.213.0.0/24".parse().unwrap(),
                0,
            );
            let iso = NetIsolation::start(&ip, config, Arc::new(SystemCommands))
                .await
                .unwrap();
            let modes = [
                EgressMode::Internet,
                EgressMode::Vpc,
                EgressMode::InternetAndVpc,
                EgressMode::None,
                EgressMode::Internet,
            ];
            let mut slots = Vec::new();
            let mut nets = Vec::new();
            for mode in modes {
                let slot = pool.take().await.unwrap();
                let net = iso
                    .attach(
                        &HostInterface::from(&slot),
                        spec_for(mode).as_ref(),
                        BandwidthClass::Standard,
                    )
                    .await
                    .unwrap();
                assert_eq!(net.egress, mode);
                slots.push(slot);
                nets.push(net);
            }
            // Keep the agent objects alive across the probes by parking
            // them in a global.
            AGENT.lock().unwrap().replace((pool, iso));
            let _ = &t2;
            (slots, nets)
        })
    });
    // The VPC host's port (the VPC's `ports`) joined the bridge the first
    // VPC instance made.
    assert_eq!(
        must(&["ovs-vsctl", "port-to-br", &format!("{}vh", topo.prefix)]).trim(),
        format!("{}v0", topo.prefix)
    );

    let internet = Echo::start(&topo.inet, Ipv4Addr::UNSPECIFIED.into(), PORT);
    let vpc = Echo::start(&topo.vpch, Ipv4Addr::UNSPECIFIED.into(), PORT);
    let node = Echo::start(&topo.agent, Ipv4Addr::UNSPECIFIED.into(), PORT);
    let instances: Vec<Echo> = slots
        .iter()
        .map(|s| Echo::start(&s.name, Ipv4Addr::UNSPECIFIED.into(), PORT))
        .collect();
    let other = &slots[4];
    let to = |a: Ipv4Addr| SocketAddr::new(a.into(), PORT);
    let mut table: BTreeMap<String, Row> = BTreeMap::new();
    let mut n = 0;
    let mut token = || {
        n += 1;
        format!("t{n}")
    };
    for (i, slot) in slots.iter().take(4).enumerate() {
        let mode = nets[i].egress;
        let ns = &slot.name;
        let mut row = Row::new();
        row.insert(
            "internet",
            probe(ns, None, to("203.0.113.2".parse().unwrap()), &token()),
        );
        row.insert(
            "vpc",
            probe(ns, None, to("192.168.50.10".parse().unwrap()), &token()),
        );
        row.insert(
            "other instance",
            probe(ns, None, to(other.instance_addr), &token()),
        );
        let (a, b) = (token(), token());
        row.insert(
            "node services",
            probe(ns, None, to(slot.host_addr), &a)
                || probe(ns, None, to("203.0.113.1".parse().unwrap()), &b)
                || node.saw(&a)
                || node.saw(&b),
        );
        // A spoofed source: another instance's address, set on the
        // instance's own interface.
        let spoof = other.instance_addr;
        must(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{spoof}/32"),
            "dev",
            "eth0",
        ]);
        let (a, b) = (token(), token());
        probe(ns, Some(spoof), to("203.0.113.2".parse().unwrap()), &a);
        probe(ns, Some(spoof), to("192.168.50.10".parse().unwrap()), &b);
        std::thread::sleep(Duration::from_millis(100));
        row.insert("spoofed source", internet.saw(&a) || vpc.saw(&b));
        must(&[
            "ip",
            "-n",
            ns,
            "addr",
            "del",
            &format!("{spoof}/32"),
            "dev",
            "eth0",
        ]);
        // Inbound: the VPC host to the instance's VPC address (its security
        // group allows UDP 7100), and the agent to the instance's port.
        row.insert(
            "from VPC",
            nets[i]
                .vpc_address
                .as_ref()
                .is_some_and(|(_, a)| probe(&topo.vpch, None, to(*a), &token())),
        );
        row.insert(
            "agent to instance",
            probe(&topo.agent, None, to(slot.instance_addr), &token()),
        );
        table.insert(format!("{mode:?}"), row);
    }
    // The VPC's host gets no more of the node than instances do: nothing
    // at the node's gateway address in the VPC or its uplink address, and
    // no routing through it to the internet (one-way: what the echo
    // servers received, so a missing way back hides nothing).
    must(&[
        "ip",
        "-n",
        &topo.vpch,
        "route",
        "add",
        "default",
        "via",
        "192.168.50.1",
    ]);
    let (a, b, c) = (token(), token(), token());
    probe(&topo.vpch, None, to("192.168.50.1".parse().unwrap()), &a);
    probe(&topo.vpch, None, to("203.0.113.1".parse().unwrap()), &b);
    probe(&topo.vpch, None, to("203.0.113.2".parse().unwrap()), &c);
    std::thread::sleep(Duration::from_millis(100));
    let vpc_host: Row = [
        ("node at its VPC address", node.saw(&a)),
        ("node at its uplink address", node.saw(&b)),
        ("internet through the node", internet.saw(&c)),
    ]
    .into_iter()
    .collect();
    let nothing: Row = vpc_host.keys().map(|k| (*k, false)).collect();
    assert_eq!(vpc_host, nothing);
    drop(instances);
    eprintln!("reachability (egress mode -> target -> got through):");
    for (mode, row) in &table {
        eprintln!("  {mode:<15} {row:?}");
    }
    let expect = |internet, vpc, from_vpc| -> Row {
        [
            ("internet", internet),
            ("vpc", vpc),
            ("other instance", false),
            ("node services", false),
            ("spoofed source", false),
            ("from VPC", from_vpc),
            ("agent to instance", true),
        ]
        .into_iter()
        .collect()
    };
    let want: BTreeMap<String, Row> = [
        ("Internet", expect(true, false, false)),
        ("Vpc", expect(false, true, true)),
        ("InternetAndVpc", expect(true, true, true)),
        ("None", expect(false, false, false)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(table, want);
    // The masquerade hid the instance's private address from the internet
    // host, and the VPC host saw the instance's VPC address: both echoed, so
    // replies found their way back through the NAT.

    // Release everything: no namespace, veth, ifb, rule or bridge is left.
    let ip = topo.prefix.clone();
    let rules_left = in_ns(&agent, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (pool, iso) = AGENT.lock().unwrap().take().unwrap();
            for slot in &slots {
                iso.detach(&slot.name).await.unwrap();
                pool.release(slot).await.unwrap();
            }
            let table = must(&["nft", "list", "table", "inet", &ip]);
            iso.shutdown().await.unwrap();
            let gone = sh(&["nft", "list", "table", "inet", &ip]).is_err();
            (table, gone)
        })
    });
    let (table_after_release, table_gone) = rules_left;
    for chain in ["chain e-", "chain i-", ": jump", ": 10.213"] {
        assert!(
            !table_after_release.contains(chain),
            "{chain} left in {table_after_release}"
        );
    }
    assert!(table_gone, "the table is removed at shutdown");
    assert_eq!(topo.leftovers(&topo.prefix), Vec::<String>::new());
}

static AGENT: Mutex<Option<(NetPool, NetIsolation)>> = Mutex::new(None);

fn iperf_rate(agent: &str, to: Ipv4Addr, reverse: bool) -> f64 {
    let addr = to.to_string();
    let mut args = vec![
        "ip", "netns", "exec", agent, "iperf3", "-c", &addr, "-p", "5201", "-t", "4", "-O", "1",
        "-J",
    ];
    if reverse {
        args.push("-R");
    }
    let out = must(&args);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e6
}

#[test]
fn bandwidth_is_capped_at_the_configured_rate() {
    if let Some((category, why)) = skip_reason() {
        return skip(category, why);
    }
    let topo = Topology::new('b');
    let ip = topo.prefix.clone();
    let config = topo.config("1", 100);
    let (slot, pool_iso): (NetSlot, _) = in_ns(&topo.agent, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = NetPool::new(
                Arc::new(IpCommand::default()),
                &ip,
                "10.213.0.0/24".parse().unwrap(),
                0,
            );
            let iso = NetIsolation::start(&ip, config, Arc::new(SystemCommands))
                .await
                .unwrap();
            let slot = pool.take().await.unwrap();
            let net = iso
                .attach(&HostInterface::from(&slot), None, BandwidthClass::Standard)
                .await
                .unwrap();
            assert_eq!(net.bandwidth_mbit, 100);
            (slot, (pool, iso))
        })
    });
    let mut rates = Vec::new();
    for reverse in [false, true] {
        topo.spawn(&[
            "ip", "netns", "exec", &slot.name, "iperf3", "-s", "-1", "-p", "5201",
        ]);
        std::thread::sleep(Duration::from_millis(300));
        let r = iperf_rate(&topo.agent, slot.instance_addr, reverse);
        eprintln!(
            "{}: {r:.1} Mbit/s (configured 100)",
            if reverse {
                "from the instance"
            } else {
                "to the instance"
            }
        );
        rates.push(r);
    }
    let (pool, iso) = pool_iso;
    let name = slot.name.clone();
    let agent = topo.agent.clone();
    in_ns(&agent, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            iso.detach(&name).await.unwrap();
            pool.release(&slot).await.unwrap();
            iso.shutdown().await.unwrap();
        })
    });
    // The cap holds (never more than 10% over); and the shaping is the
    // configured rate, not a broken one far below it. (Below it a loaded
    // machine can fall on its own: iperf3, the namespaces' forwarding and
    // the rest of the suite share two cores.)
    for r in rates {
        assert!(
            (50.0..=110.0).contains(&r),
            "{r} Mbit/s: the cap of 100 is not what the instance gets"
        );
    }
    assert_eq!(topo.leftovers(&topo.prefix), Vec::<String>::new());
}
