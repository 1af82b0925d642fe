//! The real gateway on loopback (DevPki in a tempdir, port 0) with a fake
//! scheduler and a fake agent (real mTLS), driven with signed requests.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kiln_core::{FcError, FcErrorCode, InstanceId, LeaseId, NodeId};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayConfig, GatewayHandle};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::{AcquireLease, Lease, ReleaseLease, RetireFunction};
use kiln_pki::DevPki;
use serde_json::{json, Value};

/// What the fakes saw.
#[derive(Default)]
struct Seen {
    acquired: Vec<AcquireLease>,
    released: Vec<(String, ReleaseLease)>,
    retired: Vec<RetireFunction>,
    invoked: Vec<(HeaderMap, Bytes)>,
    /// When set, the scheduler refuses leases with this error.
    refuse: Option<FcError>,
}

type Shared = Arc<Mutex<Seen>>;

struct Env {
    _dir: tempfile::TempDir,
    state_dir: std::path::PathBuf,
    pki: DevPki,
    gateway: Option<GatewayHandle>,
    seen: Shared,
    scheduler_url: String,
    _stop: tokio::sync::watch::Sender<bool>,
}

async fn fake_scheduler(
    req: Request<hyper::body::Incoming>,
    seen: Shared,
    agent_url: String,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    let path = parts.uri.path().to_owned();
    match (parts.method.clone(), path.as_str()) {
        (Method::POST, "/v1/leases") => {
            let msg: AcquireLease = serde_json::from_slice(&bytes).unwrap();
            assert!(msg.spec.is_sealed());
            let mut s = seen.lock().unwrap();
            s.acquired.push(msg);
            if let Some(e) = &s.refuse {
                return server::error(e, "sched");
            }
            let lease = Lease {
                lease_id: LeaseId::generate(),
                instance_id: InstanceId::generate(),
                node_id: NodeId::generate(),
                agent_url,
                cold_start: false,
                expires_in_ms: 600_000,
            };
            server::json(StatusCode::OK, &lease)
        }
        (Method::DELETE, p) if p.starts_with("/v1/leases/") => {
            let msg: ReleaseLease = serde_json::from_slice(&bytes).unwrap();
            seen.lock().unwrap().released.push((p.to_owned(), msg));
            server::no_content()
        }
        (Method::POST, "/v1/functions/retire") => {
            let msg: RetireFunction = serde_json::from_slice(&bytes).unwrap();
            seen.lock().unwrap().retired.push(msg);
            server::no_content()
        }
        // The dev agent's node (n-dev) holds every code package; no other
        // node holds any.
        (Method::GET, p) if p.starts_with("/v1/nodes/n-dev/code/") => server::no_content(),
        _ => server::not_found(&path, "sched"),
    }
}

/// The fake agent answers by the payload's first word.
async fn fake_agent(req: Request<hyper::body::Incoming>, seen: Shared) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    assert!(parts.uri.path().ends_with("/invoke"), "{}", parts.uri);
    seen.lock()
        .unwrap()
        .invoked
        .push((parts.headers.clone(), bytes.clone()));
    let text = String::from_utf8_lossy(&bytes).to_string();
    use kiln_internal_api::{InvokeFailure, InvokeOutcome};
    let outcome = |o: InvokeOutcome| ("x-kiln-invoke-outcome", o.as_str().to_owned());
    let (status, headers, body): (u16, Vec<(&str, String)>, Vec<u8>) = if text.starts_with("fail") {
        (
            404,
            vec![
                outcome(InvokeOutcome::FunctionError),
                ("x-fc-status", "404".into()),
            ],
            b"{\"error\":\"bad\"}".to_vec(),
        )
    } else if text.starts_with("crash") {
        // As the agent answers when the runtime's connection broke.
        (
            200,
            vec![outcome(InvokeOutcome::InstanceFailed)],
            serde_json::to_vec(&InvokeFailure {
                message: "Process exited unexpectedly before completing request (duration: 12ms)"
                    .into(),
            })
            .unwrap(),
        )
    } else if text.starts_with("timeout") {
        (504, vec![outcome(InvokeOutcome::Timeout)], b"{}".to_vec())
    } else if text.starts_with("slow") {
        tokio::time::sleep(Duration::from_secs(5)).await;
        (200, vec![outcome(InvokeOutcome::Ok)], bytes.to_vec())
    } else if text.starts_with("drip") {
        // A first chunk, then nothing for a long while.
        let frames = futures_util::stream::unfold(0u8, |n| async move {
            if n == 0 {
                let f = hyper::body::Frame::data(Bytes::from_static(b"first"));
                return Some((Ok::<_, kiln_internal_api::server::BoxError>(f), 1));
            }
            tokio::time::sleep(Duration::from_secs(30)).await;
            None
        });
        return Response::builder()
            .status(200)
            .header("x-kiln-invoke-outcome", "ok")
            .body(http_body_util::StreamBody::new(frames).boxed())
            .unwrap();
    } else if text.starts_with("gone") {
        let e = FcError::new(FcErrorCode::FunctionNotStarted, "instance is gone");
        (502, vec![], e.to_body("agent").into_bytes())
    } else {
        (
            200,
            vec![
                outcome(InvokeOutcome::Ok),
                ("x-answer", "yes".into()),
                ("x-fc-status", "200".into()),
            ],
            bytes.to_vec(),
        )
    };
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    b.body(full(body)).unwrap()
}

fn config(
    state_dir: &std::path::Path,
    pki: &DevPki,
    scheduler_url: &str,
    hold_ms: u64,
) -> GatewayConfig {
    GatewayConfig {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        lease_hold_ms: hold_ms,
        async_queue: kiln_gateway::config::AsyncQueueConfig {
            webhook_ca: Some(pki.ca_cert()),
            backoff_cap_ms: 1_000,
            ..Default::default()
        },
        bootstrap_keys: vec![
            BootstrapKey::new(ACCOUNT_A.parse().unwrap(), AK_A, SK_A),
            BootstrapKey::new(ACCOUNT_B.parse().unwrap(), AK_B, SK_B),
        ],
        ..GatewayConfig::loopback(state_dir.to_owned(), "cn-test", scheduler_url, pki)
    }
}

impl Env {
    async fn new() -> Env {
        Self::with_hold(0).await
    }

    async fn with_hold(hold_ms: u64) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let seen: Shared = Arc::default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let agent_tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
        let s = seen.clone();
        let agent = serve_fake(agent_tls, rx.clone(), move |r| fake_agent(r, s.clone())).await;
        let agent_url = format!("https://127.0.0.1:{}", agent.port());
        let sched_tls = kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap();
        let s = seen.clone();
        let sched = serve_fake(sched_tls, rx, move |r| {
            fake_scheduler(r, s.clone(), agent_url.clone())
        })
        .await;
        let scheduler_url = format!("https://127.0.0.1:{}", sched.port());
        let state_dir = dir.path().join("gateway");
        let gateway = kiln_gateway::start(config(&state_dir, &pki, &scheduler_url, hold_ms))
            .await
            .unwrap();
        Env {
            _dir: dir,
            state_dir,
            pki,
            gateway: Some(gateway),
            seen,
            scheduler_url,
            _stop: tx,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.gateway.as_ref().unwrap().public_addr()
    }

    fn client(&self, ak: &'static str, sk: &'static str) -> Api {
        Api::new(&self.pki, self.addr(), ak, sk, false)
    }

    async fn restart(&mut self) {
        self.gateway.take().unwrap().shutdown().await;
        let g = kiln_gateway::start(config(&self.state_dir, &self.pki, &self.scheduler_url, 0))
            .await
            .unwrap();
        self.gateway = Some(g);
    }
}

impl Api {
    async fn create(&self, doc: &Value) -> Answer {
        self.call(
            Method::POST,
            "/2023-03-30/functions",
            doc.to_string().into_bytes(),
        )
        .await
    }

    async fn get(&self, name: &str) -> Answer {
        self.call(
            Method::GET,
            &format!("/2023-03-30/functions/{name}"),
            vec![],
        )
        .await
    }

    async fn invoke(&self, name: &str, payload: &[u8], headers: &[(&str, &str)]) -> Answer {
        let path = format!("/2023-03-30/functions/{name}/invocations");
        self.send(self.signed(Method::POST, &path, payload.to_vec(), headers, now_ms()))
            .await
    }
}

fn function_doc(name: &str, zip: &[u8]) -> Value {
    json!({
        "functionName": name,
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 1024,
        "timeout": 10,
        "instanceConcurrency": 4,
        "environmentVariables": {"GREETING": "hi"},
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": b64(zip)},
        "description": "test function",
        "resourceGroupId": "rg-echoed",
    })
}

fn app_zip() -> Vec<u8> {
    zip_of(&[("app.py", b"print('hello')\n")])
}

