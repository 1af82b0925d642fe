//! The in-memory view of the store that requests read, kept in step with
//! every write. The invoke path reads functions and keys from here only;
//! SQLite is touched by writes (serialised by one lock) and at start.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use kiln_core::{AccountId, FcError, FunctionName, InstanceSpec};

use crate::model::{FunctionConfig, FunctionRecord};
use crate::store::{AccessKey, CodeBlob, CodeFiles, MetaStore, MetaStoreError};

/// Why a catalog write failed.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("Function {0} already exists")]
    Exists(FunctionName),
    #[error("Function {0} does not exist")]
    NotFound(FunctionName),
    /// The new configuration was refused (validation).
    #[error(transparent)]
    Invalid(FcError),
    #[error("Cannot write code package")]
    CodeWrite(#[source] std::io::Error),
    #[error(transparent)]
    Store(MetaStoreError),
    #[error("Store task failed")]
    Join,
}

impl From<MetaStoreError> for CatalogError {
    fn from(e: MetaStoreError) -> Self {
        match e {
            // The shared database found the account over a bound this
            // gateway's view had not seen yet: the same answer as its own.
            MetaStoreError::OverBound(fc) => Self::Invalid(fc),
            e => Self::Store(e),
        }
    }
}

/// A code package arriving with a create or update.
pub struct NewCode {
    pub blob: CodeBlob,
    pub zip: Vec<u8>,
}

/// A function as the hot path needs it: its record, its sealed instance
/// spec and that spec already serialised for the scheduler.
#[derive(Debug)]
pub struct FunctionEntry {
    pub record: FunctionRecord,
    pub spec: InstanceSpec,
    pub spec_json: Bytes,
}

impl FunctionEntry {
    fn new(record: FunctionRecord) -> Self {
        Self::with_spec(instance_spec(&record, None), record)
    }

    /// A published version's snapshot: its spec names the version, so its
    /// instances are its own.
    pub(crate) fn for_version(record: FunctionRecord, version: u32) -> Self {
        Self::with_spec(instance_spec(&record, Some(version)), record)
    }

    fn with_spec(spec: InstanceSpec, record: FunctionRecord) -> Self {
        let spec_json = Bytes::from(serde_json::to_vec(&spec).expect("spec serialises"));
        Self {
            record,
            spec,
            spec_json,
        }
    }

    /// The body of `AcquireLease { request_id, spec }` without serialising
    /// the spec again.
    pub fn acquire_body(&self, request_id: &str) -> Bytes {
        let mut b = Vec::with_capacity(self.spec_json.len() + request_id.len() + 32);
        b.extend_from_slice(b"{\"request_id\":");
        b.extend_from_slice(
            serde_json::to_string(request_id)
                .expect("string serialises")
                .as_bytes(),
        );
        b.extend_from_slice(b",\"spec\":");
        b.extend_from_slice(&self.spec_json);
        b.push(b'}');
        Bytes::from(b)
    }
}

/// FC runs `/code/bootstrap` when a custom runtime names no command.
pub const DEFAULT_COMMAND: &str = "/code/bootstrap";

/// The sealed spec of a function revision: LATEST's (`version` `None`) or
/// a published version's.
pub fn instance_spec(r: &FunctionRecord, version: Option<u32>) -> InstanceSpec {
    let c = &r.config;
    InstanceSpec {
        account_id: r.account_id.clone(),
        function_name: r.name.clone(),
        revision: String::new(),
        version: version.map(|v| v.to_string()),
        runtime: c.runtime,
        handler: c.handler.clone(),
        // A built-in runtime runs its bootstrap, which calls the handler.
        command: match c.runtime.bootstrap_command() {
            // The image's entrypoint and command, resolved by the agent.
            None if c.container.is_some() => Vec::new(),
            Some(bootstrap) => bootstrap.iter().map(|s| (*s).to_owned()).collect(),
            None if c.command.is_empty() => vec![DEFAULT_COMMAND.to_owned()],
            None => c.command.clone(),
        },
        args: if c.runtime.bootstrap_command().is_some() {
            Vec::new()
        } else {
            c.args.clone()
        },
        port: c.port,
        environment: c.environment.clone(),
        memory_mb: c.memory_mb,
        cpu_milli: c.cpu_milli,
        disk_mb: c.disk_mb,
        timeout_s: c.timeout_s,
        concurrency: c.concurrency,
        code_digest: c.code.sha256.clone(),
        code_size: c.code.size,
        initializer: c.initializer.clone(),
        pre_stop: c.pre_stop.clone(),
        layers: c.layers.iter().map(|l| l.sha256.clone()).collect(),
        role: crate::ram::function_role(c),
        network: crate::validate::function_network(c),
        image: c.container.as_ref().map(|cc| kiln_core::ImageSpec {
            reference: cc.image.clone(),
            entrypoint: cc.entrypoint.clone(),
            command: cc.command.clone(),
            registry_username: cc.registry_username.clone(),
            registry_password: cc.registry_password.clone(),
        }),
    }
    .seal()
}

