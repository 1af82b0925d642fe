//! A fake cloud-hypervisor for tests (`fake-cloud-hypervisor` binary).
//!
//! It takes the flags the driver passes (`--api-socket`, `--seccomp`,
//! `--landlock`, `--landlock-rules`, `--log-file`, `-v`; `--version` alone
//! prints `cloud-hypervisor v54.0-fake`), prints its command line to
//! stdout, serves the documented API on the unix socket,
//! checks every request body against the OpenAPI component schemas (and
//! refuses bodies on calls that take none), follows cloud-hypervisor's VM
//! state machine (`Created`, `Running`, `Paused`, `Shutdown`), checks that
//! the files a config names exist, writes and reads snapshot directories,
//! and plays the guest on the hybrid-vsock socket: `CONNECT <port>\n` is
//! answered `OK <n>\n` and the stream is handed to the guest side of the
//! protocol, whose I/O stops while the VM is paused.
//!
//! Environment:
//! - `KILN_FAKE_VMM_RECORD=<file>`: append `<vm> <op> <status>` per call,
//!   `<vm>` being the name of the API socket's directory (every call is
//!   also printed to stdout as `call <op> <status>`).
//! - `KILN_FAKE_VMM_FAIL=<rule>[,<rule>]`: `exit-on=<op>` (the process
//!   exits when the call arrives), `hang-on=<op>` (the call never answers),
//!   `never-ready` (the guest accepts connections and never speaks).
//! - `KILN_FAKE_VMM_VERSION=<text>`: what `--version` prints after
//!   `cloud-hypervisor `.
//! - `KILN_FAKE_VMM_PROBE=<path>[,<path>]`: at start, try to open each path
//!   for reading and print `probe <path>: <outcome>` to stdout, as an
//!   attacker in the VMM's place would (the jail tests read it).

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use kiln_guest_proto::{
    CallRequest, Configured, ErrorBody, ErrorCode, ExecInput, ExecRequest, ExecWriter, ExitStatus,
    GuestConfig, GuestHandler, LogLine, LogSender, LogStream, ResponseHead, ResponseWriter,
};

use super::api::VmState;
use super::schema::Schemas;

/// The guest the fake plays: kiln-guest-proto's server over a toy
/// function. Configure checks the config and that every disk it names is
/// attached; `/invoke` answers the instance id and echoes the body.
#[derive(Debug, Default)]
pub struct ToyGuest {
    configured: Mutex<Option<GuestConfig>>,
    /// Disks attached to the VM (vda, vdb, ...).
    disks: Mutex<usize>,
    /// The function's output goes to the host connected last.
    logs: Mutex<Option<LogSender>>,
}

impl ToyGuest {
    fn log(&self, line: String) {
        if let Some(logs) = self.logs.lock().expect("lock").as_ref() {
            logs.send(LogLine {
                stream: LogStream::Stdout,
                line,
            });
        }
    }
}

impl GuestHandler for ToyGuest {
    fn is_configured(&self) -> bool {
        self.configured.lock().expect("lock").is_some()
    }

    fn connected(&self, logs: LogSender) {
        *self.logs.lock().expect("lock") = Some(logs);
    }

    async fn configure(&self, config: GuestConfig) -> Result<Configured, ErrorBody> {
        config
            .validate()
            .map_err(|e| ErrorBody::new(ErrorCode::InvalidConfig, e.to_string()))?;
        let attached = *self.disks.lock().expect("lock");
        let d = &config.disks;
        let named = d.runtime.iter().chain(&d.code).chain(&d.scratch);
        for disk in named.chain(&d.layers) {
            let letter = disk
                .device
                .strip_prefix("/dev/vd")
                .and_then(|l| l.bytes().next());
            let index = letter.map(|l| usize::from(l.wrapping_sub(b'a')));
            if index.is_none_or(|i| i >= attached) {
                return Err(ErrorBody::new(
                    ErrorCode::StartFailed,
                    format!("{} does not exist ({attached} disks attached)", disk.device),
                ));
            }
        }
        let mut slot = self.configured.lock().expect("lock");
        if slot.is_some() {
            return Err(ErrorBody::new(
                ErrorCode::AlreadyConfigured,
                "configured twice",
            ));
        }
        let command = config.process.command.join(" ");
        *slot = Some(config);
        drop(slot);
        self.log(format!("toy function {command} listening"));
        Ok(Configured { start_ms: 1 })
    }

