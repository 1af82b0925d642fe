//! Running a command inside a live sandbox (FC's InstanceExec): what the
//! agent asks for and what it gets back, whatever the backend.

use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::driver::SandboxError;

/// A command to run in an instance, with the instance's user, namespaces,
/// seccomp filter and cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// argv; never empty.
    pub command: Vec<String>,
    /// Give the command a terminal (an interactive shell); stdout and
    /// stderr are then one stream.
    pub tty: bool,
    /// Whether the command reads stdin (else it gets an empty one).
    pub stdin: bool,
}

impl ExecRequest {
    pub fn validate(&self) -> Result<(), SandboxError> {
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(SandboxError::Exec {
                what: "the command is empty".into(),
                source: None,
            });
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(SandboxError::Exec {
                what: "the command contains a NUL byte".into(),
                source: None,
            });
        }
        Ok(())
    }
}

pub type ExecReader = Box<dyn AsyncRead + Send + Unpin>;
pub type ExecWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// The running command.
pub struct ExecProcess {
    pub stdin: Option<ExecWriter>,
    /// stdout, or the terminal's output with a tty.
    pub stdout: ExecReader,
    /// None with a tty.
    pub stderr: Option<ExecReader>,
    pub child: Box<dyn ExecChild>,
}

/// The command's process as the backend sees it.
#[async_trait::async_trait]
pub trait ExecChild: Send {
    /// Its exit code (128 + signal when it was killed).
    async fn wait(&mut self) -> Result<i32, SandboxError>;
    /// Stop it (the session was abandoned).
    fn kill(&mut self);
}

/// A child process of the agent (`runc exec`).
pub struct ProcessChild(pub tokio::process::Child);

#[async_trait::async_trait]
impl ExecChild for ProcessChild {
    async fn wait(&mut self) -> Result<i32, SandboxError> {
        use std::os::unix::process::ExitStatusExt;
        let status = self
            .0
            .wait()
            .await
            .map_err(|e| SandboxError::exec("cannot wait for the command", e))?;
        Ok(status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(-1))
    }

    fn kill(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// A child whose session holds something to release when it ends.
pub struct WithCleanup {
    pub child: Box<dyn ExecChild>,
    pub _guard: Box<dyn Send>,
}

#[async_trait::async_trait]
impl ExecChild for WithCleanup {
    async fn wait(&mut self) -> Result<i32, SandboxError> {
        self.child.wait().await
    }

    fn kill(&mut self) {
        self.child.kill();
    }
}

/// Spawn `cmd` with the session's stdio: a new pseudo-terminal (the
/// command gets its slave side as stdin, stdout and stderr) or pipes.
pub fn spawn(
    mut cmd: tokio::process::Command,
    req: &ExecRequest,
) -> Result<ExecProcess, SandboxError> {
    let io = |what: &str, e: std::io::Error| SandboxError::exec(what, e);
    cmd.kill_on_drop(true);
    if req.tty {
        let pty = nix::pty::openpty(None, None)
            .map_err(|e| SandboxError::exec("cannot open a terminal", e))?;
        let slave = std::fs::File::from(pty.slave);
        cmd.stdin(Stdio::from(
            slave.try_clone().map_err(|e| io("terminal", e))?,
        ))
        .stdout(Stdio::from(
            slave.try_clone().map_err(|e| io("terminal", e))?,
        ))
        .stderr(Stdio::from(slave));
        let child = cmd.spawn().map_err(|e| io("cannot start the command", e))?;
        // Our copies of the slave side go with `cmd`, so reading the master
        // ends once the command's side is closed.
        drop(cmd);
        let master = std::fs::File::from(pty.master);
        let writer = tokio::fs::File::from_std(master.try_clone().map_err(|e| io("terminal", e))?);
        let reader = tokio::fs::File::from_std(master);
        return Ok(ExecProcess {
            stdin: Some(Box::new(writer)),
            stdout: Box::new(reader),
            stderr: None,
            child: Box::new(ProcessChild(child)),
        });
    }
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| io("cannot start the command", e))?;
    let stdin = child.stdin.take().map(|s| Box::new(s) as ExecWriter);
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    Ok(ExecProcess {
        stdin,
        stdout: Box::new(stdout),
        stderr: Some(Box::new(stderr)),
        child: Box::new(ProcessChild(child)),
    })
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn bad_commands_are_refused() {
        let req = |c: &[&str]| ExecRequest {
            command: c.iter().map(|s| s.to_string()).collect(),
            tty: false,
            stdin: false,
        };
        assert!(req(&[]).validate().is_err());
        assert!(req(&[""]).validate().is_err());
        assert!(req(&["a\0b"]).validate().is_err());
        assert!(req(&["ls", "/"]).validate().is_ok());
    }

    #[tokio::test]
    async fn pipes_carry_stdin_stdout_stderr_and_the_exit_code() {
        let req = ExecRequest {
            command: vec!["sh".into()],
            tty: false,
            stdin: true,
        };
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg("read x; echo out:$x; echo err >&2; exit 7");
        let mut p = spawn(cmd, &req).unwrap();
        let mut stdin = p.stdin.take().unwrap();
        stdin.write_all(b"hi\n").await.unwrap();
        drop(stdin);
        let mut out = String::new();
        p.stdout.read_to_string(&mut out).await.unwrap();
        let mut err = String::new();
        p.stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .await
            .unwrap();
        assert_eq!((out.as_str(), err.as_str()), ("out:hi\n", "err\n"));
        assert_eq!(p.child.wait().await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_tty_is_a_terminal() {
        let req = ExecRequest {
            command: vec!["sh".into()],
            tty: true,
            stdin: true,
        };
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c").arg("test -t 0 && test -t 1 && echo terminal");
        let mut p = spawn(cmd, &req).unwrap();
        assert!(p.stderr.is_none());
        let code = p.child.wait().await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        // The master reads EIO once the slave is closed: the end.
        while let Ok(n) = p.stdout.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(code, 0);
        assert!(String::from_utf8_lossy(&out).contains("terminal"));
    }
}
