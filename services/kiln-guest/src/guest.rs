//! The [`GuestHandler`]: configure (network, root, function), relay calls,
//! run exec sessions, forward the function's output as log lines.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_guest_proto::{
    CallRequest, Configured, ErrorBody, ErrorCode, ExecInputs, ExecRequest, ExecWriter,
    GuestConfig, GuestHandler, LogLine, LogSender, LogStream, ResponseWriter,
};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use crate::fdio::FdStream;
use crate::mounts::{self, MountOps};
use crate::net::{self, NetOps};
use crate::process::Reaper;
use crate::relay::Relay;

const DEFAULT_PATH: &str = "/usr/local/bin:/usr/local/sbin:/usr/bin:/usr/sbin:/bin:/sbin:/code";
/// Longest log line forwarded; longer lines are split.
const MAX_LOG_LINE: usize = 16 * 1024;

/// The side effects of configuring, real or fake.
pub struct Platform {
    pub mounts: Box<dyn MountOps>,
    pub net: Box<dyn NetOps + Send + Sync>,
    /// Whether to switch root and set the hostname (only as PID 1).
    pub pid1: bool,
}

enum State {
    Unconfigured,
    Configuring,
    Running { relay: Box<Relay> },
}

/// Where log lines go: the current host connection, and the console.
#[derive(Default)]
pub struct LogHub {
    current: Mutex<Option<LogSender>>,
    pub echo: bool,
}

impl LogHub {
    pub fn send(&self, stream: LogStream, line: String) {
        if self.echo {
            eprintln!("[function {stream:?}] {line}");
        }
        if let Some(sender) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            sender.send(LogLine { stream, line });
        }
    }
}

pub struct Guest {
    platform: Arc<Platform>,
    reaper: Reaper,
    /// The function's pid once started.
    function: Mutex<Option<u32>>,
    state: Mutex<State>,
    logs: Arc<LogHub>,
}

impl Guest {
    pub fn new(platform: Platform, reaper: Reaper, echo_logs: bool) -> Guest {
        Guest {
            platform: Arc::new(platform),
            reaper,
            function: Mutex::new(None),
            state: Mutex::new(State::Unconfigured),
            logs: Arc::new(LogHub {
                current: Mutex::new(None),
                echo: echo_logs,
            }),
        }
    }

    /// SIGKILL the function's process (a failed start, or the guest going away).
    pub fn kill_function(&self) {
        if let Some(pid) = *self.function.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    fn set_state(&self, state: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
    }

    async fn start(&self, config: GuestConfig) -> Result<Configured, ErrorBody> {
        let started = Instant::now();
        let platform = self.platform.clone();
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || prepare(&platform, &cfg))
            .await
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| ErrorBody::new(ErrorCode::StartFailed, e))?;

