//! The real guest image, booted under qemu with software emulation (TCG,
//! no KVM): images/guest/build.sh builds the kernel + initramfs (Debian's
//! cloud kernel, kiln-guest as /init) and an erofs code disk holding
//! examples/static-echo; qemu boots it with the host channel on a
//! virtio-serial port whose chardev is a unix socket here (`wait=on`, so
//! nothing the guest writes is lost before we connect), and user-mode
//! networking restricted to the VM. The test waits for Ready, configures
//! the guest (network, root, function), and invokes the function through
//! kiln-guest. Skips only when qemu-system-x86_64 is not installed.
//!
//! Every wait has a deadline. The preparation (image build, rustc, disk)
//! runs before any async runtime exists, each child in its own process
//! group that is killed when its deadline passes; each protocol step runs
//! under `tokio::time::timeout`; and a watchdog thread outside the runtime
//! ends the process (after killing qemu and printing the step it was in and
//! the guest console) should the runtime itself ever stop making progress.

use std::collections::BTreeMap;
use std::future::Future;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_guest_proto::*;

// Deadlines. Together (about 9.5 min) they stay under nextest's 10-minute
// terminate-after (.config/nextest.toml), so the test always ends itself and
// says what it was waiting for.
/// The guest image: a cold build compiles kiln-guest for the static target
/// and may download the kernel package; a warm one takes seconds.
const IMAGE_BUILD: Duration = Duration::from_secs(300);
const RUSTC: Duration = Duration::from_secs(60);
const DISK_BUILD: Duration = Duration::from_secs(30);
/// qemu creates its socket at once; then it waits for us before booting.
const QEMU_LISTEN: Duration = Duration::from_secs(20);
/// About 4 s on an idle machine under TCG, 10-16 s with both cores busy.
const BOOT: Duration = Duration::from_secs(90);
const CONFIGURE: Duration = Duration::from_secs(60);
/// Each call after configure (head, body, exec, pre-stop).
const CALL: Duration = Duration::from_secs(30);
/// Everything from qemu's start to the end, enforced by the watchdog thread.
const WHOLE_VM_PART: Duration = Duration::from_secs(200);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn qemu_binary() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// Last `n` lines of the guest console.
fn console_tail(console: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Run a command to completion within `deadline`, in a process group of
/// its own so that a timeout kills whatever it started (build.sh runs
/// cargo, apt-get, cpio...). Blocking: call it outside any async runtime.
fn run(cmd: &mut Command, what: &str, deadline: Duration) {
    let started = Instant::now();
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let pgid = child.id() as i32;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                assert!(status.success(), "{what} failed: {status}");
                return;
            }
            Ok(None) if started.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Ok(None) => {
                // SAFETY: kill(2) on the process group we created above.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                panic!(
                    "{what} did not finish within {deadline:?}; killed its process group {pgid}"
                );
            }
            Err(e) => panic!("{what}: waiting: {e}"),
        }
    }
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
            eprintln!(
                "--- guest console (last 60 lines) ---\n{}",
                console_tail(&self.console, 60)
            );
        }
    }
}

/// What the test is waiting for, shared with the watchdog.
#[derive(Clone)]
struct Progress {
    step: Arc<Mutex<(&'static str, Instant)>>,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            step: Arc::new(Mutex::new(("starting", Instant::now()))),
        }
    }

    fn set(&self, what: &'static str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = (what, Instant::now());
    }

    fn describe(&self) -> String {
        let (what, since) = *self.step.lock().unwrap_or_else(|e| e.into_inner());
        format!("{what} (for {:?})", since.elapsed())
    }

    /// Await `fut` for at most `limit`; a timeout fails the test naming
    /// what it waited for.
    async fn within<T>(
        &self,
        what: &'static str,
        limit: Duration,
        fut: impl Future<Output = T>,
    ) -> T {
        self.set(what);
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
        }
    }
}

