//! `/v1/functions/retire`: a function changed or was deleted.

use http::Response;
use hyper::body::Incoming;
use kiln_core::FcError;
use kiln_internal_api::server::{no_content, read_json, Body};
use kiln_internal_api::RetireFunction;

use super::BODY_LIMIT;
use crate::service::Scheduler;

pub async fn retire(sched: &Scheduler, body: Incoming) -> Result<Response<Body>, FcError> {
    let req: RetireFunction = read_json(body, BODY_LIMIT).await?;
    if let Some(rev) = &req.keep_revision {
        if rev.len() != 64 || !rev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FcError::invalid_argument(
                "keep_revision must be a hex sha256 (64 characters)",
            ));
        }
    }
    sched.retire(&req);
    Ok(no_content())
}
