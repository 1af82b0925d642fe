//! The agent's internal API (mTLS), one table of routes:
//!
//! | method | path                         | what                          |
//! |--------|------------------------------|-------------------------------|
//! | POST   | /v1/instances                | create, wait for the port     |
//! | GET    | /v1/instances                | list                          |
//! | DELETE | /v1/instances/{id}           | destroy (idempotent)          |
//! | POST   | /v1/instances/{id}/invoke    | forward an invocation         |
//! | GET    | /v1/health                   | liveness                      |
//! | GET    | /v1/logs                     | a function's logs (logs.rs)   |
//! | POST   | /v1/instances/{id}/exec      | run a command (exec.rs)       |

use std::sync::{Arc, LazyLock};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, InstanceId, RequestId};
use kiln_internal_api::router::{route, Route, Router};
use kiln_internal_api::server::{self, error, json, no_content, read_json, Body};
use kiln_internal_api::CreateInstance;
use tracing::Instrument;

use crate::instances::InstanceManager;

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
    Exec {
        id: String,
    },
    DestroyInstance {
        id: InstanceId,
    },
}

/// The agent's one route table.
#[rustfmt::skip]
const ROUTES: &[Route<Api>] = &[
    route(Method::GET, "/v1/health", |_| Ok(Api::Health)),
    route(Method::GET, "/v1/logs", |_| Ok(Api::Logs)),
    route(Method::GET, "/v1/instances", |_| Ok(Api::ListInstances)),
    route(Method::POST, "/v1/instances", |_| Ok(Api::CreateInstance)),
    route(Method::DELETE, "/v1/instances/{id}", |p| Ok(Api::DestroyInstance { id: p.parse("id")? })),
    route(Method::POST, "/v1/instances/{id}/invoke", |p| Ok(Api::Invoke { id: p.string("id")? })),
    route(Method::POST, "/v1/instances/{id}/exec", |p| Ok(Api::Exec { id: p.string("id")? })),
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

/// Serve one request.
pub async fn handle(manager: Arc<InstanceManager>, req: Request<Incoming>) -> Response<Body> {
    match ROUTER.route(req.method(), req.uri().path()) {
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
        Ok(Api::Exec { id }) => {
            let target = manager.get(&id).ok_or(id);
            crate::exec::serve(manager.clone(), target, req, &rid).await
        }
        Ok(Api::ListInstances) => json(StatusCode::OK, &manager.list()),
        Ok(Api::CreateInstance) => {
            match read_json::<CreateInstance>(req.into_body(), CONTROL_BODY_MAX).await {
                Err(e) => error(&e, &rid),
                Ok(create) => match manager.create(create).await {
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

    fn at(method: Method, path: &str) -> Result<Api, FcError> {
        ROUTER.route(&method, path)
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
        ];
        for (method, path, want) in cases {
            assert_eq!(at(method.clone(), path).unwrap(), want, "{method} {path}");
        }
        assert_eq!(ROUTER.rows().count(), ROUTES.len());
        assert_eq!(ROUTES.len(), 7);
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

    #[test]
    fn destroy_checks_the_instance_id() {
        let e = at(Method::DELETE, "/v1/instances/a%2Fb").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
    }
}
