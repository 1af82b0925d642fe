//! The queue on SQLite (`state_dir/queue.db`, WAL with synchronous=FULL):
//! one gateway owns the file.
//!
//! Every write goes through one writer thread that takes all operations
//! waiting in its channel, applies them in one transaction and answers each
//! caller after that transaction commits: concurrent enqueues share one
//! fsync (group commit), and a 202 is only sent once its row is on disk.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{AccountId, FunctionName};
use kiln_store::Database;
use rusqlite::{params, OptionalExtension, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::metrics::{Event, QueueMetrics, Tally};
use super::{
    AsyncConfig, Claimed, Completion, Enqueued, NewMessage, Outbound, OutboxEntry, QueueError,
    StopOutcome, TaskStatus, MIGRATIONS,
};

enum Op {
    Enqueue(NewMessage, oneshot::Sender<Result<Enqueued, QueueError>>),
    Claim {
        now_ms: u64,
        lease_ms: u64,
        wants: Vec<(String, usize)>,
        reply: oneshot::Sender<Result<Vec<Claimed>, QueueError>>,
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

/// The most operations one transaction applies.
const BATCH_MAX: usize = 2048;

/// The SQLite queue: the database and its writer thread.
#[derive(Clone)]
pub struct SqliteQueue {
    db: Database,
    tx: mpsc::UnboundedSender<Op>,
    batches: Arc<std::sync::atomic::AtomicU64>,
    metrics: Arc<QueueMetrics>,
    /// A second connection for reads that must not wait for the writer
    /// (WAL readers run beside it): the depth gauges and checkpoints.
    reader: Database,
    /// Held while any clone lives; the checkpointer stops when it drops.
    _checkpointer: Option<Arc<std::sync::mpsc::Sender<()>>>,
}

/// The writer connection's page cache, in KiB.
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// How often the checkpointer moves the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// How often the writer finishes a checkpoint itself, between two
/// transactions. The checkpointer never catches up with a writer that
/// keeps appending, and SQLite only starts the WAL over once a checkpoint
/// has copied all of it: without this the WAL grows for as long as the
/// load lasts. The writer only copies what came since the checkpointer's
/// last pass.
const WRITER_CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

impl SqliteQueue {
    /// Open (creating) the queue database and start its writer thread. The
    /// thread ends when every [`Queue`] clone is dropped.
    ///
    /// The writer never checkpoints (a checkpoint copies the WAL into the
    /// database file and fsyncs it, which would stall every enqueue
    /// waiting for that commit): a checkpointer thread does, on its own
    /// connection, every [`CHECKPOINT_EVERY`].
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        let db = Database::open(path, MIGRATIONS)?;
        db.with_conn(|c| {
            c.pragma_update(None, "wal_autocheckpoint", 0)?;
            // Task ids are random keys of the unique index: keep its pages
            // (and the others') cached rather than read back per insert.
            c.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
            // A WAL that grew under a burst is cut back when it restarts.
            c.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
            Ok(())
        })?;
        let reader = Database::open(path, MIGRATIONS)?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let r = reader.clone();
        std::thread::Builder::new()
            .name("kiln-queue-checkpoint".into())
            .spawn(move || checkpointer(r, rx))
            .expect("spawn queue checkpointer");
        Ok(Self::with_db(db, reader, Some(Arc::new(tx))))
    }

    pub fn open_in_memory() -> Result<Self, QueueError> {
        let db = Database::open_in_memory(MIGRATIONS)?;
        Ok(Self::with_db(db.clone(), db, None))
    }

    fn with_db(
        db: Database,
        reader: Database,
        checkpointer: Option<Arc<std::sync::mpsc::Sender<()>>>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let batches = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writer_db = db.clone();
        let counter = batches.clone();
        let metrics = QueueMetrics::new();
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("kiln-queue-writer".into())
            .spawn(move || writer(writer_db, rx, counter, m))
            .expect("spawn queue writer");
        Self {
            db,
            tx,
            batches,
            metrics,
            reader,
            _checkpointer: checkpointer,
        }
    }

    /// The queue's metrics (register them with the service's registry).
    pub fn metrics(&self) -> &Arc<QueueMetrics> {
        &self.metrics
    }

    /// Refresh the depth-per-account and oldest-message-age gauges from
    /// the database.
    pub async fn refresh_depth(&self, now_ms: u64) -> Result<(), QueueError> {
        let (per_account, oldest) = self
            .reader
            .run(|c| {
                // Answered from the partial index messages_pending alone
                // (queue, visible_ms, rowid), without reading the rows.
                let mut st = c.prepare_cached(
                    "SELECT queue, count(*), min(seq) FROM messages
                     WHERE done = 0 GROUP BY queue",
                )?;
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })?;
                let mut per_account: std::collections::HashMap<String, u64> = Default::default();
                let mut first: Option<i64> = None;
                for row in rows {
                    let (queue, n, seq) = row?;
                    // A function's own queue is "account/function".
                    let account = queue.split('/').next().unwrap_or_default().to_owned();
                    *per_account.entry(account).or_default() += n.max(0) as u64;
                    first = Some(first.map_or(seq, |f| f.min(seq)));
                }
                let oldest = match first {
                    None => None,
                    Some(seq) => c
                        .prepare_cached("SELECT created_ms FROM messages WHERE seq = ?1")?
                        .query_row([seq], |r| r.get::<_, i64>(0))
                        .optional()?,
                };
                Ok((per_account.into_iter().collect(), oldest))
            })
            .await?;
        let age = oldest.map_or(0, |o| now_ms.saturating_sub(o.max(0) as u64));
        self.metrics
            .set_depth(per_account, Duration::from_millis(age));
        Ok(())
    }

    /// Transactions committed by the writer so far.
    pub fn batches(&self) -> u64 {
        self.batches.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn call<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, QueueError>>) -> Op,
    ) -> Result<T, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(op(reply)).map_err(|_| QueueError::Closed)?;
        rx.await.map_err(|_| QueueError::Closed)?
    }

    /// Durably enqueue; returns once the row is committed.
    pub async fn enqueue(&self, m: NewMessage) -> Result<Enqueued, QueueError> {
        self.call(|r| Op::Enqueue(m, r)).await
    }

    /// Lease up to `n` visible messages from each named queue, oldest first,
    /// until `now_ms + lease_ms`.
    pub async fn claim(
        &self,
        now_ms: u64,
        lease_ms: u64,
        wants: Vec<(String, usize)>,
    ) -> Result<Vec<Claimed>, QueueError> {
        self.call(|reply| Op::Claim {
            now_ms,
            lease_ms,
            wants,
            reply,
        })
        .await
    }

    /// [`Queue::complete`], and if the task finishes with that completion,
    /// `outbound` goes into the outbox in the same transaction.
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

    /// Outbox entries due at `now_ms`, oldest first, skipping `busy` ids.
    pub async fn outbox_due(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, QueueError> {
        Ok(self
            .db
            .run(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT id, attempts, account_id, request_id, target, record FROM outbox
                     WHERE next_ms <= ?1 ORDER BY next_ms, id LIMIT ?2",
                )?;
                let rows = st.query_map(params![now_ms as i64, limit as i64], |r| {
                    Ok(OutboxEntry {
                        id: r.get(0)?,
                        attempts: r.get::<_, i64>(1)? as u32,
                        outbound: Outbound {
                            account: r.get(2)?,
                            request_id: r.get(3)?,
                            target: r.get(4)?,
                            record: r.get(5)?,
                        },
                    })
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?)
    }

    /// A delivery is done (or abandoned): drop it from the outbox.
    pub async fn outbox_remove(&self, id: i64) -> Result<(), QueueError> {
        Ok(self
            .db
            .run(move |c| {
                c.execute("DELETE FROM outbox WHERE id = ?1", [id])?;
                Ok(())
            })
            .await?)
    }

    /// A delivery failed: try again at `next_ms`.
    pub async fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_ms: u64,
    ) -> Result<(), QueueError> {
        Ok(self
            .db
            .run(move |c| {
                c.execute(
                    "UPDATE outbox SET attempts = ?2, next_ms = ?3 WHERE id = ?1",
                    params![id, attempts, next_ms as i64],
                )?;
                Ok(())
            })
            .await?)
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

    /// Make every leased message visible now. The queue database has one
    /// owner (this gateway); at its start, every lease still held belongs
    /// to a dispatcher that died with the previous process, so its
    /// messages need not wait for their leases to run out.
    pub async fn recover(&self, now_ms: u64) -> Result<usize, QueueError> {
        Ok(self
            .db
            .run(move |c| {
                Ok(c.execute(
                    "UPDATE messages SET visible_ms = ?1
                     WHERE done = 0 AND status IN ('Running', 'Stopping') AND visible_ms > ?1",
                    [now_ms as i64],
                )?)
            })
            .await?)
    }

    /// Keep a delivery's lease until `until_ms` (a call that may run longer
    /// than the default lease); false if that delivery no longer holds it.
    pub async fn extend(&self, seq: i64, delivery: i64, until_ms: u64) -> Result<bool, QueueError> {
        self.call(|reply| Op::Extend {
            seq,
            delivery,
            until_ms,
            reply,
        })
        .await
    }

    /// Forget finished tasks that ended before `before_ms` (their rows,
    /// payloads and events), at most `max` at a time; returns how many.
    pub async fn purge(&self, before_ms: u64, max: usize) -> Result<usize, QueueError> {
        Ok(self
            .db
            .run(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS purge_seqs (seq INTEGER PRIMARY KEY)",
                    [],
                )?;
                tx.execute("DELETE FROM purge_seqs", [])?;
                tx.execute(
                    "INSERT INTO purge_seqs SELECT seq FROM messages
                     WHERE done = 1 AND end_ms < ?1 LIMIT ?2",
                    params![before_ms as i64, max as i64],
                )?;
                tx.execute(
                    "DELETE FROM task_events WHERE seq IN (SELECT seq FROM purge_seqs)",
                    [],
                )?;
                let n = tx.execute(
                    "DELETE FROM messages WHERE seq IN (SELECT seq FROM purge_seqs)",
                    [],
                )?;
                tx.commit()?;
                Ok(n)
            })
            .await?)
    }

    /// Every queue with unfinished messages (for the dispatcher's start).
    pub async fn active_queues(&self) -> Result<Vec<String>, QueueError> {
        Ok(self
            .db
            .run(|c| {
                let mut st = c.prepare("SELECT DISTINCT queue FROM messages WHERE done = 0")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<Result<Vec<String>, _>>()?)
            })
            .await?)
    }

    /// Whether `queue` still holds unfinished messages.
    pub async fn has_pending(&self, queue: &str) -> Result<bool, QueueError> {
        let q = queue.to_owned();
        Ok(self
            .db
            .run(move |c| {
                Ok(c.query_row(
                    "SELECT 1 FROM messages WHERE queue = ?1 AND done = 0 LIMIT 1",
                    [q],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
            })
            .await?)
    }

    /// The earliest time a pending message of `queue` becomes visible.
    pub async fn next_visible(&self, queue: &str) -> Result<Option<u64>, QueueError> {
        let q = queue.to_owned();
        Ok(self
            .db
            .run(move |c| {
                Ok(c.query_row(
                    "SELECT min(visible_ms) FROM messages WHERE queue = ?1 AND done = 0",
                    [q],
                    |r| r.get::<_, Option<i64>>(0),
                )?
                .map(|v| v.max(0) as u64))
            })
            .await?)
    }

    /// Read-only access for task queries.
    pub(crate) fn db(&self) -> &Database {
        &self.db
    }

    /// Store (or replace) the async invoke config of a function's
    /// `qualifier` (`LATEST`, a version id or an alias name).
    pub async fn put_config(
        &self,
        account: &AccountId,
        function: &FunctionName,
        qualifier: &str,
        cfg: &AsyncConfig,
    ) -> Result<(), QueueError> {
        let (a, f, q) = (
            account.as_str().to_owned(),
            function.as_str().to_owned(),
            qualifier.to_owned(),
        );
        let doc = serde_json::to_string(cfg).expect("config serialises");
        Ok(self
            .db
            .run(move |c| {
                c.execute(
                    "INSERT INTO async_configs (account_id, function_name, qualifier, doc)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (account_id, function_name, qualifier)
                     DO UPDATE SET doc = excluded.doc",
                    params![a, f, q, doc],
                )?;
                Ok(())
            })
            .await?)
    }

    /// Remove a qualifier's config; true if there was one.
    pub async fn delete_config(
        &self,
        account: &AccountId,
        function: &FunctionName,
        qualifier: &str,
    ) -> Result<bool, QueueError> {
        let (a, f, q) = (
            account.as_str().to_owned(),
            function.as_str().to_owned(),
            qualifier.to_owned(),
        );
        Ok(self
            .db
            .run(move |c| {
                Ok(c.execute(
                    "DELETE FROM async_configs
                     WHERE account_id = ?1 AND function_name = ?2 AND qualifier = ?3",
                    params![a, f, q],
                )? > 0)
            })
            .await?)
    }

    /// Every stored config: (account, function, qualifier, document).
    pub async fn config_docs(&self) -> Result<Vec<(String, String, String, String)>, QueueError> {
        Ok(self
            .db
            .run(|c| {
                let mut st = c.prepare(
                    "SELECT account_id, function_name, qualifier, doc FROM async_configs",
                )?;
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                    ))
                })?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })
            .await?)
    }
}

