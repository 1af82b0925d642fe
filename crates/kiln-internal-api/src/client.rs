//! The mTLS clients every service uses to call the others: HTTP/2 for
//! control calls, HTTP/1.1 for the gateway's invocation data path.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use kiln_core::{FcError, FcErrorCode};
use kiln_pki::RevocationSet;
use kiln_pki::{PkiError, TlsFiles};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::revoking::RevokingConnector;
use crate::server::{empty, full, Body};

/// Why an internal call failed.
#[derive(Debug, thiserror::Error)]
pub enum InternalClientError {
    /// The peer could not be reached or the connection broke.
    #[error("Cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    /// The peer did not answer in time.
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The peer answered with an error of its own.
    #[error("{url} refused the call: {error}")]
    Remote { url: String, error: FcError },
    /// The peer answered something that is not the expected JSON.
    #[error("{url} answered an unreadable body: {message}")]
    Decode { url: String, message: String },
}

impl InternalClientError {
    /// The FC error a public caller should see.
    pub fn to_fc(&self) -> FcError {
        match self {
            Self::Remote { error, .. } => error.clone(),
            Self::Timeout { .. } | Self::Transport { .. } => {
                FcError::unavailable("an internal service is unreachable; retry the request")
            }
            Self::Decode { .. } => FcError::internal("an internal service answered badly"),
        }
    }

    /// The peer itself is gone (as opposed to refusing the call).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Self::Transport { .. } | Self::Timeout { .. })
    }
}

/// A pooled HTTP/2 client presenting this service's certificate.
#[derive(Clone)]
pub struct InternalClient {
    http: Client<RevokingConnector, Body>,
    timeout: Duration,
    /// A header set on every JSON call (a scheduler leader's token).
    stamp: Option<(http::HeaderName, http::HeaderValue)>,
}

/// Which HTTP version an [`InternalClient`] speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// TCP (no delay, 3 s connect timeout) under mutual TLS with this
/// service's certificate, offering only `protocol` in ALPN.
fn connector(
    files: &TlsFiles,
    protocol: Protocol,
) -> Result<HttpsConnector<HttpConnector>, PkiError> {
    Ok(connector_with(
        kiln_pki::internal_client_config(files)?,
        protocol,
    ))
}

fn connector_with(
    tls: std::sync::Arc<rustls::ClientConfig>,
    protocol: Protocol,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(3)));
    // hyper-rustls sets ALPN itself and refuses a config that already has it.
    let mut tls = (*tls).clone();
    tls.alpn_protocols.clear();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    match protocol {
        Protocol::Http1 => builder.enable_http1().wrap_connector(http),
        Protocol::Http2 => builder.enable_http2().wrap_connector(http),
    }
}

impl InternalClient {
    pub fn new(files: &TlsFiles) -> Result<Self, PkiError> {
        Ok(Self::http2(RevokingConnector::new(
            connector(files, Protocol::Http2)?,
            None,
        )))
    }

    /// A client on a TLS configuration built elsewhere (a public CA's, a
    /// bootstrap's).
    pub fn with_config(tls: std::sync::Arc<rustls::ClientConfig>) -> Self {
        Self::http2(RevokingConnector::new(
            connector_with(tls, Protocol::Http2),
            None,
        ))
    }

    /// A client on a TLS configuration presenting a
    /// [`kiln_pki::LiveIdentity`] and refusing revoked servers at the
    /// handshake (see [`kiln_pki::internal_client_config_live`]), whose open
    /// connections also close when their server's certificate is revoked
    /// in `revoked` (see [`crate::revoking`]).
    pub fn revoking(
        tls: std::sync::Arc<rustls::ClientConfig>,
        revoked: Arc<RevocationSet>,
    ) -> Self {
        Self::http2(RevokingConnector::new(
            connector_with(tls, Protocol::Http2),
            Some(revoked),
        ))
    }

    fn http2(connector: RevokingConnector) -> Self {
        let http = Client::builder(TokioExecutor::new())
            // HTTP/2 keep-alive needs a timer.
            .timer(hyper_util::rt::TokioTimer::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true)
            .http2_initial_stream_window_size(1 << 20)
            .http2_initial_connection_window_size(4 << 20)
            .http2_keep_alive_interval(Some(Duration::from_secs(10)))
            .http2_keep_alive_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self {
            http,
            timeout: Duration::from_secs(30),
            stamp: None,
        }
    }

    /// A pooled client speaking HTTP/1.1 (one call per connection at a
    /// time, connections kept alive): the invocation data path. Under load
    /// it costs less CPU a call than HTTP/2's framing, flow control and
    /// shared connection task, at the price of one connection per call in
    /// flight.
    pub fn new_http1(files: &TlsFiles) -> Result<Self, PkiError> {
        Ok(Self::http1(RevokingConnector::new(
            connector(files, Protocol::Http1)?,
            None,
        )))
    }

    /// [`InternalClient::new_http1`] on a live TLS configuration whose
    /// connections close when their server is revoked (see
    /// [`InternalClient::revoking`]).
    pub fn revoking_http1(
        tls: std::sync::Arc<rustls::ClientConfig>,
        revoked: Arc<RevocationSet>,
    ) -> Self {
        Self::http1(RevokingConnector::new(
            connector_with(tls, Protocol::Http1),
            Some(revoked),
        ))
    }

