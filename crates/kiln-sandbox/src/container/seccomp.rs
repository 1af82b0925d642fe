//! The seccomp profile of every container instance: an allowlist at least
//! as strict as Docker's (moby's) default profile, which the tests check
//! call by call. Everything not listed fails with EPERM: mounting, ptrace,
//! kexec, kernel modules, bpf, the keyring, new namespaces (unshare, setns,
//! clone with namespace flags), reboot, swap, perf, userfaultfd, io_uring,
//! changing the clock, raw handles and the like; `socket` only for the
//! address families a function needs (see [`SOCKET_FAMILIES`]).

use serde_json::{json, Value};

/// System calls an ordinary function needs (glibc, musl, Python, Node.js,
/// Go and the JVM run with this set). Names a kernel or libseccomp does not
/// know are skipped by runc.
pub const ALLOWED: &[&str] = &[
    "accept",
    "accept4",
    "access",
    "alarm",
    "arch_prctl",
    "bind",
    "brk",
    "capget",
    "capset",
    "chdir",
    "chmod",
    "chown",
    "chown32",
    "clock_getres",
    "clock_getres_time64",
    "clock_gettime",
    "clock_gettime64",
    "clock_nanosleep",
    "clock_nanosleep_time64",
    "close",
    "close_range",
    "connect",
    "copy_file_range",
    "creat",
    "dup",
    "dup2",
    "dup3",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_pwait2",
    "epoll_wait",
    "eventfd",
    "eventfd2",
    "execve",
    "execveat",
    "exit",
    "exit_group",
    "faccessat",
    "faccessat2",
    "fadvise64",
    "fadvise64_64",
    "fallocate",
    "fchdir",
    "fchmod",
    "fchmodat",
    "fchmodat2",
    "fchown",
    "fchown32",
    "fchownat",
    "fcntl",
    "fcntl64",
    "fdatasync",
    "fgetxattr",
    "flistxattr",
    "flock",
    "fork",
    "fremovexattr",
    "fsetxattr",
    "fstat",
    "fstat64",
    "fstatat64",
    "fstatfs",
    "fstatfs64",
    "fsync",
    "ftruncate",
    "ftruncate64",
    "futex",
    "futex_time64",
    "futex_waitv",
    "futimesat",
    "getcpu",
    "getcwd",
    "getdents",
    "getdents64",
    "getegid",
    "getegid32",
    "geteuid",
    "geteuid32",
    "getgid",
    "getgid32",
    "getgroups",
    "getgroups32",
    "getitimer",
    "getpeername",
    "getpgid",
    "getpgrp",
    "getpid",
    "getppid",
    "getpriority",
    "getrandom",
    "getresgid",
    "getresgid32",
    "getresuid",
    "getresuid32",
    "getrlimit",
    "get_robust_list",
    "getrusage",
    "getsid",
    "getsockname",
    "getsockopt",
    "get_thread_area",
    "gettid",
    "gettimeofday",
    "getuid",
    "getuid32",
    "getxattr",
    "inotify_add_watch",
    "inotify_init",
    "inotify_init1",
    "inotify_rm_watch",
    "io_cancel",
    "ioctl",
    "io_destroy",
    "io_getevents",
    "io_pgetevents",
    "io_pgetevents_time64",
    "ioprio_get",
    "ioprio_set",
    "io_setup",
    "io_submit",
    "ipc",
    "kill",
    "lchown",
    "lchown32",
    "lgetxattr",
    "link",
    "linkat",
    "listen",
    "listxattr",
    "llistxattr",
    "_llseek",
    "lremovexattr",
    "lseek",
    "lsetxattr",
    "lstat",
    "lstat64",
    "madvise",
    "membarrier",
    "memfd_create",
    "mincore",
    "mkdir",
    "mkdirat",
    "mknod",
    "mknodat",
    "mlock",
    "mlock2",
    "mlockall",
    "mmap",
    "mmap2",
    "mprotect",
    "mq_getsetattr",
    "mq_notify",
    "mq_open",
    "mq_timedreceive",
    "mq_timedreceive_time64",
    "mq_timedsend",
    "mq_timedsend_time64",
    "mq_unlink",
    "mremap",
    "msgctl",
    "msgget",
    "msgrcv",
    "msgsnd",
    "msync",
    "munlock",
    "munlockall",
    "munmap",
    "nanosleep",
    "newfstatat",
    "_newselect",
    "open",
    "openat",
    "openat2",
    "pause",
    "pidfd_open",
    "pidfd_send_signal",
    "pipe",
    "pipe2",
    "poll",
    "ppoll",
    "ppoll_time64",
    "prctl",
    "pread64",
    "preadv",
    "preadv2",
    "prlimit64",
    "pselect6",
    "pselect6_time64",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "read",
    "readahead",
    "readlink",
    "readlinkat",
    "readv",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmmsg_time64",
    "recvmsg",
    "remap_file_pages",
    "removexattr",
    "rename",
    "renameat",
    "renameat2",
    "restart_syscall",
    "rmdir",
    "rseq",
    "rt_sigaction",
    "rt_sigpending",
    "rt_sigprocmask",
    "rt_sigqueueinfo",
    "rt_sigreturn",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "rt_sigtimedwait_time64",
    "rt_tgsigqueueinfo",
    "sched_getaffinity",
    "sched_getattr",
    "sched_getparam",
    "sched_get_priority_max",
    "sched_get_priority_min",
    "sched_getscheduler",
    "sched_rr_get_interval",
    "sched_rr_get_interval_time64",
    "sched_setaffinity",
    "sched_setattr",
    "sched_setparam",
    "sched_setscheduler",
    "sched_yield",
    "seccomp",
    "select",
    "semctl",
    "semget",
    "semop",
    "semtimedop",
    "semtimedop_time64",
    "send",
    "sendfile",
    "sendfile64",
    "sendmmsg",
    "sendmsg",
    "sendto",
    "setfsgid",
    "setfsgid32",
    "setfsuid",
    "setfsuid32",
    "setgid",
    "setgid32",
    "setgroups",
    "setgroups32",
    "setitimer",
    "setpgid",
    "setpriority",
    "setregid",
    "setregid32",
    "setresgid",
    "setresgid32",
    "setresuid",
    "setresuid32",
    "setreuid",
    "setreuid32",
    "setrlimit",
    "set_robust_list",
    "setsid",
    "setsockopt",
    "set_thread_area",
    "set_tid_address",
    "setuid",
    "setuid32",
    "setxattr",
    "shmat",
    "shmctl",
    "shmdt",
    "shmget",
    "shutdown",
    "sigaltstack",
    "signalfd",
    "signalfd4",
    "sigprocmask",
    "sigreturn",
    "splice",
    "stat",
    "stat64",
    "statfs",
    "statfs64",
    "statx",
    "symlink",
    "symlinkat",
    "sync",
    "sync_file_range",
    "syncfs",
    "sysinfo",
    "tee",
    "tgkill",
    "time",
    "timer_create",
    "timer_delete",
    "timer_getoverrun",
    "timer_gettime",
    "timer_gettime64",
    "timer_settime",
    "timer_settime64",
    "timerfd_create",
    "timerfd_gettime",
    "timerfd_gettime64",
    "timerfd_settime",
    "timerfd_settime64",
    "times",
    "tkill",
    "truncate",
    "truncate64",
    "ugetrlimit",
    "umask",
    "uname",
    "unlink",
    "unlinkat",
    "utime",
    "utimensat",
    "utimensat_time64",
    "utimes",
    "vfork",
    "vmsplice",
    "wait4",
    "waitid",
    "waitpid",
    "write",
    "writev",
];

