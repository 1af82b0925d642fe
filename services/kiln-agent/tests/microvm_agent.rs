//! A multi-tenant agent over the microVM backend, end to end: the real
//! agent API over mTLS, the real code cache fed by a gateway, the real
//! MicroVmDriver driving the fake cloud-hypervisor (built by kiln-sandbox),
//! whose guest is kiln-guest-proto's server over a toy function. An
//! invocation goes agent -> relay -> hybrid vsock -> guest and back through
//! the agent's unchanged forward path.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use kiln_agent::config::SandboxSection;
use kiln_agent::testing::{sample_spec, FakeScheduler};
use kiln_agent::{AgentConfig, Backends, GatewayCodeSource, ZipUnpacker};
use kiln_core::{InstanceId, SandboxKind};
use kiln_internal_api::server::full;
use kiln_internal_api::{paths, CreateInstance, InstanceCreated, InternalClient, Tenancy};
use kiln_pki::DevPki;
use kiln_sandbox::cgroup::RecordingCgroups;
use kiln_sandbox::microvm::host::RecordingTaps;
use kiln_sandbox::microvm::{MicroVmBackends, MicroVmConfig, MicroVmDriver};
use kiln_test_support::{skip, Category};
use tokio::net::TcpListener;

/// The fake VMM binary: `$KILN_FAKE_CLOUD_HYPERVISOR`, or beside this
/// test's own directory (`cargo build --workspace --all-targets` puts it
/// there, as scripts/test.sh does).
fn fake_vmm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_FAKE_CLOUD_HYPERVISOR") {
        return Some(p.into());
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("fake-cloud-hypervisor");
    p.is_file().then_some(p)
}

fn zip_package() -> Vec<u8> {
    zip_with(b"#!/bin/sh\n")
}

/// A package whose `server` is `binary`.
fn zip_with(binary: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file(
        "server",
        zip::write::SimpleFileOptions::default().unix_permissions(0o755),
    )
    .unwrap();
    w.write_all(binary).unwrap();
    w.finish().unwrap().into_inner()
}

/// The gateway's internal listener serving one package by digest.
async fn fake_gateway(pki: &DevPki, zip: Vec<u8>) -> (String, String) {
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(&zip));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let tls = kiln_pki::internal_server_config(&pki.files("gateway-internal")).unwrap();
    let (zip, want) = (Bytes::from(zip), digest.clone());
    tokio::spawn(kiln_internal_api::server::serve_tls(
        listener,
        tls,
        move |req: Request<hyper::body::Incoming>, _conn| {
            let (zip, want) = (zip.clone(), want.clone());
            async move {
                if req.uri().path() == paths::code(&want) {
                    http::Response::new(full(zip))
                } else {
                    kiln_internal_api::server::error(
                        &kiln_core::FcError::new(
                            kiln_core::FcErrorCode::FunctionNotFound,
                            "no such code",
                        ),
                        "r",
                    )
                }
            }
        },
        std::future::pending(),
    ));
    (url, digest)
}

