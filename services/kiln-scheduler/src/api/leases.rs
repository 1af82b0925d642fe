//! `/v1/leases`: a slot on an instance for one invocation, and its release.

use http::{Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, LeaseId};
use kiln_internal_api::server::{json, no_content, read_body, read_json, Body};
use kiln_internal_api::{AcquireLease, LeaseOutcome, ReleaseLease};

use super::BODY_LIMIT;
use crate::service::Scheduler;

pub async fn acquire(sched: &Scheduler, body: Incoming) -> Result<Response<Body>, FcError> {
    let req: AcquireLease = read_json(body, BODY_LIMIT).await?;
    let lease = sched.acquire(req).await?;
    Ok(json(StatusCode::OK, &lease))
}

/// The body is a `ReleaseLease`; an empty body means outcome `ok`.
pub async fn release(
    sched: &Scheduler,
    lease: &LeaseId,
    body: Incoming,
) -> Result<Response<Body>, FcError> {
    let bytes = read_body(body, BODY_LIMIT).await?;
    let outcome = if bytes.is_empty() {
        LeaseOutcome::Ok
    } else {
        serde_json::from_slice::<ReleaseLease>(&bytes)
            .map_err(|e| FcError::invalid_argument(format!("malformed JSON body: {e}")))?
            .outcome
    };
    sched.release(lease, outcome)?;
    Ok(no_content())
}