/// Calls that must never be allowed (checked by the tests against
/// [`ALLOWED`]; listed here so the intent is explicit).
pub const DENIED: &[&str] = &[
    "mount",
    "umount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsmount",
    "fsconfig",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "bpf",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "clone3",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "perf_event_open",
    "userfaultfd",
    "open_by_handle_at",
    "name_to_handle_at",
    "quotactl",
    "syslog",
    "iopl",
    "ioperm",
    "clock_settime",
    "clock_settime64",
    "settimeofday",
    "stime",
    "adjtimex",
    "clock_adjtime",
    "sethostname",
    "setdomainname",
    "lookup_dcookie",
    "personality",
    "vhangup",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "nfsservctl",
    "mbind",
    "set_mempolicy",
    "move_pages",
    "migrate_pages",
    "fanotify_init",
    "lsm_set_self_attr",
    // io_uring bypasses seccomp for the operations it queues and has been
    // the kernel's richest source of privilege escalations (moby and
    // ChromeOS refuse it too).
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    // Another process's file descriptors: moby allows it only with
    // CAP_SYS_PTRACE.
    "pidfd_getfd",
    "process_madvise",
    "get_mempolicy",
    "set_mempolicy_home_node",
    "quotactl_fd",
    // 32-bit x86's multiplexer for the socket calls: its arguments are in
    // memory, out of the family check's reach (and the profile admits the
    // native architecture only).
    "socketcall",
];