        let p = &config.process;
        let mut command = Command::new(&p.command[0]);
        command
            .args(&p.command[1..])
            .args(&p.args)
            .env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", "/tmp")
            .env("FC_CUSTOM_LISTEN_PORT", p.port.to_string())
            .env("FC_SERVER_PORT", p.port.to_string())
            .env("FC_INSTANCE_ID", &config.instance_id)
            .envs(&p.env)
            .current_dir(&p.working_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.reaper.spawn(&mut command).map_err(|e| {
            ErrorBody::new(
                ErrorCode::StartFailed,
                format!("Starting the function's command {:?}: {e}", p.command[0]),
            )
        })?;
        let pid = child.pid;
        *self.function.lock().unwrap_or_else(|e| e.into_inner()) = Some(pid);
        tracing::info!(pid, command = ?p.command, "function started");
        for (pipe, stream) in [
            (
                child.stdout.take().map(std::os::fd::OwnedFd::from),
                LogStream::Stdout,
            ),
            (
                child.stderr.take().map(std::os::fd::OwnedFd::from),
                LogStream::Stderr,
            ),
        ] {
            if let Some(fd) = pipe.and_then(|fd| FdStream::new(fd).ok()) {
                tokio::spawn(forward_lines(fd, stream, self.logs.clone()));
            }
        }
        let (reaper, logs) = (self.reaper.clone(), self.logs.clone());
        let exited = tokio::spawn(async move {
            let status = reaper.wait(pid).await;
            tracing::warn!(?status, "the function's process exited");
            logs.send(
                LogStream::Guest,
                format!("function process exited: {status:?}"),
            );
            status
        });

        // Ready when the port accepts connections.
        let deadline = started + Duration::from_millis(p.start_timeout_ms);
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], p.port));
        loop {
            if exited.is_finished() {
                let status = exited.await.ok();
                return Err(ErrorBody::new(
                    ErrorCode::StartFailed,
                    format!(
                        "The function exited before opening port {}: {status:?}",
                        p.port
                    ),
                ));
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                self.kill_function();
                return Err(ErrorBody::new(
                    ErrorCode::Timeout,
                    format!(
                        "The function did not open port {} within {} ms",
                        p.port, p.start_timeout_ms
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.set_state(State::Running {
            relay: Box::new(Relay::new(p.port)),
        });
        Ok(Configured {
            start_ms: started.elapsed().as_millis() as u64,
        })
    }
}

impl Drop for Guest {
    /// Only outside a VM (tests) is a Guest ever dropped: take the function
    /// with it rather than leave it running on the host.
    fn drop(&mut self) {
        self.kill_function();
    }
}

/// Network, hostname and the root filesystem (blocking).
fn prepare(platform: &Platform, config: &GuestConfig) -> Result<(), String> {
    net::loopback(platform.net.as_ref()).map_err(|e| kiln_core::error_chain(&e))?;
    if let Some(n) = &config.network {
        net::configure(platform.net.as_ref(), n, Duration::from_secs(5))
            .map_err(|e| kiln_core::error_chain(&e))?;
    }
    let hostname = config
        .hostname
        .clone()
        .unwrap_or_else(|| config.instance_id.clone());
    if platform.pid1 {
        nix::unistd::sethostname(&hostname).map_err(|e| format!("Setting the hostname: {e}"))?;
    }
    let dns = config
        .network
        .as_ref()
        .map(|n| n.dns.clone())
        .unwrap_or_default();
    let mut plan = mounts::root_plan(&config.disks, &hostname, &dns);
    if !platform.pid1 {
        plan.retain(|op| !matches!(op, mounts::MountOp::SwitchRoot(_)));
    }
    mounts::apply_all(platform.mounts.as_ref(), &plan).map_err(|e| kiln_core::error_chain(&e))
}

async fn forward_lines<R: AsyncRead + Unpin>(from: R, stream: LogStream, logs: Arc<LogHub>) {
    let mut reader = BufReader::new(from);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Bounded read: a line without newline is cut at MAX_LOG_LINE.
        let mut limited = (&mut reader).take(MAX_LOG_LINE as u64);
        match limited.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                logs.send(stream, text.trim_end_matches(['\n', '\r']).to_owned());
            }
        }
    }
}

impl GuestHandler for Guest {
    fn is_configured(&self) -> bool {
        matches!(
            *self.state.lock().unwrap_or_else(|e| e.into_inner()),
            State::Running { .. }
        )
    }

    fn connected(&self, logs: LogSender) {
        *self.logs.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(logs);
    }

    async fn configure(&self, config: GuestConfig) -> Result<Configured, ErrorBody> {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !matches!(*state, State::Unconfigured) {
                return Err(ErrorBody::new(
                    ErrorCode::AlreadyConfigured,
                    "The guest is already configured",
                ));
            }
            *state = State::Configuring;
        }
        let span = tracing::info_span!("configure", instance_id = %config.instance_id);
        match tracing::Instrument::instrument(self.start(config), span).await {
            Ok(c) => {
                tracing::info!(start_ms = c.start_ms, "function ready");
                Ok(c)
            }
            Err(e) => {
                tracing::error!(error = %e.message, "configure failed");
                // A half-configured guest cannot be configured again.
                Err(e)
            }
        }
    }

    async fn call(&self, request: CallRequest, response: ResponseWriter) {
        let relay = match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Running { relay } => Some(relay.as_ref().clone()),
            _ => None,
        };
        match relay {
            Some(relay) => relay.call(request, response).await,
            None => {
                response
                    .error(ErrorBody::new(
                        ErrorCode::NotConfigured,
                        "The function is not started yet",
                    ))
                    .await;
            }
        }
    }

    async fn exec(&self, request: ExecRequest, input: ExecInputs, output: ExecWriter) {
        crate::exec::run(&self.reaper, request, input, output).await
    }
}
