//! The durable async-invocation queue, on one of two backends behind one
//! API ([`Queue`]):
//!
//! - SQLite (`state_dir/queue.db`, [`sqlite`]): the default, one gateway
//!   owns the file;
//! - PostgreSQL ([`postgres`]): one queue shared by every gateway of a
//!   cluster, claimed with `FOR UPDATE SKIP LOCKED`.
//!
//! On both, writes are group-committed (concurrent enqueues share one
//! commit, and a 202 is only sent once its row is committed).
//!
//! A message is also the async task FC reports: its row holds the status,
//! the attempt counters and, while it is being invoked, the lease (the
//! `visible_ms` column is the lease's expiry). A dispatcher that dies
//! mid-flight loses nothing: once `visible_ms` passes, the message is
//! claimed again. Completions carry the delivery number they were claimed
//! with, so a late answer from an expired delivery changes nothing.

pub mod bench;
pub mod cluster;
pub mod config;
pub mod copy;
pub mod dispatch;
pub mod invoker;
pub mod metrics;
pub mod postgres;
pub mod sqlite;
pub mod tasks;

/// The stored header that carries a call's qualifier (a version or an
/// alias) from enqueue to delivery; callers' own `x-kiln-` headers are
/// dropped before a message is stored, so only the gateway sets it.
pub const QUALIFIER_HEADER: &str = "x-kiln-qualifier";

/// The qualifier a message was enqueued with, as written (`LATEST` when
/// its headers name none).
pub fn stored_qualifier_name(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == QUALIFIER_HEADER)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| crate::versions::LATEST.to_owned())
}

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_core::{AccountId, FunctionName};
use kiln_store::pg::PgStoreError;
use kiln_store::{Migration, StoreError};
use serde::Serialize;

pub use config::AsyncConfig;
use metrics::QueueMetrics;
use postgres::{PgQueue, TickKey};
use sqlite::SqliteQueue;

/// Why a queue operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Db(#[from] StoreError),
    #[error("The shared async queue (PostgreSQL) failed")]
    Pg(#[from] PgStoreError),
    #[error("The queue writer has stopped")]
    Closed,
    #[error("The async queue transaction failed: {0}")]
    Failed(String),
    #[error("Stored async config of {0} is unreadable")]
    Corrupt(String, #[source] serde_json::Error),
}

impl From<rusqlite::Error> for QueueError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(StoreError::Sqlite(e))
    }
}

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "async messages, task events, async invoke configs",
        sql: "
        CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            queue TEXT NOT NULL,
            task_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            payload BLOB NOT NULL,
            headers TEXT NOT NULL,
            status TEXT NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            retries INTEGER NOT NULL DEFAULT 0,
            throttles INTEGER NOT NULL DEFAULT 0,
            deliveries INTEGER NOT NULL DEFAULT 0,
            visible_ms INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            end_ms INTEGER,
            error TEXT,
            return_payload BLOB,
            UNIQUE (account_id, function_name, task_id)
        );
        CREATE INDEX messages_pending ON messages(queue, visible_ms) WHERE done = 0;
        CREATE INDEX messages_by_function ON messages(account_id, function_name, seq);
        CREATE TABLE task_events (
            event_id INTEGER PRIMARY KEY AUTOINCREMENT,
            seq INTEGER NOT NULL,
            status TEXT NOT NULL,
            ts_ms INTEGER NOT NULL,
            detail TEXT NOT NULL
        );
        CREATE INDEX task_events_by_task ON task_events(seq);
        CREATE TABLE async_configs (
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            doc TEXT NOT NULL,
            PRIMARY KEY (account_id, function_name)
        );
    ",
    },
    Migration {
        name: "destination outbox",
        sql: "
        CREATE TABLE outbox (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            account_id TEXT NOT NULL,
            request_id TEXT NOT NULL,
            target TEXT NOT NULL,
            record TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_ms INTEGER NOT NULL
        );
        CREATE INDEX outbox_due ON outbox(next_ms);
    ",
    },
    // A config per qualifier (existing ones are LATEST's).
    Migration {
        name: "async invoke configs per qualifier",
        sql: "
        CREATE TABLE async_configs_by_qualifier (
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            qualifier TEXT NOT NULL,
            doc TEXT NOT NULL,
            PRIMARY KEY (account_id, function_name, qualifier)
        );
        INSERT INTO async_configs_by_qualifier (account_id, function_name, qualifier, doc)
            SELECT account_id, function_name, 'LATEST', doc FROM async_configs;
        DROP TABLE async_configs;
        ALTER TABLE async_configs_by_qualifier RENAME TO async_configs;
    ",
    },
];

