//! Inbound access by VPC: FC's VPC bindings (CreateVpcBinding,
//! DeleteVpcBinding, ListVpcBindings on `/functions/{name}/vpc-bindings`)
//! and, modelled on FC's `HTTPTriggerConfig.disableURLInternet`, a
//! function-level `disableURLInternet`: a function with it set is VPC-only,
//! refused on the internet listener with FC's AccessDenied (403) and served
//! only from the VPCs it is bound to. A VPC-only function needs a binding
//! (see `validate`), so internet and VPC-only access exclude each other.
//!
//! A listener that serves VPCs marks its requests with a [`Listener`]
//! extension; requests without one came from the internet.

use std::sync::Arc;

use super::respond::{json, Body};
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FcErrorCode, FunctionName};
use serde_json::Value;

use super::error::ApiError;
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::model::FunctionConfig;
use crate::validate;

pub use crate::model::{BINDINGS_KEY, DISABLE_INTERNET_KEY};
/// Most VPCs one function may be bound to.
pub const BINDINGS_MAX: usize = 20;

/// Which listener a call came in on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listener {
    Internet,
    /// A VPC listener and the VPC ids it serves.
    Vpc(Arc<Vec<String>>),
}

/// The VPC ids a function is bound to, in the order they were bound.
pub fn bindings(config: &FunctionConfig) -> Vec<String> {
    config
        .extras
        .get(BINDINGS_KEY)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the function takes calls only from its VPCs.
pub fn vpc_only(config: &FunctionConfig) -> bool {
    config.extras.get(DISABLE_INTERNET_KEY) == Some(&Value::Bool(true))
}

fn denied(msg: String) -> FcError {
    FcError::new(FcErrorCode::AccessDenied, msg)
}

/// May a call to `name` come in on `listener`? Internet: unless the
/// function is VPC-only. A VPC listener: when the function is bound to
/// one of the VPCs it serves.
pub fn check_access(
    listener: &Listener,
    name: &FunctionName,
    config: &FunctionConfig,
) -> Result<(), FcError> {
    match listener {
        Listener::Internet if vpc_only(config) => Err(denied(format!(
            "function '{name}' accepts calls only from its bound VPCs (disableURLInternet): call it on the VPC endpoint"
        ))),
        Listener::Internet => Ok(()),
        Listener::Vpc(served) => {
            if bindings(config).iter().any(|b| served.contains(b)) {
                Ok(())
            } else {
                Err(denied(format!(
                    "function '{name}' has no VPC binding for the VPC of this endpoint"
                )))
            }
        }
    }
}

/// The access check of an invocation (a function that does not exist is
/// left to the invoke path to report).
pub fn check_invoke(
    gw: &Gateway,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<(), FcError> {
    let Some(entry) = gw.catalog.function(&caller.account_id, name) else {
        return Ok(());
    };
    let listener = parts
        .extensions
        .get::<Listener>()
        .cloned()
        .unwrap_or(Listener::Internet);
    check_access(&listener, name, &entry.record.config)
}

/// `CreateVpcBindingInput`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateVpcBindingInput {
    vpc_id: String,
}

/// `ListVpcBindingsOutput`.
#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListVpcBindingsOutput {
    vpc_ids: Vec<String>,
}

fn set_bindings(config: &mut FunctionConfig, ids: Vec<String>) {
    if ids.is_empty() {
        config.extras.remove(BINDINGS_KEY);
    } else {
        config.extras.insert(
            BINDINGS_KEY.into(),
            Value::Array(ids.into_iter().map(Value::String).collect()),
        );
    }
}

/// CreateVpcBinding: bind the function to a VPC (binding it again is a
/// no-op).
pub async fn create(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: CreateVpcBindingInput = serde_json::from_slice(&body)
        .map_err(|e| FcError::invalid_argument(format!("invalid request body: {e}")))?;
    validate::check_network_id("vpcId", "vpc-", &input.vpc_id)?;
    super::request::caller_function(gw, caller, name)?;
    gw.vpcs.check(&caller.account_id, &input.vpc_id)?;
    let now = gw.clock.now_ms();
    gw.catalog
        .update(&caller.account_id, name, now, None, |current| {
            let mut config = current.clone();
            let mut ids = bindings(current);
            if !ids.contains(&input.vpc_id) {
                if ids.len() >= BINDINGS_MAX {
                    return Err(FcError::invalid_argument(format!(
                        "function '{name}' already has {BINDINGS_MAX} VPC bindings"
                    )));
                }
                ids.push(input.vpc_id.clone());
            }
            set_bindings(&mut config, ids);
            Ok(config)
        })
        .await?;
    tracing::info!(function = %name, vpc_id = %input.vpc_id, "VPC binding created");
    Ok(json(StatusCode::OK, &serde_json::json!({})))
}

