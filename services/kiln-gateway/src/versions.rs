//! Function versions and aliases (FC's PublishFunctionVersion, CreateAlias
//! and friends), and the one place a `qualifier` becomes the configuration
//! a call runs.
//!
//! A version is an immutable snapshot of a function's configuration and
//! code reference, numbered `1`, `2`, ... per function (never reused). Its
//! [`FunctionEntry`] carries a spec whose `version` is set, so its
//! revision, and with it its instances and parked leases, are its own: a
//! version never serves LATEST or another version. An alias names a major
//! version and optionally `additionalVersionWeight`, the fractions of calls
//! that go to other versions instead (canary routing).
//!
//! The index lives in the [`Catalog`] beside the functions and is written
//! under the catalog's write lock, store first.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use kiln_core::{AccountId, FcError, FcErrorCode, FunctionName};
use serde::{Deserialize, Serialize};

use crate::catalog::{blocking, Catalog, CatalogError, FunctionEntry};
use crate::model::{FunctionConfig, FunctionRecord};

/// FC's qualifier for the function's current configuration.
pub const LATEST: &str = "LATEST";
/// At most this many characters in a version or alias description.
pub const DESCRIPTION_MAX: usize = 256;
/// At most this many aliases per function.
pub const ALIASES_MAX: usize = 100;

/// One published version as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRecord {
    pub account_id: AccountId,
    pub name: FunctionName,
    /// The function (by id) the version belongs to.
    pub function_id: String,
    pub version: u32,
    pub description: String,
    pub created_ms: u64,
    pub config: FunctionConfig,
}

/// One alias as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasRecord {
    pub account_id: AccountId,
    pub name: FunctionName,
    pub alias: String,
    /// The major version.
    pub version: u32,
    /// Other versions and the fraction of calls each gets.
    pub additional: BTreeMap<u32, f64>,
    pub description: String,
    pub created_ms: u64,
    pub modified_ms: u64,
}

impl AliasRecord {
    /// The version a call lands on, for `u` drawn uniformly from [0, 1):
    /// each additional version takes its weight's share of [0, 1) in
    /// version order, the major version the rest.
    pub fn route(&self, u: f64) -> u32 {
        let mut upto = 0.0;
        for (v, w) in &self.additional {
            upto += w;
            if u < upto {
                return *v;
            }
        }
        self.version
    }

    /// Every version the alias sends calls to.
    pub fn versions(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.version).chain(self.additional.keys().copied())
    }
}

/// A published version as the hot path needs it.
#[derive(Debug)]
pub struct VersionEntry {
    pub version: u32,
    pub description: String,
    pub created_ms: u64,
    /// The snapshot as a function entry (its spec names the version).
    pub entry: Arc<FunctionEntry>,
}

/// One function's versions and aliases.
#[derive(Debug, Default)]
pub struct FunctionVersions {
    /// The function these belong to; a new function under the same name
    /// starts afresh.
    pub function_id: String,
    pub last_version: u32,
    pub versions: BTreeMap<u32, Arc<VersionEntry>>,
    pub aliases: BTreeMap<String, Arc<AliasRecord>>,
}

/// Every function's versions and aliases, by account and function name.
#[derive(Debug, Default)]
pub struct VersionIndex {
    pub functions: HashMap<AccountId, HashMap<String, FunctionVersions>>,
}

impl VersionIndex {
    /// Build from the store's rows.
    pub fn load(stored: crate::store::FunctionVersions, aliases: Vec<AliasRecord>) -> Self {
        let mut index = Self::default();
        for (account, name, function_id, last) in stored.last_ids {
            let f = index.get_mut(&account, &name);
            f.function_id = function_id;
            f.last_version = last;
        }
        for v in stored.versions {
            let f = index.get_mut(&v.account_id, &v.name);
            f.function_id = v.function_id.clone();
            f.last_version = f.last_version.max(v.version);
            f.versions.insert(v.version, Arc::new(version_entry(v)));
        }
        for a in aliases {
            let f = index.get_mut(&a.account_id, &a.name);
            f.aliases.insert(a.alias.clone(), Arc::new(a));
        }
        index
    }

    fn get_mut(&mut self, account: &AccountId, name: &FunctionName) -> &mut FunctionVersions {
        self.functions
            .entry(account.clone())
            .or_default()
            .entry(name.to_string())
            .or_default()
    }

    pub fn get(&self, account: &AccountId, name: &FunctionName) -> Option<&FunctionVersions> {
        self.functions.get(account)?.get(name.as_str())
    }

