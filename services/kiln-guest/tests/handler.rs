//! kiln-guest's handler end to end on the host, without root: a fake
//! platform (recorded mounts and network), the real process reaper, a
//! real function (examples/static-echo) on a loopback port, and the real
//! host client over an in-memory pipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kiln_guest::guest::{Guest, Platform};
use kiln_guest::mounts::{MountError, MountOp, MountOps};
use kiln_guest::net::{NetError, NetOps};
use kiln_guest::process::Reaper;
use kiln_guest_proto::*;

const T: Duration = Duration::from_secs(20);

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl MountOps for Recorder {
    fn apply(&self, op: &MountOp) -> Result<(), MountError> {
        self.0.lock().unwrap().push(format!("{op:?}"));
        Ok(())
    }
}

impl NetOps for Recorder {
    fn link_up(&self, i: &str) -> Result<(), NetError> {
        self.0.lock().unwrap().push(format!("up {i}"));
        Ok(())
    }
    fn set_address(&self, i: &str, a: std::net::Ipv4Addr, p: u8) -> Result<(), NetError> {
        self.0.lock().unwrap().push(format!("addr {i} {a}/{p}"));
        Ok(())
    }
    fn set_mtu(&self, _: &str, _: u32) -> Result<(), NetError> {
        Ok(())
    }
    fn add_default_route(&self, g: std::net::Ipv4Addr) -> Result<(), NetError> {
        self.0.lock().unwrap().push(format!("route {g}"));
        Ok(())
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Build examples/static-echo. Through the reaper: it takes every child
/// of this process, so std's own wait would race it.
async fn build_echo(dir: &Path) -> PathBuf {
    let out = dir.join("server");
    let reaper = Reaper::start().unwrap();
    let child = reaper
        .spawn(
            std::process::Command::new("rustc")
                .args(["-O", "--edition", "2021", "-o"])
                .arg(&out)
                .arg(repo_root().join("examples/static-echo/main.rs")),
        )
        .unwrap();
    let status = reaper.wait(child.pid).await;
    assert_eq!(status.code, Some(0), "building static-echo failed");
    out
}

use kiln_test_support::free_port;

fn config(command: &Path, dir: &Path, port: u16) -> GuestConfig {
    GuestConfig {
        instance_id: "i-test".into(),
        hostname: None,
        network: Some(NetworkConfig {
            interface: "eth0".into(),
            address: "10.0.2.15".parse().unwrap(),
            prefix_len: 24,
            gateway: Some("10.0.2.2".parse().unwrap()),
            mtu: None,
            dns: vec![],
        }),
        process: ProcessConfig {
            command: vec![command.display().to_string()],
            args: vec![],
            env: BTreeMap::from([("FC_CUSTOM_LISTEN_PORT".into(), port.to_string())]),
            port,
            working_dir: dir.display().to_string(),
            start_timeout_ms: 10_000,
        },
        disks: DiskConfig {
            runtime: None,
            code: Some(Disk {
                device: "/dev/vdb".into(),
                fs: FsType::Erofs,
            }),
            scratch: None,
            layers: vec![],
        },
    }
}

async fn start() -> (GuestClient, Recorder) {
    let rec = Recorder::default();
    let platform = Platform {
        mounts: Box::new(rec.clone()),
        net: Box::new(rec.clone()),
        pid1: false,
    };
    let guest = Arc::new(Guest::new(platform, Reaper::start().unwrap(), false));
    let (host, chan) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve(chan, guest, "test"));
    let client = GuestClient::connect(host);
    client.wait_ready(T).await.unwrap();
    (client, rec)
}

#[tokio::test]
async fn configure_relays_calls_to_the_function() {
    let dir = tempfile::tempdir().unwrap();
    let server = build_echo(dir.path()).await;
    let (client, rec) = start().await;
    let port = free_port();
    client
        .configure(&config(&server, dir.path(), port), T)
        .await
        .unwrap();
    let calls = rec.0.lock().unwrap().clone();
    assert_eq!(
        &calls[..4],
        [
            "up lo",
            "up eth0",
            "addr eth0 10.0.2.15/24",
            "route 10.0.2.2"
        ]
    );
    assert!(calls.iter().any(|c| c.contains("/dev/vdb")), "{calls:?}");
    assert!(
        !calls.iter().any(|c| c.contains("SwitchRoot")),
        "no switch outside PID 1"
    );

    let head = CallHead {
        headers: vec![("x-fc-request-id".into(), "req-1".into())],
        timeout_ms: Some(5000),
    };
    let resp = client
        .invoke(head, Bytes::from_static(b"ping"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-echo-request-id"), Some("req-1"));
    assert_eq!(
        resp.body.collect().await.unwrap(),
        Bytes::from_static(b"ping")
    );

    // Concurrent calls, several in flight on the one channel.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(vec![b'a' + i as u8; 100_000 + i]);
            let r = c.invoke(CallHead::default(), body.clone()).await.unwrap();
            assert_eq!(r.body.collect().await.unwrap(), body);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        client.initialize(CallHead::default()).await.unwrap().status,
        200
    );
    assert_eq!(
        client.pre_stop(CallHead::default()).await.unwrap().status,
        200
    );
    // The pooled runtime connection is still in step after the bodiless GET.
    let resp = client
        .invoke(CallHead::default(), Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert_eq!(
        resp.body.collect().await.unwrap(),
        Bytes::from_static(b"after")
    );

    // A second Configure is refused.
    match client
        .configure(&config(&server, dir.path(), port), T)
        .await
    {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::AlreadyConfigured),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn calls_before_configure_and_failed_starts() {
    let dir = tempfile::tempdir().unwrap();
    let (client, _) = start().await;
    match client.invoke(CallHead::default(), Bytes::new()).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::NotConfigured),
        other => panic!("{:?}", other.map(|r| r.status)),
    }
    // A command that exits at once.
    let mut cfg = config(Path::new("/bin/false"), dir.path(), free_port());
    cfg.process.start_timeout_ms = 5000;
    match client.configure(&cfg, T).await {
        Err(GuestClientError::Guest(e)) => {
            assert_eq!(e.code, ErrorCode::StartFailed);
            assert!(e.message.contains("exited"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }

    let (client, _) = start().await;
    let cfg = config(Path::new("/nonexistent/server"), dir.path(), free_port());
    match client.configure(&cfg, T).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::StartFailed),
        other => panic!("{other:?}"),
    }

    // A command that never opens its port.
    let (client, _) = start().await;
    let mut cfg = config(Path::new("/bin/sleep"), dir.path(), free_port());
    cfg.process.args = vec!["30".into()];
    cfg.process.start_timeout_ms = 300;
    match client.configure(&cfg, T).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn function_output_arrives_as_logs() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fn.sh");
    // A "function" that logs and serves on its port with static-echo.
    let server = build_echo(dir.path()).await;
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho started on $FC_CUSTOM_LISTEN_PORT\necho oops >&2\nexec {}\n",
            server.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (client, _) = start().await;
    let mut logs = client.take_logs().unwrap();
    let port = free_port();
    client
        .configure(&config(&script, dir.path(), port), T)
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let l = tokio::time::timeout(T, logs.recv()).await.unwrap().unwrap();
        seen.push((l.stream, l.line));
    }
    assert!(
        seen.contains(&(LogStream::Stdout, format!("started on {port}"))),
        "{seen:?}"
    );
    assert!(
        seen.contains(&(LogStream::Stderr, "oops".into())),
        "{seen:?}"
    );
}

#[tokio::test]
async fn exec_sessions_with_pipes_and_tty() {
    let (client, _) = start().await;
    let req = |command: &[&str], tty: bool| ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::from([("GREETING".into(), "hi".into())]),
        tty,
        size: Some(TtySize { rows: 33, cols: 77 }),
        working_dir: None,
    };
    let collect = |mut s: ExecSession| async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match tokio::time::timeout(T, s.output.next()).await.unwrap() {
                Some(ExecEvent::Stdout(b)) => out.extend_from_slice(&b),
                Some(ExecEvent::Stderr(b)) => err.extend_from_slice(&b),
                Some(ExecEvent::Exit(st)) => return (out, err, Ok(st)),
                Some(ExecEvent::Error(e)) => return (out, err, Err(e)),
                None => panic!("no exit"),
            }
        }
    };
    let s = client
        .exec(req(
            &["/bin/sh", "-c", "echo $GREETING; echo bad >&2; exit 3"],
            false,
        ))
        .await
        .unwrap();
    let (out, err, st) = collect(s).await;
    assert_eq!(out, b"hi\n");
    assert_eq!(err, b"bad\n");
    assert_eq!(st.unwrap().code, Some(3));

    // stdin through to the process.
    let s = client.exec(req(&["/bin/cat"], false)).await.unwrap();
    s.input.stdin(Bytes::from_static(b"typed")).await.unwrap();
    s.input.close_stdin().await.unwrap();
    let (out, _, st) = collect(s).await;
    assert_eq!(out, b"typed");
    assert_eq!(st.unwrap().code, Some(0));

    // A terminal of the requested size, resizable.
    let s = client
        .exec(req(
            &["/bin/sh", "-c", "stty size; read x; stty size"],
            true,
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    s.input
        .resize(TtySize { rows: 10, cols: 20 })
        .await
        .unwrap();
    s.input.stdin(Bytes::from_static(b"go\n")).await.unwrap();
    let (out, _, st) = collect(s).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("33 77"), "{text:?}");
    assert!(text.contains("10 20"), "{text:?}");
    assert_eq!(st.unwrap().code, Some(0));

    let s = client.exec(req(&["/nonexistent"], false)).await.unwrap();
    let (_, _, st) = collect(s).await;
    assert_eq!(st.unwrap_err().code, ErrorCode::ExecFailed);
}

