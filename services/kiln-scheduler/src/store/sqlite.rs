//! The SQLite backend: `state_dir/scheduler.db`, one box.

use std::path::Path;
use std::sync::Arc;

use kiln_core::{AccountId, InstanceId, NodeId};
use kiln_internal_api::AccountLimits;
use kiln_store::seal::Sealer;
use kiln_store::{Database, Migration, StoreError};
use rusqlite::{params, OptionalExtension};

use super::codec::{self, InstanceRow, NodeRow, ProvisionRow};
use super::{Redeemed, SchedulerStore, SchedulerStoreError, TrustStore};
use crate::placement::{Change, InstanceRecord, NodeRecord, ProvisionRecord};
use crate::sealed_env;

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
    // A provision configuration per qualifier (LATEST or an alias);
    // existing ones are LATEST's.
    Migration {
        name: "provisions per qualifier",
        sql: "
        CREATE TABLE provisions_by_qualifier (
            account_id TEXT NOT NULL,
            function_name TEXT NOT NULL,
            qualifier TEXT NOT NULL,
            spec TEXT,
            config TEXT NOT NULL,
            env_sealed TEXT,
            PRIMARY KEY (account_id, function_name, qualifier)
        );
        INSERT INTO provisions_by_qualifier
            (account_id, function_name, qualifier, spec, config, env_sealed)
            SELECT account_id, function_name, 'LATEST', spec, config, env_sealed FROM provisions;
        DROP TABLE provisions;
        ALTER TABLE provisions_by_qualifier RENAME TO provisions;
    ",
    },
];
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

