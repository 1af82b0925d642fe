//! InvokeFunction (sync): a lease from the scheduler, the payload to the
//! agent, the answer streamed back with FC's headers, the lease released
//! once the answer has been streamed (or the caller went away).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kiln_core::{FcError, FunctionName, RequestId};
use kiln_internal_api::client::remote_error;
use kiln_internal_api::server::{full, Body, BoxError};
use kiln_internal_api::{headers as ih, paths, Lease, LeaseOutcome};

use super::leases::LeasePool;
use super::{ApiError, Gateway, REQUEST_ID};
use crate::auth::Caller;
use crate::metrics::Metrics;

/// FC's header naming a function error on a 2xx answer.
pub const ERROR_TYPE: &str = "x-fc-error-type";
/// FC's value for an error the function did not handle (non-2xx answer,
/// crash, timeout).
pub const UNHANDLED: &str = "UnhandledInvocationError";

/// Caller headers never passed to the function: signing, FC's own and
/// connection-level ones.
fn forwardable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(n.starts_with("x-fc-")
        || n.starts_with("x-acs-")
        || n.starts_with("x-kiln-")
        || matches!(
            n,
            "authorization"
                | "host"
                | "content-length"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
        ))
}

/// Runtime answer headers never passed to the caller.
fn returnable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(n.starts_with("x-fc-")
        || n.starts_with("x-kiln-")
        || matches!(
            n,
            "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade"
        ))
}

