//! `kiln dev` stopped while it starts: its first start builds root
//! filesystems with debootstrap for minutes, and SIGTERM then must stop it
//! at once, ending the build's processes and leaving nothing on the host
//! (the agent makes its namespaces, nftables table and cgroups only after
//! the builds).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The process group of every debootstrap whose command line mentions
/// `dir`.
fn debootstraps_into(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !cmdline.contains("debootstrap") || !cmdline.contains(&needle) {
            continue;
        }
        found.extend(stat_field(pid, 5));
    }
    found
}

/// Field `n` (1-based, as in proc(5)) of `/proc/PID/stat`, for a live
/// (not zombie) process.
fn stat_field(pid: u32, n: usize) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(n - 3)?.parse().ok()
}

/// Live processes in process group `pgrp`.
fn members_of(pgrp: i32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| stat_field(*pid, 5) == Some(pgrp))
        .collect()
}

/// Mount points at or below `dir` (none are expected: debootstrap mounts
/// only in its second stage, long after the moment this test stops it).
fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

#[test]
fn sigterm_during_the_first_rootfs_build_stops_kiln_dev_and_leaves_nothing() {
    if common::skip() || common::skip_without(&["debootstrap", "runc", "nft"]) {
        return;
    }
    let state = tempfile::Builder::new()
        .prefix("kiln-stop-")
        .tempdir()
        .unwrap();
    // An empty cache: the start has to build custom.debian12.
    let rootfs = state.path().join("rootfs");
    let prefix = common::run_tag();
    let log_path = state.path().join("dev.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("dev")
        .arg("--state-dir")
        .arg(state.path())
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", common::free_port()))
        .arg("--sandbox-prefix")
        .arg(&prefix)
        .arg("--instance-subnet")
        .arg(common::run_subnet())
        .arg("--rootfs-dir")
        .arg(&rootfs)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn kiln dev");
    let log_tail = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // debootstrap running into our cache: its process group.
    let deadline = Instant::now() + Duration::from_secs(60);
    let group = loop {
        if let Some(&pgrp) = debootstraps_into(&rootfs).first() {
            break pgrp;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "kiln dev exited with {status} before its build started:\n{}",
                log_tail()
            );
        }
        if Instant::now() > deadline {
            common::terminate(&mut child, Duration::from_secs(30));
            common::leftovers_cleanup(&prefix);
            panic!(
                "no debootstrap into {} within 60 s:\n{}",
                rootfs.display(),
                log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        log_tail().contains("building runtime root filesystem"),
        "{}",
        log_tail()
    );

    // Stop it mid-build. A bounded wait: the build alone takes minutes.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            common::terminate(&mut child, Duration::from_secs(5));
            common::leftovers_cleanup(&prefix);
            panic!("kiln dev still running 30 s after SIGTERM:\n{}", log_tail());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let left = common::host_state_of(&prefix);
    // Killed before kiln dev exited; give their exits a moment to finish.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut build = members_of(group);
    while !build.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        build = members_of(group);
    }
    common::leftovers_cleanup(&prefix);
    for pid in &build {
        // Ours: the build this test's kiln dev started.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let mounts = mounts_under(state.path());
    for m in mounts.iter().rev() {
        let _ = Command::new("umount").args(["-l", m]).status();
    }

    assert!(status.success(), "exit {status}:\n{}", log_tail());
    assert!(
        log_tail().contains("stopped before it finished starting"),
        "{}",
        log_tail()
    );
    assert!(
        build.is_empty(),
        "debootstrap's processes {build:?} outlived kiln dev"
    );
    assert!(left.is_empty(), "left on the host: {left:?}");
    assert!(mounts.is_empty(), "mounts left under the state: {mounts:?}");
}
