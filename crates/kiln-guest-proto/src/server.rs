//! The guest side: [`serve`] answers one host connection, handing
//! configuration, calls and exec sessions to a [`GuestHandler`].
//!
//! The read loop never waits for a handler: a call's request body and a
//! session's input are queued, bounded by the stream's flow-control window
//! ([`crate::flow`]), and the response side waits for the host's window,
//! so a slow reader on either end holds up only its own stream.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::flow::{frame_cost, RecvWindow, SendWindow};
use crate::frame::{read_frame, Frame, FrameError, MAX_DATA_CHUNK};
use crate::io::{spawn_writer, OUT_QUEUE};
use crate::message::*;

/// What the guest does with the host's requests.
pub trait GuestHandler: Send + Sync + 'static {
    /// Whether an earlier connection configured the guest (sent in Ready).
    fn is_configured(&self) -> bool;

    /// A host connected; log lines for it go through `logs`.
    fn connected(&self, logs: LogSender) {
        let _ = logs;
    }

    /// Set the instance up and start the function; return once its port
    /// accepts connections.
    fn configure(
        &self,
        config: GuestConfig,
    ) -> impl Future<Output = Result<Configured, ErrorBody>> + Send;

    /// Serve one call: read `request.body` to its end (None) and answer
    /// through `response` (head, body chunks, end; or error).
    fn call(
        &self,
        request: CallRequest,
        response: ResponseWriter,
    ) -> impl Future<Output = ()> + Send;

    /// Run one exec session to its end, reporting exit or error on `output`.
    fn exec(
        &self,
        request: ExecRequest,
        input: ExecInputs,
        output: ExecWriter,
    ) -> impl Future<Output = ()> + Send;
}

/// A call as the handler sees it.
#[derive(Debug)]
pub struct CallRequest {
    pub call: u32,
    pub kind: CallKind,
    pub head: CallHead,
    /// Body chunks, None at the end of the body.
    pub body: RequestBody,
}

/// Grants the host window for what a handler has taken off a stream.
#[derive(Debug)]
struct Granter {
    stream: u32,
    window: Arc<RecvWindow>,
    out: mpsc::Sender<Frame>,
}

impl Granter {
    async fn consumed(&self, cost: u32) {
        if let Some(increment) = self.window.consumed(cost) {
            let _ = send(
                &self.out,
                Message::WindowUpdate {
                    stream: self.stream,
                    increment,
                },
            )
            .await;
        }
    }
}

/// A call's request body as the host streams it. Reading it lets the host
/// send more; the host sends at most a window ahead of the reader.
#[derive(Debug)]
pub struct RequestBody {
    chunks: mpsc::UnboundedReceiver<(Bytes, u32)>,
    granter: Granter,
}

impl RequestBody {
    /// Next chunk; None at the end of the body (or when the call ended).
    pub async fn recv(&mut self) -> Option<Bytes> {
        let (chunk, cost) = self.chunks.recv().await?;
        self.granter.consumed(cost).await;
        Some(chunk)
    }
}

/// An exec session's input as the host sends it, in order.
#[derive(Debug)]
pub struct ExecInputs {
    inputs: mpsc::UnboundedReceiver<(ExecInput, u32)>,
    granter: Granter,
}

impl ExecInputs {
    /// Next input; None when the host is gone or the session ended.
    pub async fn recv(&mut self) -> Option<ExecInput> {
        let (input, cost) = self.inputs.recv().await?;
        self.granter.consumed(cost).await;
        Some(input)
    }
}

/// Input to an exec session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecInput {
    Stdin(Bytes),
    CloseStdin,
    Resize(TtySize),
}

/// Why a connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Bad frame from the host")]
    Frame(#[from] FrameError),
    #[error("Host sent a guest-only message: {0}")]
    Protocol(String),
}

/// Sends log lines to the host over this connection; never blocks.
#[derive(Clone, Debug)]
pub struct LogSender {
    out: mpsc::Sender<Frame>,
}