fn checkpointer(reader: Database, stop: std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        let r = reader.with_conn(|c| {
            Ok(c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })?)
        });
        match r {
            Ok((log, done)) => tracing::trace!(log, done, "queue WAL checkpoint"),
            Err(e) => tracing::warn!(error = %e, "queue WAL checkpoint failed"),
        }
    }
}

fn writer(
    db: Database,
    mut rx: mpsc::UnboundedReceiver<Op>,
    batches: Arc<std::sync::atomic::AtomicU64>,
    metrics: Arc<QueueMetrics>,
) {
    let mut last_checkpoint = std::time::Instant::now();
    let mut depths = match db.with_conn(|c| Ok(unfinished_per_account(c)?)) {
        Ok(d) => d,
        Err(e) => {
            // Without the counts no bound can be checked: refuse to run
            // rather than accept without limit.
            tracing::error!(error = %e, "cannot count unfinished async messages; the queue writer stops");
            return;
        }
    };
    while let Some(first) = rx.blocking_recv() {
        let mut ops = vec![first];
        while ops.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let mut results: Vec<Reply> = Vec::with_capacity(ops.len());
        let mut tally = Tally::default();
        let started = std::time::Instant::now();
        let committed = db.with_conn(|c| {
            let tx = c.transaction()?;
            for op in &ops {
                results.push(apply(&tx, op, &mut tally, &depths));
            }
            tx.commit()?;
            Ok(())
        });
        batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if committed.is_ok() {
            metrics.committed(ops.len(), started.elapsed());
            apply_depths(&mut depths, std::mem::take(&mut tally.depth));
            tally.apply(&metrics);
        }
        if last_checkpoint.elapsed() >= WRITER_CHECKPOINT_EVERY {
            last_checkpoint = std::time::Instant::now();
            // PASSIVE never waits: busy (the checkpointer is at it) is fine.
            let r = db.with_conn(|c| {
                Ok(c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(0))?)
            });
            if let Err(e) = r {
                tracing::debug!(error = %e, "writer's WAL checkpoint did not run");
            }
        }
        if let Err(e) = committed {
            tracing::error!(error = %e, ops = ops.len(), "queue batch failed to commit");
            for op in ops {
                op.fail();
            }
            continue;
        }
        for (op, r) in ops.into_iter().zip(results) {
            op.answer(r);
        }
    }
}

