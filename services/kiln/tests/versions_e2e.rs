//! Versions and aliases end to end on `kiln dev` (runc sandboxes): each
//! version runs its own code in its own instances (and the runtime is told
//! which version it serves), a weighted alias splits 10,000 calls within
//! statistical bounds, and rolling the alias forward while calls run moves
//! every new call to the new version without a failed call.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};

use common::Dev;

fn zip_of(files: &[(&str, &[u8])]) -> String {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    for (name, data) in files {
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(w.finish().unwrap().into_inner())
}

/// Answers with its code's tag, the qualifier it was started for, and its
/// host name (one per instance).
const SERVER: &str = r#"
import json, os, socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
TAG = open(os.path.join(os.path.dirname(__file__), "tag.txt")).read().strip()
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = json.dumps({"tag": TAG, "qualifier": self.headers.get("x-fc-qualifier"),
                           "host": socket.gethostname()}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
ThreadingHTTPServer(("0.0.0.0", 9000), H).serve_forever()
"#;

fn code(tag: &str) -> Value {
    json!({"zipFile": zip_of(&[("server.py", SERVER.as_bytes()), ("tag.txt", tag.as_bytes())])})
}

async fn call(c: &kiln::client::FcClient, q: Option<&str>) -> Result<Value, String> {
    let r = c
        .invoke_qualified("canary", q, Bytes::from_static(b"{}"), &[])
        .await
        .map_err(|e| e.to_string())?;
    if r.status != 200 || r.header("x-fc-error-type").is_some() {
        return Err(format!("{} {}", r.status, String::from_utf8_lossy(&r.body)));
    }
    r.json().map_err(|e| e.to_string())
}

async fn post(c: &kiln::client::FcClient, method: http::Method, path: &str, body: Value) -> Value {
    let r = c
        .request(method, path, &[], &[], Bytes::from(body.to_string()))
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
async fn versions_run_their_own_code_and_aliases_split_and_roll() {
    if common::skip() {
        return;
    }
    let dev = Dev::start();
    let c = dev.client();
    c.create_function(&json!({
        "functionName": "canary",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "timeout": 30,
        "instanceConcurrency": 20,
        "customRuntimeConfig": {"command": ["python3", "server.py"], "port": 9000},
        "code": code("one"),
    }))
    .await
    .unwrap_or_else(|e| panic!("create failed: {e}\n{}", dev.log_tail()));
    let base = "/2023-03-30/functions/canary";
    let v1 = post(
        &c,
        http::Method::POST,
        &format!("{base}/versions"),
        json!({}),
    )
    .await;
    assert_eq!(v1["versionId"], "1");
    c.update_function("canary", &json!({"code": code("two")}))
        .await
        .unwrap();
    let v2 = post(
        &c,
        http::Method::POST,
        &format!("{base}/versions"),
        json!({}),
    )
    .await;
    assert_eq!(v2["versionId"], "2");

    // Each qualifier runs its own code in its own instance.
    let latest = call(&c, None)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", dev.log_tail()));
    let one = call(&c, Some("1"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", dev.log_tail()));
    let two = call(&c, Some("2"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", dev.log_tail()));
    assert_eq!(
        (latest["tag"].as_str(), latest["qualifier"].as_str()),
        (Some("two"), Some("LATEST"))
    );
    assert_eq!(
        (one["tag"].as_str(), one["qualifier"].as_str()),
        (Some("one"), Some("1"))
    );
    assert_eq!(
        (two["tag"].as_str(), two["qualifier"].as_str()),
        (Some("two"), Some("2"))
    );
    let hosts: std::collections::HashSet<_> = [&latest, &one, &two]
        .iter()
        .map(|v| v["host"].to_string())
        .collect();
    assert_eq!(
        hosts.len(),
        3,
        "LATEST, 1 and 2 each have their own instance"
    );
    // ListInstances names each instance's version and filters by qualifier.
    let listed = |q: &str| {
        let c = &c;
        let path = format!("{base}/instances{q}");
        async move {
            let r = c
                .request(http::Method::GET, &path, &[], &[], Bytes::new())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let v = r.json().unwrap();
            let mut qs: Vec<String> = v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["qualifier"].as_str().unwrap().to_owned())
                .collect();
            qs.sort();
            qs
        }
    };
    assert_eq!(listed("").await, ["1", "2", "LATEST"]);
    assert_eq!(listed("?qualifier=1").await, ["1"]);
    assert_eq!(listed("?qualifier=LATEST").await, ["LATEST"]);
    // A new LATEST does not take version 2's instance away.
    c.update_function("canary", &json!({"code": code("three")}))
        .await
        .unwrap();
    assert_eq!(call(&c, None).await.unwrap()["tag"], "three");
    let again = call(&c, Some("2")).await.unwrap();
    assert_eq!(
        (again["tag"].as_str(), &again["host"]),
        (Some("two"), &two["host"])
    );

    // 10% on version 2: 10,000 calls by 16 callers.
    post(
        &c,
        http::Method::POST,
        &format!("{base}/aliases"),
        json!({"aliasName": "prod", "versionId": "1", "additionalVersionWeight": {"2": 0.1}}),
    )
    .await;
    let n = 10_000;
    let counts = Arc::new(Mutex::new((0usize, 0usize, Vec::<String>::new())));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (c, counts, next) = (dev.client(), counts.clone(), next.clone());
            tokio::spawn(async move {
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                    let r = call(&c, Some("prod")).await;
                    let mut k = counts.lock().unwrap();
                    match r {
                        Ok(v) if v["tag"] == "one" => k.0 += 1,
                        Ok(v) if v["tag"] == "two" => k.1 += 1,
                        Ok(v) => k.2.push(format!("unexpected answer {v}")),
                        Err(e) => k.2.push(e),
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let (to_v1, to_v2, failures) = counts.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failed calls: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(to_v1 + to_v2, n);
    // Binomial(10000, 0.1): mean 1000, sd 30; 4 sd either side.
    assert!(
        (880..=1120).contains(&to_v2),
        "{to_v2} of {n} calls on version 2"
    );
    eprintln!(
        "canary split: {to_v2} of {n} calls on version 2 in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Roll forward while 8 callers keep calling: no call fails, and every
    // call started after the update answers from version 2.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::<(Instant, Result<Value, String>)>::new()));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (c, stop, log) = (dev.client(), stop.clone(), log.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let at = Instant::now();
                    let r = call(&c, Some("prod")).await;
                    log.lock().unwrap().push((at, r));
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    post(
        &c,
        http::Method::PUT,
        &format!("{base}/aliases/prod"),
        json!({"versionId": "2", "additionalVersionWeight": {}}),
    )
    .await;
    let rolled = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in callers {
        w.await.unwrap();
    }
    let log = log.lock().unwrap();
    let failed: Vec<_> = log.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during the roll: {:?}",
        failed.len(),
        log.len(),
        &failed[..failed.len().min(5)]
    );
    let after: Vec<_> = log.iter().filter(|(at, _)| *at > rolled).collect();
    assert!(
        after.len() > 10,
        "calls kept running after the roll: {}",
        after.len()
    );
    assert!(
        after
            .iter()
            .all(|(_, r)| r.as_ref().unwrap()["tag"] == "two"),
        "every call after the roll ran version 2"
    );
    let before = log.iter().filter(|(at, _)| *at < rolled).count();
    eprintln!(
        "roll forward: {before} calls before, {} after, none failed",
        after.len()
    );
}
