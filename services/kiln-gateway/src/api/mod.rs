//! The public FC 2023-03-30 API: one route table, one file per resource,
//! and one function turning errors into FC-shaped responses.

pub mod async_api;
pub mod concurrency;
pub mod error;
pub mod functions;
pub mod instances;
pub mod internal;
pub mod invoke;
pub mod layers;
pub mod logs;
pub mod provision;
pub mod request;
pub mod respond;
pub mod roles;
pub mod vpc;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method, Response};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, FunctionName, RequestId};
use kiln_internal_api::server::{Body, ConnInfo};
use tracing::Instrument;

pub use crate::gateway::Gateway;
pub use error::{to_fc, ApiError};
pub use request::{caller_function, not_found, query_param, read_body};

use crate::auth::Caller;

pub const API_VERSION: &str = "2023-03-30";
pub use respond::REQUEST_ID;

/// The operations of the public API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    CreateFunction,
    ListFunctions,
    GetFunction,
    UpdateFunction,
    DeleteFunction,
    InvokeFunction,
    PutAsyncInvokeConfig,
    GetAsyncInvokeConfig,
    DeleteAsyncInvokeConfig,
    ListAsyncInvokeConfigs,
    GetAsyncTask,
    ListAsyncTasks,
    StopAsyncTask,
    PutProvisionConfig,
    GetProvisionConfig,
    DeleteProvisionConfig,
    ListProvisionConfigs,
    PutConcurrencyConfig,
    GetConcurrencyConfig,
    DeleteConcurrencyConfig,
    ListConcurrencyConfigs,
    /// Kiln extension (RAM's stand-in): roles and their policies.
    PutRole,
    GetRole,
    ListRoles,
    DeleteRole,
    CreateLayerVersion,
    GetLayerVersion,
    GetLayerVersionByArn,
    ListLayers,
    ListLayerVersions,
    DeleteLayerVersion,
    PutLayerACL,
    /// Kiln extension: the runtime catalogue and each runtime's status.
    ListRuntimes,
    ListInstances,
    InstanceExec,
    /// Kiln extension: a function's logs (FC keeps them in SLS).
    GetFunctionLogs,
    CreateVpcBinding,
    DeleteVpcBinding,
    ListVpcBindings,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreateFunction => "CreateFunction",
            Self::ListFunctions => "ListFunctions",
            Self::GetFunction => "GetFunction",
            Self::UpdateFunction => "UpdateFunction",
            Self::DeleteFunction => "DeleteFunction",
            Self::InvokeFunction => "InvokeFunction",
            Self::PutAsyncInvokeConfig => "PutAsyncInvokeConfig",
            Self::GetAsyncInvokeConfig => "GetAsyncInvokeConfig",
            Self::DeleteAsyncInvokeConfig => "DeleteAsyncInvokeConfig",
            Self::ListAsyncInvokeConfigs => "ListAsyncInvokeConfigs",
            Self::GetAsyncTask => "GetAsyncTask",
            Self::ListAsyncTasks => "ListAsyncTasks",
            Self::StopAsyncTask => "StopAsyncTask",
            Self::PutProvisionConfig => "PutProvisionConfig",
            Self::GetProvisionConfig => "GetProvisionConfig",
            Self::DeleteProvisionConfig => "DeleteProvisionConfig",
            Self::ListProvisionConfigs => "ListProvisionConfigs",
            Self::PutConcurrencyConfig => "PutConcurrencyConfig",
            Self::GetConcurrencyConfig => "GetConcurrencyConfig",
            Self::DeleteConcurrencyConfig => "DeleteConcurrencyConfig",
            Self::ListConcurrencyConfigs => "ListConcurrencyConfigs",
            Self::PutRole => "PutRole",
            Self::GetRole => "GetRole",
            Self::ListRoles => "ListRoles",
            Self::DeleteRole => "DeleteRole",
            Self::CreateLayerVersion => "CreateLayerVersion",
            Self::GetLayerVersion => "GetLayerVersion",
            Self::GetLayerVersionByArn => "GetLayerVersionByArn",
            Self::ListLayers => "ListLayers",
            Self::ListLayerVersions => "ListLayerVersions",
            Self::DeleteLayerVersion => "DeleteLayerVersion",
            Self::PutLayerACL => "PutLayerACL",
            Self::ListRuntimes => "ListRuntimes",
            Self::ListInstances => "ListInstances",
            Self::InstanceExec => "InstanceExec",
            Self::GetFunctionLogs => "GetFunctionLogs",
            Self::CreateVpcBinding => "CreateVpcBinding",
            Self::DeleteVpcBinding => "DeleteVpcBinding",
            Self::ListVpcBindings => "ListVpcBindings",
        }
    }
}

