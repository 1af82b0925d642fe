use super::*;
use crate::net::exec::{RecordedCommand, RecordingCommands};
use kiln_core::VpcAttachment;

fn config() -> NetworkConfig {
    serde_json::from_value(serde_json::json!({
        "uplink_interface": "eth0",
        "standard_bandwidth_mbit": 100,
        "performance_bandwidth_mbit": 500,
        "vpcs": [{
            "id": "vpc-a",
            "cidr": "192.168.0.0/16",
            "vswitches": [{"id": "vsw-a", "cidr": "192.168.50.0/24",
                "gateway": "192.168.50.1", "instance_pool": "192.168.50.128/30"}],
            "ports": ["eth1"],
            "security_groups": [{"id": "sg-a",
                "ingress": [{"protocol": "tcp", "port_range": "9000/9000", "cidr": "192.168.50.0/24"}]}]
        }]
    }))
    .unwrap()
}

fn iface(hex: &str, last: u8) -> HostInterface {
    HostInterface {
        name: format!("kt-{hex}"),
        instance_addr: Ipv4Addr::new(10, 77, 0, last),
    }
}

fn vpc_spec(internet: bool) -> NetworkSpec {
    NetworkSpec {
        internet_access: internet,
        vpc: Some(VpcAttachment {
            vpc_id: "vpc-a".into(),
            vswitch_ids: vec!["vsw-x".into(), "vsw-a".into()],
            security_group_id: "sg-a".into(),
        }),
    }
}

async fn start() -> (Arc<RecordingCommands>, NetIsolation) {
    let cmd = Arc::new(RecordingCommands::new());
    let iso = NetIsolation::start("kt", config(), cmd.clone())
        .await
        .unwrap();
    (cmd, iso)
}

fn lines(cmd: &RecordingCommands) -> Vec<String> {
    cmd.calls()
        .iter()
        .flat_map(RecordedCommand::commands)
        .collect()
}

#[test]
fn egress_modes_follow_fc_fields() {
    assert_eq!(EgressMode::of(None), EgressMode::Internet);
    let none = NetworkSpec {
        internet_access: false,
        vpc: None,
    };
    assert_eq!(EgressMode::of(Some(&none)), EgressMode::None);
    assert_eq!(EgressMode::of(Some(&vpc_spec(false))), EgressMode::Vpc);
    assert_eq!(
        EgressMode::of(Some(&vpc_spec(true))),
        EgressMode::InternetAndVpc
    );
}

#[test]
fn names_carry_the_prefix() {
    let n = Names::new("kt");
    assert_eq!(n.ifb("kt-1f").as_deref(), Some("kti1f"));
    assert_eq!(n.ifb("eth0"), None);
    assert_eq!(n.ifb("kt-"), None);
    for own in ["kti1f", "ktv0", "ktv12g", "ktv3o"] {
        assert!(n.is_own_aux(own), "{own}");
    }
    for other in ["kt-1", "ktv", "ktvg", "ktx1", "ktv1gg", "eth0", "kti"] {
        assert!(!n.is_own_aux(other), "{other}");
    }
}

#[tokio::test]
async fn start_replaces_only_its_own_table() {
    let (cmd, iso) = start().await;
    let l = lines(&cmd);
    assert_eq!(l[0], "nft delete table inet kt");
    assert!(l.contains(&"sysctl -q -w net.ipv4.ip_forward=1".to_owned()));
    let calls = cmd.calls();
    let table = calls
        .iter()
        .find(|c| c.program == "nft" && c.stdin.is_some())
        .unwrap();
    assert!(table
        .stdin
        .as_deref()
        .unwrap()
        .starts_with("table inet kt {"));
    assert!(!l.iter().any(|c| c.contains("flush ruleset")));
    assert_eq!(iso.table(), "kt");
}

