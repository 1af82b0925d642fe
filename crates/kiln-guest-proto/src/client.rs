//! The host side: one [`GuestClient`] per guest connection. Cheap to clone;
//! any number of calls and exec sessions may be in flight at once.
//!
//! The reader task never waits for one call's consumer: each stream's
//! events go into an unbounded queue whose data is bounded by the stream's
//! flow-control window ([`crate::flow`]); a consumer that reads slowly only
//! stops the guest from sending that stream's data.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

use crate::flow::{data_cost, frame_cost, RecvWindow, SendWindow};
use crate::frame::{read_frame, Frame, FrameError, MAX_DATA_CHUNK, PROTOCOL_VERSION};
use crate::io::{spawn_writer, OUT_QUEUE};
use crate::message::*;

/// Buffered log lines; further lines are dropped (and counted) while full.
const LOG_QUEUE: usize = 4096;

/// Why a host-side operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestClientError {
    #[error("Guest connection closed: {0}")]
    Closed(String),
    #[error("Timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("Guest refused: {0}")]
    Guest(#[source] ErrorBody),
    #[error("Guest speaks protocol version {0}, host speaks {PROTOCOL_VERSION}")]
    VersionMismatch(u8),
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    #[error("Unexpected message from the guest: {0}")]
    Protocol(String),
    #[error("Encoding a frame")]
    Frame(#[source] FrameError),
}

#[derive(Debug)]
enum CallEvent {
    Head(ResponseHead),
    Body(Bytes),
    End,
    Error(ErrorBody),
    /// The guest broke the protocol on this call (e.g. sent past its window).
    Broken(String),
}

/// Output of an exec session, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The last event of a session that ran.
    Exit(ExitStatus),
    /// The last event of a session that failed to start or broke.
    Error(ErrorBody),
}

type Configuring = oneshot::Sender<Result<Configured, ErrorBody>>;

/// The reader's side of one call or session.
struct Entry<E> {
    events: mpsc::UnboundedSender<E>,
    /// What the guest may still send on this stream.
    recv: Arc<RecvWindow>,
    /// What we may still send on this stream.
    send: Arc<SendWindow>,
    head_seen: bool,
}

impl<E> Entry<E> {
    fn new() -> (Entry<E>, mpsc::UnboundedReceiver<E>) {
        let (events, rx) = mpsc::unbounded_channel();
        let entry = Entry {
            events,
            recv: Arc::new(RecvWindow::new()),
            send: Arc::new(SendWindow::new()),
            head_seen: false,
        };
        (entry, rx)
    }
}

impl<E> Drop for Entry<E> {
    fn drop(&mut self) {
        // Whoever is still sending on a finished stream stops waiting.
        self.send.close();
    }
}

struct Inner {
    out: mpsc::Sender<Frame>,
    next_stream: AtomicU32,
    calls: Mutex<HashMap<u32, Entry<CallEvent>>>,
    sessions: Mutex<HashMap<u32, Entry<ExecEvent>>>,
    configuring: Mutex<Option<Configuring>>,
    ready: watch::Receiver<Option<Ready>>,
    closed: watch::Receiver<Option<String>>,
    logs: Mutex<Option<mpsc::Receiver<LogLine>>>,
    dropped_logs: AtomicU64,
    /// The protocol version of a guest whose frames we could not accept.
    peer_version: Mutex<Option<u8>>,
}

/// Host-side client of one guest connection.
#[derive(Clone)]
pub struct GuestClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GuestClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestClient").finish_non_exhaustive()
    }
}