    /// Every zip a version references (code packages and layers).
    pub fn digests(&self) -> impl Iterator<Item = &str> + '_ {
        self.functions
            .values()
            .flat_map(|m| m.values())
            .flat_map(|f| f.versions.values())
            .flat_map(|v| {
                let c = &v.entry.record.config;
                std::iter::once(c.code.sha256.as_str())
                    .chain(c.layers.iter().map(|l| l.sha256.as_str()))
            })
    }

    /// Whether a version's layer list uses `digest`.
    pub fn uses_layer_zip(&self, digest: &str) -> bool {
        self.functions
            .values()
            .flat_map(|m| m.values())
            .flat_map(|f| f.versions.values())
            .any(|v| {
                v.entry
                    .record
                    .config
                    .layers
                    .iter()
                    .any(|l| l.sha256 == digest)
            })
    }
}

fn version_entry(v: VersionRecord) -> VersionEntry {
    let record = FunctionRecord {
        account_id: v.account_id,
        name: v.name,
        function_id: v.function_id,
        created_ms: v.created_ms,
        modified_ms: v.created_ms,
        config: v.config,
    };
    VersionEntry {
        version: v.version,
        description: v.description,
        created_ms: v.created_ms,
        entry: Arc::new(FunctionEntry::for_version(record, v.version)),
    }
}

/// A call of a function whose invocations are disabled.
pub fn invocation_disabled(name: &FunctionName, reason: &str) -> FcError {
    let why = if reason.is_empty() {
        String::new()
    } else {
        format!(" ({reason})")
    };
    FcError::new(
        FcErrorCode::FunctionInvocationDisabled,
        format!("invocations of function '{name}' are disabled{why}; EnableFunctionInvocation turns them back on"),
    )
}

/// FC's VersionNotFound.
pub fn version_not_found(name: &FunctionName, version: &str) -> FcError {
    FcError::new(
        FcErrorCode::VersionNotFound,
        format!("version '{version}' of function '{name}' does not exist"),
    )
}

/// FC's AliasNotFound.
pub fn alias_not_found(name: &FunctionName, alias: &str) -> FcError {
    FcError::new(
        FcErrorCode::AliasNotFound,
        format!("alias '{alias}' of function '{name}' does not exist"),
    )
}

/// A version id as FC spells it: a positive decimal number.
pub fn parse_version_id(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
        return None;
    }
    s.parse().ok().filter(|v| *v > 0)
}

/// FC's alias names: 1 to 128 letters, digits, `_` or `-`, starting with a
/// letter or `_`, and not `LATEST`.
pub fn check_alias_name(s: &str) -> Result<(), FcError> {
    let ok = (1..=128).contains(&s.len())
        && s.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && s != LATEST;
    if ok {
        Ok(())
    } else {
        Err(FcError::invalid_argument(format!(
            "aliasName {s:?} is invalid: 1 to 128 letters, digits, '_' or '-', starting with a letter or '_', and not LATEST"
        )))
    }
}

/// A description of at most [`DESCRIPTION_MAX`] characters.
pub fn check_description(s: &str) -> Result<(), FcError> {
    if s.chars().count() > DESCRIPTION_MAX {
        return Err(FcError::invalid_argument(format!(
            "description is longer than {DESCRIPTION_MAX} characters"
        )));
    }
    Ok(())
}

/// FC's `additionalVersionWeight` checked against the major version:
/// version ids as keys, weights in [0, 1] that add up to at most 1, and
/// never the major version itself (AdditionalVersionContainsMajorVersion).
pub fn parse_weights(
    raw: &BTreeMap<String, f64>,
    major: u32,
) -> Result<BTreeMap<u32, f64>, FcError> {
    let mut out = BTreeMap::new();
    for (k, w) in raw {
        let v = parse_version_id(k).ok_or_else(|| {
            FcError::invalid_argument(format!(
                "additionalVersionWeight: {k:?} is not a version id"
            ))
        })?;
        if v == major {
            return Err(FcError::new(
                FcErrorCode::AdditionalVersionContainsMajorVersion,
                format!("additionalVersionWeight should not contain the major version {major}"),
            ));
        }
        if !w.is_finite() || !(0.0..=1.0).contains(w) {
            return Err(FcError::invalid_argument(format!(
                "additionalVersionWeight of version {v} must be between 0 and 1, got {w}"
            )));
        }
        out.insert(v, *w);
    }
    let total: f64 = out.values().sum();
    if total > 1.0 + 1e-9 {
        return Err(FcError::invalid_argument(format!(
            "additionalVersionWeight adds up to {total}, more than 1"
        )));
    }
    Ok(out)
}

