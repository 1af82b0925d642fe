//! Invocation forwarding: the gateway's `POST /v1/instances/{id}/invoke`
//! streamed to the runtime's `POST /invoke` with FC's custom-runtime
//! headers, and the runtime's answer streamed back with its
//! [`InvokeOutcome`] (and, when the function did not answer, an
//! [`InvokeFailure`] saying why).
//!
//! This is the warm path. Per call it allocates the outgoing header
//! entries and one boxed body; the instance lookup holds a read lock only
//! for the map access, counters are atomics, and each instance keeps its
//! own stack of keep-alive HTTP/1.1 connections to its runtime
//! ([`RuntimeConns`]): a call takes one and owns it until the answer's body
//! has ended, so there is no pool task and no task spawned per call.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use kiln_core::{FcError, InstanceSpec};
use kiln_internal_api::inline::{ConnHome, IdleStack, InlineBody, InlineConn};
use kiln_internal_api::invoke::{HTTP_METHOD_HEADER, HTTP_PATH_HEADER, OUTCOME_HEADER};
use kiln_internal_api::server::{error, full, Body, BoxError};
use kiln_internal_api::{InvokeFailure, InvokeOutcome};
use tokio::time::Sleep;

use crate::instances::{Instance, InstanceManager};
use crate::runtime_addr::RuntimeAddr;

pub(crate) const X_FC_REQUEST_ID: HeaderName = HeaderName::from_static("x-fc-request-id");
const X_FC_STATUS: HeaderName = HeaderName::from_static("x-fc-status");
const X_FC_REGION: HeaderName = HeaderName::from_static("x-fc-region");

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in `Connection` are hop-by-hop too.
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                if let Ok(name) = HeaderName::from_bytes(name.trim().as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// How long a runtime connection may sit idle before it is closed instead
/// of reused. Idle connections go before common runtimes close them
/// (Node's default keep-alive timeout is 5 s): a request written onto a
/// connection the runtime is closing would fail the instance.
const RUNTIME_IDLE: Duration = Duration::from_secs(4);

/// Why no request could be sent to the runtime.
#[derive(Debug, thiserror::Error)]
enum RuntimeError {
    #[error("cannot connect to the runtime: {0}")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

type RuntimeIo = TokioIo<tokio::net::TcpStream>;
type RuntimeConn = InlineConn<RuntimeIo, Incoming>;

/// Keep-alive HTTP/1.1 connections to one runtime, most recently used on
/// top. A call drives its connection's I/O itself (see
/// [`kiln_internal_api::inline`]): no task runs per connection.
pub(crate) struct RuntimeConns {
    addr: RuntimeAddr,
    idle: IdleStack<RuntimeIo, Incoming>,
}

/// Idle runtime connections kept per instance (its peak of concurrent
/// calls).
const RUNTIME_MAX_IDLE: usize = 1024;

impl RuntimeConns {
    fn new(addr: RuntimeAddr) -> Self {
        Self {
            addr,
            idle: IdleStack::new(RUNTIME_IDLE, RUNTIME_MAX_IDLE),
        }
    }

    /// A connection ready for a request, and whether it was used before.
    async fn checkout(&self) -> Result<(RuntimeConn, bool), RuntimeError> {
        while let Some(mut conn) = self.idle.take() {
            // The connection may still be finishing the previous answer;
            // one that has closed fails here and is dropped.
            if conn.ready().await.is_ok() {
                return Ok((conn, true));
            }
        }
        Ok((self.dial().await?, false))
    }

    /// Give a connection back after its answer ended.
    fn put_back(&self, conn: RuntimeConn) {
        self.idle.put_back(conn);
    }

    async fn dial(&self) -> Result<RuntimeConn, RuntimeError> {
        // Bounded by the call's deadline only: a runtime with a short listen
        // backlog (Python's http.server keeps 5) drops the SYNs of a burst
        // of calls, and the kernel resends them after 1 s and 3 s.
        let tcp = self.addr.connect().await.map_err(RuntimeError::Connect)?;
        Ok(InlineConn::handshake(TokioIo::new(tcp)).await?)
    }

    /// Send `req` on a pooled connection; a request the runtime never saw
    /// because a reused connection had just closed is sent once more on a
    /// fresh one.
    async fn send(
        &self,
        req: Request<Incoming>,
    ) -> Result<(Response<Incoming>, RuntimeConn), RuntimeError> {
        let (mut conn, reused) = self.checkout().await?;
        match conn.send(req).await {
            Ok(resp) => Ok((resp, conn)),
            Err(mut e) => match e.take_message() {
                Some(req) if reused => {
                    let mut conn = self.dial().await?;
                    let resp = conn.send(req).await.map_err(|e| e.into_error())?;
                    Ok((resp, conn))
                }
                _ => Err(e.into_error().into()),
            },
        }
    }
}

/// An instance's runtime connections, held by an answer's body so its
/// connection goes back to them when the body ends.
struct HomeConns(Arc<Instance>);

impl ConnHome for HomeConns {
    type Io = RuntimeIo;
    type Body = Incoming;

    fn put_back(&self, conn: RuntimeConn) {
        self.0.upstream.conns.put_back(conn);
    }
}

/// The runtime's answer body, driving its connection while it is read.
type RuntimeBody = InlineBody<HomeConns>;

/// One instance's way to its runtime: keep-alive HTTP/1.1 connections and
/// the FC headers of its spec, built once at create time.
pub(crate) struct Upstream {
    conns: RuntimeConns,
    uri: Uri,
    host: HeaderValue,
    fc_headers: Vec<(HeaderName, HeaderValue)>,
    region: Option<HeaderValue>,
    pub(crate) timeout: Duration,
    pub(crate) timeout_s: u32,
}

impl Upstream {
    pub(crate) fn new(
        addr: RuntimeAddr,
        spec: &InstanceSpec,
        region: Option<&HeaderValue>,
    ) -> Self {
        let uri = Uri::from_static("/invoke");
        let host = HeaderValue::from_str(&addr.endpoint.to_string())
            .expect("a socket address is a valid header value");
        let value =
            |s: &str| HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""));
        let fc_headers = vec![
            (
                HeaderName::from_static("x-fc-function-name"),
                value(spec.function_name.as_str()),
            ),
            (
                HeaderName::from_static("x-fc-function-handler"),
                value(&spec.handler),
            ),
            (
                HeaderName::from_static("x-fc-function-memory"),
                HeaderValue::from(spec.memory_mb),
            ),
            (
                HeaderName::from_static("x-fc-function-timeout"),
                HeaderValue::from(spec.timeout_s),
            ),
            (
                HeaderName::from_static("x-fc-account-id"),
                value(spec.account_id.as_str()),
            ),
            (
                HeaderName::from_static("x-fc-qualifier"),
                value(spec.version.as_deref().unwrap_or("LATEST")),
            ),
            (
                HeaderName::from_static("x-fc-control-path"),
                HeaderValue::from_static("/invoke"),
            ),
        ];
        Self {
            conns: RuntimeConns::new(addr),
            uri,
            host,
            fc_headers,
            region: region.cloned(),
            timeout: Duration::from_secs(u64::from(spec.timeout_s)),
            timeout_s: spec.timeout_s,
        }
    }

    /// Where the runtime is reached.
    pub(crate) fn runtime(&self) -> &RuntimeAddr {
        &self.conns.addr
    }

    /// The runtime's request: the caller's headers minus hop-by-hop ones,
    /// plus FC's, and the caller's body as is.
    pub(crate) fn prepare(&self, req: Request<Incoming>) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        headers.insert(header::HOST, self.host.clone());
        headers.remove(&OUTCOME_HEADER);
        // An HTTP trigger's call: the runtime gets the caller's method and
        // path, with FC's control path for HTTP calls.
        let http = http_call(headers);
        for (name, value) in &self.fc_headers {
            headers.insert(name.clone(), value.clone());
        }
        if let Some(region) = &self.region {
            if !headers.contains_key(&X_FC_REGION) {
                headers.insert(X_FC_REGION, region.clone());
            }
        }
        match http {
            Some((method, uri)) => {
                headers.insert(X_FC_CONTROL_PATH, HeaderValue::from_static("/http-invoke"));
                parts.method = method;
                parts.uri = uri;
            }
            None => {
                if !headers.contains_key(header::CONTENT_TYPE) {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/octet-stream"),
                    );
                }
                parts.method = Method::POST;
                parts.uri = self.uri.clone();
            }
        }
        parts.version = Version::HTTP_11;
        parts.extensions = http::Extensions::new();
        Request::from_parts(parts, body)
    }
}

