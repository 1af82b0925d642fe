//! The child processes of `kiln dev --postgres` (gateways, schedulers,
//! HAProxy): started, restarted when they die, and stopped by pid.
//!
//! One thread of its own starts every child and lives until they are all
//! stopped: a child asks the kernel for SIGKILL when the thread that
//! forked it ends (`kiln serve`, PR_SET_PDEATHSIG), so that thread must be
//! one that does not end before the children do. Children run in process
//! groups of their own, so a Ctrl-C in the terminal reaches `kiln dev`
//! only, which then stops them in order instead of all at once.
//!
//! A child that exits by itself (a scheduler deposed as leader exits 1 for
//! its supervisor to restart it; a gateway killed by an operator) is
//! started again with the same configuration after a second (or its
//! spec's minimum), longer (up to 30 s) when it keeps dying within 10 s of
//! its start.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

/// What a process of the cluster is, in `cluster.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Scheduler,
    Agent,
    Haproxy,
}

/// How to run one child.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub role: Role,
    /// Where it serves (`host:port` of its main listener), for
    /// `cluster.json`.
    pub address: String,
    /// A gateway's internal (mTLS) listener.
    pub internal_address: Option<String>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Appended to across restarts.
    pub log: PathBuf,
    /// Wait at least this long before starting it again.
    pub min_restart_delay: Duration,
}

/// One process as `cluster.json` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessInfo {
    pub name: String,
    pub role: Role,
    /// None while a dead child waits to be started again.
    pub pid: Option<u32>,
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub internal_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
    pub restarts: u32,
}

/// How long a child has to stop after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(20);
const RESTART_DELAY: Duration = Duration::from_secs(1);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);
/// A child that ran this long counts as started well.
const STABLE_AFTER: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(100);

enum Request {
    Start(Spec, tokio::sync::oneshot::Sender<Result<u32>>),
    Stop(Vec<Role>, tokio::sync::oneshot::Sender<()>),
}

/// The supervising thread; its children are stopped when it is (or when
/// this is dropped).
pub struct Supervisor {
    tx: mpsc::Sender<Request>,
    thread: Option<JoinHandle<()>>,
    stop_order: Vec<Role>,
}

impl Supervisor {
    /// `on_change` is called (on the supervising thread) with every child
    /// whenever one starts or dies. Children stop one role after the other
    /// in `stop_order` (then any other), each with SIGTERM and after a
    /// grace period SIGKILL.
    pub fn new(
        stop_order: &[Role],
        on_change: impl Fn(&[ProcessInfo]) + Send + 'static,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kiln-supervisor".into())
            .spawn(move || Supervising::default().run(&rx, &on_change))
            .context("cannot start the thread that supervises kiln dev's processes")?;
        Ok(Self {
            tx,
            thread: Some(thread),
            stop_order: stop_order.to_vec(),
        })
    }

    /// Start `spec`'s process; its pid.
    pub async fn start(&self, spec: Spec) -> Result<u32> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let name = spec.name.clone();
        self.tx
            .send(Request::Start(spec, reply))
            .map_err(|_| anyhow::anyhow!("the supervising thread is gone"))?;
        answer
            .await
            .map_err(|_| anyhow::anyhow!("the supervising thread is gone"))?
            .with_context(|| format!("cannot start {name}"))
    }

    /// Stop every child (see [`Supervisor::new`]) and wait until they are.
    pub async fn stop(mut self) {
        let (reply, done) = tokio::sync::oneshot::channel();
        if self
            .tx
            .send(Request::Stop(self.stop_order.clone(), reply))
            .is_ok()
        {
            let _ = done.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // Not stopped (an error while starting): stop everything now.
        if let Some(thread) = self.thread.take() {
            let (reply, _done) = tokio::sync::oneshot::channel();
            let _ = self.tx.send(Request::Stop(self.stop_order.clone(), reply));
            let _ = thread.join();
        }
    }
}

struct Kid {
    spec: Spec,
    child: Option<Child>,
    started: Instant,
    restarts: u32,
    delay: Duration,
    restart_at: Option<Instant>,
}

impl Kid {
    fn info(&self) -> ProcessInfo {
        ProcessInfo {
            name: self.spec.name.clone(),
            role: self.spec.role,
            pid: self.child.as_ref().map(Child::id),
            address: self.spec.address.clone(),
            internal_address: self.spec.internal_address.clone(),
            log: Some(self.spec.log.clone()),
            restarts: self.restarts,
        }
    }
}

#[derive(Default)]
struct Supervising {
    kids: Vec<Kid>,
}

impl Supervising {
    fn run(mut self, rx: &mpsc::Receiver<Request>, on_change: &dyn Fn(&[ProcessInfo])) {
        loop {
            let mut changed = false;
            match rx.recv_timeout(TICK) {
                Ok(Request::Start(spec, reply)) => {
                    let started = spawn(&spec).map(|child| {
                        let pid = child.id();
                        tracing::info!(name = %spec.name, pid, "started");
                        self.kids.push(Kid {
                            spec,
                            child: Some(child),
                            started: Instant::now(),
                            restarts: 0,
                            delay: RESTART_DELAY,
                            restart_at: None,
                        });
                        pid
                    });
                    changed = started.is_ok();
                    let _ = reply.send(started);
                }
                Ok(Request::Stop(order, reply)) => {
                    self.stop_all(&order);
                    on_change(&self.infos());
                    let _ = reply.send(());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.stop_all(&[]);
                    return;
                }
            }
            changed |= self.reap_and_restart();
            if changed {
                on_change(&self.infos());
            }
        }
    }

