//! A real listener's bounds: graceful drain on shutdown (a request in
//! flight is answered, the listener stops accepting), the idle timeout,
//! and the body read deadline.

use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kiln_internal_api::server::{full, read_body, serve, ListenerLimits};
use kiln_internal_api::InternalClient;
use kiln_pki::DevPki;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn listener(
    pki: &DevPki,
    limits: ListenerLimits,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", tcp.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(
        tcp,
        tls,
        None,
        limits,
        |req: Request<hyper::body::Incoming>, _conn| async move {
            match req.uri().path() {
                "/slow" => {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    Response::new(full("slow done"))
                }
                "/body" => match read_body(req.into_body(), 1 << 20).await {
                    Ok(b) => Response::new(full(format!("{} bytes", b.len()))),
                    Err(e) => Response::new(full(e.message)),
                },
                _ => Response::new(full("ok")),
            }
        },
        async move {
            let _ = stopped.await;
        },
    ));
    (url, stop, task)
}

async fn call(client: &InternalClient, url: &str) -> Result<String, String> {
    let req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(full(""))
        .unwrap();
    let resp = client.send(req).await.map_err(|e| e.to_string())?;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_requests_in_flight_and_stops_accepting() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let (url, stop, task) = listener(&pki, ListenerLimits::default()).await;
    let client = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    assert_eq!(call(&client, &format!("{url}/")).await.unwrap(), "ok");
    let slow = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { call(&client, &format!("{url}/slow")).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    stop.send(()).unwrap();
    // The request in flight is answered...
    assert_eq!(slow.await.unwrap().unwrap(), "slow done");
    // ...and the listener is done once it was, well before the drain timeout.
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the listener finished draining")
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    let fresh = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    assert!(call(&fresh, &format!("{url}/")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_slow_bodies_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let limits = ListenerLimits {
        idle_timeout_ms: 500,
        header_read_timeout_ms: 10_000,
        body_read_timeout_ms: 700,
        ..Default::default()
    };
    let (url, _stop, _task) = listener(&pki, limits).await;
    let addr = url.trim_start_matches("https://").to_owned();
    let mut config =
        (*kiln_pki::internal_client_config(&pki.files("gateway-internal")).unwrap()).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        connector
            .connect("127.0.0.1".try_into().unwrap(), tcp)
            .await
            .unwrap()
    };

    // A request with a body sent too slowly: refused at the deadline.
    let mut tls = connect().await;
    tls.write_all(b"POST /body HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nabc")
        .await
        .unwrap();
    let started = Instant::now();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp))
        .await
        .expect("the slow body's connection closed")
        .ok();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.contains("body read timeout"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // An idle keep-alive connection: closed after its idle timeout.
    let mut tls = connect().await;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tls.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
    let idle_from = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .expect("the idle connection was closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let after = idle_from.elapsed();
    assert!(
        after >= Duration::from_millis(400) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
}
