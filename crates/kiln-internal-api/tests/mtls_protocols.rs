//! Both internal clients against a real internal listener: the control
//! client negotiates HTTP/2, the invocation data-path client HTTP/1.1, and
//! either is refused without a certificate of the cluster CA.

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kiln_internal_api::server::{full, serve_tls};
use kiln_internal_api::InternalClient;
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
