//! The VMM jail, checked on the real launched process: the fake
//! cloud-hypervisor runs in the VMM's place, jailed by the real driver and
//! launcher (fake taps and cgroups). Each test reads /proc of the jailed
//! process (uid, gid, capabilities, no_new_privs, namespaces, root), lists
//! its chroot, and has the fake play an attacker that tries to read the
//! agent's files and another VM's disk.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use kiln_sandbox::cgroup::RecordingCgroups;
use kiln_sandbox::microvm::host::RecordingTaps;
use kiln_sandbox::microvm::jail::{self, JailPlan};
use kiln_sandbox::microvm::{JailConfig, MicroVmBackends, MicroVmConfig, MicroVmDriver, PoolKey};
use kiln_sandbox::{rootfs_path, SandboxDriver, SandboxRequest};
use kiln_test_support::Category;

const FAKE: &str = env!("CARGO_BIN_EXE_fake-cloud-hypervisor");

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    kiln_test_support::skip(
        Category::Root,
        "jailing a VMM needs root (namespaces, chroot, setuid)",
    );
    false
}

struct Harness {
    dir: tempfile::TempDir,
    taps: Arc<RecordingTaps>,
    cgroups: Arc<RecordingCgroups>,
    config: MicroVmConfig,
    driver: MicroVmDriver,
}

/// This test process's own uid range (tests run in parallel).
fn jail_config() -> JailConfig {
    JailConfig {
        uid_base: 3_500_000 + (std::process::id() % 100_000) * 16,
        uid_count: 16,
        insecure_disabled: false,
    }
}

impl Harness {
    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state().join("microvm/vms").join(vm)
    }
    /// A file of the agent's, readable by everyone on the host.
    fn agent_file(&self) -> PathBuf {
        self.dir.path().join("agent-secret")
    }
    fn request(&self) -> SandboxRequest {
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
            "cpu_milli": 1000,
            "disk_mb": 128,
            "timeout_s": 3,
            "concurrency": 1,
            "code_digest": "cd".repeat(32),
            "code_size": 10,
        }))
        .unwrap();
        SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir: self.dir.path().join("code"),
            image: None,
        }
    }
    fn vmm_log(&self, vm: &str) -> String {
        std::fs::read_to_string(self.vm_dir(vm).join("vmm.log")).unwrap_or_default()
    }
}

async fn harness(env: &[(&str, String)], tune: impl FnOnce(&mut MicroVmConfig)) -> Harness {
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
    let secret = root.join("agent-secret");
    std::fs::write(&secret, b"the agent's key").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = MicroVmConfig {
        cloud_hypervisor_path: Some(FAKE.into()),
        kernel: root.join("guest/vmlinuz"),
        initramfs: root.join("guest/initramfs.img"),
        rootfs_dir: Some(root.join("rootfs")),
        api_timeout_ms: 5_000,
        boot_timeout_ms: 10_000,
        jail: jail_config(),
        ..MicroVmConfig::default()
    };
    tune(&mut config);
    let taps = Arc::new(RecordingTaps::default());
    let cgroups = Arc::new(RecordingCgroups::default());
    let driver = MicroVmDriver::with_backends(
        config.clone(),
        &root.join("state"),
        MicroVmBackends {
            taps: taps.clone(),
            cgroups: cgroups.clone(),
            vmm_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        },
    )
    .await
    .unwrap();
    Harness {
        dir,
        taps,
        cgroups,
        config,
        driver,
    }
}

