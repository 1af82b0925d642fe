//! The scheduler's internal API (mTLS HTTP/2): every route in one table
//! with the roles that may call it, one file per resource, every request
//! in a span, errors in FC's shape. docs/security.md prints the table.
//!
//! - agents: only their own node's registration and heartbeat (the node
//!   id of the registration is the certificate's, checked in nodes.rs);
//! - the gateway: leases, retirement, provisioning, limits, the node and
//!   instance lists, and the placement questions it asks before it hands
//!   an agent credentials or code (placements.rs);
//! - the operator (`kiln nodes`, `kiln limits`): the admin routes;
//! - health: any cluster identity.

mod accounts;
mod functions;
mod instances;
mod leases;
mod nodes;
mod placements;
pub(crate) mod trust;

use std::sync::LazyLock;

use http::Method;
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use kiln_core::{AccountId, FcError, FunctionName, InstanceId, LeaseId, NodeId, RequestId};
use kiln_internal_api::router::{route, Callers, Route, RouteError, Router};
use kiln_internal_api::server::{self, Body, ConnInfo};
use kiln_pki::Role::{Agent, Gateway, Operator};
use tracing::Instrument;

use crate::service::Scheduler;

/// Largest control message accepted: a registration listing a few
/// thousand instance ids fits easily.
const BODY_LIMIT: usize = 4 * 1024 * 1024;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
const DELETE: Method = Method::DELETE;

/// Any cluster identity (health).
const ANY: Callers = Callers::ANY;
/// An agent, for the node its certificate names only.
const OWN_NODE: Callers = Callers::of(&[Agent]).own_node();
/// The gateway's data-plane routes.
const GATEWAY: Callers = Callers::of(&[Gateway]);
/// Admin routes: the gateway (FC's API) and the operator (`kiln`).
const ADMIN: Callers = Callers::of(&[Gateway, Operator]);
/// Revocations and bootstrap tokens: the operator's alone.
const OPERATOR: Callers = Callers::of(&[Operator]);
/// Certificate renewal: any agent; the handler issues exactly the
/// identity the caller's certificate names.
const AGENT: Callers = Callers::of(&[Agent]);

/// Every route of the scheduler's API, with its typed path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Api {
    Health,
    RegisterNode,
    Heartbeat {
        node: NodeId,
    },
    ListNodes,
    AcquireLease,
    ReleaseLease {
        lease: LeaseId,
    },
    RetireFunction,
    ListInstances,
    PutProvision,
    DeleteProvision,
    ListProvisions,
    CordonNode {
        node: NodeId,
    },
    DrainNode {
        node: NodeId,
    },
    UncordonNode {
        node: NodeId,
    },
    GetAccountLimits {
        account: AccountId,
    },
    PutAccountLimits {
        account: AccountId,
    },
    DeleteAccountLimits {
        account: AccountId,
    },
    PutFunctionLimits {
        account: AccountId,
        function: FunctionName,
    },
    DeleteFunctionLimits {
        account: AccountId,
        function: FunctionName,
    },
    ListAccountProvisions {
        account: AccountId,
    },
    RevokeNode {
        node: NodeId,
    },
    ListRevocations,
    RenewCertificate,
    CreateBootstrapToken,
    PlacedInstance {
        node: NodeId,
        instance: InstanceId,
    },
    PlacedCode {
        node: NodeId,
        digest: String,
    },
}

