//! HTTP triggers end to end on `kiln dev` (runc sandboxes), driven with
//! plain `curl --cacert` at the trigger's URL (`*.fcapp.localhost`, which
//! curl sends to loopback): a custom-runtime web function gets the
//! request's method, path, query, headers and body and answers with its
//! own status and headers; an anonymous trigger takes unsigned calls, a
//! `function` trigger only ACS3-signed ones; methods outside `methods` are
//! refused; 20 MB go up and down; a chunked server-sent-events answer
//! arrives in pieces while the function is still running.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;

use common::{curl, Dev};

/// A web function: echoes the request, streams downloads and an SSE
/// answer whose last event waits for `/release` (a second call, to the
/// same instance: it takes 10 concurrent calls).
const SERVER: &str = r#"
import hashlib, json, os, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
released = threading.Event()
first_piece = threading.Event()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b""
        while True:
            size = int(self.rfile.readline().strip(), 16)
            data += self.rfile.read(size)
            self.rfile.readline()
            if size == 0:
                return data
    def answer(self, status, data, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def any(self):
        if self.path.startswith("/download"):
            n = int(self.path.split("n=")[1])
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            block = bytes(range(256)) * 256
            while n > 0:
                k = min(n, len(block))
                self.wfile.write(block[:k])
                n -= k
            return
        if self.path.startswith("/sse"):
            self.body()
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            def event(s):
                d = ("data: %s\n\n" % s).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(d), d))
                self.wfile.flush()
            event("first")
            event("released" if released.wait(30) else "timed-out")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        if self.path.startswith("/early"):
            # A chunked upload: say when its first piece is in, then read
            # the rest and answer with the total.
            total = 0
            while True:
                size = int(self.rfile.readline().strip(), 16)
                self.rfile.read(size)
                self.rfile.readline()
                if size == 0:
                    break
                total += size
                first_piece.set()
            self.answer(200, b"total %d" % total)
            return
        if self.path.startswith("/seen"):
            self.body()
            self.answer(200, b"seen" if first_piece.wait(30) else b"not-seen")
            return
        if self.path.startswith("/release"):
            self.body()
            released.set()
            self.answer(200, b"released")
            return
        data = self.body()
        echo = {"method": self.command, "path": self.path, "pid": os.getpid(),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "len": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "body": data[:100].decode("latin-1")}
        self.answer(201, json.dumps(echo).encode(),
                    [("Content-Type", "application/json"), ("X-Echo", "yes")])
    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = any
    def do_HEAD(self):
        self.send_response(201)
        self.send_header("X-Echo", "yes")
        self.send_header("Content-Length", "42")
        self.end_headers()
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

fn fc_code(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("not FC's error: {}", String::from_utf8_lossy(body)));
    assert!(v["RequestId"].as_str().is_some(), "{v}");
    v["Code"].as_str().unwrap().to_owned()
}

/// The ACS3 headers of a request to `url` (signed as the SDK signs).
fn signed_headers(
    dev: &Dev,
    method: &str,
    url: &str,
    body: &[u8],
    secret: Option<&str>,
) -> Vec<String> {
    let uri: http::Uri = url.parse().unwrap();
    let method: http::Method = method.parse().unwrap();
    let mut h = http::HeaderMap::new();
    h.insert("host", uri.authority().unwrap().as_str().parse().unwrap());
    // curl would add a form content type of its own, unsigned.
    h.insert("content-type", "application/octet-stream".parse().unwrap());
    let nonce = kiln_auth::new_nonce();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let secret = secret.unwrap_or(&dev.creds.access_key_secret);
    let params = kiln_auth::SigningParams::new(&dev.creds.access_key_id, secret, now, &nonce);
    kiln_auth::sign(&method, &uri, &mut h, body, &params).unwrap();
    h.iter()
        .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
        .collect()
}