    async fn call(&self, mut request: CallRequest, mut response: ResponseWriter) {
        let mut body = Vec::new();
        while let Some(chunk) = request.body.recv().await {
            body.extend_from_slice(&chunk);
        }
        let instance = self
            .configured
            .lock()
            .expect("lock")
            .as_ref()
            .map(|c| c.instance_id.clone());
        let Some(instance) = instance else {
            let _ = response
                .error(ErrorBody::new(ErrorCode::NotConfigured, "not configured"))
                .await;
            return;
        };
        let header = |name: &str| {
            request
                .head
                .headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        self.log(format!(
            "toy function {} called, request {}",
            request.kind.path(),
            header("x-fc-request-id").unwrap_or_default()
        ));
        let answer = json!({
            "instance": instance,
            "path": request.kind.path(),
            "requestId": header("x-fc-request-id"),
            "echo": String::from_utf8_lossy(&body),
        });
        let head = ResponseHead {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
        };
        if response.head(head).await {
            let bytes = Bytes::from(serde_json::to_vec(&answer).expect("json"));
            if response.body(bytes).await {
                let _ = response.end().await;
            }
        }
    }

    /// `echo ARGS...` prints its arguments; `cat` copies stdin to stdout
    /// and says "bye" on stderr; `exit N` exits with N; `guest-config`
    /// prints the configuration the guest was given (JSON); anything else
    /// fails to start (the fake guest has no shell).
    async fn exec(
        &self,
        request: ExecRequest,
        mut input: kiln_guest_proto::ExecInputs,
        output: ExecWriter,
    ) {
        let argv = request.command;
        match argv.first().map(String::as_str) {
            Some("echo") => {
                let _ = output
                    .stdout(Bytes::from(format!("{}\n", argv[1..].join(" "))))
                    .await;
                let _ = output
                    .exit(ExitStatus {
                        code: Some(0),
                        signal: None,
                    })
                    .await;
            }
            Some("cat") => {
                while let Some(item) = input.recv().await {
                    match item {
                        ExecInput::Stdin(data) => {
                            let _ = output.stdout(data).await;
                        }
                        ExecInput::CloseStdin => break,
                        ExecInput::Resize(_) => {}
                    }
                }
                let _ = output.stderr(Bytes::from_static(b"bye\n")).await;
                let _ = output
                    .exit(ExitStatus {
                        code: Some(0),
                        signal: None,
                    })
                    .await;
            }
            Some("guest-config") => {
                let config =
                    serde_json::to_string(&*self.configured.lock().expect("lock")).expect("json");
                let _ = output.stdout(Bytes::from(format!("{config}\n"))).await;
                let _ = output
                    .exit(ExitStatus {
                        code: Some(0),
                        signal: None,
                    })
                    .await;
            }
            Some("exit") => {
                let code = argv.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
                let _ = output
                    .exit(ExitStatus {
                        code: Some(code),
                        signal: None,
                    })
                    .await;
            }
            _ => {
                let _ = output
                    .error(ErrorBody::new(
                        ErrorCode::ExecFailed,
                        format!("{argv:?}: no such command"),
                    ))
                    .await;
            }
        }
    }
}

/// What the command line said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeVmmArgs {
    pub api_socket: PathBuf,
    pub seccomp: String,
    pub landlock: bool,
    pub landlock_rules: Vec<String>,
    pub log_file: Option<PathBuf>,
}

