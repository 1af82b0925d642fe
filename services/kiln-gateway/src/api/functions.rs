//! CreateFunction, GetFunction, UpdateFunction, DeleteFunction,
//! ListFunctions.

use std::sync::Arc;

use super::respond::{json, no_content, Body};
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{limits, FcError, FunctionName};
use kiln_internal_api::RetireFunction;

use super::error::ApiError;
use super::request::{decode_token, encode_token, query_param};
use crate::auth::Caller;
use crate::catalog::NewCode;
use crate::gateway::Gateway;
use crate::model::{CodeRef, Function, FunctionRecord, ListFunctionsOutput};
use crate::validate::{self, ParsedInput};

/// A JSON body with a base64 zip of the largest allowed size, plus room
/// for the rest of the document.
pub const FUNCTION_BODY_MAX: usize = limits::CODE_ZIP_MAX.div_ceil(3) * 4 + 1024 * 1024;
pub const LIST_LIMIT_DEFAULT: usize = 20;
pub const LIST_LIMIT_MAX: usize = 100;

fn reply(gw: &Gateway, record: &FunctionRecord) -> Response<Body> {
    json(StatusCode::OK, &Function::from_record(record, &gw.region))
}

/// Inspect a new package off the async threads: safe to unpack, digest,
/// FC checksum; a `code.checksum` given by the caller must match.
async fn new_code(parsed: &mut ParsedInput) -> Result<Option<NewCode>, FcError> {
    let Some(zip) = parsed.zip.take() else {
        return Ok(None);
    };
    let expected = parsed.checksum.clone();
    let code = tokio::task::spawn_blocking(move || crate::code::inspect(zip))
        .await
        .map_err(|_| FcError::internal("code inspection failed"))??;
    if let Some(expected) = expected {
        if expected.trim() != code.blob.checksum {
            return Err(FcError::invalid_argument(format!(
                "code.checksum {expected} does not match the package's CRC-64 {}",
                code.blob.checksum
            )));
        }
    }
    Ok(Some(code))
}

fn code_ref(c: &NewCode) -> CodeRef {
    CodeRef {
        sha256: c.blob.sha256.clone(),
        size: c.blob.size,
        checksum: c.blob.checksum.clone(),
    }
}

pub async fn create(
    gw: &Arc<Gateway>,
    caller: &Caller,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let mut parsed = validate::parse_input(&body)?;
    drop(body);
    let name = validate::function_name(&parsed.input)?;
    check_role(gw, caller, &parsed)?;
    validate::require_code(&parsed)?;
    // Validate the configuration before the (costly) package inspection.
    let placeholder = match parsed.zip {
        Some(_) => CodeRef {
            sha256: String::new(),
            size: 0,
            checksum: String::new(),
        },
        None => validate::no_code(),
    };
    let checked = validate::build_config(None, &parsed, placeholder)?;
    check_vpc(gw, caller, None, &checked)?;
    let now = gw.clock.now_ms();
    gw.runtimes.check_create(checked.runtime, now)?;
    let layers = match &parsed.input.layers {
        Some(arns) => {
            gw.catalog
                .resolve_layers(&caller.account_id, &gw.region, checked.runtime, arns)?
        }
        None => Vec::new(),
    };
    // A custom-container function has no package (validate::require_code).
    let code = new_code(&mut parsed).await?;
    let code_ref = code.as_ref().map_or_else(validate::no_code, code_ref);
    let mut config = validate::build_config(None, &parsed, code_ref)?;
    config.layers = layers;
    let record = FunctionRecord {
        account_id: caller.account_id.clone(),
        name,
        function_id: uuid::Uuid::new_v4().to_string(),
        created_ms: now,
        modified_ms: now,
        config,
    };
    let entry = gw.catalog.create(record, code).await?;
    tracing::info!(function = %entry.record.name, revision = %entry.spec.revision, "function created");
    Ok(reply(gw, &entry.record))
}

/// A `vpcConfig` that names a VPC other than the function's current one
/// must name a VPC the caller's account owns (see [`crate::vpcs`]).
fn check_vpc(
    gw: &Gateway,
    caller: &Caller,
    current: Option<&crate::model::FunctionConfig>,
    config: &crate::model::FunctionConfig,
) -> Result<(), FcError> {
    let vpc_of = |c: &crate::model::FunctionConfig| {
        validate::function_network(c).and_then(|n| n.vpc.map(|v| v.vpc_id))
    };
    match vpc_of(config) {
        Some(id) if current.and_then(vpc_of).as_ref() != Some(&id) => {
            gw.vpcs.check(&caller.account_id, &id)
        }
        _ => Ok(()),
    }
}

