//! The internal (mTLS) listener: code packages and temporary credentials
//! for agents, the access key lifecycle for operators
//! ([`crate::access_keys`]), health. One table, with who may call each
//! route:
//!
//! - code by digest: an agent, only for a digest (code package or layer)
//!   of an instance the scheduler placed (or is placing) on its node;
//! - credentials: an agent, only for an instance the scheduler placed on
//!   its node, for that instance's function and role;
//! - access keys (list, create, disable, enable, delete): the operator;
//! - health: any cluster identity.
//!
//! Placements come from the scheduler ([`crate::placements`]), never from
//! what the agent says.

use std::sync::{Arc, LazyLock};

use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, RequestId};
use kiln_internal_api::authz::{Denied, DenyReason, Refusals};
use kiln_internal_api::router::{route, Callers, Route, RouteError, Router};
use kiln_internal_api::server::{self, Body, ConnInfo};
use kiln_pki::{Identity, Role};

use crate::catalog::Catalog;
use crate::placements::Placements;

/// Any cluster identity (health).
const ANY: Callers = Callers::ANY;
/// Agents; each handler narrows them to what is placed on their node.
const AGENT: Callers = Callers::of(&[Role::Agent]);
/// Access keys are the operator's to manage.
const OPERATOR: Callers = Callers::of(&[Role::Operator]);

const CODE: &str = "/v1/code/{digest}";

/// Every route of the internal listener.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Api {
    Health,
    /// `digest` is checked by the code store, which answers an unknown
    /// or malformed one as missing.
    Code {
        digest: String,
    },
    Credentials,
    ListKeys,
    CreateKey,
    DisableKey {
        id: String,
    },
    EnableKey {
        id: String,
    },
    DeleteKey {
        id: String,
    },
}

/// The internal listener's one route table: method, path, who may call it.
#[rustfmt::skip]
const ROUTES: &[Route<Api>] = &[
    route(Method::GET, "/v1/health", ANY, |_| Ok(Api::Health)),
    route(Method::GET, CODE, AGENT, |p| Ok(Api::Code { digest: p.string("digest")? })),
    route(Method::POST, "/v1/credentials", AGENT, |_| Ok(Api::Credentials)),
    route(Method::GET, "/v1/keys", OPERATOR, |_| Ok(Api::ListKeys)),
    route(Method::POST, "/v1/keys", OPERATOR, |_| Ok(Api::CreateKey)),
    route(Method::POST, "/v1/keys/{id}/disable", OPERATOR, |p| Ok(Api::DisableKey { id: p.string("id")? })),
    route(Method::POST, "/v1/keys/{id}/enable", OPERATOR, |p| Ok(Api::EnableKey { id: p.string("id")? })),
    route(Method::DELETE, "/v1/keys/{id}", OPERATOR, |p| Ok(Api::DeleteKey { id: p.string("id")? })),
];

/// What the internal listener needs besides the request.
pub struct Internal {
    pub catalog: Arc<Catalog>,
    pub ram: Arc<crate::ram::Ram>,
    pub placements: Placements,
    pub refusals: Refusals,
}

static ROUTER: LazyLock<Router<Api>> = LazyLock::new(|| {
    Router::new(ROUTES).expect("the route table is valid (a unit test builds it)")
});

pub async fn handle(
    internal: Arc<Internal>,
    req: http::Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    let request_id = RequestId::generate();
    let caller = conn.identity.as_deref();
    let refuse = |d: Denied| {
        let e = internal.refusals.refuse(&d, caller, conn.peer);
        server::error(&e, request_id.as_str())
    };
    let mut resp = match ROUTER.authorise(req.method(), req.uri().path(), caller) {
        Err(RouteError::Invalid(e)) => server::error(&e, request_id.as_str()),
        Err(RouteError::Denied(d)) => refuse(d),
        Ok(Api::Health) => server::health(),
        Ok(Api::Code { digest }) => {
            tracing::debug!(peer = %conn.peer, digest, "code package requested");
            // A digest that is no SHA-256 is no package (the store answers
            // it as missing) and never reaches the scheduler's URL.
            let placed = if is_sha256_hex(&digest) {
                placed_code(&internal.placements, caller, &digest).await
            } else {
                Ok(())
            };
            match placed {
                Ok(()) => code(&internal.catalog, &digest, &request_id).await,
                Err(Refused::Denied(d)) => refuse(d),
                Err(Refused::Error(e)) => server::error(&e, request_id.as_str()),
            }
        }
        Ok(Api::Credentials) => credentials(&internal, caller, req, &request_id)
            .await
            .unwrap_or_else(|refused| match refused {
                Refused::Denied(d) => refuse(d),
                Refused::Error(e) => server::error(&e, request_id.as_str()),
            }),
        Ok(Api::ListKeys) => keys::list(&internal.catalog, &request_id).await,
        Ok(Api::CreateKey) => keys::create(&internal.catalog, req, &request_id).await,
        Ok(Api::DisableKey { id }) => {
            keys::set_enabled(&internal.catalog, &id, false, &request_id).await
        }
        Ok(Api::EnableKey { id }) => {
            keys::set_enabled(&internal.catalog, &id, true, &request_id).await
        }
        Ok(Api::DeleteKey { id }) => keys::delete(&internal.catalog, &id, &request_id).await,
    };
    if let Ok(v) = http::HeaderValue::from_str(request_id.as_str()) {
        resp.headers_mut().insert(super::respond::REQUEST_ID, v);
    }
    resp
}