/// Parse cloud-hypervisor's flags the driver uses; anything else is an error.
pub fn parse_args(args: &[String]) -> Result<FakeVmmArgs, String> {
    let mut api_socket = None;
    let mut seccomp = "true".to_owned();
    let mut log_file = None;
    let mut landlock = false;
    let mut landlock_rules = vec![];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--api-socket" => {
                let v = it.next().ok_or("--api-socket needs a value")?;
                let path = v.strip_prefix("path=").unwrap_or(v);
                if path.contains(',') || path.contains('=') {
                    return Err(format!("unsupported --api-socket value {v:?}"));
                }
                api_socket = Some(PathBuf::from(path));
            }
            "--seccomp" => {
                let v = it.next().ok_or("--seccomp needs a value")?;
                if !["true", "false", "log"].contains(&v.as_str()) {
                    return Err(format!("--seccomp takes true, false or log, got {v:?}"));
                }
                seccomp = v.clone();
            }
            "--landlock" => landlock = true,
            "--landlock-rules" => {
                let v = it.next().ok_or("--landlock-rules needs a value")?;
                let ok = v.split(',').all(|kv| {
                    kv.strip_prefix("path=").is_some_and(|p| p.starts_with('/'))
                        || ["access=r", "access=w", "access=rw"].contains(&kv)
                });
                if !ok || !v.contains("path=") || !v.contains("access=") {
                    return Err(format!("unsupported --landlock-rules value {v:?}"));
                }
                landlock_rules.push(v.clone());
            }
            "--log-file" => {
                log_file = Some(PathBuf::from(it.next().ok_or("--log-file needs a value")?));
            }
            "-v" | "-vv" | "-vvv" => {}
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    Ok(FakeVmmArgs {
        api_socket: api_socket.ok_or("--api-socket is required")?,
        seccomp,
        landlock,
        landlock_rules,
        log_file,
    })
}

/// Failure switches from `KILN_FAKE_VMM_FAIL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailPlan {
    pub exit_on: Vec<String>,
    pub hang_on: Vec<String>,
    pub never_ready: bool,
}

impl FailPlan {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut plan = Self::default();
        for rule in s.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            if let Some(op) = rule.strip_prefix("exit-on=") {
                plan.exit_on.push(op.to_owned());
            } else if let Some(op) = rule.strip_prefix("hang-on=") {
                plan.hang_on.push(op.to_owned());
            } else if rule == "never-ready" {
                plan.never_ready = true;
            } else {
                return Err(format!("unknown failure rule {rule:?}"));
            }
        }
        Ok(plan)
    }
}

struct Vm {
    state: VmState,
    config: Value,
    vsock: Option<(PathBuf, JoinHandle<()>)>,
}

struct Fake {
    name: String,
    schemas: Schemas,
    record: Option<PathBuf>,
    fail: FailPlan,
    vm: Mutex<Option<Vm>>,
    /// Whether guest I/O may proceed (the VM runs).
    running: watch::Sender<bool>,
    guest: Arc<ToyGuest>,
    shutdown: watch::Sender<bool>,
}

/// Serve until `vmm.shutdown` (or a failure switch) ends the process.
pub async fn run(
    args: FakeVmmArgs,
    fail: FailPlan,
    record: Option<PathBuf>,
) -> std::io::Result<()> {
    let name = args
        .api_socket
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let _ = std::fs::remove_file(&args.api_socket);
    let listener = UnixListener::bind(&args.api_socket)?;
    let (running, _) = watch::channel(false);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let fake = Arc::new(Fake {
        name,
        schemas: Schemas::bundled(),
        record,
        fail,
        vm: Mutex::new(None),
        running,
        guest: Arc::new(ToyGuest::default()),
        shutdown,
    });
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let fake = fake.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let fake = fake.clone();
                        async move { Ok::<_, Infallible>(fake.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
            _ = shutdown_rx.changed() => break,
        }
    }
    if let Some(vm) = fake.vm.lock().expect("lock").take() {
        stop_vsock(vm.vsock);
    }
    // Let the answer to vmm.shutdown leave before the process ends.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let _ = std::fs::remove_file(&args.api_socket);
    Ok(())
}