#[tokio::test]
async fn a_multi_tenant_agent_invokes_a_function_in_a_microvm() {
    let Some(fake) = fake_vmm() else {
        return skip(
            Category::Artifact,
            "fake-cloud-hypervisor is not built; run `cargo build -p kiln-sandbox --features testing --bin fake-cloud-hypervisor` first",
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pki = DevPki::ensure(&root.join("pki"), &[]).unwrap();
    std::fs::create_dir_all(root.join("guest")).unwrap();
    std::fs::write(root.join("guest/vmlinuz"), b"kernel").unwrap();
    std::fs::write(root.join("guest/initramfs.img"), b"initramfs").unwrap();
    let microvm = MicroVmConfig {
        cloud_hypervisor_path: Some(fake),
        kernel: root.join("guest/vmlinuz"),
        initramfs: root.join("guest/initramfs.img"),
        rootfs_dir: Some(root.join("rootfs")),
        // A multi-tenant node jails its VMMs; this test process's own uids.
        jail: kiln_sandbox::microvm::JailConfig {
            uid_base: 3_900_000 + (std::process::id() % 100_000) * 8,
            uid_count: 8,
            insecure_disabled: false,
        },
        ..MicroVmConfig::default()
    };
    // From JSON, so fields other engineers add keep their defaults.
    let mut config: AgentConfig = serde_json::from_value(serde_json::json!({
        "state_dir": root.join("agent"),
        "listen": "127.0.0.1:0",
        "scheduler_url": "https://127.0.0.1:1",
        "gateway_internal_url": "https://127.0.0.1:1",
        "region": "cn-hangzhou",
        "instance_start_timeout_ms": 10_000,
        "drain_on_shutdown": true,
        "runtimes": ["custom"],
        "tls": pki.files("agent"),
        "node": {
            "zone": "zone-a",
            "tenancy": "multi-tenant",
            "memory_mb": 4096,
            "cpu_milli": 2000,
            "max_instances": 8
        }
    }))
    .unwrap();
    // No backend named: a multi-tenant node runs microVMs.
    assert_eq!(config.sandbox.backend, None);
    config.sandbox = SandboxSection {
        microvm: microvm.clone(),
        ..SandboxSection::default()
    };
    config.validate().unwrap();
    assert_eq!(
        config.sandbox.backend_for(config.node.tenancy),
        SandboxKind::Microvm
    );

    let taps = Arc::new(RecordingTaps::default());
    let driver = Arc::new(
        MicroVmDriver::with_backends(
            microvm,
            &config.state_dir,
            MicroVmBackends {
                taps: taps.clone(),
                cgroups: Arc::new(RecordingCgroups::default()),
                vmm_env: vec![],
            },
        )
        .await
        .unwrap(),
    );
    let (gateway_url, digest) = fake_gateway(&pki, zip_package()).await;
    let scheduler = Arc::new(FakeScheduler::new(50));
    let backends = Backends {
        driver: driver.clone(),
        code_source: Arc::new(GatewayCodeSource::new(
            InternalClient::new(&pki.files("agent")).unwrap(),
            &gateway_url,
        )),
        unpacker: Arc::new(ZipUnpacker),
        scheduler: scheduler.clone(),
    };
    let agent = kiln_agent::start_with(config, backends).await.unwrap();
    let base = format!("https://{}", agent.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    // Instances are placed and removed by the scheduler's identity.
    let placer = InternalClient::new(&pki.files("scheduler")).unwrap();

    let id = InstanceId::generate();
    let created: InstanceCreated = placer
        .post(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: id.clone(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.instance_id, id);
    assert_eq!(taps.taps.lock().unwrap().len(), 1);

    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{base}{}", paths::agent_invoke(&id)))
        .header("x-fc-request-id", "r-vm-1")
        .body(full(Bytes::from_static(b"hello microvm")))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        kiln_internal_api::InvokeOutcome::of(resp.headers()),
        Some(Ok(kiln_internal_api::InvokeOutcome::Ok))
    );
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["instance"], id.to_string(), "{answer}");
    assert_eq!(answer["echo"], "hello microvm");
    assert_eq!(answer["requestId"], "r-vm-1");

    // The node registered as multi-tenant, offering microVM sandboxes.
    for _ in 0..200 {
        if !scheduler.state.lock().unwrap().registrations.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    {
        let s = scheduler.state.lock().unwrap();
        let labels = &s.registrations[0].labels;
        assert_eq!(labels.tenancy, Tenancy::MultiTenant);
        assert_eq!(labels.sandbox_kinds, vec![SandboxKind::Microvm]);
    }

    // The jailed fake (it cannot reach a record file) logs its calls.
    let vms = root.join("agent/microvm/vms");
    let log = std::fs::read_to_string(vms.join("kvm-0/vmm.log")).unwrap();
    assert!(
        log.contains("args: --api-socket path=/api.sock --seccomp true --landlock"),
        "{log}"
    );
    let ops: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("call "))
        .filter(|op| !op.starts_with("vmm.ping"))
        .collect();
    assert_eq!(ops.first(), Some(&"vm.create 204"), "{log}");

    placer
        .delete(&base, &paths::agent_instance(&id))
        .await
        .unwrap();
    agent.shutdown().await;
    assert!(taps.taps.lock().unwrap().is_empty(), "the tap is left");
    let left: Vec<_> = std::fs::read_dir(&vms).unwrap().flatten().collect();
    assert!(left.is_empty(), "VM directories left: {left:?}");
}

/// A static HTTP server for the `custom` runtime: answers every request on
/// port 9000 with a fixed body.
const STATIC_SERVER_C: &str = r#"
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(9000);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) return 1;
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        char buf[65536];
        (void)read(c, buf, sizeof buf);
        const char *r = "HTTP/1.0 200 OK\r\nContent-Length: 20\r\n\r\nhello from a microVM";
        (void)write(c, r, strlen(r));
        close(c);
    }
}
"#;

