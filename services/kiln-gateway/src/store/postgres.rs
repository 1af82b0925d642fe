//! The PostgreSQL backend: every gateway of a cluster shares one database
//! (component `gateway` of Kiln's schema). Whatever two gateways could
//! race on is decided here: function names and domain names are primary
//! keys, trigger host labels unique, version and layer version numbers
//! handed out by a conditional `UPDATE ... RETURNING` on the row that
//! holds the last one.
//!
//! Every write also appends a row to `gateway_changes` (kind, account,
//! name) in its own transaction and sends `NOTIFY kiln_gateway_changes`
//! with the row's sequence number; the other gateways reload what changed
//! ([`super::changes`]). Writers take `gateway_changes` in EXCLUSIVE mode
//! just before appending, so sequence numbers become visible in order and
//! a follower that read up to `n` has seen every change up to `n`.
//!
//! Code zips are rows of `code_zips` keyed by sha256, written before the
//! row that references them ([`super::CodeFiles`] writes through) and
//! collected once nothing references them ([`PgMetaStore::collect_zips`]).
//! Secrets are sealed exactly as in SQLite ([`crate::secrets::rows`]).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use kiln_core::{AccountId, FunctionName};
use kiln_store::pg::runtime::PgRuntime;
use kiln_store::pg::PgDatabase;
use kiln_store::Migration;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Transaction};

use super::changes::Kind;
use super::{
    AccessKey, CodeBlob, CodeSource, FunctionVersions, LayerRecord, LayerVersionRecord, MetaStore,
    MetaStoreError, StoredKey,
};
use crate::bounds::{Bound, Usage};
use crate::domains::{DomainRecord, DomainStore};
use crate::model::{FunctionConfig, FunctionRecord};
use crate::ram::policy::Policy;
use crate::ram::{RoleRecord, RoleStore};
use crate::secrets::{rows, Sealer};
use crate::triggers::TriggerRecord;
use crate::versions::{AliasRecord, VersionRecord};

/// One query parameter.
type P<'a> = &'a (dyn ToSql + Sync);

/// The component name of the gateway's metadata schema.
pub const COMPONENT: &str = "gateway";

/// The channel every write notifies (payload: the change's sequence).
pub const CHANNEL: &str = "kiln_gateway_changes";

/// The gateway's metadata tables as of the first PostgreSQL release (the
/// SQLite schema after all its migrations, in PostgreSQL's dialect); later
/// changes are new migrations.
const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "gateway metadata, code zips, change feed",
        sql: "
    CREATE TABLE accounts (
        account_id TEXT PRIMARY KEY,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE access_keys (
        access_key_id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        secret_sealed TEXT NOT NULL,
        enabled BOOLEAN NOT NULL DEFAULT true,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE code_blobs (
        sha256 TEXT PRIMARY KEY,
        size BIGINT NOT NULL,
        checksum TEXT NOT NULL
    );
    CREATE TABLE code_zips (
        sha256 TEXT PRIMARY KEY,
        zip BYTEA NOT NULL,
        used_ms BIGINT NOT NULL
    );
    CREATE TABLE functions (
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        name TEXT NOT NULL,
        function_id TEXT NOT NULL UNIQUE,
        code_sha256 TEXT NOT NULL REFERENCES code_blobs(sha256),
        doc TEXT NOT NULL,
        env_sealed TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        modified_ms BIGINT NOT NULL,
        last_version INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (account_id, name)
    );
    CREATE INDEX functions_by_code ON functions(code_sha256);
    CREATE TABLE layers (
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        name TEXT NOT NULL,
        public BOOLEAN NOT NULL,
        last_version INTEGER NOT NULL,
        PRIMARY KEY (account_id, name)
    );
    CREATE TABLE layer_versions (
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (account_id, name, version),
        FOREIGN KEY (account_id, name) REFERENCES layers(account_id, name)
    );
    CREATE INDEX layer_versions_by_code ON layer_versions(sha256);
    CREATE TABLE roles (
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        name TEXT NOT NULL,
        doc TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        modified_ms BIGINT NOT NULL,
        PRIMARY KEY (account_id, name)
    );
    CREATE TABLE function_versions (
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        function_id TEXT NOT NULL,
        code_sha256 TEXT NOT NULL REFERENCES code_blobs(sha256),
        doc TEXT NOT NULL,
        env_sealed TEXT NOT NULL,
        description TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        PRIMARY KEY (account_id, name, version),
        FOREIGN KEY (account_id, name) REFERENCES functions(account_id, name)
    );
    CREATE INDEX function_versions_by_code ON function_versions(code_sha256);
    CREATE TABLE function_aliases (
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        alias TEXT NOT NULL,
        doc TEXT NOT NULL,
        PRIMARY KEY (account_id, name, alias),
        FOREIGN KEY (account_id, name) REFERENCES functions(account_id, name)
    );
    CREATE TABLE function_triggers (
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        trigger_name TEXT NOT NULL,
        host_label TEXT UNIQUE,
        doc TEXT NOT NULL,
        PRIMARY KEY (account_id, name, trigger_name),
        FOREIGN KEY (account_id, name) REFERENCES functions(account_id, name)
    );
    CREATE TABLE custom_domains (
        domain_name TEXT PRIMARY KEY,
        account_id TEXT NOT NULL,
        doc TEXT NOT NULL,
        key_sealed TEXT NOT NULL
    );
    CREATE TABLE gateway_changes (
        seq BIGSERIAL PRIMARY KEY,
        kind TEXT NOT NULL,
        account_id TEXT NOT NULL,
        name TEXT NOT NULL,
        at_ms BIGINT NOT NULL
    );
",
    },
    // Keys every gateway must share (the STS key that signs temporary
    // credentials and code download URLs), sealed; created by the first
    // gateway that needs one.
    Migration {
        name: "shared gateway keys",
        sql: "
    CREATE TABLE gateway_keys (
        name TEXT PRIMARY KEY,
        key_sealed TEXT NOT NULL
    );
",
    },
];

/// Milliseconds since the epoch, by the database's clock (one clock for
/// every gateway).
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// One row of the change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRow {
    pub seq: i64,
    pub kind: Kind,
    pub account_id: String,
    pub name: String,
}

/// The PostgreSQL metadata store. Cheap to clone.
#[derive(Clone)]
pub struct PgMetaStore {
    inner: Arc<Inner>,
}

struct Inner {
    rt: PgRuntime,
    db: PgDatabase,
    sealer: Arc<Sealer>,
    /// Where the dedicated LISTEN connection goes (password included).
    listen: tokio_postgres::Config,
}

impl std::fmt::Debug for PgMetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMetaStore")
            .field("target", &self.inner.db.target())
            .finish_non_exhaustive()
    }
}

