//! The OCI runtime spec (`config.json`) of one instance.

use std::path::{Path, PathBuf};

use kiln_core::{InstanceId, InstanceSpec};
use serde_json::{json, Value};

use crate::cgroup::{cpu_quota, SwapControl, CPU_PERIOD_US};
use crate::process::{check_spec, instance_cpu_milli, process_env, ProcessError, CODE_MOUNT};

/// Processes (threads included) one instance may have.
pub const PIDS_LIMIT: i64 = 1024;

/// The only capabilities a function keeps (inside its user namespace):
/// signalling its own processes, binding ports below 1024 and writing audit
/// records (login tools need it). No CAP_SYS_ADMIN, CAP_NET_RAW,
/// CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_MKNOD, CAP_CHOWN, CAP_SETUID...
pub const CAPABILITIES: [&str; 3] = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];
/// Kernel files hidden from the function (bound over by /dev/null or an
/// empty read-only directory): runc's defaults and a few more that leak
/// host details.
pub const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/interrupts",
];
/// Kernel files the function may read but never write.
pub const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    // An empty tmpfs with the instance's own cgroup below it (see
    // `build_config`), read-only once both are mounted.
    "/sys",
];

/// Everything `config.json` is made from.
#[derive(Debug, Clone)]
pub struct BundleParams<'a> {
    pub instance_id: &'a InstanceId,
    pub spec: &'a InstanceSpec,
    pub region: Option<&'a str>,
    pub hostname: &'a str,
    pub uid_base: u32,
    /// `/run/netns/<name>` of the instance's network namespace.
    pub netns_path: PathBuf,
    /// Cgroup path relative to the hierarchy root (`/kiln/kiln-i-...`).
    pub cgroups_path: String,
    /// Host side of the per-instance `/code` overlay.
    pub code_source: &'a Path,
    /// The instance's `/etc/hosts` (names its own address).
    pub hosts_file: &'a Path,
    pub tmp_size_mb: u32,
    /// Host directory bound at `/tmp` (on the instance's size-limited
    /// writable filesystem); None: a tmpfs of `tmp_size_mb`.
    pub tmp_source: Option<&'a Path>,
    /// The CFS quota the instance starts with (its cold-start boost), in
    /// thousandths of a CPU; None: its steady quota.
    pub boost_cpu_milli: Option<u32>,
    /// How the host keeps the instance out of swap.
    pub swap: SwapControl,
}

/// `cpu.shares` proportional to the instance's share of a CPU (1024 = one).
pub fn cpu_shares(cpu_milli: u32) -> u64 {
    (u64::from(cpu_milli) * 1024 / 1000).max(2)
}

fn mount(destination: &str, kind: &str, source: &str, options: &[&str]) -> Value {
    json!({
        "destination": destination,
        "type": kind,
        "source": source,
        "options": options,
    })
}

/// The instance's `/etc/hosts`.
pub fn hosts_file(hostname: &str, addr: std::net::Ipv4Addr) -> String {
    format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n{addr}\t{hostname}\n")
}

/// `linux.resources.memory`: the limit, and no swap beyond it (`swap` is
/// memory plus swap in OCI's terms, so equal to the limit means none).
fn memory_resources(limit: i64, swap: SwapControl) -> Value {
    match swap {
        SwapControl::Accounted => json!({ "limit": limit, "swap": limit }),
        SwapControl::SwappinessOnly => json!({ "limit": limit, "swappiness": 0 }),
    }
}