/// FC's async task statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum TaskStatus {
    Enqueued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Stopping,
    Stopped,
    Expired,
    Invalid,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 9] = [
        Self::Enqueued,
        Self::Running,
        Self::Retrying,
        Self::Succeeded,
        Self::Failed,
        Self::Stopping,
        Self::Stopped,
        Self::Expired,
        Self::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enqueued => "Enqueued",
            Self::Running => "Running",
            Self::Retrying => "Retrying",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Stopping => "Stopping",
            Self::Stopped => "Stopped",
            Self::Expired => "Expired",
            Self::Invalid => "Invalid",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// A finished task never changes again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Stopped | Self::Expired | Self::Invalid
        )
    }
}

/// A message to enqueue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub account: AccountId,
    pub function: FunctionName,
    /// The queue it waits in: the account's, or the function's own.
    pub queue: String,
    pub task_id: String,
    pub request_id: String,
    pub payload: Vec<u8>,
    /// Caller headers passed to the function.
    pub headers: Vec<(String, String)>,
    pub now_ms: u64,
    /// The most unfinished messages the account may have: a new one beyond
    /// it is refused ([`Enqueued::Full`]). `None` for what the service
    /// enqueues itself (destination records of accepted messages), which
    /// must never be dropped.
    pub depth_limit: Option<u64>,
}

/// What an enqueue did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    New,
    /// The task id was already taken by this function: one task.
    Duplicate {
        request_id: String,
    },
    /// Nothing written: the account already has `depth` unfinished
    /// messages and its bound is `limit`.
    Full {
        depth: u64,
        limit: u64,
    },
}

/// A message leased to a dispatcher.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub seq: i64,
    /// The delivery number this lease holds; completions must name it.
    pub delivery: i64,
    pub queue: String,
    pub account: String,
    pub function: String,
    pub task_id: String,
    pub request_id: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub created_ms: u64,
    /// Retries already spent on function errors.
    pub retries: u32,
    /// Throttled or system-failed deliveries so far (drives the backoff).
    pub throttles: u32,
}

/// The new state of a claimed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// Back in the queue, visible again at `visible_ms`.
    Retry {
        visible_ms: u64,
        retries: u32,
        throttles: u32,
        detail: String,
    },
    /// Finished with this status.
    Final {
        status: TaskStatus,
        error: Option<String>,
        return_payload: Option<Vec<u8>>,
    },
}

/// A destination record to deliver, written with the task's final state
/// (same transaction), so a crash cannot lose it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    pub account: String,
    pub request_id: String,
    /// A function ARN or an https URL.
    pub target: String,
    pub record: String,
}

/// A pending destination delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    pub id: i64,
    pub attempts: u32,
    pub outbound: Outbound,
}

/// What stopping a task did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// It was waiting: it is Stopped and will not run.
    Stopped,
    /// It is being invoked: Stopping until the dispatcher aborts it.
    Stopping {
        seq: i64,
    },
    NotFound,
    AlreadyFinished(TaskStatus),
}

/// The queue: its backend and the one API the gateway uses.
#[derive(Clone)]
pub struct Queue {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Sqlite(SqliteQueue),
    Postgres(PgQueue),
}

/// Run the same call on whichever backend the queue has.
macro_rules! on_backend {
    ($self:ident, $b:ident => $e:expr) => {
        match &$self.backend {
            Backend::Sqlite($b) => $e,
            Backend::Postgres($b) => $e,
        }
    };
}

impl Queue {
    /// Open (creating) the SQLite queue at `path` and start its writer.
    pub fn open(path: &Path) -> Result<Self, QueueError> {
        Ok(Self {
            backend: Backend::Sqlite(SqliteQueue::open(path)?),
        })
    }

    pub fn open_in_memory() -> Result<Self, QueueError> {
        Ok(Self {
            backend: Backend::Sqlite(SqliteQueue::open_in_memory()?),
        })
    }

    /// The shared queue on PostgreSQL (see [`postgres`]).
    pub fn postgres(q: PgQueue) -> Self {
        Self {
            backend: Backend::Postgres(q),
        }
    }

    /// The PostgreSQL backend, in a cluster.
    pub fn shared(&self) -> Option<&PgQueue> {
        match &self.backend {
            Backend::Postgres(p) => Some(p),
            Backend::Sqlite(_) => None,
        }
    }

