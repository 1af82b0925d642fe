//! Copying a one-box gateway's async queue (its SQLite `queue.db`) into
//! the PostgreSQL database a cluster of gateways will share (`kiln store
//! copy`): every message with its task events (finished tasks stay
//! readable until their retention ends), the destinations outbox and the
//! async invoke configs. Message, event and outbox numbers are kept (a
//! ListAsyncTasks `nextToken` stays valid). Leases of the stopped gateway
//! are released: its running deliveries are claimable at once. A target
//! that already holds queue state is refused: copying never merges two
//! queues. All of it is one transaction.

use std::path::Path;

use kiln_store::pg::{PgDatabase, PgStoreError};
use kiln_store::{Database, StoreError};

use super::postgres::{COMPONENT, MIGRATIONS as PG_MIGRATIONS};
use super::MIGRATIONS;

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct QueueCopied {
    pub messages: usize,
    pub unfinished: usize,
    pub events: usize,
    pub outbox: usize,
    pub configs: usize,
}

impl std::fmt::Display for QueueCopied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} async messages ({} unfinished), {} task events, {} destination deliveries, \
             {} async invoke configs",
            self.messages, self.unfinished, self.events, self.outbox, self.configs
        )
    }
}

/// Why the queue was not copied.
#[derive(Debug, thiserror::Error)]
pub enum QueueCopyError {
    #[error("cannot read the gateway's queue {0}")]
    Source(String, #[source] StoreError),
    #[error("cannot write the cluster's queue")]
    Target(#[from] PgStoreError),
    #[error(
        "the target already holds async queue state ({0} messages, outbox entries or configs); \
         copy into an empty database"
    )]
    NotEmpty(i64),
}

type MessageRow = (
    i64,
    String,
    String,
    String,
    String,
    String,
    Vec<u8>,
    String,
    String,
    bool,
    (i64, i64, i64, i64, i64, Option<i64>),
    (Option<String>, Option<Vec<u8>>),
);

/// Everything the SQLite queue holds.
struct Snapshot {
    messages: Vec<MessageRow>,
    events: Vec<(i64, i64, String, i64, String)>,
    outbox: Vec<(i64, String, String, String, String, i64, i64)>,
    configs: Vec<(String, String, String, String)>,
}

fn read(path: &Path) -> Result<Snapshot, StoreError> {
    let db = Database::open(path, MIGRATIONS)?;
    db.with_conn(|c| {
        let mut st = c.prepare(
            "SELECT seq, account_id, function_name, queue, task_id, request_id, payload, headers,
                    status, done, retries, throttles, deliveries, visible_ms, created_ms, end_ms,
                    error, return_payload
             FROM messages ORDER BY seq",
        )?;
        let messages = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get::<_, i64>(9)? != 0,
                    (
                        r.get(10)?,
                        r.get(11)?,
                        r.get(12)?,
                        r.get(13)?,
                        r.get(14)?,
                        r.get(15)?,
                    ),
                    (r.get(16)?, r.get(17)?),
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut st = c.prepare(
            "SELECT event_id, seq, status, ts_ms, detail FROM task_events ORDER BY event_id",
        )?;
        let events = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut st = c.prepare(
            "SELECT id, account_id, request_id, target, record, attempts, next_ms
             FROM outbox ORDER BY id",
        )?;
        let outbox = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut st =
            c.prepare("SELECT account_id, function_name, qualifier, doc FROM async_configs")?;
        let configs = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot {
            messages,
            events,
            outbox,
            configs,
        })
    })
}

