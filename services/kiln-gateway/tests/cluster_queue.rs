//! Two gateways in one process sharing a real PostgreSQL database
//! (`[cluster]`, the same `[secrets]` key file), with a fake scheduler and
//! agent under real mTLS: a signature nonce used on one gateway is refused
//! on the other, a timer fires once per tick however many gateways run
//! it, and an async task accepted by one is listed and stopped through
//! the other.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::{GatewayCluster, GatewayConfig, GatewayHandle};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::Lease;
use kiln_pki::DevPki;
use kiln_test_support::postgres::PgServer;
use serde_json::{json, Value};

const F: &str = "/2023-03-30/functions";

/// What the fake agent was sent: headers and body per call.
type Seen = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

async fn fake_scheduler(req: Request<hyper::body::Incoming>, agent_url: String) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let _ = read_all(body).await;
    match (parts.method.clone(), parts.uri.path()) {
        (Method::POST, "/v1/leases") => server::json(
            StatusCode::OK,
            &Lease {
                lease_id: LeaseId::generate(),
                instance_id: InstanceId::generate(),
                node_id: NodeId::generate(),
                agent_url,
                cold_start: false,
                expires_in_ms: 600_000,
            },
        ),
        (Method::DELETE, p) if p.starts_with("/v1/leases/") => server::no_content(),
        (Method::POST, "/v1/functions/retire") => server::no_content(),
        (_, p) => server::not_found(p, "sched"),
    }
}

/// Records every call; a body `{"sleep": true}` holds the call for 30 s.
async fn fake_agent(req: Request<hyper::body::Incoming>, seen: Seen) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = read_all(body).await;
    seen.lock()
        .unwrap()
        .push((parts.headers.clone(), bytes.clone()));
    if serde_json::from_slice::<Value>(&bytes).is_ok_and(|v| v["sleep"] == true) {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    Response::builder()
        .status(200)
        .header("x-kiln-invoke-outcome", "ok")
        .body(full("done"))
        .unwrap()
}

fn function_doc(name: &str) -> Value {
    json!({
        "functionName": name,
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 128,
        "timeout": 60,
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": b64(&zip_of(&[("app.py", b"print('hi')\n")]))},
    })
}

/// Two gateways on one database.
struct Pair {
    a: GatewayHandle,
    b: GatewayHandle,
    pki: DevPki,
    seen: Seen,
    _stop: tokio::sync::watch::Sender<bool>,
    _dir: tempfile::TempDir,
    // Last: stops the server after the gateways.
    _pg: PgServer,
}

impl Pair {
    async fn start() -> Option<Pair> {
        let pg = PgServer::start()?;
        let url = pg.create_database("gateways");
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
        let seen: Seen = Arc::default();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let agent_tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
        let s = seen.clone();
        let agent = serve_fake(agent_tls, rx.clone(), move |r| fake_agent(r, s.clone())).await;
        let agent_url = format!("https://127.0.0.1:{}", agent.port());
        let sched_tls = kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap();
        let sched = serve_fake(sched_tls, rx, move |r| fake_scheduler(r, agent_url.clone())).await;
        let scheduler_url = format!("https://127.0.0.1:{}", sched.port());
        let key = dir.path().join("secrets.key");
        kiln_store::seal::generate_key_file(&key).unwrap();
        let config = |name: &str| GatewayConfig {
            bootstrap_keys: vec![BootstrapKey::new(ACCOUNT_A.parse().unwrap(), AK_A, SK_A)],
            secrets: Some(kiln_gateway::config::SecretsConfig {
                key_file: key.clone(),
                previous_key_files: vec![],
            }),
            cluster: Some(GatewayCluster {
                postgres_url: url.clone(),
                postgres_password_file: None,
                max_connections: 8,
            }),
            ..GatewayConfig::loopback(dir.path().join(name), "cn-test", &scheduler_url, &pki)
        };
        let a = kiln_gateway::start(config("a")).await.unwrap();
        let b = kiln_gateway::start(config("b")).await.unwrap();
        Some(Pair {
            a,
            b,
            pki,
            seen,
            _stop: tx,
            _dir: dir,
            _pg: pg,
        })
    }

    fn client(&self, addr: SocketAddr) -> Api {
        Api::new(&self.pki, addr, AK_A, SK_A, false)
    }

    async fn stop(self) {
        self.a.shutdown().await;
        self.b.shutdown().await;
    }
}

async fn post_json(api: &Api, path: &str, doc: &Value) -> Answer {
    api.call(Method::POST, path, doc.to_string().into_bytes())
        .await
}

