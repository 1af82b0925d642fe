//! Durable async accept throughput: the queue's group-committed enqueue
//! (what an async InvokeFunction waits for before its 202) against raw
//! SQLite inserts with fsync, measured in the same run on the same disk.
//!
//! A second phase measures the whole public path: signed HTTPS async
//! InvokeFunction calls to an in-process gateway (fake scheduler and
//! agent), in rounds, each round against baselines measured right before
//! on the same machine with the same load generator: the HTTPS + signature
//! ceiling (the gateway's own TLS server and signature verifier answering
//! 202 and nothing else) and nginx terminating TLS with a fixed 202 (the
//! strongest peer for the HTTPS part; skipped without nginx). Kiln is
//! measured twice: its accept path alone (the fake agent holds calls, so
//! the dispatcher fills its slots once and then costs nothing) and while it
//! also dispatches every message to an instant function in-process.
//! Medians of the rounds are printed, with Kiln's rate as a share of each
//! baseline; the machine is shared, so compare ratios within one run.
//!
//! Run: `cargo bench -p kiln-gateway --bench async_queue` (optimised) or
//! `cargo test -p kiln-gateway --bench async_queue` (debug build).
//! Environment: KILN_BENCH_DIR (default: a temp dir under /var/tmp, a real
//! disk rather than tmpfs), KILN_BENCH_SECS (per measurement, default 3),
//! KILN_BENCH_ROUNDS (default 3), KILN_BENCH_CALLERS (default 32),
//! KILN_BENCH_PAYLOAD (bytes, default 512), KILN_BENCH_HTTP (1, the
//! default: HTTP/1.1 keep-alive, a connection per caller, as the SDKs
//! send; 2: HTTP/2 over KILN_BENCH_CONNS connections, default 8),
//! KILN_BENCH_TARGETS (comma-separated from queue, pg, noop, nginx,
//! accept, dispatch; default all).
//!
//! Target `pg`: the shared queue on PostgreSQL (a durable throwaway
//! server: fsync and synchronous_commit on, under /var/tmp) against raw
//! PostgreSQL inserts with the same durability, one row per request, the
//! same callers (`kiln_gateway::queue::bench`); medians of the rounds.

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
    let callers = env_num("KILN_BENCH_CALLERS", 32) as usize;
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

    if wanted("queue") {
        queue_phase(dir.path(), secs, callers, &payload).await;
    }
    if wanted("pg") {
        pg_phase(secs, callers, &payload).await;
    }
    http_phase(dir.path(), secs, callers, &payload).await;
}

async fn pg_phase(secs: u64, callers: usize, payload: &[u8]) {
    let rounds = env_num("KILN_BENCH_ROUNDS", 3).max(1) as usize;
    let Some(server) = kiln_test_support::postgres::PgServer::start_durable() else {
        println!("PostgreSQL: SKIPPED (needs root and Debian's postgresql)");
        return;
    };
    let url = server.create_database("bench");
    let c = kiln_gateway::queue::bench::compare_pg_accepts(&url, secs, callers, payload, rounds)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    println!("PostgreSQL (fsync, synchronous_commit on), {callers} callers, medians of {rounds} rounds of {secs} s:");
    println!("  shared queue enqueue (group commit): {}", c.queue);
    println!("  raw INSERT, one commit per row:      {}", c.raw);
    println!("  queue / raw: {:.2}x", c.ratio());
    println!("  shared nonce check, 1 caller:        {}", c.nonce_one);
    println!(
        "  shared nonce check, {callers} callers:      {}",
        c.nonce_many
    );
}

/// Whether `KILN_BENCH_TARGETS` (comma-separated: queue, noop, nginx,
/// accept, dispatch; default all) names `target`.
fn wanted(target: &str) -> bool {
    std::env::var("KILN_BENCH_TARGETS")
        .map(|v| v.split(',').any(|t| t.trim() == target))
        .unwrap_or(true)
}

