//! `GET /healthz` on the public listener, as a load balancer sees it: the
//! real gateway on loopback, probed without a signature, through a
//! shutdown with a drain delay.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use kiln_gateway::config::BootstrapKey;
use kiln_gateway::GatewayConfig;
use kiln_pki::DevPki;

async fn probe(api: &Api, method: Method, path: &str) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(format!("{}{path}", api.base))
        .body(Full::new(Bytes::new()))
        .unwrap();
    api.send(req).await
}

async fn start(
    dir: &std::path::Path,
    drain_delay_ms: u64,
) -> (kiln_gateway::GatewayHandle, DevPki) {
    let pki = DevPki::ensure(&dir.join("pki"), &[]).unwrap();
    // No scheduler: the health route does not depend on one.
    let mut c =
        GatewayConfig::loopback(dir.join("gateway"), "cn-test", "https://127.0.0.1:1", &pki);
    c.bootstrap_keys = vec![BootstrapKey::new(ACCOUNT_A.parse().unwrap(), AK_A, SK_A)];
    c.public.drain_delay_ms = drain_delay_ms;
    (kiln_gateway::start(c).await.unwrap(), pki)
}

fn list_functions() -> &'static str {
    "/2023-03-30/functions"
}

#[tokio::test]
async fn healthz_answers_unsigned_and_says_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, pki) = start(dir.path(), 0).await;
    let api = Api::new(&pki, gw.public_addr(), AK_A, SK_A, false);

    let ok = probe(&api, Method::GET, "/healthz").await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(&ok.body[..], b"ok\n", "nothing but the verdict");
    assert_eq!(ok.headers["cache-control"], "no-store");
    for leaky in ["server", "x-fc-request-id", "x-kiln-version"] {
        assert!(!ok.headers.contains_key(leaky), "{leaky} on /healthz");
    }
    assert_eq!(
        probe(&api, Method::HEAD, "/healthz").await.status,
        StatusCode::OK
    );
    let post = probe(&api, Method::POST, "/healthz").await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers["allow"], "GET, HEAD");

    // Only that path is open: the API beside it still wants a signature,
    // and a look-alike path is not the health route.
    probe(&api, Method::GET, list_functions())
        .await
        .fc_error(400, "MissingRequiredHeader");
    assert_ne!(
        probe(&api, Method::GET, "/healthz/../2023-03-30/functions")
            .await
            .status,
        StatusCode::OK
    );
    assert_ne!(
        probe(&api, Method::GET, "/healthzz").await.status,
        StatusCode::OK
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_draining_gateway_fails_its_health_check_while_it_still_serves() {
    let dir = tempfile::tempdir().unwrap();
    let delay = Duration::from_millis(1500);
    let (gw, pki) = start(dir.path(), delay.as_millis() as u64).await;
    let addr: SocketAddr = gw.public_addr();
    let api = Api::new(&pki, addr, AK_A, SK_A, false);
    assert_eq!(
        probe(&api, Method::GET, "/healthz").await.status,
        StatusCode::OK
    );

    let started = Instant::now();
    let shutdown = tokio::spawn(gw.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Inside the delay: the balancer is told to move away, and requests
    // that still arrive are served (a fresh connection each, as new
    // clients would open).
    let draining = probe(
        &Api::new(&pki, addr, AK_A, SK_A, false),
        Method::GET,
        "/healthz",
    )
    .await;
    assert_eq!(draining.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(&draining.body[..], b"draining\n");
    let served = Api::new(&pki, addr, AK_A, SK_A, false)
        .call(Method::GET, list_functions(), vec![])
        .await;
    assert_eq!(
        served.status,
        StatusCode::OK,
        "still serving while draining"
    );
    assert!(started.elapsed() < delay, "the checks ran inside the delay");

    shutdown.await.unwrap();
    assert!(
        started.elapsed() >= delay,
        "the listener stayed up for the delay"
    );
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "after the delay the listener is closed"
    );
}