/// Address families `socket` accepts (its first argument): local sockets,
/// IPv4, IPv6, and netlink for route queries only (glibc's `getifaddrs`
/// and resolvers; see [`NETLINK_ROUTE`]). AF_PACKET, AF_ALG, AF_VSOCK,
/// AF_KEY, AF_BLUETOOTH and every other family fail with EPERM.
pub const SOCKET_FAMILIES: &[(&str, u64)] = &[("AF_UNIX", 1), ("AF_INET", 2), ("AF_INET6", 10)];
/// `AF_NETLINK`, admitted with protocol [`NETLINK_ROUTE`] only: the audit,
/// uevent, netfilter, crypto and diagnostic netlink families stay closed.
pub const AF_NETLINK: u64 = 16;
/// Netlink's routing protocol (`socket`'s third argument).
pub const NETLINK_ROUTE: u64 = 0;

/// Every `CLONE_NEW*` flag: clone with any of them fails.
const CLONE_NAMESPACE_FLAGS: u64 = 0x0000_0080 // CLONE_NEWTIME
    | 0x0002_0000 // CLONE_NEWNS
    | 0x0200_0000 // CLONE_NEWCGROUP
    | 0x0400_0000 // CLONE_NEWUTS
    | 0x0800_0000 // CLONE_NEWIPC
    | 0x1000_0000 // CLONE_NEWUSER
    | 0x2000_0000 // CLONE_NEWPID
    | 0x4000_0000; // CLONE_NEWNET

const ENOSYS: u32 = 38;

/// The node's own architecture only. Functions are native binaries; the
/// 32-bit entries (x86's int 0x80, arm's compat mode) and x32 are other
/// ways into the kernel with their own, historically buggier, syscall
/// paths, and a syscall from an architecture not listed here ends the
/// thread. One architecture is also a third of the filter runc compiles at
/// every start: `runc run` of an instance's bundle took 47.7 ms with three
/// and 38.6 ms with one here (medians of 15, no filter at all: 38.7 ms).
fn architectures() -> Value {
    if cfg!(target_arch = "aarch64") {
        json!(["SCMP_ARCH_AARCH64"])
    } else {
        json!(["SCMP_ARCH_X86_64"])
    }
}