/// The `fake-cloud-hypervisor` binary: flags from argv, switches from the
/// environment (see the module docs). Returns the process exit code.
pub async fn main_from_env() -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["--version"] {
        let version =
            std::env::var("KILN_FAKE_VMM_VERSION").unwrap_or_else(|_| "v54.0-fake".into());
        println!("cloud-hypervisor {version}");
        return 0;
    }
    println!("fake-cloud-hypervisor args: {}", args.join(" "));
    for path in std::env::var("KILN_FAKE_VMM_PROBE")
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
    {
        let outcome = match std::fs::File::open(path) {
            Ok(_) => "readable".to_owned(),
            Err(e) => format!("refused ({e})"),
        };
        println!("probe {path}: {outcome}");
    }
    let parsed = match parse_args(&args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("fake-cloud-hypervisor: {e}");
            return 2;
        }
    };
    let fail = match FailPlan::parse(&std::env::var("KILN_FAKE_VMM_FAIL").unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fake-cloud-hypervisor: KILN_FAKE_VMM_FAIL: {e}");
            return 2;
        }
    };
    let record = std::env::var_os("KILN_FAKE_VMM_RECORD").map(PathBuf::from);
    match run(parsed, fail, record).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("fake-cloud-hypervisor: {e}");
            1
        }
    }
}

fn stop_vsock(vsock: Option<(PathBuf, JoinHandle<()>)>) {
    if let Some((path, task)) = vsock {
        task.abort();
        let _ = std::fs::remove_file(path);
    }
}

fn reply(status: StatusCode, body: Option<Value>) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    let bytes = match body {
        Some(v) => {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(serde_json::to_vec(&v).expect("json"))
        }
        None => Bytes::new(),
    };
    b.body(Full::new(bytes)).expect("response")
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Full<Bytes>> {
    let message = message.into();
    Response::builder()
        .status(status)
        .body(Full::new(Bytes::from(message)))
        .expect("response")
}

/// The files a VM config names that must exist before boot or restore.
fn check_files(config: &Value) -> Result<(), String> {
    let mut paths = vec![];
    for key in ["kernel", "initramfs"] {
        if let Some(p) = config
            .pointer(&format!("/payload/{key}"))
            .and_then(Value::as_str)
        {
            paths.push(p.to_owned());
        }
    }
    if config.pointer("/payload/kernel").is_none() {
        return Err("payload.kernel is required to boot".into());
    }
    for d in config
        .get("disks")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(p) = d.get("path").and_then(Value::as_str) {
            paths.push(p.to_owned());
        }
    }
    for p in paths {
        if !Path::new(&p).is_file() {
            return Err(format!("cannot open {p}: No such file or directory"));
        }
    }
    Ok(())
}

fn file_url(body: &Value, key: &str) -> Result<PathBuf, String> {
    let url = body.get(key).and_then(Value::as_str).unwrap_or_default();
    url.strip_prefix("file://")
        .map(PathBuf::from)
        .ok_or_else(|| format!("{key} {url:?} is not a file:// URL"))
}

impl Fake {
    fn set_disks(&self, config: &Value) {
        let n = config
            .get("disks")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        *self.guest.disks.lock().expect("lock") = n;
    }

    fn record(&self, op: &str, status: StatusCode) {
        // Also in the VMM's log: a jailed fake cannot reach the record file.
        println!("call {op} {}", status.as_u16());
        if let Some(path) = &self.record {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
            {
                let _ = writeln!(f, "{} {} {}", self.name, op, status.as_u16());
            }
        }
    }

