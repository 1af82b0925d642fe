//! The gateway's client for the invocation data path: HTTP/1.1 over
//! mutual TLS to each agent, on keep-alive connections driven by the
//! calling task ([`crate::inline`]) instead of hyper's pooled client, which
//! runs a task per connection and spawns one per call to return the
//! connection to its pool. Control calls keep [`crate::InternalClient`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::inline::{IdleStack, InlineBody, InlineConn};
use crate::revoking::RevokingStream;
use crate::InternalClientError;
use kiln_pki::RevocationSet;

/// An invocation's payload: read whole by the gateway before it is sent
/// ([`whole`]), or an HTTP trigger's large request body streamed through
/// as it arrives, bounded ([`streamed`]). (A concrete
/// body type: a boxed one's error type carries a lifetime that futures
/// holding the connection could not prove `Send` for.)
pub type Payload = http_body_util::Either<http_body_util::Full<bytes::Bytes>, Streamed>;

/// A whole payload.
pub fn whole(bytes: bytes::Bytes) -> Payload {
    http_body_util::Either::Left(http_body_util::Full::new(bytes))
}

/// A caller's body streamed through, failing past `limit` bytes, and
/// what became of it (read by the sender when the call fails: a broken or
/// oversized caller body is the caller's fault, not the instance's).
pub fn streamed(body: hyper::body::Incoming, limit: usize) -> (Payload, Arc<StreamState>) {
    let state = Arc::new(StreamState::default());
    let body = Streamed {
        inner: http_body_util::Limited::new(body, limit),
        state: state.clone(),
    };
    (http_body_util::Either::Right(body), state)
}

/// How a [`Streamed`] body ended, when it failed.
#[derive(Debug, Default)]
pub struct StreamState(std::sync::atomic::AtomicU8);

impl StreamState {
    const BROKEN: u8 = 1;
    const TOO_LARGE: u8 = 2;

    /// The caller's body broke off (or was too large).
    pub fn failed(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// The caller's body went past its limit.
    pub fn too_large(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed) == Self::TOO_LARGE
    }
}

/// A caller's request body on its way to the agent, bounded, recording
/// its failure in its [`StreamState`].
pub struct Streamed {
    inner: http_body_util::Limited<hyper::body::Incoming>,
    state: Arc<StreamState>,
}

