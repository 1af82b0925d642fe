//! What the real-runc limit tests and the thaw benchmark share: a private
//! mount namespace to run in, a guard that removes everything a run named
//! with its prefix, the probe function and HTTP helpers. Included with
//! `#[path]` by `tests/limits.rs`, `tests/runc.rs` and `benches/thaw.rs`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln_core::{InstanceId, InstanceSpec};
use kiln_sandbox::mounts::{HostMounter, Mounter};
use kiln_sandbox::{ContainerConfig, ContainerDriver, SandboxDriver, SandboxRequest};

pub const INNER: &str = "KILN_LIMITS_TEST_IN_PRIVATE_MOUNT_NS";
pub const UID_BASE: u32 = 100_000;

pub use kiln_test_support::{skip, which, Category};

/// Why this machine cannot run the real-runc tests, if it cannot.
pub fn skip_reason() -> Option<(Category, String)> {
    if !nix::unistd::geteuid().is_root() {
        return Some((Category::Root, "not running as root".into()));
    }
    for tool in ["runc", "ip", "unshare", "mkfs.ext4", "mount"] {
        if which(tool).is_none() {
            return Some((
                Category::Tool,
                format!("`{tool}` is not installed (run scripts/install-deps.sh)"),
            ));
        }
    }
    None
}

/// In the outer process: re-run `test` alone inside a private mount
/// namespace; true in the inner process, where the body runs.
pub fn enter_private_mount_ns(test: &str) -> bool {
    if std::env::var_os(INNER).is_some() {
        return true;
    }
    if let Some((category, reason)) = skip_reason() {
        skip(category, reason);
        return false;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .output()
        .expect("run the test in a private mount namespace");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    print!("{stdout}");
    assert!(out.status.success(), "{test} failed in its mount namespace");
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "{test} did not run"
    );
    false
}

pub fn random_suffix() -> (String, u32) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut x = u64::from(nanos) ^ (u64::from(std::process::id()) << 20);
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut s = String::new();
    for _ in 0..4 {
        s.push(alphabet[(x % 36) as usize] as char);
        x /= 36;
    }
    (s, (x % 2500) as u32)
}

/// Owns the per-run names and the temp dir; removes everything on drop.
pub struct Guard {
    pub prefix: String,
    tmp: Option<tempfile::TempDir>,
}

impl Guard {
    pub fn new() -> Self {
        Self::named("kl")
    }

    /// Names start with `tag` and a random suffix (each test file has its
    /// own tag, so a leftover says which suite left it).
    pub fn named(tag: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        // runc mounts as the instance's mapped root, which must traverse.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let (suffix, _) = random_suffix();
        Self {
            prefix: format!("{tag}{suffix}"),
            tmp: Some(tmp),
        }
    }

    pub fn dir(&self) -> &Path {
        self.tmp.as_ref().unwrap().path()
    }

    pub fn state(&self) -> PathBuf {
        self.dir().join("state")
    }

    pub fn config(&self, seed: u32) -> ContainerConfig {
        let rootfs = std::env::var_os("KILN_ROOTFS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/kiln-test/rootfs"));
        ContainerConfig {
            name_prefix: self.prefix.clone(),
            cgroup_parent: self.prefix.clone(),
            instance_subnet: format!("10.{}.{}.0/24", 230 + seed % 10, seed % 250)
                .parse()
                .unwrap(),
            uid_base: UID_BASE,
            rootfs_dir: Some(rootfs),
            netns_pool: 0,
            ..ContainerConfig::default()
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let runc_root = self.state().join("runc");
        if let Ok(out) = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                // A frozen container is thawed by runc before the kill.
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["resume", id])
                    .stderr(std::process::Stdio::null())
                    .status();
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["delete", "--force", id])
                    .status();
            }
        }
        let names = format!("{}-", self.prefix);
        for (list, del) in [
            (vec!["-o", "link", "show"], vec!["link", "delete"]),
            (vec!["netns", "list"], vec!["netns", "delete"]),
        ] {
            let out = Command::new("ip").args(&list).output().unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                // `ip -o link`: "3: name@peer: ..."; `ip netns list`:
                // "name (id: 3)".
                let name = if list[0] == "netns" {
                    line.split_whitespace().next().unwrap_or("")
                } else {
                    line.split(": ")
                        .nth(1)
                        .unwrap_or("")
                        .split(['@', ' '])
                        .next()
                        .unwrap_or("")
                };
                if name.starts_with(&names) {
                    let _ = Command::new("ip").args(&del).arg(name).status();
                }
            }
        }
        // Empty cgroup directories only (rmdir refuses anything else),
        // children first, in every v1 controller and in v2.
        let root = Path::new("/sys/fs/cgroup");
        let mut hierarchies = vec![root.to_owned()];
        if let Ok(entries) = std::fs::read_dir(root) {
            hierarchies.extend(entries.flatten().map(|e| e.path()));
        }
        for h in hierarchies {
            let parent = h.join(&self.prefix);
            if let Ok(children) = std::fs::read_dir(&parent) {
                for c in children.flatten() {
                    if c.path().is_dir() {
                        let _ = std::fs::remove_dir(c.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(parent);
        }
        let m = HostMounter;
        for target in m.mounts_under(self.dir()).unwrap_or_default() {
            let _ = m.unmount(&target);
        }
        if m.mounts_under(self.dir()).unwrap_or_default().is_empty() {
            drop(self.tmp.take());
        } else {
            let kept = self.tmp.take().unwrap().keep();
            eprintln!("kept {} because mounts remain below it", kept.display());
        }
    }
}

/// A spec from JSON, so optional fields added later keep their defaults.
pub fn spec(memory_mb: u32, cpu_milli: u32, command: &[&str]) -> InstanceSpec {
    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
        "account_id": "1234",
        "function_name": "limits",
        "revision": "",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "command": command,
        "args": [],
        "port": 9000,
        "environment": {},
        "memory_mb": memory_mb,
        "cpu_milli": cpu_milli,
        "disk_mb": 512,
        "timeout_s": 3,
        "concurrency": 1,
        "code_digest": "00".repeat(32),
        "code_size": 1,
    }))
    .expect("spec JSON");
    spec.seal()
}

