//! "Internet mode is the internet", against the real kernel: the agent's
//! table loaded with real `nft`, instances in network namespaces, and an
//! "uplink" namespace that holds every address an instance might try:
//! a public-looking host, the cloud metadata address, private (RFC 1918)
//! and CGNAT addresses, an operator-denied public host (another cluster
//! host) and an operator-allowed private one (a DNS resolver), over IPv4
//! and IPv6. All of it exists only in namespaces this test creates, so no
//! probe can leave the machine even when a rule under test is broken. No
//! Open vSwitch needed (no VPC here: see net_isolation.rs). Every name
//! carries a per-run prefix and goes when the test ends, also on failure.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::NetworkSpec;
use kiln_sandbox::net::{
    BandwidthClass, EgressMode, HostInterface, IpCommand, NetIsolation, NetPool, NetSlot,
    NetworkConfig, SystemCommands,
};
use kiln_test_support::{skip, Category};

#[path = "support/netns.rs"]
mod netns;
use netns::{enter, in_ns, missing_prerequisite, must, sh, Echo};

/// UDP echo port on every listener; the node's public TCP port.
const PORT: u16 = 7200;
const PUBLIC_PORT: u16 = 7443;

const NODE_UPLINK: &str = "198.51.100.1";
const PUBLIC: &str = "198.51.100.2";
const DENIED_PUBLIC: &str = "198.51.100.3";
const METADATA: &str = "169.254.169.254";
const PRIVATE_10: &str = "10.66.0.1";
const PRIVATE_172: &str = "172.16.0.1";
const PRIVATE_192: &str = "192.168.77.1";
const CGNAT: &str = "100.64.0.1";
const RESOLVER: &str = "10.66.0.53";
const PUBLIC6: &str = "2001:db8:1::2";

fn skip_reason() -> Option<(Category, String)> {
    missing_prerequisite(&["ip", "nft", "tc", "sysctl"])
}

/// The agent's namespace and its uplink; dropping it removes every
/// namespace of the run (and with them every link and table in them).
struct Topology {
    prefix: String,
    agent: String,
    uplink: String,
}