impl PgMetaStore {
    /// Connect (up to `max_connections`) and bring the gateway's schema up
    /// to date; every gateway of a cluster may do this at once.
    pub fn open(
        url: &str,
        password_file: Option<&Path>,
        max_connections: usize,
        sealer: Arc<Sealer>,
    ) -> Result<Self, MetaStoreError> {
        let listen = kiln_store::pg::connect_config(url, password_file)?;
        let rt = PgRuntime::new("kiln-gw-pg")?;
        let (url, password_file) = (url.to_owned(), password_file.map(ToOwned::to_owned));
        let db = rt.block(async move {
            PgDatabase::open_with(
                &url,
                password_file.as_deref(),
                max_connections,
                COMPONENT,
                MIGRATIONS,
            )
            .await
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                rt,
                db,
                sealer,
                listen,
            }),
        })
    }

    /// Where the database is, without credentials.
    pub fn target(&self) -> &str {
        self.inner.db.target()
    }

    /// The configuration of a dedicated connection (LISTEN).
    pub(crate) fn listen_config(&self) -> &tokio_postgres::Config {
        &self.inner.listen
    }

    /// Run `work` on the store's runtime and wait for it.
    fn block<T, F>(&self, work: F) -> Result<T, MetaStoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, MetaStoreError>> + Send + 'static,
    {
        self.inner.rt.block(async move { Ok(work.await) })?
    }

    /// The rows of one query.
    fn query(
        &self,
        sql: &'static str,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<Vec<Row>, MetaStoreError> {
        let db = self.inner.db.clone();
        self.block(async move {
            let conn = db.conn().await?;
            let refs: Vec<P> = params.iter().map(|p| p.as_ref() as P).collect();
            Ok(conn.query(sql, &refs).await?)
        })
    }

    fn db(&self) -> PgDatabase {
        self.inner.db.clone()
    }

    fn sealer(&self) -> Arc<Sealer> {
        self.inner.sealer.clone()
    }

    /// The sequence number of the newest change (0 if none).
    pub fn last_change(&self) -> Result<i64, MetaStoreError> {
        let rows = self.query("SELECT COALESCE(MAX(seq), 0) FROM gateway_changes", vec![])?;
        Ok(rows[0].get(0))
    }

    /// The changes after `seq`, oldest first (at most `limit`), and the
    /// oldest sequence number still stored (a follower further behind
    /// lost changes to [`Self::purge_changes`] and reloads everything).
    pub fn changes_since(
        &self,
        seq: i64,
        limit: i64,
    ) -> Result<(Vec<ChangeRow>, Option<i64>), MetaStoreError> {
        let db = self.db();
        self.block(async move {
            let conn = db.conn().await?;
            let oldest: Option<i64> = conn
                .query_one("SELECT MIN(seq) FROM gateway_changes", &[])
                .await?
                .get(0);
            let rows = conn
                .query(
                    "SELECT seq, kind, account_id, name FROM gateway_changes
                     WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&seq, &limit],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in rows {
                let kind: String = r.get(1);
                let Some(kind) = Kind::parse(&kind) else {
                    tracing::warn!(%kind, "skipping a change of an unknown kind (newer gateway?)");
                    continue;
                };
                out.push(ChangeRow {
                    seq: r.get(0),
                    kind,
                    account_id: r.get(2),
                    name: r.get(3),
                });
            }
            Ok((out, oldest))
        })
    }

    /// Drop change rows older than `keep_ms`, always keeping the newest
    /// (a gateway starting later reads its sequence). Returns how many.
    pub fn purge_changes(&self, keep_ms: i64) -> Result<u64, MetaStoreError> {
        let db = self.db();
        self.block(async move {
            let conn = db.conn().await?;
            let sql = format!(
                "DELETE FROM gateway_changes WHERE at_ms < {NOW_MS} - $1
                 AND seq < (SELECT MAX(seq) FROM gateway_changes)"
            );
            Ok(conn.execute(&sql, &[&keep_ms]).await?)
        })
    }

    /// Drop code zips nothing references (no package row, no layer
    /// version, no function or version naming it as a layer) and unused
    /// for `grace_ms` (a zip is written just before the row that names it,
    /// possibly by another gateway). Returns how many.
    pub fn collect_zips(&self, grace_ms: i64) -> Result<u64, MetaStoreError> {
        let db = self.db();
        self.block(async move {
            let conn = db.conn().await?;
            let sql = format!(
                "DELETE FROM code_zips z WHERE z.used_ms < {NOW_MS} - $1
                 AND NOT EXISTS (SELECT 1 FROM code_blobs b WHERE b.sha256 = z.sha256)
                 AND NOT EXISTS (SELECT 1 FROM layer_versions l WHERE l.sha256 = z.sha256)
                 AND NOT EXISTS (SELECT 1 FROM functions f WHERE strpos(f.doc, z.sha256) > 0)
                 AND NOT EXISTS (SELECT 1 FROM function_versions v
                                 WHERE strpos(v.doc, z.sha256) > 0)"
            );
            Ok(conn.execute(&sql, &[&grace_ms]).await?)
        })
    }

    /// The digests of every stored zip.
    pub fn zip_digests(&self) -> Result<Vec<String>, MetaStoreError> {
        Ok(self
            .query("SELECT sha256 FROM code_zips ORDER BY sha256", vec![])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// Run `work` in one transaction, committed if it succeeds (a write
    /// calls [`changed`] inside it to tell the other gateways).
    fn write<T, W>(&self, work: W) -> Result<T, MetaStoreError>
    where
        T: Send + 'static,
        W: for<'t> FnOnce(
                &'t Transaction<'t>,
            ) -> std::pin::Pin<
                Box<dyn Future<Output = Result<T, MetaStoreError>> + Send + 't>,
            > + Send
            + 'static,
    {
        let db = self.db();
        self.block(async move {
            let mut conn = db.conn().await?;
            let tx = conn.transaction().await?;
            let out = work(&tx).await?;
            tx.commit().await?;
            Ok(out)
        })
    }

    /// Run one statement on what `account` calls `name` (its `$1` and
    /// `$2`; `rest` are `$3`...) and, when it touched a row, record a
    /// change of `kind`. Whether it touched one.
    fn change_rows(
        &self,
        kind: Kind,
        account: &str,
        name: &str,
        sql: &'static str,
        rest: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<bool, MetaStoreError> {
        let (a, n) = (account.to_owned(), name.to_owned());
        self.write(move |tx| {
            Box::pin(async move {
                let mut params: Vec<P> = vec![&a, &n];
                params.extend(rest.iter().map(|p| p.as_ref() as P));
                let k = tx.execute(sql, &params).await?;
                if k > 0 {
                    changed(tx, kind, &a, &n).await?;
                }
                Ok(k > 0)
            })
        })
    }
}

impl PgMetaStore {
    /// The 32-byte key `name` every gateway of the cluster shares: the
    /// stored one, or a random one stored now (the first gateway wins a
    /// race; the others read its key). Sealed at rest.
    pub fn shared_key(&self, name: &str) -> Result<[u8; 32], MetaStoreError> {
        use rand::RngCore as _;
        let aad = crate::secrets::Aad::new("gateway_keys.key", &[name]);
        let mut fresh = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut fresh);
        let sealed = self.inner.sealer.seal(&aad, &fresh);
        let (db, n) = (self.db(), name.to_owned());
        let stored: String = self.block(async move {
            let conn = db.conn().await?;
            conn.execute(
                "INSERT INTO gateway_keys (name, key_sealed) VALUES ($1, $2)
                 ON CONFLICT (name) DO NOTHING",
                &[&n, &sealed],
            )
            .await?;
            Ok(conn
                .query_one("SELECT key_sealed FROM gateway_keys WHERE name = $1", &[&n])
                .await?
                .get(0))
        })?;
        let key =
            self.inner
                .sealer
                .open(&aad, &stored)
                .map_err(|source| MetaStoreError::Sealed {
                    what: format!("shared gateway key {name}"),
                    source,
                })?;
        key.try_into().map_err(|_| MetaStoreError::Sealed {
            what: format!("shared gateway key {name} (not 32 bytes)"),
            source: crate::secrets::SealError::Malformed,
        })
    }
}