impl LogSender {
    /// Queue a line; false when the connection is gone or congested
    /// (the line is dropped so a chatty function cannot stall calls).
    pub fn send(&self, line: LogLine) -> bool {
        self.out.try_send(Message::Log(line).to_frame()).is_ok()
    }

    pub fn is_closed(&self) -> bool {
        self.out.is_closed()
    }
}

/// The response side of one call.
pub struct ResponseWriter {
    call: u32,
    out: mpsc::Sender<Frame>,
    window: Arc<SendWindow>,
    finished: Arc<AtomicBool>,
    head_sent: bool,
}

impl ResponseWriter {
    pub fn call(&self) -> u32 {
        self.call
    }

    /// Send the status and headers. Returns false if the host is gone.
    pub async fn head(&mut self, head: ResponseHead) -> bool {
        self.head_sent = true;
        send(
            &self.out,
            Message::ResponseHead {
                call: self.call,
                head,
            },
        )
        .await
    }

    /// Send body bytes (chunked into frames). Waits while the host has
    /// not granted window for them (its caller reads slowly). Returns false
    /// if the host is gone or broke the stream's flow control.
    pub async fn body(&mut self, mut data: Bytes) -> bool {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            if !send_windowed(
                &self.out,
                &self.window,
                Message::ResponseBody {
                    call: self.call,
                    data: chunk,
                },
            )
            .await
            {
                return false;
            }
        }
        true
    }

    /// The response is complete.
    pub async fn end(self) -> bool {
        self.finished.store(true, Ordering::SeqCst);
        send(&self.out, Message::ResponseEnd { call: self.call }).await
    }

    /// Fail the call (before or after the head).
    pub async fn error(self, error: ErrorBody) -> bool {
        self.finished.store(true, Ordering::SeqCst);
        send(
            &self.out,
            Message::Error {
                stream: self.call,
                error,
            },
        )
        .await
    }

    pub fn head_sent(&self) -> bool {
        self.head_sent
    }
}

/// The output side of one exec session.
pub struct ExecWriter {
    session: u32,
    out: mpsc::Sender<Frame>,
    window: Arc<SendWindow>,
    finished: Arc<AtomicBool>,
}

impl ExecWriter {
    pub async fn stdout(&self, mut data: Bytes) -> bool {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            if !send_windowed(
                &self.out,
                &self.window,
                Message::ExecStdout {
                    session: self.session,
                    data: chunk,
                },
            )
            .await
            {
                return false;
            }
        }
        true
    }

    pub async fn stderr(&self, mut data: Bytes) -> bool {
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(MAX_DATA_CHUNK));
            if !send_windowed(
                &self.out,
                &self.window,
                Message::ExecStderr {
                    session: self.session,
                    data: chunk,
                },
            )
            .await
            {
                return false;
            }
        }
        true
    }

    pub async fn exit(self, status: ExitStatus) -> bool {
        self.finished.store(true, Ordering::SeqCst);
        send(
            &self.out,
            Message::ExecExit {
                session: self.session,
                status,
            },
        )
        .await
    }

    pub async fn error(self, error: ErrorBody) -> bool {
        self.finished.store(true, Ordering::SeqCst);
        send(
            &self.out,
            Message::Error {
                stream: self.session,
                error,
            },
        )
        .await
    }
}

async fn send(out: &mpsc::Sender<Frame>, message: Message) -> bool {
    out.send(message.to_frame()).await.is_ok()
}

/// Send a flow-controlled frame once the host's window allows it.
async fn send_windowed(out: &mpsc::Sender<Frame>, window: &SendWindow, message: Message) -> bool {
    let frame = message.to_frame();
    if window.take(frame_cost(&frame)).await.is_err() {
        return false;
    }
    out.send(frame).await.is_ok()
}

struct Stream {
    input: Option<StreamInput>,
    abort: AbortHandle,
    /// What the host may still send on this stream.
    recv: Arc<RecvWindow>,
    /// What the handler may still send on this stream.
    send: Arc<SendWindow>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.send.close();
    }
}

enum StreamInput {
    Body(mpsc::UnboundedSender<(Bytes, u32)>),
    Exec(mpsc::UnboundedSender<(ExecInput, u32)>),
}

