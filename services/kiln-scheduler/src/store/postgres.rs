//! The PostgreSQL backend: the schedulers of a cluster share one database;
//! only the leader writes, each write fenced by its token
//! ([`kiln_store::pg::leader`]), so a deposed leader (paused past its
//! lease, partitioned) writes nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use kiln_core::{AccountId, NodeId};
use kiln_internal_api::AccountLimits;
use kiln_store::pg::leader::Leadership;
use kiln_store::pg::runtime::PgRuntime;
use kiln_store::pg::{PgDatabase, PgStoreError};
use kiln_store::seal::Sealer;
use kiln_store::Migration;
use tokio_postgres::types::ToSql;
use tokio_postgres::Transaction;

/// One query parameter.
type P<'a> = &'a (dyn ToSql + Sync);

use super::codec::{self, InstanceRow, NodeRow, ProvisionRow};
use super::{Redeemed, SchedulerStore, SchedulerStoreError, TrustStore};
use crate::placement::{Change, InstanceRecord, NodeRecord, ProvisionRecord};

/// The component name of the scheduler's schema and leadership.
pub const COMPONENT: &str = "scheduler";

/// The scheduler's tables as of the first PostgreSQL release; later
/// changes are new migrations, as in SQLite.
const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "scheduler state",
        sql: "
    CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        agent_url TEXT NOT NULL,
        capacity TEXT NOT NULL,
        labels TEXT NOT NULL,
        bound_account TEXT,
        state TEXT NOT NULL,
        last_heartbeat_ms BIGINT NOT NULL,
        registered_at_ms BIGINT NOT NULL DEFAULT 0,
        reprovision BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE instances (
        instance_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL REFERENCES nodes(node_id),
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        provisioned BOOLEAN NOT NULL DEFAULT false,
        env_sealed TEXT
    );
    CREATE INDEX instances_node ON instances(node_id);
    CREATE TABLE account_limits (
        account_id TEXT PRIMARY KEY,
        limits TEXT NOT NULL
    );
    CREATE TABLE provisions (
        account_id TEXT NOT NULL,
        function_name TEXT NOT NULL,
        spec TEXT,
        config TEXT NOT NULL,
        env_sealed TEXT,
        PRIMARY KEY (account_id, function_name)
    );
    CREATE TABLE revoked_nodes (
        node_id TEXT PRIMARY KEY,
        revoked_at_ms BIGINT NOT NULL
    );
    CREATE TABLE bootstrap_tokens (
        token_sha256 TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        expires_at_ms BIGINT NOT NULL,
        used_at_ms BIGINT
    );
    CREATE TABLE node_holders (
        node_id TEXT PRIMARY KEY,
        certificate_sha256 TEXT NOT NULL
    );
",
    },
    // A provision configuration per qualifier (LATEST or an alias);
    // existing ones are LATEST's.
    Migration {
        name: "provisions per qualifier",
        sql: "
    ALTER TABLE provisions ADD COLUMN qualifier TEXT NOT NULL DEFAULT 'LATEST';
    ALTER TABLE provisions DROP CONSTRAINT provisions_pkey;
    ALTER TABLE provisions ADD PRIMARY KEY (account_id, function_name, qualifier);
",
    },
];

type Boxed<'t, T> = Pin<Box<dyn Future<Output = Result<T, PgStoreError>> + Send + 't>>;

/// Who may write: the leadership and the token it was won with.
struct Fence {
    leadership: Leadership,
    token: i64,
}

/// The PostgreSQL store. Function environments are sealed as in SQLite.
/// Until [`PgSchedulerStore::fence`] is called its writes are unfenced
/// (tests, copying a store); a scheduler fences it with the token it won
/// before it writes anything.
#[derive(Clone)]
pub struct PgSchedulerStore {
    inner: Arc<Inner>,
}

struct Inner {
    rt: PgRuntime,
    db: PgDatabase,
    sealer: Arc<Sealer>,
    fence: OnceLock<Fence>,
}

impl PgSchedulerStore {
    /// Connect and bring the schema up to date (every scheduler of a
    /// cluster may do this at once: migrations run under a lock).
    pub fn open(url: &str, sealer: Arc<Sealer>) -> Result<Self, SchedulerStoreError> {
        Self::open_with(url, None, sealer)
    }

