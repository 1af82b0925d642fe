//! Reading async tasks back (GetAsyncTask, ListAsyncTasks): a task is its
//! message row plus its events, read from either backend and shaped here.

use rusqlite::{params, OptionalExtension};
use serde_json::{json, Value};

use super::postgres::EventRow;
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

/// A message row as stored.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub seq: i64,
    pub account: String,
    pub function: String,
    pub task_id: String,
    pub request_id: String,
    pub payload: Vec<u8>,
    pub status: String,
    pub retries: i64,
    pub created_ms: i64,
    pub end_ms: Option<i64>,
    pub error: Option<String>,
    pub return_payload: Option<Vec<u8>>,
    pub headers: String,
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

fn sqlite_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TaskRow> {
    Ok(TaskRow {
        seq: r.get(0)?,
        account: r.get(1)?,
        function: r.get(2)?,
        task_id: r.get(3)?,
        request_id: r.get(4)?,
        payload: r.get(5)?,
        status: r.get(6)?,
        retries: r.get(7)?,
        created_ms: r.get(8)?,
        end_ms: r.get(9)?,
        error: r.get(10)?,
        return_payload: r.get(11)?,
        headers: r.get(12)?,
    })
}

/// The task's JSON with its history: Enqueued (event 0, from the row's
/// created_ms), then every recorded transition.
fn view(r: TaskRow, events: Vec<EventRow>, region: &str, payload: bool) -> TaskView {
    let created = r.created_ms;
    let mut v = json!({
        "taskId": r.task_id,
        "requestId": r.request_id,
        "status": r.status,
        "alreadyRetriedTimes": r.retries,
        "startedTime": created,
        "functionArn": format!("acs:fc:{region}:{}:functions/{}", r.account, r.function),
        "qualifier": qualifier(&r.headers),
    });
    if let Some(end) = r.end_ms {
        v["endTime"] = end.into();
        v["durationMs"] = (end - created).max(0).into();
    }
    if let Some(e) = r.error {
        v["taskErrorMessage"] = e.into();
    }
    if let Some(p) = r.return_payload {
        v["returnPayload"] = String::from_utf8_lossy(&p).into_owned().into();
    }
    if payload {
        v["taskPayload"] = String::from_utf8_lossy(&r.payload).into_owned().into();
    }
    let enqueued = json!({
        "eventId": 0,
        "status": TaskStatus::Enqueued.as_str(),
        "timestamp": created,
        "eventDetail": "",
    });
    let events = std::iter::once(enqueued)
        .chain(events.into_iter().map(|e| {
            json!({
                "eventId": e.event_id,
                "status": e.status,
                "timestamp": e.ts_ms,
                "eventDetail": e.detail,
            })
        }))
        .collect();
    v["events"] = Value::Array(events);
    TaskView {
        seq: r.seq,
        json: v,
    }
}

fn sqlite_events(c: &rusqlite::Connection, seq: i64) -> rusqlite::Result<Vec<EventRow>> {
    let mut st = c.prepare_cached(
        "SELECT event_id, status, ts_ms, detail FROM task_events WHERE seq = ?1 ORDER BY event_id",
    )?;
    let rows = st.query_map([seq], |r| {
        Ok(EventRow {
            event_id: r.get(0)?,
            status: r.get(1)?,
            ts_ms: r.get(2)?,
            detail: r.get(3)?,
        })
    })?;
    rows.collect()
}

/// One page of rows and the next page's token.
fn page(mut rows: Vec<TaskView>, limit: usize) -> (Vec<TaskView>, Option<String>) {
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|t| t.seq.to_string())
    } else {
        None
    };
    (rows, next)
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
        let rows = match self.sqlite() {
            None => {
                let p = self.shared().expect("one backend");
                p.task_rows(account, function, Some(task_id), &TaskQuery::default())
                    .await?
            }
            Some(s) => {
                let (a, f, t) = (account.to_owned(), function.to_owned(), task_id.to_owned());
                s.db()
                    .run(move |c| {
                        let row = c
                            .query_row(
                                &format!(
                                    "SELECT {COLUMNS} FROM messages
                                     WHERE account_id = ?1 AND function_name = ?2 AND task_id = ?3"
                                ),
                                params![a, f, t],
                                sqlite_row,
                            )
                            .optional()?;
                        let Some(row) = row else {
                            return Ok(Vec::new());
                        };
                        let ev = sqlite_events(c, row.seq)?;
                        Ok(vec![(row, ev)])
                    })
                    .await?
            }
        };
        Ok(rows
            .into_iter()
            .next()
            .map(|(r, ev)| view(r, ev, region, true)))
    }

    /// ListAsyncTasks: one page and the next page's token.
    pub async fn tasks(
        &self,
        region: &str,
        account: &str,
        function: &str,
        q: TaskQuery,
    ) -> Result<(Vec<TaskView>, Option<String>), QueueError> {
        let rows = match self.sqlite() {
            None => {
                let p = self.shared().expect("one backend");
                p.task_rows(account, function, None, &q).await?
            }
            Some(s) => {
                let (a, f, q) = (account.to_owned(), function.to_owned(), q.clone());
                s.db()
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
                            sqlite_row,
                        )?;
                        let rows = rows.collect::<Result<Vec<_>, _>>()?;
                        let mut out = Vec::with_capacity(rows.len());
                        // Only the page's rows need their events.
                        for (i, r) in rows.into_iter().enumerate() {
                            let ev = if i < q.limit {
                                sqlite_events(c, r.seq)?
                            } else {
                                Vec::new()
                            };
                            out.push((r, ev));
                        }
                        Ok(out)
                    })
                    .await?
            }
        };
        let views = rows
            .into_iter()
            .map(|(r, ev)| view(r, ev, region, q.include_payload))
            .collect();
        Ok(page(views, q.limit))
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

    crate::queue::test_backends::on_both!(get_and_list_with_filters_and_pages, get_and_list);

    async fn get_and_list(q: Queue) {
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
        let at: Vec<u64> = t["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["timestamp"].as_u64().unwrap())
            .collect();
        assert_eq!(at, [1_000, 10_000, 10_500], "enqueued, claimed, completed");
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