/// Serve one host connection until it closes. Sends Ready first. A
/// malformed frame is answered with a BadFrame error and ends the
/// connection (framing cannot be trusted after it); handler tasks still
/// running are aborted when the connection ends.
pub async fn serve<S, H>(io: S, handler: Arc<H>, guest_version: &str) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
    H: GuestHandler,
{
    let (mut reader, writer) = tokio::io::split(io);
    let (out, out_rx) = mpsc::channel(OUT_QUEUE);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let writer_task = spawn_writer(writer, out_rx, stop_rx);
    let mut ready = Ready::current(guest_version);
    ready.configured = handler.is_configured();
    let _ = out.send(Message::Ready(ready).to_frame()).await;
    handler.connected(LogSender { out: out.clone() });
    let streams: Arc<Mutex<HashMap<u32, Stream>>> = Arc::new(Mutex::new(HashMap::new()));
    let result = serve_loop(&mut reader, &out, &handler, &streams).await;
    if let Err(e) = &result {
        let code = match e {
            ServeError::Frame(_) => ErrorCode::BadFrame,
            ServeError::Protocol(_) => ErrorCode::Protocol,
        };
        let _ = out
            .send(
                Message::Error {
                    stream: 0,
                    error: ErrorBody::new(code, e.to_string() + &source_suffix(e)),
                }
                .to_frame(),
            )
            .await;
    }
    for (_, stream) in streams.lock().unwrap_or_else(|e| e.into_inner()).drain() {
        stream.abort.abort();
    }
    drop(out);
    // Let the writer flush the last frames (the error) before returning.
    let _ = stop.send(());
    let _ = writer_task.await;
    result
}

fn source_suffix(e: &ServeError) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!(": {s}"),
        None => String::new(),
    }
}

