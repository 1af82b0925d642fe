//! WebSocket upgrades through an HTTP trigger: the gateway's
//! `GET /v1/instances/{id}/websocket` (an HTTP/1.1 upgrade, route callers:
//! the gateway only, as for invocations) passed to the function's own HTTP
//! server on its port, and, on the function's `101`, the bytes copied both
//! ways between the gateway's connection and the runtime's until either
//! side closes or the function's timeout ends the connection (FC limits a
//! WebSocket connection by the function's timeout; at that moment both
//! connections are closed, with no WebSocket close frame).
//!
//! ```text
//!   gateway ──GET Upgrade: websocket──> agent ──GET Upgrade: websocket──> runtime
//!           <──────────── 101 ─────────       <──────────── 101 ─────────
//!           <═══════ bytes both ways (one task, copy_bidirectional) ═════>
//! ```
//!
//! The connection to the runtime is a new one (an upgraded connection is
//! never reused). While the WebSocket is open it is one call in flight on
//! the instance (`forward::InFlight`): the instance is not frozen or
//! counted idle under it, and its log frames it as one call (Start at the
//! handshake, End when the connection closes).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use kiln_core::FcError;
use kiln_internal_api::invoke::OUTCOME_HEADER;
use kiln_internal_api::server::{error, full, Body};
use kiln_internal_api::InvokeOutcome;

use crate::forward::{classify, strip_hop_by_hop, unanswered, Started, X_FC_REQUEST_ID};
use crate::instances::{Instance, InstanceManager};

/// The most of a refused handshake's answer (the function answered
/// without upgrading) passed back.
const REFUSAL_BODY_MAX: usize = 1 << 20;

/// Whether `headers` ask for a WebSocket upgrade (`Connection: upgrade`,
/// `Upgrade: websocket`).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
    });
    let websocket = headers.get(header::UPGRADE).is_some_and(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    });
    connection_upgrade && websocket
}