    /// [`Self::open`] with the password in a file (a credential).
    pub fn open_with(
        url: &str,
        password_file: Option<&std::path::Path>,
        sealer: Arc<Sealer>,
    ) -> Result<Self, SchedulerStoreError> {
        let rt = PgRuntime::new("kiln-sched-pg")?;
        let (url, password_file) = (url.to_owned(), password_file.map(ToOwned::to_owned));
        let db = rt.block(async move {
            PgDatabase::open_with(&url, password_file.as_deref(), 8, COMPONENT, MIGRATIONS).await
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                rt,
                db,
                sealer,
                fence: OnceLock::new(),
            }),
        })
    }

    /// The database, for the leadership of the same component.
    pub fn database(&self) -> &PgDatabase {
        &self.inner.db
    }

    /// Run PostgreSQL work on the store's runtime, awaiting it from any
    /// other (the election loop).
    pub async fn run<T, F>(&self, work: F) -> Result<T, PgStoreError>
    where
        F: Future<Output = Result<T, PgStoreError>> + Send + 'static,
        T: Send + 'static,
    {
        self.inner.rt.run(work).await
    }

    /// From now on, every write commits only while `leadership` holds
    /// the lease with `token`. Once only: a scheduler that loses its
    /// lease exits, and a new process campaigns afresh.
    pub fn fence(&self, leadership: Leadership, token: i64) {
        let set = self.inner.fence.set(Fence { leadership, token });
        assert!(set.is_ok(), "a scheduler store is fenced once");
    }

    /// Run `write` in one transaction (fenced once [`Self::fence`]d).
    fn write<T, W>(&self, write: W) -> Result<T, SchedulerStoreError>
    where
        T: Send + 'static,
        W: for<'t> FnOnce(&'t Transaction<'t>) -> Boxed<'t, T> + Send + 'static,
    {
        let inner = self.inner.clone();
        Ok(self.inner.rt.block(async move {
            match inner.fence.get() {
                Some(f) => f.leadership.fenced(f.token, write).await,
                None => {
                    let mut conn = inner.db.conn().await?;
                    let tx = conn.transaction().await?;
                    let out = write(&tx).await?;
                    tx.commit().await?;
                    Ok(out)
                }
            }
        })?)
    }

    /// The rows of one query.
    fn read(&self, sql: &'static str) -> Result<Vec<tokio_postgres::Row>, SchedulerStoreError> {
        let db = self.inner.db.clone();
        Ok(self
            .inner
            .rt
            .block(async move { Ok(db.conn().await?.query(sql, &[]).await?) })?)
    }
}

/// One change, encoded (and sealed) before its transaction starts.
enum Op {
    Node(NodeRow),
    Instance(InstanceRow),
    Provision(ProvisionRow),
    DeleteProvision(String, String, String),
    Limits(String, String),
    DeleteLimits(String),
    DeleteInstance(String),
}

impl Op {
    fn encode(sealer: &Sealer, change: &Change) -> Self {
        match change {
            Change::UpsertNode(n) => Self::Node(NodeRow::encode(n)),
            Change::UpsertInstance(i) => Self::Instance(InstanceRow::encode(sealer, i)),
            Change::UpsertProvision(p) => Self::Provision(ProvisionRow::encode(sealer, p)),
            Change::DeleteProvision(a, f, q) => {
                Self::DeleteProvision(a.as_str().to_owned(), f.as_str().to_owned(), q.clone())
            }
            Change::UpsertAccountLimits(a, l) => {
                Self::Limits(a.as_str().to_owned(), codec::encode_limits(l))
            }
            Change::DeleteAccountLimits(a) => Self::DeleteLimits(a.as_str().to_owned()),
            Change::DeleteInstance(i) => Self::DeleteInstance(i.as_str().to_owned()),
        }
    }