/// The scheduler's one route table: method, path, who may call it.
#[rustfmt::skip]
const ROUTES: &[Route<Api>] = &[
    route(GET, "/v1/health", ANY, |_| Ok(Api::Health)),
    route(POST, "/v1/nodes/register", OWN_NODE, |_| Ok(Api::RegisterNode)),
    route(POST, "/v1/nodes/{node}/heartbeat", OWN_NODE, |p| Ok(Api::Heartbeat { node: p.parse("node")? })),
    route(GET, "/v1/nodes", ADMIN, |_| Ok(Api::ListNodes)),
    route(POST, "/v1/nodes/{node}/cordon", ADMIN, |p| Ok(Api::CordonNode { node: p.parse("node")? })),
    route(POST, "/v1/nodes/{node}/drain", ADMIN, |p| Ok(Api::DrainNode { node: p.parse("node")? })),
    route(POST, "/v1/nodes/{node}/uncordon", ADMIN, |p| Ok(Api::UncordonNode { node: p.parse("node")? })),
    route(GET, "/v1/nodes/{node}/instances/{instance}", GATEWAY, |p| Ok(Api::PlacedInstance { node: p.parse("node")?, instance: p.parse("instance")? })),
    route(GET, "/v1/nodes/{node}/code/{digest}", GATEWAY, |p| Ok(Api::PlacedCode { node: p.parse("node")?, digest: p.string("digest")? })),
    route(POST, "/v1/leases", GATEWAY, |_| Ok(Api::AcquireLease)),
    route(DELETE, "/v1/leases/{lease}", GATEWAY, |p| Ok(Api::ReleaseLease { lease: p.parse("lease")? })),
    route(POST, "/v1/functions/retire", GATEWAY, |_| Ok(Api::RetireFunction)),
    route(GET, "/v1/instances", ADMIN, |_| Ok(Api::ListInstances)),
    route(PUT, "/v1/functions/provision", ADMIN, |_| Ok(Api::PutProvision)),
    route(DELETE, "/v1/functions/provision", ADMIN, |_| Ok(Api::DeleteProvision)),
    route(GET, "/v1/functions/provision", ADMIN, |_| Ok(Api::ListProvisions)),
    route(GET, "/v1/accounts/{account}/limits", ADMIN, |p| Ok(Api::GetAccountLimits { account: p.parse("account")? })),
    route(PUT, "/v1/accounts/{account}/limits", ADMIN, |p| Ok(Api::PutAccountLimits { account: p.parse("account")? })),
    route(DELETE, "/v1/accounts/{account}/limits", ADMIN, |p| Ok(Api::DeleteAccountLimits { account: p.parse("account")? })),
    route(PUT, "/v1/accounts/{account}/functions/{function}/limits", ADMIN, |p| Ok(Api::PutFunctionLimits { account: p.parse("account")?, function: p.parse("function")? })),
    route(DELETE, "/v1/accounts/{account}/functions/{function}/limits", ADMIN, |p| Ok(Api::DeleteFunctionLimits { account: p.parse("account")?, function: p.parse("function")? })),
    route(GET, "/v1/accounts/{account}/provisions", ADMIN, |p| Ok(Api::ListAccountProvisions { account: p.parse("account")? })),
    route(POST, "/v1/nodes/{node}/revoke", OPERATOR, |p| Ok(Api::RevokeNode { node: p.parse("node")? })),
    route(GET, "/v1/revocations", ANY, |_| Ok(Api::ListRevocations)),
    route(POST, "/v1/certificates/renew", AGENT, |_| Ok(Api::RenewCertificate)),
    route(POST, "/v1/bootstrap-tokens", OPERATOR, |_| Ok(Api::CreateBootstrapToken)),
];

static ROUTER: LazyLock<Router<Api>> = LazyLock::new(|| {
    Router::new(ROUTES)
        .expect("the route table is valid (a unit test builds it)")
        .ignore_trailing_slash()
});

