//! The gateway's metadata store: accounts, access keys, functions and code
//! packages. [`MetaStore`] is the persistence trait, with two backends:
//! SQLite ([`SqliteStore`], one gateway, the default) and PostgreSQL
//! ([`postgres::PgMetaStore`], any number of gateways sharing one
//! database). Code zips live beside the database as files named by their
//! sha256 ([`CodeFiles`]), written once and removed when no function
//! references them; in PostgreSQL mode the database holds the zips too and
//! each gateway's files are a cache filled from it. Access key secrets and
//! function environments are sealed before they reach the database
//! ([`crate::secrets`]).

use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_core::{AccountId, FunctionName};
use kiln_store::pg::PgStoreError;
use kiln_store::StoreError;

use crate::model::FunctionRecord;
use crate::secrets::{rows, SealError};
use crate::triggers::TriggerRecord;
use crate::versions::{AliasRecord, VersionRecord};

pub mod changes;
pub mod copy;
pub mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

pub use sqlite::SqliteStore;
#[cfg(test)]
pub(crate) use sqlite::MIGRATIONS;

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetaStoreError {
    #[error("Function {0} already exists")]
    FunctionExists(FunctionName),
    #[error("Function {0} does not exist")]
    FunctionMissing(FunctionName),
    #[error("Function {0} was changed meanwhile (through another gateway)")]
    FunctionChanged(FunctionName),
    #[error("Function {0} still has versions or aliases")]
    FunctionHasVersions(FunctionName),
    #[error("Function {0} still has triggers")]
    FunctionHasTriggers(FunctionName),
    #[error("Trigger {trigger} of function {function} already exists")]
    TriggerExists {
        function: FunctionName,
        trigger: String,
    },
    #[error("Access key {0} belongs to another account")]
    KeyOwnedElsewhere(String),
    #[error("Stored function document of {name} is unreadable")]
    Corrupt {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("Cannot open the stored {what}")]
    Sealed {
        what: String,
        #[source]
        source: SealError,
    },
    #[error("Cannot seal the stored secrets under the current key")]
    SealPass(#[from] rows::SealPassError),
    /// A per-account bound, checked against the shared database.
    #[error("{}", .0.message)]
    OverBound(kiln_core::FcError),
    #[error(transparent)]
    Db(#[from] StoreError),
    #[error("PostgreSQL metadata store failed")]
    Pg(#[from] PgStoreError),
}

impl From<tokio_postgres::Error> for MetaStoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        Self::Pg(PgStoreError::Query(e))
    }
}

impl From<rusqlite::Error> for MetaStoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(StoreError::Sqlite(e))
    }
}

/// An access key: the id a request names, the account it acts for and the
/// secret it is signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKey {
    pub access_key_id: String,
    pub account_id: AccountId,
    pub secret: String,
}

/// An access key as stored: the key, whether it may sign requests, and
/// when it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub key: AccessKey,
    pub enabled: bool,
    pub created_ms: u64,
}

/// A stored code package's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeBlob {
    pub sha256: String,
    pub size: u64,
    pub checksum: String,
}