    async fn run(&self, tx: &Transaction<'_>) -> Result<u64, tokio_postgres::Error> {
        match self {
            Self::Node(n) => {
                tx.execute(
                    "INSERT INTO nodes (node_id, agent_url, capacity, labels, bound_account, \
                     state, last_heartbeat_ms, registered_at_ms, reprovision) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
                     ON CONFLICT (node_id) DO UPDATE SET agent_url = EXCLUDED.agent_url, \
                     capacity = EXCLUDED.capacity, labels = EXCLUDED.labels, \
                     bound_account = EXCLUDED.bound_account, state = EXCLUDED.state, \
                     last_heartbeat_ms = EXCLUDED.last_heartbeat_ms, \
                     registered_at_ms = EXCLUDED.registered_at_ms, \
                     reprovision = EXCLUDED.reprovision",
                    &[
                        &n.node_id as P,
                        &n.agent_url,
                        &n.capacity,
                        &n.labels,
                        &n.bound_account,
                        &n.state,
                        &n.last_heartbeat_ms,
                        &n.registered_at_ms,
                        &n.reprovision,
                    ],
                )
                .await
            }
            Self::Instance(i) => {
                tx.execute(
                    "INSERT INTO instances (instance_id, node_id, spec, state, created_at_ms, \
                     provisioned, env_sealed) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (instance_id) DO UPDATE SET node_id = EXCLUDED.node_id, \
                     spec = EXCLUDED.spec, state = EXCLUDED.state, \
                     provisioned = EXCLUDED.provisioned, env_sealed = EXCLUDED.env_sealed",
                    &[
                        &i.instance_id as P,
                        &i.node_id,
                        &i.spec,
                        &i.state,
                        &i.created_at_ms,
                        &i.provisioned,
                        &i.env_sealed,
                    ],
                )
                .await
            }
            Self::Provision(p) => {
                tx.execute(
                    "INSERT INTO provisions (account_id, function_name, qualifier, spec, \
                     config, env_sealed) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (account_id, function_name, qualifier) DO UPDATE SET \
                     spec = EXCLUDED.spec, config = EXCLUDED.config, \
                     env_sealed = EXCLUDED.env_sealed",
                    &[
                        &p.account_id as P,
                        &p.function_name,
                        &p.qualifier,
                        &p.spec,
                        &p.config,
                        &p.env_sealed,
                    ],
                )
                .await
            }
            Self::DeleteProvision(a, f, q) => {
                tx.execute(
                    "DELETE FROM provisions \
                     WHERE account_id = $1 AND function_name = $2 AND qualifier = $3",
                    &[a, f, q],
                )
                .await
            }
            Self::Limits(a, l) => {
                tx.execute(
                    "INSERT INTO account_limits (account_id, limits) VALUES ($1, $2) \
                     ON CONFLICT (account_id) DO UPDATE SET limits = EXCLUDED.limits",
                    &[a, l],
                )
                .await
            }
            Self::DeleteLimits(a) => {
                tx.execute("DELETE FROM account_limits WHERE account_id = $1", &[a])
                    .await
            }
            Self::DeleteInstance(i) => {
                tx.execute("DELETE FROM instances WHERE instance_id = $1", &[i])
                    .await
            }
        }
    }
}

impl SchedulerStore for PgSchedulerStore {
    fn load(&self) -> Result<(Vec<NodeRecord>, Vec<InstanceRecord>), SchedulerStoreError> {
        let nodes = self
            .read(
                "SELECT node_id, agent_url, capacity, labels, bound_account, state, \
                 last_heartbeat_ms, registered_at_ms, reprovision FROM nodes ORDER BY node_id",
            )?
            .into_iter()
            .map(|r| {
                NodeRow {
                    node_id: r.get(0),
                    agent_url: r.get(1),
                    capacity: r.get(2),
                    labels: r.get(3),
                    bound_account: r.get(4),
                    state: r.get(5),
                    last_heartbeat_ms: r.get(6),
                    registered_at_ms: r.get(7),
                    reprovision: r.get(8),
                }
                .decode()
            })
            .collect::<Result<_, _>>()?;
        let instances = self
            .read(
                "SELECT instance_id, node_id, spec, state, created_at_ms, provisioned, \
                 env_sealed FROM instances ORDER BY instance_id",
            )?
            .into_iter()
            .map(|r| {
                InstanceRow {
                    instance_id: r.get(0),
                    node_id: r.get(1),
                    spec: r.get(2),
                    state: r.get(3),
                    created_at_ms: r.get(4),
                    provisioned: r.get(5),
                    env_sealed: r.get(6),
                }
                .decode(&self.inner.sealer)
            })
            .collect::<Result<_, _>>()?;
        Ok((nodes, instances))
    }

    fn load_account_limits(&self) -> Result<Vec<(AccountId, AccountLimits)>, SchedulerStoreError> {
        self.read("SELECT account_id, limits FROM account_limits ORDER BY account_id")?
            .into_iter()
            .map(|r| codec::decode_limits(r.get(0), r.get(1)))
            .collect()
    }

