//! Resource limits, hardening and freezing of the container backend against
//! real runc, as root. Skips with a printed reason otherwise.
//!
//! Like `runc.rs`, each test re-executes itself inside a private mount
//! namespace, names everything with a per-run prefix, and a guard removes
//! containers, netns, veths, cgroups and mounts even when it fails.
//! `custom.debian12` comes from `$KILN_ROOTFS_CACHE` (default
//! `/var/cache/kiln-test/rootfs`), built with debootstrap on first use.
#[path = "support/harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::*;
use kiln_core::{InstanceId, RuntimeName};
use kiln_sandbox::mounts::mount_points_under;
use kiln_sandbox::{ContainerDriver, SandboxDriver};
/// Every cgroup directory of `path` (`/<parent>/<cid>`) in any hierarchy.
fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let rel = path.trim_start_matches('/');
    let mut found = Vec::new();
    if root.join(rel).is_dir() {
        found.push(root.join(rel));
    }
    for e in std::fs::read_dir(root).unwrap().flatten() {
        if e.path().join(rel).is_dir() {
            found.push(e.path().join(rel));
        }
    }
    found
}

/// Nothing of the instance is left: files, mounts, loop device, cgroup.
async fn assert_released(guard: &Guard, driver: &ContainerDriver, id: &InstanceId) {
    let state = guard.state();
    let dir = state.join("instances").join(id.as_str());
    assert!(!dir.exists(), "instance dir left behind");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(mount_points_under(&mountinfo, &dir), Vec::<PathBuf>::new());
    let image = dir.join("disk.img").display().to_string();
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&image), "loop device left: {loops}");
    let cg = driver.cgroup_of(id);
    assert_eq!(cgroup_dirs(&cg), Vec::<PathBuf>::new(), "cgroup left");
    assert!(!driver.list().await.unwrap().contains(id));
}

/// After shutdown the run's cgroup parent is gone too, and no mount or
/// loop device of the run is left.
async fn assert_parent_gone(guard: &Guard, driver: &ContainerDriver) {
    driver.shutdown().await.unwrap();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert_eq!(
        mount_points_under(&mountinfo, &guard.state()),
        Vec::<PathBuf>::new()
    );
    let loops = Command::new("losetup").arg("-a").output().unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    let dir = guard.dir().display().to_string();
    assert!(!loops.contains(&dir), "loop device left: {loops}");
    let parent = format!("/{}", guard.prefix);
    assert_eq!(
        cgroup_dirs(&parent),
        Vec::<PathBuf>::new(),
        "cgroup parent left"
    );
}

#[test]
fn functions_cannot_escape_or_exceed_their_limits() {
    if !enter_private_mount_ns("functions_cannot_escape_or_exceed_their_limits") {
        return;
    }
    let guard = Guard::new();
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let driver = ContainerDriver::new(guard.config(seed), &guard.state())
            .await
            .unwrap();
        driver
            .ensure_runtime(RuntimeName::CustomDebian12)
            .await
            .expect("custom.debian12 root filesystem (debootstrap)");
        let code = code_dir(&guard);
        let secret = guard.dir().join("host-secret");
        std::fs::write(&secret, "host only").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let env = [("HOST_SECRET", secret.display().to_string())];

        let (victim, victim_addr) = start(&driver, &code, 128, 100, &env).await;
        // The probe has a layer: its /opt changes count against its disk.
        let layers = [layer_dir(&guard)];
        let (probe, probe_addr) = start_with_layers(&driver, &code, 1024, 500, &env, &layers).await;

        // Hardening: every escape fails.
        let r = get_async(probe_addr, "/probe").await.unwrap();
        eprintln!("probe: {r}");
        for key in [
            "mount",
            "umount",
            "ptrace",
            "raw_socket",
            "packet_socket",
            "init_module",
            "finit_module",
            "delete_module",
            "bpf",
            "keyctl",
            "kexec_load",
            "unshare_user",
            "unshare_net",
            "unshare_mount",
            "setns",
        ] {
            assert_eq!(r[key], "EPERM", "{key}: {r}");
        }
        assert_eq!(r["clone3"], "ENOSYS", "{r}");
        // The filter is for the native architecture only: the 32-bit entry
        // (int 0x80) is no way around it.
        if cfg!(target_arch = "x86_64") {
            assert_ne!(r["compat_syscall"], "allowed", "{r}");
        }
        assert_eq!(r["host_secret"], "ENOENT", "{r}");
        // Masked: an empty file in place of the kernel's.
        for key in ["proc_kcore", "proc_keys"] {
            assert!(r[key] == "read 0 bytes" || r[key] == "ENOENT", "{key}: {r}");
        }
        assert_ne!(r["sysrq"], "allowed", "{r}");
        assert_ne!(r["proc_sys_write"], "allowed", "{r}");
        assert_eq!(r["uid"], 0);

        // Fork bomb: stopped by the PID limit (1024 per instance).
        let r = get_async(probe_addr, "/fork").await.unwrap();
        eprintln!("fork bomb: {r}");
        assert_eq!(r["error"], "EAGAIN", "{r}");
        let forked = r["forked"].as_u64().unwrap();
        assert!((100..1024).contains(&forked), "{r}");
        assert!(get_async(victim_addr, "/").await.is_some());

        // Disk filler: ENOSPC at the instance's 512 MB, on /tmp, /code and
        // /opt alike (one writable filesystem); the host's disk is untouched.
        let r = get_async(probe_addr, "/disk").await.unwrap();
        eprintln!("disk filler: {r}");
        assert_eq!(r["tmp_error"], "ENOSPC", "{r}");
        assert_eq!(r["code_error"], "ENOSPC", "{r}");
        assert_eq!(r["opt_error"], "ENOSPC", "{r}");
        let written = r["tmp_written"].as_u64().unwrap();
        assert!(
            (400 << 20..=512 << 20).contains(&written),
            "wrote {written} bytes"
        );
        assert!(get_async(victim_addr, "/").await.is_some());

        // Memory bomb: the OOM killer ends it inside its 128 MB.
        let (bomb, bomb_addr) = start(&driver, &code, 128, 100, &env).await;
        assert!(get_async(bomb_addr, "/mem").await.is_none());
        let stats = driver.stats(&bomb).await.unwrap().unwrap();
        eprintln!("memory bomb: {stats:?}");
        assert!(stats.oom_kills >= 1, "{stats:?}");
        assert_eq!(stats.memory_limit_bytes, Some(128 << 20));
        assert!(!driver.is_running(&bomb).await.unwrap());
        let r = get_async(victim_addr, "/").await.unwrap();
        assert_eq!(r["alive"], true);
        // The probe instance too.
        assert!(get_async(probe_addr, "/").await.is_some());

        for id in [&victim, &probe, &bomb] {
            driver.destroy(id).await.unwrap();
            assert_released(&guard, &driver, id).await;
        }
        assert_parent_gone(&guard, &driver).await;
    });
}