    fn infos(&self) -> Vec<ProcessInfo> {
        self.kids.iter().map(Kid::info).collect()
    }

    /// Note children that died and start the ones whose delay is over;
    /// whether anything changed.
    fn reap_and_restart(&mut self) -> bool {
        let mut changed = false;
        for kid in &mut self.kids {
            if let Some(child) = &mut kid.child {
                if let Ok(Some(status)) = child.try_wait() {
                    let ran = kid.started.elapsed();
                    kid.delay = if ran < STABLE_AFTER {
                        (kid.delay * 2).min(MAX_RESTART_DELAY)
                    } else {
                        RESTART_DELAY
                    }
                    .max(kid.spec.min_restart_delay);
                    tracing::warn!(
                        name = %kid.spec.name,
                        pid = child.id(),
                        %status,
                        ran_ms = ran.as_millis() as u64,
                        restart_in_ms = kid.delay.as_millis() as u64,
                        log = %kid.spec.log.display(),
                        "a process of the cluster exited; starting it again"
                    );
                    kid.child = None;
                    kid.restart_at = Some(Instant::now() + kid.delay);
                    changed = true;
                }
            } else if kid.restart_at.is_some_and(|at| at <= Instant::now()) {
                kid.restarts += 1;
                kid.started = Instant::now();
                match spawn(&kid.spec) {
                    Ok(child) => {
                        tracing::info!(name = %kid.spec.name, pid = child.id(), restarts = kid.restarts, "started again");
                        kid.child = Some(child);
                        kid.restart_at = None;
                    }
                    Err(e) => {
                        tracing::warn!(name = %kid.spec.name, error = %format!("{e:#}"), "cannot start it again");
                        kid.delay = (kid.delay * 2).min(MAX_RESTART_DELAY);
                        kid.restart_at = Some(Instant::now() + kid.delay);
                    }
                }
                changed = true;
            }
        }
        changed
    }

    fn stop_all(&mut self, order: &[Role]) {
        for kid in &mut self.kids {
            kid.restart_at = None;
        }
        let mut roles: Vec<Option<Role>> = order.iter().copied().map(Some).collect();
        roles.push(None);
        for role in roles {
            let group: Vec<&mut Kid> = self
                .kids
                .iter_mut()
                .filter(|k| k.child.is_some())
                .filter(|k| role.is_none_or(|r| k.spec.role == r))
                .collect();
            stop_group(group);
        }
    }
}

/// SIGTERM every child of `group` (ours, by pid), wait for them, SIGKILL
/// the ones still there after the grace period.
fn stop_group(mut group: Vec<&mut Kid>) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for kid in &mut group {
        if let Some(child) = &kid.child {
            tracing::info!(name = %kid.spec.name, pid = child.id(), "stopping");
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let mut running = 0;
        for kid in &mut group {
            if let Some(child) = &mut kid.child {
                if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
                    kid.child = None;
                } else {
                    running += 1;
                }
            }
        }
        if running == 0 {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for kid in &mut group {
        if let Some(mut child) = kid.child.take() {
            tracing::warn!(name = %kid.spec.name, pid = child.id(), "did not stop in time; killed");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn spawn(spec: &Spec) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&spec.log)
        .with_context(|| format!("cannot open {}", spec.log.display()))?;
    Command::new(&spec.program)
        .args(&spec.args)
        .env(crate::serve::PARENT_ENV, std::process::id().to_string())
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot run {}", spec.program.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(name: &str, role: Role, log: PathBuf) -> Spec {
        Spec {
            name: name.into(),
            role,
            address: "127.0.0.1:1".into(),
            internal_address: None,
            program: "/bin/sleep".into(),
            args: vec!["600".into()],
            log,
            min_restart_delay: Duration::ZERO,
        }
    }

    fn alive(pid: u32) -> bool {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ")
    }

    #[tokio::test]
    async fn a_child_that_dies_is_started_again_and_all_are_stopped_by_pid() {
        let dir = tempfile::tempdir().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<ProcessInfo>::new()));
        let s = seen.clone();
        let sup = Supervisor::new(&[Role::Gateway, Role::Scheduler], move |infos| {
            *s.lock().unwrap() = infos.to_vec()
        })
        .unwrap();
        let a = sup
            .start(sleeper("a", Role::Gateway, dir.path().join("a.log")))
            .await
            .unwrap();
        let b = sup
            .start(sleeper("b", Role::Scheduler, dir.path().join("b.log")))
            .await
            .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(a as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let again = loop {
            let infos = seen.lock().unwrap().clone();
            let a_now = infos.iter().find(|i| i.name == "a").unwrap();
            if let Some(pid) = a_now.pid.filter(|p| *p != a) {
                assert_eq!(a_now.restarts, 1);
                break pid;
            }
            assert!(Instant::now() < deadline, "a was not started again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(alive(again) && alive(b));
        sup.stop().await;
        assert!(!alive(again) && !alive(b));
        assert!(seen.lock().unwrap().iter().all(|i| i.pid.is_none()));
    }

    #[tokio::test]
    async fn a_program_that_cannot_run_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(&[], |_| {}).unwrap();
        let mut spec = sleeper("x", Role::Haproxy, dir.path().join("x.log"));
        spec.program = dir.path().join("missing");
        let e = sup.start(spec).await.unwrap_err();
        assert!(format!("{e:#}").contains("cannot start x"), "{e:#}");
        sup.stop().await;
    }
}
