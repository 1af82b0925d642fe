//! The dispatcher's real [`Invoker`]: deliveries through the gateway's one
//! invoke path ([`crate::invoke`]), their [`InvokeResult`] mapped to the
//! queue's retry and destination decisions by type; and an https client
//! for webhook destinations.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_core::{FcError, FcErrorCode, FunctionName, RequestId};
use kiln_internal_api::server::Body;

use super::dispatch::{BoxFuture, DeliveryOutcome, Invoker};
use super::Claimed;
use crate::gateway::Gateway;
use crate::invoke::render::{initialization_body, timed_out_message, unhandled_body};
use crate::invoke::{self, InvokeRequest, InvokeResult, LogType, RECLAIM_IF_ABANDONED};
use crate::versions::Qualifier;

/// The most bytes of a function's answer kept as a task's returnPayload.
const RETURN_PAYLOAD_MAX: usize = 1024 * 1024;

/// Why the webhook client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WebhookClientError {
    #[error("Cannot load the webhook CA {0}")]
    Ca(std::path::PathBuf, #[source] kiln_pki::PkiError),
    #[error("Cannot build the webhook TLS client")]
    Tls(#[from] rustls::Error),
}

type WebhookClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// An https-only client trusting the system's roots and `extra_ca`.
pub fn webhook_client(
    extra_ca: Option<&std::path::Path>,
) -> Result<WebhookClient, WebhookClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(p) = extra_ca {
        for c in kiln_pki::load_certs(p).map_err(|e| WebhookClientError::Ca(p.to_owned(), e))? {
            roots.add(c)?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// The function's answer, at most [`RETURN_PAYLOAD_MAX`] bytes kept (the
/// rest is read and dropped so the lease is released normally).
async fn read_capped(mut body: Body) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("the function's answer was cut off: {e}"))?;
        if let Ok(data) = frame.into_data() {
            let room = RETURN_PAYLOAD_MAX.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(out)
}

/// The dispatcher's invoker: the invoke path of this gateway, and an
/// https client for webhooks.
pub struct GatewayInvoker {
    pub gw: Weak<Gateway>,
    pub webhooks: WebhookClient,
}

const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// The stored caller headers of a message (already stripped of signing
/// and FC headers at enqueue).
/// The qualifier the call was enqueued with (kept among its headers).
fn stored_qualifier(m: &Claimed) -> Result<Qualifier, FcError> {
    let q = m
        .headers
        .iter()
        .find(|(k, _)| k == super::QUALIFIER_HEADER)
        .map(|(_, v)| v.as_str());
    Qualifier::parse(q)
}

fn stored_headers(m: &Claimed) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in m
        .headers
        .iter()
        .filter(|(k, _)| k != super::QUALIFIER_HEADER)
    {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    h
}

/// What a delivery's result means for the task.
async fn delivery(result: InvokeResult) -> DeliveryOutcome {
    // FC's status for every function error is 200 (see invoke::render).
    const FUNCTION_ERROR_STATUS: u16 = 200;
    let function_error = |body: String| DeliveryOutcome::FunctionError {
        status: FUNCTION_ERROR_STATUS,
        body: body.into_bytes(),
    };
    match result {
        InvokeResult::Success(a) => {
            let status = a.status.as_u16();
            match read_capped(a.body).await {
                // An answer the agent passed as success without a 2xx
                // status (it refused the payload) is not a success.
                Ok(body) if status >= 300 => DeliveryOutcome::FunctionError { status, body },
                Ok(body) => DeliveryOutcome::Success { status, body },
                Err(e) => DeliveryOutcome::SystemError(e),
            }
        }
        InvokeResult::FunctionError(a) => match read_capped(a.body).await {
            Ok(body) => DeliveryOutcome::FunctionError {
                status: FUNCTION_ERROR_STATUS,
                body,
            },
            Err(e) => DeliveryOutcome::SystemError(e),
        },
        InvokeResult::Crashed { message, .. } => function_error(unhandled_body(&message)),
        InvokeResult::TimedOut { timeout_s, .. } => {
            function_error(unhandled_body(&timed_out_message(timeout_s)))
        }
        InvokeResult::InitializationFailed { message } => {
            function_error(initialization_body(&message))
        }
        InvokeResult::Platform(e) => platform(e),
    }
}

fn platform(e: FcError) -> DeliveryOutcome {
    match e.code {
        FcErrorCode::ResourceThrottled => DeliveryOutcome::Throttled(e.to_string()),
        FcErrorCode::FunctionNotFound
        | FcErrorCode::VersionNotFound
        | FcErrorCode::AliasNotFound => DeliveryOutcome::FunctionGone(e.to_string()),
        _ => DeliveryOutcome::SystemError(e.to_string()),
    }
}

impl Invoker for GatewayInvoker {
    fn invoke(&self, m: &Claimed) -> BoxFuture<DeliveryOutcome> {
        let gw = self.gw.upgrade();
        let m = m.clone();
        Box::pin(async move {
            let Some(gw) = gw else {
                return DeliveryOutcome::SystemError("the gateway is stopping".into());
            };
            let (Ok(account_id), Ok(function)) =
                (m.account.parse(), m.function.parse::<FunctionName>())
            else {
                return DeliveryOutcome::FunctionGone("stored names are unreadable".into());
            };
            let qualifier = match stored_qualifier(&m) {
                Ok(q) => q,
                Err(e) => return DeliveryOutcome::FunctionGone(e.to_string()),
            };
            // The enqueue was authorized; delivery acts for the account.
            let call = InvokeRequest {
                account_id,
                function,
                qualifier,
                headers: stored_headers(&m),
                log: LogType::None,
                request_id: m
                    .request_id
                    .parse::<RequestId>()
                    .unwrap_or_else(|_| RequestId::generate()),
                payload: Bytes::from(m.payload),
                http: None,
                stream: None,
            };
            // Stopped mid-call (the dispatcher aborts this future): the
            // instance is reported failed and reclaimed.
            let result = RECLAIM_IF_ABANDONED
                .scope((), invoke::invoke(&gw, call))
                .await;
            delivery(result).await
        })
    }

    fn call_budget_ms(&self, m: &Claimed) -> Option<u64> {
        let gw = self.gw.upgrade()?;
        let timeout_s = gw.catalog.timeout_s(
            &m.account.parse().ok()?,
            &m.function.parse().ok()?,
            &stored_qualifier(m).ok()?,
        )?;
        Some(u64::from(timeout_s) * 1000 + invoke::AGENT_GRACE.as_millis() as u64)
    }

    fn webhook(&self, url: &str, record: &serde_json::Value) -> BoxFuture<Result<(), String>> {
        let client = self.webhooks.clone();
        let req = http::Request::builder()
            .method(Method::POST)
            .uri(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(record.to_string())));
        Box::pin(async move {
            let req = req.map_err(|e| format!("bad webhook request: {e}"))?;
            let resp = tokio::time::timeout(WEBHOOK_TIMEOUT, client.request(req))
                .await
                .map_err(|_| "webhook timed out".to_owned())?
                .map_err(|e| format!("webhook unreachable: {e}"))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("webhook answered {}", resp.status()))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invoke::FunctionAnswer;
    use http::StatusCode;
    use kiln_internal_api::server::full;

    fn answer(status: StatusCode, body: &'static str) -> FunctionAnswer {
        FunctionAnswer {
            status,
            headers: HeaderMap::new(),
            log_tail: None,
            body: full(body),
        }
    }

    #[tokio::test]
    async fn results_map_to_deliveries_by_type() {
        assert_eq!(
            delivery(InvokeResult::Success(answer(StatusCode::OK, "hi"))).await,
            DeliveryOutcome::Success {
                status: 200,
                body: b"hi".to_vec()
            }
        );
        assert_eq!(
            delivery(InvokeResult::Success(answer(StatusCode::BAD_REQUEST, "no"))).await,
            DeliveryOutcome::FunctionError {
                status: 400,
                body: b"no".to_vec()
            }
        );
        assert_eq!(
            delivery(InvokeResult::FunctionError(answer(
                StatusCode::NOT_FOUND,
                "e"
            )))
            .await,
            DeliveryOutcome::FunctionError {
                status: 200,
                body: b"e".to_vec()
            }
        );
        let crashed = delivery(InvokeResult::Crashed {
            message: "boom".into(),
            log_tail: None,
        })
        .await;
        assert_eq!(
            crashed,
            DeliveryOutcome::FunctionError {
                status: 200,
                body: br#"{"errorMessage":"boom"}"#.to_vec()
            }
        );
        let DeliveryOutcome::FunctionError { body, .. } = delivery(InvokeResult::TimedOut {
            timeout_s: 2,
            log_tail: None,
        })
        .await
        else {
            panic!("a timeout is a function error");
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errorMessage"], "Function timed out after 2 seconds");
        let DeliveryOutcome::FunctionError { body, .. } =
            delivery(InvokeResult::InitializationFailed {
                message: "init".into(),
            })
            .await
        else {
            panic!("an initializer failure is a function error");
        };
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errorType"], "InitializationError");
    }

    #[tokio::test]
    async fn platform_errors_decide_retry_or_give_up() {
        let d = |e| async move { delivery(InvokeResult::Platform(e)).await };
        assert!(matches!(
            d(FcError::throttled("busy")).await,
            DeliveryOutcome::Throttled(_)
        ));
        assert!(matches!(
            d(FcError::new(FcErrorCode::FunctionNotFound, "gone")).await,
            DeliveryOutcome::FunctionGone(_)
        ));
        assert!(matches!(
            d(FcError::unavailable("later")).await,
            DeliveryOutcome::SystemError(_)
        ));
    }

    #[test]
    fn stored_headers_come_back_as_a_header_map() {
        let m = Claimed {
            seq: 1,
            delivery: 1,
            queue: "1".into(),
            account: "1".into(),
            function: "f".into(),
            task_id: "t".into(),
            request_id: "r".into(),
            payload: Vec::new(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("bad header".into(), "x".into()),
            ],
            created_ms: 0,
            retries: 0,
            throttles: 0,
        };
        let h = stored_headers(&m);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::CONTENT_TYPE], "application/json");
    }
}