    pub(crate) fn sqlite(&self) -> Option<&SqliteQueue> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s),
            Backend::Postgres(_) => None,
        }
    }

    /// The queue's metrics (register them with the service's registry).
    pub fn metrics(&self) -> &Arc<QueueMetrics> {
        on_backend!(self, b => b.metrics())
    }

    /// Refresh the depth-per-account and oldest-message-age gauges from
    /// the database.
    pub async fn refresh_depth(&self, now_ms: u64) -> Result<(), QueueError> {
        match &self.backend {
            Backend::Sqlite(s) => s.refresh_depth(now_ms).await,
            Backend::Postgres(p) => {
                let (per_account, oldest) = p.depth().await?;
                let age = oldest.map_or(0, |o| now_ms.saturating_sub(o.max(0) as u64));
                p.metrics()
                    .set_depth(per_account, Duration::from_millis(age));
                Ok(())
            }
        }
    }

    /// Transactions committed by the writer so far.
    pub fn batches(&self) -> u64 {
        on_backend!(self, b => b.batches())
    }

    /// Durably enqueue; returns once the row is committed.
    pub async fn enqueue(&self, m: NewMessage) -> Result<Enqueued, QueueError> {
        on_backend!(self, b => b.enqueue(m).await)
    }

    /// Enqueue a timer tick's message, the tick claimed in the same
    /// transaction on PostgreSQL (`None`: another gateway fired it). On
    /// SQLite the message's task id, unique per tick, is the claim.
    pub async fn enqueue_tick(
        &self,
        m: NewMessage,
        tick: TickKey,
    ) -> Result<Option<Enqueued>, QueueError> {
        match &self.backend {
            Backend::Sqlite(s) => s.enqueue(m).await.map(Some),
            Backend::Postgres(p) => p.enqueue_tick(m, tick).await,
        }
    }

    /// Lease up to `n` visible messages from each named queue, oldest first,
    /// until `now_ms + lease_ms`.
    pub async fn claim(
        &self,
        now_ms: u64,
        lease_ms: u64,
        wants: Vec<(String, usize)>,
    ) -> Result<Vec<Claimed>, QueueError> {
        on_backend!(self, b => b.claim(now_ms, lease_ms, wants).await)
    }

    /// Record the outcome of a delivery; `None` if that delivery's lease
    /// was lost (expired and claimed again, or the task finished).
    pub async fn complete(
        &self,
        seq: i64,
        delivery: i64,
        now_ms: u64,
        completion: Completion,
    ) -> Result<Option<TaskStatus>, QueueError> {
        self.complete_with(seq, delivery, now_ms, completion, None)
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
        on_backend!(self, b => b.complete_with(seq, delivery, now_ms, completion, outbound).await)
    }

    /// Outbox entries due at `now_ms`, oldest first (on PostgreSQL taken
    /// for a while, so no other gateway delivers them meanwhile).
    pub async fn outbox_due(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<OutboxEntry>, QueueError> {
        on_backend!(self, b => b.outbox_due(now_ms, limit).await)
    }

    /// A delivery is done (or abandoned): drop it from the outbox.
    pub async fn outbox_remove(&self, id: i64) -> Result<(), QueueError> {
        on_backend!(self, b => b.outbox_remove(id).await)
    }

    /// A delivery failed: try again at `next_ms`.
    pub async fn outbox_retry(
        &self,
        id: i64,
        attempts: u32,
        next_ms: u64,
    ) -> Result<(), QueueError> {
        on_backend!(self, b => b.outbox_retry(id, attempts, next_ms).await)
    }

    /// StopAsyncTask. A running task becomes Stopping; on PostgreSQL the
    /// gateway running it is notified.
    pub async fn stop(
        &self,
        account: &AccountId,
        function: &FunctionName,
        task_id: &str,
        now_ms: u64,
    ) -> Result<StopOutcome, QueueError> {
        on_backend!(self, b => b.stop(account, function, task_id, now_ms).await)
    }

    /// At the dispatcher's start: make the leases of the previous process
    /// visible now. SQLite: every lease (the file has one owner).
    /// PostgreSQL: only this gateway's own (other gateways' live leases
    /// run out instead).
    pub async fn recover(&self, now_ms: u64) -> Result<usize, QueueError> {
        on_backend!(self, b => b.recover(now_ms).await)
    }

    /// Keep a delivery's lease until `until_ms` (a call that may run longer
    /// than the default lease); false if that delivery no longer holds it.
    pub async fn extend(&self, seq: i64, delivery: i64, until_ms: u64) -> Result<bool, QueueError> {
        on_backend!(self, b => b.extend(seq, delivery, until_ms).await)
    }

    /// Forget finished tasks that ended before `before_ms` (their rows,
    /// payloads and events), at most `max` at a time; returns how many.
    pub async fn purge(&self, before_ms: u64, max: usize) -> Result<usize, QueueError> {
        on_backend!(self, b => b.purge(before_ms, max).await)
    }

    /// Every queue with unfinished messages (for the dispatcher's start).
    pub async fn active_queues(&self) -> Result<Vec<String>, QueueError> {
        on_backend!(self, b => b.active_queues().await)
    }

    /// Whether `queue` still holds unfinished messages.
    pub async fn has_pending(&self, queue: &str) -> Result<bool, QueueError> {
        on_backend!(self, b => b.has_pending(queue).await)
    }

    /// The earliest time a pending message of `queue` becomes visible.
    pub async fn next_visible(&self, queue: &str) -> Result<Option<u64>, QueueError> {
        on_backend!(self, b => b.next_visible(queue).await)
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
        match &self.backend {
            Backend::Sqlite(s) => s.put_config(account, function, qualifier, cfg).await,
            Backend::Postgres(p) => {
                let doc = serde_json::to_string(cfg).expect("config serialises");
                p.put_config(account.as_str(), function.as_str(), qualifier, &doc)
                    .await
            }
        }
    }

    /// Remove a qualifier's config; true if there was one.
    pub async fn delete_config(
        &self,
        account: &AccountId,
        function: &FunctionName,
        qualifier: &str,
    ) -> Result<bool, QueueError> {
        match &self.backend {
            Backend::Sqlite(s) => s.delete_config(account, function, qualifier).await,
            Backend::Postgres(p) => {
                p.delete_config(account.as_str(), function.as_str(), qualifier)
                    .await
            }
        }
    }

    /// Every stored config: (account, function, qualifier, config).
    pub async fn configs(&self) -> Result<Vec<(String, String, String, AsyncConfig)>, QueueError> {
        let docs = match &self.backend {
            Backend::Sqlite(s) => s.config_docs().await?,
            Backend::Postgres(p) => p.config_docs().await?,
        };
        docs.into_iter()
            .map(|(a, f, q, doc)| {
                let cfg = serde_json::from_str(&doc)
                    .map_err(|e| QueueError::Corrupt(format!("{a}/{f} ({q})"), e))?;
                Ok((a, f, q, cfg))
            })
            .collect()
    }

    /// (status, retries, throttles) of a task, for tests.
    #[cfg(test)]
    pub(crate) async fn status_row(&self, task_id: &str) -> (String, i64, i64) {
        match &self.backend {
            Backend::Sqlite(s) => {
                let t = task_id.to_owned();
                s.db()
                    .run(move |c| {
                        Ok(c.query_row(
                            "SELECT status, retries, throttles FROM messages WHERE task_id = ?1",
                            [t],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                        )?)
                    })
                    .await
                    .unwrap()
            }
            Backend::Postgres(p) => p.status_row(task_id).await,
        }
    }

    /// The lease expiry (or next visibility) of a task, for tests.
    #[cfg(test)]
    pub(crate) async fn visible_ms_of(&self, task_id: &str) -> i64 {
        match &self.backend {
            Backend::Sqlite(s) => {
                let t = task_id.to_owned();
                s.db()
                    .run(move |c| {
                        Ok(c.query_row(
                            "SELECT visible_ms FROM messages WHERE task_id = ?1",
                            [t],
                            |r| r.get(0),
                        )?)
                    })
                    .await
                    .unwrap()
            }
            Backend::Postgres(p) => {
                let c = p.db().conn().await.unwrap();
                c.query_one(
                    "SELECT visible_ms FROM async_messages WHERE task_id = $1",
                    &[&task_id],
                )
                .await
                .unwrap()
                .get(0)
            }
        }
    }

    /// Finished messages of an account, for tests.
    #[cfg(test)]
    pub(crate) async fn finished_of(&self, account: &str) -> i64 {
        match &self.backend {
            Backend::Sqlite(s) => {
                let a = account.to_owned();
                s.db()
                    .run(move |c| {
                        Ok(c.query_row(
                            "SELECT count(*) FROM messages WHERE account_id = ?1 AND done = 1",
                            [a],
                            |r| r.get(0),
                        )?)
                    })
                    .await
                    .unwrap()
            }
            Backend::Postgres(p) => {
                let c = p.db().conn().await.unwrap();
                c.query_one(
                    "SELECT count(*) FROM async_messages WHERE account_id = $1 AND done",
                    &[&account],
                )
                .await
                .unwrap()
                .get(0)
            }
        }
    }

    /// Rows of `table` (`messages` or `outbox`), for tests.
    #[cfg(test)]
    pub(crate) async fn count_rows(&self, table: &str) -> i64 {
        match &self.backend {
            Backend::Sqlite(s) => {
                let sql = format!("SELECT count(*) FROM {table}");
                s.db()
                    .run(move |c| Ok(c.query_row(&sql, [], |r| r.get(0))?))
                    .await
                    .unwrap()
            }
            Backend::Postgres(p) => p.count(&format!("async_{table}")).await,
        }
    }
}

/// The backoff before the next delivery after `throttles` throttled or
/// system-failed deliveries: 0.5 s doubling, capped.
pub fn backoff(throttles: u32, cap: Duration) -> Duration {
    let ms = 500u64.saturating_mul(1u64 << throttles.saturating_sub(1).min(20));
    Duration::from_millis(ms).min(cap)
}

#[cfg(test)]
mod cluster_tests;
#[cfg(test)]
mod test_backends;
#[cfg(test)]
mod tests;