async fn queue_phase(dir: &std::path::Path, secs: u64, callers: usize, payload: &[u8]) {
    let single = raw_inserts(dir, "single.db", 2_000, 1, payload);
    let grouped = raw_inserts(dir, "grouped.db", 50_000, 100, payload);
    println!("raw SQLite, one fsync'd transaction per row: {single:>9.0} rows/s");
    println!("raw SQLite, 100 rows per fsync'd transaction: {grouped:>9.0} rows/s");

    let queue = Queue::open(&dir.join("queue.db")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let batches_before = queue.batches();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let (queue, stop, payload) = (queue.clone(), stop.clone(), payload.to_vec());
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
                    payload: payload.to_vec(),
                    headers: vec![("content-type".into(), "application/octet-stream".into())],
                    now_ms: 1,
                    depth_limit: None,
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
                expires_in_ms: 600_000,
            },
        )
    }
}

/// One load run's figures.
#[derive(Clone, Copy, Default)]
struct Load {
    rate: f64,
    p50: Duration,
    p99: Duration,
}

impl Load {
    fn show(&self) -> String {
        format!(
            "{:>7.0}/s p50 {:>5.2} ms p99 {:>6.2} ms",
            self.rate,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3
        )
    }
}

fn median(mut v: Vec<Load>) -> Load {
    v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mut m = v[v.len() / 2];
    let mut p99: Vec<Duration> = v.iter().map(|l| l.p99).collect();
    p99.sort();
    m.p99 = p99[p99.len() / 2];
    let mut p50: Vec<Duration> = v.iter().map(|l| l.p50).collect();
    p50.sort();
    m.p50 = p50[p50.len() / 2];
    m
}

type BenchClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// The load generator's clients: with HTTP/2 (`KILN_BENCH_HTTP=2`) `conns`
/// clients of one multiplexed connection each; with HTTP/1.1 (the default)
/// one keep-alive pool (a connection per concurrent caller).
fn clients(ca: &std::path::Path, http2: bool, conns: usize) -> Vec<BenchClient> {
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let n = if http2 { conns.max(1) } else { 1 };
    (0..n)
        .map(|_| {
            let mut tls = (*kiln_pki::public_client_config(ca).unwrap()).clone();
            // The connector sets ALPN from the enabled protocols.
            tls.alpn_protocols.clear();
            let mut connector = HttpConnector::new();
            connector.enforce_http(false);
            connector.set_nodelay(true);
            let b = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_only();
            let connector = if http2 {
                b.enable_http2().wrap_connector(connector)
            } else {
                b.enable_http1().wrap_connector(connector)
            };
            let mut c = Client::builder(TokioExecutor::new());
            c.http2_only(http2).pool_max_idle_per_host(1024);
            c.build(connector)
        })
        .collect()
}

const AK: &str = "AKBENCH000000001";
const SK: &str = "secret-of-the-bench-0001";
const ACCOUNT: &str = "1000000000000001";

/// A signed request as the SDKs send it (the load generator signs every
/// request, whatever the target, so each target costs the client the same).
fn signed(
    method: http::Method,
    port: u16,
    path: &str,
    body: Vec<u8>,
    extra: &[(&str, &str)],
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let uri: http::Uri = format!("https://localhost:{port}{path}").parse().unwrap();
    let mut h = http::HeaderMap::new();
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
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    *req.headers_mut() = h;
    req
}