impl GuestClient {
    /// Start speaking the protocol over `io` (a hybrid-vsock unix stream, a
    /// virtio-serial socket, TCP...). Spawns a reader and a writer task on
    /// the current tokio runtime; they end when the connection closes.
    pub fn connect<S>(io: S) -> GuestClient
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (reader, writer) = tokio::io::split(io);
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let (stop, stop_rx) = oneshot::channel();
        spawn_writer(writer, out_rx, stop_rx);
        let (ready_tx, ready) = watch::channel(None);
        let (closed_tx, closed) = watch::channel(None);
        let (log_tx, log_rx) = mpsc::channel(LOG_QUEUE);
        let inner = Arc::new(Inner {
            out,
            next_stream: AtomicU32::new(1),
            calls: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            configuring: Mutex::new(None),
            ready,
            closed,
            logs: Mutex::new(Some(log_rx)),
            dropped_logs: AtomicU64::new(0),
            peer_version: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let reason = read_loop(reader, &weak, ready_tx, log_tx).await;
            tracing::debug!(reason = %reason, "guest connection closed");
            if let Some(inner) = weak.upgrade() {
                // Dropping the senders wakes every waiter with Closed.
                inner
                    .calls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                inner
                    .sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
                inner
                    .configuring
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
            }
            let _ = closed_tx.send(Some(reason));
            let _ = stop.send(());
        });
        GuestClient { inner }
    }

    /// Wait for the guest's Ready frame.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Ready, GuestClientError> {
        let mut ready = self.inner.ready.clone();
        let mut closed = self.inner.closed.clone();
        let wait = async {
            loop {
                if let Some(r) = ready.borrow_and_update().clone() {
                    return Ok(r);
                }
                if let Some(reason) = closed.borrow().clone() {
                    if let Some(v) = self.peer_version() {
                        return Err(GuestClientError::VersionMismatch(v));
                    }
                    return Err(GuestClientError::Closed(reason));
                }
                tokio::select! {
                    _ = ready.changed() => {}
                    _ = closed.changed() => {}
                }
            }
        };
        let ready = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| GuestClientError::Timeout("the guest to report ready"))??;
        if ready.protocol_version != PROTOCOL_VERSION {
            return Err(GuestClientError::VersionMismatch(ready.protocol_version));
        }
        Ok(ready)
    }

    /// Send the instance's configuration and wait until the function's port
    /// accepts connections (or the guest reports why it cannot start).
    pub async fn configure(
        &self,
        config: &GuestConfig,
        timeout: Duration,
    ) -> Result<Configured, GuestClientError> {
        config.validate()?;
        let (tx, rx) = oneshot::channel();
        {
            let mut slot = self
                .inner
                .configuring
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|s| !s.is_closed()) {
                return Err(GuestClientError::Protocol(
                    "configure already in progress".into(),
                ));
            }
            *slot = Some(tx);
        }
        self.send(Message::Configure(Box::new(config.clone())))
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(GuestClientError::Timeout("the guest to start the function")),
            Ok(Err(_)) => Err(self.closed_error()),
            Ok(Ok(Err(e))) => Err(GuestClientError::Guest(e)),
            Ok(Ok(Ok(c))) => Ok(c),
        }
    }

    /// Start a call whose request body is streamed: send chunks through the
    /// returned [`RequestBodySender`], then await [`PendingResponse::response`].
    /// Put `content-length` in the head when the length is known (the body
    /// is sent chunked to the runtime otherwise).
    pub async fn start_call(
        &self,
        kind: CallKind,
        head: CallHead,
    ) -> Result<(RequestBodySender, PendingResponse), GuestClientError> {
        let call = self.next_stream();
        let (entry, rx) = Entry::new();
        let (recv, send) = (entry.recv.clone(), entry.send.clone());
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(call, entry);
        let guard = CallGuard {
            client: self.clone(),
            call,
            done: false,
            window: recv,
        };
        self.send(Message::Call { call, kind, head }).await?;
        Ok((
            RequestBodySender {
                client: self.clone(),
                call,
                window: send,
                finished: false,
            },
            PendingResponse { events: rx, guard },
        ))
    }

    /// `POST /invoke` with a whole request body; the response body streams.
    pub async fn invoke(
        &self,
        head: CallHead,
        body: Bytes,
    ) -> Result<GuestResponse, GuestClientError> {
        self.call(CallKind::Invoke, head, body).await
    }

    /// `POST /initialize`.
    pub async fn initialize(&self, head: CallHead) -> Result<GuestResponse, GuestClientError> {
        self.call(CallKind::Initialize, head, Bytes::new()).await
    }

    /// `GET /pre-stop`.
    pub async fn pre_stop(&self, head: CallHead) -> Result<GuestResponse, GuestClientError> {
        self.call(CallKind::PreStop, head, Bytes::new()).await
    }

    /// Any call with a whole request body. Adds `content-length` when the
    /// head has none, so runtimes that do not read chunked bodies work.
    pub async fn call(
        &self,
        kind: CallKind,
        mut head: CallHead,
        body: Bytes,
    ) -> Result<GuestResponse, GuestClientError> {
        let has_length = head
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-length"));
        if !has_length && (kind != CallKind::PreStop || !body.is_empty()) {
            head.headers
                .push(("content-length".into(), body.len().to_string()));
        }
        let (mut sender, pending) = self.start_call(kind, head).await?;
        sender.send(body).await?;
        sender.finish().await?;
        pending.response().await
    }

    /// Open an instance-login session.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, GuestClientError> {
        let session = self.next_stream();
        let (entry, rx) = Entry::new();
        let (recv, send) = (entry.recv.clone(), entry.send.clone());
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, entry);
        let output = ExecOutput {
            client: self.clone(),
            session,
            events: rx,
            window: recv,
            done: false,
        };
        self.send(Message::ExecStart { session, request }).await?;
        Ok(ExecSession {
            input: ExecInput {
                client: self.clone(),
                session,
                window: send,
            },
            output,
        })
    }

    /// The function's log lines, once (later calls get None).
    pub fn take_logs(&self) -> Option<mpsc::Receiver<LogLine>> {
        self.inner
            .logs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Log lines dropped because nobody read them fast enough.
    pub fn dropped_logs(&self) -> u64 {
        self.inner.dropped_logs.load(Ordering::Relaxed)
    }

    /// Whether the connection has closed, and why.
    pub fn closed(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    /// Wait until the connection closes; returns why.
    pub async fn wait_closed(&self) -> String {
        let mut closed = self.inner.closed.clone();
        loop {
            if let Some(reason) = closed.borrow_and_update().clone() {
                return reason;
            }
            if closed.changed().await.is_err() {
                return "reader ended".into();
            }
        }
    }

    fn next_stream(&self) -> u32 {
        // Ids are never 0 and never reused within a connection's lifetime
        // (wrapping after 4 billion streams skips 0).
        loop {
            let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }

    fn peer_version(&self) -> Option<u8> {
        *self
            .inner
            .peer_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn closed_error(&self) -> GuestClientError {
        if let Some(v) = self.peer_version() {
            return GuestClientError::VersionMismatch(v);
        }
        GuestClientError::Closed(self.closed().unwrap_or_else(|| "connection closing".into()))
    }

    async fn send(&self, message: Message) -> Result<(), GuestClientError> {
        self.inner
            .out
            .send(message.to_frame())
            .await
            .map_err(|_| self.closed_error())
    }

    /// Send a flow-controlled frame once the stream's window allows it.
    /// A stream that already ended (the guest answered, or the call was
    /// cancelled) takes nothing more: the frame is dropped, as the guest
    /// would drop it; only a closed connection is an error.
    async fn send_windowed(
        &self,
        window: &SendWindow,
        message: Message,
    ) -> Result<(), GuestClientError> {
        let frame = message.to_frame();
        if window.take(frame_cost(&frame)).await.is_err() {
            return match self.closed() {
                Some(_) => Err(self.closed_error()),
                None => Ok(()),
            };
        }
        self.inner
            .out
            .send(frame)
            .await
            .map_err(|_| self.closed_error())
    }

    /// The consumer of a stream took a frame of `payload_len` bytes: grant
    /// the guest more window when enough has been consumed.
    async fn consumed(&self, stream: u32, window: &RecvWindow, payload_len: usize) {
        if let Some(increment) = window.consumed(data_cost(payload_len)) {
            let _ = self.send(Message::WindowUpdate { stream, increment }).await;
        }
    }

    fn try_send(&self, message: Message) {
        let _ = self.inner.out.try_send(message.to_frame());
    }
}

async fn read_loop<R>(
    mut reader: R,
    inner: &std::sync::Weak<Inner>,
    ready: watch::Sender<Option<Ready>>,
    logs: mpsc::Sender<LogLine>,
) -> String
where
    R: AsyncRead + Unpin,
{
    loop {
        let frame = match read_frame(&mut reader).await {
            Ok(Some(f)) => f,
            Ok(None) => return "guest closed the connection".into(),
            Err(e) => {
                if let (FrameError::UnsupportedVersion(v), Some(inner)) = (&e, inner.upgrade()) {
                    *inner.peer_version.lock().unwrap_or_else(|e| e.into_inner()) = Some(*v);
                }
                return format!("bad frame from guest: {e}");
            }
        };
        let cost = frame_cost(&frame);
        let message = match Message::from_frame(frame) {
            Ok(m) => m,
            Err(e) => return format!("bad frame from guest: {e}"),
        };
        let Some(inner) = inner.upgrade() else {
            return "client dropped".into();
        };
        // Nothing below waits for a call's consumer: events are queued, and
        // what a stream may queue is bounded by its window.
        match message {
            Message::Ready(r) => {
                let _ = ready.send(Some(r));
            }
            Message::Configured(c) => {
                if let Some(tx) = inner
                    .configuring
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                {
                    let _ = tx.send(Ok(c));
                }
            }
            Message::Error { stream: 0, error } => {
                let pending = inner
                    .configuring
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                match pending {
                    Some(tx) => {
                        let _ = tx.send(Err(error));
                    }
                    None => {
                        tracing::warn!(code = ?error.code, message = %error.message, "guest reported an error")
                    }
                }
            }
            Message::Error { stream, error } => {
                if !deliver_call(
                    &inner,
                    stream,
                    Delivery::Last(CallEvent::Error(error.clone())),
                ) {
                    deliver_exec(&inner, stream, Delivery::Last(ExecEvent::Error(error)));
                }
            }
            Message::ResponseHead { call, head } => {
                deliver_call(&inner, call, Delivery::Head(CallEvent::Head(head)));
            }
            Message::ResponseBody { call, data } => {
                deliver_call(&inner, call, Delivery::Data(cost, CallEvent::Body(data)));
            }
            Message::ResponseEnd { call } => {
                deliver_call(&inner, call, Delivery::Last(CallEvent::End));
            }
            Message::ExecStdout { session, data } => {
                deliver_exec(
                    &inner,
                    session,
                    Delivery::Data(cost, ExecEvent::Stdout(data)),
                );
            }
            Message::ExecStderr { session, data } => {
                deliver_exec(
                    &inner,
                    session,
                    Delivery::Data(cost, ExecEvent::Stderr(data)),
                );
            }
            Message::ExecExit { session, status } => {
                deliver_exec(&inner, session, Delivery::Last(ExecEvent::Exit(status)));
            }
            Message::WindowUpdate { stream, increment } => {
                window_update(&inner, stream, increment);
            }
            Message::Log(line) => {
                if logs.try_send(line).is_err() {
                    inner.dropped_logs.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Ping(data) => {
                let _ = inner.out.send(Message::Pong(data).to_frame()).await;
            }
            Message::Pong(_) => {}
            other => return format!("guest sent a host-only message: {other:?}"),
        }
    }
}

/// How an event affects its stream.
enum Delivery<E> {
    /// The response head: at most one per call.
    Head(E),
    /// Flow-controlled data costing this much window.
    Data(u32, E),
    /// The stream's last event.
    Last(E),
}

/// What the guest did wrong on one stream.
enum Violation {
    SecondHead,
    PastWindow(u32),
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::SecondHead => write!(f, "the guest sent a second response head"),
            Violation::PastWindow(cost) => write!(
                f,
                "the guest sent a {cost}-byte frame past the stream's flow-control window"
            ),
        }
    }
}

/// Queue an event for its stream's consumer; never waits. Returns false
/// if there is no such stream (it ended or was cancelled: late frames are
/// dropped). A stream the guest abuses is failed and cancelled alone.
fn deliver<E>(
    inner: &Inner,
    streams: &Mutex<HashMap<u32, Entry<E>>>,
    stream: u32,
    delivery: Delivery<E>,
    broken: impl FnOnce(String) -> E,
) -> bool {
    let mut map = streams.lock().unwrap_or_else(|e| e.into_inner());
    let Some(entry) = map.get_mut(&stream) else {
        return false;
    };
    let violation = match delivery {
        Delivery::Last(event) => {
            if let Some(entry) = map.remove(&stream) {
                let _ = entry.events.send(event);
            }
            return true;
        }
        Delivery::Head(_) if entry.head_seen => Violation::SecondHead,
        Delivery::Head(event) => {
            entry.head_seen = true;
            let _ = entry.events.send(event);
            return true;
        }
        Delivery::Data(cost, _) if !entry.recv.arrived(cost) => Violation::PastWindow(cost),
        Delivery::Data(_, event) => {
            // A consumer that went away is not an error of the connection.
            let _ = entry.events.send(event);
            return true;
        }
    };
    tracing::warn!(stream, violation = %violation, "guest broke the protocol on a stream; cancelling it");
    if let Some(entry) = map.remove(&stream) {
        let _ = entry.events.send(broken(violation.to_string()));
    }
    drop(map);
    // The guest stops the stream; the queue may be full, but the writer
    // drains it without waiting for any consumer.
    let out = inner.out.clone();
    tokio::spawn(async move {
        let _ = out.send(Message::Cancel { call: stream }.to_frame()).await;
    });
    true
}

fn deliver_call(inner: &Inner, call: u32, delivery: Delivery<CallEvent>) -> bool {
    deliver(inner, &inner.calls, call, delivery, CallEvent::Broken)
}

fn deliver_exec(inner: &Inner, session: u32, delivery: Delivery<ExecEvent>) -> bool {
    deliver(inner, &inner.sessions, session, delivery, |message| {
        ExecEvent::Error(ErrorBody::new(ErrorCode::Protocol, message))
    })
}

/// The guest lets us send more on a stream. A grant past the maximum
/// window fails that stream (and cancels it at the guest).
fn window_update(inner: &Inner, stream: u32, increment: u32) {
    let overflow = {
        let calls = inner.calls.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let send = calls
            .get(&stream)
            .map(|e| e.send.clone())
            .or_else(|| sessions.get(&stream).map(|e| e.send.clone()));
        match send {
            Some(send) => send.grant(increment).err(),
            None => None,
        }
    };
    let Some(overflow) = overflow else { return };
    let message = format!(
        "the guest granted a flow-control window of {} bytes, over the maximum of {}",
        overflow.window,
        crate::flow::MAX_WINDOW
    );
    let error = || ErrorBody::new(ErrorCode::Protocol, message.clone());
    let failed = fail_stream(&inner.calls, stream, CallEvent::Broken(message.clone()))
        || fail_stream(&inner.sessions, stream, ExecEvent::Error(error()));
    if failed {
        tracing::warn!(stream, %message, "guest broke the protocol on a stream; cancelling it");
        let out = inner.out.clone();
        tokio::spawn(async move {
            let _ = out.send(Message::Cancel { call: stream }.to_frame()).await;
        });
    }
}

fn fail_stream<E>(streams: &Mutex<HashMap<u32, Entry<E>>>, stream: u32, event: E) -> bool {
    let removed = streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&stream);
    match removed {
        Some(entry) => {
            let _ = entry.events.send(event);
            true
        }
        None => false,
    }
}

/// Cancels the call at the guest if dropped before the response ended.
struct CallGuard {
    client: GuestClient,
    call: u32,
    done: bool,
    window: Arc<RecvWindow>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let removed = self
            .client
            .inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.call);
        if !self.done && removed.is_some() {
            self.client.try_send(Message::Cancel { call: self.call });
        }
    }
}

