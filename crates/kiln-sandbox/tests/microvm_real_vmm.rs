//! The API client and the driver against a real cloud-hypervisor binary,
//! when one is on the machine (`$KILN_CLOUD_HYPERVISOR` or `cloud-hypervisor`
//! on PATH) with the guest image (`$KILN_GUEST_CACHE`, default
//! /var/cache/kiln/guest) and /dev/kvm; otherwise each test says why it
//! skips. On machines where KVM guests make no progress (nested, as here)
//! the VMM still answers its whole API; the guest just never reports ready.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use kiln_sandbox::microvm::api::{
    ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, NetConfig, PayloadConfig, VmConfig,
    VmState, VsockConfig,
};
use kiln_sandbox::microvm::host::{IpTaps, TapOps, TapSpec};
use kiln_sandbox::microvm::{MicroVmConfig, MicroVmDriver, VmmClient};
use kiln_sandbox::{SandboxDriver, SandboxRequest};
use kiln_test_support::Category;

struct Real {
    binary: PathBuf,
    guest: PathBuf,
}

fn real() -> Option<Real> {
    let skip = |category: Category, why: String| {
        kiln_test_support::skip(category, why);
        None
    };
    if !nix::unistd::geteuid().is_root() {
        return skip(Category::Root, "needs root (taps, cgroups)".into());
    }
    let binary = std::env::var_os("KILN_CLOUD_HYPERVISOR")
        .map(PathBuf::from)
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|d| d.join("cloud-hypervisor"))
                .find(|p| p.is_file())
        });
    let Some(binary) = binary.filter(|b| b.is_file()) else {
        return skip(
            Category::CloudHypervisor,
            "no cloud-hypervisor binary (set KILN_CLOUD_HYPERVISOR or put it on PATH)".into(),
        );
    };
    if !Path::new("/dev/kvm").exists() {
        return skip(Category::Kvm, "/dev/kvm does not exist".into());
    }
    let guest = PathBuf::from(
        std::env::var_os("KILN_GUEST_CACHE").unwrap_or_else(|| "/var/cache/kiln/guest".into()),
    );
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        if !guest.join(f).is_file() {
            return skip(
                Category::Artifact,
                format!(
                    "{} is missing (build it with images/guest/build.sh)",
                    guest.join(f).display()
                ),
            );
        }
    }
    Some(Real { binary, guest })
}

fn prefix(tag: &str) -> String {
    format!("{tag}{:x}", std::process::id() % 0xfffff)
}

