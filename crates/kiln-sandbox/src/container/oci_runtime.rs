//! The OCI runtime CLI (runc or crun) behind a trait, with a recording fake.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;

/// How long one runtime command may take before the driver gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an OCI runtime command failed.
#[derive(Debug, thiserror::Error)]
pub enum OciRuntimeError {
    #[error("Cannot execute {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} {id} failed: {message}")]
    Failed {
        command: &'static str,
        id: String,
        message: String,
    },
    #[error("{command} {id} did not finish within {}s", COMMAND_TIMEOUT.as_secs())]
    TimedOut { command: &'static str, id: String },
    #[error("Cannot understand the output of {command}: {detail}")]
    Output {
        command: &'static str,
        detail: String,
    },
}

/// The lifecycle states the OCI runtime spec defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
    #[serde(other)]
    Unknown,
}

/// One container as `state`/`list` report it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    pub id: String,
    #[serde(default)]
    pub pid: u32,
    pub status: ContainerStatus,
}

/// The subset of the runc CLI the driver uses. Every method that takes an
/// id of a container that does not exist succeeds (kill, delete) or says so
/// (`state` returns `None`), so cleanup is idempotent.
#[async_trait::async_trait]
pub trait OciRuntime: Send + Sync + 'static {
    /// `run --detach`: create and start the bundle's process with stdout and
    /// stderr appended to `console_log`; returns its host pid.
    async fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        console_log: &Path,
    ) -> Result<u32, OciRuntimeError>;
    async fn state(&self, id: &str) -> Result<Option<ContainerState>, OciRuntimeError>;
    /// When the container's init process `pid` started, while it lives
    /// (not a zombie): clock ticks after boot, `/proc/<pid>/stat` field 22.
    /// The same pid with the same start time is the same process, which is
    /// how runc itself tells whether a container still runs; with it the
    /// driver answers "is it running" without starting a runtime process
    /// (`state` is a runc process of its own, ~3 ms of CPU here). `None` when
    /// the runtime cannot tell: then `state` is asked.
    fn init_started(&self, pid: u32) -> Option<u64> {
        let _ = pid;
        None
    }
    async fn kill(&self, id: &str, signal: &str) -> Result<(), OciRuntimeError>;
    /// `delete --force`: kills what still runs and removes the container's
    /// state and cgroup.
    async fn delete_force(&self, id: &str) -> Result<(), OciRuntimeError>;
    async fn list(&self) -> Result<Vec<ContainerState>, OciRuntimeError>;

    /// `exec`: run a command in the container's namespaces, cgroup and
    /// seccomp filter, as its process user, with the session's stdio.
    async fn exec(
        &self,
        id: &str,
        req: &crate::exec::ExecRequest,
    ) -> Result<crate::exec::ExecProcess, OciRuntimeError> {
        let _ = req;
        Err(OciRuntimeError::Failed {
            command: "exec",
            id: id.to_owned(),
            message: "this runtime cannot exec".into(),
        })
    }
}

/// runc (or crun, which takes the same flags) invoked as a child process,
/// with its own `--root` so the driver's containers never mix with others'.
#[derive(Debug, Clone)]
pub struct RuncCli {
    binary: PathBuf,
    root: PathBuf,
}