/// Copying a one-box gateway in ([`super::copy`]).
impl PgMetaStore {
    /// The gateway tables holding rows, with their counts (empty: a fresh
    /// database).
    pub fn holds_metadata(&self) -> Result<Vec<String>, MetaStoreError> {
        let mut out = Vec::new();
        for table in [
            "accounts",
            "access_keys",
            "functions",
            "layers",
            "roles",
            "custom_domains",
        ] {
            let sql = format!("SELECT count(*) FROM {table}");
            let db = self.db();
            let n: i64 =
                self.block(async move { Ok(db.conn().await?.query_one(&sql, &[]).await?.get(0)) })?;
            if n > 0 {
                out.push(format!("{n} {table}"));
            }
        }
        Ok(out)
    }

    /// Raise each function's and layer's last handed-out number to the
    /// source's (versions deleted there keep their ids used) and set each
    /// layer's ACL.
    pub fn restore_last_ids(
        &self,
        functions: &[(AccountId, FunctionName, String, u32)],
        layers: &[LayerRecord],
    ) -> Result<(), MetaStoreError> {
        let functions: Vec<(String, String, String, i32)> = functions
            .iter()
            .map(|(a, n, id, last)| {
                (
                    a.as_str().to_owned(),
                    n.as_str().to_owned(),
                    id.clone(),
                    *last as i32,
                )
            })
            .collect();
        let layers: Vec<(String, String, bool, i32)> = layers
            .iter()
            .map(|l| {
                (
                    l.account_id.as_str().to_owned(),
                    l.name.clone(),
                    l.public,
                    l.last_version as i32,
                )
            })
            .collect();
        self.write(move |tx| {
            Box::pin(async move {
                for (a, n, id, last) in &functions {
                    tx.execute(
                        "UPDATE functions SET last_version = GREATEST(last_version, $4)
                         WHERE account_id = $1 AND name = $2 AND function_id = $3",
                        &[a as P, n, id, last],
                    )
                    .await?;
                    changed(tx, Kind::Version, a, n).await?;
                }
                for (a, n, public, last) in &layers {
                    tx.execute(
                        "INSERT INTO layers (account_id, name, public, last_version)
                         VALUES ($1, $2, $3, $4)
                         ON CONFLICT (account_id, name) DO UPDATE
                         SET public = EXCLUDED.public,
                             last_version = GREATEST(layers.last_version, EXCLUDED.last_version)",
                        &[a as P, n, public, last],
                    )
                    .await?;
                    changed(tx, Kind::Layer, a, n).await?;
                }
                Ok(())
            })
        })
    }
}

/// Append a change and notify the other gateways (delivered at commit).
async fn changed(
    tx: &Transaction<'_>,
    kind: Kind,
    account: &str,
    name: &str,
) -> Result<(), MetaStoreError> {
    // Sequence numbers commit in order (see the module docs).
    tx.batch_execute("LOCK TABLE gateway_changes IN EXCLUSIVE MODE")
        .await?;
    let sql = format!(
        "INSERT INTO gateway_changes (kind, account_id, name, at_ms)
         VALUES ($1, $2, $3, {NOW_MS}) RETURNING seq"
    );
    let seq: i64 = tx
        .query_one(&sql, &[&kind.as_str(), &account, &name])
        .await?
        .get(0);
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &seq.to_string()])
        .await?;
    Ok(())
}

fn corrupt(name: String) -> impl FnOnce(serde_json::Error) -> MetaStoreError {
    move |source| MetaStoreError::Corrupt { name, source }
}

/// Every function's row, as [`decode_function`] reads it.
const FUNCTIONS: &str = "SELECT account_id, name, function_id, doc, created_ms, modified_ms,
     env_sealed FROM functions";

/// One function's row.
const FUNCTION: &str = "SELECT account_id, name, function_id, doc, created_ms, modified_ms,
     env_sealed FROM functions WHERE account_id = $1 AND name = $2";

fn decode_function(sealer: &Sealer, r: &Row) -> Result<Option<FunctionRecord>, MetaStoreError> {
    let (account, name, function_id, doc): (String, String, String, String) =
        (r.get(0), r.get(1), r.get(2), r.get(3));
    let (created, modified, env): (i64, i64, String) = (r.get(4), r.get(5), r.get(6));
    let (Ok(account_id), Ok(fname)) = (account.parse(), name.parse()) else {
        tracing::warn!(%account, %name, "skipping function with an invalid id");
        return Ok(None);
    };
    let mut config: FunctionConfig = serde_json::from_str(&doc).map_err(corrupt(name.clone()))?;
    let aad = rows::function_environment(&account, &name, &function_id);
    config.put_secrets(
        rows::open_environment(sealer, &aad, &env).map_err(|source| MetaStoreError::Sealed {
            what: format!("environment of function {account}/{name}"),
            source,
        })?,
    );
    Ok(Some(FunctionRecord {
        account_id,
        name: fname,
        function_id,
        created_ms: created as u64,
        modified_ms: modified as u64,
        config,
    }))
}

/// The function's document without its environment, and the environment
/// sealed to the row (as in SQLite).
fn doc_and_env(sealer: &Sealer, f: &FunctionRecord) -> (String, String) {
    let aad = rows::function_environment(f.account_id.as_str(), f.name.as_str(), &f.function_id);
    let (secrets, doc) = f.config.take_secrets();
    let env = rows::seal_environment(sealer, &aad, &secrets);
    (doc.to_string(), env)
}