struct TapGuard(String);

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// Kills the VMM when the test ends, however it ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_real_vmm_accepts_every_call_the_client_makes() {
    let Some(real) = real() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let tap = format!("{}-0", prefix("rc"));
    let _tap_guard = TapGuard(tap.clone());
    IpTaps::default()
        .create(&TapSpec {
            name: tap.clone(),
            host_cidr: "10.217.3.1/30".into(),
            owner: None,
        })
        .await
        .unwrap();
    let api = dir.path().join("api.sock");
    let child = Command::new(&real.binary)
        .args(["--api-socket", &format!("path={}", api.display())])
        .args(["--seccomp", "true"])
        .stdout(std::fs::File::create(dir.path().join("vmm.log")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("vmm.err")).unwrap())
        .spawn()
        .unwrap();
    let _child = ChildGuard(child);
    let client = VmmClient::new(&api, Duration::from_secs(10));
    let mut pinged = None;
    for _ in 0..200 {
        if let Ok(p) = client.ping().await {
            pinged = Some(p);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let ping = pinged.expect("the VMM's API comes up");
    assert!(!ping.version.is_empty());
    let config = VmConfig {
        payload: PayloadConfig {
            kernel: Some(real.guest.join("vmlinuz").display().to_string()),
            initramfs: Some(real.guest.join("initramfs.cpio.gz").display().to_string()),
            cmdline: Some("console=ttyS0 panic=-1 quiet".into()),
        },
        cpus: Some(CpusConfig {
            boot_vcpus: 1,
            max_vcpus: 1,
        }),
        memory: Some(MemoryConfig {
            size: 256 << 20,
            shared: None,
        }),
        disks: vec![],
        net: vec![NetConfig {
            tap: tap.clone(),
            mac: Some("02:6b:6e:00:00:01".into()),
            id: Some("net0".into()),
        }],
        rng: None,
        serial: Some(ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some(dir.path().join("console.log").display().to_string()),
        }),
        console: Some(ConsoleConfig {
            mode: ConsoleMode::Off,
            file: None,
        }),
        vsock: Some(VsockConfig {
            cid: 3,
            socket: dir.path().join("vsock.sock").display().to_string(),
            id: Some("vsock0".into()),
        }),
    };
    client.create(&config).await.unwrap();
    assert_eq!(client.info().await.unwrap().state, VmState::Created);
    client.boot().await.unwrap();
    assert_eq!(client.info().await.unwrap().state, VmState::Running);
    // The pool hot-plugs code and scratch disks into a running VM.
    let image = dir.path().join("code.erofs");
    std::fs::create_dir_all(dir.path().join("code")).unwrap();
    std::fs::write(dir.path().join("code/f"), b"x").unwrap();
    let out = Command::new("mkfs.erofs")
        .arg(&image)
        .arg(dir.path().join("code"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let added = client
        .add_disk(&kiln_sandbox::microvm::api::DiskConfig {
            path: image.display().to_string(),
            readonly: Some(true),
            id: Some("code".into()),
            serial: Some("kiln-code".into()),
            image_type: Some("Raw".into()),
        })
        .await
        .unwrap();
    assert_eq!(added.id, "code");
    client.pause().await.unwrap();
    assert_eq!(client.info().await.unwrap().state, VmState::Paused);
    client.resume().await.unwrap();
    assert_eq!(client.info().await.unwrap().state, VmState::Running);
    client.counters().await.unwrap();
    client.shutdown().await.unwrap();
    client.delete().await.unwrap();
    client.shutdown_vmm().await.unwrap();
}

#[tokio::test]
async fn the_driver_drives_the_real_vmm_and_leaves_nothing() {
    let Some(real) = real() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("code")).unwrap();
    std::fs::write(root.join("code/server"), b"#!/bin/sh\n").unwrap();
    let prefix = prefix("rd");
    let config = MicroVmConfig {
        cloud_hypervisor_path: Some(real.binary),
        kernel: real.guest.join("vmlinuz"),
        initramfs: real.guest.join("initramfs.cpio.gz"),
        rootfs_dir: Some(root.join("rootfs")),
        name_prefix: prefix.clone(),
        cgroup_parent: format!("kiln-test-{prefix}"),
        instance_subnet: "10.217.8.0/24".parse().unwrap(),
        boot_timeout_ms: 5_000,
        ..MicroVmConfig::default()
    };
    let driver = MicroVmDriver::new(config, &root.join("state"))
        .await
        .unwrap();
    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
        "account_id": "1234", "function_name": "hello", "revision": "",
        "runtime": RuntimeName::Custom, "handler": "h", "command": ["/code/server"],
        "args": [], "port": 9000, "environment": {}, "memory_mb": 256, "cpu_milli": 500,
        "disk_mb": 512, "timeout_s": 3, "concurrency": 1,
        "code_digest": "cd".repeat(32), "code_size": 10
    }))
    .unwrap();
    let req = SandboxRequest {
        instance_id: InstanceId::generate(),
        spec: spec.seal(),
        code_dir: root.join("code"),
        image: None,
    };
    // The shell script cannot run in the empty `custom` root, so on a KVM
    // host the guest refuses to start it; where guests make no progress it
    // never reports ready. Either way the VMM accepted ping, create and
    // boot with the driver's bodies (an API refusal would say "answered").
    match driver.create(&req).await {
        Ok(sb) => {
            driver.destroy(&sb.instance_id).await.unwrap();
            panic!("a shell script started in an empty root");
        }
        Err(e) => {
            let msg = e.to_string();
            eprintln!("create ended as expected without a running guest: {msg}");
            assert!(
                msg.contains("did not report ready") || msg.contains("cannot start the function"),
                "{msg}"
            );
            assert!(!msg.contains("answered"), "{msg}");
        }
    }
    let vms: Vec<_> = std::fs::read_dir(root.join("state/microvm/vms"))
        .unwrap()
        .collect();
    assert!(vms.is_empty(), "VM directories left: {vms:?}");
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("{prefix}-")),
        "a tap is left"
    );
    for c in ["memory", "cpu", "pids", ""] {
        let d = Path::new("/sys/fs/cgroup")
            .join(c)
            .join(format!("kiln-test-{prefix}"));
        if d.exists() {
            let left: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .collect();
            assert!(left.is_empty(), "cgroups left: {left:?}");
            let _ = std::fs::remove_dir(&d);
        }
    }
}
