//! Custom domains in the gateway's store (`custom_domains`): the record
//! as a JSON document, the private key sealed to the row.

use rusqlite::params;

use super::DomainRecord;
use crate::secrets::rows::custom_domain_key;
use crate::secrets::Sealer;
use crate::store::{MetaStoreError, SqliteStore};

/// Persistence of custom domains (SQLite, or PostgreSQL in a cluster).
/// Blocking, like [`crate::store::MetaStore`].
pub trait DomainStore: Send + Sync + 'static {
    /// Every stored domain with its (opened) private key.
    fn load_domains(&self, sealer: &Sealer) -> Result<Vec<(DomainRecord, String)>, MetaStoreError>;
    /// Store a new domain; false if the name is taken (by any account).
    fn insert_domain(
        &self,
        sealer: &Sealer,
        r: &DomainRecord,
        key: &str,
    ) -> Result<bool, MetaStoreError>;
    /// Replace a stored domain (same name and account).
    fn update_domain(
        &self,
        sealer: &Sealer,
        r: &DomainRecord,
        key: &str,
    ) -> Result<(), MetaStoreError>;
    fn delete_domain(&self, name: &str) -> Result<(), MetaStoreError>;
}

impl DomainStore for SqliteStore {
    fn load_domains(&self, sealer: &Sealer) -> Result<Vec<(DomainRecord, String)>, MetaStoreError> {
        sqlite_load(self, sealer)
    }
    fn insert_domain(
        &self,
        sealer: &Sealer,
        r: &DomainRecord,
        key: &str,
    ) -> Result<bool, MetaStoreError> {
        sqlite_insert(self, sealer, r, key)
    }
    fn update_domain(
        &self,
        sealer: &Sealer,
        r: &DomainRecord,
        key: &str,
    ) -> Result<(), MetaStoreError> {
        sqlite_update(self, sealer, r, key)
    }
    fn delete_domain(&self, name: &str) -> Result<(), MetaStoreError> {
        sqlite_delete(self, name)
    }
}

/// Every stored domain with its (opened) private key.
pub fn load(
    store: &dyn DomainStore,
    sealer: &Sealer,
) -> Result<Vec<(DomainRecord, String)>, MetaStoreError> {
    store.load_domains(sealer)
}

/// Store a new domain; false if the name is taken (by any account).
pub fn insert(
    store: &dyn DomainStore,
    sealer: &Sealer,
    r: &DomainRecord,
    key: &str,
) -> Result<bool, MetaStoreError> {
    store.insert_domain(sealer, r, key)
}

/// Replace a stored domain (same name and account).
pub fn update(
    store: &dyn DomainStore,
    sealer: &Sealer,
    r: &DomainRecord,
    key: &str,
) -> Result<(), MetaStoreError> {
    store.update_domain(sealer, r, key)
}

/// Delete a stored domain.
pub fn delete(store: &dyn DomainStore, name: &str) -> Result<(), MetaStoreError> {
    store.delete_domain(name)
}

pub(crate) fn doc(r: &DomainRecord) -> String {
    serde_json::to_string(r).expect("domain serialises")
}

fn sqlite_load(
    store: &SqliteStore,
    sealer: &Sealer,
) -> Result<Vec<(DomainRecord, String)>, MetaStoreError> {
    store.with(|c| {
        let mut st =
            c.prepare("SELECT domain_name, account_id, doc, key_sealed FROM custom_domains")?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (name, account, doc, sealed) in rows {
            let record: DomainRecord =
                serde_json::from_str(&doc).map_err(|source| MetaStoreError::Corrupt {
                    name: format!("custom domain {name}"),
                    source,
                })?;
            let key = sealer
                .open_string(&custom_domain_key(&name, &account), &sealed)
                .map_err(|source| MetaStoreError::Sealed {
                    what: format!("private key of custom domain {name}"),
                    source,
                })?;
            out.push((record, key));
        }
        Ok(out)
    })
}

