//! Custom domains end to end on `kiln dev` (runc sandboxes), driven with
//! plain `curl --resolve DOMAIN:PORT:127.0.0.1 --cacert OWNER-CA`: a domain
//! made with `kiln domains create` and the owner's own certificate routes
//! by path to a custom-runtime web function through its HTTP trigger; GET
//! and POST with a query, a 20 MB upload and a server-sent-events answer
//! that arrives while the function is still running; the route's methods
//! honoured; a TLSv1.3-only domain refusing TLS 1.2 (`curl --tls-max 1.2`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use base64::Engine;
use serde_json::{json, Value};
use sha2::Digest;

use common::Dev;

/// A web function: echoes the request; `/sse` answers one event, then
/// the last only after `/release` (a second call to the same instance).
const SERVER: &str = r#"
import hashlib, json, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
released = threading.Event()
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
        if self.path.endswith("/sse"):
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
        if self.path.endswith("/release"):
            self.body()
            released.set()
            self.answer(200, b"released")
            return
        data = self.body()
        echo = {"method": self.command, "path": self.path,
                "len": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "body": data[:100].decode("latin-1")}
        self.answer(201, json.dumps(echo).encode(),
                    [("Content-Type", "application/json"), ("X-Echo", "yes")])
    do_GET = do_POST = do_PUT = do_DELETE = any
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

/// `curl --cacert CA --resolve DOMAIN:PORT:127.0.0.1 -sS` with `args`:
/// (status, lower-cased head, body), or curl's error.
fn curl(ca: &Path, resolve: &str, args: &[&str]) -> Result<(u16, String, Vec<u8>), String> {
    let out = Command::new("curl")
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", resolve, "-sS", "-D", "-", "--max-time", "60"])
        .args(args)
        .output()
        .expect("run curl");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head");
    let head = String::from_utf8_lossy(&out.stdout[..split]).to_ascii_lowercase();
    let body = out.stdout[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    Ok((status, head, body))
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
async fn custom_domains_serve_a_web_function_through_curl() {
    if common::skip() || common::skip_without(&["curl"]) {
        return;
    }
    let dev = Dev::start();
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
    let t = cli_json(
        &dev,
        &[
            "triggers", "create", "web", "site", "--type", "http", "--method", "GET", "--method",
            "POST", "-o", "json",
        ],
    );
    let url = t["httpTrigger"]["urlInternet"].as_str().unwrap().to_owned();
    let port = url.rsplit(':').next().unwrap().to_owned();

    // The domain owner's CA and certificates, not Kiln's.
    let owner = kiln_pki::Ca::generate("domain owner").unwrap();
    let dir = dev.state.path().join("owner");
    std::fs::create_dir_all(&dir).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, owner.cert_pem()).unwrap();
    let issue = |name: &str| {
        let i = owner
            .issue(&kiln_pki::CertRequest::public_server(name).names(&[name.to_owned()]))
            .unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        i.write(&cert, &key).unwrap();
        (cert.display().to_string(), key.display().to_string())
    };
    let (cert, key) = issue("shop.example.test");
    let d = cli_json(
        &dev,
        &[
            "domains",
            "create",
            "shop.example.test",
            "--cert",
            &cert,
            "--key",
            &key,
            "--route",
            "/api/*=web@GET,POST",
            "--route",
            "/*=web:LATEST@GET",
            "-o",
            "json",
        ],
    );
    assert_eq!(d["domainName"], "shop.example.test");
    assert!(d["certConfig"].get("privateKey").is_none(), "{d}");
    let listed = dev.cli(&["domains", "list"]);
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.contains("shop.example.test") && listed.contains("/api/*->web:LATEST[GET,POST]"),
        "{listed}"
    );

    let resolve = format!("shop.example.test:{port}:127.0.0.1");
    let base = format!("https://shop.example.test:{port}");
    let shop = |args: &[&str]| {
        curl(&ca, &resolve, args).unwrap_or_else(|e| panic!("{e}\n{}", dev.log_tail()))
    };

    // GET and POST with a query, by path.
    let (status, head, body) = shop(&[&format!("{base}/api/items?id=7&q=a%20b")]);
    assert_eq!(
        status,
        201,
        "{head}\n{}\n{}",
        String::from_utf8_lossy(&body),
        dev.log_tail()
    );
    assert!(
        head.contains("x-echo: yes") && head.contains("x-fc-request-id:"),
        "{head}"
    );
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["path"].as_str()),
        (Some("GET"), Some("/api/items?id=7&q=a%20b"))
    );
    let (status, _, body) = shop(&[
        "-X",
        "POST",
        "--data-binary",
        "hello",
        &format!("{base}/api/form?x=1"),
    ]);
    assert_eq!(status, 201);
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (echo["method"].as_str(), echo["body"].as_str()),
        (Some("POST"), Some("hello"))
    );
    // `/*` takes GET only.
    let (status, _, body) = shop(&["-X", "POST", "--data-binary", "x", &format!("{base}/page")]);
    assert_eq!(status, 405, "{}", String::from_utf8_lossy(&body));

    // 20 MB up.
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let upload = dev.state.path().join("upload.bin");
    std::fs::write(&upload, &big).unwrap();
    let (status, _, body) = shop(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/octet-stream",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("{base}/api/upload"),
    ]);
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&body));
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["len"], big.len());
    assert_eq!(echo["sha256"], hex::encode(sha2::Sha256::digest(&big)));

    // A streamed answer: the first event is read while the function still
    // waits to write the last.
    let mut sse = Command::new("curl")
        .arg("--cacert")
        .arg(&ca)
        .args([
            "--resolve",
            &resolve,
            "-sS",
            "-N",
            "--max-time",
            "60",
            &format!("{base}/api/sse"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run curl");
    let mut lines = BufReader::new(sse.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().expect("an event").unwrap(), "data: first");
    let (status, _, _) = shop(&["-X", "POST", &format!("{base}/api/release")]);
    assert_eq!(status, 200);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    assert!(sse.wait().unwrap().success());
    assert!(rest.contains(&"data: released".to_owned()), "{rest:?}");

    // A TLSv1.3-only domain refuses TLS 1.2 and serves TLS 1.3.
    let (cert, key) = issue("secure.example.test");
    cli_json(
        &dev,
        &[
            "domains",
            "create",
            "secure.example.test",
            "--cert",
            &cert,
            "--key",
            &key,
            "--route",
            "/*=web",
            "--min-tls",
            "TLSv1.3",
            "-o",
            "json",
        ],
    );
    let resolve = format!("secure.example.test:{port}:127.0.0.1");
    let secure = format!("https://secure.example.test:{port}/x");
    let e = curl(&ca, &resolve, &["--tlsv1.2", "--tls-max", "1.2", &secure]).unwrap_err();
    assert!(!e.is_empty());
    let (status, _, _) = curl(&ca, &resolve, &["--tlsv1.3", &secure]).unwrap();
    assert_eq!(status, 201);
    let (status, _, _) = curl(
        &ca,
        &format!("shop.example.test:{port}:127.0.0.1"),
        &["--tlsv1.2", "--tls-max", "1.2", &format!("{base}/x")],
    )
    .unwrap();
    assert_eq!(status, 201, "the default domain takes TLS 1.2");

    // Deleted: the name is no longer served with the owner's certificate.
    let out = dev.cli(&["domains", "delete", "secure.example.test"]);
    assert!(out.status.success());
    assert!(curl(&ca, &resolve, &[&secure]).is_err());
}