pub async fn invoke(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: http::request::Parts,
    payload: Bytes,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    if let Some(t) = parts.headers.get("x-fc-invocation-type") {
        if !t.as_bytes().eq_ignore_ascii_case(b"sync") {
            return Err(FcError::invalid_argument(format!(
                "x-fc-invocation-type {:?} is not available on this endpoint yet; invoke with Sync",
                String::from_utf8_lossy(t.as_bytes())
            ))
            .into());
        }
    }
    super::functions::check_qualifier(&parts)?;
    if let Some(t) = parts.headers.get(ih::LOG_TYPE) {
        if !(t.as_bytes().eq_ignore_ascii_case(b"none")
            || t.as_bytes().eq_ignore_ascii_case(b"tail"))
        {
            return Err(FcError::invalid_argument(format!(
                "x-fc-log-type must be None or Tail, not {:?}",
                String::from_utf8_lossy(t.as_bytes())
            ))
            .into());
        }
    }
    let entry = super::caller_function(gw, caller, name)?;
    gw.runtimes
        .check_invoke(entry.record.config.runtime, gw.clock.now_ms())?;
    // The payload arrives whole (see api::handle): its hash is part of the
    // signature, and an oversized one is refused before any instance is
    // touched.

    let started = Instant::now();
    let mut guard = LeaseGuard {
        pool: gw.leases.clone(),
        revision: entry.spec.revision.clone(),
        metrics: gw.metrics.clone(),
        lease: None,
        outcome: LeaseOutcome::Ok,
        started,
    };
    gw.metrics.invocations_in_flight.inc();

    // A lease parked by an earlier call may point at an instance the
    // scheduler has since given up; if the agent refuses it outright (the
    // function never saw the payload), one fresh lease is tried.
    let mut reused = gw.leases.take(&entry.spec.revision);
    let resp = loop {
        let from_pool = reused.is_some();
        let lease = match reused.take() {
            Some(l) => l,
            None => match acquire(gw, entry.acquire_body(request_id.as_str())).await {
                Ok(l) => l,
                Err(ApiError::Fc(e)) if initialization_failure(&e).is_some() => {
                    // The agent discarded the instance; no lease was taken.
                    let detail = initialization_failure(&e).unwrap_or_default();
                    return Ok(initialization_error(detail));
                }
                Err(e) => return Err(e),
            },
        };
        tracing::debug!(lease = %lease.lease_id, instance = %lease.instance_id, cold = lease.cold_start, from_pool, "lease held");
        let req = agent_request(&lease, &parts.headers, payload.clone(), request_id)?;
        guard.lease = Some(lease);
        // A call abandoned before the agent answers (the client went away,
        // or the async dispatcher aborted a stopped task) may leave the
        // function running: report the instance failed so the scheduler
        // replaces it rather than hand its slot to another call.
        guard.outcome = LeaseOutcome::InstanceFailed;
        // The agent enforces the function's timeout; this bounds a wedged agent.
        let deadline = Duration::from_secs(u64::from(entry.spec.timeout_s)) + AGENT_GRACE;
        let resp = match tokio::time::timeout(deadline, gw.invoke_client.send(req)).await {
            Ok(Ok(r)) => {
                guard.outcome = LeaseOutcome::Ok;
                r
            }
            Ok(Err(e)) => {
                guard.outcome = LeaseOutcome::InstanceFailed;
                return Err(e.into());
            }
            Err(_) => {
                guard.outcome = LeaseOutcome::InstanceFailed;
                tracing::warn!(
                    deadline_s = deadline.as_secs(),
                    "agent did not answer in time"
                );
                return Ok(unhandled(format!(
                    "Function timed out after {} seconds",
                    entry.spec.timeout_s
                )));
            }
        };
        if from_pool && !resp.headers().contains_key(ih::INVOKE_OUTCOME) {
            tracing::debug!(status = %resp.status(), "agent refused a parked lease; acquiring a fresh one");
            guard.outcome = LeaseOutcome::InstanceFailed;
            if let Some(stale) = guard.lease.take() {
                gw.leases
                    .give_back(&entry.spec.revision, stale, LeaseOutcome::InstanceFailed);
            }
            continue;
        }
        break resp;
    };
    let outcome = resp
        .headers()
        .get(ih::INVOKE_OUTCOME)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (head, body) = resp.into_parts();
    let answer_deadline = Duration::from_secs(u64::from(entry.spec.timeout_s)) + AGENT_GRACE;
    match outcome.as_deref() {
        Some("ok") => {
            answer(
                head.status,
                &head.headers,
                None,
                guard,
                body,
                answer_deadline,
            )
            .await
        }
        Some("function-error") => {
            answer(
                StatusCode::OK,
                &head.headers,
                Some(UNHANDLED),
                guard,
                body,
                answer_deadline,
            )
            .await
        }
        Some(kind @ ("instance-failed" | "timeout")) => {
            guard.outcome = LeaseOutcome::InstanceFailed;
            let bytes = read_small(body).await;
            let detail = agent_error_message(head.status, &bytes);
            let message = if kind == "timeout" {
                format!("Function timed out after {} seconds", entry.spec.timeout_s)
            } else if detail.is_empty() || detail.starts_with("internal call failed") {
                "Process exited unexpectedly before completing request".to_owned()
            } else {
                detail
            };
            drop(guard);
            let mut resp = unhandled(message);
            if let Some(tail) = head.headers.get(ih::LOG_RESULT) {
                resp.headers_mut().insert(ih::LOG_RESULT, tail.clone());
            }
            Ok(resp)
        }
        _ => {
            // The agent refused the call itself (instance unknown, ...).
            guard.outcome = LeaseOutcome::InstanceFailed;
            let bytes = read_small(body).await;
            Err(remote_error(head.status, &bytes).into())
        }
    }
}

tokio::task_local! {
    /// Set around calls that may be abandoned on purpose (StopAsyncTask).
    pub static RECLAIM_IF_ABANDONED: ();
}

/// How much longer than the function's timeout the gateway waits for the
/// agent's answer.
const AGENT_GRACE: Duration = Duration::from_secs(10);

/// FC's value for a failed or timed-out initializer: the call fails as a
/// function error, never reaching the handler.
pub const UNHANDLED_INITIALIZATION: &str = "UnhandledInitializationError";

/// The initializer's failure, when `e` is an agent's create error for one
/// (see [`kiln_internal_api::INITIALIZATION_ERROR_PREFIX`]).
pub fn initialization_failure(e: &FcError) -> Option<&str> {
    if e.code != kiln_core::FcErrorCode::FunctionNotStarted {
        return None;
    }
    e.message
        .strip_prefix(kiln_internal_api::INITIALIZATION_ERROR_PREFIX)
}

/// FC's answer when the function's initializer failed or timed out: a
/// function error (HTTP 200, `x-fc-error-type`) whose body names it.
fn initialization_error(detail: &str) -> Response<Body> {
    let body = serde_json::json!({
        "errorMessage": format!("InitializationError: {detail}"),
        "errorType": "InitializationError",
    })
    .to_string();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(ERROR_TYPE, UNHANDLED_INITIALIZATION)
        .body(full(body))
        .expect("valid response")
}

