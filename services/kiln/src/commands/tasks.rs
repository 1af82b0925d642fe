//! `kiln invoke --async` and `kiln tasks list|get|stop`: FC's async
//! invocation and async task calls.

use anyhow::Result;
use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::client::{FcClient, API_VERSION};

/// Enqueue an async invocation; prints the request and task ids.
pub async fn invoke_async(
    client: &FcClient,
    name: &str,
    qualifier: Option<&str>,
    payload: Bytes,
    task_id: Option<&str>,
) -> Result<()> {
    let mut headers = vec![("x-fc-invocation-type", "Async")];
    if let Some(t) = task_id {
        headers.push(("x-fc-async-task-id", t));
    }
    let resp = client
        .invoke_qualified(name, qualifier, payload, &headers)
        .await?
        .error_for_status()?;
    println!(
        "accepted: request {} task {}",
        resp.header("x-fc-request-id").unwrap_or("?"),
        resp.header("x-fc-async-task-id").unwrap_or("?")
    );
    Ok(())
}

fn tasks_path(function: &str) -> String {
    format!("/{API_VERSION}/functions/{function}/async-tasks")
}

/// ListAsyncTasks' filters.
#[derive(Debug, Default, Clone)]
pub struct ListOptions {
    pub status: Option<String>,
    pub prefix: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub limit: Option<u32>,
    pub descending: bool,
}

/// Every task matching `o` (following nextToken), up to `o.limit` if set.
pub async fn list(client: &FcClient, function: &str, o: &ListOptions) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    let want = o.limit.map(|l| l as usize);
    let (since, until) = (
        o.since_ms.map(|v| v.to_string()),
        o.until_ms.map(|v| v.to_string()),
    );
    loop {
        let page_limit = want
            .map(|w| (w - all.len()).min(100))
            .unwrap_or(100)
            .to_string();
        let mut q: Vec<(&str, &str)> = vec![("limit", &page_limit)];
        if let Some(s) = &o.status {
            q.push(("status", s));
        }
        if let Some(p) = &o.prefix {
            q.push(("prefix", p));
        }
        if let Some(s) = &since {
            q.push(("startedTimeBegin", s));
        }
        if let Some(u) = &until {
            q.push(("startedTimeEnd", u));
        }
        if o.descending {
            q.push(("sortOrderByTime", "desc"));
        }
        if let Some(t) = &token {
            q.push(("nextToken", t));
        }
        let page = client
            .request(Method::GET, &tasks_path(function), &q, &[], Bytes::new())
            .await?
            .error_for_status()?
            .json()?;
        if let Some(items) = page.get("tasks").and_then(Value::as_array) {
            all.extend(items.iter().cloned());
        }
        if want.is_some_and(|w| all.len() >= w) {
            return Ok(all);
        }
        match page.get("nextToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => return Ok(all),
        }
    }
}

pub async fn get(client: &FcClient, function: &str, task: &str) -> Result<Value> {
    Ok(client
        .request(
            Method::GET,
            &format!("{}/{task}", tasks_path(function)),
            &[],
            &[],
            Bytes::new(),
        )
        .await?
        .error_for_status()?
        .json()?)
}

pub async fn stop(client: &FcClient, function: &str, task: &str) -> Result<()> {
    client
        .request(
            Method::PUT,
            &format!("{}/{task}/stop", tasks_path(function)),
            &[],
            &[],
            Bytes::new(),
        )
        .await?
        .error_for_status()?;
    Ok(())
}

/// One line per task.
pub fn table(tasks: &[Value]) -> String {
    let mut out = format!(
        "{:<40} {:<10} {:>7} {:>10} {:<36}\n",
        "TASK", "STATUS", "RETRIES", "DURATION", "REQUEST"
    );
    for t in tasks {
        let s = |k: &str| match t.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "-".into(),
            Some(v) => v.to_string(),
        };
        let duration = t
            .get("durationMs")
            .and_then(Value::as_u64)
            .map_or("-".to_owned(), |ms| format!("{ms}ms"));
        out.push_str(&format!(
            "{:<40} {:<10} {:>7} {:>10} {:<36}\n",
            s("taskId"),
            s("status"),
            s("alreadyRetriedTimes"),
            duration,
            s("requestId")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shows_each_task() {
        let tasks = vec![
            serde_json::json!({"taskId": "job-1", "status": "Succeeded", "alreadyRetriedTimes": 0,
                               "durationMs": 12, "requestId": "r1"}),
            serde_json::json!({"taskId": "job-2", "status": "Enqueued", "alreadyRetriedTimes": 0,
                               "requestId": "r2"}),
        ];
        let t = table(&tasks);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[1].starts_with("job-1")
                && lines[1].contains("Succeeded")
                && lines[1].contains("12ms")
        );
        assert!(lines[2].contains("Enqueued") && lines[2].contains(" - "));
    }
}
