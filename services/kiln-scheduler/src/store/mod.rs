//! The scheduler's own state: nodes, instances, provisions, account
//! limits, revocations and bootstrap tokens, written behind the in-memory
//! core in batches ([`Writer`]).
//!
//! Two backends implement the same traits: SQLite (`state_dir/scheduler.db`,
//! one box: [`SqliteSchedulerStore`]) and PostgreSQL (a cluster with a
//! leader and standbys: [`PgSchedulerStore`], every write fenced by the
//! leader's token). Both store the same rows ([`codec`]).

mod codec;
pub mod copy;
pub mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

use kiln_core::{AccountId, FcError, NodeId};
use kiln_internal_api::AccountLimits;
use kiln_store::StoreError;
use tokio::sync::{mpsc, oneshot};

use crate::placement::{Change, InstanceRecord, NodeRecord, ProvisionRecord};
use crate::sealed_env::SealPassError;

pub use postgres::PgSchedulerStore;
pub use sqlite::SqliteSchedulerStore;

/// Why the scheduler's state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerStoreError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("Cannot seal the stored function environments")]
    Seal(#[from] SealPassError),
    #[error("Stored {what} {id} is unreadable: {reason}")]
    Corrupt {
        what: &'static str,
        id: String,
        reason: String,
    },
    /// PostgreSQL refused or failed; `NotLeader` when this scheduler's
    /// lease is gone (see [`SchedulerStoreError::is_not_leader`]).
    #[error(transparent)]
    Postgres(#[from] kiln_store::pg::PgStoreError),
}

impl SchedulerStoreError {
    /// A write refused because another scheduler leads now: this one must
    /// stop acting on its state.
    pub fn is_not_leader(&self) -> bool {
        matches!(
            self,
            Self::Postgres(kiln_store::pg::PgStoreError::NotLeader { .. })
        )
    }
}

impl From<rusqlite::Error> for SchedulerStoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Store(StoreError::Sqlite(e))
    }
}

/// Where nodes and instances are kept across restarts.
pub trait SchedulerStore: Send + Sync + 'static {
    fn load(&self) -> Result<(Vec<NodeRecord>, Vec<InstanceRecord>), SchedulerStoreError>;
    /// Accounts with limits of their own.
    fn load_account_limits(&self) -> Result<Vec<(AccountId, AccountLimits)>, SchedulerStoreError>;
    /// Provision configurations.
    fn load_provisions(&self) -> Result<Vec<ProvisionRecord>, SchedulerStoreError>;
    /// Apply changes in order, all or none.
    fn apply(&self, changes: &[Change]) -> Result<(), SchedulerStoreError>;
}

fn corrupt(what: &'static str, id: &str, reason: impl ToString) -> SchedulerStoreError {
    SchedulerStoreError::Corrupt {
        what,
        id: id.to_owned(),
        reason: reason.to_string(),
    }
}

/// What redeeming a bootstrap token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    /// Valid and now used: join as this node.
    Node(NodeId),
    Unknown,
    Used {
        node_id: NodeId,
        used_at_ms: u64,
    },
    Expired {
        node_id: NodeId,
        expires_at_ms: u64,
    },
}

impl Redeemed {
    /// The answer for a stored token `(node, expires, used)` redeemed at
    /// `now_ms` (the store marks it used when this is `Node`).
    fn of(
        row: Option<(String, i64, Option<i64>)>,
        now_ms: u64,
    ) -> Result<Self, SchedulerStoreError> {
        let Some((node, expires, used)) = row else {
            return Ok(Self::Unknown);
        };
        let node_id = codec::decode_node_id("bootstrap token", &node)?;
        Ok(match used {
            Some(at) => Self::Used {
                node_id,
                used_at_ms: at.max(0) as u64,
            },
            None if (expires.max(0) as u64) <= now_ms => Self::Expired {
                node_id,
                expires_at_ms: expires.max(0) as u64,
            },
            None => Self::Node(node_id),
        })
    }
}

/// A bootstrap token as stored (its SHA-256; never the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub token_sha256: String,
    pub node_id: NodeId,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub used_at_ms: Option<u64>,
}

/// Revocations and bootstrap tokens: written synchronously (a revocation
/// is on disk before the operator is told it happened; a token is used at
/// most once even across a crash).
pub trait TrustStore: Send + Sync + 'static {
    fn revoked_nodes(&self) -> Result<Vec<(NodeId, u64)>, SchedulerStoreError>;
    /// Revoke `node`; answers when it was revoked (earlier, if it was
    /// already).
    fn revoke_node(&self, node: &NodeId, now_ms: u64) -> Result<u64, SchedulerStoreError>;
    fn add_bootstrap_token(
        &self,
        token_sha256: &str,
        node: &NodeId,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<(), SchedulerStoreError>;
    /// Mark the token used if it is unused and unexpired, atomically.
    fn redeem_bootstrap_token(
        &self,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<Redeemed, SchedulerStoreError>;
    /// The client certificate (SHA-256) each node last registered with.
    fn node_holders(&self) -> Result<Vec<(NodeId, [u8; 32])>, SchedulerStoreError>;
    fn set_node_holder(&self, node: &NodeId, sha256: &[u8; 32]) -> Result<(), SchedulerStoreError>;
    /// Every bootstrap token, used or not (for copying a store).
    fn bootstrap_tokens(&self) -> Result<Vec<StoredToken>, SchedulerStoreError>;
    /// Store `token` as it was stored elsewhere (for copying a store).
    fn restore_bootstrap_token(&self, token: &StoredToken) -> Result<(), SchedulerStoreError>;
}

enum WriterMsg {
    Changes(Vec<Change>),
    Flush(oneshot::Sender<()>),
}

/// Write-behind: the core's journal goes to a channel, and one task applies
/// whatever accumulated in a single transaction. A lost write costs nothing
/// lasting: the agents' reports reconcile the difference.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<WriterMsg>,
}

impl Writer {
    pub fn spawn(store: std::sync::Arc<dyn SchedulerStore>) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<WriterMsg>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = Vec::new();
                let mut flushes = Vec::new();
                let mut next = Some(first);
                while let Some(m) = next.take() {
                    match m {
                        WriterMsg::Changes(c) => batch.extend(c),
                        WriterMsg::Flush(f) => flushes.push(f),
                    }
                    if batch.len() < 10_000 {
                        next = rx.try_recv().ok();
                    }
                }
                if !batch.is_empty() {
                    let store = store.clone();
                    let n = batch.len();
                    let r = tokio::task::spawn_blocking(move || store.apply(&batch)).await;
                    match r {
                        Ok(Ok(())) => tracing::trace!(changes = n, "scheduler state persisted"),
                        Ok(Err(e)) => {
                            tracing::error!(error = %kiln_core::error_chain(&e), changes = n, "cannot persist scheduler state")
                        }
                        Err(e) => tracing::error!(error = %e, "persistence task failed"),
                    }
                }
                for f in flushes {
                    let _ = f.send(());
                }
            }
        });
        (Self { tx }, task)
    }

    pub fn send(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            let _ = self.tx.send(WriterMsg::Changes(changes));
        }
    }

    /// Resolves once everything sent before is written.
    pub async fn flush(&self) -> Result<(), FcError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Flush(tx))
            .map_err(|_| FcError::internal("the state writer has stopped"))?;
        rx.await
            .map_err(|_| FcError::internal("the state writer has stopped"))
    }
}
