//! A small closed-loop HTTP/1.1 load generator for `kiln bench`.
//!
//! Requests are built (and signed) before the clock starts, so the
//! generator spends its share of the machine's two cores on sending, not on
//! HMACs; the same generator drives the baseline and Kiln so the ratio
//! compares like with like.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Where to send: plain TCP or TLS with the given client config.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub latencies_us: Vec<u64>,
    pub elapsed: Duration,
    pub errors: u64,
}

impl RunResult {
    pub fn throughput(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The q-quantile (0..=1) latency in microseconds.
    pub fn quantile_us(&self, q: f64) -> u64 {
        quantile(&self.latencies_us, q)
    }
}

pub fn quantile(values: &[u64], q: f64) -> u64 {
    if values.is_empty() {
        return 0;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let idx = ((v.len() - 1) as f64 * q).round() as usize;
    v[idx.min(v.len() - 1)]
}

pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

type Conn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> std::io::Result<Conn> {
    let tcp = TcpStream::connect(target.addr).await?;
    tcp.set_nodelay(true)?;
    let io_err = |e: hyper::Error| std::io::Error::other(e.to_string());
    match &target.tls {
        None => {
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(io_err)?;
            tokio::spawn(conn);
            Ok(send)
        }
        Some((config, name)) => {
            let mut config = (**config).clone();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name.clone(), tcp)
                .await?;
            let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(io_err)?;
            tokio::spawn(conn);
            Ok(send)
        }
    }
}

/// The load generator's own threads, as a client on another machine or
/// process would have, so it does not share the measured services'
/// runtime (in `kiln bench` they run in-process).
pub struct LoadRuntime(Option<tokio::runtime::Runtime>);

impl LoadRuntime {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("kiln-loadgen")
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    /// [`soak`] on these threads.
    pub async fn soak(
        &self,
        target: &Target,
        connections: usize,
        duration: Duration,
        make: Arc<dyn Fn() -> std::io::Result<Request<Full<Bytes>>> + Send + Sync>,
        counts: Arc<SoakCounts>,
    ) -> std::io::Result<()> {
        let target = target.clone();
        let rt = self.0.as_ref().expect("runtime present until dropped");
        rt.spawn(async move { soak(&target, connections, duration, make, counts).await })
            .await
            .map_err(std::io::Error::other)?
    }

    /// [`run`] on these threads.
    pub async fn run(
        &self,
        target: &Target,
        connections: usize,
        requests: Vec<Request<Full<Bytes>>>,
    ) -> std::io::Result<RunResult> {
        let target = target.clone();
        let rt = self.0.as_ref().expect("runtime present until dropped");
        rt.spawn(async move { run(&target, connections, requests).await })
            .await
            .map_err(std::io::Error::other)?
    }
}

impl Drop for LoadRuntime {
    fn drop(&mut self) {
        // Dropped from async code (bench's), where a blocking shutdown
        // would panic.
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Send every request over `connections` keep-alive connections, each
/// connection one request at a time, and time each request.
pub async fn run(
    target: &Target,
    connections: usize,
    requests: Vec<Request<Full<Bytes>>>,
) -> std::io::Result<RunResult> {
    let total = requests.len();
    let queue = Arc::new(Mutex::new(requests));
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        conns.push(connect(target).await?);
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut conn in conns {
        let queue = queue.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(total / connections + 1);
            let mut errors = 0u64;
            loop {
                let Some(req) = queue.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
                    break;
                };
                let t = Instant::now();
                let ok = match conn.send_request(req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        ok & resp.into_body().collect().await.is_ok()
                    }
                    Err(_) => false,
                };
                if ok {
                    lat.push(t.elapsed().as_micros() as u64);
                } else {
                    errors += 1;
                    // The connection may be gone; open a new one.
                    match connect(&target).await {
                        Ok(c) => conn = c,
                        Err(_) => break,
                    }
                }
            }
            (lat, errors)
        }));
    }
    let mut latencies_us = Vec::with_capacity(total);
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.map_err(std::io::Error::other)?;
        latencies_us.extend(lat);
        errors += e;
    }
    Ok(RunResult {
        latencies_us,
        elapsed: start.elapsed(),
        errors,
    })
}