/// FC's `role`, when given: a role ARN of the caller's account naming an
/// existing role (see [`crate::ram`]), or `""` for none.
fn check_role(
    gw: &Gateway,
    caller: &Caller,
    parsed: &validate::ParsedInput,
) -> Result<(), FcError> {
    match parsed.extras.get("role") {
        None => Ok(()),
        Some(v) => gw.ram.check_function_role(&caller.account_id, v),
    }
}

pub fn get(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let qualifier = super::request::qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    // A version's snapshot; for an alias its major version's (u = 1 is
    // past every canary's share).
    let entry = gw
        .catalog
        .resolve(&caller.account_id, name, &qualifier, 1.0)?;
    Ok(reply(gw, &entry.record))
}

pub async fn update(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let mut parsed = validate::parse_input(&body)?;
    drop(body);
    if gw.catalog.function(&caller.account_id, name).is_none() {
        return Err(super::request::not_found(name).into());
    }
    check_role(gw, caller, &parsed)?;
    let code = new_code(&mut parsed).await?;
    let new_ref = code.as_ref().map(code_ref);
    let before = gw.catalog.function(&caller.account_id, name);
    let now = gw.clock.now_ms();
    let entry = gw
        .catalog
        .update(&caller.account_id, name, now, code, |current| {
            let code = new_ref.clone().unwrap_or_else(|| current.code.clone());
            let mut config = validate::build_config(Some(current), &parsed, code)?;
            check_vpc(gw, caller, Some(current), &config)?;
            gw.runtimes
                .check_update(current.runtime, config.runtime, now)?;
            if let Some(arns) = &parsed.input.layers {
                config.layers = gw.catalog.resolve_layers(
                    &caller.account_id,
                    &gw.region,
                    config.runtime,
                    arns,
                )?;
            }
            Ok(config)
        })
        .await?;
    let changed = before.is_none_or(|b| b.spec.revision != entry.spec.revision);
    if changed {
        retire(gw, caller, name, Some(entry.spec.revision.clone()));
        crate::provisioning::follow_update(gw, &caller.account_id, entry.spec.clone());
    }
    tracing::info!(function = %name, revision = %entry.spec.revision, "function updated");
    Ok(reply(gw, &entry.record))
}

pub async fn delete(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
) -> Result<Response<Body>, ApiError> {
    gw.catalog.delete(&caller.account_id, name).await?;
    retire(gw, caller, name, None);
    tracing::info!(function = %name, "function deleted");
    Ok(no_content())
}

/// Tell the scheduler that instances of other revisions take no new calls.
/// Best effort: if it is unreachable its idle release catches up.
fn retire(gw: &Arc<Gateway>, caller: &Caller, name: &FunctionName, keep_revision: Option<String>) {
    let msg = RetireFunction {
        account_id: caller.account_id.clone(),
        function_name: name.clone(),
        keep_versions: if keep_revision.is_some() {
            gw.catalog.version_revisions(&caller.account_id, name)
        } else {
            Vec::new()
        },
        keep_revision,
        abort_in_flight: false,
    };
    let scheduler = gw.scheduler.clone();
    tokio::spawn(async move {
        if let Err(e) = scheduler.retire_function(&msg).await {
            tracing::warn!(function = %msg.function_name, error = %e, "cannot retire old instances; the scheduler's idle release will");
        }
    });
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
    let filter = super::list_filter::ListFilter::from_query(parts)?;
    let (entries, more) =
        gw.catalog
            .list(&caller.account_id, &prefix, after.as_deref(), limit, |e| {
                filter.matches(&e.record)
            });
    let next_token = if more {
        entries.last().map(|e| encode_token(e.record.name.as_str()))
    } else {
        None
    };
    let out = ListFunctionsOutput {
        functions: entries
            .iter()
            .map(|e| Function::from_record(&e.record, &gw.region))
            .collect(),
        next_token,
    };
    Ok(json(StatusCode::OK, &out))
}
