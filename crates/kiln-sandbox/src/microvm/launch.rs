//! Starting a VMM process, jailed or not, and holding it
//! ([`VmmProcess`]).
//!
//! The process is made with `clone(2)` (not fork + exec through
//! `std::process`): with a [`JailPlan`] it gets `CLONE_NEWNS | CLONE_NEWPID`,
//! so the VMM itself is PID 1 of its own PID namespace, and the pid the
//! driver holds is the VMM's. The child then
//! 1. waits until the parent has put it into its cgroup (`before_exec`);
//! 2. makes every mount private, bind-mounts the plan's files read-only
//!    into the chroot and chroots there;
//! 3. sets its groups, gid and uid, empties the bounding and ambient sets
//!    first and every capability set after, and sets `no_new_privs`;
//! 4. points stdin at /dev/null and stdout/stderr at the VMM's log and
//!    executes the VMM.
//!
//! Each step that fails is reported to the parent (which step, errno) over
//! a close-on-exec pipe, so the driver's error says what could not be done.
//!
//! The child is a copy of a multi-threaded process: it only makes raw
//! system calls on memory prepared before the clone (no allocation, no
//! glibc `setresuid`, whose thread broadcast would wait for threads that
//! exist only in the parent).

use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::jail::{BindKind, JailPlan};

/// How a VMM process is started.
#[derive(Debug, Clone)]
pub struct VmmCommand {
    /// The binary as the new process executes it: inside the chroot when
    /// jailed.
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// Without a jail: run as this uid/gid (else the agent's).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// stdout and stderr of the VMM.
    pub log: PathBuf,
    /// The environment (nothing else of the agent's is passed).
    pub env: Vec<(String, String)>,
    pub jail: Option<JailPlan>,
}

/// Why a VMM could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("Cannot use {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} contains a NUL byte")]
    Nul(String),
    #[error("clone(2) failed: {0}")]
    Clone(nix::Error),
    #[error("Cannot put the VMM into its cgroup: {0}")]
    BeforeExec(String),
    #[error("Starting the VMM failed at {step}: {errno}")]
    Step { step: String, errno: nix::Error },
}

/// Steps of the child, as reported back.
const STEPS: [&str; 14] = [
    "waiting for the cgroup",
    "making mounts private (mount --make-rprivate /)",
    "bind-mounting a file into the jail",
    "remounting a jail file read-only",
    "entering the jail (chdir)",
    "chroot",
    "setgroups",
    "setresgid",
    "dropping the capability bounding set",
    "clearing the ambient capabilities",
    "setresuid",
    "clearing every capability set (capset)",
    "setting no_new_privs",
    "executing the VMM (execve)",
];

struct Bind {
    source: CString,
    target: CString,
    flags: libc::c_ulong,
    step_detail: usize,
}

/// Everything the child uses, made before the clone.
struct ChildPlan {
    binds: Vec<Bind>,
    root: Option<CString>,
    groups: Vec<libc::gid_t>,
    gid: Option<libc::gid_t>,
    uid: Option<libc::uid_t>,
    jailed: bool,
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    log_fd: RawFd,
    null_fd: RawFd,
    go_fd: RawFd,
    report_fd: RawFd,
}

