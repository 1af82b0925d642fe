//! GetFunctionCode: FC answers with a short-lived download URL for the
//! code package of LATEST, a version or an alias's major version. Kiln's
//! URL points back at the gateway's public listener
//! (`/kiln/code/<grant>.<tag>`): the grant names the account, function
//! and package digest and expires; the tag is an HMAC under the gateway's
//! STS key. The download is not signed (like FC's presigned OSS URL); it
//! works only while the grant is unexpired and the function or one of its
//! versions still uses that package.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use http::{Response, StatusCode};
use kiln_core::{AccountId, FcError, FcErrorCode, FunctionName, RequestId};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::request::{caller_function, qualifier};
use super::respond::{fc_error, json, Body};
use crate::auth::Caller;
use crate::gateway::Gateway;

/// Where download URLs point.
pub const DOWNLOAD_PREFIX: &str = "/kiln/code/";
/// How long a download URL works.
pub const URL_LIFETIME_MS: u64 = 15 * 60 * 1000;
const PURPOSE: &str = "code-url";
const GRANT_MAX: usize = 1024;

/// What a download URL grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Grant {
    #[serde(rename = "a")]
    account_id: AccountId,
    #[serde(rename = "f")]
    function: FunctionName,
    #[serde(rename = "d")]
    digest: String,
    #[serde(rename = "e")]
    expires_ms: u64,
}

/// `OutputFuncCode`.
#[derive(Debug, Serialize)]
struct OutputFuncCode {
    url: String,
    checksum: String,
}

pub fn get(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let q = qualifier(parts)?;
    caller_function(gw, caller, name)?;
    // An alias's major version (u = 1 is past every canary's share).
    let entry = gw.catalog.resolve(&caller.account_id, name, &q, 1.0)?;
    if let Some(c) = &entry.record.config.container {
        return Err(FcError::invalid_argument(format!(
            "function {name} is a custom-container function: it has no code package; its code is the image {}",
            c.image
        ))
        .into());
    }
    let host = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/'))
        .ok_or_else(|| {
            FcError::invalid_argument("the request names no host to build the download URL on")
        })?;
    let grant = Grant {
        account_id: caller.account_id.clone(),
        function: name.clone(),
        digest: entry.record.config.code.sha256.clone(),
        expires_ms: gw.clock.now_ms() + URL_LIFETIME_MS,
    };
    let payload = serde_json::to_vec(&grant).expect("grant serialises");
    let tag = gw.ram.sts.tag(PURPOSE, &payload);
    let url = format!(
        "https://{host}{DOWNLOAD_PREFIX}{}.{}",
        B64.encode(&payload),
        B64.encode(tag)
    );
    Ok(json(
        StatusCode::OK,
        &OutputFuncCode {
            url,
            checksum: entry.record.config.code.checksum.clone(),
        },
    ))
}

/// The grant in `token`, if the gateway made it and it has not expired.
fn open(gw: &Gateway, token: &str) -> Result<Grant, FcError> {
    let denied = || {
        FcError::new(
            FcErrorCode::AccessDenied,
            "the code download URL is invalid or has expired; ask GetFunctionCode for a new one",
        )
    };
    if token.len() > GRANT_MAX {
        return Err(denied());
    }
    let (payload, tag) = token.split_once('.').ok_or_else(denied)?;
    let payload = B64.decode(payload).map_err(|_| denied())?;
    let tag = B64.decode(tag).map_err(|_| denied())?;
    if !gw.ram.sts.check_tag(PURPOSE, &payload, &tag) {
        return Err(denied());
    }
    let grant: Grant = serde_json::from_slice(&payload).map_err(|_| denied())?;
    if grant.expires_ms <= gw.clock.now_ms() {
        return Err(denied());
    }
    Ok(grant)
}

/// Serve a download URL made by [`get`] (an unsigned GET).
pub async fn download(gw: &Arc<Gateway>, path: &str, request_id: &RequestId) -> Response<Body> {
    let token = path.strip_prefix(DOWNLOAD_PREFIX).unwrap_or_default();
    let grant = match open(gw, token) {
        Ok(g) => g,
        Err(e) => return fc_error(&e, request_id.as_str()),
    };
    let in_use = gw
        .catalog
        .function(&grant.account_id, &grant.function)
        .is_some_and(|f| f.record.config.code.sha256 == grant.digest)
        || gw
            .catalog
            .versions_of(&grant.account_id, &grant.function)
            .iter()
            .any(|v| v.entry.record.config.code.sha256 == grant.digest);
    let gone = || {
        fc_error(
            &FcError::new(
                FcErrorCode::FunctionNotFound,
                format!(
                    "function '{}' no longer uses this code package",
                    grant.function
                ),
            ),
            request_id.as_str(),
        )
    };
    if !in_use {
        return gone();
    }
    let Some(file) = gw.catalog.code_files().cached(&grant.digest).await else {
        return gone();
    };
    match super::respond::zip_file(&file).await {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => gone(),
        Err(e) => {
            tracing::error!(path = %file.display(), error = %e, "cannot open code package");
            fc_error(
                &FcError::internal("cannot read the code package"),
                request_id.as_str(),
            )
        }
    }
}
