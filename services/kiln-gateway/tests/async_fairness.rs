//! Fair dispatch over the public API: account A queues thousands of slow
//! async calls through signed HTTPS InvokeFunction, then account B queues
//! ten, and A queues ten more for a function with its own queue. B's and
//! the dedicated queue's calls must all finish before A's backlog is 10%
//! drained (a ratio of completions, not a wall-clock threshold). The queue
//! metrics on the gateway's Prometheus endpoint are checked to move with
//! the same traffic.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use kiln_core::{InstanceId, LeaseId, NodeId};
use kiln_gateway::config::{AsyncQueueConfig, BootstrapKey};
use kiln_internal_api::server::{self, full, Body};
use kiln_internal_api::Lease;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ACCOUNT_A: &str = "1000000000000001";
const ACCOUNT_B: &str = "1000000000000002";
const AK_A: &str = "AKFAIRA000000001";
const SK_A: &str = "secret-of-fairness-a-001";
const AK_B: &str = "AKFAIRB000000001";
const SK_B: &str = "secret-of-fairness-b-001";
/// A's backlog.
const BACKLOG: usize = 2_000;
/// How long the fake function takes per call.
const CALL_MS: u64 = 100;

/// A fake service for the whole test.
async fn serve<F, Fut>(tls: Arc<rustls::ServerConfig>, f: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    common::serve_until(tls, std::future::pending(), f).await
}

async fn metrics(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8(out).unwrap()
}

