//! `IpCommand` against the real `ip`: a slot's namespace, veth pair,
//! addresses and route, made in two `ip -batch` runs; a failing line is
//! named in the error and whatever the batch made is undone.
//!
//! Needs root and iproute2; skips with a printed reason otherwise. Names
//! carry a per-run prefix and a guard removes them even when the test fails.

use std::collections::BTreeSet;
use std::process::Command;

use kiln_sandbox::net::Ipv4Cidr;
use kiln_sandbox::net::{IpCommand, NetSlot, NetworkOps};
use kiln_test_support::{skip, Category};

fn skip_reason() -> Option<(Category, &'static str)> {
    if !nix::unistd::geteuid().is_root() {
        return Some((Category::Root, "not running as root"));
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some((
            Category::Tool,
            "iproute2's ip is not installed (run scripts/install-deps.sh)",
        ));
    }
    None
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes every link and namespace of the run's slots.
struct Guard(Vec<String>);

impl Drop for Guard {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["link", "delete", name]).output();
            let _ = Command::new("ip").args(["netns", "delete", name]).output();
        }
    }
}

#[tokio::test]
async fn a_slot_is_made_in_two_batches_and_a_failing_line_is_named_and_undone() {
    if let Some((category, reason)) = skip_reason() {
        return skip(category, reason);
    }
    let run = std::process::id();
    let prefix = format!("kb{:04x}", run & 0xffff);
    let subnet: Ipv4Cidr = format!("10.252.{}.0/24", run % 250).parse().unwrap();
    let (made, taken) = (
        NetSlot::new(&prefix, &subnet, 0),
        NetSlot::new(&prefix, &subnet, 1),
    );
    let _guard = Guard(vec![made.name.clone(), taken.name.clone()]);
    let ops = IpCommand::default();

    ops.create(&made).await.unwrap();
    let ns = made.name.as_str();
    assert!(
        ip(&["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])
            .contains(&format!("{}/30", made.instance_addr)),
        "the instance end is addressed"
    );
    assert!(ip(&["-n", ns, "-o", "link", "show", "eth0"]).contains(",UP"));
    assert!(ip(&["-n", ns, "-o", "link", "show", "lo"]).contains(",UP"));
    assert!(
        ip(&["-n", ns, "route", "show", "default"]).contains(&format!("via {}", made.host_addr))
    );
    assert!(
        ip(&["-4", "-o", "addr", "show", "dev", ns]).contains(&format!("{}/30", made.host_addr))
    );

    // The host-side name of the second slot is taken: its batch fails at
    // `link add`, which the error names, and the namespace the same batch
    // made first is removed again.
    let peer = format!("{}x", taken.name);
    ip(&[
        "link",
        "add",
        &taken.name,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ]);
    let err = ops.create(&taken).await.unwrap_err().to_string();
    assert!(err.contains("link add"), "{err}");
    assert!(err.contains("File exists"), "{err}");
    assert_eq!(
        ops.list(&prefix).await.unwrap(),
        BTreeSet::from([made.name.clone()])
    );

    ops.delete(&made.name).await.unwrap();
    assert!(ops.list(&prefix).await.unwrap().is_empty());
}

/// Bytes the host side of `link` has sent and received.
fn link_bytes(link: &str) -> u64 {
    let read = |what: &str| -> u64 {
        std::fs::read_to_string(format!("/sys/class/net/{link}/statistics/{what}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    read("tx_bytes") + read("rx_bytes")
}

/// Send `payload` on `stream` and read it back from the echoing peer.
async fn round_trip(stream: &mut tokio::net::TcpStream, payload: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test]
async fn a_socket_dialled_in_the_namespace_reaches_the_instance_over_its_loopback() {
    if let Some((category, reason)) = skip_reason() {
        return skip(category, reason);
    }
    let run = std::process::id();
    let prefix = format!("kd{:04x}", run & 0xffff);
    let subnet: Ipv4Cidr = format!("10.251.{}.0/24", run % 250).parse().unwrap();
    let slot = NetSlot::new(&prefix, &subnet, 0);
    let _guard = Guard(vec![slot.name.clone()]);
    IpCommand::default().create(&slot).await.unwrap();

    // An echo server inside the namespace on every address, as runtimes
    // listen; it reports each peer's address.
    let netns = slot.netns_path();
    let listener = {
        let netns = netns.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(netns).unwrap();
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpListener::bind("0.0.0.0:9000").unwrap()
        })
        .join()
        .unwrap()
    };
    let (peers_tx, mut peers) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = peers_tx.send(conn.peer_addr().unwrap());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    if conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let endpoint = std::net::SocketAddr::new(slot.instance_addr.into(), 9000);
    let payload = vec![7u8; 1 << 20];
    let thread_ns = || std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let before_ns = thread_ns();

    // Dialled from inside: the call comes from the instance's own address
    // and a megabyte each way leaves the veth's counters where they were.
    let veth_before = link_bytes(&slot.name);
    let mut inside = kiln_sandbox::net::dial::connect_in(&netns, endpoint)
        .await
        .unwrap();
    assert!(inside.nodelay().unwrap());
    round_trip(&mut inside, &payload).await;
    assert_eq!(peers.recv().await.unwrap().ip(), slot.instance_addr);
    let over_veth = link_bytes(&slot.name) - veth_before;
    assert!(over_veth < 64 * 1024, "{over_veth} bytes crossed the veth");
    // The dialling thread moved, not this one.
    assert_eq!(thread_ns(), before_ns);

    // The same call dialled from the host crosses the veth: what the
    // counters show above is the loopback, not a counter that never moves.
    let veth_before = link_bytes(&slot.name);
    let mut outside = tokio::net::TcpStream::connect(endpoint).await.unwrap();
    round_trip(&mut outside, &payload).await;
    assert_eq!(peers.recv().await.unwrap().ip(), slot.host_addr);
    let over_veth = link_bytes(&slot.name) - veth_before;
    assert!(
        over_veth > 2 << 20,
        "only {over_veth} bytes crossed the veth"
    );

    // A namespace that is gone is named in the error.
    let gone = std::path::Path::new("/run/netns").join(format!("{prefix}-gone"));
    let err = kiln_sandbox::net::dial::connect_in(&gone, endpoint)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&gone.display().to_string()), "{err}");
    drop((inside, outside));
    IpCommand::default().delete(&slot.name).await.unwrap();
}