/// The `linux.seccomp` section of `config.json`.
pub fn profile() -> Value {
    // clone's flags are its first argument on x86 and arm64 (s390 differs;
    // Kiln does not run there).
    let clone = json!({
        "names": ["clone"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{
            "index": 0,
            "value": CLONE_NAMESPACE_FLAGS,
            "valueTwo": 0,
            "op": "SCMP_CMP_MASKED_EQ",
        }],
    });
    // clone3 passes its flags in memory seccomp cannot read: ENOSYS makes
    // glibc fall back to clone, whose flags are checked above.
    let clone3 = json!({
        "names": ["clone3"],
        "action": "SCMP_ACT_ERRNO",
        "errnoRet": ENOSYS,
    });
    let mut syscalls = vec![
        json!({ "names": ALLOWED, "action": "SCMP_ACT_ALLOW" }),
        clone,
        clone3,
    ];
    // socket(family, type, protocol): one rule per admitted family (the
    // conditions of one rule must all hold, so each family is its own).
    for (_, family) in SOCKET_FAMILIES {
        syscalls.push(json!({
            "names": ["socket"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{ "index": 0, "value": family, "valueTwo": 0, "op": "SCMP_CMP_EQ" }],
        }));
    }
    syscalls.push(json!({
        "names": ["socket"],
        "action": "SCMP_ACT_ALLOW",
        "args": [
            { "index": 0, "value": AF_NETLINK, "valueTwo": 0, "op": "SCMP_CMP_EQ" },
            { "index": 2, "value": NETLINK_ROUTE, "valueTwo": 0, "op": "SCMP_CMP_EQ" },
        ],
    }));
    // Pairs of connected sockets exist for AF_UNIX only.
    syscalls.push(json!({
        "names": ["socketpair"],
        "action": "SCMP_ACT_ALLOW",
        "args": [{ "index": 0, "value": 1, "valueTwo": 0, "op": "SCMP_CMP_EQ" }],
    }));
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "architectures": architectures(),
        "syscalls": syscalls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_dangerous_is_allowed() {
        for name in DENIED {
            assert!(!ALLOWED.contains(name), "{name} must not be allowed");
        }
        let p = profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ERRNO");
        assert_eq!(
            p["architectures"].as_array().unwrap().len(),
            1,
            "native architecture only: {}",
            p["architectures"]
        );
        let rules = p["syscalls"].as_array().unwrap();
        // Only clone (with its namespace flags masked) and the allowlist
        // are allowed; clone3 is refused.
        for rule in rules {
            let names: Vec<&str> = rule["names"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            if rule["action"] == "SCMP_ACT_ALLOW" {
                for d in DENIED {
                    assert!(!names.contains(d), "{d} allowed by {rule}");
                }
            }
        }
        let clone = rules.iter().find(|r| r["names"][0] == "clone").unwrap();
        assert_eq!(clone["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
        assert_eq!(clone["args"][0]["value"], 0x7E02_0080u64);
        assert_eq!(clone["args"][0]["valueTwo"], 0);
    }

    /// What Docker's default profile (moby's `profiles/seccomp/default.json`,
    /// v25 and later, which dropped io_uring) refuses a container with
    /// Docker's default capabilities on x86_64 and arm64: the calls it
    /// admits only with CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_PTRACE (for
    /// kcmp and pidfd_getfd), CAP_SYS_RAWIO, CAP_SYS_TIME, CAP_SYS_BOOT,
    /// CAP_SYS_PACCT, CAP_SYS_TTY_CONFIG, CAP_SYS_NICE, CAP_SYSLOG, CAP_BPF,
    /// CAP_PERFMON or CAP_DAC_READ_SEARCH, none of which a function holds,
    /// and the known calls absent from its allowlist.
    const MOBY_REFUSES: &[&str] = &[
        // Capability-gated.
        "open_by_handle_at",
        "bpf",
        "fanotify_init",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "lookup_dcookie",
        "mount",
        "mount_setattr",
        "move_mount",
        "open_tree",
        "perf_event_open",
        "quotactl",
        "quotactl_fd",
        "setdomainname",
        "sethostname",
        "setns",
        "syslog",
        "umount",
        "umount2",
        "unshare",
        "reboot",
        "delete_module",
        "init_module",
        "finit_module",
        "acct",
        "kcmp",
        "pidfd_getfd",
        "process_madvise",
        "iopl",
        "ioperm",
        "settimeofday",
        "stime",
        "clock_settime",
        "clock_settime64",
        "vhangup",
        "get_mempolicy",
        "mbind",
        "set_mempolicy",
        "set_mempolicy_home_node",
        // Not in its allowlist.
        "kexec_load",
        "kexec_file_load",
        "keyctl",
        "add_key",
        "request_key",
        "swapon",
        "swapoff",
        "userfaultfd",
        "nfsservctl",
        "_sysctl",
        "sysfs",
        "ustat",
        "uselib",
        "create_module",
        "get_kernel_syms",
        "query_module",
        "afs_syscall",
        "tuxcall",
        "security",
        "vserver",
        "putpmsg",
        "getpmsg",
        "move_pages",
        "migrate_pages",
        "io_uring_setup",
        "io_uring_enter",
        "io_uring_register",
    ];
    /// moby's profile refuses `socket(AF_VSOCK, ...)`.
    const AF_VSOCK: u64 = 40;

    /// Whether any ALLOW rule of the profile names `call` without
    /// conditions.
    fn allowed_unconditionally(profile: &Value, call: &str) -> bool {
        profile["syscalls"].as_array().unwrap().iter().any(|r| {
            r["action"] == "SCMP_ACT_ALLOW"
                && r["args"].as_array().is_none_or(|a| a.is_empty())
                && r["names"].as_array().unwrap().iter().any(|n| n == call)
        })
    }

    /// The families `socket` is admitted with, by the rules' first
    /// argument.
    fn socket_families(profile: &Value) -> Vec<u64> {
        profile["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["names"][0] == "socket" && r["action"] == "SCMP_ACT_ALLOW")
            .map(|r| {
                let first = &r["args"][0];
                assert_eq!(
                    (first["index"].as_u64(), first["op"].as_str()),
                    (Some(0), Some("SCMP_CMP_EQ")),
                    "{r}"
                );
                first["value"].as_u64().unwrap()
            })
            .collect()
    }

    #[test]
    fn at_least_as_strict_as_mobys_default_profile() {
        let p = profile();
        for call in MOBY_REFUSES {
            assert!(
                !ALLOWED.contains(call),
                "{call}: moby refuses it, Kiln allows it"
            );
            assert!(
                !allowed_unconditionally(&p, call),
                "{call} allowed by a rule"
            );
        }
        // clone only without namespace flags, clone3 not at all (as moby).
        assert!(!allowed_unconditionally(&p, "clone"));
        assert!(!allowed_unconditionally(&p, "clone3"));
        // socket: never unconditionally, never AF_VSOCK, and nothing but
        // the listed families.
        assert!(!allowed_unconditionally(&p, "socket"));
        assert!(!allowed_unconditionally(&p, "socketpair"));
        let families = socket_families(&p);
        assert!(!families.contains(&AF_VSOCK));
        let mut expected: Vec<u64> = SOCKET_FAMILIES.iter().map(|(_, f)| *f).collect();
        expected.push(AF_NETLINK);
        assert_eq!(families, expected);
        // AF_PACKET (17), AF_ALG (38), AF_KEY (15), AF_BLUETOOTH (31).
        for family in [17, 38, 15, 31] {
            assert!(!families.contains(&family), "family {family} admitted");
        }
        // Netlink for routes only.
        let netlink = p["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["names"][0] == "socket" && r["args"][0]["value"] == AF_NETLINK)
            .unwrap();
        assert_eq!(netlink["args"][1]["index"], 2);
        assert_eq!(netlink["args"][1]["value"], NETLINK_ROUTE);
        assert_eq!(netlink["args"][1]["op"], "SCMP_CMP_EQ");
    }

    #[test]
    fn the_allowlist_has_no_duplicates() {
        let mut names = ALLOWED.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALLOWED.len());
    }
}
