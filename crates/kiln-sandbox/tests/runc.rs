//! The container backend against real runc, `ip` and mounts.
//!
//! Needs root, runc, iproute2 and util-linux's `unshare`; skips with a
//! printed reason otherwise. Each test re-executes itself inside a private
//! mount namespace (the agent runs in one too), so every mount it makes
//! disappears with it. Everything it names carries a per-run prefix and a
//! guard removes it even when the test fails.
//!
//! `custom.debian12` comes from `$KILN_ROOTFS_CACHE` (default
//! `/var/cache/kiln-test/rootfs`), built there with debootstrap on first use.

#[path = "support/harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{enter_private_mount_ns, random_suffix, skip, which, Category, Guard, UID_BASE};
use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use kiln_sandbox::container::oci_runtime::{OciRuntime, RuncCli};
use kiln_sandbox::mounts::mount_points_under;
use kiln_sandbox::net::{IpCommand, NetworkOps};
use kiln_sandbox::{ContainerConfig, ContainerDriver, SandboxDriver, SandboxRequest};

/// The driver's configuration for this run: its names, a subnet of its
/// own, a small `/tmp` and one pooled network namespace.
fn config(guard: &Guard, subnet_seed: u32) -> ContainerConfig {
    let rootfs = std::env::var_os("KILN_ROOTFS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/kiln-test/rootfs"));
    ContainerConfig {
        name_prefix: guard.prefix.clone(),
        cgroup_parent: guard.prefix.clone(),
        instance_subnet: format!("10.{}.{}.0/24", 240 + subnet_seed % 10, subnet_seed % 250)
            .parse()
            .unwrap(),
        uid_base: UID_BASE,
        rootfs_dir: Some(rootfs),
        tmp_size_mb: 16,
        netns_pool: 1,
        ..ContainerConfig::default()
    }
}

fn spec(runtime: RuntimeName, command: &[&str], env_marker: &str) -> InstanceSpec {
    InstanceSpec {
        account_id: "1234".parse().unwrap(),
        function_name: "probe".parse().unwrap(),
        revision: String::new(),
        version: None,
        runtime,
        handler: "index.handler".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        args: vec![],
        port: 9000,
        environment: [("MARKER".to_owned(), env_marker.to_owned())].into(),
        memory_mb: 128,
        cpu_milli: 500,
        disk_mb: 512,
        timeout_s: 3,
        concurrency: 1,
        code_digest: "00".repeat(32),
        code_size: 1,
        initializer: None,
        pre_stop: None,
        layers: Vec::new(),
        role: None,
        network: None,
        image: None,
    }
    .seal()
}

/// Code dir as the agent extracts it: owned by the mapped root.
fn code_dir(guard: &Guard, files: &[(&str, &[u8], u32)]) -> PathBuf {
    let dir = guard.dir().join("code");
    std::fs::create_dir(&dir).unwrap();
    for (name, content, mode) in files {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
        std::os::unix::fs::chown(&p, Some(UID_BASE), Some(UID_BASE)).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(UID_BASE), Some(UID_BASE)).unwrap();
    dir
}

