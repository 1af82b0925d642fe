//! What the gateway asks of agents, behind a trait: invocations on a
//! leased instance, a node's log records, exec sessions. [`HttpAgent`] is
//! the one place that builds agent URLs and requests.

use futures_util::future::BoxFuture;
use http::{header, HeaderName, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use kiln_core::InstanceId;
use kiln_internal_api::invoke::{HTTP_METHOD_HEADER, HTTP_PATH_HEADER};
use kiln_internal_api::invoke_client::{self, AnswerBody, Payload};
use kiln_internal_api::server::Body;
use kiln_internal_api::{
    exec_frame, headers as ih, paths, ExecStart, InternalClient, InternalClientError, InvokeClient,
    Lease, LogRecords,
};

use crate::invoke::{InvokeRequest, LogType};

type Result<T> = std::result::Result<T, InternalClientError>;

/// The agents' API as the gateway uses it.
pub trait AgentClient: Send + Sync + 'static {
    /// One call on `lease`'s instance: the agent's answer, its body
    /// streamed (see [`kiln_internal_api::InvokeOutcome`]).
    fn invoke<'a>(
        &'a self,
        lease: &'a Lease,
        call: &'a InvokeRequest,
    ) -> BoxFuture<'a, Result<Response<AnswerBody>>>;
    /// An HTTP trigger's WebSocket handshake (`call` with GET and its
    /// path) on `lease`'s instance, on a connection of its own: the
    /// agent's answer; on a `101` the connection is taken with
    /// [`hyper::upgrade::on`] and carries the WebSocket's bytes.
    fn websocket<'a>(
        &'a self,
        lease: &'a Lease,
        call: &'a InvokeRequest,
    ) -> BoxFuture<'a, Result<Response<Incoming>>>;
    /// The log records on the node at `agent_url` matching `query` (the
    /// query string of [`paths::AGENT_LOGS`]).
    fn logs<'a>(&'a self, agent_url: &'a str, query: &'a str) -> BoxFuture<'a, Result<LogRecords>>;
    /// Start an exec session in `instance`: the agent's answer streams the
    /// command's output, `stdin` its input.
    fn exec<'a>(
        &'a self,
        agent_url: &'a str,
        instance: &'a InstanceId,
        start: &'a ExecStart,
        stdin: Body,
    ) -> BoxFuture<'a, Result<Response<Incoming>>>;
}

pub type SharedAgents = std::sync::Arc<dyn AgentClient>;

/// Agents over mTLS: invocations on HTTP/1.1 connections driven by the
/// calling task (the data path, see [`kiln_internal_api::inline`]), control
/// calls on HTTP/2.
pub struct HttpAgent {
    invoke: InvokeClient,
    control: InternalClient,
}

/// How long a node may take to answer for its logs.
const LOGS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl HttpAgent {
    pub fn new(invoke: InvokeClient, control: InternalClient) -> Self {
        Self {
            invoke,
            control: control.with_timeout(LOGS_TIMEOUT),
        }
    }
}

fn url(agent_url: &str, path: &str) -> String {
    format!("{}{path}", agent_url.trim_end_matches('/'))
}

fn unbuildable(url: String, e: http::Error) -> InternalClientError {
    InternalClientError::Transport {
        url,
        message: format!("cannot build the request: {e}"),
    }
}

impl AgentClient for HttpAgent {
    fn invoke<'a>(
        &'a self,
        lease: &'a Lease,
        call: &'a InvokeRequest,
    ) -> BoxFuture<'a, Result<Response<AnswerBody>>> {
        Box::pin(async move {
            let req = request(lease, call)?;
            self.invoke.send(req).await
        })
    }

    fn websocket<'a>(
        &'a self,
        lease: &'a Lease,
        call: &'a InvokeRequest,
    ) -> BoxFuture<'a, Result<Response<Incoming>>> {
        Box::pin(async move {
            let req = websocket_request(lease, call)?;
            self.invoke.send_upgrade(req).await
        })
    }

    fn logs<'a>(&'a self, agent_url: &'a str, query: &'a str) -> BoxFuture<'a, Result<LogRecords>> {
        Box::pin(async move {
            let path = format!("{}?{query}", paths::AGENT_LOGS);
            self.control.get(agent_url, &path).await
        })
    }

    fn exec<'a>(
        &'a self,
        agent_url: &'a str,
        instance: &'a InstanceId,
        start: &'a ExecStart,
        stdin: Body,
    ) -> BoxFuture<'a, Result<Response<Incoming>>> {
        Box::pin(async move {
            let u = url(agent_url, &paths::agent_exec(instance));
            let start = serde_json::to_string(start).expect("an exec start serialises");
            let value =
                HeaderValue::from_str(&start).map_err(|_| InternalClientError::Transport {
                    url: u.clone(),
                    message: "the command is not a valid header value".into(),
                })?;
            let req = Request::builder()
                .method(Method::POST)
                .uri(&u)
                .header(exec_frame::HEADER, value)
                .body(stdin)
                .map_err(|e| unbuildable(u.clone(), e))?;
            // `send` applies no timeout: the session lasts as it will.
            self.control.send(req).await
        })
    }
}

