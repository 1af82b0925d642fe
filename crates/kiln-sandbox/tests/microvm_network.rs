//! A microVM's tap under the network isolation of `[sandbox.network]`,
//! with the fake cloud-hypervisor (`fake-cloud-hypervisor`):
//!
//! - over the recording command runner: the tap is created, then
//!   attached (rules, shaping) before the guest is configured; detached
//!   before it is removed; a pooled VM waits unattached and is attached
//!   with the egress mode of the function that takes it;
//! - the pool pre-warmed at start for the configured sizes;
//! - on the real host (root), inside a network namespace of the test's own
//!   (so neither the host's firewall nor its links are touched, and
//!   everything goes with the namespace even when the test fails): the tap
//!   gets its nftables chains and tc shaping and loses them on destroy,
//!   and shutdown removes the table.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use kiln_sandbox::cgroup::RecordingCgroups;
use kiln_sandbox::microvm::host::CommandTaps;
use kiln_sandbox::microvm::{MicroVmBackends, MicroVmConfig, MicroVmDriver, PoolKey, PrewarmSize};
use kiln_sandbox::net::{
    HostCommands, NetworkConfig, RecordedCommand, RecordingCommands, SystemCommands,
};
use kiln_sandbox::{rootfs_path, SandboxDriver, SandboxError, SandboxRequest};
use kiln_test_support::{skip, Category};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

/// Kernel, initramfs, a runtime tree and a code dir under `root`; the
/// driver's configuration for them.
fn fixture(root: &Path, prefix: &str) -> MicroVmConfig {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(root.join("guest")).unwrap();
    std::fs::write(root.join("guest/vmlinuz"), b"kernel").unwrap();
    std::fs::write(root.join("guest/initramfs.img"), b"initramfs").unwrap();
    let tree = rootfs_path(&root.join("rootfs"), RuntimeName::CustomDebian12);
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::write(tree.join("usr/bin/python3"), b"#!python").unwrap();
    std::fs::create_dir_all(root.join("code")).unwrap();
    std::fs::write(root.join("code/server"), b"#!/bin/sh\n").unwrap();
    MicroVmConfig {
        cloud_hypervisor_path: Some(FAKE.into()),
        kernel: root.join("guest/vmlinuz"),
        initramfs: root.join("guest/initramfs.img"),
        rootfs_dir: Some(root.join("rootfs")),
        name_prefix: prefix.into(),
        api_timeout_ms: 2_000,
        boot_timeout_ms: 5_000,
        // Jailed VMMs, with uids of this test process's own (tests run in
        // parallel and each expects its first VM in slot 0).
        jail: kiln_sandbox::microvm::JailConfig {
            uid_base: 3_000_000 + (std::process::id() % 100_000) * 64,
            uid_count: 64,
            insecure_disabled: false,
        },
        ..MicroVmConfig::default()
    }
}

fn network_config() -> NetworkConfig {
    serde_json::from_value(serde_json::json!({
        "standard_bandwidth_mbit": 100,
        "performance_bandwidth_mbit": 500,
    }))
    .unwrap()
}

fn request(root: &Path, network: serde_json::Value) -> SandboxRequest {
    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
        "account_id": "1234",
        "function_name": "hello",
        "revision": "",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "command": ["/code/server"],
        "args": [],
        "port": 9000,
        "environment": {},
        "memory_mb": 256,
        "cpu_milli": 1500,
        "disk_mb": 512,
        "timeout_s": 3,
        "concurrency": 1,
        "code_digest": "cd".repeat(32),
        "code_size": 10,
        "network": network,
    }))
    .unwrap();
    SandboxRequest {
        instance_id: InstanceId::generate(),
        spec: spec.seal(),
        code_dir: root.join("code"),
        image: None,
    }
}

async fn driver(
    root: &Path,
    config: MicroVmConfig,
    cmd: Arc<dyn HostCommands>,
    isolated: bool,
) -> Result<MicroVmDriver, SandboxError> {
    let driver = MicroVmDriver::with_backends(
        config,
        &root.join("state"),
        MicroVmBackends {
            taps: Arc::new(CommandTaps::new(cmd.clone())),
            cgroups: Arc::new(RecordingCgroups::default()),
            vmm_env: vec![],
        },
    )
    .await?;
    if isolated {
        driver.isolate_network(network_config(), cmd).await
    } else {
        Ok(driver)
    }
}