/// DeleteVpcBinding. The last binding of a VPC-only function stays until
/// the function takes internet calls again.
pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    vpc_id: &str,
) -> Result<Response<Body>, ApiError> {
    validate::check_network_id("vpcId", "vpc-", vpc_id)?;
    super::request::caller_function(gw, caller, name)?;
    let now = gw.clock.now_ms();
    gw.catalog
        .update(&caller.account_id, name, now, None, |current| {
            let mut ids = bindings(current);
            let before = ids.len();
            ids.retain(|id| id != vpc_id);
            if ids.len() == before {
                return Err(FcError::invalid_argument(format!(
                    "function '{name}' has no VPC binding for {vpc_id}"
                )));
            }
            if ids.is_empty() && vpc_only(current) {
                return Err(FcError::invalid_argument(format!(
                    "{vpc_id} is the last VPC binding of '{name}', which takes calls only from its VPCs: set disableURLInternet to false first"
                )));
            }
            let mut config = current.clone();
            set_bindings(&mut config, ids);
            Ok(config)
        })
        .await?;
    tracing::info!(function = %name, vpc_id, "VPC binding deleted");
    Ok(super::respond::no_content())
}

/// ListVpcBindings.
pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
) -> Result<Response<Body>, ApiError> {
    let entry = super::request::caller_function(gw, caller, name)?;
    Ok(json(
        StatusCode::OK,
        &ListVpcBindingsOutput {
            vpc_ids: bindings(&entry.record.config),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(extras: Value) -> FunctionConfig {
        let body = json!({"functionName": "f", "runtime": "custom", "handler": "h",
            "code": {"zipFile": "UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="}});
        let p = validate::parse_input(body.to_string().as_bytes()).unwrap();
        let mut c = validate::build_config(
            None,
            &p,
            crate::model::CodeRef {
                sha256: "00".repeat(32),
                size: 1,
                checksum: "1".into(),
            },
        )
        .unwrap();
        c.extras.extend(extras.as_object().unwrap().clone());
        c
    }

    #[test]
    fn access_follows_the_listener_bindings_and_switch() {
        let name: FunctionName = "f".parse().unwrap();
        let vpc_a = Listener::Vpc(Arc::new(vec!["vpc-a".into()]));
        let vpc_b = Listener::Vpc(Arc::new(vec!["vpc-b".into(), "vpc-c".into()]));

        let open = config(json!({}));
        assert!(check_access(&Listener::Internet, &name, &open).is_ok());
        assert!(check_access(&vpc_a, &name, &open).is_err());

        let bound = config(json!({"vpcBindings": ["vpc-a"]}));
        assert!(check_access(&Listener::Internet, &name, &bound).is_ok());
        assert!(check_access(&vpc_a, &name, &bound).is_ok());

        let only = config(json!({"vpcBindings": ["vpc-a"], "disableURLInternet": true}));
        let e = check_access(&Listener::Internet, &name, &only).unwrap_err();
        assert_eq!(e.code, FcErrorCode::AccessDenied);
        assert_eq!(e.code.http_status(), 403);
        assert!(check_access(&vpc_a, &name, &only).is_ok());
        let e = check_access(&vpc_b, &name, &only).unwrap_err();
        assert_eq!(e.code, FcErrorCode::AccessDenied);
    }

    #[test]
    fn bindings_are_read_and_written_in_order() {
        let mut c = config(json!({}));
        assert!(bindings(&c).is_empty());
        set_bindings(&mut c, vec!["vpc-b".into(), "vpc-a".into()]);
        assert_eq!(bindings(&c), ["vpc-b", "vpc-a"]);
        set_bindings(&mut c, vec![]);
        assert!(!c.extras.contains_key(BINDINGS_KEY));
    }
}