fn cstr(what: &str, s: &OsStr) -> Result<CString, LaunchError> {
    CString::new(s.as_bytes()).map_err(|_| LaunchError::Nul(what.to_owned()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError + '_ {
    move |source| LaunchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Report `step` and errno to the parent and end the child.
fn fail(plan: &ChildPlan, step: usize, errno: i32) -> ! {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(step as u32).to_le_bytes());
    msg[4..].copy_from_slice(&errno.to_le_bytes());
    // SAFETY: plain syscalls on fds and a stack buffer.
    unsafe {
        libc::write(plan.report_fd, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The child: see the module docs. Never returns.
fn child_main(p: &ChildPlan) -> isize {
    // SAFETY: raw system calls on memory prepared before the clone.
    unsafe {
        let mut b = [0u8; 1];
        if libc::read(p.go_fd, b.as_mut_ptr().cast(), 1) != 1 {
            fail(p, 0, errno());
        }
        if let Some(root) = &p.root {
            let slash = c"/";
            if libc::mount(
                std::ptr::null(),
                slash.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                fail(p, 1, errno());
            }
            for bind in &p.binds {
                if libc::mount(
                    bind.source.as_ptr(),
                    bind.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                {
                    fail(p, 2 + 100 * bind.step_detail, errno());
                }
                if libc::mount(
                    std::ptr::null(),
                    bind.target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REMOUNT | bind.flags,
                    std::ptr::null(),
                ) != 0
                {
                    fail(p, 3 + 100 * bind.step_detail, errno());
                }
            }
            if libc::chdir(root.as_ptr()) != 0 {
                fail(p, 4, errno());
            }
            if libc::chroot(c".".as_ptr()) != 0 || libc::chdir(slash.as_ptr()) != 0 {
                fail(p, 5, errno());
            }
        }
        if let Some(gid) = p.gid {
            if libc::syscall(libc::SYS_setgroups, p.groups.len(), p.groups.as_ptr()) != 0 {
                fail(p, 6, errno());
            }
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                fail(p, 7, errno());
            }
        }
        if p.jailed {
            for cap in 0..64 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                    if errno() == libc::EINVAL {
                        break;
                    }
                    fail(p, 8, errno());
                }
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
            {
                fail(p, 9, errno());
            }
        }
        if let Some(uid) = p.uid {
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                fail(p, 10, errno());
            }
        }
        if p.jailed {
            // struct __user_cap_header_struct / __user_cap_data_struct[2].
            let header: [u32; 2] = [0x2008_0522, 0];
            let data = [0u32; 6];
            if libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) != 0 {
                fail(p, 11, errno());
            }
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            fail(p, 12, errno());
        }
        if libc::dup2(p.null_fd, 0) < 0
            || libc::dup2(p.log_fd, 1) < 0
            || libc::dup2(p.log_fd, 2) < 0
        {
            fail(p, 13, errno());
        }
        // Nothing else of the agent's crosses the exec (the report pipe
        // closes with it, telling the parent the exec worked).
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 4;
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
        libc::execve(p.program.as_ptr(), p.argv.as_ptr(), p.envp.as_ptr());
        fail(p, 13, errno())
    }
}

fn step_name(code: u32, plan: &[String]) -> String {
    let (step, detail) = ((code % 100) as usize, (code / 100) as usize);
    let name = STEPS.get(step).copied().unwrap_or("an unknown step");
    match (step, plan.get(detail)) {
        (2 | 3, Some(what)) => format!("{name} ({what})"),
        _ => name.to_owned(),
    }
}

/// Start `cmd`. `before_exec(pid)` runs while the child waits (the driver
/// moves it into its cgroup there); if it fails the child is killed.
pub fn spawn(
    cmd: &VmmCommand,
    before_exec: impl FnOnce(u32) -> Result<(), String>,
) -> Result<VmmProcess, LaunchError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cmd.log)
        .map_err(io(&cmd.log))?;
    let null = std::fs::File::open("/dev/null").map_err(io(Path::new("/dev/null")))?;
    let (go_read, go_write) = pipe()?;
    let (report_read, report_write) = pipe()?;

    let program = cstr("the VMM binary", cmd.binary.as_os_str())?;
    let mut args = vec![program.clone()];
    for a in &cmd.args {
        args.push(cstr("a VMM argument", OsStr::new(a))?);
    }
    let env: Vec<CString> = cmd
        .env
        .iter()
        .map(|(k, v)| cstr("the VMM environment", OsStr::new(&format!("{k}={v}"))))
        .collect::<Result<_, _>>()?;
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();

    let mut bind_names = vec![];
    let mut binds = vec![];
    let (root, groups, gid, uid) = match &cmd.jail {
        Some(jail) => {
            for (i, b) in jail.binds.iter().enumerate() {
                bind_names.push(format!("{} at {}", b.source.display(), b.target.display()));
                let flags = libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | match b.kind {
                        BindKind::Executable => libc::MS_NODEV,
                        BindKind::Data => libc::MS_NODEV | libc::MS_NOEXEC,
                        BindKind::Device => libc::MS_NOEXEC,
                    };
                binds.push(Bind {
                    source: cstr("a jail mount source", b.source.as_os_str())?,
                    target: cstr("a jail mount target", jail.root.join(&b.target).as_os_str())?,
                    flags,
                    step_detail: i,
                });
            }
            (
                Some(cstr("the jail root", jail.root.as_os_str())?),
                jail.groups.clone(),
                Some(jail.gid),
                Some(jail.uid),
            )
        }
        None => (None, vec![], cmd.gid.or(cmd.uid), cmd.uid),
    };
    let plan = ChildPlan {
        binds,
        root,
        groups,
        gid,
        uid,
        jailed: cmd.jail.is_some(),
        program,
        argv,
        envp,
        log_fd: log.as_raw_fd(),
        null_fd: null.as_raw_fd(),
        go_fd: go_read.as_raw_fd(),
        report_fd: report_write.as_raw_fd(),
    };
    let mut flags = nix::sched::CloneFlags::empty();
    if cmd.jail.is_some() {
        flags |= nix::sched::CloneFlags::CLONE_NEWNS | nix::sched::CloneFlags::CLONE_NEWPID;
    }
    let mut stack = vec![0u8; 256 * 1024];
    // SAFETY: the child runs `child_main`, which makes only raw system
    // calls on `plan` (a copy of this process's memory) and never returns.
    let pid = unsafe {
        nix::sched::clone(
            Box::new(|| child_main(&plan)),
            &mut stack,
            flags,
            Some(libc::SIGCHLD),
        )
    }
    .map_err(LaunchError::Clone)?;
    drop(go_read);
    drop(report_write);
    let process = VmmProcess::new(pid);
    if let Err(e) = before_exec(pid.as_raw() as u32) {
        drop(go_write);
        process.kill();
        return Err(LaunchError::BeforeExec(e));
    }
    let go: OwnedFd = go_write;
    // SAFETY: writes one byte from a stack buffer to an owned fd.
    unsafe { libc::write(go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    drop(go);
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reads into the unfilled tail of a stack buffer.
        let n = unsafe {
            libc::read(
                report_read.as_raw_fd(),
                report[got..].as_mut_ptr().cast(),
                report.len() - got,
            )
        };
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        if n <= 0 {
            break;
        }
        got += n as usize;
    }
    drop(plan);
    if got == report.len() {
        let code = u32::from_le_bytes(report[..4].try_into().expect("4 bytes"));
        let err = i32::from_le_bytes(report[4..].try_into().expect("4 bytes"));
        process.kill();
        return Err(LaunchError::Step {
            step: step_name(code, &bind_names),
            errno: nix::Error::from_raw(err),
        });
    }
    Ok(process)
}

fn pipe() -> Result<(OwnedFd, OwnedFd), LaunchError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| LaunchError::Io {
        path: "pipe".into(),
        source: e.into(),
    })
}