/// The route table: method, path pattern (`{name}` is a function name,
/// `{task}` an async task id).
const ROUTES: &[(Method, &str, Operation)] = &[
    (
        Method::POST,
        "/2023-03-30/functions",
        Operation::CreateFunction,
    ),
    (
        Method::GET,
        "/2023-03-30/functions",
        Operation::ListFunctions,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}",
        Operation::GetFunction,
    ),
    (
        Method::PUT,
        "/2023-03-30/functions/{name}",
        Operation::UpdateFunction,
    ),
    (
        Method::DELETE,
        "/2023-03-30/functions/{name}",
        Operation::DeleteFunction,
    ),
    (
        Method::POST,
        "/2023-03-30/functions/{name}/invocations",
        Operation::InvokeFunction,
    ),
    (
        Method::PUT,
        "/2023-03-30/functions/{name}/async-invoke-config",
        Operation::PutAsyncInvokeConfig,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/async-invoke-config",
        Operation::GetAsyncInvokeConfig,
    ),
    (
        Method::DELETE,
        "/2023-03-30/functions/{name}/async-invoke-config",
        Operation::DeleteAsyncInvokeConfig,
    ),
    (
        Method::GET,
        "/2023-03-30/async-invoke-configs",
        Operation::ListAsyncInvokeConfigs,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/async-tasks",
        Operation::ListAsyncTasks,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/async-tasks/{task}",
        Operation::GetAsyncTask,
    ),
    (
        Method::PUT,
        "/2023-03-30/functions/{name}/async-tasks/{task}/stop",
        Operation::StopAsyncTask,
    ),
    (
        Method::PUT,
        "/2023-03-30/functions/{name}/provision-config",
        Operation::PutProvisionConfig,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/provision-config",
        Operation::GetProvisionConfig,
    ),
    (
        Method::DELETE,
        "/2023-03-30/functions/{name}/provision-config",
        Operation::DeleteProvisionConfig,
    ),
    (
        Method::GET,
        "/2023-03-30/provision-configs",
        Operation::ListProvisionConfigs,
    ),
    (
        Method::PUT,
        "/2023-03-30/functions/{name}/concurrency",
        Operation::PutConcurrencyConfig,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/concurrency",
        Operation::GetConcurrencyConfig,
    ),
    (
        Method::DELETE,
        "/2023-03-30/functions/{name}/concurrency",
        Operation::DeleteConcurrencyConfig,
    ),
    (
        Method::GET,
        "/2023-03-30/concurrency-configs",
        Operation::ListConcurrencyConfigs,
    ),
    (Method::GET, "/2023-03-30/roles", Operation::ListRoles),
    (Method::PUT, "/2023-03-30/roles/{role}", Operation::PutRole),
    (Method::GET, "/2023-03-30/roles/{role}", Operation::GetRole),
    (
        Method::DELETE,
        "/2023-03-30/roles/{role}",
        Operation::DeleteRole,
    ),
    (
        Method::POST,
        "/2023-03-30/layers/{layer}/versions",
        Operation::CreateLayerVersion,
    ),
    (
        Method::GET,
        "/2023-03-30/layers/{layer}/versions",
        Operation::ListLayerVersions,
    ),
    (
        Method::GET,
        "/2023-03-30/layers/{layer}/versions/{version}",
        Operation::GetLayerVersion,
    ),
    (
        Method::DELETE,
        "/2023-03-30/layers/{layer}/versions/{version}",
        Operation::DeleteLayerVersion,
    ),
    (Method::GET, "/2023-03-30/layers", Operation::ListLayers),
    (
        Method::PUT,
        "/2023-03-30/layers/{layer}/acl",
        Operation::PutLayerACL,
    ),
    (
        Method::GET,
        "/2023-03-30/layerarn/{arn}",
        Operation::GetLayerVersionByArn,
    ),
    (Method::GET, "/2023-03-30/runtimes", Operation::ListRuntimes),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/instances",
        Operation::ListInstances,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/instances/{instance}/exec",
        Operation::InstanceExec,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/logs",
        Operation::GetFunctionLogs,
    ),
    (
        Method::POST,
        "/2023-03-30/functions/{name}/vpc-bindings",
        Operation::CreateVpcBinding,
    ),
    (
        Method::GET,
        "/2023-03-30/functions/{name}/vpc-bindings",
        Operation::ListVpcBindings,
    ),
    (
        Method::DELETE,
        "/2023-03-30/functions/{name}/vpc-bindings/{vpc}",
        Operation::DeleteVpcBinding,
    ),
];

