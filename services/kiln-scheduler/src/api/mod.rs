//! The scheduler's internal API (mTLS HTTP/2): every route in one table,
//! one file per resource, every request in a span, errors in FC's shape.

mod accounts;
mod functions;
mod instances;
mod leases;
mod nodes;

use http::{HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, RequestId};
use kiln_internal_api::server::{self, Body, ConnInfo};
use tracing::Instrument;

use crate::service::Scheduler;

/// Largest control message accepted: a registration listing a few
/// thousand instance ids fits easily.
const BODY_LIMIT: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    RegisterNode,
    Heartbeat,
    ListNodes,
    AcquireLease,
    ReleaseLease,
    RetireFunction,
    ListInstances,
    PutProvision,
    DeleteProvision,
    ListProvisions,
    CordonNode,
    DrainNode,
    UncordonNode,
    GetAccountLimits,
    PutAccountLimits,
    DeleteAccountLimits,
    PutFunctionLimits,
    DeleteFunctionLimits,
    ListAccountProvisions,
}

struct Route {
    method: Method,
    /// `{name}` segments capture one path segment.
    path: &'static str,
    endpoint: Endpoint,
}

const ROUTES: &[Route] = &[
    Route {
        method: Method::GET,
        path: "/v1/health",
        endpoint: Endpoint::Health,
    },
    Route {
        method: Method::POST,
        path: "/v1/nodes/register",
        endpoint: Endpoint::RegisterNode,
    },
    Route {
        method: Method::POST,
        path: "/v1/nodes/{node}/heartbeat",
        endpoint: Endpoint::Heartbeat,
    },
    Route {
        method: Method::GET,
        path: "/v1/nodes",
        endpoint: Endpoint::ListNodes,
    },
    Route {
        method: Method::POST,
        path: "/v1/leases",
        endpoint: Endpoint::AcquireLease,
    },
    Route {
        method: Method::DELETE,
        path: "/v1/leases/{lease}",
        endpoint: Endpoint::ReleaseLease,
    },
    Route {
        method: Method::POST,
        path: "/v1/functions/retire",
        endpoint: Endpoint::RetireFunction,
    },
    Route {
        method: Method::GET,
        path: "/v1/instances",
        endpoint: Endpoint::ListInstances,
    },
    Route {
        method: Method::PUT,
        path: "/v1/functions/provision",
        endpoint: Endpoint::PutProvision,
    },
    Route {
        method: Method::DELETE,
        path: "/v1/functions/provision",
        endpoint: Endpoint::DeleteProvision,
    },
    Route {
        method: Method::GET,
        path: "/v1/functions/provision",
        endpoint: Endpoint::ListProvisions,
    },
    Route {
        method: Method::POST,
        path: "/v1/nodes/{node}/cordon",
        endpoint: Endpoint::CordonNode,
    },
    Route {
        method: Method::POST,
        path: "/v1/nodes/{node}/drain",
        endpoint: Endpoint::DrainNode,
    },
    Route {
        method: Method::POST,
        path: "/v1/nodes/{node}/uncordon",
        endpoint: Endpoint::UncordonNode,
    },
    Route {
        method: Method::GET,
        path: "/v1/accounts/{account}/limits",
        endpoint: Endpoint::GetAccountLimits,
    },
    Route {
        method: Method::PUT,
        path: "/v1/accounts/{account}/limits",
        endpoint: Endpoint::PutAccountLimits,
    },
    Route {
        method: Method::DELETE,
        path: "/v1/accounts/{account}/limits",
        endpoint: Endpoint::DeleteAccountLimits,
    },
    Route {
        method: Method::PUT,
        path: "/v1/accounts/{account}/functions/{function}/limits",
        endpoint: Endpoint::PutFunctionLimits,
    },
    Route {
        method: Method::DELETE,
        path: "/v1/accounts/{account}/functions/{function}/limits",
        endpoint: Endpoint::DeleteFunctionLimits,
    },
    Route {
        method: Method::GET,
        path: "/v1/accounts/{account}/provisions",
        endpoint: Endpoint::ListAccountProvisions,
    },
];

enum Matched<'a> {
    Found(Endpoint, Vec<&'a str>),
    WrongMethod,
    NotFound,
}

