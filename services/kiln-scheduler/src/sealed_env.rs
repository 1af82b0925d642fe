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
pub fn provision_aad(account_id: &str, function_name: &str) -> Aad {
    Aad::new("provisions.env_sealed", &[account_id, function_name])
}

/// The spec as stored: its JSON without the environment, and the
/// environment sealed (`None` when it is empty).
pub fn split(sealer: &Sealer, aad: &Aad, spec: &InstanceSpec) -> (String, Option<String>) {
    let sealed =
        (!spec.environment.is_empty()).then(|| seal_environment(sealer, aad, &spec.environment));
    let mut bare = serde_json::to_value(spec).expect("a spec serialises");
    if let Some(obj) = bare.as_object_mut() {
        obj.insert("environment".into(), serde_json::json!({}));
    }
    (bare.to_string(), sealed)
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
        spec.environment = open_environment(sealer, aad, sealed).map_err(|e| e.to_string())?;
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

/// A table whose specs carry sealed environments: its name, its key
/// columns, and the identity a row's key binds its value to.
type SealedTable = (&'static str, &'static str, fn(&[String]) -> Aad);

/// Seal every environment still in a spec's JSON (stores written before
/// sealing) and reseal every one sealed under a previous key, in one
/// transaction; then, if anything changed, rewrite the file (`VACUUM`) and
/// truncate the WAL so no page holding an old plaintext survives.
/// Idempotent. Returns how many rows changed.
pub fn seal_all(conn: &mut Connection, sealer: &Sealer) -> Result<usize, SealPassError> {
    let tx = conn.transaction()?;
    let mut changed = 0;
    type Row = (Vec<String>, Option<String>, Option<String>);
    let tables: [SealedTable; 2] = [
        ("instances", "instance_id", |k| instance_aad(&k[0])),
        ("provisions", "account_id, function_name", |k| {
            provision_aad(&k[0], &k[1])
        }),
    ];
    for (table, keys, aad_of) in tables {
        let n_keys = keys.split(',').count();
        let rows: Vec<Row> = tx
            .prepare(&format!("SELECT {keys}, spec, env_sealed FROM {table}"))?
            .query_map([], |r| {
                let key = (0..n_keys)
                    .map(|i| r.get::<_, String>(i))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((key, r.get(n_keys)?, r.get(n_keys + 1)?))
            })?
            .collect::<Result<_, _>>()?;
        for (key, spec, sealed) in rows {
            let what = || format!("{table} row {}", key.join("/"));
            let aad = aad_of(&key);
            let Some(spec) = spec else { continue };
            let spec: InstanceSpec = match &sealed {
                Some(s) if sealer.is_current(s) => continue,
                Some(s) => {
                    let env = open_environment(sealer, &aad, s).map_err(|source| {
                        SealPassError::Open {
                            what: what(),
                            source,
                        }
                    })?;
                    let mut spec: InstanceSpec =
                        serde_json::from_str(&spec).map_err(|_| SealPassError::Spec(what()))?;
                    spec.environment = env;
                    spec
                }
                None => {
                    let spec: InstanceSpec =
                        serde_json::from_str(&spec).map_err(|_| SealPassError::Spec(what()))?;
                    if spec.environment.is_empty() {
                        continue;
                    }
                    spec
                }
            };
            let (json, sealed) = split(sealer, &aad, &spec);
            let where_keys = keys
                .split(',')
                .enumerate()
                .map(|(i, k)| format!("{} = ?{}", k.trim(), i + 3))
                .collect::<Vec<_>>()
                .join(" AND ");
            let sql = format!("UPDATE {table} SET spec = ?1, env_sealed = ?2 WHERE {where_keys}");
            let mut values: Vec<&dyn rusqlite::ToSql> = vec![&json, &sealed];
            for k in &key {
                values.push(k);
            }
            tx.execute(&sql, values.as_slice())?;
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
