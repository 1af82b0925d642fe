//! [`MetaStore`] on SQLite (`state_dir/gateway.db`), the one-box default.

use std::path::Path;
use std::sync::Arc;

use kiln_core::{AccountId, FunctionName};
use kiln_store::{Database, Migration};
use rusqlite::{params, OptionalExtension};

use super::{
    AccessKey, CodeBlob, FunctionVersions, LayerRecord, LayerVersionRecord, MetaStore,
    MetaStoreError, StoredKey,
};
use crate::model::{FunctionConfig, FunctionRecord};
use crate::secrets::{rows, Sealer};
use crate::triggers::TriggerRecord;
use crate::versions::{AliasRecord, VersionRecord};

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "accounts, access keys, functions, code packages",
        sql: "
        CREATE TABLE accounts (
            account_id TEXT PRIMARY KEY,
            created_ms INTEGER NOT NULL
        );
        CREATE TABLE access_keys (
            access_key_id TEXT PRIMARY KEY,
            account_id TEXT NOT NULL REFERENCES accounts(account_id),
            secret TEXT NOT NULL,
            created_ms INTEGER NOT NULL
        );
        CREATE TABLE code_blobs (
            sha256 TEXT PRIMARY KEY,
            size INTEGER NOT NULL,
            checksum TEXT NOT NULL
        );
        CREATE TABLE functions (
            account_id TEXT NOT NULL REFERENCES accounts(account_id),
            name TEXT NOT NULL,
            function_id TEXT NOT NULL UNIQUE,
            code_sha256 TEXT NOT NULL REFERENCES code_blobs(sha256),
            doc TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            modified_ms INTEGER NOT NULL,
            PRIMARY KEY (account_id, name)
        );
        CREATE INDEX functions_by_code ON functions(code_sha256);
    ",
    },
    Migration {
        name: "layers and layer versions",
        sql: "
        CREATE TABLE layers (
            account_id TEXT NOT NULL REFERENCES accounts(account_id),
            name TEXT NOT NULL,
            public INTEGER NOT NULL,
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
    ",
    },
    Migration {
        name: "roles",
        sql: "
        CREATE TABLE roles (
            account_id TEXT NOT NULL REFERENCES accounts(account_id),
            name TEXT NOT NULL,
            doc TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            modified_ms INTEGER NOT NULL,
            PRIMARY KEY (account_id, name)
        );
    ",
    },
    // The values move into the sealed columns when the store opens
    // ([`rows::seal_all`]), which also seals what this version finds.
    Migration {
        name: "sealed secrets, access key lifecycle",
        sql: "
        ALTER TABLE access_keys ADD COLUMN secret_sealed TEXT;
        ALTER TABLE access_keys ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE functions ADD COLUMN env_sealed TEXT;
    ",
    },
    // A version's row holds its configuration (environment sealed like a
    // function's) and names its code package, which stays stored while
    // any version references it.
    Migration {
        name: "function versions and aliases",
        sql: "
        ALTER TABLE functions ADD COLUMN last_version INTEGER NOT NULL DEFAULT 0;
        CREATE TABLE function_versions (
            account_id TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            function_id TEXT NOT NULL,
            code_sha256 TEXT NOT NULL REFERENCES code_blobs(sha256),
            doc TEXT NOT NULL,
            env_sealed TEXT NOT NULL,
            description TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
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
    ",
    },
    // A trigger's row holds its document; an HTTP trigger's host label is
    // unique across accounts (requests find their trigger by it).
    Migration {
        name: "triggers",
        sql: "
        CREATE TABLE function_triggers (
            account_id TEXT NOT NULL,
            name TEXT NOT NULL,
            trigger_name TEXT NOT NULL,
            host_label TEXT UNIQUE,
            doc TEXT NOT NULL,
            PRIMARY KEY (account_id, name, trigger_name),
            FOREIGN KEY (account_id, name) REFERENCES functions(account_id, name)
        );
    ",
    },
    // A custom domain's row: its name unique across accounts, its record,
    // its private key sealed (see crate::domains::store).
    Migration {
        name: "custom domains",
        sql: "
        CREATE TABLE custom_domains (
            domain_name TEXT PRIMARY KEY,
            account_id TEXT NOT NULL,
            doc TEXT NOT NULL,
            key_sealed TEXT NOT NULL
        );
    ",
    },
];

/// [`MetaStore`] on SQLite (`state_dir/gateway.db`).
pub struct SqliteStore {
    db: Database,
    sealer: Arc<Sealer>,
}

impl SqliteStore {
    /// Open and migrate, then seal what an older Kiln left in plaintext or
    /// a previous key sealed ([`rows::seal_all`]).
    pub fn open(path: &Path, sealer: Arc<Sealer>) -> Result<Self, MetaStoreError> {
        Self::ready(Database::open(path, MIGRATIONS)?, sealer)
    }

    pub fn open_in_memory(sealer: Arc<Sealer>) -> Result<Self, MetaStoreError> {
        Self::ready(Database::open_in_memory(MIGRATIONS)?, sealer)
    }

    fn ready(db: Database, sealer: Arc<Sealer>) -> Result<Self, MetaStoreError> {
        let s = Self { db, sealer };
        s.with(|c| {
            // Deleted and overwritten values are zeroed in the file, not
            // left in free space.
            c.pragma_update(None, "secure_delete", "ON")?;
            rows::seal_all(c, &s.sealer)?;
            Ok(())
        })?;
        Ok(s)
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, MetaStoreError>,
    ) -> Result<T, MetaStoreError> {
        let mut out = None;
        self.db.with_conn(|c| {
            out = Some(f(c));
            Ok(())
        })?;
        out.expect("closure ran")
    }
}

fn insert_code(tx: &rusqlite::Transaction<'_>, c: &FunctionConfig) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT OR IGNORE INTO code_blobs (sha256, size, checksum) VALUES (?1, ?2, ?3)",
        params![c.code.sha256, c.code.size as i64, c.code.checksum],
    )?;
    Ok(())
}

