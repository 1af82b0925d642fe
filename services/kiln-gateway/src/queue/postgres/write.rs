//! The shared queue's writers: operations group-committed (see the
//! module docs of [`super`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_store::pg::PgDatabase;
use tokio::sync::{mpsc, oneshot};

use super::{q, TickKey, BATCH_MAX, CHANNEL, DEPTH_CACHE};
use crate::queue::metrics::{Event, QueueMetrics, Tally};
use crate::queue::{
    Completion, Enqueued, NewMessage, Outbound, QueueError, StopOutcome, TaskStatus,
};

pub(super) enum Op {
    Enqueue {
        m: NewMessage,
        tick: Option<TickKey>,
        reply: oneshot::Sender<Result<Option<Enqueued>, QueueError>>,
    },
    Complete {
        seq: i64,
        delivery: i64,
        now_ms: u64,
        completion: Completion,
        outbound: Option<Outbound>,
        reply: oneshot::Sender<Result<Option<TaskStatus>, QueueError>>,
    },
    Stop {
        account: String,
        function: String,
        task_id: String,
        now_ms: u64,
        reply: oneshot::Sender<Result<StopOutcome, QueueError>>,
    },
    Extend {
        seq: i64,
        delivery: i64,
        until_ms: u64,
        reply: oneshot::Sender<Result<bool, QueueError>>,
    },
}

pub(super) enum Reply {
    Enqueued(Option<Enqueued>),
    Completed(Option<TaskStatus>),
    Stopped(StopOutcome),
    Extended(bool),
}

impl Op {
    pub(super) fn fail(self, why: String) {
        let e = || QueueError::Failed(why.clone());
        match self {
            Op::Enqueue { reply, .. } => drop(reply.send(Err(e()))),
            Op::Complete { reply, .. } => drop(reply.send(Err(e()))),
            Op::Stop { reply, .. } => drop(reply.send(Err(e()))),
            Op::Extend { reply, .. } => drop(reply.send(Err(e()))),
        }
    }

    pub(super) fn answer(self, r: Reply) {
        match (self, r) {
            (Op::Enqueue { reply, .. }, Reply::Enqueued(r)) => drop(reply.send(Ok(r))),
            (Op::Complete { reply, .. }, Reply::Completed(r)) => drop(reply.send(Ok(r))),
            (Op::Stop { reply, .. }, Reply::Stopped(r)) => drop(reply.send(Ok(r))),
            (Op::Extend { reply, .. }, Reply::Extended(r)) => drop(reply.send(Ok(r))),
            (op, _) => op.fail("mismatched queue reply".into()),
        }
    }
}

/// The shared queue on PostgreSQL.

#[derive(Clone)]
pub(super) struct WriterCtx {
    pub(super) db: PgDatabase,
    pub(super) batches: Arc<AtomicU64>,
    pub(super) metrics: Arc<QueueMetrics>,
}

/// Unfinished messages per account as last read, and when.
#[derive(Default)]
pub(super) struct DepthCache {
    pub(super) map: HashMap<String, (u64, Instant)>,
}

/// One writer: takes every operation waiting (the others take the next
/// ones while it commits) and applies them in one transaction.
pub(super) async fn writer(
    ctx: WriterCtx,
    rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Op>>>,
    depths: Arc<Mutex<DepthCache>>,
) {
    loop {
        let Some(mut ops) = take_batch(&rx, BATCH_MAX).await else {
            return;
        };
        let started = Instant::now();
        match apply_batch(&ctx, &ops, &depths).await {
            Ok(replies) => {
                ctx.metrics.committed(ops.len(), started.elapsed());
                for (op, r) in ops.into_iter().zip(replies) {
                    op.answer(r);
                }
            }
            Err(e) if ops.len() == 1 => {
                let why = kiln_core::error_chain(&e);
                tracing::error!(error = %why, "async queue write failed");
                ops.pop().expect("one op").fail(why);
            }
            Err(e) => {
                // One operation (or the connection) failed the whole
                // transaction: retry each alone, so only a bad one fails.
                tracing::warn!(error = %kiln_core::error_chain(&e), ops = ops.len(), "async queue batch failed; applying its operations one by one");
                for op in ops {
                    let one = std::slice::from_ref(&op);
                    match apply_batch(&ctx, one, &depths).await {
                        Ok(mut r) => op.answer(r.pop().expect("one reply")),
                        Err(e) => {
                            let why = kiln_core::error_chain(&e);
                            tracing::error!(error = %why, "async queue write failed");
                            op.fail(why);
                        }
                    }
                }
            }
        }
    }
}