/// Why an agent's request is not served.
enum Refused {
    Denied(Denied),
    Error(FcError),
}

/// The node of the calling agent (the table admits agents only, and an
/// agent's identity always names its node).
fn agent_node<'a>(
    caller: Option<&'a Identity>,
    method: &Method,
    route: &'static str,
) -> Result<&'a kiln_core::NodeId, Refused> {
    caller
        .and_then(Identity::node)
        .ok_or_else(|| Refused::Denied(Denied::new(method, route, caller, DenyReason::Role)))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Code only for a digest an instance placed on the agent's node uses.
async fn placed_code(
    placements: &Placements,
    caller: Option<&Identity>,
    digest: &str,
) -> Result<(), Refused> {
    let node = agent_node(caller, &Method::GET, CODE)?;
    match placements.code(node, digest).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Refused::Denied(
            Denied::new(&Method::GET, CODE, caller, DenyReason::NotPlaced).detail(format!(
                "no instance placed on node {node} uses code package {digest:?}"
            )),
        )),
        Err(e) => Err(Refused::Error(e)),
    }
}

async fn code(catalog: &Catalog, digest: &str, request_id: &RequestId) -> Response<Body> {
    let missing = || {
        server::error(
            &FcError::new(
                FcErrorCode::PathNotSupported,
                format!("code package {digest:?} does not exist"),
            ),
            request_id.as_str(),
        )
    };
    let Some(path) = catalog.code_files().cached(digest).await else {
        return missing();
    };
    match super::respond::zip_file(&path).await {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot open code package");
            server::error(
                &FcError::internal("cannot read the code package"),
                request_id.as_str(),
            )
        }
    }
}

/// An agent's `CredentialsRequest`: temporary credentials for the role of
/// an instance's function, if the scheduler placed that instance on the
/// agent's node for that function and role; or FC's error (no such
/// function, role changed or deleted).
async fn credentials(
    internal: &Internal,
    caller: Option<&Identity>,
    req: http::Request<Incoming>,
    request_id: &RequestId,
) -> Result<Response<Body>, Refused> {
    const ROUTE: &str = kiln_internal_api::paths::CREDENTIALS;
    let node = agent_node(caller, &Method::POST, ROUTE)?;
    let msg: kiln_internal_api::CredentialsRequest =
        match server::read_json(req.into_body(), 16 * 1024).await {
            Ok(m) => m,
            Err(e) => return Ok(server::error(&e, request_id.as_str())),
        };
    let placed = internal
        .placements
        .instance(node, &msg.instance_id)
        .await
        .map_err(Refused::Error)?;
    let matches = placed.as_ref().is_some_and(|p| {
        p.account_id == msg.account_id
            && p.function_name == msg.function_name
            && p.role.as_deref() == Some(msg.role.as_str())
    });
    if !matches {
        return Err(Refused::Denied(
            Denied::new(&Method::POST, ROUTE, caller, DenyReason::NotPlaced).detail(format!(
                "instance {} of function {}/{} with role {:?} is not placed on node {node}",
                msg.instance_id, msg.account_id, msg.function_name, msg.role
            )),
        ));
    }
    Ok(match internal.ram.issue(&internal.catalog, &msg) {
        Ok(c) => server::json(StatusCode::OK, &c),
        Err(e) => {
            tracing::warn!(function = %msg.function_name, instance_id = %msg.instance_id, error = %e, "temporary credentials refused");
            server::error(&e, request_id.as_str())
        }
    })
}

/// The operator's access key routes.
mod keys {
    use kiln_core::{Clock, FcError, FcErrorCode, RequestId, SystemClock};
    use kiln_internal_api::keys::{AccessKeyList, CreateAccessKey};
    use kiln_internal_api::server::{self, Body};

    use super::*;

    fn failed(e: crate::catalog::CatalogError, request_id: &RequestId) -> Response<Body> {
        tracing::error!(error = %e, "access key change failed");
        server::error(
            &FcError::internal("the access key store failed"),
            request_id.as_str(),
        )
    }

