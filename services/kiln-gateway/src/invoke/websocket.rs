//! WebSocket upgrades through an HTTP trigger: the handshake is a call of
//! the function (a lease, the agent's websocket route, the function's own
//! HTTP server), and on the function's `101` the caller's connection and
//! the agent's are joined, bytes copied both ways, until either side
//! closes or the function's timeout ends it (FC limits a WebSocket
//! connection by the function's timeout: the agent closes both of its
//! connections then; this side gives up [`AGENT_GRACE`] later).
//!
//! While the WebSocket is open it is one call in flight: the lease is held
//! (the scheduler neither gives its slot to another call nor counts the
//! instance idle) and the agent counts it in the instance's in-flight
//! calls (never frozen under it). The lease goes back when the connection
//! ends.
//!
//! Only `Upgrade: websocket` is passed through (HTTP/1.1's upgrade; the
//! public listener does not offer HTTP/2's extended CONNECT, so clients
//! open WebSockets over HTTP/1.1); any other upgrade (h2c, ...) is refused
//! by [`requested`].

use std::sync::Arc;

use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use kiln_core::FcError;
use kiln_internal_api::client::remote_error;
use kiln_internal_api::server::{empty, full};
use kiln_internal_api::{headers as ih, InvokeFailure, InvokeOutcome, LeaseOutcome};

use super::{FunctionAnswer, InvokeRequest, InvokeResult};
use crate::gateway::Gateway;

/// The most of an agent's answer read when the function did not upgrade.
const ANSWER_MAX: usize = 1 << 20;

/// The caller's side of an HTTP/1.1 upgrade it asked for.
pub struct ClientUpgrade(OnUpgrade);

impl std::fmt::Debug for ClientUpgrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientUpgrade")
    }
}

fn lists(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// Whether `parts` is a WebSocket handshake: `Ok(None)` for an ordinary
/// request, the caller's upgrade for a WebSocket one, and FC's
/// InvalidArgument for an upgrade Kiln does not pass on (h2c or any other
/// protocol, or a WebSocket handshake that is not an HTTP/1.1 GET).
pub fn requested(parts: &mut http::request::Parts) -> Result<Option<ClientUpgrade>, FcError> {
    if !check(parts)? {
        return Ok(None);
    }
    let on = parts
        .extensions
        .remove::<OnUpgrade>()
        .ok_or_else(|| FcError::invalid_argument("this connection cannot be upgraded"))?;
    Ok(Some(ClientUpgrade(on)))
}

/// [`requested`]'s check: whether `parts` asks for a WebSocket upgrade.
fn check(parts: &http::request::Parts) -> Result<bool, FcError> {
    let Some(upgrade) = parts.headers.get(header::UPGRADE) else {
        return Ok(false);
    };
    if !lists(&parts.headers, header::UPGRADE, "websocket") {
        let protocol = String::from_utf8_lossy(upgrade.as_bytes());
        return Err(FcError::invalid_argument(format!(
            "Upgrade: {protocol} is not supported on an HTTP trigger; only WebSocket upgrades (Upgrade: websocket) reach the function"
        )));
    }
    if parts.version != Version::HTTP_11
        || parts.method != Method::GET
        || !lists(&parts.headers, header::CONNECTION, "upgrade")
    {
        return Err(FcError::invalid_argument(
            "a WebSocket handshake is an HTTP/1.1 GET with Connection: Upgrade and Upgrade: websocket",
        ));
    }
    Ok(true)
}

/// The handshake `req` (see [`requested`]) as a call of its function;
/// on the function's `101`, the WebSocket runs in a task of its own and
/// the result is the `101` to answer with ([`super::render_http`] keeps
/// its upgrade headers).
pub async fn websocket(
    gw: &Arc<Gateway>,
    req: InvokeRequest,
    client: ClientUpgrade,
) -> InvokeResult {
    match run(gw, req, client).await {
        Ok(result) => result,
        Err(e) => InvokeResult::Platform(e),
    }
}

async fn run(
    gw: &Arc<Gateway>,
    req: InvokeRequest,
    client: ClientUpgrade,
) -> Result<InvokeResult, FcError> {
    // The same checks and lease as any call: a disabled function takes no
    // WebSocket either.
    let super::Prepared {
        entry,
        deadline,
        mut guard,
        mut reused,
    } = super::prepare(gw, &req)?;
    let timeout_s = entry.spec.timeout_s;
    let resp = loop {
        let from_pool = reused.is_some();
        let lease = match super::next_lease(gw, &req, &entry, &mut reused).await {
            Ok(l) => l,
            Err(result) => return Ok(result),
        };
        guard.hold(lease, LeaseOutcome::InstanceFailed);
        let lease = guard.lease().expect("the lease was just taken");
        let resp = match tokio::time::timeout(deadline, gw.agents.websocket(lease, &req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(request_id = %req.request_id, function = %req.function, error = %e, "agent WebSocket call failed");
                return Err(e.to_fc());
            }
            Err(_) => {
                return Ok(InvokeResult::TimedOut {
                    timeout_s,
                    log_tail: None,
                })
            }
        };
        match InvokeOutcome::of(resp.headers()) {
            Some(Ok(_)) => break resp,
            Some(Err(unknown)) => {
                tracing::error!(request_id = %req.request_id, function = %req.function, error = %unknown, "agent answered badly");
                return Err(FcError::internal(
                    "the instance's node answered badly; retry the request",
                ));
            }
            None if from_pool => {
                if let Some(stale) = guard.release() {
                    gw.leases.give_back(
                        &entry.spec.revision,
                        stale,
                        guard.need(),
                        LeaseOutcome::InstanceFailed,
                    );
                }
            }
            None => {
                let (head, body) = resp.into_parts();
                return Err(remote_error(head.status, &read(body).await));
            }
        }
    };
    let outcome = InvokeOutcome::of(resp.headers())
        .and_then(Result::ok)
        .expect("checked above");
    let log_tail = resp.headers().get(ih::LOG_RESULT).cloned();
    match outcome {
        InvokeOutcome::Ok if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let mut resp = resp;
            let agent = hyper::upgrade::on(&mut resp);
            let (head, _) = resp.into_parts();
            // The function keeps its instance whatever ends the connection.
            guard.set_outcome(LeaseOutcome::Ok);
            let request_id = req.request_id.clone();
            let metrics = gw.metrics.clone();
            metrics.websockets_open.inc();
            tokio::spawn(async move {
                let _held = guard;
                let how = match tokio::time::timeout(deadline, pipe(client.0, agent)).await {
                    Ok(Ok((up, down))) => {
                        tracing::debug!(%request_id, bytes_to_function = up, bytes_from_function = down, "WebSocket closed");
                        "closed"
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%request_id, error = %e, "WebSocket ended with an error");
                        "error"
                    }
                    Err(_) => {
                        tracing::debug!(%request_id, timeout_s, "WebSocket cut at the function's timeout");
                        "timeout"
                    }
                };
                metrics.websockets_open.dec();
                metrics
                    .websockets_ended
                    .get_or_create(&crate::metrics::WebSocketEndLabels { how })
                    .inc();
            });
            Ok(InvokeResult::Success(FunctionAnswer {
                status: head.status,
                headers: head.headers,
                log_tail: None,
                body: empty(),
            }))
        }
        InvokeOutcome::Ok | InvokeOutcome::FunctionError => {
            let (head, body) = resp.into_parts();
            let body = read(body).await;
            guard.set_outcome(LeaseOutcome::Ok);
            drop(guard);
            let answer = FunctionAnswer {
                status: head.status,
                headers: head.headers,
                log_tail,
                body: full(body),
            };
            Ok(if outcome == InvokeOutcome::Ok {
                InvokeResult::Success(answer)
            } else {
                InvokeResult::FunctionError(answer)
            })
        }
        InvokeOutcome::InstanceFailed => {
            drop(guard);
            let message =
                match serde_json::from_slice::<InvokeFailure>(&read(resp.into_body()).await) {
                    Ok(f) if !f.message.is_empty() => f.message,
                    _ => "Process exited unexpectedly before completing request".to_owned(),
                };
            Ok(InvokeResult::Crashed { message, log_tail })
        }
        InvokeOutcome::Timeout => {
            drop(guard);
            Ok(InvokeResult::TimedOut {
                timeout_s,
                log_tail,
            })
        }
    }
}