    fn load_provisions(&self) -> Result<Vec<ProvisionRecord>, SchedulerStoreError> {
        self.read(
            "SELECT account_id, function_name, qualifier, spec, config, env_sealed \
             FROM provisions ORDER BY account_id, function_name, qualifier",
        )?
        .into_iter()
        .map(|r| {
            ProvisionRow {
                account_id: r.get(0),
                function_name: r.get(1),
                qualifier: r.get(2),
                spec: r.get(3),
                config: r.get(4),
                env_sealed: r.get(5),
            }
            .decode(&self.inner.sealer)
        })
        .collect()
    }

    fn apply(&self, changes: &[Change]) -> Result<(), SchedulerStoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let ops: Vec<Op> = changes
            .iter()
            .map(|c| Op::encode(&self.inner.sealer, c))
            .collect();
        self.write(move |tx| {
            Box::pin(async move {
                for op in &ops {
                    op.run(tx).await?;
                }
                Ok(())
            })
        })
    }
}

impl TrustStore for PgSchedulerStore {
    fn revoked_nodes(&self) -> Result<Vec<(NodeId, u64)>, SchedulerStoreError> {
        self.read("SELECT node_id, revoked_at_ms FROM revoked_nodes ORDER BY node_id")?
            .into_iter()
            .map(|r| {
                let (id, at): (String, i64) = (r.get(0), r.get(1));
                Ok((
                    codec::decode_node_id("revoked node", &id)?,
                    at.max(0) as u64,
                ))
            })
            .collect()
    }