/// Serve one request.
pub async fn handle(sched: Scheduler, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
    let request_id = req
        .headers()
        .get("x-fc-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<RequestId>().ok())
        .unwrap_or_else(RequestId::generate);
    let span = tracing::info_span!(
        "request",
        method = %req.method(),
        path = %req.uri().path(),
        request_id = %request_id,
        peer = %conn.peer,
    );
    async move {
        let caller = conn.identity.as_deref();
        let result = match ROUTER.authorise(req.method(), req.uri().path(), caller) {
            Ok(api) => dispatch(&sched, api, req, &conn).await,
            Err(RouteError::Invalid(e)) => Err(e),
            Err(RouteError::Denied(denied)) => {
                Err(sched.metrics().refusals.refuse(&denied, caller, conn.peer))
            }
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                if e.code == kiln_core::FcErrorCode::AccessDenied {
                    // Logged at warn (with the peer) where it was refused.
                } else if e.code.http_status() >= 500 {
                    tracing::warn!(code = %e.code, message = %e.message, "request failed");
                } else {
                    tracing::debug!(code = %e.code, message = %e.message, "request refused");
                }
                server::error(&e, request_id.as_str())
            }
        };
        if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
            resp.headers_mut().insert("x-fc-request-id", v);
        }
        resp
    }
    .instrument(span)
    .await
}

async fn dispatch(
    sched: &Scheduler,
    api: Api,
    req: Request<Incoming>,
    conn: &ConnInfo,
) -> Result<Response<Body>, FcError> {
    let body = req.into_body();
    match api {
        Api::Health => Ok(server::health()),
        Api::RegisterNode => nodes::register(sched, body, conn).await,
        Api::Heartbeat { node } => nodes::heartbeat(sched, &node, body).await,
        Api::ListNodes => Ok(nodes::list(sched)),
        Api::AcquireLease => leases::acquire(sched, body).await,
        Api::ReleaseLease { lease } => leases::release(sched, &lease, body).await,
        Api::RetireFunction => functions::retire(sched, body).await,
        Api::ListInstances => Ok(instances::list(sched)),
        Api::PutProvision => functions::put_provision(sched, body).await,
        Api::DeleteProvision => functions::delete_provision(sched, body).await,
        Api::ListProvisions => Ok(functions::list_provisions(sched)),
        Api::CordonNode { node } => nodes::action(&node, |n| sched.cordon(n)),
        Api::DrainNode { node } => nodes::action(&node, |n| sched.drain(n)),
        Api::UncordonNode { node } => nodes::action(&node, |n| sched.uncordon(n)),
        Api::GetAccountLimits { account } => Ok(accounts::get_limits(sched, &account)),
        Api::PutAccountLimits { account } => accounts::put_limits(sched, &account, body).await,
        Api::DeleteAccountLimits { account } => accounts::delete_limits(sched, &account).await,
        Api::PutFunctionLimits { account, function } => {
            accounts::put_function_limits(sched, &account, &function, Some(body)).await
        }
        Api::DeleteFunctionLimits { account, function } => {
            accounts::put_function_limits(sched, &account, &function, None).await
        }
        Api::ListAccountProvisions { account } => Ok(accounts::provisions(sched, &account)),
        Api::RevokeNode { node } => trust::revoke(sched, &node, conn),
        Api::ListRevocations => trust::list(sched, conn),
        Api::RenewCertificate => trust::renew(sched, body, conn).await,
        Api::CreateBootstrapToken => trust::create_token(sched, body, conn).await,
        Api::PlacedInstance { node, instance } => placements::instance(sched, &node, &instance),
        Api::PlacedCode { node, digest } => placements::code(sched, &node, &digest),
    }
}

#[cfg(test)]
mod tests {
    use kiln_core::FcErrorCode;

    use super::*;

    fn at(method: Method, path: &str) -> Result<Api, FcError> {
        ROUTER.route_for_tests(&method, path)
    }

    fn node(s: &str) -> NodeId {
        s.parse().unwrap()
    }

    fn account(s: &str) -> AccountId {
        s.parse().unwrap()
    }

