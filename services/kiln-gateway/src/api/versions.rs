//! PublishFunctionVersion, ListFunctionVersions, DeleteFunctionVersion,
//! CreateAlias, GetAlias, UpdateAlias, DeleteAlias, ListAliases (see
//! [`crate::versions`] for what a version and an alias are).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{FcError, FunctionName};
use kiln_internal_api::RetireFunction;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::request::{caller_function, encode_token, list_limit, page_by_name, query_param};
use super::respond::{json, no_content, Body};
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::model::fc_time;
use crate::versions::{self, AliasChange, AliasRecord, VersionEntry};

/// `PublishVersionInput`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PublishVersionInput {
    description: Option<String>,
}

/// `CreateAliasInput` and `UpdateAliasInput` (which has no `aliasName`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AliasInput {
    alias_name: Option<String>,
    version_id: Option<String>,
    description: Option<String>,
    additional_version_weight: Option<BTreeMap<String, f64>>,
}

/// `Version`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Version {
    version_id: String,
    description: String,
    created_time: String,
    last_modified_time: String,
}

impl Version {
    fn of(v: &VersionEntry) -> Self {
        Self {
            version_id: v.version.to_string(),
            description: v.description.clone(),
            created_time: fc_time(v.created_ms),
            last_modified_time: fc_time(v.created_ms),
        }
    }
}

/// `ListVersionsOutput`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListVersionsOutput {
    versions: Vec<Version>,
    direction: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// `Alias`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Alias {
    alias_name: String,
    version_id: String,
    additional_version_weight: BTreeMap<String, f64>,
    description: String,
    created_time: String,
    last_modified_time: String,
}

impl Alias {
    fn of(a: &AliasRecord) -> Self {
        Self {
            alias_name: a.alias.clone(),
            version_id: a.version.to_string(),
            additional_version_weight: a
                .additional
                .iter()
                .map(|(v, w)| (v.to_string(), *w))
                .collect(),
            description: a.description.clone(),
            created_time: fc_time(a.created_ms),
            last_modified_time: fc_time(a.modified_ms),
        }
    }
}

/// `ListAliasesOutput`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListAliasesOutput {
    aliases: Vec<Alias>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_token: Option<String>,
}

/// A JSON body of type `T`; an empty body is `T::default()`.
fn body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, FcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| FcError::invalid_argument(format!("request body is invalid: {e}")))
}

fn version_id(name: &FunctionName, s: &str) -> Result<u32, FcError> {
    versions::parse_version_id(s).ok_or_else(|| versions::version_not_found(name, s))
}

/// Instances of versions that are gone take no new calls; LATEST's and
/// the remaining versions' stay. Best effort, like UpdateFunction's.
fn retire_others(gw: &Arc<Gateway>, caller: &Caller, name: &FunctionName) {
    let Some(latest) = gw.catalog.function(&caller.account_id, name) else {
        return;
    };
    let msg = RetireFunction {
        account_id: caller.account_id.clone(),
        function_name: name.clone(),
        keep_revision: Some(latest.spec.revision.clone()),
        keep_versions: gw.catalog.version_revisions(&caller.account_id, name),
        abort_in_flight: false,
    };
    let scheduler = gw.scheduler.clone();
    tokio::spawn(async move {
        if let Err(e) = scheduler.retire_function(&msg).await {
            tracing::warn!(function = %msg.function_name, error = %e, "cannot retire a deleted version's instances; the scheduler's idle release will");
        }
    });
}

pub async fn publish(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: PublishVersionInput = body(&raw)?;
    let description = input.description.unwrap_or_default();
    versions::check_description(&description)?;
    caller_function(gw, caller, name)?;
    let v = gw
        .catalog
        .publish_version(&caller.account_id, name, description, gw.clock.now_ms())
        .await?;
    tracing::info!(function = %name, version = v.version, revision = %v.entry.spec.revision, "version published");
    Ok(json(StatusCode::OK, &Version::of(&v)))
}

pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    let limit = list_limit(parts)?;
    // FC lists newest first unless asked FORWARD.
    let forward = match query_param(parts, "direction").as_deref() {
        None | Some("") | Some("BACKWARD") => false,
        Some("FORWARD") => true,
        Some(d) => {
            return Err(FcError::invalid_argument(format!(
                "direction must be FORWARD or BACKWARD, got {d:?}"
            ))
            .into())
        }
    };
    let after = match query_param(parts, "nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(
            super::request::decode_raw_token(&t)?
                .parse::<u32>()
                .map_err(|_| FcError::invalid_argument("nextToken is invalid"))?,
        ),
    };
    let mut all = gw.catalog.versions_of(&caller.account_id, name);
    if !forward {
        all.reverse();
    }
    let mut page: Vec<_> = all
        .into_iter()
        .filter(|v| match after {
            None => true,
            Some(a) if forward => v.version > a,
            Some(a) => v.version < a,
        })
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_token = more
        .then(|| page.last().map(|v| encode_token(&v.version.to_string())))
        .flatten();
    Ok(json(
        StatusCode::OK,
        &ListVersionsOutput {
            versions: page.iter().map(|v| Version::of(v)).collect(),
            direction: if forward { "FORWARD" } else { "BACKWARD" },
            next_token,
        },
    ))
}

pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    version: &str,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    let v = version_id(name, version)?;
    gw.catalog
        .delete_version(&caller.account_id, name, v)
        .await?;
    retire_others(gw, caller, name);
    tracing::info!(function = %name, version = v, "version deleted");
    Ok(no_content())
}

/// The fields of an alias input, checked.
fn change(name: &FunctionName, input: AliasInput) -> Result<AliasChange, FcError> {
    if let Some(d) = &input.description {
        versions::check_description(d)?;
    }
    let version = match input.version_id.as_deref() {
        None => None,
        Some(v) => Some(version_id(name, v)?),
    };
    Ok(AliasChange {
        version,
        additional: input.additional_version_weight,
        description: input.description,
    })
}

pub async fn create_alias(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: AliasInput = body(&raw)?;
    let alias = input
        .alias_name
        .clone()
        .ok_or_else(|| FcError::invalid_argument("aliasName is required"))?;
    versions::check_alias_name(&alias)?;
    if input.version_id.is_none() {
        return Err(FcError::invalid_argument("versionId is required").into());
    }
    caller_function(gw, caller, name)?;
    let change = change(name, input)?;
    let a = gw
        .catalog
        .put_alias(
            &caller.account_id,
            name,
            &alias,
            change,
            true,
            gw.clock.now_ms(),
        )
        .await?;
    tracing::info!(function = %name, alias = %a.alias, version = a.version, canary = ?a.additional, "alias created");
    Ok(json(StatusCode::OK, &Alias::of(&a)))
}

pub async fn update_alias(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    alias: &str,
    raw: Bytes,
) -> Result<Response<Body>, ApiError> {
    let input: AliasInput = body(&raw)?;
    if input.alias_name.as_deref().is_some_and(|a| a != alias) {
        return Err(FcError::invalid_argument("aliasName cannot be changed").into());
    }
    caller_function(gw, caller, name)?;
    let change = change(name, input)?;
    let a = gw
        .catalog
        .put_alias(
            &caller.account_id,
            name,
            alias,
            change,
            false,
            gw.clock.now_ms(),
        )
        .await?;
    tracing::info!(function = %name, alias = %a.alias, version = a.version, canary = ?a.additional, "alias updated");
    crate::provisioning::follow_alias(gw, &caller.account_id, name, alias).await;
    Ok(json(StatusCode::OK, &Alias::of(&a)))
}

pub fn get_alias(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    alias: &str,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    let a = gw
        .catalog
        .alias(&caller.account_id, name, alias)
        .ok_or_else(|| versions::alias_not_found(name, alias))?;
    Ok(json(StatusCode::OK, &Alias::of(&a)))
}

pub async fn delete_alias(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    alias: &str,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    gw.catalog
        .delete_alias(&caller.account_id, name, alias)
        .await?;
    tracing::info!(function = %name, alias, "alias deleted");
    crate::provisioning::drop_alias(gw, &caller.account_id, name, alias).await;
    Ok(no_content())
}

pub fn list_aliases(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    caller_function(gw, caller, name)?;
    let (page, next_token) = page_by_name(
        parts,
        gw.catalog.aliases_of(&caller.account_id, name),
        |a| &a.alias,
    )?;
    Ok(json(
        StatusCode::OK,
        &ListAliasesOutput {
            aliases: page.iter().map(|a| Alias::of(a)).collect(),
            next_token,
        },
    ))
}