/// GET / over HTTP/1.0, retried until the server answers.
fn http_get(addr: SocketAddr, deadline: Duration) -> String {
    let start = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if body.starts_with("HTTP/1.") => return body,
            other if start.elapsed() > deadline => panic!("no answer from {addr}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Everything the driver made for `id` is gone after destroy.
async fn assert_gone(guard: &Guard, driver: &ContainerDriver, id: &InstanceId, netns: &str) {
    let state = guard.state();
    let instance_dir = state.join("instances").join(id.as_str());
    assert!(!instance_dir.exists(), "instance dir left behind");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        mount_points_under(&mountinfo, &state),
        Vec::<PathBuf>::new()
    );
    let names = IpCommand::default().list(&guard.prefix).await.unwrap();
    assert!(!names.contains(netns), "netns/veth {netns} left behind");
    let runc = RuncCli::new(which("runc").unwrap(), state.join("runc"));
    assert!(runc.list().await.unwrap().is_empty(), "runc container left");
    let cid = format!("{}-{}", guard.prefix, id);
    for ctrl in ["memory", "pids", "cpu"] {
        let cg = Path::new("/sys/fs/cgroup")
            .join(ctrl)
            .join(&guard.prefix)
            .join(&cid);
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    assert!(driver.list().await.unwrap().is_empty());
}

/// A limit of a running container, from cgroup v1 or, on a pure v2 host, v2.
fn cgroup_value(parent: &str, cid: &str, controller: &str, v1: &str, v2: &str) -> String {
    let root = Path::new("/sys/fs/cgroup");
    let path = if root.join(controller).is_dir() {
        root.join(controller).join(parent).join(cid).join(v1)
    } else {
        root.join(parent).join(cid).join(v2)
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

const PROBE_PY: &str = r#"
import ctypes, errno, http.server, json, os, socket

def sock(family, kind=socket.SOCK_STREAM, proto=0):
    try:
        socket.socket(family, kind, proto).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def io_uring():
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)
    fd = libc.syscall(425, 8, params)  # io_uring_setup
    if fd >= 0:
        os.close(fd)
        return "ok"
    return errno.errorcode.get(ctypes.get_errno(), "?")

def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        return e.strerror

def attempt(path):
    try:
        with open(path, "w") as f:
            f.write("x")
        return "ok"
    except OSError as e:
        return e.strerror

results = {
    "code": attempt("/code/written.txt"),
    "tmp": attempt("/tmp/MARKER-written.txt".replace("MARKER", os.environ["MARKER"])),
    "etc": attempt("/etc/kiln-probe"),
    "usr": attempt("/usr/kiln-probe"),
    "pid": os.getpid(),
    "uid": os.getuid(),
    "cwd": os.getcwd(),
    "fc_name": os.environ.get("FC_FUNCTION_NAME"),
    "code_path": os.environ.get("FC_FUNC_CODE_PATH"),
    "sockets": {
        "unix": sock(socket.AF_UNIX),
        "inet": sock(socket.AF_INET),
        "inet6": sock(socket.AF_INET6),
        "netlink_route": sock(socket.AF_NETLINK, socket.SOCK_RAW, 0),
        "netlink_audit": sock(socket.AF_NETLINK, socket.SOCK_RAW, 9),
        "alg": sock(38, socket.SOCK_SEQPACKET),
        "vsock": sock(40),
        "packet": sock(17, socket.SOCK_DGRAM),
    },
    "io_uring": io_uring(),
    "sys": sorted(os.listdir("/sys")),
    "sys_write": attempt("/sys/kiln-probe"),
    "cgroup_memory": read("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        if os.path.isdir("/sys/fs/cgroup/memory")
        else read("/sys/fs/cgroup/memory.max"),
}
with open("/code/server.py", "a") as f:
    f.write("\n# changed by the instance\n")

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(results).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Handler).serve_forever()
"#;

fn json_body(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap()
}

#[test]
fn debian12_instance_is_isolated_and_leaves_nothing() {
    if !enter_private_mount_ns("debian12_instance_is_isolated_and_leaves_nothing") {
        return;
    }
    let guard = Guard::named("kt");
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let t = Instant::now();
        let driver = ContainerDriver::new(config(&guard, seed), &guard.state())
            .await
            .unwrap()
            .with_region("cn-test");
        eprintln!("driver started in {:?}", t.elapsed());
        driver
            .ensure_runtime(RuntimeName::CustomDebian12)
            .await
            .expect("custom.debian12 root filesystem (debootstrap)");
        let code = code_dir(&guard, &[("server.py", PROBE_PY.as_bytes(), 0o644)]);
        let original = std::fs::read(code.join("server.py")).unwrap();
        let marker = guard.prefix.clone();
        let req = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec(
                RuntimeName::CustomDebian12,
                &["python3", "/code/server.py"],
                &marker,
            ),
            code_dir: code.clone(),
            image: None,
        };
        let t = Instant::now();
        let sb = driver.create(&req).await.unwrap();
        eprintln!("created in {:?}", t.elapsed());
        let log = sb.log_path.clone();
        let resp =
            tokio::task::spawn_blocking(move || http_get(sb.endpoint, Duration::from_secs(20)))
                .await
                .unwrap();
        eprintln!("answered after {:?}", t.elapsed());
        let r = json_body(&resp);
        eprintln!("probe: {r}");
        assert_eq!(r["code"], "ok", "log: {:?}", std::fs::read_to_string(&log));
        assert_eq!(r["tmp"], "ok");
        assert_eq!(r["etc"], "Read-only file system");
        assert_eq!(r["usr"], "Read-only file system");
        assert_eq!(r["pid"], 1);
        assert_eq!(r["uid"], 0);
        assert_eq!(r["cwd"], "/code");
        assert_eq!(r["fc_name"], "probe");
        assert_eq!(r["code_path"], "/code");
        // Seccomp: the families a function needs, and nothing else
        // (EPERM comes from the filter: AF_ALG, AF_VSOCK and audit
        // netlink need no capability), and no io_uring.
        let sockets = &r["sockets"];
        for family in ["unix", "inet", "netlink_route"] {
            assert_eq!(sockets[family], "ok", "{family}");
        }
        assert_ne!(sockets["inet6"], "EPERM");
        for family in ["alg", "vsock", "netlink_audit", "packet"] {
            assert_eq!(sockets[family], "EPERM", "{family}");
        }
        assert_eq!(r["io_uring"], "EPERM");
        // No host sysfs: only the instance's own cgroup, read-only.
        assert_eq!(r["sys"], serde_json::json!(["fs"]));
        assert_eq!(r["sys_write"], "Read-only file system");
        assert_eq!(r["cgroup_memory"], (128 * 1024 * 1024).to_string());
        assert!(driver.is_running(&req.instance_id).await.unwrap());
        let cid = format!("{}-{}", guard.prefix, req.instance_id);
        assert_eq!(
            cgroup_value(
                &guard.prefix,
                &cid,
                "memory",
                "memory.limit_in_bytes",
                "memory.max"
            ),
            (128 * 1024 * 1024).to_string()
        );
        assert_eq!(
            cgroup_value(&guard.prefix, &cid, "pids", "pids.max", "pids.max"),
            "1024"
        );
        // No swap beyond the memory limit.
        let v1_swap_accounted =
            Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists();
        if Path::new("/sys/fs/cgroup/memory").is_dir() && !v1_swap_accounted {
            assert_eq!(
                cgroup_value(&guard.prefix, &cid, "memory", "memory.swappiness", ""),
                "0"
            );
        } else {
            let swap = cgroup_value(
                &guard.prefix,
                &cid,
                "memory",
                "memory.memsw.limit_in_bytes",
                "memory.swap.max",
            );
            let expected = if v1_swap_accounted {
                (128 * 1024 * 1024).to_string()
            } else {
                "0".into()
            };
            assert_eq!(swap, expected);
        }

        // The instance's changes stay in its own layer.
        assert!(!code.join("written.txt").exists());
        assert_eq!(std::fs::read(code.join("server.py")).unwrap(), original);
        let instance_dir = guard
            .state()
            .join("instances")
            .join(req.instance_id.as_str());
        // The upper layer lives on the instance's size-limited disk.
        assert!(instance_dir.join("disk/upper/written.txt").exists());
        assert!(!Path::new(&format!("/tmp/{marker}-written.txt")).exists());
        let rootfs = driver.rootfs_dir().join("custom.debian12");
        assert!(!rootfs.join("etc/kiln-probe").exists());

        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(instance_dir.join("instance.json")).unwrap())
                .unwrap();
        let netns = record["netns"].as_str().unwrap().to_owned();
        let t = Instant::now();
        driver.destroy(&req.instance_id).await.unwrap();
        eprintln!("destroyed in {:?}", t.elapsed());
        driver.destroy(&req.instance_id).await.unwrap();
        assert_gone(&guard, &driver, &req.instance_id, &netns).await;
        assert!(std::fs::read(code.join("server.py")).unwrap() == original);

        driver.shutdown().await.unwrap();
        let left = IpCommand::default().list(&guard.prefix).await.unwrap();
        assert!(left.is_empty(), "pooled namespaces left: {left:?}");
    });
}