impl InstanceManager {
    /// Pass a WebSocket handshake to `target`'s runtime and, once both
    /// sides have upgraded, copy the connection's bytes both ways.
    pub(crate) async fn websocket(
        self: &Arc<Self>,
        target: Result<Arc<Instance>, String>,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let request_id = req
            .headers()
            .get(&X_FC_REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static(""));
        if req.version() != Version::HTTP_11 || !is_websocket_upgrade(req.headers()) {
            // Only the gateway calls this route, and it sends HTTP/1.1
            // upgrades only: anything else is a malformed call.
            return error(
                &FcError::invalid_argument(
                    "this route takes only an HTTP/1.1 WebSocket handshake (Connection: upgrade, Upgrade: websocket)",
                ),
                request_id.to_str().unwrap_or(""),
            );
        }
        let Started {
            instance,
            mut guard,
            started,
        } = match self.begin_call(target, &request_id, false).await {
            Ok(call) => call,
            Err(refused) => return refused,
        };
        let upstream = &instance.upstream;
        let deadline = tokio::time::Instant::from_std(started + upstream.timeout);
        // The gateway's side of the connection, once the 101 is written.
        let gateway_side = hyper::upgrade::on(&mut req);
        let upgrade = req
            .headers()
            .get(header::UPGRADE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("websocket"));
        let mut outgoing = upstream.prepare(req);
        instance.credentials.apply(outgoing.headers_mut());
        let h = outgoing.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, upgrade);
        let runtime = upstream.runtime().clone();
        let open = async move {
            let tcp = runtime.connect().await?;
            let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(std::io::Error::other)?;
            // Runs until upgraded (its I/O then goes to the answer's
            // `OnUpgrade`) or closed.
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "runtime upgrade connection ended with an error");
                }
            });
            send.send_request(outgoing)
                .await
                .map_err(std::io::Error::other)
        };
        let mut resp = match tokio::time::timeout_at(deadline, open).await {
            Ok(Ok(resp)) => resp,
            Err(_elapsed) => {
                self.metrics.invocation(InvokeOutcome::Timeout);
                let message = format!("Function timed out after {} seconds", upstream.timeout_s);
                guard.end(Some(message.clone()));
                self.fail(&instance, "WebSocket handshake timed out");
                return unanswered(InvokeOutcome::Timeout, StatusCode::OK, &request_id, message);
            }
            Ok(Err(e)) => {
                self.metrics.invocation(InvokeOutcome::InstanceFailed);
                let message = format!(
                    "Process exited unexpectedly before completing request (duration: {}ms)",
                    started.elapsed().as_millis()
                );
                guard.end(Some(message.clone()));
                self.fail(&instance, "runtime connection failed");
                tracing::warn!(instance_id = %instance.id, error = %e, "runtime did not answer the WebSocket handshake");
                return unanswered(
                    InvokeOutcome::InstanceFailed,
                    StatusCode::OK,
                    &request_id,
                    message,
                );
            }
        };
        self.metrics
            .invoke_seconds
            .observe(started.elapsed().as_secs_f64());
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The function answered the handshake without upgrading (it
            // refused it, say): that answer, as any call's.
            let (mut parts, body) = resp.into_parts();
            let outcome = classify(parts.status, &parts.headers);
            self.metrics.invocation(outcome);
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.insert(OUTCOME_HEADER, outcome.to_header());
            parts.headers.insert(X_FC_REQUEST_ID, request_id);
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.version = Version::default();
            let limited = http_body_util::Limited::new(body, REFUSAL_BODY_MAX);
            let body = match tokio::time::timeout_at(deadline, limited.collect()).await {
                Ok(Ok(c)) => c.to_bytes(),
                _ => Bytes::new(),
            };
            return Response::from_parts(parts, full(body));
        }
        let runtime_side = hyper::upgrade::on(&mut resp);
        self.metrics.invocation(InvokeOutcome::Ok);
        let (mut parts, _) = resp.into_parts();
        let upgrade = parts.headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(&mut parts.headers);
        let h = &mut parts.headers;
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(
            header::UPGRADE,
            upgrade.unwrap_or_else(|| HeaderValue::from_static("websocket")),
        );
        h.insert(OUTCOME_HEADER, InvokeOutcome::Ok.to_header());
        h.insert(X_FC_REQUEST_ID, request_id);
        parts.version = Version::default();
        let timeout_s = upstream.timeout_s;
        let instance_id = instance.id.clone();
        tokio::spawn(async move {
            let mut guard = guard;
            let piped = tokio::time::timeout_at(deadline, pipe(gateway_side, runtime_side)).await;
            match piped {
                Ok(Ok((up, down))) => {
                    tracing::debug!(%instance_id, bytes_to_function = up, bytes_from_function = down, "WebSocket closed");
                }
                Ok(Err(e)) => {
                    tracing::debug!(%instance_id, error = %e, "WebSocket ended with an error");
                }
                Err(_) => {
                    tracing::debug!(%instance_id, timeout_s, "WebSocket closed at the function's timeout");
                    guard.end(Some(format!(
                        "WebSocket connection closed at the function's timeout ({timeout_s} seconds)"
                    )));
                }
            }
        });
        Response::from_parts(parts, kiln_internal_api::server::empty())
    }
}

/// Copy bytes both ways between the two upgraded connections until both
/// directions have ended: (bytes to the function, bytes from it).
async fn pipe(gateway: OnUpgrade, runtime: OnUpgrade) -> std::io::Result<(u64, u64)> {
    let (gateway, runtime) = tokio::try_join!(gateway, runtime).map_err(std::io::Error::other)?;
    let mut gateway = TokioIo::new(gateway);
    let mut runtime = TokioIo::new(runtime);
    tokio::io::copy_bidirectional(&mut gateway, &mut runtime).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_a_websocket_upgrade_is_one() {
        assert!(is_websocket_upgrade(&headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ])));
        assert!(!is_websocket_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&headers(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c"),
        ])));
        assert!(!is_websocket_upgrade(&headers(&[(
            "connection",
            "upgrade"
        )])));
    }
}
