//! Which columns of gateway.db hold sealed values, the identity each is
//! bound to, and the pass that seals what an older Kiln stored in
//! plaintext (or under a previous key) when the store opens.
//!
//! | column | sealed value | bound to |
//! |---|---|---|
//! | `access_keys.secret_sealed` | the key's secret | access key id, account |
//! | `functions.env_sealed` | the function's environment (JSON object) | account, name, function id |
//! | `custom_domains.key_sealed` | the domain certificate's private key (PEM) | domain name, account |
//!
//! `access_keys.secret` is kept empty and `functions.doc` carries an empty
//! `environment` once a row is sealed. The async queue (queue.db) holds no
//! copy of either: its messages carry payloads and invocation headers only.

use std::collections::BTreeMap;

use rusqlite::{params, Connection};

pub use super::{open_environment, seal_environment};
use super::{Aad, SealError, Sealer};

/// The identity an access key's secret is sealed to.
pub fn access_key_secret(access_key_id: &str, account_id: &str) -> Aad {
    Aad::new("access_keys.secret", &[access_key_id, account_id])
}

/// The identity a function's environment is sealed to: a function deleted
/// and created again under its name gets a new function id, so its old
/// row's ciphertext does not open for it.
pub fn function_environment(account_id: &str, name: &str, function_id: &str) -> Aad {
    Aad::new("functions.environment", &[account_id, name, function_id])
}

/// The AAD of a published function version's environment: the version's
/// row, so a sealed value moved to another version or function fails.
pub fn version_environment(account_id: &str, name: &str, function_id: &str, version: u32) -> Aad {
    Aad::new(
        "function_versions.environment",
        &[account_id, name, function_id, version.to_string().as_str()],
    )
}

/// The identity a custom domain's private key is sealed to.
pub fn custom_domain_key(domain_name: &str, account_id: &str) -> Aad {
    Aad::new("custom_domains.private_key", &[domain_name, account_id])
}

/// Why the sealing pass failed.
#[derive(Debug, thiserror::Error)]
pub enum SealPassError {
    #[error("Cannot open the stored {what}")]
    Open {
        what: String,
        #[source]
        source: SealError,
    },
    #[error("Stored function document of {0} is unreadable")]
    Doc(String),
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

/// Seal every value still in plaintext and reseal every value sealed under
/// a previous key, in one transaction; then, if anything changed, rewrite
/// the file (`VACUUM`) and truncate the WAL so no page holding an old
/// plaintext survives. Idempotent: a second run changes nothing. Returns
/// the number of values (re)sealed.
pub fn seal_all(conn: &mut Connection, sealer: &Sealer) -> Result<usize, SealPassError> {
    let tx = conn.transaction()?;
    let mut changed = 0;
    {
        let mut st =
            tx.prepare("SELECT access_key_id, account_id, secret, secret_sealed FROM access_keys")?;
        let rows: Vec<(String, String, String, Option<String>)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?;
        for (id, account, plain, sealed) in rows {
            let aad = access_key_secret(&id, &account);
            let secret = match sealed {
                None => plain.into_bytes(),
                Some(s) if sealer.is_current(&s) => continue,
                Some(s) => sealer
                    .open(&aad, &s)
                    .map_err(|source| SealPassError::Open {
                        what: format!("secret of access key {id}"),
                        source,
                    })?,
            };
            tx.execute(
                "UPDATE access_keys SET secret = '', secret_sealed = ?2 WHERE access_key_id = ?1",
                params![id, sealer.seal(&aad, &secret)],
            )?;
            changed += 1;
        }
    }
    {
        let mut st =
            tx.prepare("SELECT account_id, name, function_id, doc, env_sealed FROM functions")?;
        let rows: Vec<(String, String, String, String, Option<String>)> = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        for (account, name, function_id, doc, sealed) in rows {
            let aad = function_environment(&account, &name, &function_id);
            let what = || format!("environment of function {account}/{name}");
            let (env, doc) = match sealed {
                None => {
                    let mut v: serde_json::Value =
                        serde_json::from_str(&doc).map_err(|_| SealPassError::Doc(what()))?;
                    let obj = v
                        .as_object_mut()
                        .ok_or_else(|| SealPassError::Doc(what()))?;
                    let env: BTreeMap<String, String> = match obj.remove("environment") {
                        Some(e) => {
                            serde_json::from_value(e).map_err(|_| SealPassError::Doc(what()))?
                        }
                        None => BTreeMap::new(),
                    };
                    obj.insert("environment".into(), serde_json::json!({}));
                    (env, v.to_string())
                }
                Some(s) if sealer.is_current(&s) => continue,
                Some(s) => (
                    open_environment(sealer, &aad, &s).map_err(|source| SealPassError::Open {
                        what: what(),
                        source,
                    })?,
                    doc,
                ),
            };
            tx.execute(
                "UPDATE functions SET doc = ?3, env_sealed = ?4 WHERE account_id = ?1 AND name = ?2",
                params![account, name, doc, seal_environment(sealer, &aad, &env)],
            )?;
            changed += 1;
        }
    }
    {
        // Versions are always sealed; a previous key's values are resealed.
        let mut st = tx.prepare(
            "SELECT account_id, name, version, function_id, env_sealed FROM function_versions",
        )?;
        let rows: Vec<(String, String, i64, String, String)> = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<_, _>>()?;
        for (account, name, version, function_id, sealed) in rows {
            if sealer.is_current(&sealed) {
                continue;
            }
            let aad = version_environment(&account, &name, &function_id, version as u32);
            let env =
                open_environment(sealer, &aad, &sealed).map_err(|source| SealPassError::Open {
                    what: format!("environment of function {account}/{name} version {version}"),
                    source,
                })?;
            tx.execute(
                "UPDATE function_versions SET env_sealed = ?4
                 WHERE account_id = ?1 AND name = ?2 AND version = ?3",
                params![account, name, version, seal_environment(sealer, &aad, &env)],
            )?;
            changed += 1;
        }
    }
    {
        // Custom domains' keys are always sealed; a previous key's are
        // resealed.
        let mut st =
            tx.prepare("SELECT domain_name, account_id, key_sealed FROM custom_domains")?;
        let rows: Vec<(String, String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<Result<_, _>>()?;
        for (name, account, sealed) in rows {
            if sealer.is_current(&sealed) {
                continue;
            }
            let aad = custom_domain_key(&name, &account);
            let key = sealer
                .open(&aad, &sealed)
                .map_err(|source| SealPassError::Open {
                    what: format!("private key of custom domain {name}"),
                    source,
                })?;
            tx.execute(
                "UPDATE custom_domains SET key_sealed = ?2 WHERE domain_name = ?1",
                params![name, sealer.seal(&aad, &key)],
            )?;
            changed += 1;
        }
    }
    tx.commit()?;
    if changed > 0 {
        super::scrub_old_pages(conn)?;
        tracing::info!(
            values = changed,
            key_id = sealer.current_key_id(),
            "sealed stored secrets under the current key"
        );
    }
    Ok(changed)
}