/// Counts of a [`soak`], read while it runs.
#[derive(Debug, Default)]
pub struct SoakCounts {
    pub ok: std::sync::atomic::AtomicU64,
    /// `503 Service Unavailable` answers.
    pub unavailable: std::sync::atomic::AtomicU64,
    /// `429` answers (FC's ResourceThrottled).
    pub throttled: std::sync::atomic::AtomicU64,
    /// Any other non-2xx answer, or a failed connection.
    pub other_errors: std::sync::atomic::AtomicU64,
}

/// Send requests made by `make` (one per call, so each is signed when it
/// is sent and its date stays fresh however long the run) over
/// `connections` keep-alive connections until `duration` has passed,
/// counting answers by kind into `counts`.
pub async fn soak(
    target: &Target,
    connections: usize,
    duration: Duration,
    make: Arc<dyn Fn() -> std::io::Result<Request<Full<Bytes>>> + Send + Sync>,
    counts: Arc<SoakCounts>,
) -> std::io::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let until = Instant::now() + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut conn = connect(target).await?;
        let (target, make, counts) = (target.clone(), make.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let req = make()?;
                let status = match conn.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        match resp.into_body().collect().await {
                            Ok(_) => Some(status),
                            Err(_) => None,
                        }
                    }
                    Err(_) => None,
                };
                match status {
                    Some(s) if s.is_success() => counts.ok.fetch_add(1, Relaxed),
                    Some(s) if s.as_u16() == 503 => counts.unavailable.fetch_add(1, Relaxed),
                    Some(s) if s.as_u16() == 429 => counts.throttled.fetch_add(1, Relaxed),
                    _ => counts.other_errors.fetch_add(1, Relaxed),
                };
                if status.is_none() {
                    conn = connect(&target).await?;
                }
            }
            Ok::<_, std::io::Error>(())
        }));
    }
    for t in tasks {
        t.await.map_err(std::io::Error::other)??;
    }
    Ok(())
}

/// This process's resident memory (VmRSS), in kB.
pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&v, 0.5), 51);
        assert_eq!(quantile(&v, 0.99), 99);
        assert_eq!(quantile(&[], 0.5), 0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_soak_runs_for_its_duration_and_counts_answers_by_kind() {
        use hyper::service::service_fn;
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let count = served.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                let count = count.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<hyper::body::Incoming>| {
                        // Every 10th answer a 503, every 25th a 429.
                        let n = count.fetch_add(1, Relaxed) + 1;
                        let status = match n {
                            n if n % 10 == 0 => 503,
                            n if n % 25 == 0 => 429,
                            _ => 200,
                        };
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"ok")))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let make = Arc::new(move || {
            Ok(Request::post(format!("http://{addr}/invoke"))
                .header("host", addr.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap())
        });
        let counts = Arc::new(SoakCounts::default());
        let lg = LoadRuntime::new(2).unwrap();
        let started = Instant::now();
        lg.soak(
            &Target { addr, tls: None },
            4,
            Duration::from_millis(500),
            make,
            counts.clone(),
        )
        .await
        .unwrap();
        drop(lg);
        assert!(started.elapsed() >= Duration::from_millis(500));
        let (ok, unavailable, throttled, other) = (
            counts.ok.load(Relaxed),
            counts.unavailable.load(Relaxed),
            counts.throttled.load(Relaxed),
            counts.other_errors.load(Relaxed),
        );
        assert_eq!(ok + unavailable + throttled + other, served.load(Relaxed));
        assert!(ok > 100, "{ok} calls in half a second");
        assert_eq!(unavailable, served.load(Relaxed) / 10);
        assert!(throttled > 0);
        assert_eq!(other, 0);
        assert!(rss_kb() > 0);
    }

    #[tokio::test]
    async fn drives_a_plain_server_and_counts_errors() {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let status = if req.uri().path() == "/bad" { 500 } else { 200 };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::from_static(b"ok")))
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let mk = |p: &str| {
            Request::post(format!("http://{addr}{p}"))
                .header("host", addr.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let mut reqs: Vec<_> = (0..50).map(|_| mk("/ok")).collect();
        reqs.push(mk("/bad"));
        // On threads of its own, dropped from async code (as bench does).
        let lg = LoadRuntime::new(2).unwrap();
        let r = lg.run(&Target { addr, tls: None }, 4, reqs).await.unwrap();
        drop(lg);
        assert_eq!(r.latencies_us.len(), 50);
        assert_eq!(r.errors, 1);
        assert!(r.throughput() > 0.0);
    }
}