/// A group commit's batch: wait for one item, then take every other item
/// already waiting, up to `max` (the other writers take the next ones
/// while this batch commits); `None` once every sender is gone.
pub(super) async fn take_batch<T>(
    rx: &tokio::sync::Mutex<mpsc::UnboundedReceiver<T>>,
    max: usize,
) -> Option<Vec<T>> {
    let mut rx = rx.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some(batch)
}

async fn apply_batch(
    ctx: &WriterCtx,
    ops: &[Op],
    depths: &Mutex<DepthCache>,
) -> Result<Vec<Reply>, QueueError> {
    if ops
        .iter()
        .all(|op| matches!(op, Op::Enqueue { tick: None, .. }))
    {
        return enqueue_batch(ctx, ops, depths).await;
    }
    let mut conn = ctx.db.conn().await?;
    let tx = conn.transaction().await.map_err(q)?;
    let mut tally = Tally::default();
    let mut notify: BTreeSet<String> = BTreeSet::new();
    let mut replies: Vec<Option<Reply>> = (0..ops.len()).map(|_| None).collect();
    // Plain enqueues within their bounds go in one statement.
    let mut bulk: Vec<(usize, &NewMessage)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if let Op::Enqueue { m, tick: None, .. } = op {
            let account = m.account.as_str();
            if let Some(limit) = m.depth_limit {
                let depth = account_depth(&tx, account, depths)
                    .await
                    .map_err(q)?
                    .saturating_add_signed(tally.depth.get(account).copied().unwrap_or(0));
                if depth >= limit {
                    replies[i] = Some(Reply::Enqueued(Some(Enqueued::Full { depth, limit })));
                    continue;
                }
            }
            // Counted now (the bound of the next ones), undone if a duplicate.
            tally.depth_add(account, 1);
            bulk.push((i, m));
            continue;
        }
        let r = apply(&tx, op, &mut tally, depths, &mut notify)
            .await
            .map_err(q)?;
        replies[i] = Some(r);
    }
    if !bulk.is_empty() {
        let msgs: Vec<&NewMessage> = bulk.iter().map(|(_, m)| *m).collect();
        let insert = tx.prepare_cached(ENQUEUE_MANY).await.map_err(q)?;
        let results = enqueue_many(&*tx, &insert, &msgs).await.map_err(q)?;
        for ((i, m), r) in bulk.into_iter().zip(results) {
            if r == Enqueued::New {
                tally.add(Event::Enqueued);
            } else {
                tally.depth_add(m.account.as_str(), -1);
            }
            replies[i] = Some(Reply::Enqueued(Some(r)));
        }
    }
    if !notify.is_empty() {
        let payloads: Vec<String> = notify.into_iter().collect();
        tx.execute(
            "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p",
            &[&CHANNEL, &payloads],
        )
        .await
        .map_err(q)?;
    }
    let committed = tx.commit().await;
    ctx.batches.fetch_add(1, Ordering::Relaxed);
    let mut cache = depths.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = committed {
        // The counts read in it may not hold: read them again next time.
        cache.map.clear();
        return Err(q(e));
    }
    for (account, d) in std::mem::take(&mut tally.depth) {
        if let Some((n, _)) = cache.map.get_mut(&account) {
            *n = n.saturating_add_signed(d);
        }
    }
    drop(cache);
    tally.apply(&ctx.metrics);
    Ok(replies
        .into_iter()
        .map(|r| r.expect("every operation answered"))
        .collect())
}