/// `Key:` of /proc/<pid>/status, split into its fields.
fn status_field(pid: u32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn ns(pid: &str, which: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{which}")).unwrap()
}

/// Every file and directory below `root`, relative.
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap().to_owned());
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// Everything `assert_jailed` checks of one VMM: the process, its chroot.
fn assert_jailed(h: &Harness, vm: &str, pid: u32, uid: u32, libraries: &[PathBuf]) {
    for key in ["Uid", "Gid"] {
        assert_eq!(
            status_field(pid, key),
            vec![uid.to_string(); 4],
            "{key} of the VMM"
        );
    }
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(
            status_field(pid, key),
            ["0000000000000000"],
            "{key} of the VMM"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), ["1"]);
    // PID 1 of its own PID namespace, in its own mount namespace.
    assert_eq!(status_field(pid, "NSpid"), [pid.to_string(), "1".into()]);
    let p = pid.to_string();
    assert_ne!(ns(&p, "mnt"), ns("self", "mnt"), "own mount namespace");
    assert_ne!(ns(&p, "pid"), ns("self", "pid"), "own PID namespace");
    // Chrooted into its VM's root, which holds only what it needs.
    let root = h.vm_dir(vm).join("root");
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/root")).unwrap(),
        root
    );
    let plan = JailPlan::new(
        root.clone(),
        uid,
        Path::new(FAKE),
        libraries,
        &h.config.kernel,
        &h.config.initramfs,
    );
    let mut expected = plan.prepared_entries();
    for f in [
        "api.sock",
        "vsock.sock",
        "scratch.img",
        "disk-runtime.img",
        "disk-code.img",
    ] {
        expected.insert(f.into());
    }
    assert_eq!(tree(&root), expected, "the chroot of {vm}");
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    // Its scratch disk is its own; the shared images are root's, read-only.
    let scratch = std::fs::metadata(root.join("scratch.img")).unwrap();
    assert_eq!((scratch.uid(), scratch.mode() & 0o777), (uid, 0o600));
    let code = std::fs::metadata(root.join("disk-code.img")).unwrap();
    assert_eq!((code.uid(), code.mode() & 0o777), (0, 0o644));
    // The agent's side of the VM directory is the agent's alone.
    let dir = std::fs::metadata(h.vm_dir(vm)).unwrap();
    assert_eq!((dir.uid(), dir.mode() & 0o777), (0, 0o700));
    // Its own cgroup, entered before it ran.
    assert_eq!(h.cgroups.procs(&format!("/kiln-vm/{vm}")), [pid]);
    // The tap is the VMM's to open.
    assert!(h.taps.taps.lock().unwrap().contains(vm));
}