/// Every recorded command as one line (ip and tc batches line by line), an
/// nft script by what it does to `iface`'s chains.
fn log(cmd: &RecordingCommands, iface: &str) -> Vec<String> {
    cmd.calls()
        .iter()
        .flat_map(|c: &RecordedCommand| match (&c.stdin, c.program.as_str()) {
            (Some(script), "nft") if script.contains(&format!("add chain inet kv e-{iface}")) => {
                vec![format!("nft add chains of {iface}")]
            }
            (Some(script), "nft")
                if script.contains(&format!("delete chain inet kv e-{iface}")) =>
            {
                vec![format!("nft delete chains of {iface}")]
            }
            _ => c.commands(),
        })
        .collect()
}

fn position(lines: &[String], what: &str) -> usize {
    lines
        .iter()
        .position(|l| l.starts_with(what))
        .unwrap_or_else(|| panic!("{what:?} not run; ran: {lines:#?}"))
}

fn script_of(cmd: &RecordingCommands, iface: &str) -> String {
    cmd.calls()
        .into_iter()
        .filter_map(|c| c.stdin)
        .find(|s| s.contains(&format!("add chain inet kv e-{iface}")))
        .unwrap_or_else(|| panic!("no rules for {iface}"))
}

#[tokio::test]
async fn a_cold_booted_tap_is_attached_after_creation_and_detached_before_removal() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = Arc::new(RecordingCommands::new());
    let d = driver(dir.path(), fixture(dir.path(), "kv"), cmd.clone(), true)
        .await
        .unwrap();
    assert_eq!(d.net_isolation().unwrap().table(), "kv");
    cmd.clear();
    let req = request(dir.path(), serde_json::Value::Null);
    d.create(&req).await.unwrap();
    let lines = log(&cmd, "kv-0");
    let created = position(&lines, "ip tuntap add dev kv-0 mode tap");
    let rules = position(&lines, "nft add chains of kv-0");
    let shaped = position(&lines, "tc qdisc replace dev kv-0 root tbf rate 100mbit");
    assert!(created < rules && rules < shaped, "{lines:#?}");
    // The guest's address (.2 of the VM's /30, the one the guest is
    // configured with) is the only source accepted from the tap; the
    // default egress mode is internet.
    let script = script_of(&cmd, "kv-0");
    assert!(script.contains("ip saddr != 10.214.0.2 drop"), "{script}");
    assert!(
        script.contains("add rule inet kv e-kv-0 accept"),
        "{script}"
    );
    assert_eq!(d.net_isolation().unwrap().attached(), ["kv-0"]);

    cmd.clear();
    d.destroy(&req.instance_id).await.unwrap();
    let lines = log(&cmd, "kv-0");
    let unshaped = position(&lines, "tc qdisc del dev kv-0 root");
    let ifb = position(&lines, "ip link delete kvi0");
    let unruled = position(&lines, "nft delete chains of kv-0");
    let removed = position(&lines, "ip link del kv-0");
    assert!(
        unshaped < removed && ifb < removed && unruled < removed,
        "{lines:#?}"
    );
    assert!(d.net_isolation().unwrap().attached().is_empty());

    cmd.clear();
    d.shutdown().await.unwrap();
    assert!(
        log(&cmd, "kv-0").contains(&"nft delete table inet kv".to_owned()),
        "shutdown keeps the table"
    );
}

