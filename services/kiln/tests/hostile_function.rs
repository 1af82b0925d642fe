//! A function that floods its log and answers with huge bodies, run by
//! the three services as separate processes (real runc sandbox, real
//! python3): the agent survives, keeps serving other calls, caps FC's log
//! tail at 4 KB, refuses to buffer more than a sync payload for a Tail
//! call, and its peak memory (VmHWM of its own process) stays bounded.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use kiln::credentials::Credentials;
use kiln_internal_api::{InternalClient, NodeInfo};
use serde_json::json;

/// Bytes of log the function writes in one call.
const FLOOD_BYTES: usize = 256 << 20;
/// Bytes of the huge answer.
const HUGE_BYTES: usize = 256 << 20;
/// The agent's peak resident memory allowed over the whole test.
const AGENT_PEAK_MAX: u64 = 256 << 20;

const SERVER: &str = r#"
import os, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LINE = b"x" * 1023 + b"\n"
BLOCK = b"y" * (1 << 20)

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        what = self.rfile.read(n).decode()
        if what.startswith("flood"):
            out = sys.stdout.buffer
            for _ in range(int(what.split()[1]) // len(LINE)):
                out.write(LINE)
            # One line without end, far longer than any line kept.
            out.write(b"z" * (4 << 20))
            out.write(b"\nflood done\n")
            out.flush()
            body = b"flooded"
        elif what.startswith("huge"):
            size = int(what.split()[1])
            self.send_response(200)
            self.send_header("content-length", str(size))
            self.end_headers()
            sent = 0
            while sent < size:
                chunk = BLOCK[: min(len(BLOCK), size - sent)]
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
            return
        else:
            body = b"ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("FC_CUSTOM_LISTEN_PORT", "9000"))), H).serve_forever()
"#;

fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_survives_a_function_that_floods_logs_and_answers_huge_bodies() {
    if common::skip() {
        return;
    }
    let (state, pki, (sp, gp, gi)) = common::cluster_dir("kiln-hostile-");
    let dir = state.path();
    let ap = common::free_port();
    let prefix = common::run_tag();
    let mut services = common::Services::new(dir, &prefix, &["scheduler", "gateway", "agent"]);
    services.children.push(common::spawn_service(
        dir,
        "scheduler",
        "scheduler",
        &common::scheduler_config(dir, &pki, sp, ""),
    ));
    let (account, ak, sk) = (
        "1200000000000077",
        "LTAIhostile",
        "hostile-secret-0123456789",
    );
    services.children.push(common::spawn_service(
        dir,
        "gateway",
        "gateway",
        &common::gateway_config(dir, &pki, (sp, gp, gi), (account, ak, sk)),
    ));
    services.children.push(common::spawn_service(
        dir,
        "agent",
        "agent",
        &format!(
            "state_dir = {:?}\nlisten = \"127.0.0.1:{ap}\"\nscheduler_url = \"https://127.0.0.1:{sp}\"\n\
             gateway_internal_url = \"https://127.0.0.1:{gi}\"\ndrain_on_shutdown = true\n{}\
             [node]\nzone = \"z1\"\ntenancy = \"dedicated\"\nmemory_mb = 4096\ncpu_milli = 16000\nmax_instances = 64\n\
             [sandbox]\nname_prefix = {prefix:?}\ninstance_subnet = {:?}\ncgroup_parent = {prefix:?}\nrootfs_dir = {:?}\n\
             # The agent runs in the host's namespace: no isolation to\n\
             # configure here (egress.rs tests it in namespaces of its own).\n\
             insecure_network_isolation_disabled = true\n",
            dir.join("agent"),
            common::tls_table(&pki, "agent"),
            common::run_subnet(),
            common::rootfs_cache()
        ),
    ));
    let agent_pid = services.children[2].id();

    let internal = InternalClient::new(&pki.files("operator")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let nodes: Result<Vec<NodeInfo>, _> = internal
            .get(
                &format!("https://127.0.0.1:{sp}"),
                kiln_internal_api::paths::SCHEDULER_NODES,
            )
            .await;
        if nodes.is_ok_and(|n| !n.is_empty()) {
            break;
        }
        services.check_alive();
        assert!(
            Instant::now() < deadline,
            "agent never registered\n{}",
            services.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    while std::net::TcpStream::connect(("127.0.0.1", gp)).is_err() {
        services.check_alive();
        assert!(Instant::now() < deadline, "gateway never listened");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = kiln::client::FcClient::new(Credentials {
        endpoint: format!("https://127.0.0.1:{gp}"),
        account_id: account.into(),
        access_key_id: ak.into(),
        access_key_secret: sk.into(),
        ca_cert: pki.ca_cert(),
        security_token: None,
    })
    .unwrap();
    let zip = common::one_file_zip("server.py", SERVER.as_bytes());
    c.create_function(&json!({
        "functionName": "hostile",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "timeout": 120,
        "memorySize": 512,
        "customRuntimeConfig": {"command": ["python3", "server.py"]},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(&zip)},
    }))
    .await
    .unwrap();
    let ok = c
        .invoke("hostile", Bytes::from_static(b"hi"), &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", services.logs());
    let baseline = vm_hwm(agent_pid);

    // A log flood, with FC's Tail: the tail is at most 4 KB.
    let r = c
        .invoke(
            "hostile",
            Bytes::from(format!("flood {FLOOD_BYTES}")),
            &[("x-fc-log-type", "Tail")],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", services.logs()));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(&r.body[..], b"flooded");
    let tail = base64::engine::general_purpose::STANDARD
        .decode(r.header("x-fc-log-result").expect("a log tail"))
        .unwrap();
    assert!(tail.len() <= 4096, "tail of {} bytes", tail.len());
    services.check_alive();
    eprintln!(
        "agent VmHWM after the flood: {} MiB",
        vm_hwm(agent_pid) >> 20
    );

    // A huge answer streams through without the agent holding it. (What
    // the client gets is the gateway's business; the agent must survive.)
    match c
        .invoke("hostile", Bytes::from(format!("huge {HUGE_BYTES}")), &[])
        .await
    {
        Ok(r) => {
            assert_eq!(r.status, 200, "{}", services.logs());
            assert_eq!(r.body.len(), HUGE_BYTES);
        }
        Err(e) => eprintln!("huge answer without Tail: {e}"),
    }
    services.check_alive();
    eprintln!(
        "agent VmHWM after the huge answer: {} MiB",
        vm_hwm(agent_pid) >> 20
    );

    // With Tail the agent would have to hold it: refused past a sync
    // payload, as the function's error.
    let r = c
        .invoke(
            "hostile",
            Bytes::from(format!("huge {HUGE_BYTES}")),
            &[("x-fc-log-type", "Tail")],
        )
        .await
        .unwrap();
    assert_eq!(
        r.header("x-fc-error-type"),
        Some("UnhandledInvocationError"),
        "{:?}",
        r.headers
    );
    assert!(
        String::from_utf8_lossy(&r.body).contains("maximum allowed size"),
        "{} {:?}",
        r.status,
        String::from_utf8_lossy(&r.body[..r.body.len().min(300)])
    );
    services.check_alive();

    // Still serving, and its peak memory stayed bounded.
    let ok = c
        .invoke("hostile", Bytes::from_static(b"hi"), &[])
        .await
        .unwrap();
    assert_eq!(ok.status, 200, "{}", services.logs());
    let peak = vm_hwm(agent_pid);
    eprintln!(
        "agent VmHWM: {} MiB after start, {} MiB after {} MiB of log and two {} MiB answers",
        baseline >> 20,
        peak >> 20,
        FLOOD_BYTES >> 20,
        HUGE_BYTES >> 20
    );
    assert!(
        peak < AGENT_PEAK_MAX,
        "agent peak RSS {} MiB (bound {} MiB)",
        peak >> 20,
        AGENT_PEAK_MAX >> 20
    );
}