#[tokio::test]
async fn each_vmm_runs_as_its_own_user_in_its_own_namespaces_and_chroot() {
    if !is_root() {
        return;
    }
    // The attacker in VM 1 knows where VM 0's disk and the agent's files
    // are on the host; it also checks it can read its own kernel.
    let first = jail_config().uid_base;
    let probe_paths = |h: &Path| {
        [
            h.join("agent-secret").display().to_string(),
            h.join("state/microvm/vms/kvm-0/root/scratch.img")
                .display()
                .to_string(),
            h.join("state/microvm/vms/kvm-0/vm.json")
                .display()
                .to_string(),
            "/etc/passwd".into(),
            "/vmlinuz".into(),
        ]
    };
    // The paths depend on the harness directory: make it, then point the
    // probe at it through a second driver on the same state.
    let h = harness(&[], |_| {}).await;
    let probes = probe_paths(h.dir.path()).join(",");
    let state = h.state();
    drop(h.driver);
    let h = Harness {
        driver: MicroVmDriver::with_backends(
            h.config.clone(),
            &state,
            MicroVmBackends {
                taps: h.taps.clone(),
                cgroups: h.cgroups.clone(),
                vmm_env: vec![("KILN_FAKE_VMM_PROBE".into(), probes)],
            },
        )
        .await
        .unwrap(),
        ..h
    };
    let libraries = jail::shared_libraries(Path::new(FAKE)).await.unwrap();

    let req0 = h.request();
    let sb0 = h.driver.create(&req0).await.unwrap();
    let req1 = h.request();
    let sb1 = h.driver.create(&req1).await.unwrap();
    let (pid0, pid1) = (sb0.pid.unwrap(), sb1.pid.unwrap());
    assert_jailed(&h, "kvm-0", pid0, first, &libraries);
    assert_jailed(&h, "kvm-1", pid1, first + 1, &libraries);
    assert_ne!(ns(&pid0.to_string(), "mnt"), ns(&pid1.to_string(), "mnt"));
    // The jails' mounts are in the VMMs' namespaces only: the host (this
    // process's namespace) has none below the state directory.
    assert_eq!(jail::mounts_under(&h.state()), Vec::<PathBuf>::new());

    // cloud-hypervisor's own seccomp and (v54 >= v39) landlock.
    let log = h.vmm_log("kvm-1");
    assert!(
        log.contains(
            "args: --api-socket path=/api.sock --seccomp true --landlock --landlock-rules path=/,access=rw"
        ),
        "{log}"
    );
    // The attacker reads its kernel, and nothing of the agent's, of the
    // host's or of the other VM's.
    let secret = h.agent_file();
    for (path, outcome) in [
        (secret.display().to_string(), "refused"),
        (
            h.vm_dir("kvm-0")
                .join("root/scratch.img")
                .display()
                .to_string(),
            "refused",
        ),
        (
            h.vm_dir("kvm-0").join("vm.json").display().to_string(),
            "refused",
        ),
        ("/etc/passwd".into(), "refused"),
        ("/vmlinuz".into(), "readable"),
    ] {
        assert!(
            log.contains(&format!("probe {path}: {outcome}")),
            "{path} should be {outcome}: {log}"
        );
    }
    // The jailed VMMs serve their instances.
    let endpoint = sb1.endpoint;
    let tcp = tokio::net::TcpStream::connect(endpoint).await;
    assert!(tcp.is_ok(), "the relay of a jailed VM answers");

    h.driver.destroy(&req0.instance_id).await.unwrap();
    h.driver.destroy(&req1.instance_id).await.unwrap();
    assert!(!alive(pid0) && !alive(pid1));
    assert_eq!(tree(&h.state().join("microvm/vms")), BTreeSet::new());
    for uid in [first, first + 1] {
        assert_eq!(
            jail::processes_of_uid(uid),
            Vec::<u32>::new(),
            "uid {uid} is free"
        );
    }
    assert!(h.taps.taps.lock().unwrap().is_empty());
    assert_eq!(h.cgroups.paths(), Vec::<String>::new());
}

#[tokio::test]
async fn pooled_snapshot_clones_are_jailed_and_an_old_vmm_gets_no_landlock() {
    if !is_root() {
        return;
    }
    let h = harness(&[("KILN_FAKE_VMM_VERSION", "v38.0".into())], |c| {
        c.premade.enabled = true;
        c.premade.max_per_runtime = 1;
        c.snapshots = true;
    })
    .await;
    h.driver
        .prewarm(PoolKey::new(RuntimeName::CustomDebian12, 256, 1000))
        .await
        .unwrap();
    assert_eq!(
        h.driver
            .pooled(PoolKey::new(RuntimeName::CustomDebian12, 256, 1000)),
        1
    );
    let req = h.request();
    let sb = h.driver.create(&req).await.unwrap();
    let pid = sb.pid.unwrap();
    let vm = std::fs::read_dir(h.state().join("microvm/vms"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            h.vm_dir(n).join("root/api.sock").exists() && {
                std::fs::read_link(format!("/proc/{pid}/root"))
                    .is_ok_and(|r| r == h.vm_dir(n).join("root"))
            }
        })
        .expect("the instance's VM");
    let uid = status_field(pid, "Uid")[0].parse::<u32>().unwrap();
    assert!(jail_config().uid_range().contains(uid));
    assert_eq!(status_field(pid, "CapEff"), ["0000000000000000"]);
    assert_eq!(status_field(pid, "NSpid").len(), 2);
    // Restored from a snapshot the agent took over: root's, read-only.
    let snapshots = h.state().join("microvm/snapshots");
    let snap = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    for e in std::fs::read_dir(&snap).unwrap().flatten() {
        let m = e.metadata().unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o644), "{:?}", e.path());
    }
    assert!(h.vm_dir(&vm).join("root/snapshot/config.json").is_file());
    let log = h.vmm_log(&vm);
    assert!(
        log.contains("args: --api-socket path=/api.sock --seccomp true\n"),
        "{log}"
    );
    assert!(!log.contains("--landlock"), "v38 has no landlock: {log}");
    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.shutdown().await.unwrap();
    assert!(!alive(pid));
    assert_eq!(tree(&h.state().join("microvm/vms")), BTreeSet::new());
}