#[tokio::test]
async fn internet_attach_adds_rules_and_shaping_then_detach_removes_them() {
    let (cmd, iso) = start().await;
    cmd.clear();
    let net = iso
        .attach(&iface("1f", 126), None, BandwidthClass::Standard)
        .await
        .unwrap();
    assert_eq!(net.egress, EgressMode::Internet);
    assert_eq!(net.bandwidth_mbit, 100);
    assert_eq!(net.vpc_address, None);
    let l = lines(&cmd);
    assert!(
        l.contains(
            &"tc qdisc replace dev kt-1f root tbf rate 100mbit burst 125000 latency 50ms"
                .to_owned()
        ),
        "{l:#?}"
    );
    assert!(l.contains(&"ip link add kti1f type ifb".to_owned()));
    assert!(l
        .iter()
        .any(|c| c.contains("mirred egress redirect dev kti1f")));
    assert!(!l.iter().any(|c| c.contains("ovs-vsctl")));
    assert_eq!(iso.attached(), ["kt-1f"]);
    assert!(matches!(
        iso.attach(&iface("1f", 126), None, BandwidthClass::Standard)
            .await,
        Err(NetIsolationError::AlreadyAttached(_))
    ));

    cmd.clear();
    iso.detach("kt-1f").await.unwrap();
    let calls = cmd.calls();
    let del = calls.iter().find(|c| c.program == "nft").unwrap();
    assert!(del
        .stdin
        .as_deref()
        .unwrap()
        .contains("delete chain inet kt e-kt-1f"));
    assert!(lines(&cmd).contains(&"ip link delete kti1f".to_owned()));
    assert!(iso.attached().is_empty());
    cmd.clear();
    iso.detach("kt-1f").await.unwrap();
    assert!(cmd.calls().is_empty(), "detaching twice does nothing");
}

#[tokio::test]
async fn vpc_instances_share_a_bridge_that_goes_with_the_last() {
    let (cmd, iso) = start().await;
    cmd.clear();
    let a = iso
        .attach(
            &iface("1", 6),
            Some(&vpc_spec(false)),
            BandwidthClass::Performance,
        )
        .await
        .unwrap();
    assert_eq!(a.egress, EgressMode::Vpc);
    assert_eq!(a.bandwidth_mbit, 500);
    assert_eq!(
        a.vpc_address,
        Some(("vsw-a".into(), "192.168.50.129".parse().unwrap()))
    );
    let b = iso
        .attach(
            &iface("2", 10),
            Some(&vpc_spec(true)),
            BandwidthClass::Standard,
        )
        .await
        .unwrap();
    assert_eq!(b.egress, EgressMode::InternetAndVpc);
    assert_eq!(
        b.vpc_address.unwrap().1,
        "192.168.50.130".parse::<Ipv4Addr>().unwrap()
    );
    let l = lines(&cmd);
    assert_eq!(
        l.iter().filter(|c| c.contains("add-br ktv0")).count(),
        1,
        "{l:#?}"
    );
    assert!(l.contains(&"ip link add ktv0g type veth peer name ktv0o".to_owned()));
    assert!(l.contains(&"ip addr add 192.168.50.1/24 dev ktv0g".to_owned()));
    assert!(l.contains(&"ip addr add 192.168.50.129/32 dev ktv0g".to_owned()));
    // The VPC's own uplink joins the bridge with it, once.
    assert_eq!(
        l.iter()
            .filter(|c| *c == "ovs-vsctl --may-exist add-port ktv0 eth1")
            .count(),
        1,
        "{l:#?}"
    );

    // The pool (a /30: two hosts) is used up.
    let err = iso
        .attach(
            &iface("3", 14),
            Some(&vpc_spec(false)),
            BandwidthClass::Standard,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, NetIsolationError::VpcAddressesExhausted(_)),
        "{err}"
    );

    cmd.clear();
    iso.detach("kt-1").await.unwrap();
    assert!(!lines(&cmd).iter().any(|c| c.contains("del-br")));
    iso.detach("kt-2").await.unwrap();
    let l = lines(&cmd);
    assert!(l.contains(&"ip link delete ktv0g".to_owned()));
    assert!(l.contains(&"ovs-vsctl --if-exists del-br ktv0".to_owned()));
    // Its addresses are free again.
    let c = iso
        .attach(
            &iface("4", 18),
            Some(&vpc_spec(false)),
            BandwidthClass::Standard,
        )
        .await
        .unwrap();
    assert_eq!(
        c.vpc_address.unwrap().1,
        "192.168.50.129".parse::<Ipv4Addr>().unwrap()
    );
}

