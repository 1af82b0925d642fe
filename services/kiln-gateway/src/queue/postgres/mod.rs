//! The queue on PostgreSQL: one queue shared by every gateway of a cluster
//! (component `gateway-queue` of the schema).
//!
//! - Writes are group-committed as on SQLite: a writer task takes every
//!   operation waiting, applies them in one transaction (the batch's
//!   enqueues in one `INSERT ... SELECT FROM unnest(...)`) and answers
//!   each caller after it commits (a 202 only after commit). A gateway
//!   runs [`WRITERS`] of them, so the next batch is written while one
//!   waits for its commit's flush. If a batch fails, each operation is
//!   retried alone, so one bad operation fails only its own caller.
//! - Claims run in their own transaction with `SELECT ... FOR UPDATE SKIP
//!   LOCKED`: any number of gateways dispatch from one queue, each message
//!   to one of them. The lease is the `visible_ms` column (as on SQLite)
//!   and `owner` names the gateway holding it; a live gateway renews the
//!   leases of its running calls (`DispatchSettings::renew_every`). A
//!   gateway killed mid-flight loses nothing: its leases run out and
//!   another gateway claims the messages. At start a gateway only
//!   releases the leases its own previous incarnation held (same owner),
//!   never another's.
//! - Completions are fenced by the delivery number, under the row's lock.
//! - A stop through any gateway marks the task Stopping and notifies
//!   (`NOTIFY kiln_queue 'stop:<seq>'`): the gateway running it aborts the
//!   call; a dispatcher also re-reads its running tasks every
//!   [`RESYNC_EVERY`] in case a notification was missed.
//! - New messages notify their queue (`enq:<queue>`) so an idle gateway
//!   claims them at once; config changes notify `cfg`. The listener
//!   reconnects on its own and asks for a full resync after a reconnect.
//! - An account's depth bound is checked against the count of its
//!   unfinished messages in the database, read at most every
//!   [`DEPTH_CACHE`] per account and advanced by this gateway's own
//!   writes in between: gateways together may overshoot a bound by what
//!   the others accepted within that interval.
//! - A timer tick is claimed in `timer_ticks` in the transaction that
//!   enqueues it: each tick fires once in the cluster.

mod nonces;
mod schema;
mod write;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_core::{AccountId, FunctionName};
use kiln_store::pg::{PgDatabase, PgStoreError};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use super::metrics::{Event, QueueMetrics, Tally};
use super::tasks::{TaskQuery, TaskRow};
use super::{
    Claimed, Completion, Enqueued, NewMessage, Outbound, OutboxEntry, QueueError, StopOutcome,
    TaskStatus,
};

pub use nonces::PgNonces;
pub use schema::MIGRATIONS;
use write::{finish, writer, DepthCache, Op, WriterCtx};

/// Lease claimed messages (`$1` seqs, `$2` their delivery numbers) until
/// `$3` to owner `$4`, and record each one's `$5` (Running) event at `$6`.
const LEASE_MANY: &str = "
    WITH leased AS (
        UPDATE async_messages m SET status = $5, deliveries = u.d, visible_ms = $3, owner = $4
        FROM unnest($1::bigint[], $2::bigint[]) AS u(s, d)
        WHERE m.seq = u.s
        RETURNING m.seq
    )
    INSERT INTO async_task_events (seq, status, ts_ms, detail)
    SELECT seq, $5, $6, '' FROM leased";

/// The component name in `kiln_schema`.
pub const COMPONENT: &str = "gateway-queue";
/// The channel every gateway listens on.
pub const CHANNEL: &str = "kiln_queue";
/// How long one account's unfinished count is trusted before it is read
/// again from the database.
pub const DEPTH_CACHE: Duration = Duration::from_secs(1);
/// How often a dispatcher re-reads what notifications tell it (queues with
/// work, stops of its running tasks, configs), in case one was missed.
pub const RESYNC_EVERY: Duration = Duration::from_secs(2);
/// How long a gateway holds a destination delivery it took from the
/// outbox before another gateway may take it.
const OUTBOX_LEASE_MS: u64 = 120_000;
/// The most operations one transaction applies.
const BATCH_MAX: usize = 1024;
/// Writer transactions one gateway runs at once: while one waits for its
/// commit to be flushed, the next batch is written.
const WRITERS: usize = 4;