    #[test]
    fn the_table_routes_every_path() {
        let cases = [
            (GET, "/v1/health", Api::Health),
            (POST, "/v1/nodes/register", Api::RegisterNode),
            (
                POST,
                "/v1/nodes/n-1/heartbeat",
                Api::Heartbeat { node: node("n-1") },
            ),
            (GET, "/v1/nodes", Api::ListNodes),
            (GET, "/v1/nodes/", Api::ListNodes),
            (
                POST,
                "/v1/nodes/n-1/cordon",
                Api::CordonNode { node: node("n-1") },
            ),
            (
                POST,
                "/v1/nodes/n-1/drain",
                Api::DrainNode { node: node("n-1") },
            ),
            (
                POST,
                "/v1/nodes/n-1/uncordon",
                Api::UncordonNode { node: node("n-1") },
            ),
            (POST, "/v1/leases", Api::AcquireLease),
            (
                DELETE,
                "/v1/leases/l-abc",
                Api::ReleaseLease {
                    lease: "l-abc".parse().unwrap(),
                },
            ),
            (POST, "/v1/functions/retire", Api::RetireFunction),
            (GET, "/v1/instances", Api::ListInstances),
            (PUT, "/v1/functions/provision", Api::PutProvision),
            (DELETE, "/v1/functions/provision", Api::DeleteProvision),
            (GET, "/v1/functions/provision", Api::ListProvisions),
            (
                GET,
                "/v1/accounts/123/limits",
                Api::GetAccountLimits {
                    account: account("123"),
                },
            ),
            (
                PUT,
                "/v1/accounts/123/limits",
                Api::PutAccountLimits {
                    account: account("123"),
                },
            ),
            (
                DELETE,
                "/v1/accounts/123/limits",
                Api::DeleteAccountLimits {
                    account: account("123"),
                },
            ),
            (
                PUT,
                "/v1/accounts/123/functions/f-1/limits",
                Api::PutFunctionLimits {
                    account: account("123"),
                    function: "f-1".parse().unwrap(),
                },
            ),
            (
                DELETE,
                "/v1/accounts/123/functions/f-1/limits",
                Api::DeleteFunctionLimits {
                    account: account("123"),
                    function: "f-1".parse().unwrap(),
                },
            ),
            (
                GET,
                "/v1/accounts/123/provisions",
                Api::ListAccountProvisions {
                    account: account("123"),
                },
            ),
            (
                POST,
                "/v1/nodes/n-1/revoke",
                Api::RevokeNode { node: node("n-1") },
            ),
            (GET, "/v1/revocations", Api::ListRevocations),
            (POST, "/v1/certificates/renew", Api::RenewCertificate),
            (POST, "/v1/bootstrap-tokens", Api::CreateBootstrapToken),
        ];
        for (method, path, want) in cases {
            assert_eq!(at(method.clone(), path).unwrap(), want, "{method} {path}");
        }
        // Every row of the table is covered above.
        assert_eq!(ROUTER.rows().count(), ROUTES.len());
        assert_eq!(ROUTES.len(), 26);
        assert_eq!(
            at(GET, "/v1/nodes/n-1/instances/i-1").unwrap(),
            Api::PlacedInstance {
                node: node("n-1"),
                instance: "i-1".parse().unwrap()
            }
        );
        assert_eq!(
            at(GET, "/v1/nodes/n-1/code/ab12").unwrap(),
            Api::PlacedCode {
                node: node("n-1"),
                digest: "ab12".into()
            }
        );
    }