/// The function's document without its environment, and the environment
/// sealed to the row.
fn doc_and_env(sealer: &Sealer, f: &FunctionRecord) -> (String, String) {
    let aad = rows::function_environment(f.account_id.as_str(), f.name.as_str(), &f.function_id);
    // The registry password of a custom-container function is sealed
    // with the environment (model::FunctionConfig::take_secrets).
    let (secrets, doc) = f.config.take_secrets();
    let env = rows::seal_environment(sealer, &aad, &secrets);
    (doc.to_string(), env)
}

impl MetaStore for SqliteStore {
    fn check(&self) -> Result<(), MetaStoreError> {
        // Reads a page of the file, not just the connection's state.
        self.with(|c| {
            c.query_row(
                "SELECT count(*) FROM (SELECT 1 FROM accounts LIMIT 1)",
                [],
                |_| Ok(()),
            )?;
            Ok(())
        })
    }

    fn ensure_account(&self, account: &AccountId, now_ms: u64) -> Result<(), MetaStoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO accounts (account_id, created_ms) VALUES (?1, ?2)",
                params![account.as_str(), now_ms as i64],
            )?;
            Ok(())
        })
    }

    fn put_access_key(&self, key: &AccessKey, now_ms: u64) -> Result<(), MetaStoreError> {
        let aad = rows::access_key_secret(&key.access_key_id, key.account_id.as_str());
        let sealed = self.sealer.seal(&aad, key.secret.as_bytes());
        self.with(|c| {
            let tx = c.transaction()?;
            let owner: Option<String> = tx
                .query_row(
                    "SELECT account_id FROM access_keys WHERE access_key_id = ?1",
                    [&key.access_key_id],
                    |r| r.get(0),
                )
                .optional()?;
            match owner {
                Some(o) if o != key.account_id.as_str() => {
                    return Err(MetaStoreError::KeyOwnedElsewhere(key.access_key_id.clone()))
                }
                Some(_) => {
                    tx.execute(
                        "UPDATE access_keys SET secret = '', secret_sealed = ?2
                         WHERE access_key_id = ?1",
                        params![key.access_key_id, sealed],
                    )?;
                }
                None => {
                    tx.execute(
                        "INSERT INTO access_keys
                         (access_key_id, account_id, secret, secret_sealed, created_ms)
                         VALUES (?1, ?2, '', ?3, ?4)",
                        params![
                            key.access_key_id,
                            key.account_id.as_str(),
                            sealed,
                            now_ms as i64
                        ],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn access_keys(&self) -> Result<Vec<StoredKey>, MetaStoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT access_key_id, account_id, secret_sealed, enabled, created_ms
                 FROM access_keys ORDER BY created_ms, access_key_id",
            )?;
            let found = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in found {
                let (id, account, sealed, enabled, created) = row?;
                let Ok(account_id) = account.parse() else {
                    tracing::warn!(access_key_id = %id, "skipping key with an invalid account id");
                    continue;
                };
                let secret = self
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
        })
    }

    fn set_access_key_enabled(
        &self,
        access_key_id: &str,
        enabled: bool,
    ) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE access_keys SET enabled = ?2 WHERE access_key_id = ?1",
                params![access_key_id, enabled],
            )?;
            Ok(n > 0)
        })
    }

    fn delete_access_key(&self, access_key_id: &str) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM access_keys WHERE access_key_id = ?1",
                [access_key_id],
            )?;
            Ok(n > 0)
        })
    }

    fn functions(&self) -> Result<Vec<FunctionRecord>, MetaStoreError> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT account_id, name, function_id, doc, created_ms, modified_ms, env_sealed
                 FROM functions",
            )?;
            let found = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in found {
                let (account, name, function_id, doc, created, modified, env) = row?;
                let (Ok(account_id), Ok(fname)) = (account.parse(), name.parse()) else {
                    tracing::warn!(%account, %name, "skipping function with an invalid id");
                    continue;
                };
                let mut config: FunctionConfig =
                    serde_json::from_str(&doc).map_err(|source| MetaStoreError::Corrupt {
                        name: name.clone(),
                        source,
                    })?;
                let aad = rows::function_environment(&account, &name, &function_id);
                config.put_secrets(rows::open_environment(&self.sealer, &aad, &env).map_err(
                    |source| MetaStoreError::Sealed {
                        what: format!("environment of function {account}/{name}"),
                        source,
                    },
                )?);
                out.push(FunctionRecord {
                    account_id,
                    name: fname,
                    function_id,
                    created_ms: created as u64,
                    modified_ms: modified as u64,
                    config,
                });
            }
            Ok(out)
        })
    }

    fn insert_function(&self, f: &FunctionRecord) -> Result<(), MetaStoreError> {
        let (doc, env) = doc_and_env(&self.sealer, f);
        self.with(|c| {
            let tx = c.transaction()?;
            let exists: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM functions WHERE account_id = ?1 AND name = ?2)",
                params![f.account_id.as_str(), f.name.as_str()],
                |r| r.get(0),
            )?;
            if exists {
                return Err(MetaStoreError::FunctionExists(f.name.clone()));
            }
            insert_code(&tx, &f.config)?;
            tx.execute(
                "INSERT INTO functions
                 (account_id, name, function_id, code_sha256, doc, created_ms, modified_ms, env_sealed)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    f.account_id.as_str(),
                    f.name.as_str(),
                    f.function_id,
                    f.config.code.sha256,
                    doc,
                    f.created_ms as i64,
                    f.modified_ms as i64,
                    env
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn update_function(
        &self,
        f: &FunctionRecord,
        expected_modified_ms: u64,
    ) -> Result<(), MetaStoreError> {
        let (doc, env) = doc_and_env(&self.sealer, f);
        self.with(|c| {
            let tx = c.transaction()?;
            insert_code(&tx, &f.config)?;
            // The function id is part of the row's identity: an update names
            // the same function, never a newer one under its name.
            let n = tx.execute(
                "UPDATE functions SET code_sha256 = ?3, doc = ?4, modified_ms = ?5, env_sealed = ?6
                 WHERE account_id = ?1 AND name = ?2 AND function_id = ?7 AND modified_ms = ?8",
                params![
                    f.account_id.as_str(),
                    f.name.as_str(),
                    f.config.code.sha256,
                    doc,
                    f.modified_ms as i64,
                    env,
                    f.function_id,
                    expected_modified_ms as i64
                ],
            )?;
            if n == 0 {
                let exists = tx
                    .query_row(
                        "SELECT 1 FROM functions WHERE account_id = ?1 AND name = ?2 AND function_id = ?3",
                        params![f.account_id.as_str(), f.name.as_str(), f.function_id],
                        |_| Ok(()),
                    )
                    .optional()?
                    .is_some();
                return Err(if exists {
                    MetaStoreError::FunctionChanged(f.name.clone())
                } else {
                    MetaStoreError::FunctionMissing(f.name.clone())
                });
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<(), MetaStoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let held: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM function_versions WHERE account_id = ?1 AND name = ?2)
                     OR EXISTS(SELECT 1 FROM function_aliases WHERE account_id = ?1 AND name = ?2)",
                params![account.as_str(), name.as_str()],
                |r| r.get(0),
            )?;
            if held {
                return Err(MetaStoreError::FunctionHasVersions(name.clone()));
            }
            let triggered: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM function_triggers WHERE account_id = ?1 AND name = ?2)",
                params![account.as_str(), name.as_str()],
                |r| r.get(0),
            )?;
            if triggered {
                return Err(MetaStoreError::FunctionHasTriggers(name.clone()));
            }
            let n = tx.execute(
                "DELETE FROM functions WHERE account_id = ?1 AND name = ?2",
                params![account.as_str(), name.as_str()],
            )?;
            if n == 0 {
                return Err(MetaStoreError::FunctionMissing(name.clone()));
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn code_blob(&self, sha256: &str) -> Result<Option<CodeBlob>, MetaStoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT sha256, size, checksum FROM code_blobs WHERE sha256 = ?1",
                [sha256],
                |r| {
                    Ok(CodeBlob {
                        sha256: r.get(0)?,
                        size: r.get::<_, i64>(1)? as u64,
                        checksum: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
    }

    fn release_code(&self, sha256: &str) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM code_blobs WHERE sha256 = ?1
                 AND NOT EXISTS (SELECT 1 FROM functions WHERE code_sha256 = ?1)
                 AND NOT EXISTS (SELECT 1 FROM function_versions WHERE code_sha256 = ?1)",
                [sha256],
            )?;
            Ok(n > 0)
        })
    }

    fn code_digests(&self) -> Result<Vec<String>, MetaStoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT sha256 FROM code_blobs")?;
            let rows = st.query_map([], |r| r.get::<_, String>(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn layers(&self) -> Result<Vec<LayerRecord>, MetaStoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT account_id, name, public, last_version FROM layers")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (account, name, public, last) = row?;
                let Ok(account_id) = account.parse() else {
                    tracing::warn!(%account, %name, "skipping layer with an invalid account id");
                    continue;
                };
                out.push(LayerRecord {
                    account_id,
                    name,
                    public,
                    last_version: last as u32,
                });
            }
            Ok(out)
        })
    }

    fn layer_versions(&self) -> Result<Vec<LayerVersionRecord>, MetaStoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name, doc FROM layer_versions")?;
            let rows =
                st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (name, doc) = row?;
                out.push(
                    serde_json::from_str(&doc).map_err(|source| MetaStoreError::Corrupt {
                        name: format!("layer {name}"),
                        source,
                    })?,
                );
            }
            Ok(out)
        })
    }

    fn insert_layer_version(&self, v: &LayerVersionRecord) -> Result<u32, MetaStoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            // The number asked for, or the next free one (as on
            // PostgreSQL, where another gateway may have taken it).
            let version: i64 = tx.query_row(
                "INSERT INTO layers (account_id, name, public, last_version) VALUES (?1, ?2, 0, ?3)
                 ON CONFLICT (account_id, name) DO UPDATE
                 SET last_version = MAX(last_version + 1, excluded.last_version)
                 RETURNING last_version",
                params![v.account_id.as_str(), v.name, v.version as i64],
                |r| r.get(0),
            )?;
            let mut v = v.clone();
            v.version = version as u32;
            tx.execute(
                "INSERT INTO layer_versions (account_id, name, version, sha256, doc)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    v.account_id.as_str(),
                    v.name,
                    version,
                    v.code.sha256,
                    serde_json::to_string(&v).expect("layer version serialises")
                ],
            )?;
            tx.commit()?;
            Ok(v.version)
        })
    }

    fn delete_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u32,
    ) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM layer_versions WHERE account_id = ?1 AND name = ?2 AND version = ?3",
                params![account.as_str(), name, version as i64],
            )?;
            Ok(n > 0)
        })
    }

    fn function_versions(&self) -> Result<FunctionVersions, MetaStoreError> {
        self.versions_impl()
    }

    fn insert_version(&self, v: &VersionRecord) -> Result<u32, MetaStoreError> {
        self.insert_version_impl(v)
    }

    fn delete_version(
        &self,
        account: &AccountId,
        name: &FunctionName,
        version: u32,
    ) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM function_versions WHERE account_id = ?1 AND name = ?2 AND version = ?3",
                params![account.as_str(), name.as_str(), version as i64],
            )?;
            Ok(n > 0)
        })
    }

    fn aliases(&self) -> Result<Vec<AliasRecord>, MetaStoreError> {
        self.with(|c| named_docs(c, "SELECT name, alias, doc FROM function_aliases", "alias"))
    }

    fn put_alias(&self, a: &AliasRecord) -> Result<(), MetaStoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO function_aliases (account_id, name, alias, doc) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (account_id, name, alias) DO UPDATE SET doc = excluded.doc",
                params![
                    a.account_id.as_str(),
                    a.name.as_str(),
                    a.alias,
                    serde_json::to_string(a).expect("alias serialises")
                ],
            )?;
            Ok(())
        })
    }

    fn delete_alias(
        &self,
        account: &AccountId,
        name: &FunctionName,
        alias: &str,
    ) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM function_aliases WHERE account_id = ?1 AND name = ?2 AND alias = ?3",
                params![account.as_str(), name.as_str(), alias],
            )?;
            Ok(n > 0)
        })
    }

    fn triggers(&self) -> Result<Vec<TriggerRecord>, MetaStoreError> {
        self.with(|c| {
            named_docs(
                c,
                "SELECT name, trigger_name, doc FROM function_triggers",
                "trigger",
            )
        })
    }

    fn insert_trigger(&self, t: &TriggerRecord) -> Result<(), MetaStoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let function: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM functions WHERE account_id = ?1 AND name = ?2)",
                params![t.account_id.as_str(), t.function_name.as_str()],
                |r| r.get(0),
            )?;
            if !function {
                return Err(MetaStoreError::FunctionMissing(t.function_name.clone()));
            }
            let n = tx.execute(
                "INSERT INTO function_triggers (account_id, name, trigger_name, host_label, doc)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (account_id, name, trigger_name) DO NOTHING",
                params![
                    t.account_id.as_str(),
                    t.function_name.as_str(),
                    t.trigger_name,
                    t.host_label,
                    serde_json::to_string(t).expect("trigger serialises")
                ],
            )?;
            if n == 0 {
                return Err(MetaStoreError::TriggerExists {
                    function: t.function_name.clone(),
                    trigger: t.trigger_name.clone(),
                });
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn update_trigger(&self, t: &TriggerRecord) -> Result<(), MetaStoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE function_triggers SET doc = ?4, host_label = ?5
                 WHERE account_id = ?1 AND name = ?2 AND trigger_name = ?3",
                params![
                    t.account_id.as_str(),
                    t.function_name.as_str(),
                    t.trigger_name,
                    serde_json::to_string(t).expect("trigger serialises"),
                    t.host_label
                ],
            )?;
            Ok(())
        })
    }

    fn delete_trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
    ) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM function_triggers WHERE account_id = ?1 AND name = ?2 AND trigger_name = ?3",
                params![account.as_str(), name.as_str(), trigger],
            )?;
            Ok(n > 0)
        })
    }

    fn set_layer_public(
        &self,
        account: &AccountId,
        name: &str,
        public: bool,
    ) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE layers SET public = ?3 WHERE account_id = ?1 AND name = ?2",
                params![account.as_str(), name, public],
            )?;
            Ok(n > 0)
        })
    }
}

