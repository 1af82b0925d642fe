//! Function environments never reach the scheduler's database in
//! plaintext: an instance's or provision's spec is stored as JSON with an
//! empty `environment`, and the environment beside it in `env_sealed`,
//! sealed with [`kiln_store::seal`] and bound to its row (an instance id;
//! an account and function), so a sealed value copied into another row
//! does not open.

use kiln_core::InstanceSpec;
use kiln_store::seal::{
    open_environment, scrub_old_pages, seal_environment, Aad, SealError, Sealer,
};
use rusqlite::Connection;

/// What an instance row's environment is bound to.
pub fn instance_aad(instance_id: &str) -> Aad {
    Aad::new("instances.env_sealed", &[instance_id])
}

/// What a provision row's environment is bound to.
/// A provision's row: LATEST's as before qualifiers existed (so rows
/// sealed then still open), an alias's with its name too.
pub fn provision_aad(account_id: &str, function_name: &str, qualifier: &str) -> Aad {
    if qualifier == kiln_internal_api::LATEST {
        Aad::new("provisions.env_sealed", &[account_id, function_name])
    } else {
        Aad::new(
            "provisions.env_sealed",
            &[account_id, function_name, qualifier],
        )
    }
}

/// The spec as stored: its JSON without the environment, and the
/// environment sealed (`None` when it is empty).
pub fn split(sealer: &Sealer, aad: &Aad, spec: &InstanceSpec) -> (String, Option<String>) {
    // The environment and a custom-container image's registry password.
    let mut bare = spec.clone();
    let secrets = bare.take_secrets();
    let sealed = (!secrets.is_empty()).then(|| seal_environment(sealer, aad, &secrets));
    (
        serde_json::to_string(&bare).expect("a spec serialises"),
        sealed,
    )
}

/// The spec a row holds, its environment opened.
pub fn join(
    sealer: &Sealer,
    aad: &Aad,
    json: &str,
    sealed: Option<&str>,
) -> Result<InstanceSpec, String> {
    let mut spec: InstanceSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if let Some(sealed) = sealed {
        spec.put_secrets(open_environment(sealer, aad, sealed).map_err(|e| e.to_string())?);
    }
    Ok(spec)
}

/// Why stored environments could not be (re)sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealPassError {
    #[error("the environment of {what} does not open")]
    Open {
        what: String,
        #[source]
        source: SealError,
    },
    #[error("the spec of {0} is not an instance spec")]
    Spec(String),
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

/// One stored spec the sealing pass looks at: its row, what its
/// environment is bound to, how errors name it, its spec and sealed value.
type StoredSpec = (i64, Aad, String, Option<String>, Option<String>);

/// Seal every environment still in a spec's JSON (stores written before
/// sealing) and reseal every one sealed under a previous key, in one
/// transaction; then, if anything changed, rewrite the file (`VACUUM`) and
/// truncate the WAL so no page holding an old plaintext survives.
/// Idempotent. Returns how many rows changed.
pub fn seal_all(conn: &mut Connection, sealer: &Sealer) -> Result<usize, SealPassError> {
    let tx = conn.transaction()?;
    let instances: Vec<StoredSpec> = tx
        .prepare("SELECT rowid, instance_id, spec, env_sealed FROM instances")?
        .query_map([], |r| {
            let id: String = r.get(1)?;
            Ok((
                r.get(0)?,
                instance_aad(&id),
                format!("instance {id}"),
                r.get(2)?,
                r.get(3)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let provisions: Vec<StoredSpec> = tx
        .prepare(
            "SELECT rowid, account_id, function_name, qualifier, spec, env_sealed FROM provisions",
        )?
        .query_map([], |r| {
            let (account, function, qualifier): (String, String, String) =
                (r.get(1)?, r.get(2)?, r.get(3)?);
            Ok((
                r.get(0)?,
                provision_aad(&account, &function, &qualifier),
                format!("provision {account}/{function} ({qualifier})"),
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut changed = 0;
    for (table, rows) in [("instances", instances), ("provisions", provisions)] {
        for (rowid, aad, what, spec, sealed) in rows {
            let Some(spec) = spec else { continue };
            let Some((json, sealed)) = resealed(sealer, &aad, &what, &spec, sealed.as_deref())?
            else {
                continue;
            };
            tx.execute(
                &format!("UPDATE {table} SET spec = ?1, env_sealed = ?2 WHERE rowid = ?3"),
                rusqlite::params![json, sealed, rowid],
            )?;
            changed += 1;
        }
    }
    tx.commit()?;
    if changed > 0 {
        scrub_old_pages(conn)?;
        tracing::info!(
            rows = changed,
            key_id = sealer.current_key_id(),
            "sealed stored function environments under the current key"
        );
    }
    Ok(changed)
}

/// What a stored spec becomes under the current key: `None` when it is
/// already sealed under it or has no environment to seal.
fn resealed(
    sealer: &Sealer,
    aad: &Aad,
    what: &str,
    spec: &str,
    sealed: Option<&str>,
) -> Result<Option<(String, Option<String>)>, SealPassError> {
    if sealed.is_some_and(|s| sealer.is_current(s)) {
        return Ok(None);
    }
    let mut parsed: InstanceSpec =
        serde_json::from_str(spec).map_err(|_| SealPassError::Spec(what.to_owned()))?;
    match sealed {
        Some(s) => {
            parsed.put_secrets(open_environment(sealer, aad, s).map_err(|source| {
                SealPassError::Open {
                    what: what.to_owned(),
                    source,
                }
            })?);
        }
        None if parsed.environment.is_empty() => return Ok(None),
        None => {}
    }
    Ok(Some(split(sealer, aad, &parsed)))
}