/// The function that probes its sandbox. Hardening checks run at start;
/// `/fork` and `/disk` run the fork bomb and the disk filler on demand;
/// `/mem` allocates until the OOM killer ends it; `/` just answers.
pub const PROBE_PY: &str = r#"
import ctypes, errno, http.server, json, os, platform, socket, time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def err(r):
    if r != -1:
        return "allowed"
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))

NR = {
    "x86_64": {"init_module": 175, "finit_module": 313, "delete_module": 176, "bpf": 321,
               "keyctl": 250, "kexec_load": 246, "clone3": 435, "setns": 308},
    "aarch64": {"init_module": 105, "finit_module": 273, "delete_module": 106, "bpf": 280,
                "keyctl": 219, "kexec_load": 104, "clone3": 435, "setns": 268},
}[platform.machine()]

def sock(family, kind, proto):
    try:
        socket.socket(family, kind, proto).close()
        return "allowed"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def read(path):
    try:
        with open(path, "rb") as f:
            return "read %d bytes" % len(f.read(4096))
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))

def ptrace_other():
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    r = err(libc.ptrace(16, child, None, None))  # PTRACE_ATTACH
    os.kill(child, 9)
    os.waitpid(child, 0)
    return r

def compat_syscall():
    """getpid through the 32-bit entry (int 0x80) in a child: x86_64 only."""
    if platform.machine() != "x86_64":
        return "not x86_64"
    import mmap
    child = os.fork()
    if child == 0:
        code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        code.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20; int 0x80; ret
        call = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
        os._exit(0 if call() == os.getpid() else 1)
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status):
        return "killed by signal %d" % os.WTERMSIG(status)
    return "allowed" if os.WEXITSTATUS(status) == 0 else "refused"

results = {
    "compat_syscall": compat_syscall(),
    "mount": err(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, None)),
    "umount": err(libc.umount2(b"/code", 2)),
    "ptrace": ptrace_other(),
    "raw_socket": sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
    "packet_socket": sock(socket.AF_PACKET, socket.SOCK_RAW, 0),
    "init_module": err(libc.syscall(NR["init_module"], None, 0, b"")),
    "finit_module": err(libc.syscall(NR["finit_module"], 0, b"", 0)),
    "delete_module": err(libc.syscall(NR["delete_module"], b"loop", 0)),
    "bpf": err(libc.syscall(NR["bpf"], 0, None, 0)),
    "keyctl": err(libc.syscall(NR["keyctl"], 0, -1, 0)),
    "kexec_load": err(libc.syscall(NR["kexec_load"], 0, 0, None, 0)),
    "unshare_user": err(libc.unshare(0x10000000)),
    "unshare_net": err(libc.unshare(0x40000000)),
    "unshare_mount": err(libc.unshare(0x00020000)),
    "setns": err(libc.syscall(NR["setns"], 0, 0)),
    "clone3": err(libc.syscall(NR["clone3"], None, 0)),
    "host_secret": read(os.environ["HOST_SECRET"]),
    "proc_kcore": read("/proc/kcore"),
    "proc_keys": read("/proc/keys"),
    "sysrq": err(libc.open(b"/proc/sysrq-trigger", 1)),
    "proc_sys_write": err(libc.open(b"/proc/sys/kernel/hostname", 1)),
    "uid": os.getuid(),
}