/// FC's answer for a function that failed without answering itself.
fn unhandled(message: String) -> Response<Body> {
    let body = serde_json::json!({ "errorMessage": message }).to_string();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(ERROR_TYPE, UNHANDLED)
        .body(full(body))
        .expect("valid response")
}

/// The agent's invoke request: the payload, the request id and the
/// caller's own headers.
fn agent_request(
    lease: &Lease,
    caller_headers: &HeaderMap,
    payload: Bytes,
    request_id: &RequestId,
) -> Result<Request<Body>, FcError> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "{}{}",
            lease.agent_url.trim_end_matches('/'),
            paths::agent_invoke(&lease.instance_id)
        ))
        .body(full(payload))
        .map_err(|e| FcError::internal(format!("cannot build the agent request: {e}")))?;
    let h = req.headers_mut();
    for (k, v) in caller_headers.iter() {
        if forwardable(k) {
            h.append(k.clone(), v.clone());
        }
    }
    // FC's Tail is computed by the agent, which frames the call's log;
    // `None` (the default) needs nothing from it.
    if let Some(t) = caller_headers.get(ih::LOG_TYPE) {
        if t.as_bytes().eq_ignore_ascii_case(b"tail") {
            h.insert(ih::LOG_TYPE, t.clone());
        }
    }
    if let Ok(mut v) = HeaderValue::from_str(request_id.as_str()) {
        // Unique per call: HPACK must not index it, or it churns the
        // internal connection's dynamic table out of its stable entries.
        v.set_sensitive(true);
        h.insert(REQUEST_ID, v);
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    Ok(req)
}

/// What the agent said of a failed call: the function error it built
/// (`{"errorMessage"}`, FC's shape for an unhandled error), or the message
/// of its FC error when it refused the call.
fn agent_error_message(status: StatusCode, bytes: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Unhandled {
        #[serde(rename = "errorMessage")]
        error_message: String,
    }
    match serde_json::from_slice::<Unhandled>(bytes) {
        Ok(u) => u.error_message,
        Err(_) => remote_error(status, bytes).message,
    }
}

async fn read_small(body: Incoming) -> Bytes {
    http_body_util::Limited::new(body, 64 * 1024)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

async fn acquire(gw: &Gateway, body: Bytes) -> Result<Lease, ApiError> {
    let url = format!(
        "{}{}",
        gw.scheduler_url.trim_end_matches('/'),
        paths::LEASES
    );
    let req = Request::builder()
        .method(Method::POST)
        .uri(&url)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .map_err(|e| FcError::internal(format!("cannot build the lease request: {e}")))?;
    let resp = gw.internal.send(req).await?;
    let status = resp.status();
    let bytes = http_body_util::Limited::new(resp.into_body(), 1024 * 1024)
        .collect()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "scheduler answer unreadable");
            FcError::unavailable("the scheduler is unreachable; retry the request")
        })?
        .to_bytes();
    if !status.is_success() {
        return Err(remote_error(status, &bytes).into());
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        tracing::error!(error = %e, "scheduler answered an unreadable lease");
        FcError::internal("the scheduler answered badly").into()
    })
}

/// Answers up to this size are read whole from the agent before the
/// caller sees anything, so a node that dies mid-answer turns into a
/// retryable error instead of a broken stream; larger ones are streamed.
const BUFFERED_ANSWER_MAX: u64 = 64 * 1024;

