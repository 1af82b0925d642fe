//! Async invocation (InvokeFunction with `x-fc-invocation-type: Async`),
//! the async invoke config calls and the async task calls. Deliveries go
//! through [`crate::queue::invoker`].

use std::sync::Arc;

use super::respond::{full, Body};
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use kiln_core::{FcError, FcErrorCode, FunctionName, RequestId};

use super::error::ApiError;
use super::request::query_param;
use crate::auth::Caller;
use crate::gateway::Gateway;
use crate::queue::tasks::TaskQuery;
use crate::queue::{AsyncConfig, Enqueued, NewMessage, QueueError, StopOutcome, TaskStatus};
use crate::versions::Qualifier;

pub const INVOCATION_TYPE: &str = "x-fc-invocation-type";
pub const TASK_ID: &str = "x-fc-async-task-id";

/// Whether the request asks for an async invocation; any value other
/// than Sync or Async is refused.
pub fn is_async(parts: &http::request::Parts) -> Result<bool, FcError> {
    match parts.headers.get(INVOCATION_TYPE) {
        None => Ok(false),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"sync") => Ok(false),
        Some(v) if v.as_bytes().eq_ignore_ascii_case(b"async") => Ok(true),
        Some(v) => Err(FcError::invalid_argument(format!(
            "x-fc-invocation-type {:?} must be Sync or Async",
            String::from_utf8_lossy(v.as_bytes())
        ))),
    }
}

fn queue_err(e: QueueError) -> ApiError {
    tracing::error!(error = %kiln_core::error_chain(&e), "async queue failure");
    match e {
        // A cluster's shared queue out of reach (PostgreSQL down or
        // failing over): nothing was accepted, and the caller may retry.
        QueueError::Pg(kiln_store::pg::PgStoreError::Connect { .. }) => FcError::new(
            FcErrorCode::ServiceUnavailable,
            "the async queue's database cannot be reached; nothing was accepted, retry the request",
        )
        .into(),
        _ => FcError::internal("the async queue failed; retry the request").into(),
    }
}

/// FC's task id rule: a letter or `_` first, then letters, digits, `_`
/// and `-`, at most 128.
pub fn valid_task_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b'-')
}

/// Caller headers kept with the message for the function (the same that
/// sync invoke forwards; signing and FC headers are dropped).
fn kept_headers(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .filter(|(k, _)| {
            let n = k.as_str();
            !(n.starts_with("x-fc-")
                || n.starts_with("x-acs-")
                || n.starts_with("x-kiln-")
                || matches!(
                    n,
                    "authorization" | "host" | "content-length" | "connection"
                ))
        })
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect()
}

/// InvokeFunction, async: 202 once the message is durable.
pub async fn enqueue(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
    payload: Bytes,
    request_id: &RequestId,
) -> Result<Response<Body>, ApiError> {
    let qualifier = super::request::qualifier(parts)?;
    let entry = super::request::caller_function(gw, caller, name)?;
    // The version or alias must exist now (an alias picks its version when
    // the call is delivered), and the function's invocations be enabled.
    gw.catalog
        .resolve_invocable(&caller.account_id, name, &qualifier, 0.0)?;
    gw.runtimes
        .check_invoke(entry.record.config.runtime, gw.clock.now_ms())?;
    let limit = kiln_core::limits::ASYNC_PAYLOAD_MAX;
    if payload.len() > limit {
        return Err(FcError::new(
            FcErrorCode::EntityTooLarge,
            format!(
                "payload size {} exceeds maximum allowed size for async invocation ({limit} bytes)",
                payload.len()
            ),
        )
        .into());
    }
    let task_id = match parts.headers.get(TASK_ID) {
        None => request_id.as_str().to_owned(),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            if !valid_task_id(s) {
                return Err(FcError::invalid_argument(format!(
                    "{TASK_ID} {:?} must start with a letter or '_' and hold at most 128 letters, digits, '_' or '-'",
                    String::from_utf8_lossy(v.as_bytes())
                ))
                .into());
            }
            s.to_owned()
        }
    };
    let d = &gw.dispatcher;
    let queue = d
        .configs()
        .queue_of(caller.account_id.as_str(), name.as_str());
    let m = NewMessage {
        account: caller.account_id.clone(),
        function: name.clone(),
        queue: queue.clone(),
        task_id: task_id.clone(),
        request_id: request_id.as_str().to_owned(),
        payload: payload.to_vec(),
        headers: {
            let mut h = kept_headers(&parts.headers);
            if !qualifier.is_latest() {
                h.push((
                    crate::queue::QUALIFIER_HEADER.to_owned(),
                    qualifier.to_string(),
                ));
            }
            h
        },
        now_ms: gw.clock.now_ms(),
        depth_limit: Some(gw.catalog.bounds().of(&caller.account_id).async_queue_depth),
    };
    let outcome = d.queue().enqueue(m).await.map_err(queue_err)?;
    match &outcome {
        Enqueued::New => d.enqueued(&queue),
        Enqueued::Full { depth, limit } => {
            tracing::debug!(account = %caller.account_id, depth, limit, "async queue full");
            return Err(
                crate::bounds::queue_full(caller.account_id.as_str(), *depth, *limit).into(),
            );
        }
        Enqueued::Duplicate { request_id } => {
            tracing::debug!(task_id = %task_id, first_request = %request_id, "async task id already enqueued")
        }
    }
    let mut resp = Response::builder()
        .status(StatusCode::ACCEPTED)
        .body(full(Bytes::new()))
        .expect("valid response");
    if let Ok(v) = HeaderValue::from_str(&task_id) {
        resp.headers_mut().insert(TASK_ID, v);
    }
    Ok(resp)
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(v.to_string()))
        .expect("valid response")
}

