//! The agent's internal API (mTLS), one table of routes, each with the
//! roles that may call it (docs/security.md prints it):
//!
//! | method | path                         | callers   | what                        |
//! |--------|------------------------------|-----------|-----------------------------|
//! | POST   | /v1/instances                | scheduler | create, wait for the port   |
//! | GET    | /v1/instances                | scheduler, operator | list              |
//! | DELETE | /v1/instances/{id}           | scheduler | destroy (idempotent)        |
//! | POST   | /v1/instances/{id}/invoke    | gateway   | forward an invocation       |
//! | GET    | /v1/instances/{id}/websocket | gateway   | a WebSocket (websocket.rs)  |
//! | GET    | /v1/health                   | any       | liveness                    |
//! | GET    | /v1/logs                     | gateway   | a function's logs (logs.rs) |
//! | POST   | /v1/instances/{id}/exec      | gateway   | run a command (exec.rs)     |
//!
//! Each caller gets only what it needs: the scheduler places and removes
//! instances but never sees an invocation or a shell; the gateway invokes,
//! execs and reads logs but cannot create or destroy; another agent gets
//! nothing but health.

use std::sync::{Arc, LazyLock};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, InstanceId, RequestId};
use kiln_internal_api::router::{route, Callers, Route, RouteError, Router};
use kiln_internal_api::server::{self, error, json, no_content, read_json, Body, ConnInfo};
use kiln_internal_api::CreateInstance;
use tracing::Instrument;

use crate::instances::InstanceManager;

use kiln_pki::Role::{Gateway, Operator, Scheduler};

/// Any cluster identity (health).
const ANY: Callers = Callers::ANY;
/// The scheduler: instance lifecycle.
const SCHEDULER: Callers = Callers::of(&[Scheduler]);
/// The gateway: calls into instances.
const GATEWAY: Callers = Callers::of(&[Gateway]);
/// Read-only: what runs here.
const LIST: Callers = Callers::of(&[Scheduler, Operator]);

/// Control messages are small; anything bigger is not one.
const CONTROL_BODY_MAX: usize = 1 << 20;

/// Every route of the agent's API, with its typed path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Api {
    Health,
    Logs,
    ListInstances,
    CreateInstance,
    /// `id` is looked up as given: an unknown id is the instance manager's
    /// answer (FunctionNotStarted), not a parse error.
    Invoke {
        id: String,
    },
    /// An HTTP trigger's WebSocket handshake (an HTTP/1.1 upgrade).
    WebSocket {
        id: String,
    },
    Exec {
        id: String,
    },
    DestroyInstance {
        id: InstanceId,
    },
}

/// The agent's one route table: method, path, who may call it.
#[rustfmt::skip]
const ROUTES: &[Route<Api>] = &[
    route(Method::GET, "/v1/health", ANY, |_| Ok(Api::Health)),
    route(Method::GET, "/v1/logs", GATEWAY, |_| Ok(Api::Logs)),
    route(Method::GET, "/v1/instances", LIST, |_| Ok(Api::ListInstances)),
    route(Method::POST, "/v1/instances", SCHEDULER, |_| Ok(Api::CreateInstance)),
    route(Method::DELETE, "/v1/instances/{id}", SCHEDULER, |p| Ok(Api::DestroyInstance { id: p.parse("id")? })),
    route(Method::POST, "/v1/instances/{id}/invoke", GATEWAY, |p| Ok(Api::Invoke { id: p.string("id")? })),
    route(Method::POST, "/v1/instances/{id}/exec", GATEWAY, |p| Ok(Api::Exec { id: p.string("id")? })),
    route(Method::GET, "/v1/instances/{id}/websocket", GATEWAY, |p| Ok(Api::WebSocket { id: p.string("id")? })),
];

static ROUTER: LazyLock<Router<Api>> = LazyLock::new(|| {
    Router::new(ROUTES)
        .expect("the route table is valid (a unit test builds it)")
        .ignore_trailing_slash()
});

fn request_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-fc-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| RequestId::generate().to_string())
}