/// Persistence of the gateway's metadata. Blocking: callers run it on the
/// blocking pool. Every write is one transaction.
pub trait MetaStore: Send + Sync + 'static {
    /// Whether the store answers a read (the health route's check).
    fn check(&self) -> Result<(), MetaStoreError>;
    fn ensure_account(&self, account: &AccountId, now_ms: u64) -> Result<(), MetaStoreError>;
    /// Create a key (enabled) or replace its secret; refuses to move a key
    /// to another account.
    fn put_access_key(&self, key: &AccessKey, now_ms: u64) -> Result<(), MetaStoreError>;
    fn access_keys(&self) -> Result<Vec<StoredKey>, MetaStoreError>;
    /// Enable or disable a key; false if it does not exist.
    fn set_access_key_enabled(
        &self,
        access_key_id: &str,
        enabled: bool,
    ) -> Result<bool, MetaStoreError>;
    /// Delete a key; false if it did not exist.
    fn delete_access_key(&self, access_key_id: &str) -> Result<bool, MetaStoreError>;
    fn functions(&self) -> Result<Vec<FunctionRecord>, MetaStoreError>;
    /// One function as stored (a cluster's gateways reload what another
    /// changed).
    fn function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<Option<FunctionRecord>, MetaStoreError> {
        Ok(self
            .functions()?
            .into_iter()
            .find(|f| &f.account_id == account && &f.name == name))
    }
    /// Insert the function and, if new, its code package's row.
    fn insert_function(&self, f: &FunctionRecord) -> Result<(), MetaStoreError>;
    /// [`Self::insert_function`] within the account's `bound`
    /// (`OverBound` otherwise). A store only this gateway writes relies on
    /// the caller's check against its own view; a shared one checks the
    /// database (see [`crate::bounds::Bound`]).
    fn insert_function_within(
        &self,
        f: &FunctionRecord,
        bound: crate::bounds::Bound,
    ) -> Result<(), MetaStoreError> {
        let _ = bound;
        self.insert_function(f)
    }
    /// Replace the function's document and times if its stored
    /// `modified_ms` is still `expected_modified_ms` (the record the change
    /// was computed from): FunctionChanged when another gateway of a
    /// cluster wrote it since, so no update is built on a stale copy.
    fn update_function(
        &self,
        f: &FunctionRecord,
        expected_modified_ms: u64,
    ) -> Result<(), MetaStoreError>;
    /// [`Self::update_function`] within the account's `bound` (as
    /// [`Self::insert_function_within`]).
    fn update_function_within(
        &self,
        f: &FunctionRecord,
        expected_modified_ms: u64,
        bound: crate::bounds::Bound,
    ) -> Result<(), MetaStoreError> {
        let _ = bound;
        self.update_function(f, expected_modified_ms)
    }
    fn delete_function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<(), MetaStoreError>;
    fn code_blob(&self, sha256: &str) -> Result<Option<CodeBlob>, MetaStoreError>;
    /// Drop the package's row if no function references it; true if dropped.
    fn release_code(&self, sha256: &str) -> Result<bool, MetaStoreError>;
    /// Every package's digest (for sweeping files left by a crash).
    fn code_digests(&self) -> Result<Vec<String>, MetaStoreError>;
    /// Every layer with its ACL and last version number.
    fn layers(&self) -> Result<Vec<LayerRecord>, MetaStoreError>;
    /// Every stored layer version.
    fn layer_versions(&self) -> Result<Vec<LayerVersionRecord>, MetaStoreError>;
    /// Insert a layer version, creating its layer (private) if new and
    /// raising the layer's last version number to it. Returns the number
    /// stored: `v.version`, or (when another gateway took that number
    /// meanwhile) the next free one, handed out by the database.
    fn insert_layer_version(&self, v: &LayerVersionRecord) -> Result<u32, MetaStoreError>;
    /// [`Self::insert_layer_version`] within the account's `bound` (as
    /// [`Self::insert_function_within`]).
    fn insert_layer_version_within(
        &self,
        v: &LayerVersionRecord,
        bound: crate::bounds::Bound,
    ) -> Result<u32, MetaStoreError> {
        let _ = bound;
        self.insert_layer_version(v)
    }
    /// Delete one layer version; false if it did not exist.
    fn delete_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u32,
    ) -> Result<bool, MetaStoreError>;
    /// Make a layer public or private; false if the layer does not exist.
    fn set_layer_public(
        &self,
        account: &AccountId,
        name: &str,
        public: bool,
    ) -> Result<bool, MetaStoreError>;
    /// Every published function version, and per function the last
    /// version id handed out (ids are never reused).
    fn function_versions(&self) -> Result<FunctionVersions, MetaStoreError>;
    /// Store a published version (its code package row already exists:
    /// the function references it) and raise its function's last version
    /// id to it; FunctionMissing if the function (by id) is gone. Returns
    /// the id stored: `v.version`, or (when another gateway published
    /// meanwhile) the next free one, handed out by the database, so two
    /// publications never share an id.
    fn insert_version(&self, v: &VersionRecord) -> Result<u32, MetaStoreError>;
    /// Delete one version; false if it did not exist.
    fn delete_version(
        &self,
        account: &AccountId,
        name: &FunctionName,
        version: u32,
    ) -> Result<bool, MetaStoreError>;
    /// Every alias.
    fn aliases(&self) -> Result<Vec<AliasRecord>, MetaStoreError>;
    /// Create or replace an alias.
    fn put_alias(&self, a: &AliasRecord) -> Result<(), MetaStoreError>;
    /// Delete an alias; false if it did not exist.
    fn delete_alias(
        &self,
        account: &AccountId,
        name: &FunctionName,
        alias: &str,
    ) -> Result<bool, MetaStoreError>;
    /// Every trigger.
    fn triggers(&self) -> Result<Vec<TriggerRecord>, MetaStoreError>;
    /// Store a new trigger; TriggerExists if the function has one by that
    /// name, FunctionMissing if the function is gone.
    fn insert_trigger(&self, t: &TriggerRecord) -> Result<(), MetaStoreError>;
    /// Replace a stored trigger (same function and name).
    fn update_trigger(&self, t: &TriggerRecord) -> Result<(), MetaStoreError>;
    /// Delete a trigger; false if it did not exist.
    fn delete_trigger(
        &self,
        account: &AccountId,
        name: &FunctionName,
        trigger: &str,
    ) -> Result<bool, MetaStoreError>;
}

