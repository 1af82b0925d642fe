//! Keep-alive HTTP/1.1 client connections driven by the task that uses
//! them: the warm invoke path's hops (gateway -> agent, agent -> runtime).
//!
//! hyper's pooled client runs every connection in a task of its own: a
//! call hands its request to that task, is woken with the answer's head,
//! and the answer's body arrives through a channel fed by that task; once
//! the answer is read the pool spawns yet another task to wait until the
//! connection can be reused. For one small request and one small answer
//! those hand-offs between tasks (and, on a multi-threaded runtime,
//! between threads) cost more CPU than the HTTP itself.
//!
//! Here a call takes an [`InlineConn`] out of an [`IdleStack`] and polls
//! the connection's I/O itself, while it waits for the head
//! ([`InlineConn::send`]) and while it reads the body ([`InlineBody`]);
//! the connection goes back on the stack when the body has ended, and is
//! closed when the body is dropped before that. No task runs per
//! connection and none is spawned per call.
//!
//! An idle connection is not polled, so a peer closing it is noticed only
//! when it is next taken: [`InlineConn::ready`] then fails and the caller
//! takes another; a request the peer never saw comes back in the
//! [`TrySendError`] to be sent on a fresh connection.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper::rt::{Read, Write};

use crate::server::BoxError;

/// One keep-alive HTTP/1.1 client connection: its sending half and its
/// I/O, polled by whoever holds it.
///
/// The two live in one allocation made at the handshake: with a TLS
/// stream inside they come to about 2 KB, and a call moves its connection
/// several times (off the idle stack, into the answer's body, through the
/// futures that read it, back on the stack); as a pointer each move is
/// 8 bytes.
pub struct InlineConn<T, B>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
{
    parts: Box<ConnParts<T, B>>,
}

struct ConnParts<T, B>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
{
    send: SendRequest<B>,
    /// `None` once the connection has closed.
    io: Option<Connection<T, B>>,
}

/// The connection closed before it could take a request.
#[derive(Debug, thiserror::Error)]
#[error("the connection closed")]
pub struct Closed;

impl<T, B> InlineConn<T, B>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Start HTTP/1.1 on `io` (no I/O happens until the first request).
    pub async fn handshake(io: T) -> hyper::Result<Self> {
        let (send, io) = http1::handshake(io).await?;
        Ok(Self {
            parts: Box::new(ConnParts { send, io: Some(io) }),
        })
    }

    /// Whether the connection may still take requests.
    pub fn is_open(&self) -> bool {
        self.parts.io.is_some() && !self.parts.send.is_closed()
    }

    /// Drive the connection's I/O; `false` once it has closed.
    pub fn poll_io(&mut self, cx: &mut Context<'_>) -> bool {
        poll_io(&mut self.parts.io, cx)
    }

    /// Wait until the connection can take a request: it may still be
    /// finishing the previous answer, or have been closed by the peer.
    pub async fn ready(&mut self) -> Result<(), Closed> {
        let ConnParts { send, io } = &mut *self.parts;
        poll_fn(|cx| {
            let open = poll_io(io, cx);
            match send.poll_ready(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => Poll::Ready(Err(Closed)),
                Poll::Pending if !open => Poll::Ready(Err(Closed)),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Send `req` and wait for the answer's head, driving the connection
    /// meanwhile. A request that was never written comes back in the
    /// error ([`TrySendError::take_message`]).
    pub async fn send(
        &mut self,
        req: Request<B>,
    ) -> Result<Response<Incoming>, TrySendError<Request<B>>> {
        let ConnParts { send, io } = &mut *self.parts;
        let mut answer = pin!(send.try_send_request(req));
        poll_fn(|cx| {
            // The first poll queues the request; the connection then writes
            // it, and later reads the answer and completes `answer`.
            if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            // A connection that ended has failed the request (or dropped it
            // unsent, which hands it back): `answer` is ready now.
            poll_io(io, cx);
            answer.as_mut().poll(cx)
        })
        .await
    }
}

fn poll_io<T, B>(io: &mut Option<Connection<T, B>>, cx: &mut Context<'_>) -> bool
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let Some(conn) = io.as_mut() else {
        return false;
    };
    match Pin::new(conn).poll(cx) {
        Poll::Pending => true,
        Poll::Ready(result) => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            // Dropping the dispatcher answers whatever it still held.
            *io = None;
            false
        }
    }
}

/// Idle connections to one peer, most recently used on top.
pub struct IdleStack<T, B>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
{
    idle: Mutex<Vec<Idle<T, B>>>,
    /// Idle longer than this, a connection is closed instead of reused.
    max_idle_time: Duration,
    /// At most this many idle connections are kept.
    max_idle: usize,
}

struct Idle<T, B>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
{
    conn: InlineConn<T, B>,
    since: Instant,
}

impl<T, B> IdleStack<T, B>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new(max_idle_time: Duration, max_idle: usize) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            max_idle_time,
            max_idle,
        }
    }

    /// The most recently used idle connection, if one is fresh enough.
    pub fn take(&self) -> Option<InlineConn<T, B>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let top = idle.pop()?;
        if top.since.elapsed() >= self.max_idle_time {
            // Everything below the top has been idle longer still.
            idle.clear();
            return None;
        }
        Some(top.conn)
    }

    /// Keep `conn` for the next call, unless it has closed or enough are
    /// kept already.
    pub fn put_back(&self, conn: InlineConn<T, B>) {
        if !conn.is_open() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Close the connections idle too long; `true` when none is left.
    pub fn prune(&self) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|c| c.since.elapsed() < self.max_idle_time);
        idle.is_empty()
    }

    pub fn len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where an [`InlineBody`] puts its connection back when the answer has
