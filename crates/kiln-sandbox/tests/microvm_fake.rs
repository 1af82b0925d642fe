//! The microVM driver against the fake cloud-hypervisor
//! (`fake-cloud-hypervisor`, built from this crate): the real driver,
//! process handling, API client, erofs/ext4 images, hybrid vsock and guest
//! protocol; fake taps and cgroups. The fake checks every request body
//! against the OpenAPI schemas and records the call order.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use kiln_sandbox::cgroup::RecordingCgroups;
use kiln_sandbox::microvm::host::RecordingTaps;
use kiln_sandbox::microvm::{JailConfig, MicroVmBackends, MicroVmConfig, MicroVmDriver, PoolKey};
use kiln_sandbox::{rootfs_path, SandboxDriver, SandboxError, SandboxRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");
/// The VMMs run as nobody, as they would on a node.
const VMM_UID: u32 = 65534;

struct Harness {
    dir: tempfile::TempDir,
    taps: Arc<RecordingTaps>,
    cgroups: Arc<RecordingCgroups>,
    driver: MicroVmDriver,
}

impl Harness {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn record(&self) -> PathBuf {
        self.dir.path().join("calls.log")
    }
    fn code(&self) -> PathBuf {
        self.dir.path().join("code")
    }

    /// Recorded calls per VM, pings left out (the driver pings until the
    /// API socket is up).
    fn calls(&self) -> Vec<(String, String)> {
        std::fs::read_to_string(self.record())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut p = l.split(' ');
                let (vm, op, status) = (p.next()?, p.next()?, p.next()?);
                (op != "vmm.ping").then(|| (vm.to_owned(), format!("{op} {status}")))
            })
            .collect()
    }

    fn calls_of(&self, vm: &str) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|(v, _)| v == vm)
            .map(|(_, c)| c)
            .collect()
    }

    fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state().join("microvm/vms"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Nothing of any VM is left: no directory, tap, cgroup.
    fn assert_nothing_left(&self) {
        assert_eq!(self.vms(), Vec::<String>::new(), "VM directories left");
        assert!(self.taps.taps.lock().unwrap().is_empty(), "taps left");
        assert_eq!(self.cgroups.paths(), Vec::<String>::new(), "cgroups left");
    }

    fn request(&self, runtime: RuntimeName) -> SandboxRequest {
        let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
            "account_id": "1234",
            "function_name": "hello",
            "revision": "",
            "runtime": runtime,
            "handler": "index.handler",
            "command": ["/code/server"],
            "args": [],
            "port": 9000,
            "environment": {"GREETING": "hi"},
            "memory_mb": 256,
            "cpu_milli": 1500,
            "disk_mb": 512,
            "timeout_s": 3,
            "concurrency": 1,
            "code_digest": "ab".repeat(32),
            "code_size": 10,
        }))
        .unwrap();
        SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir: self.code(),
            image: None,
        }
    }
}

fn config(dir: &Path) -> MicroVmConfig {
    MicroVmConfig {
        cloud_hypervisor_path: Some(FAKE.into()),
        kernel: dir.join("guest/vmlinuz"),
        initramfs: dir.join("guest/initramfs.img"),
        rootfs_dir: Some(dir.join("rootfs")),
        vmm_uid: Some(VMM_UID),
        vmm_gid: Some(VMM_UID),
        // These tests follow the driver's API calls in the record file,
        // which a jailed fake cannot reach: microvm_jail.rs runs it jailed.
        jail: JailConfig {
            insecure_disabled: true,
            ..JailConfig::default()
        },
        api_timeout_ms: 2_000,
        boot_timeout_ms: 5_000,
        ..MicroVmConfig::default()
    }
}

