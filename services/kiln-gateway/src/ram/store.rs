//! Roles in the gateway's metadata store (the `roles` table).

use kiln_core::AccountId;
use rusqlite::params;

use super::policy::Policy;
use crate::store::{MetaStoreError, SqliteStore};

/// One role: its account, name (lower-case), description and policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleRecord {
    pub account_id: AccountId,
    pub name: String,
    pub description: String,
    pub policy: Policy,
    pub created_ms: u64,
    pub modified_ms: u64,
}

/// Persistence of roles. Blocking, like [`crate::store::MetaStore`].
pub trait RoleStore: Send + Sync + 'static {
    fn roles(&self) -> Result<Vec<RoleRecord>, MetaStoreError>;
    /// Create or replace (creating the account if new).
    fn put_role(&self, role: &RoleRecord) -> Result<(), MetaStoreError>;
    fn delete_role(&self, account: &AccountId, name: &str) -> Result<bool, MetaStoreError>;
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Doc {
    description: String,
    policy: serde_json::Value,
}

impl RoleStore for SqliteStore {
    fn roles(&self) -> Result<Vec<RoleRecord>, MetaStoreError> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT account_id, name, doc, created_ms, modified_ms FROM roles")?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (account, name, doc, created, modified) = row?;
                let parsed = account.parse().ok().and_then(|a| {
                    let d: Doc = serde_json::from_str(&doc).ok()?;
                    Some((a, d.description, Policy::parse(&d.policy).ok()?))
                });
                let Some((account_id, description, policy)) = parsed else {
                    tracing::warn!(%account, %name, "skipping an unreadable role");
                    continue;
                };
                out.push(RoleRecord {
                    account_id,
                    name,
                    description,
                    policy,
                    created_ms: created as u64,
                    modified_ms: modified as u64,
                });
            }
            Ok(out)
        })
    }

    fn put_role(&self, role: &RoleRecord) -> Result<(), MetaStoreError> {
        let doc = serde_json::to_string(&Doc {
            description: role.description.clone(),
            policy: serde_json::to_value(&role.policy).expect("policy serialises"),
        })
        .expect("role serialises");
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO accounts (account_id, created_ms) VALUES (?1, ?2)",
                params![role.account_id.as_str(), role.created_ms as i64],
            )?;
            tx.execute(
                "INSERT INTO roles (account_id, name, doc, created_ms, modified_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (account_id, name)
                 DO UPDATE SET doc = excluded.doc, modified_ms = excluded.modified_ms",
                params![
                    role.account_id.as_str(),
                    role.name,
                    doc,
                    role.created_ms as i64,
                    role.modified_ms as i64
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_role(&self, account: &AccountId, name: &str) -> Result<bool, MetaStoreError> {
        self.with(|c| {
            let n = c.execute(
                "DELETE FROM roles WHERE account_id = ?1 AND name = ?2",
                params![account.as_str(), name],
            )?;
            Ok(n > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn roles_round_trip_through_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gateway.db");
        let policy = Policy::parse(&json!({"Version": "1", "Statement": [
            {"Effect": "Allow", "Action": "fc:GetFunction", "Resource": "*"}]}))
        .unwrap();
        let role = RoleRecord {
            account_id: "1".parse().unwrap(),
            name: "reader".into(),
            description: "reads".into(),
            policy,
            created_ms: 5,
            modified_ms: 6,
        };
        {
            let s = SqliteStore::open(&path, crate::store::tests::sealer()).unwrap();
            s.put_role(&role).unwrap();
            let mut changed = role.clone();
            changed.description = "still reads".into();
            changed.modified_ms = 9;
            s.put_role(&changed).unwrap();
        }
        let s = SqliteStore::open(&path, crate::store::tests::sealer()).unwrap();
        let got = s.roles().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (
                got[0].description.as_str(),
                got[0].created_ms,
                got[0].modified_ms
            ),
            ("still reads", 5, 9)
        );
        assert_eq!(got[0].policy, role.policy);
        assert!(s.delete_role(&role.account_id, "reader").unwrap());
        assert!(!s.delete_role(&role.account_id, "reader").unwrap());
        assert!(s.roles().unwrap().is_empty());
    }
}