/// The request body of a streamed call.
pub struct RequestBodySender {
    client: GuestClient,
    call: u32,
    window: Arc<SendWindow>,
    finished: bool,
}

impl RequestBodySender {
    /// Send a chunk (split into frames of at most [`MAX_DATA_CHUNK`]).
    /// Waits while the guest has not granted window for it (the function
    /// reads its request slowly); other calls are not held up.
    pub async fn send(&mut self, mut data: Bytes) -> Result<(), GuestClientError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            self.client
                .send_windowed(
                    &self.window,
                    Message::RequestBody {
                        call: self.call,
                        data: chunk,
                    },
                )
                .await?;
        }
        Ok(())
    }

    /// The body is complete.
    pub async fn finish(mut self) -> Result<(), GuestClientError> {
        self.finished = true;
        self.client
            .send(Message::RequestEnd { call: self.call })
            .await
    }
}

impl Drop for RequestBodySender {
    fn drop(&mut self) {
        if !self.finished {
            self.client.try_send(Message::Cancel { call: self.call });
        }
    }
}

/// A call whose response head has not arrived yet.
pub struct PendingResponse {
    events: mpsc::UnboundedReceiver<CallEvent>,
    guard: CallGuard,
}

impl PendingResponse {
    /// Wait for the response head. Dropping the future cancels the call.
    pub async fn response(mut self) -> Result<GuestResponse, GuestClientError> {
        match self.events.recv().await {
            Some(CallEvent::Head(head)) => Ok(GuestResponse {
                status: head.status,
                headers: head.headers,
                body: ResponseBody {
                    events: self.events,
                    guard: self.guard,
                },
            }),
            Some(CallEvent::Error(e)) => {
                self.guard.done = true;
                Err(GuestClientError::Guest(e))
            }
            Some(CallEvent::Broken(message)) => {
                self.guard.done = true;
                Err(GuestClientError::Protocol(message))
            }
            Some(other) => Err(GuestClientError::Protocol(format!(
                "{other:?} before the response head"
            ))),
            None => Err(self.guard.client.closed_error()),
        }
    }
}

