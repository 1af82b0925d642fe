//! GetFunctionLogs (Kiln extension, in FC's style):
//! `GET /2023-03-30/functions/{functionName}/logs?requestId=&since=&limit=&follow=&waitSeconds=`.
//!
//! Logs live on the nodes that produced them (see the agent's `logs.rs`);
//! this asks every node the scheduler knows and merges the answers by time.
//! Without `since` the answer is the last `limit` lines; with it, the first
//! `limit` lines at or after it. `follow=true` long-polls: when nothing
//! matches yet, the gateway asks again every half second for up to
//! `waitSeconds` (default 20, at most 30). A client following the log
//! passes the last line's `timestamp` as `since` and skips the `id`s it has
//! already seen at that millisecond.

use std::sync::Arc;
use std::time::Duration;

use super::respond::{json, Body};
use http::{Response, StatusCode};
use kiln_core::{FcError, FunctionName};
use kiln_internal_api::LogRecord;
use serde::Serialize;

use super::error::ApiError;
use super::request::query_param;
use crate::auth::Caller;
use crate::gateway::Gateway;

const LIMIT_DEFAULT: usize = 1000;
const LIMIT_MAX: usize = 10_000;
const WAIT_DEFAULT_S: u64 = 20;
const WAIT_MAX_S: u64 = 30;
const FOLLOW_POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LogLine {
    id: String,
    timestamp: u64,
    instance_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    message: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct LogsOutput {
    logs: Vec<LogLine>,
}

/// The query, checked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LogsQuery {
    pub request_id: Option<String>,
    pub since: Option<u64>,
    pub limit: usize,
    pub follow: bool,
    pub wait: Duration,
}

pub fn parse_query(parts: &http::request::Parts) -> Result<LogsQuery, FcError> {
    let number = |key: &str| -> Result<Option<u64>, FcError> {
        query_param(parts, key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    FcError::invalid_argument(format!("{key} must be a non-negative integer"))
                })
            })
            .transpose()
    };
    let limit = number("limit")?.unwrap_or(LIMIT_DEFAULT as u64);
    if limit == 0 || limit > LIMIT_MAX as u64 {
        return Err(FcError::invalid_argument(format!(
            "limit must be between 1 and {LIMIT_MAX}"
        )));
    }
    let wait = number("waitSeconds")?.unwrap_or(WAIT_DEFAULT_S);
    if wait > WAIT_MAX_S {
        return Err(FcError::invalid_argument(format!(
            "waitSeconds must be at most {WAIT_MAX_S}"
        )));
    }
    let follow = match query_param(parts, "follow").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(FcError::invalid_argument(format!(
                "follow must be true or false, not {other:?}"
            )))
        }
    };
    let request_id = query_param(parts, "requestId").filter(|r| !r.is_empty());
    if let Some(r) = &request_id {
        if r.len() > 128 {
            return Err(FcError::invalid_argument("requestId is too long"));
        }
    }
    Ok(LogsQuery {
        request_id,
        since: number("since")?,
        limit: limit as usize,
        follow,
        wait: Duration::from_secs(wait),
    })
}

pub async fn get(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    parts: &http::request::Parts,
) -> Result<Response<Body>, ApiError> {
    super::request::caller_function(gw, caller, name)?;
    let q = parse_query(parts)?;
    let deadline = tokio::time::Instant::now() + q.wait;
    loop {
        let records = collect(gw, caller, name, &q).await?;
        if !records.is_empty() || !q.follow || tokio::time::Instant::now() >= deadline {
            let logs = records
                .into_iter()
                .map(|r| LogLine {
                    id: r.id,
                    timestamp: r.timestamp_ms,
                    instance_id: r.instance_id.to_string(),
                    request_id: r.request_id,
                    message: r.message,
                })
                .collect();
            return Ok(json(StatusCode::OK, &LogsOutput { logs }));
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

/// Every node's matching lines, merged by time, cut to the limit.
async fn collect(
    gw: &Arc<Gateway>,
    caller: &Caller,
    name: &FunctionName,
    q: &LogsQuery,
) -> Result<Vec<LogRecord>, ApiError> {
    let nodes = gw.scheduler.nodes().await?;
    let mut query = format!("accountId={}&functionName={}", caller.account_id, name);
    if let Some(r) = &q.request_id {
        query.push_str("&requestId=");
        query.push_str(
            &percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
    }
    if let Some(s) = q.since {
        query.push_str(&format!("&since={s}&limit={}", q.limit));
    }
    let asks = nodes.iter().map(|n| {
        let query = &query;
        async move { (&n.agent_url, gw.agents.logs(&n.agent_url, query).await) }
    });
    let mut all = Vec::new();
    for (url, answer) in futures_util::future::join_all(asks).await {
        match answer {
            Ok(r) => all.extend(r.records),
            // A node that does not answer leaves a gap, not an error.
            Err(e) => tracing::warn!(agent = %url, error = %e, "node did not answer for logs"),
        }
    }
    all.sort_by(|a, b| (a.timestamp_ms, &a.id).cmp(&(b.timestamp_ms, &b.id)));
    if q.since.is_some() {
        all.truncate(q.limit);
    } else if all.len() > q.limit {
        all.drain(..all.len() - q.limit);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(query: &str) -> http::request::Parts {
        http::Request::get(format!("/2023-03-30/functions/f/logs?{query}"))
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn queries_are_checked() {
        let q = parse_query(&parts("requestId=r-1&since=5&limit=10&follow=true")).unwrap();
        assert_eq!(
            q,
            LogsQuery {
                request_id: Some("r-1".into()),
                since: Some(5),
                limit: 10,
                follow: true,
                wait: Duration::from_secs(WAIT_DEFAULT_S),
            }
        );
        for bad in [
            "limit=0",
            "limit=10001",
            "since=-1",
            "since=x",
            "follow=yes",
            "waitSeconds=31",
        ] {
            let e = parse_query(&parts(bad)).unwrap_err();
            assert_eq!(e.code, kiln_core::FcErrorCode::InvalidArgument, "{bad}");
        }
    }
}