const X_FC_CONTROL_PATH: HeaderName = HeaderName::from_static("x-fc-control-path");

/// The method and path of an HTTP trigger's call, taken out of the
/// gateway's headers; `None` for an API invocation (or a malformed pair,
/// which the gateway never sends: the call then goes to `/invoke`).
fn http_call(headers: &mut HeaderMap) -> Option<(Method, Uri)> {
    let method = headers.remove(&HTTP_METHOD_HEADER);
    let path = headers.remove(&HTTP_PATH_HEADER);
    let method = Method::from_bytes(method?.as_bytes()).ok()?;
    let uri = Uri::try_from(path?.as_bytes()).ok()?;
    uri.path().starts_with('/').then_some((method, uri))
}

/// Is the runtime's answer a function error? FC's contract: a non-2xx
/// status, or `x-fc-status` other than 2xx (a missing one is success).
pub(crate) fn classify(status: StatusCode, headers: &HeaderMap) -> InvokeOutcome {
    if !status.is_success() {
        return InvokeOutcome::FunctionError;
    }
    match headers.get(&X_FC_STATUS) {
        None => InvokeOutcome::Ok,
        Some(v) => match v.to_str().ok().and_then(|s| s.trim().parse::<u16>().ok()) {
            Some(code) if (200..300).contains(&code) => InvokeOutcome::Ok,
            _ => InvokeOutcome::FunctionError,
        },
    }
}

/// The function did not answer (`outcome` is `InstanceFailed` or
/// `Timeout`): the outcome and an [`InvokeFailure`] saying why, which the
/// gateway renders in FC's shape.
pub(crate) fn unanswered(
    outcome: InvokeOutcome,
    status: StatusCode,
    request_id: &HeaderValue,
    message: String,
) -> Response<Body> {
    debug_assert!(!outcome.function_answered());
    let body = serde_json::to_vec(&InvokeFailure { message }).expect("a failure serialises");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(X_FC_REQUEST_ID, request_id.clone())
        .header(OUTCOME_HEADER, outcome.to_header())
        .body(full(body))
        .expect("valid response")
}

/// The instance cannot take the call (gone, failed, not resumable): the
/// function never saw it.
fn instance_failed(err: &FcError, request_id: &HeaderValue) -> Response<Body> {
    let status = StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    unanswered(
        InvokeOutcome::InstanceFailed,
        status,
        request_id,
        err.message.clone(),
    )
}

/// Counts the call as in flight until the response body is done, and
/// reports a runtime failure discovered while streaming. Frames the call
/// in the instance's log (FC's Start/End lines, with the failure's cause).
pub(crate) struct InFlight {
    manager: Arc<InstanceManager>,
    instance: Arc<Instance>,
    request_id: Arc<str>,
    /// Why the call failed, for its End.
    error: Option<String>,
    ended: bool,
}

impl InFlight {
    pub(crate) fn enter(
        manager: &Arc<InstanceManager>,
        instance: Arc<Instance>,
        request_id: &HeaderValue,
        want_tail: bool,
    ) -> Self {
        instance.enter(manager.clock.now_ms());
        let request_id: Arc<str> = String::from_utf8_lossy(request_id.as_bytes())
            .as_ref()
            .into();
        instance.log.begin(&request_id, want_tail);
        Self {
            manager: manager.clone(),
            instance,
            request_id,
            error: None,
            ended: false,
        }
    }

