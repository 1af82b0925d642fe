//! The access key lifecycle behind the operator API
//! ([`crate::api::internal`]): create (the secret is answered once), list
//! (never a secret), disable, enable, delete. Every change is written to
//! the store first, then to the catalog's key map the verifier reads, so
//! it takes effect on this gateway with the next request.

use std::sync::Arc;

use kiln_core::AccountId;
use kiln_internal_api::keys::{AccessKeyInfo, AccessKeyStatus, CreatedAccessKey};
use rand::distributions::{Alphanumeric, DistString};

use crate::catalog::{auth_key, blocking, Catalog, CatalogError};
use crate::store::{AccessKey, StoredKey};

/// FC's access key ids start with this.
const ID_PREFIX: &str = "LTAI";

fn info(k: &StoredKey) -> AccessKeyInfo {
    AccessKeyInfo {
        access_key_id: k.key.access_key_id.clone(),
        account_id: k.key.account_id.clone(),
        status: if k.enabled {
            AccessKeyStatus::Enabled
        } else {
            AccessKeyStatus::Disabled
        },
        created_ms: k.created_ms,
    }
}

impl Catalog {
    /// A new enabled key for `account` (created if new): a random id and
    /// a 30-character random secret.
    pub async fn create_key(
        &self,
        account: AccountId,
        now_ms: u64,
    ) -> Result<CreatedAccessKey, CatalogError> {
        let mut rng = rand::rngs::OsRng;
        let key = AccessKey {
            access_key_id: format!("{ID_PREFIX}{}", Alphanumeric.sample_string(&mut rng, 20)),
            account_id: account,
            secret: Alphanumeric.sample_string(&mut rng, 30),
        };
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let k = key.clone();
        blocking(move || {
            store.ensure_account(&k.account_id, now_ms)?;
            store.put_access_key(&k, now_ms)?;
            Ok(())
        })
        .await?;
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.access_key_id.clone(), Arc::new(auth_key(key.clone())));
        tracing::info!(access_key_id = %key.access_key_id, account = %key.account_id, "access key created");
        Ok(CreatedAccessKey {
            access_key_id: key.access_key_id,
            account_id: key.account_id,
            access_key_secret: key.secret,
            created_ms: now_ms,
        })
    }

    /// Every key, oldest first, without secrets.
    pub async fn list_keys(&self) -> Result<Vec<AccessKeyInfo>, CatalogError> {
        let store = self.store.clone();
        let keys = blocking(move || Ok(store.access_keys()?)).await?;
        Ok(keys.iter().map(info).collect())
    }

    /// Enable or disable a key; `None` if there is no such key.
    pub async fn set_key_enabled(
        &self,
        access_key_id: &str,
        enabled: bool,
    ) -> Result<Option<AccessKeyInfo>, CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let id = access_key_id.to_owned();
        let stored = blocking(move || {
            if !store.set_access_key_enabled(&id, enabled)? {
                return Ok(None);
            }
            Ok(store
                .access_keys()?
                .into_iter()
                .find(|k| k.key.access_key_id == id))
        })
        .await?;
        let Some(stored) = stored else {
            return Ok(None);
        };
        {
            let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
            if stored.enabled {
                keys.insert(
                    access_key_id.to_owned(),
                    Arc::new(auth_key(stored.key.clone())),
                );
            } else {
                keys.remove(access_key_id);
            }
        }
        tracing::info!(access_key_id, enabled, "access key status changed");
        Ok(Some(info(&stored)))
    }

    /// Delete a key; false if there was no such key.
    pub async fn delete_key(&self, access_key_id: &str) -> Result<bool, CatalogError> {
        let _w = self.write.lock().await;
        let store = self.store.clone();
        let id = access_key_id.to_owned();
        let deleted = blocking(move || Ok(store.delete_access_key(&id)?)).await?;
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(access_key_id);
        if deleted {
            tracing::info!(access_key_id, "access key deleted");
        }
        Ok(deleted)
    }
}
