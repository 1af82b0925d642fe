//! The one invoke path: a lease from the scheduler, the payload to the
//! agent, the agent's [`InvokeOutcome`] turned into an [`InvokeResult`].
//!
//! Sync calls (`api::invoke`), async deliveries (the queue's dispatcher),
//! HTTP triggers (`crate::http_trigger`, with an [`HttpCall`]) and, later,
//! timers all call [`invoke`] and act on the result's type; [`render`] (and
//! [`render_http`] for HTTP triggers) is the one place a result becomes
//! FC's HTTP answer.
//!
//! ```text
//!   InvokeRequest ──> function? runtime callable? ──no──> Platform(FcError)
//!        │
//!        ├─ parked lease of the revision, else acquire ──init failed──> InitializationFailed
//!        │                                            └─other error──> Platform
//!        ├─ POST to the agent ──no answer in time──> TimedOut
//!        │      └─ no outcome on a parked lease: drop it, acquire once more
//!        └─ outcome: ok ──> Success   function-error ──> FunctionError
//!                     instance-failed ──> Crashed   timeout ──> TimedOut
//! ```
//!
//! The lease is given back when the answer's body ends (or is dropped), as
//! `instance-failed` unless the function answered in full.

mod lease;
pub mod pool;
pub mod render;
pub mod websocket;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use kiln_core::{AccountId, FcError, FcErrorKind, FunctionName, RequestId};
use kiln_internal_api::client::remote_error;
use kiln_internal_api::invoke_client::{self, AnswerBody, Payload, StreamState};
use kiln_internal_api::server::{full, Body};
use kiln_internal_api::{headers as ih, InvokeFailure, InvokeOutcome, Lease, LeaseOutcome};

use crate::gateway::Gateway;
use crate::versions::Qualifier;
use lease::{GuardedBody, LeaseGuard};
use pool::Held;

pub use render::{render, render_http};

/// FC's `x-fc-log-type`: whether the caller wants the call's log tail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogType {
    #[default]
    None,
    Tail,
}

/// One call of a function, from whichever source.
#[derive(Debug, Clone)]
pub struct InvokeRequest {
    /// Whose function; the caller was authorised for it.
    pub account_id: AccountId,
    pub function: FunctionName,
    /// FC's `qualifier`: LATEST, a version or an alias (resolved per call).
    pub qualifier: Qualifier,
    pub payload: Bytes,
    /// The caller's headers; those a function may see are passed on.
    pub headers: HeaderMap,
    pub log: LogType,
    pub request_id: RequestId,
    /// An HTTP trigger's call: the runtime gets this method and path
    /// instead of `POST /invoke`. `None` for API and async invocations.
    pub http: Option<HttpCall>,
    /// A large request body streamed to the function as it arrives,
    /// instead of `payload` (an anonymous HTTP trigger's). It can be sent
    /// once: a call that streams is not retried on another instance.
    pub stream: Option<StreamedBody>,
}

/// A request body to stream once (see [`InvokeRequest::stream`]).
#[derive(Clone)]
pub struct StreamedBody {
    body: Arc<std::sync::Mutex<Option<Payload>>>,
    state: Arc<StreamState>,
}

impl StreamedBody {
    /// The caller's `body`, at most `limit` bytes.
    pub fn new(body: hyper::body::Incoming, limit: usize) -> Self {
        let (body, state) = invoke_client::streamed(body, limit);
        Self {
            body: Arc::new(std::sync::Mutex::new(Some(body))),
            state,
        }
    }

    /// The body, the first time.
    pub fn take(&self) -> Option<Payload> {
        self.body.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The caller's fault when the call failed while sending: its body
    /// broke off or went past the limit.
    fn caller_error(&self) -> Option<FcError> {
        if self.state.too_large() {
            Some(FcError::new(
                kiln_core::FcErrorCode::EntityTooLarge,
                format!(
                    "payload size exceeds maximum allowed size ({} bytes)",
                    kiln_core::limits::SYNC_PAYLOAD_MAX
                ),
            ))
        } else if self.state.failed() {
            Some(FcError::invalid_argument(
                "the request body could not be read to its end",
            ))
        } else {
            None
        }
    }
}

impl std::fmt::Debug for StreamedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamedBody")
    }
}