/// A response from the function; the body streams.
pub struct GuestResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: ResponseBody,
}

impl GuestResponse {
    /// First value of a header (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Streamed response body. Dropping it before the end cancels the call.
/// The guest sends at most a window ahead of what is read here.
pub struct ResponseBody {
    events: mpsc::UnboundedReceiver<CallEvent>,
    guard: CallGuard,
}

impl ResponseBody {
    /// Next chunk; None at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, GuestClientError>> {
        if self.guard.done {
            return None;
        }
        match self.events.recv().await {
            Some(CallEvent::Body(b)) => {
                self.guard
                    .client
                    .consumed(self.guard.call, &self.guard.window, b.len())
                    .await;
                Some(Ok(b))
            }
            Some(CallEvent::End) => {
                self.guard.done = true;
                None
            }
            Some(CallEvent::Error(e)) => {
                self.guard.done = true;
                Some(Err(GuestClientError::Guest(e)))
            }
            Some(CallEvent::Broken(message)) => {
                self.guard.done = true;
                Some(Err(GuestClientError::Protocol(message)))
            }
            Some(CallEvent::Head(_)) => Some(Err(GuestClientError::Protocol(
                "second response head".into(),
            ))),
            None => {
                self.guard.done = true;
                Some(Err(self.guard.client.closed_error()))
            }
        }
    }

