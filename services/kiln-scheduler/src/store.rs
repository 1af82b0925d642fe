//! The scheduler's own database (`state_dir/scheduler.db`): nodes and
//! instances, written behind the in-memory core in batches.

use std::path::Path;

use kiln_core::{AccountId, FcError, InstanceId, NodeId};
use kiln_internal_api::AccountLimits;
use std::sync::Arc;

use kiln_store::seal::Sealer;
use kiln_store::{Database, Migration, StoreError};
use rusqlite::{params, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use crate::placement::{Change, InstanceRecord, NodeRecord, ProvisionRecord};
use crate::sealed_env::{self, instance_aad, provision_aad, SealPassError};

const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "nodes and instances",
        sql: "
        CREATE TABLE nodes (
            node_id TEXT PRIMARY KEY,
            agent_url TEXT NOT NULL,
            capacity TEXT NOT NULL,        -- JSON NodeCapacity
            labels TEXT NOT NULL,          -- JSON NodeLabels
            bound_account TEXT,
            state TEXT NOT NULL,
            last_heartbeat_ms INTEGER NOT NULL
        );
        CREATE TABLE instances (
            instance_id TEXT PRIMARY KEY,
            node_id TEXT NOT NULL REFERENCES nodes(node_id),
            spec TEXT NOT NULL,            -- JSON InstanceSpec
            state TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL
        );
        CREATE INDEX instances_node ON instances(node_id);
    ",
    },
    Migration {
        name: "per-account limits",
        sql: "
        CREATE TABLE account_limits (
            account_id TEXT PRIMARY KEY,
            limits TEXT NOT NULL           -- JSON AccountLimits
        );
    ",
    },
    Migration {
        name: "node validity",
        sql: "
        ALTER TABLE nodes ADD COLUMN registered_at_ms INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE nodes ADD COLUMN reprovision INTEGER NOT NULL DEFAULT 0;
    ",
    },
    Migration {
        name: "provisioned instances",
        sql: "
        CREATE TABLE provisions (
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            spec TEXT,                     -- JSON InstanceSpec; NULL while paused
            config TEXT NOT NULL,          -- JSON ProvisionConfig
            PRIMARY KEY (account_id, function_name)
        );
        ALTER TABLE instances ADD COLUMN provisioned INTEGER NOT NULL DEFAULT 0;
    ",
    },
    Migration {
        name: "revoked nodes and bootstrap tokens",
        sql: "
        CREATE TABLE revoked_nodes (
            node_id TEXT PRIMARY KEY,
            revoked_at_ms INTEGER NOT NULL
        );
        CREATE TABLE bootstrap_tokens (
            token_sha256 TEXT PRIMARY KEY, -- hex; the token itself is never stored
            node_id TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL,
            expires_at_ms INTEGER NOT NULL,
            used_at_ms INTEGER              -- NULL until redeemed (once)
        );
    ",
    },
    Migration {
        name: "sealed function environments",
        sql: "
        ALTER TABLE instances ADD COLUMN env_sealed TEXT;   -- crate::sealed_env
        ALTER TABLE provisions ADD COLUMN env_sealed TEXT;
    ",
    },
    Migration {
        name: "node certificate holders",
        sql: "
        CREATE TABLE node_holders (
            node_id TEXT PRIMARY KEY,
            certificate_sha256 TEXT NOT NULL  -- hex, of the client certificate
        );
    ",
    },
];

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

/// The SQLite store. Function environments in the specs it keeps are
/// sealed with `sealer` ([`crate::sealed_env`]).
#[derive(Clone)]
pub struct SqliteSchedulerStore {
    db: Database,
    sealer: Arc<Sealer>,
}

impl SqliteSchedulerStore {
    pub fn open(path: &Path, sealer: Arc<Sealer>) -> Result<Self, SchedulerStoreError> {
        Self::ready(Database::open(path, MIGRATIONS)?, sealer)
    }

    /// A store that lives as long as the process (tests), sealing with a
    /// random key.
    pub fn open_in_memory() -> Result<Self, SchedulerStoreError> {
        Self::ready(
            Database::open_in_memory(MIGRATIONS)?,
            Arc::new(Sealer::random()),
        )
    }