/// A matched route.
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub operation: Operation,
    pub name: Option<FunctionName>,
    pub task: Option<String>,
    /// `{layer}`, `{version}`, `{arn}`: percent-decoded, checked by the
    /// layer handlers.
    pub layer: Option<String>,
    pub version: Option<String>,
    pub arn: Option<String>,
    /// `{role}`: a role name, percent-decoded, checked by the role handlers.
    pub role: Option<String>,
    /// `{instance}`: an instance id, percent-decoded.
    pub instance: Option<String>,
    /// `{vpc}`: a VPC id, percent-decoded, checked by the VPC handlers.
    pub vpc: Option<String>,
}

/// Match a request against [`ROUTES`].
pub fn route(method: &Method, path: &str) -> Result<Route, FcError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut path_matched = false;
    for (m, pattern, op) in ROUTES {
        let pat: Vec<&str> = pattern.trim_start_matches('/').split('/').collect();
        if pat.len() != segments.len() {
            continue;
        }
        let mut name = None;
        let mut task = None;
        let mut layer_params: [Option<&str>; 6] = [None; 6];
        let matched = pat.iter().zip(&segments).all(|(p, s)| {
            if *p == "{name}" {
                name = Some(*s);
                !s.is_empty()
            } else if *p == "{task}" {
                task = Some(*s);
                !s.is_empty()
            } else if let Some(i) = [
                "{layer}",
                "{version}",
                "{arn}",
                "{role}",
                "{instance}",
                "{vpc}",
            ]
            .iter()
            .position(|x| x == p)
            {
                layer_params[i] = Some(*s);
                !s.is_empty()
            } else {
                p == s
            }
        });
        if !matched {
            continue;
        }
        path_matched = true;
        if m != method {
            continue;
        }
        let name = match name {
            None => None,
            Some(raw) => {
                let decoded = percent_encoding::percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|_| FcError::invalid_argument("function name is not UTF-8"))?;
                Some(decoded.parse::<FunctionName>().map_err(|e| {
                    FcError::invalid_argument(format!("functionName: {}", e.reason))
                })?)
            }
        };
        let task = match task {
            None => None,
            Some(raw) => Some(
                percent_encoding::percent_decode_str(raw)
                    .decode_utf8()
                    .map_err(|_| FcError::invalid_argument("task id is not UTF-8"))?
                    .into_owned(),
            ),
        };
        let decode = |raw: Option<&str>| -> Result<Option<String>, FcError> {
            raw.map(|r| {
                percent_encoding::percent_decode_str(r)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| FcError::invalid_argument("path parameter is not UTF-8"))
            })
            .transpose()
        };
        return Ok(Route {
            operation: *op,
            name,
            task,
            layer: decode(layer_params[0])?,
            version: decode(layer_params[1])?,
            arn: decode(layer_params[2])?,
            role: decode(layer_params[3])?,
            instance: decode(layer_params[4])?,
            vpc: decode(layer_params[5])?,
        });
    }
    if path_matched {
        Err(FcError::new(
            FcErrorCode::MethodNotAllowed,
            format!("method {method} is not allowed on {path}"),
        ))
    } else {
        Err(FcError::new(
            FcErrorCode::PathNotSupported,
            format!("'{method}' against '{path}' is not supported"),
        ))
    }
}