    /// The whole body.
    pub async fn collect(mut self) -> Result<Bytes, GuestClientError> {
        let mut all = BytesMut::new();
        while let Some(chunk) = self.chunk().await {
            all.extend_from_slice(&chunk?);
        }
        Ok(all.freeze())
    }
}

/// An instance-login session: split into input and output halves.
pub struct ExecSession {
    pub input: ExecInput,
    pub output: ExecOutput,
}

/// Writes to a session. Input waits while the guest has not granted
/// window for it (the command does not read its stdin).
#[derive(Clone)]
pub struct ExecInput {
    client: GuestClient,
    session: u32,
    window: Arc<SendWindow>,
}

impl ExecInput {
    pub async fn stdin(&self, mut data: Bytes) -> Result<(), GuestClientError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            self.client
                .send_windowed(
                    &self.window,
                    Message::ExecStdin {
                        session: self.session,
                        data: chunk,
                    },
                )
                .await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&self) -> Result<(), GuestClientError> {
        self.client
            .send_windowed(
                &self.window,
                Message::ExecStdinClose {
                    session: self.session,
                },
            )
            .await
    }

    pub async fn resize(&self, size: TtySize) -> Result<(), GuestClientError> {
        self.client
            .send_windowed(
                &self.window,
                Message::ExecResize {
                    session: self.session,
                    size,
                },
            )
            .await
    }
}

/// Reads a session's output. Dropping it before the session ended stops
/// the session at the guest.
pub struct ExecOutput {
    client: GuestClient,
    session: u32,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    window: Arc<RecvWindow>,
    done: bool,
}

impl ExecOutput {
    /// Next event; None after Exit or Error.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        if self.done {
            return None;
        }
        let event = match self.events.recv().await {
            Some(e) => e,
            None => ExecEvent::Error(ErrorBody::new(
                ErrorCode::Internal,
                self.client
                    .closed()
                    .unwrap_or_else(|| "connection closed".into()),
            )),
        };
        match &event {
            ExecEvent::Stdout(data) | ExecEvent::Stderr(data) => {
                self.client
                    .consumed(self.session, &self.window, data.len())
                    .await;
            }
            ExecEvent::Exit(_) | ExecEvent::Error(_) => self.done = true,
        }
        Some(event)
    }
}

impl Drop for ExecOutput {
    fn drop(&mut self) {
        let removed = self
            .client
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.session);
        // Nobody reads the output any more and nobody would grant window
        // for it: the session is stopped rather than left blocked.
        if !self.done && removed.is_some() {
            self.client.try_send(Message::Cancel { call: self.session });
        }
    }
}