    /// The call's End line (once), with `error` as its cause; the call's
    /// log tail when Tail was asked for.
    pub(crate) fn end(&mut self, error: Option<String>) -> Option<Vec<u8>> {
        if self.ended {
            return None;
        }
        self.ended = true;
        let error = error.or_else(|| self.error.take());
        self.instance.log.end(&self.request_id, error.as_deref())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end(None);
        self.instance.leave(self.manager.clock.now_ms());
        self.manager.freezer.after_call(&self.instance);
    }
}

const X_FC_LOG_TYPE: HeaderName = HeaderName::from_static(kiln_internal_api::headers::LOG_TYPE);
const X_FC_LOG_RESULT: HeaderName = HeaderName::from_static(kiln_internal_api::headers::LOG_RESULT);

/// The most of a response the agent buffers to answer with FC's Tail
/// (which goes in a header, so after the whole body): a sync call's
/// payload limit. Larger answers fail the call instead of the agent.
pub const TAIL_RESPONSE_MAX: usize = kiln_core::limits::SYNC_PAYLOAD_MAX;

/// FC's `x-fc-log-type: Tail`.
fn wants_tail(headers: &HeaderMap) -> bool {
    headers
        .get(&X_FC_LOG_TYPE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"tail"))
}

/// FC's `x-fc-log-result`: the call's tail, base64.
fn put_tail(resp: &mut Response<Body>, tail: Option<Vec<u8>>) {
    use base64::Engine as _;
    if let Some(tail) = tail {
        let encoded = base64::engine::general_purpose::STANDARD.encode(tail);
        if let Ok(v) = HeaderValue::from_str(&encoded) {
            resp.headers_mut().insert(X_FC_LOG_RESULT, v);
        }
    }
}

pin_project_lite::pin_project! {
    /// The runtime's response body, cut off at the function's deadline;
    /// its connection goes back to the instance's pool when it has ended
    /// (and is closed when the body is dropped before that).
    struct InvokeBody {
        #[pin]
        inner: RuntimeBody,
        #[pin]
        deadline: Sleep,
        guard: InFlight,
    }
}

