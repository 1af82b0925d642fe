//! `/v1/nodes`: registration, heartbeats, the node list.

use http::{Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, NodeId};
use kiln_internal_api::server::{json, read_json, Body};
use kiln_internal_api::{Heartbeat, RegisterNode};

use super::BODY_LIMIT;
use crate::service::Scheduler;

pub async fn register(sched: &Scheduler, body: Incoming) -> Result<Response<Body>, FcError> {
    let req: RegisterNode = read_json(body, BODY_LIMIT).await?;
    let resp = sched.register(&req)?;
    Ok(json(StatusCode::OK, &resp))
}

pub async fn heartbeat(
    sched: &Scheduler,
    node: &NodeId,
    body: Incoming,
) -> Result<Response<Body>, FcError> {
    let hb: Heartbeat = read_json(body, BODY_LIMIT).await?;
    Ok(json(StatusCode::OK, &sched.heartbeat(node, &hb)))
}

/// Cordon, drain or uncordon: answers the node as it is now.
pub fn action(
    node: &NodeId,
    f: impl FnOnce(&NodeId) -> Result<kiln_internal_api::NodeInfo, FcError>,
) -> Result<Response<Body>, FcError> {
    Ok(json(StatusCode::OK, &f(node)?))
}

pub fn list(sched: &Scheduler) -> Response<Body> {
    json(StatusCode::OK, &sched.nodes())
}