enum Reply {
    Enqueued(Result<Enqueued, QueueError>),
    Claimed(Result<Vec<Claimed>, QueueError>),
    Completed(Result<Option<TaskStatus>, QueueError>),
    Stopped(Result<StopOutcome, QueueError>),
    Extended(Result<bool, QueueError>),
}

impl Op {
    fn fail(self) {
        match self {
            Op::Enqueue(_, r) => drop(r.send(Err(QueueError::Closed))),
            Op::Claim { reply, .. } => drop(reply.send(Err(QueueError::Closed))),
            Op::Complete { reply, .. } => drop(reply.send(Err(QueueError::Closed))),
            Op::Stop { reply, .. } => drop(reply.send(Err(QueueError::Closed))),
            Op::Extend { reply, .. } => drop(reply.send(Err(QueueError::Closed))),
        }
    }

    fn answer(self, r: Reply) {
        match (self, r) {
            (Op::Enqueue(_, tx), Reply::Enqueued(r)) => drop(tx.send(r)),
            (Op::Claim { reply, .. }, Reply::Claimed(r)) => drop(reply.send(r)),
            (Op::Complete { reply, .. }, Reply::Completed(r)) => drop(reply.send(r)),
            (Op::Stop { reply, .. }, Reply::Stopped(r)) => drop(reply.send(r)),
            (Op::Extend { reply, .. }, Reply::Extended(r)) => drop(reply.send(r)),
            (op, _) => op.fail(),
        }
    }
}