const STATIC_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int attempt(const char *path) {
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0) return errno;
    close(fd);
    return 0;
}

int main(void) {
    char body[256];
    int n = snprintf(body, sizeof body, "pid=%d code=%d tmp=%d root=%d\n", (int)getpid(),
                     attempt("/code/w"), attempt("/tmp/w"), attempt("/w"));
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons(9000);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 16)) return 1;
    for (;;) {
        int c = accept(s, 0, 0);
        if (c < 0) continue;
        char buf[1024];
        (void)read(c, buf, sizeof buf);
        char head[128];
        int h = snprintf(head, sizeof head, "HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n", n);
        (void)write(c, head, h);
        (void)write(c, body, n);
        close(c);
    }
}
"#;

#[test]
fn custom_runtime_runs_a_static_binary() {
    if !enter_private_mount_ns("custom_runtime_runs_a_static_binary") {
        return;
    }
    let guard = Guard::named("kt");
    let src = guard.dir().join("server.c");
    std::fs::write(&src, STATIC_C).unwrap();
    let bin = guard.dir().join("server");
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output();
    match built {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = format!(
                "gcc -static failed (install libc6-dev): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            skip(Category::Tool, why);
            return;
        }
        Err(e) => {
            let why = format!("gcc is not available: {e}");
            skip(Category::Tool, why);
            return;
        }
    }
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let driver = ContainerDriver::new(config(&guard, seed + 1), &guard.state())
            .await
            .unwrap();
        driver.ensure_runtime(RuntimeName::Custom).await.unwrap();
        let binary = std::fs::read(&bin).unwrap();
        let code = code_dir(&guard, &[("server", &binary, 0o755)]);
        let req = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec(RuntimeName::Custom, &["/code/server"], "static"),
            code_dir: code.clone(),
            image: None,
        };
        let sb = driver.create(&req).await.unwrap();
        let log = sb.log_path.clone();
        let resp =
            tokio::task::spawn_blocking(move || http_get(sb.endpoint, Duration::from_secs(10)))
                .await
                .unwrap();
        // 30 = EROFS
        assert!(
            resp.ends_with("pid=1 code=0 tmp=0 root=30\n"),
            "{resp:?} log: {:?}",
            std::fs::read_to_string(&log)
        );
        assert!(!code.join("w").exists());
        let netns = serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(
                guard
                    .state()
                    .join("instances")
                    .join(req.instance_id.as_str())
                    .join("instance.json"),
            )
            .unwrap(),
        )
        .unwrap()["netns"]
            .as_str()
            .unwrap()
            .to_owned();
        driver.destroy(&req.instance_id).await.unwrap();
        assert_gone(&guard, &driver, &req.instance_id, &netns).await;
        driver.shutdown().await.unwrap();
    });
}