    async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let op = req
            .uri()
            .path()
            .strip_prefix("/api/v1/")
            .unwrap_or_default()
            .to_owned();
        if self.fail.exit_on.contains(&op) {
            self.record(&op, StatusCode::INTERNAL_SERVER_ERROR);
            eprintln!("fake-cloud-hypervisor: exiting on {op} as asked");
            std::process::exit(1);
        }
        if self.fail.hang_on.contains(&op) {
            self.record(&op, StatusCode::REQUEST_TIMEOUT);
            std::future::pending::<()>().await;
        }
        let method = req.method().clone();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let resp = self.dispatch(&op, &method, &body).await;
        self.record(&op, resp.status());
        resp
    }

    async fn dispatch(
        self: &Arc<Self>,
        op: &str,
        method: &Method,
        body: &[u8],
    ) -> Response<Full<Bytes>> {
        let (want_method, schema) = match op {
            "vmm.ping" | "vm.info" | "vm.counters" => (Method::GET, None),
            "vm.create" => (Method::PUT, Some("VmConfig")),
            "vm.snapshot" => (Method::PUT, Some("VmSnapshotConfig")),
            "vm.restore" => (Method::PUT, Some("RestoreConfig")),
            "vm.add-disk" => (Method::PUT, Some("DiskConfig")),
            "vmm.shutdown" | "vm.boot" | "vm.pause" | "vm.resume" | "vm.shutdown" | "vm.delete" => {
                (Method::PUT, None)
            }
            _ => return error(StatusCode::NOT_FOUND, format!("unknown endpoint {op}")),
        };
        if *method != want_method {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{op} takes {want_method}"),
            );
        }
        let body: Option<Value> = match (schema, body.is_empty()) {
            (None, true) => None,
            (None, false) => return error(StatusCode::BAD_REQUEST, format!("{op} takes no body")),
            (Some(_), true) => return error(StatusCode::BAD_REQUEST, format!("{op} needs a body")),
            (Some(name), false) => {
                let v: Value = match serde_json::from_slice(body) {
                    Ok(v) => v,
                    Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")),
                };
                if let Err(e) = self.schemas.validate(name, &v) {
                    return error(StatusCode::BAD_REQUEST, format!("{name}: {e}"));
                }
                Some(v)
            }
        };
        let mut guard = self.vm.lock().expect("lock");
        let state = guard.as_ref().map(|vm| vm.state);
        use VmState::*;
        match (op, state) {
            ("vmm.ping", _) => reply(
                StatusCode::OK,
                Some(
                    json!({"version": "v54.0-fake", "pid": std::process::id(), "features": ["kvm"]}),
                ),
            ),
            ("vmm.shutdown", _) => {
                if let Some(vm) = guard.take() {
                    stop_vsock(vm.vsock);
                }
                let _ = self.shutdown.send(true);
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.create", None) => {
                self.set_disks(body.as_ref().expect("checked"));
                *guard = Some(Vm {
                    state: Created,
                    config: body.expect("checked"),
                    vsock: None,
                });
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.create", Some(_)) => error(StatusCode::BAD_REQUEST, "VM is already created"),
            ("vm.restore", None) => {
                let body = body.expect("checked");
                let dir = match file_url(&body, "source_url") {
                    Ok(d) => d,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                let config: Value = match std::fs::read(dir.join("config.json"))
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                {
                    Ok(c) => c,
                    Err(e) => {
                        return error(StatusCode::BAD_REQUEST, format!("snapshot config: {e}"))
                    }
                };
                if let Err(e) = self.schemas.validate("VmConfig", &config) {
                    return error(StatusCode::BAD_REQUEST, format!("snapshot config: {e}"));
                }
                for f in ["state.json", "memory-ranges"] {
                    if !dir.join(f).is_file() {
                        return error(StatusCode::BAD_REQUEST, format!("snapshot has no {f}"));
                    }
                }
                if let Err(e) = check_files(&config) {
                    return error(StatusCode::BAD_REQUEST, e);
                }
                let vsock = match self.start_vsock(&config) {
                    Ok(v) => v,
                    Err(e) => return error(StatusCode::CONFLICT, e),
                };
                self.set_disks(&config);
                let resume = body.get("resume").and_then(Value::as_bool).unwrap_or(false);
                *guard = Some(Vm {
                    state: if resume { Running } else { Paused },
                    config,
                    vsock,
                });
                let _ = self.running.send_replace(resume);
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.restore", Some(_)) => error(StatusCode::NOT_FOUND, "VM is already created"),
            (_, None) => error(StatusCode::NOT_FOUND, "VM is not created"),
            ("vm.info", Some(s)) => {
                let vm = guard.as_ref().expect("created");
                reply(
                    StatusCode::OK,
                    Some(json!({"config": vm.config, "state": s})),
                )
            }
            ("vm.counters", Some(_)) => {
                // Per device id, as cloud-hypervisor answers: a disk's
                // minimum latency starts at u64::MAX.
                let vm = guard.as_ref().expect("created");
                let mut counters = serde_json::Map::new();
                let devices = |key: &str| {
                    vm.config
                        .get(key)
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                };
                for (i, d) in devices("disks").iter().enumerate() {
                    let id = d
                        .get("id")
                        .and_then(Value::as_str)
                        .map_or(format!("_disk{i}"), str::to_owned);
                    counters.insert(
                        id,
                        json!({"read_bytes": 4096, "write_bytes": 0, "read_latency_min": u64::MAX}),
                    );
                }
                for (i, n) in devices("net").iter().enumerate() {
                    let id = n
                        .get("id")
                        .and_then(Value::as_str)
                        .map_or(format!("_net{i}"), str::to_owned);
                    counters.insert(
                        id,
                        json!({"rx_bytes": 1500 * (i + 1), "tx_bytes": 700 * (i + 1)}),
                    );
                }
                reply(StatusCode::OK, Some(Value::Object(counters)))
            }
            ("vm.boot", Some(Created | Shutdown)) => {
                let vm = guard.as_mut().expect("created");
                if let Err(e) = check_files(&vm.config) {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, e);
                }
                match self.start_vsock(&vm.config) {
                    Ok(v) => vm.vsock = v,
                    Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
                vm.state = Running;
                let _ = self.running.send_replace(true);
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.boot", Some(_)) => error(StatusCode::METHOD_NOT_ALLOWED, "VM is already booted"),
            ("vm.pause", Some(Running)) => {
                guard.as_mut().expect("created").state = Paused;
                let _ = self.running.send_replace(false);
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.pause", Some(_)) => error(StatusCode::METHOD_NOT_ALLOWED, "VM is not running"),
            ("vm.resume", Some(Paused)) => {
                guard.as_mut().expect("created").state = Running;
                let _ = self.running.send_replace(true);
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.resume", Some(_)) => error(StatusCode::METHOD_NOT_ALLOWED, "VM is not paused"),
            ("vm.add-disk", Some(Running)) => {
                let disk = body.expect("checked");
                if let Err(e) = check_files(&json!({"payload": {"kernel": "-"}, "disks": [disk]}))
                    .or_else(|e| {
                        if e.contains("cannot open -") {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, e);
                }
                let vm = guard.as_mut().expect("created");
                let disks = vm
                    .config
                    .as_object_mut()
                    .expect("object")
                    .entry("disks")
                    .or_insert(json!([]));
                let n = disks.as_array().map_or(0, Vec::len);
                disks.as_array_mut().expect("array").push(disk);
                *self.guest.disks.lock().expect("lock") = n + 1;
                reply(
                    StatusCode::OK,
                    Some(
                        json!({"id": format!("_disk{n}"), "bdf": format!("0000:00:{:02x}.0", 6 + n)}),
                    ),
                )
            }
            ("vm.add-disk", Some(_)) => {
                error(StatusCode::INTERNAL_SERVER_ERROR, "VM is not running")
            }
            ("vm.snapshot", Some(Paused)) => {
                let dir = match file_url(body.as_ref().expect("checked"), "destination_url") {
                    Ok(d) => d,
                    Err(e) => return error(StatusCode::BAD_REQUEST, e),
                };
                if !dir.is_dir() {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("{} is not a directory", dir.display()),
                    );
                }
                let vm = guard.as_ref().expect("created");
                let written = std::fs::write(
                    dir.join("config.json"),
                    serde_json::to_vec_pretty(&vm.config).expect("json"),
                )
                .and_then(|()| std::fs::write(dir.join("state.json"), br#"{"fake":true}"#))
                .and_then(|()| std::fs::write(dir.join("memory-ranges"), vec![0u8; 4096]));
                match written {
                    Ok(()) => reply(StatusCode::NO_CONTENT, None),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            ("vm.snapshot", Some(_)) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "VM must be paused to be snapshotted",
            ),
            ("vm.shutdown", Some(Running | Paused)) => {
                let vm = guard.as_mut().expect("created");
                stop_vsock(vm.vsock.take());
                vm.state = Shutdown;
                let _ = self.running.send_replace(false);
                reply(StatusCode::NO_CONTENT, None)
            }
            ("vm.shutdown", Some(_)) => error(StatusCode::METHOD_NOT_ALLOWED, "VM is not started"),
            ("vm.delete", Some(_)) => {
                if let Some(vm) = guard.take() {
                    stop_vsock(vm.vsock);
                }
                let _ = self.running.send_replace(false);
                reply(StatusCode::NO_CONTENT, None)
            }
            _ => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{op} in state {state:?}"),
            ),
        }
    }

    /// Bind the config's hybrid-vsock socket and serve the guest on it.
    fn start_vsock(
        self: &Arc<Self>,
        config: &Value,
    ) -> Result<Option<(PathBuf, JoinHandle<()>)>, String> {
        let Some(path) = config.pointer("/vsock/socket").and_then(Value::as_str) else {
            return Ok(None);
        };
        let path = PathBuf::from(path);
        let listener = std::os::unix::net::UnixListener::bind(&path)
            .map_err(|e| format!("cannot bind vsock socket {}: {e}", path.display()))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let listener = UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        let fake = self.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = fake.clone();
                tokio::spawn(async move { fake.serve_vsock(stream).await });
            }
        });
        Ok(Some((path, task)))
    }

    /// Hybrid vsock: `CONNECT <port>\n` -> `OK <n>\n`, then the guest.
    async fn serve_vsock(self: Arc<Self>, stream: UnixStream) {
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        if reader.read_line(&mut line).await.is_err() {
            return;
        }
        let port_ok = line
            .strip_prefix("CONNECT ")
            .and_then(|p| p.trim_end().parse::<u32>().ok())
            .is_some();
        let mut stream = reader.into_inner();
        if !port_ok || !line.ends_with('\n') {
            return;
        }
        // The guest only answers while it runs.
        let mut running = self.running.subscribe();
        if running.wait_for(|r| *r).await.is_err() {
            return;
        }
        if stream.write_all(b"OK 1073741824\n").await.is_err() {
            return;
        }
        if self.fail.never_ready {
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        let (host_end, guest_end) = tokio::io::duplex(256 * 1024);
        let guest = self.guest.clone();
        tokio::spawn(async move {
            let _ = kiln_guest_proto::serve(guest_end, guest, "fake-guest").await;
        });
        let (mut sr, mut sw) = stream.into_split();
        let (mut gr, mut gw) = tokio::io::split(host_end);
        let gate_in = self.running.subscribe();
        let gate_out = self.running.subscribe();
        let inbound = gated_copy(&mut sr, &mut gw, gate_in);
        let outbound = gated_copy(&mut gr, &mut sw, gate_out);
        let _ = tokio::join!(inbound, outbound);
    }
}

/// Copy until EOF, holding every chunk while the VM is paused.
async fn gated_copy<R, W>(
    r: &mut R,
    w: &mut W,
    mut running: watch::Receiver<bool>,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        if running.wait_for(|r| *r).await.is_err() {
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<FakeVmmArgs, String> {
        parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn the_flags_the_driver_passes_are_taken_and_others_refused() {
        let a = args(&["--api-socket", "path=/x/api.sock", "--seccomp", "true"]).unwrap();
        assert_eq!(a.api_socket, PathBuf::from("/x/api.sock"));
        assert_eq!(a.seccomp, "true");
        assert!(args(&["--seccomp", "true"]).is_err());
        assert!(args(&["--api-socket", "path=/x,fd=3"]).is_err());
        assert!(args(&["--api-socket", "/x", "--seccomp", "maybe"]).is_err());
        assert!(args(&["--api-socket", "/x", "--kernel", "/k"]).is_err());
        let l = args(&[
            "--api-socket",
            "path=/api.sock",
            "--landlock",
            "--landlock-rules",
            "path=/,access=rw",
        ])
        .unwrap();
        assert!(l.landlock);
        assert_eq!(l.landlock_rules, ["path=/,access=rw"]);
        assert!(args(&["--api-socket", "/x", "--landlock-rules", "path=x"]).is_err());
    }

    #[test]
    fn failure_rules_parse() {
        let p = FailPlan::parse("exit-on=vm.boot, hang-on=vm.create,never-ready").unwrap();
        assert_eq!(p.exit_on, ["vm.boot"]);
        assert_eq!(p.hang_on, ["vm.create"]);
        assert!(p.never_ready);
        assert_eq!(FailPlan::parse("").unwrap(), FailPlan::default());
        assert!(FailPlan::parse("explode").is_err());
    }
}
