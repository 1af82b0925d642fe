//! Authorization by operation: every public operation names its RAM
//! action (`fc:<Operation>`) and the resource it acts on; a caller signing
//! with temporary credentials may only do what its role's policy allows.
//! Account keys may do everything.
//!
//! [`resource`] matches on every [`Operation`] without a wildcard arm, so a
//! new operation does not compile until it says which resource it touches.

use kiln_core::{AccountId, FcError, FcErrorCode};

use super::Ram;
use crate::api::{Operation, Route};
use crate::auth::{Caller, Principal};

/// `fc:<Operation>`.
pub fn action(op: Operation) -> String {
    format!("fc:{}", op.as_str())
}

/// The resource `route` acts on, as a RAM resource name.
pub fn resource(region: &str, account: &AccountId, route: &Route) -> String {
    let fc = |rest: &str| format!("acs:fc:{region}:{account}:{rest}");
    let function = || match route.function() {
        Some(n) => fc(&format!("functions/{n}")),
        None => fc("functions/*"),
    };
    let layer = || match route.layer() {
        Some((l, Some(v))) => fc(&format!("layers/{l}/versions/{v}")),
        Some((l, None)) => fc(&format!("layers/{l}")),
        None => fc("layers/*"),
    };
    let domain = || match route.custom_domain() {
        Some(d) => fc(&format!("custom-domains/{d}")),
        None => fc("custom-domains/*"),
    };
    let role = || match route.role() {
        Some(r) => format!("acs:ram::{account}:role/{}", r.to_ascii_lowercase()),
        None => format!("acs:ram::{account}:role/*"),
    };
    match route.operation() {
        Operation::CreateFunction
        | Operation::ListFunctions
        | Operation::GetFunction
        | Operation::UpdateFunction
        | Operation::DeleteFunction
        | Operation::InvokeFunction
        | Operation::PutAsyncInvokeConfig
        | Operation::GetAsyncInvokeConfig
        | Operation::DeleteAsyncInvokeConfig
        | Operation::ListAsyncInvokeConfigs
        | Operation::GetAsyncTask
        | Operation::ListAsyncTasks
        | Operation::StopAsyncTask
        | Operation::PutProvisionConfig
        | Operation::GetProvisionConfig
        | Operation::DeleteProvisionConfig
        | Operation::ListProvisionConfigs
        | Operation::PutConcurrencyConfig
        | Operation::GetConcurrencyConfig
        | Operation::DeleteConcurrencyConfig
        | Operation::ListConcurrencyConfigs
        | Operation::ListInstances
        | Operation::InstanceExec
        | Operation::GetFunctionLogs
        | Operation::CreateVpcBinding
        | Operation::DeleteVpcBinding
        | Operation::ListVpcBindings
        | Operation::TagResources
        | Operation::UntagResources
        | Operation::ListTagResources
        | Operation::PublishFunctionVersion
        | Operation::ListFunctionVersions
        | Operation::DeleteFunctionVersion
        | Operation::CreateAlias
        | Operation::GetAlias
        | Operation::UpdateAlias
        | Operation::DeleteAlias
        | Operation::ListAliases
        | Operation::GetFunctionCode
        | Operation::CreateTrigger
        | Operation::GetTrigger
        | Operation::UpdateTrigger
        | Operation::DeleteTrigger
        | Operation::ListTriggers
        | Operation::EnableFunctionInvocation
        | Operation::DisableFunctionInvocation => function(),
        Operation::CreateCustomDomain
        | Operation::GetCustomDomain
        | Operation::UpdateCustomDomain
        | Operation::DeleteCustomDomain
        | Operation::ListCustomDomains => domain(),
        Operation::CreateLayerVersion
        | Operation::GetLayerVersion
        | Operation::GetLayerVersionByArn
        | Operation::ListLayers
        | Operation::ListLayerVersions
        | Operation::DeleteLayerVersion
        | Operation::PutLayerACL => layer(),
        Operation::ListRuntimes => fc("runtimes/*"),
        Operation::PutRole | Operation::GetRole | Operation::ListRoles | Operation::DeleteRole => {
            role()
        }
    }
}

/// May `caller` run `route`?
pub fn authorize(ram: &Ram, region: &str, caller: &Caller, route: &Route) -> Result<(), FcError> {
    let session = match &caller.principal {
        Principal::Account => return Ok(()),
        Principal::Role(s) => s,
    };
    let denied = |why: String| Err(FcError::new(FcErrorCode::AccessDenied, why));
    let Some(role) = ram.role(&caller.account_id, &session.role) else {
        return denied(format!(
            "the role {} of these temporary credentials no longer exists",
            session.role
        ));
    };
    let action = action(route.operation());
    let resource = resource(region, &caller.account_id, route);
    if role.policy.allows(&action, &resource) {
        Ok(())
    } else {
        denied(format!(
            "role {} is not allowed to perform {action} on {resource}",
            session.role
        ))
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::api::route;

    #[test]
    fn resources_name_what_the_route_touches() {
        let a: AccountId = "7".parse().unwrap();
        let res = |m: Method, p: &str| resource("r", &a, &route(&m, p).unwrap());
        assert_eq!(
            res(Method::GET, "/2023-03-30/functions/f"),
            "acs:fc:r:7:functions/f"
        );
        assert_eq!(
            res(Method::POST, "/2023-03-30/functions/f/invocations"),
            "acs:fc:r:7:functions/f"
        );
        assert_eq!(
            res(Method::POST, "/2023-03-30/functions"),
            "acs:fc:r:7:functions/*"
        );
        assert_eq!(
            res(Method::GET, "/2023-03-30/roles/Reader"),
            "acs:ram::7:role/reader"
        );
        assert_eq!(res(Method::GET, "/2023-03-30/roles"), "acs:ram::7:role/*");
        assert_eq!(
            action(
                route(&Method::DELETE, "/2023-03-30/functions/f")
                    .unwrap()
                    .operation()
            ),
            "fc:DeleteFunction"
        );
    }
}
