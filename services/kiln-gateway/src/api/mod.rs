//! The public FC 2023-03-30 API: one route table, one file per resource,
//! and one function turning errors into FC-shaped responses.

pub mod async_api;
pub mod code;
pub mod concurrency;
pub mod domains;
pub mod error;
pub mod functions;
pub mod health;
pub mod instances;
pub mod internal;
pub mod invocation;
pub mod invoke;
pub mod layers;
pub mod list_filter;
pub mod logs;
pub mod provision;
pub mod request;
pub mod respond;
pub mod roles;
pub mod tags;
pub mod triggers;
pub mod versions;
pub mod vpc;

use std::sync::Arc;
use std::time::Instant;

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderValue, Method, Response};
use hyper::body::Incoming;
use kiln_core::{FcError, FunctionName, RequestId};
use kiln_internal_api::router::{self, PathParams, Router};
use kiln_internal_api::server::{Body, ConnInfo};
use tracing::Instrument;

pub use crate::gateway::Gateway;
pub use error::{to_fc, ApiError};
pub use request::{caller_function, not_found, query_param, read_body};

use crate::auth::Caller;

pub const API_VERSION: &str = "2023-03-30";
pub use respond::REQUEST_ID;

const GET: Method = Method::GET;
const POST: Method = Method::POST;
const PUT: Method = Method::PUT;
const DELETE: Method = Method::DELETE;

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
    TagResources,
    UntagResources,
    ListTagResources,
    PublishFunctionVersion,
    ListFunctionVersions,
    DeleteFunctionVersion,
    CreateAlias,
    GetAlias,
    UpdateAlias,
    DeleteAlias,
    ListAliases,
    GetFunctionCode,
    CreateTrigger,
    GetTrigger,
    UpdateTrigger,
    DeleteTrigger,
    ListTriggers,
    EnableFunctionInvocation,
    DisableFunctionInvocation,
    CreateCustomDomain,
    GetCustomDomain,
    UpdateCustomDomain,
    DeleteCustomDomain,
    ListCustomDomains,
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
            Self::TagResources => "TagResources",
            Self::UntagResources => "UntagResources",
            Self::ListTagResources => "ListTagResources",
            Self::PublishFunctionVersion => "PublishFunctionVersion",
            Self::ListFunctionVersions => "ListFunctionVersions",
            Self::DeleteFunctionVersion => "DeleteFunctionVersion",
            Self::CreateAlias => "CreateAlias",
            Self::GetAlias => "GetAlias",
            Self::UpdateAlias => "UpdateAlias",
            Self::DeleteAlias => "DeleteAlias",
            Self::ListAliases => "ListAliases",
            Self::GetFunctionCode => "GetFunctionCode",
            Self::CreateTrigger => "CreateTrigger",
            Self::GetTrigger => "GetTrigger",
            Self::UpdateTrigger => "UpdateTrigger",
            Self::DeleteTrigger => "DeleteTrigger",
            Self::ListTriggers => "ListTriggers",
            Self::EnableFunctionInvocation => "EnableFunctionInvocation",
            Self::DisableFunctionInvocation => "DisableFunctionInvocation",
            Self::CreateCustomDomain => "CreateCustomDomain",
            Self::GetCustomDomain => "GetCustomDomain",
            Self::UpdateCustomDomain => "UpdateCustomDomain",
            Self::DeleteCustomDomain => "DeleteCustomDomain",
            Self::ListCustomDomains => "ListCustomDomains",
        }
    }
}

/// A matched public route with its typed, percent-decoded path
/// parameters: `name` is a checked function name; layer, version, arn,
/// role, instance and VPC ids are checked by their handlers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    CreateFunction,
    ListFunctions,
    GetFunction {
        name: FunctionName,
    },
    UpdateFunction {
        name: FunctionName,
    },
    DeleteFunction {
        name: FunctionName,
    },
    InvokeFunction {
        name: FunctionName,
    },
    PutAsyncInvokeConfig {
        name: FunctionName,
    },
    GetAsyncInvokeConfig {
        name: FunctionName,
    },
    DeleteAsyncInvokeConfig {
        name: FunctionName,
    },
    ListAsyncInvokeConfigs,
    ListAsyncTasks {
        name: FunctionName,
    },
    GetAsyncTask {
        name: FunctionName,
        task: String,
    },
    StopAsyncTask {
        name: FunctionName,
        task: String,
    },
    PutProvisionConfig {
        name: FunctionName,
    },
    GetProvisionConfig {
        name: FunctionName,
    },
    DeleteProvisionConfig {
        name: FunctionName,
    },
    ListProvisionConfigs,
    PutConcurrencyConfig {
        name: FunctionName,
    },
    GetConcurrencyConfig {
        name: FunctionName,
    },
    DeleteConcurrencyConfig {
        name: FunctionName,
    },
    ListConcurrencyConfigs,
    ListRoles,
    PutRole {
        role: String,
    },
    GetRole {
        role: String,
    },
    DeleteRole {
        role: String,
    },
    CreateLayerVersion {
        layer: String,
    },
    ListLayerVersions {
        layer: String,
    },
    GetLayerVersion {
        layer: String,
        version: String,
    },
    DeleteLayerVersion {
        layer: String,
        version: String,
    },
    ListLayers,
    PutLayerACL {
        layer: String,
    },
    GetLayerVersionByArn {
        arn: String,
    },
    ListRuntimes,
    ListInstances {
        name: FunctionName,
    },
    InstanceExec {
        name: FunctionName,
        instance: String,
    },
    GetFunctionLogs {
        name: FunctionName,
    },
    CreateVpcBinding {
        name: FunctionName,
    },
    ListVpcBindings {
        name: FunctionName,
    },
    DeleteVpcBinding {
        name: FunctionName,
        vpc: String,
    },
    TagResources,
    UntagResources,
    ListTagResources,
    PublishFunctionVersion {
        name: FunctionName,
    },
    ListFunctionVersions {
        name: FunctionName,
    },
    DeleteFunctionVersion {
        name: FunctionName,
        version: String,
    },
    CreateAlias {
        name: FunctionName,
    },
    ListAliases {
        name: FunctionName,
    },
    GetAlias {
        name: FunctionName,
        alias: String,
    },
    UpdateAlias {
        name: FunctionName,
        alias: String,
    },
    DeleteAlias {
        name: FunctionName,
        alias: String,
    },
    GetFunctionCode {
        name: FunctionName,
    },
    CreateTrigger {
        name: FunctionName,
    },
    ListTriggers {
        name: FunctionName,
    },
    GetTrigger {
        name: FunctionName,
        trigger: String,
    },
    UpdateTrigger {
        name: FunctionName,
        trigger: String,
    },
    DeleteTrigger {
        name: FunctionName,
        trigger: String,
    },
    EnableFunctionInvocation {
        name: FunctionName,
    },
    DisableFunctionInvocation {
        name: FunctionName,
    },
    CreateCustomDomain,
    ListCustomDomains,
    GetCustomDomain {
        domain: String,
    },
    UpdateCustomDomain {
        domain: String,
    },
    DeleteCustomDomain {
        domain: String,
    },
}