impl SchedulerStore for SqliteSchedulerStore {
    fn load(&self) -> Result<(Vec<NodeRecord>, Vec<InstanceRecord>), SchedulerStoreError> {
        let (nodes, instances) = self.db.with_conn(|c| {
            let nodes = c
                .prepare(
                    "SELECT node_id, agent_url, capacity, labels, bound_account, state, \
                     last_heartbeat_ms, registered_at_ms, reprovision FROM nodes \
                     ORDER BY node_id",
                )?
                .query_map([], |r| {
                    Ok(NodeRow {
                        node_id: r.get(0)?,
                        agent_url: r.get(1)?,
                        capacity: r.get(2)?,
                        labels: r.get(3)?,
                        bound_account: r.get(4)?,
                        state: r.get(5)?,
                        last_heartbeat_ms: r.get(6)?,
                        registered_at_ms: r.get(7)?,
                        reprovision: r.get(8)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let instances = c
                .prepare(
                    "SELECT instance_id, node_id, spec, state, created_at_ms, provisioned, \
                     env_sealed FROM instances ORDER BY instance_id",
                )?
                .query_map([], |r| {
                    Ok(InstanceRow {
                        instance_id: r.get(0)?,
                        node_id: r.get(1)?,
                        spec: r.get(2)?,
                        state: r.get(3)?,
                        created_at_ms: r.get(4)?,
                        provisioned: r.get(5)?,
                        env_sealed: r.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok((nodes, instances))
        })?;
        Ok((
            nodes
                .into_iter()
                .map(NodeRow::decode)
                .collect::<Result<_, _>>()?,
            instances
                .into_iter()
                .map(|i| i.decode(&self.sealer))
                .collect::<Result<_, _>>()?,
        ))
    }

    fn load_account_limits(&self) -> Result<Vec<(AccountId, AccountLimits)>, SchedulerStoreError> {
        let rows: Vec<(String, String)> = self.db.with_conn(|c| {
            Ok(
                c.prepare("SELECT account_id, limits FROM account_limits ORDER BY account_id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?,
            )
        })?;
        rows.into_iter()
            .map(|(id, limits)| codec::decode_limits(id, limits))
            .collect()
    }

    fn load_provisions(&self) -> Result<Vec<ProvisionRecord>, SchedulerStoreError> {
        let rows: Vec<ProvisionRow> = self.db.with_conn(|c| {
            Ok(c.prepare(
                "SELECT account_id, function_name, qualifier, spec, config, env_sealed \
                 FROM provisions ORDER BY account_id, function_name, qualifier",
            )?
            .query_map([], |r| {
                Ok(ProvisionRow {
                    account_id: r.get(0)?,
                    function_name: r.get(1)?,
                    qualifier: r.get(2)?,
                    spec: r.get(3)?,
                    config: r.get(4)?,
                    env_sealed: r.get(5)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?)
        })?;
        rows.into_iter().map(|p| p.decode(&self.sealer)).collect()
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
                        let n = NodeRow::encode(n);
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
                                n.node_id,
                                n.agent_url,
                                n.capacity,
                                n.labels,
                                n.bound_account,
                                n.state,
                                n.last_heartbeat_ms,
                                n.registered_at_ms,
                                n.reprovision,
                            ],
                        )?;
                    }
                    Change::UpsertInstance(i) => {
                        let i = InstanceRow::encode(&self.sealer, i);
                        tx.execute(
                            "INSERT INTO instances (instance_id, node_id, spec, state, created_at_ms, \
                             provisioned, env_sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                             ON CONFLICT(instance_id) DO UPDATE SET node_id = excluded.node_id, \
                             spec = excluded.spec, state = excluded.state, \
                             provisioned = excluded.provisioned, env_sealed = excluded.env_sealed",
                            params![
                                i.instance_id,
                                i.node_id,
                                i.spec,
                                i.state,
                                i.created_at_ms,
                                i.provisioned,
                                i.env_sealed,
                            ],
                        )?;
                    }
                    Change::UpsertProvision(p) => {
                        let p = ProvisionRow::encode(&self.sealer, p);
                        tx.execute(
                            "INSERT INTO provisions (account_id, function_name, qualifier, spec, \
                             config, env_sealed) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                             ON CONFLICT(account_id, function_name, qualifier) DO UPDATE SET \
                             spec = excluded.spec, config = excluded.config, \
                             env_sealed = excluded.env_sealed",
                            params![
                                p.account_id,
                                p.function_name,
                                p.qualifier,
                                p.spec,
                                p.config,
                                p.env_sealed
                            ],
                        )?;
                    }
                    Change::DeleteProvision(account, function, qualifier) => {
                        tx.execute(
                            "DELETE FROM provisions \
                             WHERE account_id = ?1 AND function_name = ?2 AND qualifier = ?3",
                            params![account.as_str(), function.as_str(), qualifier],
                        )?;
                    }
                    Change::UpsertAccountLimits(account, limits) => {
                        tx.execute(
                            "INSERT INTO account_limits (account_id, limits) VALUES (?1, ?2) \
                             ON CONFLICT(account_id) DO UPDATE SET limits = excluded.limits",
                            params![account.as_str(), codec::encode_limits(limits)],
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
                Ok((
                    codec::decode_node_id("node holder", &id)?,
                    codec::decode_sha256("node holder", &id, &hex)?,
                ))
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
                    codec::decode_node_id("revoked node", &id)?,
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

    fn bootstrap_tokens(&self) -> Result<Vec<super::StoredToken>, SchedulerStoreError> {
        type Row = (String, String, i64, i64, Option<i64>);
        let rows: Vec<Row> = self.db.with_conn(|c| {
            Ok(c.prepare(
                "SELECT token_sha256, node_id, created_at_ms, expires_at_ms, used_at_ms \
                 FROM bootstrap_tokens ORDER BY token_sha256",
            )?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<Vec<_>, _>>()?)
        })?;
        rows.into_iter().map(codec::decode_token).collect()
    }

    fn restore_bootstrap_token(&self, t: &super::StoredToken) -> Result<(), SchedulerStoreError> {
        self.db.with_conn(|c| {
            c.execute(
                "INSERT INTO bootstrap_tokens (token_sha256, node_id, created_at_ms, \
                 expires_at_ms, used_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    t.token_sha256,
                    t.node_id.as_str(),
                    t.created_at_ms as i64,
                    t.expires_at_ms as i64,
                    t.used_at_ms.map(|u| u as i64),
                ],
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
        let found = self.db.with_conn(|c| {
            let tx = c.transaction()?;
            let row: Option<(String, i64, Option<i64>)> = tx
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
        Redeemed::of(found, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sealed_env::SealPassError;
    use crate::store::suite::{self, secret_state};

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
        // Neither the database nor its WAL holds the value.
        suite::environments_are_sealed_and_open_on_load(&store, || {
            let holds = |needle| file_holds(dir.path(), needle);
            [
                "hunter2-sealed-0xC0FFEE",
                "DB_PASSWORD",
                "registry-pw-0xBEEF",
            ]
            .into_iter()
            .filter(|n| holds(n))
            .collect::<Vec<_>>()
            .join(",")
        });
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

    fn reopen(path: &Path) -> impl Fn() -> SqliteSchedulerStore + '_ {
        move || SqliteSchedulerStore::open(path, SqliteSchedulerStore::test_sealer()).unwrap()
    }

    #[test]
    fn state_survives_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        suite::state_survives_reopening(reopen(&dir.path().join("scheduler.db")));
    }

    #[test]
    fn revocations_persist_and_tokens_are_single_use_and_expire() {
        let dir = tempfile::tempdir().unwrap();
        suite::revocations_persist_and_tokens_are_single_use_and_expire(reopen(
            &dir.path().join("scheduler.db"),
        ));
    }

    #[test]
    fn node_holders_persist_and_follow_the_last_registration() {
        let dir = tempfile::tempdir().unwrap();
        suite::node_holders_follow_the_last_registration(reopen(&dir.path().join("scheduler.db")));
    }

    #[tokio::test]
    async fn the_writer_batches_and_flushes() {
        suite::the_writer_batches_and_flushes(Arc::new(
            SqliteSchedulerStore::open_in_memory().unwrap(),
        ))
        .await;
    }
}