/// Build `config.json`. The root filesystem is `rootfs` next to it.
pub fn build_config(p: &BundleParams<'_>) -> Result<Value, ProcessError> {
    let spec = p.spec;
    check_spec(spec)?;
    let args: Vec<&String> = spec.command.iter().chain(spec.args.iter()).collect();
    let env = process_env(p.instance_id, spec, p.region)?;
    let tmp_size = format!("size={}m", p.tmp_size_mb);
    let tmp_mount = match p.tmp_source {
        Some(dir) => mount(
            "/tmp",
            "none",
            &dir.display().to_string(),
            &["rbind", "nosuid", "nodev", "rw"],
        ),
        None => mount(
            "/tmp",
            "tmpfs",
            "tmpfs",
            &["nosuid", "nodev", "mode=1777", &tmp_size],
        ),
    };
    let cpu = instance_cpu_milli(spec);
    let start_cpu = p.boost_cpu_milli.map_or(cpu, |b| b.max(cpu));
    let code_source = p.code_source.display().to_string();
    let hosts_file = p.hosts_file.display().to_string();
    let mapping = json!([{ "containerID": 0, "hostID": p.uid_base, "size": 65536 }]);
    let memory = i64::from(spec.memory_mb) * 1024 * 1024;

    Ok(json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": args,
            "env": env,
            "cwd": CODE_MOUNT,
            "capabilities": {
                "bounding": CAPABILITIES,
                "effective": CAPABILITIES,
                "permitted": CAPABILITIES,
                "inheritable": [],
                "ambient": [],
            },
            "rlimits": [
                { "type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024 },
                { "type": "RLIMIT_CORE", "hard": 0, "soft": 0 },
            ],
            "noNewPrivileges": true,
        },
        "root": { "path": "rootfs", "readonly": true },
        "hostname": p.hostname,
        "mounts": [
            mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
            mount("/dev/pts", "devpts", "devpts",
                  &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
            mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
            // No host sysfs: it names the node's devices, interfaces and
            // every other instance's cgroup. (A fresh sysfs cannot be
            // mounted from a user namespace that does not own the network
            // namespace.) An empty tmpfs, and below it the instance's own
            // cgroup through its cgroup namespace, where runtimes read
            // their memory and CPU limits (Node.js, the JVM, Go).
            mount("/sys", "tmpfs", "tmpfs", &["nosuid", "noexec", "nodev", "mode=755", "size=64k"]),
            mount("/sys/fs/cgroup", "cgroup", "cgroup", &["nosuid", "noexec", "nodev", "relatime", "ro"]),
            tmp_mount,
            mount(CODE_MOUNT, "none", &code_source, &["rbind", "nosuid", "nodev", "rw"]),
            // Resolvers look the hostname up (Python's http.server does);
            // without an entry that waits for DNS.
            mount("/etc/hosts", "none", &hosts_file, &["bind", "nosuid", "nodev", "noexec", "ro"]),
        ],
        "annotations": { "io.kiln.instance-id": p.instance_id.as_str() },
        "linux": {
            "uidMappings": mapping,
            "gidMappings": mapping,
            "namespaces": [
                { "type": "user" },
                { "type": "pid" },
                { "type": "mount" },
                { "type": "ipc" },
                { "type": "uts" },
                { "type": "cgroup" },
                { "type": "network", "path": p.netns_path.display().to_string() },
            ],
            "cgroupsPath": p.cgroups_path,
            "resources": {
                "devices": [{ "allow": false, "access": "rwm" }],
                "memory": memory_resources(memory, p.swap),
                "cpu": {
                    "shares": cpu_shares(cpu),
                    "quota": cpu_quota(start_cpu),
                    "period": CPU_PERIOD_US,
                },
                "pids": { "limit": PIDS_LIMIT },
            },
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "seccomp": crate::container::seccomp::profile(),
        },
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::process::tests::sample_spec;

    fn params<'a>(id: &'a InstanceId, spec: &'a InstanceSpec, code: &'a Path) -> BundleParams<'a> {
        BundleParams {
            instance_id: id,
            spec,
            region: Some("cn-hangzhou"),
            hostname: "kiln-1",
            uid_base: 100_000,
            netns_path: "/run/netns/kiln-1".into(),
            cgroups_path: "/kiln/kiln-i-1".into(),
            code_source: code,
            hosts_file: Path::new("/state/instances/x/hosts"),
            tmp_size_mb: 64,
            tmp_source: None,
            boost_cpu_milli: None,
            swap: SwapControl::Accounted,
        }
    }

    #[test]
    fn config_has_isolation_mounts_and_limits() {
        let id = InstanceId::generate();
        let spec = sample_spec();
        let code = Path::new("/state/instances/x/code");
        let c = build_config(&params(&id, &spec, code)).unwrap();
        assert_eq!(c["root"], json!({"path": "rootfs", "readonly": true}));
        let ns: Vec<&str> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        for kind in ["user", "pid", "mount", "ipc", "uts", "network", "cgroup"] {
            assert!(ns.contains(&kind), "missing {kind} namespace");
        }
        let net = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .unwrap();
        assert_eq!(net["path"], "/run/netns/kiln-1");
        let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        assert_eq!(c["linux"]["uidMappings"], map);
        assert_eq!(c["linux"]["gidMappings"], map);
        assert_eq!(c["linux"]["cgroupsPath"], "/kiln/kiln-i-1");
        let r = &c["linux"]["resources"];
        assert_eq!(r["memory"]["limit"], 512 * 1024 * 1024);
        // Memory plus swap = memory: no swap.
        assert_eq!(r["memory"]["swap"], 512 * 1024 * 1024);
        assert_eq!(r["cpu"]["shares"], 358);
        assert_eq!(r["cpu"]["quota"], 35_000);
        assert_eq!(r["pids"]["limit"], PIDS_LIMIT);
        let mounts = c["mounts"].as_array().unwrap();
        let find = |d: &str| mounts.iter().find(|m| m["destination"] == d).unwrap();
        assert_eq!(find("/code")["source"], "/state/instances/x/code");
        assert!(find("/code")["options"]
            .as_array()
            .unwrap()
            .contains(&json!("rbind")));
        assert_eq!(find("/etc/hosts")["source"], "/state/instances/x/hosts");
        assert!(find("/etc/hosts")["options"]
            .as_array()
            .unwrap()
            .contains(&json!("ro")));
        assert_eq!(find("/tmp")["type"], "tmpfs");
        assert!(find("/tmp")["options"]
            .as_array()
            .unwrap()
            .contains(&json!("size=64m")));
        // Not the host's sysfs: an empty tmpfs, read-only, with the
        // instance's own cgroup below it.
        assert_eq!(find("/sys")["type"], "tmpfs");
        assert_eq!(find("/sys/fs/cgroup")["type"], "cgroup");
        assert!(
            !mounts.iter().any(|m| m["source"] == "/sys"),
            "host sysfs bound"
        );
        assert!(READONLY_PATHS.contains(&"/sys"));
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["process"]["cwd"], "/code");
        assert_eq!(
            c["process"]["args"],
            json!(["python3", "-m", "http.server", "9000"])
        );
    }

    #[test]
    fn without_swap_accounting_the_instance_is_never_swapped() {
        let id = InstanceId::generate();
        let spec = sample_spec();
        let mut p = params(&id, &spec, Path::new("/c"));
        p.swap = SwapControl::SwappinessOnly;
        let c = build_config(&p).unwrap();
        let memory = &c["linux"]["resources"]["memory"];
        assert_eq!(memory["swappiness"], 0);
        assert!(memory.get("swap").is_none(), "{memory}");
    }

    #[test]
    fn bad_specs_are_refused() {
        let id = InstanceId::generate();
        let code = Path::new("/c");
        let mut spec = sample_spec();
        spec.command.clear();
        assert_eq!(
            build_config(&params(&id, &spec, code)).unwrap_err(),
            ProcessError::NoCommand
        );
        let mut spec = sample_spec();
        spec.args.push("a\0b".into());
        assert_eq!(
            build_config(&params(&id, &spec, code)).unwrap_err(),
            ProcessError::NulInArgs
        );
        let mut spec = sample_spec();
        spec.port = 0;
        assert_eq!(check_spec(&spec).unwrap_err(), ProcessError::Port);
        let mut spec = sample_spec();
        spec.environment.insert("A=B".into(), "x".into());
        assert!(matches!(
            build_config(&params(&id, &spec, code)).unwrap_err(),
            ProcessError::EnvName(_)
        ));
        let mut spec = sample_spec();
        spec.environment.insert("A".into(), "x\0".into());
        assert!(matches!(
            build_config(&params(&id, &spec, code)).unwrap_err(),
            ProcessError::EnvValue(_)
        ));
    }

    #[test]
    fn hardening_is_complete() {
        let id = InstanceId::generate();
        let spec = sample_spec();
        let c = build_config(&params(&id, &spec, Path::new("/c"))).unwrap();
        let caps = &c["process"]["capabilities"];
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(caps[set], json!(CAPABILITIES), "{set}");
        }
        assert_eq!(caps["inheritable"], json!([]));
        assert_eq!(caps["ambient"], json!([]));
        for dangerous in [
            "CAP_SYS_ADMIN",
            "CAP_NET_RAW",
            "CAP_SYS_PTRACE",
            "CAP_SYS_MODULE",
        ] {
            assert!(!CAPABILITIES.contains(&dangerous));
        }
        assert_eq!(c["process"]["noNewPrivileges"], true);
        assert_eq!(c["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ERRNO");
        let masked = c["linux"]["maskedPaths"].as_array().unwrap();
        // (/sys/firmware and the like: the host's sysfs is not there.)
        for p in ["/proc/kcore", "/proc/keys", "/proc/sched_debug"] {
            assert!(masked.contains(&json!(p)), "{p} not masked");
        }
        let ro = c["linux"]["readonlyPaths"].as_array().unwrap();
        for p in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/sys"] {
            assert!(ro.contains(&json!(p)), "{p} not read-only");
        }
        // No device but the runtime's defaults (null, zero, random, tty...).
        assert_eq!(
            c["linux"]["resources"]["devices"],
            json!([{ "allow": false, "access": "rwm" }])
        );
    }

    #[test]
    fn cpu_follows_memory_and_starts_boosted() {
        let id = InstanceId::generate();
        let code = Path::new("/c");
        let mut spec = sample_spec();
        spec.cpu_milli = 0;
        spec.memory_mb = 2048;
        let c = build_config(&params(&id, &spec, code)).unwrap();
        // FC's default for 2 GB is one CPU.
        assert_eq!(c["linux"]["resources"]["cpu"]["shares"], 1024);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 100_000);
        spec.memory_mb = 4096;
        let c = build_config(&params(&id, &spec, code)).unwrap();
        assert_eq!(
            c["linux"]["resources"]["cpu"]["shares"],
            cpu_shares(kiln_core::limits::default_cpu_milli(4096))
        );

        let mut p = params(&id, &spec, code);
        p.boost_cpu_milli = Some(4000);
        let c = build_config(&p).unwrap();
        let cpu = kiln_core::limits::default_cpu_milli(4096);
        assert_eq!(c["linux"]["resources"]["cpu"]["shares"], cpu_shares(cpu));
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 400_000);
        // A boost below the steady CPU never lowers it.
        p.boost_cpu_milli = Some(50);
        let c = build_config(&p).unwrap();
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], cpu_quota(cpu));
    }

    #[test]
    fn tmp_is_bound_from_the_writable_filesystem_when_given() {
        let id = InstanceId::generate();
        let spec = sample_spec();
        let mut p = params(&id, &spec, Path::new("/c"));
        let scratch = Path::new("/state/instances/x/disk/tmp");
        p.tmp_source = Some(scratch);
        let c = build_config(&p).unwrap();
        let tmp = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/tmp")
            .unwrap();
        assert_eq!(tmp["source"], "/state/instances/x/disk/tmp");
        assert!(tmp["options"]
            .as_array()
            .unwrap()
            .contains(&json!("nosuid")));
    }

    #[test]
    fn cpu_shares_scale_with_cpu() {
        assert_eq!(cpu_shares(1000), 1024);
        assert_eq!(cpu_shares(0), 2);
    }
}