/// A started VMM: its pid (in the agent's PID namespace), waited for with
/// `waitpid` (the driver is its parent). Dropping it kills and reaps it.
#[derive(Debug)]
pub struct VmmProcess {
    pid: Pid,
    exit: Mutex<Option<String>>,
}

impl VmmProcess {
    fn new(pid: Pid) -> Self {
        Self {
            pid,
            exit: Mutex::new(None),
        }
    }

    pub fn id(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// How it ended, once it has; `None` while it runs.
    pub fn try_wait(&self) -> Option<String> {
        let mut exit = self.exit.lock().expect("lock");
        if exit.is_none() {
            *exit = match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => Some(format!("exit status: {code}")),
                Ok(WaitStatus::Signaled(_, sig, _)) => Some(format!("signal: {sig}")),
                Ok(_) => None,
                Err(e) => Some(format!("cannot be waited for: {e}")),
            };
        }
        exit.clone()
    }

    /// Wait up to `timeout` for it to end; true if it has.
    pub async fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.try_wait().is_some() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (the whole PID namespace, when jailed) and reap it.
    pub fn kill(&self) {
        let mut exit = self.exit.lock().expect("lock");
        if exit.is_some() {
            return;
        }
        let _ = kill(self.pid, Signal::SIGKILL);
        *exit = Some(match waitpid(self.pid, None) {
            Ok(WaitStatus::Exited(_, code)) => format!("exit status: {code}"),
            Ok(WaitStatus::Signaled(_, sig, _)) => format!("signal: {sig}"),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("cannot be waited for: {e}"),
        });
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