#[test]
fn cpu_follows_memory_and_the_cold_start_boost_ends() {
    if !enter_private_mount_ns("cpu_follows_memory_and_the_cold_start_boost_ends") {
        return;
    }
    let guard = Guard::new();
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let mut config = guard.config(seed);
        config.cold_start_boost_ms = 3_000;
        config.cold_start_cpu_milli = 2_000;
        let window = Duration::from_millis(config.cold_start_boost_ms);
        let driver = ContainerDriver::new(config, &guard.state()).await.unwrap();
        driver
            .ensure_runtime(RuntimeName::CustomDebian12)
            .await
            .expect("custom.debian12 root filesystem (debootstrap)");
        let code = code_dir(&guard);
        let env = [("HOST_SECRET", "/nonexistent".to_owned())];
        let started = Instant::now();
        // cpu 0: FC's default for the memory size.
        let (small, _) = start(&driver, &code, 1024, 0, &env).await;
        let (big, _) = start(&driver, &code, 4096, 0, &env).await;
        let cg = driver.cgroups().clone();
        let (ps, pb) = (driver.cgroup_of(&small), driver.cgroup_of(&big));
        let (ws, wb) = (cg.cpu_weight(&ps).unwrap(), cg.cpu_weight(&pb).unwrap());
        let (cs, cb) = (
            kiln_core::limits::default_cpu_milli(1024),
            kiln_core::limits::default_cpu_milli(4096),
        );
        eprintln!("weights {ws} vs {wb} for {cs} vs {cb} milli-CPU");
        assert!(cb > cs);
        // cpu.shares (v1) or cpu.weight (v2) in the CPU ratio, to rounding.
        let ratio = wb as f64 / ws as f64;
        let want = f64::from(cb) / f64::from(cs);
        assert!((ratio - want).abs() / want < 0.05, "{ratio} vs {want}");

        // Both start with the boost (2 CPUs) unless they have more.
        let boosted = |cpu: u32| 2_000u32.max(cpu) as i64 * 100;
        let qs = cg.cpu_quota(&ps).unwrap();
        if started.elapsed() < window {
            assert_eq!(qs, Some(boosted(cs)));
        }
        // Then the steady quota, never before the window.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (qs, qb) = (cg.cpu_quota(&ps).unwrap(), cg.cpu_quota(&pb).unwrap());
            if qs == Some(i64::from(cs) * 100) && qb == Some(i64::from(cb) * 100) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "boost never ended: {qs:?} {qb:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ended = started.elapsed();
        eprintln!("boost ended after {ended:?} (window {window:?})");
        assert!(ended >= window);

        for id in [&small, &big] {
            driver.destroy(id).await.unwrap();
            assert_released(&guard, &driver, id).await;
        }
        assert_parent_gone(&guard, &driver).await;
    });
}

#[test]
fn a_frozen_instance_answers_only_once_thawed() {
    if !enter_private_mount_ns("a_frozen_instance_answers_only_once_thawed") {
        return;
    }
    let guard = Guard::new();
    let (_, seed) = random_suffix();
    runtime().block_on(async {
        let driver = ContainerDriver::new(guard.config(seed), &guard.state())
            .await
            .unwrap();
        driver
            .ensure_runtime(RuntimeName::CustomDebian12)
            .await
            .expect("custom.debian12 root filesystem (debootstrap)");
        let code = code_dir(&guard);
        let env = [("HOST_SECRET", "/nonexistent".to_owned())];
        let (id, addr) = start(&driver, &code, 256, 250, &env).await;

        driver.freeze(&id).await.unwrap();
        driver.freeze(&id).await.unwrap();
        assert!(driver.stats(&id).await.unwrap().unwrap().frozen);
        assert!(driver.is_running(&id).await.unwrap());

        // A request sent while frozen gets no answer until the thaw; then
        // the same connection gets it.
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 1];
        let early = s.read(&mut buf);
        assert!(early.is_err(), "a frozen instance answered: {early:?}");
        driver.thaw(&id).await.unwrap();
        driver.thaw(&id).await.unwrap();
        assert!(!driver.stats(&id).await.unwrap().unwrap().frozen);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.0 200"), "{out}");

        // Destroying a frozen instance works (teardown thaws it first).
        driver.freeze(&id).await.unwrap();
        driver.destroy(&id).await.unwrap();
        assert_released(&guard, &driver, &id).await;
        assert_parent_gone(&guard, &driver).await;
    });
}
