//! `/v1/nodes`: registration, heartbeats, the node list.

use http::{Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, NodeId};
use kiln_internal_api::authz::{node_of_agent, Denied, DenyReason};
use kiln_internal_api::server::{json, read_json, Body, ConnInfo};
use kiln_internal_api::{Heartbeat, RegisterNode};

use super::BODY_LIMIT;
use crate::service::Scheduler;

const REGISTER: &str = kiln_internal_api::paths::NODES_REGISTER;

/// An agent registers the node its certificate names (a registration
/// without a node id is for that node too); a live node held by another
/// certificate at another URL is not taken over.
pub async fn register(
    sched: &Scheduler,
    body: Incoming,
    conn: &ConnInfo,
) -> Result<Response<Body>, FcError> {
    let mut req: RegisterNode = read_json(body, BODY_LIMIT).await?;
    let caller = conn.identity.as_deref();
    let refuse = |d: Denied| sched.metrics().refusals.refuse(&d, caller, conn.peer);
    let asked = req.node_id.clone();
    let own = match caller.and_then(|c| c.node()) {
        Some(own) => own.clone(),
        None => {
            // The table admits agents only; an agent identity names a node.
            return Err(refuse(Denied::new(
                &http::Method::POST,
                REGISTER,
                caller,
                DenyReason::Role,
            )));
        }
    };
    if let Some(asked) = &asked {
        node_of_agent(caller, &http::Method::POST, REGISTER, asked).map_err(refuse)?;
    }
    req.node_id = Some(own.clone());
    match sched.register_with(&req, conn.certificate_sha256) {
        Ok(resp) => Ok(json(StatusCode::OK, &resp)),
        Err(crate::service::RegisterError::Held { url }) => Err(refuse(
            Denied::new(&http::Method::POST, REGISTER, caller, DenyReason::Held).detail(format!(
                "node {own} is live at {url} with another certificate; stop that agent or wait until the scheduler marks it dead, then register again"
            )),
        )),
        Err(crate::service::RegisterError::Invalid(e)) => Err(e),
    }
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
