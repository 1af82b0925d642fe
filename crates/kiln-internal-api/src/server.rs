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
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use kiln_core::{FcError, FcErrorCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

pub use crate::limits::ListenerLimits;

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

/// Read a whole body of at most `limit` bytes, by the listener's body
/// read deadline ([`body_deadline`]).
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, FcError> {
    let read = within_body_deadline(Limited::new(body, limit).collect())
        .await
        .ok_or_else(body_too_slow)?;
    match read {
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
    /// The name the client asked for in its ClientHello (SNI), if any:
    /// which TLS configuration served the connection (see [`TlsSelector`]).
    pub server_name: Option<Arc<str>>,
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

/// Picks a connection's TLS configuration from its ClientHello (the
/// public listener: a custom domain's certificate and TLS versions by
/// SNI, see the gateway's `domains::tls`).
pub trait TlsSelector: Send + Sync + 'static {
    fn select(&self, hello: &rustls::server::ClientHello<'_>) -> Arc<rustls::ServerConfig>;
}

/// A listener's TLS: one configuration, or one chosen per ClientHello.
#[derive(Clone)]
pub enum ServerTls {
    Fixed(TlsAcceptor),
    PerHello(Arc<dyn TlsSelector>),
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        Self::Fixed(TlsAcceptor::from(config))
    }
}

impl ServerTls {
    async fn accept(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        match self {
            Self::Fixed(acceptor) => acceptor.accept(tcp).await,
            Self::PerHello(selector) => {
                let start =
                    LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
                let config = selector.select(&start.client_hello());
                start.into_stream(config).await
            }
        }
    }
}

/// Accept TLS connections on `listener` and serve HTTP/1.1 and HTTP/2 on
/// them with `handler`, under the default [`ListenerLimits`], until
/// `shutdown` resolves (then drain, see [`serve`]). Every request gets one
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
    serve(
        listener,
        tls,
        None,
        ListenerLimits::default(),
        handler,
        shutdown,
    )
    .await
}

/// [`serve_tls`] that also drops every open connection whose client
/// certificate becomes revoked in `revoked` (see [`serve`]).
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
    serve(
        listener,
        tls,
        revoked,
        ListenerLimits::default(),
        handler,
        shutdown,
    )
    .await
}

/// Accept TLS connections on `listener` and serve HTTP/1.1 and HTTP/2 on
/// them with `handler` under `limits` (see [`ListenerLimits`] for each
/// bound and what happens when it is hit), until `shutdown` resolves.
///
/// With `revoked`, every open connection whose client certificate becomes
/// revoked (by serial or by node) is dropped the moment the set changes.
/// New handshakes of a revoked certificate are refused by the TLS config's
/// verifier (see [`kiln_pki::internal_server_config_live`]); this closes
/// what was already open.
///
/// Shutdown is graceful: the listener stops accepting, every connection is
/// told to finish (HTTP/2 GOAWAY; HTTP/1.1 closes after its response in
/// flight) and requests in flight are answered; connections still open
/// after [`ListenerLimits::drain_timeout_ms`] are closed.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    revoked: Option<Arc<kiln_pki::RevocationSet>>,
    limits: ListenerLimits,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor: ServerTls = tls.into();
    let local = listener.local_addr().expect("bound listener");
    let limits = Arc::new(limits);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_peer = Arc::new(crate::limits::PerPeer::new(limits.max_connections_per_ip));
    let refusals = crate::limits::Refusals::default();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections as they end.
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%local, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over a cap: close at once (the peer sees a reset or EOF) rather
        // than leave it in the kernel's backlog.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refusals.note(
                local,
                peer,
                "the listener's connection cap",
                limits.max_connections,
            );
            continue;
        };
        let Some(peer_slot) = per_peer.acquire(peer.ip()) else {
            refusals.note(
                local,
                peer,
                "the per-address connection cap",
                limits.max_connections_per_ip,
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let revoked = revoked.clone();
        let limits = limits.clone();
        let drain = drain_rx.clone();
        conns.spawn(async move {
            let _held = (slot, peer_slot);
            serve_connection(tcp, peer, local, acceptor, revoked, &limits, handler, drain).await
        });
    }
    // Drain: no new connections; tell the open ones to finish.
    drop(listener);
    let _ = drain_tx.send(true);
    let open = conns.len();
    if open > 0 {
        tracing::info!(%local, connections = open, "draining connections");
    }
    let drained = tokio::time::timeout(limits.drain_timeout(), async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            %local,
            connections = conns.len(),
            drain_timeout_ms = limits.drain_timeout_ms,
            "connections still open after the drain timeout; closing them"
        );
        conns.shutdown().await;
    }
}

