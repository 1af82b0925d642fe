//! InstanceExec on the node: `POST /v1/instances/{id}/exec` runs a command
//! inside the instance through the sandbox driver (`SandboxDriver::exec`,
//! the same user, namespaces, seccomp filter and cgroup as the function).
//! The request body streams stdin and the answer streams stdout, stderr
//! and finally the exit status, as `exec_frame`s; a session ends when the
//! command exits or the gateway goes away (the command is then killed).
//! Every session is audited in the function's log: who, when, which
//! instance, what command, and how it ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use kiln_core::{FcError, FcErrorCode};
use kiln_internal_api::exec_frame;
use kiln_internal_api::server::{self, error, Body};
use kiln_internal_api::ExecStart;
use kiln_sandbox::ExecRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::instances::{Instance, InstanceManager};

/// How long output may still drain after the command exited (a background
/// process may hold its terminal open).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

fn parse_start(req: &Request<Incoming>) -> Result<ExecStart, FcError> {
    let raw = req
        .headers()
        .get(exec_frame::HEADER)
        .ok_or_else(|| FcError::invalid_argument("the exec request has no command"))?;
    let start: ExecStart = serde_json::from_slice(raw.as_bytes())
        .map_err(|e| FcError::invalid_argument(format!("bad exec request: {e}")))?;
    Ok(start)
}

/// Serve one exec session.
pub async fn serve(
    manager: Arc<InstanceManager>,
    target: Result<Arc<Instance>, String>,
    req: Request<Incoming>,
    rid: &str,
) -> Response<Body> {
    let start = match parse_start(&req) {
        Ok(s) => s,
        Err(e) => return error(&e, rid),
    };
    let exec = ExecRequest {
        command: start.command.clone(),
        tty: start.tty,
        stdin: start.stdin || start.tty,
    };
    if let Err(e) = exec.validate() {
        return error(&FcError::invalid_argument(e.to_string()), rid);
    }
    let instance = match target {
        Ok(i) if i.state().can_invoke() => i,
        Ok(i) => return error(&not_found(i.id.as_str()), rid),
        Err(id) => return error(&not_found(&id), rid),
    };
    // An idle instance may be frozen; a session keeps it running.
    let awake = match manager.hold_awake(&instance).await {
        Ok(guard) => guard,
        Err(e) => {
            tracing::warn!(instance_id = %instance.id, error = %e, "cannot thaw for exec");
            return error(&FcError::internal(e.to_string()), rid);
        }
    };
    let command = shell_words(&start.command);
    instance.log.event(&format!(
        "Exec session started: principal {}, instance {}, command {command}, tty {}",
        start.principal, instance.id, start.tty
    ));
    let mut process = match manager.driver.exec(&instance.id, &exec).await {
        Ok(p) => p,
        Err(e) => {
            let e = kiln_core::error_chain(&e);
            instance.log.event(&format!(
                "Exec session failed: principal {}, instance {}, command {command}: {e}",
                start.principal, instance.id
            ));
            tracing::warn!(instance_id = %instance.id, error = %e, "exec failed");
            return error(&FcError::internal(e), rid);
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let mut stdin = process.stdin.take();
    let mut body = req.into_body();
    // stdin: frames from the gateway into the command.
    let stdin_task = tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            let Ok(frames) = exec_frame::decode(&mut buf) else {
                return false;
            };
            for (channel, payload) in frames {
                if channel != exec_frame::STDIN {
                    continue;
                }
                // An empty stdin frame is the caller's end of input.
                if payload.is_empty() {
                    stdin = None;
                    continue;
                }
                if let Some(w) = stdin.as_mut() {
                    if w.write_all(&payload).await.is_err() || w.flush().await.is_err() {
                        stdin = None;
                    }
                }
            }
        }
        // The caller's stdin ended (or the gateway went away): close it.
        drop(stdin);
        true
    });
    let pump = |mut r: kiln_sandbox::exec::ExecReader, channel: u8, tx: mpsc::Sender<Bytes>| {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx
                            .send(exec_frame::encode(channel, &buf[..n]))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
        })
    };
    let out_task = pump(process.stdout, exec_frame::STDOUT, tx.clone());
    let err_task = process
        .stderr
        .take()
        .map(|r| pump(r, exec_frame::STDERR, tx.clone()));
    let mut child = process.child;
    let started = Instant::now();
    let principal = start.principal.clone();
    let log = instance.log.clone();
    let id = instance.id.clone();
    tokio::spawn(async move {
        let _awake = awake;
        let status = tokio::select! {
            code = child.wait() => code,
            _ = tx.closed() => {
                child.kill();
                child.wait().await
            }
        };
        for t in [Some(out_task), err_task].into_iter().flatten() {
            let abort = t.abort_handle();
            if tokio::time::timeout(DRAIN_GRACE, t).await.is_err() {
                abort.abort();
            }
        }
        stdin_task.abort();
        let (frame, ended) = match &status {
            Ok(code) => (
                serde_json::json!({ "exitCode": code }),
                format!("exit code {code}"),
            ),
            Err(e) => (
                serde_json::json!({ "error": e.to_string() }),
                format!("error: {e}"),
            ),
        };
        let _ = tx
            .send(exec_frame::encode(
                exec_frame::STATUS,
                frame.to_string().as_bytes(),
            ))
            .await;
        log.event(&format!(
            "Exec session ended: principal {principal}, instance {id}, command {command}, {ended}, duration {}ms",
            started.elapsed().as_millis()
        ));
        tracing::info!(instance_id = %id, %principal, result = %ended, "exec session ended");
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/octet-stream")
        .body(server::channel(rx))
        .expect("valid response")
}

fn not_found(id: &str) -> FcError {
    FcError::new(
        FcErrorCode::InstanceNotFound,
        format!("instance {id} does not exist or is not running"),
    )
}

/// The command as one printable line for the audit.
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_for_the_audit() {
        let argv = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(shell_words(&argv(&["ls", "/code"])), "ls /code");
        assert_eq!(
            shell_words(&argv(&["sh", "-c", "echo 'hi' > x"])),
            "sh -c 'echo '\\''hi'\\'' > x'"
        );
    }
}