    /// The route x role table of docs/security.md, row for row: a change
    /// of who may call what changes this test and that page together.
    #[test]
    fn every_route_names_who_may_call_it() {
        let want = [
            ("GET", "/v1/health", "gateway, scheduler, agent, operator"),
            ("POST", "/v1/nodes/register", "agent (own node)"),
            ("POST", "/v1/nodes/{node}/heartbeat", "agent (own node)"),
            ("GET", "/v1/nodes", "gateway, operator"),
            ("POST", "/v1/nodes/{node}/cordon", "gateway, operator"),
            ("POST", "/v1/nodes/{node}/drain", "gateway, operator"),
            ("POST", "/v1/nodes/{node}/uncordon", "gateway, operator"),
            ("GET", "/v1/nodes/{node}/instances/{instance}", "gateway"),
            ("GET", "/v1/nodes/{node}/code/{digest}", "gateway"),
            ("POST", "/v1/leases", "gateway"),
            ("DELETE", "/v1/leases/{lease}", "gateway"),
            ("POST", "/v1/functions/retire", "gateway"),
            ("GET", "/v1/instances", "gateway, operator"),
            ("PUT", "/v1/functions/provision", "gateway, operator"),
            ("DELETE", "/v1/functions/provision", "gateway, operator"),
            ("GET", "/v1/functions/provision", "gateway, operator"),
            ("GET", "/v1/accounts/{account}/limits", "gateway, operator"),
            ("PUT", "/v1/accounts/{account}/limits", "gateway, operator"),
            (
                "DELETE",
                "/v1/accounts/{account}/limits",
                "gateway, operator",
            ),
            (
                "PUT",
                "/v1/accounts/{account}/functions/{function}/limits",
                "gateway, operator",
            ),
            (
                "DELETE",
                "/v1/accounts/{account}/functions/{function}/limits",
                "gateway, operator",
            ),
            (
                "GET",
                "/v1/accounts/{account}/provisions",
                "gateway, operator",
            ),
            ("POST", "/v1/nodes/{node}/revoke", "operator"),
            (
                "GET",
                "/v1/revocations",
                "gateway, scheduler, agent, operator",
            ),
            ("POST", "/v1/certificates/renew", "agent"),
            ("POST", "/v1/bootstrap-tokens", "operator"),
        ];
        let mut have: Vec<(String, &str, String)> = ROUTER
            .rows()
            .map(|(m, p, c)| (m.to_string(), p, c.to_string()))
            .collect();
        let mut want: Vec<(String, &str, String)> = want
            .iter()
            .map(|(m, p, c)| (m.to_string(), *p, c.to_string()))
            .collect();
        have.sort();
        want.sort();
        assert_eq!(have, want);
    }

    #[test]
    fn an_agent_reaches_only_its_own_node_routes() {
        let a = kiln_pki::Identity::agent("kiln", node("n-a")).unwrap();
        let operator = kiln_pki::Identity::service("kiln", Operator).unwrap();
        let ok = |m: Method, p: &str, who| ROUTER.authorise(&m, p, Some(who)).is_ok();
        assert!(ok(POST, "/v1/nodes/n-a/heartbeat", &a));
        assert!(ok(POST, "/v1/nodes/register", &a));
        assert!(!ok(POST, "/v1/nodes/n-b/heartbeat", &a));
        assert!(!ok(POST, "/v1/nodes/n-a/cordon", &a));
        assert!(!ok(PUT, "/v1/accounts/123/limits", &a));
        assert!(!ok(POST, "/v1/leases", &a));
        assert!(!ok(GET, "/v1/nodes/n-a/code/ab", &a));
        assert!(ok(POST, "/v1/nodes/n-a/cordon", &operator));
        assert!(!ok(POST, "/v1/nodes/n-a/heartbeat", &operator));
        assert!(!ok(POST, "/v1/leases", &operator));
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let code = |m: Method, p: &str| at(m, p).unwrap_err().code;
        assert_eq!(code(GET, "/v1/leases"), FcErrorCode::MethodNotAllowed);
        assert_eq!(
            code(POST, "/v1/accounts/123/limits"),
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(code(GET, "/v1/nope"), FcErrorCode::PathNotSupported);
        assert_eq!(
            code(POST, "/v1/nodes//heartbeat"),
            FcErrorCode::PathNotSupported
        );
    }

    #[test]
    fn ids_are_checked_at_the_edge() {
        let e = at(POST, "/v1/nodes/a%2Fb/heartbeat").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
        let e = at(GET, "/v1/accounts/not-a-number!/limits").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
    }
}