/// Every write that grows an account takes this lock (until it commits),
/// so each one counts the others' rows: `$1` is the account.
const ACCOUNT_BOUNDS_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('kiln-account-bounds:' || $1, 0))";

/// What an account stores, as the catalog counts it: its functions, the
/// bytes of their packages, of packages only its versions still hold
/// (once per function and package), and of its layer versions; and how
/// many layer versions.
const ACCOUNT_USAGE: &str = "
    WITH f AS (SELECT name, code_sha256 FROM functions WHERE account_id = $1),
    held AS (
        SELECT DISTINCT v.name, v.code_sha256 FROM function_versions v
        JOIN f ON f.name = v.name
        WHERE v.account_id = $1 AND v.code_sha256 <> f.code_sha256
    ),
    l AS (
        SELECT (doc::jsonb #>> '{code,size}')::bigint AS size
        FROM layer_versions WHERE account_id = $1
    )
    SELECT (SELECT count(*) FROM f),
           (SELECT coalesce(sum(b.size), 0) FROM f JOIN code_blobs b ON b.sha256 = f.code_sha256)::bigint
         + (SELECT coalesce(sum(b.size), 0) FROM held JOIN code_blobs b ON b.sha256 = held.code_sha256)::bigint
         + (SELECT coalesce(sum(size), 0) FROM l)::bigint,
           (SELECT count(*) FROM l)";

/// Refuse, in `tx`, a write that takes `account` over `bound`: under the
/// account's lock, against what the database holds (every gateway's
/// committed writes), not this gateway's view. `replacing` names the
/// function whose package a write replaces: if one of its versions holds
/// that package now (another gateway may have just published it), the
/// write frees nothing.
async fn within(
    tx: &Transaction<'_>,
    account: &AccountId,
    mut bound: Bound,
    replacing: Option<&str>,
) -> Result<(), MetaStoreError> {
    tx.execute(ACCOUNT_BOUNDS_LOCK, &[&account.as_str()])
        .await?;
    if let (Some(name), true) = (replacing, bound.change.freed_bytes > 0) {
        let held: bool = tx
            .query_one(
                "SELECT EXISTS (
                     SELECT 1 FROM function_versions v JOIN functions f
                       ON f.account_id = v.account_id AND f.name = v.name
                     WHERE f.account_id = $1 AND f.name = $2 AND v.code_sha256 = f.code_sha256)",
                &[&account.as_str(), &name],
            )
            .await?
            .get(0);
        if held {
            bound.change.freed_bytes = 0;
        }
    }
    let row = tx.query_one(ACCOUNT_USAGE, &[&account.as_str()]).await?;
    let usage = Usage {
        functions: row.get::<_, i64>(0).max(0) as u64,
        code_bytes: row.get::<_, i64>(1).max(0) as u64,
        layer_versions: row.get::<_, i64>(2).max(0) as u64,
    };
    crate::bounds::check(account, bound.limits, usage, bound.change)
        .map_err(MetaStoreError::OverBound)
}

/// What every write of a function does first: check its bound (a
/// cluster's; `replacing` when it replaces the stored function's
/// package), then make sure its package's row exists.
async fn begin_function_write(
    tx: &Transaction<'_>,
    f: &FunctionRecord,
    bound: Option<Bound>,
    replacing: bool,
) -> Result<(), MetaStoreError> {
    if let Some(b) = bound {
        let name = replacing.then_some(f.name.as_str());
        within(tx, &f.account_id, b, name).await?;
    }
    insert_code(tx, &f.config).await
}

async fn insert_code(tx: &Transaction<'_>, c: &FunctionConfig) -> Result<(), MetaStoreError> {
    tx.execute(
        "INSERT INTO code_blobs (sha256, size, checksum) VALUES ($1, $2, $3)
         ON CONFLICT (sha256) DO NOTHING",
        &[&c.code.sha256, &(c.code.size as i64), &c.code.checksum],
    )
    .await?;
    Ok(())
}

impl PgMetaStore {
    fn insert_function_bounded(
        &self,
        f: &FunctionRecord,
        bound: Option<Bound>,
    ) -> Result<(), MetaStoreError> {
        let (doc, env) = doc_and_env(&self.inner.sealer, f);
        let f = f.clone();
        self.write(move |tx| {
            Box::pin(async move {
                begin_function_write(tx, &f, bound, false).await?;
                let n = tx
                    .execute(
                        "INSERT INTO functions
                         (account_id, name, function_id, code_sha256, doc, created_ms,
                          modified_ms, env_sealed)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                         ON CONFLICT (account_id, name) DO NOTHING",
                        &[
                            &f.account_id.as_str() as P,
                            &f.name.as_str(),
                            &f.function_id,
                            &f.config.code.sha256,
                            &doc,
                            &(f.created_ms as i64),
                            &(f.modified_ms as i64),
                            &env,
                        ],
                    )
                    .await?;
                if n == 0 {
                    return Err(MetaStoreError::FunctionExists(f.name.clone()));
                }
                changed(tx, Kind::Function, f.account_id.as_str(), f.name.as_str()).await
            })
        })
    }

    fn update_function_bounded(
        &self,
        f: &FunctionRecord,
        expected_modified_ms: u64,
        bound: Option<Bound>,
    ) -> Result<(), MetaStoreError> {
        let (doc, env) = doc_and_env(&self.inner.sealer, f);
        let f = f.clone();
        self.write(move |tx| {
            Box::pin(async move {
                begin_function_write(tx, &f, bound, true).await?;
                // Compare and set on modified_ms: another gateway's update
                // since this one read the function makes it fail, never
                // silently overwrite.
                let n = tx
                    .execute(
                        "UPDATE functions SET code_sha256 = $3, doc = $4, modified_ms = $5,
                         env_sealed = $6
                         WHERE account_id = $1 AND name = $2 AND function_id = $7
                           AND modified_ms = $8",
                        &[
                            &f.account_id.as_str() as P,
                            &f.name.as_str(),
                            &f.config.code.sha256,
                            &doc,
                            &(f.modified_ms as i64),
                            &env,
                            &f.function_id,
                            &(expected_modified_ms as i64),
                        ],
                    )
                    .await?;
                if n == 0 {
                    let exists = tx
                        .query_opt(
                            "SELECT 1 FROM functions
                             WHERE account_id = $1 AND name = $2 AND function_id = $3",
                            &[
                                &f.account_id.as_str() as P,
                                &f.name.as_str(),
                                &f.function_id,
                            ],
                        )
                        .await?
                        .is_some();
                    return Err(if exists {
                        MetaStoreError::FunctionChanged(f.name.clone())
                    } else {
                        MetaStoreError::FunctionMissing(f.name.clone())
                    });
                }
                changed(tx, Kind::Function, f.account_id.as_str(), f.name.as_str()).await
            })
        })
    }

