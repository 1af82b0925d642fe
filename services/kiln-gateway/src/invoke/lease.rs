//! The lease a call holds, given back when the call is over: after its
//! answer has been streamed, when the caller goes away, or when the call
//! fails on the way.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use kiln_internal_api::invoke_client::AnswerBody;
use kiln_internal_api::server::BoxError;
use kiln_internal_api::{Lease, LeaseOutcome};

use super::pool::{Held, LeasePool};
use crate::catalog::FunctionEntry;
use crate::metrics::Metrics;

/// Counts the call in flight and gives its lease back when dropped, with
/// the outcome last set.
pub(super) struct LeaseGuard {
    pool: Arc<LeasePool>,
    /// The function called: its revision names the parked leases (held,
    /// not copied, per call).
    function: Arc<FunctionEntry>,
    /// The longest a call of this revision may run (its deadline).
    need: Duration,
    metrics: Arc<Metrics>,
    lease: Option<Held>,
    outcome: LeaseOutcome,
    started: Instant,
}

impl LeaseGuard {
    pub(super) fn new(
        pool: Arc<LeasePool>,
        function: Arc<FunctionEntry>,
        need: Duration,
        metrics: Arc<Metrics>,
        started: Instant,
    ) -> Self {
        metrics.invocations_in_flight.inc();
        Self {
            pool,
            function,
            need,
            metrics,
            lease: None,
            outcome: LeaseOutcome::InstanceFailed,
            started,
        }
    }

    /// Hold `lease`; given back as `outcome` unless that changes.
    pub(super) fn hold(&mut self, lease: Held, outcome: LeaseOutcome) {
        self.lease = Some(lease);
        self.outcome = outcome;
    }

    pub(super) fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref().map(|h| &h.lease)
    }

    pub(super) fn set_outcome(&mut self, outcome: LeaseOutcome) {
        self.outcome = outcome;
    }

    /// Stop holding the lease, to be given back by the caller.
    pub(super) fn release(&mut self) -> Option<Held> {
        self.lease.take()
    }

    /// The longest a call of this revision may run.
    pub(super) fn need(&self) -> Duration {
        self.need
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        self.metrics.invocations_in_flight.dec();
        self.metrics
            .invoke_seconds
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(lease) = self.lease.take() {
            self.pool
                .give_back(&self.function.spec.revision, lease, self.need, self.outcome);
        }
    }
}

/// The agent's answer body, holding the lease until it ends.
pub(super) struct GuardedBody {
    inner: AnswerBody,
    guard: Option<LeaseGuard>,
    /// The lease's outcome once the answer is complete.
    done: LeaseOutcome,
}

impl GuardedBody {
    /// Until the body ends, the guard's outcome is `InstanceFailed`: a body
    /// dropped early means the instance may still be writing.
    pub(super) fn new(inner: AnswerBody, mut guard: LeaseGuard, done: LeaseOutcome) -> Self {
        guard.set_outcome(LeaseOutcome::InstanceFailed);
        Self {
            inner,
            guard: Some(guard),
            done,
        }
    }

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
