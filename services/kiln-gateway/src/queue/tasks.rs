//! Reading async tasks back (GetAsyncTask, ListAsyncTasks): a task is its
//! message row plus its events.

use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};

use super::{Queue, QueueError, TaskStatus};

/// ListAsyncTasks' filters, already validated.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub prefix: Option<String>,
    /// Enqueue time range, inclusive, in ms.
    pub begin_ms: Option<u64>,
    pub end_ms: Option<u64>,
    pub limit: usize,
    /// The `nextToken` of the previous page.
    pub after: Option<i64>,
    pub descending: bool,
    pub include_payload: bool,
}

/// One task as FC's AsyncTask model (camelCase keys, times in ms).
#[derive(Debug, Clone)]
pub struct TaskView {
    pub seq: i64,
    pub json: Value,
}

const COLUMNS: &str = "seq, account_id, function_name, task_id, request_id, payload, status,
    retries, created_ms, end_ms, error, return_payload, headers";

/// The qualifier the call was enqueued with (a version or an alias, kept
/// among its stored headers), else LATEST.
fn qualifier(headers: &str) -> String {
    serde_json::from_str::<Vec<(String, String)>>(headers)
        .ok()
        .and_then(|h| {
            h.into_iter()
                .find(|(k, _)| k == super::QUALIFIER_HEADER)
                .map(|(_, v)| v)
        })
        .unwrap_or_else(|| crate::versions::LATEST.to_owned())
}

fn row_json(r: &rusqlite::Row<'_>, region: &str, payload: bool) -> rusqlite::Result<(i64, Value)> {
    let seq: i64 = r.get(0)?;
    let account: String = r.get(1)?;
    let function: String = r.get(2)?;
    let created: i64 = r.get(8)?;
    let end: Option<i64> = r.get(9)?;
    let mut v = json!({
        "taskId": r.get::<_, String>(3)?,
        "requestId": r.get::<_, String>(4)?,
        "status": r.get::<_, String>(6)?,
        "alreadyRetriedTimes": r.get::<_, i64>(7)?,
        "startedTime": created,
        "functionArn": format!("acs:fc:{region}:{account}:functions/{function}"),
        "qualifier": qualifier(&r.get::<_, String>(12)?),
    });
    if let Some(end) = end {
        v["endTime"] = end.into();
        v["durationMs"] = (end - created).max(0).into();
    }
    if let Some(e) = r.get::<_, Option<String>>(10)? {
        v["taskErrorMessage"] = e.into();
    }
    if let Some(p) = r.get::<_, Option<Vec<u8>>>(11)? {
        v["returnPayload"] = String::from_utf8_lossy(&p).into_owned().into();
    }
    if payload {
        v["taskPayload"] = String::from_utf8_lossy(&r.get::<_, Vec<u8>>(5)?)
            .into_owned()
            .into();
    }
    Ok((seq, v))
}

/// A task's history: Enqueued (event 0, from the row's created_ms), then
/// every recorded transition.
fn events(c: &rusqlite::Connection, seq: i64, created_ms: i64) -> rusqlite::Result<Vec<Value>> {
    let enqueued = json!({
        "eventId": 0,
        "status": TaskStatus::Enqueued.as_str(),
        "timestamp": created_ms,
        "eventDetail": "",
    });
    let mut st = c.prepare_cached(
        "SELECT event_id, status, ts_ms, detail FROM task_events WHERE seq = ?1 ORDER BY event_id",
    )?;
    let rows = st.query_map([seq], |r| {
        Ok(json!({
            "eventId": r.get::<_, i64>(0)?,
            "status": r.get::<_, String>(1)?,
            "timestamp": r.get::<_, i64>(2)?,
            "eventDetail": r.get::<_, String>(3)?,
        }))
    })?;
    std::iter::once(Ok(enqueued)).chain(rows).collect()
}

impl Queue {
    /// GetAsyncTask: the task with its events, or None.
    pub async fn task(
        &self,
        region: &str,
        account: &str,
        function: &str,
        task_id: &str,
    ) -> Result<Option<TaskView>, QueueError> {
        let (region, a, f, t) = (
            region.to_owned(),
            account.to_owned(),
            function.to_owned(),
            task_id.to_owned(),
        );
        Ok(self
            .db()
            .run(move |c| {
                let row = c
                    .query_row(
                        &format!(
                            "SELECT {COLUMNS} FROM messages
                             WHERE account_id = ?1 AND function_name = ?2 AND task_id = ?3"
                        ),
                        params![a, f, t],
                        |r| row_json(r, &region, true),
                    )
                    .optional()?;
                let Some((seq, mut json)) = row else {
                    return Ok(None);
                };
                let created = json["startedTime"].as_i64().unwrap_or(0);
                json["events"] = Value::Array(events(c, seq, created)?);
                Ok(Some(TaskView { seq, json }))
            })
            .await?)
    }