/// Ends the whole test process if the VM part overruns, even when the async
/// runtime is wedged (a blocked worker would keep tokio's timers from
/// firing): kills qemu by pid, prints the step and the console, exits.
/// Disarmed by dropping it.
struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn arm(
        limit: Duration,
        progress: Progress,
        qemu_pid: Arc<AtomicI32>,
        console: PathBuf,
    ) -> Self {
        let (disarm, rx) = mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!(
                    "WATCHDOG: the VM part of the test overran {limit:?}; waiting for {}",
                    progress.describe()
                );
                let pid = qemu_pid.load(Ordering::SeqCst);
                if pid > 0 {
                    // SAFETY: kill(2) on the qemu child this test spawned.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                eprintln!(
                    "--- guest console (last 60 lines) ---\n{}",
                    console_tail(&console, 60)
                );
                // exit() runs no destructors: remove the test's temporary
                // directory (plain files, nothing mounted) here.
                if let Some(dir) = console.parent() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(101);
            }
        });
        Watchdog {
            disarm: Some(disarm),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn guest_image_boots_under_tcg_and_relays_an_invocation() {
    let Some(qemu) = qemu_binary() else {
        return kiln_test_support::skip(
            kiln_test_support::Category::Tool,
            "qemu-system-x86_64 is not installed (scripts/install-deps.sh installs qemu-system-x86)",
        );
    };
    let started = Instant::now();
    let cache =
        std::env::var("KILN_GUEST_CACHE").unwrap_or_else(|_| "/var/cache/kiln/guest".into());
    let build = repo_root().join("images/guest/build.sh");
    run(
        Command::new(&build).env("KILN_GUEST_CACHE", &cache),
        "images/guest/build.sh",
        IMAGE_BUILD,
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
        RUSTC,
    );
    let code_disk = tmp.path().join("code.erofs");
    run(
        Command::new(&build).arg("disk").arg(&code).arg(&code_disk),
        "building the code disk",
        DISK_BUILD,
    );

    let sock = tmp.path().join("kiln.sock");
    let console = tmp.path().join("console.log");
    let progress = Progress::new();
    let qemu_pid = Arc::new(AtomicI32::new(0));
    let watchdog = Watchdog::arm(
        WHOLE_VM_PART,
        progress.clone(),
        qemu_pid.clone(),
        console.clone(),
    );
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
    qemu_pid.store(child.id() as i32, Ordering::SeqCst);
    let mut vm = Qemu {
        child,
        console: console.clone(),
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(talk_to_guest(&progress, &mut vm, &sock));
    // The client's tasks end with the runtime; then qemu goes.
    runtime.shutdown_timeout(Duration::from_secs(5));
    drop(vm);
    drop(watchdog);
    eprintln!("qemu boot test done in {:?}", started.elapsed());
}

async fn talk_to_guest(progress: &Progress, vm: &mut Qemu, sock: &Path) {
    // qemu creates the socket, then waits for us before it boots.
    progress.set("qemu to listen on its chardev socket");
    let deadline = Instant::now() + QEMU_LISTEN;
    let stream = loop {
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(sock),
        )
        .await;
        match attempt {
            Ok(Ok(s)) => break s,
            Ok(Err(_)) | Err(_) => {
                if let Some(status) = vm.child.try_wait().unwrap() {
                    panic!("qemu exited before listening: {status}");
                }
                assert!(
                    Instant::now() < deadline,
                    "qemu never opened {} within {QEMU_LISTEN:?}",
                    sock.display()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let boot = Instant::now();
    let client = GuestClient::connect(stream);
    let ready = progress
        .within(
            "kiln-guest's Ready frame",
            BOOT,
            client.wait_ready(Duration::MAX),
        )
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
    let configured = progress
        .within(
            "Configured (network, root, function's port)",
            CONFIGURE,
            client.configure(&config, Duration::MAX),
        )
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
    let resp = progress
        .within(
            "the response head of the first invocation",
            CALL,
            client.invoke(head, Bytes::from_static(b"hello through kiln-guest")),
        )
        .await
        .expect("invoke failed");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-echo-request-id"), Some("qemu-req-1"));
    let body = progress
        .within(
            "the body of the first invocation",
            CALL,
            resp.body.collect(),
        )
        .await
        .unwrap();
    assert_eq!(body, Bytes::from_static(b"hello through kiln-guest"));

    // Two calls in flight at once on the one channel.
    let (a, b) = progress
        .within(
            "two concurrent invocations (200 kB and 1 byte)",
            CALL,
            async {
                tokio::join!(
                    client.invoke(CallHead::default(), Bytes::from(vec![b'a'; 200_000])),
                    client.invoke(CallHead::default(), Bytes::from_static(b"b")),
                )
            },
        )
        .await;
    let a = progress
        .within("the 200 kB body", CALL, a.unwrap().body.collect())
        .await;
    let b = progress
        .within("the 1 byte body", CALL, b.unwrap().body.collect())
        .await;
    assert_eq!(a.unwrap().len(), 200_000);
    assert_eq!(b.unwrap(), Bytes::from_static(b"b"));

    // Exec reaches the guest (the custom runtime has no shell: a clear error).
    let mut session = progress
        .within(
            "an exec session to start",
            CALL,
            client.exec(ExecRequest {
                command: vec!["/bin/sh".into()],
                env: BTreeMap::new(),
                tty: false,
                size: None,
                working_dir: None,
            }),
        )
        .await
        .unwrap();
    match progress
        .within(
            "the exec session's first event",
            CALL,
            session.output.next(),
        )
        .await
    {
        // The spawn's own error, not a handler that broke on the way.
        Some(ExecEvent::Error(e)) => {
            assert_eq!(e.code, ErrorCode::ExecFailed);
            assert!(e.message.contains("No such file"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    let pre_stop = progress
        .within(
            "the PreStop call",
            CALL,
            client.pre_stop(CallHead::default()),
        )
        .await
        .unwrap();
    assert_eq!(pre_stop.status, 200);
    progress.set("done");
}