/// Serve one request from the peer of `conn`.
pub async fn handle(
    manager: Arc<InstanceManager>,
    req: Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    let caller = conn.identity.as_deref();
    let routed = match ROUTER.authorise(req.method(), req.uri().path(), caller) {
        Ok(api) => Ok(api),
        Err(RouteError::Invalid(e)) => Err(e),
        Err(RouteError::Denied(denied)) => {
            let e = manager.metrics.refusals.refuse(&denied, caller, conn.peer);
            return error(&e, &request_id(&req));
        }
    };
    match routed {
        // The warm path: no request id lookup, a debug-level span.
        Ok(Api::Invoke { id }) => {
            let span = tracing::debug_span!("invoke", instance_id = %id);
            invoke(&manager, id, req).instrument(span).await
        }
        routed => {
            let span = tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
            );
            control(manager, routed, req).instrument(span).await
        }
    }
}

/// The fencing token a clustered scheduler stamps its calls with.
fn leader_token(req: &Request<Incoming>) -> Result<Option<i64>, FcError> {
    req.headers()
        .get(kiln_internal_api::headers::LEADER_TOKEN)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .filter(|t| *t > 0)
                .ok_or_else(|| {
                    FcError::invalid_argument(format!(
                        "{} must be a positive integer",
                        kiln_internal_api::headers::LEADER_TOKEN
                    ))
                })
        })
        .transpose()
}

async fn invoke(
    manager: &Arc<InstanceManager>,
    id: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let target = manager.get(&id).ok_or(id);
    manager.invoke(target, req).await
}

async fn control(
    manager: Arc<InstanceManager>,
    routed: Result<Api, FcError>,
    req: Request<Incoming>,
) -> Response<Body> {
    let rid = request_id(&req);
    let resp = match routed {
        Err(e) => error(&e, &rid),
        Ok(Api::Health) => server::health(),
        Ok(Api::Logs) => match crate::logs::parse_query(req.uri().query()) {
            Ok((account, function, q)) => json(
                StatusCode::OK,
                &kiln_internal_api::LogRecords {
                    records: manager.logs().query(&account, &function, &q),
                },
            ),
            Err(e) => error(&e, &rid),
        },
        Ok(Api::Invoke { id }) => invoke(&manager, id, req).await,
        Ok(Api::WebSocket { id }) => {
            let target = manager.get(&id).ok_or(id);
            manager.websocket(target, req).await
        }
        Ok(Api::Exec { id }) => {
            let target = manager.get(&id).ok_or(id);
            crate::exec::serve(manager.clone(), target, req, &rid).await
        }
        Ok(Api::ListInstances) => json(StatusCode::OK, &manager.list()),
        Ok(Api::CreateInstance | Api::DestroyInstance { .. })
            if let Err(e) = leader_token(&req).and_then(|t| manager.leader().admit(t)) =>
        {
            error(&e, &rid)
        }
        Ok(Api::CreateInstance) => {
            match read_json::<CreateInstance>(req.into_body(), CONTROL_BODY_MAX).await {
                Err(e) => error(&e, &rid),
                // Boxed: creating an instance is the cold path, and its
                // future would otherwise size every request's (hyper moves
                // a request's future into place for each request).
                Ok(create) => match Box::pin(manager.create(create)).await {
                    Ok(created) => json(StatusCode::OK, &created),
                    Err(e) => error(&e.to_fc(), &rid),
                },
            }
        }
        Ok(Api::DestroyInstance { id }) => match manager.destroy(&id).await {
            Ok(()) => no_content(),
            Err(e) => error(&e.to_fc(), &rid),
        },
    };
    if resp.status().is_server_error() {
        tracing::warn!(status = resp.status().as_u16(), "request failed");
    } else {
        tracing::debug!(status = resp.status().as_u16(), "request served");
    }
    resp
}

#[cfg(test)]
mod tests {
    use kiln_core::FcErrorCode;
    use kiln_internal_api::paths;

    use super::*;