    fn insert_layer_version_bounded(
        &self,
        v: &LayerVersionRecord,
        bound: Option<Bound>,
    ) -> Result<u32, MetaStoreError> {
        let mut v = v.clone();
        self.write(move |tx| {
            Box::pin(async move {
                if let Some(b) = bound {
                    within(tx, &v.account_id, b, None).await?;
                }
                let (a, n) = (v.account_id.as_str().to_owned(), v.name.clone());
                tx.execute(
                    "INSERT INTO layers (account_id, name, public, last_version)
                     VALUES ($1, $2, false, 0) ON CONFLICT (account_id, name) DO NOTHING",
                    &[&a, &n],
                )
                .await?;
                // The number: the one asked for, or the next free one if
                // another gateway took it (the row lock serialises them).
                let last: i32 = tx
                    .query_one(
                        "UPDATE layers SET last_version = GREATEST(last_version + 1, $3)
                         WHERE account_id = $1 AND name = $2 RETURNING last_version",
                        &[&a as P, &n, &(v.version as i32)],
                    )
                    .await?
                    .get(0);
                v.version = last as u32;
                tx.execute(
                    "INSERT INTO layer_versions (account_id, name, version, sha256, doc)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &a as P,
                        &n,
                        &last,
                        &v.code.sha256,
                        &serde_json::to_string(&v).expect("layer version serialises"),
                    ],
                )
                .await?;
                changed(tx, Kind::Layer, &a, &n).await?;
                Ok(v.version)
            })
        })
    }
}

impl MetaStore for PgMetaStore {
    fn check(&self) -> Result<(), MetaStoreError> {
        self.query(
            "SELECT count(*) FROM (SELECT 1 FROM accounts LIMIT 1) a",
            vec![],
        )?;
        Ok(())
    }

    fn ensure_account(&self, account: &AccountId, now_ms: u64) -> Result<(), MetaStoreError> {
        self.query(
            "INSERT INTO accounts (account_id, created_ms) VALUES ($1, $2)
             ON CONFLICT (account_id) DO NOTHING",
            vec![
                Box::new(account.as_str().to_owned()),
                Box::new(now_ms as i64),
            ],
        )?;
        Ok(())
    }

    fn put_access_key(&self, key: &AccessKey, now_ms: u64) -> Result<(), MetaStoreError> {
        let aad = rows::access_key_secret(&key.access_key_id, key.account_id.as_str());
        let sealed = self.inner.sealer.seal(&aad, key.secret.as_bytes());
        let (id, account) = (
            key.access_key_id.clone(),
            key.account_id.as_str().to_owned(),
        );
        self.write(move |tx| {
            Box::pin(async move {
                // A key never moves to another account: the update applies
                // only to the same owner, decided in one statement.
                let stored = tx
                    .query_opt(
                        "INSERT INTO access_keys
                         (access_key_id, account_id, secret_sealed, enabled, created_ms)
                         VALUES ($1, $2, $3, true, $4)
                         ON CONFLICT (access_key_id) DO UPDATE
                         SET secret_sealed = EXCLUDED.secret_sealed
                         WHERE access_keys.account_id = EXCLUDED.account_id
                         RETURNING access_key_id",
                        &[&id as P, &account, &sealed, &(now_ms as i64)],
                    )
                    .await?;
                if stored.is_none() {
                    return Err(MetaStoreError::KeyOwnedElsewhere(id));
                }
                changed(tx, Kind::Key, &account, &id).await
            })
        })
    }

    fn access_keys(&self) -> Result<Vec<StoredKey>, MetaStoreError> {
        let rows = self.query(
            "SELECT access_key_id, account_id, secret_sealed, enabled, created_ms
             FROM access_keys ORDER BY created_ms, access_key_id",
            vec![],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (id, account, sealed): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let (enabled, created): (bool, i64) = (r.get(3), r.get(4));
            let Ok(account_id) = account.parse() else {
                tracing::warn!(access_key_id = %id, "skipping key with an invalid account id");
                continue;
            };
            let secret = self
                .inner
                .sealer
                .open_string(&rows::access_key_secret(&id, &account), &sealed)
                .map_err(|source| MetaStoreError::Sealed {
                    what: format!("secret of access key {id}"),
                    source,
                })?;
            out.push(StoredKey {
                key: AccessKey {
                    access_key_id: id,
                    account_id,
                    secret,
                },
                enabled,
                created_ms: created as u64,
            });
        }
        Ok(out)
    }