#[tokio::test]
async fn a_pooled_vm_is_attached_when_an_instance_takes_it_with_its_egress_mode() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = Arc::new(RecordingCommands::new());
    let mut config = fixture(dir.path(), "kv");
    config.premade.enabled = true;
    config.premade.max_per_runtime = 1;
    let d = driver(dir.path(), config, cmd.clone(), true).await.unwrap();
    cmd.clear();
    d.prewarm(PoolKey::new(RuntimeName::CustomDebian12, 256, 1500))
        .await
        .unwrap();
    let lines = log(&cmd, "kv-0");
    position(&lines, "ip tuntap add dev kv-0");
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("nft") || l.starts_with("tc")),
        "a pooled VM is not attached before a function takes it: {lines:#?}"
    );
    assert!(d.net_isolation().unwrap().attached().is_empty());

    // A function with no egress at all takes the pooled VM.
    cmd.clear();
    let req = request(dir.path(), serde_json::json!({"internet_access": false}));
    d.create(&req).await.unwrap();
    let lines = log(&cmd, "kv-0");
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("ip tuntap add dev kv-0")),
        "the pooled tap was reused: {lines:#?}"
    );
    position(&lines, "nft add chains of kv-0");
    position(&lines, "tc qdisc replace dev kv-0 root tbf rate 100mbit");
    let script = script_of(&cmd, "kv-0");
    assert!(script.contains("ip saddr != 10.214.0.2 drop"), "{script}");
    assert!(
        !script.contains("add rule inet kv e-kv-0 accept"),
        "egress none must not accept: {script}"
    );
    assert_eq!(d.net_isolation().unwrap().attached(), ["kv-0"]);

    // Destroy detaches before the tap goes; the refilled pool's VM stays
    // unattached.
    for _ in 0..500 {
        if d.pooled(PoolKey::new(RuntimeName::CustomDebian12, 256, 1500)) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cmd.clear();
    d.destroy(&req.instance_id).await.unwrap();
    let lines = log(&cmd, "kv-0");
    assert!(
        position(&lines, "nft delete chains of kv-0") < position(&lines, "ip link del kv-0"),
        "{lines:#?}"
    );
    assert!(d.net_isolation().unwrap().attached().is_empty());
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_attach_that_fails_fails_the_create_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = Arc::new(RecordingCommands::new());
    let d = driver(dir.path(), fixture(dir.path(), "kv"), cmd.clone(), true)
        .await
        .unwrap();
    cmd.clear();
    // A VPC this node does not serve: refused before any rule is made.
    let req = request(
        dir.path(),
        serde_json::json!({"internet_access": true, "vpc": {
            "vpc_id": "vpc-x", "vswitch_ids": ["vsw-x"], "security_group_id": "sg-x"}}),
    );
    let err = d.create(&req).await.unwrap_err();
    assert!(
        matches!(&err, SandboxError::Unenforceable(_))
            && kiln_core::error_chain(&err).contains("vpc-x"),
        "{err:?}"
    );
    let lines = log(&cmd, "kv-0");
    assert!(!lines.iter().any(|l| l.starts_with("nft")), "{lines:#?}");
    position(&lines, "ip link del kv-0");
    assert!(d.list().await.unwrap().is_empty());
    assert!(d.net_isolation().unwrap().attached().is_empty());
    assert_eq!(
        std::fs::read_dir(dir.path().join("state/microvm/vms"))
            .unwrap()
            .count(),
        0
    );
}