/// Why real microVM guests cannot run on this machine, if they cannot.
fn real_kvm_unavailable(
    ch: &Option<PathBuf>,
    guest: &std::path::Path,
) -> Option<(Category, String)> {
    use std::os::fd::AsRawFd;
    let Some(ch) = ch else {
        return Some((
            Category::CloudHypervisor,
            "no cloud-hypervisor binary (set KILN_CLOUD_HYPERVISOR or put it on PATH)".into(),
        ));
    };
    if !ch.is_file() {
        return Some((
            Category::CloudHypervisor,
            format!("{} does not exist", ch.display()),
        ));
    }
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(f) => f,
        Err(e) => {
            return Some((Category::Kvm, format!("/dev/kvm cannot be opened: {e}")));
        }
    };
    // SAFETY: KVM_GET_API_VERSION (_IO(0xAE, 0x00)) takes no argument and
    // only reads the open /dev/kvm descriptor.
    let version = unsafe { nix::libc::ioctl(kvm.as_raw_fd(), 0xAE00, 0) };
    if version != 12 {
        return Some((
            Category::Kvm,
            format!("KVM_GET_API_VERSION answered {version}, not 12"),
        ));
    }
    // SAFETY: KVM_CREATE_VM (_IO(0xAE, 0x01)) with machine type 0 returns a
    // new descriptor (closed right away) or -1; no memory is passed.
    let vm = unsafe { nix::libc::ioctl(kvm.as_raw_fd(), 0xAE01, 0) };
    if vm < 0 {
        return Some((
            Category::Kvm,
            format!("KVM_CREATE_VM failed: {}", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: `vm` is a descriptor KVM_CREATE_VM just returned to us.
    unsafe { nix::libc::close(vm) };
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let nested = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"));
    if nested && std::env::var_os("KILN_TRY_NESTED_KVM").is_none() {
        return Some((
            Category::Kvm,
            "this machine is itself a VM (the 'hypervisor' CPU flag): KVM opens, but nested \
             guests hang or stop with an internal error and never make progress; \
             set KILN_TRY_NESTED_KVM=1 to try anyway"
                .into(),
        ));
    }
    for f in ["vmlinuz", "initramfs.cpio.gz"] {
        if !guest.join(f).is_file() {
            return Some((
                Category::Artifact,
                format!(
                    "no guest image: {} is missing (build it with images/guest/build.sh)",
                    guest.join(f).display()
                ),
            ));
        }
    }
    None
}

/// Boots the guest image in the real cloud-hypervisor on KVM and invokes a
/// static function through the agent. Skips, saying why, where KVM guests
/// cannot run; `KILN_REQUIRE_KVM=1` turns the skip into a failure.
#[tokio::test]
async fn real_cloud_hypervisor_boots_the_guest_and_invokes_through_the_agent() {
    let ch = std::env::var_os("KILN_CLOUD_HYPERVISOR")
        .map(PathBuf::from)
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|d| d.join("cloud-hypervisor"))
                .find(|p| p.is_file())
        });
    let guest = PathBuf::from(
        std::env::var_os("KILN_GUEST_CACHE").unwrap_or_else(|| "/var/cache/kiln/guest".into()),
    );
    if let Some((category, why)) = real_kvm_unavailable(&ch, &guest) {
        assert!(
            std::env::var_os("KILN_REQUIRE_KVM").is_none(),
            "KILN_REQUIRE_KVM is set but real microVMs cannot run: {why}"
        );
        return skip(category, why);
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = root.join("server.c");
    std::fs::write(&src, STATIC_SERVER_C).unwrap();
    let bin = root.join("server");
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("gcc runs (install gcc and libc6-dev)");
    assert!(
        out.status.success(),
        "gcc -static: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pki = DevPki::ensure(&root.join("pki"), &[]).unwrap();
    // Real taps and cgroups, named for this run and removed by the driver.
    let prefix = format!("kt{:x}", std::process::id() % 0xffff);
    let microvm = MicroVmConfig {
        cloud_hypervisor_path: ch,
        kernel: guest.join("vmlinuz"),
        initramfs: guest.join("initramfs.cpio.gz"),
        rootfs_dir: Some(root.join("rootfs")),
        name_prefix: prefix.clone(),
        cgroup_parent: format!("kiln-test-{prefix}"),
        instance_subnet: "10.215.0.0/24".parse().unwrap(),
        boot_timeout_ms: 60_000,
        ..MicroVmConfig::default()
    };
    let mut config: AgentConfig = serde_json::from_value(serde_json::json!({
        "state_dir": root.join("agent"),
        "listen": "127.0.0.1:0",
        "scheduler_url": "https://127.0.0.1:1",
        "gateway_internal_url": "https://127.0.0.1:1",
        "instance_start_timeout_ms": 60_000,
        "drain_on_shutdown": true,
        "runtimes": ["custom"],
        "tls": pki.files("agent"),
        "node": {"tenancy": "multi-tenant", "memory_mb": 4096, "cpu_milli": 2000, "max_instances": 4}
    }))
    .unwrap();
    config.sandbox.microvm = microvm.clone();
    let driver = Arc::new(
        MicroVmDriver::new(microvm, &config.state_dir)
            .await
            .unwrap(),
    );
    let (gateway_url, digest) = fake_gateway(&pki, zip_with(&std::fs::read(&bin).unwrap())).await;
    let backends = Backends {
        driver: driver.clone(),
        code_source: Arc::new(GatewayCodeSource::new(
            InternalClient::new(&pki.files("agent")).unwrap(),
            &gateway_url,
        )),
        unpacker: Arc::new(ZipUnpacker),
        scheduler: Arc::new(FakeScheduler::new(50)),
    };
    let agent = kiln_agent::start_with(config, backends).await.unwrap();
    let base = format!("https://{}", agent.addr());
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    // Instances are placed and removed by the scheduler's identity.
    let placer = InternalClient::new(&pki.files("scheduler")).unwrap();
    let id = InstanceId::generate();
    let created = placer
        .post::<_, InstanceCreated>(
            &base,
            paths::AGENT_INSTANCES,
            &CreateInstance {
                instance_id: id.clone(),
                spec: sample_spec(&digest, 9000),
                always_allocate_cpu: false,
            },
        )
        .await;
    let invoked = match &created {
        Ok(_) => {
            let req = Request::builder()
                .method(Method::POST)
                .uri(format!("{base}{}", paths::agent_invoke(&id)))
                .body(full(Bytes::from_static(b"x")))
                .unwrap();
            match client.send(req).await {
                Ok(resp) => Some(resp.into_body().collect().await.unwrap().to_bytes()),
                Err(_) => None,
            }
        }
        Err(_) => None,
    };
    agent.shutdown().await;
    driver.shutdown().await.unwrap();
    let created = created.expect("the microVM instance starts");
    assert_eq!(created.instance_id, id);
    assert_eq!(invoked.as_deref(), Some(&b"hello from a microVM"[..]));
}
