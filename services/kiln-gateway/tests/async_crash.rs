//! Crash safety of the async queue: the real `kiln-gateway` binary, with a
//! fake scheduler and agent in this process, takes async invocations under
//! steady load and is killed with SIGKILL several times at random moments,
//! then restarted on the same state. Every invocation that got a 202 must
//! reach the agent at least once; duplicates are counted and printed.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::Lease;
use kiln_pki::DevPki;
use serde_json::json;

const ACCOUNT: &str = "1000000000000001";
const AK: &str = "AKCRASH000000001";
const SK: &str = "secret-of-the-crash-test-01";

type Invoked = Arc<Mutex<HashMap<String, usize>>>;

/// A fake service for the whole test.
async fn serve<F, Fut>(tls: Arc<rustls::ServerConfig>, f: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    common::serve_until(tls, std::future::pending(), f).await
}

/// Wait until every accepted id reached the agent; fail after `limit`
/// naming how many did not (`what`) and a few of them.
async fn all_invoked(accepted: &HashSet<String>, invoked: &Invoked, limit: Duration, what: &str) {
    let started = Instant::now();
    loop {
        let missing: Vec<String> = {
            let inv = invoked.lock().unwrap();
            accepted
                .iter()
                .filter(|id| !inv.contains_key(*id))
                .cloned()
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < limit,
            "{} {what}, e.g. {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn fake_agent(req: Request<hyper::body::Incoming>, invoked: Invoked) -> Response<Body> {
    // A body cut off by the SIGKILLed gateway never reached "the function".
    let Ok(body) = req.into_body().collect().await.map(|c| c.to_bytes()) else {
        return server::no_content();
    };
    let id = String::from_utf8_lossy(&body).into_owned();
    *invoked.lock().unwrap().entry(id).or_default() += 1;
    Response::builder()
        .status(200)
        .header("x-kiln-invoke-outcome", "ok")
        .body(full(body))
        .unwrap()
}

async fn fake_scheduler(req: Request<hyper::body::Incoming>, agent_url: String) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let _ = body.collect().await;
    match (parts.method, parts.uri.path()) {
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
        _ => server::no_content(),
    }
}

use kiln_test_support::free_port;

type Http = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

fn client(pki: &DevPki) -> Http {
    common::https_client(pki, false)
}

fn signed(
    port: u16,
    method: Method,
    path: &str,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let uri: Uri = format!("https://localhost:{port}{path}").parse().unwrap();
    let mut h = HeaderMap::new();
    for (k, v) in extra {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h.insert("content-type", "application/json".parse().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let nonce = kiln_auth::new_nonce();
    let params = kiln_auth::SigningParams::new(AK, SK, now, &nonce);
    kiln_auth::sign(&method, &uri, &mut h, &body, &params).unwrap();
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    *req.headers_mut() = h;
    req
}

fn zip() -> Vec<u8> {
    common::zip_of(&[("app.py", b"print('hi')\n")])
}

/// A cheap random number (no rand dependency): the clock's nanoseconds.
fn jitter(max_ms: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    (n.wrapping_mul(6364136223846793005) >> 20) % max_ms
}

struct Gateway {
    child: tokio::process::Child,
}

async fn start_gateway(config: &std::path::Path, port: u16) -> Gateway {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kiln-gateway"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kiln-gateway exited at start: {status}");
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Gateway { child };
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gateway never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkilled_gateway_loses_no_accepted_async_invocation() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let invoked: Invoked = Arc::default();
    let inv = invoked.clone();
    let agent = serve(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        move |r| fake_agent(r, inv.clone()),
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = serve(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |r| fake_scheduler(r, agent_url.clone()),
    )
    .await;
    let port = free_port();
    let public = pki.files("gateway");
    let tls = pki.files("gateway-internal");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir = "{state}"
region = "cn-test"
scheduler_url = "https://127.0.0.1:{sched}"
lease_hold_ms = 0
[public]
listen = "127.0.0.1:{port}"
cert = "{pcert}"
key = "{pkey}"
[internal]
listen = "127.0.0.1:0"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
[[bootstrap_keys]]
account_id = "{ACCOUNT}"
access_key_id = "{AK}"
access_key_secret = "{SK}"
"#,
            state = dir.path().join("state").display(),
            sched = sched.port(),
            pcert = public.cert.display(),
            pkey = public.key.display(),
            ca = tls.ca.display(),
            cert = tls.cert.display(),
            key = tls.key.display(),
        ),
    )
    .unwrap();

    let mut gw = start_gateway(&config, port).await;
    let http = client(&pki);
    let doc = json!({
        "functionName": "worker",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 512,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(zip())},
    });
    let r = http
        .request(signed(
            port,
            Method::POST,
            "/2023-03-30/functions",
            doc.to_string().into_bytes(),
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    // Steady load: 16 callers, each sending async invocations one after
    // another; a 202 is recorded, anything else (the gateway is down) is
    // retried later under a new id.
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for _ in 0..16 {
        let (http, accepted, next, stop, refused) = (
            http.clone(),
            accepted.clone(),
            next.clone(),
            stop.clone(),
            refused.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = format!("t{}", next.fetch_add(1, Ordering::Relaxed));
                let req = signed(
                    port,
                    Method::POST,
                    "/2023-03-30/functions/worker/invocations",
                    id.clone().into_bytes(),
                    &[
                        ("x-fc-invocation-type", "Async"),
                        ("x-fc-async-task-id", &id),
                    ],
                );
                match tokio::time::timeout(Duration::from_secs(5), http.request(req)).await {
                    Ok(Ok(resp)) if resp.status() == StatusCode::ACCEPTED => {
                        accepted.lock().unwrap().insert(id);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }

    let kills = 5;
    for round in 0..kills {
        tokio::time::sleep(Duration::from_millis(300 + jitter(900))).await;
        let before = accepted.lock().unwrap().len();
        gw.child.start_kill().unwrap();
        let status = gw.child.wait().await.unwrap();
        assert!(!status.success(), "SIGKILL ends the gateway");
        println!("kill {}: {before} accepted so far", round + 1);
        gw = start_gateway(&config, port).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }

    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 100, "too little load: {}", accepted.len());
    all_invoked(
        &accepted,
        &invoked,
        Duration::from_secs(120),
        "accepted invocations never reached the agent",
    )
    .await;
    let inv = invoked.lock().unwrap().clone();
    let duplicates: usize = inv.values().map(|n| n - 1).sum();
    let unaccepted = inv.keys().filter(|k| !accepted.contains(*k)).count();
    println!(
        "crash test: {kills} SIGKILLs, {} accepted (202), all invoked at least once; \
         {duplicates} duplicate invocations; {unaccepted} invoked without a 202 \
         (committed but the answer was lost with the process); {} requests refused while down",
        accepted.len(),
        refused.load(Ordering::Relaxed)
    );
    gw.child.start_kill().unwrap();
    let _ = gw.child.wait().await;
}

/// Two `kiln-gateway` processes sharing a real PostgreSQL queue
/// (`[cluster]`, 2 s leases renewed while a gateway lives): A takes async
/// invocations under steady load and is killed with SIGKILL mid-flight
/// and never restarted; B delivers every invocation A answered 202 to
/// (those A had claimed once their leases ran out).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_cluster_gateways_accepted_invocations_are_delivered_by_another() {
    let Some(pg) = kiln_test_support::postgres::PgServer::start() else {
        return;
    };
    let url = pg.create_database("crash");
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let invoked: Invoked = Arc::default();
    let inv = invoked.clone();
    let agent = serve(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        move |r| {
            let inv = inv.clone();
            async move {
                // Calls take a while: A dies with some in flight.
                tokio::time::sleep(Duration::from_millis(100)).await;
                fake_agent(r, inv).await
            }
        },
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = serve(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |r| fake_scheduler(r, agent_url.clone()),
    )
    .await;
    let key = dir.path().join("secrets.key");
    kiln_store::seal::generate_key_file(&key).unwrap();
    let public = pki.files("gateway");
    let tls = pki.files("gateway-internal");
    let write_config = |name: &str, port: u16| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"
state_dir = "{state}"
region = "cn-test"
scheduler_url = "https://127.0.0.1:{sched}"
lease_hold_ms = 0
[public]
listen = "127.0.0.1:{port}"
cert = "{pcert}"
key = "{pkey}"
[internal]
listen = "127.0.0.1:0"
[tls]
ca = "{ca}"
cert = "{cert}"
key = "{tkey}"
[async_queue]
lease_ms = 2000
[secrets]
key_file = "{key}"
[cluster]
postgres_url = "{url}"
[[bootstrap_keys]]
account_id = "{ACCOUNT}"
access_key_id = "{AK}"
access_key_secret = "{SK}"
"#,
                state = dir.path().join(name).display(),
                sched = sched.port(),
                pcert = public.cert.display(),
                pkey = public.key.display(),
                ca = tls.ca.display(),
                cert = tls.cert.display(),
                tkey = tls.key.display(),
                key = key.display(),
            ),
        )
        .unwrap();
        path
    };
    let (pa, pb) = (free_port(), free_port());
    let mut a = start_gateway(&write_config("a", pa), pa).await;
    let b = start_gateway(&write_config("b", pb), pb).await;
    let http = client(&pki);
    let doc = json!({
        "functionName": "worker",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "memorySize": 512,
        "timeout": 10,
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": base64::engine::general_purpose::STANDARD.encode(zip())},
    });
    // Created through A; B serves it once its change feed has it.
    let r = http
        .request(signed(
            pa,
            Method::POST,
            "/2023-03-30/functions",
            doc.to_string().into_bytes(),
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut served_by_b = false;
    for _ in 0..50 {
        let r = http
            .request(signed(
                pb,
                Method::GET,
                "/2023-03-30/functions/worker",
                Vec::new(),
                &[],
            ))
            .await
            .unwrap();
        if r.status() == StatusCode::OK {
            served_by_b = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_by_b, "B does not serve the function A created");

    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..16 {
        let (http, accepted, next, stop) =
            (http.clone(), accepted.clone(), next.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = format!("t{}", next.fetch_add(1, Ordering::Relaxed));
                let req = signed(
                    pa,
                    Method::POST,
                    "/2023-03-30/functions/worker/invocations",
                    id.clone().into_bytes(),
                    &[
                        ("x-fc-invocation-type", "Async"),
                        ("x-fc-async-task-id", &id),
                    ],
                );
                match tokio::time::timeout(Duration::from_secs(5), http.request(req)).await {
                    Ok(Ok(resp)) if resp.status() == StatusCode::ACCEPTED => {
                        accepted.lock().unwrap().insert(id);
                    }
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500 + jitter(500))).await;
    a.child.start_kill().unwrap();
    let status = a.child.wait().await.unwrap();
    assert!(!status.success(), "SIGKILL ends the gateway");
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() > 50, "too little load: {}", accepted.len());
    all_invoked(
        &accepted,
        &invoked,
        Duration::from_secs(60),
        "invocations A accepted never reached the agent through B",
    )
    .await;
    let inv = invoked.lock().unwrap().clone();
    let duplicates: usize = inv.values().map(|n| n - 1).sum();
    println!(
        "cluster crash test: A SIGKILLed, {} accepted by A (202), all delivered at least once \
         (B took over A's claims after their leases); {duplicates} duplicates",
        accepted.len()
    );
    let mut b = b;
    b.child.start_kill().unwrap();
    let _ = b.child.wait().await;
}
