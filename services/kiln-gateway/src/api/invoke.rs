//! InvokeFunction (sync): FC's invocation headers checked, the call made
//! through [`crate::invoke`], and its result rendered in FC's shape.

use std::sync::Arc;

use super::respond::Body;
use bytes::Bytes;
use http::Response;
use kiln_core::{FcError, FunctionName, RequestId};
use kiln_internal_api::headers as ih;

use super::error::ApiError;
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::invoke::{self, InvokeRequest, LogType};

pub async fn invoke(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: http::request::Parts,
    payload: Bytes,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    if let Some(t) = parts.headers.get("x-fc-invocation-type") {
        if !t.as_bytes().eq_ignore_ascii_case(b"sync") {
            return Err(FcError::invalid_argument(format!(
                "x-fc-invocation-type {:?} is not available on this endpoint yet; invoke with Sync",
                String::from_utf8_lossy(t.as_bytes())
            ))
            .into());
        }
    }
    let qualifier = super::request::qualifier(&parts)?;
    let log = log_type(&parts.headers)?;
    // The payload arrives whole (see api::handle): its hash is part of the
    // signature, and an oversized one is refused before any instance is
    // touched.
    let call = InvokeRequest {
        account_id: caller.account_id.clone(),
        function: name.clone(),
        qualifier,
        payload,
        headers: parts.headers,
        log,
        request_id: request_id.clone(),
        http: None,
        stream: None,
    };
    Ok(invoke::render(invoke::invoke(gw, call).await)?)
}

/// FC's `x-fc-log-type`: `None` (the default) or `Tail`, in any case.
fn log_type(headers: &http::HeaderMap) -> Result<LogType, FcError> {
    match headers.get(ih::LOG_TYPE) {
        None => Ok(LogType::None),
        Some(t) if t.as_bytes().eq_ignore_ascii_case(b"none") => Ok(LogType::None),
        Some(t) if t.as_bytes().eq_ignore_ascii_case(b"tail") => Ok(LogType::Tail),
        Some(t) => Err(FcError::invalid_argument(format!(
            "x-fc-log-type must be None or Tail, not {:?}",
            String::from_utf8_lossy(t.as_bytes())
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn log_type_is_none_or_tail_in_any_case() {
        let mut h = HeaderMap::new();
        assert_eq!(log_type(&h).unwrap(), LogType::None);
        for (v, want) in [
            ("None", LogType::None),
            ("TAIL", LogType::Tail),
            ("tail", LogType::Tail),
        ] {
            h.insert(ih::LOG_TYPE, HeaderValue::from_static(v));
            assert_eq!(log_type(&h).unwrap(), want, "{v}");
        }
        h.insert(ih::LOG_TYPE, HeaderValue::from_static("Full"));
        assert_eq!(
            log_type(&h).unwrap_err().code,
            kiln_core::FcErrorCode::InvalidArgument
        );
    }
}