/// The claim protocol: a pooled VM gets the function's policy before
/// anything of the function. A function whose attach fails (a VPC this
/// node does not serve) never has its VM resumed, its disks added or its
/// guest configured, and the VM is destroyed, not returned to the pool.
#[tokio::test]
async fn a_pooled_vm_is_attached_before_it_is_resumed_or_given_disks() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = Arc::new(RecordingCommands::new());
    let mut config = fixture(dir.path(), "kv");
    config.premade.enabled = true;
    config.premade.max_per_runtime = 1;
    // Unjailed, so the fake VMM can append its calls to the record file.
    config.jail = kiln_sandbox::microvm::JailConfig {
        insecure_disabled: true,
        ..Default::default()
    };
    let record = dir.path().join("calls.log");
    std::fs::write(&record, b"").unwrap();
    let d = MicroVmDriver::with_backends(
        config,
        &dir.path().join("state"),
        MicroVmBackends {
            taps: Arc::new(CommandTaps::new(cmd.clone())),
            cgroups: Arc::new(RecordingCgroups::default()),
            vmm_env: vec![("KILN_FAKE_VMM_RECORD".into(), record.display().to_string())],
        },
    )
    .await
    .unwrap()
    .isolate_network(network_config(), cmd.clone())
    .await
    .unwrap();
    let key = PoolKey::new(RuntimeName::CustomDebian12, 256, 1500);
    d.prewarm(key).await.unwrap();
    let calls = |vm: &str| -> Vec<String> {
        std::fs::read_to_string(&record)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(&format!("{vm} ")) && !l.contains("vmm.ping"))
            .map(|l| l.split_once(' ').unwrap().1.to_owned())
            .collect()
    };
    assert_eq!(
        calls("kv-0"),
        ["vm.create 204", "vm.boot 204", "vm.pause 204"]
    );
    let req = request(
        dir.path(),
        serde_json::json!({"internet_access": true, "vpc": {
            "vpc_id": "vpc-x", "vswitch_ids": ["vsw-x"], "security_group_id": "sg-x"}}),
    );
    let err = d.create(&req).await.unwrap_err();
    assert!(matches!(&err, SandboxError::Unenforceable(_)), "{err:?}");
    assert_eq!(
        calls("kv-0")[..6],
        [
            "vm.create 204",
            "vm.boot 204",
            "vm.pause 204",
            "vm.shutdown 204",
            "vm.delete 204",
            "vmm.shutdown 204"
        ],
        "the pooled VM was resumed or given disks before its policy"
    );
    assert!(d.net_isolation().unwrap().attached().is_empty());
    assert!(d.list().await.unwrap().is_empty());

    // A function this node serves takes the next pooled VM: attached,
    // then resumed and given its code and scratch disks.
    for _ in 0..500 {
        if d.pooled(key) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let vm = d
        .create(&request(dir.path(), serde_json::Value::Null))
        .await
        .unwrap();
    let name = vm
        .log_path
        .parent()
        .and_then(Path::file_name)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let c = calls(&name);
    assert_eq!(
        c[c.len() - 3..],
        ["vm.resume 204", "vm.add-disk 200", "vm.add-disk 200"]
    );
    assert_eq!(d.net_isolation().unwrap().attached(), [name]);
    d.destroy(&vm.instance_id).await.unwrap();
    d.shutdown().await.unwrap();
}

#[tokio::test]
async fn without_a_network_section_taps_are_not_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = Arc::new(RecordingCommands::new());
    let d = driver(dir.path(), fixture(dir.path(), "kv"), cmd.clone(), false)
        .await
        .unwrap();
    assert!(d.net_isolation().is_none());
    let req = request(dir.path(), serde_json::Value::Null);
    d.create(&req).await.unwrap();
    d.destroy(&req.instance_id).await.unwrap();
    let lines = log(&cmd, "kv-0");
    position(&lines, "ip tuntap add dev kv-0");
    position(&lines, "ip link del kv-0");
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("nft") || l.starts_with("tc")),
        "{lines:#?}"
    );
}

#[tokio::test]
async fn the_pool_is_prewarmed_for_the_configured_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let cmd = Arc::new(RecordingCommands::new());
    let mut config = fixture(dir.path(), "kv");
    config.premade.enabled = true;
    config.premade.max_per_runtime = 2;
    config.prewarm = vec![PrewarmSize {
        runtime: RuntimeName::CustomDebian12,
        memory_mb: 256,
        cpu_milli: Some(1500),
    }];
    let d = driver(dir.path(), config, cmd.clone(), false)
        .await
        .unwrap();
    let key = PoolKey::new(RuntimeName::CustomDebian12, 256, 1500);
    assert_eq!(d.pooled(key), 0);
    d.start_prewarm();
    // A prewarm size keeps one paused VM before any demand (more once its
    // demand asks for them).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while d.pooled(key) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool was not pre-warmed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An instance of that size takes one of the pre-warmed VMs.
    let warmed: Vec<String> = std::fs::read_dir(dir.path().join("state/microvm/vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(d.pooled(key), 1);
    assert_eq!(warmed.len(), 1, "{warmed:?}");
    let req = request(dir.path(), serde_json::Value::Null);
    let sb = d.create(&req).await.unwrap();
    let vm = sb
        .log_path
        .parent()
        .and_then(Path::file_name)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(warmed.contains(&vm), "{vm} is not one of {warmed:?}");
    assert!(d.pooled(key) <= 2);
    d.destroy(&req.instance_id).await.unwrap();
    d.shutdown().await.unwrap();
    assert_eq!(d.pooled(key), 0);
}

// ---- real host ----------------------------------------------------------

fn skip_reason() -> Option<(Category, String)> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some((Category::Root, "needs root".into()));
    }
    for tool in ["ip", "nft", "tc", "mkfs.erofs", "mkfs.ext4"] {
        let ok = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some((
                Category::Tool,
                format!("{tool} is not installed (scripts/install-deps.sh installs it)"),
            ));
        }
    }
    None
}

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_real_tap_gets_its_chains_and_shaping_and_loses_them_on_destroy() {
    if let Some((category, why)) = skip_reason() {
        return skip(category, why);
    }
    // A per-run prefix; every name below carries it.
    let prefix = format!("m{:04x}", std::process::id() & 0xffff);
    // Everything runs on a thread in a network namespace of its own: the
    // tools it spawns (ip, nft, tc, the VMM) are in it, and the taps, ifbs
    // and the table go with it when the thread ends, however it ends.
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        sh(&["ip", "link", "set", "lo", "up"]).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(real_tap_test(prefix));
    })
    .join()
    .map_err(|_| "the test failed (see above)")
    .unwrap();
}