/// The function's ARN, with the qualifier's path (RAM's resource forms,
/// `.../functions/f/aliases/prod`, `.../functions/f/versions/2`) when the
/// config is not LATEST's.
fn arn(gw: &Gateway, caller: &Caller, name: &str, qualifier: &str) -> String {
    let base = format!(
        "acs:fc:{}:{}:functions/{name}",
        gw.region, caller.account_id
    );
    match Qualifier::parse(Some(qualifier)) {
        Ok(Qualifier::Latest) | Err(_) => base,
        Ok(Qualifier::Version(v)) => format!("{base}/versions/{v}"),
        Ok(Qualifier::Alias(a)) => format!("{base}/aliases/{a}"),
    }
}

fn no_config(name: &FunctionName, qualifier: &Qualifier) -> ApiError {
    let of = match qualifier {
        Qualifier::Latest => String::new(),
        q => format!(" for qualifier {q}"),
    };
    FcError::new(
        FcErrorCode::AsyncConfigNotExists,
        format!("function '{name}' has no async invoke config{of}"),
    )
    .into()
}

pub async fn put_config(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
    body: Bytes,
) -> Result<Response<Body>, ApiError> {
    let qualifier = super::request::qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    // The version or alias must exist when its config is written.
    gw.catalog
        .check_qualifier(&caller.account_id, name, &qualifier)?;
    let q = qualifier.to_string();
    let mut cfg = AsyncConfig::parse(&body, &gw.region, caller.account_id.as_str())?;
    let configs = gw.dispatcher.configs();
    let now = gw.clock.now_ms();
    let old = configs.get(caller.account_id.as_str(), name.as_str(), &q);
    cfg.created_ms = Some(old.and_then(|o| o.created_ms).unwrap_or(now));
    cfg.modified_ms = Some(now);
    gw.dispatcher
        .queue()
        .put_config(&caller.account_id, name, &q, &cfg)
        .await
        .map_err(queue_err)?;
    configs.set(
        caller.account_id.as_str(),
        name.as_str(),
        &q,
        Some(cfg.clone()),
    );
    Ok(json(
        StatusCode::OK,
        &cfg.to_fc(&arn(gw, caller, name.as_str(), &q)),
    ))
}

pub fn get_config(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let qualifier = super::request::qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    let q = qualifier.to_string();
    let cfg = gw
        .dispatcher
        .configs()
        .get(caller.account_id.as_str(), name.as_str(), &q)
        .ok_or_else(|| no_config(name, &qualifier))?;
    Ok(json(
        StatusCode::OK,
        &cfg.to_fc(&arn(gw, caller, name.as_str(), &q)),
    ))
}