/// What another gateway (or this one) changed, from the notifications.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// A message was enqueued into this queue.
    Enqueued(String),
    /// StopAsyncTask on this message.
    Stop(i64),
    /// An async invoke config changed.
    Configs,
    /// Notifications may have been missed (the listener reconnected):
    /// re-read everything.
    Resync,
}

/// A timer tick to claim with its message.
#[derive(Debug, Clone)]
pub struct TickKey {
    pub account: String,
    pub function: String,
    pub trigger: String,
    pub tick_ms: u64,
}

#[derive(Clone)]
pub struct PgQueue {
    db: PgDatabase,
    tx: mpsc::UnboundedSender<Op>,
    /// This gateway in `owner` columns (stable across its restarts).
    owner: Arc<str>,
    batches: Arc<AtomicU64>,
    metrics: Arc<QueueMetrics>,
    signals: Arc<Mutex<Option<mpsc::UnboundedReceiver<Signal>>>>,
    signal_tx: mpsc::UnboundedSender<Signal>,
}

fn q(e: tokio_postgres::Error) -> QueueError {
    QueueError::Pg(PgStoreError::Query(e))
}

impl PgQueue {
    /// Start the writer task on `db` (already migrated with
    /// [`MIGRATIONS`]). `owner` names this gateway in leases; it must be
    /// the same across its restarts and differ between gateways.
    pub fn new(db: PgDatabase, owner: &str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let batches = Arc::new(AtomicU64::new(0));
        let metrics = QueueMetrics::new();
        let me = Self {
            db,
            tx,
            owner: owner.into(),
            batches,
            metrics,
            signals: Arc::new(Mutex::new(Some(signal_rx))),
            signal_tx,
        };
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let depths = Arc::new(Mutex::new(DepthCache::default()));
        for _ in 0..WRITERS {
            tokio::spawn(writer(me.clone_for_writer(), rx.clone(), depths.clone()));
        }
        me
    }

    /// What the writer needs (not the sender: the writer ends when every
    /// [`PgQueue`] is dropped).
    fn clone_for_writer(&self) -> WriterCtx {
        WriterCtx {
            db: self.db.clone(),
            batches: self.batches.clone(),
            metrics: self.metrics.clone(),
        }
    }

    pub fn db(&self) -> &PgDatabase {
        &self.db
    }

