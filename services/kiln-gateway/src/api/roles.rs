//! Roles, Kiln's extension in FC's style (FC leaves them to RAM):
//!
//! | operation  | request                                   |
//! |------------|-------------------------------------------|
//! | PutRole    | `PUT /2023-03-30/roles/{roleName}` with `{"description"?, "policy"}` |
//! | GetRole    | `GET /2023-03-30/roles/{roleName}`        |
//! | ListRoles  | `GET /2023-03-30/roles?prefix&limit&nextToken` |
//! | DeleteRole | `DELETE /2023-03-30/roles/{roleName}`     |
//!
//! A role's `arn` (`acs:ram::<accountId>:role/<roleName>`) is what a
//! function's `role` field names.

use std::sync::Arc;

use super::respond::{json, no_content, Body};
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FcErrorCode};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::request::encode_token;
use super::request::query_param;
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::model::fc_time;
use crate::ram::{check_role_name, Policy, RoleArn, RoleError, RoleRecord};

const DESCRIPTION_MAX: usize = 1024;
const LIST_LIMIT_DEFAULT: usize = 20;
const LIST_LIMIT_MAX: usize = 100;

/// `PutRoleInput`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PutRoleInput {
    #[serde(default)]
    description: Option<String>,
    policy: serde_json::Value,
}

/// `Role`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleOutput {
    pub role_name: String,
    pub arn: String,
    pub description: String,
    pub policy: Policy,
    pub created_time: String,
    pub last_modified_time: String,
}

impl RoleOutput {
    fn of(r: &RoleRecord) -> Self {
        Self {
            role_name: r.name.clone(),
            arn: RoleArn::of(&r.account_id, &r.name),
            description: r.description.clone(),
            policy: r.policy.clone(),
            created_time: fc_time(r.created_ms),
            last_modified_time: fc_time(r.modified_ms),
        }
    }
}

/// `ListRolesOutput`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListRolesOutput {
    roles: Vec<RoleOutput>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// The role name a `nextToken` of [`encode_token`] holds.
fn decode_token(token: &str) -> Result<String, FcError> {
    use base64::Engine;
    let invalid = || FcError::invalid_argument("nextToken is invalid");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let s = String::from_utf8(raw).map_err(|_| invalid())?;
    let name = s.strip_prefix("v1:").ok_or_else(invalid)?;
    check_role_name(name).map_err(|_| invalid())?;
    Ok(name.to_owned())
}

fn not_found(name: &str) -> FcError {
    FcError::new(
        FcErrorCode::EntityNotExistRole,
        format!("role '{name}' does not exist"),
    )
}

fn store_failed(e: RoleError) -> ApiError {
    tracing::error!(error = %e, "role store failure");
    FcError::internal("the role store failed; retry the request").into()
}

pub async fn put(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    check_role_name(name)?;
    let input: PutRoleInput = serde_json::from_slice(&body)
        .map_err(|e| FcError::invalid_argument(format!("invalid request body: {e}")))?;
    let description = input.description.unwrap_or_default();
    if description.len() > DESCRIPTION_MAX {
        return Err(FcError::invalid_argument(format!(
            "description is longer than {DESCRIPTION_MAX} bytes"
        ))
        .into());
    }
    let policy =
        Policy::parse(&input.policy).map_err(|e| FcError::invalid_argument(e.to_string()))?;
    let now = gw.clock.now_ms();
    let record = gw
        .ram
        .put(RoleRecord {
            account_id: caller.account_id.clone(),
            name: name.to_ascii_lowercase(),
            description,
            policy,
            created_ms: now,
            modified_ms: now,
        })
        .await
        .map_err(store_failed)?;
    tracing::info!(role = %record.name, "role written");
    Ok(json(StatusCode::OK, &RoleOutput::of(&record)))
}

pub fn get(gw: &Arc<Gateway>, caller: &Caller, name: &str) -> Result<Response<Body>, ApiError> {
    check_role_name(name)?;
    let r = gw
        .ram
        .role(&caller.account_id, name)
        .ok_or_else(|| not_found(name))?;
    Ok(json(StatusCode::OK, &RoleOutput::of(&r)))
}

pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
) -> Result<Response<Body>, ApiError> {
    check_role_name(name)?;
    if !gw
        .ram
        .delete(&caller.account_id, name)
        .await
        .map_err(store_failed)?
    {
        return Err(not_found(name).into());
    }
    tracing::info!(role = %name, "role deleted");
    Ok(no_content())
}

pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let prefix = query_param(parts, "prefix").unwrap_or_default();
    let limit = match query_param(parts, "limit") {
        None => LIST_LIMIT_DEFAULT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=LIST_LIMIT_MAX).contains(l))
            .ok_or_else(|| {
                FcError::invalid_argument(format!(
                    "limit must be between 1 and {LIST_LIMIT_MAX}, got {l:?}"
                ))
            })?,
    };
    let after = match query_param(parts, "nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(decode_token(&t)?),
    };
    let (roles, more) = gw
        .ram
        .list(&caller.account_id, &prefix, after.as_deref(), limit);
    let next_token = if more {
        roles.last().map(|r| encode_token(&r.name))
    } else {
        None
    };
    Ok(json(
        StatusCode::OK,
        &ListRolesOutput {
            roles: roles.iter().map(|r| RoleOutput::of(r)).collect(),
            next_token,
        },
    ))
}