    fn http1(connector: RevokingConnector) -> Self {
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(hyper_util::rt::TokioTimer::new())
            // Below the servers' 60 s header read timeout, which also bounds
            // the wait between keep-alive requests (`limits.rs`): an idle
            // connection is dropped here before the server closes it, so a
            // call never races that close.
            .pool_idle_timeout(Duration::from_secs(45))
            .pool_max_idle_per_host(1024)
            .build(connector);
        Self {
            http,
            timeout: Duration::from_secs(30),
            stamp: None,
        }
    }

    /// The same client with another per-call timeout for JSON calls.
    /// The same client, stamping every JSON call ([`Self::call`]) with
    /// the leader's fencing token ([`crate::headers::LEADER_TOKEN`]).
    pub fn with_leader_token(&self, token: i64) -> Self {
        Self {
            stamp: Some((
                http::HeaderName::from_static(crate::headers::LEADER_TOKEN),
                http::HeaderValue::from(token),
            )),
            ..self.clone()
        }
    }

    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            http: self.http.clone(),
            stamp: self.stamp.clone(),
            timeout,
        }
    }

    /// Send a request as is; the caller reads the streamed answer. No
    /// timeout is applied beyond the connect timeout.
    pub async fn send(
        &self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, InternalClientError> {
        let url = req.uri().to_string();
        self.http
            .request(req)
            .await
            .map_err(|e| InternalClientError::Transport {
                url,
                message: kiln_core::error_chain(&e),
            })
    }

    /// A JSON call: `body` serialised in, the answer parsed out. A non-2xx
    /// answer becomes [`InternalClientError::Remote`].
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        method: Method,
        base: &str,
        path: &str,
        body: Option<&Req>,
    ) -> Result<Resp, InternalClientError> {
        let url = format!("{}{}", base.trim_end_matches('/'), path);
        let body = match body {
            Some(b) => full(serde_json::to_vec(b).expect("request serialises")),
            None => empty(),
        };
        let mut req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some((name, value)) = &self.stamp {
            req = req.header(name, value);
        }
        let req = req.body(body).map_err(|e| InternalClientError::Transport {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let fut = async {
            let resp = self.send(req).await?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| InternalClientError::Transport {
                    url: url.clone(),
                    message: kiln_core::error_chain(&e),
                })?
                .to_bytes();
            decode(&url, status, bytes)
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(InternalClientError::Timeout {
                url,
                timeout: self.timeout,
            }),
        }
    }

    pub async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
        body: &Req,
    ) -> Result<Resp, InternalClientError> {
        self.call(Method::POST, base, path, Some(body)).await
    }

    pub async fn get<Resp: DeserializeOwned>(
        &self,
        base: &str,
        path: &str,
    ) -> Result<Resp, InternalClientError> {
        self.call::<(), Resp>(Method::GET, base, path, None).await
    }

    pub async fn delete(&self, base: &str, path: &str) -> Result<(), InternalClientError> {
        self.call::<(), ()>(Method::DELETE, base, path, None).await
    }
}

fn decode<Resp: DeserializeOwned>(
    url: &str,
    status: StatusCode,
    bytes: Bytes,
) -> Result<Resp, InternalClientError> {
    if !status.is_success() {
        return Err(InternalClientError::Remote {
            url: url.to_owned(),
            error: remote_error(status, &bytes),
        });
    }
    let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
    serde_json::from_slice(bytes).map_err(|e| InternalClientError::Decode {
        url: url.to_owned(),
        message: e.to_string(),
    })
}

/// Parse an FC-shaped error body (with its `Kind`, see
/// [`crate::server::error`]); anything else becomes an internal error
/// quoting the status.
pub fn remote_error(status: StatusCode, bytes: &[u8]) -> FcError {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "Code")]
        code: FcErrorCode,
        #[serde(rename = "Message")]
        message: String,
        /// Read leniently: a kind this build does not know is dropped,
        /// not a reason to lose the code and message.
        #[serde(rename = "Kind", default)]
        kind: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Shape>(bytes) {
        Ok(s) => FcError {
            code: s.code,
            message: s.message,
            kind: s.kind.and_then(|k| serde_json::from_value(k).ok()),
        },
        Err(_) => FcError::internal(format!("internal call failed with status {status}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::FcErrorKind;

    #[test]
    fn remote_errors_keep_their_kind() {
        let e = FcError::new(FcErrorCode::FunctionNotStarted, "init failed")
            .with_kind(FcErrorKind::Initialization);
        let back = remote_error(StatusCode::BAD_GATEWAY, e.to_internal_body("r").as_bytes());
        assert_eq!(back, e);
        let unknown = br#"{"Code":"FunctionNotStarted","Message":"m","Kind":"later"}"#;
        let back = remote_error(StatusCode::BAD_GATEWAY, unknown);
        assert_eq!(back, FcError::new(FcErrorCode::FunctionNotStarted, "m"));
        let garbage = remote_error(StatusCode::BAD_GATEWAY, b"<html>");
        assert_eq!(garbage.code, FcErrorCode::InternalServerError);
    }
}