/// A request signed for gateway A, replayed byte for byte to gateway B
/// (as a load balancer would pass it on) inside the skew window, is
/// refused with FC's SignatureNonceUsed; a fresh one is accepted.
#[tokio::test]
async fn a_nonce_used_on_one_gateway_is_refused_on_another() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    let a = pair.client(pair.a.public_addr());
    let b = pair.client(pair.b.public_addr());
    let now = now_ms();
    let first = a.signed(Method::GET, F, vec![], &[], now);
    let (parts, body) = first.into_parts();
    let replay = {
        // The same head, sent to B's socket: hyper keeps the signed Host.
        let uri: http::Uri = format!("{}{F}", b.base).parse().unwrap();
        let mut r = Request::builder()
            .method(Method::GET)
            .uri(uri)
            .body(body.clone())
            .unwrap();
        *r.headers_mut() = parts.headers.clone();
        r
    };
    let first = Request::from_parts(parts, body);
    a.send(first).await.ok();
    let refused = b.send(replay).await;
    let message = refused.fc_error(403, "SignatureNonceUsed");
    assert!(message.contains("nonce"), "{message}");
    // A fresh signature for B is fine.
    b.call(Method::GET, F, vec![]).await.ok();
    pair.stop().await;
}

/// The timer events the fake agent was sent for `trigger`: their times.
fn timer_ticks(seen: &Seen, trigger: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter_map(|(_, body)| serde_json::from_slice::<Value>(body).ok())
        .filter(|e| e["triggerName"] == trigger)
        .map(|e| e["triggerTime"].as_str().unwrap().to_owned())
        .collect()
}

/// Wait until `api`'s gateway serves `path` (what the other gateway
/// wrote reaches it through the change feed).
async fn seen(api: &Api, path: &str) {
    for _ in 0..50 {
        if api.call(Method::GET, path, Vec::new()).await.status == StatusCode::OK {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{path} not served by the other gateway within 5 s");
}

/// Both gateways run the same every-second timer (each would fire every
/// tick): each tick is claimed once in the database and delivered once.
#[tokio::test]
async fn a_timer_fires_once_per_tick_with_two_gateways() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    let trigger = json!({
        "triggerName": "every-second",
        "triggerType": "timer",
        "triggerConfig": json!({"cronExpression": "*/1 * * * * *", "payload": "tick", "enable": true}).to_string(),
    });
    // Created through A; B's view follows within a second.
    let api = pair.client(pair.a.public_addr());
    post_json(&api, F, &function_doc("cron")).await.ok();
    post_json(&api, &format!("{F}/cron/triggers"), &trigger)
        .await
        .ok();
    let b = pair.client(pair.b.public_addr());
    seen(&b, &format!("{F}/cron/triggers/every-second")).await;
    let mut ticks = Vec::new();
    for _ in 0..100 {
        ticks = timer_ticks(&pair.seen, "every-second");
        if ticks.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ticks.len() >= 5, "fewer than 5 ticks in 10 s: {ticks:?}");
    // Let any second delivery of the last ticks arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = timer_ticks(&pair.seen, "every-second");
    let mut unique = ticks.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ticks.len(), "a tick fired twice: {ticks:?}");
    pair.stop().await;
}

/// An async call accepted by A is one task for both gateways: listed and
/// read through B, and stopped through B while A's dispatcher (or B's)
/// runs it.
#[tokio::test]
async fn an_async_task_accepted_by_one_gateway_is_listed_and_stopped_through_another() {
    let Some(pair) = Pair::start().await else {
        return;
    };
    let a = pair.client(pair.a.public_addr());
    let b = pair.client(pair.b.public_addr());
    post_json(&a, F, &function_doc("slow")).await.ok();
    seen(&b, &format!("{F}/slow")).await;
    a.call(
        Method::PUT,
        &format!("{F}/slow/async-invoke-config"),
        json!({"asyncTask": true}).to_string().into_bytes(),
    )
    .await
    .ok();
    let accepted = a
        .call_with(
            Method::POST,
            &format!("{F}/slow/invocations"),
            json!({"sleep": true}).to_string().into_bytes(),
            &[
                ("x-fc-invocation-type", "Async"),
                ("x-fc-async-task-id", "job-1"),
            ],
        )
        .await;
    assert_eq!(accepted.status, StatusCode::ACCEPTED, "{:?}", accepted.body);
    // Running somewhere (one of the two dispatchers claimed it).
    let task = format!("{F}/slow/async-tasks/job-1");
    let mut status = Value::Null;
    for _ in 0..100 {
        status = b.call(Method::GET, &task, vec![]).await.ok()["status"].clone();
        if status == "Running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "Running");
    let listed = b
        .call(Method::GET, &format!("{F}/slow/async-tasks"), vec![])
        .await
        .ok();
    assert_eq!(listed["tasks"][0]["taskId"], "job-1", "{listed}");
    let started = std::time::Instant::now();
    b.call(Method::PUT, &format!("{task}/stop"), vec![])
        .await
        .ok();
    for _ in 0..100 {
        status = a.call(Method::GET, &task, vec![]).await.ok()["status"].clone();
        if status == "Stopped" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "Stopped");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 30 s call was not aborted: it ran to its end"
    );
    pair.stop().await;
}
