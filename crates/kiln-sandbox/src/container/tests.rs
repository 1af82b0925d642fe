//! The container driver against recording fakes of runc, the network,
//! mounts, cgroups and disks.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kiln_core::RuntimeName;

use super::*;
use crate::cgroup::{CgroupCall, RecordingCgroups};
use crate::container::disk::RecordingDisk;
use crate::container::instance::InstancePaths;
use crate::container::oci_runtime::{OciCall, RecordingOciRuntime};
use crate::driver::{SandboxDriver, SandboxError, SandboxRequest};
use crate::mounts::{MountCall, RecordingMounter};
use crate::net::netns::{NetCall, RecordingNetwork};
use crate::process::tests::sample_spec;

struct Harness {
    _tmp: tempfile::TempDir,
    state: PathBuf,
    code: PathBuf,
    oci: Arc<RecordingOciRuntime>,
    net: Arc<RecordingNetwork>,
    mounter: Arc<RecordingMounter>,
    cgroups: Arc<RecordingCgroups>,
    disk: Arc<RecordingDisk>,
    driver: ContainerDriver,
}

fn test_config(rootfs_dir: &Path) -> ContainerConfig {
    let euid = nix::unistd::geteuid().as_raw();
    ContainerConfig {
        name_prefix: "kt".into(),
        instance_subnet: "10.77.0.0/24".parse().unwrap(),
        cgroup_parent: "kt".into(),
        // Without root, chown only works to one's own uid.
        uid_base: if euid == 0 { 100_000 } else { euid },
        rootfs_dir: Some(rootfs_dir.to_owned()),
        tmp_size_mb: 64,
        netns_pool: 0,
        disk_pool: 0,
        ..ContainerConfig::default()
    }
}

async fn harness_with(
    prepare: impl FnOnce(&RecordingOciRuntime, &RecordingNetwork, &Path),
) -> Harness {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let code = tmp.path().join("code");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("server.py"), "print('hi')").unwrap();
    let oci = Arc::new(RecordingOciRuntime::new());
    let net = Arc::new(RecordingNetwork::new());
    let mounter = Arc::new(RecordingMounter::new());
    let cgroups = Arc::new(RecordingCgroups::new());
    let disk = Arc::new(RecordingDisk::new());
    prepare(&oci, &net, &state);
    let driver = ContainerDriver::with_backends(
        test_config(&tmp.path().join("rootfs")),
        &state,
        oci.clone(),
        net.clone(),
        mounter.clone(),
    )
    .await
    .unwrap()
    .with_region("cn-hangzhou")
    .with_cgroups(cgroups.clone())
    .with_disk(disk.clone());
    Harness {
        _tmp: tmp,
        state,
        code,
        oci,
        net,
        mounter,
        cgroups,
        disk,
        driver,
    }
}

async fn harness() -> Harness {
    harness_with(|_, _, _| {}).await
}

fn request(h: &Harness, runtime: RuntimeName) -> SandboxRequest {
    let mut spec = sample_spec();
    spec.runtime = runtime;
    SandboxRequest {
        instance_id: InstanceId::generate(),
        spec: spec.seal(),
        code_dir: h.code.clone(),
        image: None,
    }
}