pub(crate) fn auth_key(k: AccessKey) -> kiln_auth::AccessKey {
    kiln_auth::AccessKey {
        account_id: k.account_id,
        access_key_id: k.access_key_id,
        secret: k.secret,
    }
}

/// Per account, by name (a `String` key so pages can start after a name).
type Functions = HashMap<AccountId, BTreeMap<String, Arc<FunctionEntry>>>;

pub struct Catalog {
    pub(crate) store: Arc<dyn MetaStore>,
    code: CodeFiles,
    pub(crate) functions: RwLock<Functions>,
    /// The enabled access keys ([`crate::access_keys`] changes them).
    pub(crate) keys: RwLock<HashMap<String, Arc<kiln_auth::AccessKey>>>,
    /// Layers and their versions ([`crate::layers`]).
    pub(crate) layers: RwLock<crate::layers::LayerIndex>,
    /// Function versions and aliases ([`crate::versions`]).
    pub(crate) versions: RwLock<crate::versions::VersionIndex>,
    /// Triggers ([`crate::triggers`]).
    pub(crate) triggers: RwLock<crate::triggers::TriggerIndex>,
    pub(crate) write: tokio::sync::Mutex<()>,
    /// Per-account bounds, checked under `write` (see [`crate::bounds`]).
    pub(crate) bounds: crate::bounds::Bounds,
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CatalogError> + Send + 'static,
) -> Result<T, CatalogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| CatalogError::Join)?
}

