//! What handlers read from a request: the caller's function, query
//! parameters, FC's qualifier, page tokens and the body.

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode, FunctionName};

use super::error::ApiError;
use crate::auth::Caller;
use crate::catalog::FunctionEntry;
use crate::gateway::Gateway;

/// The caller's function `name`, or FunctionNotFound (another account's
/// function is as absent as one that does not exist).
pub fn caller_function(
    gw: &Gateway,
    caller: &Caller,
    name: &FunctionName,
) -> Result<std::sync::Arc<FunctionEntry>, ApiError> {
    gw.catalog
        .function(&caller.account_id, name)
        .ok_or_else(|| not_found(name).into())
}

pub fn not_found(name: &FunctionName) -> FcError {
    FcError::new(
        FcErrorCode::FunctionNotFound,
        format!("function '{name}' does not exist"),
    )
}

/// The value of query parameter `key`, percent-decoded.
pub fn query_param(parts: &http::request::Parts, key: &str) -> Option<String> {
    let q = parts.uri.query()?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// FC's `qualifier` where only LATEST (or none) is taken: the endpoints
/// that do not (yet) keep anything per version or alias.
pub fn check_qualifier(parts: &http::request::Parts) -> Result<(), FcError> {
    match query_param(parts, "qualifier") {
        None => Ok(()),
        Some(q) if q.is_empty() || q == "LATEST" => Ok(()),
        Some(q) => Err(FcError::invalid_argument(format!(
            "qualifier {q:?} is not supported here: this operation acts on LATEST only (versions and aliases are taken by InvokeFunction, GetFunction, GetFunctionCode and ListInstances)"
        ))),
    }
}

/// FC's `qualifier` query parameter where versions and aliases are
/// honoured: LATEST (or none), a version id or an alias name.
pub fn qualifier(parts: &http::request::Parts) -> Result<crate::versions::Qualifier, FcError> {
    crate::versions::Qualifier::parse(query_param(parts, "qualifier").as_deref())
}

/// FC's `limit` of a listing by name (versions, aliases, triggers):
/// 1 to 100, 20 when absent.
pub fn list_limit(parts: &http::request::Parts) -> Result<usize, FcError> {
    const DEFAULT: usize = 20;
    const MAX: usize = 100;
    match query_param(parts, "limit") {
        None => Ok(DEFAULT),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX).contains(l))
            .ok_or_else(|| {
                FcError::invalid_argument(format!("limit must be between 1 and {MAX}, got {l:?}"))
            }),
    }
}

/// One page of `items` (in name order) as FC's listings by name give it:
/// those whose name starts with `prefix`, after the `nextToken`'s, at most
/// `limit` of them, and the `nextToken` of the next page when there is one.
pub fn page_by_name<T>(
    parts: &http::request::Parts,
    items: Vec<T>,
    name: impl Fn(&T) -> &str,
) -> Result<(Vec<T>, Option<String>), FcError> {
    let limit = list_limit(parts)?;
    let prefix = query_param(parts, "prefix").unwrap_or_default();
    let after = match query_param(parts, "nextToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(t) => Some(decode_raw_token(&t)?),
    };
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|t| name(t).starts_with(&prefix))
        .filter(|t| after.as_deref().is_none_or(|after| name(t) > after))
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let next_token = more
        .then(|| page.last().map(|t| encode_token(name(t))))
        .flatten();
    Ok((page, next_token))
}

/// A listing's opaque `nextToken` after the item named `last`.
pub fn encode_token(last: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{last}"))
}

/// The function name a `nextToken` of a function listing continues after.
pub fn decode_token(token: &str) -> Result<String, FcError> {
    let name = decode_raw_token(token)?;
    name.parse::<FunctionName>()
        .map_err(|_| FcError::invalid_argument("nextToken is invalid"))?;
    Ok(name)
}

/// The item a `nextToken` made by [`encode_token`] continues after; the
/// listing checks what it names.
pub fn decode_raw_token(token: &str) -> Result<String, FcError> {
    let invalid = || FcError::invalid_argument("nextToken is invalid");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    let s = String::from_utf8(raw).map_err(|_| invalid())?;
    Ok(s.strip_prefix("v1:").ok_or_else(invalid)?.to_owned())
}

/// FC's ARN of the caller's function `name`.
pub fn function_arn(gw: &Gateway, caller: &Caller, name: &str) -> String {
    format!(
        "acs:fc:{}:{}:functions/{name}",
        gw.region, caller.account_id
    )
}

fn too_large(limit: usize) -> FcError {
    FcError::new(
        FcErrorCode::EntityTooLarge,
        format!("payload size exceeds maximum allowed size ({limit} bytes)"),
    )
}

/// EntityTooLarge when the body declares (Content-Length) more than
/// `limit` bytes: checked before anything is read.
pub fn check_declared_length(body: &Incoming, limit: usize) -> Result<(), FcError> {
    use http_body::Body as _;
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large(limit));
    }
    Ok(())
}

/// Read a whole request body of at most `limit` bytes, by the listener's
/// body read deadline; over the limit is FC's EntityTooLarge.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, FcError> {
    check_declared_length(&body, limit)?;
    let read = kiln_internal_api::server::within_body_deadline(Limited::new(body, limit).collect())
        .await
        .ok_or_else(kiln_internal_api::server::body_too_slow)?;
    match read {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large(limit)),
        Err(e) => Err(FcError::invalid_argument(format!(
            "cannot read request body: {e}"
        ))),
    }
}

/// Read the body of a request whose head is proven signed: at most
/// `limit` bytes, by the listener's body read deadline, hashed as it
/// streams in and refused (SignatureNotMatch) at its end when it is not
/// the body the signature names.
pub async fn read_signed_body(
    mut body: Incoming,
    limit: usize,
    mut check: crate::auth::BodyCheck,
) -> Result<Bytes, FcError> {
    check_declared_length(&body, limit)?;
    let read = async {
        let mut buf = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map_err(|e| FcError::invalid_argument(format!("cannot read request body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large(limit));
                }
                check.update(&data);
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    };
    let bytes = kiln_internal_api::server::within_body_deadline(read)
        .await
        .ok_or_else(kiln_internal_api::server::body_too_slow)??;
    check.finish().map_err(FcError::from)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> http::request::Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn query_params_are_percent_decoded() {
        let p = parts("/x?prefix=a%2Fb+c&limit=5&flag");
        assert_eq!(query_param(&p, "prefix").as_deref(), Some("a/b c"));
        assert_eq!(query_param(&p, "limit").as_deref(), Some("5"));
        assert_eq!(query_param(&p, "flag").as_deref(), Some(""));
        assert_eq!(query_param(&p, "missing"), None);
    }

    #[test]
    fn only_latest_qualifies() {
        assert!(check_qualifier(&parts("/x")).is_ok());
        assert!(check_qualifier(&parts("/x?qualifier=LATEST")).is_ok());
        assert_eq!(
            check_qualifier(&parts("/x?qualifier=prod"))
                .unwrap_err()
                .code,
            FcErrorCode::InvalidArgument
        );
    }

    #[test]
    fn page_tokens_round_trip_and_refuse_garbage() {
        assert_eq!(decode_token(&encode_token("fn-1")).unwrap(), "fn-1");
        assert!(decode_token("not base64!").is_err());
        assert!(decode_token(&encode_token("../x")).is_err());
        let raw = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        assert!(decode_token(&raw("v2:x")).is_err(), "another token version");
    }
}
