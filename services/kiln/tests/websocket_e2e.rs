//! WebSocket upgrades through an HTTP trigger, end to end on `kiln dev`
//! (runc sandboxes): a real WebSocket client (tokio-tungstenite, over TLS
//! trusting the dev CA, as `curl --cacert` does) opens a WebSocket at the
//! trigger's URL; the handshake reaches the custom-runtime function's own
//! HTTP server (a Python app that answers it by hand), and text and binary
//! frames come back echoed, through the trigger and through a custom
//! domain routed to the function. Closing from either side ends the connection,
//! the function's timeout ends it too, an open WebSocket holds its
//! instance (idle reaping does not take it), other upgrades (h2c) are
//! refused with FC's error, and an `authType: function` trigger refuses an
//! unsigned handshake and takes a signed one.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

use common::Dev;

/// A web function answering WebSocket handshakes itself (Python's stdlib
/// has no WebSocket server: the accept key is sha1+base64 of the key):
/// `/ws` echoes every frame, `/ws-bye` closes when told "bye",
/// `/ws-refuse` answers 403 without upgrading, and any other GET answers
/// with the process id.
const SERVER: &str = r#"
import base64, hashlib, json, os, struct
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def read_frame(f):
    h = f.read(2)
    if len(h) < 2:
        return None, None
    op, n = h[0] & 0x0F, h[1] & 0x7F
    if n == 126:
        n = struct.unpack(">H", f.read(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", f.read(8))[0]
    mask = f.read(4) if h[1] & 0x80 else b"\0\0\0\0"
    data = bytearray(f.read(n))
    for i in range(len(data)):
        data[i] ^= mask[i % 4]
    return op, bytes(data)
def write_frame(w, op, data):
    n = len(data)
    if n < 126:
        head = bytes([0x80 | op, n])
    elif n < 65536:
        head = bytes([0x80 | op, 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | op, 127]) + struct.pack(">Q", n)
    w.write(head + data)
    w.flush()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.path.startswith("/ws-refuse"):
            self.send_response(403)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"not for you")
            return
        if self.headers.get("Upgrade", "").lower() != "websocket":
            data = json.dumps({"pid": os.getpid(), "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.send_header("X-Pid", str(os.getpid()))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        while True:
            op, data = read_frame(self.rfile)
            if op is None:
                return
            if op == 8:
                write_frame(self.wfile, 8, data)
                return
            if op == 9:
                write_frame(self.wfile, 10, data)
                continue
            if self.path.startswith("/ws-bye") and data == b"bye":
                write_frame(self.wfile, 8, struct.pack(">H", 1000) + b"function closes")
                return
            write_frame(self.wfile, op, data)
ThreadingHTTPServer(("0.0.0.0", 9000), H).serve_forever()
"#;

/// The function's timeout: an open WebSocket is cut when it runs out.
const TIMEOUT_S: u64 = 12;

fn code() -> Value {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    w.start_file("server.py", opts).unwrap();
    w.write_all(SERVER.as_bytes()).unwrap();
    let zip = w.finish().unwrap().into_inner();
    json!({"zipFile": base64::engine::general_purpose::STANDARD.encode(zip)})
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// Open a WebSocket at `url` (`https://host:port/path`) over TLS trusting
/// `ca`, with `extra` headers: the stream and the handshake's answer, or
/// the refusal's status and body.
async fn connect(
    ca: &Path,
    url: &str,
    extra: &[(String, String)],
) -> Result<(Ws, http::Response<Option<Vec<u8>>>), (u16, String)> {
    let uri: http::Uri = url.parse().unwrap();
    let host = uri.host().unwrap().to_owned();
    let port = uri.port_u16().unwrap();
    let mut req = http::Request::get(format!(
        "wss://{}{}",
        uri.authority().unwrap(),
        uri.path_and_query().unwrap()
    ))
    .header("host", uri.authority().unwrap().as_str())
    .header("connection", "Upgrade")
    .header("upgrade", "websocket")
    .header("sec-websocket-version", "13")
    .header(
        "sec-websocket-key",
        tungstenite::handshake::client::generate_key(),
    );
    for (k, v) in extra {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req.body(()).unwrap();
    let mut tls = (*kiln_pki::public_client_config(ca).unwrap()).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    // *.localhost is loopback (curl knows it; the resolver may not).
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(host).unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    match tokio_tungstenite::client_async(req, stream).await {
        Ok(ok) => Ok(ok),
        Err(tungstenite::Error::Http(resp)) => Err((
            resp.status().as_u16(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        )),
        Err(e) => panic!("WebSocket handshake with {url} failed: {e}"),
    }
}

/// The next data frame, within a while.
async fn next(ws: &mut Ws) -> Message {
    tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("a frame within 20 s")
        .expect("the stream is open")
        .expect("a frame")
}

async fn echoes(ws: &mut Ws, msg: Message) {
    ws.send(msg.clone()).await.unwrap();
    assert_eq!(next(ws).await, msg);
}

/// The ACS3 headers of a GET of `url` (signed as the SDK signs).
fn signed_headers(dev: &Dev, url: &str) -> Vec<(String, String)> {
    let uri: http::Uri = url.parse().unwrap();
    let mut h = http::HeaderMap::new();
    h.insert("host", uri.authority().unwrap().as_str().parse().unwrap());
    let nonce = kiln_auth::new_nonce();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let params = kiln_auth::SigningParams::new(
        &dev.creds.access_key_id,
        &dev.creds.access_key_secret,
        now,
        &nonce,
    );
    kiln_auth::sign(&http::Method::GET, &uri, &mut h, b"", &params).unwrap();
    h.iter()
        .filter(|(k, _)| *k != "host")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_pass_through_an_http_trigger() {
    if common::skip() || common::skip_without(&["curl"]) {
        return;
    }
    // Idle instances go after 2 s: an open WebSocket must hold its one.
    let dev = Dev::start_with(&["--idle-timeout", "2"]);
    let ca = dev.state.path().join("pki").join("ca.pem");
    dev.client()
        .create_function(&json!({
            "functionName": "ws",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 256,
            "timeout": TIMEOUT_S,
            "instanceConcurrency": 10,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "code": code(),
        }))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    let t = cli_json(
        &dev,
        &[
            "triggers", "create", "ws", "site", "--type", "http", "--method", "GET", "-o", "json",
        ],
    );
    let url = t["httpTrigger"]["urlInternet"].as_str().unwrap().to_owned();

    // Text and binary frames, small and large, echoed by the function.
    let (mut ws, answer) = connect(&ca, &format!("{url}/ws"), &[])
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dev.log_tail()));
    assert_eq!(answer.status(), 101);
    assert!(answer.headers().contains_key("x-fc-request-id"));
    let pid = answer.headers()["x-pid"].to_str().unwrap().to_owned();
    echoes(&mut ws, Message::text("hello through the trigger")).await;
    echoes(&mut ws, Message::binary(vec![0u8, 1, 2, 254, 255])).await;
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    echoes(&mut ws, Message::binary(big)).await;

    // The same through a custom domain routed to the function: its own
    // certificate (from its owner's CA), chosen by SNI.
    let owner = kiln_pki::Ca::generate("domain owner").unwrap();
    let dir = dev.state.path().join("owner");
    std::fs::create_dir_all(&dir).unwrap();
    let owner_ca = dir.join("ca.pem");
    std::fs::write(&owner_ca, owner.cert_pem()).unwrap();
    let domain = "ws.example.test";
    let (cert, key) = (dir.join("ws.pem"), dir.join("ws.key"));
    owner
        .issue(&kiln_pki::CertRequest::public_server(domain).names(&[domain.to_owned()]))
        .unwrap()
        .write(&cert, &key)
        .unwrap();
    cli_json(
        &dev,
        &[
            "domains",
            "create",
            domain,
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--route",
            "/*=ws",
            "-o",
            "json",
        ],
    );
    let port = url.rsplit(':').next().unwrap();
    let (mut via_domain, answer) = connect(&owner_ca, &format!("https://{domain}:{port}/ws"), &[])
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", dev.log_tail()));
    assert_eq!(answer.status(), 101);
    echoes(&mut via_domain, Message::text("hello through the domain")).await;
    echoes(&mut via_domain, Message::binary(vec![9u8; 70_000])).await;
    via_domain.close(None).await.unwrap();

    // Held open past the idle timeout (and the scheduler's sweep), the
    // WebSocket is one call in flight: its instance is not released and
    // the same process still echoes, and answers a plain call too.
    tokio::time::sleep(Duration::from_secs(5)).await;
    echoes(&mut ws, Message::text("still here")).await;
    let out = Command::new("curl")
        .arg("--cacert")
        .arg(&ca)
        .args(["-sS", "--max-time", "30", &format!("{url}/pid")])
        .output()
        .unwrap();
    let plain: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(plain["pid"].to_string(), pid, "the instance was kept");

    // The client closes: the function answers the close and the stream
    // ends.
    ws.close(None).await.unwrap();
    // Frames until the end: the function's echoed close, then none.
    while let Some(Ok(_)) = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("the close completes")
    {}

    // The function closes: its close frame arrives, then the end.
    let (mut ws, _) = connect(&ca, &format!("{url}/ws-bye"), &[]).await.unwrap();
    echoes(&mut ws, Message::text("before")).await;
    ws.send(Message::text("bye")).await.unwrap();
    match next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Normal);
            assert_eq!(f.reason, "function closes");
        }
        other => panic!("expected the function's close, got {other:?}"),
    }
    let end = tokio::time::timeout(Duration::from_secs(20), ws.next())
        .await
        .expect("the connection ends");
    assert!(!matches!(
        end,
        Some(Ok(Message::Text(_) | Message::Binary(_)))
    ));

    // The function's timeout ends an open WebSocket.
    let opened = Instant::now();
    let (mut ws, _) = connect(&ca, &format!("{url}/ws"), &[]).await.unwrap();
    echoes(&mut ws, Message::text("until the timeout")).await;
    let end = tokio::time::timeout(Duration::from_secs(TIMEOUT_S + 30), ws.next())
        .await
        .expect("the timeout ends the WebSocket");
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    let lasted = opened.elapsed();
    assert!(
        lasted >= Duration::from_secs(TIMEOUT_S - 1),
        "cut after {lasted:?}, before the function's {TIMEOUT_S} s"
    );
    // The agent cuts it at the timeout (the gateway's own bound is 10 s
    // later).
    assert!(
        lasted < Duration::from_secs(TIMEOUT_S + 8),
        "still open {lasted:?} after the handshake"
    );

    // A function that answers the handshake without upgrading: its own
    // answer comes back, and no WebSocket is opened.
    let (status, body) = match connect(&ca, &format!("{url}/ws-refuse"), &[]).await {
        Err(refused) => refused,
        Ok(_) => panic!("the function refused, yet a WebSocket opened"),
    };
    assert_eq!((status, body.as_str()), (403, "not for you"));

    // Other upgrades are refused with FC's error.
    let out = Command::new("curl")
        .arg("--cacert")
        .arg(&ca)
        .args([
            "-sS",
            "--http1.1",
            "--max-time",
            "30",
            "-H",
            "Connection: Upgrade, HTTP2-Settings",
            "-H",
            "Upgrade: h2c",
            "-H",
            "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
            "-w",
            "\n%{http_code}",
            &format!("{url}/ws"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap();
    assert_eq!(status, "400", "{text}");
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["Code"], "InvalidArgument", "{v}");
    assert!(v["Message"].as_str().unwrap().contains("h2c"), "{v}");

    // authType function: the handshake is checked as any request.
    cli_json(
        &dev,
        &[
            "triggers", "update", "ws", "site", "--method", "GET", "--auth", "function", "-o",
            "json",
        ],
    );
    let target = format!("{url}/ws");
    let Err((status, body)) = connect(&ca, &target, &[]).await else {
        panic!("an unsigned handshake was accepted");
    };
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Code"], "AccessDenied", "{v}");
    let (mut ws, _) = connect(&ca, &target, &signed_headers(&dev, &target))
        .await
        .unwrap_or_else(|e| panic!("the signed handshake was refused: {e:?}"));
    echoes(&mut ws, Message::text("signed")).await;
    ws.close(None).await.unwrap();

    // A function whose invocations are disabled takes no WebSocket either.
    let r = dev
        .client()
        .request(
            http::Method::POST,
            "/2023-03-30/functions/ws/invoke/disable",
            &[],
            &[],
            bytes::Bytes::from_static(br#"{"reason": "closed"}"#),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let Err((status, body)) = connect(&ca, &target, &signed_headers(&dev, &target)).await else {
        panic!("a disabled function took a WebSocket");
    };
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Code"], "FunctionInvocationDisabled", "{v}");
}