impl Catalog {
    /// Load every function and key, and sweep code files nothing references.
    pub async fn open(store: Arc<dyn MetaStore>, code: CodeFiles) -> Result<Self, CatalogError> {
        let (records, keys, layers, versions, triggers) = {
            let store = store.clone();
            let code = code.clone();
            blocking(move || {
                let records = store.functions()?;
                let layers =
                    crate::layers::LayerIndex::load(store.layers()?, store.layer_versions()?);
                let versions = crate::versions::VersionIndex::load(
                    store.function_versions()?,
                    store.aliases()?,
                );
                // Zips in use: code packages, layer versions, and layers
                // functions still reference after their version was deleted.
                let mut digests = store.code_digests()?;
                digests.extend(layers.digests());
                digests.extend(versions.digests().map(str::to_owned));
                digests.extend(
                    records
                        .iter()
                        .flat_map(|r| r.config.layers.iter().map(|l| l.sha256.clone())),
                );
                match code.sweep(&digests) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(removed = n, "swept unreferenced code files"),
                    Err(e) => tracing::warn!(error = %e, "cannot sweep code files"),
                }
                let triggers = crate::triggers::TriggerIndex::load(store.triggers()?);
                Ok((records, store.access_keys()?, layers, versions, triggers))
            })
            .await?
        };
        let mut functions: Functions = HashMap::new();
        for r in records {
            functions
                .entry(r.account_id.clone())
                .or_default()
                .insert(r.name.to_string(), Arc::new(FunctionEntry::new(r)));
        }
        // Only enabled keys sign: a disabled one is unknown to the verifier.
        let keys = keys
            .into_iter()
            .filter(|k| k.enabled)
            .map(|k| (k.key.access_key_id.clone(), Arc::new(auth_key(k.key))))
            .collect();
        Ok(Self {
            store,
            code,
            functions: RwLock::new(functions),
            keys: RwLock::new(keys),
            layers: RwLock::new(layers),
            versions: RwLock::new(versions),
            triggers: RwLock::new(triggers),
            write: tokio::sync::Mutex::new(()),
            bounds: crate::bounds::Bounds::default(),
        })
    }

    /// The same catalog under other per-account bounds.
    pub fn with_bounds(mut self, bounds: crate::bounds::Bounds) -> Self {
        self.bounds = bounds;
        self
    }

    pub fn bounds(&self) -> &crate::bounds::Bounds {
        &self.bounds
    }

    /// What `account` stores now: its functions, their code and its layer
    /// versions' code. Linear in the account's own functions and layers.
    pub fn usage(&self, account: &AccountId) -> crate::bounds::Usage {
        let mut u = crate::bounds::Usage::default();
        if let Some(m) = self
            .functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
        {
            u.functions = m.len() as u64;
            u.code_bytes = m.values().map(|f| f.record.config.code.size).sum();
        }
        // Packages only versions still hold count too.
        u.code_bytes += self.version_only_code_bytes(account);
        let layers = self.layers.read().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = layers.layers.get(account) {
            for v in m.values().flat_map(|s| s.versions.values()) {
                u.layer_versions += 1;
                u.code_bytes += v.code.size;
            }
        }
        u
    }

    /// Refuse `change` if it takes `account` over one of its bounds in
    /// this gateway's view; call with `write` held. The bound to hand the
    /// store's write, which checks it again against a shared database.
    pub(crate) fn check_bounds(
        &self,
        account: &AccountId,
        change: crate::bounds::Change,
    ) -> Result<crate::bounds::Bound, CatalogError> {
        let limits = self.bounds.of(account);
        crate::bounds::check(account, limits, self.usage(account), change)
            .map_err(CatalogError::Invalid)?;
        Ok(crate::bounds::Bound { limits, change })
    }

    pub fn code_files(&self) -> &CodeFiles {
        &self.code
    }

    /// An access key with its account and secret.
    pub fn key(&self, access_key_id: &str) -> Option<Arc<kiln_auth::AccessKey>> {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(access_key_id)
            .cloned()
    }

    pub fn function(&self, account: &AccountId, name: &FunctionName) -> Option<Arc<FunctionEntry>> {
        self.functions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(account)
            .and_then(|m| m.get(name.as_str()))
            .cloned()
    }

    /// Functions of `account` whose names start with `prefix` and sort after
    /// `after`, at most `limit`; and whether more follow.
    pub fn list(
        &self,
        account: &AccountId,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        keep: impl Fn(&FunctionEntry) -> bool,
    ) -> (Vec<Arc<FunctionEntry>>, bool) {
        let guard = self.functions.read().unwrap_or_else(|p| p.into_inner());
        let Some(m) = guard.get(account) else {
            return (Vec::new(), false);
        };
        let mut out = Vec::new();
        let mut more = false;
        let start: Bound<&str> = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let iter = m
            .range::<str, _>((start, Bound::Unbounded))
            .skip_while(|(k, _)| k.as_str() < prefix)
            .take_while(|(k, _)| k.as_str().starts_with(prefix));
        for (_, e) in iter.filter(|(_, e)| keep(e)) {
            if out.len() == limit {
                more = true;
                break;
            }
            out.push(e.clone());
        }
        (out, more)
    }

    /// Ensure an account and one of its keys exist (bootstrap keys): the
    /// key is imported into the store (sealed) with the configured secret;
    /// a key an operator disabled stays disabled.
    pub async fn ensure_key(&self, key: AccessKey, now_ms: u64) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let k = key.clone();
        let enabled = blocking(move || {
            store.ensure_account(&k.account_id, now_ms)?;
            store.put_access_key(&k, now_ms)?;
            Ok(store
                .access_keys()?
                .iter()
                .any(|s| s.enabled && s.key.access_key_id == k.access_key_id))
        })
        .await?;
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if enabled {
            keys.insert(key.access_key_id.clone(), Arc::new(auth_key(key)));
        } else {
            keys.remove(&key.access_key_id);
        }
        Ok(())
    }

    /// Write a new package's file (off the async threads: up to 100 MB
    /// with fsync); the zip bytes are dropped once on disk.
    async fn write_code(&self, code: Option<NewCode>) -> Result<Option<String>, CatalogError> {
        let Some(c) = code else {
            return Ok(None);
        };
        let files = self.code.clone();
        blocking(move || {
            files
                .write(&c.blob.sha256, &c.zip)
                .map_err(CatalogError::CodeWrite)?;
            Ok(Some(c.blob.sha256))
        })
        .await
    }

    /// Release packages that lost their last reference.
    pub(crate) async fn release(&self, digests: Vec<String>) {
        let store = self.store.clone();
        let files = self.code.clone();
        // A zip that is also a layer's stays on disk for the layer.
        let layer_zips: std::collections::HashSet<String> = digests
            .iter()
            .filter(|d| self.layer_zip_in_use(d))
            .cloned()
            .collect();
        let r = blocking(move || {
            for d in digests {
                if store.release_code(&d)? && !layer_zips.contains(&d) {
                    files.remove(&d);
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot release code packages");
        }
    }

    /// After a failed write: the package may have no row (never
    /// referenced) or an unreferenced one; either way it goes.
    async fn drop_if_unreferenced(&self, digest: String) {
        let store = self.store.clone();
        let files = self.code.clone();
        let layer_zip = self.layer_zip_in_use(&digest);
        let r = blocking(move || {
            let released = store.release_code(&digest)?;
            if (released || store.code_blob(&digest)?.is_none()) && !layer_zip {
                files.remove(&digest);
            }
            Ok(())
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot drop an unreferenced code package");
        }
    }

    /// After a function dropped `layers`: zips of deleted layer versions
    /// that nothing uses any more go.
    pub(crate) fn release_layer_zips(&self, layers: &[crate::model::LayerRef]) {
        for l in layers {
            if !self.zip_in_use(&l.sha256) && matches!(self.store.code_blob(&l.sha256), Ok(None)) {
                self.code.remove(&l.sha256);
            }
        }
    }

    fn publish(&self, record: FunctionRecord) -> Arc<FunctionEntry> {
        let entry = Arc::new(FunctionEntry::new(record));
        self.functions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(entry.record.account_id.clone())
            .or_default()
            .insert(entry.record.name.to_string(), entry.clone());
        entry
    }

    pub async fn create(
        &self,
        record: FunctionRecord,
        code: Option<NewCode>,
    ) -> Result<Arc<FunctionEntry>, CatalogError> {
        let _w = self.write.lock().await;
        if self.function(&record.account_id, &record.name).is_some() {
            return Err(CatalogError::Exists(record.name));
        }
        self.check_new_layers(&[], &record.config.layers)?;
        let bound = self.check_bounds(
            &record.account_id,
            crate::bounds::Change {
                functions: 1,
                added_bytes: record.config.code.size,
                ..Default::default()
            },
        )?;
        let written = self.write_code(code).await?;
        let store = self.store.clone();
        let r = record.clone();
        let result = blocking(move || {
            store.ensure_account(&r.account_id, r.created_ms)?;
            store.insert_function_within(&r, bound)?;
            Ok(())
        })
        .await;
        if let Err(e) = result {
            if let Some(digest) = written {
                self.drop_if_unreferenced(digest).await;
            }
            return Err(match e {
                CatalogError::Store(MetaStoreError::FunctionExists(n)) => CatalogError::Exists(n),
                e => e,
            });
        }
        Ok(self.publish(record))
    }

    /// Replace a function's configuration with `change(current)`; nothing
    /// changes if `change` refuses.
    /// Change a function's configuration with `change`, applied to the
    /// stored configuration. In a cluster another gateway may have written
    /// the function since this one cached it: the store refuses a write
    /// built on a stale copy, and `change` runs again on the fresh one
    /// (a few times; then the caller is asked to retry).
    pub async fn update(
        &self,
        account: &AccountId,
        name: &FunctionName,
        now_ms: u64,
        code: Option<NewCode>,
        change: impl Fn(&FunctionConfig) -> Result<FunctionConfig, FcError>,
    ) -> Result<Arc<FunctionEntry>, CatalogError> {
        const ATTEMPTS: usize = 5;
        let _w = self.write.lock().await;
        let mut code = code;
        let mut written: Option<String> = None;
        let mut current = self
            .function(account, name)
            .ok_or_else(|| CatalogError::NotFound(name.clone()))?;
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            match self
                .update_once(&current, now_ms, &mut code, &mut written, &change)
                .await
            {
                Err(CatalogError::Store(MetaStoreError::FunctionChanged(_)))
                    if attempt < ATTEMPTS =>
                {
                    tracing::debug!(function = %name, attempt, "function changed through another gateway; applying the change again");
                    match self.reread_function(account, name).await {
                        Ok(fresh) => current = fresh,
                        Err(e) => break Err(e),
                    }
                }
                other => break other,
            }
        };
        if let Err(e) = &result {
            if let Some(new) = written.take() {
                self.drop_if_unreferenced(new).await;
            }
            if matches!(e, CatalogError::Store(MetaStoreError::FunctionChanged(_))) {
                // Keep the freshest copy for the caller's retry.
                let _ = self.reread_function(account, name).await;
            }
        }
        result
    }

    /// One attempt of [`Self::update`] from `current`. The new package (if
    /// any) is written on the first attempt only; `written` names it.
    async fn update_once(
        &self,
        current: &Arc<FunctionEntry>,
        now_ms: u64,
        code: &mut Option<NewCode>,
        written: &mut Option<String>,
        change: &impl Fn(&FunctionConfig) -> Result<FunctionConfig, FcError>,
    ) -> Result<Arc<FunctionEntry>, CatalogError> {
        let account = &current.record.account_id;
        let name = &current.record.name;
        let config = change(&current.record.config).map_err(CatalogError::Invalid)?;
        self.check_new_layers(&current.record.config.layers, &config.layers)?;
        let mut bound = None;
        if config.code.sha256 != current.record.config.code.sha256 {
            // A package a version holds stays stored: nothing is freed.
            let held = self.version_holds_code(account, name, &current.record.config.code.sha256);
            bound = Some(self.check_bounds(
                account,
                crate::bounds::Change {
                    added_bytes: config.code.size,
                    freed_bytes: if held {
                        0
                    } else {
                        current.record.config.code.size
                    },
                    ..Default::default()
                },
            )?);
        }
        let mut record = current.record.clone();
        record.config = config;
        // Strictly later than the stored time: it is also the token the
        // next update compares against.
        record.modified_ms = now_ms.max(current.record.modified_ms + 1);
        if let Some(code) = code.take() {
            *written = Some(code.blob.sha256.clone());
            self.write_code(Some(code)).await?;
        }
        let store = self.store.clone();
        let r = record.clone();
        let expected = current.record.modified_ms;
        blocking(move || match bound {
            Some(b) => Ok(store.update_function_within(&r, expected, b)?),
            None => Ok(store.update_function(&r, expected)?),
        })
        .await?;
        let old = current.record.config.code.sha256.clone();
        let new = record.config.code.sha256.clone();
        let entry = self.publish(record);
        if new != old {
            self.release(vec![old]).await;
        }
        self.release_layer_zips(&current.record.config.layers);
        Ok(entry)
    }

    /// Read one function from the store into the view (after another
    /// gateway changed it); the caller holds `write`.
    async fn reread_function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<Arc<FunctionEntry>, CatalogError> {
        let store = self.store.clone();
        let (a, n) = (account.clone(), name.clone());
        match blocking(move || Ok(store.function(&a, &n)?)).await? {
            Some(record) => Ok(self.publish(record)),
            None => Err(CatalogError::NotFound(name.clone())),
        }
    }

    pub async fn delete(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<Arc<FunctionEntry>, CatalogError> {
        let _w = self.write.lock().await;
        let current = self
            .function(account, name)
            .ok_or_else(|| CatalogError::NotFound(name.clone()))?;
        if self.has_versions(account, name) {
            return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                "function '{name}' still has versions or aliases: delete them first"
            ))));
        }
        // FC's rule: a function's triggers are deleted before it is.
        if self.has_triggers(account, name) {
            return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                "function '{name}' still has triggers: delete them first"
            ))));
        }
        let store = self.store.clone();
        let (a, n) = (account.clone(), name.clone());
        blocking(move || Ok(store.delete_function(&a, &n)?)).await?;
        self.forget_versions(account, name);
        if let Some(m) = self
            .functions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(account)
        {
            m.remove(name.as_str());
        }
        self.release(vec![current.record.config.code.sha256.clone()])
            .await;
        self.release_layer_zips(&current.record.config.layers);
        Ok(current)
    }
}