    fn set_access_key_enabled(
        &self,
        access_key_id: &str,
        enabled: bool,
    ) -> Result<bool, MetaStoreError> {
        let id = access_key_id.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "UPDATE access_keys SET enabled = $2 WHERE access_key_id = $1
                         RETURNING account_id",
                        &[&id as P, &enabled],
                    )
                    .await?;
                match row {
                    Some(r) => {
                        changed(tx, Kind::Key, &r.get::<_, String>(0), &id).await?;
                        Ok(true)
                    }
                    None => Ok(false),
                }
            })
        })
    }

    fn delete_access_key(&self, access_key_id: &str) -> Result<bool, MetaStoreError> {
        let id = access_key_id.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "DELETE FROM access_keys WHERE access_key_id = $1 RETURNING account_id",
                        &[&id],
                    )
                    .await?;
                match row {
                    Some(r) => {
                        changed(tx, Kind::Key, &r.get::<_, String>(0), &id).await?;
                        Ok(true)
                    }
                    None => Ok(false),
                }
            })
        })
    }

    fn functions(&self) -> Result<Vec<FunctionRecord>, MetaStoreError> {
        let rows = self.query(FUNCTIONS, vec![])?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            out.extend(decode_function(&self.inner.sealer, r)?);
        }
        Ok(out)
    }

    fn function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<Option<FunctionRecord>, MetaStoreError> {
        let rows = self.query(
            FUNCTION,
            vec![
                Box::new(account.as_str().to_owned()),
                Box::new(name.as_str().to_owned()),
            ],
        )?;
        match rows.first() {
            Some(r) => decode_function(&self.inner.sealer, r),
            None => Ok(None),
        }
    }

    fn insert_function(&self, f: &FunctionRecord) -> Result<(), MetaStoreError> {
        self.insert_function_bounded(f, None)
    }

    fn insert_function_within(
        &self,
        f: &FunctionRecord,
        bound: Bound,
    ) -> Result<(), MetaStoreError> {
        self.insert_function_bounded(f, Some(bound))
    }

    fn update_function(
        &self,
        f: &FunctionRecord,
        expected_modified_ms: u64,
    ) -> Result<(), MetaStoreError> {
        self.update_function_bounded(f, expected_modified_ms, None)
    }

    fn update_function_within(
        &self,
        f: &FunctionRecord,
        expected_modified_ms: u64,
        bound: Bound,
    ) -> Result<(), MetaStoreError> {
        self.update_function_bounded(f, expected_modified_ms, Some(bound))
    }

    fn delete_function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<(), MetaStoreError> {
        let (a, n) = (account.as_str().to_owned(), name.clone());
        self.write(move |tx| {
            Box::pin(async move {
                // The row is locked first: a version or trigger another
                // gateway adds meanwhile waits for this transaction.
                let found = tx
                    .query_opt(
                        "SELECT 1 FROM functions WHERE account_id = $1 AND name = $2 FOR UPDATE",
                        &[&a as P, &n.as_str()],
                    )
                    .await?;
                if found.is_none() {
                    return Err(MetaStoreError::FunctionMissing(n));
                }
                let held: bool = tx
                    .query_one(
                        "SELECT EXISTS(SELECT 1 FROM function_versions
                                       WHERE account_id = $1 AND name = $2)
                             OR EXISTS(SELECT 1 FROM function_aliases
                                       WHERE account_id = $1 AND name = $2)",
                        &[&a as P, &n.as_str()],
                    )
                    .await?
                    .get(0);
                if held {
                    return Err(MetaStoreError::FunctionHasVersions(n));
                }
                let triggered: bool = tx
                    .query_one(
                        "SELECT EXISTS(SELECT 1 FROM function_triggers
                                       WHERE account_id = $1 AND name = $2)",
                        &[&a as P, &n.as_str()],
                    )
                    .await?
                    .get(0);
                if triggered {
                    return Err(MetaStoreError::FunctionHasTriggers(n));
                }
                tx.execute(
                    "DELETE FROM functions WHERE account_id = $1 AND name = $2",
                    &[&a as P, &n.as_str()],
                )
                .await?;
                changed(tx, Kind::Function, &a, n.as_str()).await
            })
        })
    }

    fn code_blob(&self, sha256: &str) -> Result<Option<CodeBlob>, MetaStoreError> {
        let rows = self.query(
            "SELECT sha256, size, checksum FROM code_blobs WHERE sha256 = $1",
            vec![Box::new(sha256.to_owned())],
        )?;
        Ok(rows.first().map(|r| CodeBlob {
            sha256: r.get(0),
            size: r.get::<_, i64>(1) as u64,
            checksum: r.get(2),
        }))
    }

    fn release_code(&self, sha256: &str) -> Result<bool, MetaStoreError> {
        let d = sha256.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let n = tx
                    .execute(
                        "DELETE FROM code_blobs WHERE sha256 = $1
                         AND NOT EXISTS (SELECT 1 FROM functions WHERE code_sha256 = $1)
                         AND NOT EXISTS (SELECT 1 FROM function_versions WHERE code_sha256 = $1)",
                        &[&d],
                    )
                    .await?;
                Ok(n > 0)
            })
        })
    }

    fn code_digests(&self) -> Result<Vec<String>, MetaStoreError> {
        Ok(self
            .query("SELECT sha256 FROM code_blobs", vec![])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn layers(&self) -> Result<Vec<LayerRecord>, MetaStoreError> {
        let rows = self.query(
            "SELECT account_id, name, public, last_version FROM layers",
            vec![],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (account, name): (String, String) = (r.get(0), r.get(1));
            let Ok(account_id) = account.parse() else {
                tracing::warn!(%account, %name, "skipping layer with an invalid account id");
                continue;
            };
            out.push(LayerRecord {
                account_id,
                name,
                public: r.get(2),
                last_version: r.get::<_, i32>(3) as u32,
            });
        }
        Ok(out)
    }

    fn layer_versions(&self) -> Result<Vec<LayerVersionRecord>, MetaStoreError> {
        self.query("SELECT name, doc FROM layer_versions", vec![])?
            .iter()
            .map(|r| {
                let (name, doc): (String, String) = (r.get(0), r.get(1));
                serde_json::from_str(&doc).map_err(corrupt(format!("layer {name}")))
            })
            .collect()
    }

    fn insert_layer_version(&self, v: &LayerVersionRecord) -> Result<u32, MetaStoreError> {
        self.insert_layer_version_bounded(v, None)
    }

    fn insert_layer_version_within(
        &self,
        v: &LayerVersionRecord,
        bound: Bound,
    ) -> Result<u32, MetaStoreError> {
        self.insert_layer_version_bounded(v, Some(bound))
    }

    fn delete_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u32,
    ) -> Result<bool, MetaStoreError> {
        self.change_rows(
            Kind::Layer,
            account.as_str(),
            name,
            "DELETE FROM layer_versions WHERE account_id = $1 AND name = $2 AND version = $3",
            vec![Box::new(version as i32)],
        )
    }

    fn set_layer_public(
        &self,
        account: &AccountId,
        name: &str,
        public: bool,
    ) -> Result<bool, MetaStoreError> {
        self.change_rows(
            Kind::Layer,
            account.as_str(),
            name,
            "UPDATE layers SET public = $3 WHERE account_id = $1 AND name = $2",
            vec![Box::new(public)],
        )
    }

    fn function_versions(&self) -> Result<FunctionVersions, MetaStoreError> {
        let mut out = FunctionVersions::default();
        let rows = self.query(
            "SELECT account_id, name, version, function_id, doc, env_sealed, description,
                    created_ms
             FROM function_versions ORDER BY account_id, name, version",
            vec![],
        )?;
        for r in rows {
            let (account, name, version): (String, String, i32) = (r.get(0), r.get(1), r.get(2));
            let (function_id, doc, env): (String, String, String) = (r.get(3), r.get(4), r.get(5));
            let (description, created): (String, i64) = (r.get(6), r.get(7));
            let (Ok(account_id), Ok(fname)) = (account.parse(), name.parse()) else {
                tracing::warn!(%account, %name, version, "skipping version with an invalid id");
                continue;
            };
            let mut config: FunctionConfig =
                serde_json::from_str(&doc).map_err(corrupt(format!("{name} version {version}")))?;
            let aad = rows::version_environment(&account, &name, &function_id, version as u32);
            config.put_secrets(
                rows::open_environment(&self.inner.sealer, &aad, &env).map_err(|source| {
                    MetaStoreError::Sealed {
                        what: format!("environment of function {account}/{name} version {version}"),
                        source,
                    }
                })?,
            );
            out.versions.push(VersionRecord {
                account_id,
                name: fname,
                function_id,
                version: version as u32,
                description,
                created_ms: created as u64,
                config,
            });
        }
        let rows = self.query(
            "SELECT account_id, name, function_id, last_version FROM functions
             WHERE last_version > 0",
            vec![],
        )?;
        for r in rows {
            let (account, name, function_id, last): (String, String, String, i32) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if let (Ok(a), Ok(n)) = (account.parse(), name.parse()) {
                out.last_ids.push((a, n, function_id, last as u32));
            }
        }
        Ok(out)
    }

    fn insert_version(&self, v: &VersionRecord) -> Result<u32, MetaStoreError> {
        let v = v.clone();
        let sealer = self.sealer();
        self.write(move |tx| {
            Box::pin(async move {
                let (a, n) = (v.account_id.as_str().to_owned(), v.name.as_str().to_owned());
                // The id: the one asked for, or the next free one if another
                // gateway published meanwhile (the row lock serialises them).
                let row = tx
                    .query_opt(
                        "UPDATE functions SET last_version = GREATEST(last_version + 1, $4)
                         WHERE account_id = $1 AND name = $2 AND function_id = $3
                         RETURNING last_version",
                        &[&a as P, &n, &v.function_id, &(v.version as i32)],
                    )
                    .await?;
                let Some(row) = row else {
                    return Err(MetaStoreError::FunctionMissing(v.name.clone()));
                };
                let version: i32 = row.get(0);
                let aad = rows::version_environment(&a, &n, &v.function_id, version as u32);
                let (secrets, doc) = v.config.take_secrets();
                let env = rows::seal_environment(&sealer, &aad, &secrets);
                insert_code(tx, &v.config).await?;
                tx.execute(
                    "INSERT INTO function_versions
                     (account_id, name, version, function_id, code_sha256, doc, env_sealed,
                      description, created_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &a as P,
                        &n,
                        &version,
                        &v.function_id,
                        &v.config.code.sha256,
                        &doc.to_string(),
                        &env,
                        &v.description,
                        &(v.created_ms as i64),
                    ],
                )
                .await?;
                changed(tx, Kind::Version, &a, &n).await?;
                Ok(version as u32)
            })
        })
    }

    fn delete_version(
        &self,
        account: &AccountId,
        name: &FunctionName,
        version: u32,
    ) -> Result<bool, MetaStoreError> {
        self.change_rows(
            Kind::Version,
            account.as_str(),
            name.as_str(),
            "DELETE FROM function_versions WHERE account_id = $1 AND name = $2 AND version = $3",
            vec![Box::new(version as i32)],
        )
    }

    fn aliases(&self) -> Result<Vec<AliasRecord>, MetaStoreError> {
        self.query("SELECT name, alias, doc FROM function_aliases", vec![])?
            .iter()
            .map(|r| {
                let (name, alias, doc): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                serde_json::from_str(&doc).map_err(corrupt(format!("{name} alias {alias}")))
            })
            .collect()
    }

    fn put_alias(&self, al: &AliasRecord) -> Result<(), MetaStoreError> {
        let (a, n) = (
            al.account_id.as_str().to_owned(),
            al.name.as_str().to_owned(),
        );
        let (alias, doc) = (
            al.alias.clone(),
            serde_json::to_string(al).expect("alias serialises"),
        );
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO function_aliases (account_id, name, alias, doc)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (account_id, name, alias) DO UPDATE SET doc = EXCLUDED.doc",
                    &[&a as P, &n, &alias, &doc],
                )
                .await?;
                changed(tx, Kind::Version, &a, &n).await
            })
        })
    }

    fn delete_alias(
        &self,
        account: &AccountId,
        name: &FunctionName,
        alias: &str,
    ) -> Result<bool, MetaStoreError> {
        self.change_rows(
            Kind::Version,
            account.as_str(),
            name.as_str(),
            "DELETE FROM function_aliases WHERE account_id = $1 AND name = $2 AND alias = $3",
            vec![Box::new(alias.to_owned())],
        )
    }

    fn triggers(&self) -> Result<Vec<TriggerRecord>, MetaStoreError> {
        self.query(
            "SELECT name, trigger_name, doc FROM function_triggers",
            vec![],
        )?
        .iter()
        .map(|r| {
            let (name, trigger, doc): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            serde_json::from_str(&doc).map_err(corrupt(format!("{name} trigger {trigger}")))
        })
        .collect()
    }

    fn insert_trigger(&self, t: &TriggerRecord) -> Result<(), MetaStoreError> {
        let t = t.clone();
        let doc = serde_json::to_string(&t).expect("trigger serialises");
        self.write(move |tx| {
            Box::pin(async move {
                let (a, n) = (
                    t.account_id.as_str().to_owned(),
                    t.function_name.as_str().to_owned(),
                );
                // A delete of the function waits for this share lock.
                let function = tx
                    .query_opt(
                        "SELECT 1 FROM functions WHERE account_id = $1 AND name = $2 FOR SHARE",
                        &[&a as P, &n],
                    )
                    .await?;
                if function.is_none() {
                    return Err(MetaStoreError::FunctionMissing(t.function_name.clone()));
                }
                let k = tx
                    .execute(
                        "INSERT INTO function_triggers
                         (account_id, name, trigger_name, host_label, doc)
                         VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (account_id, name, trigger_name) DO NOTHING",
                        &[&a as P, &n, &t.trigger_name, &t.host_label, &doc],
                    )
                    .await?;
                if k == 0 {
                    return Err(MetaStoreError::TriggerExists {
                        function: t.function_name.clone(),
                        trigger: t.trigger_name.clone(),
                    });
                }
                changed(tx, Kind::Trigger, &a, &n).await
            })
        })
    }

    fn update_trigger(&self, t: &TriggerRecord) -> Result<(), MetaStoreError> {
        let t = t.clone();
        let doc = serde_json::to_string(&t).expect("trigger serialises");
        self.write(move |tx| {
            Box::pin(async move {
                let (a, n) = (
                    t.account_id.as_str().to_owned(),
                    t.function_name.as_str().to_owned(),
                );
                tx.execute(
                    "UPDATE function_triggers SET doc = $4, host_label = $5
                     WHERE account_id = $1 AND name = $2 AND trigger_name = $3",
                    &[&a as P, &n, &t.trigger_name, &doc, &t.host_label],
                )
                .await?;
                changed(tx, Kind::Trigger, &a, &n).await
            })
        })
    }

    fn delete_trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
    ) -> Result<bool, MetaStoreError> {
        self.change_rows(
            Kind::Trigger,
            account.as_str(),
            name.as_str(),
            "DELETE FROM function_triggers
             WHERE account_id = $1 AND name = $2 AND trigger_name = $3",
            vec![Box::new(trigger.to_owned())],
        )
    }
}

