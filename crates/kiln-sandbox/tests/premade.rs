//! Pre-made sandboxes against real runc, `ip`, nftables-free slots, cgroups
//! and mounts: a pooled container is claimed by exactly one instance, gets
//! that function's limits, environment and code, is destroyed at release
//! and never serves another function or account; pools stay within their
//! memory budget; a driver killed with SIGKILL leaves nothing that the next
//! start does not remove.
//!
//! Needs root, runc, iproute2, util-linux's `unshare` and `gcc -static`;
//! skips with a printed reason otherwise. Each test re-executes itself in a
//! private mount namespace; everything carries a per-run prefix and a guard
//! removes it even when the test fails.

#[path = "support/harness.rs"]
mod harness;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{
    enter_private_mount_ns, random_suffix, skip, which, Category, Guard, INNER, UID_BASE,
};
use kiln_core::{InstanceId, InstanceSpec, RuntimeName};
use kiln_sandbox::container::oci_runtime::{OciRuntime, RuncCli};
use kiln_sandbox::container::premade::PremadeConfig;
use kiln_sandbox::mounts::mount_points_under;
use kiln_sandbox::net::{IpCommand, NetworkOps};
use kiln_sandbox::{ContainerConfig, ContainerDriver, SandboxDriver, SandboxRequest};

/// Answers every request with its pid, its MARKER variable, its working
/// directory and whether /code and /tmp are writable (errno, 0 = yes).
const SERVER_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int attempt(const char *path) {
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0644);
    if (fd < 0) return errno;
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    char body[512], cwd[128];
    const char *marker = getenv("MARKER");
    if (argc > 1 && strcmp(argv[1], "env") == 0) {
        printf("MARKER=%s\n", marker ? marker : "-");
        return 7;
    }
    if (!getcwd(cwd, sizeof cwd)) strcpy(cwd, "?");
    int n = snprintf(body, sizeof body, "pid=%d marker=%s cwd=%s code=%d tmp=%d\n",
                     (int)getpid(), marker ? marker : "-", cwd,
                     attempt("/code/w"), attempt("/tmp/w"));
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

/// The static server in a code dir owned by the mapped root, or a skip.
fn code_dir(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("server.c");
    std::fs::write(&src, SERVER_C).unwrap();
    let code = dir.join("code");
    std::fs::create_dir(&code).unwrap();
    let bin = code.join("server");
    match Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            let why = format!(
                "gcc -static failed (install libc6-dev): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            skip(Category::Tool, why);
            return None;
        }
        Err(e) => {
            skip(Category::Tool, format!("gcc is not available: {e}"));
            return None;
        }
    }
    for p in [&bin, &code] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(p, Some(UID_BASE), Some(UID_BASE)).unwrap();
    }
    Some(code)
}

/// 10.220-224.x.0/24 for the first test, 10.225-229.x.0/24 for the
/// SIGKILL test: the two never share a subnet when they run side by side.
fn subnet(sigkill_test: bool, seed: u32) -> kiln_sandbox::net::Ipv4Cidr {
    let base = if sigkill_test { 225 } else { 220 };
    format!("10.{}.{}.0/24", base + seed % 5, seed % 250)
        .parse()
        .unwrap()
}

fn config(guard: &Guard, seed: u32, premade: PremadeConfig) -> ContainerConfig {
    ContainerConfig {
        instance_subnet: subnet(false, seed),
        tmp_size_mb: 16,
        // No cold-start boost: the claimed quota is the function's own.
        cold_start_boost_ms: 0,
        premade,
        // Only `custom` (an empty tree, made at once) is built here: every
        // built runtime keeps a sandbox before any gets a second, so the
        // budget arithmetic below must not depend on what a shared cache
        // (KILN_ROOTFS_CACHE) happens to hold.
        rootfs_dir: Some(guard.dir().join("rootfs")),
        ..guard.config(seed)
    }
}

fn premade(budget_mb: u32, max_per_runtime: usize) -> PremadeConfig {
    PremadeConfig {
        enabled: true,
        budget_mb,
        sandbox_mb: 32,
        max_per_runtime,
        demand_window_s: 60,
    }
}

fn spec(account: &str, function: &str, marker: &str) -> InstanceSpec {
    let spec: InstanceSpec = serde_json::from_value(serde_json::json!({
        "account_id": account,
        "function_name": function,
        "revision": "",
        "runtime": "custom",
        "handler": "main",
        "command": ["/code/server"],
        "args": [],
        "port": 9000,
        "environment": {"MARKER": marker},
        "memory_mb": 128,
        "cpu_milli": 250,
        "disk_mb": 512,
        "timeout_s": 3,
        "concurrency": 1,
        "code_digest": "00".repeat(32),
        "code_size": 1,
    }))
    .unwrap();
    spec.seal()
}

