//! The real guest image, booted under qemu with software emulation (TCG,
//! no KVM): images/guest/build.sh builds the kernel + initramfs (Debian's
//! cloud kernel, kiln-guest as /init) and an erofs code disk holding
//! examples/static-echo; qemu boots it with the host channel on a
//! virtio-serial port whose chardev is a unix socket here (`wait=on`, so
//! nothing the guest writes is lost before we connect), and user-mode
//! networking restricted to the VM. The test waits for Ready, configures
//! the guest (network, root, function), and invokes the function through
//! kiln-guest. Skips only when qemu-system-x86_64 is not installed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_guest_proto::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(status.success(), "{what} failed: {status}");
}

/// Kills and waits for qemu (by its pid) however the test ends, and shows
/// the guest console when it failed.
struct Qemu {
    child: Child,
    console: PathBuf,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.console).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- guest console (last 60 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

fn qemu_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_image_boots_under_tcg_and_relays_an_invocation() {
    let Some(qemu) = qemu_binary() else {
        eprintln!("SKIP: qemu-system-x86_64 is not installed (scripts/install-deps.sh installs qemu-system-x86)");
        return;
    };
    let started = Instant::now();
    let cache =
        std::env::var("KILN_GUEST_CACHE").unwrap_or_else(|_| "/var/cache/kiln/guest".into());
    let build = repo_root().join("images/guest/build.sh");
    run(
        Command::new(&build).env("KILN_GUEST_CACHE", &cache),
        "images/guest/build.sh",
    );
    eprintln!("guest image ready after {:?}", started.elapsed());

    // The code package: static-echo as /code/server on an erofs disk.
    let tmp = tempfile::tempdir().unwrap();
    let code = tmp.path().join("code");
    std::fs::create_dir(&code).unwrap();
    run(
        Command::new("rustc")
            .args([
                "-O",
                "--edition",
                "2021",
                "-C",
                "target-feature=+crt-static",
                "-o",
            ])
            .arg(code.join("server"))
            .arg(repo_root().join("examples/static-echo/main.rs")),
        "building static-echo",
    );
    let code_disk = tmp.path().join("code.erofs");
    run(
        Command::new(&build).arg("disk").arg(&code).arg(&code_disk),
        "building the code disk",
    );

    let sock = tmp.path().join("kiln.sock");
    let console = tmp.path().join("console.log");
    let cache = Path::new(&cache);
    let child = Command::new(qemu)
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(cache.join("vmlinuz"))
        .arg("-initrd")
        .arg(cache.join("initramfs.cpio.gz"))
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 kiln.channel=serial:kiln.0 kiln.debug",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args(["-device", "virtio-serial-pci"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=kiln,path={},server=on,wait=on",
            sock.display()
        ))
        .args(["-device", "virtserialport,chardev=kiln,name=kiln.0"])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=code,format=raw,readonly=on",
            code_disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=code"])
        .args(["-netdev", "user,id=net0,restrict=on"])
        .args(["-device", "virtio-net-pci,netdev=net0"])
        .stdin(Stdio::null())
        .spawn()
        .expect("starting qemu");
    let mut vm = Qemu { child, console };

    // qemu creates the socket, then waits for us before it boots.
    let deadline = Instant::now() + Duration::from_secs(20);
    let stream = loop {
        match tokio::net::UnixStream::connect(&sock).await {
            Ok(s) => break s,
            Err(e) => {
                if let Some(status) = vm.child.try_wait().unwrap() {
                    panic!("qemu exited before listening: {status}");
                }
                assert!(
                    Instant::now() < deadline,
                    "qemu never opened {}: {e}",
                    sock.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let boot = Instant::now();
    let client = GuestClient::connect(stream);
    let ready = client
        .wait_ready(Duration::from_secs(90))
        .await
        .expect("guest never reported ready");
    eprintln!(
        "kiln-guest {} ready {:?} after boot started",
        ready.guest_version,
        boot.elapsed()
    );
    assert_eq!(ready.protocol_version, PROTOCOL_VERSION);
    assert!(!ready.configured);

    let config = GuestConfig {
        instance_id: "qemu-boot-test".into(),
        hostname: None,
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.2.2".parse().unwrap()),
            mtu: Some(1500),
            dns: vec!["10.0.2.3".parse().unwrap()],
        }),
        process: ProcessConfig {
            command: vec!["/code/server".into()],
            args: vec![],
            env: BTreeMap::new(),
            port: 9000,
            working_dir: "/code".into(),
            start_timeout_ms: 30_000,
        },
        disks: DiskConfig {
            runtime: None,
            code: Some(Disk {
                device: "/dev/vda".into(),
                fs: FsType::Erofs,
            }),
            scratch: None,
            layers: vec![],
        },
    };
    let configured = client
        .configure(&config, Duration::from_secs(60))
        .await
        .expect("configure failed");
    eprintln!(
        "function ready in the guest after {} ms",
        configured.start_ms
    );

    let head = CallHead {
        headers: vec![("x-fc-request-id".into(), "qemu-req-1".into())],
        timeout_ms: Some(30_000),
    };
    let resp = client
        .invoke(head, Bytes::from_static(b"hello through kiln-guest"))
        .await
        .expect("invoke failed");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-echo-request-id"), Some("qemu-req-1"));
    assert_eq!(
        resp.body.collect().await.unwrap(),
        Bytes::from_static(b"hello through kiln-guest")
    );

    // Two calls in flight at once on the one channel.
    let (a, b) = tokio::join!(
        client.invoke(CallHead::default(), Bytes::from(vec![b'a'; 200_000])),
        client.invoke(CallHead::default(), Bytes::from_static(b"b")),
    );
    assert_eq!(a.unwrap().body.collect().await.unwrap().len(), 200_000);
    assert_eq!(
        b.unwrap().body.collect().await.unwrap(),
        Bytes::from_static(b"b")
    );

    // Exec reaches the guest (the custom runtime has no shell: a clear error).
    let mut session = client
        .exec(ExecRequest {
            command: vec!["/bin/sh".into()],
            env: BTreeMap::new(),
            tty: false,
            size: None,
            working_dir: None,
        })
        .await
        .unwrap();
    match session.output.next().await {
        Some(ExecEvent::Error(e)) => assert_eq!(e.code, ErrorCode::ExecFailed),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        client.pre_stop(CallHead::default()).await.unwrap().status,
        200
    );
    eprintln!("qemu boot test done in {:?}", started.elapsed());
    drop(client);
    drop(vm);
}
