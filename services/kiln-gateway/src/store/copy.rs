//! Copying a one-box gateway's metadata into the PostgreSQL database a
//! cluster of gateways will share (`kiln store copy`).
//!
//! Everything [`MetaStore`], roles and custom domains hold is copied:
//! accounts, access keys (enabled or not, with their creation times),
//! functions, their published versions (same ids) and aliases, the last
//! version id each function and layer handed out (so no id is ever
//! reused), layers and their versions with their ACL, triggers, roles,
//! custom domains; and every code package's zip from the state
//! directory's files into the database. Secrets are opened with the
//! source's key and sealed again with the target's. A target that already
//! holds gateway metadata is refused: copying never merges two views.
//! The async queue (queue.db) is not metadata; it is copied separately.

use super::postgres::PgMetaStore;
use super::{CodeFiles, CodeSource, MetaStore, MetaStoreError, SqliteStore};
use crate::domains::DomainStore;
use crate::ram::RoleStore;
use crate::secrets::Sealer;

/// What was copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Copied {
    pub accounts: usize,
    pub access_keys: usize,
    pub functions: usize,
    pub versions: usize,
    pub aliases: usize,
    pub layer_versions: usize,
    pub triggers: usize,
    pub roles: usize,
    pub domains: usize,
    pub code_packages: usize,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} accounts, {} access keys, {} functions, {} versions, {} aliases, \
             {} layer versions, {} triggers, {} roles, {} custom domains, {} code packages",
            self.accounts,
            self.access_keys,
            self.functions,
            self.versions,
            self.aliases,
            self.layer_versions,
            self.triggers,
            self.roles,
            self.domains,
            self.code_packages
        )
    }
}

/// Why a copy did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read the source gateway store")]
    Source(#[source] MetaStoreError),
    #[error("cannot write the target gateway store")]
    Target(#[source] MetaStoreError),
    #[error(
        "code package {digest} is referenced but its file {path} cannot be read; restore the \
         gateway's code directory before copying"
    )]
    MissingCode {
        digest: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the target already holds gateway metadata ({0}); copy into an empty database, or drop \
         the gateway's tables there first"
    )]
    NotEmpty(String),
}

/// Copy everything from the one-box gateway (`from`, its code files
/// `code`, sealed under `from_sealer`) into the empty `to` (sealing
/// under `to_sealer`).
pub fn copy(
    from: &SqliteStore,
    from_sealer: &Sealer,
    code: &CodeFiles,
    to: &PgMetaStore,
    to_sealer: &Sealer,
) -> Result<Copied, CopyError> {
    let held = to.holds_metadata().map_err(CopyError::Target)?;
    if !held.is_empty() {
        return Err(CopyError::NotEmpty(held.join(", ")));
    }
    let src = CopyError::Source;
    let dst = CopyError::Target;
    let accounts = from.accounts().map_err(src)?;
    let keys = from.access_keys().map_err(src)?;
    let functions = from.functions().map_err(src)?;
    let versions = from.function_versions().map_err(src)?;
    let aliases = from.aliases().map_err(src)?;
    let layers = from.layers().map_err(src)?;
    let mut layer_versions = from.layer_versions().map_err(src)?;
    let triggers = from.triggers().map_err(src)?;
    let roles = from.roles().map_err(src)?;
    let domains = from.load_domains(from_sealer).map_err(src)?;

    // Zips first: a row never names a package the database lacks.
    let mut digests: Vec<String> = from.code_digests().map_err(src)?;
    digests.extend(layer_versions.iter().map(|v| v.code.sha256.clone()));
    digests.extend(
        functions
            .iter()
            .flat_map(|f| f.config.layers.iter().map(|l| l.sha256.clone())),
    );
    digests.sort();
    digests.dedup();
    for d in &digests {
        let path = code.path(d).ok_or_else(|| CopyError::MissingCode {
            digest: d.clone(),
            path: String::new(),
            source: std::io::Error::other("not a sha256 digest"),
        })?;
        let zip = std::fs::read(&path).map_err(|source| CopyError::MissingCode {
            digest: d.clone(),
            path: path.display().to_string(),
            source,
        })?;
        to.put_zip(d, &zip).map_err(dst)?;
    }

    for (a, created) in &accounts {
        to.ensure_account(a, *created).map_err(dst)?;
    }
    for k in &keys {
        to.put_access_key(&k.key, k.created_ms).map_err(dst)?;
        if !k.enabled {
            to.set_access_key_enabled(&k.key.access_key_id, false)
                .map_err(dst)?;
        }
    }
    for f in &functions {
        to.insert_function(f).map_err(dst)?;
    }
    for v in &versions.versions {
        to.insert_version(v).map_err(dst)?;
    }
    for a in &aliases {
        to.put_alias(a).map_err(dst)?;
    }
    layer_versions.sort_by(|a, b| {
        (a.account_id.as_str(), &a.name, a.version).cmp(&(
            b.account_id.as_str(),
            &b.name,
            b.version,
        ))
    });
    for v in &layer_versions {
        to.insert_layer_version(v).map_err(dst)?;
    }
    // Numbers deleted versions used stay used; ACLs as they were.
    to.restore_last_ids(&versions.last_ids, &layers)
        .map_err(dst)?;
    for t in &triggers {
        to.insert_trigger(t).map_err(dst)?;
    }
    for r in &roles {
        to.put_role(r).map_err(dst)?;
    }
    for (d, key) in &domains {
        to.insert_domain(to_sealer, d, key).map_err(dst)?;
    }
    Ok(Copied {
        accounts: accounts.len(),
        access_keys: keys.len(),
        functions: functions.len(),
        versions: versions.versions.len(),
        aliases: aliases.len(),
        layer_versions: layer_versions.len(),
        triggers: triggers.len(),
        roles: roles.len(),
        domains: domains.len(),
        code_packages: digests.len(),
    })
}
