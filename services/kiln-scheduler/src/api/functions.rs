//! `/v1/functions/retire`: a function changed or was deleted;
//! `/v1/functions/provision`: its provisioned instances.

use http::{Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::FcError;
use kiln_internal_api::server::{json, no_content, read_json, Body};
use kiln_internal_api::{FunctionRef, PutProvision, RetireFunction};

use super::BODY_LIMIT;
use crate::service::Scheduler;

pub async fn retire(sched: &Scheduler, body: Incoming) -> Result<Response<Body>, FcError> {
    let req: RetireFunction = read_json(body, BODY_LIMIT).await?;
    for rev in req.keep_revision.iter().chain(&req.keep_versions) {
        if rev.len() != 64 || !rev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FcError::invalid_argument(
                "keep_revision and keep_versions must be hex sha256 digests (64 characters)",
            ));
        }
    }
    sched.retire(&req);
    Ok(no_content())
}

pub async fn put_provision(sched: &Scheduler, body: Incoming) -> Result<Response<Body>, FcError> {
    let req: PutProvision = read_json(body, BODY_LIMIT).await?;
    Ok(json(StatusCode::OK, &sched.put_provision(req).await?))
}

pub async fn delete_provision(
    sched: &Scheduler,
    body: Incoming,
) -> Result<Response<Body>, FcError> {
    let req: FunctionRef = read_json(body, BODY_LIMIT).await?;
    sched.delete_provision(&req).await?;
    Ok(no_content())
}

pub fn list_provisions(sched: &Scheduler) -> Response<Body> {
    json(StatusCode::OK, &sched.provisions())
}