async fn read(body: hyper::body::Incoming) -> bytes::Bytes {
    use http_body_util::BodyExt;
    http_body_util::Limited::new(body, ANSWER_MAX)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default()
}

/// Copy bytes both ways between the caller's upgraded connection and the
/// agent's until both directions have ended: (to the function, from it).
async fn pipe(client: OnUpgrade, agent: OnUpgrade) -> std::io::Result<(u64, u64)> {
    let (client, agent) = tokio::try_join!(client, agent).map_err(std::io::Error::other)?;
    let mut client = TokioIo::new(client);
    let mut agent = TokioIo::new(agent);
    tokio::io::copy_bidirectional(&mut client, &mut agent).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(
        version: Version,
        method: Method,
        h: &[(&'static str, &'static str)],
    ) -> http::request::Parts {
        let mut b = http::Request::builder()
            .method(method)
            .version(version)
            .uri("/ws");
        for (k, v) in h {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_http11_get_websocket_handshakes_upgrade() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert!(check(&parts(Version::HTTP_11, Method::GET, &ws)).unwrap());
        assert!(!check(&parts(Version::HTTP_11, Method::GET, &[])).unwrap());
        let h2c = [("connection", "upgrade"), ("upgrade", "h2c")];
        for (version, method, h) in [
            (Version::HTTP_11, Method::GET, &h2c[..]),
            (Version::HTTP_11, Method::POST, &ws[..]),
            (
                Version::HTTP_11,
                Method::GET,
                &[("upgrade", "websocket")][..],
            ),
            (Version::HTTP_10, Method::GET, &ws[..]),
        ] {
            let e = check(&parts(version, method.clone(), h)).unwrap_err();
            assert_eq!(
                e.code,
                kiln_core::FcErrorCode::InvalidArgument,
                "{method} {h:?}"
            );
        }
        let e = check(&parts(Version::HTTP_11, Method::GET, &h2c)).unwrap_err();
        assert!(e.message.contains("Upgrade: h2c is not supported"), "{e}");
        // Without hyper's upgrade handle (not an HTTP/1.1 server
        // connection), a handshake cannot be served.
        let mut p = parts(Version::HTTP_11, Method::GET, &ws);
        assert!(requested(&mut p).is_err());
    }
}