/// The start time of a live process from its `/proc/<pid>/stat` line;
/// `None` for a zombie or a line that does not parse. The command name (in
/// parentheses) may itself hold spaces and parentheses: fields are counted
/// after its last `)`.
fn process_start(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 is the state; field 22, 19 further on, the start time.
    let state = fields.next()?;
    if matches!(state, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn is_missing(message: &str) -> bool {
    message.contains("does not exist")
        || message.contains("No such file or directory")
        || message.contains("not found")
}

impl RuncCli {
    pub fn new(binary: PathBuf, root: PathBuf) -> Self {
        Self { binary, root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    fn binary_name(&self) -> String {
        self.binary.display().to_string()
    }

    /// Run a command that prints to pipes; returns stdout or the message.
    async fn output(
        &self,
        command: &'static str,
        id: &str,
        args: &[&str],
    ) -> Result<Result<Vec<u8>, String>, OciRuntimeError> {
        let mut cmd = self.command();
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = cmd.spawn().map_err(|source| OciRuntimeError::Spawn {
            binary: self.binary_name(),
            source,
        })?;
        let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .map_err(|_| OciRuntimeError::TimedOut {
                command,
                id: id.to_owned(),
            })?
            .map_err(|source| OciRuntimeError::Spawn {
                binary: self.binary_name(),
                source,
            })?;
        if out.status.success() {
            Ok(Ok(out.stdout))
        } else {
            let message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            Ok(Err(message))
        }
    }
}

/// The last error runc wrote to its JSON log, else the file's tail.
fn runtime_log_message(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let last_error = text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        (v.get("level")?.as_str()? == "error").then(|| v.get("msg")?.as_str().map(str::to_owned))?
    });
    last_error.unwrap_or_else(|| {
        let tail: String = text.chars().rev().take(500).collect();
        tail.chars().rev().collect::<String>().trim().to_owned()
    })
}

#[async_trait::async_trait]
impl OciRuntime for RuncCli {
    fn init_started(&self, pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        process_start(&stat)
    }

    async fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        console_log: &Path,
    ) -> Result<u32, OciRuntimeError> {
        let log = bundle.join("runtime.log");
        let pid_file = bundle.join("pid");
        let open = |path: &Path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| OciRuntimeError::Spawn {
                    binary: format!("{} (opening {})", self.binary_name(), path.display()),
                    source,
                })
        };
        let console = open(console_log)?;
        let console_err = console
            .try_clone()
            .map_err(|source| OciRuntimeError::Spawn {
                binary: self.binary_name(),
                source,
            })?;
        let mut cmd = self.command();
        cmd.arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--detach")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg(id)
            // With --detach and no terminal the container inherits these.
            .stdout(Stdio::from(console))
            .stderr(Stdio::from(console_err));
        let mut child = cmd.spawn().map_err(|source| OciRuntimeError::Spawn {
            binary: self.binary_name(),
            source,
        })?;
        let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait())
            .await
            .map_err(|_| OciRuntimeError::TimedOut {
                command: "run",
                id: id.to_owned(),
            })?
            .map_err(|source| OciRuntimeError::Spawn {
                binary: self.binary_name(),
                source,
            })?;
        if !status.success() {
            return Err(OciRuntimeError::Failed {
                command: "run",
                id: id.to_owned(),
                message: runtime_log_message(&log),
            });
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .ok_or_else(|| OciRuntimeError::Output {
                command: "run",
                detail: format!("no pid in {}", pid_file.display()),
            })?;
        Ok(pid)
    }

    async fn state(&self, id: &str) -> Result<Option<ContainerState>, OciRuntimeError> {
        match self.output("state", id, &["state", id]).await? {
            Ok(stdout) => {
                serde_json::from_slice(&stdout)
                    .map(Some)
                    .map_err(|e| OciRuntimeError::Output {
                        command: "state",
                        detail: e.to_string(),
                    })
            }
            Err(message) if is_missing(&message) => Ok(None),
            Err(message) => Err(OciRuntimeError::Failed {
                command: "state",
                id: id.to_owned(),
                message,
            }),
        }
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), OciRuntimeError> {
        match self.output("kill", id, &["kill", id, signal]).await? {
            Ok(_) => Ok(()),
            // A stopped container cannot be signalled; that is what we want.
            Err(m)
                if is_missing(&m)
                    || m.contains("not running")
                    || m.contains("process already finished") =>
            {
                Ok(())
            }
            Err(message) => Err(OciRuntimeError::Failed {
                command: "kill",
                id: id.to_owned(),
                message,
            }),
        }
    }

    async fn delete_force(&self, id: &str) -> Result<(), OciRuntimeError> {
        match self
            .output("delete", id, &["delete", "--force", id])
            .await?
        {
            Ok(_) => Ok(()),
            Err(m) if is_missing(&m) => Ok(()),
            Err(message) => Err(OciRuntimeError::Failed {
                command: "delete",
                id: id.to_owned(),
                message,
            }),
        }
    }

    async fn exec(
        &self,
        id: &str,
        req: &crate::exec::ExecRequest,
    ) -> Result<crate::exec::ExecProcess, OciRuntimeError> {
        let failed = |message: String| OciRuntimeError::Failed {
            command: "exec",
            id: id.to_owned(),
            message,
        };
        // runc 1.1 joins the container's user namespace before its network
        // namespace, which belongs to the host's user namespace, and fails
        // there (EPERM). So runc runs already inside the network namespace,
        // from a private copy of the container's state that leaves the
        // network namespace out; everything else (user, mount, PID, IPC,
        // UTS, cgroup namespaces, the cgroup, seccomp, capabilities, the
        // process user from config.json) is runc's own exec.
        let state_path = self.root.join(id).join("state.json");
        let raw = std::fs::read(&state_path)
            .map_err(|e| failed(format!("cannot read {}: {e}", state_path.display())))?;
        let (pid, state) = exec_state(&raw).map_err(failed)?;
        let exec_root = ExecRoot::create(&self.root, id, &state).map_err(failed)?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{pid}/ns/net"))
            .arg("--")
            .arg(&self.binary)
            .arg("--root")
            .arg(exec_root.path())
            .arg("exec")
            // Everything after the id is the command, flags included.
            .arg(id);
        cmd.args(&req.command);
        let mut process = crate::exec::spawn(cmd, req).map_err(|e| failed(e.to_string()))?;
        process.child = Box::new(crate::exec::WithCleanup {
            child: process.child,
            _guard: Box::new(exec_root),
        });
        Ok(process)
    }

    async fn list(&self) -> Result<Vec<ContainerState>, OciRuntimeError> {
        if !self.root.exists() {
            return Ok(Vec::new());
        }
        match self
            .output("list", "", &["list", "--format", "json"])
            .await?
        {
            Ok(stdout) => {
                let text = String::from_utf8_lossy(&stdout);
                // runc prints `null` when there are no containers.
                let parsed: Option<Vec<ContainerState>> = serde_json::from_str(text.trim())
                    .map_err(|e| OciRuntimeError::Output {
                        command: "list",
                        detail: e.to_string(),
                    })?;
                Ok(parsed.unwrap_or_default())
            }
            Err(message) => Err(OciRuntimeError::Failed {
                command: "list",
                id: String::new(),
                message,
            }),
        }
    }
}