/// The stored versions and, per (account, function), the last version id.
#[derive(Debug, Default)]
pub struct FunctionVersions {
    pub versions: Vec<VersionRecord>,
    /// (account, function, function id, last version id).
    pub last_ids: Vec<(AccountId, FunctionName, String, u32)>,
}

/// A layer: its owner, name, ACL and the last version number handed out
/// (numbers are never reused, even after a version is deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    pub account_id: AccountId,
    pub name: String,
    pub public: bool,
    pub last_version: u32,
}

/// One immutable layer version and its zip (stored like code, by sha256).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerVersionRecord {
    pub account_id: AccountId,
    pub name: String,
    pub version: u32,
    pub code: crate::model::CodeRef,
    pub description: String,
    pub compatible_runtime: Vec<String>,
    pub license: String,
    pub created_ms: u64,
}

/// The gateway's stores: SQLite in its state directory, or (`[cluster]`)
/// the PostgreSQL database a cluster's gateways share.
pub struct Stores {
    pub meta: Arc<dyn MetaStore>,
    pub roles: Arc<dyn crate::ram::RoleStore>,
    pub domains: Arc<dyn crate::domains::DomainStore>,
    /// The code files: a cache of the database's zips in a cluster.
    pub code: CodeFiles,
    /// In a cluster: the store and the newest change before anything was
    /// loaded (the follower starts there).
    cluster: Option<(postgres::PgMetaStore, i64)>,
}

impl Stores {
    /// SQLite at `path`.
    pub fn sqlite(
        path: &std::path::Path,
        sealer: Arc<crate::secrets::Sealer>,
        code: CodeFiles,
    ) -> Result<Self, MetaStoreError> {
        let s = Arc::new(SqliteStore::open(path, sealer)?);
        Ok(Self {
            meta: s.clone(),
            roles: s.clone(),
            domains: s,
            code,
            cluster: None,
        })
    }

    /// The cluster's PostgreSQL database (component `gateway`), with
    /// `code` as a cache of its zips.
    pub fn open_cluster(
        c: &crate::config::GatewayCluster,
        sealer: Arc<crate::secrets::Sealer>,
        code: CodeFiles,
    ) -> Result<Self, MetaStoreError> {
        let s = postgres::PgMetaStore::open(
            &c.postgres_url,
            c.postgres_password_file.as_deref(),
            c.max_connections,
            sealer,
        )?;
        // Read before the views load: a change racing the load is applied
        // again by the follower, never missed.
        let after = s.last_change()?;
        tracing::info!(target = s.target(), "gateway metadata on PostgreSQL");
        Ok(Self {
            meta: Arc::new(s.clone()),
            roles: Arc::new(s.clone()),
            domains: Arc::new(s.clone()),
            code: code.with_source(Arc::new(s.clone())),
            cluster: Some((s, after)),
        })
    }

