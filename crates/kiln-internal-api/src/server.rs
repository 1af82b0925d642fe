//! The HTTPS accept loop and response helpers every Kiln service uses.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use kiln_core::{FcError, FcErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of every response Kiln builds.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Adapt a streamed hyper body (an upstream response) to [`Body`].
pub fn stream(body: Incoming) -> Body {
    body.map_err(|e| Box::new(e) as BoxError).boxed()
}

/// A body fed by a channel: each message is one data frame; the body ends
/// when every sender is gone.
pub fn channel(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Body {
    ChannelBody { rx }.boxed()
}

struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|m| m.map(|b| Ok(http_body::Frame::data(b))))
    }
}

pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("response serialises");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("valid response")
}

/// An internal API's error: FC's shape, `{"Code","Message","RequestId"}`,
/// with FC's status, and the error's [`kiln_core::FcErrorKind`] as `Kind`
/// when it has one (read back by [`crate::client::remote_error`]).
pub fn error(err: &FcError, request_id: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY))
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-fc-request-id", request_id)
        .body(full(err.to_internal_body(request_id)))
        .expect("valid response")
}

/// Read a whole body of at most `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, FcError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(FcError::new(
            FcErrorCode::PayloadTooLarge,
            format!("request body exceeds the limit of {limit} bytes"),
        )),
        Err(e) => Err(FcError::invalid_argument(format!(
            "cannot read request body: {e}"
        ))),
    }
}

/// Read and parse a JSON body of at most `limit` bytes.
pub async fn read_json<T: DeserializeOwned>(body: Incoming, limit: usize) -> Result<T, FcError> {
    let bytes = read_body(body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| FcError::invalid_argument(format!("malformed JSON body: {e}")))
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The cluster identity of the peer's client certificate (see
    /// [`kiln_pki::Identity`]); `None` on the public listener, and for a
    /// certificate that names no Kiln identity, which every internal route
    /// refuses.
    pub identity: Option<Arc<kiln_pki::Identity>>,
    /// The peer's leaf certificate (DER), when it presented one.
    pub certificate: Option<Arc<rustls::pki_types::CertificateDer<'static>>>,
    /// SHA-256 of the peer's client certificate: which certificate holds
    /// a node (the scheduler refuses another one taking a live node).
    pub certificate_sha256: Option<[u8; 32]>,
}

/// What a connection's client certificate says, read once when the
/// connection is accepted: the connection's [`ConnInfo`] fields and the
/// serial and identity revocation is checked against.
struct PeerCertificate {
    identity: Option<Arc<kiln_pki::Identity>>,
    certificate: Option<Arc<rustls::pki_types::CertificateDer<'static>>>,
    certificate_sha256: Option<[u8; 32]>,
    revocable: Option<kiln_pki::PeerCert>,
}

impl PeerCertificate {
    fn of(conn: &rustls::ServerConnection, peer: SocketAddr) -> Self {
        use sha2::Digest;
        let Some(leaf) = conn.peer_certificates().and_then(|c| c.first()) else {
            return Self {
                identity: None,
                certificate: None,
                certificate_sha256: None,
                revocable: None,
            };
        };
        let read = kiln_pki::PeerCert::read(leaf);
        let identity = match &read {
            Some((cert, Ok(()))) => cert.identity.clone().map(Arc::new),
            Some((_, Err(e))) => {
                tracing::warn!(%peer, error = %e, "client certificate carries no Kiln identity; its calls will be refused");
                None
            }
            None => {
                tracing::warn!(%peer, "client certificate cannot be parsed; its calls will be refused");
                None
            }
        };
        Self {
            identity,
            certificate_sha256: Some(sha2::Sha256::digest(leaf.as_ref()).into()),
            certificate: Some(Arc::new(leaf.clone().into_owned())),
            revocable: read.map(|(cert, _)| cert),
        }
    }
}

/// Accept TLS connections on `listener` and serve HTTP/1.1 and HTTP/2 on
/// them with `handler`, until `shutdown` resolves. Every request gets one
/// access line (see [`crate::access_log`]).
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    serve_tls_revocable(listener, tls, None, handler, shutdown).await
}

/// [`serve_tls`] that also drops every open connection whose client
/// certificate becomes revoked in `revoked` (by serial or by node), the
/// moment the set changes. New handshakes of a revoked certificate are
/// refused by the TLS config's verifier (see
/// [`kiln_pki::internal_server_config_live`]); this closes what was
/// already open.
pub async fn serve_tls_revocable<H, F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    revoked: Option<Arc<kiln_pki::RevocationSet>>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let local = listener.local_addr().expect("bound listener");
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let revoked = revoked.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let cert = PeerCertificate::of(tls.get_ref().1, peer);
            let info = ConnInfo {
                peer,
                local,
                identity: cert.identity,
                certificate: cert.certificate,
                certificate_sha256: cert.certificate_sha256,
            };
            let peer_cert = cert.revocable;
            // Revoked between the handshake's check and now.
            let watch = match (revoked, peer_cert) {
                (Some(set), Some(cert)) if set.is_revoked(&cert) => return,
                (Some(set), Some(cert)) => Some((set, cert)),
                _ => None,
            };
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                let info = info.clone();
                let access = crate::access_log::begin(&req, peer);
                async move {
                    let resp = handler(req, info).await;
                    if let Some(access) = access {
                        access.finish(&resp);
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http2()
                .max_concurrent_streams(1024)
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            let result = match watch {
                None => conn.await,
                Some((set, cert)) => {
                    tokio::pin!(conn);
                    let mut changes = set.subscribe();
                    loop {
                        tokio::select! {
                            r = &mut conn => break r,
                            // The set lives as long as this task holds it.
                            Ok(()) = changes.changed() => {
                                if set.is_revoked(&cert) {
                                    tracing::warn!(%peer, peer_cert = %cert, "peer certificate revoked; dropping its connection");
                                    return;
                                }
                            }
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// A status line for `HEALTH`.
pub fn health() -> Response<Body> {
    json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
}

/// A response for an unknown path.
pub fn not_found(path: &str, request_id: &str) -> Response<Body> {
    error(
        &FcError::new(
            FcErrorCode::PathNotSupported,
            format!("path {path:?} is not supported"),
        ),
        request_id,
    )
}

/// Status 204.
pub fn no_content() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(empty())
        .expect("valid response")
}

/// Serve Prometheus metrics, `GET /metrics` in the OpenMetrics text format
/// that `render` produces, over plain HTTP on `listener` until `shutdown`
/// resolves. Every service exposes its metrics this way, on a separate
/// (usually loopback) address.
pub async fn serve_metrics<R>(listener: TcpListener, render: R, shutdown: impl Future<Output = ()>)
where
    R: Fn() -> String + Clone + Send + Sync + 'static,
{
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let render = render.clone();
                async move {
                    let resp =
                        if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                            Response::builder()
                                .header(
                                    header::CONTENT_TYPE,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
                                .body(full(render()))
                        } else {
                            Response::builder()
                                .status(StatusCode::NOT_FOUND)
                                .body(full("only GET /metrics is served here\n"))
                        };
                    Ok::<_, Infallible>(resp.expect("valid response"))
                }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