#[tokio::test]
async fn bad_attachments_change_nothing() {
    let (cmd, iso) = start().await;
    cmd.clear();
    let mut spec = vpc_spec(false);
    spec.vpc.as_mut().unwrap().vpc_id = "vpc-zz".into();
    assert!(matches!(
        iso.attach(&iface("1", 6), Some(&spec), BandwidthClass::Standard)
            .await,
        Err(NetIsolationError::UnknownVpc(_))
    ));
    let mut spec = vpc_spec(false);
    spec.vpc.as_mut().unwrap().security_group_id = "sg-zz".into();
    assert!(matches!(
        iso.attach(&iface("1", 6), Some(&spec), BandwidthClass::Standard)
            .await,
        Err(NetIsolationError::UnknownSecurityGroup { .. })
    ));
    let mut spec = vpc_spec(false);
    spec.vpc.as_mut().unwrap().vswitch_ids = vec!["vsw-zz".into()];
    assert!(matches!(
        iso.attach(&iface("1", 6), Some(&spec), BandwidthClass::Standard)
            .await,
        Err(NetIsolationError::UnknownVSwitch(_))
    ));
    let other = HostInterface {
        name: "eth0".into(),
        instance_addr: Ipv4Addr::new(10, 0, 0, 2),
    };
    assert!(matches!(
        iso.attach(&other, None, BandwidthClass::Standard).await,
        Err(NetIsolationError::Interface(_))
    ));
    assert!(cmd.calls().is_empty());
    assert!(iso.attached().is_empty());
}

#[tokio::test]
async fn a_failed_attach_is_undone() {
    let (cmd, iso) = start().await;
    cmd.clear();
    cmd.fail_matching(Some("type ifb"));
    let err = iso
        .attach(
            &iface("1", 6),
            Some(&vpc_spec(false)),
            BandwidthClass::Standard,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("injected"), "{err}");
    cmd.fail_matching(None);
    let l = lines(&cmd);
    assert!(l.contains(&"ip link delete ktv0g".to_owned()), "{l:#?}");
    let calls = cmd.calls();
    assert!(calls.iter().any(|c| c
        .stdin
        .as_deref()
        .is_some_and(|s| s.contains("delete chain inet kt e-kt-1"))));
    assert!(iso.attached().is_empty());
    // The address and bridge reference were returned.
    let ok = iso
        .attach(
            &iface("1", 6),
            Some(&vpc_spec(false)),
            BandwidthClass::Standard,
        )
        .await
        .unwrap();
    assert_eq!(
        ok.vpc_address.unwrap().1,
        "192.168.50.129".parse::<Ipv4Addr>().unwrap()
    );
}

#[tokio::test]
async fn shutdown_detaches_everything_and_drops_the_table() {
    let (cmd, iso) = start().await;
    iso.attach(&iface("1", 6), None, BandwidthClass::Standard)
        .await
        .unwrap();
    cmd.clear();
    iso.shutdown().await.unwrap();
    let l = lines(&cmd);
    assert!(l.contains(&"ip link delete kti1".to_owned()));
    assert!(l.contains(&"nft delete table inet kt".to_owned()));
    assert!(iso.attached().is_empty());
}

