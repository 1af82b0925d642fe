//! Child processes of PID 1: the function, exec sessions, and whatever
//! they orphan. One reaper collects every exit (PID 1 inherits orphans), so
//! children are spawned through [`Reaper::spawn`] and never waited on
//! directly (std's `wait` would race the reaper).

use std::collections::{HashMap, HashSet};
use std::process::{ChildStderr, ChildStdin, ChildStdout, Command};
use std::sync::{Arc, Mutex, OnceLock};

use kiln_guest_proto::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
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
    /// `waitid(P_ALL)`. There must be only one per process (two would take
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
                // Learn which child exited without collecting it, then
                // collect it under the state lock (see `reap`).
                match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                    Ok(exited) => {
                        if let Some(pid) = exited.pid() {
                            r.reap(pid);
                        }
                    }
                    Err(Errno::EINTR) => {}
                    // No children right now (or an error that retrying at
                    // once would only repeat).
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            })?;
        Ok(reaper)
    }

    /// Collect a child known to have exited. Under the state lock, which
    /// [`Reaper::spawn`] holds while std spawns: when a command cannot be
    /// exec'd, std's spawn itself waits for the failed child before it
    /// returns the error, and panics ("wait() should either return Ok or
    /// panic") if someone else collected it first. Taking the lock here
    /// lets std collect its own failed child; the waitpid below then finds
    /// nothing (ECHILD) and that is fine.
    fn reap(&self, pid: Pid) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let exit = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => ExitStatus {
                code: Some(code),
                signal: None,
            },
            Ok(WaitStatus::Signaled(_, sig, _)) => ExitStatus {
                code: None,
                signal: Some(sig as i32),
            },
            // Collected by std's spawn (a failed exec), or not exited.
            Ok(_) | Err(_) => return,
        };
        if state.tracked.remove(&pid.as_raw()) {
            state.exited.insert(pid.as_raw(), exit);
            drop(state);
            self.changed.notify_waiters();
        } else {
            tracing::trace!(pid = pid.as_raw(), "reaped an orphan");
        }
    }

    /// Spawn a child whose exit [`Reaper::wait`] can report. Spawning under
    /// the lock means the reaper cannot collect the child before its pid is
    /// tracked, nor a child whose exec failed before std has collected it.
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

    /// std's spawn waits for a child whose exec failed (to collect it
    /// before returning the error); a reaper that took that child first
    /// made std panic ("wait() should either return Ok or panic") and the
    /// task that spawned it died without an answer. The reaper is parked in
    /// waitpid while a long-lived child runs, so it sees every failed
    /// child at once: each spawn must still return the error.
    #[tokio::test]
    async fn a_command_that_cannot_start_is_an_error_not_a_panic() {
        let reaper = Reaper::start().unwrap();
        let sleeper = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "exec sleep 30"]))
            .unwrap();
        for _ in 0..300 {
            let mut missing = Command::new("/nonexistent/kiln-reaper-test");
            // The static guest forks and execs (no posix_spawn there); a
            // pre_exec hook makes std take that path here too.
            // SAFETY: the hook does nothing between fork and exec.
            unsafe { std::os::unix::process::CommandExt::pre_exec(&mut missing, || Ok(())) };
            let err = reaper.spawn(&mut missing).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
        let ok = reaper
            .spawn(Command::new("/bin/sh").args(["-c", "exit 3"]))
            .unwrap();
        let st = tokio::time::timeout(std::time::Duration::from_secs(5), reaper.wait(ok.pid))
            .await
            .unwrap();
        assert_eq!(st.code, Some(3));
        let _ = nix::sys::signal::kill(
            Pid::from_raw(sleeper.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let st = tokio::time::timeout(std::time::Duration::from_secs(5), reaper.wait(sleeper.pid))
            .await
            .unwrap();
        assert_eq!(st.signal, Some(9));
    }
}