/// been read.
pub trait ConnHome {
    type Io: Read + Write + Unpin;
    type Body: HttpBody + 'static;

    fn put_back(&self, conn: InlineConn<Self::Io, Self::Body>);
}

impl<T, B> ConnHome for std::sync::Arc<IdleStack<T, B>>
where
    T: Read + Write + Unpin,
    B: HttpBody + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Io = T;
    type Body = B;

    fn put_back(&self, conn: InlineConn<T, B>) {
        IdleStack::put_back(self, conn)
    }
}

/// An answer's body that drives its connection while it is read, and puts
/// the connection back in its home `H` once the body has ended. Dropped
/// before that, it closes the connection (the rest of the answer is
/// unread).
pub struct InlineBody<H: ConnHome> {
    inner: Incoming,
    conn: Option<(HomedConn<H>, H)>,
}

/// The connection an [`InlineBody`] of home `H` reads over.
type HomedConn<H> = InlineConn<<H as ConnHome>::Io, <H as ConnHome>::Body>;

impl<H: ConnHome> InlineBody<H>
where
    <H::Body as HttpBody>::Data: Send,
    <H::Body as HttpBody>::Error: Into<BoxError>,
{
    /// `inner` read over `conn`, which goes back to `home` at its end. A
    /// body that is over already gives the connection back now: a server
    /// does not poll a body that says it is empty.
    pub fn new(inner: Incoming, conn: InlineConn<H::Io, H::Body>, home: H) -> Self {
        let mut body = Self {
            inner,
            conn: Some((conn, home)),
        };
        if body.inner.is_end_stream() {
            body.finish();
        }
        body
    }

    fn finish(&mut self) {
        if let Some((conn, home)) = self.conn.take() {
            home.put_back(conn);
        }
    }
}