/// Reloads after another gateway of a cluster wrote
/// ([`crate::store::changes`]). Each holds `write`, so a reload and this
/// gateway's own writes never interleave; an entry whose record did not
/// change keeps its `Arc` (and whatever hangs off it).
impl Catalog {
    /// Replace the view of one function with what the store holds now.
    pub async fn refresh_function(
        &self,
        account: &AccountId,
        name: &FunctionName,
    ) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let (a, n) = (account.clone(), name.clone());
        let record = blocking(move || Ok(store.function(&a, &n)?)).await?;
        self.install_function(account, name.as_str(), record);
        Ok(())
    }

    fn install_function(&self, account: &AccountId, name: &str, record: Option<FunctionRecord>) {
        let mut functions = self.functions.write().unwrap_or_else(|p| p.into_inner());
        match record {
            Some(r) => {
                let m = functions.entry(account.clone()).or_default();
                if m.get(name).is_some_and(|e| e.record == r) {
                    return;
                }
                m.insert(name.to_owned(), Arc::new(FunctionEntry::new(r)));
            }
            None => {
                if let Some(m) = functions.get_mut(account) {
                    m.remove(name);
                }
            }
        }
    }

    /// Reload every function (after a gap in the change feed).
    pub async fn reload_functions(&self) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let records = blocking(move || Ok(store.functions()?)).await?;
        let mut fresh: Functions = HashMap::new();
        {
            let old = self.functions.read().unwrap_or_else(|p| p.into_inner());
            for r in records {
                let kept = old
                    .get(&r.account_id)
                    .and_then(|m| m.get(r.name.as_str()))
                    .filter(|e| e.record == r)
                    .cloned();
                let entry = kept.unwrap_or_else(|| Arc::new(FunctionEntry::new(r)));
                fresh
                    .entry(entry.record.account_id.clone())
                    .or_default()
                    .insert(entry.record.name.to_string(), entry);
            }
        }
        *self.functions.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Reload the access keys (created, disabled or deleted elsewhere).
    pub async fn reload_keys(&self) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let keys = blocking(move || Ok(store.access_keys()?)).await?;
        let keys = keys
            .into_iter()
            .filter(|k| k.enabled)
            .map(|k| (k.key.access_key_id.clone(), Arc::new(auth_key(k.key))))
            .collect();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    /// Reload layers and their versions.
    pub async fn reload_layers(&self) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let layers = blocking(move || {
            Ok(crate::layers::LayerIndex::load(
                store.layers()?,
                store.layer_versions()?,
            ))
        })
        .await?;
        *self.layers.write().unwrap_or_else(|p| p.into_inner()) = layers;
        Ok(())
    }

    /// Reload function versions and aliases.
    pub async fn reload_versions(&self) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let versions = blocking(move || {
            Ok(crate::versions::VersionIndex::load(
                store.function_versions()?,
                store.aliases()?,
            ))
        })
        .await?;
        *self.versions.write().unwrap_or_else(|p| p.into_inner()) = versions;
        Ok(())
    }

    /// Reload triggers.
    pub async fn reload_triggers(&self) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let triggers =
            blocking(move || Ok(crate::triggers::TriggerIndex::load(store.triggers()?))).await?;
        *self.triggers.write().unwrap_or_else(|p| p.into_inner()) = triggers;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::SqliteStore;

    fn rec(name: &str, digest: &str) -> FunctionRecord {
        crate::store::tests::record("1", name, digest)
    }

    /// A three-byte package with `digest`.
    pub(crate) fn code(digest: &str) -> Option<NewCode> {
        Some(NewCode {
            blob: CodeBlob {
                sha256: digest.into(),
                size: 3,
                checksum: "7".into(),
            },
            zip: b"zip".to_vec(),
        })
    }

    /// A catalog on a fresh SQLite store under `dir`.
    pub(crate) async fn catalog(dir: &std::path::Path) -> Catalog {
        let store = Arc::new(
            SqliteStore::open(&dir.join("gateway.db"), crate::store::tests::sealer()).unwrap(),
        );
        Catalog::open(store, CodeFiles::new(dir.join("code")).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn code_is_stored_once_and_removed_with_its_last_function() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path()).await;
        let d = "a".repeat(64);
        c.create(rec("f", &d), code(&d)).await.unwrap();
        c.create(rec("g", &d), code(&d)).await.unwrap();
        let path = c.code_files().path(&d).unwrap();
        assert!(path.exists());
        let a: AccountId = "1".parse().unwrap();
        c.delete(&a, &"f".parse().unwrap()).await.unwrap();
        assert!(path.exists());
        let e = "e".repeat(64);
        c.update(&a, &"g".parse().unwrap(), 5000, code(&e), |cfg| {
            let mut cfg = cfg.clone();
            cfg.code.sha256 = e.clone();
            Ok(cfg)
        })
        .await
        .unwrap();
        assert!(!path.exists());
        assert!(c.code_files().path(&e).unwrap().exists());
        // Reopen: the view is rebuilt from SQLite.
        drop(c);
        let c = catalog(dir.path()).await;
        let g = c.function(&a, &"g".parse().unwrap()).unwrap();
        assert_eq!(g.record.config.code.sha256, e);
        assert_eq!(g.record.modified_ms, 5000);
        assert!(c.function(&a, &"f".parse().unwrap()).is_none());
    }

    #[tokio::test]
    async fn refused_update_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path()).await;
        let d = "a".repeat(64);
        let before = c.create(rec("f", &d), code(&d)).await.unwrap();
        let a: AccountId = "1".parse().unwrap();
        let r = c
            .update(&a, &"f".parse().unwrap(), 9000, None, |_| {
                Err(FcError::invalid_argument("no"))
            })
            .await;
        assert!(matches!(r, Err(CatalogError::Invalid(_))));
        let after = c.function(&a, &"f".parse().unwrap()).unwrap();
        assert_eq!(after.record, before.record);
        assert!(matches!(
            c.create(rec("f", &d), code(&d)).await,
            Err(CatalogError::Exists(_))
        ));
    }

    #[tokio::test]
    async fn listing_pages_by_name_with_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path()).await;
        let d = "a".repeat(64);
        for n in ["a1", "b1", "b2", "b3", "c1"] {
            c.create(rec(n, &d), code(&d)).await.unwrap();
        }
        let a: AccountId = "1".parse().unwrap();
        let names = |v: Vec<Arc<FunctionEntry>>| -> Vec<String> {
            v.iter().map(|e| e.record.name.to_string()).collect()
        };
        let (p, more) = c.list(&a, "b", None, 2, |_| true);
        assert_eq!((names(p), more), (vec!["b1".into(), "b2".into()], true));
        let (p, more) = c.list(&a, "b", Some("b2"), 2, |_| true);
        assert_eq!((names(p), more), (vec!["b3".into()], false));
        let (p, more) = c.list(&a, "", None, 10, |_| true);
        assert_eq!((p.len(), more), (5, false));
        let (p, _) = c.list(&"2".parse().unwrap(), "", None, 10, |_| true);
        assert!(p.is_empty());
    }

    #[test]
    fn acquire_body_is_an_acquire_lease() {
        let e = FunctionEntry::new(rec("f", &"a".repeat(64)));
        let m: kiln_internal_api::AcquireLease =
            serde_json::from_slice(&e.acquire_body("r-1")).unwrap();
        assert_eq!(m.request_id, "r-1");
        assert_eq!(m.spec, e.spec);
        assert!(m.spec.is_sealed());
        assert_eq!(m.spec.command, vec![DEFAULT_COMMAND.to_owned()]);
    }
}