/// Unfinished messages per account, as committed.
type Depths = std::collections::HashMap<String, u64>;

fn unfinished_per_account(c: &rusqlite::Connection) -> rusqlite::Result<Depths> {
    let mut st =
        c.prepare("SELECT account_id, count(*) FROM messages WHERE done = 0 GROUP BY account_id")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    rows.map(|r| r.map(|(a, n)| (a, n.max(0) as u64))).collect()
}

/// Fold a committed batch's changes into the counts.
fn apply_depths(depths: &mut Depths, batch: std::collections::HashMap<String, i64>) {
    for (account, d) in batch {
        let n = depths.entry(account.clone()).or_default();
        *n = n.saturating_add_signed(d);
        if *n == 0 {
            depths.remove(&account);
        }
    }
}

fn apply(tx: &Transaction<'_>, op: &Op, tally: &mut Tally, depths: &Depths) -> Reply {
    match op {
        Op::Enqueue(m, _) => {
            let account = m.account.as_str();
            let depth = depths
                .get(account)
                .copied()
                .unwrap_or(0)
                .saturating_add_signed(tally.depth.get(account).copied().unwrap_or(0));
            if let Some(limit) = m.depth_limit.filter(|l| depth >= *l) {
                return Reply::Enqueued(Ok(Enqueued::Full { depth, limit }));
            }
            let r = enqueue(tx, m);
            if let Ok(Enqueued::New) = r {
                tally.add(Event::Enqueued);
                tally.depth_add(account, 1);
            }
            Reply::Enqueued(r.map_err(Into::into))
        }
        Op::Claim {
            now_ms,
            lease_ms,
            wants,
            ..
        } => Reply::Claimed(claim(tx, *now_ms, *lease_ms, wants, tally)),
        Op::Complete {
            seq,
            delivery,
            now_ms,
            completion,
            outbound,
            ..
        } => {
            Reply::Completed(
                complete(
                    tx,
                    *seq,
                    *delivery,
                    *now_ms,
                    completion,
                    outbound.as_ref(),
                    tally,
                )
                .map_err(Into::into),
            )
        }
        Op::Stop {
            account,
            function,
            task_id,
            now_ms,
            ..
        } => Reply::Stopped(
            stop(tx, account, function, task_id, *now_ms, tally).map_err(Into::into),
        ),
        Op::Extend {
            seq,
            delivery,
            until_ms,
            ..
        } => Reply::Extended(
            tx.prepare_cached(
                "UPDATE messages SET visible_ms = ?3 WHERE seq = ?1 AND deliveries = ?2 AND done = 0",
            )
            .and_then(|mut st| st.execute(params![seq, delivery, *until_ms as i64]))
            .map(|n| n > 0)
            .map_err(Into::into),
        ),
    }
}