/// A batch of plain enqueues (the accept path under load): the bounds
/// checked, then one statement, committed on its own: one round trip.
async fn enqueue_batch(
    ctx: &WriterCtx,
    ops: &[Op],
    depths: &Mutex<DepthCache>,
) -> Result<Vec<Reply>, QueueError> {
    let conn = ctx.db.conn().await?;
    let mut replies: Vec<Option<Reply>> = (0..ops.len()).map(|_| None).collect();
    let mut added: HashMap<&str, i64> = HashMap::new();
    let mut bulk: Vec<(usize, &NewMessage)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let Op::Enqueue { m, .. } = op else {
            unreachable!("only enqueues take this path")
        };
        let account = m.account.as_str();
        if let Some(limit) = m.depth_limit {
            let depth = match cached_depth(depths, account) {
                Some(n) => n,
                None => {
                    let st = conn.prepare_cached(COUNT_UNFINISHED).await.map_err(q)?;
                    let n: i64 = conn.query_one(&st, &[&account]).await.map_err(q)?.get(0);
                    store_depth(depths, account, n.max(0) as u64)
                }
            }
            .saturating_add_signed(added.get(account).copied().unwrap_or(0));
            if depth >= limit {
                replies[i] = Some(Reply::Enqueued(Some(Enqueued::Full { depth, limit })));
                continue;
            }
        }
        *added.entry(account).or_default() += 1;
        bulk.push((i, m));
    }
    let mut tally = Tally::default();
    if !bulk.is_empty() {
        let msgs: Vec<&NewMessage> = bulk.iter().map(|(_, m)| *m).collect();
        let insert = conn.prepare_cached(ENQUEUE_MANY).await.map_err(q)?;
        let results = enqueue_many(&**conn, &insert, &msgs).await;
        ctx.batches.fetch_add(1, Ordering::Relaxed);
        let results = results.map_err(|e| {
            depths.lock().unwrap_or_else(|p| p.into_inner()).map.clear();
            q(e)
        })?;
        for ((i, m), r) in bulk.into_iter().zip(results) {
            if r == Enqueued::New {
                tally.add(Event::Enqueued);
                tally.depth_add(m.account.as_str(), 1);
            }
            replies[i] = Some(Reply::Enqueued(Some(r)));
        }
    }
    let mut cache = depths.lock().unwrap_or_else(|p| p.into_inner());
    for (account, d) in std::mem::take(&mut tally.depth) {
        if let Some((n, _)) = cache.map.get_mut(&account) {
            *n = n.saturating_add_signed(d);
        }
    }
    drop(cache);
    tally.apply(&ctx.metrics);
    Ok(replies
        .into_iter()
        .map(|r| r.expect("every operation answered"))
        .collect())
}

const COUNT_UNFINISHED: &str =
    "SELECT count(*) FROM async_messages WHERE account_id = $1 AND NOT done";

/// The account's unfinished count, if read within [`DEPTH_CACHE`].
fn cached_depth(depths: &Mutex<DepthCache>, account: &str) -> Option<u64> {
    let cache = depths.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .map
        .get(account)
        .filter(|(_, at)| at.elapsed() < DEPTH_CACHE)
        .map(|(n, _)| *n)
}

fn store_depth(depths: &Mutex<DepthCache>, account: &str, n: u64) -> u64 {
    depths
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .map
        .insert(account.to_owned(), (n, Instant::now()));
    n
}

/// Insert `msgs` in one statement that also notifies their queues (at its
/// commit); a task id already taken (before, or earlier in `msgs`) is a
/// duplicate, answered with the first one's request id.
async fn enqueue_many<C: tokio_postgres::GenericClient + Sync>(
    c: &C,
    insert: &tokio_postgres::Statement,
    msgs: &[&NewMessage],
) -> Result<Vec<Enqueued>, tokio_postgres::Error> {
    let headers: Vec<String> = msgs
        .iter()
        .map(|m| serde_json::to_string(&m.headers).expect("headers serialise"))
        .collect();
    let accounts: Vec<&str> = msgs.iter().map(|m| m.account.as_str()).collect();
    let functions: Vec<&str> = msgs.iter().map(|m| m.function.as_str()).collect();
    let queues: Vec<&str> = msgs.iter().map(|m| m.queue.as_str()).collect();
    let tasks: Vec<&str> = msgs.iter().map(|m| m.task_id.as_str()).collect();
    let requests: Vec<&str> = msgs.iter().map(|m| m.request_id.as_str()).collect();
    let payloads: Vec<&[u8]> = msgs.iter().map(|m| m.payload.as_slice()).collect();
    let now: Vec<i64> = msgs.iter().map(|m| m.now_ms as i64).collect();
    let rows = c
        .query(
            insert,
            &[
                &accounts, &functions, &queues, &tasks, &requests, &payloads, &headers, &now,
                &CHANNEL,
            ],
        )
        .await?;
    let mut inserted: std::collections::HashSet<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut out = Vec::with_capacity(msgs.len());
    for m in msgs {
        let key = (
            m.account.as_str().to_owned(),
            m.function.as_str().to_owned(),
            m.task_id.clone(),
        );
        if inserted.remove(&key) {
            out.push(Enqueued::New);
            continue;
        }
        let row = c
            .query_one(
                "SELECT request_id FROM async_messages
                 WHERE account_id = $1 AND function_name = $2 AND task_id = $3",
                &[&key.0, &key.1, &key.2],
            )
            .await?;
        out.push(Enqueued::Duplicate {
            request_id: row.get(0),
        });
    }
    Ok(out)
}