/// What a call names: the function's current configuration, one version,
/// or an alias (resolved per call).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qualifier {
    Latest,
    Version(u32),
    Alias(String),
}

impl Qualifier {
    /// FC's `qualifier`: absent, empty or `LATEST`, a version id, or an
    /// alias name.
    pub fn parse(q: Option<&str>) -> Result<Self, FcError> {
        match q {
            None | Some("") | Some(LATEST) => Ok(Self::Latest),
            Some(s) => match parse_version_id(s) {
                Some(v) => Ok(Self::Version(v)),
                None if s.bytes().all(|b| b.is_ascii_digit()) => Err(FcError::invalid_argument(
                    format!("qualifier {s:?} is not a version id (1, 2, ...)"),
                )),
                None => {
                    check_alias_name(s).map_err(|_| {
                        FcError::invalid_argument(format!(
                            "qualifier {s:?} is neither LATEST, a version id nor an alias name"
                        ))
                    })?;
                    Ok(Self::Alias(s.to_owned()))
                }
            },
        }
    }

    pub fn is_latest(&self) -> bool {
        *self == Self::Latest
    }
}

impl std::fmt::Display for Qualifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Latest => f.write_str(LATEST),
            Self::Version(v) => write!(f, "{v}"),
            Self::Alias(a) => f.write_str(a),
        }
    }
}

/// A new alias or the fields an update changes.
#[derive(Debug, Clone, Default)]
pub struct AliasChange {
    pub version: Option<u32>,
    pub additional: Option<BTreeMap<String, f64>>,
    pub description: Option<String>,
}

