//! CreateLayerVersion, GetLayerVersion, GetLayerVersionByArn, ListLayers,
//! ListLayerVersions, DeleteLayerVersion, PutLayerACL.

use std::sync::Arc;

use super::respond::{empty, json, no_content, Body};
use base64::Engine;
use bytes::Bytes;
use http::{Response, StatusCode};
use kiln_core::{limits, FcError, FcErrorCode};

use super::error::ApiError;
use super::request::query_param;
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::layers::{self, CreateLayerVersionInput, Layer, LayerArn, NewLayerVersion};

/// A JSON body with a base64 layer zip of the largest allowed size.
pub const LAYER_BODY_MAX: usize = limits::CODE_ZIP_MAX.div_ceil(3) * 4 + 64 * 1024;

fn too_large() -> FcError {
    FcError::new(
        FcErrorCode::EntityTooLarge,
        format!(
            "layer code package exceeds maximum allowed size ({} bytes)",
            limits::CODE_ZIP_MAX
        ),
    )
}

fn version_of(raw: &str) -> Result<u32, FcError> {
    layers::parse_version(raw).ok_or_else(|| {
        FcError::invalid_argument(format!(
            "version {:?} is invalid: a positive integer",
            raw.chars().take(40).collect::<String>()
        ))
    })
}

pub async fn create_version(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    layers::check_layer_name(name)?;
    let input: CreateLayerVersionInput = serde_json::from_slice(&body)
        .map_err(|e| FcError::invalid_argument(format!("invalid request body: {e}")))?;
    drop(body);
    let (compatible_runtime, description, license) = layers::check_fields(&input)?;
    let code = input
        .code
        .ok_or_else(|| FcError::invalid_argument("code is required: give code.zipFile"))?;
    if code.oss_bucket_name.is_some() || code.oss_object_name.is_some() {
        return Err(FcError::invalid_argument(
            "code.ossBucketName/ossObjectName are not supported: upload the package as code.zipFile",
        )
        .into());
    }
    let b64 = code
        .zip_file
        .ok_or_else(|| FcError::invalid_argument("code.zipFile is required"))?;
    if b64.len() > limits::CODE_ZIP_MAX.div_ceil(3) * 4 + 4 {
        return Err(too_large().into());
    }
    let zip = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| FcError::invalid_argument(format!("code.zipFile is not valid base64: {e}")))?;
    drop(b64);
    if zip.len() > limits::CODE_ZIP_MAX {
        return Err(too_large().into());
    }
    let checksum = code.checksum;
    let inspected = tokio::task::spawn_blocking(move || crate::code::inspect(zip))
        .await
        .map_err(|_| FcError::internal("layer inspection failed"))??;
    if let Some(expected) = checksum {
        if expected.trim() != inspected.blob.checksum {
            return Err(FcError::invalid_argument(format!(
                "code.checksum {expected} does not match the package's CRC-64 {}",
                inspected.blob.checksum
            ))
            .into());
        }
    }
    let (v, public) = gw
        .catalog
        .create_layer_version(
            &caller.account_id,
            name,
            NewLayerVersion {
                code: inspected,
                compatible_runtime,
                description,
                license,
            },
            gw.clock.now_ms(),
        )
        .await?;
    tracing::info!(layer = name, version = v.version, digest = %v.code.sha256, "layer version created");
    Ok(json(StatusCode::OK, &Layer::new(&v, public, &gw.region)))
}

pub fn get_version(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    version: &str,
) -> Result<Response<Body>, ApiError> {
    layers::check_layer_name(name)?;
    let version = version_of(version)?;
    let (v, public) = gw
        .catalog
        .layer_version(&caller.account_id, name, version)?;
    Ok(json(StatusCode::OK, &Layer::new(&v, public, &gw.region)))
}

pub fn get_by_arn(
    gw: &Arc<Gateway>,
    caller: &Caller,
    raw: &str,
) -> Result<Response<Body>, ApiError> {
    let arn = LayerArn::parse(raw)?;
    let (v, public) = gw
        .catalog
        .layer_by_arn(&caller.account_id, &gw.region, &arn)?;
    Ok(json(StatusCode::OK, &Layer::new(&v, public, &gw.region)))
}

