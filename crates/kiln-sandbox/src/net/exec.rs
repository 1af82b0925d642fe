//! Running the host tools the network isolation drives (`ip`, `nft`, `tc`,
//! `ovs-vsctl`, `sysctl`), behind a trait with a real implementation and a
//! recording fake.

use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a host tool could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum HostCommandError {
    #[error("Cannot execute {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` did not finish in time")]
    TimedOut { command: String },
    #[error("`{command}` failed: {message}")]
    Failed { command: String, message: String },
}

impl HostCommandError {
    /// Whether the failure says that the thing acted on does not exist.
    pub fn is_absent(&self) -> bool {
        match self {
            Self::Failed { message, .. } => {
                message.contains("Cannot find device")
                    || message.contains("No such file or directory")
                    || message.contains("does not exist")
                    || message.contains("no bridge named")
                    || message.contains("no port named")
                    || message.contains("Cannot delete qdisc with handle of zero")
                    || message.contains("Invalid handle")
                    || message.contains("Cannot assign requested address")
            }
            _ => false,
        }
    }
}

/// Runs one host tool; `stdin` is fed to it when given.
#[async_trait::async_trait]
pub trait HostCommands: Send + Sync + 'static {
    async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, HostCommandError>;
}

/// The real thing: the tools on PATH, in the calling thread's namespaces.
#[derive(Debug, Default, Clone)]
pub struct SystemCommands;

#[async_trait::async_trait]
impl HostCommands for SystemCommands {
    async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, HostCommandError> {
        run_program(Path::new(program), args, stdin, COMMAND_TIMEOUT).await
    }
}

/// Run `program args...` with `stdin` fed to it (else nothing), killed
/// when `timeout` passes or the caller gives up; stdout, or stderr (trimmed)
/// as the failure's message. What [`SystemCommands`] and the container
/// backend's `IpCommand` both run their tools with.
pub(crate) async fn run_program<S: AsRef<str>>(
    program: &Path,
    args: &[S],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, HostCommandError> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let name = program.display().to_string();
    let command = format!("{name} {}", args.join(" "));
    let spawn_err = |source| HostCommandError::Spawn {
        program: name.clone(),
        source,
    };
    let mut child = Command::new(program)
        .args(&args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Dropped at the end of this block: the tool sees the end of its input.
        pipe.write_all(input.as_bytes()).await.map_err(spawn_err)?;
    }
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| HostCommandError::TimedOut {
            command: command.clone(),
        })?
        .map_err(spawn_err)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HostCommandError::Failed {
            command,
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// One command the fake received: the program, its arguments and stdin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedCommand {
    pub program: String,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

impl RecordedCommand {
    /// `program arg arg ...` (without stdin), for assertions.
    pub fn line(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }

    /// The commands this run stands for: a `-batch -` run (ip, tc) as one
    /// line per command it fed, anything else as its own line.
    pub fn commands(&self) -> Vec<String> {
        match (self.args.as_slice(), self.stdin.as_deref()) {
            ([flag, dash], Some(script)) if flag == "-batch" && dash == "-" => script
                .lines()
                .map(|l| format!("{} {l}", self.program))
                .collect(),
            _ => vec![self.line()],
        }
    }
}

/// Fake for unit tests: records every command and succeeds, unless told
/// to fail commands containing a given text.
#[derive(Debug, Default)]
pub struct RecordingCommands {
    calls: Mutex<Vec<RecordedCommand>>,
    fail_matching: Mutex<Option<String>>,
}

impl RecordingCommands {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<RecordedCommand> {
        self.calls.lock().expect("lock").clone()
    }

    pub fn clear(&self) {
        self.calls.lock().expect("lock").clear();
    }

    /// Fail every later command whose line or stdin contains `text`.
    pub fn fail_matching(&self, text: Option<&str>) {
        *self.fail_matching.lock().expect("lock") = text.map(str::to_owned);
    }
}

#[async_trait::async_trait]
impl HostCommands for RecordingCommands {
    async fn run(
        &self,
        program: &str,
        args: &[String],
        stdin: Option<&str>,
    ) -> Result<String, HostCommandError> {
        let rec = RecordedCommand {
            program: program.to_owned(),
            args: args.to_vec(),
            stdin: stdin.map(str::to_owned),
        };
        let line = rec.line();
        self.calls.lock().expect("lock").push(rec);
        if let Some(text) = self.fail_matching.lock().expect("lock").as_deref() {
            if line.contains(text) || stdin.is_some_and(|s| s.contains(text)) {
                return Err(HostCommandError::Failed {
                    command: line,
                    message: "injected failure".into(),
                });
            }
        }
        Ok(String::new())
    }
}
