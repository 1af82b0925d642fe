//! Instance-login sessions: a command in the function's root, with pipes
//! or a pseudo-terminal, its output streamed back, its exit reported.

use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use kiln_guest_proto::{
    ErrorBody, ErrorCode, ExecInput, ExecInputs, ExecRequest, ExecWriter, TtySize,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::fdio::FdStream;
use crate::process::Reaper;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/code";

/// Run one session to its end.
pub async fn run(reaper: &Reaper, request: ExecRequest, input: ExecInputs, output: ExecWriter) {
    if request.command.is_empty() || request.command.iter().any(|a| a.contains('\0')) {
        output
            .error(ErrorBody::new(
                ErrorCode::ExecFailed,
                "The command is empty or contains NUL",
            ))
            .await;
        return;
    }
    let mut command = Command::new(&request.command[0]);
    command
        .args(&request.command[1..])
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/tmp")
        .envs(&request.env)
        .current_dir(request.working_dir.as_deref().unwrap_or("/"));
    let started = if request.tty {
        start_tty(reaper, &mut command, request.size)
    } else {
        start_pipes(reaper, &mut command)
    };
    let session = match started {
        Ok(s) => s,
        Err(e) => {
            output
                .error(ErrorBody::new(
                    ErrorCode::ExecFailed,
                    format!("Starting {:?}: {e}", request.command[0]),
                ))
                .await;
            return;
        }
    };
    let Session {
        pid,
        stdin,
        stdout,
        stderr,
        tty,
    } = session;
    // If the session is abandoned (the host hung up and the server aborted
    // this task), the command goes too.
    let mut kill = KillOnDrop(Some(pid));
    let stdin_task = tokio::spawn(feed_stdin(stdin, input, tty));
    let status = {
        let out = &output;
        let pumps = async {
            tokio::join!(
                pump(stdout, |b| async move { out.stdout(b).await }),
                async {
                    if let Some(stderr) = stderr {
                        pump(stderr, |b| async move { out.stderr(b).await }).await
                    }
                }
            )
        };
        let wait = reaper.wait(pid);
        tokio::pin!(wait, pumps);
        let mut pumped = false;
        let status = loop {
            tokio::select! {
                s = &mut wait => break s,
                _ = &mut pumps, if !pumped => pumped = true,
            }
        };
        // Output still buffered in the pipes is sent; a grandchild holding
        // them open does not keep the session alive.
        if !pumped {
            let _ = tokio::time::timeout(Duration::from_secs(1), &mut pumps).await;
        }
        status
    };
    kill.0 = None;
    stdin_task.abort();
    output.exit(status).await;
}

struct KillOnDrop(Option<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

struct Session {
    pid: u32,
    stdin: FdStream,
    stdout: FdStream,
    stderr: Option<FdStream>,
    /// The pty master, for resizes.
    tty: Option<OwnedFd>,
}

fn start_pipes(reaper: &Reaper, command: &mut Command) -> std::io::Result<Session> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = reaper.spawn(command)?;
    let take = |fd: Option<OwnedFd>| fd.ok_or_else(|| std::io::Error::other("missing pipe"));
    Ok(Session {
        pid: child.pid,
        stdin: FdStream::new(take(child.stdin.take().map(OwnedFd::from))?)?,
        stdout: FdStream::new(take(child.stdout.take().map(OwnedFd::from))?)?,
        stderr: Some(FdStream::new(take(
            child.stderr.take().map(OwnedFd::from),
        )?)?),
        tty: None,
    })
}

fn start_tty(
    reaper: &Reaper,
    command: &mut Command,
    size: Option<TtySize>,
) -> std::io::Result<Session> {
    let pty = nix::pty::openpty(
        Some(&winsize(size.unwrap_or(TtySize { rows: 24, cols: 80 }))),
        None,
    )?;
    command
        .stdin(Stdio::from(pty.slave.try_clone()?))
        .stdout(Stdio::from(pty.slave.try_clone()?))
        .stderr(Stdio::from(pty.slave.try_clone()?))
        .env("TERM", "xterm");
    sys::controlling_tty(command);
    let child = reaper.spawn(command)?;
    drop(pty.slave);
    let master = pty.master;
    Ok(Session {
        pid: child.pid,
        stdin: FdStream::new(master.try_clone()?)?,
        stdout: FdStream::new(master.try_clone()?)?,
        stderr: None,
        tty: Some(master),
    })
}

fn winsize(size: TtySize) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

async fn feed_stdin(mut stdin: FdStream, mut input: ExecInputs, tty: Option<OwnedFd>) {
    while let Some(i) = input.recv().await {
        match i {
            ExecInput::Stdin(data) => {
                if stdin.write_all(&data).await.is_err() {
                    return;
                }
            }
            ExecInput::CloseStdin => {
                if tty.is_some() {
                    // A terminal has no half-close: send EOF (^D) instead.
                    let _ = stdin.write_all(&[4]).await;
                } else {
                    return;
                }
            }
            ExecInput::Resize(size) => {
                if let Some(master) = &tty {
                    if let Err(e) = sys::resize(master, winsize(size)) {
                        tracing::debug!(error = %e, "tty resize failed");
                    }
                }
            }
        }
    }
}

async fn pump<R, F, Fut>(mut from: R, mut send: F)
where
    R: AsyncRead + Unpin,
    F: FnMut(Bytes) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if !send(Bytes::copy_from_slice(&buf[..n])).await {
                    return;
                }
            }
        }
    }
}

mod sys {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Make the child a session leader with its stdin (the pty) as the
    /// controlling terminal, so shells get job control and ^C.
    pub fn controlling_tty(command: &mut Command) {
        // SAFETY: the closure runs between fork and exec and calls only
        // setsid(2) and ioctl(2), which are async-signal-safe; it allocates
        // nothing and touches no locks.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    pub fn resize(master: &OwnedFd, size: nix::pty::Winsize) -> std::io::Result<()> {
        // SAFETY: `master` is an open pty master and `size` a valid winsize
        // that outlives the call.
        let rc = unsafe {
            libc::ioctl(
                master.as_raw_fd(),
                libc::TIOCSWINSZ as _,
                &size as *const nix::pty::Winsize,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