async fn harness_with(fail: &str, tune: impl FnOnce(&mut MicroVmConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(root.join("guest")).unwrap();
    std::fs::write(root.join("guest/vmlinuz"), b"kernel").unwrap();
    std::fs::write(root.join("guest/initramfs.img"), b"initramfs").unwrap();
    let tree = rootfs_path(&root.join("rootfs"), RuntimeName::CustomDebian12);
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::write(tree.join("usr/bin/python3"), b"#!python").unwrap();
    std::fs::create_dir_all(root.join("code")).unwrap();
    std::fs::write(root.join("code/server"), b"#!/bin/sh\n").unwrap();
    let record = root.join("calls.log");
    std::fs::write(&record, b"").unwrap();
    std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut cfg = config(root);
    tune(&mut cfg);
    let taps = Arc::new(RecordingTaps::default());
    let cgroups = Arc::new(RecordingCgroups::default());
    let mut env = vec![(
        "KILN_FAKE_VMM_RECORD".to_owned(),
        record.display().to_string(),
    )];
    if !fail.is_empty() {
        env.push(("KILN_FAKE_VMM_FAIL".into(), fail.into()));
    }
    let driver = MicroVmDriver::with_backends(
        cfg,
        &root.join("state"),
        MicroVmBackends {
            taps: taps.clone(),
            cgroups: cgroups.clone(),
            vmm_env: env,
        },
    )
    .await
    .unwrap();
    Harness {
        dir,
        taps,
        cgroups,
        driver,
    }
}

async fn harness() -> Harness {
    harness_with("", |_| {}).await
}

/// `POST /invoke` to an endpoint; the status line and body.
async fn invoke(addr: std::net::SocketAddr, body: &str) -> (String, String) {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post("/invoke")
        .header("host", "fc")
        .header("x-fc-request-id", "req-1")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = format!("HTTP/1.1 {}", resp.status());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .contains("State:\tZ")
}

fn uid_of(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn create_invoke_freeze_thaw_destroy_in_the_documented_order() {
    let h = harness().await;
    let req = h.request(RuntimeName::CustomDebian12);
    let sb = h.driver.create(&req).await.unwrap();
    let pid = sb.pid.unwrap();
    assert!(sb.endpoint.ip().is_loopback());
    assert_eq!(uid_of(pid), VMM_UID, "the VMM runs unprivileged");
    assert!(h.driver.is_running(&req.instance_id).await.unwrap());
    assert_eq!(
        h.driver.list().await.unwrap(),
        vec![req.instance_id.clone()]
    );
    let vm = h.vms().pop().unwrap();
    assert_eq!(
        h.taps
            .taps
            .lock()
            .unwrap()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        vec![vm.clone()]
    );
    let parent = MicroVmConfig::default().cgroup_parent;
    assert_eq!(h.cgroups.procs(&format!("/{parent}/{vm}")), vec![pid]);

    // The call goes through the relay, vsock and the guest protocol.
    let (status, body) = invoke(sb.endpoint, "ping").await;
    assert!(status.contains("200"), "{status}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["instance"], req.instance_id.to_string());
    assert_eq!(answer["echo"], "ping");
    assert_eq!(answer["requestId"], "req-1");
    // The function's output reaches the sandbox's log over the protocol.
    let mut log = String::new();
    for _ in 0..200 {
        log = std::fs::read_to_string(&sb.log_path).unwrap_or_default();
        if log.contains("request req-1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        log,
        "toy function /code/server listening\ntoy function /invoke called, request req-1\n"
    );

    let stats = h.driver.stats(&req.instance_id).await.unwrap().unwrap();
    assert_eq!(
        (stats.net_rx_bytes, stats.net_tx_bytes),
        (Some(1500), Some(700))
    );
    assert_eq!(stats.memory_limit_bytes, Some(256 << 20));
    assert!(!stats.frozen);

    // Frozen, the guest answers nothing; thawed, it answers.
    h.driver.freeze(&req.instance_id).await.unwrap();
    h.driver.freeze(&req.instance_id).await.unwrap();
    assert!(
        h.driver
            .stats(&req.instance_id)
            .await
            .unwrap()
            .unwrap()
            .frozen
    );
    let endpoint = sb.endpoint;
    let pending = tokio::spawn(async move { invoke(endpoint, "later").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a paused VM answered");
    h.driver.thaw(&req.instance_id).await.unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.contains("200") && body.contains("later"),
        "{status} {body}"
    );

    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.destroy(&req.instance_id).await.unwrap();
    assert!(!process_exists(pid), "the VMM is still running");
    h.assert_nothing_left();
    assert!(h.driver.list().await.unwrap().is_empty());
    assert!(matches!(
        h.driver.freeze(&req.instance_id).await,
        Err(SandboxError::NotFound(_))
    ));
    assert_eq!(
        h.calls_of(&vm),
        [
            "vm.create 204",
            "vm.boot 204",
            "vm.counters 200",
            "vm.info 200",
            "vm.pause 204",
            "vm.pause 405",
            "vm.counters 200",
            "vm.info 200",
            "vm.resume 204",
            "vm.shutdown 204",
            "vm.delete 204",
            "vmm.shutdown 204",
        ]
    );
    // Built once per digest and per runtime, readable by the VMM's user.
    let images = h.state().join("microvm/images");
    for name in [
        "runtime-custom.debian12.erofs",
        &format!("code-{}.erofs", "ab".repeat(32)),
    ] {
        let meta = std::fs::metadata(images.join(name)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644, "{name}");
    }
}

#[tokio::test]
async fn the_pool_hands_out_restored_snapshots() {
    let h = harness_with("", |c| {
        c.premade.enabled = true;
        c.premade.max_per_runtime = 1;
        c.snapshots = true;
    })
    .await;
    let req = h.request(RuntimeName::Custom);
    let key = PoolKey::new(RuntimeName::Custom, 256, 1500);
    assert_eq!(key.vcpus, 2);
    h.driver.prewarm(key).await.unwrap();
    assert_eq!(h.driver.pooled(key), 1);
    // The template VM booted, was snapshotted and went; its slot (and
    // name) went to the first clone, restored from the snapshot.
    let pooled = h.vms().pop().unwrap();
    let mut expected = vec![
        "vm.create 204",
        "vm.boot 204",
        "vm.pause 204",
        "vm.snapshot 204",
        "vm.shutdown 204",
        "vm.delete 204",
        "vmm.shutdown 204",
        "vm.restore 204",
    ];
    assert_eq!(h.calls_of(&pooled), expected);

    // The instance gets the pooled VM: resumed, its disks hot-plugged.
    let sb = h.driver.create(&req).await.unwrap();
    let (status, body) = invoke(sb.endpoint, "warm").await;
    assert!(
        status.contains("200") && body.contains("warm"),
        "{status} {body}"
    );
    expected.extend(["vm.resume 204", "vm.add-disk 200", "vm.add-disk 200"]);
    assert_eq!(h.calls_of(&pooled), expected);
    // And the pool refills in the background, from the same snapshot.
    for _ in 0..200 {
        if h.driver.pooled(key) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(h.driver.pooled(key), 1);
    let snapshots = h
        .calls()
        .iter()
        .filter(|(_, c)| c.starts_with("vm.snapshot"))
        .count();
    assert_eq!(snapshots, 1, "the snapshot is taken once");
    assert_eq!(h.vms().len(), 2);

    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn a_pool_without_snapshots_keeps_booted_paused_vms() {
    let h = harness_with("", |c| {
        c.premade.enabled = true;
        c.premade.max_per_runtime = 1;
    })
    .await;
    let key = PoolKey::new(RuntimeName::CustomDebian12, 256, 1500);
    h.driver.prewarm(key).await.unwrap();
    let pooled = h.vms().pop().unwrap();
    assert_eq!(
        h.calls_of(&pooled),
        ["vm.create 204", "vm.boot 204", "vm.pause 204"]
    );
    let req = h.request(RuntimeName::CustomDebian12);
    let sb = h.driver.create(&req).await.unwrap();
    let (status, _) = invoke(sb.endpoint, "x").await;
    assert!(status.contains("200"), "{status}");
    assert_eq!(
        h.calls_of(&pooled)[3..],
        ["vm.resume 204", "vm.add-disk 200", "vm.add-disk 200"]
    );
    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

async fn assert_create_fails(fail: &str, tune: impl FnOnce(&mut MicroVmConfig), expect: &str) {
    let h = harness_with(fail, tune).await;
    let req = h.request(RuntimeName::Custom);
    let started = std::time::Instant::now();
    let err = h.driver.create(&req).await.unwrap_err();
    assert!(matches!(err, SandboxError::Vmm { .. }), "{err:?}");
    let chain = kiln_core::error_chain(&err);
    assert!(chain.contains(expect), "{chain}");
    assert!(started.elapsed() < Duration::from_secs(10));
    h.assert_nothing_left();
    assert!(h.driver.list().await.unwrap().is_empty());
    // No VMM of this test is left running.
    let record = h.record().display().to_string();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&environ).contains(&record),
            "a fake VMM is still running: {:?}",
            entry.path()
        );
    }
}

#[tokio::test]
async fn a_vmm_that_exits_is_reported_and_leaves_nothing() {
    assert_create_fails("exit-on=vm.boot", |_| {}, "exited").await;
}

#[tokio::test]
async fn a_hung_api_times_out_and_leaves_nothing() {
    assert_create_fails(
        "hang-on=vm.create",
        |c| c.api_timeout_ms = 300,
        "did not answer",
    )
    .await;
}

#[tokio::test]
async fn a_guest_that_never_reports_ready_times_out_and_leaves_nothing() {
    assert_create_fails(
        "never-ready",
        |c| c.boot_timeout_ms = 500,
        "did not report ready",
    )
    .await;
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let h = harness().await;
    let mut req = h.request(RuntimeName::Custom);
    req.spec.port = 0;
    assert!(h.driver.create(&req).await.is_err());
    let mut req = h.request(RuntimeName::Custom);
    req.spec.code_digest = "../x".into();
    assert!(matches!(
        h.driver.create(&req).await,
        Err(SandboxError::Filesystem { .. })
    ));
    let mut req = h.request(RuntimeName::Custom);
    req.code_dir = h.dir.path().join("missing");
    assert!(h.driver.create(&req).await.is_err());
    std::fs::remove_dir_all(rootfs_path(
        &h.dir.path().join("rootfs"),
        RuntimeName::CustomDebian12,
    ))
    .unwrap();
    let req = h.request(RuntimeName::CustomDebian12);
    assert!(matches!(
        h.driver.create(&req).await,
        Err(SandboxError::RuntimeUnavailable { .. })
    ));
    h.assert_nothing_left();
    assert!(h.calls().is_empty(), "{:?}", h.calls());
}

#[tokio::test]
async fn a_new_driver_removes_what_a_crashed_one_left() {
    let h = harness().await;
    let req = h.request(RuntimeName::Custom);
    let sb = h.driver.create(&req).await.unwrap();
    let pid = sb.pid.unwrap();
    // The agent dies without destroying anything.
    let Harness {
        dir,
        taps,
        cgroups,
        driver,
    } = h;
    std::mem::forget(driver);
    assert!(process_exists(pid));
    let root = dir.path();
    let again = MicroVmDriver::with_backends(
        config(root),
        &root.join("state"),
        MicroVmBackends {
            taps: taps.clone(),
            cgroups: cgroups.clone(),
            vmm_env: vec![],
        },
    )
    .await
    .unwrap();
    assert!(!process_exists(pid), "the leftover VMM was not stopped");
    let h = Harness {
        dir,
        taps,
        cgroups,
        driver: again,
    };
    h.assert_nothing_left();
}

async fn read_all(mut r: kiln_sandbox::exec::ExecReader) -> String {
    let mut s = String::new();
    r.read_to_string(&mut s).await.unwrap();
    s
}

#[tokio::test]
async fn exec_runs_a_session_in_the_guest() {
    use kiln_sandbox::ExecRequest;
    let h = harness().await;
    let req = h.request(RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    let id = &req.instance_id;
    let run = |command: &[&str], tty: bool, stdin: bool| ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        tty,
        stdin,
    };

    let mut p = h
        .driver
        .exec(id, &run(&["echo", "hi", "there"], false, false))
        .await
        .unwrap();
    assert!(p.stdin.is_none());
    assert_eq!(read_all(p.stdout).await, "hi there\n");
    assert_eq!(read_all(p.stderr.take().unwrap()).await, "");
    assert_eq!(p.child.wait().await.unwrap(), 0);

    // stdin streams in, EOF closes it; stderr is its own stream.
    let mut p = h
        .driver
        .exec(id, &run(&["cat"], false, true))
        .await
        .unwrap();
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(b"line one\nline two\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    drop(stdin);
    assert_eq!(read_all(p.stdout).await, "line one\nline two\n");
    assert_eq!(read_all(p.stderr.take().unwrap()).await, "bye\n");
    assert_eq!(p.child.wait().await.unwrap(), 0);

    // With a tty, stderr joins stdout.
    let mut p = h
        .driver
        .exec(id, &run(&["cat"], true, false))
        .await
        .unwrap();
    assert!(p.stderr.is_none());
    assert_eq!(read_all(p.stdout).await, "bye\n");
    assert_eq!(p.child.wait().await.unwrap(), 0);

    let mut p = h
        .driver
        .exec(id, &run(&["exit", "3"], false, false))
        .await
        .unwrap();
    assert_eq!(p.child.wait().await.unwrap(), 3);

    let mut p = h
        .driver
        .exec(id, &run(&["sh"], false, false))
        .await
        .unwrap();
    let err = p.child.wait().await.unwrap_err();
    let chain = kiln_core::error_chain(&err);
    assert!(chain.contains("no such command"), "{chain}");

    assert!(h.driver.exec(id, &run(&[], false, false)).await.is_err());
    let unknown = InstanceId::generate();
    assert!(matches!(
        h.driver.exec(&unknown, &run(&["echo"], false, false)).await,
        Err(SandboxError::NotFound(_))
    ));
    h.driver.destroy(id).await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn a_vmm_that_dies_later_is_seen_and_cleaned_up() {
    let h = harness().await;
    let req = h.request(RuntimeName::Custom);
    let sb = h.driver.create(&req).await.unwrap();
    assert!(h.driver.is_running(&req.instance_id).await.unwrap());
    let pid = nix::unistd::Pid::from_raw(sb.pid.unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let mut running = true;
    for _ in 0..200 {
        running = h.driver.is_running(&req.instance_id).await.unwrap();
        if !running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!running, "a dead VMM is reported running");
    let err = h.driver.freeze(&req.instance_id).await.unwrap_err();
    let chain = kiln_core::error_chain(&err);
    assert!(chain.contains("exited"), "{chain}");
    h.driver.destroy(&req.instance_id).await.unwrap();
    h.assert_nothing_left();
}

/// Two layers, listed second-digest first so that the order is the
/// function's, not the digests'.
fn with_layers(h: &Harness, mut req: SandboxRequest) -> (SandboxRequest, Vec<String>) {
    let layers = vec!["d2".repeat(32), "c1".repeat(32)];
    for (i, digest) in layers.iter().enumerate() {
        // Beside the code directory, as the agent's cache keeps them.
        let dir = h.dir.path().join(digest);
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::write(dir.join("lib/layer.txt"), format!("layer {i}")).unwrap();
    }
    let mut spec = req.spec.clone();
    spec.layers = layers.clone();
    req.spec = spec.seal();
    assert_eq!(
        req.layer_dirs(),
        vec![h.dir.path().join(&layers[0]), h.dir.path().join(&layers[1])]
    );
    (req, layers)
}

/// The VM's disks as its VMM holds them: (id, image file name, readonly).
async fn vm_disks(h: &Harness, vm: &str) -> Vec<(String, String, bool)> {
    let client = kiln_sandbox::microvm::VmmClient::new(
        h.state().join("microvm/vms").join(vm).join("api.sock"),
        Duration::from_secs(2),
    );
    let info = client.info().await.unwrap();
    let Some(disks) = info.config.get("disks") else {
        return vec![];
    };
    disks
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let path = Path::new(d["path"].as_str().unwrap());
            (
                d["id"].as_str().unwrap().to_owned(),
                path.file_name().unwrap().to_string_lossy().into_owned(),
                d["readonly"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The configuration the (fake) guest was given.
async fn guest_config(h: &Harness, id: &InstanceId) -> serde_json::Value {
    let run = kiln_sandbox::ExecRequest {
        command: vec!["guest-config".into()],
        tty: false,
        stdin: false,
    };
    let mut p = h.driver.exec(id, &run).await.unwrap();
    let out = read_all(p.stdout).await;
    assert_eq!(p.child.wait().await.unwrap(), 0);
    serde_json::from_str(&out).unwrap()
}

fn devices(config: &serde_json::Value, what: &str) -> Vec<String> {
    let d = &config["disks"][what];
    let list = if d.is_array() {
        d.as_array().unwrap().clone()
    } else if d.is_null() {
        vec![]
    } else {
        vec![d.clone()]
    };
    list.iter()
        .map(|d| d["device"].as_str().unwrap().to_owned())
        .collect()
}

fn disk(id: &str, file: &str, readonly: bool) -> (String, String, bool) {
    (id.to_owned(), file.to_owned(), readonly)
}

#[tokio::test]
async fn layers_are_read_only_disks_in_the_functions_order_on_a_cold_boot() {
    let h = harness().await;
    let (req, layers) = with_layers(&h, h.request(RuntimeName::CustomDebian12));
    let sb = h.driver.create(&req).await.unwrap();
    let vm = h.vms().pop().unwrap();
    let code = format!("code-{}.erofs", "ab".repeat(32));
    assert_eq!(
        vm_disks(&h, &vm).await,
        vec![
            disk("runtime", "runtime-custom.debian12.erofs", true),
            disk("layer0", &format!("layer-{}.erofs", layers[0]), true),
            disk("layer1", &format!("layer-{}.erofs", layers[1]), true),
            disk("code", &code, true),
            disk("scratch", "scratch.img", false),
        ]
    );
    assert_eq!(h.calls_of(&vm)[..2], ["vm.create 204", "vm.boot 204"]);
    let config = guest_config(&h, &req.instance_id).await;
    assert_eq!(devices(&config, "runtime"), ["/dev/vda"]);
    assert_eq!(devices(&config, "layers"), ["/dev/vdb", "/dev/vdc"]);
    assert_eq!(devices(&config, "code"), ["/dev/vdd"]);
    assert_eq!(devices(&config, "scratch"), ["/dev/vde"]);
    assert!(config["disks"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["fs"] == "erofs"));
    let (status, _) = invoke(sb.endpoint, "ping").await;
    assert!(status.contains("200"), "{status}");
    h.driver.destroy(&req.instance_id).await.unwrap();

    // The layer images are built once and kept for the next instance.
    let images = h.state().join("microvm/images");
    let built = std::fs::metadata(images.join(format!("layer-{}.erofs", layers[0])))
        .unwrap()
        .modified()
        .unwrap();
    let (again, _) = with_layers(&h, h.request(RuntimeName::CustomDebian12));
    h.driver.create(&again).await.unwrap();
    let after = std::fs::metadata(images.join(format!("layer-{}.erofs", layers[0])))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(built, after, "a layer image is built once");
    h.driver.destroy(&again.instance_id).await.unwrap();
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn layers_are_hot_plugged_read_only_in_order_on_a_pooled_vm() {
    let h = harness_with("", |c| {
        c.premade.enabled = true;
        c.premade.max_per_runtime = 1;
        c.snapshots = true;
    })
    .await;
    let key = PoolKey::new(RuntimeName::Custom, 256, 1500);
    h.driver.prewarm(key).await.unwrap();
    let pooled = h.vms().pop().unwrap();
    assert!(vm_disks(&h, &pooled).await.is_empty());
    let (req, layers) = with_layers(&h, h.request(RuntimeName::Custom));
    let sb = h.driver.create(&req).await.unwrap();
    let calls = h.calls_of(&pooled);
    assert_eq!(
        calls[calls.len() - 5..],
        [
            "vm.resume 204",
            "vm.add-disk 200",
            "vm.add-disk 200",
            "vm.add-disk 200",
            "vm.add-disk 200"
        ]
    );
    assert_eq!(
        vm_disks(&h, &pooled).await,
        vec![
            disk("layer0", &format!("layer-{}.erofs", layers[0]), true),
            disk("layer1", &format!("layer-{}.erofs", layers[1]), true),
            disk("code", &format!("code-{}.erofs", "ab".repeat(32)), true),
            disk("scratch", "scratch.img", false),
        ]
    );
    let config = guest_config(&h, &req.instance_id).await;
    assert_eq!(devices(&config, "runtime"), Vec::<String>::new());
    assert_eq!(devices(&config, "layers"), ["/dev/vda", "/dev/vdb"]);
    assert_eq!(devices(&config, "code"), ["/dev/vdc"]);
    assert_eq!(devices(&config, "scratch"), ["/dev/vdd"]);
    let (status, _) = invoke(sb.endpoint, "warm").await;
    assert!(status.contains("200"), "{status}");
    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn without_layers_the_disks_and_guest_config_are_unchanged() {
    let h = harness().await;
    let req = h.request(RuntimeName::CustomDebian12);
    h.driver.create(&req).await.unwrap();
    let vm = h.vms().pop().unwrap();
    assert_eq!(
        vm_disks(&h, &vm).await,
        vec![
            disk("runtime", "runtime-custom.debian12.erofs", true),
            disk("code", &format!("code-{}.erofs", "ab".repeat(32)), true),
            disk("scratch", "scratch.img", false),
        ]
    );
    let config = guest_config(&h, &req.instance_id).await;
    assert!(config["disks"].get("layers").is_none(), "{config}");
    assert_eq!(devices(&config, "runtime"), ["/dev/vda"]);
    assert_eq!(devices(&config, "code"), ["/dev/vdb"]);
    assert_eq!(devices(&config, "scratch"), ["/dev/vdc"]);
    assert!(!h
        .state()
        .join("microvm/images")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("layer-")));
    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn a_built_in_runtimes_disk_is_named_for_its_bootstraps() {
    let h = harness().await;
    // The built-in runtimes' tree (a stand-in: the image is made from
    // whatever is there).
    let tree = rootfs_path(&h.dir.path().join("rootfs"), RuntimeName::Python311);
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::write(tree.join("usr/bin/python3"), b"#!python").unwrap();
    let req = h.request(RuntimeName::Python311);
    h.driver.create(&req).await.unwrap();
    let vm = h.vms().pop().unwrap();
    // An agent with other bootstraps never boots this image: the name
    // changes with them.
    let image = format!(
        "runtime-python3.11-{}.erofs",
        kiln_sandbox::rootfs::bootstraps_tag()
    );
    assert_eq!(vm_disks(&h, &vm).await[0], disk("runtime", &image, true));
}

// ---- the pool of paused VMs ([sandbox.microvm.premade]) ------------------

/// `vm.json` of every VM directory: (name, VMM pid, instance).
fn records(h: &Harness) -> Vec<(String, u32, Option<String>)> {
    h.vms()
        .into_iter()
        .filter_map(|vm| {
            let bytes =
                std::fs::read(h.state().join("microvm/vms").join(&vm).join("vm.json")).ok()?;
            let rec: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            Some((
                vm,
                rec["pid"].as_u64()? as u32,
                rec["instance_id"].as_str().map(str::to_owned),
            ))
        })
        .collect()
}

/// The VMM pids of the VMs waiting in the pool.
fn pooled_pids(h: &Harness) -> Vec<u32> {
    records(h)
        .into_iter()
        .filter(|(_, _, instance)| instance.is_none())
        .map(|(_, pid, _)| pid)
        .collect()
}

async fn wait_pooled(h: &Harness, key: PoolKey, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.driver.pooled(key) != n {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool of {key:?} has {} VMs, not {n}",
            h.driver.pooled(key)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_gone(pid: u32) {
    for _ in 0..250 {
        if !process_exists(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("VMM {pid} is still running");
}

fn pooled_config(c: &mut MicroVmConfig) {
    c.premade.enabled = true;
    c.premade.max_per_runtime = 2;
}

fn of_account(h: &Harness, account: &str, function: &str) -> SandboxRequest {
    let mut req = h.request(RuntimeName::Custom);
    let mut spec = req.spec.clone();
    spec.account_id = account.parse().unwrap();
    spec.function_name = function.parse().unwrap();
    req.spec = spec.seal();
    req
}

#[tokio::test]
async fn a_pooled_vm_serves_one_instance_of_one_function_and_is_destroyed_at_release() {
    let h = harness_with("", pooled_config).await;
    let key = PoolKey::new(RuntimeName::Custom, 256, 1500);
    h.driver.prewarm(key).await.unwrap();
    assert_eq!(h.driver.pooled(key), 1, "a prewarm size keeps one at first");
    let first = pooled_pids(&h);
    assert_eq!(first.len(), 1);

    // Account 1's instance takes the pooled VM; the pool refills with a
    // VM of its own (a new VMM).
    let a = of_account(&h, "1111", "alpha");
    let sa = h.driver.create(&a).await.unwrap();
    assert_eq!(sa.pid, Some(first[0]), "the instance got the pooled VM");
    let vm_a = sa
        .log_path
        .parent()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let calls = h.calls_of(&vm_a);
    assert_eq!(
        calls[calls.len() - 3..],
        ["vm.resume 204", "vm.add-disk 200", "vm.add-disk 200"]
    );
    let config = guest_config(&h, &a.instance_id).await;
    assert_eq!(config["instanceId"], a.instance_id.to_string());
    assert_eq!(config["process"]["env"]["FC_FUNCTION_NAME"], "alpha");
    wait_pooled(&h, key, 1).await;
    let second = pooled_pids(&h);
    assert_eq!(second.len(), 1);
    assert_ne!(second[0], first[0], "a claimed VM never goes back");

    // Account 2's instance (and another instance of account 1's
    // function) each get a VM of their own.
    let b = of_account(&h, "2222", "alpha");
    let sb = h.driver.create(&b).await.unwrap();
    assert_eq!(sb.pid, Some(second[0]));
    let a2 = of_account(&h, "1111", "alpha");
    let sa2 = h.driver.create(&a2).await.unwrap();
    let pids = [sa.pid.unwrap(), sb.pid.unwrap(), sa2.pid.unwrap()];
    assert!(
        pids[0] != pids[1] && pids[1] != pids[2] && pids[0] != pids[2],
        "{pids:?}"
    );
    for (req, sb) in [(&a, &sa), (&b, &sb), (&a2, &sa2)] {
        let (status, body) = invoke(sb.endpoint, "who").await;
        assert!(status.contains("200"), "{status}");
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(answer["instance"], req.instance_id.to_string());
    }

    // Released: the VMM is gone, its VM never joins the pool again.
    wait_pooled(&h, key, 2).await;
    h.driver.destroy(&a.instance_id).await.unwrap();
    assert!(!process_exists(pids[0]), "the claimed VMM is still running");
    let calls = h.calls_of(&vm_a);
    assert_eq!(
        calls[calls.len() - 3..],
        ["vm.shutdown 204", "vm.delete 204", "vmm.shutdown 204"]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for pid in pooled_pids(&h) {
        assert!(!pids.contains(&pid), "a used VM is back in the pool");
    }
    h.driver.destroy(&b.instance_id).await.unwrap();
    h.driver.destroy(&a2.instance_id).await.unwrap();
    assert!(!process_exists(pids[1]) && !process_exists(pids[2]));
    h.driver.shutdown().await.unwrap();
    assert_eq!(h.driver.pooled(key), 0);
    h.assert_nothing_left();
}

#[tokio::test]
async fn pool_sizes_respect_the_memory_budget() {
    // 640 MiB: 256 + 256 + 128, whatever the demand asks for.
    let h = harness_with("", |c| {
        c.premade.enabled = true;
        c.premade.budget_mb = 640;
        c.premade.max_per_runtime = 8;
    })
    .await;
    let small = PoolKey::new(RuntimeName::Custom, 128, 1000);
    let big = PoolKey::new(RuntimeName::Custom, 256, 1500);
    h.driver.prewarm(small).await.unwrap();
    assert_eq!(h.driver.pooled(small), 1);
    // Three cold starts of 256 MiB within 10 s: demand 3.
    let mut reqs = vec![];
    for _ in 0..3 {
        let req = h.request(RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        reqs.push(req);
    }
    let charged =
        |h: &Harness| h.driver.pooled(small) as u64 * 128 + h.driver.pooled(big) as u64 * 256;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while h.driver.pooled(big) < 2 {
        assert!(charged(&h) <= 640, "over the budget");
        assert!(std::time::Instant::now() < deadline, "not refilled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Settled: the budget is full and nothing more is made.
    for _ in 0..50 {
        assert!(charged(&h) <= 640, "over the budget");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((h.driver.pooled(big), h.driver.pooled(small)), (2, 1));
    assert_eq!(h.vms().len(), 3 + 3, "three instances, three pooled VMs");
    for req in &reqs {
        h.driver.destroy(&req.instance_id).await.unwrap();
    }
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn the_pool_shrinks_to_nothing_under_memory_pressure_and_refills_after() {
    let dir = tempfile::tempdir().unwrap();
    let meminfo = dir.path().join("meminfo");
    let write = |available_kb: u64| {
        std::fs::write(
            &meminfo,
            format!("MemTotal: 1000000 kB\nMemAvailable: {available_kb} kB\n"),
        )
        .unwrap()
    };
    write(800_000);
    let mut h = harness_with("", pooled_config).await;
    h.driver = h.driver.with_meminfo(&meminfo);
    let key = PoolKey::new(RuntimeName::Custom, 256, 1500);
    h.driver.prewarm(key).await.unwrap();
    assert_eq!(h.driver.pooled(key), 1);
    let pid = pooled_pids(&h)[0];
    // Less than 10% available: the pooled VM goes (within the refill's
    // idle check), its VMM with it.
    write(50_000);
    wait_pooled(&h, key, 0).await;
    wait_gone(pid).await;
    for _ in 0..100 {
        if h.vms().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.assert_nothing_left();
    write(800_000);
    wait_pooled(&h, key, 1).await;
    h.driver.shutdown().await.unwrap();
    h.assert_nothing_left();
}

/// Processes whose command line names `dir` (the fake VMMs of a test).
fn processes_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
                && process_exists(*pid)
        })
        .collect()
}

#[test]
fn a_killed_agent_leaves_no_pool_vm_behind() {
    // The agent's runtime goes (its tasks with it: the refill stops
    // mid-way as a killed agent's would) and its driver is never dropped
    // or shut down.
    let agent = tokio::runtime::Runtime::new().unwrap();
    let (h, pids) = agent.block_on(async {
        let h = harness_with("", pooled_config).await;
        let key = PoolKey::new(RuntimeName::Custom, 256, 1500);
        h.driver.prewarm(key).await.unwrap();
        // One instance, and the pool refilling behind it.
        let req = h.request(RuntimeName::Custom);
        h.driver.create(&req).await.unwrap();
        wait_pooled(&h, key, 1).await;
        let pids: Vec<u32> = records(&h).iter().map(|r| r.1).collect();
        (h, pids)
    });
    assert_eq!(pids.len(), 2, "an instance and a pooled VM");
    let Harness {
        dir,
        taps,
        cgroups,
        driver,
    } = h;
    std::mem::forget(driver);
    drop(agent);
    let state = dir.path().join("state");
    assert!(pids.iter().all(|p| process_exists(*p)));
    assert!(!taps.taps.lock().unwrap().is_empty());

    // The next agent's start removes every VM, tap, cgroup and directory.
    let next = tokio::runtime::Runtime::new().unwrap();
    let again = next.block_on(async {
        let mut c = config(dir.path());
        pooled_config(&mut c);
        MicroVmDriver::with_backends(
            c,
            &state,
            MicroVmBackends {
                taps: taps.clone(),
                cgroups: cgroups.clone(),
                vmm_env: vec![],
            },
        )
        .await
        .unwrap()
    });
    for pid in &pids {
        assert!(!process_exists(*pid), "VMM {pid} was left running");
    }
    assert_eq!(processes_under(dir.path()), Vec::<u32>::new());
    let h = Harness {
        dir,
        taps,
        cgroups,
        driver: again,
    };
    h.assert_nothing_left();
    next.block_on(h.driver.shutdown()).unwrap();
}