/// One call the fake received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OciCall {
    Run { id: String, bundle: PathBuf },
    State(String),
    Kill { id: String, signal: String },
    Delete(String),
    List,
}

/// A fake runtime for unit tests: records every call and keeps container
/// states in memory; `fail_next_run` makes the next `run` fail.
#[derive(Debug, Default)]
pub struct RecordingOciRuntime {
    calls: Mutex<Vec<OciCall>>,
    containers: Mutex<BTreeMap<String, ContainerState>>,
    /// `config.json` of every bundle run, by container id.
    configs: Mutex<BTreeMap<String, serde_json::Value>>,
    fail_next_run: Mutex<Option<String>>,
    /// Start time of each container's init process, by container id.
    init_starts: Mutex<BTreeMap<String, u64>>,
}

impl RecordingOciRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn calls(&self) -> Vec<OciCall> {
        self.calls.lock().expect("lock").clone()
    }

    pub fn config_of(&self, id: &str) -> Option<serde_json::Value> {
        self.configs.lock().expect("lock").get(id).cloned()
    }

    pub fn fail_next_run(&self, message: &str) {
        *self.fail_next_run.lock().expect("lock") = Some(message.to_owned());
    }

    /// Simulate the container's process exiting.
    pub fn stop(&self, id: &str) {
        if let Some(c) = self.containers.lock().expect("lock").get_mut(id) {
            c.status = ContainerStatus::Stopped;
        }
    }

    /// The init process died and another process took its pid: runc
    /// still reports the container as it was, the start time differs.
    pub fn replace_init_process(&self, id: &str) {
        if let Some(start) = self.init_starts.lock().expect("lock").get_mut(id) {
            *start += 1;
        }
    }

    /// The container's cgroup was frozen (runc reports it paused).
    pub fn pause(&self, id: &str) {
        if let Some(c) = self.containers.lock().expect("lock").get_mut(id) {
            c.status = ContainerStatus::Paused;
        }
    }

    /// Pretend a container was left behind by an earlier run.
    pub fn insert_leftover(&self, id: &str) {
        self.containers.lock().expect("lock").insert(
            id.to_owned(),
            ContainerState {
                id: id.to_owned(),
                pid: 1,
                status: ContainerStatus::Running,
            },
        );
    }

    fn record(&self, call: OciCall) {
        self.calls.lock().expect("lock").push(call);
    }
}

