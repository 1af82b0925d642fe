//! Durable async accept throughput: the queue's group-committed enqueue
//! (what an async InvokeFunction waits for before its 202) against raw
//! SQLite inserts with fsync, measured in the same run on the same disk.
//!
//! A second phase measures the same through the whole public path: signed
//! HTTPS async InvokeFunction calls (HTTP/2, one connection per caller) to
//! an in-process gateway whose dispatcher runs against a fake scheduler and
//! agent, so the figure includes TLS, signature checks and dispatch.
//!
//! Run: `cargo bench -p kiln-gateway --bench async_queue` (optimised) or
//! `cargo test -p kiln-gateway --bench async_queue` (debug build).
//! Environment: KILN_BENCH_DIR (default: a temp dir under /var/tmp, a real
//! disk rather than tmpfs), KILN_BENCH_SECS (default 3), KILN_BENCH_CALLERS
//! (default 64), KILN_BENCH_PAYLOAD (bytes, default 512).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_gateway::queue::{NewMessage, Queue};
use kiln_store::{Database, Migration};

fn env_num(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const RAW: &[Migration] = &[Migration {
    name: "raw",
    sql: "CREATE TABLE raw (id INTEGER PRIMARY KEY, task TEXT NOT NULL UNIQUE, payload BLOB NOT NULL);",
}];

/// Rows per second inserting `total` rows, `group` per fsync'd transaction.
fn raw_inserts(
    dir: &std::path::Path,
    name: &str,
    total: usize,
    group: usize,
    payload: &[u8],
) -> f64 {
    let db = Database::open(&dir.join(name), RAW).unwrap();
    let started = Instant::now();
    db.with_conn(|c| {
        let mut n = 0;
        while n < total {
            let tx = c.transaction()?;
            for _ in 0..group {
                tx.prepare_cached("INSERT INTO raw (task, payload) VALUES (?1, ?2)")?
                    .execute(rusqlite::params![format!("t{n}"), payload])?;
                n += 1;
            }
            tx.commit()?;
        }
        Ok(())
    })
    .unwrap();
    total as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // Arguments (`--bench` from cargo bench, test filters) are ignored.
    let secs = env_num("KILN_BENCH_SECS", 3);
    let callers = env_num("KILN_BENCH_CALLERS", 64) as usize;
    let payload = vec![b'x'; env_num("KILN_BENCH_PAYLOAD", 512) as usize];
    let base = std::env::var_os("KILN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/tmp"));
    let dir = tempfile::tempdir_in(&base).unwrap();
    println!(
        "async accept benchmark in {} ({} s, {callers} concurrent callers, {} B payloads)",
        dir.path().display(),
        secs,
        payload.len()
    );

    let single = raw_inserts(dir.path(), "single.db", 2_000, 1, &payload);
    let grouped = raw_inserts(dir.path(), "grouped.db", 50_000, 100, &payload);
    println!("raw SQLite, one fsync'd transaction per row: {single:>9.0} rows/s");
    println!("raw SQLite, 100 rows per fsync'd transaction: {grouped:>9.0} rows/s");

    let queue = Queue::open(&dir.path().join("queue.db")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let batches_before = queue.batches();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (queue, stop, payload) = (queue.clone(), stop.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let m = NewMessage {
                    account: format!("{}", 1_000_000 + c % 8).parse().unwrap(),
                    function: "bench".parse().unwrap(),
                    queue: format!("{}", 1_000_000 + c % 8),
                    task_id: format!("c{c}-{i}"),
                    request_id: format!("r{c}-{i}"),
                    payload: payload.clone(),
                    headers: vec![("content-type".into(), "application/octet-stream".into())],
                    now_ms: 1,
                };
                let t = Instant::now();
                queue.enqueue(m).await.unwrap();
                lat.push(t.elapsed());
                i += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let rate = lat.len() as f64 / elapsed;
    let batches = queue.batches() - batches_before;
    println!(
        "queue enqueue (durable, group commit):       {rate:>9.0} accepted/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} messages per transaction",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        lat.len() as f64 / batches.max(1) as f64,
    );
    println!(
        "vs raw single-row fsync: {:.1}x; target >= 10000/s and p99 < 10 ms: {}",
        rate / single,
        if rate >= 10_000.0 && percentile(&lat, 0.99) < Duration::from_millis(10) {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(queue);
    http_phase(dir.path(), secs, callers, &payload).await;
}

mod http_phase {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use http::{Request, Response, StatusCode};
    use http_body_util::BodyExt;
    use kiln_core::{InstanceId, LeaseId, NodeId};
    use kiln_internal_api::server::{self, full, Body};
    use kiln_internal_api::Lease;
    use tokio::net::TcpListener;

    pub async fn serve<F, Fut>(tls: Arc<rustls::ServerConfig>, f: F) -> SocketAddr
    where
        F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(server::serve_tls(
            l,
            tls,
            move |req, _| f(req),
            std::future::pending(),
        ));
        addr
    }

    pub async fn agent(req: Request<hyper::body::Incoming>) -> Response<Body> {
        let _ = req.into_body().collect().await;
        Response::builder()
            .status(200)
            .header("x-kiln-invoke-outcome", "ok")
            .body(full("ok"))
            .unwrap()
    }

    pub async fn scheduler(
        req: Request<hyper::body::Incoming>,
        agent_url: String,
    ) -> Response<Body> {
        let post = req.method() == http::Method::POST;
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
            },
        )
    }
}

async fn http_phase(dir: &std::path::Path, secs: u64, callers: usize, payload: &[u8]) {
    use bytes::Bytes;
    use http::{HeaderMap, Method, Request, StatusCode, Uri};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use kiln_gateway::config::{BootstrapKey, InternalListener, PublicListener};

    const AK: &str = "AKBENCH000000001";
    const SK: &str = "secret-of-the-bench-0001";
    let pki = kiln_pki::DevPki::ensure(&dir.join("pki"), &[]).unwrap();
    let agent = http_phase::serve(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        http_phase::agent,
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = http_phase::serve(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |r| http_phase::scheduler(r, agent_url.clone()),
    )
    .await;
    let public = pki.files("gateway");
    let gw = kiln_gateway::start(kiln_gateway::GatewayConfig {
        state_dir: dir.join("gateway"),
        region: "cn-bench".into(),
        scheduler_url: format!("https://127.0.0.1:{}", sched.port()),
        metrics_listen: None,
        public: PublicListener {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: public.cert,
            key: public.key,
        },
        internal: InternalListener {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        tls: pki.files("gateway-internal"),
        lease_hold_ms: 250,
        credentials_lifetime_s: 3600,
        async_queue: Default::default(),
        runtimes: Default::default(),
        vpc_listener: None,
        bootstrap_keys: vec![BootstrapKey {
            account_id: "1000000000000001".parse().unwrap(),
            access_key_id: AK.into(),
            access_key_secret: SK.into(),
        }],
    })
    .await
    .unwrap();
    let port = gw.addr().port();
    let mut tls = (*kiln_pki::public_client_config(&pki.ca_cert()).unwrap()).clone();
    tls.alpn_protocols.clear();
    let mut connector = HttpConnector::new();
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(connector);
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector);
    let signed = move |method: Method, path: &str, body: Vec<u8>, extra: &[(&str, String)]| {
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
    };
    let zip = {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        w.start_file("app.py", zip::write::SimpleFileOptions::default())
            .unwrap();
        w.write_all(b"print('hi')\n").unwrap();
        w.finish().unwrap().into_inner()
    };
    let doc = serde_json::json!({
        "functionName": "bench",
        "runtime": "custom.debian12",
        "handler": "index.handler",
        "customRuntimeConfig": {"command": ["python3", "/code/app.py"], "port": 9000},
        "code": {"zipFile": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, zip)},
    });
    let r = client
        .request(signed(
            Method::POST,
            "/2023-03-30/functions",
            doc.to_string().into_bytes(),
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (client, stop, payload) = (client.clone(), stop.clone(), payload.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let req = signed(
                    Method::POST,
                    "/2023-03-30/functions/bench/invocations",
                    payload.clone(),
                    &[("x-fc-invocation-type", "Async".to_owned())],
                );
                let t = Instant::now();
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let _ = resp.into_body().collect().await;
                assert_eq!(status, StatusCode::ACCEPTED);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "signed HTTPS async InvokeFunction (202 once durable): {rate:>7.0} accepted/s; p50 {:.2} ms, p99 {:.2} ms (includes TLS, signature checks and dispatching in the same process)",
        percentile(&lat, 0.50).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    );
    gw.shutdown().await;
}