    /// In a cluster: the STS key every gateway shares (temporary
    /// credentials and code download URLs one gateway issues, another
    /// accepts); `None` on one box, whose key is a file in its state
    /// directory.
    pub fn shared_sts_key(&self) -> Result<Option<[u8; 32]>, MetaStoreError> {
        match &self.cluster {
            Some((s, _)) => Ok(Some(s.shared_key("sts")?)),
            None => Ok(None),
        }
    }

    /// In a cluster: the task keeping `views` in step with the other
    /// gateways' writes until `stop` ([`changes::follow`]).
    pub fn follower(
        &self,
        views: changes::Views,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let (store, after) = self.cluster.clone()?;
        Some(changes::follow(store, after, views, stop))
    }
}

/// Where a cluster keeps code zips (the shared database): every gateway's
/// [`CodeFiles`] write through to it and fill themselves from it.
pub trait CodeSource: Send + Sync + 'static {
    /// Store the zip of `sha256` unless it is stored; refresh its
    /// last-use time either way (the collector spares recent zips).
    fn put_zip(&self, sha256: &str, zip: &[u8]) -> Result<(), MetaStoreError>;
    /// The stored zip of `sha256`.
    fn zip(&self, sha256: &str) -> Result<Option<Vec<u8>>, MetaStoreError>;
}

/// Code packages as files: `<dir>/<sha256>.zip`, written once atomically.
/// With a [`CodeSource`] (PostgreSQL mode) the files are a local cache:
/// writes go to the source first, and a missing file is filled from it.
#[derive(Clone)]
pub struct CodeFiles {
    dir: PathBuf,
    source: Option<Arc<dyn CodeSource>>,
}

impl std::fmt::Debug for CodeFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeFiles")
            .field("dir", &self.dir)
            .field("shared", &self.source.is_some())
            .finish()
    }
}

