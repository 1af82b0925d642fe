//! The internal clients against a real internal listener: the control
//! client negotiates HTTP/2, the invocation data-path clients HTTP/1.1,
//! and each is refused without a certificate of the cluster CA.

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kiln_internal_api::server::{full, serve_tls};
use kiln_internal_api::{InternalClient, InvokeClient};
use kiln_pki::DevPki;

/// A listener with the certificate `files` answering each request with the
/// HTTP version it came in, the client's source port (which connection
/// carried it), the request target and the Host header:
/// `"HTTP/1.1 51234 /v1/probe?x=1 127.0.0.1:4431"`.
async fn listener(files: &kiln_pki::TlsFiles) -> (String, tokio::sync::oneshot::Sender<()>) {
    let tls = kiln_pki::internal_server_config(files).unwrap();
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

/// The listener's answer: the version and the connection of the call.
async fn answer(client: &InternalClient, url: &str) -> Result<String, String> {
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
    let (url, _stop) = listener(&pki.files("agent")).await;

    let control = InternalClient::new(&pki.files("gateway-internal")).unwrap();
    let data = InternalClient::new_http1(&pki.files("gateway-internal")).unwrap();
    let version = |a: String| a.split(' ').next().unwrap().to_owned();
    assert_eq!(version(answer(&control, &url).await.unwrap()), "HTTP/2.0");
    for _ in 0..3 {
        // Kept alive and reused: every call still HTTP/1.1.
        assert_eq!(version(answer(&data, &url).await.unwrap()), "HTTP/1.1");
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
        let err = answer(intruder, &url).await.unwrap_err();
        assert!(err.contains("Cannot reach"), "{err}");
    }
}

/// A client's open connections to an agent end when that agent's node is
/// revoked: the pooled keep-alive connection is not used again (and the
/// new handshake is refused), on both the control and the data-path
/// client; a revocation of another node leaves them alone.
#[tokio::test]
async fn open_client_connections_to_a_revoked_server_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let node: kiln_core::NodeId = "n-victim".parse().unwrap();
    let (url, _stop) = listener(&pki.agent(&node).unwrap()).await;
    let files = pki.files("gateway-internal");
    for http1 in [true, false] {
        let revoked = kiln_pki::RevocationSet::new();
        let identity = kiln_pki::LiveIdentity::load(&files.cert, &files.key).unwrap();
        let tls =
            kiln_pki::internal_client_config_live(&files.ca, identity, revoked.clone()).unwrap();
        let client = if http1 {
            InternalClient::revoking_http1(tls, revoked.clone())
        } else {
            InternalClient::revoking(tls, revoked.clone())
        };
        let first = answer(&client, &url).await.unwrap();
        assert_eq!(answer(&client, &url).await.unwrap(), first, "kept alive");
        // Another node's revocation: the connection carries on.
        revoked.revoke_node("n-other".parse().unwrap());
        assert_eq!(answer(&client, &url).await.unwrap(), first, "http1={http1}");
        // This node's: nothing more goes over the open connection, and a
        // new one is refused at the handshake.
        revoked.revoke_node(node.clone());
        let err = answer(&client, &url).await.unwrap_err();
        assert!(err.contains("Cannot reach"), "http1={http1}: {err}");
    }
}

async fn invoke_seen(client: &InvokeClient, url: &str) -> Result<String, String> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{url}/v1/probe?x=1"))
        .body(kiln_internal_api::invoke_client::whole(
            bytes::Bytes::from_static(b"x"),
        ))
        .unwrap();
    let resp = client.send(req).await.map_err(|e| e.to_string())?;
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_invoke_client_keeps_one_http1_connection_under_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let (url, _stop) = listener(&pki.files("agent")).await;
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

/// The same for the gateway's invocation client: its idle connection to a
/// revoked agent is not used again.
#[tokio::test]
async fn the_invoke_clients_connections_to_a_revoked_agent_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::ensure(&dir.path().join("pki"), &[]).unwrap();
    let node: kiln_core::NodeId = "n-victim".parse().unwrap();
    let (url, _stop) = listener(&pki.agent(&node).unwrap()).await;
    let files = pki.files("gateway-internal");
    let revoked = kiln_pki::RevocationSet::new();
    let identity = kiln_pki::LiveIdentity::load(&files.cert, &files.key).unwrap();
    let tls = kiln_pki::internal_client_config_live(&files.ca, identity, revoked.clone()).unwrap();
    let client = InvokeClient::revoking(tls, revoked.clone());
    let first = invoke_seen(&client, &url).await.unwrap();
    revoked.revoke_node("n-other".parse().unwrap());
    assert_eq!(
        invoke_seen(&client, &url).await.unwrap(),
        first,
        "kept alive"
    );
    revoked.revoke_node(node);
    let err = invoke_seen(&client, &url).await.unwrap_err();
    assert!(err.contains("Cannot reach"), "{err}");
}