async fn serve_loop<R, H>(
    reader: &mut R,
    out: &mpsc::Sender<Frame>,
    handler: &Arc<H>,
    streams: &Arc<Mutex<HashMap<u32, Stream>>>,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
    H: GuestHandler,
{
    // Configure runs in a task of its own so pings and logs keep flowing.
    let configuring = Arc::new(AtomicBool::new(false));
    loop {
        let Some(frame) = read_frame(reader).await? else {
            return Ok(());
        };
        let cost = frame_cost(&frame);
        let message = Message::from_frame(frame)?;
        match message {
            Message::Configure(config) => {
                if configuring.swap(true, Ordering::SeqCst) {
                    let _ = out
                        .send(
                            Message::Error {
                                stream: 0,
                                error: ErrorBody::new(
                                    ErrorCode::AlreadyConfigured,
                                    "Configure was already sent",
                                ),
                            }
                            .to_frame(),
                        )
                        .await;
                    continue;
                }
                let (handler, out) = (handler.clone(), out.clone());
                tokio::spawn(async move {
                    let reply = match config.validate() {
                        Err(e) => Err(ErrorBody::new(ErrorCode::InvalidConfig, e.to_string())),
                        Ok(()) => handler.configure(*config).await,
                    };
                    let message = match reply {
                        Ok(c) => Message::Configured(c),
                        Err(error) => Message::Error { stream: 0, error },
                    };
                    let _ = out.send(message.to_frame()).await;
                });
            }
            Message::Call { call, kind, head } => {
                if streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&call)
                {
                    stream_error(out, call, "stream id already in use").await;
                    continue;
                }
                let (body_tx, chunks) = mpsc::unbounded_channel();
                let (recv, send) = (Arc::new(RecvWindow::new()), Arc::new(SendWindow::new()));
                let finished = Arc::new(AtomicBool::new(false));
                let writer = ResponseWriter {
                    call,
                    out: out.clone(),
                    window: send.clone(),
                    finished: finished.clone(),
                    head_sent: false,
                };
                let request = CallRequest {
                    call,
                    kind,
                    head,
                    body: RequestBody {
                        chunks,
                        granter: Granter {
                            stream: call,
                            window: recv.clone(),
                            out: out.clone(),
                        },
                    },
                };
                let (handler2, out2, streams2) = (handler.clone(), out.clone(), streams.clone());
                // Hold the lock across spawn so the task cannot remove its
                // entry before it is inserted.
                let mut map = streams.lock().unwrap_or_else(|e| e.into_inner());
                let task = tokio::spawn(async move {
                    let outcome = CatchPanic(Box::pin(handler2.call(request, writer))).await;
                    if !finished.load(Ordering::SeqCst) {
                        let error = ErrorBody::new(
                            ErrorCode::Internal,
                            match outcome {
                                Ok(()) => "Call ended without a response".to_owned(),
                                Err(panic) => format!("The guest's call handler failed: {panic}"),
                            },
                        );
                        let _ = out2
                            .send(
                                Message::Error {
                                    stream: call,
                                    error,
                                }
                                .to_frame(),
                            )
                            .await;
                    }
                    streams2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&call);
                });
                map.insert(
                    call,
                    Stream {
                        input: Some(StreamInput::Body(body_tx)),
                        abort: task.abort_handle(),
                        recv,
                        send,
                    },
                );
            }
            Message::RequestBody { call, data } => {
                stream_input(out, streams, call, cost, |input| match input {
                    StreamInput::Body(tx) => tx.send((data, cost)).is_ok(),
                    StreamInput::Exec(_) => false,
                })
                .await;
            }
            Message::RequestEnd { call } => {
                if let Some(s) = streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_mut(&call)
                {
                    if matches!(s.input, Some(StreamInput::Body(_))) {
                        s.input = None;
                    }
                }
            }
            Message::Cancel { call } => {
                if let Some(s) = streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&call)
                {
                    tracing::debug!(call, "call cancelled by the host");
                    s.abort.abort();
                }
            }
            Message::ExecStart { session, request } => {
                if streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&session)
                {
                    stream_error(out, session, "stream id already in use").await;
                    continue;
                }
                let (input_tx, inputs) = mpsc::unbounded_channel();
                let (recv, send) = (Arc::new(RecvWindow::new()), Arc::new(SendWindow::new()));
                let input = ExecInputs {
                    inputs,
                    granter: Granter {
                        stream: session,
                        window: recv.clone(),
                        out: out.clone(),
                    },
                };
                let finished = Arc::new(AtomicBool::new(false));
                let writer = ExecWriter {
                    session,
                    out: out.clone(),
                    window: send.clone(),
                    finished: finished.clone(),
                };
                let (handler2, out2, streams2) = (handler.clone(), out.clone(), streams.clone());
                let mut map = streams.lock().unwrap_or_else(|e| e.into_inner());
                let task = tokio::spawn(async move {
                    let outcome = CatchPanic(Box::pin(handler2.exec(request, input, writer))).await;
                    if !finished.load(Ordering::SeqCst) {
                        let error = ErrorBody::new(
                            ErrorCode::ExecFailed,
                            match outcome {
                                Ok(()) => "Session ended without an exit status".to_owned(),
                                Err(panic) => format!("The guest's exec handler failed: {panic}"),
                            },
                        );
                        let _ = out2
                            .send(
                                Message::Error {
                                    stream: session,
                                    error,
                                }
                                .to_frame(),
                            )
                            .await;
                    }
                    streams2
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&session);
                });
                map.insert(
                    session,
                    Stream {
                        input: Some(StreamInput::Exec(input_tx)),
                        abort: task.abort_handle(),
                        recv,
                        send,
                    },
                );
            }
            Message::ExecStdin { session, data } => {
                exec_input(out, streams, session, cost, ExecInput::Stdin(data)).await
            }
            Message::ExecStdinClose { session } => {
                exec_input(out, streams, session, cost, ExecInput::CloseStdin).await
            }
            Message::ExecResize { session, size } => {
                exec_input(out, streams, session, cost, ExecInput::Resize(size)).await
            }
            Message::WindowUpdate { stream, increment } => {
                let send = streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&stream)
                    .map(|s| s.send.clone());
                // A stream that already ended ignores late grants.
                if let Some(Err(overflow)) = send.map(|s| s.grant(increment)) {
                    let message = format!(
                        "The host granted a flow-control window of {} bytes, over the maximum of {}",
                        overflow.window,
                        crate::flow::MAX_WINDOW
                    );
                    fail_stream(out, streams, stream, message).await;
                }
            }
            Message::Ping(data) => {
                let _ = out.send(Message::Pong(data).to_frame()).await;
            }
            Message::Pong(_) => {}
            Message::Error { stream, error } => {
                tracing::warn!(stream, code = ?error.code, message = %error.message, "host reported an error");
            }
            other @ (Message::Ready(_)
            | Message::Configured(_)
            | Message::ResponseHead { .. }
            | Message::ResponseBody { .. }
            | Message::ResponseEnd { .. }
            | Message::ExecStdout { .. }
            | Message::ExecStderr { .. }
            | Message::ExecExit { .. }
            | Message::Log(_)) => {
                return Err(ServeError::Protocol(format!("{:?}", other.to_frame().kind)))
            }
        }
    }
}