#[async_trait::async_trait]
impl OciRuntime for RecordingOciRuntime {
    async fn run_detached(
        &self,
        id: &str,
        bundle: &Path,
        _console_log: &Path,
    ) -> Result<u32, OciRuntimeError> {
        self.record(OciCall::Run {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
        });
        if let Some(message) = self.fail_next_run.lock().expect("lock").take() {
            return Err(OciRuntimeError::Failed {
                command: "run",
                id: id.to_owned(),
                message,
            });
        }
        let config = std::fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| OciRuntimeError::Output {
                command: "run",
                detail: "bundle has no readable config.json".into(),
            })?;
        self.configs
            .lock()
            .expect("lock")
            .insert(id.to_owned(), config);
        let mut containers = self.containers.lock().expect("lock");
        if containers.contains_key(id) {
            return Err(OciRuntimeError::Failed {
                command: "run",
                id: id.to_owned(),
                message: "container with given ID already exists".into(),
            });
        }
        let pid = 1000 + containers.len() as u32;
        self.init_starts
            .lock()
            .expect("lock")
            .insert(id.to_owned(), 1);
        containers.insert(
            id.to_owned(),
            ContainerState {
                id: id.to_owned(),
                pid,
                status: ContainerStatus::Running,
            },
        );
        Ok(pid)
    }

    fn init_started(&self, pid: u32) -> Option<u64> {
        let containers = self.containers.lock().expect("lock");
        let (id, _) = containers.iter().find(|(_, c)| {
            c.pid == pid && matches!(c.status, ContainerStatus::Running | ContainerStatus::Paused)
        })?;
        self.init_starts.lock().expect("lock").get(id).copied()
    }

    async fn state(&self, id: &str) -> Result<Option<ContainerState>, OciRuntimeError> {
        self.record(OciCall::State(id.to_owned()));
        Ok(self.containers.lock().expect("lock").get(id).cloned())
    }

    async fn kill(&self, id: &str, signal: &str) -> Result<(), OciRuntimeError> {
        self.record(OciCall::Kill {
            id: id.to_owned(),
            signal: signal.to_owned(),
        });
        self.stop(id);
        Ok(())
    }

    async fn delete_force(&self, id: &str) -> Result<(), OciRuntimeError> {
        self.record(OciCall::Delete(id.to_owned()));
        self.containers.lock().expect("lock").remove(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ContainerState>, OciRuntimeError> {
        self.record(OciCall::List);
        Ok(self
            .containers
            .lock()
            .expect("lock")
            .values()
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_log_message_prefers_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("runtime.log");
        std::fs::write(
            &log,
            concat!(
                "{\"level\":\"warning\",\"msg\":\"w\"}\n",
                "{\"level\":\"error\",\"msg\":\"first\"}\n",
                "{\"level\":\"error\",\"msg\":\"container_linux.go: starting container process caused: exec: \\\"/nope\\\": no such file\"}\n"
            ),
        )
        .unwrap();
        assert!(runtime_log_message(&log).contains("/nope"));
        std::fs::write(&log, "plain failure\n").unwrap();
        assert_eq!(runtime_log_message(&log), "plain failure");
    }

    #[test]
    fn a_process_start_time_is_read_past_any_command_name() {
        let line = |comm: &str, state: &str| {
            format!(
                "4242 ({comm}) {state} 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                 987654 1234567 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0"
            )
        };
        assert_eq!(process_start(&line("server", "S")), Some(987_654));
        assert_eq!(process_start(&line("a) b (c", "R")), Some(987_654));
        assert_eq!(
            process_start(&line("server", "Z")),
            None,
            "a zombie has ended"
        );
        assert_eq!(process_start("4242 (server) S 1"), None);
        assert_eq!(process_start("garbage"), None);
    }

    #[test]
    fn runc_reads_start_times_from_proc() {
        let runc = RuncCli::new("runc".into(), "/nonexistent".into());
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert_eq!(
            runc.init_started(std::process::id()),
            process_start(&own),
            "this process is alive"
        );
        assert!(runc.init_started(std::process::id()).is_some());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(runc.init_started(pid), None, "an exited, reaped process");
    }

    #[test]
    fn states_parse_from_runc_json() {
        let s: ContainerState = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","id":"k-1","pid":42,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"x","owner":""}"#,
        )
        .unwrap();
        assert_eq!(s.status, ContainerStatus::Running);
        assert_eq!(s.pid, 42);
        let s: ContainerState =
            serde_json::from_str(r#"{"id":"k-1","pid":0,"status":"weird"}"#).unwrap();
        assert_eq!(s.status, ContainerStatus::Unknown);
    }

    #[tokio::test]
    async fn missing_binary_is_a_clear_error() {
        let cli = RuncCli::new("/nonexistent/runc".into(), "/nonexistent/root".into());
        let err = cli.state("x").await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/runc"), "{err}");
    }
}

/// The container's init pid and its runc state without the network
/// namespace (see `RuncCli::exec`).
fn exec_state(raw: &[u8]) -> Result<(u32, serde_json::Value), String> {
    let mut state: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("unreadable runc state: {e}"))?;
    let pid = state
        .get("init_process_pid")
        .and_then(serde_json::Value::as_u64)
        .filter(|p| *p > 0)
        .ok_or("the runc state has no init pid")? as u32;
    let namespaces = state
        .pointer_mut("/config/namespaces")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or("the runc state has no namespaces")?;
    namespaces.retain(|n| n.get("type").and_then(serde_json::Value::as_str) != Some("NEWNET"));
    if let Some(paths) = state
        .get_mut("namespace_paths")
        .and_then(serde_json::Value::as_object_mut)
    {
        paths.remove("NEWNET");
    }
    Ok((pid, state))
}

/// A private runc root holding one container's state for one exec;
/// removed when the session ends.
struct ExecRoot {
    dir: PathBuf,
}

impl ExecRoot {
    fn create(root: &Path, id: &str, state: &serde_json::Value) -> Result<Self, String> {
        let n: u64 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let name = format!(
            "{}-exec-{}-{n:x}",
            root.file_name().and_then(|f| f.to_str()).unwrap_or("runc"),
            std::process::id()
        );
        let dir = root.with_file_name(name);
        let container = dir.join(id);
        std::fs::create_dir_all(&container)
            .map_err(|e| format!("cannot create {}: {e}", container.display()))?;
        let this = Self { dir };
        std::fs::write(
            container.join("state.json"),
            serde_json::to_vec(state).expect("state serialises"),
        )
        .map_err(|e| format!("cannot write the exec state: {e}"))?;
        Ok(this)
    }

    fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for ExecRoot {
    fn drop(&mut self) {
        // Plain files only: never anything mounted.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod exec_state_tests {
    use super::*;

    #[test]
    fn the_exec_state_leaves_the_network_namespace_out() {
        let raw = br#"{"id":"k-1","init_process_pid":42,
            "config":{"namespaces":[{"type":"NEWUSER"},{"type":"NEWNET","path":"/run/netns/x"},{"type":"NEWPID"}]},
            "namespace_paths":{"NEWNET":"/proc/42/ns/net","NEWPID":"/proc/42/ns/pid"}}"#;
        let (pid, state) = exec_state(raw).unwrap();
        assert_eq!(pid, 42);
        let types: Vec<&str> = state["config"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["NEWUSER", "NEWPID"]);
        assert!(state["namespace_paths"].get("NEWNET").is_none());
        assert!(exec_state(b"{}").is_err());
        assert!(exec_state(br#"{"init_process_pid":0,"config":{"namespaces":[]}}"#).is_err());
    }
}