#[tokio::test]
async fn crud_listing_isolation_and_persistence() {
    let mut env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    let zip = app_zip();

    let r = a.create(&function_doc("hello", &zip)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    r.request_id();
    let f = r.json();
    assert_eq!(f["functionName"], "hello");
    assert_eq!(
        f["functionArn"],
        format!("acs:fc:cn-test:{ACCOUNT_A}:functions/hello")
    );
    assert_eq!(f["runtime"], "custom.debian12");
    assert_eq!(f["memorySize"], 1024);
    assert_eq!(f["cpu"], json!(0.5));
    assert_eq!(f["diskSize"], 512);
    assert_eq!(f["timeout"], 10);
    assert_eq!(f["instanceConcurrency"], 4);
    assert_eq!(f["environmentVariables"]["GREETING"], "hi");
    assert_eq!(f["customRuntimeConfig"]["port"], 9000);
    assert_eq!(f["codeSize"], zip.len());
    assert_eq!(
        f["codeChecksum"],
        kiln_gateway::checksum::code_checksum(&zip)
    );
    assert_eq!(f["state"], "Active");
    assert_eq!(f["lastUpdateStatus"], "Successful");
    assert_eq!(f["resourceGroupId"], "rg-echoed");
    assert!(f["createdTime"].as_str().unwrap().ends_with('Z'));
    let id = f["functionId"].as_str().unwrap().to_owned();

    a.create(&function_doc("hello", &zip))
        .await
        .fc_error(409, "FunctionAlreadyExists");

    let g = a.get("hello").await;
    assert_eq!(g.status, StatusCode::OK);
    assert_eq!(g.json()["functionId"], id.as_str());

    // Another account sees nothing of it.
    b.get("hello").await.fc_error(404, "FunctionNotFound");
    b.call(
        Method::PUT,
        "/2023-03-30/functions/hello",
        json!({"timeout": 5}).to_string().into_bytes(),
    )
    .await
    .fc_error(404, "FunctionNotFound");
    b.call(Method::DELETE, "/2023-03-30/functions/hello", vec![])
        .await
        .fc_error(404, "FunctionNotFound");
    b.invoke("hello", b"x", &[])
        .await
        .fc_error(404, "FunctionNotFound");
    let l = b.call(Method::GET, "/2023-03-30/functions", vec![]).await;
    assert_eq!(l.json()["functions"], json!([]));

    // Same name in another account is another function.
    assert_eq!(
        b.create(&function_doc("hello", &zip)).await.status,
        StatusCode::OK
    );

    // Paging.
    for n in ["p-1", "p-2", "p-3", "p-4", "p-5"] {
        assert_eq!(
            a.create(&function_doc(n, &zip)).await.status,
            StatusCode::OK
        );
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/2023-03-30/functions?prefix=p-&limit=2".to_owned();
        if let Some(t) = &token {
            path.push_str(&format!("&nextToken={t}"));
        }
        let l = a.call(Method::GET, &path, vec![]).await;
        assert_eq!(l.status, StatusCode::OK);
        let v = l.json();
        pages += 1;
        for f in v["functions"].as_array().unwrap() {
            names.push(f["functionName"].as_str().unwrap().to_owned());
        }
        match v["nextToken"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(names, ["p-1", "p-2", "p-3", "p-4", "p-5"]);
    assert_eq!(pages, 3);
    let all = a
        .call(Method::GET, "/2023-03-30/functions", vec![])
        .await
        .json();
    assert_eq!(all["functions"].as_array().unwrap().len(), 6);
    assert!(all.get("nextToken").is_none());
    a.call(Method::GET, "/2023-03-30/functions?limit=0", vec![])
        .await
        .fc_error(400, "InvalidArgument");
    a.call(Method::GET, "/2023-03-30/functions?limit=101", vec![])
        .await
        .fc_error(400, "InvalidArgument");
    a.call(
        Method::GET,
        "/2023-03-30/functions?nextToken=garbage!",
        vec![],
    )
    .await
    .fc_error(400, "InvalidArgument");

    // Update: memory changes, cpu follows, revision retired.
    let before = a.get("hello").await.json();
    let u = a
        .call(
            Method::PUT,
            "/2023-03-30/functions/hello",
            json!({"memorySize": 2048}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(u.status, StatusCode::OK, "{:?}", u.body);
    let u = u.json();
    assert_eq!(u["memorySize"], 2048);
    assert_eq!(u["cpu"], json!(1.0));
    assert_eq!(u["functionId"], before["functionId"]);
    assert_eq!(u["createdTime"], before["createdTime"]);
    assert_eq!(u["handler"], "index.handler");

    // A refused update leaves the function as it was.
    let before = a.get("hello").await.json();
    for bad in [
        json!({"memorySize": 100}),
        json!({"timeout": "ten"}),
        json!({"cpu": 8}),
        json!({"vpcConfig": {"vpcId": "v"}}),
        json!({"code": {"zipFile": b64(b"not a zip")}}),
    ] {
        a.call(
            Method::PUT,
            "/2023-03-30/functions/hello",
            bad.to_string().into_bytes(),
        )
        .await
        .fc_error(400, "InvalidArgument");
    }
    a.call(
        Method::PUT,
        "/2023-03-30/functions/hello",
        b"{oops".to_vec(),
    )
    .await
    .fc_error(400, "InvalidArgument");
    assert_eq!(a.get("hello").await.json(), before);

    // Delete.
    let d = a
        .call(Method::DELETE, "/2023-03-30/functions/p-5", vec![])
        .await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    d.request_id();
    a.get("p-5").await.fc_error(404, "FunctionNotFound");

    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let s = env.seen.lock().unwrap();
        let retired: Vec<_> = s
            .retired
            .iter()
            .map(|r| (r.function_name.to_string(), r.keep_revision.is_some()))
            .collect();
        assert!(retired.contains(&("hello".to_owned(), true)), "{retired:?}");
        assert!(retired.contains(&("p-5".to_owned(), false)), "{retired:?}");
    }

    // Everything survives a restart.
    env.restart().await;
    let a = env.client(AK_A, SK_A);
    assert_eq!(a.get("hello").await.json(), before);
    a.get("p-5").await.fc_error(404, "FunctionNotFound");

    // Code is stored once: hello, p-1..p-4 and B's hello share one file.
    let files: Vec<_> = std::fs::read_dir(env.state_dir.join("code"))
        .unwrap()
        .collect();
    assert_eq!(files.len(), 1);
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let zip = app_zip();
    let post = |body: Vec<u8>| a.call(Method::POST, "/2023-03-30/functions", body);

    let m = post(b"{\"functionName\": ".to_vec())
        .await
        .fc_error(400, "InvalidArgument");
    assert!(m.contains("JSON"), "{m}");
    let mut doc = function_doc("f", &zip);
    doc["memorySize"] = json!("1024");
    post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument");
    let mut doc = function_doc("f", &zip);
    doc["memorySize"] = json!(1000);
    assert!(post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument")
        .contains("memorySize"));
    let doc = function_doc("9-bad-name", &zip);
    assert!(post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument")
        .contains("functionName"));
    let mut doc = function_doc("f", &zip);
    doc["runtime"] = json!("python3.10");
    assert!(post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument")
        .contains("runtime"));
    let mut doc = function_doc("f", &zip);
    doc["nasConfig"] = json!({"mountPoints": []});
    assert!(post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument")
        .contains("nasConfig"));

    // Corrupt, escaping, bomb.
    let doc = function_doc("f", b"PK\x03\x04 this is not a zip");
    post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument");
    let doc = function_doc("f", &zip_of(&[("../escape.sh", b"#!/bin/sh\n")]));
    post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument");
    let doc = function_doc("f", &zip_of(&[("/etc/passwd", b"x")]));
    post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument");
    let zeros = vec![0u8; 600 * 1024 * 1024];
    let bomb = zip_of(&[("zeros", &zeros)]);
    drop(zeros);
    let doc = function_doc("f", &bomb);
    post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument");
    let mut doc = function_doc("f", &zip);
    doc["code"]["checksum"] = json!("12345");
    assert!(post(doc.to_string().into_bytes())
        .await
        .fc_error(400, "InvalidArgument")
        .contains("checksum"));

    // None of it created anything or stored any code.
    a.get("f").await.fc_error(404, "FunctionNotFound");
    let listed = a
        .call(Method::GET, "/2023-03-30/functions", vec![])
        .await
        .json();
    assert_eq!(listed["functions"], json!([]));
    assert_eq!(
        std::fs::read_dir(env.state_dir.join("code"))
            .unwrap()
            .count(),
        0
    );

    // Unknown paths and methods still answer in FC's shape.
    a.call(Method::GET, "/2023-03-30/nothing", vec![])
        .await
        .fc_error(404, "PathNotSupported");
    a.call(Method::PATCH, "/2023-03-30/functions/f", vec![])
        .await
        .fc_error(405, "MethodNotAllowed");
}

#[tokio::test]
async fn signatures_are_checked() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let path = "/2023-03-30/functions";

    // No signature at all.
    let req = Request::get(format!("{}{path}", a.base))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = a.send(req).await;
    assert_eq!(r.status.as_u16(), 400, "{:?}", r.body);
    r.fc_error(400, "MissingRequiredHeader");

    // Wrong secret.
    let wrong = env.client(AK_A, "not-the-secret-at-all");
    wrong
        .call(Method::GET, path, vec![])
        .await
        .fc_error(403, "SignatureNotMatch");
    // Unknown key.
    let unknown = env.client("AKUNKNOWN000", "whatever-secret-000");
    unknown
        .call(Method::GET, path, vec![])
        .await
        .fc_error(403, "InvalidAccessKeyId");
    // Stale.
    let stale = a.signed(Method::GET, path, vec![], &[], now_ms() - 16 * 60 * 1000);
    a.send(stale).await.fc_error(403, "RequestTimeTooSkewed");
    // Replayed.
    let req = a.signed(Method::GET, path, vec![], &[], now_ms());
    let copy = {
        let mut c = Request::builder()
            .method(Method::GET)
            .uri(req.uri().clone())
            .body(Full::new(Bytes::new()))
            .unwrap();
        *c.headers_mut() = req.headers().clone();
        c
    };
    assert_eq!(a.send(req).await.status, StatusCode::OK);
    let code = a.send(copy).await.json()["Code"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(code, "SignatureNonceUsed");
    // Body swapped after signing.
    let mut req = a.signed(
        Method::POST,
        path,
        function_doc("f", &app_zip()).to_string().into_bytes(),
        &[],
        now_ms(),
    );
    *req.body_mut() = Full::new(Bytes::from(function_doc("g", &app_zip()).to_string()));
    a.send(req).await.fc_error(403, "SignatureNotMatch");
    a.get("g").await.fc_error(404, "FunctionNotFound");
}

/// A client that goes away before the answer is complete may leave the
/// function running: the lease goes back with InstanceFailed so the
/// scheduler replaces the instance; a complete answer gives it back Ok.
#[tokio::test]
async fn a_client_gone_mid_call_releases_the_instance_as_failed() {
    use kiln_internal_api::LeaseOutcome;
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    assert_eq!(
        a.create(&function_doc("abort", &app_zip())).await.status,
        StatusCode::OK
    );
    let path = "/2023-03-30/functions/abort/invocations";
    let outcomes = |env: &Env| -> Vec<LeaseOutcome> {
        let s = env.seen.lock().unwrap();
        s.released.iter().map(|r| r.1.outcome).collect()
    };

    // Gone before the agent answers.
    let call = a.invoke("abort", b"slow", &[]);
    assert!(tokio::time::timeout(Duration::from_millis(500), call)
        .await
        .is_err());
    let o = wait_for("the abandoned lease's release", || {
        let o = outcomes(&env);
        (!o.is_empty()).then_some(o)
    })
    .await;
    assert_eq!(o, [LeaseOutcome::InstanceFailed]);

    // Gone in the middle of the answer.
    let req = a.signed(Method::POST, path, b"drip".to_vec(), &[], now_ms());
    let resp = a.http.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(&first[..], b"first");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(outcomes(&env).len(), 1, "held while the answer streams");
    drop(body);
    let o = wait_for("the half-read lease's release", || {
        let o = outcomes(&env);
        (o.len() == 2).then_some(o)
    })
    .await;
    assert_eq!(o[1], LeaseOutcome::InstanceFailed);

    // Read to the end: Ok.
    let r = a.invoke("abort", b"whole", &[]).await;
    assert_eq!(&r.body[..], b"whole");
    let o = wait_for("the complete call's release", || {
        let o = outcomes(&env);
        (o.len() == 3).then_some(o)
    })
    .await;
    assert_eq!(o[2], LeaseOutcome::Ok);
}

#[tokio::test]
async fn invoke_streams_through_scheduler_and_agent() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    assert_eq!(
        a.create(&function_doc("echo", &app_zip())).await.status,
        StatusCode::OK
    );

    let r = a
        .invoke(
            "echo",
            b"hello world",
            &[
                ("x-custom", "1"),
                ("x-fc-log-type", "None"),
                ("content-type", "text/plain"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"hello world");
    assert_eq!(r.headers["x-answer"], "yes");
    assert!(r.headers.get("x-fc-error-type").is_none());
    assert!(r.headers.get("x-fc-status").is_none());
    assert!(r.headers.get("x-kiln-invoke-outcome").is_none());
    let rid = r.request_id().to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let s = env.seen.lock().unwrap();
        let acq = s.acquired.last().unwrap();
        assert_eq!(acq.request_id, rid);
        assert_eq!(acq.spec.function_name.as_str(), "echo");
        assert_eq!(acq.spec.memory_mb, 1024);
        assert_eq!(acq.spec.concurrency, 4);
        assert_eq!(acq.spec.command, ["python3", "/code/app.py"]);
        let (h, body) = s.invoked.last().unwrap();
        assert_eq!(&body[..], b"hello world");
        assert_eq!(h["x-fc-request-id"], rid.as_str());
        assert_eq!(h["x-custom"], "1");
        assert_eq!(h["content-type"], "text/plain");
        assert!(h.get("authorization").is_none());
        assert!(h.get("x-acs-signature-nonce").is_none());
        assert!(h.get("x-fc-log-type").is_none());
        assert_eq!(s.released.len(), 1);
        assert_eq!(s.released[0].1.outcome, kiln_internal_api::LeaseOutcome::Ok);
    }

    // Function error: 200 with FC's error type, the function's body.
    let r = a.invoke("echo", b"fail please", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-fc-error-type"], "UnhandledInvocationError");
    assert_eq!(&r.body[..], b"{\"error\":\"bad\"}");
    r.request_id();

    // Crash and timeout: the instance is reported failed.
    let r = a.invoke("echo", b"crash", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-fc-error-type"], "UnhandledInvocationError");
    assert_eq!(
        r.json()["errorMessage"],
        "Process exited unexpectedly before completing request (duration: 12ms)",
        "the agent's account of the failure reaches the caller"
    );
    let r = a.invoke("echo", b"timeout", &[]).await;
    assert_eq!(r.headers["x-fc-error-type"], "UnhandledInvocationError");
    assert_eq!(
        r.json()["errorMessage"],
        "Function timed out after 10 seconds"
    );
    // The agent refusing the call itself: its FC error reaches the caller.
    a.invoke("echo", b"gone", &[])
        .await
        .fc_error(502, "FunctionNotStarted");
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let s = env.seen.lock().unwrap();
        let outcomes: Vec<_> = s.released.iter().map(|r| r.1.outcome).collect();
        use kiln_internal_api::LeaseOutcome::*;
        assert_eq!(
            outcomes,
            [Ok, Ok, InstanceFailed, InstanceFailed, InstanceFailed]
        );
    }

    // Neither Sync nor Async, other qualifiers, throttling: FC errors, no retries.
    a.invoke("echo", b"x", &[("x-fc-invocation-type", "Later")])
        .await
        .fc_error(400, "InvalidArgument");
    let path = "/2023-03-30/functions/echo/invocations?qualifier=prod";
    a.call(Method::POST, path, b"x".to_vec())
        .await
        .fc_error(404, "AliasNotFound");
    let path = "/2023-03-30/functions/echo/invocations?qualifier=LATEST";
    assert_eq!(
        a.call(Method::POST, path, b"x".to_vec()).await.status,
        StatusCode::OK
    );
    let acquired = env.seen.lock().unwrap().acquired.len();
    env.seen.lock().unwrap().refuse = Some(FcError::throttled("too many instances"));
    a.invoke("echo", b"x", &[])
        .await
        .fc_error(429, "ResourceThrottled");
    assert_eq!(env.seen.lock().unwrap().acquired.len(), acquired + 1);
    // A failed initializer (the agent's create error, marked with its kind
    // and relayed by the scheduler): FC's initialization error, not a
    // platform error.
    env.seen.lock().unwrap().refuse = Some(
        FcError::new(
            FcErrorCode::FunctionNotStarted,
            "Initializer hook failed with HTTP status 500: no",
        )
        .with_kind(kiln_core::FcErrorKind::Initialization),
    );
    let r = a.invoke("echo", b"x", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-fc-error-type"], "UnhandledInitializationError");
    let v = r.json();
    assert_eq!(v["errorType"], "InitializationError", "{v}");
    assert_eq!(
        v["errorMessage"],
        "InitializationError: Initializer hook failed with HTTP status 500: no"
    );
    // The same code without the kind is the platform error it says, however
    // its message reads.
    env.seen.lock().unwrap().refuse = Some(FcError::new(
        FcErrorCode::FunctionNotStarted,
        "InitializationError: a message is not a kind",
    ));
    a.invoke("echo", b"x", &[])
        .await
        .fc_error(502, "FunctionNotStarted");
    env.seen.lock().unwrap().refuse = None;

    // Over 32 MB: refused before any lease is taken.
    let big = vec![b'a'; 32 * 1024 * 1024 + 1];
    let acquired = env.seen.lock().unwrap().acquired.len();
    let m = a
        .invoke("echo", &big, &[])
        .await
        .fc_error(400, "EntityTooLarge");
    assert!(m.contains("33554432"), "{m}");
    assert_eq!(env.seen.lock().unwrap().acquired.len(), acquired);
    // Exactly 32 MB goes through.
    let ok = vec![b'b'; 32 * 1024 * 1024];
    let r = a.invoke("echo", &ok, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), ok.len());

    // Metrics count the calls.
    let m = env.gateway.as_ref().unwrap().metrics_addr().unwrap();
    let text = plain_get(m, "/metrics").await;
    assert!(
        text.contains("kiln_gateway_requests_total{operation=\"InvokeFunction\",code=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("kiln_gateway_invocations_in_flight 0"),
        "{text}"
    );
}

#[tokio::test]
async fn warm_calls_reuse_a_parked_lease() {
    let env = Env::with_hold(300).await;
    let a = env.client(AK_A, SK_A);
    assert_eq!(
        a.create(&function_doc("warm", &app_zip())).await.status,
        StatusCode::OK
    );
    for i in 0..5 {
        let r = a.invoke("warm", format!("call {i}").as_bytes(), &[]).await;
        assert_eq!(&r.body[..], format!("call {i}").as_bytes());
    }
    {
        let s = env.seen.lock().unwrap();
        assert_eq!(s.acquired.len(), 1, "one lease served every warm call");
        assert!(s.released.is_empty());
    }
    // A crash gives the lease back as failed at once; the next call
    // acquires a new one.
    a.invoke("warm", b"crash", &[]).await;
    a.invoke("warm", b"again", &[]).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    use kiln_internal_api::LeaseOutcome::*;
    {
        let s = env.seen.lock().unwrap();
        assert_eq!(s.acquired.len(), 2);
        let outcomes: Vec<_> = s.released.iter().map(|r| r.1.outcome).collect();
        assert_eq!(
            outcomes,
            [InstanceFailed, Ok],
            "the parked lease is released after the hold"
        );
    }

    // The agent refusing a parked lease outright (the function never saw
    // the payload): one fresh lease is tried, and its answer stands.
    a.invoke("warm", b"park", &[]).await;
    a.invoke("warm", b"gone", &[])
        .await
        .fc_error(502, "FunctionNotStarted");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = env.seen.lock().unwrap();
    assert_eq!(s.acquired.len(), 4);
    let outcomes: Vec<_> = s.released.iter().map(|r| r.1.outcome).collect();
    assert_eq!(
        outcomes,
        [InstanceFailed, Ok, InstanceFailed, InstanceFailed]
    );
}

async fn plain_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn internal_listener_serves_code_to_cluster_peers_only() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let zip = app_zip();
    let f = a.create(&function_doc("f", &zip)).await.json();
    assert_eq!(f["codeSize"], zip.len());
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&zip))
    };
    let agent = kiln_internal_api::InternalClient::new(&env.pki.files("agent")).unwrap();
    let base = format!(
        "https://127.0.0.1:{}",
        env.gateway.as_ref().unwrap().internal_addr().port()
    );
    let get = |path: String| {
        let req = Request::get(format!("{base}{path}"))
            .body(kiln_internal_api::server::empty())
            .unwrap();
        agent.send(req)
    };
    let r = get(format!("/v1/code/{digest}")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(&read_all(r.into_body()).await[..], &zip[..]);
    let r = get(format!("/v1/code/{}", "0".repeat(64))).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers().contains_key("x-fc-request-id"));
    let v: Value = serde_json::from_slice(&read_all(r.into_body()).await).unwrap();
    assert!(v["Code"].is_string() && v["RequestId"].is_string(), "{v}");
    let r = get("/v1/code/..%2F..%2Fgateway.db".into()).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    // An agent of a node the scheduler placed nothing on is refused, as
    // is the scheduler's certificate (code is the agents').
    for files in [
        env.pki.agent(&"n-other".parse().unwrap()).unwrap(),
        env.pki.files("scheduler"),
    ] {
        let other = kiln_internal_api::InternalClient::new(&files).unwrap();
        let r = other
            .send(
                Request::get(format!("{base}/v1/code/{digest}"))
                    .body(kiln_internal_api::server::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let v: Value = serde_json::from_slice(&read_all(r.into_body()).await).unwrap();
        assert_eq!(v["Code"], "AccessDenied", "{v}");
    }

    // The public TLS client (no client certificate) is refused.
    let public = Api::new(
        &env.pki,
        env.gateway.as_ref().unwrap().internal_addr(),
        AK_A,
        SK_A,
        true,
    );
    let req = Request::get(format!("{}/v1/code/{digest}", public.base))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(public.http.request(req).await.is_err());
}

#[tokio::test]
async fn http2_works_and_old_tls_is_refused() {
    let env = Env::new().await;
    let h2 = Api::new(&env.pki, env.addr(), AK_A, SK_A, true);
    let r = h2.call(Method::GET, "/2023-03-30/functions", vec![]).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.version, http::Version::HTTP_2);
    let r = h2.create(&function_doc("h2fn", &app_zip())).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = h2.invoke("h2fn", b"over h2", &[]).await;
    assert_eq!(&r.body[..], b"over h2");
    let h1 = env.client(AK_A, SK_A);
    let r = h1.get("h2fn").await;
    assert_eq!(r.version, http::Version::HTTP_11);

    let port = env.addr().port();
    // tokio's process API: the gateway runs on this test's runtime.
    let handshake = |flag: &'static str| {
        tokio::process::Command::new("openssl")
            .args(["s_client", flag, "-connect", &format!("127.0.0.1:{port}")])
            // Let OpenSSL 3 offer the old versions at all.
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .arg("-brief")
            .stdin(std::process::Stdio::null())
            .output()
    };
    let Ok(out) = handshake("-tls1_2").await else {
        return kiln_test_support::skip(
            kiln_test_support::Category::Tool,
            "no openssl binary for the TLS version checks (run scripts/install-deps.sh)",
        );
    };
    assert!(
        out.status.success(),
        "TLS 1.2 refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for old in ["-tls1", "-tls1_1"] {
        let out = handshake(old).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{old} handshake succeeded: {err}");
        // The server's refusal (a handshake_failure alert), not the client's.
        assert!(err.contains("alert"), "{old}: {err}");
    }
    let raw = old_client_hello(port).await;
    assert!(raw, "a raw TLS 1.1 ClientHello was not refused");
}

/// Send a minimal TLS 1.1-only ClientHello and expect an alert or a closed
/// connection, never a ServerHello.
async fn old_client_hello(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut hello = Vec::new();
    // ClientHello body.
    let mut body = vec![0x03, 0x02]; // client_version TLS 1.1
    body.extend_from_slice(&[0x11; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // ciphers
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut hs = vec![0x01];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    hello.extend_from_slice(&[0x16, 0x03, 0x02]);
    hello.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    hello.extend_from_slice(&hs);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(&hello).await.unwrap();
    let mut buf = [0u8; 5];
    match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => buf[0] == 0x15, // alert, not a handshake record
        Err(_) => false,
    }
}

/// The official Python SDK against this gateway. Needs a Python with
/// `alibabacloud-fc20230330` installed, named by `KILN_FC_SDK_PYTHON`
/// (the cross-service tests build that virtualenv); skipped, saying so,
/// without it.
#[tokio::test]
async fn official_python_sdk_round_trip() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let zip_path = env.state_dir.join("sdk.zip");
    std::fs::write(&zip_path, app_zip()).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_round_trip.py",
        env.addr(),
        &env.pki,
        &[zip_path.as_os_str()],
        "SDK round trip ok",
    )
    .await;
}

/// An https webhook receiver (the gateway's public certificate, trusted
/// through the config's webhook_ca): records every POSTed JSON body.
async fn webhook_receiver(
    pki: &DevPki,
    rx: tokio::sync::watch::Receiver<bool>,
) -> (String, Arc<Mutex<Vec<Value>>>) {
    let files = pki.files("gateway");
    let tls = kiln_pki::public_server_config(&files.cert, &files.key).unwrap();
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let g = got.clone();
    let addr = serve_fake(tls, rx, move |req: Request<hyper::body::Incoming>| {
        let g = g.clone();
        async move {
            let body = read_all(req.into_body()).await;
            g.lock()
                .unwrap()
                .push(serde_json::from_slice(&body).unwrap());
            server::no_content()
        }
    })
    .await;
    (format!("https://localhost:{}/hook", addr.port()), got)
}

impl Api {
    async fn task(&self, function: &str, task: &str) -> Answer {
        let path = format!("/2023-03-30/functions/{function}/async-tasks/{task}");
        self.call(Method::GET, &path, vec![]).await
    }

    /// Poll GetAsyncTask until the task reaches `status`.
    async fn wait_task(&self, function: &str, task: &str, status: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..300 {
            let r = self.task(function, task).await;
            if r.status == StatusCode::OK {
                last = r.json();
                if last["status"] == status {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("task {task} never reached {status}: {last}")
    }

    async fn put_async_config(&self, function: &str, doc: &Value) -> Answer {
        let path = format!("/2023-03-30/functions/{function}/async-invoke-config");
        self.call(Method::PUT, &path, doc.to_string().into_bytes())
            .await
    }
}

async fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}")
}

#[tokio::test]
async fn async_invocations_tasks_retries_and_destinations() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let (_hook_stop, hook_rx) = tokio::sync::watch::channel(false);
    let (hook_url, hooks) = webhook_receiver(&env.pki, hook_rx).await;
    for f in ["worker", "sink"] {
        assert_eq!(
            a.create(&function_doc(f, &app_zip())).await.status,
            StatusCode::OK
        );
    }
    let async_h = ("x-fc-invocation-type", "Async");

    // Bad config values: InvalidArgument, nothing stored.
    for bad in [
        json!({"maxAsyncRetryAttempts": 99}),
        json!({"maxAsyncEventAgeInSeconds": 0}),
        json!({"destinationConfig": {"onFailure": {"destination": "acs:mns:cn-test:1:/queues/q"}}}),
        json!({"destinationConfig": {"onSuccess": {"destination": "http://plain.example/x"}}}),
        json!({"surprise": true}),
    ] {
        a.put_async_config("worker", &bad)
            .await
            .fc_error(400, "InvalidArgument");
    }
    a.call(
        Method::GET,
        "/2023-03-30/functions/worker/async-invoke-config",
        vec![],
    )
    .await
    .fc_error(404, "AsyncConfigNotExists");
    a.put_async_config("nope", &json!({}))
        .await
        .fc_error(404, "FunctionNotFound");

    let sink_arn = format!("acs:fc:cn-test:{ACCOUNT_A}:functions/sink");
    let r = a
        .put_async_config(
            "worker",
            &json!({
                "asyncTask": true,
                "maxAsyncRetryAttempts": 1,
                "maxAsyncEventAgeInSeconds": 3,
                "destinationConfig": {
                    "onSuccess": {"destination": sink_arn},
                    "onFailure": {"destination": hook_url},
                },
            }),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let cfg = r.json();
    assert_eq!(cfg["maxAsyncRetryAttempts"], 1);
    assert_eq!(cfg["asyncTask"], true);
    assert!(cfg["functionArn"]
        .as_str()
        .unwrap()
        .ends_with(":functions/worker"));
    let listed = a
        .call(Method::GET, "/2023-03-30/async-invoke-configs", vec![])
        .await
        .json();
    assert_eq!(listed["configs"].as_array().unwrap().len(), 1);
    // Another account sees none of it.
    let b = env.client(AK_B, SK_B);
    let listed = b
        .call(Method::GET, "/2023-03-30/async-invoke-configs", vec![])
        .await
        .json();
    assert_eq!(listed["configs"].as_array().unwrap().len(), 0);

    // Oversized payload and a bad task id: refused, nothing queued.
    a.invoke("worker", &vec![b'x'; 128 * 1024 + 1], &[async_h])
        .await
        .fc_error(400, "EntityTooLarge");
    a.invoke(
        "worker",
        b"x",
        &[async_h, ("x-fc-async-task-id", "9bad id")],
    )
    .await
    .fc_error(400, "InvalidArgument");
    a.invoke("nope", b"x", &[async_h])
        .await
        .fc_error(404, "FunctionNotFound");

    // Success: 202, then the function runs once, the task succeeds, and
    // the onSuccess record reaches the sink function.
    let r = a
        .invoke(
            "worker",
            b"hello async",
            &[async_h, ("x-fc-async-task-id", "job-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert!(!r.request_id().is_empty());
    assert_eq!(r.headers["x-fc-async-task-id"], "job-1");
    let again = a
        .invoke(
            "worker",
            b"hello async",
            &[async_h, ("x-fc-async-task-id", "job-1")],
        )
        .await;
    assert_eq!(again.status, StatusCode::ACCEPTED);
    let t = a.wait_task("worker", "job-1", "Succeeded").await;
    assert_eq!(t["requestId"], r.request_id());
    assert_eq!(t["returnPayload"], "hello async");
    let events: Vec<&str> = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["Enqueued", "Running", "Succeeded"]);
    let record: Value = wait_for("the onSuccess record at the sink", || {
        let seen = env.seen.lock().unwrap();
        seen.invoked
            .iter()
            .find_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
    })
    .await;
    assert_eq!(record["requestContext"]["condition"], "Success");
    assert_eq!(record["requestContext"]["requestId"], r.request_id());
    assert_eq!(record["requestPayload"], "hello async");
    assert_eq!(record["responsePayload"], "hello async");
    let worker_calls = env
        .seen
        .lock()
        .unwrap()
        .invoked
        .iter()
        .filter(|(_, b)| &b[..] == b"hello async")
        .count();
    assert_eq!(worker_calls, 1, "the same task id twice is one task");

    // A function error: one retry (maxAsyncRetryAttempts 1), then Failed,
    // and the onFailure record reaches the webhook.
    let r = a
        .invoke(
            "worker",
            b"fail on demand",
            &[async_h, ("x-fc-async-task-id", "job-2")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    let t = a.wait_task("worker", "job-2", "Failed").await;
    assert_eq!(t["alreadyRetriedTimes"], 1);
    let calls = env
        .seen
        .lock()
        .unwrap()
        .invoked
        .iter()
        .filter(|(_, b)| &b[..] == b"fail on demand")
        .count();
    assert_eq!(calls, 2);
    let hook = wait_for("the onFailure webhook", || {
        hooks.lock().unwrap().first().cloned()
    })
    .await;
    assert_eq!(hook["requestContext"]["condition"], "RetriesExhausted");
    assert_eq!(hook["requestContext"]["requestId"], r.request_id());
    assert_eq!(
        hook["responseContext"]["functionError"],
        "UnhandledInvocationError"
    );
    assert_eq!(hook["responsePayload"]["error"], "bad");

    // Throttling: backoff and retry until the scheduler lets it through...
    env.seen.lock().unwrap().refuse = Some(FcError::throttled("too many"));
    let r = a
        .invoke(
            "worker",
            b"patient",
            &[async_h, ("x-fc-async-task-id", "job-3")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    a.wait_task("worker", "job-3", "Retrying").await;
    env.seen.lock().unwrap().refuse = None;
    let t = a.wait_task("worker", "job-3", "Succeeded").await;
    assert_eq!(t["alreadyRetriedTimes"], 0, "throttling spends no retries");
    // ... or until the message's age passes maxAsyncEventAgeInSeconds (3 s).
    env.seen.lock().unwrap().refuse = Some(FcError::throttled("too many"));
    a.invoke(
        "worker",
        b"doomed",
        &[async_h, ("x-fc-async-task-id", "job-4")],
    )
    .await;
    let t = a.wait_task("worker", "job-4", "Expired").await;
    assert!(t["endTime"].as_u64().unwrap() - t["startedTime"].as_u64().unwrap() < 3_000);
    env.seen.lock().unwrap().refuse = None;
    let hook = wait_for("the expiry webhook", || {
        hooks
            .lock()
            .unwrap()
            .iter()
            .find(|h| h["requestContext"]["condition"] == "EventAgeExceeded")
            .cloned()
    })
    .await;
    assert_eq!(hook["requestPayload"], "doomed");

    // Tasks: list with filters, unknown ids, stopping a finished task.
    let listed = a
        .call(
            Method::GET,
            "/2023-03-30/functions/worker/async-tasks?prefix=job-&limit=2&sortOrderByTime=desc",
            vec![],
        )
        .await
        .json();
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["taskId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["job-4", "job-3"]);
    let next = listed["nextToken"].as_str().unwrap();
    let listed = a
        .call(
            Method::GET,
            &format!("/2023-03-30/functions/worker/async-tasks?prefix=job-&status=Succeeded&sortOrderByTime=desc&nextToken={next}"),
            vec![],
        )
        .await
        .json();
    let ids: Vec<&str> = listed["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["taskId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["job-1"]);
    a.call(
        Method::GET,
        "/2023-03-30/functions/worker/async-tasks?status=Sleeping",
        vec![],
    )
    .await
    .fc_error(400, "InvalidArgument");
    a.task("worker", "nope")
        .await
        .fc_error(404, "AsyncTaskNotFound");
    b.task("worker", "job-1")
        .await
        .fc_error(404, "FunctionNotFound");
    let stop = "/2023-03-30/functions/worker/async-tasks/job-1/stop";
    a.call(Method::PUT, stop, vec![])
        .await
        .fc_error(400, "InvalidArgument");
    a.call(
        Method::PUT,
        "/2023-03-30/functions/worker/async-tasks/nope/stop",
        vec![],
    )
    .await
    .fc_error(404, "AsyncTaskNotFound");
    assert_eq!(
        a.task("worker", "job-1").await.json()["status"],
        "Succeeded"
    );

    // Delete the config: gone, and a second delete is AsyncConfigNotExists.
    let path = "/2023-03-30/functions/worker/async-invoke-config";
    assert_eq!(
        a.call(Method::DELETE, path, vec![]).await.status,
        StatusCode::NO_CONTENT
    );
    a.call(Method::DELETE, path, vec![])
        .await
        .fc_error(404, "AsyncConfigNotExists");

    // Without task mode (no config, or asyncTask false) invocations are
    // not async tasks, as in FC: GetAsyncTask and StopAsyncTask answer
    // AsyncTaskNotFound and ListAsyncTasks lists nothing, even for tasks
    // recorded while task mode was on.
    let list = "/2023-03-30/functions/worker/async-tasks";
    for cfg in [None, Some(json!({"asyncTask": false}))] {
        if let Some(c) = &cfg {
            assert_eq!(a.put_async_config("worker", c).await.status, StatusCode::OK);
        }
        a.task("worker", "job-1")
            .await
            .fc_error(404, "AsyncTaskNotFound");
        a.call(Method::PUT, stop, vec![])
            .await
            .fc_error(404, "AsyncTaskNotFound");
        let r = a.call(Method::GET, list, vec![]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json(), json!({"tasks": []}));
    }
    // An async invoke still answers 202 and runs; it is just not a task.
    let before = env.seen.lock().unwrap().invoked.len();
    let r = a
        .invoke(
            "worker",
            b"plain",
            &[async_h, ("x-fc-async-task-id", "plain-1")],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    wait_for("the untracked async call", || {
        (env.seen.lock().unwrap().invoked.len() > before).then_some(())
    })
    .await;
    a.task("worker", "plain-1")
        .await
        .fc_error(404, "AsyncTaskNotFound");
    // Task mode on again: the same invocations are tasks.
    assert_eq!(
        a.put_async_config("worker", &json!({"asyncTask": true}))
            .await
            .status,
        StatusCode::OK
    );
    a.wait_task("worker", "plain-1", "Succeeded").await;
}

#[tokio::test]
async fn async_messages_survive_a_restart() {
    let mut env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    assert_eq!(
        a.create(&function_doc("worker", &app_zip())).await.status,
        StatusCode::OK
    );
    assert_eq!(
        a.put_async_config("worker", &json!({"asyncTask": true}))
            .await
            .status,
        StatusCode::OK
    );
    // The scheduler refuses everything: the messages wait in the queue.
    env.seen.lock().unwrap().refuse = Some(FcError::unavailable("down"));
    for i in 0..5 {
        let r = a
            .invoke(
                "worker",
                format!("m{i}").as_bytes(),
                &[
                    ("x-fc-invocation-type", "Async"),
                    ("x-fc-async-task-id", &format!("t{i}")),
                ],
            )
            .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
    }
    env.restart().await;
    env.seen.lock().unwrap().refuse = None;
    let a = env.client(AK_A, SK_A);
    for i in 0..5 {
        a.wait_task("worker", &format!("t{i}"), "Succeeded").await;
    }
}

/// The official Python SDK drives async invoke, the async invoke config
/// calls and the async task calls (same KILN_FC_SDK_PYTHON as above).
#[tokio::test]
async fn official_python_sdk_async() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let zip_path = env.state_dir.join("sdk.zip");
    std::fs::write(&zip_path, app_zip()).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_async.py",
        env.addr(),
        &env.pki,
        &[zip_path.as_os_str()],
        "SDK async ok",
    )
    .await;
}

#[tokio::test]
async fn stopping_a_running_async_task_reclaims_its_instance() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    assert_eq!(
        a.create(&function_doc("worker", &app_zip())).await.status,
        StatusCode::OK
    );
    assert_eq!(
        a.put_async_config("worker", &json!({"asyncTask": true}))
            .await
            .status,
        StatusCode::OK
    );
    let r = a
        .invoke(
            "worker",
            b"slow call",
            &[
                ("x-fc-invocation-type", "Async"),
                ("x-fc-async-task-id", "long-1"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    a.wait_task("worker", "long-1", "Running").await;
    wait_for("the call to reach the agent", || {
        (!env.seen.lock().unwrap().invoked.is_empty()).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    let stop = "/2023-03-30/functions/worker/async-tasks/long-1/stop";
    assert_eq!(
        a.call(Method::PUT, stop, vec![]).await.status,
        StatusCode::OK
    );
    let t = a.wait_task("worker", "long-1", "Stopped").await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the 5 s call was aborted"
    );
    let statuses: Vec<&str> = t["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["Enqueued", "Running", "Stopping", "Stopped"]);
    let released = wait_for("the lease's release", || {
        env.seen
            .lock()
            .unwrap()
            .released
            .first()
            .map(|r| r.1.outcome)
    })
    .await;
    assert_eq!(released, kiln_internal_api::LeaseOutcome::InstanceFailed);
    // Stopping it again: it is finished.
    a.call(Method::PUT, stop, vec![])
        .await
        .fc_error(400, "InvalidArgument");
}

#[tokio::test]
async fn vpc_only_functions_are_served_on_their_vpc_listener_only() {
    let mut env = Env::new().await;
    // The gateway again, with a VPC listener serving vpc-b.
    env.gateway.take().unwrap().shutdown().await;
    let mut c = config(&env.state_dir, &env.pki, &env.scheduler_url, 0);
    let public = env.pki.files("gateway");
    c.vpc_listener = Some(kiln_gateway::config::VpcListener {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: public.cert,
        key: public.key,
        vpc_ids: vec!["vpc-b".into()],
        limits: Default::default(),
    });
    // A owns both VPCs it binds to below.
    c.vpcs = ["vpc-a", "vpc-b"]
        .map(|id| kiln_gateway::vpcs::VpcOwners {
            id: id.into(),
            owners: vec![ACCOUNT_A.parse().unwrap()],
        })
        .to_vec();
    env.gateway = Some(kiln_gateway::start(c).await.unwrap());
    let vpc_addr = env.gateway.as_ref().unwrap().vpc_addr().unwrap();
    let a = env.client(AK_A, SK_A);
    let v = Api::new(&env.pki, vpc_addr, AK_A, SK_A, false);
    let bindings = "/2023-03-30/functions/f/vpc-bindings";
    let bind = |id: &str| json!({ "vpcId": id }).to_string().into_bytes();
    assert_eq!(
        a.create(&function_doc("f", &app_zip())).await.status,
        StatusCode::OK
    );

    // Internet access (FC's default): served on the internet listener,
    // not on a VPC listener the function is not bound to.
    assert_eq!(a.invoke("f", b"x", &[]).await.status, StatusCode::OK);
    v.invoke("f", b"x", &[]).await.fc_error(403, "AccessDenied");

    // Bad input changes nothing.
    let before = a.get("f").await.json();
    let update = |doc: Value| {
        let a = &a;
        async move {
            a.call(
                Method::PUT,
                "/2023-03-30/functions/f",
                doc.to_string().into_bytes(),
            )
            .await
        }
    };
    let m = update(json!({"disableURLInternet": true}))
        .await
        .fc_error(400, "InvalidArgument");
    assert!(m.contains("VPC binding"), "{m}");
    update(json!({"disableURLInternet": "yes"}))
        .await
        .fc_error(400, "InvalidArgument");
    for body in [
        bind("b"),
        bind("vpc-"),
        bind("vpc-a/x"),
        br#"{"vpcId":"vpc-a","zone":"z"}"#.to_vec(),
        b"{".to_vec(),
    ] {
        a.call(Method::POST, bindings, body)
            .await
            .fc_error(400, "InvalidArgument");
    }
    a.call(Method::DELETE, &format!("{bindings}/vpc-a"), vec![])
        .await
        .fc_error(400, "InvalidArgument");
    a.call(
        Method::POST,
        "/2023-03-30/functions/nope/vpc-bindings",
        bind("vpc-a"),
    )
    .await
    .fc_error(404, "FunctionNotFound");
    assert_eq!(a.get("f").await.json(), before);
    assert_eq!(
        a.call(Method::GET, bindings, vec![]).await.json(),
        json!({"vpcIds": []})
    );

    // VPC-only, bound to vpc-a: refused on the internet listener and on a
    // listener for another VPC.
    assert_eq!(
        a.call(Method::POST, bindings, bind("vpc-a")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        update(json!({"disableURLInternet": true})).await.status,
        StatusCode::OK
    );
    let m = a.invoke("f", b"x", &[]).await.fc_error(403, "AccessDenied");
    assert!(m.contains("VPC"), "{m}");
    v.invoke("f", b"x", &[]).await.fc_error(403, "AccessDenied");

    // Bound to vpc-b too: served on vpc-b's listener, still not on the
    // internet's.
    assert_eq!(
        a.call(Method::POST, bindings, bind("vpc-b")).await.status,
        StatusCode::OK
    );
    let r = v.invoke("f", b"from the vpc", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"from the vpc");
    a.invoke("f", b"x", &[]).await.fc_error(403, "AccessDenied");
    assert_eq!(
        a.call(Method::GET, bindings, vec![]).await.json(),
        json!({"vpcIds": ["vpc-a", "vpc-b"]})
    );
    let f = a.get("f").await.json();
    assert_eq!(f["disableURLInternet"], json!(true));
    assert!(f.get("vpcBindings").is_none(), "{f}");

    // The last binding of a VPC-only function stays.
    let del = |id: &'static str| {
        let a = &a;
        async move {
            a.call(Method::DELETE, &format!("{bindings}/{id}"), vec![])
                .await
        }
    };
    assert_eq!(del("vpc-a").await.status, StatusCode::NO_CONTENT);
    del("vpc-b").await.fc_error(400, "InvalidArgument");
    assert_eq!(
        a.call(Method::GET, bindings, vec![]).await.json(),
        json!({"vpcIds": ["vpc-b"]})
    );
    // Back to internet access: served on the internet listener again.
    assert_eq!(
        update(json!({"disableURLInternet": false})).await.status,
        StatusCode::OK
    );
    assert_eq!(a.invoke("f", b"x", &[]).await.status, StatusCode::OK);
    assert_eq!(del("vpc-b").await.status, StatusCode::NO_CONTENT);
}

/// The versions the scheduler was asked for leases of, in order.
fn acquired_versions(env: &Env) -> Vec<Option<String>> {
    let s = env.seen.lock().unwrap();
    s.acquired.iter().map(|a| a.spec.version.clone()).collect()
}

#[tokio::test]
async fn versions_aliases_and_qualified_invocations() {
    let mut env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let b = env.client(AK_B, SK_B);
    let zip1 = app_zip();
    let zip2 = zip_of(&[("app.py", b"print('two')\n")]);
    a.create(&function_doc("v", &zip1)).await.ok();
    let base = "/2023-03-30/functions/v";
    let call = |m: Method, p: &str, body: Value| {
        let body = if body.is_null() {
            vec![]
        } else {
            body.to_string().into_bytes()
        };
        let (a, path) = (&a, format!("{base}{p}"));
        async move { a.call(m, &path, body).await }
    };

    // Publish: version 1; nothing changed: refused, no id used up.
    let v1 = call(Method::POST, "/versions", json!({"description": "first"}))
        .await
        .ok();
    assert_eq!(v1["versionId"], "1");
    assert_eq!(v1["description"], "first");
    assert!(v1["createdTime"].as_str().unwrap().ends_with('Z'));
    assert!(v1["lastModifiedTime"].is_string());
    call(Method::POST, "/versions", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::POST, "/versions", json!({"description": 5}))
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::POST, "/versions", json!({"nope": 1}))
        .await
        .fc_error(400, "InvalidArgument");
    let long = "d".repeat(257);
    call(Method::POST, "/versions", json!({"description": long}))
        .await
        .fc_error(400, "InvalidArgument");
    let r = call(Method::PUT, "", json!({"code": {"zipFile": b64(&zip2)}}))
        .await
        .ok();
    let latest_checksum = r["codeChecksum"].clone();
    // LATEST changed: the scheduler keeps version 1's instances.
    tokio::time::sleep(Duration::from_millis(200)).await;
    {
        let s = env.seen.lock().unwrap();
        let retired = s.retired.last().unwrap();
        assert_eq!(retired.keep_versions.len(), 1, "{retired:?}");
    }
    let v2 = call(Method::POST, "/versions", Value::Null).await.ok();
    assert_eq!(v2["versionId"], "2");

    // Listing: newest first by default; FORWARD pages oldest first.
    let l = call(Method::GET, "/versions", Value::Null).await.ok();
    assert_eq!(l["direction"], "BACKWARD");
    let ids: Vec<_> = l["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["versionId"].clone())
        .collect();
    assert_eq!(ids, [json!("2"), json!("1")]);
    let l = call(
        Method::GET,
        "/versions?direction=FORWARD&limit=1",
        Value::Null,
    )
    .await
    .ok();
    assert_eq!(l["versions"][0]["versionId"], "1");
    let token = l["nextToken"].as_str().unwrap().to_owned();
    let l = call(
        Method::GET,
        &format!("/versions?direction=FORWARD&limit=1&nextToken={token}"),
        Value::Null,
    )
    .await
    .ok();
    assert_eq!(l["versions"][0]["versionId"], "2");
    assert!(l.get("nextToken").is_none());
    call(Method::GET, "/versions?direction=UP", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::GET, "/versions?limit=0", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::GET, "/versions?nextToken=%21", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");

    // GetFunction by qualifier: each version's snapshot.
    let g1 = call(Method::GET, "?qualifier=1", Value::Null).await.ok();
    let g2 = call(Method::GET, "?qualifier=2", Value::Null).await.ok();
    assert_ne!(g1["codeChecksum"], latest_checksum);
    assert_eq!(g2["codeChecksum"], latest_checksum);
    call(Method::GET, "?qualifier=3", Value::Null)
        .await
        .fc_error(404, "VersionNotFound");

    // GetFunctionCode: a short-lived unsigned URL to each version's zip.
    let download = |url: &str| {
        let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        a.send(req)
    };
    let c1 = call(Method::GET, "/code?qualifier=1", Value::Null)
        .await
        .ok();
    assert_eq!(c1["checksum"], g1["codeChecksum"]);
    let url = c1["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with("https://localhost:"), "{url}");
    let r = download(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], &zip1[..], "version 1's own package");
    let latest = call(Method::GET, "/code", Value::Null).await.ok();
    assert_eq!(
        &download(latest["url"].as_str().unwrap()).await.body[..],
        &zip2[..]
    );
    let last = if url.ends_with('A') { "E" } else { "A" };
    let forged = format!("{}{last}", &url[..url.len() - 1]);
    download(&forged).await.fc_error(403, "AccessDenied");
    download(&url.replace("/kiln/code/", "/kiln/code/x"))
        .await
        .fc_error(403, "AccessDenied");
    call(Method::GET, "/code?qualifier=5", Value::Null)
        .await
        .fc_error(404, "VersionNotFound");
    b.call(Method::GET, &format!("{base}/code"), vec![])
        .await
        .fc_error(404, "FunctionNotFound");

    // Invoke: LATEST, 1 and 2 each run their own spec (own revision, own
    // code), never each other's instances.
    let inv = |q: &str| {
        let (a, path) = (&a, format!("{base}/invocations?qualifier={q}"));
        async move { a.call(Method::POST, &path, b"hi".to_vec()).await }
    };
    for q in ["LATEST", "1", "2"] {
        assert_eq!(&inv(q).await.body[..], b"hi");
    }
    {
        let s = env.seen.lock().unwrap();
        let specs: Vec<_> = s
            .acquired
            .iter()
            .rev()
            .take(3)
            .rev()
            .map(|a| a.spec.clone())
            .collect();
        assert_eq!(specs[0].version, None);
        assert_eq!(specs[1].version.as_deref(), Some("1"));
        assert_eq!(specs[2].version.as_deref(), Some("2"));
        assert_ne!(
            specs[1].code_digest, specs[0].code_digest,
            "v1 keeps its code"
        );
        assert_eq!(specs[2].code_digest, specs[0].code_digest);
        let revs: std::collections::HashSet<_> = specs.iter().map(|s| s.revision.clone()).collect();
        assert_eq!(revs.len(), 3, "three revisions, three sets of instances");
    }
    inv("9").await.fc_error(404, "VersionNotFound");
    inv("0").await.fc_error(400, "InvalidArgument");
    inv("a%20b").await.fc_error(400, "InvalidArgument");

    // Aliases: FC's shape; bad input refused, changing nothing.
    let alias = call(
        Method::POST,
        "/aliases",
        json!({"aliasName": "prod", "versionId": "1", "description": "live", "additionalVersionWeight": {"2": 0.5}}),
    )
    .await
    .ok();
    assert_eq!(alias["aliasName"], "prod");
    assert_eq!(alias["versionId"], "1");
    assert_eq!(alias["additionalVersionWeight"], json!({"2": 0.5}));
    assert_eq!(alias["description"], "live");
    assert!(alias["createdTime"].is_string() && alias["lastModifiedTime"].is_string());
    for (body, status, code) in [
        (
            json!({"aliasName": "prod", "versionId": "1"}),
            409,
            "AliasAlreadyExists",
        ),
        (
            json!({"aliasName": "canary", "versionId": "7"}),
            404,
            "VersionNotFound",
        ),
        (
            json!({"aliasName": "canary", "versionId": "1", "additionalVersionWeight": {"1": 0.1}}),
            400,
            "AdditionalVersionContainsMajorVersion",
        ),
        (
            json!({"aliasName": "canary", "versionId": "1", "additionalVersionWeight": {"2": 1.5}}),
            400,
            "InvalidArgument",
        ),
        (
            json!({"aliasName": "canary", "versionId": "1", "additionalVersionWeight": {"x": 0.1}}),
            400,
            "InvalidArgument",
        ),
        (
            json!({"aliasName": "canary", "versionId": "1", "additionalVersionWeight": {"9": 0.1}}),
            404,
            "VersionNotFound",
        ),
        (
            json!({"aliasName": "LATEST", "versionId": "1"}),
            400,
            "InvalidArgument",
        ),
        (
            json!({"aliasName": "9lives", "versionId": "1"}),
            400,
            "InvalidArgument",
        ),
        (json!({"aliasName": "canary"}), 400, "InvalidArgument"),
        (json!({"versionId": "1"}), 400, "InvalidArgument"),
        (
            json!({"aliasName": "canary", "versionId": "1", "routing": {}}),
            400,
            "InvalidArgument",
        ),
    ] {
        call(Method::POST, "/aliases", body)
            .await
            .fc_error(status, code);
    }
    let l = call(Method::GET, "/aliases", Value::Null).await.ok();
    assert_eq!(l["aliases"].as_array().unwrap().len(), 1, "{l}");
    assert_eq!(
        call(Method::GET, "/aliases/prod", Value::Null).await.ok(),
        alias
    );
    call(Method::GET, "/aliases/nope", Value::Null)
        .await
        .fc_error(404, "AliasNotFound");
    call(Method::PUT, "/aliases/nope", json!({"versionId": "1"}))
        .await
        .fc_error(404, "AliasNotFound");
    call(Method::DELETE, "/aliases/nope", Value::Null)
        .await
        .fc_error(404, "AliasNotFound");
    inv("nope").await.fc_error(404, "AliasNotFound");

    // The alias splits calls between its versions.
    let before = acquired_versions(&env).len();
    for _ in 0..200 {
        assert_eq!(inv("prod").await.status, StatusCode::OK);
    }
    let split: Vec<_> = acquired_versions(&env)[before..].to_vec();
    let to_v2 = split.iter().filter(|v| v.as_deref() == Some("2")).count();
    let to_v1 = split.iter().filter(|v| v.as_deref() == Some("1")).count();
    assert_eq!(to_v1 + to_v2, 200);
    // Binomial(200, 0.5): sd 7; far outside 5 sd means no split at all.
    assert!((65..=135).contains(&to_v2), "{to_v2} of 200 to version 2");

    // Versions an alias uses, and a function with versions, stay.
    call(Method::DELETE, "/versions/1", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::DELETE, "/versions/2", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::DELETE, "", Value::Null)
        .await
        .fc_error(400, "InvalidArgument");
    call(Method::DELETE, "/versions/8", Value::Null)
        .await
        .fc_error(404, "VersionNotFound");
    call(Method::DELETE, "/versions/x", Value::Null)
        .await
        .fc_error(404, "VersionNotFound");
    assert_eq!(a.get("v").await.status, StatusCode::OK);

    // Another account sees none of it.
    let other = |m: Method, p: &str| {
        let (b, path) = (&b, format!("{base}{p}"));
        async move { b.call(m, &path, vec![]).await }
    };
    other(Method::GET, "/versions")
        .await
        .fc_error(404, "FunctionNotFound");
    other(Method::GET, "/aliases/prod")
        .await
        .fc_error(404, "FunctionNotFound");
    other(Method::POST, "/versions")
        .await
        .fc_error(404, "FunctionNotFound");
    b.call(
        Method::POST,
        &format!("{base}/invocations?qualifier=prod"),
        b"x".to_vec(),
    )
    .await
    .fc_error(404, "FunctionNotFound");

    // Async with a qualifier: checked at enqueue, delivered to that version,
    // and its task names it.
    call(
        Method::PUT,
        "/async-invoke-config",
        json!({"asyncTask": true}),
    )
    .await
    .ok();
    let path = format!("{base}/invocations?qualifier=1");
    let r = a
        .call_with(
            Method::POST,
            &path,
            b"later".to_vec(),
            &[
                ("x-fc-invocation-type", "Async"),
                ("x-fc-async-task-id", "qjob"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{:?}", r.body);
    let path = format!("{base}/invocations?qualifier=nope");
    a.call_with(
        Method::POST,
        &path,
        b"later".to_vec(),
        &[("x-fc-invocation-type", "Async")],
    )
    .await
    .fc_error(404, "AliasNotFound");
    wait_for("the async call on version 1", || {
        let s = env.seen.lock().unwrap();
        s.invoked
            .iter()
            .any(|(_, body)| &body[..] == b"later")
            .then_some(())
    })
    .await;
    assert_eq!(
        acquired_versions(&env).last().unwrap().as_deref(),
        Some("1")
    );
    let task = call(Method::GET, "/async-tasks/qjob", Value::Null)
        .await
        .ok();
    assert_eq!(task["qualifier"], "1", "{task}");

    // Roll forward: every new call goes to version 2.
    let rolled = call(
        Method::PUT,
        "/aliases/prod",
        json!({"versionId": "2", "additionalVersionWeight": {}}),
    )
    .await
    .ok();
    assert_eq!(rolled["versionId"], "2");
    assert_eq!(rolled["additionalVersionWeight"], json!({}));
    assert_eq!(rolled["description"], "live", "fields not given are kept");
    let before = acquired_versions(&env).len();
    for _ in 0..30 {
        assert_eq!(inv("prod").await.status, StatusCode::OK);
    }
    assert!(acquired_versions(&env)[before..]
        .iter()
        .all(|v| v.as_deref() == Some("2")));

    // Everything survives a restart.
    env.restart().await;
    let a = env.client(AK_A, SK_A);
    let call = |m: Method, p: &str| {
        let (a, path) = (&a, format!("{base}{p}"));
        async move { a.call(m, &path, vec![]).await }
    };
    let l = call(Method::GET, "/versions").await.ok();
    assert_eq!(l["versions"].as_array().unwrap().len(), 2);
    assert_eq!(
        call(Method::GET, "/aliases/prod").await.ok()["versionId"],
        "2"
    );
    // Version 1 is free now; then the alias, version 2 and the function go.
    assert_eq!(
        call(Method::DELETE, "/versions/1").await.status,
        StatusCode::NO_CONTENT
    );
    // Its package is gone with it, and so is its download.
    // (The gateway listens on a new port since its restart.)
    let moved = format!(
        "https://localhost:{}{}",
        env.addr().port(),
        &url[url.find("/kiln/code/").unwrap()..]
    );
    let r = a
        .send(Request::get(&moved).body(Full::new(Bytes::new())).unwrap())
        .await;
    r.fc_error(404, "FunctionNotFound");
    assert_eq!(
        call(Method::DELETE, "/aliases/prod").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(Method::DELETE, "/versions/2").await.status,
        StatusCode::NO_CONTENT
    );
    let l = call(Method::GET, "/aliases").await.ok();
    assert_eq!(l["aliases"], json!([]));
    assert_eq!(
        call(Method::DELETE, "").await.status,
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn official_python_sdk_versions_and_aliases() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let (zip1, zip2) = (env.state_dir.join("one.zip"), env.state_dir.join("two.zip"));
    std::fs::write(&zip1, zip_of(&[("app.py", b"print('one')\n")])).unwrap();
    std::fs::write(&zip2, zip_of(&[("app.py", b"print('two')\n")])).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_versions.py",
        env.addr(),
        &env.pki,
        &[zip1.as_os_str(), zip2.as_os_str()],
        "SDK versions ok",
    )
    .await;
}

/// ListFunctions' FC filters narrow the list, and its pages hold only
/// matching functions; a filter that does not parse is refused.
#[tokio::test]
async fn list_functions_filters_and_pages_over_matches_only() {
    let env = Env::new().await;
    let a = env.client(AK_A, SK_A);
    let zip = app_zip();
    for (name, description, team) in [
        ("f1", "shop front", "shop"),
        ("f2", "nightly job", "ops"),
        ("f3", "shop api", "shop"),
        ("f4", "shop worker", "ops"),
    ] {
        let mut doc = function_doc(name, &zip);
        doc["description"] = json!(description);
        doc["tags"] = json!([{"key": "team", "value": team}]);
        assert_eq!(a.create(&doc).await.status, StatusCode::OK);
    }
    let names = |v: &Value| -> Vec<String> {
        v["functions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["functionName"].as_str().unwrap().to_owned())
            .collect()
    };
    let list = |q: String| {
        let a = &a;
        async move {
            a.call(Method::GET, &format!("/2023-03-30/functions?{q}"), vec![])
                .await
        }
    };
    let tag_shop = "tags=%5B%7B%22key%22%3A%22team%22%2C%22value%22%3A%22shop%22%7D%5D";
    // Shop functions whose description says shop: f1 and f3, one a page.
    let first = list(format!("{tag_shop}&description=shop&limit=1"))
        .await
        .ok();
    assert_eq!(names(&first), ["f1"]);
    let token = first["nextToken"]
        .as_str()
        .expect("a second page")
        .to_owned();
    let second = list(format!(
        "{tag_shop}&description=shop&limit=1&nextToken={}",
        urlencoding(&token)
    ))
    .await
    .ok();
    assert_eq!(names(&second), ["f3"]);
    assert!(
        second.get("nextToken").is_none_or(Value::is_null),
        "{second}"
    );
    assert_eq!(
        names(&list("description=nightly".into()).await.ok()),
        ["f2"]
    );
    assert_eq!(names(&list("functionName=f4".into()).await.ok()), ["f4"]);
    assert_eq!(
        names(&list("runtime=custom.debian12".into()).await.ok()).len(),
        4
    );
    assert!(names(&list("fcVersion=v2".into()).await.ok()).is_empty());
    list("fcVersion=v9".into())
        .await
        .fc_error(400, "InvalidArgument");
    list("tags=oops".into())
        .await
        .fc_error(400, "InvalidArgument");
}

fn urlencoding(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test]
async fn official_python_sdk_tags() {
    let Some(python) = kiln_test_support::sdk_python() else {
        return;
    };
    let env = Env::new().await;
    let zip_path = env.state_dir.join("sdk.zip");
    std::fs::write(&zip_path, app_zip()).unwrap();
    run_python_sdk(
        &python,
        "fc_sdk_tags.py",
        env.addr(),
        &env.pki,
        &[zip_path.as_os_str()],
        "SDK tags ok",
    )
    .await;
}