/// Serve one public request.
pub async fn handle(
    gw: Arc<Gateway>,
    req: http::Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    // Time-ordered: async task ids default to it and index by it.
    let request_id = RequestId::generate_ordered();
    let started = Instant::now();
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %req.method(),
        path = %req.uri().path(),
        peer = %conn.peer,
        account = tracing::field::Empty,
    );
    let (op, result) = async {
        let route = match route(req.method(), req.uri().path()) {
            Ok(r) => r,
            Err(e) => return (None, Err(ApiError::Fc(e))),
        };
        let op = route.operation;
        let (parts, body) = req.into_parts();
        let r = async {
            let head = gw.auth.precheck(&parts)?;
            let body = read_body(body, body_limit(op)).await?;
            let caller = gw.auth.verify(head, &body)?;
            tracing::Span::current().record("account", caller.account_id.as_str());
            crate::ram::authz::authorize(&gw.ram, &gw.region, &caller, &route)?;
            dispatch(&gw, route, caller, parts, body, &request_id).await
        }
        .await;
        (Some(op), r)
    }
    .instrument(span.clone())
    .await;
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            let fc = to_fc(&e);
            span.in_scope(|| {
                // Debug: any caller can trigger this line at will.
                tracing::debug!(code = fc.code.as_str(), message = %fc.message, "request refused")
            });
            respond::fc_error(&fc, request_id.as_str())
        }
    };
    if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
        resp.headers_mut().insert(REQUEST_ID, v);
    }
    let op_name = op.map_or("Unknown", Operation::as_str);
    gw.metrics.request(op_name, resp.status().as_str());
    span.in_scope(|| {
        tracing::debug!(
            status = resp.status().as_u16(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "answered"
        )
    });
    resp
}

/// The largest body each operation takes.
fn body_limit(op: Operation) -> usize {
    match op {
        Operation::CreateFunction | Operation::UpdateFunction => functions::FUNCTION_BODY_MAX,
        Operation::InvokeFunction => kiln_core::limits::SYNC_PAYLOAD_MAX,
        Operation::CreateLayerVersion => layers::LAYER_BODY_MAX,
        _ => 64 * 1024,
    }
}