/// `callers` concurrent callers sending async invokes of `path` for
/// `secs`; every answer must be 202.
async fn drive(
    clients: &[BenchClient],
    port: u16,
    path: &'static str,
    secs: u64,
    callers: usize,
    payload: &[u8],
    strip_host: bool,
) -> Load {
    use http_body_util::BodyExt;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let client = clients[c % clients.len()].clone();
        let (stop, payload) = (stop.clone(), payload.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut req = signed(
                    http::Method::POST,
                    port,
                    path,
                    payload.clone(),
                    &[("x-fc-invocation-type", "Async")],
                );
                if strip_host {
                    // nginx refuses a host header beside HTTP/2's :authority
                    // (the signature covers it; nginx does not check it).
                    req.headers_mut().remove(http::header::HOST);
                }
                let t = Instant::now();
                let resp = client.request(req).await.unwrap();
                let status = resp.status();
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                assert_eq!(
                    status,
                    http::StatusCode::ACCEPTED,
                    "port {port}: {:?}",
                    body.unwrap_or_default()
                );
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
    Load {
        rate,
        p50: percentile(&lat, 0.50),
        p99: percentile(&lat, 0.99),
    }
}

/// The HTTPS + signature ceiling: the gateway's TLS server (same rustls
/// config, same hyper server) and the same signature verifier, answering
/// 202 with a request id and doing nothing else.
async fn noop_server(cert: &std::path::Path, key: &std::path::Path) -> u16 {
    use http_body_util::BodyExt;
    let keys = Arc::new(kiln_auth::InMemoryKeys::new());
    keys.insert(kiln_auth::AccessKey {
        account_id: ACCOUNT.parse().unwrap(),
        access_key_id: AK.into(),
        secret: SK.into(),
    });
    let verifier = Arc::new(kiln_auth::Verifier::new(
        keys,
        Arc::new(kiln_core::SystemClock),
    ));
    let tls = kiln_pki::public_server_config(cert, key).unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(kiln_internal_api::server::serve_tls(
        l,
        tls,
        move |req: http::Request<hyper::body::Incoming>, _| {
            let verifier = verifier.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let view = kiln_auth::RequestView::new(&parts.method, &parts.uri, &parts.headers);
                let status = match verifier.verify(view, &body) {
                    Ok(_) => http::StatusCode::ACCEPTED,
                    Err(_) => http::StatusCode::FORBIDDEN,
                };
                http::Response::builder()
                    .status(status)
                    .header("x-fc-request-id", kiln_core::RequestId::generate().as_str())
                    .body(kiln_internal_api::server::full(bytes::Bytes::new()))
                    .unwrap()
            }
        },
        std::future::pending(),
    ));
    port
}

/// nginx (Debian's nginx-light) terminating TLS (HTTP/2 and HTTP/1.1) with
/// the same certificate and answering a fixed 202, as a peer's floor.
struct Nginx {
    child: std::process::Child,
    port: u16,
}