impl HttpBody for InvokeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.error = Some(format!(
                    "Process exited unexpectedly while streaming the response: {e}"
                ));
                this.guard
                    .manager
                    .metrics
                    .invocation(InvokeOutcome::InstanceFailed);
                this.guard.manager.fail(
                    &this.guard.instance,
                    "connection lost while streaming the response",
                );
                return Poll::Ready(Some(Err(Box::new(e))));
            }
            Poll::Ready(None) => {
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        if this.deadline.poll(cx).is_ready() {
            this.guard.error = Some(format!(
                "Function timed out after {} seconds",
                this.guard.instance.upstream.timeout_s
            ));
            this.guard
                .manager
                .metrics
                .invocation(InvokeOutcome::Timeout);
            this.guard.manager.fail(
                &this.guard.instance,
                "timed out while streaming the response",
            );
            return Poll::Ready(Some(Err(format!(
                "Function timed out after {} seconds",
                this.guard.instance.upstream.timeout_s
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A call that has started on its instance (see
/// [`InstanceManager::begin_call`]).
pub(crate) struct Started {
    pub(crate) instance: Arc<Instance>,
    /// The call in flight, until dropped.
    pub(crate) guard: InFlight,
    /// When the call started: its deadline counts from here.
    pub(crate) started: Instant,
}

impl InstanceManager {
    /// Start a call on `target` (the instance, or the id that was not
    /// found): the instance, running and thawed, with the call counted in
    /// flight and framed in its log; or the answer for a call that cannot
    /// start (the function never saw it).
    pub(crate) async fn begin_call(
        self: &Arc<Self>,
        target: Result<Arc<Instance>, String>,
        request_id: &HeaderValue,
        want_tail: bool,
    ) -> Result<Started, Response<Body>> {
        let instance = match target {
            Ok(instance) => instance,
            Err(id) => {
                self.metrics.invocation(InvokeOutcome::InstanceFailed);
                let err =
                    FcError::unavailable(format!("instance {id} does not exist on this node"));
                return Err(instance_failed(&err, request_id));
            }
        };
        if !instance.state().can_invoke() {
            self.metrics.invocation(InvokeOutcome::InstanceFailed);
            let err = FcError::unavailable(format!(
                "instance {} has failed and is going away",
                instance.id
            ));
            return Err(instance_failed(&err, request_id));
        }
        let started = Instant::now();
        let mut guard = InFlight::enter(self, instance.clone(), request_id, want_tail);
        if let Err(e) = self.freezer.before_call(&instance.id).await {
            tracing::warn!(instance_id = %instance.id, error = %e, "cannot thaw instance");
            self.metrics.invocation(InvokeOutcome::InstanceFailed);
            self.fail(&instance, "instance could not be thawed");
            let err =
                FcError::unavailable(format!("instance {} could not be resumed", instance.id));
            guard.end(Some(err.message.clone()));
            return Err(instance_failed(&err, request_id));
        }
        Ok(Started {
            instance,
            guard,
            started,
        })
    }

    /// Forward one invocation to `target` (the instance, or the id that
    /// was not found).
    pub(crate) async fn invoke(
        self: &Arc<Self>,
        target: Result<Arc<Instance>, String>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let request_id = req
            .headers()
            .get(&X_FC_REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(""));
        let want_tail = wants_tail(req.headers());
        let Started {
            instance,
            mut guard,
            started,
        } = match self.begin_call(target, &request_id, want_tail).await {
            Ok(call) => call,
            Err(refused) => return refused,
        };
        let upstream = &instance.upstream;
        let deadline = tokio::time::Instant::from_std(started + upstream.timeout);
        let mut outgoing = upstream.prepare(req);
        instance.credentials.apply(outgoing.headers_mut());
        let answer = tokio::time::timeout_at(deadline, upstream.conns.send(outgoing)).await;
        let (resp, conn) = match answer {
            Ok(Ok(sent)) => sent,
            Err(_elapsed) => {
                self.metrics.invocation(InvokeOutcome::Timeout);
                let message = format!("Function timed out after {} seconds", upstream.timeout_s);
                let tail = guard.end(Some(message.clone()));
                self.fail(&instance, "invocation timed out");
                let mut resp =
                    unanswered(InvokeOutcome::Timeout, StatusCode::OK, &request_id, message);
                put_tail(&mut resp, tail);
                return resp;
            }
            Ok(Err(e)) => {
                if matches!(&e, RuntimeError::Http(h) if h.is_user()) {
                    // The caller's body broke off; the runtime is fine.
                    tracing::debug!(instance_id = %instance.id, error = %e, "caller's request body failed");
                    let err =
                        FcError::invalid_argument("the request body could not be read to its end");
                    guard.end(Some(err.message.clone()));
                    // The instance is fine: the call ends as an answer (an
                    // FC error for the caller) and the instance stays.
                    let mut resp = error(&err, request_id.to_str().unwrap_or(""));
                    resp.headers_mut()
                        .insert(OUTCOME_HEADER, InvokeOutcome::Ok.to_header());
                    return resp;
                }
                self.metrics.invocation(InvokeOutcome::InstanceFailed);
                let message = if crate::usage::oom_killed(self, &instance.id).await {
                    crate::usage::memory_exceeded_message(
                        started.elapsed(),
                        instance.spec.memory_mb,
                    )
                } else {
                    format!(
                        "Process exited unexpectedly before completing request (duration: {}ms)",
                        started.elapsed().as_millis()
                    )
                };
                let tail = guard.end(Some(message.clone()));
                self.fail(&instance, "runtime connection failed");
                tracing::warn!(instance_id = %instance.id, error = %e, "runtime did not answer");
                let mut resp = unanswered(
                    InvokeOutcome::InstanceFailed,
                    StatusCode::OK,
                    &request_id,
                    message,
                );
                put_tail(&mut resp, tail);
                return resp;
            }
        };
        self.metrics
            .invoke_seconds
            .observe(started.elapsed().as_secs_f64());
        let (mut parts, body) = resp.into_parts();
        let outcome = classify(parts.status, &parts.headers);
        self.metrics.invocation(outcome);
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.insert(OUTCOME_HEADER, outcome.to_header());
        // Unique per call: never indexed by HPACK on the way back (see the
        // gateway's agent request).
        parts
            .headers
            .entry(X_FC_REQUEST_ID)
            .or_insert(request_id)
            .set_sensitive(true);
        parts.version = Version::default();
        if want_tail {
            // The tail goes in a header: read the whole answer first, but
            // never more of it than a sync call may answer with.
            let body = InlineBody::new(body, conn, HomeConns(instance.clone()));
            let limited = http_body_util::Limited::new(body, TAIL_RESPONSE_MAX);
            let read = tokio::time::timeout_at(deadline, limited.collect()).await;
            let (body, failed) = match read {
                Ok(Ok(collected)) => (collected.to_bytes(), None),
                // The function's fault, not the instance's: the connection
                // (half read) is dropped, the instance stays.
                Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                    let message = format!(
                        "Function response exceeds the maximum allowed size ({TAIL_RESPONSE_MAX} bytes)"
                    );
                    let tail = guard.end(Some(message.clone()));
                    let answer = serde_json::json!({
                        "errorMessage": message,
                        "errorType": "ResponseTooLarge",
                    });
                    let mut resp = Response::builder()
                        .status(StatusCode::INTERNAL_SERVER_ERROR)
                        .header(header::CONTENT_TYPE, "application/json")
                        .header(OUTCOME_HEADER, InvokeOutcome::FunctionError.to_header())
                        .header(X_FC_REQUEST_ID, parts.headers[&X_FC_REQUEST_ID].clone())
                        .body(full(answer.to_string()))
                        .expect("valid response");
                    put_tail(&mut resp, tail);
                    return resp;
                }
                Ok(Err(e)) => (
                    Bytes::new(),
                    Some((
                        InvokeOutcome::InstanceFailed,
                        "connection lost while streaming the response",
                        format!("Process exited unexpectedly while streaming the response: {e}"),
                    )),
                ),
                Err(_) => (
                    Bytes::new(),
                    Some((
                        InvokeOutcome::Timeout,
                        "timed out while streaming the response",
                        format!("Function timed out after {} seconds", upstream.timeout_s),
                    )),
                ),
            };
            let tail = guard.end(failed.as_ref().map(|(_, _, message)| message.clone()));
            if let Some((outcome, reason, message)) = failed {
                self.fail(&instance, reason);
                let mut resp = unanswered(
                    outcome,
                    StatusCode::OK,
                    &parts.headers[&X_FC_REQUEST_ID],
                    message,
                );
                put_tail(&mut resp, tail);
                return resp;
            }
            parts.headers.remove(header::CONTENT_LENGTH);
            let mut resp = Response::from_parts(parts, full(body));
            put_tail(&mut resp, tail);
            return resp;
        }
        // A body that is already over gives its connection back now.
        let body = InvokeBody {
            inner: InlineBody::new(body, conn, HomeConns(instance.clone())),
            deadline: tokio::time::sleep_until(deadline),
            guard,
        };
        Response::from_parts(parts, body.boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_errors_follow_the_custom_runtime_contract() {
        let mut h = HeaderMap::new();
        assert_eq!(classify(StatusCode::OK, &h), InvokeOutcome::Ok);
        assert_eq!(
            classify(StatusCode::NOT_FOUND, &h),
            InvokeOutcome::FunctionError
        );
        assert_eq!(
            classify(StatusCode::INTERNAL_SERVER_ERROR, &h),
            InvokeOutcome::FunctionError
        );
        h.insert(X_FC_STATUS, HeaderValue::from_static("404"));
        assert_eq!(classify(StatusCode::OK, &h), InvokeOutcome::FunctionError);
        h.insert(X_FC_STATUS, HeaderValue::from_static("200"));
        assert_eq!(classify(StatusCode::OK, &h), InvokeOutcome::Ok);
        h.insert(X_FC_STATUS, HeaderValue::from_static("garbage"));
        assert_eq!(classify(StatusCode::OK, &h), InvokeOutcome::FunctionError);
    }

    #[test]
    fn an_http_triggers_request_line_is_taken_from_the_gateways_headers() {
        let mut h = HeaderMap::new();
        h.insert(&HTTP_METHOD_HEADER, HeaderValue::from_static("PATCH"));
        h.insert(&HTTP_PATH_HEADER, HeaderValue::from_static("/a/b?c=1"));
        h.insert("x-user", HeaderValue::from_static("kept"));
        let (method, uri) = http_call(&mut h).unwrap();
        assert_eq!(method, Method::PATCH);
        assert_eq!(uri, "/a/b?c=1");
        assert_eq!(h.len(), 1, "the internal headers do not reach the runtime");
        // An API invocation, or a malformed pair: POST /invoke.
        assert_eq!(http_call(&mut h), None);
        h.insert(&HTTP_METHOD_HEADER, HeaderValue::from_static("GET"));
        h.insert(&HTTP_PATH_HEADER, HeaderValue::from_static("no-slash"));
        assert_eq!(http_call(&mut h), None);
        assert!(!h.contains_key(&HTTP_METHOD_HEADER));
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-user", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-user"], "kept");
    }
}

#[cfg(test)]
mod invoke_tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::instances::InstanceManager;
    use crate::testing::{manager, sample_spec, serve_http1, FakeCodeSource, FakeDriver};
    use http_body_util::channel::Channel;
    use http_body_util::{Empty, Full};
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use kiln_core::InstanceId;
    use kiln_internal_api::server::{empty, stream};
    use kiln_internal_api::CreateInstance;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    struct Setup {
        _dir: tempfile::TempDir,
        driver: Arc<FakeDriver>,
        manager: Arc<InstanceManager>,
        agent: SocketAddr,
        id: InstanceId,
        client: Client<HttpConnector, Body>,
    }

    /// The agent's API on plain HTTP (the TLS layer is the integration
    /// test's business) with one instance whose runtime is at `runtime`.
    async fn setup(runtime: SocketAddr) -> Setup {
        setup_with(runtime, |_| {}).await
    }

    /// As `setup`, with the instance's spec changed by `edit` first.
    async fn setup_with(
        runtime: SocketAddr,
        edit: impl FnOnce(&mut kiln_core::InstanceSpec),
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let driver = Arc::new(FakeDriver::at(runtime));
        let code = Arc::new(FakeCodeSource::new(Duration::ZERO));
        let digest = code.add(b"zip".to_vec());
        let manager = manager(dir.path(), driver.clone(), code);
        let id = InstanceId::generate();
        let mut spec = sample_spec(&digest, 9000);
        edit(&mut spec);
        let spec = spec.seal();
        manager
            .create(CreateInstance {
                instance_id: id.clone(),
                spec,
                always_allocate_cpu: false,
            })
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = listener.local_addr().unwrap();
        let m = manager.clone();
        serve_http1(listener, move |req| {
            crate::api::handle(
                m.clone(),
                req,
                crate::testing::conn_of(kiln_pki::Role::Gateway),
            )
        });
        let client = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        Setup {
            _dir: dir,
            driver,
            manager,
            agent,
            id,
            client,
        }
    }

    impl Setup {
        fn request(&self, body: Body) -> Request<Body> {
            Request::post(format!(
                "http://{}/v1/instances/{}/invoke",
                self.agent, self.id
            ))
            .header("x-fc-request-id", "req-1")
            .header("x-user-header", "passed")
            .header("x-fc-function-name", "spoofed")
            .header("keep-alive", "timeout=5")
            .body(body)
            .unwrap()
        }

        async fn invoke(&self, body: &'static str) -> (Response<()>, Bytes) {
            let resp = self.client.request(self.request(full(body))).await.unwrap();
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            (Response::from_parts(parts, ()), bytes)
        }

        async fn wait_destroyed(&self) {
            for _ in 0..200 {
                if self.driver.destroyed().contains(&self.id)
                    && self.manager.get(self.id.as_str()).is_none()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("instance {} was not destroyed", self.id);
        }
    }

    fn outcome<B>(resp: &Response<B>) -> InvokeOutcome {
        InvokeOutcome::of(resp.headers()).unwrap().unwrap()
    }

    /// Why the function did not answer: the agent's typed failure body.
    fn failure(body: &[u8]) -> String {
        serde_json::from_slice::<InvokeFailure>(body)
            .unwrap()
            .message
    }

    async fn runtime<F, Fut>(handler: F) -> (SocketAddr, crate::testing::HttpServer)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        (addr, serve_http1(l, handler))
    }

    #[tokio::test]
    async fn fc_headers_are_added_and_bodies_stream_both_ways() {
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let (addr, server) = runtime(move |req: Request<Incoming>| {
            let seen_tx = seen_tx.clone();
            async move {
                let _ = seen_tx.send((
                    req.method().clone(),
                    req.uri().clone(),
                    req.headers().clone(),
                ));
                // Echo the body as it arrives.
                Response::builder()
                    .header("x-echo", "1")
                    .header("connection", "keep-alive")
                    .body(stream(req.into_body()))
                    .unwrap()
            }
        })
        .await;
        let s = setup(addr).await;

        let (mut tx, body) = Channel::<Bytes, BoxError>::new(1);
        let resp = s.client.request(s.request(body.boxed())).await;
        let send_first = tx.send_data(Bytes::from_static(b"first ")).await;
        send_first.unwrap();
        let resp = resp.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(outcome(&resp), InvokeOutcome::Ok);
        assert_eq!(resp.headers()["x-echo"], "1");
        assert!(resp.headers().get("connection").is_none());
        let mut body = resp.into_body();
        // The first chunk comes back before the second is sent.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"first ");
        assert_eq!(s.manager.get(s.id.as_str()).unwrap().in_flight(), 1);
        tx.send_data(Bytes::from_static(b"second")).await.unwrap();
        drop(tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(&rest[..], b"second");

        let (method, uri, h) = seen_rx.recv().await.unwrap();
        assert_eq!(method, Method::POST);
        assert_eq!(uri.path(), "/invoke");
        for (name, value) in [
            ("x-fc-request-id", "req-1"),
            ("x-fc-function-name", "hello"),
            ("x-fc-function-handler", "index.handler"),
            ("x-fc-function-memory", "128"),
            ("x-fc-function-timeout", "1"),
            ("x-fc-account-id", "1234"),
            ("x-fc-region", "cn-test"),
            ("x-fc-qualifier", "LATEST"),
            ("x-fc-control-path", "/invoke"),
            ("content-type", "application/octet-stream"),
            ("x-user-header", "passed"),
        ] {
            assert_eq!(
                h.get(name).map(|v| v.to_str().unwrap()),
                Some(value),
                "{name}"
            );
        }
        assert!(h.get("keep-alive").is_none());
        assert_eq!(h.get_all("x-fc-function-name").iter().count(), 1);

        // Keep-alive: the next call reuses the pooled connection (the
        // first accepted connection was the port probe).
        let before = server.connections.load(Ordering::SeqCst);
        let (resp, body) = s.invoke("again").await;
        assert_eq!(outcome(&resp), InvokeOutcome::Ok);
        assert_eq!(&body[..], b"again");
        assert_eq!(server.connections.load(Ordering::SeqCst), before);
        let instance = s.manager.get(s.id.as_str()).unwrap();
        assert_eq!(instance.in_flight(), 0);
        assert_eq!(s.manager.metrics.invocations(InvokeOutcome::Ok), 2);
    }

    #[tokio::test]
    async fn runtime_connections_are_reused_and_replaced_when_closed() {
        let (addr, server) = runtime(|req: Request<Incoming>| async move {
            let mut resp = Response::builder();
            if req.headers().contains_key("x-close") {
                resp = resp.header("connection", "close");
            }
            resp.body(full("ok")).unwrap()
        })
        .await;
        let s = setup(addr).await;
        // Creating the instance probed the port; count from the first call.
        let (resp, _) = s.invoke("x").await;
        assert_eq!(outcome(&resp), InvokeOutcome::Ok);
        let first = server.connections.load(Ordering::SeqCst);
        for _ in 0..3 {
            let (resp, body) = s.invoke("x").await;
            assert_eq!((outcome(&resp), &body[..]), (InvokeOutcome::Ok, &b"ok"[..]));
        }
        assert_eq!(server.connections.load(Ordering::SeqCst), first);

        // The runtime closes the connection after this answer; the next
        // call dials a new one and the instance stays healthy.
        let mut req = s.request(full("x"));
        req.headers_mut()
            .insert("x-close", HeaderValue::from_static("1"));
        let resp = s.client.request(req).await.unwrap();
        assert_eq!(outcome(&resp), InvokeOutcome::Ok);
        resp.into_body().collect().await.unwrap();
        for _ in 0..2 {
            let (resp, body) = s.invoke("x").await;
            assert_eq!((outcome(&resp), &body[..]), (InvokeOutcome::Ok, &b"ok"[..]));
        }
        assert_eq!(server.connections.load(Ordering::SeqCst), first + 1);
        assert!(s.manager.get(s.id.as_str()).unwrap().state().can_invoke());
    }

    #[tokio::test]
    async fn function_errors_keep_the_body_and_the_instance() {
        let (addr, _server) = runtime(|req: Request<Incoming>| async move {
            let kind = req.headers()["x-user-header"].clone();
            let _ = req.into_body().collect().await;
            let b = Response::builder();
            match kind.to_str().unwrap() {
                "fc-status" => b.header("x-fc-status", "404").body(full("boom")),
                _ => b.status(500).body(full("crashed handler")),
            }
            .unwrap()
        })
        .await;
        let s = setup(addr).await;
        let mut req = s.request(full("x"));
        req.headers_mut()
            .insert("x-user-header", HeaderValue::from_static("fc-status"));
        let resp = s.client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(outcome(&resp), InvokeOutcome::FunctionError);
        assert_eq!(
            &resp.into_body().collect().await.unwrap().to_bytes()[..],
            b"boom"
        );

        let (resp, body) = s.invoke("x").await;
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(outcome(&resp), InvokeOutcome::FunctionError);
        assert_eq!(&body[..], b"crashed handler");
        assert!(s.manager.get(s.id.as_str()).unwrap().state().can_invoke());
        assert_eq!(
            s.manager.metrics.invocations(InvokeOutcome::FunctionError),
            2
        );
    }

    #[tokio::test]
    async fn a_huge_answer_with_tail_fails_the_call_not_the_agent() {
        let (addr, _server) = runtime(|req: Request<Incoming>| async move {
            let _ = req.into_body().collect().await;
            let huge = vec![b'x'; TAIL_RESPONSE_MAX + 1024 * 1024];
            Response::builder().body(full(huge)).unwrap()
        })
        .await;
        let s = setup(addr).await;
        let mut req = s.request(full("x"));
        req.headers_mut()
            .insert("x-fc-log-type", HeaderValue::from_static("Tail"));
        let resp = s.client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(outcome(&resp), InvokeOutcome::FunctionError);
        assert!(resp.headers().contains_key("x-fc-log-result"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errorType"], "ResponseTooLarge", "{v}");
        // The instance stays and answers the next call.
        assert!(s.manager.get(s.id.as_str()).unwrap().state().can_invoke());
        let (resp, body) = s.invoke("x").await;
        assert_eq!(outcome(&resp), InvokeOutcome::Ok);
        assert_eq!(body.len(), TAIL_RESPONSE_MAX + 1024 * 1024);
    }

    #[tokio::test]
    async fn a_runtime_slow_to_accept_is_waited_for_within_the_call_timeout() {
        // A runtime whose accept queue is full (as a burst of calls finds a
        // Python http.server, backlog 5): the kernel drops the agent's SYN
        // and resends it after 1 s and 3 s. The call must wait for that, up
        // to the function's timeout, not fail the instance.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = socket.listen(1).unwrap();
        let addr = l.local_addr().unwrap();
        // Accept the agent's readiness probes while the instance starts.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let probes = tokio::spawn(async move {
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return l,
                    _ = l.accept() => {}
                }
            }
        });
        let s = setup_with(addr, |spec| spec.timeout_s = 10).await;
        stop.send(()).unwrap();
        let l = probes.await.unwrap();
        // Backlog 1 holds two finished handshakes: fill it.
        let _held = [
            std::net::TcpStream::connect(addr).unwrap(),
            std::net::TcpStream::connect(addr).unwrap(),
        ];
        let accepting = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let (_a, _) = l.accept().await.unwrap();
            let (_b, _) = l.accept().await.unwrap();
            serve_http1(l, |_req| async { Response::new(full("late but fine")) })
        });
        let (resp, body) = s.invoke("x").await;
        assert_eq!(
            outcome(&resp),
            InvokeOutcome::Ok,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(&body[..], b"late but fine");
        assert!(s.manager.get(s.id.as_str()).unwrap().state().can_invoke());
        drop(accepting.await.unwrap());
    }

    #[tokio::test]
    async fn a_crash_fails_the_instance() {
        // A "runtime" that reads the request and dies without answering.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tcp.read(&mut buf).await;
                });
            }
        });
        let s = setup(addr).await;
        let (resp, body) = s.invoke("x").await;
        assert_eq!(outcome(&resp), InvokeOutcome::InstanceFailed);
        assert_eq!(resp.headers()["x-fc-request-id"], "req-1");
        let message = failure(&body);
        assert!(
            message.starts_with("Process exited unexpectedly"),
            "{message}"
        );
        s.wait_destroyed().await;

        // The instance is gone: still marked instance-failed, with why.
        let (resp, body) = s.invoke("x").await;
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(outcome(&resp), InvokeOutcome::InstanceFailed);
        assert_eq!(resp.headers()["x-fc-request-id"], "req-1");
        let message = failure(&body);
        assert!(message.contains("does not exist on this node"), "{message}");
    }

    #[tokio::test]
    async fn a_refused_connection_fails_the_instance() {
        let (addr, server) = runtime(|_req| async { Response::new(empty()) }).await;
        let s = setup(addr).await;
        // The process dies: its port closes.
        server.task.abort();
        let _ = server.task.await;
        s.driver.kill(&s.id);
        let (resp, _) = s.invoke("x").await;
        assert_eq!(outcome(&resp), InvokeOutcome::InstanceFailed);
        s.wait_destroyed().await;
        assert_eq!(
            s.manager.metrics.invocations(InvokeOutcome::InstanceFailed),
            1
        );
    }

    #[tokio::test]
    async fn the_timeout_is_enforced() {
        let (addr, _server) = runtime(|_req| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Response::new(empty())
        })
        .await;
        let s = setup(addr).await;
        let started = Instant::now();
        let (resp, body) = s.invoke("x").await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(1) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert_eq!(outcome(&resp), InvokeOutcome::Timeout);
        assert_eq!(failure(&body), "Function timed out after 1 seconds");
        s.wait_destroyed().await;
        assert_eq!(s.manager.metrics.invocations(InvokeOutcome::Timeout), 1);
    }

    #[tokio::test]
    async fn a_response_still_streaming_at_the_deadline_is_cut_off() {
        let (addr, _server) = runtime(|_req| async {
            let (mut tx, body) = Channel::<Bytes, BoxError>::new(1);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"partial")).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
                drop(tx);
            });
            Response::new(body.boxed())
        })
        .await;
        let s = setup(addr).await;
        let resp = s.client.request(s.request(full("x"))).await.unwrap();
        assert_eq!(outcome(&resp), InvokeOutcome::Ok);
        let started = Instant::now();
        assert!(resp.into_body().collect().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        s.wait_destroyed().await;
    }

    #[tokio::test]
    async fn unknown_instances_and_wrong_methods_get_fc_errors() {
        let (addr, _server) = runtime(|_req| async { Response::new(empty()) }).await;
        let s = setup(addr).await;
        let other = InstanceId::generate();
        let req = Request::post(format!("http://{}/v1/instances/{other}/invoke", s.agent))
            .body(Empty::<Bytes>::new().map_err(|e| match e {}).boxed())
            .unwrap();
        let resp = s.client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(outcome(&resp), InvokeOutcome::InstanceFailed);

        let req = Request::get(format!("http://{}/v1/instances/{}/invoke", s.agent, s.id))
            .body(empty())
            .unwrap();
        let resp = s.client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Code"], "MethodNotAllowed");

        let req = Request::post(format!("http://{}/v1/instances", s.agent))
            .body(
                Full::new(Bytes::from_static(b"{not json"))
                    .map_err(|e| match e {})
                    .boxed(),
            )
            .unwrap();
        let resp = s.client.request(req).await.unwrap();
        // This server's peer is the gateway, which invokes but never
        // creates: refused before the body is read.
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["Code"], "AccessDenied");
        assert_eq!(v["Message"], "role gateway may not call POST /v1/instances");
        assert_eq!(s.manager.ids(), vec![s.id.clone()]);
    }

    // Idle freezing (H5): the fake driver answers 500 when a call reaches a
    // frozen sandbox, so a call that was not thawed first fails.
    async fn freezing_setup() -> (Setup, crate::testing::HttpServer) {
        let cell: Arc<std::sync::OnceLock<(Arc<FakeDriver>, InstanceId)>> = Arc::default();
        let seen = cell.clone();
        let (addr, server) = runtime(move |_req| {
            let seen = seen.clone();
            async move {
                let frozen = seen.get().is_some_and(|(d, id)| d.is_frozen(id));
                let status = if frozen { 500 } else { 200 };
                Response::builder().status(status).body(full("ok")).unwrap()
            }
        })
        .await;
        let s = setup(addr).await;
        let _ = cell.set((s.driver.clone(), s.id.clone()));
        s.manager.freezer.set_delay(Some(Duration::from_millis(20)));
        (s, server)
    }

    async fn wait_frozen(s: &Setup, frozen: bool) {
        for _ in 0..300 {
            if s.driver.is_frozen(&s.id) == frozen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("instance never became frozen={frozen}");
    }

    #[tokio::test]
    async fn idle_instances_are_frozen_and_thawed_before_their_next_call() {
        let (s, _server) = freezing_setup().await;
        let (resp, body) = s.invoke("one").await;
        assert_eq!(resp.status(), StatusCode::OK, "{body:?}");
        wait_frozen(&s, true).await;
        assert!(s.manager.freezer.is_frozen(&s.id));
        for _ in 0..3 {
            let (resp, _) = s.invoke("again").await;
            assert_eq!(resp.status(), StatusCode::OK);
            wait_frozen(&s, true).await;
        }
        let (freezes, thaws) = s.driver.freeze_counts();
        assert_eq!((freezes, thaws), (4, 3));
        let usage = &s.manager.metrics.usage;
        assert_eq!(usage.thaws.get(), 3);
        assert_eq!(usage.freezes.get(), 4);
        let text = s.manager.metrics.render();
        assert!(text.contains("kiln_agent_thaw_seconds_count 3"), "{text}");
        let series = format!(
            "kiln_agent_instance_thaws_total{{instance_id=\"{}\"}} 3",
            s.id
        );
        assert!(text.contains(&series), "{text}");
        let frozen = format!("kiln_agent_instance_frozen{{instance_id=\"{}\"}} 1", s.id);
        assert!(text.contains(&frozen), "{text}");

        // Destroying a frozen instance thaws it first (PreStop must run,
        // SIGKILL must land), and it is never frozen again.
        s.manager.destroy(&s.id).await.unwrap();
        assert!(!s.driver.is_frozen(&s.id));
        assert_eq!(s.driver.freeze_counts().1, 4);
    }

    #[tokio::test]
    async fn a_busy_instance_is_not_frozen_and_freezing_can_be_off() {
        let (s, _server) = freezing_setup().await;
        s.manager.freezer.set_delay(None);
        s.invoke("one").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.driver.freeze_counts(), (0, 0));

        // A call in flight holds the instance awake past the delay.
        s.manager.freezer.set_delay(Some(Duration::from_millis(20)));
        let instance = s.manager.get(s.id.as_str()).unwrap();
        instance.enter(0);
        s.manager.freezer.after_call(&instance);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(s.driver.freeze_counts(), (0, 0));
        instance.leave(0);
        s.manager.freezer.after_call(&instance);
        wait_frozen(&s, true).await;
    }

    #[tokio::test]
    async fn an_instance_held_awake_is_not_frozen_until_released() {
        let (s, _server) = freezing_setup().await;
        s.invoke("one").await;
        wait_frozen(&s, true).await;
        let instance = s.manager.get(s.id.as_str()).unwrap();
        let guard = s.manager.hold_awake(&instance).await.unwrap();
        assert!(!s.driver.is_frozen(&s.id));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!s.driver.is_frozen(&s.id));
        drop(guard);
        wait_frozen(&s, true).await;
    }

    #[tokio::test]
    async fn a_call_killed_for_its_memory_gets_fcs_error_and_the_instance_is_replaced() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tcp.read(&mut buf).await;
                });
            }
        });
        let s = setup(addr).await;
        s.driver.set_stats(
            &s.id,
            kiln_sandbox::driver::SandboxStats {
                oom_kills: 1,
                ..Default::default()
            },
        );
        let (resp, body) = s.invoke("x").await;
        assert_eq!(outcome(&resp), InvokeOutcome::InstanceFailed);
        let msg = failure(&body);
        assert!(msg.starts_with("Process exited unexpectedly"), "{msg}");
        assert!(msg.contains("maxMemoryUsage"), "{msg}");
        assert!(msg.contains("memory limit"), "{msg}");
        s.wait_destroyed().await;
    }

    #[tokio::test]
    async fn usage_samples_become_per_instance_series_and_vanish_with_the_instance() {
        let (s, _server) = freezing_setup().await;
        s.driver.set_stats(
            &s.id,
            kiln_sandbox::driver::SandboxStats {
                cpu_usage_us: 2_500_000,
                memory_bytes: 64 << 20,
                memory_limit_bytes: Some(512 << 20),
                pids: 7,
                net_rx_bytes: Some(1234),
                net_tx_bytes: Some(99),
                ..Default::default()
            },
        );
        crate::usage::sample(&s.manager).await;
        let text = s.manager.metrics.render();
        let id = s.id.to_string();
        for want in [
            format!("kiln_agent_instance_cpu_seconds{{instance_id=\"{id}\"}} 2.5"),
            format!("kiln_agent_instance_memory_bytes{{instance_id=\"{id}\"}} 67108864"),
            format!("kiln_agent_instance_memory_limit_bytes{{instance_id=\"{id}\"}} 536870912"),
            format!("kiln_agent_instance_pids{{instance_id=\"{id}\"}} 7"),
            format!("kiln_agent_instance_network_receive_bytes{{instance_id=\"{id}\"}} 1234"),
            format!("kiln_agent_instance_network_transmit_bytes{{instance_id=\"{id}\"}} 99"),
        ] {
            assert!(text.contains(&want), "missing {want} in {text}");
        }
        assert!(text.contains("kiln_agent_instance_info{"), "{text}");
        s.manager.destroy(&s.id).await.unwrap();
        crate::usage::sample(&s.manager).await;
        let text = s.manager.metrics.render();
        assert!(!text.contains(&id), "{text}");
    }
}
