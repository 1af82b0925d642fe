//! FC's layers end to end on `kiln dev` (runc sandboxes): a function's
//! layers are merged under `/opt` with the first listed layer winning, an
//! instance's changes under `/opt` stay in that instance, and a new
//! instance starts from the layers again.

mod common;

use std::io::Write;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};

use common::Dev;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(0o644);
    for (name, data) in files {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Reads and writes files on request: `{"sleep": s, "write": [path, text],
/// "read": [paths]}`, writing before sleeping and reading after.
const SERVER: &str = r#"
import json, os, socket, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ev = json.loads(raw or b"{}")
        out = {"host": socket.gethostname(), "read": {}}
        if ev.get("write"):
            path, text = ev["write"]
            try:
                with open(path, "w") as f:
                    f.write(text)
                out["wrote"] = True
            except OSError as e:
                out["wrote"] = str(e)
        time.sleep(float(ev.get("sleep", 0)))
        for p in ev.get("read", []):
            try:
                with open(p) as f:
                    out["read"][p] = f.read()
            except OSError as e:
                out["read"][p] = "ERR " + e.strerror
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("FC_CUSTOM_LISTEN_PORT", "9000"))), H).serve_forever()
"#;

async fn create_layer(c: &kiln::client::FcClient, name: &str, files: &[(&str, &[u8])]) -> Value {
    let doc = json!({
        "code": {"zipFile": b64(&zip_of(files))},
        "compatibleRuntime": ["custom.debian12"],
    });
    let r = c
        .request(
            Method::POST,
            &format!("/2023-03-30/layers/{name}/versions"),
            &[],
            &[],
            Bytes::from(doc.to_string()),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json().unwrap()
}

async fn call(dev: &Dev, c: &kiln::client::FcClient, event: Value) -> Value {
    let r = c
        .invoke("layered", Bytes::from(event.to_string()), &[])
        .await
        .unwrap();
    assert_eq!(
        r.status,
        200,
        "{:?}\n{}",
        String::from_utf8_lossy(&r.body),
        dev.log_tail()
    );
    r.json().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_merge_under_opt_first_wins_and_changes_stay_in_the_instance() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    let first = create_layer(
        &c,
        "first",
        &[("shared/same.txt", b"from-first"), ("first.txt", b"1")],
    )
    .await;
    let second = create_layer(
        &c,
        "second",
        &[("shared/same.txt", b"from-second"), ("second.txt", b"2")],
    )
    .await;
    let created = c
        .create_function(&json!({
            "functionName": "layered",
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "memorySize": 256,
            "timeout": 30,
            "instanceConcurrency": 1,
            "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
            "code": {"zipFile": b64(&zip_of(&[("server.py", SERVER.as_bytes())]))},
            "layers": [first["layerVersionArn"], second["layerVersionArn"]],
        }))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    assert_eq!(created["layers"][0]["arn"], first["layerVersionArn"]);

    let reads = json!(["/opt/shared/same.txt", "/opt/first.txt", "/opt/second.txt"]);
    let out = call(&dev, &c, json!({"read": reads})).await;
    assert_eq!(
        out["read"],
        json!({
            "/opt/shared/same.txt": "from-first",
            "/opt/first.txt": "1",
            "/opt/second.txt": "2",
        }),
        "FC: the layer listed first wins"
    );

    // One instance changes /opt while another serves a call: the other
    // does not see the change.
    let writer = {
        let c = dev.client();
        tokio::spawn(async move {
            let r = c
                .invoke(
                    "layered",
                    Bytes::from(
                        json!({"write": ["/opt/shared/same.txt", "changed"], "sleep": 4,
                               "read": ["/opt/shared/same.txt"]})
                        .to_string(),
                    ),
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
            r.json().unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let other = call(
        &dev,
        &c,
        json!({"sleep": 0.5, "read": ["/opt/shared/same.txt"]}),
    )
    .await;
    let wrote: Value = writer.await.unwrap();
    assert_eq!(wrote["wrote"], true, "{wrote}");
    assert_eq!(wrote["read"]["/opt/shared/same.txt"], "changed");
    assert_ne!(other["host"], wrote["host"], "two instances");
    assert_eq!(other["read"]["/opt/shared/same.txt"], "from-first");

    // A new revision means new instances: they start from the layers.
    c.update_function(
        "layered",
        &json!({"environmentVariables": {"REVISION": "2"}}),
    )
    .await
    .unwrap();
    let fresh = call(&dev, &c, json!({"read": ["/opt/shared/same.txt"]})).await;
    assert_ne!(fresh["host"], wrote["host"]);
    assert_eq!(fresh["read"]["/opt/shared/same.txt"], "from-first");

    // Reordering the layers flips which one wins.
    c.update_function(
        "layered",
        &json!({"layers": [second["layerVersionArn"], first["layerVersionArn"]]}),
    )
    .await
    .unwrap();
    let flipped = call(&dev, &c, json!({"read": ["/opt/shared/same.txt"]})).await;
    assert_eq!(flipped["read"]["/opt/shared/same.txt"], "from-second");
}
