//! FC's concurrency configs (PutConcurrencyConfig, GetConcurrencyConfig,
//! DeleteConcurrencyConfig, ListConcurrencyConfigs): a function's reserved
//! concurrency, kept in the account's limits at the scheduler
//! (`/v1/accounts/{id}/functions/{name}/limits`), which reserves that many
//! instances of the account's burst pool for the function and caps it there.
//! An operator's `max_concurrency` for the function is left as it is.

use std::sync::Arc;

use super::respond::Body;
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FunctionName};
use kiln_internal_api::{AccountLimits, FunctionLimits};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::ApiError;
use super::request::function_arn as arn;
use super::request::query_param;
use super::respond::{json as json_response, no_content};
use crate::auth::Caller;
use crate::gateway::Gateway;

/// The most instances one function may reserve (the scheduler also
/// refuses more than the account's burst pool).
pub const RESERVED_MAX: i64 = 100_000;

/// FC's PutConcurrencyInput.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PutInput {
    #[serde(default)]
    reserved_concurrency: Option<i64>,
}

pub fn parse_input(body: &[u8]) -> Result<u32, FcError> {
    let input: PutInput = serde_json::from_slice(body).map_err(|e| {
        FcError::invalid_argument(format!("the concurrency config is not valid: {e}"))
    })?;
    match input.reserved_concurrency {
        None => Err(FcError::invalid_argument("reservedConcurrency is required")),
        Some(n) if (0..=RESERVED_MAX).contains(&n) => Ok(n as u32),
        Some(n) => Err(FcError::invalid_argument(format!(
            "reservedConcurrency must be between 0 and {RESERVED_MAX}, got {n}"
        ))),
    }
}

fn to_fc(arn: &str, reserved: Option<u32>) -> Value {
    let mut v = json!({ "functionArn": arn });
    if let Some(r) = reserved {
        v["reservedConcurrency"] = r.into();
    }
    v
}

async fn limits(gw: &Gateway, caller: &Caller) -> Result<AccountLimits, ApiError> {
    Ok(gw.scheduler.account_limits(&caller.account_id).await?)
}

/// Set the function's entry, keeping its `max_concurrency`.
async fn set(
    gw: &Gateway,
    caller: &Caller,
    name: &FunctionName,
    reserved: Option<u32>,
) -> Result<AccountLimits, ApiError> {
    let max_concurrency = limits(gw, caller)
        .await?
        .functions
        .get(name)
        .and_then(|f| f.max_concurrency);
    let f = FunctionLimits {
        reserved_concurrency: reserved,
        max_concurrency,
    };
    let limits = (reserved.is_some() || max_concurrency.is_some()).then_some(&f);
    Ok(gw
        .scheduler
        .set_function_limits(&caller.account_id, name, limits)
        .await?)
}

pub async fn put(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let reserved = parse_input(&body)?;
    super::request::caller_function(gw, caller, name)?;
    let now = set(gw, caller, name, Some(reserved)).await?;
    let stored = now.functions.get(name).and_then(|f| f.reserved_concurrency);
    tracing::info!(function = %name, reserved, "concurrency config set");
    Ok(json_response(
        StatusCode::OK,
        &to_fc(&arn(gw, caller, name.as_str()), stored),
    ))
}

/// A function without a configuration answers without reservedConcurrency.
pub async fn get(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
) -> Result<Response<Body>, ApiError> {
    super::request::caller_function(gw, caller, name)?;
    let reserved = limits(gw, caller)
        .await?
        .functions
        .get(name)
        .and_then(|f| f.reserved_concurrency);
    Ok(json_response(
        StatusCode::OK,
        &to_fc(&arn(gw, caller, name.as_str()), reserved),
    ))
}

/// Idempotent.
pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
) -> Result<Response<Body>, ApiError> {
    super::request::caller_function(gw, caller, name)?;
    set(gw, caller, name, None).await?;
    tracing::info!(function = %name, "concurrency config deleted");
    Ok(no_content())
}

/// ListConcurrencyConfigs: functions with a reserved concurrency, by name.
pub async fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let limit = match query_param(parts, "limit").filter(|l| !l.is_empty()) {
        None => 20,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(FcError::invalid_argument(format!(
                    "limit {l:?} must be an integer from 1 to 100"
                ))
                .into())
            }
        },
    };
    let only = query_param(parts, "functionName").filter(|s| !s.is_empty());
    let after = match query_param(parts, "nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(super::request::decode_token(&t)?),
    };
    let all = limits(gw, caller).await?;
    let mut page: Vec<(&FunctionName, u32)> = all
        .functions
        .iter()
        .filter_map(|(n, f)| Some((n, f.reserved_concurrency?)))
        .filter(|(n, _)| only.as_deref().is_none_or(|o| o == n.as_str()))
        .filter(|(n, _)| after.as_deref().is_none_or(|a| n.as_str() > a))
        .filter(|(n, _)| gw.catalog.function(&caller.account_id, n).is_some())
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let mut out = json!({
        "configs": page
            .iter()
            .map(|(n, r)| to_fc(&arn(gw, caller, n.as_str()), Some(*r)))
            .collect::<Vec<_>>(),
    });
    if more {
        if let Some((n, _)) = page.last() {
            out["nextToken"] = super::request::encode_token(n.as_str()).into();
        }
    }
    Ok(json_response(StatusCode::OK, &out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::FcErrorCode;

    #[test]
    fn reserved_concurrency_is_checked() {
        assert_eq!(parse_input(br#"{"reservedConcurrency": 0}"#).unwrap(), 0);
        assert_eq!(parse_input(br#"{"reservedConcurrency": 7}"#).unwrap(), 7);
        for (body, says) in [
            (&br#"{}"#[..], "required"),
            (br#"{"reservedConcurrency": -1}"#, "between 0"),
            (br#"{"reservedConcurrency": 100001}"#, "between 0"),
            (br#"{"reservedConcurrency": "x"}"#, "not valid"),
            (br#"{"reservedConcurrency": 1, "x": 1}"#, "unknown field"),
            (b"nope", "not valid"),
        ] {
            let e = parse_input(body).unwrap_err();
            assert_eq!(e.code, FcErrorCode::InvalidArgument);
            assert!(e.message.contains(says), "{says:?} not in {:?}", e.message);
        }
    }
}