/// A handler future whose panic becomes an error: a call or session whose
/// task panicked would otherwise end without any answer, and the host would
/// wait for one forever.
struct CatchPanic<F>(Pin<Box<F>>);

impl<F: Future<Output = ()>> Future for CatchPanic<F> {
    type Output = Result<(), String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Err(panic) => Poll::Ready(Err(panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panicked".into()))),
        }
    }
}

async fn stream_error(out: &mpsc::Sender<Frame>, stream: u32, message: &str) {
    let error = ErrorBody::new(ErrorCode::Protocol, message);
    let _ = out.send(Message::Error { stream, error }.to_frame()).await;
}

async fn exec_input(
    out: &mpsc::Sender<Frame>,
    streams: &Arc<Mutex<HashMap<u32, Stream>>>,
    session: u32,
    cost: u32,
    input: ExecInput,
) {
    stream_input(out, streams, session, cost, |i| match i {
        StreamInput::Exec(tx) => tx.send((input, cost)).is_ok(),
        StreamInput::Body(_) => false,
    })
    .await;
}

/// Queue a flow-controlled frame for its stream's handler; never waits for
/// the handler. A stream that finished, was cancelled or is of the other
/// kind drops it. A frame past the stream's window fails that stream alone.
async fn stream_input(
    out: &mpsc::Sender<Frame>,
    streams: &Arc<Mutex<HashMap<u32, Stream>>>,
    stream: u32,
    cost: u32,
    queue: impl FnOnce(&StreamInput) -> bool,
) {
    let over = {
        let map = streams.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&stream) {
            Some(s) => match &s.input {
                Some(input) if s.recv.arrived(cost) => {
                    if !queue(input) {
                        // Not queued (the handler stopped reading): nobody
                        // will consume it, so its window comes back at once
                        // (below, outside the lock).
                        s.recv.consumed(cost).map(Err)
                    } else {
                        None
                    }
                }
                Some(_) => Some(Ok(())),
                // The input was closed (RequestEnd); late data is dropped.
                None => None,
            },
            None => None,
        }
    };
    match over {
        Some(Ok(())) => {
            let message =
                format!("The host sent a {cost}-byte frame past the stream's flow-control window");
            fail_stream(out, streams, stream, message).await;
        }
        Some(Err(increment)) => {
            let _ = send(out, Message::WindowUpdate { stream, increment }).await;
        }
        None => {}
    }
}

/// Stop one stream the host broke and tell the host why; the others go on.
async fn fail_stream(
    out: &mpsc::Sender<Frame>,
    streams: &Arc<Mutex<HashMap<u32, Stream>>>,
    stream: u32,
    message: String,
) {
    let removed = streams
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&stream);
    if let Some(s) = removed {
        tracing::warn!(stream, %message, "host broke the protocol on a stream");
        s.abort.abort();
        let error = ErrorBody::new(ErrorCode::Protocol, message);
        let _ = send(out, Message::Error { stream, error }).await;
    }
}