async fn answer(
    status: StatusCode,
    upstream: &HeaderMap,
    error_type: Option<&'static str>,
    guard: LeaseGuard,
    body: Incoming,
    deadline: Duration,
) -> Result<Response<Body>, ApiError> {
    let mut builder = Response::builder().status(status);
    if let Some(h) = builder.headers_mut() {
        for (k, v) in upstream {
            if returnable(k) {
                h.append(k.clone(), v.clone());
            }
        }
        if let Some(t) = error_type {
            h.insert(ERROR_TYPE, HeaderValue::from_static(t));
        }
        if let Some(tail) = upstream.get(ih::LOG_RESULT) {
            h.insert(ih::LOG_RESULT, tail.clone());
        }
    }
    let mut guard = guard;
    let small = upstream
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= BUFFERED_ANSWER_MAX);
    if small {
        return match tokio::time::timeout(deadline, body.collect()).await {
            Ok(Ok(collected)) => {
                guard.outcome = LeaseOutcome::Ok;
                drop(guard);
                Ok(builder
                    .body(full(collected.to_bytes()))
                    .expect("valid response"))
            }
            _ => {
                guard.outcome = LeaseOutcome::InstanceFailed;
                Err(FcError::unavailable(
                    "the instance's node failed while answering; retry the request",
                )
                .into())
            }
        };
    }
    // Until the whole answer has been read, a drop means the client went
    // away mid-answer: the instance may still be writing it.
    let done = std::mem::replace(&mut guard.outcome, LeaseOutcome::InstanceFailed);
    let body = GuardedBody {
        inner: body,
        guard: Some(guard),
        done,
    };
    Ok(builder.body(body.boxed()).expect("valid response"))
}

/// Gives the lease back when dropped: after the answer has been streamed,
/// when the caller goes away, or when the call fails on the way.
pub struct LeaseGuard {
    pool: Arc<LeasePool>,
    revision: String,
    metrics: Arc<Metrics>,
    lease: Option<Lease>,
    outcome: LeaseOutcome,
    started: Instant,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.metrics.invocations_in_flight.dec();
        self.metrics
            .invoke_seconds
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(lease) = self.lease.take() {
            self.pool.give_back(&self.revision, lease, self.outcome);
        }
    }
}

/// The agent's answer body, holding the lease until it ends.
struct GuardedBody {
    inner: Incoming,
    guard: Option<LeaseGuard>,
    /// The lease's outcome once the answer is complete.
    done: LeaseOutcome,
}

impl GuardedBody {
    fn finish(&mut self) {
        if let Some(mut g) = self.guard.take() {
            g.outcome = self.done;
        }
    }
}

impl Drop for GuardedBody {
    /// The server may drop a body it saw end without polling it again.
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                if let Some(g) = this.guard.as_mut() {
                    g.outcome = LeaseOutcome::InstanceFailed;
                }
                this.guard.take();
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            other => other.map(|o| o.map(|r| r.map_err(|e| Box::new(e) as BoxError))),
        }
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
    use super::*;

    #[test]
    fn header_filters() {
        for h in [
            "x-fc-invocation-type",
            "authorization",
            "x-acs-date",
            "host",
            "connection",
        ] {
            assert!(!forwardable(&HeaderName::from_static(h)), "{h}");
        }
        for h in ["content-type", "x-custom", "accept"] {
            assert!(forwardable(&HeaderName::from_static(h)), "{h}");
        }
        assert!(!returnable(&HeaderName::from_static("x-fc-status")));
        assert!(!returnable(&HeaderName::from_static(
            "x-kiln-invoke-outcome"
        )));
        assert!(returnable(&HeaderName::from_static("content-type")));
    }

    #[test]
    fn agent_request_forwards_caller_headers_and_an_unindexed_request_id() {
        let lease = Lease {
            lease_id: kiln_core::LeaseId::generate(),
            instance_id: kiln_core::InstanceId::generate(),
            node_id: kiln_core::NodeId::generate(),
            agent_url: "https://127.0.0.1:9443/".into(),
            cold_start: false,
        };
        let mut caller = HeaderMap::new();
        caller.insert("x-custom", HeaderValue::from_static("1"));
        caller.insert("authorization", HeaderValue::from_static("secret"));
        let rid = RequestId::generate();
        let req = agent_request(&lease, &caller, Bytes::from_static(b"x"), &rid).unwrap();
        assert_eq!(
            req.uri().to_string(),
            format!(
                "https://127.0.0.1:9443/v1/instances/{}/invoke",
                lease.instance_id
            )
        );
        let h = req.headers();
        assert_eq!(h["x-custom"], "1");
        assert!(!h.contains_key("authorization"));
        assert_eq!(h[REQUEST_ID], rid.as_str());
        assert!(h[REQUEST_ID].is_sensitive());
        assert_eq!(h[header::CONTENT_TYPE], "application/octet-stream");
    }
}