fn event(
    tx: &Transaction<'_>,
    seq: i64,
    status: TaskStatus,
    now_ms: u64,
    detail: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO task_events (seq, status, ts_ms, detail) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![seq, status.as_str(), now_ms as i64, detail])?;
    Ok(())
}

fn enqueue(tx: &Transaction<'_>, m: &NewMessage) -> rusqlite::Result<Enqueued> {
    let headers = serde_json::to_string(&m.headers).expect("headers serialise");
    let inserted = tx
        .prepare_cached(
            "INSERT INTO messages (account_id, function_name, queue, task_id, request_id, payload,
                                   headers, status, visible_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'Enqueued', ?8, ?8)
             ON CONFLICT (account_id, function_name, task_id) DO NOTHING",
        )?
        .execute(params![
            m.account.as_str(),
            m.function.as_str(),
            m.queue,
            m.task_id,
            m.request_id,
            m.payload,
            headers,
            m.now_ms as i64
        ])?;
    if inserted == 0 {
        let request_id: String = tx
            .prepare_cached(
                "SELECT request_id FROM messages
                 WHERE account_id = ?1 AND function_name = ?2 AND task_id = ?3",
            )?
            .query_row(
                params![m.account.as_str(), m.function.as_str(), m.task_id],
                |r| r.get(0),
            )?;
        return Ok(Enqueued::Duplicate { request_id });
    }
    // The Enqueued event is the row's created_ms (see tasks.rs): one row
    // per accepted message keeps the accept path's transactions small.
    Ok(Enqueued::New)
}