impl Topology {
    fn new() -> Self {
        let nonce = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
        let prefix = format!("ni{:04x}", nonce & 0xffff);
        let t = Self {
            agent: format!("{prefix}agent"),
            uplink: format!("{prefix}upl"),
            prefix,
        };
        for ns in [&t.agent, &t.uplink] {
            must(&["ip", "netns", "add", ns]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let up = t.uplink_iface();
        must(&[
            "ip", "-n", &t.agent, "link", "add", &up, "type", "veth", "peer", "name", "eth0",
            "netns", &t.uplink,
        ]);
        let (a, u) = (&t.agent, &t.uplink);
        must(&[
            "ip",
            "-n",
            a,
            "addr",
            "add",
            &format!("{NODE_UPLINK}/24"),
            "dev",
            &up,
        ]);
        must(&[
            "ip",
            "-n",
            a,
            "-6",
            "addr",
            "add",
            "2001:db8:1::1/64",
            "dev",
            &up,
            "nodad",
        ]);
        must(&["ip", "-n", a, "link", "set", &up, "up"]);
        must(&["ip", "-n", a, "route", "add", "default", "via", PUBLIC]);
        must(&[
            "ip", "-n", a, "-6", "route", "add", "default", "via", PUBLIC6,
        ]);
        must(&[
            "ip",
            "netns",
            "exec",
            a,
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        // The uplink side: the internet host and every address an instance
        // must not reach, all on one interface.
        must(&[
            "ip",
            "-n",
            u,
            "addr",
            "add",
            &format!("{PUBLIC}/24"),
            "dev",
            "eth0",
        ]);
        for addr in [
            DENIED_PUBLIC,
            METADATA,
            PRIVATE_10,
            PRIVATE_172,
            PRIVATE_192,
            CGNAT,
            RESOLVER,
        ] {
            must(&[
                "ip",
                "-n",
                u,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "eth0",
            ]);
        }
        must(&[
            "ip",
            "-n",
            u,
            "-6",
            "addr",
            "add",
            &format!("{PUBLIC6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        must(&["ip", "-n", u, "link", "set", "eth0", "up"]);
        // Replies to the instances' IPv6 network, were any to get through.
        must(&[
            "ip",
            "-n",
            u,
            "-6",
            "route",
            "add",
            "2001:db8:2::/48",
            "via",
            "2001:db8:1::1",
        ]);
        t
    }

    fn uplink_iface(&self) -> String {
        format!("{}up", self.prefix)
    }

    fn config(&self) -> NetworkConfig {
        serde_json::from_value(serde_json::json!({
            "uplink_interface": self.uplink_iface(),
            "standard_bandwidth_mbit": 100,
            "performance_bandwidth_mbit": 500,
            "deny": [format!("{DENIED_PUBLIC}/32")],
            "allow": [format!("{RESOLVER}/32")],
            "public_ports": [PUBLIC_PORT],
        }))
        .unwrap()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Ok(list) = sh(&["ip", "netns", "list"]) {
            for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if ns.starts_with(&self.prefix) {
                    let _ = sh(&["ip", "netns", "delete", ns]);
                }
            }
        }
    }
}

/// From netns `ns` send `token` to `to`: whether the echo came back.
fn probe(ns: &str, to: SocketAddr, token: &str) -> bool {
    netns::probe(ns, None, to, token)
}

/// From netns `ns`, whether a TCP connection to `to` is accepted.
fn tcp_probe(ns: &str, to: SocketAddr) -> bool {
    in_ns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(400)).is_ok()
    })
}

fn spec_for(mode: EgressMode) -> Option<NetworkSpec> {
    match mode {
        EgressMode::Internet => None,
        EgressMode::None => Some(NetworkSpec {
            internet_access: false,
            vpc: None,
        }),
        other => panic!("no VPC in this test: {other:?}"),
    }
}

type Row = BTreeMap<&'static str, bool>;

static AGENT: Mutex<Option<(NetPool, NetIsolation)>> = Mutex::new(None);

#[test]
fn internet_mode_reaches_public_addresses_only() {
    if let Some((category, why)) = skip_reason() {
        return skip(category, why);
    }
    let topo = Topology::new();
    let (agent, prefix, config) = (topo.agent.clone(), topo.prefix.clone(), topo.config());
    let slots: Vec<(NetSlot, EgressMode)> = in_ns(&agent, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = NetPool::new(
                Arc::new(IpCommand::default()),
                &prefix,
                "10.213.0.0/24".parse().unwrap(),
                0,
            );
            let iso = NetIsolation::start(&prefix, config, Arc::new(SystemCommands))
                .await
                .unwrap();
            let mut slots = Vec::new();
            for mode in [EgressMode::Internet, EgressMode::None, EgressMode::Internet] {
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
                slots.push((slot, mode));
            }
            AGENT.lock().unwrap().replace((pool, iso));
            slots
        })
    });
    // IPv6 on every instance link, so that only the rules stand between
    // an instance and the uplink's IPv6 host.
    for (i, (slot, _)) in slots.iter().enumerate() {
        let net = format!("2001:db8:2:{i}::");
        must(&[
            "ip",
            "-n",
            &agent,
            "-6",
            "addr",
            "add",
            &format!("{net}1/64"),
            "dev",
            &slot.name,
            "nodad",
        ]);
        must(&[
            "ip",
            "-n",
            &slot.name,
            "-6",
            "addr",
            "add",
            &format!("{net}2/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        must(&[
            "ip",
            "-n",
            &slot.name,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("{net}1"),
        ]);
        // Static neighbours both ways: the table drops an instance's
        // neighbour discovery to the node (as all it sends the node), and
        // this probe is about what the egress rules let through.
        let mac = |args: &[&str]| {
            let out = must(args);
            let words: Vec<&str> = out.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "link/ether").unwrap();
            words[at + 1].to_owned()
        };
        let host_mac = mac(&["ip", "-n", &agent, "-o", "link", "show", "dev", &slot.name]);
        let inst_mac = mac(&["ip", "-n", &slot.name, "-o", "link", "show", "dev", "eth0"]);
        must(&[
            "ip",
            "-n",
            &slot.name,
            "-6",
            "neigh",
            "replace",
            &format!("{net}1"),
            "lladdr",
            &host_mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ]);
        must(&[
            "ip",
            "-n",
            &agent,
            "-6",
            "neigh",
            "replace",
            &format!("{net}2"),
            "lladdr",
            &inst_mac,
            "dev",
            &slot.name,
            "nud",
            "permanent",
        ]);
    }

    let uplink = Echo::start(&topo.uplink, "::".parse().unwrap(), PORT);
    let node = Echo::start(&agent, Ipv4Addr::UNSPECIFIED.into(), PORT);
    let instances: Vec<Echo> = slots
        .iter()
        .map(|(s, _)| Echo::start(&s.name, Ipv4Addr::UNSPECIFIED.into(), PORT))
        .collect();
    // The node's public port (its internet-facing gateway) and a control
    // port, both on every node address.
    let (public_tx, public_rx) = std::sync::mpsc::channel();
    let agent2 = agent.clone();
    std::thread::spawn(move || {
        enter(&agent2);
        let public = TcpListener::bind(("0.0.0.0", PUBLIC_PORT)).unwrap();
        let control = TcpListener::bind(("0.0.0.0", PUBLIC_PORT + 1)).unwrap();
        public_tx.send(()).unwrap();
        // Accepting is not needed: the kernel completes the handshake.
        std::thread::sleep(Duration::from_secs(120));
        drop((public, control));
    });
    public_rx.recv().unwrap();