#[tokio::test]
async fn a_call_over_its_timeout_is_a_timeout_error() {
    if !Path::new("/usr/bin/python3").exists() {
        return kiln_test_support::skip(
            kiln_test_support::Category::Tool,
            "needs /usr/bin/python3 for a slow function",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("slow.py");
    std::fs::write(
        &script,
        [
            "import http.server, os, time",
            "class H(http.server.BaseHTTPRequestHandler):",
            "    def do_POST(self):",
            "        time.sleep(5)",
            "        self.send_response(200)",
            "        self.end_headers()",
            "port = int(os.environ['FC_CUSTOM_LISTEN_PORT'])",
            "http.server.ThreadingHTTPServer(('127.0.0.1', port), H).serve_forever()",
        ]
        .join("\n"),
    )
    .unwrap();
    let (client, _) = start().await;
    let mut cfg = config(Path::new("/usr/bin/python3"), dir.path(), free_port());
    cfg.process.args = vec![script.display().to_string()];
    client.configure(&cfg, T).await.unwrap();
    let head = CallHead {
        headers: vec![],
        timeout_ms: Some(300),
    };
    let started = std::time::Instant::now();
    match client.invoke(head, Bytes::from_static(b"x")).await {
        Err(GuestClientError::Guest(e)) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("{:?}", other.map(|r| r.status)),
    }
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn an_abandoned_exec_session_kills_its_command() {
    let rec = Recorder::default();
    let guest = Arc::new(Guest::new(
        Platform {
            mounts: Box::new(rec.clone()),
            net: Box::new(rec),
            pid1: false,
        },
        Reaper::start().unwrap(),
        false,
    ));
    let (host, chan) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve(chan, guest, "test"));
    let client = GuestClient::connect(host);
    client.wait_ready(T).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let mut s = client
        .exec(ExecRequest {
            command: vec![
                "/bin/sh".into(),
                "-c".into(),
                format!(
                    "echo $$ > {}; echo started; exec sleep 60",
                    pidfile.display()
                ),
            ],
            env: BTreeMap::new(),
            tty: false,
            size: None,
            working_dir: None,
        })
        .await
        .unwrap();
    assert_eq!(
        s.output.next().await,
        Some(ExecEvent::Stdout(Bytes::from_static(b"started\n")))
    );
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The host hangs up: the connection ends and the session with it.
    drop(s);
    drop(client);
    tokio::time::timeout(T, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{pid}")).exists() {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state.split_whitespace().nth(2) == Some("Z") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "exec command {pid} still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
