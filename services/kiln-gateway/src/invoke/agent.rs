//! The agent's invoke request: the payload, the request id and the
//! caller's own headers.

use http::{header, HeaderName, HeaderValue, Method, Request};
use kiln_core::FcError;
use kiln_internal_api::server::{full, Body};
use kiln_internal_api::{headers as ih, paths, Lease};

use super::{InvokeRequest, LogType};

/// FC's request id header, set on the agent request.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-fc-request-id");

/// Caller headers never passed to the function: signing, FC's own and
/// connection-level ones.
pub(super) fn forwardable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(n.starts_with("x-fc-")
        || n.starts_with("x-acs-")
        || n.starts_with("x-kiln-")
        || matches!(
            n,
            "authorization"
                | "host"
                | "content-length"
                | "connection"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "te"
                | "trailer"
                | "upgrade"
        ))
}

pub(super) fn request(lease: &Lease, call: &InvokeRequest) -> Result<Request<Body>, FcError> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!(
            "{}{}",
            lease.agent_url.trim_end_matches('/'),
            paths::agent_invoke(&lease.instance_id)
        ))
        .body(full(call.payload.clone()))
        .map_err(|e| FcError::internal(format!("cannot build the agent request: {e}")))?;
    let h = req.headers_mut();
    for (k, v) in call.headers.iter() {
        if forwardable(k) {
            h.append(k.clone(), v.clone());
        }
    }
    // FC's Tail is computed by the agent, which frames the call's log;
    // `None` (the default) needs nothing from it.
    if call.log == LogType::Tail {
        h.insert(ih::LOG_TYPE, HeaderValue::from_static("Tail"));
    }
    if let Ok(mut v) = HeaderValue::from_str(call.request_id.as_str()) {
        // Unique per call: HPACK must not index it, or it churns the
        // internal connection's dynamic table out of its stable entries.
        v.set_sensitive(true);
        h.insert(REQUEST_ID, v);
    }
    if !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::HeaderMap;
    use kiln_core::RequestId;

    #[test]
    fn only_the_callers_own_headers_are_forwarded() {
        for h in [
            "x-fc-invocation-type",
            "authorization",
            "x-acs-date",
            "host",
            "connection",
        ] {
            assert!(!forwardable(&HeaderName::from_static(h)), "{h}");
        }
        for h in ["content-type", "x-custom", "accept"] {
            assert!(forwardable(&HeaderName::from_static(h)), "{h}");
        }
    }

    #[test]
    fn the_request_carries_caller_headers_tail_and_an_unindexed_request_id() {
        let lease = Lease {
            lease_id: kiln_core::LeaseId::generate(),
            instance_id: kiln_core::InstanceId::generate(),
            node_id: kiln_core::NodeId::generate(),
            agent_url: "https://127.0.0.1:9443/".into(),
            cold_start: false,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-custom", HeaderValue::from_static("1"));
        headers.insert("authorization", HeaderValue::from_static("secret"));
        headers.insert(ih::LOG_TYPE, HeaderValue::from_static("tail"));
        let call = InvokeRequest {
            account_id: "1".parse().unwrap(),
            function: "f".parse().unwrap(),
            payload: Bytes::from_static(b"x"),
            headers,
            log: LogType::Tail,
            request_id: RequestId::generate(),
        };
        let req = request(&lease, &call).unwrap();
        assert_eq!(
            req.uri().to_string(),
            format!(
                "https://127.0.0.1:9443/v1/instances/{}/invoke",
                lease.instance_id
            )
        );
        let h = req.headers();
        assert_eq!(h["x-custom"], "1");
        assert!(!h.contains_key("authorization"));
        assert_eq!(h[ih::LOG_TYPE], "Tail");
        assert_eq!(h[REQUEST_ID], call.request_id.as_str());
        assert!(h[REQUEST_ID].is_sensitive());
        assert_eq!(h[header::CONTENT_TYPE], "application/octet-stream");
        let none = InvokeRequest {
            log: LogType::None,
            ..call
        };
        assert!(!request(&lease, &none)
            .unwrap()
            .headers()
            .contains_key(ih::LOG_TYPE));
    }
}