impl Nginx {
    fn start(dir: &std::path::Path, cert: &std::path::Path, key: &std::path::Path) -> Option<Self> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.join("nginx");
        std::fs::create_dir_all(&d).unwrap();
        let conf = format!(
            "worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ return 202; }}
  }}
}}
",
            workers = std::thread::available_parallelism().map_or(2, |n| n.get()),
            d = d.display(),
            cert = cert.display(),
            key = key.display(),
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(Self { child, port });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut n = Self { child, port };
        n.stop();
        None
    }

    fn stop(&mut self) {
        // TERM to the master we started (it stops its workers), by pid.
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

async fn http_phase(dir: &std::path::Path, secs: u64, callers: usize, payload: &[u8]) {
    use bytes::Bytes;
    use http::{Method, StatusCode};
    use http_body_util::BodyExt;
    use kiln_gateway::config::BootstrapKey;

    let rounds = env_num("KILN_BENCH_ROUNDS", 3).max(1) as usize;
    let http2 = env_num("KILN_BENCH_HTTP", 1) == 2;
    let conns = env_num("KILN_BENCH_CONNS", 8) as usize;
    let pki = kiln_pki::DevPki::ensure(&dir.join("pki"), &[]).unwrap();
    // The fake agent holds every call until the gate opens: closed, the
    // dispatcher fills its slots once and then costs nothing, so the
    // figure is the accept path alone; open, the same process also
    // dispatches every message to an instant function.
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    let agent = http_phase::serve(
        kiln_pki::internal_server_config(&pki.files("agent")).unwrap(),
        move |req| {
            let mut g = gate_rx.clone();
            async move {
                let _ = g.wait_for(|open| *open).await;
                http_phase::agent(req).await
            }
        },
    )
    .await;
    let agent_url = format!("https://127.0.0.1:{}", agent.port());
    let sched = http_phase::serve(
        kiln_pki::internal_server_config(&pki.files("scheduler")).unwrap(),
        move |r| http_phase::scheduler(r, agent_url.clone()),
    )
    .await;
    let public = pki.files("gateway");
    let noop_port = noop_server(&public.cert, &public.key).await;
    let nginx = Nginx::start(dir, &public.cert, &public.key);
    let gw = kiln_gateway::start(kiln_gateway::GatewayConfig {
        lease_hold_ms: 250,
        bootstrap_keys: vec![BootstrapKey::new(ACCOUNT.parse().unwrap(), AK, SK)],
        ..kiln_gateway::GatewayConfig::loopback(
            dir.join("gateway"),
            "cn-bench",
            &format!("https://127.0.0.1:{}", sched.port()),
            &pki,
        )
    })
    .await
    .unwrap();
    let port = gw.addr().port();
    let clients = clients(&pki.ca_cert(), http2, conns);
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
    let r = clients[0]
        .request(signed(
            Method::POST,
            port,
            "/2023-03-30/functions",
            doc.to_string().into_bytes(),
            &[],
        ))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let _ = r
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_else(|_| Bytes::new());

    println!(
        "signed HTTPS async invokes, {} ({} connection(s)), {callers} callers, {rounds} rounds of {secs} s; load generator in the same process",
        if http2 { "HTTP/2" } else { "HTTP/1.1" },
        if http2 { conns.to_string() } else { "one per caller".into() },
    );
    let path = "/2023-03-30/functions/bench/invocations";
    let (mut ceiling, mut peer, mut accept, mut dispatching) = (vec![], vec![], vec![], vec![]);
    let skipped = || "skipped".to_owned();
    for round in 0..rounds {
        let c = if wanted("noop") {
            Some(drive(&clients, noop_port, path, secs, callers, payload, false).await)
        } else {
            None
        };
        let n = match &nginx {
            Some(n) if wanted("nginx") => {
                Some(drive(&clients, n.port, path, secs, callers, payload, http2).await)
            }
            _ => None,
        };
        gate.send_replace(false);
        let a = if wanted("accept") {
            Some(drive(&clients, port, path, secs, callers, payload, false).await)
        } else {
            None
        };
        gate.send_replace(true);
        let d = if wanted("dispatch") {
            Some(drive(&clients, port, path, secs, callers, payload, false).await)
        } else {
            None
        };
        println!(
            "  round {}: no-op {} | nginx {} | kiln accept {} | kiln accept+dispatch {}",
            round + 1,
            c.map_or_else(skipped, |l| l.show()),
            n.map_or_else(skipped, |l| l.show()),
            a.map_or_else(skipped, |l| l.show()),
            d.map_or_else(skipped, |l| l.show()),
        );
        ceiling.extend(c);
        peer.extend(n);
        accept.extend(a);
        dispatching.extend(d);
    }
    let show = |v: Vec<Load>| {
        if v.is_empty() {
            skipped()
        } else {
            median(v).show()
        }
    };
    let rate = |v: &[Load]| (!v.is_empty()).then(|| median(v.to_vec()));
    let (c, n, a) = (rate(&ceiling), rate(&peer), rate(&accept));
    println!("medians of {rounds} rounds:");
    println!(
        "  HTTPS + signature no-op (same TLS server and verifier): {}",
        show(ceiling)
    );
    if nginx.is_none() {
        println!("  nginx: SKIPPED (not installed; scripts/install-deps.sh installs nginx-light)");
    } else {
        println!(
            "  nginx TLS, fixed 202 (no signature check):             {}",
            show(peer)
        );
    }
    println!(
        "  kiln async InvokeFunction, 202 after fsync:              {}",
        show(accept)
    );
    println!(
        "  same, while dispatching every message in-process:       {}",
        show(dispatching)
    );
    if let Some(a) = a {
        if let Some(c) = c {
            println!(
                "  kiln accept / no-op ceiling: {:.0}% of the rate",
                100.0 * a.rate / c.rate
            );
        }
        if let Some(n) = n {
            println!(
                "  kiln accept / nginx: {:.0}% of the rate",
                100.0 * a.rate / n.rate
            );
        }
        println!(
            "  target >= 10000/s and p99 < 10 ms: {}",
            if a.rate >= 10_000.0 && a.p99 < Duration::from_millis(10) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    gate.send_replace(true);
    gw.shutdown().await;
}