fn cli_json(dev: &Dev, args: &[&str]) -> Value {
    let out = dev.cli(args);
    assert!(
        out.status.success(),
        "kiln {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dev.log_tail()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_triggers_serve_a_web_function_through_curl() {
    if common::skip() || common::skip_without(&["curl"]) {
        return;
    }
    let dev = Dev::start();
    let ca = dev.state.path().join("pki").join("ca.pem");
    let c = dev.client();
    c.create_function(&json!({
        "functionName": "web",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 256,
        "timeout": 60,
        "instanceConcurrency": 10,
        "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
        "code": code(),
    }))
    .await
    .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));

    // The CLI makes the trigger and shows its URL.
    let t = cli_json(
        &dev,
        &[
            "triggers", "create", "web", "site", "--type", "http", "--method", "GET", "--method",
            "POST", "--method", "HEAD", "-o", "json",
        ],
    );
    let url = t["httpTrigger"]["urlInternet"].as_str().unwrap().to_owned();
    assert!(url.contains(".fcapp.localhost:"), "{url}");
    let listed = dev.cli(&["triggers", "list", "web"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&url));

    // Method, path, query, headers and body in; status and headers out.
    let (status, head, body) = curl(
        &ca,
        &[
            "-X",
            "POST",
            "-H",
            "x-custom: 7",
            "-H",
            "authorization: Bearer app",
            "--data-binary",
            "hello",
            &format!("{url}/some/path?q=1&r=two"),
        ],
    );
    assert_eq!(
        status,
        201,
        "{head}\n{}\n{}",
        String::from_utf8_lossy(&body),
        dev.log_tail()
    );
    assert!(head.contains("x-echo: yes"), "{head}");
    assert!(head.contains("x-fc-request-id:"), "{head}");
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/some/path?q=1&r=two");
    assert_eq!(echo["body"], "hello");
    assert_eq!(echo["headers"]["x-custom"], "7");
    assert_eq!(echo["headers"]["authorization"], "Bearer app");
    assert_eq!(echo["headers"]["x-fc-control-path"], "/http-invoke");
    assert!(
        echo["headers"]["x-fc-request-id"].as_str().is_some(),
        "{echo}"
    );
    let (status, _, body) = curl(&ca, &[&format!("{url}/")]);
    assert_eq!(status, 201);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["method"],
        "GET"
    );

    // HEAD: the function's status and headers, no body. (Its
    // Content-Length arrives as 0, not the function's.)
    let (status, head, _) = curl(&ca, &["-I", &format!("{url}/head")]);
    assert_eq!(status, 201, "{head}");
    assert!(head.contains("x-echo: yes"), "{head}");

    // A method the trigger does not take.
    let (status, _, body) = curl(&ca, &["-X", "DELETE", &format!("{url}/x")]);
    assert_eq!((status, fc_code(&body).as_str()), (405, "MethodNotAllowed"));

    // 20 MB up and 20 MB down.
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let upload = dev.state.path().join("upload.bin");
    std::fs::write(&upload, &big).unwrap();
    let (status, _, body) = curl(
        &ca,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/octet-stream",
            "--data-binary",
            &format!("@{}", upload.display()),
            &format!("{url}/upload"),
        ],
    );
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["len"], big.len());
    assert_eq!(echo["sha256"], hex::encode(sha2::Sha256::digest(&big)));
    let (status, head, body) = curl(&ca, &[&format!("{url}/download?n={}", 20 * 1024 * 1024)]);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body.len(), 20 * 1024 * 1024);
    let block: Vec<u8> = (0..=255u8).collect::<Vec<_>>().repeat(256);
    assert!(body.chunks(block.len()).all(|c| c == &block[..c.len()]));

    // An upload of unknown length past FC's 32 MB is cut off while it
    // streams (EntityTooLarge), and the instance that was receiving it is
    // not failed for the caller's fault: the same process answers next.
    let pid_before = {
        let (_, _, body) = curl(&ca, &[&format!("{url}/pid")]);
        serde_json::from_slice::<Value>(&body).unwrap()["pid"].clone()
    };
    let big_path = dev.state.path().join("too-big.bin");
    std::fs::write(&big_path, vec![b'z'; 33 * 1024 * 1024]).unwrap();
    let out = Command::new("curl")
        .arg("--cacert")
        .arg(&ca)
        .args([
            "-sS",
            "--http1.1",
            "-H",
            "Expect:",
            "--max-time",
            "60",
            "-X",
            "POST",
            "-T",
            "-",
        ])
        .arg(format!("{url}/too-big"))
        .stdin(std::fs::File::open(&big_path).unwrap())
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.contains("EntityTooLarge"),
        "{body} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, _, body) = curl(&ca, &[&format!("{url}/pid")]);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["pid"],
        pid_before,
        "the instance was not replaced"
    );

    // An upload of unknown length streams to the function: its first piece
    // is in the function (told by a second call) while this test still
    // holds the rest back; a gateway that read bodies whole would not
    // call the function before the end.
    let mut up = Command::new("curl")
        .arg("--cacert")
        .arg(&ca)
        .args(["-sS", "--max-time", "60", "-X", "POST", "-T", "-"])
        .arg(format!("{url}/early"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let mut stdin = up.stdin.take().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    // More than curl's upload buffer (it fills one before sending), from a
    // thread, held open until the function has seen the first piece.
    let writer = std::thread::spawn(move || {
        stdin.write_all(&vec![b'a'; 256 * 1024]).unwrap();
        stdin.flush().unwrap();
        let _ = done_rx.recv();
        stdin.write_all(b"tail").unwrap();
    });
    let (status, _, seen) = curl(&ca, &[&format!("{url}/seen")]);
    assert_eq!((status, seen.as_slice()), (200, &b"seen"[..]));
    drop(done_tx);
    writer.join().unwrap();
    let out = up.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, format!("total {}", 256 * 1024 + 4).into_bytes());

    // Server-sent events: the first event is read while the function
    // still waits to write the last (it writes it only after /release,
    // which this test sends only after reading the first event).
    let mut sse = Command::new("curl")
        .arg("--cacert")
        .arg(&ca)
        .args(["-sS", "-N", "--max-time", "60", &format!("{url}/sse")])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let mut lines = BufReader::new(sse.stdout.take().unwrap()).lines();
    let first = lines.next().expect("an event").unwrap();
    assert_eq!(first, "data: first");
    let (status, _, _) = curl(&ca, &["-X", "POST", &format!("{url}/release")]);
    assert_eq!(status, 200);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(sse.wait().unwrap().success());
    assert!(rest.contains(&"data: released".to_owned()), "{rest:?}");

    // A host naming no trigger.
    let port = url.rsplit(':').next().unwrap();
    let (status, _, body) = curl(&ca, &[&format!("https://nobody-x.fcapp.localhost:{port}/")]);
    assert_eq!((status, fc_code(&body).as_str()), (404, "TriggerNotFound"));

    // authType function: unsigned and wrongly signed calls get 403, a
    // signed one passes.
    cli_json(
        &dev,
        &[
            "triggers", "update", "web", "site", "--method", "POST", "--auth", "function", "-o",
            "json",
        ],
    );
    let target = format!("{url}/signed?x=1");
    let (status, _, body) = curl(&ca, &["-X", "POST", "--data-binary", "s", &target]);
    assert_eq!((status, fc_code(&body).as_str()), (403, "AccessDenied"));
    let mut args: Vec<String> = vec![
        "-X".into(),
        "POST".into(),
        "--data-binary".into(),
        "s".into(),
    ];
    for h in signed_headers(&dev, "POST", &target, b"s", Some("wrong-secret")) {
        args.extend(["-H".into(), h]);
    }
    args.push(target.clone());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, _, body) = curl(&ca, &refs);
    assert_eq!(
        (status, fc_code(&body).as_str()),
        (403, "SignatureNotMatch")
    );
    let mut args: Vec<String> = vec![
        "-X".into(),
        "POST".into(),
        "--data-binary".into(),
        "s".into(),
    ];
    for h in signed_headers(&dev, "POST", &target, b"s", None) {
        args.extend(["-H".into(), h]);
    }
    args.push(target.clone());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, _, body) = curl(&ca, &refs);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], "/signed?x=1");
    assert!(echo["headers"].get("authorization").is_none(), "{echo}");

    // A function with a trigger is not deleted; without, it is.
    assert!(c.delete_function("web").await.is_err());
    let out = dev.cli(&["triggers", "delete", "web", "site"]);
    assert!(out.status.success());
    c.delete_function("web").await.unwrap();
}
