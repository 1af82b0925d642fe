//! The one place an [`InvokeResult`] becomes FC's HTTP answer: the
//! function's answer with its headers, or FC's function-error shape
//! (HTTP 200, `x-fc-error-type`, an `errorMessage` body), with the call's
//! log tail when it was asked for. A platform error is handed back for
//! the API's FC error rendering.

use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use kiln_core::FcError;
use kiln_internal_api::headers as ih;
use kiln_internal_api::server::{full, Body};

use super::{FunctionAnswer, InvokeResult};

/// FC's header naming a function error on a 2xx answer.
pub const ERROR_TYPE: &str = "x-fc-error-type";
/// FC's value for an error the function did not handle (non-2xx answer,
/// crash, timeout).
pub const UNHANDLED: &str = "UnhandledInvocationError";
/// FC's value for a failed or timed-out initializer: the call fails as a
/// function error, never reaching the handler.
pub const UNHANDLED_INITIALIZATION: &str = "UnhandledInitializationError";

/// Runtime answer headers never passed to the caller.
fn returnable(name: &HeaderName) -> bool {
    let n = name.as_str();
    !(n.starts_with("x-fc-")
        || n.starts_with("x-kiln-")
        || matches!(
            n,
            "connection" | "keep-alive" | "transfer-encoding" | "te" | "trailer" | "upgrade"
        ))
}

/// The message FC gives a call that ran past its timeout.
pub fn timed_out_message(timeout_s: u32) -> String {
    format!("Function timed out after {timeout_s} seconds")
}

/// FC's body for a function that failed without answering itself.
pub fn unhandled_body(message: &str) -> String {
    serde_json::json!({ "errorMessage": message }).to_string()
}

/// FC's body for a failed initializer.
pub fn initialization_body(message: &str) -> String {
    serde_json::json!({
        "errorMessage": format!("InitializationError: {message}"),
        "errorType": "InitializationError",
    })
    .to_string()
}

/// The FC answer for `result`; `Err` for a platform error.
pub fn render(result: InvokeResult) -> Result<Response<Body>, FcError> {
    Ok(match result {
        InvokeResult::Success(answer) => answered(answer, None),
        InvokeResult::FunctionError(answer) => answered(answer, Some(UNHANDLED)),
        InvokeResult::Crashed { message, log_tail } => {
            function_error(UNHANDLED, unhandled_body(&message), log_tail)
        }
        InvokeResult::TimedOut {
            timeout_s,
            log_tail,
        } => function_error(
            UNHANDLED,
            unhandled_body(&timed_out_message(timeout_s)),
            log_tail,
        ),
        InvokeResult::InitializationFailed { message } => function_error(
            UNHANDLED_INITIALIZATION,
            initialization_body(&message),
            None,
        ),
        InvokeResult::Platform(e) => return Err(e),
    })
}

/// The FC answer for an HTTP trigger's call: the function's own status,
/// headers and body whether or not it reports an error (FC passes an HTTP
/// function's answer through); a call the function did not answer is
/// rendered as by [`render`]. `Err` for a platform error.
///
/// A WebSocket handshake's `101` (see [`super::websocket`]) keeps its
/// `Upgrade` and says `Connection: Upgrade`: hop-by-hop headers, they are
/// this hop's answer to the caller's upgrade.
pub fn render_http(result: InvokeResult) -> Result<Response<Body>, FcError> {
    match result {
        InvokeResult::Success(answer) | InvokeResult::FunctionError(answer) => {
            let mut resp = Response::new(answer.body);
            *resp.status_mut() = answer.status;
            let h = resp.headers_mut();
            copy_returnable(&answer.headers, h);
            if answer.status == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(upgrade) = answer.headers.get(header::UPGRADE) {
                    h.insert(header::UPGRADE, upgrade.clone());
                }
                h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            Ok(resp)
        }
        other => render(other),
    }
}