/// The value of one sample line (`name{labels} value`), 0 if absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_backlog_does_not_delay_other_accounts_or_dedicated_queues() {
    let dir = tempfile::tempdir().unwrap();
    let pki = kiln_pki::DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    // Completion order, by payload ("a-17", "b-3", "d-5").
    let done: Arc<Mutex<Vec<String>>> = Arc::default();
    let d = done.clone();
    let agent = serve(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let d = d.clone();
            async move {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                tokio::time::sleep(Duration::from_millis(CALL_MS)).await;
                d.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&body).into_owned());
                Response::builder()
                    .status(200)
                    .header("x-kiln-invoke-outcome", "ok")
                    .body(full("ok"))
                    .unwrap()
            }
        },
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = serve(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |req: Request<hyper::body::Incoming>| {
            let agent_url = agent_url.clone();
            async move {
                let post = req.method() == Method::POST;
                let _ = req.into_body().collect().await;
                if !post {
                    return server::no_content();
                }
                server::json(
                    StatusCode::OK,
                    &Lease {
                        lease_id: LeaseId::generate(),
                        instance_id: InstanceId::generate(),
                        node_id: NodeId::generate(),
                        agent_url,
                        cold_start: false,
                        expires_in_ms: 600_000,
                    },
                )
            }
        },
    )
    .await;
    let key =
        |account: &str, ak: &str, sk: &str| BootstrapKey::new(account.parse().unwrap(), ak, sk);
    let gw = kiln_gateway::start(kiln_gateway::GatewayConfig {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        lease_hold_ms: 250,
        async_queue: AsyncQueueConfig {
            max_in_flight: 8,
            per_queue: 4,
            ..Default::default()
        },
        bootstrap_keys: vec![key(ACCOUNT_A, AK_A, SK_A), key(ACCOUNT_B, AK_B, SK_B)],
        ..kiln_gateway::GatewayConfig::loopback(
            dir.path().join("gateway"),
            "cn-test",
            &format!("https://127.0.0.1:{}", sched.port()),
            &pki,
        )
    })
    .await
    .unwrap();
    let metrics_addr = gw.metrics_addr().unwrap();
    let port = gw.addr().port();
    let client = common::https_client(&pki, true);
    let call = move |ak: &'static str,
                     sk: &'static str,
                     method: Method,
                     path: String,
                     body: Vec<u8>,
                     async_call: bool| {
        let client = client.clone();
        async move {
            let uri: Uri = format!("https://localhost:{port}{path}").parse().unwrap();
            let mut h = HeaderMap::new();
            h.insert("content-type", "application/json".parse().unwrap());
            if async_call {
                h.insert("x-fc-invocation-type", "Async".parse().unwrap());
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let nonce = kiln_auth::new_nonce();
            let params = kiln_auth::SigningParams::new(ak, sk, now, &nonce);
            kiln_auth::sign(&method, &uri, &mut h, &body, &params).unwrap();
            let mut req = Request::builder()
                .method(method)
                .uri(uri)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            *req.headers_mut() = h;
            let resp = client.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, body)
        }
    };
    let zip = {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.start_file("app.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"print('hi')\n").unwrap();
        w.finish().unwrap().into_inner()
    };
    let create = |name: &str| {
        json!({
            "functionName": name,
            "runtime": "custom.debian12",
            "handler": "index.handler",
            "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
            "code": {"zipFile": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &zip)},
        })
        .to_string()
        .into_bytes()
    };
    for (ak, sk, f) in [
        (AK_A, SK_A, "slow"),
        (AK_A, SK_A, "own"),
        (AK_B, SK_B, "slow"),
    ] {
        let (s, b) = call(
            ak,
            sk,
            Method::POST,
            "/2023-03-30/functions".into(),
            create(f),
            false,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b:?}");
    }
    // A's "own" function waits in a queue of its own.
    let (s, b) = call(
        AK_A,
        SK_A,
        Method::PUT,
        "/2023-03-30/functions/own/async-invoke-config".into(),
        json!({"dedicatedQueue": true}).to_string().into_bytes(),
        false,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b:?}");
    let before = metrics(metrics_addr).await;

    // A's backlog, 16 callers at a time.
    let next = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for _ in 0..16 {
        let (call, next) = (call.clone(), next.clone());
        callers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= BACKLOG {
                    break;
                }
                let path = "/2023-03-30/functions/slow/invocations".to_owned();
                let (s, b) = call(
                    AK_A,
                    SK_A,
                    Method::POST,
                    path,
                    format!("a-{i}").into_bytes(),
                    true,
                )
                .await;
                assert_eq!(s, StatusCode::ACCEPTED, "{b:?}");
            }
        }));
    }
    for c in callers {
        c.await.unwrap();
    }
    let a_done = |v: &[String]| v.iter().filter(|p| p.starts_with("a-")).count();
    let a_done_at_start = a_done(&done.lock().unwrap());
    let remaining = BACKLOG - a_done_at_start;
    assert!(
        remaining > BACKLOG / 2,
        "A's backlog drained while it was queued: {a_done_at_start} done"
    );

    // The depth gauge sees A's backlog. It counts unfinished messages as
    // of its last refresh (every 5 seconds), which may predate the last
    // enqueue; once it is refreshed after them, it cannot be below what is
    // unfinished now (A's backlog only shrinks), however fast the machine
    // drains it meanwhile.
    let (mut depth, mut unfinished_now) = (0.0, BACKLOG);
    for _ in 0..150 {
        let text = metrics(metrics_addr).await;
        depth = sample(
            &text,
            &format!("kiln_gateway_async_queue_depth{{account=\"{ACCOUNT_A}\"}}"),
        );
        unfinished_now = BACKLOG - a_done(&done.lock().unwrap());
        if depth > 0.0 && depth >= unfinished_now as f64 {
            assert!(
                sample(&text, "kiln_gateway_async_oldest_message_age_seconds") > 0.0,
                "{text}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        depth >= unfinished_now as f64 && depth > 0.0 && depth <= BACKLOG as f64,
        "depth {depth}, unfinished now {unfinished_now}"
    );

    // B's ten and A's ten on the dedicated queue.
    let mut small = Vec::new();
    for i in 0..10 {
        let call = call.clone();
        small.push(tokio::spawn(async move {
            let (s, _) = call(
                AK_B,
                SK_B,
                Method::POST,
                "/2023-03-30/functions/slow/invocations".into(),
                format!("b-{i}").into_bytes(),
                true,
            )
            .await;
            assert_eq!(s, StatusCode::ACCEPTED);
            let (s, _) = call(
                AK_A,
                SK_A,
                Method::POST,
                "/2023-03-30/functions/own/invocations".into(),
                format!("d-{i}").into_bytes(),
                true,
            )
            .await;
            assert_eq!(s, StatusCode::ACCEPTED);
        }));
    }
    for s in small {
        s.await.unwrap();
    }
    // Until all 20 finish (or A's backlog is done, which fails below).
    loop {
        let v = done.lock().unwrap().clone();
        let others = v.iter().filter(|p| !p.starts_with("a-")).count();
        if others == 20 || a_done(&v) == BACKLOG {
            let a_during = a_done(&v) - a_done_at_start;
            assert_eq!(others, 20, "A's backlog drained first");
            assert!(
                a_during * 10 < remaining,
                "B's and the dedicated queue's calls waited for {a_during} of A's {remaining} queued calls (10% allowed)"
            );
            eprintln!(
                "20 other calls finished while {a_during} of A's {remaining} queued calls did"
            );
            break;
        }
        drop(v);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The counters moved with that traffic.
    let after = metrics(metrics_addr).await;
    let ev = |t: &str, e: &str| {
        sample(
            t,
            &format!("kiln_gateway_async_messages_total{{event=\"{e}\"}}"),
        )
    };
    assert_eq!(
        ev(&after, "enqueued") - ev(&before, "enqueued"),
        (BACKLOG + 20) as f64,
        "{after}"
    );
    assert!(
        ev(&after, "dispatched") >= (a_done_at_start + 20) as f64,
        "{after}"
    );
    assert!(ev(&after, "succeeded") >= 20.0, "{after}");
    assert!(
        ev(&after, "dispatched") >= ev(&after, "succeeded"),
        "{after}"
    );
    assert_eq!(ev(&after, "redelivered"), 0.0, "{after}");
    let count = |t: &str, n: &str| sample(t, &format!("kiln_gateway_{n}_count"));
    let sum = |t: &str, n: &str| sample(t, &format!("kiln_gateway_{n}_sum"));
    let batches =
        count(&after, "async_commit_batch_ops") - count(&before, "async_commit_batch_ops");
    let ops = sum(&after, "async_commit_batch_ops") - sum(&before, "async_commit_batch_ops");
    assert!(
        batches > 0.0 && ops >= (BACKLOG + 20) as f64,
        "{batches} transactions of {ops} operations"
    );
    assert!(count(&after, "async_commit_seconds") > 0.0);
    assert!(
        count(&after, "async_dispatch_wait_seconds") >= ev(&after, "dispatched"),
        "{after}"
    );
    gw.shutdown().await;
}