def fork_bomb():
    pids, error = [], None
    try:
        while len(pids) < 5000:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            pids.append(pid)
    except OSError as e:
        error = errno.errorcode.get(e.errno, str(e.errno))
    for p in pids:
        os.kill(p, 9)
    for p in pids:
        os.waitpid(p, 0)
    return {"forked": len(pids), "error": error}

def fill(path, limit=20 << 30):
    written, error = 0, None
    chunk = b"\x5a" * (1 << 20)
    try:
        with open(path, "wb") as f:
            while written < limit:
                f.write(chunk)
                f.flush()
                written += len(chunk)
            os.fsync(f.fileno())
    except OSError as e:
        error = errno.errorcode.get(e.errno, str(e.errno))
    return written, error

def disk_filler():
    tmp_written, tmp_error = fill("/tmp/filler")
    code_written, code_error = fill("/code/filler")
    # With layers, /opt's changes are on the same (full) disk; capped so a
    # regression cannot fill the host.
    opt_error = None
    if os.path.isdir("/opt/probe-layer"):
        _, opt_error = fill("/opt/filler", 64 << 20)
        os.unlink("/opt/filler")
    os.unlink("/tmp/filler")
    os.unlink("/code/filler")
    after, after_error = fill("/tmp/after")
    os.unlink("/tmp/after")
    return {"tmp_written": tmp_written, "tmp_error": tmp_error,
            "code_written": code_written, "code_error": code_error,
            "opt_error": opt_error}

hog = []
def memory_bomb():
    while True:
        hog.append(b"\x01" * (16 << 20))

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/fork":
            out = fork_bomb()
        elif self.path == "/disk":
            out = disk_filler()
        elif self.path == "/mem":
            out = memory_bomb()
        elif self.path == "/probe":
            out = results
        else:
            out = {"alive": True, "pid": os.getpid()}
        body = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", 9000), Handler).serve_forever()
"#;

/// Code dir as the agent extracts it: owned by the mapped root.
pub fn code_dir(guard: &Guard) -> PathBuf {
    let dir = guard.dir().join("code");
    std::fs::create_dir(&dir).unwrap();
    let p = dir.join("probe.py");
    std::fs::write(&p, PROBE_PY).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::os::unix::fs::chown(&p, Some(UID_BASE), Some(UID_BASE)).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(UID_BASE), Some(UID_BASE)).unwrap();
    dir
}

/// One HTTP/1.0 GET, retried until the server answers within `deadline`.
/// Returns None when the connection broke without an answer.
pub fn get(addr: SocketAddr, path: &str, deadline: Duration) -> Option<serde_json::Value> {
    let start = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(90)))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(resp) if resp.starts_with("HTTP/1.") => {
                let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
                return Some(serde_json::from_str(body).unwrap());
            }
            // Connected, then the connection broke: the server died.
            Ok(_) | Err(_) if start.elapsed() > deadline => return None,
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

pub async fn get_async(addr: SocketAddr, path: &'static str) -> Option<serde_json::Value> {
    tokio::task::spawn_blocking(move || get(addr, path, Duration::from_secs(20)))
        .await
        .unwrap()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub async fn start(
    driver: &ContainerDriver,
    code: &Path,
    memory_mb: u32,
    cpu_milli: u32,
    env: &[(&str, String)],
) -> (InstanceId, SocketAddr) {
    start_with_layers(driver, code, memory_mb, cpu_milli, env, &[]).await
}

/// A layer beside the code dir (as the agent's cache keeps them) holding
/// `probe-layer/`, so the probe sees layers under `/opt`.
#[allow(dead_code)] // not every test binary uses it
pub fn layer_dir(guard: &Guard) -> String {
    let digest = "ab".repeat(32);
    let dir = guard.dir().join(&digest);
    std::fs::create_dir_all(dir.join("probe-layer")).unwrap();
    std::fs::write(dir.join("probe-layer/readme"), "layer").unwrap();
    digest
}

/// [`start`] with the function's layers (digests of [`layer_dir`]s).
pub async fn start_with_layers(
    driver: &ContainerDriver,
    code: &Path,
    memory_mb: u32,
    cpu_milli: u32,
    env: &[(&str, String)],
    layers: &[String],
) -> (InstanceId, SocketAddr) {
    let mut spec = spec(memory_mb, cpu_milli, &["python3", "/code/probe.py"]);
    for (k, v) in env {
        spec.environment.insert((*k).to_owned(), v.clone());
    }
    spec.layers = layers.to_vec();
    let req = SandboxRequest {
        instance_id: InstanceId::generate(),
        spec: spec.seal(),
        code_dir: code.to_owned(),
        image: None,
    };
    let sb = driver.create(&req).await.unwrap();
    let up = get_async(sb.endpoint, "/").await;
    assert!(
        up.is_some(),
        "instance never answered; log: {:?}",
        std::fs::read_to_string(&sb.log_path)
    );
    (req.instance_id, sb.endpoint)
}
