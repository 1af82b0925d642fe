//! The internal clients against a real internal listener: the control
//! client negotiates HTTP/2, the invocation data-path clients HTTP/1.1,
//! and each is refused without a certificate of the cluster CA.

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kiln_internal_api::server::{full, serve_tls};
use kiln_internal_api::{InternalClient, InvokeClient};
use kiln_pki::DevPki;

/// A listener answering each request with the HTTP version it came in.
async fn listener(pki: &DevPki) -> (String, tokio::sync::oneshot::Sender<()>) {
    let tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", tcp.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_tls(
        tcp,
        tls,
        |req: Request<hyper::body::Incoming>, _conn| async move {
            Response::new(full(format!("{:?}", req.version())))
        },
        async move {
            let _ = stopped.await;
        },
    ));
    (url, stop)
}

async fn version_seen(client: &InternalClient, url: &str) -> Result<String, String> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/probe"))
        .body(full("x"))
        .unwrap();
    let resp = client.send(req).await.map_err(|e| e.to_string())?;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn control_calls_use_http2_and_invocations_http1_both_under_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let (url, _stop) = listener(&pki).await;

    let control = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let data = InternalClient::new_http1(&pki.files("gateway-internal")).unwrap();
    assert_eq!(version_seen(&control, &url).await.unwrap(), "HTTP/2.0");
    for _ in 0..3 {
        // Kept alive and reused: every call still HTTP/1.1.
        assert_eq!(version_seen(&data, &url).await.unwrap(), "HTTP/1.1");
    }

    // A certificate of another CA is refused on either protocol.
    let other = DevPki::ensure(&dir.path().join("other"), &[]).unwrap();
    let mut files = other.files("gateway-internal");
    files.ca = pki.ca_cert();
    let intruders = [
        InternalClient::new(&files).unwrap(),
        InternalClient::new_http1(&files).unwrap(),
    ];
    for intruder in &intruders {
        let err = version_seen(intruder, &url).await.unwrap_err();
        assert!(err.contains("Cannot reach"), "{err}");
    }
}

/// A listener answering each request with its version and the peer's
/// port (one port per connection).
async fn port_listener(pki: &DevPki) -> (String, tokio::sync::oneshot::Sender<()>) {
    let tls = kiln_pki::internal_server_config(&pki.files("agent")).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://127.0.0.1:{}", tcp.local_addr().unwrap().port());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_tls(
        tcp,
        tls,
        |req: Request<hyper::body::Incoming>, conn: kiln_internal_api::server::ConnInfo| async move {
            let host = req
                .headers()
                .get(http::header::HOST)
                .map(|h| h.to_str().unwrap().to_owned())
                .unwrap_or_default();
            Response::new(full(format!(
                "{:?} {} {} {}",
                req.version(),
                conn.peer.port(),
                req.uri(),
                host
            )))
        },
        async move {
            let _ = stopped.await;
        },
    ));
    (url, stop)
}

async fn invoke_seen(client: &InvokeClient, url: &str) -> Result<String, String> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/probe?x=1"))
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"x")))
        .unwrap();
    let resp = client.send(req).await.map_err(|e| e.to_string())?;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_invoke_client_keeps_one_http1_connection_under_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let (url, _stop) = port_listener(&pki).await;
    let authority = url.trim_start_matches("https://").to_owned();

    let tls = kiln_pki::internal_client_config(&pki.files("gateway-internal")).unwrap();
    let client = InvokeClient::new(tls);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(invoke_seen(&client, &url).await.unwrap());
    }
    // Sequential calls reuse one connection; the request line carries the
    // path and query, the Host header the agent's authority.
    let first = &seen[0];
    let parts: Vec<&str> = first.split(' ').collect();
    assert_eq!(parts[0], "HTTP/1.1", "{first}");
    assert_eq!(parts[2], "/v1/probe?x=1", "{first}");
    assert_eq!(parts[3], authority, "{first}");
    assert!(seen.iter().all(|s| s == first), "{seen:?}");

    // Concurrent calls each get a connection of their own; afterwards the
    // next sequential call reuses one of them.
    let (a, b, c, d) = tokio::join!(
        invoke_seen(&client, &url),
        invoke_seen(&client, &url),
        invoke_seen(&client, &url),
        invoke_seen(&client, &url),
    );
    let ports: std::collections::HashSet<String> = [a, b, c, d]
        .into_iter()
        .map(|s| s.unwrap().split(' ').nth(1).unwrap().to_owned())
        .collect();
    assert_eq!(ports.len(), 4, "{ports:?}");
    let after = invoke_seen(&client, &url).await.unwrap();
    assert!(ports.contains(after.split(' ').nth(1).unwrap()), "{after}");

    // Plain http:// is refused without a connection.
    let err = invoke_seen(&client, &url.replace("https://", "http://"))
        .await
        .unwrap_err();
    assert!(err.contains("not an https:// URL"), "{err}");

    // A certificate of another CA is refused.
    let other = DevPki::ensure(&dir.path().join("other"), &[]).unwrap();
    let mut files = other.files("gateway-internal");
    files.ca = pki.ca_cert();
    let intruder = InvokeClient::new(kiln_pki::internal_client_config(&files).unwrap());
    let err = invoke_seen(&intruder, &url).await.unwrap_err();
    assert!(err.contains("Cannot reach"), "{err}");
}