/// FC's request id header, set on the agent request.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-fc-request-id");

/// Caller headers never passed to the function: signing, FC's own and
/// connection-level ones.
fn forwardable(name: &HeaderName) -> bool {
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

/// The agent's invoke request: the payload, the request id and the
/// caller's own headers.
fn request(lease: &Lease, call: &InvokeRequest) -> Result<Request<Payload>> {
    // One string for the whole URL (this runs per call).
    let u = format!(
        "{}/v1/instances/{}/invoke",
        lease.agent_url.trim_end_matches('/'),
        lease.instance_id
    );
    debug_assert!(u.ends_with(&paths::agent_invoke(&lease.instance_id)));
    let body = match &call.stream {
        None => invoke_client::whole(call.payload.clone()),
        Some(stream) => stream
            .take()
            .ok_or_else(|| InternalClientError::Transport {
                url: u.clone(),
                message: "the request body was already sent".into(),
            })?,
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(&u)
        .body(body)
        .map_err(|e| unbuildable(u.clone(), e))?;
    let h = req.headers_mut();
    let pass_authorization = call.http.as_ref().is_some_and(|c| c.pass_authorization);
    for (k, v) in call.headers.iter() {
        if forwardable(k) || (pass_authorization && k == header::AUTHORIZATION) {
            h.append(k.clone(), v.clone());
        }
    }
    if let Some(c) = &call.http {
        // Checked by the HTTP trigger (a valid request line).
        if let Ok(path) = HeaderValue::from_str(&c.path_and_query) {
            h.insert(
                HTTP_METHOD_HEADER,
                HeaderValue::from_str(c.method.as_str()).expect("a method is a valid header value"),
            );
            h.insert(HTTP_PATH_HEADER, path);
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
    if call.http.is_none() && !h.contains_key(header::CONTENT_TYPE) {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
    }
    Ok(req)
}

/// The agent's WebSocket request: the invoke request's headers (the
/// caller's own, the request line, the request id), GET on the instance's
/// websocket route, and the upgrade asked for on this hop (the caller's
/// `Connection`/`Upgrade` are hop-by-hop and never forwarded as such).
fn websocket_request(lease: &Lease, call: &InvokeRequest) -> Result<Request<Payload>> {
    let mut req = request(lease, call)?;
    let u = url(
        &lease.agent_url,
        &paths::agent_websocket(&lease.instance_id),
    );
    *req.uri_mut() =
        u.parse()
            .map_err(|e: http::uri::InvalidUri| InternalClientError::Transport {
                url: u.clone(),
                message: format!("cannot build the request: {e}"),
            })?;
    *req.method_mut() = Method::GET;
    let h = req.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
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
            expires_in_ms: 600_000,
        };
        let mut headers = HeaderMap::new();
        headers.insert("x-custom", HeaderValue::from_static("1"));
        headers.insert("authorization", HeaderValue::from_static("secret"));
        headers.insert(ih::LOG_TYPE, HeaderValue::from_static("tail"));
        let call = InvokeRequest {
            account_id: "1".parse().unwrap(),
            function: "f".parse().unwrap(),
            qualifier: crate::versions::Qualifier::Latest,
            payload: Bytes::from_static(b"x"),
            headers,
            log: LogType::Tail,
            request_id: RequestId::generate(),
            http: None,
            stream: None,
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
