//! DisableFunctionInvocation and EnableFunctionInvocation
//! (`POST /2023-03-30/functions/{name}/invoke/disable|enable`).
//!
//! Disabling turns every call of the function off, whatever its qualifier
//! (sync, async, HTTP trigger; timer ticks are skipped): no new instance is
//! started for it, its instances take no new calls and go once idle (all of
//! them at once, calls in flight included, with `abortOngoingRequest`), and
//! its provisioned instances are destroyed. The provision configuration is
//! kept with the restriction (GetProvisionConfig still shows it, with no
//! instance current) and put back by EnableFunctionInvocation. Both are
//! idempotent: disabling a disabled function updates its reason and retires
//! its instances again, enabling an enabled one changes nothing.
//!
//! FC answers both with `{"success": true}` and shows the state as the
//! function's `invocationRestriction` (`disable`, `reason`,
//! `lastModifiedTime`). A refused call answers 403
//! `FunctionInvocationDisabled` (FC does not document its code).

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FunctionName};
use kiln_internal_api::{PutProvision, RetireFunction};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::request::caller_function;
use super::respond::{json, Body};
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::model::InvocationRestriction;
use crate::versions::Qualifier;

/// The longest `reason` kept (FC does not say; its descriptions take 256).
pub const REASON_MAX: usize = 256;

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DisableInput {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    abort_ongoing_request: Option<bool>,
}

fn parse_disable(body: &[u8]) -> Result<DisableInput, FcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DisableInput::default());
    }
    let input: DisableInput = serde_json::from_slice(body).map_err(|e| {
        FcError::invalid_argument(format!(
            "the DisableFunctionInvocation body is not valid: {e}"
        ))
    })?;
    if let Some(r) = &input.reason {
        if r.chars().count() > REASON_MAX {
            return Err(FcError::invalid_argument(format!(
                "reason: at most {REASON_MAX} characters"
            )));
        }
    }
    Ok(input)
}

fn success() -> Response<Body> {
    json(StatusCode::OK, &json!({ "success": true }))
}

pub async fn disable(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input = parse_disable(&body)?;
    let entry = caller_function(gw, caller, name)?;
    let abort = input.abort_ongoing_request.unwrap_or(false);
    // The provision configurations to restore: those an earlier Disable
    // kept (the scheduler's were deleted then), else the scheduler's now,
    // LATEST's and its aliases'.
    let kept = match entry.record.config.invocation_restriction.as_ref() {
        Some(r) if r.disable => r.provisions.clone(),
        _ => gw
            .scheduler
            .provisions(&caller.account_id)
            .await?
            .into_iter()
            .filter(|d| &d.status.function_name == name)
            .map(|d| (d.status.qualifier, d.config))
            .collect(),
    };
    let now = gw.clock.now_ms();
    let reason = input.reason.unwrap_or_default();
    let restriction = InvocationRestriction {
        disable: true,
        reason: reason.clone(),
        modified_ms: now,
        provisions: kept,
    };
    // Calls are refused from here on; then the scheduler lets the
    // instances go (a failure answers an error: Disable again retries it).
    gw.catalog
        .update(&caller.account_id, name, now, None, |current| {
            let mut config = current.clone();
            config.invocation_restriction = Some(restriction.clone());
            Ok(config)
        })
        .await?;
    gw.scheduler
        .retire_function(&RetireFunction {
            account_id: caller.account_id.clone(),
            function_name: name.clone(),
            keep_revision: None,
            keep_versions: Vec::new(),
            abort_in_flight: abort,
        })
        .await?;
    tracing::info!(account = %caller.account_id, function = %name, reason, abort_ongoing_request = abort, "function invocations disabled");
    Ok(success())
}

pub async fn enable(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
) -> Result<Response<Body>, ApiError> {
    let entry = caller_function(gw, caller, name)?;
    let Some(current) = entry
        .record
        .config
        .invocation_restriction
        .as_ref()
        .filter(|r| r.disable)
    else {
        return Ok(success());
    };
    // Provisioned instances first: if the scheduler cannot take them, the
    // function stays disabled and Enable can be retried. An alias deleted
    // while the function was disabled took its configuration with it.
    for (qualifier, config) in &current.provisions {
        let q = Qualifier::parse(Some(qualifier))?;
        let spec = match super::provision::provision_spec(gw, &caller.account_id, name, &q) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(function = %name, %qualifier, error = %e, "a kept provision configuration is not restored");
                continue;
            }
        };
        gw.scheduler
            .put_provision(&PutProvision {
                spec,
                config: config.clone(),
                qualifier: qualifier.clone(),
            })
            .await?;
    }
    let now = gw.clock.now_ms();
    gw.catalog
        .update(&caller.account_id, name, now, None, |config| {
            let mut config = config.clone();
            config.invocation_restriction = Some(InvocationRestriction {
                disable: false,
                reason: String::new(),
                modified_ms: now,
                provisions: Default::default(),
            });
            Ok(config)
        })
        .await?;
    tracing::info!(account = %caller.account_id, function = %name, "function invocations enabled");
    Ok(success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disable_bodies_are_fcs_or_refused() {
        let d = parse_disable(b"").unwrap();
        assert!(d.reason.is_none() && d.abort_ongoing_request.is_none());
        let d = parse_disable(br#"{"reason": "offline", "abortOngoingRequest": true}"#).unwrap();
        assert_eq!(d.reason.as_deref(), Some("offline"));
        assert_eq!(d.abort_ongoing_request, Some(true));
        for bad in [
            &br#"{"reason": 1}"#[..],
            br#"{"abort": true}"#,
            b"not json",
            br#"{"abortOngoingRequest": "yes"}"#,
        ] {
            let e = parse_disable(bad).unwrap_err();
            assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument, "{e}");
        }
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(REASON_MAX + 1));
        assert!(parse_disable(long.as_bytes()).is_err());
    }
}