async fn dispatch(
    gw: &Arc<Gateway>,
    route: Route,
    caller: Caller,
    parts: http::request::Parts,
    body: Bytes,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    let name = route.name;
    let named = || name.clone().expect("route has a name");
    let task = || route.task.clone().expect("route has a task id");
    let layer = || route.layer.clone().expect("route has a layer name");
    let version = || route.version.clone().expect("route has a version");
    let role = || route.role.clone().expect("route has a role name");
    if route.operation == Operation::InvokeFunction {
        // VPC-only functions, and the listener the call came in on.
        vpc::check_invoke(gw, &caller, &named(), &parts)?;
    }
    match route.operation {
        Operation::CreateFunction => functions::create(gw, &caller, body).await,
        Operation::ListFunctions => functions::list(gw, &caller, &parts),
        Operation::GetFunction => functions::get(gw, &caller, &named(), &parts),
        Operation::UpdateFunction => functions::update(gw, &caller, &named(), body).await,
        Operation::DeleteFunction => functions::delete(gw, &caller, &named()).await,
        Operation::InvokeFunction if async_api::is_async(&parts)? => {
            async_api::enqueue(gw, &caller, &named(), &parts, body, request_id).await
        }
        Operation::InvokeFunction => {
            invoke::invoke(gw, &caller, &named(), parts, body, request_id).await
        }
        Operation::PutAsyncInvokeConfig => {
            async_api::put_config(gw, &caller, &named(), &parts, body).await
        }
        Operation::GetAsyncInvokeConfig => async_api::get_config(gw, &caller, &named(), &parts),
        Operation::DeleteAsyncInvokeConfig => {
            async_api::delete_config(gw, &caller, &named(), &parts).await
        }
        Operation::ListAsyncInvokeConfigs => async_api::list_configs(gw, &caller, &parts),
        Operation::ListAsyncTasks => async_api::list_tasks(gw, &caller, &named(), &parts).await,
        Operation::GetAsyncTask => {
            async_api::get_task(gw, &caller, &named(), &task(), &parts).await
        }
        Operation::StopAsyncTask => {
            async_api::stop_task(gw, &caller, &named(), &task(), &parts).await
        }
        Operation::PutProvisionConfig => provision::put(gw, &caller, &named(), &parts, body).await,
        Operation::GetProvisionConfig => provision::get(gw, &caller, &named(), &parts).await,
        Operation::DeleteProvisionConfig => provision::delete(gw, &caller, &named(), &parts).await,
        Operation::ListProvisionConfigs => provision::list(gw, &caller, &parts).await,
        Operation::PutConcurrencyConfig => concurrency::put(gw, &caller, &named(), body).await,
        Operation::GetConcurrencyConfig => concurrency::get(gw, &caller, &named()).await,
        Operation::DeleteConcurrencyConfig => concurrency::delete(gw, &caller, &named()).await,
        Operation::ListConcurrencyConfigs => concurrency::list(gw, &caller, &parts).await,
        Operation::CreateLayerVersion => layers::create_version(gw, &caller, &layer(), body).await,
        Operation::GetLayerVersion => layers::get_version(gw, &caller, &layer(), &version()),
        Operation::GetLayerVersionByArn => {
            layers::get_by_arn(gw, &caller, route.arn.as_deref().expect("route has an arn"))
        }
        Operation::ListLayers => layers::list(gw, &caller, &parts),
        Operation::ListLayerVersions => layers::list_versions(gw, &caller, &layer(), &parts),
        Operation::DeleteLayerVersion => {
            layers::delete_version(gw, &caller, &layer(), &version()).await
        }
        Operation::PutLayerACL => layers::put_acl(gw, &caller, &layer(), &parts).await,
        Operation::ListRuntimes => crate::runtimes::list(gw).await,
        Operation::ListInstances => {
            instances::list(gw, &caller, &named(), &parts, request_id.as_str()).await
        }
        Operation::InstanceExec => {
            let instance = route.instance.clone().expect("route has an instance id");
            instances::exec(gw, &caller, &named(), &instance, parts).await
        }
        Operation::GetFunctionLogs => logs::get(gw, &caller, &named(), &parts).await,
        Operation::CreateVpcBinding => vpc::create(gw, &caller, &named(), body).await,
        Operation::ListVpcBindings => vpc::list(gw, &caller, &named()),
        Operation::DeleteVpcBinding => {
            let id = route.vpc.clone().expect("route has a VPC id");
            vpc::delete(gw, &caller, &named(), &id).await
        }
        Operation::PutRole => roles::put(gw, &caller, &role(), body).await,
        Operation::GetRole => roles::get(gw, &caller, &role()),
        Operation::DeleteRole => roles::delete(gw, &caller, &role()).await,
        Operation::ListRoles => roles::list(gw, &caller, &parts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_the_table() {
        let r = route(&Method::POST, "/2023-03-30/functions").unwrap();
        assert_eq!(r.operation, Operation::CreateFunction);
        let r = route(&Method::GET, "/2023-03-30/functions/my-fn").unwrap();
        assert_eq!(
            (r.operation, r.name.unwrap().as_str()),
            (Operation::GetFunction, "my-fn")
        );
        let r = route(&Method::POST, "/2023-03-30/functions/f_1/invocations").unwrap();
        assert_eq!(r.operation, Operation::InvokeFunction);
        let e = route(&Method::PATCH, "/2023-03-30/functions/f").unwrap_err();
        assert_eq!(e.code, FcErrorCode::MethodNotAllowed);
        let e = route(&Method::GET, "/2023-03-30/nope").unwrap_err();
        assert_eq!(e.code, FcErrorCode::PathNotSupported);
        let e = route(&Method::GET, "/2023-03-30/functions/..%2Fetc").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
        let e = route(&Method::GET, "/2023-03-30/functions/").unwrap_err();
        assert_eq!(e.code, FcErrorCode::PathNotSupported);
        let r = route(
            &Method::PUT,
            "/2023-03-30/functions/f/async-tasks/job%2D1/stop",
        )
        .unwrap();
        assert_eq!(
            (r.operation, r.task.as_deref()),
            (Operation::StopAsyncTask, Some("job-1"))
        );
        let r = route(&Method::GET, "/2023-03-30/async-invoke-configs").unwrap();
        assert_eq!(r.operation, Operation::ListAsyncInvokeConfigs);
        let e = route(&Method::POST, "/2023-03-30/functions/f/async-invoke-config").unwrap_err();
        assert_eq!(e.code, FcErrorCode::MethodNotAllowed);
        let r = route(&Method::PUT, "/2023-03-30/functions/f/provision-config").unwrap();
        assert_eq!(r.operation, Operation::PutProvisionConfig);
        let r = route(&Method::GET, "/2023-03-30/provision-configs").unwrap();
        assert_eq!(r.operation, Operation::ListProvisionConfigs);
        let r = route(&Method::DELETE, "/2023-03-30/functions/f/concurrency").unwrap();
        assert_eq!(r.operation, Operation::DeleteConcurrencyConfig);
        let e = route(&Method::POST, "/2023-03-30/functions/f/concurrency").unwrap_err();
        assert_eq!(e.code, FcErrorCode::MethodNotAllowed);
        let r = route(&Method::POST, "/2023-03-30/layers/my-layer/versions").unwrap();
        assert_eq!(
            (r.operation, r.layer.as_deref()),
            (Operation::CreateLayerVersion, Some("my-layer"))
        );
        let r = route(&Method::DELETE, "/2023-03-30/layers/l/versions/2").unwrap();
        assert_eq!(
            (r.operation, r.version.as_deref()),
            (Operation::DeleteLayerVersion, Some("2"))
        );
        let r = route(
            &Method::GET,
            "/2023-03-30/layerarn/acs%3Afc%3Acn-test%3A1%3Alayers%2Fl%2Fversions%2F1",
        )
        .unwrap();
        assert_eq!(
            (r.operation, r.arn.as_deref()),
            (
                Operation::GetLayerVersionByArn,
                Some("acs:fc:cn-test:1:layers/l/versions/1")
            )
        );
        let r = route(&Method::PUT, "/2023-03-30/layers/l/acl").unwrap();
        assert_eq!(r.operation, Operation::PutLayerACL);
        let r = route(&Method::GET, "/2023-03-30/runtimes").unwrap();
        assert_eq!(r.operation, Operation::ListRuntimes);
        let r = route(&Method::GET, "/2023-03-30/functions/f/instances").unwrap();
        assert_eq!(r.operation, Operation::ListInstances);
        let r = route(&Method::GET, "/2023-03-30/functions/f/instances/i-1/exec").unwrap();
        assert_eq!(
            (r.operation, r.instance.as_deref()),
            (Operation::InstanceExec, Some("i-1"))
        );
        let r = route(&Method::GET, "/2023-03-30/functions/f/logs").unwrap();
        assert_eq!(r.operation, Operation::GetFunctionLogs);
    }
}