    fn revoke_node(&self, node: &NodeId, now_ms: u64) -> Result<u64, SchedulerStoreError> {
        let node = node.as_str().to_owned();
        let at: i64 = self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO revoked_nodes (node_id, revoked_at_ms) VALUES ($1, $2) \
                     ON CONFLICT (node_id) DO NOTHING",
                    &[&node as P, &(now_ms as i64)],
                )
                .await?;
                Ok(tx
                    .query_one(
                        "SELECT revoked_at_ms FROM revoked_nodes WHERE node_id = $1",
                        &[&node],
                    )
                    .await?
                    .get(0))
            })
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
        let (token, node) = (token_sha256.to_owned(), node.as_str().to_owned());
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO bootstrap_tokens (token_sha256, node_id, created_at_ms, \
                     expires_at_ms) VALUES ($1, $2, $3, $4)",
                    &[
                        &token as P,
                        &node,
                        &(now_ms as i64),
                        &(expires_at_ms as i64),
                    ],
                )
                .await?;
                Ok(())
            })
        })
    }

    fn bootstrap_tokens(&self) -> Result<Vec<super::StoredToken>, SchedulerStoreError> {
        self.read(
            "SELECT token_sha256, node_id, created_at_ms, expires_at_ms, used_at_ms \
             FROM bootstrap_tokens ORDER BY token_sha256",
        )?
        .into_iter()
        .map(|r| codec::decode_token((r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect()
    }

    fn restore_bootstrap_token(&self, t: &super::StoredToken) -> Result<(), SchedulerStoreError> {
        let t = t.clone();
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO bootstrap_tokens (token_sha256, node_id, created_at_ms, \
                     expires_at_ms, used_at_ms) VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &t.token_sha256 as P,
                        &t.node_id.as_str(),
                        &(t.created_at_ms as i64),
                        &(t.expires_at_ms as i64),
                        &t.used_at_ms.map(|u| u as i64),
                    ],
                )
                .await?;
                Ok(())
            })
        })
    }

    fn redeem_bootstrap_token(
        &self,
        token_sha256: &str,
        now_ms: u64,
    ) -> Result<Redeemed, SchedulerStoreError> {
        let token = token_sha256.to_owned();
        let found = self.write(move |tx| {
            Box::pin(async move {
                // The row lock makes a concurrent redemption wait, then
                // find the token used.
                let row: Option<(String, i64, Option<i64>)> = tx
                    .query_opt(
                        "SELECT node_id, expires_at_ms, used_at_ms FROM bootstrap_tokens \
                         WHERE token_sha256 = $1 FOR UPDATE",
                        &[&token],
                    )
                    .await?
                    .map(|r| (r.get(0), r.get(1), r.get(2)));
                if let Some((_, expires, None)) = &row {
                    if (*expires as u64) > now_ms {
                        tx.execute(
                            "UPDATE bootstrap_tokens SET used_at_ms = $2 WHERE token_sha256 = $1",
                            &[&token as P, &(now_ms as i64)],
                        )
                        .await?;
                    }
                }
                Ok(row)
            })
        })?;
        Redeemed::of(found, now_ms)
    }

    fn node_holders(&self) -> Result<Vec<(NodeId, [u8; 32])>, SchedulerStoreError> {
        self.read("SELECT node_id, certificate_sha256 FROM node_holders ORDER BY node_id")?
            .into_iter()
            .map(|r| {
                let (id, hex): (String, String) = (r.get(0), r.get(1));
                Ok((
                    codec::decode_node_id("node holder", &id)?,
                    codec::decode_sha256("node holder", &id, &hex)?,
                ))
            })
            .collect()
    }

    fn set_node_holder(&self, node: &NodeId, sha256: &[u8; 32]) -> Result<(), SchedulerStoreError> {
        let (node, sha) = (node.as_str().to_owned(), hex::encode(sha256));
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO node_holders (node_id, certificate_sha256) VALUES ($1, $2) \
                     ON CONFLICT (node_id) DO UPDATE SET \
                     certificate_sha256 = EXCLUDED.certificate_sha256",
                    &[&node, &sha],
                )
                .await?;
                Ok(())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use kiln_store::pg::leader::Election;
    use kiln_test_support::postgres::PgServer;

    use super::*;
    use crate::store::suite;

    fn sealer() -> Arc<Sealer> {
        Arc::new(Sealer::new(&[7u8; 32], &[]))
    }

    /// A fresh database on a throwaway server, and a way to open it.
    fn database(pg: &PgServer, name: &str) -> impl Fn() -> PgSchedulerStore {
        let url = pg.create_database(name);
        move || PgSchedulerStore::open(&url, sealer()).unwrap()
    }

    #[test]
    fn state_survives_reopening_the_database() {
        let Some(pg) = PgServer::start() else { return };
        suite::state_survives_reopening(database(&pg, "state"));
    }

    #[test]
    fn revocations_persist_and_tokens_are_single_use_and_expire() {
        let Some(pg) = PgServer::start() else { return };
        suite::revocations_persist_and_tokens_are_single_use_and_expire(database(&pg, "trust"));
    }

    #[test]
    fn node_holders_persist_and_follow_the_last_registration() {
        let Some(pg) = PgServer::start() else { return };
        suite::node_holders_follow_the_last_registration(database(&pg, "holders"));
    }

    #[tokio::test]
    async fn the_writer_batches_and_flushes() {
        let Some(pg) = PgServer::start() else { return };
        suite::the_writer_batches_and_flushes(Arc::new(database(&pg, "writer")())).await;
    }

    #[test]
    fn environments_are_sealed_in_the_rows_and_open_on_load() {
        let Some(pg) = PgServer::start() else { return };
        let store = database(&pg, "sealed")();
        let rows = |sql: &'static str| {
            store
                .read(sql)
                .unwrap()
                .into_iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
                .join("\n")
        };
        suite::environments_are_sealed_and_open_on_load(&store, || {
            rows("SELECT concat_ws(' ', spec, env_sealed) FROM instances")
                + &rows("SELECT concat_ws(' ', spec, config, env_sealed) FROM provisions")
        });
    }

    /// A leader paused past its lease finds a successor and writes
    /// nothing: not its write-behind batches, not a revocation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deposed_leader_writes_nothing() {
        let Some(pg) = PgServer::start() else { return };
        let open = database(&pg, "fenced");
        let (old, new) = (open(), open());
        let lease = Duration::from_millis(600);
        let candidate = |store: &PgSchedulerStore, name: &'static str| {
            let (store, db) = (store.clone(), store.database().clone());
            async move {
                store
                    .run(async move { Leadership::new(db, COMPONENT, name, lease).await })
                    .await
                    .unwrap()
            }
        };
        let a = candidate(&old, "https://sched-a:7100").await;
        let b = candidate(&new, "https://sched-b:7100").await;
        let campaign = |store: &PgSchedulerStore, l: &Leadership| {
            let l = l.clone();
            let store = store.clone();
            async move { store.run(async move { l.campaign().await }).await.unwrap() }
        };
        let Election::Leader { token } = campaign(&old, &a).await else {
            panic!("the first candidate leads")
        };
        old.fence(a.clone(), token);
        let (changes, _) = suite::secret_state();
        let first = changes[..1].to_vec();
        tokio::task::spawn_blocking({
            let old = old.clone();
            move || old.apply(&first)
        })
        .await
        .unwrap()
        .expect("the leader writes");
        assert!(matches!(
            campaign(&new, &b).await,
            Election::Follower { .. }
        ));

        // The old leader stalls past its lease; the standby takes over.
        tokio::time::sleep(lease + Duration::from_millis(200)).await;
        let Election::Leader { token: newer } = campaign(&new, &b).await else {
            panic!("the standby takes over an expired lease")
        };
        assert!(newer > token);

        let (old2, rest) = (old.clone(), changes.clone());
        let refused = tokio::task::spawn_blocking(move || old2.apply(&rest))
            .await
            .unwrap()
            .unwrap_err();
        assert!(refused.is_not_leader(), "{refused}");
        let old3 = old.clone();
        let revoked =
            tokio::task::spawn_blocking(move || old3.revoke_node(&"n-x".parse().unwrap(), 5))
                .await
                .unwrap()
                .unwrap_err();
        assert!(revoked.is_not_leader(), "{revoked}");
        assert!(refused.to_string().contains("sched-b"), "{refused}");

        let reader = open();
        let (nodes, instances) = tokio::task::spawn_blocking(move || reader.load().unwrap())
            .await
            .unwrap();
        assert_eq!(nodes.len(), 1, "the write before the takeover stays");
        assert!(instances.is_empty(), "nothing after it lands");
        let reader = open();
        assert!(
            tokio::task::spawn_blocking(move || reader.revoked_nodes().unwrap())
                .await
                .unwrap()
                .is_empty()
        );
    }

    /// A one-box install's SQLite state moves into PostgreSQL whole,
    /// environments resealed under the cluster's key; a second copy into
    /// the same database is refused.
    #[test]
    fn a_one_box_store_copies_into_postgres() {
        use crate::store::copy::{copy, CopyError};
        use crate::store::SqliteSchedulerStore;
        let Some(pg) = PgServer::start() else { return };
        let url = pg.create_database("copy");
        let dir = tempfile::tempdir().unwrap();
        let one_box = SqliteSchedulerStore::open(
            &dir.path().join("scheduler.db"),
            Arc::new(Sealer::new(&[1u8; 32], &[])),
        )
        .unwrap();
        let (changes, _) = suite::secret_state();
        one_box.apply(&changes).unwrap();
        one_box
            .apply(&[Change::UpsertAccountLimits(
                "1".parse().unwrap(),
                crate::placement::default_account_limits(),
            )])
            .unwrap();
        let n: NodeId = "n-gone".parse().unwrap();
        one_box.revoke_node(&n, 77).unwrap();
        one_box.set_node_holder(&n, &[5; 32]).unwrap();
        one_box.add_bootstrap_token("aa", &n, 10, 1_000).unwrap();
        one_box.add_bootstrap_token("bb", &n, 10, 1_000).unwrap();
        one_box.redeem_bootstrap_token("bb", 20).unwrap();

        let cluster_key = || Arc::new(Sealer::new(&[2u8; 32], &[]));
        let cluster = PgSchedulerStore::open(&url, cluster_key()).unwrap();
        let copied = copy(&one_box, &cluster).unwrap();
        assert_eq!(
            copied.to_string(),
            "1 nodes, 1 instances, 2 provisions, 1 account limits, 1 revoked nodes, \
             1 node certificate holders, 2 bootstrap tokens"
        );
        let reopened = PgSchedulerStore::open(&url, cluster_key()).unwrap();
        assert_eq!(reopened.load().unwrap(), one_box.load().unwrap());
        assert_eq!(
            reopened.load_provisions().unwrap(),
            one_box.load_provisions().unwrap()
        );
        assert_eq!(
            reopened.load_account_limits().unwrap(),
            one_box.load_account_limits().unwrap()
        );
        assert_eq!(reopened.revoked_nodes().unwrap(), vec![(n.clone(), 77)]);
        assert_eq!(reopened.node_holders().unwrap(), vec![(n.clone(), [5; 32])]);
        assert_eq!(
            reopened.bootstrap_tokens().unwrap(),
            one_box.bootstrap_tokens().unwrap()
        );
        assert!(matches!(
            reopened.redeem_bootstrap_token("bb", 30).unwrap(),
            Redeemed::Used { used_at_ms: 20, .. }
        ));

        let again = copy(&one_box, &reopened).unwrap_err();
        assert!(matches!(again, CopyError::NotEmpty(_)), "{again}");
        assert_eq!(
            reopened.bootstrap_tokens().unwrap().len(),
            2,
            "nothing merged"
        );
    }
}