/// The request line of an HTTP trigger's call, as the function sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub method: http::Method,
    /// The path under the trigger's URL, with its query.
    pub path_and_query: String,
    /// Whether the caller's `Authorization` header reaches the function
    /// (an anonymous trigger's: the function's own authentication).
    pub pass_authorization: bool,
}

/// The function's own answer: its status, headers and body (streamed when
/// large; the lease is held until the body ends).
pub struct FunctionAnswer {
    pub status: StatusCode,
    /// The runtime's headers, unfiltered ([`render`] keeps what a caller
    /// may see).
    pub headers: HeaderMap,
    pub log_tail: Option<HeaderValue>,
    pub body: Body,
}

impl std::fmt::Debug for FunctionAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionAnswer")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("log_tail", &self.log_tail)
            .finish_non_exhaustive()
    }
}

/// How a call ended.
#[derive(Debug)]
pub enum InvokeResult {
    /// The function answered with success.
    Success(FunctionAnswer),
    /// The function answered with its own error (FC's unhandled error with
    /// the function's body).
    FunctionError(FunctionAnswer),
    /// The function did not answer: its instance crashed or could not be
    /// reached.
    Crashed {
        message: String,
        log_tail: Option<HeaderValue>,
    },
    /// The call ran past the function's timeout.
    TimedOut {
        timeout_s: u32,
        log_tail: Option<HeaderValue>,
    },
    /// The function's initializer failed or timed out; the handler never
    /// ran and the instance was discarded.
    InitializationFailed { message: String },
    /// Kiln could not run the call (no such function, throttled, the
    /// scheduler or the agent failed): an FC error for the caller.
    Platform(FcError),
}

tokio::task_local! {
    /// Set around calls that may be abandoned on purpose (StopAsyncTask).
    pub static RECLAIM_IF_ABANDONED: ();
}

/// How much longer than the function's timeout the gateway waits for the
/// agent's answer.
pub const AGENT_GRACE: Duration = Duration::from_secs(10);

/// Answers up to this size are read whole from the agent before the
/// caller sees anything, so a node that dies mid-answer turns into a
/// retryable error instead of a broken stream; larger ones are streamed.
const BUFFERED_ANSWER_MAX: u64 = 64 * 1024;

/// Run one call to its end (or to the start of its streamed answer).
pub async fn invoke(gw: &Arc<Gateway>, req: InvokeRequest) -> InvokeResult {
    match run(gw, req).await {
        Ok(result) => result,
        Err(e) => InvokeResult::Platform(e),
    }
}

/// What every call (an invocation or a WebSocket) sets up before its
/// first lease.
struct Prepared {
    entry: Arc<crate::catalog::FunctionEntry>,
    /// The function's timeout and the agent's grace.
    deadline: Duration,
    guard: LeaseGuard,
    /// A lease an earlier call of the revision parked, if one fits.
    reused: Option<Held>,
}

/// Resolve the call's qualifier (refused while the function's
/// invocations are disabled), check its runtime takes calls, and set up
/// its deadline, lease guard and any parked lease.
fn prepare(gw: &Arc<Gateway>, req: &InvokeRequest) -> Result<Prepared, FcError> {
    // An alias picks its version per call (its weights are fractions of
    // calls); a version's entry has its own revision, so its instances and
    // parked leases are its own.
    let entry = gw.catalog.resolve_invocable(
        &req.account_id,
        &req.function,
        &req.qualifier,
        rand::random::<f64>(),
    )?;
    gw.runtimes
        .check_invoke(entry.record.config.runtime, gw.clock.now_ms())?;
    // The agent enforces the function's timeout; this bounds a wedged agent.
    let deadline = Duration::from_secs(u64::from(entry.spec.timeout_s)) + AGENT_GRACE;
    let guard = LeaseGuard::new(
        gw.leases.clone(),
        entry.clone(),
        deadline,
        gw.metrics.clone(),
        Instant::now(),
    );
    // A lease parked by an earlier call may point at an instance the
    // scheduler has since given up; if the agent refuses it outright (the
    // function never saw the payload), one fresh lease is tried.
    let reused = gw.leases.take(&entry.spec.revision, deadline);
    Ok(Prepared {
        entry,
        deadline,
        guard,
        reused,
    })
}