    /// The one key tests reopen their stores with.
    #[cfg(test)]
    pub(crate) fn test_sealer() -> Arc<Sealer> {
        Arc::new(Sealer::new(&[7u8; 32], &[]))
    }

    fn ready(db: Database, sealer: Arc<Sealer>) -> Result<Self, SchedulerStoreError> {
        let mut sealed = Ok(0);
        db.with_conn(|c| {
            // Deleted and overwritten values are zeroed in the file, not
            // left in free space.
            c.pragma_update(None, "secure_delete", "ON")
                .map_err(StoreError::Sqlite)?;
            sealed = sealed_env::seal_all(c, &sealer);
            Ok(())
        })?;
        sealed?;
        Ok(Self { db, sealer })
    }
}

fn corrupt(what: &'static str, id: &str, reason: impl ToString) -> SchedulerStoreError {
    SchedulerStoreError::Corrupt {
        what,
        id: id.to_owned(),
        reason: reason.to_string(),
    }
}

impl SchedulerStore for SqliteSchedulerStore {
    fn load(&self) -> Result<(Vec<NodeRecord>, Vec<InstanceRecord>), SchedulerStoreError> {
        self.db
            .with_conn(|c| {
                let nodes = c
                    .prepare(
                        "SELECT node_id, agent_url, capacity, labels, bound_account, state, \
                         last_heartbeat_ms, registered_at_ms, reprovision FROM nodes \
                         ORDER BY node_id",
                    )?
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, Option<String>>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, i64>(6)?,
                            r.get::<_, i64>(7)?,
                            r.get::<_, bool>(8)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                let instances = c
                    .prepare(
                        "SELECT instance_id, node_id, spec, state, created_at_ms, provisioned, \
                         env_sealed FROM instances ORDER BY instance_id",
                    )?
                    .query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, i64>(4)?,
                            r.get::<_, bool>(5)?,
                            r.get::<_, Option<String>>(6)?,
                        ))
                    })?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((nodes, instances))
            })
            .map_err(SchedulerStoreError::from)
            .and_then(|(nodes, instances)| {
                let nodes = nodes
                    .into_iter()
                    .map(
                        |(id, url, cap, labels, bound, state, hb, since, reprovision)| {
                            let e = |r: String| corrupt("node", &id, r);
                            Ok(NodeRecord {
                                node_id: id.parse().map_err(|x| e(format!("{x}")))?,
                                agent_url: url,
                                capacity: serde_json::from_str(&cap)
                                    .map_err(|x| e(x.to_string()))?,
                                labels: serde_json::from_str(&labels)
                                    .map_err(|x| e(x.to_string()))?,
                                bound_account: bound
                                    .map(|a| a.parse())
                                    .transpose()
                                    .map_err(|x| e(format!("{x}")))?,
                                state: state.parse().map_err(e)?,
                                last_heartbeat_ms: hb.max(0) as u64,
                                registered_at_ms: since.max(0) as u64,
                                reprovision,
                            })
                        },
                    )
                    .collect::<Result<Vec<_>, SchedulerStoreError>>()?;
                let instances = instances
                    .into_iter()
                    .map(|(id, node, spec, state, created, provisioned, env)| {
                        let e = |r: String| corrupt("instance", &id, r);
                        let spec = sealed_env::join(
                            &self.sealer,
                            &instance_aad(&id),
                            &spec,
                            env.as_deref(),
                        )
                        .map_err(e)?;
                        Ok(InstanceRecord {
                            instance_id: id.parse().map_err(|x| e(format!("{x}")))?,
                            node_id: node.parse().map_err(|x| e(format!("{x}")))?,
                            spec,
                            state: state.parse().map_err(e)?,
                            created_at_ms: created.max(0) as u64,
                            provisioned,
                        })
                    })
                    .collect::<Result<Vec<_>, SchedulerStoreError>>()?;
                Ok((nodes, instances))
            })
    }

    fn load_account_limits(&self) -> Result<Vec<(AccountId, AccountLimits)>, SchedulerStoreError> {
        let rows = self.db.with_conn(|c| {
            Ok(
                c.prepare("SELECT account_id, limits FROM account_limits ORDER BY account_id")?
                    .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?,
            )
        })?;
        rows.into_iter()
            .map(|(id, limits)| {
                let e = |r: String| corrupt("account limits", &id, r);
                Ok((
                    id.parse().map_err(|x| e(format!("{x}")))?,
                    serde_json::from_str(&limits).map_err(|x| e(x.to_string()))?,
                ))
            })
            .collect()
    }

    fn load_provisions(&self) -> Result<Vec<ProvisionRecord>, SchedulerStoreError> {
        type Row = (String, String, Option<String>, String, Option<String>);
        let rows: Vec<Row> = self.db.with_conn(|c| {
            Ok(c.prepare(
                "SELECT account_id, function_name, spec, config, env_sealed FROM provisions \
                 ORDER BY account_id, function_name",
            )?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<Vec<_>, _>>()?)
        })?;
        rows.into_iter()
            .map(|(a, f, spec, config, env)| {
                let e = |r: String| corrupt("provision", &format!("{a}/{f}"), r);
                let aad = provision_aad(&a, &f);
                Ok(ProvisionRecord {
                    account_id: a.parse().map_err(|x| e(format!("{x}")))?,
                    function_name: f.parse().map_err(|x| e(format!("{x}")))?,
                    spec: spec
                        .map(|s| sealed_env::join(&self.sealer, &aad, &s, env.as_deref()))
                        .transpose()
                        .map_err(e)?,
                    config: serde_json::from_str(&config).map_err(|x| e(x.to_string()))?,
                })
            })
            .collect()
    }

    fn apply(&self, changes: &[Change]) -> Result<(), SchedulerStoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.db.with_conn(|c| {
            let tx = c.transaction()?;
            for change in changes {
                match change {
                    Change::UpsertNode(n) => {
                        tx.execute(
                            "INSERT INTO nodes (node_id, agent_url, capacity, labels, bound_account, \
                             state, last_heartbeat_ms, registered_at_ms, reprovision) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                             ON CONFLICT(node_id) DO UPDATE SET agent_url = excluded.agent_url, \
                             capacity = excluded.capacity, labels = excluded.labels, \
                             bound_account = excluded.bound_account, state = excluded.state, \
                             last_heartbeat_ms = excluded.last_heartbeat_ms, \
                             registered_at_ms = excluded.registered_at_ms, \
                             reprovision = excluded.reprovision",
                            params![
                                n.node_id.as_str(),
                                n.agent_url,
                                serde_json::to_string(&n.capacity).expect("serialises"),
                                serde_json::to_string(&n.labels).expect("serialises"),
                                n.bound_account.as_ref().map(|a| a.as_str()),
                                n.state.as_str(),
                                n.last_heartbeat_ms as i64,
                                n.registered_at_ms as i64,
                                n.reprovision,
                            ],
                        )?;
                    }
                    Change::UpsertInstance(i) => {
                        let (spec, env) = sealed_env::split(
                            &self.sealer,
                            &instance_aad(i.instance_id.as_str()),
                            &i.spec,
                        );
                        tx.execute(
                            "INSERT INTO instances (instance_id, node_id, spec, state, created_at_ms, \
                             provisioned, env_sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                             ON CONFLICT(instance_id) DO UPDATE SET node_id = excluded.node_id, \
                             spec = excluded.spec, state = excluded.state, \
                             provisioned = excluded.provisioned, env_sealed = excluded.env_sealed",
                            params![
                                i.instance_id.as_str(),
                                i.node_id.as_str(),
                                spec,
                                i.state.as_str(),
                                i.created_at_ms as i64,
                                i.provisioned,
                                env,
                            ],
                        )?;
                    }
                    Change::UpsertProvision(p) => {
                        let aad = provision_aad(p.account_id.as_str(), p.function_name.as_str());
                        let (spec, env) = match &p.spec {
                            Some(s) => {
                                let (spec, env) = sealed_env::split(&self.sealer, &aad, s);
                                (Some(spec), env)
                            }
                            None => (None, None),
                        };
                        tx.execute(
                            "INSERT INTO provisions (account_id, function_name, spec, config, \
                             env_sealed) VALUES (?1, ?2, ?3, ?4, ?5) \
                             ON CONFLICT(account_id, function_name) DO UPDATE SET \
                             spec = excluded.spec, config = excluded.config, \
                             env_sealed = excluded.env_sealed",
                            params![
                                p.account_id.as_str(),
                                p.function_name.as_str(),
                                spec,
                                serde_json::to_string(&p.config).expect("serialises"),
                                env,
                            ],
                        )?;
                    }
                    Change::DeleteProvision(account, function) => {
                        tx.execute(
                            "DELETE FROM provisions WHERE account_id = ?1 AND function_name = ?2",
                            params![account.as_str(), function.as_str()],
                        )?;
                    }
                    Change::UpsertAccountLimits(account, limits) => {
                        tx.execute(
                            "INSERT INTO account_limits (account_id, limits) VALUES (?1, ?2) \
                             ON CONFLICT(account_id) DO UPDATE SET limits = excluded.limits",
                            params![
                                account.as_str(),
                                serde_json::to_string(limits).expect("serialises"),
                            ],
                        )?;
                    }
                    Change::DeleteAccountLimits(account) => {
                        tx.execute(
                            "DELETE FROM account_limits WHERE account_id = ?1",
                            params![account.as_str()],
                        )?;
                    }
                    Change::DeleteInstance(id) => {
                        tx.execute(
                            "DELETE FROM instances WHERE instance_id = ?1",
                            params![id.as_str()],
                        )?;
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })?;
        Ok(())
    }
}

impl SqliteSchedulerStore {
    /// Whether an instance is stored (for tests and diagnostics).
    pub fn has_instance(&self, id: &InstanceId) -> Result<bool, SchedulerStoreError> {
        let found = self.db.with_conn(|c| {
            Ok(c.query_row(
                "SELECT 1 FROM instances WHERE instance_id = ?1",
                params![id.as_str()],
                |_| Ok(()),
            )
            .optional()?)
        })?;
        Ok(found.is_some())
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
}

impl TrustStore for SqliteSchedulerStore {
    fn node_holders(&self) -> Result<Vec<(NodeId, [u8; 32])>, SchedulerStoreError> {
        let rows: Vec<(String, String)> = self.db.with_conn(|c| {
            Ok(
                c.prepare("SELECT node_id, certificate_sha256 FROM node_holders ORDER BY node_id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?,
            )
        })?;
        rows.into_iter()
            .map(|(id, hex)| {
                let node = id
                    .parse()
                    .map_err(|x| corrupt("node holder", &id, format!("{x}")))?;
                let sha = hex::decode(&hex)
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| corrupt("node holder", &id, "not a SHA-256 in hex"))?;
                Ok((node, sha))
            })
            .collect()
    }

    fn set_node_holder(&self, node: &NodeId, sha256: &[u8; 32]) -> Result<(), SchedulerStoreError> {
        self.db.with_conn(|c| {
            c.execute(
                "INSERT INTO node_holders (node_id, certificate_sha256) VALUES (?1, ?2) \
                 ON CONFLICT(node_id) DO UPDATE SET certificate_sha256 = excluded.certificate_sha256",
                params![node.as_str(), hex::encode(sha256)],
            )?;
            Ok(())
        })?;
        Ok(())
    }

    fn revoked_nodes(&self) -> Result<Vec<(NodeId, u64)>, SchedulerStoreError> {
        let rows: Vec<(String, i64)> = self.db.with_conn(|c| {
            Ok(
                c.prepare("SELECT node_id, revoked_at_ms FROM revoked_nodes ORDER BY node_id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?,
            )
        })?;
        rows.into_iter()
            .map(|(id, at)| {
                Ok((
                    id.parse()
                        .map_err(|x| corrupt("revoked node", &id, format!("{x}")))?,
                    at.max(0) as u64,
                ))
            })
            .collect()
    }

    fn revoke_node(&self, node: &NodeId, now_ms: u64) -> Result<u64, SchedulerStoreError> {
        let at: i64 = self.db.with_conn(|c| {
            c.execute(
                "INSERT INTO revoked_nodes (node_id, revoked_at_ms) VALUES (?1, ?2) \
                 ON CONFLICT(node_id) DO NOTHING",
                params![node.as_str(), now_ms as i64],
            )?;
            Ok(c.query_row(
                "SELECT revoked_at_ms FROM revoked_nodes WHERE node_id = ?1",
                params![node.as_str()],
                |r| r.get(0),
            )?)
        })?;
        Ok(at.max(0) as u64)
    }

    fn add_bootstrap_token(
        &self,
        token_sha256: &str,
        node: &NodeId,
        now_ms: u64,
        expires_at_ms: u64,
    ) -> Result<(), SchedulerStoreError> {
        self.db.with_conn(|c| {
            c.execute(
                "INSERT INTO bootstrap_tokens (token_sha256, node_id, created_at_ms, expires_at_ms) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![token_sha256, node.as_str(), now_ms as i64, expires_at_ms as i64],
            )?;
            Ok(())
        })?;
        Ok(())
    }

    fn redeem_bootstrap_token(
        &self,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<Redeemed, SchedulerStoreError> {
        type Row = (String, i64, Option<i64>);
        let found: Option<Row> = self.db.with_conn(|c| {
            let tx = c.transaction()?;
            let row: Option<Row> = tx
                .query_row(
                    "SELECT node_id, expires_at_ms, used_at_ms FROM bootstrap_tokens \
                     WHERE token_sha256 = ?1",
                    params![token_sha256],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((_, expires, None)) = &row {
                if (*expires as u64) > now_ms {
                    tx.execute(
                        "UPDATE bootstrap_tokens SET used_at_ms = ?2 WHERE token_sha256 = ?1",
                        params![token_sha256, now_ms as i64],
                    )?;
                }
            }
            tx.commit()?;
            Ok(row)
        })?;
        let Some((node, expires, used)) = found else {
            return Ok(Redeemed::Unknown);
        };
        let node_id: NodeId = node
            .parse()
            .map_err(|x| corrupt("bootstrap token", &node, format!("{x}")))?;
        Ok(match used {
            Some(at) => Redeemed::Used {
                node_id,
                used_at_ms: at.max(0) as u64,
            },
            None if (expires as u64) <= now_ms => Redeemed::Expired {
                node_id,
                expires_at_ms: expires.max(0) as u64,
            },
            None => Redeemed::Node(node_id),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::tests::{registration, spec};
    use crate::placement::{Acquired, Placement, PlacementConfig};
    use kiln_internal_api::Tenancy;

    /// A spec with a secret in its environment, placed, started and
    /// provisioned: what the store writes for it.
    fn secret_state() -> (Vec<Change>, kiln_core::InstanceSpec) {
        let mut p = Placement::new(PlacementConfig::default());
        p.register(
            &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
            10,
        )
        .unwrap();
        let mut s = spec("1", "f", 2, 512);
        s.environment
            .insert("DB_PASSWORD".into(), "hunter2-sealed-0xC0FFEE".into());
        let s = s.seal();
        let Acquired::Starting {
            create: Some(job), ..
        } = p.acquire(&s, 10).unwrap()
        else {
            panic!("expected a new instance");
        };
        p.instance_started(&job.instance_id, 11);
        let mut changes = p.take_changes();
        changes.push(Change::UpsertProvision(ProvisionRecord {
            account_id: s.account_id.clone(),
            function_name: s.function_name.clone(),
            spec: Some(s.clone()),
            config: kiln_internal_api::ProvisionConfig {
                target: 1,
                always_allocate_cpu: true,
                scheduled_actions: Vec::new(),
                target_tracking_policies: Vec::new(),
            },
        }));
        (changes, s)
    }

    fn file_holds(dir: &Path, needle: &str) -> bool {
        std::fs::read_dir(dir).unwrap().any(|f| {
            let bytes = std::fs::read(f.unwrap().path()).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
    }

    #[test]
    fn environments_are_sealed_in_the_file_and_open_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        let (changes, s) = secret_state();
        store.apply(&changes).unwrap();
        // Neither the database nor its WAL holds the value.
        assert!(!file_holds(dir.path(), "hunter2-sealed-0xC0FFEE"));
        assert!(!file_holds(dir.path(), "DB_PASSWORD"));
        let (_, instances) = store.load().unwrap();
        assert_eq!(instances[0].spec, s);
        let provisions = store.load_provisions().unwrap();
        assert_eq!(provisions[0].spec.as_ref(), Some(&s));
        drop(store);

        // Under another key nothing opens: the store refuses to open,
        // naming the key the values were sealed with.
        let other = Arc::new(Sealer::new(&[9u8; 32], &[]));
        let Err(e) = SqliteSchedulerStore::open(&path, other) else {
            panic!("a store sealed under another key opened");
        };
        assert!(
            matches!(
                e,
                SchedulerStoreError::Seal(SealPassError::Open {
                    source: kiln_store::seal::SealError::UnknownKey(_),
                    ..
                })
            ),
            "{e:?}"
        );
    }

    #[test]
    fn a_sealed_environment_copied_to_another_row_does_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        let (changes, _) = secret_state();
        store.apply(&changes).unwrap();
        store
            .db
            .with_conn(|c| {
                // A second instance row carrying the first one's sealed
                // environment (an attacker with write access to the file).
                c.execute_batch(
                    "INSERT INTO instances (instance_id, node_id, spec, state, created_at_ms, \
                     provisioned, env_sealed) SELECT 'i-' || 'f00d', node_id, spec, state, \
                     created_at_ms, provisioned, env_sealed FROM instances",
                )?;
                Ok(())
            })
            .unwrap();
        assert!(matches!(
            store.load(),
            Err(SchedulerStoreError::Corrupt { what: "instance", ref id, .. }) if id == "i-f00d"
        ));
    }

    #[test]
    fn a_store_written_before_sealing_is_sealed_once_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        // The schema as the previous version left it, a plaintext spec in it.
        let sealing = MIGRATIONS
            .iter()
            .position(|m| m.name == "sealed function environments")
            .unwrap();
        let old = Database::open(&path, &MIGRATIONS[..sealing]).unwrap();
        let (_, s) = secret_state();
        old.with_conn(|c| {
            c.execute(
                "INSERT INTO nodes (node_id, agent_url, capacity, labels, state, \
                 last_heartbeat_ms) VALUES ('n1', 'https://n1', '{}', '{}', 'ready', 0)",
                [],
            )?;
            c.execute(
                "INSERT INTO instances (instance_id, node_id, spec, state, created_at_ms) \
                 VALUES ('i-1', 'n1', ?1, 'ready', 1)",
                params![serde_json::to_string(&s).unwrap()],
            )?;
            Ok(())
        })
        .unwrap();
        drop(old);
        assert!(file_holds(dir.path(), "hunter2-sealed-0xC0FFEE"));

        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        assert!(!file_holds(dir.path(), "hunter2-sealed-0xC0FFEE"));
        let again = store
            .db
            .with_conn(|c| {
                sealed_env::seal_all(c, &store.sealer).map_err(|e| {
                    StoreError::Sqlite(rusqlite::Error::InvalidParameterName(e.to_string()))
                })
            })
            .unwrap();
        assert_eq!(again, 0, "a second pass changes nothing");
        let spec: String = store
            .db
            .with_conn(|c| Ok(c.query_row("SELECT spec FROM instances", [], |r| r.get(0))?))
            .unwrap();
        assert!(!spec.contains("DB_PASSWORD"), "{spec}");
    }

    #[test]
    fn state_survives_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        let mut p = Placement::new(PlacementConfig::default());
        p.register(
            &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
            10,
        )
        .unwrap();
        let s = spec("1", "f", 2, 512);
        let Acquired::Starting {
            create: Some(job), ..
        } = p.acquire(&s, 10).unwrap()
        else {
            panic!("expected a new instance");
        };
        p.instance_started(&job.instance_id, 11);
        let Acquired::Starting {
            create: Some(gone), ..
        } = p.acquire(&spec("1", "g", 1, 128), 12).unwrap()
        else {
            panic!("expected a new instance");
        };
        p.instance_start_failed(&gone.instance_id);
        store.apply(&p.take_changes()).unwrap();
        drop(store);

        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        let (nodes, instances) = store.load().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].bound_account.as_ref().unwrap().as_str(), "1");
        assert_eq!(instances.len(), 1);
        assert_eq!(instances[0].instance_id, job.instance_id);
        assert_eq!(instances[0].spec, s);
        assert!(!store.has_instance(&gone.instance_id).unwrap());
        let (p2, _) = Placement::restore(PlacementConfig::default(), nodes, instances, 1_000);
        assert_eq!(p2.instance_count(), 1);
        assert_eq!(p2.node(&job.node_id).unwrap().used_memory_mb, 512);
    }

    #[test]
    fn corrupt_rows_are_reported() {
        let store = SqliteSchedulerStore::open_in_memory().unwrap();
        store
            .db
            .with_conn(|c| {
                c.execute(
                    "INSERT INTO nodes (node_id, agent_url, capacity, labels, bound_account, state, \
                     last_heartbeat_ms) VALUES ('BAD/ID', 'https://x:1', '{}', '{}', NULL, 'ready', 0)",
                    [],
                )?;
                Ok(())
            })
            .unwrap();
        let err = store.load().unwrap_err();
        assert!(
            matches!(err, SchedulerStoreError::Corrupt { what: "node", .. }),
            "{err}"
        );
    }

    #[test]
    fn revocations_persist_and_tokens_are_single_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        let a: NodeId = "n-a".parse().unwrap();
        assert_eq!(store.revoke_node(&a, 100).unwrap(), 100);
        assert_eq!(store.revoke_node(&a, 200).unwrap(), 100);
        store.add_bootstrap_token("h1", &a, 10, 1_000).unwrap();
        store.add_bootstrap_token("h2", &a, 10, 1_000).unwrap();
        drop(store);

        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        assert_eq!(store.revoked_nodes().unwrap(), vec![(a.clone(), 100)]);
        assert_eq!(
            store.redeem_bootstrap_token("h1", 500).unwrap(),
            Redeemed::Node(a.clone())
        );
        assert_eq!(
            store.redeem_bootstrap_token("h1", 501).unwrap(),
            Redeemed::Used {
                node_id: a.clone(),
                used_at_ms: 500
            }
        );
        assert_eq!(
            store.redeem_bootstrap_token("h2", 1_000).unwrap(),
            Redeemed::Expired {
                node_id: a.clone(),
                expires_at_ms: 1_000
            }
        );
        // An expired token stays unusable; an unknown one is unknown.
        assert!(matches!(
            store.redeem_bootstrap_token("h2", 2_000).unwrap(),
            Redeemed::Expired { .. }
        ));
        assert_eq!(
            store.redeem_bootstrap_token("nope", 10).unwrap(),
            Redeemed::Unknown
        );
    }

    #[test]
    fn node_holders_persist_and_follow_the_last_registration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.db");
        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        let (a, b): (NodeId, NodeId) = ("n-a".parse().unwrap(), "n-b".parse().unwrap());
        store.set_node_holder(&a, &[1; 32]).unwrap();
        store.set_node_holder(&b, &[2; 32]).unwrap();
        store.set_node_holder(&a, &[3; 32]).unwrap();
        drop(store);
        let store = SqliteSchedulerStore::open(&path, SqliteSchedulerStore::test_sealer()).unwrap();
        assert_eq!(
            store.node_holders().unwrap(),
            vec![(a, [3; 32]), (b, [2; 32])]
        );
    }

    #[tokio::test]
    async fn the_writer_batches_and_flushes() {
        let store = std::sync::Arc::new(SqliteSchedulerStore::open_in_memory().unwrap());
        let (writer, _task) = Writer::spawn(store.clone());
        let mut p = Placement::new(PlacementConfig::default());
        p.register(
            &registration(Some("n1"), 4096, Tenancy::Dedicated, None),
            10,
        )
        .unwrap();
        writer.send(p.take_changes());
        for i in 0..50 {
            p.acquire(&spec("1", &format!("f{i}"), 1, 64), 10).unwrap();
            writer.send(p.take_changes());
        }
        writer.flush().await.unwrap();
        let (_, instances) = store.load().unwrap();
        assert_eq!(instances.len(), 50);
    }
}