    fn unknown(id: &str, request_id: &RequestId) -> Response<Body> {
        let shown: String = id.chars().take(128).collect();
        server::error(
            &FcError::new(
                FcErrorCode::EntityNotExistAccessKey,
                format!("access key {shown:?} does not exist"),
            ),
            request_id.as_str(),
        )
    }

    pub(super) async fn list(catalog: &Catalog, request_id: &RequestId) -> Response<Body> {
        match catalog.list_keys().await {
            Ok(access_keys) => server::json(StatusCode::OK, &AccessKeyList { access_keys }),
            Err(e) => failed(e, request_id),
        }
    }

    pub(super) async fn create(
        catalog: &Catalog,
        req: http::Request<Incoming>,
        request_id: &RequestId,
    ) -> Response<Body> {
        let msg: CreateAccessKey = match server::read_json(req.into_body(), 4 * 1024).await {
            Ok(m) => m,
            Err(e) => return server::error(&e, request_id.as_str()),
        };
        match catalog
            .create_key(msg.account_id, SystemClock.now_ms())
            .await
        {
            Ok(k) => server::json(StatusCode::OK, &k),
            Err(e) => failed(e, request_id),
        }
    }

    pub(super) async fn set_enabled(
        catalog: &Catalog,
        id: &str,
        enabled: bool,
        request_id: &RequestId,
    ) -> Response<Body> {
        match catalog.set_key_enabled(id, enabled).await {
            Ok(Some(info)) => server::json(StatusCode::OK, &info),
            Ok(None) => unknown(id, request_id),
            Err(e) => failed(e, request_id),
        }
    }

    pub(super) async fn delete(
        catalog: &Catalog,
        id: &str,
        request_id: &RequestId,
    ) -> Response<Body> {
        match catalog.delete_key(id).await {
            Ok(true) => server::no_content(),
            Ok(false) => unknown(id, request_id),
            Err(e) => failed(e, request_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_core::FcErrorCode;

    use super::*;

    #[test]
    fn every_route_of_the_table_matches() {
        let at = |m: Method, p: &str| ROUTER.route_for_tests(&m, p);
        assert_eq!(
            at(Method::GET, kiln_internal_api::paths::HEALTH).unwrap(),
            Api::Health
        );
        assert_eq!(
            at(Method::GET, "/v1/code/ab12").unwrap(),
            Api::Code {
                digest: "ab12".into()
            }
        );
        assert_eq!(
            at(Method::POST, kiln_internal_api::paths::CREDENTIALS).unwrap(),
            Api::Credentials
        );
        assert_eq!(at(Method::GET, "/v1/keys").unwrap(), Api::ListKeys);
        assert_eq!(at(Method::POST, "/v1/keys").unwrap(), Api::CreateKey);
        assert_eq!(
            at(
                Method::POST,
                &kiln_internal_api::keys::paths::disable("LTAI1")
            )
            .unwrap(),
            Api::DisableKey { id: "LTAI1".into() }
        );
        assert_eq!(
            at(
                Method::POST,
                &kiln_internal_api::keys::paths::enable("LTAI1")
            )
            .unwrap(),
            Api::EnableKey { id: "LTAI1".into() }
        );
        assert_eq!(
            at(
                Method::DELETE,
                &kiln_internal_api::keys::paths::access_key("LTAI1")
            )
            .unwrap(),
            Api::DeleteKey { id: "LTAI1".into() }
        );
        assert_eq!(
            at(Method::GET, "/v1/keys/LTAI1/disable").unwrap_err().code,
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(ROUTER.rows().count(), ROUTES.len());
        let mut callers: Vec<String> = ROUTER
            .rows()
            .map(|(m, p, c)| format!("{m} {p}: {c}"))
            .collect();
        callers.sort();
        // The route x role table of docs/security.md.
        assert_eq!(
            callers,
            [
                "DELETE /v1/keys/{id}: operator",
                "GET /v1/code/{digest}: agent",
                "GET /v1/health: gateway, scheduler, agent, operator",
                "GET /v1/keys: operator",
                "POST /v1/credentials: agent",
                "POST /v1/keys/{id}/disable: operator",
                "POST /v1/keys/{id}/enable: operator",
                "POST /v1/keys: operator",
            ]
        );
        assert_eq!(
            at(Method::GET, "/v1/credentials").unwrap_err().code,
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(
            at(Method::GET, "/v1/code/a/b").unwrap_err().code,
            FcErrorCode::PathNotSupported
        );
        assert_eq!(
            at(Method::GET, "/v1/code/").unwrap_err().code,
            FcErrorCode::PathNotSupported
        );
    }
}