impl CodeSource for PgMetaStore {
    fn put_zip(&self, sha256: &str, zip: &[u8]) -> Result<(), MetaStoreError> {
        let d = sha256.to_owned();
        let db = self.db();
        // Only the digest crosses unless the database lacks the zip.
        let touched = self.block({
            let (d, db) = (d.clone(), db.clone());
            async move {
                let conn = db.conn().await?;
                let sql = format!("UPDATE code_zips SET used_ms = {NOW_MS} WHERE sha256 = $1");
                Ok(conn.execute(&sql, &[&d]).await? > 0)
            }
        })?;
        if touched {
            return Ok(());
        }
        let zip = zip.to_vec();
        self.block(async move {
            let conn = db.conn().await?;
            let sql = format!(
                "INSERT INTO code_zips (sha256, zip, used_ms) VALUES ($1, $2, {NOW_MS})
                 ON CONFLICT (sha256) DO UPDATE SET used_ms = EXCLUDED.used_ms"
            );
            conn.execute(&sql, &[&d as P, &zip]).await?;
            Ok(())
        })
    }

    fn zip(&self, sha256: &str) -> Result<Option<Vec<u8>>, MetaStoreError> {
        let rows = self.query(
            "SELECT zip FROM code_zips WHERE sha256 = $1",
            vec![Box::new(sha256.to_owned())],
        )?;
        Ok(rows.first().map(|r| r.get(0)))
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RoleDoc {
    description: String,
    policy: serde_json::Value,
}

impl RoleStore for PgMetaStore {
    fn roles(&self) -> Result<Vec<RoleRecord>, MetaStoreError> {
        let rows = self.query(
            "SELECT account_id, name, doc, created_ms, modified_ms FROM roles",
            vec![],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (account, name, doc): (String, String, String) = (r.get(0), r.get(1), r.get(2));
            let parsed = account.parse().ok().and_then(|a| {
                let d: RoleDoc = serde_json::from_str(&doc).ok()?;
                Some((a, d.description, Policy::parse(&d.policy).ok()?))
            });
            let Some((account_id, description, policy)) = parsed else {
                tracing::warn!(%account, %name, "skipping an unreadable role");
                continue;
            };
            out.push(RoleRecord {
                account_id,
                name,
                description,
                policy,
                created_ms: r.get::<_, i64>(3) as u64,
                modified_ms: r.get::<_, i64>(4) as u64,
            });
        }
        Ok(out)
    }

    fn put_role(&self, role: &RoleRecord) -> Result<(), MetaStoreError> {
        let doc = serde_json::to_string(&RoleDoc {
            description: role.description.clone(),
            policy: serde_json::to_value(&role.policy).expect("policy serialises"),
        })
        .expect("role serialises");
        let (a, n) = (role.account_id.as_str().to_owned(), role.name.clone());
        let (created, modified) = (role.created_ms as i64, role.modified_ms as i64);
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "INSERT INTO accounts (account_id, created_ms) VALUES ($1, $2)
                     ON CONFLICT (account_id) DO NOTHING",
                    &[&a as P, &created],
                )
                .await?;
                tx.execute(
                    "INSERT INTO roles (account_id, name, doc, created_ms, modified_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (account_id, name)
                     DO UPDATE SET doc = EXCLUDED.doc, modified_ms = EXCLUDED.modified_ms",
                    &[&a as P, &n, &doc, &created, &modified],
                )
                .await?;
                changed(tx, Kind::Role, &a, &n).await
            })
        })
    }

    fn delete_role(&self, account: &AccountId, name: &str) -> Result<bool, MetaStoreError> {
        self.change_rows(
            Kind::Role,
            account.as_str(),
            name,
            "DELETE FROM roles WHERE account_id = $1 AND name = $2",
            vec![],
        )
    }
}