impl http_body::Body for Streamed {
    type Data = bytes::Bytes;
    type Error = crate::server::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(e))) = &polled {
            let why = if e.is::<http_body_util::LengthLimitError>() {
                StreamState::TOO_LARGE
            } else {
                StreamState::BROKEN
            };
            self.state
                .0
                .store(why, std::sync::atomic::Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type Io = RevokingStream<TokioIo<TlsStream<TcpStream>>>;
type Stack = IdleStack<Io, Payload>;
type Conn = InlineConn<Io, Payload>;

/// The body of an agent's answer: read, it drives its connection, which
/// goes back to its agent's idle stack when the body ends.
pub type AnswerBody = InlineBody<Arc<Stack>>;

/// A connection idle this long is closed rather than reused: below the
/// 30 s for which hyper's server waits for the next request's head by
/// default, so the gateway does not write into a connection the agent is
/// closing.
const MAX_IDLE_TIME: Duration = Duration::from_secs(20);
/// Idle connections kept per agent (the peak of concurrent calls to it).
const MAX_IDLE_PER_AGENT: usize = 1024;
/// How long a TCP connect and TLS handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// HTTP/1.1 over mutual TLS to agents, one idle stack per agent.
pub struct InvokeClient {
    tls: TlsConnector,
    /// Connections to a server whose certificate is revoked here close
    /// (see [`crate::revoking`]).
    revoked: Option<Arc<RevocationSet>>,
    agents: Mutex<Agents>,
}

struct Agents {
    stacks: HashMap<Authority, Arc<Stack>>,
    /// When the idle stacks are next swept of expired connections (those
    /// of an agent no longer called would otherwise stay open).
    next_sweep: Instant,
}

impl InvokeClient {
    /// A client on `tls` (this service's identity and the cluster CA; see
    /// [`kiln_pki::internal_client_config_live`]), offering HTTP/1.1 only.
    pub fn new(tls: Arc<rustls::ClientConfig>) -> Self {
        Self::with_revocations(tls, None)
    }

    /// [`InvokeClient::new`] whose open connections also close when their
    /// agent's certificate is revoked in `revoked` (the set `tls`'s
    /// verifier refuses new handshakes from).
    pub fn revoking(tls: Arc<rustls::ClientConfig>, revoked: Arc<RevocationSet>) -> Self {
        Self::with_revocations(tls, Some(revoked))
    }

    fn with_revocations(
        tls: Arc<rustls::ClientConfig>,
        revoked: Option<Arc<RevocationSet>>,
    ) -> Self {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            revoked,
            tls: TlsConnector::from(Arc::new(tls)),
            agents: Mutex::new(Agents {
                stacks: HashMap::new(),
                next_sweep: Instant::now() + MAX_IDLE_TIME,
            }),
        }
    }

    /// Send `req` (an absolute `https://` URI) to its agent and return the
    /// answer once its head has arrived; its body streams on. A request
    /// the agent never saw because an idle connection had just closed is
    /// sent once more on a fresh connection. No timeout is applied beyond
    /// the connect timeout.
    pub async fn send(
        &self,
        req: Request<Payload>,
    ) -> Result<Response<AnswerBody>, InternalClientError> {
        let (mut parts, body) = req.into_parts();
        let url = Target::of(&parts.uri).ok_or_else(|| InternalClientError::Transport {
            url: parts.uri.to_string(),
            message: "not an https:// URL with a host".into(),
        })?;
        // HTTP/1.1 sends the path, with the authority as Host.
        parts.uri = Uri::from(url.path.clone());
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(url.authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        let mut req = Request::from_parts(parts, body);
        let stack = self.stack(&url.authority);
        while let Some(mut conn) = stack.take() {
            if conn.ready().await.is_err() {
                continue;
            }
            match conn.send(req).await {
                Ok(resp) => return Ok(answer(resp, conn, stack)),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection had closed meanwhile.
                    Some(unsent) => req = unsent,
                    None => return Err(url.error(&e.into_error())),
                },
            }
        }
        // Boxed: dialling (TCP, TLS handshake) is the cold path, and its
        // future would otherwise size every warm call's future.
        let mut conn = Box::pin(self.dial(&url)).await?;
        match conn.send(req).await {
            Ok(resp) => Ok(answer(resp, conn, stack)),
            Err(e) => Err(url.error(&e.into_error())),
        }
    }

    /// Send `req`, an HTTP/1.1 upgrade request (an HTTP trigger's
    /// WebSocket handshake), on a connection of its own, and return the
    /// answer's head. On a `101` the connection is handed over through
    /// [`hyper::upgrade::on`] on the answer; it is never pooled (once
    /// upgraded it carries that one stream until either side closes).
    ///
    /// This hop stays HTTP/1.1 on purpose: an HTTP/1.1 upgrade gives the
    /// stream a TCP+TLS connection of its own, with the agent's
    /// certificate checked and revocation watched as on every invocation
    /// connection; HTTP/2's extended CONNECT (RFC 8441) would multiplex it
    /// onto the control connection, where one busy WebSocket shares flow
    /// control with everything else. No timeout is applied beyond the
    /// connect timeout: the caller bounds the exchange.
    pub async fn send_upgrade(
        &self,
        req: Request<Payload>,
    ) -> Result<Response<hyper::body::Incoming>, InternalClientError> {
        let (mut parts, body) = req.into_parts();
        let url = Target::of(&parts.uri).ok_or_else(|| InternalClientError::Transport {
            url: parts.uri.to_string(),
            message: "not an https:// URL with a host".into(),
        })?;
        parts.uri = Uri::from(url.path.clone());
        if !parts.headers.contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(url.authority.as_str()) {
                parts.headers.insert(header::HOST, host);
            }
        }
        let io = self.connect(&url).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| url.error(&e))?;
        // The connection runs until it is upgraded (then its I/O goes to
        // the answer's `OnUpgrade`) or closed.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upgrade connection to the agent ended with an error");
            }
        });
        send.send_request(Request::from_parts(parts, body))
            .await
            .map_err(|e| url.error(&e))
    }

    /// The idle stack of the agent at `authority`; sweeps every stack of
    /// expired connections now and then.
    fn stack(&self, authority: &Authority) -> Arc<Stack> {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now >= agents.next_sweep {
            agents.next_sweep = now + MAX_IDLE_TIME;
            // A stack in use by a call is kept even when empty.
            agents
                .stacks
                .retain(|_, s| !s.prune() || Arc::strong_count(s) > 1);
        }
        if let Some(s) = agents.stacks.get(authority) {
            return s.clone();
        }
        let s = Arc::new(IdleStack::new(MAX_IDLE_TIME, MAX_IDLE_PER_AGENT));
        agents.stacks.insert(authority.clone(), s.clone());
        s
    }

    async fn dial(&self, url: &Target) -> Result<Conn, InternalClientError> {
        let io = self.connect(url).await?;
        InlineConn::handshake(io).await.map_err(|e| url.error(&e))
    }

    /// A TLS connection to `url`'s agent, closed if its certificate is
    /// revoked.
    async fn connect(&self, url: &Target) -> Result<Io, InternalClientError> {
        let host = url.authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let server_name = ServerName::try_from(host.to_owned())
            .map_err(|e| url.error_msg(format!("{host:?} is not a valid TLS server name: {e}")))?;
        let port = url.authority.port_u16().unwrap_or(443);
        let connect = async {
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            self.tls.connect(server_name, tcp).await
        };
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(url.error_msg(format!("cannot connect: {e}"))),
            Err(_) => {
                return Err(url.error_msg(format!("no TLS connection within {CONNECT_TIMEOUT:?}")))
            }
        };
        let cert = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .cloned();
        RevokingStream::watching(TokioIo::new(tls), self.revoked.clone(), cert.as_ref())
            .map_err(|e| url.error_msg(e))
    }
}

fn answer(
    resp: Response<hyper::body::Incoming>,
    conn: Conn,
    stack: Arc<Stack>,
) -> Response<AnswerBody> {
    resp.map(|body| InlineBody::new(body, conn, stack))
}

/// Where a request goes: an agent's authority and the path on it.
struct Target {
    authority: Authority,
    path: PathAndQuery,
}

impl Target {
    fn of(uri: &Uri) -> Option<Self> {
        if uri.scheme() != Some(&Scheme::HTTPS) {
            return None;
        }
        Some(Self {
            authority: uri.authority()?.clone(),
            path: uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        })
    }

    fn error(&self, e: &hyper::Error) -> InternalClientError {
        self.error_msg(kiln_core::error_chain(e))
    }

    fn error_msg(&self, message: String) -> InternalClientError {
        InternalClientError::Transport {
            url: format!("https://{}{}", self.authority, self.path),
            message,
        }
    }
}