fn claim(
    tx: &Transaction<'_>,
    now_ms: u64,
    lease_ms: u64,
    wants: &[(String, usize)],
    tally: &mut Tally,
) -> Result<Vec<Claimed>, QueueError> {
    let mut out = Vec::new();
    for (queue, n) in wants {
        let rows: Vec<(Claimed, String, i64)> = {
            let mut st = tx.prepare_cached(
                "SELECT seq, deliveries, account_id, function_name, task_id, request_id, payload,
                        headers, created_ms, retries, throttles, status, visible_ms
                 FROM messages WHERE queue = ?1 AND done = 0 AND visible_ms <= ?2
                 ORDER BY visible_ms, seq LIMIT ?3",
            )?;
            let rows = st.query_map(params![queue, now_ms as i64, *n as i64], |r| {
                let headers: String = r.get(7)?;
                Ok((
                    Claimed {
                        seq: r.get(0)?,
                        delivery: r.get::<_, i64>(1)? + 1,
                        queue: queue.clone(),
                        account: r.get(2)?,
                        function: r.get(3)?,
                        task_id: r.get(4)?,
                        request_id: r.get(5)?,
                        payload: r.get(6)?,
                        headers: serde_json::from_str(&headers).unwrap_or_default(),
                        created_ms: r.get::<_, i64>(8)? as u64,
                        retries: r.get::<_, i64>(9)? as u32,
                        throttles: r.get::<_, i64>(10)? as u32,
                    },
                    r.get(11)?,
                    r.get(12)?,
                ))
            })?;
            rows.collect::<Result<_, _>>()?
        };
        for (c, status, visible_ms) in rows {
            if status == TaskStatus::Stopping.as_str() {
                // Its dispatcher died while stopping it: it is stopped.
                finish(tx, c.seq, now_ms, TaskStatus::Stopped, None, None, tally)?;
                continue;
            }
            tally.add(Event::Dispatched);
            if status == TaskStatus::Running.as_str() {
                // Its previous delivery's lease ran out.
                tally.add(Event::Redelivered);
            }
            tally
                .waits_ms
                .push(now_ms.saturating_sub(visible_ms.max(0) as u64));
            tx.prepare_cached(
                "UPDATE messages SET status = 'Running', deliveries = ?2, visible_ms = ?3 WHERE seq = ?1",
            )?
            .execute(params![c.seq, c.delivery, (now_ms + lease_ms) as i64])?;
            event(tx, c.seq, TaskStatus::Running, now_ms, "")?;
            out.push(c);
        }
    }
    Ok(out)
}