/// The lease a call's next attempt runs on: the parked one, else a new
/// one from the scheduler. A failed initializer (the agent discarded the
/// instance; no lease was taken) or a refusal is the call's result.
async fn next_lease(
    gw: &Gateway,
    req: &InvokeRequest,
    entry: &crate::catalog::FunctionEntry,
    reused: &mut Option<Held>,
) -> Result<Held, InvokeResult> {
    if let Some(l) = reused.take() {
        return Ok(l);
    }
    match acquire(gw, req, entry.acquire_body(req.request_id.as_str())).await {
        Ok(l) => Ok(Held::granted(l, Instant::now())),
        Err(e) if e.kind == Some(FcErrorKind::Initialization) => {
            Err(InvokeResult::InitializationFailed { message: e.message })
        }
        Err(e) => Err(InvokeResult::Platform(e)),
    }
}

async fn run(gw: &Arc<Gateway>, req: InvokeRequest) -> Result<InvokeResult, FcError> {
    let Prepared {
        entry,
        deadline,
        mut guard,
        mut reused,
    } = prepare(gw, &req)?;
    let timeout_s = entry.spec.timeout_s;
    let (outcome, resp) = loop {
        let from_pool = reused.is_some();
        let lease = match next_lease(gw, &req, &entry, &mut reused).await {
            Ok(l) => l,
            Err(result) => return Ok(result),
        };
        tracing::debug!(lease = %lease.lease.lease_id, instance = %lease.lease.instance_id, cold = lease.lease.cold_start, from_pool, "lease held");
        // A call abandoned before the agent answers (the client went away,
        // or the async dispatcher aborted a stopped task) may leave the
        // function running: the instance is reported failed so the
        // scheduler replaces it rather than hand its slot to another call.
        guard.hold(lease, LeaseOutcome::InstanceFailed);
        let lease = guard.lease().expect("the lease was just taken");
        let resp = match tokio::time::timeout(deadline, gw.agents.invoke(lease, &req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                // The caller's streamed body failed, not the instance: its
                // slot is given back as healthy.
                if let Some(err) = req.stream.as_ref().and_then(StreamedBody::caller_error) {
                    tracing::debug!(request_id = %req.request_id, function = %req.function, error = %e, "the caller's request body failed");
                    guard.set_outcome(LeaseOutcome::Ok);
                    return Err(err);
                }
                tracing::warn!(request_id = %req.request_id, function = %req.function, error = %e, "agent call failed");
                return Err(e.to_fc());
            }
            Err(_) => {
                tracing::warn!(
                    request_id = %req.request_id,
                    function = %req.function,
                    deadline_s = deadline.as_secs(),
                    "agent did not answer in time"
                );
                return Ok(InvokeResult::TimedOut {
                    timeout_s,
                    log_tail: None,
                });
            }
        };
        match InvokeOutcome::of(resp.headers()) {
            Some(Ok(outcome)) => break (outcome, resp),
            Some(Err(unknown)) => {
                tracing::error!(request_id = %req.request_id, function = %req.function, error = %unknown, "agent answered badly");
                return Err(FcError::internal(
                    "the instance's node answered badly; retry the request",
                ));
            }
            // A streamed body went to the refusing agent: it cannot be sent
            // again.
            None if from_pool && req.stream.is_some() => {
                if let Some(stale) = guard.release() {
                    gw.leases.give_back(
                        &entry.spec.revision,
                        stale,
                        guard.need(),
                        LeaseOutcome::InstanceFailed,
                    );
                }
                return Err(FcError::unavailable(
                    "the function's instance went away before the call started; retry the request",
                ));
            }
            None if from_pool => {
                tracing::debug!(status = %resp.status(), "agent refused a parked lease; acquiring a fresh one");
                if let Some(stale) = guard.release() {
                    gw.leases.give_back(
                        &entry.spec.revision,
                        stale,
                        guard.need(),
                        LeaseOutcome::InstanceFailed,
                    );
                }
            }
            None => {
                // The agent refused the call itself (instance unknown, ...).
                let (head, body) = resp.into_parts();
                return Err(remote_error(head.status, &read_small(body).await));
            }
        }
    };
    let (head, body) = resp.into_parts();
    let log_tail = head.headers.get(ih::LOG_RESULT).cloned();
    match outcome {
        InvokeOutcome::Ok | InvokeOutcome::FunctionError => {
            let answer = answer(head.status, head.headers, log_tail, guard, body, deadline).await?;
            Ok(if outcome == InvokeOutcome::Ok {
                InvokeResult::Success(answer)
            } else {
                InvokeResult::FunctionError(answer)
            })
        }
        InvokeOutcome::InstanceFailed => {
            drop(guard);
            let message = match serde_json::from_slice::<InvokeFailure>(&read_small(body).await) {
                Ok(f) if !f.message.is_empty() => f.message,
                _ => "Process exited unexpectedly before completing request".to_owned(),
            };
            Ok(InvokeResult::Crashed { message, log_tail })
        }
        InvokeOutcome::Timeout => {
            drop(guard);
            Ok(InvokeResult::TimedOut {
                timeout_s,
                log_tail,
            })
        }
    }
}

