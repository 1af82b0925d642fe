//! The per-instance relay: a loopback HTTP listener that turns the agent's
//! requests to the function (`POST /invoke`, `POST /initialize`,
//! `GET /pre-stop`) into calls of the guest protocol over vsock. Its address
//! is the sandbox's endpoint, so the agent's forward path is the same for
//! containers and microVMs.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_guest_proto::{CallHead, CallKind, GuestClient};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A running relay; dropping it stops listening (calls in flight end when
/// the guest connection closes).
#[derive(Debug)]
pub struct Relay {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Headers that describe the hop, not the call.
const HOP_HEADERS: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "content-length",
];

impl Relay {
    pub async fn start(guest: GuestClient) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let guest = guest.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let guest = guest.clone();
                        async move { Ok::<_, Infallible>(relay(&guest, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Relay { addr, task })
    }
}

fn plain(status: StatusCode, message: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from(message)))
        .expect("response")
}

async fn relay(guest: &GuestClient, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let kind = match (req.method(), req.uri().path()) {
        (&Method::POST, "/invoke") => CallKind::Invoke,
        (&Method::POST, "/initialize") => CallKind::Initialize,
        (&Method::GET, "/pre-stop") => CallKind::PreStop,
        (m, p) => {
            return plain(
                StatusCode::NOT_FOUND,
                format!("{m} {p} is not a function runtime call"),
            )
        }
    };
    let headers = req
        .headers()
        .iter()
        .filter(|(n, _)| !HOP_HEADERS.contains(&n.as_str()))
        .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, format!("request body: {e}")),
    };
    let head = CallHead {
        headers,
        timeout_ms: None,
    };
    let resp = match guest.call(kind, head, body).await {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, format!("guest: {e}")),
    };
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut builder = Response::builder().status(status);
    for (n, v) in &resp.headers {
        if !HOP_HEADERS.contains(&n.to_ascii_lowercase().as_str()) {
            builder = builder.header(n.as_str(), v.as_str());
        }
    }
    match resp.body.collect().await {
        Ok(bytes) => builder
            .body(Full::new(bytes))
            .unwrap_or_else(|e| plain(StatusCode::BAD_GATEWAY, format!("guest response: {e}"))),
        Err(e) => plain(StatusCode::BAD_GATEWAY, format!("guest response body: {e}")),
    }
}