    /// hyper moves each request's future into place: an invocation's
    /// does not carry the size of creating an instance (boxed; before, the
    /// agent's request future was 11 KB).
    #[test]
    fn a_requests_future_stays_small() {
        fn size_of_handle<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<InstanceManager>, Request<Incoming>, ConnInfo) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = size_of_handle(handle);
        assert!(size <= 6 * 1024, "api::handle's future is {size} bytes");
    }

    fn at(method: Method, path: &str) -> Result<Api, FcError> {
        ROUTER.route_for_tests(&method, path)
    }

    #[test]
    fn the_table_routes_every_path() {
        let cases = [
            (Method::GET, paths::HEALTH, Api::Health),
            (Method::GET, paths::AGENT_LOGS, Api::Logs),
            (Method::GET, paths::AGENT_INSTANCES, Api::ListInstances),
            (Method::GET, "/v1/instances/", Api::ListInstances),
            (Method::POST, paths::AGENT_INSTANCES, Api::CreateInstance),
            (
                Method::DELETE,
                "/v1/instances/i-1",
                Api::DestroyInstance {
                    id: "i-1".parse().unwrap(),
                },
            ),
            (
                Method::POST,
                "/v1/instances/i-1/invoke",
                Api::Invoke { id: "i-1".into() },
            ),
            (
                Method::POST,
                "/v1/instances/i-1/exec",
                Api::Exec { id: "i-1".into() },
            ),
            (
                Method::GET,
                "/v1/instances/i-1/websocket",
                Api::WebSocket { id: "i-1".into() },
            ),
        ];
        for (method, path, want) in cases {
            assert_eq!(at(method.clone(), path).unwrap(), want, "{method} {path}");
        }
        assert_eq!(ROUTER.rows().count(), ROUTES.len());
        assert_eq!(ROUTES.len(), 8);
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let code = |m: Method, p: &str| at(m, p).unwrap_err().code;
        for path in [
            "/v1/instances/i-1/other",
            "/v1/instances//invoke",
            "/v1/instancesx",
            "/v1/instancesab",
            "/v2/instances",
        ] {
            assert_eq!(
                code(Method::POST, path),
                FcErrorCode::PathNotSupported,
                "{path}"
            );
        }
        assert_eq!(
            code(Method::GET, "/v1/instances/i-1/invoke"),
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(
            code(Method::PUT, "/v1/instances"),
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(
            code(Method::POST, "/v1/health"),
            FcErrorCode::MethodNotAllowed
        );
    }

    /// The route x role table of docs/security.md, row for row.
    #[test]
    fn every_route_names_who_may_call_it() {
        let mut have: Vec<String> = ROUTER
            .rows()
            .map(|(m, p, c)| format!("{m} {p}: {c}"))
            .collect();
        have.sort();
        let mut want = vec![
            "GET /v1/health: gateway, scheduler, agent, operator",
            "GET /v1/logs: gateway",
            "GET /v1/instances: scheduler, operator",
            "POST /v1/instances: scheduler",
            "DELETE /v1/instances/{id}: scheduler",
            "POST /v1/instances/{id}/invoke: gateway",
            "POST /v1/instances/{id}/exec: gateway",
            "GET /v1/instances/{id}/websocket: gateway",
        ];
        want.sort();
        assert_eq!(have, want);
    }

    #[test]
    fn another_agent_gets_nothing_but_health() {
        let other = kiln_pki::Identity::agent("kiln", "n-b".parse().unwrap()).unwrap();
        for (m, p) in [
            (Method::POST, "/v1/instances/i-1/exec"),
            (Method::POST, "/v1/instances/i-1/invoke"),
            (Method::GET, "/v1/instances/i-1/websocket"),
            (Method::POST, "/v1/instances"),
            (Method::DELETE, "/v1/instances/i-1"),
            (Method::GET, "/v1/instances"),
            (Method::GET, "/v1/logs"),
        ] {
            assert!(
                matches!(
                    ROUTER.authorise(&m, p, Some(&other)),
                    Err(RouteError::Denied(_))
                ),
                "{m} {p}"
            );
        }
        assert!(ROUTER
            .authorise(&Method::GET, "/v1/health", Some(&other))
            .is_ok());
    }

    #[test]
    fn destroy_checks_the_instance_id() {
        let e = at(Method::DELETE, "/v1/instances/a%2Fb").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
    }
}
