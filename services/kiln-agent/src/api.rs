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

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, InstanceId, RequestId};
use kiln_internal_api::server::{self, error, json, no_content, read_json, Body};
use kiln_internal_api::{paths, CreateInstance};
use tracing::Instrument;

use crate::instances::InstanceManager;

/// Control messages are small; anything bigger is not one.
const CONTROL_BODY_MAX: usize = 1 << 20;

enum Route<'a> {
    Health,
    Logs,
    Exec(&'a str),
    Instances,
    Instance(&'a str),
    Invoke(&'a str),
    Unknown,
}

fn route(path: &str) -> Route<'_> {
    if path == paths::HEALTH {
        return Route::Health;
    }
    if path == paths::AGENT_LOGS {
        return Route::Logs;
    }
    let Some(rest) = path.strip_prefix(paths::AGENT_INSTANCES) else {
        return Route::Unknown;
    };
    match rest {
        "" | "/" => Route::Instances,
        _ => {
            let Some(rest) = rest.strip_prefix('/') else {
                return Route::Unknown;
            };
            match rest.split_once('/') {
                None if !rest.is_empty() => Route::Instance(rest),
                Some((id, "invoke")) if !id.is_empty() => Route::Invoke(id),
                Some((id, "exec")) if !id.is_empty() => Route::Exec(id),
                _ => Route::Unknown,
            }
        }
    }
}

fn request_id(req: &Request<Incoming>) -> String {
    req.headers()
        .get("x-fc-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| RequestId::generate().to_string())
}

fn method_not_allowed(method: &Method, path: &str, rid: &str) -> Response<Body> {
    error(
        &FcError::new(
            FcErrorCode::MethodNotAllowed,
            format!("method {method} is not allowed on {path}"),
        ),
        rid,
    )
}

fn parse_id(id: &str) -> Result<InstanceId, FcError> {
    id.parse()
        .map_err(|e: kiln_core::IdError| FcError::invalid_argument(e.to_string()))
}

/// Serve one request.
pub async fn handle(manager: Arc<InstanceManager>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    match (route(path), req.method()) {
        // The warm path: no owned copies of the path, a debug-level span.
        (Route::Invoke(id), &Method::POST) => {
            let span = tracing::debug_span!("invoke", instance_id = %id);
            let target = manager.get(id).ok_or_else(|| id.to_owned());
            manager.invoke(target, req).instrument(span).await
        }
        _ => {
            let span = tracing::info_span!(
                "request",
                method = %req.method(),
                path = %req.uri().path(),
            );
            control(manager, req).instrument(span).await
        }
    }
}

async fn control(manager: Arc<InstanceManager>, req: Request<Incoming>) -> Response<Body> {
    let rid = request_id(&req);
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = match (route(&path), &method) {
        (Route::Health, &Method::GET) => server::health(),
        (Route::Logs, &Method::GET) => match crate::logs::parse_query(req.uri().query()) {
            Ok((account, function, q)) => json(
                StatusCode::OK,
                &kiln_internal_api::LogRecords {
                    records: manager.logs().query(&account, &function, &q),
                },
            ),
            Err(e) => error(&e, &rid),
        },
        (Route::Exec(id), &Method::POST) => {
            let target = manager.get(id).ok_or_else(|| id.to_owned());
            crate::exec::serve(manager.clone(), target, req, &rid).await
        }
        (Route::Instances, &Method::GET) => json(StatusCode::OK, &manager.list()),
        (Route::Instances, &Method::POST) => {
            match read_json::<CreateInstance>(req.into_body(), CONTROL_BODY_MAX).await {
                Err(e) => error(&e, &rid),
                Ok(create) => match manager.create(create).await {
                    Ok(created) => json(StatusCode::OK, &created),
                    Err(e) => error(&e.to_fc(), &rid),
                },
            }
        }
        (Route::Instance(id), &Method::DELETE) => match parse_id(id) {
            Err(e) => error(&e, &rid),
            Ok(id) => match manager.destroy(&id).await {
                Ok(()) => no_content(),
                Err(e) => error(&e.to_fc(), &rid),
            },
        },
        (
            Route::Health
            | Route::Logs
            | Route::Exec(_)
            | Route::Instances
            | Route::Instance(_)
            | Route::Invoke(_),
            _,
        ) => method_not_allowed(&method, &path, &rid),
        (Route::Unknown, _) => server::not_found(&path, &rid),
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
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(route("/v1/health"), Route::Health));
        assert!(matches!(route("/v1/instances"), Route::Instances));
        assert!(matches!(route("/v1/instances/i-1"), Route::Instance("i-1")));
        assert!(matches!(
            route("/v1/instances/i-1/invoke"),
            Route::Invoke("i-1")
        ));
        assert!(matches!(route("/v1/instances/i-1/other"), Route::Unknown));
        assert!(matches!(route("/v1/instances//invoke"), Route::Unknown));
        assert!(matches!(route("/v1/instancesx"), Route::Unknown));
        assert!(matches!(route("/v1/instancesab"), Route::Unknown));
        assert!(matches!(route("/v2/instances"), Route::Unknown));
    }
}