/// Copy the stopped gateway's `queue_db` into the cluster database at
/// `url` (migrating it first), releasing its leases at `now_ms`.
pub async fn copy_from_sqlite(
    queue_db: &Path,
    url: &str,
    password_file: Option<&Path>,
    now_ms: u64,
) -> Result<QueueCopied, QueueCopyError> {
    let snap =
        read(queue_db).map_err(|e| QueueCopyError::Source(queue_db.display().to_string(), e))?;
    let db = PgDatabase::open_with(url, password_file, 2, COMPONENT, PG_MIGRATIONS).await?;
    let mut conn = db.conn().await?;
    let tx = conn.transaction().await.map_err(PgStoreError::Query)?;
    let q = |e| QueueCopyError::Target(PgStoreError::Query(e));
    let there: i64 = tx
        .query_one(
            "SELECT (SELECT count(*) FROM async_messages) + (SELECT count(*) FROM async_outbox)
                  + (SELECT count(*) FROM async_configs)",
            &[],
        )
        .await
        .map_err(q)?
        .get(0);
    if there > 0 {
        return Err(QueueCopyError::NotEmpty(there));
    }
    let mut copied = QueueCopied::default();
    let insert = tx
        .prepare(
            "INSERT INTO async_messages (seq, account_id, function_name, queue, task_id,
                 request_id, payload, headers, status, done, retries, throttles, deliveries,
                 visible_ms, created_ms, end_ms, error, return_payload)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16,
                     $17, $18)",
        )
        .await
        .map_err(q)?;
    let now = now_ms as i64;
    for (seq, account, function, queue, task, request, payload, headers, status, done, n, r) in
        &snap.messages
    {
        let (retries, throttles, deliveries, visible, created, end) = n;
        // The stopped gateway's leases are over.
        let visible = if !done && (status == "Running" || status == "Stopping") {
            (*visible).min(now)
        } else {
            *visible
        };
        tx.execute(
            &insert,
            &[
                seq, account, function, queue, task, request, payload, headers, status, done,
                retries, throttles, deliveries, &visible, created, end, &r.0, &r.1,
            ],
        )
        .await
        .map_err(q)?;
        copied.messages += 1;
        copied.unfinished += usize::from(!done);
    }
    let insert = tx
        .prepare(
            "INSERT INTO async_task_events (event_id, seq, status, ts_ms, detail)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .await
        .map_err(q)?;
    for (id, seq, status, ts, detail) in &snap.events {
        tx.execute(&insert, &[id, seq, status, ts, detail])
            .await
            .map_err(q)?;
        copied.events += 1;
    }
    let insert = tx
        .prepare(
            "INSERT INTO async_outbox (id, account_id, request_id, target, record, attempts, next_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .await
        .map_err(q)?;
    for (id, account, request, target, record, attempts, next) in &snap.outbox {
        tx.execute(
            &insert,
            &[id, account, request, target, record, attempts, next],
        )
        .await
        .map_err(q)?;
        copied.outbox += 1;
    }
    for (account, function, qualifier, doc) in &snap.configs {
        tx.execute(
            "INSERT INTO async_configs (account_id, function_name, qualifier, doc)
             VALUES ($1, $2, $3, $4)",
            &[account, function, qualifier, doc],
        )
        .await
        .map_err(q)?;
        copied.configs += 1;
    }
    // New rows continue after the copied numbers.
    tx.batch_execute(
        "SELECT setval(pg_get_serial_sequence('async_messages', 'seq'),
                       coalesce((SELECT max(seq) FROM async_messages), 0) + 1, false);
         SELECT setval(pg_get_serial_sequence('async_task_events', 'event_id'),
                       coalesce((SELECT max(event_id) FROM async_task_events), 0) + 1, false);
         SELECT setval(pg_get_serial_sequence('async_outbox', 'id'),
                       coalesce((SELECT max(id) FROM async_outbox), 0) + 1, false);",
    )
    .await
    .map_err(q)?;
    tx.commit().await.map_err(q)?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::queue::test_backends::TestPg;
    use crate::queue::{AsyncConfig, Completion, NewMessage, Outbound, Queue, TaskStatus};

    fn msg(task: &str) -> NewMessage {
        NewMessage {
            account: "1".parse().unwrap(),
            function: "f".parse().unwrap(),
            queue: "1".into(),
            task_id: task.into(),
            request_id: format!("r-{task}"),
            payload: b"p".to_vec(),
            headers: vec![],
            now_ms: 1_000,
            depth_limit: None,
        }
    }

    /// A one-box queue with a finished task (and its destination record),
    /// one waiting, one leased by the stopped gateway and a config moves
    /// into PostgreSQL whole; the leased one is claimable at once, new
    /// messages get new numbers, and a second copy is refused.
    #[tokio::test]
    async fn a_one_box_queue_moves_into_the_cluster_database() {
        let Some(pg) = TestPg::start().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("queue.db");
        {
            let q = Queue::open(&path).unwrap();
            for t in ["done", "waiting", "leased"] {
                q.enqueue(msg(t)).await.unwrap();
            }
            let c = q.claim(2_000, 60_000, vec![("1".into(), 1)]).await.unwrap();
            assert_eq!(c[0].task_id, "done");
            q.complete_with(
                c[0].seq,
                c[0].delivery,
                2_500,
                Completion::Final {
                    status: TaskStatus::Succeeded,
                    error: None,
                    return_payload: Some(b"out".to_vec()),
                },
                Some(Outbound {
                    account: "1".into(),
                    request_id: "r-done".into(),
                    target: "https://hooks.example/x".into(),
                    record: "{}".into(),
                }),
            )
            .await
            .unwrap();
            q.put_config(
                &"1".parse().unwrap(),
                &"f".parse().unwrap(),
                "LATEST",
                &AsyncConfig::parse(br#"{"asyncTask":true}"#, "r", "1").unwrap(),
            )
            .await
            .unwrap();
            // Skip "waiting": lease "leased" for 10 minutes.
            let c = q
                .claim(3_000, 600_000, vec![("1".into(), 2)])
                .await
                .unwrap();
            assert_eq!(c.len(), 2);
            let waiting = c.iter().find(|c| c.task_id == "waiting").unwrap();
            q.complete(
                waiting.seq,
                waiting.delivery,
                3_100,
                Completion::Retry {
                    visible_ms: 3_100,
                    retries: 1,
                    throttles: 0,
                    detail: "again".into(),
                },
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let copied = copy_from_sqlite(&path, &pg.url, None, 5_000).await.unwrap();
        assert_eq!(
            copied,
            QueueCopied {
                messages: 3,
                unfinished: 2,
                events: 5,
                outbox: 1,
                configs: 1,
            },
            "{copied}"
        );
        let q = pg.queue("gw-a");
        let done = q.task("r", "1", "f", "done").await.unwrap().unwrap().json;
        assert_eq!(done["status"], "Succeeded");
        assert_eq!(done["returnPayload"], "out");
        assert_eq!(done["events"].as_array().unwrap().len(), 3);
        assert_eq!(q.configs().await.unwrap().len(), 1);
        assert_eq!(q.outbox_due(5_000, 10).await.unwrap().len(), 1);
        // The stopped gateway's lease is over: both unfinished are claimable.
        let mut claimed: Vec<String> = q
            .claim(5_000, 60_000, vec![("1".into(), 10)])
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.task_id)
            .collect();
        claimed.sort();
        assert_eq!(claimed, ["leased", "waiting"]);
        q.enqueue(msg("new")).await.unwrap();
        let new = q.task("r", "1", "f", "new").await.unwrap().unwrap();
        assert!(new.seq > 3, "numbers continue after the copied ones");
        let again = copy_from_sqlite(&path, &pg.url, None, 6_000).await;
        assert!(
            matches!(again, Err(QueueCopyError::NotEmpty(_))),
            "{again:?}"
        );
    }
}
