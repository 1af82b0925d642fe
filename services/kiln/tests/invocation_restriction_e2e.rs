//! DisableFunctionInvocation end to end on `kiln dev` (runc sandboxes): a
//! call in flight finishes when the function is disabled without
//! `abortOngoingRequest` and is cut off (its instance destroyed) with it;
//! while disabled every call is refused; EnableFunctionInvocation brings a
//! new instance.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use common::Dev;

/// Sleeps for the number of seconds in its payload, then answers.
const SERVER: &str = r#"
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        time.sleep(float(body or b"0"))
        self.send_response(200)
        self.send_header("Content-Length", "4")
        self.end_headers()
        self.wfile.write(b"done")
ThreadingHTTPServer(("0.0.0.0", 9000), H).serve_forever()
"#;

fn code() -> Value {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    w.start_file("server.py", opts).unwrap();
    w.write_all(SERVER.as_bytes()).unwrap();
    let zip = w.finish().unwrap().into_inner();
    json!({"zipFile": base64::engine::general_purpose::STANDARD.encode(zip)})
}

/// Status, FC error code (if any) and body of a call sleeping `secs`.
async fn call(c: &kiln::client::FcClient, secs: u32) -> (u16, String, String) {
    match c
        .invoke_qualified("gate", None, Bytes::from(secs.to_string()), &[])
        .await
    {
        Ok(r) => {
            let body = String::from_utf8_lossy(&r.body).into_owned();
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["Code"].as_str().map(str::to_owned))
                .or_else(|| r.header("x-fc-error-type").map(str::to_owned))
                .unwrap_or_default();
            (r.status.as_u16(), code, body)
        }
        Err(e) => (0, "transport".into(), e.to_string()),
    }
}

async fn post(c: &kiln::client::FcClient, path: &str, body: Value) -> Value {
    let r = c
        .request(
            http::Method::POST,
            path,
            &[],
            &[],
            Bytes::from(body.to_string()),
        )
        .await
        .unwrap();
    assert!(
        r.status.is_success(),
        "{path}: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    r.json().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disabling_invocations_finishes_or_aborts_calls_in_flight_and_enable_restores() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    c.create_function(&json!({
        "functionName": "gate",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "timeout": 60,
        "instanceConcurrency": 4,
        "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
        "code": code(),
    }))
    .await
    .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    let (status, _, body) = call(&c, 0).await;
    assert_eq!(status, 200, "{body}\n{}", dev.log_tail());
    let disable = "/2023-03-30/functions/gate/invoke/disable";
    let enable = "/2023-03-30/functions/gate/invoke/enable";

    // Without abort: the call in flight runs to its end; new ones are refused.
    let c2 = dev.client();
    let slow = tokio::spawn(async move { call(&c2, 3).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    post(&c, disable, json!({"reason": "drain"})).await;
    let (status, code, body) = call(&c, 0).await;
    assert_eq!(
        (status, code.as_str()),
        (403, "FunctionInvocationDisabled"),
        "{body}"
    );
    let (status, _, body) = slow.await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (200, "done"),
        "the call in flight finished"
    );

    // Enabled again: a call runs (on a new instance: the old one was retired).
    post(&c, enable, json!({})).await;
    let (status, _, body) = call(&c, 0).await;
    assert_eq!(status, 200, "{body}\n{}", dev.log_tail());

    // With abort: the call in flight is cut off well before its 30 s.
    let c3 = dev.client();
    let started = Instant::now();
    let long = tokio::spawn(async move { call(&c3, 30).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    post(
        &c,
        disable,
        json!({"reason": "incident", "abortOngoingRequest": true}),
    )
    .await;
    let (status, code, body) = long.await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "aborted after {took:?}");
    // FC's shape for a function cut off mid-call: its process is gone.
    assert!(
        body != "done" && !code.is_empty(),
        "the aborted call did not succeed: {status} {code} {body}"
    );
    eprintln!("aborted call answered {status} {code} after {took:?}: {body}");
    let (status, code, _) = call(&c, 0).await;
    assert_eq!((status, code.as_str()), (403, "FunctionInvocationDisabled"));
    post(&c, enable, json!({})).await;
    let (status, _, body) = call(&c, 0).await;
    assert_eq!(status, 200, "{body}\n{}", dev.log_tail());
}