#[test]
fn performance_instances_are_the_big_disk_or_big_memory_ones() {
    let mut spec = crate::process::tests::sample_spec();
    spec.memory_mb = 2048;
    spec.disk_mb = 512;
    assert_eq!(BandwidthClass::of(&spec), BandwidthClass::Standard);
    spec.disk_mb = 10_240;
    assert_eq!(BandwidthClass::of(&spec), BandwidthClass::Performance);
    spec.disk_mb = 512;
    spec.memory_mb = PERFORMANCE_MEMORY_MB - 64;
    assert_eq!(BandwidthClass::of(&spec), BandwidthClass::Standard);
    spec.memory_mb = PERFORMANCE_MEMORY_MB;
    assert_eq!(BandwidthClass::of(&spec), BandwidthClass::Performance);
}

/// Counts the commands running at once (each takes 20 ms).
#[derive(Default)]
struct Overlap {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl HostCommands for Overlap {
    async fn run(
        &self,
        _program: &str,
        _args: &[String],
        _stdin: Option<&str>,
    ) -> Result<String, crate::net::exec::HostCommandError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.max.fetch_max(n, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        self.now.fetch_sub(1, SeqCst);
        Ok(String::new())
    }
}

async fn overlapping() -> (Arc<Overlap>, NetIsolation) {
    let cmd = Arc::new(Overlap::default());
    let iso = NetIsolation::start("kt", config(), cmd.clone())
        .await
        .unwrap();
    cmd.max.store(0, std::sync::atomic::Ordering::SeqCst);
    (cmd, iso)
}

/// Parallel cold starts used to queue on one lock around every attach
/// and detach; instances without a VPC share nothing that needs it.
#[tokio::test]
async fn instances_without_a_vpc_attach_and_detach_concurrently() {
    let (cmd, iso) = overlapping().await;
    let ifaces: Vec<_> = (1..=4).map(|i| iface(&format!("{i:x}"), i * 4)).collect();
    let internet = NetworkSpec {
        internet_access: true,
        vpc: None,
    };
    let attached = futures_util::future::join_all(
        ifaces
            .iter()
            .map(|i| iso.attach(i, Some(&internet), BandwidthClass::Standard)),
    )
    .await;
    assert!(attached.iter().all(Result::is_ok), "{attached:?}");
    let max = cmd.max.swap(0, std::sync::atomic::Ordering::SeqCst);
    assert!(
        max >= 2,
        "attaches ran one at a time (at most {max} command at once)"
    );
    let detached = futures_util::future::join_all(ifaces.iter().map(|i| iso.detach(&i.name))).await;
    assert!(detached.iter().all(Result::is_ok), "{detached:?}");
    assert!(
        cmd.max.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "detaches ran one at a time"
    );
    assert!(iso.attached().is_empty());
}

/// VPC attachments keep one at a time: they share the VPC's bridge and
/// its reference count.
#[tokio::test]
async fn vpc_attachments_stay_serialised() {
    let (cmd, iso) = overlapping().await;
    let (a, b) = (iface("a1", 4), iface("a2", 8));
    let spec = vpc_spec(false);
    let (ra, rb) = tokio::join!(
        iso.attach(&a, Some(&spec), BandwidthClass::Standard),
        iso.attach(&b, Some(&spec), BandwidthClass::Standard)
    );
    ra.unwrap();
    rb.unwrap();
    assert_eq!(cmd.max.swap(0, std::sync::atomic::Ordering::SeqCst), 1);
    let (da, db) = tokio::join!(iso.detach(&a.name), iso.detach(&b.name));
    da.unwrap();
    db.unwrap();
    assert_eq!(cmd.max.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn one_interface_is_attached_once_even_when_asked_twice_at_once() {
    let (_cmd, iso) = overlapping().await;
    let i = iface("b1", 4);
    let (r1, r2) = tokio::join!(
        iso.attach(&i, None, BandwidthClass::Standard),
        iso.attach(&i, None, BandwidthClass::Standard)
    );
    assert!(
        r1.is_ok() != r2.is_ok(),
        "exactly one attach wins: {r1:?} {r2:?}"
    );
    let err = r1.err().or(r2.err()).unwrap();
    assert!(
        matches!(err, NetIsolationError::AlreadyAttached(_)),
        "{err}"
    );
    assert_eq!(iso.attached(), vec![i.name.clone()]);
}