#[tokio::test]
async fn create_builds_the_bundle_and_starts_it() {
    let h = harness().await;
    let req = request(&h, RuntimeName::Custom);
    let sb = h.driver.create(&req).await.unwrap();
    assert_eq!(sb.endpoint, "10.77.0.2:9000".parse().unwrap());
    let dir = h.state.join("instances").join(req.instance_id.as_str());
    assert_eq!(sb.log_path, dir.join("console.log"));
    assert_eq!(h.net.existing(), ["kt-0".to_owned()].into());

    let cid = format!("kt-{}", req.instance_id);
    assert!(h.oci.calls().contains(&OciCall::Run {
        id: cid.clone(),
        bundle: dir.join("bundle"),
    }));
    let config = h.oci.config_of(&cid).unwrap();
    assert_eq!(config["root"]["readonly"], true);
    assert_eq!(config["linux"]["cgroupsPath"], format!("/kt/{cid}"));
    let ns = config["linux"]["namespaces"].as_array().unwrap();
    assert!(ns
        .iter()
        .any(|n| n["type"] == "network" && n["path"] == "/run/netns/kt-0"));
    assert_eq!(ns.len(), 7);
    // The agent dials the runtime from the namespace the container joined;
    // an instance the driver does not know has none.
    assert_eq!(
        h.driver.dial_netns(&req.instance_id),
        Some("/run/netns/kt-0".into())
    );
    assert_eq!(h.driver.dial_netns(&InstanceId::generate()), None);
    // After an agent restart the instance is known by its record on disk.
    let known = std::mem::take(&mut *h.driver.instances.lock().unwrap());
    assert_eq!(
        h.driver.dial_netns(&req.instance_id),
        Some("/run/netns/kt-0".into())
    );
    *h.driver.instances.lock().unwrap() = known;
    assert_eq!(
        config["linux"]["uidMappings"][0]["hostID"],
        h.driver.config().uid_base
    );
    let env: Vec<&str> = config["process"]["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(env.contains(&"FC_REGION=cn-hangzhou"));
    assert!(env.contains(&format!("FC_INSTANCE_ID={}", req.instance_id).as_str()));
    let code_mount = config["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/code")
        .unwrap();
    assert_eq!(code_mount["source"], dir.join("code").display().to_string());

    let calls = h.mounter.calls();
    assert!(calls.contains(&MountCall::BindReadonly {
        source: h.driver.rootfs_dir().join("custom"),
        target: dir.join("bundle/rootfs"),
    }));
    assert!(calls.contains(&MountCall::Overlay {
        lower: h.code.clone(),
        upper: dir.join("disk/upper"),
        work: dir.join("disk/work"),
        target: dir.join("code"),
    }));
    let uid = h.driver.config().uid_base;
    assert_eq!(
        std::fs::metadata(dir.join("disk/upper")).unwrap().uid(),
        uid
    );
    assert_eq!(std::fs::metadata(dir.join("disk/work")).unwrap().gid(), uid);
    assert_eq!(std::fs::metadata(dir.join("disk/tmp")).unwrap().uid(), uid);
    assert_eq!(
        h.disk.calls(),
        [crate::container::disk::DiskCall {
            image: dir.join("disk.img"),
            size_mb: 512,
            target: dir.join("disk"),
            owner: uid,
        }]
    );
    let tmp_mount = config["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/tmp")
        .unwrap();
    assert_eq!(
        tmp_mount["source"],
        dir.join("disk/tmp").display().to_string()
    );
    assert_eq!(
        config["linux"]["seccomp"]["defaultAction"],
        "SCMP_ACT_ERRNO"
    );

    assert_eq!(
        h.driver.list().await.unwrap(),
        vec![req.instance_id.clone()]
    );
    assert!(h.driver.is_running(&req.instance_id).await.unwrap());
    h.oci.stop(&cid);
    assert!(!h.driver.is_running(&req.instance_id).await.unwrap());

    // A second create with the same id changes nothing.
    let err = h.driver.create(&req).await.unwrap_err();
    assert!(matches!(err, SandboxError::Filesystem { .. }), "{err}");
    assert!(dir.join("instance.json").exists());
    assert_eq!(h.net.existing().len(), 1);
}

#[tokio::test]
async fn liveness_comes_from_the_init_process_start_time_not_a_runtime_call() {
    let h = harness().await;
    let req = request(&h, RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    let cid = format!("kt-{}", req.instance_id);
    let record = InstancePaths::new(&h.state.join("instances"), &req.instance_id)
        .read_record()
        .expect("the record on disk");
    assert_eq!(record.pid_start, Some(1), "kept with the pid");
    let states = |h: &Harness| {
        h.oci
            .calls()
            .iter()
            .filter(|c| matches!(c, OciCall::State(_)))
            .count()
    };

    assert!(h.driver.is_running(&req.instance_id).await.unwrap());
    h.oci.pause(&cid);
    assert!(h.driver.is_running(&req.instance_id).await.unwrap());
    assert_eq!(states(&h), 0, "no runtime process per check");
    // Another process under the same pid is not the instance.
    h.oci.replace_init_process(&cid);
    assert!(!h.driver.is_running(&req.instance_id).await.unwrap());

    // A record from before start times were kept: the runtime is asked.
    let other = request(&h, RuntimeName::Custom);
    h.driver.create(&other).await.unwrap();
    h.driver
        .instances
        .lock()
        .unwrap()
        .get_mut(&other.instance_id)
        .unwrap()
        .pid_start = None;
    assert!(h.driver.is_running(&other.instance_id).await.unwrap());
    assert_eq!(states(&h), 1);
}

#[tokio::test]
async fn destroy_removes_everything_and_is_idempotent() {
    let h = harness().await;
    let req = request(&h, RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    let cid = format!("kt-{}", req.instance_id);
    let dir = h.state.join("instances").join(req.instance_id.as_str());

    h.driver.destroy(&req.instance_id).await.unwrap();
    let calls = h.oci.calls();
    assert!(calls.contains(&OciCall::Kill {
        id: cid.clone(),
        signal: "KILL".into()
    }));
    assert!(calls.contains(&OciCall::Delete(cid.clone())));
    assert!(h.mounter.mounted().is_empty());
    assert!(!dir.exists());
    assert!(h.net.existing().is_empty());
    assert!(h.net.calls().contains(&NetCall::Delete("kt-0".into())));
    assert!(h.driver.list().await.unwrap().is_empty());
    assert!(matches!(
        h.driver.is_running(&req.instance_id).await,
        Err(SandboxError::NotFound(_))
    ));

    h.driver.destroy(&req.instance_id).await.unwrap();
    h.driver.destroy(&InstanceId::generate()).await.unwrap();

    // The namespace is never reused: the next instance gets a new one.
    let next = h
        .driver
        .create(&request(&h, RuntimeName::Custom))
        .await
        .unwrap();
    assert_eq!(next.endpoint, "10.77.0.6:9000".parse().unwrap());
}

#[tokio::test]
async fn a_failed_start_leaves_nothing_behind() {
    let h = harness().await;
    h.oci
        .fail_next_run("exec: \"python3\": executable file not found");
    let req = request(&h, RuntimeName::Custom);
    let err = h.driver.create(&req).await.unwrap_err();
    assert!(
        matches!(&err, SandboxError::OciRuntime { .. })
            && kiln_core::error_chain(&err).contains("python3"),
        "{err}"
    );
    assert!(h.mounter.mounted().is_empty());
    assert!(h.net.existing().is_empty());
    assert!(h.driver.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn bad_requests_change_nothing() {
    let h = harness().await;
    let mut req = request(&h, RuntimeName::Custom);
    req.spec.command.clear();
    let err = h.driver.create(&req).await.unwrap_err();
    assert!(
        kiln_core::error_chain(&err).contains("no command"),
        "{err:?}"
    );

    let mut req = request(&h, RuntimeName::Custom);
    req.spec.environment.insert("BAD NAME".into(), "x".into());
    assert!(h.driver.create(&req).await.is_err());

    let mut req = request(&h, RuntimeName::Custom);
    req.code_dir = h.state.join("missing");
    assert!(matches!(
        h.driver.create(&req).await,
        Err(SandboxError::Filesystem { .. })
    ));

    // custom.debian12 has not been built in this rootfs dir.
    let req = request(&h, RuntimeName::CustomDebian12);
    assert!(matches!(
        h.driver.create(&req).await,
        Err(SandboxError::RuntimeUnavailable { .. })
    ));

    assert!(h.net.calls().is_empty() || h.net.calls() == [NetCall::List]);
    assert!(h.mounter.calls().is_empty());
    assert!(h.driver.list().await.unwrap().is_empty());
    assert!(!h
        .oci
        .calls()
        .iter()
        .any(|c| matches!(c, OciCall::Run { .. })));
}

#[tokio::test]
async fn subnet_exhaustion_is_reported_as_such() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(&tmp.path().join("rootfs"));
    config.instance_subnet = "10.77.0.0/28".parse().unwrap();
    let h = harness().await;
    let driver = ContainerDriver::with_backends(
        config,
        &tmp.path().join("state"),
        Arc::new(RecordingOciRuntime::new()),
        Arc::new(RecordingNetwork::new()),
        Arc::new(RecordingMounter::new()),
    )
    .await
    .unwrap();
    for _ in 0..4 {
        driver
            .create(&request(&h, RuntimeName::Custom))
            .await
            .unwrap();
    }
    let err = driver
        .create(&request(&h, RuntimeName::Custom))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::Exhausted(_)), "{err}");
}

#[tokio::test]
async fn start_removes_leftovers_with_its_prefix_only() {
    let h = harness_with(|oci, net, state| {
        oci.insert_leftover("kt-i-0123");
        oci.insert_leftover("other-i-0123");
        net.insert_leftover("kt-1f");
        net.insert_leftover("ktx-1");
        std::fs::create_dir_all(state.join("instances/i-old/upper")).unwrap();
    })
    .await;
    let calls = h.oci.calls();
    assert!(calls.contains(&OciCall::Delete("kt-i-0123".into())));
    assert!(!calls.contains(&OciCall::Delete("other-i-0123".into())));
    assert_eq!(h.net.existing(), ["ktx-1".to_owned()].into());
    assert!(!h.state.join("instances/i-old").exists());
}

#[tokio::test]
async fn the_pool_is_filled_in_the_background_and_drained_on_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = test_config(&tmp.path().join("rootfs"));
    config.netns_pool = 3;
    let net = Arc::new(RecordingNetwork::new());
    let driver = ContainerDriver::with_backends(
        config,
        &tmp.path().join("state"),
        Arc::new(RecordingOciRuntime::new()),
        net.clone(),
        Arc::new(RecordingMounter::new()),
    )
    .await
    .unwrap();
    for _ in 0..200 {
        if driver.pooled_namespaces() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(driver.pooled_namespaces(), 3);
    driver.shutdown().await.unwrap();
    assert!(net.existing().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_cold_start_boost_ends_after_its_window() {
    let h = harness().await;
    let req = request(&h, RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    let cid = format!("kt-{}", req.instance_id);
    let path = format!("/kt/{cid}");
    // sample_spec has 0.35 CPU; the boost is the configured 2 CPUs.
    let config = h.oci.config_of(&cid).unwrap();
    assert_eq!(config["linux"]["resources"]["cpu"]["quota"], 200_000);
    assert_eq!(config["linux"]["resources"]["cpu"]["shares"], 358);
    h.cgroups.created_by_runc(&path, 358, Some(200_000));
    tokio::time::sleep(std::time::Duration::from_millis(19_900)).await;
    assert_eq!(h.cgroups.cpu_quota(&path).unwrap(), Some(200_000));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(h.cgroups.cpu_quota(&path).unwrap(), Some(35_000));
    assert_eq!(
        h.cgroups.calls(),
        [CgroupCall::SetCpuQuota {
            path: path.clone(),
            quota_us: 35_000
        }]
    );
}

#[tokio::test]
async fn big_instances_need_no_boost_and_bad_disk_sizes_are_refused() {
    let h = harness().await;
    let mut req = request(&h, RuntimeName::Custom);
    req.spec.cpu_milli = 4000;
    req.spec.memory_mb = 8192;
    h.driver.create(&req).await.unwrap();
    let config = h.oci.config_of(&format!("kt-{}", req.instance_id)).unwrap();
    assert_eq!(config["linux"]["resources"]["cpu"]["quota"], 400_000);
    assert_eq!(config["linux"]["resources"]["cpu"]["shares"], 4096);

    let mut req = request(&h, RuntimeName::Custom);
    req.spec.disk_mb = 20_480;
    let err = h.driver.create(&req).await.unwrap_err();
    assert!(kiln_core::error_chain(&err).contains("10240"), "{err:?}");
    assert_eq!(h.disk.calls().len(), 1);
    assert_eq!(h.driver.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn default_disks_come_from_the_pool_and_others_are_formatted() {
    let h = harness().await;
    let mut config = h.driver.config().clone();
    config.disk_pool = 1;
    let disk = Arc::new(RecordingDisk::new());
    let driver = ContainerDriver::with_backends(
        config,
        &h.state.join("pooled"),
        h.oci.clone(),
        h.net.clone(),
        h.mounter.clone(),
    )
    .await
    .unwrap()
    .with_cgroups(h.cgroups.clone())
    .with_disk(disk.clone());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while driver.pooled_disks() < 1 {
        assert!(std::time::Instant::now() < deadline, "pool never filled");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let req = request(&h, RuntimeName::Custom);
    driver.create(&req).await.unwrap();
    let dir = h
        .state
        .join("pooled/instances")
        .join(req.instance_id.as_str());
    // The pooled image was renamed into the instance dir and mounted.
    assert!(dir.join("disk.img").is_file());
    assert_eq!(disk.mounts(), [(dir.join("disk.img"), dir.join("disk"))]);
    assert!(disk.calls().is_empty());

    let mut req = request(&h, RuntimeName::Custom);
    req.spec.disk_mb = 1024;
    driver.create(&req).await.unwrap();
    assert_eq!(disk.calls().len(), 1);
    assert_eq!(disk.calls()[0].size_mb, 1024);

    for id in driver.list().await.unwrap() {
        driver.destroy(&id).await.unwrap();
    }
    driver.shutdown().await.unwrap();
    assert_eq!(driver.pooled_disks(), 0);
    assert_eq!(
        std::fs::read_dir(h.state.join("pooled/disk-pool"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn freeze_and_thaw_use_the_instance_cgroup_and_destroy_removes_it() {
    let h = harness().await;
    let req = request(&h, RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    let path = h.driver.cgroup_of(&req.instance_id);
    assert_eq!(path, format!("/kt/kt-{}", req.instance_id));
    h.cgroups.created_by_runc(&path, 358, Some(35_000));
    h.cgroups.created_by_runc("/kt", 1024, None);
    h.cgroups.set_stats(
        &path,
        crate::cgroup::CgroupStats {
            cpu_usage_us: 1_500_000,
            memory_bytes: 42 << 20,
            memory_limit_bytes: Some(512 << 20),
            oom_kills: 1,
            pids: 3,
            ..Default::default()
        },
    );
    let st = h.driver.stats(&req.instance_id).await.unwrap().unwrap();
    assert_eq!(st.cpu_usage_us, 1_500_000);
    assert_eq!(st.memory_bytes, 42 << 20);
    assert_eq!(st.memory_limit_bytes, Some(512 << 20));
    assert_eq!((st.oom_kills, st.pids, st.frozen), (1, 3, false));
    h.driver.freeze(&req.instance_id).await.unwrap();
    assert!(
        h.driver
            .stats(&req.instance_id)
            .await
            .unwrap()
            .unwrap()
            .frozen
    );
    assert!(h.cgroups.stats(&path).unwrap().frozen);
    h.oci.pause(&format!("kt-{}", req.instance_id));
    assert!(h.driver.is_running(&req.instance_id).await.unwrap());
    h.driver.thaw(&req.instance_id).await.unwrap();
    assert!(!h.cgroups.stats(&path).unwrap().frozen);

    let unknown = InstanceId::generate();
    assert!(matches!(
        h.driver.freeze(&unknown).await,
        Err(SandboxError::NotFound(_))
    ));

    h.driver.freeze(&req.instance_id).await.unwrap();
    h.driver.destroy(&req.instance_id).await.unwrap();
    let calls = h.cgroups.calls();
    let thaw = calls
        .iter()
        .rposition(|c| *c == CgroupCall::Thaw(path.clone()))
        .unwrap();
    let remove = calls
        .iter()
        .position(|c| *c == CgroupCall::Remove(path.clone()))
        .unwrap();
    assert!(thaw < remove, "{calls:?}");
    assert!(!h.cgroups.exists(&path));

    h.driver.shutdown().await.unwrap();
    assert!(!h.cgroups.exists("/kt"));
}

async fn isolated_harness() -> (Harness, Arc<crate::net::RecordingCommands>) {
    let h = harness().await;
    let cmd = Arc::new(crate::net::RecordingCommands::new());
    let config: crate::net::NetworkConfig = serde_json::from_value(serde_json::json!({
        "standard_bandwidth_mbit": 100,
        "performance_bandwidth_mbit": 500,
        "vpcs": [{"id": "vpc-a", "cidr": "192.168.0.0/16",
            "vswitches": [{"id": "vsw-a", "cidr": "192.168.50.0/24",
                "gateway": "192.168.50.1", "instance_pool": "192.168.50.128/30"}],
            "security_groups": [{"id": "sg-a"}]}]
    }))
    .unwrap();
    let isolation = NetIsolation::start("kt", config, cmd.clone())
        .await
        .unwrap();
    let Harness {
        _tmp,
        state,
        code,
        oci,
        net,
        mounter,
        cgroups,
        disk,
        driver,
    } = h;
    let driver = driver.with_net_isolation(Arc::new(isolation));
    cmd.clear();
    let h = Harness {
        _tmp,
        state,
        code,
        oci,
        net,
        mounter,
        cgroups,
        disk,
        driver,
    };
    (h, cmd)
}

fn cmd_lines(cmd: &crate::net::RecordingCommands) -> Vec<String> {
    cmd.calls()
        .iter()
        .map(|c| format!("{} {}", c.line(), c.stdin.as_deref().unwrap_or("")))
        .collect()
}

#[tokio::test]
async fn instances_are_attached_to_the_isolation_and_detached_on_destroy() {
    let (h, cmd) = isolated_harness().await;
    let iso = h.driver.net_isolation().unwrap().clone();
    let req = request(&h, RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    assert_eq!(iso.attached(), ["kt-0".to_owned()]);
    let lines = cmd_lines(&cmd);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("tbf") && l.contains("100mbit")),
        "standard instances get the standard rate: {lines:?}"
    );

    // A performance instance (10 GB disk) gets the performance rate.
    let mut spec = sample_spec();
    spec.runtime = RuntimeName::Custom;
    spec.disk_mb = 10_240;
    let big = SandboxRequest {
        instance_id: InstanceId::generate(),
        spec: spec.seal(),
        code_dir: h.code.clone(),
        image: None,
    };
    cmd.clear();
    h.driver.create(&big).await.unwrap();
    assert!(cmd_lines(&cmd)
        .iter()
        .any(|l| l.contains("tbf") && l.contains("500mbit")));
    assert_eq!(iso.attached(), ["kt-0".to_owned(), "kt-1".to_owned()]);

    h.driver.destroy(&req.instance_id).await.unwrap();
    assert_eq!(iso.attached(), ["kt-1".to_owned()]);
    h.driver.destroy(&big.instance_id).await.unwrap();
    assert!(iso.attached().is_empty());
    cmd.clear();
    h.driver.shutdown().await.unwrap();
    assert!(cmd_lines(&cmd)
        .iter()
        .any(|l| l.contains("delete table inet kt")));
}

#[tokio::test]
async fn without_isolation_only_internet_functions_start() {
    let h = harness().await;
    assert!(h.driver.net_isolation().is_none());
    for network in [
        kiln_core::NetworkSpec {
            internet_access: false,
            vpc: None,
        },
        kiln_core::NetworkSpec {
            internet_access: true,
            vpc: Some(kiln_core::VpcAttachment {
                vpc_id: "vpc-a".into(),
                vswitch_ids: vec!["vsw-a".into()],
                security_group_id: "sg-a".into(),
            }),
        },
    ] {
        let mut spec = sample_spec();
        spec.runtime = RuntimeName::Custom;
        spec.network = Some(network);
        let req = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec.seal(),
            code_dir: h.code.clone(),
            image: None,
        };
        let err = h.driver.create(&req).await.unwrap_err();
        let SandboxError::Unenforceable(why) = &err else {
            panic!("{err}")
        };
        assert!(
            why.contains("internetAccess") && why.contains("[sandbox.network]"),
            "says what and how to fix: {why}"
        );
        // Nothing was made for it.
        assert!(h.net.existing().is_empty());
        assert!(h.mounter.mounted().is_empty());
        assert!(h.driver.list().await.unwrap().is_empty());
    }
    // FC's default runs (the agent admits it only with the insecure
    // setting).
    let req = request(&h, RuntimeName::Custom);
    h.driver.create(&req).await.unwrap();
    h.driver.destroy(&req.instance_id).await.unwrap();
}

#[tokio::test]
async fn an_instance_whose_network_cannot_be_isolated_does_not_start() {
    let (h, _cmd) = isolated_harness().await;
    let iso = h.driver.net_isolation().unwrap().clone();
    let mut spec = sample_spec();
    spec.runtime = RuntimeName::Custom;
    spec.network = Some(kiln_core::NetworkSpec {
        internet_access: false,
        vpc: Some(kiln_core::VpcAttachment {
            vpc_id: "vpc-unknown".into(),
            vswitch_ids: vec!["vsw-a".into()],
            security_group_id: "sg-a".into(),
        }),
    });
    let req = SandboxRequest {
        instance_id: InstanceId::generate(),
        spec: spec.seal(),
        code_dir: h.code.clone(),
        image: None,
    };
    let err = h.driver.create(&req).await.unwrap_err();
    assert!(
        matches!(&err, SandboxError::Unenforceable(m) if m.contains("vpc-unknown")),
        "{err}"
    );
    assert!(iso.attached().is_empty());
    assert!(h.net.existing().is_empty());
    assert!(h.mounter.mounted().is_empty());
    assert!(h
        .oci
        .calls()
        .iter()
        .all(|c| !matches!(c, OciCall::Run { .. })));
    assert!(h.driver.list().await.unwrap().is_empty());
}