fn route<'a>(method: &Method, path: &'a str) -> Matched<'a> {
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    let mut wrong_method = false;
    for r in ROUTES {
        let pat: Vec<&str> = r.path.split('/').collect();
        if pat.len() != segs.len() {
            continue;
        }
        let mut params = Vec::new();
        let fits = pat.iter().zip(&segs).all(|(p, s)| {
            if p.starts_with('{') {
                params.push(*s);
                !s.is_empty()
            } else {
                p == s
            }
        });
        if !fits {
            continue;
        }
        if r.method == method {
            return Matched::Found(r.endpoint, params);
        }
        wrong_method = true;
    }
    if wrong_method {
        Matched::WrongMethod
    } else {
        Matched::NotFound
    }
}

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
        let path = req.uri().path().to_owned();
        let result = match route(req.method(), &path) {
            Matched::Found(endpoint, params) => dispatch(&sched, endpoint, &params, req).await,
            Matched::WrongMethod => Err(FcError::new(
                FcErrorCode::MethodNotAllowed,
                format!("method {} is not allowed on {path:?}", req.method()),
            )),
            Matched::NotFound => Err(FcError::new(
                FcErrorCode::PathNotSupported,
                format!("path {path:?} is not supported"),
            )),
        };
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                if e.code.http_status() >= 500 {
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
    endpoint: Endpoint,
    params: &[&str],
    req: Request<Incoming>,
) -> Result<Response<Body>, FcError> {
    let body = req.into_body();
    match endpoint {
        Endpoint::Health => Ok(server::health()),
        Endpoint::RegisterNode => nodes::register(sched, body).await,
        Endpoint::Heartbeat => nodes::heartbeat(sched, params[0], body).await,
        Endpoint::ListNodes => Ok(nodes::list(sched)),
        Endpoint::AcquireLease => leases::acquire(sched, body).await,
        Endpoint::ReleaseLease => leases::release(sched, params[0], body).await,
        Endpoint::RetireFunction => functions::retire(sched, body).await,
        Endpoint::ListInstances => Ok(instances::list(sched)),
        Endpoint::PutProvision => functions::put_provision(sched, body).await,
        Endpoint::DeleteProvision => functions::delete_provision(sched, body).await,
        Endpoint::ListProvisions => Ok(functions::list_provisions(sched)),
        Endpoint::CordonNode => nodes::action(params[0], |n| sched.cordon(n)),
        Endpoint::DrainNode => nodes::action(params[0], |n| sched.drain(n)),
        Endpoint::UncordonNode => nodes::action(params[0], |n| sched.uncordon(n)),
        Endpoint::GetAccountLimits => accounts::get_limits(sched, params[0]),
        Endpoint::PutAccountLimits => accounts::put_limits(sched, params[0], body).await,
        Endpoint::DeleteAccountLimits => accounts::delete_limits(sched, params[0]).await,
        Endpoint::PutFunctionLimits => {
            accounts::put_function_limits(sched, params[0], params[1], Some(body)).await
        }
        Endpoint::DeleteFunctionLimits => {
            accounts::put_function_limits(sched, params[0], params[1], None).await
        }
        Endpoint::ListAccountProvisions => accounts::provisions(sched, params[0]),
    }
}

/// Parse an id from the path, or say which one is wrong.
fn path_id<T: std::str::FromStr<Err = kiln_core::IdError>>(s: &str) -> Result<T, FcError> {
    s.parse::<T>()
        .map_err(|e| FcError::invalid_argument(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_routes_every_path() {
        let m = |method: Method, path: &str| match route(&method, path) {
            Matched::Found(e, p) => Some((e, p.iter().map(|s| s.to_string()).collect::<Vec<_>>())),
            _ => None,
        };
        assert_eq!(m(Method::GET, "/v1/health").unwrap().0, Endpoint::Health);
        assert_eq!(
            m(Method::POST, "/v1/nodes/n-1/heartbeat").unwrap(),
            (Endpoint::Heartbeat, vec!["n-1".to_string()])
        );
        assert_eq!(
            m(Method::DELETE, "/v1/leases/l-abc").unwrap(),
            (Endpoint::ReleaseLease, vec!["l-abc".to_string()])
        );
        assert_eq!(m(Method::GET, "/v1/nodes/").unwrap().0, Endpoint::ListNodes);
        assert!(matches!(
            route(&Method::GET, "/v1/leases"),
            Matched::WrongMethod
        ));
        assert!(matches!(route(&Method::GET, "/v1/nope"), Matched::NotFound));
        assert_eq!(
            m(Method::PUT, "/v1/accounts/123/limits").unwrap(),
            (Endpoint::PutAccountLimits, vec!["123".to_string()])
        );
        assert_eq!(
            m(Method::POST, "/v1/nodes/n-1/drain").unwrap(),
            (Endpoint::DrainNode, vec!["n-1".to_string()])
        );
        assert!(matches!(
            route(&Method::POST, "/v1/accounts/123/limits"),
            Matched::WrongMethod
        ));
        assert_eq!(
            m(Method::PUT, "/v1/accounts/123/functions/f-1/limits").unwrap(),
            (
                Endpoint::PutFunctionLimits,
                vec!["123".to_string(), "f-1".to_string()]
            )
        );
        assert_eq!(
            m(Method::GET, "/v1/accounts/123/provisions").unwrap().0,
            Endpoint::ListAccountProvisions
        );
        assert!(matches!(
            route(&Method::POST, "/v1/nodes//heartbeat"),
            Matched::NotFound
        ));
    }
}