fn http_get(addr: SocketAddr) -> String {
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
            Ok(r) if r.starts_with("HTTP/1.") => {
                return r.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
            }
            other if start.elapsed() > Duration::from_secs(10) => {
                panic!("no answer from {addr}: {other:?}")
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

async fn wait_ready(driver: &ContainerDriver, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = driver
            .premade_ready()
            .get(&RuntimeName::Custom)
            .copied()
            .unwrap_or(0);
        if ready == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool holds {ready} sandboxes, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Started containers of the pool that nobody claimed, by id, for
/// `runtime` (None: all): their directory under `premade/` is still a
/// directory (a claimed one's is a symlink) and the pool marked it `ready`.
fn pooled(guard: &Guard, runtime: Option<RuntimeName>) -> BTreeSet<String> {
    let dir = guard.state().join("premade");
    std::fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_type().unwrap().is_dir())
                .filter(|e| e.path().join("ready").is_file())
                .filter(|e| {
                    let config: serde_json::Value = serde_json::from_slice(
                        &std::fs::read(e.path().join("bundle/config.json")).unwrap(),
                    )
                    .unwrap();
                    runtime.is_none_or(|r| config["annotations"]["io.kiln.runtime"] == r.as_str())
                })
                .map(|e| format!("{}-{}", guard.prefix, e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default()
}

fn pooled_containers(guard: &Guard) -> BTreeSet<String> {
    pooled(guard, Some(RuntimeName::Custom))
}

/// A v1 controller's (or v2's) file of a container's cgroup.
fn cgroup_file(guard: &Guard, cid: &str, controller: &str, v1: &str, v2: &str) -> String {
    let root = Path::new("/sys/fs/cgroup");
    let path = if root.join(controller).is_dir() {
        root.join(controller).join(&guard.prefix).join(cid).join(v1)
    } else {
        root.join(&guard.prefix).join(cid).join(v2)
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn record(guard: &Guard, id: &InstanceId) -> serde_json::Value {
    let path = guard
        .state()
        .join("instances")
        .join(id.as_str())
        .join("instance.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

async fn runc_ids(guard: &Guard) -> BTreeSet<String> {
    RuncCli::new(which("runc").unwrap(), guard.state().join("runc"))
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Nothing of the run is left: containers, netns and veths, cgroups,
/// mounts, instance and pool directories.
async fn assert_nothing_left(guard: &Guard) {
    assert_eq!(runc_ids(guard).await, BTreeSet::new(), "containers left");
    let names = IpCommand::default().list(&guard.prefix).await.unwrap();
    assert!(names.is_empty(), "netns/veths left: {names:?}");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        mount_points_under(&mountinfo, &guard.state()),
        Vec::<PathBuf>::new(),
        "mounts left"
    );
    for sub in ["instances", "premade"] {
        let dir = guard.state().join(sub);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name())
                    .filter(|n| n != ".kiln-init")
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "{} holds {left:?}", dir.display());
    }
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![root.to_owned()];
    hierarchies.extend(std::fs::read_dir(root).unwrap().flatten().map(|e| e.path()));
    for h in hierarchies {
        if let Ok(children) = std::fs::read_dir(h.join(&guard.prefix)) {
            let cgroups: Vec<_> = children
                .flatten()
                .filter(|c| c.path().is_dir())
                .map(|c| c.path())
                .collect();
            assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
        }
    }
}

#[test]
fn a_pre_made_sandbox_serves_one_instance_and_is_destroyed_at_release() {
    if !enter_private_mount_ns("a_pre_made_sandbox_serves_one_instance_and_is_destroyed_at_release")
    {
        return;
    }
    let guard = Guard::named("kp");
    let Some(code) = code_dir(guard.dir()) else {
        return;
    };
    let (_, seed) = random_suffix();
    harness::runtime().block_on(async {
        // 96 MB of 32 MB sandboxes: three at most, two per runtime.
        let driver = ContainerDriver::new(config(&guard, seed, premade(96, 2)), &guard.state())
            .await
            .unwrap();
        driver.ensure_runtime(RuntimeName::Custom).await.unwrap();
        // An idle runtime keeps one, limited to its 32 MB charge.
        wait_ready(&driver, 1).await;
        let ready = pooled_containers(&guard);
        assert_eq!(ready.len(), 1, "{ready:?}");
        let first = ready.iter().next().unwrap().clone();
        assert_eq!(
            cgroup_file(
                &guard,
                &first,
                "memory",
                "memory.limit_in_bytes",
                "memory.max"
            ),
            (32u64 << 20).to_string()
        );

        // Account 1111's function claims it.
        let a = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec("1111", "alpha", "from-a"),
            code_dir: code.clone(),
            image: None,
        };
        let sa = driver.create(&a).await.unwrap();
        let rec_a = record(&guard, &a.instance_id);
        assert_eq!(rec_a["container"], first.as_str(), "{rec_a}");
        let body = tokio::task::spawn_blocking(move || http_get(sa.endpoint))
            .await
            .unwrap();
        // PID 1 is the function (the init exec'd it), with its own
        // environment and working directory; /code is its writable
        // overlay (the code dir itself stays unchanged), /tmp its disk.
        assert_eq!(body, "pid=1 marker=from-a cwd=/code code=0 tmp=0\n");
        assert!(!code.join("w").exists(), "the shared code dir was written");
        // The function's limits replaced the pool's before it started.
        assert_eq!(
            cgroup_file(
                &guard,
                &first,
                "memory",
                "memory.limit_in_bytes",
                "memory.max"
            ),
            (128u64 << 20).to_string()
        );
        assert!(
            !pooled_containers(&guard).contains(&first),
            "a claimed sandbox is still in the pool"
        );

        // The pool refills; account 2222's function gets another sandbox.
        wait_ready(&driver, 1).await;
        let b = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec("2222", "beta", "from-b"),
            code_dir: code.clone(),
            image: None,
        };
        let sb = driver.create(&b).await.unwrap();
        let rec_b = record(&guard, &b.instance_id);
        assert_ne!(rec_b["container"], rec_a["container"]);
        assert_ne!(rec_b["netns"], rec_a["netns"]);
        let body = tokio::task::spawn_blocking(move || http_get(sb.endpoint))
            .await
            .unwrap();
        assert_eq!(body, "pid=1 marker=from-b cwd=/code code=0 tmp=0\n");

        // `runc exec` sees the function's process (its environment), not
        // the init's.
        let mut exec = driver
            .exec(
                &a.instance_id,
                &kiln_sandbox::exec::ExecRequest {
                    command: vec!["/code/server".into(), "env".into()],
                    tty: false,
                    stdin: false,
                },
            )
            .await
            .unwrap();
        let mut out = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut exec.stdout, &mut out)
            .await
            .unwrap();
        assert_eq!(exec.child.wait().await.unwrap(), 7);
        assert_eq!(out, "MARKER=from-a\n");

        // Release destroys it: container, netns, directory and the link
        // left at its old place; it never comes back to the pool.
        driver.destroy(&a.instance_id).await.unwrap();
        let ids = runc_ids(&guard).await;
        assert!(!ids.contains(&first), "{ids:?}");
        assert!(!guard
            .state()
            .join("instances")
            .join(a.instance_id.as_str())
            .exists());
        let link = guard
            .state()
            .join("premade")
            .join(first.trim_start_matches(&format!("{}-", guard.prefix)));
        assert!(link.symlink_metadata().is_err(), "{} left", link.display());
        let names = IpCommand::default().list(&guard.prefix).await.unwrap();
        assert!(!names.contains(rec_a["netns"].as_str().unwrap()));
        assert!(!pooled_containers(&guard).contains(&first));

        // Demand (three cold starts at once, so within one demand bucket
        // however loaded the machine is) asks for more than the budget
        // holds: `custom` gets two (its cap), all pools together hold what
        // 96 MB of 32 MB sandboxes allow, each limited to 32 MB.
        let burst: Vec<SandboxRequest> = ["gamma", "delta", "epsilon"]
            .into_iter()
            .map(|f| SandboxRequest {
                instance_id: InstanceId::generate(),
                spec: spec("1111", f, "from-burst"),
                code_dir: code.clone(),
                image: None,
            })
            .collect();
        let started = futures_util::future::join_all(burst.iter().map(|r| driver.create(r))).await;
        for s in started {
            s.unwrap();
        }
        wait_ready(&driver, 2).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(pooled_containers(&guard).len(), 2);
        let all = pooled(&guard, None);
        assert!(all.len() <= 3, "{all:?}");
        for cid in &all {
            assert_eq!(
                cgroup_file(&guard, cid, "memory", "memory.limit_in_bytes", "memory.max"),
                (32u64 << 20).to_string()
            );
        }
        for id in std::iter::once(&b.instance_id).chain(burst.iter().map(|r| &r.instance_id)) {
            driver.destroy(id).await.unwrap();
        }
        driver.shutdown().await.unwrap();
        assert_nothing_left(&guard).await;
    });
}

/// The parent of [`a_driver_killed_with_sigkill_leaves_nothing_behind`]
/// runs this in a child process (same mount namespace), then kills it.
const CHILD_STATE: &str = "KILN_PREMADE_TEST_CHILD_STATE";
const CHILD_PREFIX: &str = "KILN_PREMADE_TEST_CHILD_PREFIX";
const CHILD_SEED: &str = "KILN_PREMADE_TEST_CHILD_SEED";
const CHILD_CODE: &str = "KILN_PREMADE_TEST_CHILD_CODE";

#[test]
#[ignore = "run by a_driver_killed_with_sigkill_leaves_nothing_behind as its agent"]
fn agent_child_for_the_sigkill_test() {
    let (Some(state), Some(prefix), Some(seed), Some(code)) = (
        std::env::var_os(CHILD_STATE),
        std::env::var(CHILD_PREFIX).ok(),
        std::env::var(CHILD_SEED).ok(),
        std::env::var_os(CHILD_CODE),
    ) else {
        panic!("only run by a_driver_killed_with_sigkill_leaves_nothing_behind");
    };
    let seed: u32 = seed.parse().unwrap();
    harness::runtime().block_on(async {
        let config = ContainerConfig {
            name_prefix: prefix.clone(),
            cgroup_parent: prefix,
            instance_subnet: subnet(true, seed),
            uid_base: UID_BASE,
            rootfs_dir: Some(
                std::env::var_os("KILN_ROOTFS_CACHE")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/var/cache/kiln-test/rootfs")),
            ),
            netns_pool: 1,
            tmp_size_mb: 16,
            premade: premade(128, 4),
            ..ContainerConfig::default()
        };
        let driver = ContainerDriver::new(config, Path::new(&state))
            .await
            .unwrap();
        driver.ensure_runtime(RuntimeName::Custom).await.unwrap();
        wait_ready(&driver, 1).await;
        // One claimed (an instance running) and, after the demand, two
        // ready ones.
        let req = SandboxRequest {
            instance_id: InstanceId::generate(),
            spec: spec("1111", "alpha", "killed"),
            code_dir: PathBuf::from(code),
            image: None,
        };
        driver.create(&req).await.unwrap();
        driver
            .create(&SandboxRequest {
                instance_id: InstanceId::generate(),
                ..req.clone()
            })
            .await
            .unwrap();
        wait_ready(&driver, 1).await;
        println!("CHILD-READY");
        std::io::stdout().flush().unwrap();
        std::future::pending::<()>().await;
    });
}

#[test]
fn a_driver_killed_with_sigkill_leaves_nothing_behind() {
    if !enter_private_mount_ns("a_driver_killed_with_sigkill_leaves_nothing_behind") {
        return;
    }
    let guard = Guard::named("kq");
    let Some(code) = code_dir(guard.dir()) else {
        return;
    };
    let (_, seed) = random_suffix();
    std::fs::create_dir_all(guard.state()).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "agent_child_for_the_sigkill_test",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER, "1")
        .env(CHILD_STATE, guard.state())
        .env(CHILD_PREFIX, &guard.prefix)
        .env(CHILD_SEED, seed.to_string())
        .env(CHILD_CODE, &code)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.any(|l| l.is_ok_and(|l| l.contains("CHILD-READY")));
    // SIGKILL: no destructor, no shutdown, no cleanup of any kind.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = child.wait();
    assert!(ready, "the child driver never got its pool ready");
    harness::runtime().block_on(async {
        // It left containers (pooled and claimed), netns and mounts.
        let left = runc_ids(&guard).await;
        assert!(left.len() >= 2, "{left:?}");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mount_points_under(&mountinfo, &guard.state().join("premade")).is_empty());
        // The next start with the same prefix removes all of it.
        let config = ContainerConfig {
            netns_pool: 0,
            instance_subnet: subnet(true, seed),
            ..config(&guard, seed, PremadeConfig::default())
        };
        let driver = ContainerDriver::new(config, &guard.state()).await.unwrap();
        assert_nothing_left(&guard).await;
        driver.shutdown().await.unwrap();
        assert_nothing_left(&guard).await;
    });
}