/// `{name}`, percent-decoded and checked as a function name.
fn function_name(p: &PathParams<'_>) -> Result<FunctionName, FcError> {
    p.text("name")?
        .parse::<FunctionName>()
        .map_err(|e| FcError::invalid_argument(format!("functionName: {}", e.reason)))
}

/// The public API's one route table: method, path, typed route.
#[rustfmt::skip]
const ROUTES: &[router::Route<Route, router::Signed>] = &[
    router::signed(POST, "/2023-03-30/functions", |_| Ok(Route::CreateFunction)),
    router::signed(GET, "/2023-03-30/functions", |_| Ok(Route::ListFunctions)),
    router::signed(GET, "/2023-03-30/functions/{name}", |p| Ok(Route::GetFunction { name: function_name(p)? })),
    router::signed(PUT, "/2023-03-30/functions/{name}", |p| Ok(Route::UpdateFunction { name: function_name(p)? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}", |p| Ok(Route::DeleteFunction { name: function_name(p)? })),
    router::signed(POST, "/2023-03-30/functions/{name}/invocations", |p| Ok(Route::InvokeFunction { name: function_name(p)? })),
    router::signed(PUT, "/2023-03-30/functions/{name}/async-invoke-config", |p| Ok(Route::PutAsyncInvokeConfig { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/async-invoke-config", |p| Ok(Route::GetAsyncInvokeConfig { name: function_name(p)? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}/async-invoke-config", |p| Ok(Route::DeleteAsyncInvokeConfig { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/async-invoke-configs", |_| Ok(Route::ListAsyncInvokeConfigs)),
    router::signed(GET, "/2023-03-30/functions/{name}/async-tasks", |p| Ok(Route::ListAsyncTasks { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/async-tasks/{task}", |p| Ok(Route::GetAsyncTask { name: function_name(p)?, task: p.string("task")? })),
    router::signed(PUT, "/2023-03-30/functions/{name}/async-tasks/{task}/stop", |p| Ok(Route::StopAsyncTask { name: function_name(p)?, task: p.string("task")? })),
    router::signed(PUT, "/2023-03-30/functions/{name}/provision-config", |p| Ok(Route::PutProvisionConfig { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/provision-config", |p| Ok(Route::GetProvisionConfig { name: function_name(p)? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}/provision-config", |p| Ok(Route::DeleteProvisionConfig { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/provision-configs", |_| Ok(Route::ListProvisionConfigs)),
    router::signed(PUT, "/2023-03-30/functions/{name}/concurrency", |p| Ok(Route::PutConcurrencyConfig { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/concurrency", |p| Ok(Route::GetConcurrencyConfig { name: function_name(p)? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}/concurrency", |p| Ok(Route::DeleteConcurrencyConfig { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/concurrency-configs", |_| Ok(Route::ListConcurrencyConfigs)),
    router::signed(GET, "/2023-03-30/roles", |_| Ok(Route::ListRoles)),
    router::signed(PUT, "/2023-03-30/roles/{role}", |p| Ok(Route::PutRole { role: p.string("role")? })),
    router::signed(GET, "/2023-03-30/roles/{role}", |p| Ok(Route::GetRole { role: p.string("role")? })),
    router::signed(DELETE, "/2023-03-30/roles/{role}", |p| Ok(Route::DeleteRole { role: p.string("role")? })),
    router::signed(POST, "/2023-03-30/layers/{layer}/versions", |p| Ok(Route::CreateLayerVersion { layer: p.string("layer")? })),
    router::signed(GET, "/2023-03-30/layers/{layer}/versions", |p| Ok(Route::ListLayerVersions { layer: p.string("layer")? })),
    router::signed(GET, "/2023-03-30/layers/{layer}/versions/{version}", |p| Ok(Route::GetLayerVersion { layer: p.string("layer")?, version: p.string("version")? })),
    router::signed(DELETE, "/2023-03-30/layers/{layer}/versions/{version}", |p| Ok(Route::DeleteLayerVersion { layer: p.string("layer")?, version: p.string("version")? })),
    router::signed(GET, "/2023-03-30/layers", |_| Ok(Route::ListLayers)),
    router::signed(PUT, "/2023-03-30/layers/{layer}/acl", |p| Ok(Route::PutLayerACL { layer: p.string("layer")? })),
    router::signed(GET, "/2023-03-30/layerarn/{arn}", |p| Ok(Route::GetLayerVersionByArn { arn: p.string("arn")? })),
    router::signed(GET, "/2023-03-30/runtimes", |_| Ok(Route::ListRuntimes)),
    router::signed(GET, "/2023-03-30/functions/{name}/instances", |p| Ok(Route::ListInstances { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/instances/{instance}/exec", |p| Ok(Route::InstanceExec { name: function_name(p)?, instance: p.string("instance")? })),
    router::signed(GET, "/2023-03-30/functions/{name}/logs", |p| Ok(Route::GetFunctionLogs { name: function_name(p)? })),
    router::signed(POST, "/2023-03-30/functions/{name}/vpc-bindings", |p| Ok(Route::CreateVpcBinding { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/vpc-bindings", |p| Ok(Route::ListVpcBindings { name: function_name(p)? })),
    router::signed(POST, "/2023-03-30/tags-v2", |_| Ok(Route::TagResources)),
    router::signed(DELETE, "/2023-03-30/tags-v2", |_| Ok(Route::UntagResources)),
    router::signed(GET, "/2023-03-30/tags-v2", |_| Ok(Route::ListTagResources)),
    router::signed(DELETE, "/2023-03-30/functions/{name}/vpc-bindings/{vpc}", |p| Ok(Route::DeleteVpcBinding { name: function_name(p)?, vpc: p.string("vpc")? })),
    router::signed(POST, "/2023-03-30/functions/{name}/versions", |p| Ok(Route::PublishFunctionVersion { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/versions", |p| Ok(Route::ListFunctionVersions { name: function_name(p)? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}/versions/{version}", |p| Ok(Route::DeleteFunctionVersion { name: function_name(p)?, version: p.string("version")? })),
    router::signed(POST, "/2023-03-30/functions/{name}/aliases", |p| Ok(Route::CreateAlias { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/aliases", |p| Ok(Route::ListAliases { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/aliases/{alias}", |p| Ok(Route::GetAlias { name: function_name(p)?, alias: p.string("alias")? })),
    router::signed(PUT, "/2023-03-30/functions/{name}/aliases/{alias}", |p| Ok(Route::UpdateAlias { name: function_name(p)?, alias: p.string("alias")? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}/aliases/{alias}", |p| Ok(Route::DeleteAlias { name: function_name(p)?, alias: p.string("alias")? })),
    router::signed(GET, "/2023-03-30/functions/{name}/code", |p| Ok(Route::GetFunctionCode { name: function_name(p)? })),
    router::signed(POST, "/2023-03-30/functions/{name}/triggers", |p| Ok(Route::CreateTrigger { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/triggers", |p| Ok(Route::ListTriggers { name: function_name(p)? })),
    router::signed(GET, "/2023-03-30/functions/{name}/triggers/{trigger}", |p| Ok(Route::GetTrigger { name: function_name(p)?, trigger: p.string("trigger")? })),
    router::signed(PUT, "/2023-03-30/functions/{name}/triggers/{trigger}", |p| Ok(Route::UpdateTrigger { name: function_name(p)?, trigger: p.string("trigger")? })),
    router::signed(DELETE, "/2023-03-30/functions/{name}/triggers/{trigger}", |p| Ok(Route::DeleteTrigger { name: function_name(p)?, trigger: p.string("trigger")? })),
    router::signed(POST, "/2023-03-30/functions/{name}/invoke/enable", |p| Ok(Route::EnableFunctionInvocation { name: function_name(p)? })),
    router::signed(POST, "/2023-03-30/functions/{name}/invoke/disable", |p| Ok(Route::DisableFunctionInvocation { name: function_name(p)? })),
    router::signed(POST, "/2023-03-30/custom-domains", |_| Ok(Route::CreateCustomDomain)),
    router::signed(GET, "/2023-03-30/custom-domains", |_| Ok(Route::ListCustomDomains)),
    router::signed(GET, "/2023-03-30/custom-domains/{domain}", |p| Ok(Route::GetCustomDomain { domain: p.string("domain")? })),
    router::signed(PUT, "/2023-03-30/custom-domains/{domain}", |p| Ok(Route::UpdateCustomDomain { domain: p.string("domain")? })),
    router::signed(DELETE, "/2023-03-30/custom-domains/{domain}", |p| Ok(Route::DeleteCustomDomain { domain: p.string("domain")? })),
];

static ROUTER: LazyLock<Router<Route, router::Signed>> = LazyLock::new(|| {
    Router::new(ROUTES).expect("the route table is valid (a unit test builds it)")
});

impl Route {
    /// The FC operation this route performs (its RAM action and metric
    /// label).
    pub fn operation(&self) -> Operation {
        match self {
            Self::CreateFunction => Operation::CreateFunction,
            Self::ListFunctions => Operation::ListFunctions,
            Self::GetFunction { .. } => Operation::GetFunction,
            Self::UpdateFunction { .. } => Operation::UpdateFunction,
            Self::DeleteFunction { .. } => Operation::DeleteFunction,
            Self::InvokeFunction { .. } => Operation::InvokeFunction,
            Self::PutAsyncInvokeConfig { .. } => Operation::PutAsyncInvokeConfig,
            Self::GetAsyncInvokeConfig { .. } => Operation::GetAsyncInvokeConfig,
            Self::DeleteAsyncInvokeConfig { .. } => Operation::DeleteAsyncInvokeConfig,
            Self::ListAsyncInvokeConfigs => Operation::ListAsyncInvokeConfigs,
            Self::ListAsyncTasks { .. } => Operation::ListAsyncTasks,
            Self::GetAsyncTask { .. } => Operation::GetAsyncTask,
            Self::StopAsyncTask { .. } => Operation::StopAsyncTask,
            Self::PutProvisionConfig { .. } => Operation::PutProvisionConfig,
            Self::GetProvisionConfig { .. } => Operation::GetProvisionConfig,
            Self::DeleteProvisionConfig { .. } => Operation::DeleteProvisionConfig,
            Self::ListProvisionConfigs => Operation::ListProvisionConfigs,
            Self::PutConcurrencyConfig { .. } => Operation::PutConcurrencyConfig,
            Self::GetConcurrencyConfig { .. } => Operation::GetConcurrencyConfig,
            Self::DeleteConcurrencyConfig { .. } => Operation::DeleteConcurrencyConfig,
            Self::ListConcurrencyConfigs => Operation::ListConcurrencyConfigs,
            Self::ListRoles => Operation::ListRoles,
            Self::PutRole { .. } => Operation::PutRole,
            Self::GetRole { .. } => Operation::GetRole,
            Self::DeleteRole { .. } => Operation::DeleteRole,
            Self::CreateLayerVersion { .. } => Operation::CreateLayerVersion,
            Self::ListLayerVersions { .. } => Operation::ListLayerVersions,
            Self::GetLayerVersion { .. } => Operation::GetLayerVersion,
            Self::DeleteLayerVersion { .. } => Operation::DeleteLayerVersion,
            Self::ListLayers => Operation::ListLayers,
            Self::PutLayerACL { .. } => Operation::PutLayerACL,
            Self::GetLayerVersionByArn { .. } => Operation::GetLayerVersionByArn,
            Self::ListRuntimes => Operation::ListRuntimes,
            Self::ListInstances { .. } => Operation::ListInstances,
            Self::InstanceExec { .. } => Operation::InstanceExec,
            Self::GetFunctionLogs { .. } => Operation::GetFunctionLogs,
            Self::CreateVpcBinding { .. } => Operation::CreateVpcBinding,
            Self::ListVpcBindings { .. } => Operation::ListVpcBindings,
            Self::TagResources => Operation::TagResources,
            Self::UntagResources => Operation::UntagResources,
            Self::ListTagResources => Operation::ListTagResources,
            Self::DeleteVpcBinding { .. } => Operation::DeleteVpcBinding,
            Self::PublishFunctionVersion { .. } => Operation::PublishFunctionVersion,
            Self::ListFunctionVersions { .. } => Operation::ListFunctionVersions,
            Self::DeleteFunctionVersion { .. } => Operation::DeleteFunctionVersion,
            Self::CreateAlias { .. } => Operation::CreateAlias,
            Self::ListAliases { .. } => Operation::ListAliases,
            Self::GetAlias { .. } => Operation::GetAlias,
            Self::UpdateAlias { .. } => Operation::UpdateAlias,
            Self::DeleteAlias { .. } => Operation::DeleteAlias,
            Self::GetFunctionCode { .. } => Operation::GetFunctionCode,
            Self::CreateTrigger { .. } => Operation::CreateTrigger,
            Self::ListTriggers { .. } => Operation::ListTriggers,
            Self::GetTrigger { .. } => Operation::GetTrigger,
            Self::UpdateTrigger { .. } => Operation::UpdateTrigger,
            Self::DeleteTrigger { .. } => Operation::DeleteTrigger,
            Self::EnableFunctionInvocation { .. } => Operation::EnableFunctionInvocation,
            Self::DisableFunctionInvocation { .. } => Operation::DisableFunctionInvocation,
            Self::CreateCustomDomain => Operation::CreateCustomDomain,
            Self::ListCustomDomains => Operation::ListCustomDomains,
            Self::GetCustomDomain { .. } => Operation::GetCustomDomain,
            Self::UpdateCustomDomain { .. } => Operation::UpdateCustomDomain,
            Self::DeleteCustomDomain { .. } => Operation::DeleteCustomDomain,
        }
    }

    /// The function the route acts on, when it names one.
    pub fn function(&self) -> Option<&FunctionName> {
        match self {
            Self::GetFunction { name }
            | Self::UpdateFunction { name }
            | Self::DeleteFunction { name }
            | Self::InvokeFunction { name }
            | Self::PutAsyncInvokeConfig { name }
            | Self::GetAsyncInvokeConfig { name }
            | Self::DeleteAsyncInvokeConfig { name }
            | Self::ListAsyncTasks { name }
            | Self::GetAsyncTask { name, .. }
            | Self::StopAsyncTask { name, .. }
            | Self::PutProvisionConfig { name }
            | Self::GetProvisionConfig { name }
            | Self::DeleteProvisionConfig { name }
            | Self::PutConcurrencyConfig { name }
            | Self::GetConcurrencyConfig { name }
            | Self::DeleteConcurrencyConfig { name }
            | Self::ListInstances { name }
            | Self::InstanceExec { name, .. }
            | Self::GetFunctionLogs { name }
            | Self::CreateVpcBinding { name }
            | Self::ListVpcBindings { name }
            | Self::DeleteVpcBinding { name, .. }
            | Self::PublishFunctionVersion { name }
            | Self::ListFunctionVersions { name }
            | Self::DeleteFunctionVersion { name, .. }
            | Self::CreateAlias { name }
            | Self::ListAliases { name }
            | Self::GetAlias { name, .. }
            | Self::UpdateAlias { name, .. }
            | Self::DeleteAlias { name, .. }
            | Self::GetFunctionCode { name }
            | Self::CreateTrigger { name }
            | Self::ListTriggers { name }
            | Self::GetTrigger { name, .. }
            | Self::UpdateTrigger { name, .. }
            | Self::DeleteTrigger { name, .. }
            | Self::EnableFunctionInvocation { name }
            | Self::DisableFunctionInvocation { name } => Some(name),
            _ => None,
        }
    }

    /// The layer (and version) the route acts on, when it names one.
    pub fn layer(&self) -> Option<(&str, Option<&str>)> {
        match self {
            Self::CreateLayerVersion { layer }
            | Self::ListLayerVersions { layer }
            | Self::PutLayerACL { layer } => Some((layer, None)),
            Self::GetLayerVersion { layer, version }
            | Self::DeleteLayerVersion { layer, version } => Some((layer, Some(version))),
            _ => None,
        }
    }

    /// The custom domain the route acts on, when it names one.
    pub fn custom_domain(&self) -> Option<&str> {
        match self {
            Self::GetCustomDomain { domain }
            | Self::UpdateCustomDomain { domain }
            | Self::DeleteCustomDomain { domain } => Some(domain),
            _ => None,
        }
    }

    /// The role the route acts on, when it names one.
    pub fn role(&self) -> Option<&str> {
        match self {
            Self::PutRole { role } | Self::GetRole { role } | Self::DeleteRole { role } => {
                Some(role)
            }
            _ => None,
        }
    }
}

/// Match a public request against [`ROUTES`]: FC's PathNotSupported (404)
/// or MethodNotAllowed (405), or InvalidArgument for a parameter that does
/// not parse.
pub fn route(method: &Method, path: &str) -> Result<Route, FcError> {
    ROUTER.route(method, path)
}

/// Serve one public request.
pub async fn handle(
    gw: Arc<Gateway>,
    req: http::Request<Incoming>,
    conn: ConnInfo,
) -> Response<Body> {
    // A trigger's host is the function's, every path included.
    if let Some(host) = gw.http_triggers.host_of(&req) {
        return Box::pin(crate::http_trigger::serve(gw, req, host)).await;
    }
    // A custom domain's host is its routes', every path included (on the
    // public listener, whose TLS is chosen per domain).
    let vpc = matches!(
        req.extensions().get::<vpc::Listener>(),
        Some(vpc::Listener::Vpc(_))
    );
    if let Some(domain) = gw.domains.of_request(&req).filter(|_| !vpc) {
        return Box::pin(crate::domains::serve::serve(
            gw,
            req,
            domain,
            conn.server_name.clone(),
        ))
        .await;
    }
    if req.uri().path() == health::PATH {
        return health::answer(&gw, req.method()).await;
    }
    // Time-ordered: async task ids default to it and index by it.
    let request_id = RequestId::generate_ordered();
    // GetFunctionCode's download URLs: unsigned, authorised by their own
    // tag (see api::code).
    if req.method() == GET && req.uri().path().starts_with(code::DOWNLOAD_PREFIX) {
        let mut resp = code::download(&gw, req.uri().path(), &request_id).await;
        if let Ok(v) = HeaderValue::from_str(request_id.as_str()) {
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        gw.metrics
            .request("DownloadFunctionCode", resp.status().as_u16());
        return resp;
    }
    let started = Instant::now();
    let routed = route(req.method(), req.uri().path());
    // Sync invocations, the warm path, open their span at debug: at info,
    // formatting its fields for every call was a measurable part of the
    // gateway's CPU per call. Their access line carries the method, path,
    // peer and request id, and the invoke path's own warnings name the
    // request and the function.
    let span = if matches!(routed, Ok(Route::InvokeFunction { .. })) {
        tracing::debug_span!(
            "request",
            request_id = %request_id,
            method = %req.method(),
            path = %req.uri().path(),
            peer = %conn.peer,
            account = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            "request",
            request_id = %request_id,
            method = %req.method(),
            path = %req.uri().path(),
            peer = %conn.peer,
            account = tracing::field::Empty,
        )
    };
    let (op, result) = async {
        let route = match routed {
            Ok(r) => r,
            Err(e) => return (None, Err(ApiError::Fc(e))),
        };
        let op = route.operation();
        let (parts, body) = req.into_parts();
        let r = async {
            // Nothing of the body is read before the head is proven
            // signed; then it is hashed as it streams in.
            let head = gw.auth.precheck(&parts)?;
            let limit = body_limit(op);
            request::check_declared_length(&body, limit)?;
            let replay = gw.auth.replay_check(&head);
            let (caller, check) = gw.auth.verify(head)?;
            if let Some(r) = replay {
                r.run().await?;
            }
            tracing::Span::current().record("account", caller.account_id.as_str());
            let body = request::read_signed_body(body, limit, check).await?;
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
    gw.metrics.request(op_name, resp.status().as_u16());
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

/// One API request, routed. Every operation's future is a variant of
/// this one and of [`handle`]'s, which hyper moves per request: the large
/// ones that are not the warm path (writes of functions, configs, tasks)
/// are boxed so that a sync invocation does not carry their size.
async fn dispatch(
    gw: &Arc<Gateway>,
    route: Route,
    caller: Caller,
    parts: http::request::Parts,
    body: Bytes,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    let c = &caller;
    match route {
        Route::CreateFunction => Box::pin(functions::create(gw, c, body)).await,
        Route::ListFunctions => functions::list(gw, c, &parts),
        Route::GetFunction { name } => functions::get(gw, c, &name, &parts),
        Route::UpdateFunction { name } => Box::pin(functions::update(gw, c, &name, body)).await,
        Route::DeleteFunction { name } => functions::delete(gw, c, &name).await,
        Route::InvokeFunction { name } => {
            // VPC-only functions, and the listener the call came in on.
            vpc::check_invoke(gw, c, &name, &parts)?;
            if async_api::is_async(&parts)? {
                async_api::enqueue(gw, c, &name, &parts, body, request_id).await
            } else {
                invoke::invoke(gw, c, &name, parts, body, request_id).await
            }
        }
        Route::PutAsyncInvokeConfig { name } => {
            Box::pin(async_api::put_config(gw, c, &name, &parts, body)).await
        }
        Route::GetAsyncInvokeConfig { name } => async_api::get_config(gw, c, &name, &parts),
        Route::DeleteAsyncInvokeConfig { name } => {
            Box::pin(async_api::delete_config(gw, c, &name, &parts)).await
        }
        Route::ListAsyncInvokeConfigs => async_api::list_configs(gw, c, &parts),
        Route::ListAsyncTasks { name } => {
            Box::pin(async_api::list_tasks(gw, c, &name, &parts)).await
        }
        Route::GetAsyncTask { name, task } => {
            Box::pin(async_api::get_task(gw, c, &name, &task, &parts)).await
        }
        Route::StopAsyncTask { name, task } => {
            async_api::stop_task(gw, c, &name, &task, &parts).await
        }
        Route::PutProvisionConfig { name } => provision::put(gw, c, &name, &parts, body).await,
        Route::GetProvisionConfig { name } => provision::get(gw, c, &name, &parts).await,
        Route::DeleteProvisionConfig { name } => {
            Box::pin(provision::delete(gw, c, &name, &parts)).await
        }
        Route::ListProvisionConfigs => provision::list(gw, c, &parts).await,
        Route::PutConcurrencyConfig { name } => concurrency::put(gw, c, &name, body).await,
        Route::GetConcurrencyConfig { name } => concurrency::get(gw, c, &name).await,
        Route::DeleteConcurrencyConfig { name } => concurrency::delete(gw, c, &name).await,
        Route::ListConcurrencyConfigs => concurrency::list(gw, c, &parts).await,
        Route::CreateLayerVersion { layer } => {
            Box::pin(layers::create_version(gw, c, &layer, body)).await
        }
        Route::GetLayerVersion { layer, version } => layers::get_version(gw, c, &layer, &version),
        Route::GetLayerVersionByArn { arn } => layers::get_by_arn(gw, c, &arn),
        Route::ListLayers => layers::list(gw, c, &parts),
        Route::ListLayerVersions { layer } => layers::list_versions(gw, c, &layer, &parts),
        Route::DeleteLayerVersion { layer, version } => {
            layers::delete_version(gw, c, &layer, &version).await
        }
        Route::PutLayerACL { layer } => layers::put_acl(gw, c, &layer, &parts).await,
        Route::ListRuntimes => crate::runtimes::list(gw).await,
        Route::ListInstances { name } => {
            instances::list(gw, c, &name, &parts, request_id.as_str()).await
        }
        Route::InstanceExec { name, instance } => {
            instances::exec(gw, c, &name, &instance, parts).await
        }
        Route::GetFunctionLogs { name } => logs::get(gw, c, &name, &parts).await,
        Route::CreateVpcBinding { name } => vpc::create(gw, c, &name, body).await,
        Route::ListVpcBindings { name } => vpc::list(gw, c, &name),
        Route::TagResources => tags::tag(gw, c, body).await,
        Route::UntagResources => tags::untag(gw, c, &parts).await,
        Route::ListTagResources => tags::list(gw, c, &parts),
        Route::DeleteVpcBinding { name, vpc } => vpc::delete(gw, c, &name, &vpc).await,
        Route::PutRole { role } => roles::put(gw, c, &role, body).await,
        Route::GetRole { role } => roles::get(gw, c, &role),
        Route::DeleteRole { role } => roles::delete(gw, c, &role).await,
        Route::ListRoles => roles::list(gw, c, &parts),
        Route::PublishFunctionVersion { name } => versions::publish(gw, c, &name, body).await,
        Route::ListFunctionVersions { name } => versions::list(gw, c, &name, &parts),
        Route::DeleteFunctionVersion { name, version } => {
            versions::delete(gw, c, &name, &version).await
        }
        Route::CreateAlias { name } => versions::create_alias(gw, c, &name, body).await,
        Route::ListAliases { name } => versions::list_aliases(gw, c, &name, &parts),
        Route::GetAlias { name, alias } => versions::get_alias(gw, c, &name, &alias),
        Route::UpdateAlias { name, alias } => {
            versions::update_alias(gw, c, &name, &alias, body).await
        }
        Route::DeleteAlias { name, alias } => versions::delete_alias(gw, c, &name, &alias).await,
        Route::GetFunctionCode { name } => code::get(gw, c, &name, &parts),
        Route::CreateTrigger { name } => triggers::create(gw, c, &name, body).await,
        Route::ListTriggers { name } => triggers::list(gw, c, &name, &parts),
        Route::GetTrigger { name, trigger } => triggers::get(gw, c, &name, &trigger),
        Route::UpdateTrigger { name, trigger } => {
            triggers::update(gw, c, &name, &trigger, body).await
        }
        Route::DeleteTrigger { name, trigger } => triggers::delete(gw, c, &name, &trigger).await,
        Route::EnableFunctionInvocation { name } => invocation::enable(gw, c, &name).await,
        Route::DisableFunctionInvocation { name } => invocation::disable(gw, c, &name, body).await,
        Route::CreateCustomDomain => domains::create(gw, c, body).await,
        Route::ListCustomDomains => domains::list(gw, c, &parts),
        Route::GetCustomDomain { domain } => domains::get(gw, c, &domain),
        Route::UpdateCustomDomain { domain } => domains::update(gw, c, &domain, body).await,
        Route::DeleteCustomDomain { domain } => domains::delete(gw, c, &domain).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::FcErrorCode;

    fn name(s: &str) -> FunctionName {
        s.parse().unwrap()
    }

    /// hyper moves each request's future into place, and every async
    /// layer moves its callee's future into its own: a sync invocation's
    /// futures stay small when the cold operations' are boxed (before,
    /// `handle`'s was 11 KB).
    #[test]
    fn a_requests_future_stays_small() {
        fn size_of_handle<F, Fut>(_: F) -> usize
        where
            F: FnOnce(Arc<Gateway>, http::Request<Incoming>, ConnInfo) -> Fut,
        {
            std::mem::size_of::<Fut>()
        }
        let size = size_of_handle(handle);
        assert!(size <= 6 * 1024, "api::handle's future is {size} bytes");
    }

    #[test]
    fn every_route_of_the_table_matches() {
        let f = || name("f");
        let cases = [
            (POST, "/2023-03-30/functions", Route::CreateFunction),
            (GET, "/2023-03-30/functions", Route::ListFunctions),
            (
                GET,
                "/2023-03-30/functions/my-fn",
                Route::GetFunction {
                    name: name("my-fn"),
                },
            ),
            (
                PUT,
                "/2023-03-30/functions/f",
                Route::UpdateFunction { name: f() },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f",
                Route::DeleteFunction { name: f() },
            ),
            (
                POST,
                "/2023-03-30/functions/f_1/invocations",
                Route::InvokeFunction { name: name("f_1") },
            ),
            (
                PUT,
                "/2023-03-30/functions/f/async-invoke-config",
                Route::PutAsyncInvokeConfig { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/async-invoke-config",
                Route::GetAsyncInvokeConfig { name: f() },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/async-invoke-config",
                Route::DeleteAsyncInvokeConfig { name: f() },
            ),
            (
                GET,
                "/2023-03-30/async-invoke-configs",
                Route::ListAsyncInvokeConfigs,
            ),
            (
                GET,
                "/2023-03-30/functions/f/async-tasks",
                Route::ListAsyncTasks { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/async-tasks/t-1",
                Route::GetAsyncTask {
                    name: f(),
                    task: "t-1".into(),
                },
            ),
            (
                PUT,
                "/2023-03-30/functions/f/async-tasks/job%2D1/stop",
                Route::StopAsyncTask {
                    name: f(),
                    task: "job-1".into(),
                },
            ),
            (
                PUT,
                "/2023-03-30/functions/f/provision-config",
                Route::PutProvisionConfig { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/provision-config",
                Route::GetProvisionConfig { name: f() },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/provision-config",
                Route::DeleteProvisionConfig { name: f() },
            ),
            (
                GET,
                "/2023-03-30/provision-configs",
                Route::ListProvisionConfigs,
            ),
            (
                PUT,
                "/2023-03-30/functions/f/concurrency",
                Route::PutConcurrencyConfig { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/concurrency",
                Route::GetConcurrencyConfig { name: f() },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/concurrency",
                Route::DeleteConcurrencyConfig { name: f() },
            ),
            (
                GET,
                "/2023-03-30/concurrency-configs",
                Route::ListConcurrencyConfigs,
            ),
            (GET, "/2023-03-30/roles", Route::ListRoles),
            (
                PUT,
                "/2023-03-30/roles/Reader",
                Route::PutRole {
                    role: "Reader".into(),
                },
            ),
            (
                GET,
                "/2023-03-30/roles/Reader",
                Route::GetRole {
                    role: "Reader".into(),
                },
            ),
            (
                DELETE,
                "/2023-03-30/roles/Reader",
                Route::DeleteRole {
                    role: "Reader".into(),
                },
            ),
            (
                POST,
                "/2023-03-30/layers/my-layer/versions",
                Route::CreateLayerVersion {
                    layer: "my-layer".into(),
                },
            ),
            (
                GET,
                "/2023-03-30/layers/l/versions",
                Route::ListLayerVersions { layer: "l".into() },
            ),
            (
                GET,
                "/2023-03-30/layers/l/versions/2",
                Route::GetLayerVersion {
                    layer: "l".into(),
                    version: "2".into(),
                },
            ),
            (
                DELETE,
                "/2023-03-30/layers/l/versions/2",
                Route::DeleteLayerVersion {
                    layer: "l".into(),
                    version: "2".into(),
                },
            ),
            (GET, "/2023-03-30/layers", Route::ListLayers),
            (
                PUT,
                "/2023-03-30/layers/l/acl",
                Route::PutLayerACL { layer: "l".into() },
            ),
            (
                GET,
                "/2023-03-30/layerarn/acs%3Afc%3Acn-test%3A1%3Alayers%2Fl%2Fversions%2F1",
                Route::GetLayerVersionByArn {
                    arn: "acs:fc:cn-test:1:layers/l/versions/1".into(),
                },
            ),
            (GET, "/2023-03-30/runtimes", Route::ListRuntimes),
            (
                GET,
                "/2023-03-30/functions/f/instances",
                Route::ListInstances { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/instances/i-1/exec",
                Route::InstanceExec {
                    name: f(),
                    instance: "i-1".into(),
                },
            ),
            (
                GET,
                "/2023-03-30/functions/f/logs",
                Route::GetFunctionLogs { name: f() },
            ),
            (
                POST,
                "/2023-03-30/functions/f/vpc-bindings",
                Route::CreateVpcBinding { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/vpc-bindings",
                Route::ListVpcBindings { name: f() },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/vpc-bindings/vpc-1",
                Route::DeleteVpcBinding {
                    name: f(),
                    vpc: "vpc-1".into(),
                },
            ),
            (POST, "/2023-03-30/tags-v2", Route::TagResources),
            (DELETE, "/2023-03-30/tags-v2", Route::UntagResources),
            (GET, "/2023-03-30/tags-v2", Route::ListTagResources),
            (
                POST,
                "/2023-03-30/functions/f/versions",
                Route::PublishFunctionVersion { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/versions",
                Route::ListFunctionVersions { name: f() },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/versions/3",
                Route::DeleteFunctionVersion {
                    name: f(),
                    version: "3".into(),
                },
            ),
            (
                POST,
                "/2023-03-30/functions/f/aliases",
                Route::CreateAlias { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/aliases",
                Route::ListAliases { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/aliases/prod",
                Route::GetAlias {
                    name: f(),
                    alias: "prod".into(),
                },
            ),
            (
                PUT,
                "/2023-03-30/functions/f/aliases/prod",
                Route::UpdateAlias {
                    name: f(),
                    alias: "prod".into(),
                },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/aliases/prod",
                Route::DeleteAlias {
                    name: f(),
                    alias: "prod".into(),
                },
            ),
            (
                GET,
                "/2023-03-30/functions/f/code",
                Route::GetFunctionCode { name: f() },
            ),
            (
                POST,
                "/2023-03-30/functions/f/triggers",
                Route::CreateTrigger { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/triggers",
                Route::ListTriggers { name: f() },
            ),
            (
                GET,
                "/2023-03-30/functions/f/triggers/http",
                Route::GetTrigger {
                    name: f(),
                    trigger: "http".into(),
                },
            ),
            (
                PUT,
                "/2023-03-30/functions/f/triggers/http",
                Route::UpdateTrigger {
                    name: f(),
                    trigger: "http".into(),
                },
            ),
            (
                DELETE,
                "/2023-03-30/functions/f/triggers/http",
                Route::DeleteTrigger {
                    name: f(),
                    trigger: "http".into(),
                },
            ),
            (
                POST,
                "/2023-03-30/functions/f/invoke/enable",
                Route::EnableFunctionInvocation { name: f() },
            ),
            (
                POST,
                "/2023-03-30/functions/f/invoke/disable",
                Route::DisableFunctionInvocation { name: f() },
            ),
            (
                POST,
                "/2023-03-30/custom-domains",
                Route::CreateCustomDomain,
            ),
            (GET, "/2023-03-30/custom-domains", Route::ListCustomDomains),
            (
                GET,
                "/2023-03-30/custom-domains/shop.example.com",
                Route::GetCustomDomain {
                    domain: "shop.example.com".into(),
                },
            ),
            (
                PUT,
                "/2023-03-30/custom-domains/shop.example.com",
                Route::UpdateCustomDomain {
                    domain: "shop.example.com".into(),
                },
            ),
            (
                DELETE,
                "/2023-03-30/custom-domains/shop.example.com",
                Route::DeleteCustomDomain {
                    domain: "shop.example.com".into(),
                },
            ),
        ];
        for (method, path, want) in &cases {
            let got = route(method, path).unwrap();
            assert_eq!(&got, want, "{method} {path}");
            assert_eq!(
                got.operation().as_str(),
                format!("{want:?}").split([' ', '{']).next().unwrap()
            );
        }
        // Each row of the table is covered once.
        assert_eq!(cases.len(), ROUTES.len());
        assert_eq!(ROUTER.rows().count(), ROUTES.len());
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        let code = |m: Method, p: &str| route(&m, p).unwrap_err().code;
        assert_eq!(
            code(Method::PATCH, "/2023-03-30/functions/f"),
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(
            code(POST, "/2023-03-30/functions/f/async-invoke-config"),
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(
            code(POST, "/2023-03-30/functions/f/concurrency"),
            FcErrorCode::MethodNotAllowed
        );
        assert_eq!(code(GET, "/2023-03-30/nope"), FcErrorCode::PathNotSupported);
        assert_eq!(
            code(GET, "/2023-03-30/functions/"),
            FcErrorCode::PathNotSupported
        );
        assert_eq!(
            code(GET, "/2023-03-30/functions//logs"),
            FcErrorCode::PathNotSupported
        );
    }

    #[test]
    fn function_names_are_checked_after_decoding() {
        let e = route(&GET, "/2023-03-30/functions/..%2Fetc").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
        assert!(e.message.starts_with("functionName: "), "{}", e.message);
        let e = route(&GET, "/2023-03-30/functions/%FF").unwrap_err();
        assert_eq!(e.code, FcErrorCode::InvalidArgument);
    }

    #[test]
    fn routes_name_what_they_touch() {
        let r = route(&GET, "/2023-03-30/functions/f/async-tasks/t").unwrap();
        assert_eq!(r.function().map(FunctionName::as_str), Some("f"));
        let r = route(&GET, "/2023-03-30/layers/l/versions/3").unwrap();
        assert_eq!(r.layer(), Some(("l", Some("3"))));
        let r = route(&PUT, "/2023-03-30/layers/l/acl").unwrap();
        assert_eq!(r.layer(), Some(("l", None)));
        let r = route(&GET, "/2023-03-30/roles/R").unwrap();
        assert_eq!(r.role(), Some("R"));
        assert_eq!(r.function(), None);
    }
}
