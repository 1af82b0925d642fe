//! The microVM backend's real host side effects (root only): tap devices
//! through `ip`, and the VMM's cgroup under /sys/fs/cgroup (v1 or v2).
//! Every name carries this run's prefix and is removed even on failure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_sandbox::cgroup::{CgroupLimits, CgroupVersion};
use kiln_sandbox::microvm::host::{IpTaps, TapOps, TapSpec};
use kiln_test_support::{is_root, skip, Category};

fn prefix() -> String {
    format!("mh{:x}", std::process::id() % 0xfffff)
}

/// Deletes the tap when the test ends, however it ends.
struct TapGuard(String);

impl Drop for TapGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

#[tokio::test]
async fn taps_are_created_owned_addressed_listed_and_deleted() {
    if !is_root() {
        return skip(Category::Root, "needs root");
    }
    let prefix = prefix();
    let name = format!("{prefix}-0");
    let _guard = TapGuard(name.clone());
    let taps = IpTaps::default();
    let spec = TapSpec {
        name: name.clone(),
        host_cidr: "10.216.7.1/30".into(),
        owner: Some(65534),
    };
    taps.create(&spec).await.unwrap();
    let sys = Path::new("/sys/class/net").join(&name);
    assert!(sys.join("tun_flags").exists(), "not a tun/tap device");
    assert_eq!(
        std::fs::read_to_string(sys.join("owner")).unwrap().trim(),
        "65534"
    );
    let addr = Command::new("ip")
        .args(["-o", "addr", "show", "dev", &name])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&addr.stdout).contains("10.216.7.1/30"));
    assert_eq!(
        taps.list(&prefix).await.unwrap(),
        BTreeSet::from([name.clone()])
    );
    // A second create of the same name fails and leaves the first alone.
    assert!(taps.create(&spec).await.is_err());
    taps.delete(&name).await.unwrap();
    assert!(!sys.exists());
    taps.delete(&name).await.unwrap();
    assert!(taps.list(&prefix).await.unwrap().is_empty());
}

/// Removes the test's cgroup parent in every hierarchy.
struct CgroupGuard(Vec<PathBuf>);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[tokio::test]
async fn the_vmm_cgroup_limits_and_holds_the_process_and_goes() {
    if !is_root() {
        return skip(Category::Root, "needs root");
    }
    let root = PathBuf::from("/sys/fs/cgroup");
    let parent = format!("kiln-test-{}", prefix());
    let cgroups = kiln_sandbox::cgroup::host();
    let v2 = cgroups.version() == CgroupVersion::V2;
    let parents: Vec<PathBuf> = if v2 {
        vec![root.join(&parent)]
    } else {
        ["memory", "cpu", "pids"]
            .iter()
            .filter(|c| root.join(c).exists())
            .map(|c| root.join(c).join(&parent))
            .collect()
    };
    if parents.is_empty() {
        return skip(
            Category::Kernel,
            "no cgroup hierarchy with memory, cpu or pids",
        );
    }
    let _guard = CgroupGuard(parents.clone());
    let path = format!("/{parent}/vm-0");
    let limits = CgroupLimits {
        memory_bytes: 256 << 20,
        cpu_milli: 500,
    };
    cgroups.create(&path, &limits).unwrap();
    let mut child = Command::new("sleep").arg("30").spawn().unwrap();
    cgroups.add_process(&path, child.id()).unwrap();
    let membership = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    assert!(
        membership.contains(&format!("/{parent}/vm-0")),
        "{membership}"
    );
    let limit = if v2 {
        parents[0].join("vm-0/memory.max")
    } else {
        root.join("memory")
            .join(&parent)
            .join("vm-0/memory.limit_in_bytes")
    };
    if limit.exists() {
        assert_eq!(
            std::fs::read_to_string(&limit).unwrap().trim(),
            (256u64 << 20).to_string()
        );
    }
    // No swap beyond the memory limit.
    let (swap, expected) = if v2 {
        (parents[0].join("vm-0/memory.swap.max"), "0".to_owned())
    } else if cgroups.swap_control() == kiln_sandbox::cgroup::SwapControl::Accounted {
        let dir = root.join("memory").join(&parent).join("vm-0");
        (
            dir.join("memory.memsw.limit_in_bytes"),
            (256u64 << 20).to_string(),
        )
    } else {
        let dir = root.join("memory").join(&parent).join("vm-0");
        (dir.join("memory.swappiness"), "0".to_owned())
    };
    if limit.exists() {
        assert_eq!(
            std::fs::read_to_string(&swap).unwrap().trim(),
            expected,
            "{}",
            swap.display()
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();
    cgroups.remove(&path).unwrap();
    cgroups.remove(&path).unwrap();
    for p in &parents {
        assert!(!p.join("vm-0").exists(), "{} is left", p.display());
    }
}
