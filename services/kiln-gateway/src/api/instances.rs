//! FC's ListInstances and InstanceExec.
//!
//! ListInstances (`GET /2023-03-30/functions/{functionName}/instances`)
//! answers FC's `ListInstancesOutput` from the scheduler's view of the
//! caller's live instances.
//!
//! InstanceExec (`GET /2023-03-30/functions/{functionName}/instances/{instanceId}/exec`
//! with `command` (repeated, or one JSON array), `stdin`, `stdout`,
//! `stderr`, `tty` query parameters) is a WebSocket upgrade. Binary
//! messages carry one channel byte and the payload: 0 stdin (client to
//! server), 1 stdout, 2 stderr, 3 status (JSON `{"exitCode": n}` or
//! `{"error": "..."}`, then the server closes); a stdin message with no
//! payload ends the command's input. The gateway bridges the
//! WebSocket to the instance's agent (`POST /v1/instances/{id}/exec`, a
//! full-duplex HTTP/2 stream of `exec_frame`s), which runs the command in
//! the instance and audits the session in the function's log.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use kiln_core::{FcError, FcErrorCode, FunctionName};
use kiln_internal_api::client::remote_error;
use kiln_internal_api::server;

use super::respond::{json, Body};
use kiln_internal_api::{exec_frame, ExecStart, InstanceInfo};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use super::error::ApiError;
use super::request::query_param;
use crate::auth::Caller;
use crate::gateway::Gateway;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FcInstance {
    instance_id: String,
    /// The version the instance serves, or LATEST.
    qualifier: String,
    status: &'static str,
    created_time_ms: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ListInstancesOutput {
    instances: Vec<FcInstance>,
    request_id: String,
}

/// The caller's live instances of `name`, as the scheduler knows them.
async fn instances_of(
    gw: &Gateway,
    caller: &Caller,
    name: &FunctionName,
) -> Result<Vec<InstanceInfo>, ApiError> {
    let all = gw.scheduler.instances().await?;
    Ok(all
        .into_iter()
        .filter(|i| i.account_id == caller.account_id && &i.function_name == name)
        .collect())
}

pub async fn list(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
    request_id: &str,
) -> Result<Response<Body>, ApiError> {
    use crate::versions::{alias_not_found, version_not_found, Qualifier, LATEST};
    super::request::caller_function(gw, caller, name)?;
    // Each version's instances carry its revision; the rest serve LATEST
    // (its current revision, or an older one draining).
    let version_of: std::collections::HashMap<String, String> = gw
        .catalog
        .versions_of(&caller.account_id, name)
        .iter()
        .map(|v| (v.entry.spec.revision.clone(), v.version.to_string()))
        .collect();
    let label = |revision: &str| {
        version_of
            .get(revision)
            .cloned()
            .unwrap_or_else(|| LATEST.to_owned())
    };
    // FC's `qualifier` filter: LATEST, one version, or an alias's versions.
    let shown: Option<Vec<String>> = match query_param(parts, "qualifier") {
        None => None,
        Some(q) => Some(match Qualifier::parse(Some(&q))? {
            Qualifier::Latest => vec![LATEST.to_owned()],
            Qualifier::Version(v) => {
                gw.catalog
                    .version(&caller.account_id, name, v)
                    .ok_or_else(|| version_not_found(name, &q))?;
                vec![v.to_string()]
            }
            Qualifier::Alias(a) => gw
                .catalog
                .alias(&caller.account_id, name, &a)
                .ok_or_else(|| alias_not_found(name, &a))?
                .versions()
                .map(|v| v.to_string())
                .collect(),
        }),
    };
    let wanted: Option<Vec<String>> = match query_param(parts, "instanceIds") {
        None => None,
        Some(raw) => Some(serde_json::from_str(&raw).map_err(|_| {
            FcError::invalid_argument("instanceIds must be a JSON array of instance ids")
        })?),
    };
    let limit = match query_param(parts, "limit") {
        None => usize::MAX,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => n,
            _ => return Err(FcError::invalid_argument("limit must be between 1 and 1000").into()),
        },
    };
    let instances = instances_of(gw, caller, name)
        .await?
        .into_iter()
        .filter(|i| {
            wanted
                .as_ref()
                .is_none_or(|w| w.iter().any(|id| id == i.instance_id.as_str()))
        })
        .map(|i| (label(&i.revision), i))
        .filter(|(q, _)| shown.as_ref().is_none_or(|s| s.contains(q)))
        .take(limit)
        .map(|(qualifier, i)| FcInstance {
            instance_id: i.instance_id.to_string(),
            qualifier,
            status: "Running",
            created_time_ms: i.created_at_ms,
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &ListInstancesOutput {
            instances,
            request_id: request_id.to_owned(),
        },
    ))
}

fn flag(parts: &http::request::Parts, key: &str, default: bool) -> Result<bool, FcError> {
    match query_param(parts, key).as_deref() {
        None => Ok(default),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(other) => Err(FcError::invalid_argument(format!(
            "{key} must be true or false, not {other:?}"
        ))),
    }
}