impl<H: ConnHome + Unpin> HttpBody for InlineBody<H>
where
    <H::Body as HttpBody>::Data: Send,
    <H::Body as HttpBody>::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        // The connection reads what the body yields; a closed one has ended
        // the body (with an error if it was cut short).
        if let Some((conn, _)) = this.conn.as_mut() {
            if !conn.poll_io(cx) {
                this.conn = None;
            }
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.finish(),
            Poll::Ready(None) => this.finish(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::server::{full, Body};

    type Io = TokioIo<TcpStream>;
    type Stack = IdleStack<Io, Body>;

    /// An HTTP/1.1 server answering `answer(path)`, closing each connection
    /// after `per_conn` requests when set; counts the connections it took.
    async fn server(per_conn: Option<usize>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let served = Arc::new(AtomicUsize::new(0));
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let k = served.fetch_add(1, Ordering::SeqCst) + 1;
                        async move {
                            let body: Body = match req.uri().path() {
                                // Many frames: a body that is read in parts.
                                "/big" => {
                                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                                    tokio::spawn(async move {
                                        for _ in 0..64 {
                                            let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
                                            if tx.send(chunk).await.is_err() {
                                                return;
                                            }
                                        }
                                    });
                                    crate::server::channel(rx)
                                }
                                "/empty" => crate::server::empty(),
                                _ => full(format!("conn {n} call {k}")),
                            };
                            let mut resp = Response::new(body);
                            if per_conn == Some(k) {
                                resp.headers_mut()
                                    .insert(http::header::CONNECTION, "close".parse().unwrap());
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn request(path: &str) -> Request<Body> {
        Request::builder()
            .method(http::Method::POST)
            .uri(path)
            .header(http::header::HOST, "test")
            .body(full("ping"))
            .unwrap()
    }

    /// A call moves its connection several times; boxed, each move is a
    /// pointer's (unboxed, a TLS connection was about 2 KB).
    #[test]
    fn a_connection_moves_as_one_pointer() {
        assert_eq!(
            std::mem::size_of::<InlineConn<Io, Body>>(),
            std::mem::size_of::<usize>()
        );
        assert!(std::mem::size_of::<InlineBody<Arc<Stack>>>() <= 64);
    }

    /// One call as a client of `stack` makes it: an idle connection if one
    /// is ready, else a new one; the answer's body read to its end.
    async fn call(
        stack: &Arc<Stack>,
        addr: std::net::SocketAddr,
        path: &str,
    ) -> Response<InlineBody<Arc<Stack>>> {
        let mut conn = loop {
            match stack.take() {
                Some(mut c) => {
                    if c.ready().await.is_ok() {
                        break c;
                    }
                }
                None => {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    break InlineConn::handshake(TokioIo::new(tcp)).await.unwrap();
                }
            }
        };
        let resp = conn.send(request(path)).await.unwrap();
        resp.map(|b| InlineBody::new(b, conn, stack.clone()))
    }

    async fn text(resp: Response<InlineBody<Arc<Stack>>>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn sequential_calls_reuse_one_connection_without_a_task_of_its_own() {
        let (addr, accepted) = server(None).await;
        let stack = Arc::new(Stack::new(Duration::from_secs(20), 8));
        for k in 1..=5 {
            assert_eq!(
                text(call(&stack, addr, "/").await).await,
                format!("conn 1 call {k}")
            );
            // Back on the stack as soon as the body has ended.
            assert_eq!(stack.len(), 1);
        }
        // A long body is read in parts, the connection driven meanwhile.
        let big = text(call(&stack, addr, "/big").await).await;
        assert_eq!(big.len(), 64 * 16 * 1024);
        // An answer with no body gives its connection back at once.
        let empty = call(&stack, addr, "/empty").await;
        assert_eq!(stack.len(), 1);
        drop(empty);
        assert_eq!(text(call(&stack, addr, "/").await).await, "conn 1 call 8");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted) = server(None).await;
        let stack = Arc::new(Stack::new(Duration::from_secs(20), 8));
        let mut body = call(&stack, addr, "/big").await.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(stack.len(), 0);
        assert_eq!(text(call(&stack, addr, "/").await).await, "conn 2 call 1");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_not_reused() {
        let (addr, accepted) = server(Some(1)).await;
        let stack = Arc::new(Stack::new(Duration::from_secs(20), 8));
        assert_eq!(text(call(&stack, addr, "/").await).await, "conn 1 call 1");
        // The answer said `Connection: close`: the next call goes to a new
        // connection.
        assert_eq!(text(call(&stack, addr, "/").await).await, "conn 2 call 1");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_closed_by_the_peer_fails_ready() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // A peer that answers one request, then closes without saying so.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                Ok::<_, Infallible>(Response::new(full("once")))
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            // Serve until the answer is written, then drop the connection.
            let _ = tokio::time::timeout(Duration::from_millis(200), conn.as_mut()).await;
        });
        let stack = Arc::new(Stack::new(Duration::from_secs(20), 8));
        assert_eq!(text(call(&stack, addr, "/").await).await, "once");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut idle = stack.take().expect("kept idle");
        assert!(idle.ready().await.is_err());
        assert!(!idle.is_open());
    }

    #[tokio::test]
    async fn connections_idle_too_long_are_not_handed_out() {
        let (addr, accepted) = server(None).await;
        let stack = Arc::new(Stack::new(Duration::from_millis(50), 8));
        text(call(&stack, addr, "/").await).await;
        assert_eq!(stack.len(), 1);
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(stack.take().is_none());
        assert_eq!(stack.len(), 0);
        text(call(&stack, addr, "/").await).await;
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(stack.prune());
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}