fn sqlite_insert(
    store: &SqliteStore,
    sealer: &Sealer,
    r: &DomainRecord,
    key: &str,
) -> Result<bool, MetaStoreError> {
    let sealed = sealer.seal(
        &custom_domain_key(&r.domain_name, r.account_id.as_str()),
        key.as_bytes(),
    );
    store.with(|c| {
        let n = c.execute(
            "INSERT INTO custom_domains (domain_name, account_id, doc, key_sealed)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT (domain_name) DO NOTHING",
            params![r.domain_name, r.account_id.as_str(), doc(r), sealed],
        )?;
        Ok(n == 1)
    })
}

fn sqlite_update(
    store: &SqliteStore,
    sealer: &Sealer,
    r: &DomainRecord,
    key: &str,
) -> Result<(), MetaStoreError> {
    let sealed = sealer.seal(
        &custom_domain_key(&r.domain_name, r.account_id.as_str()),
        key.as_bytes(),
    );
    store.with(|c| {
        c.execute(
            "UPDATE custom_domains SET doc = ?3, key_sealed = ?4
             WHERE domain_name = ?1 AND account_id = ?2",
            params![r.domain_name, r.account_id.as_str(), doc(r), sealed],
        )?;
        Ok(())
    })
}

fn sqlite_delete(store: &SqliteStore, name: &str) -> Result<(), MetaStoreError> {
    store.with(|c| {
        c.execute(
            "DELETE FROM custom_domains WHERE domain_name = ?1",
            params![name],
        )?;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::domains::config::TlsSettings;

    #[test]
    fn keys_are_sealed_and_names_unique_across_accounts() {
        let sealer = Arc::new(Sealer::new(&[7; 32], &[]));
        let store = SqliteStore::open_in_memory(sealer.clone()).unwrap();
        let r = DomainRecord {
            account_id: "1".parse().unwrap(),
            domain_name: "shop.example.com".into(),
            protocol: "HTTPS".into(),
            cert_name: "c".into(),
            certificate: "CERT".into(),
            tls: TlsSettings::default(),
            routes: vec![],
            created_ms: 1,
            modified_ms: 1,
        };
        assert!(insert(&store, &sealer, &r, "THE-KEY").unwrap());
        let other = DomainRecord {
            account_id: "2".parse().unwrap(),
            ..r.clone()
        };
        assert!(!insert(&store, &sealer, &other, "K2").unwrap());
        let raw: String = store
            .with(|c| {
                Ok(
                    c.query_row("SELECT doc || key_sealed FROM custom_domains", [], |r| {
                        r.get(0)
                    })?,
                )
            })
            .unwrap();
        assert!(!raw.contains("THE-KEY"), "{raw}");
        assert_eq!(
            load(&store, &sealer).unwrap(),
            vec![(r.clone(), "THE-KEY".to_owned())]
        );
        delete(&store, "shop.example.com").unwrap();
        assert!(load(&store, &sealer).unwrap().is_empty());
    }

    #[test]
    fn a_rotated_secrets_key_reseals_domain_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let old = Arc::new(Sealer::new(&[1; 32], &[]));
        let r = DomainRecord {
            account_id: "1".parse().unwrap(),
            domain_name: "shop.example.com".into(),
            protocol: "HTTPS".into(),
            cert_name: String::new(),
            certificate: "CERT".into(),
            tls: TlsSettings::default(),
            routes: vec![],
            created_ms: 1,
            modified_ms: 1,
        };
        {
            let store = SqliteStore::open(&path, old.clone()).unwrap();
            assert!(insert(&store, &old, &r, "THE-KEY").unwrap());
        }
        // Opening under a new key (the old one still listed) reseals ...
        let rotated = Arc::new(Sealer::new(&[2; 32], &[[1; 32]]));
        drop(SqliteStore::open(&path, rotated).unwrap());
        // ... so the new key alone opens it.
        let new = Arc::new(Sealer::new(&[2; 32], &[]));
        let store = SqliteStore::open(&path, new.clone()).unwrap();
        assert_eq!(load(&store, &new).unwrap(), vec![(r, "THE-KEY".to_owned())]);
        assert!(
            load(&store, &old).is_err(),
            "the old key no longer opens it"
        );
    }
}