/// Many messages in one statement, their queues notified.
const ENQUEUE_MANY: &str = "
    WITH ins AS (
        INSERT INTO async_messages (account_id, function_name, queue, task_id, request_id,
                                    payload, headers, status, visible_ms, created_ms)
        SELECT a, f, q, t, r, p, h, 'Enqueued', v, v
        FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                    $6::bytea[], $7::text[], $8::bigint[]) AS u(a, f, q, t, r, p, h, v)
        ON CONFLICT (account_id, function_name, task_id) DO NOTHING
        RETURNING account_id, function_name, task_id, queue
    ),
    notified AS (
        SELECT pg_notify($9, 'enq:' || queue) FROM (SELECT DISTINCT queue FROM ins) AS d
    )
    SELECT account_id, function_name, task_id, (SELECT count(*) FROM notified) FROM ins";

async fn apply(
    tx: &deadpool_postgres::Transaction<'_>,
    op: &Op,
    tally: &mut Tally,
    depths: &Mutex<DepthCache>,
    notify: &mut BTreeSet<String>,
) -> Result<Reply, tokio_postgres::Error> {
    match op {
        Op::Enqueue { m, tick, .. } => {
            if let Some(t) = tick {
                let st = tx
                    .prepare_cached(
                        "INSERT INTO timer_ticks (account_id, function_name, trigger_name, tick_ms, fired_ms)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    )
                    .await?;
                let n = tx
                    .execute(
                        &st,
                        &[
                            &t.account,
                            &t.function,
                            &t.trigger,
                            &(t.tick_ms as i64),
                            &(m.now_ms as i64),
                        ],
                    )
                    .await?;
                if n == 0 {
                    return Ok(Reply::Enqueued(None));
                }
            }
            let account = m.account.as_str();
            if let Some(limit) = m.depth_limit {
                let depth = account_depth(tx, account, depths)
                    .await?
                    .saturating_add_signed(tally.depth.get(account).copied().unwrap_or(0));
                if depth >= limit {
                    return Ok(Reply::Enqueued(Some(Enqueued::Full { depth, limit })));
                }
            }
            let r = enqueue(tx, m).await?;
            if r == Enqueued::New {
                tally.add(Event::Enqueued);
                tally.depth_add(account, 1);
                notify.insert(format!("enq:{}", m.queue));
            }
            Ok(Reply::Enqueued(Some(r)))
        }
        Op::Complete {
            seq,
            delivery,
            now_ms,
            completion,
            outbound,
            ..
        } => Ok(Reply::Completed(
            complete(
                tx,
                *seq,
                *delivery,
                *now_ms,
                completion,
                outbound.as_ref(),
                tally,
            )
            .await?,
        )),
        Op::Stop {
            account,
            function,
            task_id,
            now_ms,
            ..
        } => {
            let r = stop(tx, account, function, task_id, *now_ms, tally).await?;
            if let StopOutcome::Stopping { seq } = r {
                notify.insert(format!("stop:{seq}"));
            }
            Ok(Reply::Stopped(r))
        }
        Op::Extend {
            seq,
            delivery,
            until_ms,
            ..
        } => {
            let st = tx
                .prepare_cached(
                    "UPDATE async_messages SET visible_ms = $3
                     WHERE seq = $1 AND deliveries = $2 AND NOT done",
                )
                .await?;
            let n = tx
                .execute(&st, &[seq, delivery, &(*until_ms as i64)])
                .await?;
            Ok(Reply::Extended(n > 0))
        }
    }
}

/// The account's unfinished messages as committed: the cached count when
/// fresh, else read in this transaction.
async fn account_depth(
    tx: &deadpool_postgres::Transaction<'_>,
    account: &str,
    depths: &Mutex<DepthCache>,
) -> Result<u64, tokio_postgres::Error> {
    if let Some(n) = cached_depth(depths, account) {
        return Ok(n);
    }
    let st = tx.prepare_cached(COUNT_UNFINISHED).await?;
    let n: i64 = tx.query_one(&st, &[&account]).await?.get(0);
    Ok(store_depth(depths, account, n.max(0) as u64))
}

pub(super) async fn event(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: i64,
    status: TaskStatus,
    now_ms: u64,
    detail: &str,
) -> Result<(), tokio_postgres::Error> {
    let st = tx
        .prepare_cached(
            "INSERT INTO async_task_events (seq, status, ts_ms, detail) VALUES ($1, $2, $3, $4)",
        )
        .await?;
    tx.execute(&st, &[&seq, &status.as_str(), &(now_ms as i64), &detail])
        .await?;
    Ok(())
}

async fn enqueue(
    tx: &deadpool_postgres::Transaction<'_>,
    m: &NewMessage,
) -> Result<Enqueued, tokio_postgres::Error> {
    let headers = serde_json::to_string(&m.headers).expect("headers serialise");
    let st = tx
        .prepare_cached(
            "INSERT INTO async_messages (account_id, function_name, queue, task_id, request_id,
                                         payload, headers, status, visible_ms, created_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'Enqueued', $8, $8)
             ON CONFLICT (account_id, function_name, task_id) DO NOTHING",
        )
        .await?;
    let n = tx
        .execute(
            &st,
            &[
                &m.account.as_str(),
                &m.function.as_str(),
                &m.queue,
                &m.task_id,
                &m.request_id,
                &m.payload,
                &headers,
                &(m.now_ms as i64),
            ],
        )
        .await?;
    if n == 0 {
        let st = tx
            .prepare_cached(
                "SELECT request_id FROM async_messages
                 WHERE account_id = $1 AND function_name = $2 AND task_id = $3",
            )
            .await?;
        let row = tx
            .query_one(
                &st,
                &[&m.account.as_str(), &m.function.as_str(), &m.task_id],
            )
            .await?;
        return Ok(Enqueued::Duplicate {
            request_id: row.get(0),
        });
    }
    Ok(Enqueued::New)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn finish(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: i64,
    account: &str,
    now_ms: u64,
    status: TaskStatus,
    error: Option<&str>,
    ret: Option<&[u8]>,
    tally: &mut Tally,
) -> Result<(), tokio_postgres::Error> {
    if let Some(e) = Event::finished(status) {
        tally.add(e);
    }
    let st = tx
        .prepare_cached(
            "UPDATE async_messages SET status = $2, done = true, end_ms = $3, error = $4,
                    return_payload = $5, owner = NULL
             WHERE seq = $1 AND NOT done",
        )
        .await?;
    let n = tx
        .execute(
            &st,
            &[&seq, &status.as_str(), &(now_ms as i64), &error, &ret],
        )
        .await?;
    if n > 0 {
        tally.depth_add(account, -1);
    }
    event(tx, seq, status, now_ms, error.unwrap_or("")).await
}

async fn complete(
    tx: &deadpool_postgres::Transaction<'_>,
    seq: i64,
    delivery: i64,
    now_ms: u64,
    c: &Completion,
    outbound: Option<&Outbound>,
    tally: &mut Tally,
) -> Result<Option<TaskStatus>, tokio_postgres::Error> {
    // The common case, a final answer for the current delivery of a
    // message nobody is stopping, in one statement (the row's lock and
    // the fence are the UPDATE's own, re-checked after a concurrent stop).
    if let Completion::Final {
        status,
        error,
        return_payload,
    } = c
    {
        let st = tx.prepare_cached(FINISH_DELIVERY).await?;
        let finished = tx
            .query_opt(
                &st,
                &[
                    &seq,
                    &delivery,
                    &status.as_str(),
                    &(now_ms as i64),
                    &error.as_deref(),
                    &return_payload.as_deref(),
                ],
            )
            .await?;
        if let Some(row) = finished {
            if let Some(e) = Event::finished(*status) {
                tally.add(e);
            }
            tally.depth_add(row.get::<_, &str>(0), -1);
            if let Some(o) = outbound {
                add_outbox(tx, o, now_ms).await?;
            }
            return Ok(Some(*status));
        }
        // Stale, finished, gone or being stopped: decided below.
    }
    let st = tx
        .prepare_cached(
            "SELECT status, deliveries, done, account_id FROM async_messages
             WHERE seq = $1 FOR UPDATE",
        )
        .await?;
    let Some(row) = tx.query_opt(&st, &[&seq]).await? else {
        return Ok(None);
    };
    let (status, deliveries, done, account): (String, i64, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if done || deliveries != delivery {
        return Ok(None);
    }
    if status == TaskStatus::Stopping.as_str() {
        finish(
            tx,
            seq,
            &account,
            now_ms,
            TaskStatus::Stopped,
            Some("stopped by StopAsyncTask"),
            None,
            tally,
        )
        .await?;
        return Ok(Some(TaskStatus::Stopped));
    }
    match c {
        Completion::Retry {
            visible_ms,
            retries,
            throttles,
            detail,
        } => {
            let st = tx
                .prepare_cached(
                    "UPDATE async_messages SET status = 'Retrying', visible_ms = $2, retries = $3,
                            throttles = $4, error = $5, owner = NULL WHERE seq = $1",
                )
                .await?;
            tx.execute(
                &st,
                &[
                    &seq,
                    &(*visible_ms as i64),
                    &i64::from(*retries),
                    &i64::from(*throttles),
                    detail,
                ],
            )
            .await?;
            event(tx, seq, TaskStatus::Retrying, now_ms, detail).await?;
            tally.add(Event::Retried);
            Ok(Some(TaskStatus::Retrying))
        }
        Completion::Final {
            status,
            error,
            return_payload,
        } => {
            finish(
                tx,
                seq,
                &account,
                now_ms,
                *status,
                error.as_deref(),
                return_payload.as_deref(),
                tally,
            )
            .await?;
            if let Some(o) = outbound {
                add_outbox(tx, o, now_ms).await?;
            }
            Ok(Some(*status))
        }
    }
}

/// Finish delivery `$2` of message `$1` with status `$3` at `$4` (error
/// `$5`, return payload `$6`) and record the event; its account, or no
/// row when the delivery is stale, the message finished, gone or being
/// stopped.
const FINISH_DELIVERY: &str = "
    WITH fin AS (
        UPDATE async_messages SET status = $3, done = true, end_ms = $4, error = $5,
               return_payload = $6, owner = NULL
        WHERE seq = $1 AND deliveries = $2 AND NOT done AND status <> 'Stopping'
        RETURNING seq, account_id
    ), ev AS (
        INSERT INTO async_task_events (seq, status, ts_ms, detail)
        SELECT seq, $3, $4, coalesce($5, '') FROM fin
    )
    SELECT account_id FROM fin";

/// Queue a destination delivery of a finished call.
async fn add_outbox(
    tx: &deadpool_postgres::Transaction<'_>,
    o: &Outbound,
    now_ms: u64,
) -> Result<(), tokio_postgres::Error> {
    let st = tx
        .prepare_cached(
            "INSERT INTO async_outbox (account_id, request_id, target, record, next_ms)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .await?;
    tx.execute(
        &st,
        &[
            &o.account,
            &o.request_id,
            &o.target,
            &o.record,
            &(now_ms as i64),
        ],
    )
    .await?;
    Ok(())
}

async fn stop(
    tx: &deadpool_postgres::Transaction<'_>,
    account: &str,
    function: &str,
    task_id: &str,
    now_ms: u64,
    tally: &mut Tally,
) -> Result<StopOutcome, tokio_postgres::Error> {
    let st = tx
        .prepare_cached(
            "SELECT seq, status FROM async_messages
             WHERE account_id = $1 AND function_name = $2 AND task_id = $3 FOR UPDATE",
        )
        .await?;
    let Some(row) = tx.query_opt(&st, &[&account, &function, &task_id]).await? else {
        return Ok(StopOutcome::NotFound);
    };
    let seq: i64 = row.get(0);
    let status = TaskStatus::parse(row.get(1)).unwrap_or(TaskStatus::Invalid);
    match status {
        s if s.is_final() => Ok(StopOutcome::AlreadyFinished(s)),
        TaskStatus::Stopping => Ok(StopOutcome::Stopping { seq }),
        TaskStatus::Running => {
            tx.execute(
                "UPDATE async_messages SET status = 'Stopping' WHERE seq = $1",
                &[&seq],
            )
            .await?;
            event(
                tx,
                seq,
                TaskStatus::Stopping,
                now_ms,
                "stopped by StopAsyncTask",
            )
            .await?;
            Ok(StopOutcome::Stopping { seq })
        }
        _ => {
            finish(
                tx,
                seq,
                account,
                now_ms,
                TaskStatus::Stopped,
                Some("stopped by StopAsyncTask"),
                None,
                tally,
            )
            .await?;
            Ok(StopOutcome::Stopped)
        }
    }
}