fn finish(
    tx: &Transaction<'_>,
    seq: i64,
    now_ms: u64,
    status: TaskStatus,
    error: Option<&str>,
    ret: Option<&[u8]>,
    tally: &mut Tally,
) -> rusqlite::Result<()> {
    if let Some(e) = Event::finished(status) {
        tally.add(e);
    }
    let was: Option<(String, i64)> = tx
        .prepare_cached("SELECT account_id, done FROM messages WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((account, 0)) = &was {
        tally.depth_add(account, -1);
    }
    tx.prepare_cached(
        "UPDATE messages SET status = ?2, done = 1, end_ms = ?3, error = ?4, return_payload = ?5
         WHERE seq = ?1",
    )?
    .execute(params![seq, status.as_str(), now_ms as i64, error, ret])?;
    event(tx, seq, status, now_ms, error.unwrap_or(""))
}

fn complete(
    tx: &Transaction<'_>,
    seq: i64,
    delivery: i64,
    now_ms: u64,
    c: &Completion,
    outbound: Option<&Outbound>,
    tally: &mut Tally,
) -> rusqlite::Result<Option<TaskStatus>> {
    let row: Option<(String, i64, i64)> = tx
        .prepare_cached("SELECT status, deliveries, done FROM messages WHERE seq = ?1")?
        .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((status, deliveries, done)) = row else {
        return Ok(None);
    };
    if done != 0 || deliveries != delivery {
        return Ok(None);
    }
    if status == TaskStatus::Stopping.as_str() {
        finish(
            tx,
            seq,
            now_ms,
            TaskStatus::Stopped,
            Some("stopped by StopAsyncTask"),
            None,
            tally,
        )?;
        return Ok(Some(TaskStatus::Stopped));
    }
    match c {
        Completion::Retry {
            visible_ms,
            retries,
            throttles,
            detail,
        } => {
            tx.prepare_cached(
                "UPDATE messages SET status = 'Retrying', visible_ms = ?2, retries = ?3,
                        throttles = ?4, error = ?5 WHERE seq = ?1",
            )?
            .execute(params![seq, *visible_ms as i64, retries, throttles, detail])?;
            event(tx, seq, TaskStatus::Retrying, now_ms, detail)?;
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
                now_ms,
                *status,
                error.as_deref(),
                return_payload.as_deref(),
                tally,
            )?;
            if let Some(o) = outbound {
                tx.prepare_cached(
                    "INSERT INTO outbox (account_id, request_id, target, record, next_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    o.account,
                    o.request_id,
                    o.target,
                    o.record,
                    now_ms as i64
                ])?;
            }
            Ok(Some(*status))
        }
    }
}

fn stop(
    tx: &Transaction<'_>,
    account: &str,
    function: &str,
    task_id: &str,
    now_ms: u64,
    tally: &mut Tally,
) -> rusqlite::Result<StopOutcome> {
    let row: Option<(i64, String, i64)> = tx
        .prepare_cached(
            "SELECT seq, status, visible_ms FROM messages
             WHERE account_id = ?1 AND function_name = ?2 AND task_id = ?3",
        )?
        .query_row(params![account, function, task_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((seq, status, _visible)) = row else {
        return Ok(StopOutcome::NotFound);
    };
    let status = TaskStatus::parse(&status).unwrap_or(TaskStatus::Invalid);
    match status {
        s if s.is_final() => Ok(StopOutcome::AlreadyFinished(s)),
        TaskStatus::Stopping => Ok(StopOutcome::Stopping { seq }),
        TaskStatus::Running => {
            tx.prepare_cached("UPDATE messages SET status = 'Stopping' WHERE seq = ?1")?
                .execute([seq])?;
            event(
                tx,
                seq,
                TaskStatus::Stopping,
                now_ms,
                "stopped by StopAsyncTask",
            )?;
            Ok(StopOutcome::Stopping { seq })
        }
        _ => {
            finish(
                tx,
                seq,
                now_ms,
                TaskStatus::Stopped,
                Some("stopped by StopAsyncTask"),
                None,
                tally,
            )?;
            Ok(StopOutcome::Stopped)
        }
    }
}