impl SqliteStore {
    fn read_versions(&self, c: &rusqlite::Connection) -> Result<FunctionVersions, MetaStoreError> {
        let mut out = FunctionVersions::default();
        let mut st = c.prepare(
            "SELECT account_id, name, version, function_id, doc, env_sealed, description, created_ms
             FROM function_versions ORDER BY account_id, name, version",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, i64>(7)?,
            ))
        })?;
        for row in rows {
            let (account, name, version, function_id, doc, env, description, created) = row?;
            let (Ok(account_id), Ok(fname)) = (account.parse(), name.parse()) else {
                tracing::warn!(%account, %name, version, "skipping version with an invalid id");
                continue;
            };
            let mut config: FunctionConfig =
                serde_json::from_str(&doc).map_err(|source| MetaStoreError::Corrupt {
                    name: format!("{name} version {version}"),
                    source,
                })?;
            let aad = rows::version_environment(&account, &name, &function_id, version as u32);
            config.put_secrets(rows::open_environment(&self.sealer, &aad, &env).map_err(
                |source| MetaStoreError::Sealed {
                    what: format!("environment of function {account}/{name} version {version}"),
                    source,
                },
            )?);
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
        let mut st = c.prepare(
            "SELECT account_id, name, function_id, last_version FROM functions
             WHERE last_version > 0",
        )?;
        let rows = st.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        for row in rows {
            let (account, name, function_id, last) = row?;
            if let (Ok(a), Ok(n)) = (account.parse(), name.parse()) {
                out.last_ids.push((a, n, function_id, last as u32));
            }
        }
        Ok(out)
    }
}

