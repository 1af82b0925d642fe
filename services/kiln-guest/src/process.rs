//! Child processes of PID 1: the function, exec sessions, and whatever
//! they orphan. One reaper collects every exit (PID 1 inherits orphans), so
//! children are spawned through [`Reaper::spawn`] and never waited on
//! directly (std's `wait` would race the reaper).

use std::collections::{HashMap, HashSet};
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_guest_proto::ExitStatus;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::Notify;

/// A child the reaper tracks, with its pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: u32,
    pub stdin: Option<ChildStdin>,
    pub stdout: Option<ChildStdout>,
    pub stderr: Option<ChildStderr>,
}

#[derive(Default)]
struct State {
    /// Children someone will wait for.
    tracked: HashSet<i32>,
    /// Exits of tracked children not yet collected.
    exited: HashMap<i32, ExitStatus>,
}

/// Reaps every child and hands exit statuses to waiters.
#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

static GLOBAL: OnceLock<Reaper> = OnceLock::new();

impl Reaper {
    /// The process's reaper, started on first use: a thread blocked in
    /// `waitpid(-1)`. There must be only one per process (two would take
    /// each other's children), so this is a singleton.
    pub fn start() -> std::io::Result<Reaper> {
        if let Some(r) = GLOBAL.get() {
            return Ok(r.clone());
        }
        let reaper = Reaper::default();
        if GLOBAL.set(reaper.clone()).is_err() {
            return Ok(GLOBAL.get().cloned().unwrap_or(reaper));
        }
        let r = reaper.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(status) => r.record(status),
                    // No children right now.
                    Err(nix::errno::Errno::ECHILD) => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(_) => {}
                }
            })?;
        Ok(reaper)
    }

    fn record(&self, status: WaitStatus) {
        let (pid, exit) = match status {
            WaitStatus::Exited(pid, code) => (
                pid,
                ExitStatus {
                    code: Some(code),
                    signal: None,
                },
            ),
            WaitStatus::Signaled(pid, sig, _) => (
                pid,
                ExitStatus {
                    code: None,
                    signal: Some(sig as i32),
                },
            ),
            _ => return,
        };
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.tracked.remove(&pid.as_raw()) {
            state.exited.insert(pid.as_raw(), exit);
            drop(state);
            self.changed.notify_waiters();
        } else {
            tracing::trace!(pid = pid.as_raw(), "reaped an orphan");
        }
    }

    /// Spawn a child whose exit [`Reaper::wait`] can report. Spawning under
    /// the lock means the reaper cannot see the exit before the pid is tracked.
    // The reaper thread waits for every child; std's wait would race it.
    #[allow(clippy::zombie_processes)]
    pub fn spawn(&self, command: &mut Command) -> std::io::Result<Spawned> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let child = command.spawn()?;
        state.tracked.insert(child.id() as i32);
        Ok(Spawned {
            pid: child.id(),
            stdin: child.stdin,
            stdout: child.stdout,
            stderr: child.stderr,
        })
    }

    /// Wait for a tracked child's exit.
    pub async fn wait(&self, pid: u32) -> ExitStatus {
        let pid = pid as i32;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(status) = state.exited.remove(&pid) {
                    return status;
                }
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_exit_codes_and_signals() {
        let reaper = Reaper::start().unwrap();
        let a = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "exit 7"]))
            .unwrap();
        let b = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "kill -9 $$"]))
            .unwrap();
        let sa = tokio::time::timeout(std::time::Duration::from_secs(5), reaper.wait(a.pid))
            .await
            .unwrap();
        assert_eq!(sa.code, Some(7));
        let sb = tokio::time::timeout(std::time::Duration::from_secs(5), reaper.wait(b.pid))
            .await
            .unwrap();
        assert_eq!(sb.signal, Some(9));
    }
}