/// One connection, from the TLS handshake to its end: the idle timeout,
/// the drain signal and revocation are watched beside it.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<H, F>(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    acceptor: ServerTls,
    revoked: Option<Arc<kiln_pki::RevocationSet>>,
    limits: &ListenerLimits,
    handler: H,
    mut drain: tokio::sync::watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let tls = tokio::select! {
        r = tokio::time::timeout(limits.tls_handshake_timeout(), acceptor.accept(tcp)) => match r {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        _ = drain.wait_for(|d| *d) => return,
    };
    let cert = PeerCertificate::of(tls.get_ref().1, peer);
    let server_name = tls.get_ref().1.server_name().map(Arc::from);
    let info = ConnInfo {
        server_name,
        peer,
        local,
        identity: cert.identity,
        certificate: cert.certificate,
        certificate_sha256: cert.certificate_sha256,
    };
    // Revoked between the handshake's check and now.
    let watch = match (revoked, cert.revocable) {
        (Some(set), Some(cert)) if set.is_revoked(&cert) => return,
        (Some(set), Some(cert)) => Some((set, cert)),
        _ => None,
    };
    let activity = Arc::new(crate::limits::Activity::new());
    let body_timeout = limits.body_read_timeout();
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            let info = info.clone();
            let access = crate::access_log::begin(&req, peer);
            let in_flight = activity.begin();
            let deadline = tokio::time::Instant::now() + body_timeout;
            async move {
                let _in_flight = in_flight;
                let resp = BODY_DEADLINE.scope(deadline, handler(req, info)).await;
                if let Some(access) = access {
                    access.finish(&resp);
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive_interval())
        .keep_alive_timeout(limits.http2_keepalive_timeout())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(conn);
    let idle_timeout = limits.idle_timeout();
    let mut tick =
        tokio::time::interval((idle_timeout / 4).max(std::time::Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut changes = watch.as_ref().map(|(set, _)| set.subscribe());
    // Once told to finish (idle or draining), how long it may take.
    let mut closing: Option<tokio::time::Instant> = None;
    let result = loop {
        tokio::select! {
            r = &mut conn => break r,
            _ = tick.tick() => {
                if let Some(until) = closing {
                    if tokio::time::Instant::now() >= until {
                        tracing::debug!(%peer, "connection did not finish after being told to; closing it");
                        return;
                    }
                } else if activity.idle_for() >= idle_timeout {
                    tracing::debug!(%peer, idle_timeout_ms = limits.idle_timeout_ms, "idle connection; closing it");
                    conn.as_mut().graceful_shutdown();
                    // Nothing is in flight: closing takes a round trip at
                    // most (GOAWAY); give it a handshake's time, then cut.
                    closing = Some(tokio::time::Instant::now() + limits.tls_handshake_timeout());
                }
            }
            _ = drain.wait_for(|d| *d), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                // The listener's drain timeout bounds it from outside.
                closing = Some(tokio::time::Instant::now() + limits.drain_timeout());
            }
            Some(Ok(())) = async {
                match changes.as_mut() {
                    Some(rx) => Some(rx.changed().await),
                    None => std::future::pending().await,
                }
            } => {
                if let Some((set, cert)) = &watch {
                    if set.is_revoked(cert) {
                        tracing::warn!(%peer, peer_cert = %cert, "peer certificate revoked; dropping its connection");
                        return;
                    }
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

tokio::task_local! {
    /// When the body of the request being handled must have been read by:
    /// set by [`serve`] around each handler from
    /// [`ListenerLimits::body_read_timeout_ms`].
    static BODY_DEADLINE: tokio::time::Instant;
}

/// The deadline for reading the current request's body, inside a handler
/// that [`serve`] runs (none elsewhere, or in tasks the handler spawned).
pub fn body_deadline() -> Option<tokio::time::Instant> {
    BODY_DEADLINE.try_with(|d| *d).ok()
}

/// Collects `body` by [`body_deadline`]; `None` when the deadline passed
/// first.
pub async fn within_body_deadline<T>(read: impl Future<Output = T>) -> Option<T> {
    match body_deadline() {
        Some(at) => tokio::time::timeout_at(at, read).await.ok(),
        None => Some(read.await),
    }
}

/// The error for a body not received by [`body_deadline`].
pub fn body_too_slow() -> FcError {
    FcError::invalid_argument(
        "the request body was not received within the listener's body read timeout; send it at once, or split the upload",
    )
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