impl SqliteStore {
    /// Every account and when it was created (copying a gateway).
    pub fn accounts(&self) -> Result<Vec<(AccountId, u64)>, MetaStoreError> {
        self.with(|c| {
            let mut st = c.prepare("SELECT account_id, created_ms FROM accounts")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (account, created) = row?;
                match account.parse() {
                    Ok(a) => out.push((a, created as u64)),
                    Err(_) => tracing::warn!(%account, "skipping an invalid account id"),
                }
            }
            Ok(out)
        })
    }
}

/// Versions and aliases ([`crate::versions`]).
impl SqliteStore {
    pub(crate) fn versions_impl(&self) -> Result<FunctionVersions, MetaStoreError> {
        self.with(|c| self.read_versions(c))
    }

    pub(crate) fn insert_version_impl(&self, v: &VersionRecord) -> Result<u32, MetaStoreError> {
        let (secrets, doc) = v.config.take_secrets();
        self.with(|c| {
            let tx = c.transaction()?;
            // The id asked for, or the next free one (as on PostgreSQL,
            // where another gateway may have published meanwhile).
            let version: Option<i64> = tx
                .query_row(
                    "UPDATE functions SET last_version = MAX(last_version + 1, ?4)
                     WHERE account_id = ?1 AND name = ?2 AND function_id = ?3
                     RETURNING last_version",
                    params![
                        v.account_id.as_str(),
                        v.name.as_str(),
                        v.function_id,
                        v.version as i64
                    ],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(version) = version else {
                return Err(MetaStoreError::FunctionMissing(v.name.clone()));
            };
            let aad = rows::version_environment(
                v.account_id.as_str(),
                v.name.as_str(),
                &v.function_id,
                version as u32,
            );
            let env = rows::seal_environment(&self.sealer, &aad, &secrets);
            tx.execute(
                "INSERT OR IGNORE INTO code_blobs (sha256, size, checksum) VALUES (?1, ?2, ?3)",
                params![
                    v.config.code.sha256,
                    v.config.code.size as i64,
                    v.config.code.checksum
                ],
            )?;
            tx.execute(
                "INSERT INTO function_versions
                 (account_id, name, version, function_id, code_sha256, doc, env_sealed, description, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    v.account_id.as_str(),
                    v.name.as_str(),
                    version,
                    v.function_id,
                    v.config.code.sha256,
                    doc.to_string(),
                    env,
                    v.description,
                    v.created_ms as i64
                ],
            )?;
            tx.commit()?;
            Ok(version as u32)
        })
    }
}

/// Each `(name, key, doc)` row of `sql` as its record; a document that
/// does not parse is named `"<name> <what> <key>"`.
fn named_docs<T: serde::de::DeserializeOwned>(
    c: &rusqlite::Connection,
    sql: &str,
    what: &str,
) -> Result<Vec<T>, MetaStoreError> {
    let mut st = c.prepare(sql)?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, key, doc) = row?;
        out.push(
            serde_json::from_str(&doc).map_err(|source| MetaStoreError::Corrupt {
                name: format!("{name} {what} {key}"),
                source,
            })?,
        );
    }
    Ok(out)
}