/// `command`: repeated parameters, or one JSON array.
pub fn command(parts: &http::request::Parts) -> Result<Vec<String>, FcError> {
    let q = parts.uri.query().unwrap_or("");
    let mut argv: Vec<String> = q
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == "command").then(|| {
                percent_encoding::percent_decode_str(&v.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })
        .collect();
    if argv.len() == 1 && argv[0].trim_start().starts_with('[') {
        argv = serde_json::from_str(&argv[0])
            .map_err(|_| FcError::invalid_argument("command must be a JSON array of strings"))?;
    }
    if argv.is_empty() || argv[0].is_empty() {
        return Err(FcError::invalid_argument("command is required"));
    }
    if argv.len() > 256 || argv.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
        return Err(FcError::invalid_argument(
            "command is too long or malformed",
        ));
    }
    Ok(argv)
}

pub async fn exec(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    instance_id: &str,
    mut parts: http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    super::request::check_qualifier(&parts)?;
    super::request::caller_function(gw, caller, name)?;
    let argv = command(&parts)?;
    let tty = flag(&parts, "tty", false)?;
    let stdin = flag(&parts, "stdin", false)?;
    // stdout and stderr are always sent; FC's flags are accepted.
    flag(&parts, "stdout", true)?;
    flag(&parts, "stderr", true)?;
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = parts.headers.get("sec-websocket-key").cloned();
    let (true, Some(key)) = (upgrade, key) else {
        return Err(FcError::invalid_argument(
            "InstanceExec is a WebSocket: send Upgrade: websocket and Sec-WebSocket-Key",
        )
        .into());
    };
    let instance = instances_of(gw, caller, name)
        .await?
        .into_iter()
        .find(|i| i.instance_id.as_str() == instance_id)
        .ok_or_else(|| {
            FcError::new(
                FcErrorCode::InstanceNotFound,
                format!("instance '{instance_id}' of function '{name}' does not exist"),
            )
        })?;
    let nodes = gw.scheduler.nodes().await?;
    let agent = nodes
        .into_iter()
        .find(|n| Some(&n.node_id) == instance.node_id.as_ref())
        .ok_or_else(|| FcError::unavailable("the instance's node is not reachable"))?;
    let on_upgrade = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| FcError::invalid_argument("this connection cannot be upgraded"))?;

    // The agent's session first: a refusal there is an FC error here.
    let start = ExecStart {
        command: argv,
        tty,
        stdin,
        principal: format!("{}/{}", caller.account_id, caller.access_key_id),
    };
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(32);
    // The agent takes the command in a header.
    HeaderValue::from_str(&serde_json::to_string(&start).expect("serialises"))
        .map_err(|_| FcError::invalid_argument("command is not a valid header value"))?;
    let resp = gw
        .agents
        .exec(
            &agent.agent_url,
            &instance.instance_id,
            &start,
            server::channel(stdin_rx),
        )
        .await?;
    if resp.status() != StatusCode::OK {
        let status = resp.status();
        let bytes = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(remote_error(status, &bytes).into());
    }
    let mut from_agent = resp.into_body();
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "exec upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let (mut ws_tx, mut ws_rx) = ws.split();
        // Client to agent: stdin.
        let inbound = tokio::spawn(async move {
            while let Some(Ok(msg)) = ws_rx.next().await {
                let data = match msg {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.into_bytes(),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if let Some((&channel, payload)) = data.split_first() {
                    if channel == exec_frame::STDIN
                        && stdin_tx
                            .send(exec_frame::encode(channel, payload))
                            .await
                            .is_err()
                    {
                        break;
                    }
                }
            }
        });
        // Agent to client: output and the status.
        let mut buf = Vec::new();
        'outer: while let Some(Ok(frame)) = from_agent.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            let Ok(frames) = exec_frame::decode(&mut buf) else {
                break;
            };
            for (channel, payload) in frames {
                let mut msg = Vec::with_capacity(payload.len() + 1);
                msg.push(channel);
                msg.extend_from_slice(&payload);
                if ws_tx.send(Message::Binary(msg)).await.is_err() {
                    break 'outer;
                }
                if channel == exec_frame::STATUS {
                    break 'outer;
                }
            }
        }
        let _ = ws_tx.send(Message::Close(None)).await;
        inbound.abort();
    });
    let resp = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header("sec-websocket-accept", accept)
        .body(server::empty())
        .expect("valid response");
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(query: &str) -> http::request::Parts {
        http::Request::get(format!("/x?{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn commands_come_repeated_or_as_json() {
        assert_eq!(
            command(&parts("command=ls&command=%2Fcode")).unwrap(),
            vec!["ls", "/code"]
        );
        assert_eq!(
            command(&parts(
                "command=%5B%22cat%22%2C%22%2Fproc%2F1%2Fcmdline%22%5D"
            ))
            .unwrap(),
            vec!["cat", "/proc/1/cmdline"]
        );
        for bad in ["", "command=", "command=%5Bnope", "stdin=true"] {
            assert!(command(&parts(bad)).is_err(), "{bad}");
        }
    }
}