impl Catalog {
    fn version_index(&self) -> std::sync::RwLockReadGuard<'_, VersionIndex> {
        self.versions.read().unwrap_or_else(|p| p.into_inner())
    }

    fn version_index_mut(&self) -> std::sync::RwLockWriteGuard<'_, VersionIndex> {
        self.versions.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The configuration a call with `qualifier` runs: LATEST's entry, a
    /// version's, or an alias's version picked with `u` (uniform in
    /// [0, 1), see [`AliasRecord::route`]).
    pub fn resolve(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &Qualifier,
        u: f64,
    ) -> Result<Arc<FunctionEntry>, FcError> {
        self.resolve_checked(account, name, qualifier, u, false)
    }

    /// [`Self::resolve`] for a call: refused while DisableFunctionInvocation
    /// has the function's invocations off (every qualifier: the
    /// restriction is the function's).
    pub fn resolve_invocable(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &Qualifier,
        u: f64,
    ) -> Result<Arc<FunctionEntry>, FcError> {
        self.resolve_checked(account, name, qualifier, u, true)
    }

    /// One lookup of the function for both: the restriction is read from
    /// the LATEST entry the resolution needs anyway (the warm path).
    fn resolve_checked(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &Qualifier,
        u: f64,
        for_a_call: bool,
    ) -> Result<Arc<FunctionEntry>, FcError> {
        let latest = self
            .function(account, name)
            .ok_or_else(|| crate::api::not_found(name))?;
        // The qualifier is checked first, as a call of a missing version
        // or alias is refused for that whatever the restriction.
        let entry = self.qualified(account, name, &latest, qualifier, u)?;
        if for_a_call {
            if let Some(reason) = latest.record.config.invocation_disabled() {
                return Err(invocation_disabled(name, reason));
            }
        }
        Ok(entry)
    }

    /// `qualifier`'s entry of the function whose LATEST is `latest`.
    fn qualified(
        &self,
        account: &AccountId,
        name: &FunctionName,
        latest: &Arc<FunctionEntry>,
        qualifier: &Qualifier,
        u: f64,
    ) -> Result<Arc<FunctionEntry>, FcError> {
        let version = match qualifier {
            Qualifier::Latest => return Ok(latest.clone()),
            Qualifier::Version(v) => *v,
            Qualifier::Alias(a) => {
                let index = self.version_index();
                let alias = index
                    .get(account, name)
                    .filter(|f| f.function_id == latest.record.function_id)
                    .and_then(|f| f.aliases.get(a))
                    .ok_or_else(|| alias_not_found(name, a))?;
                alias.route(u)
            }
        };
        self.version(account, name, version)
            .filter(|v| v.entry.record.function_id == latest.record.function_id)
            .map(|v| v.entry.clone())
            .ok_or_else(|| version_not_found(name, &version.to_string()))
    }

    /// The longest timeout a call with `qualifier` may run (an alias may
    /// pick any of its versions).
    pub fn timeout_s(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &Qualifier,
    ) -> Option<u32> {
        match qualifier {
            Qualifier::Alias(a) => self
                .alias(account, name, a)?
                .versions()
                .filter_map(|v| self.version(account, name, v))
                .map(|v| v.entry.spec.timeout_s)
                .max(),
            q => self
                .resolve(account, name, q, 0.0)
                .ok()
                .map(|e| e.spec.timeout_s),
        }
    }

    /// Check that `qualifier` names something that exists now.
    pub fn check_qualifier(
        &self,
        account: &AccountId,
        name: &FunctionName,
        qualifier: &Qualifier,
    ) -> Result<(), FcError> {
        self.resolve(account, name, qualifier, 0.0).map(|_| ())
    }

    pub fn version(
        &self,
        account: &AccountId,
        name: &FunctionName,
        version: u32,
    ) -> Option<Arc<VersionEntry>> {
        self.version_index()
            .get(account, name)?
            .versions
            .get(&version)
            .cloned()
    }

    /// The function's versions, in id order.
    pub fn versions_of(&self, account: &AccountId, name: &FunctionName) -> Vec<Arc<VersionEntry>> {
        self.version_index()
            .get(account, name)
            .map(|f| f.versions.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The function's aliases, by name.
    pub fn aliases_of(&self, account: &AccountId, name: &FunctionName) -> Vec<Arc<AliasRecord>> {
        self.version_index()
            .get(account, name)
            .map(|f| f.aliases.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn alias(
        &self,
        account: &AccountId,
        name: &FunctionName,
        alias: &str,
    ) -> Option<Arc<AliasRecord>> {
        self.version_index()
            .get(account, name)?
            .aliases
            .get(alias)
            .cloned()
    }

    /// The revisions of the function's versions (their instances stay
    /// when LATEST changes).
    pub fn version_revisions(&self, account: &AccountId, name: &FunctionName) -> Vec<String> {
        self.versions_of(account, name)
            .iter()
            .map(|v| v.entry.spec.revision.clone())
            .collect()
    }

    /// Whether the function has versions or aliases (it cannot be deleted
    /// before they are).
    pub(crate) fn has_versions(&self, account: &AccountId, name: &FunctionName) -> bool {
        self.version_index()
            .get(account, name)
            .is_some_and(|f| !f.versions.is_empty() || !f.aliases.is_empty())
    }

    /// Forget a deleted function's (empty) version history.
    pub(crate) fn forget_versions(&self, account: &AccountId, name: &FunctionName) {
        if let Some(m) = self.version_index_mut().functions.get_mut(account) {
            m.remove(name.as_str());
        }
    }

    /// Bytes of the account's code packages that only versions hold (not
    /// their function's LATEST), each package once per function.
    pub(crate) fn version_only_code_bytes(&self, account: &AccountId) -> u64 {
        let index = self.version_index();
        let Some(m) = index.functions.get(account) else {
            return 0;
        };
        let mut total = 0;
        for (name, f) in m {
            let latest = name
                .parse::<FunctionName>()
                .ok()
                .and_then(|n| self.function(account, &n))
                .map(|e| e.record.config.code.sha256.clone());
            let mut seen = std::collections::HashSet::new();
            for v in f.versions.values() {
                let code = &v.entry.record.config.code;
                if Some(&code.sha256) != latest.as_ref() && seen.insert(code.sha256.as_str()) {
                    total += code.size;
                }
            }
        }
        total
    }

    /// Whether one of the function's versions holds the package `digest`.
    pub(crate) fn version_holds_code(
        &self,
        account: &AccountId,
        name: &FunctionName,
        digest: &str,
    ) -> bool {
        self.version_index().get(account, name).is_some_and(|f| {
            f.versions
                .values()
                .any(|v| v.entry.record.config.code.sha256 == digest)
        })
    }

    pub(crate) fn version_uses_layer_zip(&self, digest: &str) -> bool {
        self.version_index().uses_layer_zip(digest)
    }

    pub(crate) fn version_zip_in_use(&self, digest: &str) -> bool {
        self.version_index().digests().any(|d| d == digest)
    }

    /// Snapshot LATEST as the next version. Refused when nothing changed
    /// since the last version.
    pub async fn publish_version(
        &self,
        account: &AccountId,
        name: &FunctionName,
        description: String,
        now_ms: u64,
    ) -> Result<Arc<VersionEntry>, CatalogError> {
        let _w = self.write.lock().await;
        let latest = self
            .function(account, name)
            .ok_or_else(|| CatalogError::NotFound(name.clone()))?;
        let (last_id, last) = {
            let index = self.version_index();
            match index
                .get(account, name)
                .filter(|f| f.function_id == latest.record.function_id)
            {
                Some(f) => (f.last_version, f.versions.values().next_back().cloned()),
                None => (0, None),
            }
        };
        let snapshot = latest.record.config.version_snapshot();
        if let Some(last) = last {
            if last.entry.record.config == snapshot {
                return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                    "function '{name}' has not changed since version {}: update it before publishing a new version",
                    last.version
                ))));
            }
        }
        let record = VersionRecord {
            account_id: account.clone(),
            name: name.clone(),
            function_id: latest.record.function_id.clone(),
            version: last_id + 1,
            description,
            created_ms: now_ms,
            config: snapshot,
        };
        let store = self.store.clone();
        let r = record.clone();
        // In a cluster another gateway may have published meanwhile: the
        // store hands out the next free id.
        let mut record = record;
        record.version = blocking(move || Ok(store.insert_version(&r)?)).await?;
        let entry = Arc::new(version_entry(record));
        let mut index = self.version_index_mut();
        let f = index.get_mut(account, name);
        if f.function_id != latest.record.function_id {
            *f = FunctionVersions {
                function_id: latest.record.function_id.clone(),
                ..Default::default()
            };
        }
        f.last_version = entry.version;
        f.versions.insert(entry.version, entry.clone());
        Ok(entry)
    }

    /// Delete a version no alias points at; its code stays while LATEST or
    /// another version uses it.
    pub async fn delete_version(
        &self,
        account: &AccountId,
        name: &FunctionName,
        version: u32,
    ) -> Result<Arc<VersionEntry>, CatalogError> {
        let _w = self.write.lock().await;
        if self.function(account, name).is_none() {
            return Err(CatalogError::NotFound(name.clone()));
        }
        let current = self
            .version(account, name, version)
            .ok_or_else(|| CatalogError::Invalid(version_not_found(name, &version.to_string())))?;
        if let Some(t) = self.trigger_on(account, name, &version.to_string()) {
            return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                "version {version} of function '{name}' is used by trigger '{}': point the trigger elsewhere or delete it first",
                t.trigger_name
            ))));
        }
        if let Some(a) = self
            .aliases_of(account, name)
            .iter()
            .find(|a| a.versions().any(|v| v == version))
        {
            return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                "version {version} of function '{name}' is used by alias '{}': point the alias elsewhere or delete it first",
                a.alias
            ))));
        }
        let store = self.store.clone();
        let (a, n) = (account.clone(), name.clone());
        blocking(move || Ok(store.delete_version(&a, &n, version)?)).await?;
        if let Some(f) = self
            .version_index_mut()
            .functions
            .get_mut(account)
            .and_then(|m| m.get_mut(name.as_str()))
        {
            f.versions.remove(&version);
        }
        let config = &current.entry.record.config;
        self.release(vec![config.code.sha256.clone()]).await;
        self.release_layer_zips(&config.layers);
        Ok(current)
    }

    /// Create (`create`) or update an alias; every version it names must
    /// exist.
    pub async fn put_alias(
        &self,
        account: &AccountId,
        name: &FunctionName,
        alias: &str,
        change: AliasChange,
        create: bool,
        now_ms: u64,
    ) -> Result<Arc<AliasRecord>, CatalogError> {
        let _w = self.write.lock().await;
        let latest = self
            .function(account, name)
            .ok_or_else(|| CatalogError::NotFound(name.clone()))?;
        let existing = self.alias(account, name, alias);
        let invalid = CatalogError::Invalid;
        let mut record = match (existing, create) {
            (Some(_), true) => {
                return Err(invalid(FcError::new(
                    FcErrorCode::AliasAlreadyExists,
                    format!("alias '{alias}' of function '{name}' already exists"),
                )))
            }
            (None, false) => return Err(invalid(alias_not_found(name, alias))),
            (Some(a), false) => (*a).clone(),
            (None, true) => {
                if self.aliases_of(account, name).len() >= ALIASES_MAX {
                    return Err(invalid(FcError::new(
                        FcErrorCode::LimitExceeded,
                        format!("function '{name}' already has {ALIASES_MAX} aliases"),
                    )));
                }
                AliasRecord {
                    account_id: account.clone(),
                    name: name.clone(),
                    alias: alias.to_owned(),
                    version: change.version.ok_or_else(|| {
                        invalid(FcError::invalid_argument("versionId is required"))
                    })?,
                    additional: BTreeMap::new(),
                    description: String::new(),
                    created_ms: now_ms,
                    modified_ms: now_ms,
                }
            }
        };
        if let Some(v) = change.version {
            record.version = v;
        }
        if let Some(d) = change.description {
            record.description = d;
        }
        match &change.additional {
            Some(raw) => record.additional = parse_weights(raw, record.version).map_err(invalid)?,
            // A new major version that was a canary stops being one.
            None => {
                record.additional.remove(&record.version);
            }
        }
        for v in record.versions() {
            let exists = self
                .version(account, name, v)
                .is_some_and(|e| e.entry.record.function_id == latest.record.function_id);
            if !exists {
                return Err(invalid(version_not_found(name, &v.to_string())));
            }
        }
        record.modified_ms = now_ms.max(record.created_ms);
        let store = self.store.clone();
        let r = record.clone();
        blocking(move || Ok(store.put_alias(&r)?)).await?;
        let record = Arc::new(record);
        self.version_index_mut()
            .get_mut(account, name)
            .aliases
            .insert(alias.to_owned(), record.clone());
        Ok(record)
    }

    pub async fn delete_alias(
        &self,
        account: &AccountId,
        name: &FunctionName,
        alias: &str,
    ) -> Result<(), CatalogError> {
        let _w = self.write.lock().await;
        if self.function(account, name).is_none() {
            return Err(CatalogError::NotFound(name.clone()));
        }
        if self.alias(account, name, alias).is_none() {
            return Err(CatalogError::Invalid(alias_not_found(name, alias)));
        }
        if let Some(t) = self.trigger_on(account, name, alias) {
            return Err(CatalogError::Invalid(FcError::invalid_argument(format!(
                "alias '{alias}' of function '{name}' is used by trigger '{}': point the trigger elsewhere or delete it first",
                t.trigger_name
            ))));
        }
        let store = self.store.clone();
        let (a, n, al) = (account.clone(), name.clone(), alias.to_owned());
        blocking(move || Ok(store.delete_alias(&a, &n, &al)?)).await?;
        if let Some(f) = self
            .version_index_mut()
            .functions
            .get_mut(account)
            .and_then(|m| m.get_mut(name.as_str()))
        {
            f.aliases.remove(alias);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::tests::{catalog, code};
    use rand::{Rng, SeedableRng};

    fn a() -> AccountId {
        "1".parse().unwrap()
    }
    fn f() -> FunctionName {
        "f".parse().unwrap()
    }

    async fn update_code(c: &Catalog, digest: &str) {
        let d = digest.to_owned();
        c.update(&a(), &f(), 2000, code(digest), move |cfg| {
            let mut cfg = cfg.clone();
            cfg.code.sha256 = d.clone();
            Ok(cfg)
        })
        .await
        .unwrap();
    }

    fn invalid_code(e: CatalogError) -> FcErrorCode {
        match e {
            CatalogError::Invalid(e) => e.code,
            other => panic!("not a refusal: {other:?}"),
        }
    }

    #[tokio::test]
    async fn versions_snapshot_config_and_keep_their_code() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path()).await;
        let d1 = "a".repeat(64);
        let d2 = "b".repeat(64);
        let mut rec = crate::store::tests::record("1", "f", &d1);
        rec.config.environment.insert("K".into(), "v1".into());
        c.create(rec, code(&d1)).await.unwrap();
        let v1 = c
            .publish_version(&a(), &f(), "first".into(), 1500)
            .await
            .unwrap();
        assert_eq!(v1.version, 1);
        // Nothing changed: refused, and no id is used up.
        let e = c
            .publish_version(&a(), &f(), String::new(), 1600)
            .await
            .unwrap_err();
        assert_eq!(invalid_code(e), FcErrorCode::InvalidArgument);
        update_code(&c, &d2).await;
        // v1's code stays on disk although LATEST moved on.
        assert!(c.code_files().path(&d1).unwrap().exists());
        let v2 = c
            .publish_version(&a(), &f(), String::new(), 2500)
            .await
            .unwrap();
        assert_eq!(v2.version, 2);
        assert_ne!(v1.entry.spec.revision, v2.entry.spec.revision);
        let latest = c.resolve(&a(), &f(), &Qualifier::Latest, 0.0).unwrap();
        assert_ne!(
            latest.spec.revision, v2.entry.spec.revision,
            "LATEST is its own revision"
        );
        assert_eq!(latest.spec.code_digest, v2.entry.spec.code_digest);
        assert_eq!(v2.entry.spec.version.as_deref(), Some("2"));
        assert!(latest.spec.version.is_none());

        // Reopen: versions, their sealed environment and the id counter
        // come back.
        drop(c);
        let c = catalog(dir.path()).await;
        let v1 = c.resolve(&a(), &f(), &Qualifier::Version(1), 0.0).unwrap();
        assert_eq!(v1.record.config.code.sha256, d1);
        assert_eq!(v1.record.config.environment["K"], "v1");
        assert!(c.code_files().path(&d1).unwrap().exists(), "not swept");
        c.delete_version(&a(), &f(), 2).await.unwrap();
        update_code(&c, &"c".repeat(64)).await;
        let v3 = c
            .publish_version(&a(), &f(), String::new(), 3000)
            .await
            .unwrap();
        assert_eq!(v3.version, 3, "ids are never reused");
        // Deleting v1 releases its package: nothing else uses it.
        c.delete_version(&a(), &f(), 1).await.unwrap();
        assert!(!c.code_files().path(&d1).unwrap().exists());
        let e = c
            .resolve(&a(), &f(), &Qualifier::Version(1), 0.0)
            .unwrap_err();
        assert_eq!(e.code, FcErrorCode::VersionNotFound);
        // With every version gone, ids still go on after a restart.
        c.delete_version(&a(), &f(), 3).await.unwrap();
        drop(c);
        let c = catalog(dir.path()).await;
        update_code(&c, &"d".repeat(64)).await;
        let v4 = c
            .publish_version(&a(), &f(), String::new(), 4000)
            .await
            .unwrap();
        assert_eq!(v4.version, 4);
        // A new function under the same name starts from 1.
        c.delete_version(&a(), &f(), 4).await.unwrap();
        c.delete(&a(), &f()).await.unwrap();
        let d5 = "e".repeat(64);
        c.create(crate::store::tests::record("1", "f", &d5), code(&d5))
            .await
            .unwrap();
        let again = c
            .publish_version(&a(), &f(), String::new(), 5000)
            .await
            .unwrap();
        assert_eq!(again.version, 1);
    }

    #[tokio::test]
    async fn aliases_guard_their_versions_and_the_function() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path()).await;
        let d1 = "a".repeat(64);
        c.create(crate::store::tests::record("1", "f", &d1), code(&d1))
            .await
            .unwrap();
        c.publish_version(&a(), &f(), String::new(), 1)
            .await
            .unwrap();
        update_code(&c, &"b".repeat(64)).await;
        c.publish_version(&a(), &f(), String::new(), 2)
            .await
            .unwrap();
        let change = |v: u32, w: &[(&str, f64)]| AliasChange {
            version: Some(v),
            additional: Some(w.iter().map(|(k, w)| (k.to_string(), *w)).collect()),
            description: None,
        };
        let e = c
            .put_alias(&a(), &f(), "prod", change(9, &[]), true, 5)
            .await
            .unwrap_err();
        assert_eq!(invalid_code(e), FcErrorCode::VersionNotFound);
        let e = c
            .put_alias(&a(), &f(), "prod", change(1, &[("1", 0.5)]), true, 5)
            .await
            .unwrap_err();
        assert_eq!(
            invalid_code(e),
            FcErrorCode::AdditionalVersionContainsMajorVersion
        );
        let e = c
            .put_alias(&a(), &f(), "prod", change(1, &[("2", 1.5)]), true, 5)
            .await
            .unwrap_err();
        assert_eq!(invalid_code(e), FcErrorCode::InvalidArgument);
        assert!(
            c.aliases_of(&a(), &f()).is_empty(),
            "refusals change nothing"
        );
        c.put_alias(&a(), &f(), "prod", change(1, &[("2", 0.1)]), true, 5)
            .await
            .unwrap();
        let e = c
            .put_alias(&a(), &f(), "prod", change(1, &[]), true, 6)
            .await
            .unwrap_err();
        assert_eq!(invalid_code(e), FcErrorCode::AliasAlreadyExists);
        // Both versions are in use: neither can go, nor the function.
        for v in [1, 2] {
            let e = c.delete_version(&a(), &f(), v).await.unwrap_err();
            assert_eq!(invalid_code(e), FcErrorCode::InvalidArgument);
        }
        assert!(matches!(
            c.delete(&a(), &f()).await,
            Err(CatalogError::Invalid(_))
        ));
        // Roll forward: v2 becomes major; its old canary entry goes.
        let rolled = c
            .put_alias(
                &a(),
                &f(),
                "prod",
                AliasChange {
                    version: Some(2),
                    ..Default::default()
                },
                false,
                7,
            )
            .await
            .unwrap();
        assert_eq!((rolled.version, rolled.additional.len()), (2, 0));
        drop(c);
        let c = catalog(dir.path()).await;
        assert_eq!(*c.alias(&a(), &f(), "prod").unwrap(), *rolled);
        c.delete_version(&a(), &f(), 1).await.unwrap();
        c.delete_alias(&a(), &f(), "prod").await.unwrap();
        c.delete_version(&a(), &f(), 2).await.unwrap();
        c.delete(&a(), &f()).await.unwrap();
    }

    #[tokio::test]
    async fn code_only_versions_hold_counts_against_the_account() {
        let dir = tempfile::tempdir().unwrap();
        let c = catalog(dir.path())
            .await
            .with_bounds(crate::bounds::Bounds::from_config(
                &crate::bounds::TenantBoundsConfig {
                    max_code_bytes: 7,
                    ..Default::default()
                },
            ));
        let d1 = "a".repeat(64);
        c.create(crate::store::tests::record("1", "f", &d1), code(&d1))
            .await
            .unwrap();
        assert_eq!(c.usage(&a()).code_bytes, 3);
        c.publish_version(&a(), &f(), String::new(), 1)
            .await
            .unwrap();
        assert_eq!(
            c.usage(&a()).code_bytes,
            3,
            "shared with LATEST: counted once"
        );
        update_code(&c, &"b".repeat(64)).await;
        assert_eq!(c.usage(&a()).code_bytes, 6, "version 1 still holds 3 bytes");
        // A third package would make 9 > 7: refused, though LATEST's
        // current package is no larger than the new one.
        c.publish_version(&a(), &f(), String::new(), 2)
            .await
            .unwrap();
        let d3 = "c".repeat(64);
        let r = c
            .update(&a(), &f(), 3000, code(&d3), move |cfg| {
                let mut cfg = cfg.clone();
                cfg.code.sha256 = d3.clone();
                Ok(cfg)
            })
            .await;
        assert!(matches!(r, Err(CatalogError::Invalid(e)) if e.code == FcErrorCode::LimitExceeded));
        c.delete_version(&a(), &f(), 1).await.unwrap();
        assert_eq!(c.usage(&a()).code_bytes, 3);
    }

    #[test]
    fn a_weighted_alias_splits_calls_within_bounds() {
        let alias = AliasRecord {
            account_id: a(),
            name: f(),
            alias: "prod".into(),
            version: 1,
            additional: [(2, 0.1)].into_iter().collect(),
            description: String::new(),
            created_ms: 0,
            modified_ms: 0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let n = 10_000;
        let canary = (0..n)
            .filter(|_| alias.route(rng.gen::<f64>()) == 2)
            .count();
        // Binomial(10000, 0.1): sd = 30; 4 sd either side.
        assert!(
            (880..=1120).contains(&canary),
            "{canary} of {n} to the canary"
        );
        assert_eq!(alias.route(0.0999), 2);
        assert_eq!(alias.route(0.1), 1);
        let mut none = alias.clone();
        none.additional.clear();
        assert!((0..1000).all(|_| none.route(rng.gen::<f64>()) == 1));
    }

    #[test]
    fn qualifiers_parse_as_fc_spells_them() {
        assert_eq!(Qualifier::parse(None).unwrap(), Qualifier::Latest);
        assert_eq!(Qualifier::parse(Some("LATEST")).unwrap(), Qualifier::Latest);
        assert_eq!(
            Qualifier::parse(Some("12")).unwrap(),
            Qualifier::Version(12)
        );
        assert_eq!(
            Qualifier::parse(Some("prod")).unwrap(),
            Qualifier::Alias("prod".into())
        );
        for bad in ["0", "01", "a b", "-x", "../x", "1x"] {
            assert!(Qualifier::parse(Some(bad)).is_err(), "{bad}");
        }
        assert!(check_alias_name("LATEST").is_err());
        assert!(check_alias_name(&"a".repeat(129)).is_err());
    }
}