#[tokio::test]
async fn a_new_driver_kills_jailed_leftovers_and_frees_their_uids() {
    if !is_root() {
        return;
    }
    let h = harness(&[], |_| {}).await;
    let req = h.request();
    let pid = h.driver.create(&req).await.unwrap().pid.unwrap();
    let Harness {
        dir,
        taps,
        cgroups,
        config,
        driver,
    } = h;
    // The agent dies without destroying anything; the jailed VMM's
    // command line names only paths inside its chroot.
    std::mem::forget(driver);
    assert!(alive(pid));
    let again = MicroVmDriver::with_backends(
        config.clone(),
        &dir.path().join("state"),
        MicroVmBackends {
            taps: taps.clone(),
            cgroups: cgroups.clone(),
            vmm_env: vec![],
        },
    )
    .await
    .unwrap();
    assert!(!alive(pid), "the leftover jailed VMM was not stopped");
    // It was this test's child: reap it, as init would a dead agent's.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    assert_eq!(tree(&dir.path().join("state/microvm/vms")), BTreeSet::new());
    let h = Harness {
        dir,
        taps,
        cgroups,
        config,
        driver: again,
    };
    // Its uid is handed out again, to a new VM in the same slot.
    let req = h.request();
    let pid = h.driver.create(&req).await.unwrap().pid.unwrap();
    assert_eq!(
        status_field(pid, "Uid")[0],
        jail_config().uid_base.to_string()
    );
    h.driver.destroy(&req.instance_id).await.unwrap();
}

#[tokio::test]
async fn a_jail_step_that_fails_is_named_and_leaves_no_process() {
    use kiln_sandbox::microvm::launch::{spawn, LaunchError, VmmCommand};
    if !is_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uid = jail_config().uid_base + 15;
    let plan = JailPlan::new(
        dir.path().join("root"),
        uid,
        Path::new("/bin/true"),
        &[],
        Path::new("/etc/hostname"),
        Path::new("/etc/hostname"),
    );
    plan.prepare().unwrap();
    let command = |binary: &str| VmmCommand {
        binary: binary.into(),
        args: vec![],
        uid: None,
        gid: None,
        log: dir.path().join("vmm.log"),
        env: vec![],
        jail: Some(plan.clone()),
    };
    // Nothing by that name in the chroot: the exec fails, and says so.
    let err = spawn(&command("/missing"), |_| Ok(())).unwrap_err();
    assert!(
        matches!(&err, LaunchError::Step { step, errno } if step.contains("execve") && *errno == nix::Error::ENOENT),
        "{err}"
    );
    // A cgroup that cannot be entered: the VMM never runs.
    let mut seen = None;
    let err = spawn(&command("/cloud-hypervisor"), |pid| {
        seen = Some(pid);
        Err("cgroup.procs: No such file or directory".into())
    })
    .unwrap_err();
    assert!(matches!(err, LaunchError::BeforeExec(_)), "{err}");
    assert!(!alive(seen.unwrap()), "the child was left running");
    assert_eq!(jail::processes_of_uid(uid), Vec::<u32>::new());
    assert_eq!(jail::mounts_under(dir.path()), Vec::<PathBuf>::new());
}