/// Whether `s` is a hex sha256 (the only names code files have).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl CodeFiles {
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        fs::create_dir_all(&dir)?;
        Ok(Self { dir, source: None })
    }

    /// The same directory as a cache of `source`.
    pub fn with_source(mut self, source: Arc<dyn CodeSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// The file of a digest; `None` for anything that is not a digest.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        is_digest(sha256).then(|| self.dir.join(format!("{sha256}.zip")))
    }

    /// The file of a digest, filled from the source first when this
    /// gateway has not seen the package yet (another gateway of the
    /// cluster stored it). The file may still be missing: the package
    /// does not exist, or could not be fetched (logged).
    pub async fn cached(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.path(sha256)?;
        if self.source.is_none() || tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Some(path);
        }
        let me = self.clone();
        let digest = sha256.to_owned();
        match tokio::task::spawn_blocking(move || me.fill(&digest)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(sha256, error = %e, "cannot fetch the code package from the cluster's database")
            }
            Err(_) => tracing::warn!(sha256, "code package fetch task failed"),
        }
        Some(path)
    }

    /// Fetch a package from the source into its file, checking its
    /// digest; false if the source does not hold it.
    fn fill(&self, sha256: &str) -> std::io::Result<bool> {
        let Some(source) = &self.source else {
            return Ok(false);
        };
        let Some(zip) = source.zip(sha256).map_err(std::io::Error::other)? else {
            return Ok(false);
        };
        use sha2::Digest as _;
        let got = hex::encode(sha2::Sha256::digest(&zip));
        if got != sha256 {
            return Err(std::io::Error::other(format!(
                "the stored code package {sha256} has digest {got}: refusing to serve it"
            )));
        }
        self.write_file(sha256, &zip)?;
        Ok(true)
    }

    /// Write the zip unless a file for its digest exists: a temp file,
    /// fsync, rename, fsync of the directory. With a source, the zip goes
    /// there first, so any gateway can serve it once a row names it.
    pub fn write(&self, sha256: &str, zip: &[u8]) -> std::io::Result<()> {
        if !is_digest(sha256) {
            return Err(std::io::Error::other("not a sha256 digest"));
        }
        if let Some(source) = &self.source {
            source.put_zip(sha256, zip).map_err(std::io::Error::other)?;
        }
        self.write_file(sha256, zip)
    }

    fn write_file(&self, sha256: &str, zip: &[u8]) -> std::io::Result<()> {
        let path = self
            .path(sha256)
            .ok_or_else(|| std::io::Error::other("not a sha256 digest"))?;
        if path.exists() {
            return Ok(());
        }
        let tmp = self
            .dir
            .join(format!(".{sha256}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(zip)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    pub fn remove(&self, sha256: &str) {
        if let Some(p) = self.path(sha256) {
            if let Err(e) = fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove code package");
                }
            }
        }
    }

    /// Remove files no stored package names, and temp files a crash left.
    pub fn sweep(&self, keep: &[String]) -> std::io::Result<usize> {
        let keep: std::collections::HashSet<&str> = keep.iter().map(String::as_str).collect();
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = match name.strip_suffix(".zip") {
                Some(d) => !keep.contains(d),
                None => name.ends_with(".tmp"),
            };
            if stale {
                fs::remove_file(entry.path())?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::{CodeRef, FunctionConfig};
    use crate::secrets::Sealer;

    /// One fixed key, so a test can reopen its store.
    pub(crate) fn sealer() -> Arc<Sealer> {
        Arc::new(Sealer::new(&[9u8; 32], &[]))
    }

    pub(crate) fn record(account: &str, name: &str, digest: &str) -> FunctionRecord {
        FunctionRecord {
            account_id: account.parse().unwrap(),
            name: name.parse().unwrap(),
            function_id: uuid::Uuid::new_v4().to_string(),
            created_ms: 1000,
            modified_ms: 1000,
            config: FunctionConfig {
                runtime: kiln_core::RuntimeName::Custom,
                handler: "h".into(),
                memory_mb: 512,
                cpu_milli: 250,
                cpu_explicit: false,
                disk_mb: 512,
                timeout_s: 3,
                concurrency: 1,
                environment: Default::default(),
                command: vec![],
                args: vec![],
                port: 9000,
                description: String::new(),
                code: CodeRef {
                    sha256: digest.into(),
                    size: 3,
                    checksum: "7".into(),
                },
                initializer: None,
                pre_stop: None,
                layers: Vec::new(),
                extras: Default::default(),
                invocation_restriction: None,
                container: None,
            },
        }
    }

    #[test]
    fn check_reads_the_store_and_fails_when_it_cannot() {
        let s = SqliteStore::open_in_memory(sealer()).unwrap();
        s.check().unwrap();
        s.with(|c| {
            c.execute_batch("PRAGMA foreign_keys = OFF; DROP TABLE accounts;")?;
            Ok(())
        })
        .unwrap();
        assert!(
            s.check().is_err(),
            "a store that cannot be read is not healthy"
        );
    }

    #[test]
    fn functions_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let s = SqliteStore::open(&path, crate::store::tests::sealer()).unwrap();
        let a: AccountId = "1".parse().unwrap();
        s.ensure_account(&a, 1).unwrap();
        let key = AccessKey {
            access_key_id: "AK1".into(),
            account_id: a.clone(),
            secret: "s".repeat(20),
        };
        s.put_access_key(&key, 1).unwrap();
        let f = record("1", "f", &"a".repeat(64));
        s.insert_function(&f).unwrap();
        assert!(matches!(
            s.insert_function(&f),
            Err(MetaStoreError::FunctionExists(_))
        ));
        drop(s);
        let s = SqliteStore::open(&path, crate::store::tests::sealer()).unwrap();
        assert_eq!(s.functions().unwrap(), vec![f]);
        let stored = s.access_keys().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].key, key);
        assert!(stored[0].enabled);
        s.ensure_account(&"2".parse().unwrap(), 1).unwrap();
        let stolen = AccessKey {
            account_id: "2".parse().unwrap(),
            ..key
        };
        assert!(matches!(
            s.put_access_key(&stolen, 1),
            Err(MetaStoreError::KeyOwnedElsewhere(_))
        ));
    }

    #[test]
    fn code_rows_are_shared_and_released_when_unreferenced() {
        let s = SqliteStore::open_in_memory(crate::store::tests::sealer()).unwrap();
        s.ensure_account(&"1".parse().unwrap(), 1).unwrap();
        let d = "b".repeat(64);
        s.insert_function(&record("1", "f", &d)).unwrap();
        let first = record("1", "g", &d);
        s.insert_function(&first).unwrap();
        assert_eq!(s.code_digests().unwrap(), vec![d.clone()]);
        s.delete_function(&"1".parse().unwrap(), &"f".parse().unwrap())
            .unwrap();
        assert!(!s.release_code(&d).unwrap());
        let mut g = record("1", "g", &"c".repeat(64));
        g.modified_ms = 2000;
        // Another function id under the same name is not this row.
        assert!(matches!(
            s.update_function(&g, 1000),
            Err(MetaStoreError::FunctionMissing(_))
        ));
        g.function_id = first.function_id;
        s.update_function(&g, 1000).unwrap();
        assert!(s.release_code(&d).unwrap());
        assert_eq!(s.code_digests().unwrap(), vec!["c".repeat(64)]);
        assert!(matches!(
            s.delete_function(&"1".parse().unwrap(), &"f".parse().unwrap()),
            Err(MetaStoreError::FunctionMissing(_))
        ));
    }

    /// A [`CodeSource`] in memory.
    #[derive(Default)]
    struct Zips(std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>);

    impl CodeSource for Zips {
        fn put_zip(&self, sha256: &str, zip: &[u8]) -> Result<(), MetaStoreError> {
            self.0
                .lock()
                .unwrap()
                .entry(sha256.to_owned())
                .or_insert_with(|| zip.to_vec());
            Ok(())
        }
        fn zip(&self, sha256: &str) -> Result<Option<Vec<u8>>, MetaStoreError> {
            Ok(self.0.lock().unwrap().get(sha256).cloned())
        }
    }

    fn digest(b: &[u8]) -> String {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(b))
    }

    /// A gateway's files are a cache of the cluster's zips: written
    /// through, filled on a miss, and a zip whose bytes do not match its
    /// digest is never served.
    #[tokio::test]
    async fn code_files_cache_the_shared_zips_and_check_their_digest() {
        let dir = tempfile::tempdir().unwrap();
        let zips = Arc::new(Zips::default());
        let a = CodeFiles::new(dir.path().join("a"))
            .unwrap()
            .with_source(zips.clone());
        let b = CodeFiles::new(dir.path().join("b"))
            .unwrap()
            .with_source(zips.clone());
        let d = digest(b"package");
        a.write(&d, b"package").unwrap();
        assert_eq!(zips.zip(&d).unwrap().unwrap(), b"package");
        let path = b.path(&d).unwrap();
        assert!(!path.exists());
        assert_eq!(b.cached(&d).await, Some(path.clone()));
        assert_eq!(fs::read(&path).unwrap(), b"package");
        // Tampered bytes in the database: no file, nothing served.
        let forged = digest(b"original");
        zips.put_zip(&forged, b"tampered").unwrap();
        let p = b.cached(&forged).await.unwrap();
        assert!(
            !p.exists(),
            "a zip that does not match its digest is not cached"
        );
        // Unknown packages and non-digests.
        assert!(!b.cached(&"f".repeat(64)).await.unwrap().exists());
        assert_eq!(b.cached("../etc/passwd").await, None);
    }

    #[test]
    fn code_files_are_written_once_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let files = CodeFiles::new(dir.path().join("code")).unwrap();
        let d = "d".repeat(64);
        files.write(&d, b"zip").unwrap();
        files.write(&d, b"other").unwrap();
        assert_eq!(fs::read(files.path(&d).unwrap()).unwrap(), b"zip");
        assert!(files.path("../etc/passwd").is_none());
        let e = "e".repeat(64);
        files.write(&e, b"zip2").unwrap();
        fs::write(dir.path().join("code/.x.tmp"), b"").unwrap();
        assert_eq!(files.sweep(std::slice::from_ref(&d)).unwrap(), 2);
        assert!(files.path(&d).unwrap().exists());
        assert!(!files.path(&e).unwrap().exists());
    }
}