#[test]
fn failures_exits_and_leftovers_are_cleaned_up() {
    if !enter_private_mount_ns("failures_exits_and_leftovers_are_cleaned_up") {
        return;
    }
    let guard = Guard::named("kt");
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let mut config = config(&guard, seed + 2);
        config.netns_pool = 0;
        let driver = ContainerDriver::new(config.clone(), &guard.state())
            .await
            .unwrap();
        driver
            .ensure_runtime(RuntimeName::CustomDebian12)
            .await
            .expect("custom.debian12 root filesystem (debootstrap)");
        let code = code_dir(&guard, &[("x", b"x", 0o644)]);
        let request = |command: &[&str]| SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec(RuntimeName::CustomDebian12, command, "m"),
            code_dir: code.clone(),
            image: None,
        };

        // A command that does not exist: a clear error and nothing left.
        let bad = request(&["/code/does-not-exist"]);
        let err = driver.create(&bad).await.unwrap_err();
        let chain = kiln_core::error_chain(&err);
        assert!(chain.contains("does-not-exist"), "{chain}");
        assert!(driver.list().await.unwrap().is_empty());
        assert!(IpCommand::default()
            .list(&guard.prefix)
            .await
            .unwrap()
            .is_empty());

        // A process that exits is seen as not running.
        let quits = request(&["python3", "-c", "pass"]);
        driver.create(&quits).await.unwrap();
        let start = Instant::now();
        while driver.is_running(&quits.instance_id).await.unwrap() {
            assert!(start.elapsed() < Duration::from_secs(10), "still running");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The agent dies with a running instance; the next driver with the
        // same prefix removes everything it left.
        let stays = request(&["python3", "-c", "import time; time.sleep(600)"]);
        driver.create(&stays).await.unwrap();
        assert!(driver.is_running(&stays.instance_id).await.unwrap());
        assert_eq!(driver.list().await.unwrap().len(), 2);
        drop(driver);

        let driver = ContainerDriver::new(config, &guard.state()).await.unwrap();
        assert!(driver.list().await.unwrap().is_empty());
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(
            mount_points_under(&mountinfo, &guard.state()),
            Vec::<PathBuf>::new()
        );
        assert!(IpCommand::default()
            .list(&guard.prefix)
            .await
            .unwrap()
            .is_empty());
        let runc = RuncCli::new(which("runc").unwrap(), guard.state().join("runc"));
        assert!(runc.list().await.unwrap().is_empty());
        assert!(matches!(
            driver.is_running(&stays.instance_id).await,
            Err(kiln_sandbox::SandboxError::NotFound(_))
        ));
        driver.shutdown().await.unwrap();
    });
}
