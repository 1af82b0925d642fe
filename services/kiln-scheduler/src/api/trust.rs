//! The certificate lifecycle routes: revocation, the revocation list,
//! renewal, bootstrap tokens, and the bootstrap listener's one route.
//!
//! Each handler also checks the caller's role itself (fail closed even
//! before the route table carries roles): revoking and minting tokens is
//! for operators, renewal for agents, the list for any cluster identity.

use std::net::SocketAddr;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, NodeId, RequestId};
use kiln_internal_api::server::{self, json, read_json, Body, ConnInfo};
use kiln_internal_api::{trust_paths, Bootstrap, CreateBootstrapToken, RenewCertificate};
use kiln_pki::Role;
use tracing::Instrument;

use super::BODY_LIMIT;
use crate::service::Scheduler;
use crate::trust::Trust;

/// Refuse a caller whose certificate names none of `roles`.
fn require(conn: &ConnInfo, roles: &[Role], route: &str) -> Result<(), FcError> {
    match conn.identity.as_deref() {
        Some(id) if roles.contains(&id.role()) => Ok(()),
        other => {
            let who = other.map_or("a certificate without identity".to_owned(), |i| {
                format!("role {i}")
            });
            tracing::warn!(peer = %conn.peer, caller = %who, route, "call refused");
            Err(FcError::new(
                FcErrorCode::AccessDenied,
                format!("{who} may not call {route}"),
            ))
        }
    }
}

/// `POST /v1/nodes/{node}/revoke` (operator).
pub fn revoke(
    sched: &Scheduler,
    node: &NodeId,
    conn: &ConnInfo,
) -> Result<Response<Body>, FcError> {
    require(conn, &[Role::Operator], "POST /v1/nodes/{node}/revoke")?;
    Ok(json(StatusCode::OK, &sched.revoke(node)?))
}

/// `GET /v1/revocations` (every cluster role).
pub fn list(sched: &Scheduler, conn: &ConnInfo) -> Result<Response<Body>, FcError> {
    require(conn, &Role::ALL, "GET /v1/revocations")?;
    Ok(json(StatusCode::OK, &sched.trust()?.revocations().list()))
}

/// `POST /v1/certificates/renew` (agent, for itself).
pub async fn renew(
    sched: &Scheduler,
    body: Incoming,
    conn: &ConnInfo,
) -> Result<Response<Body>, FcError> {
    require(conn, &[Role::Agent], "POST /v1/certificates/renew")?;
    let req: RenewCertificate = read_json(body, BODY_LIMIT).await?;
    let issued = sched.trust()?.renew(
        conn.identity.as_deref(),
        conn.certificate.as_deref(),
        &req.csr_pem,
    )?;
    sched.metrics().certificates_issued.inc();
    Ok(json(StatusCode::OK, &issued))
}

/// `POST /v1/bootstrap-tokens` (operator).
pub async fn create_token(
    sched: &Scheduler,
    body: Incoming,
    conn: &ConnInfo,
) -> Result<Response<Body>, FcError> {
    require(conn, &[Role::Operator], "POST /v1/bootstrap-tokens")?;
    let req: CreateBootstrapToken = read_json(body, BODY_LIMIT).await?;
    Ok(json(StatusCode::OK, &sched.trust()?.create_token(&req)?))
}

/// Largest bootstrap request: a token and a CSR.
const BOOTSTRAP_BODY_LIMIT: usize = 64 * 1024;

/// The bootstrap listener: no client certificate, one route. Anything
/// else is 404 whatever the caller holds.
pub async fn handle_bootstrap(
    trust: std::sync::Arc<Trust>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let request_id = RequestId::generate();
    let span = tracing::info_span!("bootstrap", request_id = %request_id, %peer);
    async move {
        let path = req.uri().path().to_owned();
        let result = if req.method() == Method::POST && path == trust_paths::BOOTSTRAP {
            match read_json::<Bootstrap>(req.into_body(), BOOTSTRAP_BODY_LIMIT).await {
                Ok(b) => match trust.redeem(&b, peer) {
                    Ok(ok) => {
                        metrics.certificates_issued.inc();
                        Ok(json(StatusCode::OK, &ok))
                    }
                    Err(e) => {
                        if e.code == FcErrorCode::AccessDenied {
                            metrics.bootstrap_refused.inc();
                        }
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            }
        } else {
            return server::not_found(&path, request_id.as_str());
        };
        result.unwrap_or_else(|e| server::error(&e, request_id.as_str()))
    }
    .instrument(span)
    .await
}