/// An error's body, up to 64 KiB. Only failed calls read one: the
/// future is boxed so that it does not size every call's future.
fn read_small(body: AnswerBody) -> Pin<Box<dyn Future<Output = Bytes> + Send>> {
    Box::pin(async move {
        http_body_util::Limited::new(body, 64 * 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    })
}

/// The function's answer: read whole when small (a node dying mid-answer
/// is then a retryable platform error), else streamed holding the lease.
async fn answer(
    status: StatusCode,
    headers: HeaderMap,
    log_tail: Option<HeaderValue>,
    mut guard: LeaseGuard,
    body: AnswerBody,
    deadline: Duration,
) -> Result<FunctionAnswer, FcError> {
    let small = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n <= BUFFERED_ANSWER_MAX);
    let body = if small {
        match tokio::time::timeout(deadline, body.collect()).await {
            Ok(Ok(collected)) => {
                guard.set_outcome(LeaseOutcome::Ok);
                drop(guard);
                full(collected.to_bytes())
            }
            _ => {
                return Err(FcError::unavailable(
                    "the instance's node failed while answering; retry the request",
                ))
            }
        }
    } else {
        // Until the whole answer has been read, a drop means the client
        // went away mid-answer: the instance may still be writing it.
        GuardedBody::new(body, guard, LeaseOutcome::Ok).boxed()
    };
    Ok(FunctionAnswer {
        status,
        headers,
        log_tail,
        body,
    })
}

async fn acquire(gw: &Gateway, req: &InvokeRequest, body: Bytes) -> Result<Lease, FcError> {
    let t = Instant::now();
    let lease = gw.scheduler.acquire_lease(body).await.map_err(|e| {
        tracing::warn!(request_id = %req.request_id, function = %req.function, error = %e, "no lease from the scheduler");
        e.to_fc()
    })?;
    gw.metrics
        .lease_acquire_seconds
        .observe(t.elapsed().as_secs_f64());
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call's future (what a sync invocation, a trigger's or an async
    /// delivery awaits) holds no cold path inline: dialling, the
    /// scheduler's answer and error bodies are boxed, the connection is
    /// one pointer. It was 7.7 KB, copied at every layer of every call.
    #[test]
    fn a_calls_future_stays_small() {
        fn size_of_call<'a, F, Fut>(_: F) -> usize
        where
            F: FnOnce(&'a Arc<Gateway>, InvokeRequest) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = size_of_call(invoke);
        assert!(size <= 3 * 1024, "invoke's future is {size} bytes");
    }
}