/// `nextToken` of ListLayers: the last layer name of the page, encoded as
/// ListFunctions encodes its names.
fn decode_token(token: &str) -> Result<String, FcError> {
    let invalid = || FcError::invalid_argument("nextToken is invalid");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let s = String::from_utf8(raw).map_err(|_| invalid())?;
    let name = s.strip_prefix("v1:").ok_or_else(invalid)?;
    layers::check_layer_name(name).map_err(|_| invalid())?;
    Ok(name.to_owned())
}

fn limit_of(parts: &http::request::Parts) -> Result<usize, FcError> {
    match query_param(parts, "limit") {
        None => Ok(layers::LIST_LIMIT_DEFAULT),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=layers::LIST_LIMIT_MAX).contains(l))
            .ok_or_else(|| {
                FcError::invalid_argument(format!(
                    "limit must be between 1 and {}, got {l:?}",
                    layers::LIST_LIMIT_MAX
                ))
            }),
    }
}

fn bool_param(parts: &http::request::Parts, key: &str) -> Result<Option<bool>, FcError> {
    match query_param(parts, key).as_deref() {
        None | Some("") => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(v) => Err(FcError::invalid_argument(format!(
            "{key} must be true or false, got {v:?}"
        ))),
    }
}

pub fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let prefix = query_param(parts, "prefix").unwrap_or_default();
    let limit = limit_of(parts)?;
    let public = bool_param(parts, "public")?.unwrap_or(false);
    let official = bool_param(parts, "official")?.unwrap_or(false);
    let after = match query_param(parts, "nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(decode_token(&t)?),
    };
    // Kiln publishes no official layers.
    let (page, more) = if official {
        (Vec::new(), false)
    } else {
        gw.catalog
            .list_layers(&caller.account_id, &prefix, after.as_deref(), limit, public)
    };
    let next_token = if more {
        page.last()
            .map(|(v, _)| super::request::encode_token(&v.name))
    } else {
        None
    };
    let out = layers::ListLayersOutput {
        layers: page
            .iter()
            .map(|(v, p)| Layer::new(v, *p, &gw.region))
            .collect(),
        next_token,
    };
    Ok(json(StatusCode::OK, &out))
}

pub fn list_versions(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    layers::check_layer_name(name)?;
    let limit = limit_of(parts)?;
    let start = match query_param(parts, "startVersion").filter(|s| !s.is_empty()) {
        None => 1,
        Some(s) => version_of(&s)?,
    };
    let (page, public, next_version) =
        gw.catalog
            .list_layer_versions(&caller.account_id, name, start, limit)?;
    let out = layers::ListLayerVersionOutput {
        layers: page
            .iter()
            .map(|v| Layer::new(v, public, &gw.region))
            .collect(),
        next_version,
    };
    Ok(json(StatusCode::OK, &out))
}

pub async fn delete_version(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    version: &str,
) -> Result<Response<Body>, ApiError> {
    layers::check_layer_name(name)?;
    let version = version_of(version)?;
    gw.catalog
        .delete_layer_version(&caller.account_id, name, version)
        .await?;
    tracing::info!(layer = name, version, "layer version deleted");
    Ok(no_content())
}

/// PutLayerACL: `acl=1|0` or `public=true|false` in the query.
pub async fn put_acl(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &str,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    layers::check_layer_name(name)?;
    let from_acl = match query_param(parts, "acl").as_deref() {
        None | Some("") => None,
        Some("1") => Some(true),
        Some("0") => Some(false),
        Some(v) => {
            return Err(FcError::invalid_argument(format!(
                "acl must be 0 (private) or 1 (public), got {v:?}"
            ))
            .into())
        }
    };
    let from_public = bool_param(parts, "public")?;
    let public = match (from_acl, from_public) {
        (Some(a), Some(p)) if a != p => {
            return Err(FcError::invalid_argument("acl and public disagree").into())
        }
        (Some(a), _) => a,
        (None, Some(p)) => p,
        (None, None) => {
            return Err(FcError::invalid_argument(
                "give acl (0 private, 1 public) or public (true or false)",
            )
            .into())
        }
    };
    gw.catalog
        .put_layer_acl(&caller.account_id, name, public)
        .await?;
    tracing::info!(layer = name, public, "layer ACL set");
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}
