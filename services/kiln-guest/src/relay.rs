//! Calls from the host, relayed to the runtime's HTTP port per FC's custom
//! runtime contract (`POST /invoke`, `POST /initialize`, `GET /pre-stop`).

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use kiln_guest_proto::{CallKind, CallRequest, ErrorBody, ErrorCode, ResponseHead, ResponseWriter};

type ReqBody = BoxBody<Bytes, Infallible>;

/// Headers that describe one hop, not the call.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "host",
    "proxy-connection",
];

/// A pooled HTTP/1.1 client of the runtime on loopback.
#[derive(Clone)]
pub struct Relay {
    client: Client<HttpConnector, ReqBody>,
    port: u16,
}

impl Relay {
    pub fn new(port: u16) -> Relay {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Relay { client, port }
    }

    /// Relay one call; errors become Error frames on the call's stream.
    pub async fn call(&self, request: CallRequest, mut response: ResponseWriter) {
        let timeout = request.head.timeout_ms.map(Duration::from_millis);
        let (call, kind) = (request.call, request.kind);
        let result = match timeout {
            Some(t) => match tokio::time::timeout(t, self.relay(request, &mut response)).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::info!(call, ?kind, "call timed out in the guest");
                    Err(ErrorBody::new(
                        ErrorCode::Timeout,
                        format!(
                            "The function did not answer {} within {} ms",
                            kind.path(),
                            t.as_millis()
                        ),
                    ))
                }
            },
            None => self.relay(request, &mut response).await,
        };
        match result {
            Ok(()) => response.end().await,
            Err(e) => response.error(e).await,
        };
    }

    async fn relay(
        &self,
        request: CallRequest,
        response: &mut ResponseWriter,
    ) -> Result<(), ErrorBody> {
        let CallRequest {
            call,
            kind,
            head,
            body,
        } = request;
        let uri = format!("http://127.0.0.1:{}{}", self.port, kind.path());
        // A body known to be empty goes without one (a GET with a chunked
        // empty body confuses simple runtimes); otherwise it streams, with
        // the host's content-length if it sent one.
        let empty = kind == CallKind::PreStop
            || head
                .headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("content-length") && v.trim() == "0");
        let req_body: ReqBody = if empty {
            drop(body);
            Empty::new().boxed()
        } else {
            let stream = futures_util::stream::unfold(body, |mut rx| async move {
                rx.recv().await.map(|chunk| (Ok(Frame::data(chunk)), rx))
            });
            StreamBody::new(stream).boxed()
        };
        let mut builder = hyper::Request::builder().method(kind.method()).uri(uri);
        for (name, value) in &head.headers {
            if HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h)) {
                continue;
            }
            builder = builder.header(name.as_str(), value.as_str());
        }
        let req = builder
            .body(req_body)
            .map_err(|e| ErrorBody::new(ErrorCode::Protocol, format!("Bad request head: {e}")))?;
        let resp = self.client.request(req).await.map_err(|e| {
            tracing::debug!(call, error = ?e, "runtime request failed");
            ErrorBody::new(
                ErrorCode::RuntimeUnavailable,
                format!("The function's port did not answer: {e}"),
            )
        })?;
        let (parts, mut body) = resp.into_parts();
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| !HOP_BY_HOP.contains(&n.as_str()))
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let head = ResponseHead {
            status: parts.status.as_u16(),
            headers,
        };
        if !response.head(head).await {
            return Ok(());
        }
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ErrorBody::new(
                    ErrorCode::RuntimeUnavailable,
                    format!("The function broke off its response: {e}"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if !response.body(data).await {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}