async fn real_tap_test(prefix: String) {
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("{prefix}-0");
    let ifb = format!("{prefix}i0");
    let mut config = fixture(dir.path(), &prefix);
    config.vmm_uid = Some(65534);
    config.vmm_gid = Some(65534);
    config.jail.insecure_disabled = true;
    let d = driver(dir.path(), config, Arc::new(SystemCommands), true)
        .await
        .unwrap();
    let req = request(dir.path(), serde_json::Value::Null);
    d.create(&req).await.unwrap();

    // The tap: a tap device owned by the VMM's user, with the host's .1/30.
    // (`ip`, not /sys/class/net: sysfs shows the namespace it was mounted in.)
    let link = sh(&["ip", "-d", "link", "show", "dev", &tap]).unwrap();
    assert!(
        link.contains("tun type tap")
            && (link.contains("user 65534") || link.contains("user nobody")),
        "{link}"
    );
    let addr = sh(&["ip", "-o", "addr", "show", "dev", &tap]).unwrap();
    assert!(addr.contains("10.214.0.1/30"), "{addr}");
    // Its chains, with the guest's address as the only accepted source.
    let egress = sh(&["nft", "list", "chain", "inet", &prefix, &format!("e-{tap}")]).unwrap();
    assert!(egress.contains("ip saddr != 10.214.0.2 drop"), "{egress}");
    sh(&["nft", "list", "chain", "inet", &prefix, &format!("i-{tap}")]).unwrap();
    let map = sh(&["nft", "list", "map", "inet", &prefix, "egress"]).unwrap();
    assert!(map.contains(&format!("\"{tap}\"")), "{map}");
    // Shaped both ways at the standard rate.
    let qdisc = sh(&["tc", "qdisc", "show", "dev", &tap]).unwrap();
    assert!(
        qdisc.contains("tbf") && qdisc.contains("100Mbit"),
        "{qdisc}"
    );
    assert!(qdisc.contains("ingress"), "{qdisc}");
    let filter = sh(&["tc", "filter", "show", "dev", &tap, "parent", "ffff:"]).unwrap();
    assert!(filter.contains(&ifb), "{filter}");
    let up = sh(&["tc", "qdisc", "show", "dev", &ifb]).unwrap();
    assert!(up.contains("tbf") && up.contains("100Mbit"), "{up}");

    d.destroy(&req.instance_id).await.unwrap();
    assert!(sh(&["ip", "link", "show", &tap]).is_err(), "{tap} is left");
    assert!(sh(&["ip", "link", "show", &ifb]).is_err(), "{ifb} is left");
    assert!(
        sh(&["nft", "list", "chain", "inet", &prefix, &format!("e-{tap}")]).is_err(),
        "the tap's chain is left"
    );
    let map = sh(&["nft", "list", "map", "inet", &prefix, "egress"]).unwrap();
    assert!(!map.contains(&format!("\"{tap}\"")), "{map}");

    d.shutdown().await.unwrap();
    assert!(
        sh(&["nft", "list", "table", "inet", &prefix]).is_err(),
        "shutdown keeps the table"
    );
}