    pub fn metrics(&self) -> &Arc<QueueMetrics> {
        &self.metrics
    }

    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// The notifications' receiver, once (the dispatcher takes it).
    pub fn take_signals(&self) -> Option<mpsc::UnboundedReceiver<Signal>> {
        self.signals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Where the listener delivers notifications.
    pub fn signal_sender(&self) -> mpsc::UnboundedSender<Signal> {
        self.signal_tx.clone()
    }

    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, QueueError>>) -> Op,
    ) -> Result<T, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(op(reply)).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    pub async fn enqueue(&self, m: NewMessage) -> Result<Enqueued, QueueError> {
        let r = self
            .call(|reply| Op::Enqueue {
                m,
                tick: None,
                reply,
            })
            .await?;
        Ok(r.expect("an enqueue without a tick always answers"))
    }

    /// Claim `tick` and enqueue `m` in one transaction; `None` when the
    /// tick was already claimed (by any gateway): nothing enqueued.
    pub async fn enqueue_tick(
        &self,
        m: NewMessage,
        tick: TickKey,
    ) -> Result<Option<Enqueued>, QueueError> {
        self.call(|reply| Op::Enqueue {
            m,
            tick: Some(tick),
            reply,
        })
        .await
    }

    pub async fn complete_with(
        &self,
        seq: i64,
        delivery: i64,
        now_ms: u64,
        completion: Completion,
        outbound: Option<Outbound>,
    ) -> Result<Option<TaskStatus>, QueueError> {
        self.call(|reply| Op::Complete {
            seq,
            delivery,
            now_ms,
            completion,
            outbound,
            reply,
        })
        .await
    }

    pub async fn stop(
        &self,
        account: &AccountId,
        function: &FunctionName,
        task_id: &str,
        now_ms: u64,
    ) -> Result<StopOutcome, QueueError> {
        let (account, function, task_id) = (
            account.as_str().to_owned(),
            function.as_str().to_owned(),
            task_id.to_owned(),
        );
        self.call(|reply| Op::Stop {
            account,
            function,
            task_id,
            now_ms,
            reply,
        })
        .await
    }

    pub async fn extend(&self, seq: i64, delivery: i64, until_ms: u64) -> Result<bool, QueueError> {
        self.call(|reply| Op::Extend {
            seq,
            delivery,
            until_ms,
            reply,
        })
        .await
    }

    /// Lease up to `n` visible messages of each named queue, oldest
    /// first, skipping rows another gateway is claiming.
    pub async fn claim(
        &self,
        now_ms: u64,
        lease_ms: u64,
        wants: Vec<(String, usize)>,
    ) -> Result<Vec<Claimed>, QueueError> {
        let mut conn = self.db.conn().await?;
        let tx = conn.transaction().await.map_err(q)?;
        let select = tx
            .prepare_cached(
                "SELECT seq, deliveries, account_id, function_name, task_id, request_id, payload,
                        headers, created_ms, retries, throttles, status, visible_ms
                 FROM async_messages WHERE queue = $1 AND NOT done AND visible_ms <= $2
                 ORDER BY visible_ms, seq LIMIT $3 FOR UPDATE SKIP LOCKED",
            )
            .await
            .map_err(q)?;
        let mut tally = Tally::default();
        let mut out = Vec::new();
        let now = now_ms as i64;
        let until = (now_ms + lease_ms) as i64;
        for (queue, n) in wants {
            let rows = tx
                .query(&select, &[&queue, &now, &(n as i64)])
                .await
                .map_err(q)?;
            for r in rows {
                let headers: String = r.get(7);
                let c = Claimed {
                    seq: r.get(0),
                    delivery: r.get::<_, i64>(1) + 1,
                    queue: queue.clone(),
                    account: r.get(2),
                    function: r.get(3),
                    task_id: r.get(4),
                    request_id: r.get(5),
                    payload: r.get(6),
                    headers: serde_json::from_str(&headers).unwrap_or_default(),
                    created_ms: r.get::<_, i64>(8).max(0) as u64,
                    retries: r.get::<_, i64>(9).max(0) as u32,
                    throttles: r.get::<_, i64>(10).max(0) as u32,
                };
                let status: String = r.get(11);
                let visible: i64 = r.get(12);
                if status == TaskStatus::Stopping.as_str() {
                    // Its dispatcher died while stopping it: it is stopped.
                    finish(
                        &tx,
                        c.seq,
                        &c.account,
                        now_ms,
                        TaskStatus::Stopped,
                        None,
                        None,
                        &mut tally,
                    )
                    .await
                    .map_err(q)?;
                    continue;
                }
                tally.add(Event::Dispatched);
                if status == TaskStatus::Running.as_str() {
                    tally.add(Event::Redelivered);
                }
                tally
                    .waits_ms
                    .push(now_ms.saturating_sub(visible.max(0) as u64));
                out.push(c);
            }
        }
        if !out.is_empty() {
            // Every lease and its Running event in one statement.
            let lease = tx.prepare_cached(LEASE_MANY).await.map_err(q)?;
            let seqs: Vec<i64> = out.iter().map(|c| c.seq).collect();
            let deliveries: Vec<i64> = out.iter().map(|c| c.delivery).collect();
            tx.execute(
                &lease,
                &[
                    &seqs,
                    &deliveries,
                    &until,
                    &&*self.owner,
                    &TaskStatus::Running.as_str(),
                    &now,
                ],
            )
            .await
            .map_err(q)?;
        }
        tx.commit().await.map_err(q)?;
        tally.apply(&self.metrics);
        Ok(out)
    }

    /// Release the leases this gateway's previous process held (same
    /// owner): another gateway's live leases are never touched.
    pub async fn recover(&self, now_ms: u64) -> Result<usize, QueueError> {
        let c = self.db.conn().await?;
        let n = c
            .execute(
                "UPDATE async_messages SET visible_ms = $1
                 WHERE owner = $2 AND NOT done AND status IN ('Running', 'Stopping')
                   AND visible_ms > $1",
                &[&(now_ms as i64), &&*self.owner],
            )
            .await
            .map_err(q)?;
        // Its outbox deliveries too.
        c.execute(
            "UPDATE async_outbox SET next_ms = $1 WHERE owner = $2 AND next_ms > $1",
            &[&(now_ms as i64), &&*self.owner],
        )
        .await
        .map_err(q)?;
        Ok(n as usize)
    }

    /// Push the leases this gateway holds (message, delivery) to
    /// `until_ms`; a lease lost meanwhile (another delivery) is left alone.
    pub async fn renew(&self, held: Vec<(i64, i64)>, until_ms: u64) -> Result<u64, QueueError> {
        let (seqs, deliveries): (Vec<i64>, Vec<i64>) = held.into_iter().unzip();
        let c = self.db.conn().await?;
        let n = c
            .execute(
                "UPDATE async_messages m SET visible_ms = GREATEST(m.visible_ms, $3)
                 FROM unnest($1::bigint[], $2::bigint[]) AS h(seq, delivery)
                 WHERE m.seq = h.seq AND m.deliveries = h.delivery AND NOT m.done
                   AND m.owner = $4",
                &[&seqs, &deliveries, &(until_ms as i64), &&*self.owner],
            )
            .await
            .map_err(q)?;
        Ok(n)
    }

    /// Of `seqs`, the messages a stop asked to abort.
    pub async fn stopping_among(&self, seqs: Vec<i64>) -> Result<Vec<i64>, QueueError> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.db.conn().await?;
        let rows = c
            .query(
                "SELECT seq FROM async_messages WHERE seq = ANY($1) AND status = 'Stopping'",
                &[&seqs],
            )
            .await
            .map_err(q)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Take outbox entries due at `now_ms` for [`OUTBOX_LEASE_MS`] (no
    /// other gateway takes them meanwhile).
    pub async fn outbox_due(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, QueueError> {
        let c = self.db.conn().await?;
        let st = c
            .prepare_cached(
                "UPDATE async_outbox o SET next_ms = $3, owner = $4
                 FROM (SELECT id FROM async_outbox WHERE next_ms <= $1
                       ORDER BY next_ms, id LIMIT $2 FOR UPDATE SKIP LOCKED) due
                 WHERE o.id = due.id
                 RETURNING o.id, o.attempts, o.account_id, o.request_id, o.target, o.record",
            )
            .await
            .map_err(q)?;
        let rows = c
            .query(
                &st,
                &[
                    &(now_ms as i64),
                    &(limit as i64),
                    &((now_ms + OUTBOX_LEASE_MS) as i64),
                    &&*self.owner,
                ],
            )
            .await
            .map_err(q)?;
        let mut out: Vec<OutboxEntry> = rows
            .iter()
            .map(|r| OutboxEntry {
                id: r.get(0),
                attempts: r.get::<_, i64>(1).max(0) as u32,
                outbound: Outbound {
                    account: r.get(2),
                    request_id: r.get(3),
                    target: r.get(4),
                    record: r.get(5),
                },
            })
            .collect();
        out.sort_by_key(|e| e.id);
        Ok(out)
    }

    pub async fn outbox_remove(&self, id: i64) -> Result<(), QueueError> {
        let c = self.db.conn().await?;
        c.execute("DELETE FROM async_outbox WHERE id = $1", &[&id])
            .await
            .map_err(q)?;
        Ok(())
    }

    pub async fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_ms: u64,
    ) -> Result<(), QueueError> {
        let c = self.db.conn().await?;
        c.execute(
            "UPDATE async_outbox SET attempts = $2, next_ms = $3, owner = NULL WHERE id = $1",
            &[&id, &i64::from(attempts), &(next_ms as i64)],
        )
        .await
        .map_err(q)?;
        Ok(())
    }

    /// Forget finished tasks that ended before `before_ms`, at most `max`
    /// at a time; rows another gateway's purge holds are skipped.
    pub async fn purge(&self, before_ms: u64, max: usize) -> Result<usize, QueueError> {
        let mut c = self.db.conn().await?;
        let tx = c.transaction().await.map_err(q)?;
        let seqs: Vec<i64> = tx
            .query(
                "SELECT seq FROM async_messages WHERE done AND end_ms < $1
                 ORDER BY end_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
                &[&(before_ms as i64), &(max as i64)],
            )
            .await
            .map_err(q)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if seqs.is_empty() {
            return Ok(0);
        }
        tx.execute(
            "DELETE FROM async_task_events WHERE seq = ANY($1)",
            &[&seqs],
        )
        .await
        .map_err(q)?;
        let n = tx
            .execute("DELETE FROM async_messages WHERE seq = ANY($1)", &[&seqs])
            .await
            .map_err(q)?;
        tx.commit().await.map_err(q)?;
        Ok(n as usize)
    }

    pub async fn active_queues(&self) -> Result<Vec<String>, QueueError> {
        let c = self.db.conn().await?;
        let rows = c
            .query(
                "SELECT DISTINCT queue FROM async_messages WHERE NOT done",
                &[],
            )
            .await
            .map_err(q)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub async fn has_pending(&self, queue: &str) -> Result<bool, QueueError> {
        let c = self.db.conn().await?;
        Ok(c.query_opt(
            "SELECT 1 FROM async_messages WHERE queue = $1 AND NOT done LIMIT 1",
            &[&queue],
        )
        .await
        .map_err(q)?
        .is_some())
    }

    pub async fn next_visible(&self, queue: &str) -> Result<Option<u64>, QueueError> {
        let c = self.db.conn().await?;
        let row = c
            .query_one(
                "SELECT min(visible_ms) FROM async_messages WHERE queue = $1 AND NOT done",
                &[&queue],
            )
            .await
            .map_err(q)?;
        Ok(row.get::<_, Option<i64>>(0).map(|v| v.max(0) as u64))
    }

    /// Unfinished messages per account and the oldest one's enqueue time.
    pub async fn depth(&self) -> Result<(Vec<(String, u64)>, Option<i64>), QueueError> {
        let c = self.db.conn().await?;
        let rows = c
            .query(
                "SELECT queue, count(*), min(created_ms) FROM async_messages
                 WHERE NOT done GROUP BY queue",
                &[],
            )
            .await
            .map_err(q)?;
        let mut per_account: HashMap<String, u64> = HashMap::new();
        let mut oldest: Option<i64> = None;
        for r in rows {
            let queue: String = r.get(0);
            let n: i64 = r.get(1);
            let first: Option<i64> = r.get(2);
            let account = queue.split('/').next().unwrap_or_default().to_owned();
            *per_account.entry(account).or_default() += n.max(0) as u64;
            if let Some(f) = first {
                oldest = Some(oldest.map_or(f, |o| o.min(f)));
            }
        }
        Ok((per_account.into_iter().collect(), oldest))
    }

    pub async fn put_config(
        &self,
        account: &str,
        function: &str,
        qualifier: &str,
        doc: &str,
    ) -> Result<(), QueueError> {
        let mut c = self.db.conn().await?;
        let tx = c.transaction().await.map_err(q)?;
        tx.execute(
            "INSERT INTO async_configs (account_id, function_name, qualifier, doc)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (account_id, function_name, qualifier) DO UPDATE SET doc = EXCLUDED.doc",
            &[&account, &function, &qualifier, &doc],
        )
        .await
        .map_err(q)?;
        tx.execute("SELECT pg_notify($1, 'cfg')", &[&CHANNEL])
            .await
            .map_err(q)?;
        tx.commit().await.map_err(q)?;
        Ok(())
    }

    pub async fn delete_config(
        &self,
        account: &str,
        function: &str,
        qualifier: &str,
    ) -> Result<bool, QueueError> {
        let mut c = self.db.conn().await?;
        let tx = c.transaction().await.map_err(q)?;
        let n = tx
            .execute(
                "DELETE FROM async_configs
                 WHERE account_id = $1 AND function_name = $2 AND qualifier = $3",
                &[&account, &function, &qualifier],
            )
            .await
            .map_err(q)?;
        tx.execute("SELECT pg_notify($1, 'cfg')", &[&CHANNEL])
            .await
            .map_err(q)?;
        tx.commit().await.map_err(q)?;
        Ok(n > 0)
    }

    /// Every stored config: (account, function, qualifier, document).
    pub async fn config_docs(&self) -> Result<Vec<(String, String, String, String)>, QueueError> {
        let c = self.db.conn().await?;
        let rows = c
            .query(
                "SELECT account_id, function_name, qualifier, doc FROM async_configs",
                &[],
            )
            .await
            .map_err(q)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    /// The task rows of one function (GetAsyncTask when `task_id` is set,
    /// else a ListAsyncTasks page of `q.limit + 1` rows).
    pub async fn task_rows(
        &self,
        account: &str,
        function: &str,
        task_id: Option<&str>,
        query: &TaskQuery,
    ) -> Result<Vec<(TaskRow, Vec<EventRow>)>, QueueError> {
        let c = self.db.conn().await?;
        const COLUMNS: &str = "seq, account_id, function_name, task_id, request_id, payload, \
            status, retries, created_ms, end_ms, error, return_payload, headers";
        let rows = match task_id {
            Some(t) => {
                c.query(
                    &format!(
                        "SELECT {COLUMNS} FROM async_messages
                         WHERE account_id = $1 AND function_name = $2 AND task_id = $3"
                    ),
                    &[&account, &function, &t],
                )
                .await
            }
            None => {
                let order = if query.descending { "DESC" } else { "ASC" };
                let cmp = if query.descending { "<" } else { ">" };
                let sql = format!(
                    "SELECT {COLUMNS} FROM async_messages
                     WHERE account_id = $1 AND function_name = $2
                       AND ($3::text IS NULL OR status = $3)
                       AND ($4::text IS NULL OR starts_with(task_id, $4))
                       AND ($5::bigint IS NULL OR created_ms >= $5)
                       AND ($6::bigint IS NULL OR created_ms <= $6)
                       AND ($7::bigint IS NULL OR seq {cmp} $7)
                     ORDER BY seq {order} LIMIT $8"
                );
                let params: [&(dyn ToSql + Sync); 8] = [
                    &account,
                    &function,
                    &query.status.map(TaskStatus::as_str),
                    &query.prefix,
                    &query.begin_ms.map(|v| v as i64),
                    &query.end_ms.map(|v| v as i64),
                    &query.after,
                    &((query.limit + 1) as i64),
                ];
                c.query(&sql, &params).await
            }
        }
        .map_err(q)?;
        let rows: Vec<TaskRow> = rows
            .iter()
            .map(|r| TaskRow {
                seq: r.get(0),
                account: r.get(1),
                function: r.get(2),
                task_id: r.get(3),
                request_id: r.get(4),
                payload: r.get(5),
                status: r.get(6),
                retries: r.get(7),
                created_ms: r.get(8),
                end_ms: r.get(9),
                error: r.get(10),
                return_payload: r.get(11),
                headers: r.get(12),
            })
            .collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let events = c
            .query(
                "SELECT seq, event_id, status, ts_ms, detail FROM async_task_events
                 WHERE seq = ANY($1) ORDER BY event_id",
                &[&seqs],
            )
            .await
            .map_err(q)?;
        let mut by_seq: HashMap<i64, Vec<EventRow>> = HashMap::new();
        for e in events {
            by_seq.entry(e.get(0)).or_default().push(EventRow {
                event_id: e.get(1),
                status: e.get(2),
                ts_ms: e.get(3),
                detail: e.get(4),
            });
        }
        Ok(rows
            .into_iter()
            .map(|r| {
                let ev = by_seq.remove(&r.seq).unwrap_or_default();
                (r, ev)
            })
            .collect())
    }

    /// (status, retries, throttles) of a task, for tests.
    #[cfg(test)]
    pub async fn status_row(&self, task_id: &str) -> (String, i64, i64) {
        let c = self.db.conn().await.unwrap();
        let r = c
            .query_one(
                "SELECT status, retries, throttles FROM async_messages WHERE task_id = $1",
                &[&task_id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    }

    /// Count of rows of a table, for tests.
    #[cfg(test)]
    pub async fn count(&self, table: &str) -> i64 {
        let c = self.db.conn().await.unwrap();
        c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }
}

/// One recorded transition of a task.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub event_id: i64,
    pub status: String,
    pub ts_ms: i64,
    pub detail: String,
}

/// Parse one notification's payload.
pub fn parse_signal(payload: &str) -> Option<Signal> {
    if let Some(queue) = payload.strip_prefix("enq:") {
        return Some(Signal::Enqueued(queue.to_owned()));
    }
    if let Some(seq) = payload.strip_prefix("stop:") {
        return seq.parse().ok().map(Signal::Stop);
    }
    (payload == "cfg").then_some(Signal::Configs)
}
