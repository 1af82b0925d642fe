//! The host side: one [`GuestClient`] per guest connection. Cheap to clone;
//! any number of calls and exec sessions may be in flight at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};

use crate::frame::{read_frame, Frame, FrameError, MAX_DATA_CHUNK, PROTOCOL_VERSION};
use crate::io::{spawn_writer, OUT_QUEUE};
use crate::message::*;

/// Buffered events per call or session before the reader waits for the consumer.
const EVENT_QUEUE: usize = 64;
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

struct Inner {
    out: mpsc::Sender<Frame>,
    next_stream: AtomicU32,
    calls: Mutex<HashMap<u32, mpsc::Sender<CallEvent>>>,
    sessions: Mutex<HashMap<u32, mpsc::Sender<ExecEvent>>>,
    configuring: Mutex<Option<Configuring>>,
    ready: watch::Receiver<Option<Ready>>,
    closed: watch::Receiver<Option<String>>,
    logs: Mutex<Option<mpsc::Receiver<LogLine>>>,
    dropped_logs: AtomicU64,
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
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(call, tx);
        let guard = CallGuard {
            client: self.clone(),
            call,
            done: false,
        };
        self.send(Message::Call { call, kind, head }).await?;
        Ok((
            RequestBodySender {
                client: self.clone(),
                call,
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
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(session, tx);
        let output = ExecOutput {
            client: self.clone(),
            session,
            events: rx,
            done: false,
        };
        self.send(Message::ExecStart { session, request }).await?;
        Ok(ExecSession {
            input: ExecInput {
                client: self.clone(),
                session,
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

    fn closed_error(&self) -> GuestClientError {
        GuestClientError::Closed(self.closed().unwrap_or_else(|| "connection closing".into()))
    }

    async fn send(&self, message: Message) -> Result<(), GuestClientError> {
        self.inner
            .out
            .send(message.to_frame())
            .await
            .map_err(|_| self.closed_error())
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
            Err(e) => return format!("bad frame from guest: {e}"),
        };
        let message = match Message::from_frame(frame) {
            Ok(m) => m,
            Err(e) => return format!("bad frame from guest: {e}"),
        };
        let Some(inner) = inner.upgrade() else {
            return "client dropped".into();
        };
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
                if !deliver_call(&inner, stream, CallEvent::Error(error.clone()), true).await {
                    deliver_exec(&inner, stream, ExecEvent::Error(error), true).await;
                }
            }
            Message::ResponseHead { call, head } => {
                deliver_call(&inner, call, CallEvent::Head(head), false).await;
            }
            Message::ResponseBody { call, data } => {
                deliver_call(&inner, call, CallEvent::Body(data), false).await;
            }
            Message::ResponseEnd { call } => {
                deliver_call(&inner, call, CallEvent::End, true).await;
            }
            Message::ExecStdout { session, data } => {
                deliver_exec(&inner, session, ExecEvent::Stdout(data), false).await;
            }
            Message::ExecStderr { session, data } => {
                deliver_exec(&inner, session, ExecEvent::Stderr(data), false).await;
            }
            Message::ExecExit { session, status } => {
                deliver_exec(&inner, session, ExecEvent::Exit(status), true).await;
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

/// Hand an event to its call; false if no such call.
async fn deliver_call(inner: &Inner, call: u32, event: CallEvent, last: bool) -> bool {
    let tx = {
        let mut calls = inner.calls.lock().unwrap_or_else(|e| e.into_inner());
        if last {
            calls.remove(&call)
        } else {
            calls.get(&call).cloned()
        }
    };
    match tx {
        Some(tx) => {
            // A consumer that went away is not an error of the connection.
            let _ = tx.send(event).await;
            true
        }
        None => false,
    }
}

async fn deliver_exec(inner: &Inner, session: u32, event: ExecEvent, last: bool) -> bool {
    let tx = {
        let mut sessions = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if last {
            sessions.remove(&session)
        } else {
            sessions.get(&session).cloned()
        }
    };
    match tx {
        Some(tx) => {
            let _ = tx.send(event).await;
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
    finished: bool,
}

impl RequestBodySender {
    /// Send a chunk (split into frames of at most [`MAX_DATA_CHUNK`]).
    pub async fn send(&mut self, mut data: Bytes) -> Result<(), GuestClientError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            self.client
                .send(Message::RequestBody {
                    call: self.call,
                    data: chunk,
                })
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
    events: mpsc::Receiver<CallEvent>,
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
pub struct ResponseBody {
    events: mpsc::Receiver<CallEvent>,
    guard: CallGuard,
}

impl ResponseBody {
    /// Next chunk; None at the end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, GuestClientError>> {
        if self.guard.done {
            return None;
        }
        match self.events.recv().await {
            Some(CallEvent::Body(b)) => Some(Ok(b)),
            Some(CallEvent::End) => {
                self.guard.done = true;
                None
            }
            Some(CallEvent::Error(e)) => {
                self.guard.done = true;
                Some(Err(GuestClientError::Guest(e)))
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

/// Writes to a session.
#[derive(Clone)]
pub struct ExecInput {
    client: GuestClient,
    session: u32,
}

impl ExecInput {
    pub async fn stdin(&self, mut data: Bytes) -> Result<(), GuestClientError> {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            self.client
                .send(Message::ExecStdin {
                    session: self.session,
                    data: chunk,
                })
                .await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&self) -> Result<(), GuestClientError> {
        self.client
            .send(Message::ExecStdinClose {
                session: self.session,
            })
            .await
    }

    pub async fn resize(&self, size: TtySize) -> Result<(), GuestClientError> {
        self.client
            .send(Message::ExecResize {
                session: self.session,
                size,
            })
            .await
    }
}

/// Reads a session's output.
pub struct ExecOutput {
    client: GuestClient,
    session: u32,
    events: mpsc::Receiver<ExecEvent>,
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
        if matches!(event, ExecEvent::Exit(_) | ExecEvent::Error(_)) {
            self.done = true;
        }
        Some(event)
    }
}

impl Drop for ExecOutput {
    fn drop(&mut self) {
        self.client
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.session);
    }
}
