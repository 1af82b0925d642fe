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