/// The function's own answer: its status on success, 200 with
/// `error_type` when it reported an error.
fn answered(answer: FunctionAnswer, error_type: Option<&'static str>) -> Response<Body> {
    let status = if error_type.is_some() {
        StatusCode::OK
    } else {
        answer.status
    };
    let mut resp = Response::new(answer.body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    copy_returnable(&answer.headers, h);
    if let Some(t) = error_type {
        h.insert(ERROR_TYPE, HeaderValue::from_static(t));
    }
    if let Some(tail) = answer.log_tail {
        h.insert(ih::LOG_RESULT, tail);
    }
    resp
}

fn copy_returnable(from: &HeaderMap, to: &mut HeaderMap) {
    for (k, v) in from {
        if returnable(k) {
            to.append(k.clone(), v.clone());
        }
    }
}

/// FC's function-error answer built by Kiln.
fn function_error(
    error_type: &'static str,
    body: String,
    log_tail: Option<HeaderValue>,
) -> Response<Body> {
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(ERROR_TYPE, error_type)
        .body(full(body))
        .expect("valid response");
    if let Some(tail) = log_tail {
        resp.headers_mut().insert(ih::LOG_RESULT, tail);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn parts(resp: Response<Body>) -> (StatusCode, HeaderMap, serde_json::Value) {
        let (head, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (head.status, head.headers, v)
    }

    fn answer(status: StatusCode, body: &'static str) -> FunctionAnswer {
        let mut headers = HeaderMap::new();
        headers.insert("x-fc-status", HeaderValue::from_static("404"));
        headers.insert("x-kiln-invoke-outcome", HeaderValue::from_static("ok"));
        headers.insert("connection", HeaderValue::from_static("keep-alive"));
        headers.insert("x-function", HeaderValue::from_static("kept"));
        FunctionAnswer {
            status,
            headers,
            log_tail: Some(HeaderValue::from_static("dGFpbA==")),
            body: full(body),
        }
    }

    #[test]
    fn internal_and_connection_headers_stay_inside() {
        assert!(!returnable(&HeaderName::from_static("x-fc-status")));
        assert!(!returnable(&HeaderName::from_static(
            "x-kiln-invoke-outcome"
        )));
        assert!(!returnable(&HeaderName::from_static("connection")));
        assert!(returnable(&HeaderName::from_static("content-type")));
    }

    #[tokio::test]
    async fn a_success_is_the_functions_answer() {
        let resp = render(InvokeResult::Success(answer(StatusCode::CREATED, "{}"))).unwrap();
        let (status, h, _) = parts(resp).await;
        assert_eq!(status, StatusCode::CREATED);
        assert_eq!(h["x-function"], "kept");
        assert_eq!(h[ih::LOG_RESULT], "dGFpbA==");
        for gone in [
            "x-fc-status",
            "x-kiln-invoke-outcome",
            "connection",
            ERROR_TYPE,
        ] {
            assert!(!h.contains_key(gone), "{gone}");
        }
    }

    #[tokio::test]
    async fn a_function_error_is_200_with_the_functions_body() {
        let resp = render(InvokeResult::FunctionError(answer(
            StatusCode::NOT_FOUND,
            r#"{"mine":1}"#,
        )))
        .unwrap();
        let (status, h, v) = parts(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h[ERROR_TYPE], UNHANDLED);
        assert_eq!(h["x-function"], "kept");
        assert_eq!(v["mine"], 1);
    }

    #[tokio::test]
    async fn crashes_and_timeouts_are_unhandled_errors_with_the_tail() {
        let tail = Some(HeaderValue::from_static("bG9n"));
        let resp = render(InvokeResult::Crashed {
            message: "Process exited unexpectedly".into(),
            log_tail: tail.clone(),
        })
        .unwrap();
        let (status, h, v) = parts(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h[ERROR_TYPE], UNHANDLED);
        assert_eq!(h[ih::LOG_RESULT], "bG9n");
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
        assert_eq!(
            v,
            serde_json::json!({"errorMessage": "Process exited unexpectedly"})
        );

        let resp = render(InvokeResult::TimedOut {
            timeout_s: 3,
            log_tail: None,
        })
        .unwrap();
        let (status, h, v) = parts(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h[ERROR_TYPE], UNHANDLED);
        assert!(!h.contains_key(ih::LOG_RESULT));
        assert_eq!(v["errorMessage"], "Function timed out after 3 seconds");
    }

    #[tokio::test]
    async fn an_initializer_failure_has_its_own_error_type() {
        let resp = render(InvokeResult::InitializationFailed {
            message: "Initializer hook failed with HTTP status 500: no".into(),
        })
        .unwrap();
        let (status, h, v) = parts(resp).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h[ERROR_TYPE], UNHANDLED_INITIALIZATION);
        assert_eq!(v["errorType"], "InitializationError");
        assert_eq!(
            v["errorMessage"],
            "InitializationError: Initializer hook failed with HTTP status 500: no"
        );
    }

    #[tokio::test]
    async fn an_http_triggers_answer_keeps_the_functions_status() {
        let resp = render_http(InvokeResult::FunctionError(answer(
            StatusCode::NOT_FOUND,
            r#"{"mine":1}"#,
        )))
        .unwrap();
        let (status, h, v) = parts(resp).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(!h.contains_key(ERROR_TYPE));
        assert!(!h.contains_key("x-fc-status"));
        assert_eq!(h["x-function"], "kept");
        assert_eq!(v["mine"], 1);
        let resp = render_http(InvokeResult::TimedOut {
            timeout_s: 2,
            log_tail: None,
        })
        .unwrap();
        assert_eq!(resp.headers()[ERROR_TYPE], UNHANDLED);
    }

    #[test]
    fn a_websocket_handshake_keeps_its_upgrade_headers() {
        let mut a = answer(StatusCode::SWITCHING_PROTOCOLS, "");
        a.headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        a.headers.insert(
            "sec-websocket-accept",
            HeaderValue::from_static("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        );
        let resp = render_http(InvokeResult::Success(a)).unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        let h = resp.headers();
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "Upgrade");
        assert_eq!(h["sec-websocket-accept"], "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(!h.contains_key("x-kiln-invoke-outcome"));
        // Any other answer never passes them on.
        let mut a = answer(StatusCode::OK, "");
        a.headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let resp = render_http(InvokeResult::Success(a)).unwrap();
        assert!(!resp.headers().contains_key(header::UPGRADE));
        assert!(!resp.headers().contains_key(header::CONNECTION));
    }

    #[test]
    fn a_platform_error_is_handed_back() {
        let e = FcError::throttled("too many");
        assert_eq!(render(InvokeResult::Platform(e.clone())).unwrap_err(), e);
    }
}