impl DomainStore for PgMetaStore {
    fn load_domains(&self, sealer: &Sealer) -> Result<Vec<(DomainRecord, String)>, MetaStoreError> {
        let rows = self.query(
            "SELECT domain_name, account_id, doc, key_sealed FROM custom_domains
             ORDER BY domain_name",
            vec![],
        )?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let (name, account, doc, sealed): (String, String, String, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let record: DomainRecord =
                serde_json::from_str(&doc).map_err(corrupt(format!("custom domain {name}")))?;
            let key = sealer
                .open_string(&rows::custom_domain_key(&name, &account), &sealed)
                .map_err(|source| MetaStoreError::Sealed {
                    what: format!("private key of custom domain {name}"),
                    source,
                })?;
            out.push((record, key));
        }
        Ok(out)
    }

    fn insert_domain(
        &self,
        sealer: &Sealer,
        r: &DomainRecord,
        key: &str,
    ) -> Result<bool, MetaStoreError> {
        let sealed = sealer.seal(
            &rows::custom_domain_key(&r.domain_name, r.account_id.as_str()),
            key.as_bytes(),
        );
        let (name, a, doc) = (
            r.domain_name.clone(),
            r.account_id.as_str().to_owned(),
            crate::domains::store::doc(r),
        );
        self.write(move |tx| {
            Box::pin(async move {
                let k = tx
                    .execute(
                        "INSERT INTO custom_domains (domain_name, account_id, doc, key_sealed)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (domain_name) DO NOTHING",
                        &[&name as P, &a, &doc, &sealed],
                    )
                    .await?;
                if k == 1 {
                    changed(tx, Kind::Domain, &a, &name).await?;
                }
                Ok(k == 1)
            })
        })
    }

    fn update_domain(
        &self,
        sealer: &Sealer,
        r: &DomainRecord,
        key: &str,
    ) -> Result<(), MetaStoreError> {
        let sealed = sealer.seal(
            &rows::custom_domain_key(&r.domain_name, r.account_id.as_str()),
            key.as_bytes(),
        );
        let (name, a, doc) = (
            r.domain_name.clone(),
            r.account_id.as_str().to_owned(),
            crate::domains::store::doc(r),
        );
        self.write(move |tx| {
            Box::pin(async move {
                tx.execute(
                    "UPDATE custom_domains SET doc = $3, key_sealed = $4
                     WHERE domain_name = $1 AND account_id = $2",
                    &[&name as P, &a, &doc, &sealed],
                )
                .await?;
                changed(tx, Kind::Domain, &a, &name).await
            })
        })
    }

    fn delete_domain(&self, name: &str) -> Result<(), MetaStoreError> {
        let name = name.to_owned();
        self.write(move |tx| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        "DELETE FROM custom_domains WHERE domain_name = $1 RETURNING account_id",
                        &[&name],
                    )
                    .await?;
                if let Some(r) = row {
                    changed(tx, Kind::Domain, &r.get::<_, String>(0), &name).await?;
                }
                Ok(())
            })
        })
    }
}

#[cfg(test)]
impl PgMetaStore {
    /// Every column that may hold a secret, as text (tests look for
    /// plaintext in it).
    pub(crate) fn dump_text(&self) -> String {
        let mut out = String::new();
        for sql in [
            "SELECT secret_sealed FROM access_keys",
            "SELECT doc || env_sealed FROM functions",
            "SELECT doc || env_sealed FROM function_versions",
            "SELECT doc || key_sealed FROM custom_domains",
        ] {
            for r in self.query(sql, vec![]).unwrap() {
                out.push_str(&r.get::<_, String>(0));
                out.push('\n');
            }
        }
        out
    }
}
