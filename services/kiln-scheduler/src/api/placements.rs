//! `/v1/nodes/{node}/instances/{instance}` and `/v1/nodes/{node}/code/{digest}`:
//! what the scheduler placed on a node, asked by the gateway before it
//! hands that node's agent temporary credentials or a code package. The
//! gateway learns placements here, never from the agent's own claim.

use http::{Response, StatusCode};
use kiln_core::{FcError, FcErrorCode, InstanceId, NodeId};
use kiln_internal_api::server::{json, no_content, Body};

use crate::service::Scheduler;

/// The instance's function, if the scheduler placed it on `node` (being
/// started included); FC's 404 otherwise.
pub fn instance(
    sched: &Scheduler,
    node: &NodeId,
    instance: &InstanceId,
) -> Result<Response<Body>, FcError> {
    match sched.placed_instance(node, instance) {
        Some(placed) => Ok(json(StatusCode::OK, &placed)),
        None => Err(FcError::new(
            FcErrorCode::InstanceNotFound,
            format!("instance {instance} is not placed on node {node}"),
        )),
    }
}

/// 204 if `node` holds or is creating an instance whose code package or
/// one of whose layers has `digest`; FC's 404 otherwise.
pub fn code(sched: &Scheduler, node: &NodeId, digest: &str) -> Result<Response<Body>, FcError> {
    if sched.node_needs_code(node, digest) {
        Ok(no_content())
    } else {
        Err(FcError::new(
            FcErrorCode::PathNotSupported,
            format!("no instance on node {node} uses code package {digest:?}"),
        ))
    }
}