    /// ListAsyncTasks: one page and the next page's token.
    pub async fn tasks(
        &self,
        region: &str,
        account: &str,
        function: &str,
        q: TaskQuery,
    ) -> Result<(Vec<TaskView>, Option<String>), QueueError> {
        let (region, a, f) = (region.to_owned(), account.to_owned(), function.to_owned());
        Ok(self
            .db()
            .run(move |c| {
                let order = if q.descending { "DESC" } else { "ASC" };
                let cmp = if q.descending { "<" } else { ">" };
                let sql = format!(
                    "SELECT {COLUMNS} FROM messages
                     WHERE account_id = ?1 AND function_name = ?2
                       AND (?3 IS NULL OR status = ?3)
                       AND (?4 IS NULL OR substr(task_id, 1, length(?4)) = ?4)
                       AND (?5 IS NULL OR created_ms >= ?5)
                       AND (?6 IS NULL OR created_ms <= ?6)
                       AND (?7 IS NULL OR seq {cmp} ?7)
                     ORDER BY seq {order} LIMIT ?8"
                );
                let mut st = c.prepare(&sql)?;
                let rows = st.query_map(
                    params![
                        a,
                        f,
                        q.status.map(TaskStatus::as_str),
                        q.prefix,
                        q.begin_ms.map(|v| v as i64),
                        q.end_ms.map(|v| v as i64),
                        q.after,
                        (q.limit + 1) as i64
                    ],
                    |r| row_json(r, &region, q.include_payload),
                )?;
                let mut page = rows.collect::<Result<Vec<_>, _>>()?;
                let more = page.len() > q.limit;
                page.truncate(q.limit);
                let next = if more {
                    page.last().map(|(s, _)| s.to_string())
                } else {
                    None
                };
                let mut out = Vec::with_capacity(page.len());
                for (seq, mut json) in page {
                    let created = json["startedTime"].as_i64().unwrap_or(0);
                    json["events"] = Value::Array(events(c, seq, created)?);
                    out.push(TaskView { seq, json });
                }
                Ok((out, next))
            })
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Completion, NewMessage};

    fn msg(task: &str, now_ms: u64) -> NewMessage {
        NewMessage {
            account: "1".parse().unwrap(),
            function: "f".parse().unwrap(),
            queue: "1".into(),
            task_id: task.into(),
            request_id: format!("r-{task}"),
            payload: b"p".to_vec(),
            headers: vec![],
            now_ms,
            depth_limit: None,
        }
    }

    #[tokio::test]
    async fn get_and_list_with_filters_and_pages() {
        let q = Queue::open_in_memory().unwrap();
        for (i, t) in ["job-1", "job-2", "other-3", "job-4", "job-5"]
            .iter()
            .enumerate()
        {
            q.enqueue(msg(t, 1000 * (i as u64 + 1))).await.unwrap();
        }
        let c = q.claim(10_000, 1000, vec![("1".into(), 1)]).await.unwrap();
        q.complete(
            c[0].seq,
            c[0].delivery,
            10_500,
            Completion::Final {
                status: TaskStatus::Succeeded,
                error: None,
                return_payload: Some(b"out".to_vec()),
            },
        )
        .await
        .unwrap();
        let t = q.task("r", "1", "f", "job-1").await.unwrap().unwrap().json;
        assert_eq!(t["status"], "Succeeded");
        assert_eq!(t["returnPayload"], "out");
        assert_eq!(t["taskPayload"], "p");
        assert_eq!(t["durationMs"], 9_500);
        let ev: Vec<&str> = t["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["status"].as_str().unwrap())
            .collect();
        assert_eq!(ev, ["Enqueued", "Running", "Succeeded"]);
        assert!(q.task("r", "1", "f", "nope").await.unwrap().is_none());
        assert!(q.task("r", "2", "f", "job-1").await.unwrap().is_none());

        let ids = |v: &[TaskView]| -> Vec<String> {
            v.iter()
                .map(|t| t.json["taskId"].as_str().unwrap().to_owned())
                .collect()
        };
        let base = TaskQuery {
            limit: 2,
            prefix: Some("job-".into()),
            ..Default::default()
        };
        let (p1, next) = q.tasks("r", "1", "f", base.clone()).await.unwrap();
        assert_eq!(ids(&p1), ["job-1", "job-2"]);
        assert!(p1[0].json.get("taskPayload").is_none());
        let after = next.unwrap().parse().ok();
        let (p2, next) = q
            .tasks(
                "r",
                "1",
                "f",
                TaskQuery {
                    after,
                    ..base.clone()
                },
            )
            .await
            .unwrap();
        assert_eq!(ids(&p2), ["job-4", "job-5"]);
        assert!(next.is_none());
        let (d, _) = q
            .tasks(
                "r",
                "1",
                "f",
                TaskQuery {
                    descending: true,
                    limit: 10,
                    ..base.clone()
                },
            )
            .await
            .unwrap();
        assert_eq!(ids(&d), ["job-5", "job-4", "job-2", "job-1"]);
        let (s, _) = q
            .tasks(
                "r",
                "1",
                "f",
                TaskQuery {
                    status: Some(TaskStatus::Enqueued),
                    begin_ms: Some(2_000),
                    end_ms: Some(4_000),
                    limit: 10,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(ids(&s), ["job-2", "other-3", "job-4"]);
    }
}