pub async fn delete_config(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let qualifier = super::request::qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    let q = qualifier.to_string();
    let configs = gw.dispatcher.configs();
    if configs
        .get(caller.account_id.as_str(), name.as_str(), &q)
        .is_none()
    {
        return Err(no_config(name, &qualifier));
    }
    gw.dispatcher
        .queue()
        .delete_config(&caller.account_id, name, &q)
        .await
        .map_err(queue_err)?;
    configs.set(caller.account_id.as_str(), name.as_str(), &q, None);
    Ok(Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(full(Bytes::new()))
        .expect("valid response"))
}

fn limit_param(parts: &http::request::Parts) -> Result<usize, FcError> {
    match query_param(parts, "limit") {
        None => Ok(20),
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => Ok(n),
            _ => Err(FcError::invalid_argument(format!(
                "limit {l:?} must be an integer from 1 to 100"
            ))),
        },
    }
}

/// ListAsyncInvokeConfigs: every config of the account (or one
/// function's), by function name and qualifier; nextToken names the last
/// one returned (`function/qualifier`: neither holds a `/`).
pub fn list_configs(
    gw: &Arc<Gateway>,
    caller: &Caller,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    let limit = limit_param(parts)?;
    let only = query_param(parts, "functionName").filter(|s| !s.is_empty());
    let after = query_param(parts, "nextToken").filter(|s| !s.is_empty());
    let all = gw
        .dispatcher
        .configs()
        .of_account(caller.account_id.as_str());
    // A token of an older Kiln is a bare function name: after all of it.
    let after: Option<(String, String)> = after.map(|t| match t.split_once('/') {
        Some((f, q)) => (f.to_owned(), q.to_owned()),
        None => (t, "\u{10FFFF}".to_owned()),
    });
    let mut page: Vec<_> = all
        .into_iter()
        .filter(|(f, _, _)| only.as_deref().is_none_or(|o| o == f))
        .filter(|(f, q, _)| {
            after
                .as_ref()
                .is_none_or(|(af, aq)| (f.as_str(), q.as_str()) > (af.as_str(), aq.as_str()))
        })
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    page.truncate(limit);
    let mut out = serde_json::json!({
        "configs": page.iter().map(|(f, q, c)| c.to_fc(&arn(gw, caller, f, q))).collect::<Vec<_>>(),
    });
    if more {
        if let Some((f, q, _)) = page.last() {
            out["nextToken"] = format!("{f}/{q}").into();
        }
    }
    Ok(json(StatusCode::OK, &out))
}

/// Whether the function's async invocations are async tasks (an async
/// invoke config of it, of any qualifier, has `asyncTask: true`). FC records task states only in
/// task mode; without it an invocation is not a task, so GetAsyncTask and
/// StopAsyncTask answer AsyncTaskNotFound and ListAsyncTasks lists nothing.
fn task_mode(gw: &Gateway, caller: &Caller, name: &FunctionName) -> bool {
    gw.dispatcher
        .configs()
        .task_mode(caller.account_id.as_str(), name.as_str())
}

fn no_task(task_id: &str) -> ApiError {
    FcError::new(
        FcErrorCode::AsyncTaskNotFound,
        format!("async task '{task_id}' does not exist"),
    )
    .into()
}

pub async fn get_task(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    task_id: &str,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    super::request::check_qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    if !task_mode(gw, caller, name) {
        return Err(no_task(task_id));
    }
    let t = gw
        .dispatcher
        .queue()
        .task(
            &gw.region,
            caller.account_id.as_str(),
            name.as_str(),
            task_id,
        )
        .await
        .map_err(queue_err)?
        .ok_or_else(|| no_task(task_id))?;
    Ok(json(StatusCode::OK, &t.json))
}

fn int_param(parts: &http::request::Parts, key: &str) -> Result<Option<i64>, FcError> {
    match query_param(parts, key) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(Some)
            .ok_or_else(|| {
                FcError::invalid_argument(format!("{key} {v:?} must be a non-negative integer"))
            }),
    }
}