    // Controls: the uplink host answers over both protocols when nothing
    // filters (from the node itself).
    assert!(probe(
        &agent,
        SocketAddr::new(PUBLIC.parse().unwrap(), PORT),
        "c4"
    ));
    // Several tries: the first packet may wait on neighbour discovery.
    let c6 = (0..5).any(|i| {
        probe(
            &agent,
            SocketAddr::new(PUBLIC6.parse().unwrap(), PORT),
            &format!("c6{i}"),
        )
    });
    assert!(
        c6,
        "IPv6 to the uplink from the node: {}\n{}\n{}",
        must(&["ip", "-n", &agent, "-6", "addr"]),
        must(&["ip", "-n", &agent, "-6", "route"]),
        must(&["ip", "-n", &topo.uplink, "-6", "addr"])
    );

    let to = |a: &str| SocketAddr::new(a.parse().unwrap(), PORT);
    let other = slots[2].0.instance_addr;
    let mut n = 0;
    let mut token = || {
        n += 1;
        format!("t{n}")
    };
    let mut table: BTreeMap<String, Row> = BTreeMap::new();
    for (slot, mode) in slots.iter().take(2) {
        let ns = &slot.name;
        let mut row = Row::new();
        let mut udp = |name: &'static str, addr: &str| {
            let t = token();
            let got = probe(ns, to(addr), &t);
            row.insert(name, got || uplink.saw(&t));
        };
        udp("public", PUBLIC);
        udp("metadata 169.254.169.254", METADATA);
        udp("private 10/8", PRIVATE_10);
        udp("private 172.16/12", PRIVATE_172);
        udp("private 192.168/16", PRIVATE_192);
        udp("cgnat 100.64/10", CGNAT);
        udp("operator-denied public", DENIED_PUBLIC);
        udp("operator-allowed resolver", RESOLVER);
        // Several tries: the first packet may wait on neighbour discovery.
        let got6 = (0..5).any(|_| {
            let t = token();
            probe(ns, to(PUBLIC6), &t) || uplink.saw(&t)
        });
        row.insert("public over IPv6", got6);
        let t = token();
        row.insert(
            "other instance",
            probe(ns, SocketAddr::new(other.into(), PORT), &t) || instances[2].saw(&t),
        );
        let (a, b) = (token(), token());
        row.insert(
            "node udp",
            probe(ns, SocketAddr::new(slot.host_addr.into(), PORT), &a)
                || probe(ns, to(NODE_UPLINK), &b)
                || node.saw(&a)
                || node.saw(&b),
        );
        row.insert(
            "node control port",
            tcp_probe(ns, SocketAddr::new(slot.host_addr.into(), PUBLIC_PORT + 1))
                || tcp_probe(
                    ns,
                    SocketAddr::new(NODE_UPLINK.parse().unwrap(), PUBLIC_PORT + 1),
                ),
        );
        row.insert(
            "node public port",
            tcp_probe(ns, SocketAddr::new(slot.host_addr.into(), PUBLIC_PORT))
                && tcp_probe(
                    ns,
                    SocketAddr::new(NODE_UPLINK.parse().unwrap(), PUBLIC_PORT),
                ),
        );
        table.insert(format!("{mode:?}"), row);
    }
    drop(instances);
    eprintln!("reachability (egress mode -> target -> got through):");
    for (mode, row) in &table {
        eprintln!("  {mode:<10} {row:?}");
    }
    let expect = |internet: bool| -> Row {
        [
            ("public", internet),
            ("metadata 169.254.169.254", false),
            ("private 10/8", false),
            ("private 172.16/12", false),
            ("private 192.168/16", false),
            ("cgnat 100.64/10", false),
            ("operator-denied public", false),
            ("operator-allowed resolver", internet),
            ("public over IPv6", false),
            ("other instance", false),
            ("node udp", false),
            ("node control port", false),
            ("node public port", internet),
        ]
        .into_iter()
        .collect()
    };
    let want: BTreeMap<String, Row> = [("Internet", expect(true)), ("None", expect(false))]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    assert_eq!(table, want);

    // Release everything: no rule of any instance is left.
    let prefix = topo.prefix.clone();
    let (left, gone) = in_ns(&agent, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (pool, iso) = AGENT.lock().unwrap().take().unwrap();
            for (slot, _) in &slots {
                iso.detach(&slot.name).await.unwrap();
                pool.release(slot).await.unwrap();
            }
            let table = must(&["nft", "list", "table", "inet", &prefix]);
            iso.shutdown().await.unwrap();
            (
                table,
                sh(&["nft", "list", "table", "inet", &prefix]).is_err(),
            )
        })
    });
    for needle in ["chain e-", "chain i-", ": jump"] {
        assert!(!left.contains(needle), "{needle} left in {left}");
    }
    // The set of instances with internet access is empty again.
    assert!(
        left.contains("set internet {\n\t\ttype ifname\n\t}"),
        "{left}"
    );
    assert!(gone, "the table is removed at shutdown");
}