pub async fn list_tasks(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    super::request::check_qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    let status = match query_param(parts, "status").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(TaskStatus::parse(&s).ok_or_else(|| {
            FcError::invalid_argument(format!(
                "status {s:?} must be one of {}",
                TaskStatus::ALL.map(TaskStatus::as_str).join(", ")
            ))
        })?),
    };
    let descending = match query_param(parts, "sortOrderByTime").as_deref() {
        None | Some("") | Some("asc") => false,
        Some("desc") => true,
        Some(o) => {
            return Err(FcError::invalid_argument(format!(
                "sortOrderByTime {o:?} must be asc or desc"
            ))
            .into())
        }
    };
    // The Python SDK sends Python's `True`/`False`.
    let include_payload = match query_param(parts, "includePayload")
        .map(|v| v.to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("false") => false,
        Some("true") => true,
        Some(o) => {
            return Err(FcError::invalid_argument(format!(
                "includePayload {o:?} must be true or false"
            ))
            .into())
        }
    };
    let q = TaskQuery {
        status,
        prefix: query_param(parts, "prefix").filter(|s| !s.is_empty()),
        begin_ms: int_param(parts, "startedTimeBegin")?.map(|v| v as u64),
        end_ms: int_param(parts, "startedTimeEnd")?.map(|v| v as u64),
        limit: limit_param(parts)?,
        after: int_param(parts, "nextToken")?,
        descending,
        include_payload,
    };
    if !task_mode(gw, caller, name) {
        return Ok(json(StatusCode::OK, &serde_json::json!({ "tasks": [] })));
    }
    let (tasks, next) = gw
        .dispatcher
        .queue()
        .tasks(&gw.region, caller.account_id.as_str(), name.as_str(), q)
        .await
        .map_err(queue_err)?;
    let mut out = serde_json::json!({
        "tasks": tasks.into_iter().map(|t| t.json).collect::<Vec<_>>(),
    });
    if let Some(n) = next {
        out["nextToken"] = n.into();
    }
    Ok(json(StatusCode::OK, &out))
}

pub async fn stop_task(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    task_id: &str,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    super::request::check_qualifier(parts)?;
    super::request::caller_function(gw, caller, name)?;
    if !task_mode(gw, caller, name) {
        return Err(no_task(task_id));
    }
    let d = &gw.dispatcher;
    match d
        .queue()
        .stop(&caller.account_id, name, task_id, gw.clock.now_ms())
        .await
        .map_err(queue_err)?
    {
        StopOutcome::NotFound => return Err(no_task(task_id)),
        StopOutcome::AlreadyFinished(s) => {
            return Err(FcError::invalid_argument(format!(
                "async task '{task_id}' is already {} and cannot be stopped",
                s.as_str()
            ))
            .into())
        }
        StopOutcome::Stopped => {}
        StopOutcome::Stopping { seq } => d.abort(seq),
    }
    Ok(Response::builder()
        .status(StatusCode::OK)
        .body(full(Bytes::new()))
        .expect("valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_shared_queue_is_a_retryable_503() {
        let down = QueueError::Pg(kiln_store::pg::PgStoreError::Connect {
            target: "/run/postgresql".into(),
            source: deadpool_postgres::PoolError::Closed,
        });
        let ApiError::Fc(e) = queue_err(down) else {
            panic!("not an FC error")
        };
        assert_eq!(e.code, FcErrorCode::ServiceUnavailable);
        let ApiError::Fc(e) = queue_err(QueueError::Closed) else {
            panic!("not an FC error")
        };
        assert_eq!(e.code, FcErrorCode::InternalServerError);
    }

    #[test]
    fn task_ids_follow_fcs_rule() {
        for ok in ["a", "_x", "job-1_B", &"a".repeat(128)] {
            assert!(valid_task_id(ok), "{ok}");
        }
        for bad in ["", "1abc", "-a", "a b", "a/b", &"a".repeat(129), "é"] {
            assert!(!valid_task_id(bad), "{bad}");
        }
    }

    #[test]
    fn invocation_type_is_sync_or_async() {
        let parts = |v: &str| {
            http::Request::builder()
                .header(INVOCATION_TYPE, v)
                .body(())
                .unwrap()
                .into_parts()
                .0
        };
        assert!(!is_async(&parts("Sync")).unwrap());
        assert!(is_async(&parts("Async")).unwrap());
        assert!(is_async(&parts("async")).unwrap());
        assert_eq!(
            is_async(&parts("Later")).unwrap_err().code,
            FcErrorCode::InvalidArgument
        );
    }
}
